"""`cogvx-train`: compose a run from conf/ with Hydra, check it, build everything in `train()`, fit.

    cogvx-train stage=vae_a1 experiment=demo
    cogvx-train stage=dit_b1 model=5b data.manifest=/data/m.jsonl trainer=ddp trainer.devices=8
    cogvx-train -m stage=dit_b1 experiment=demo model.attention=full,spatial_temporal
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cogvx_train.config import ConfigError
from cogvx_train.config import resolvers

log = logging.getLogger("cogvx_train")

CONFIG_MODULE = "cogvx_train.conf"
GROUPS = ("stage", "model", "data", "trainer", "logger", "callbacks", "paths", "experiment", "debug")
HYDRA_FLAGS_WITH_VALUE = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                          "--package", "-p", "--info", "-i")


def _config_dirs(argv: list[str]) -> list[Path]:
    """The packaged conf/ plus any --config-dir the user adds."""
    from importlib.resources import files

    dirs = [Path(str(files(CONFIG_MODULE)))]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]).expanduser())
    return dirs


def _options(group: str, dirs: list[Path]) -> list[str]:
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def precheck(argv: list[str]) -> None:
    """Answer the commonest command-line mistakes in one sentence, before Hydra prints a stack of its own.

    Unknown group options (stage=dit_b9, model=7b) and a missing stage are caught here; everything about values
    is checked after composition by cogvx_train.config.validate.
    """
    if any(a in ("--help", "-h", "--hydra-help", "--version", "--info", "-i") or a.startswith("--info=")
           for a in argv):
        return
    dirs = _config_dirs(argv)
    skip = False
    overrides = []
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
    multirun = "-m" in argv or "--multirun" in argv
    chosen: dict[str, list[str]] = {}
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        key = key.removeprefix("override ").strip()
        if not sep or key not in GROUPS:
            continue
        values = value.split(",") if multirun else [value]
        chosen[key] = values
        known = _options(key, dirs)
        for v in values:
            if v in ("null", ""):
                continue
            if v not in known:
                raise ConfigError(f"{key}={v} is not a known {key}; choose one of: {', '.join(known)} "
                                  f"(or add {key}/{v}.yaml to a directory given with --config-dir).")
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key == "resume" and value not in ("", "null") and not Path(value).expanduser().exists():
            # checked before Hydra, which would otherwise create the directory as the run directory
            raise ConfigError(f"resume={value} does not exist; give the run directory to continue "
                              "(outputs/runs/<stage>/<time>) or its checkpoints/last.ckpt.")
        run_dir = Path(resolvers.run_dir("", "", value)) if key == "resume" and value not in ("", "null") else None
        if run_dir is not None and not (run_dir / "config.yaml").is_file():
            # also before Hydra, which would write .hydra/ and train.log into whatever directory this names
            raise ConfigError(f"resume={value} is not a cogvx-train run ({run_dir} has no config.yaml); give the "
                              "run directory to continue (outputs/runs/<stage>/<time>) or its checkpoints/last.ckpt, "
                              "or use init_from= to start a new run from a checkpoint's weights.")
    if "stage" not in chosen and "hydra/help" not in chosen:
        raise ConfigError(f"no stage is selected; add stage=<name>, one of: {', '.join(_options('stage', dirs))}.")
    if not multirun:
        _compose_or_explain([o for o in overrides if not o.startswith("hydra.")], dirs)


def _compose_or_explain(overrides: list[str], dirs: list[Path]) -> None:
    """Compose once so that a typo in a key (data.num_frame=17) gets one sentence instead of Hydra's report."""
    import difflib

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    extra = [f"hydra.searchpath=[{','.join('file://' + str(d) for d in dirs[1:])}]"] if len(dirs) > 1 else []
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides + extra)
    except Exception as err:  # noqa: BLE001 - Hydra/OmegaConf raise several types for the same user mistake
        message = str(err).strip().splitlines()[0]
        key = next((o.split("=", 1)[0].lstrip("+~") for o in overrides if f"'{o.split('=', 1)[0]}'" in message
                    or o.split("=", 1)[0].rpartition(".")[2] in message), None)
        hint = ""
        if key and "." in key:
            parent, _, leaf = key.rpartition(".")
            try:
                with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
                    base = compose(config_name="train", overrides=[o for o in overrides if not o.startswith(key)])
                node = OmegaConf.select(base, parent)
                close = difflib.get_close_matches(leaf, list(node.keys()) if node is not None else [], n=1)
                hint = f" Did you mean {parent}.{close[0]}?" if close else ""
            except Exception:  # noqa: BLE001
                pass
        raise ConfigError(f"the command line does not compose: {message}{hint}") from None
    finally:
        GlobalHydra.instance().clear()
    del cfg


def train(cfg: DictConfig, run=None) -> dict:
    """Build everything a run needs, in this order, and fit. Returns the final metrics.

    `run` (a RunDirectory) defaults to the directory Hydra chose for this job.
    """
    from cogvx_train.train import factory
    from cogvx_train.train.distributed import adopt_launcher_node_rank
    from cogvx_train.train.run_dir import RunDirectory

    adopt_launcher_node_rank()                                     # before Lightning reads the node rank
    world_size = factory.world_size_from_env(cfg)
    run = run or RunDirectory.from_hydra(cfg)
    pin_hydra_run_dir(run.path)
    derived = factory.check_config(cfg, world_size)               # one sentence per mistake, nothing heavy yet
    if run.finished() and not cfg.resume:
        log.info("trial %s already finished; skipping (delete %s to redo it)", run.path, run.done_marker)
        return run.final_metrics()
    if cfg.task == "curriculum":
        from hydra.core.hydra_config import HydraConfig

        from cogvx_train.train.curriculum import run_curriculum

        run.write_config(cfg, derived, argv=sys.argv)
        return run_curriculum(cfg, run, list(HydraConfig.get().overrides.task))
    ckpt_path = factory.resume_checkpoint(cfg, run)               # refuses changes outside the whitelist
    run.write_config(cfg, derived, argv=sys.argv)
    factory.seed_everything(cfg.seed)

    datamodule = factory.build_datamodule(cfg)
    module = factory.build_module(cfg, run)
    callbacks = factory.build_callbacks(cfg, run)
    loggers = factory.build_loggers(cfg, run)
    trainer = factory.build_trainer(cfg, callbacks, loggers)

    # the final step is checkpointed by the checkpoint callback (StepCheckpoint), at the end of its batch: a save
    # here, after fit, would record the data position of the next epoch
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    from cogvx_train.train.catch_up import CatchUpOnResume

    # a checkpoint of the final step: fit had nothing to train; what a kill lost after it is caught up on here
    final_row = next((c.after_fit(trainer, module, datamodule) for c in trainer.callbacks
                      if isinstance(c, CatchUpOnResume)), {})
    metrics = {**final_row, **factory.final_metrics(trainer)}
    if trainer.is_global_zero:
        factory.export_final(module, run)
        run.mark_finished(metrics)
    return metrics


def pin_hydra_run_dir(path: Path) -> None:
    """Fix `hydra.run.dir` to the directory this job writes to. It is an interpolation of a time-stamp resolver,
    and Lightning's launcher of ranks 1.. (trainer.devices=N without torchrun) reads it again to give them their
    directory: seconds later, it named a new, near-empty directory."""
    from omegaconf import read_write

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = str(path)


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="train", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as err:
        for message in err.messages:
            print(f"cogvx-train: error: {message}", file=sys.stderr)
        _remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)


def _remove_if_empty(run_dir: Path) -> None:
    """A rejected config leaves no run directory behind (Hydra creates it before our checks run)."""
    import shutil

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"train.log", ".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    resolvers.register()
    # launchers that append --local_rank=N (deepspeed without --no_local_rank, torch.distributed.launch): the rank
    # is in the environment already, and Hydra would reject the argument
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        precheck(sys.argv[1:])
    except ConfigError as err:
        print(f"cogvx-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if ("--help" in sys.argv or "-h" in sys.argv) and not any(a.startswith("stage=") for a in sys.argv):
        # Hydra composes a config even to print help; any stage will do, the help text shows none of its values.
        sys.argv.append("stage=dit_b1")
    if any(a in ("--cfg", "-c") for a in sys.argv) and "--resolve" not in sys.argv:
        sys.argv.append("--resolve")  # users want the values a run will use, not the interpolations
    _hydra_entry()


if __name__ == "__main__":
    main()
