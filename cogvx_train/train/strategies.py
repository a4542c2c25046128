"""`trainer=ddp | fsdp | deepspeed_zero2 | deepspeed_zero3`: the distribution strategy, chosen in one place.

DeepSpeed on a CPU: Lightning's DeepSpeedStrategy refuses any accelerator but CUDA, while DeepSpeed itself runs
on the CPU (its CPU accelerator, gloo). `CPUDeepSpeedStrategy` lifts only that refusal, so the real DeepSpeed
engine (ZeRO partitioning, its optimizer wrapper, its checkpoints) stays in the loop in CPU tests and CI.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from omegaconf import DictConfig


def _deepspeed_strategy_class():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """DeepSpeedStrategy whose environment setup does not insist on CUDA (everything else is Lightning's)."""

        strategy_name = "cogvx_deepspeed_cpu"

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA-only check

    return CPUDeepSpeedStrategy if not torch.cuda.is_available() else DeepSpeedStrategy


def build_strategy(t: DictConfig, find_unused_parameters: bool = False):
    name = str(t.strategy)
    timeout = timedelta(minutes=30)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=find_unused_parameters, timeout=timeout)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(sharding_strategy="FULL_SHARD", state_dict_type="sharded", timeout=timeout)
    if name.startswith("deepspeed_zero"):
        stage = int(name[-1])
        cls = _deepspeed_strategy_class()
        return cls(stage=stage, offload_optimizer=bool(t.get("offload_optimizer", False)),
                   offload_parameters=bool(t.get("offload_parameters", False)), timeout=timeout,
                   process_group_backend=None if torch.cuda.is_available() else "gloo")
    return name
