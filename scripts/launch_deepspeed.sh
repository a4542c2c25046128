#!/usr/bin/env bash
# Launch cogvx-train with the deepspeed launcher.
#   One node, no hostfile, no ssh:
#     NPROC=8 scripts/launch_deepspeed.sh stage=dit_b2 model=5b trainer=deepspeed_zero2 init_from=...
#   Several nodes from one (the launcher ssh-es into every host of the hostfile, "host slots=8" per line):
#     HOSTFILE=hostfile NPROC=8 scripts/launch_deepspeed.sh stage=dit_b2 ...
#   Several nodes without ssh (a scheduler starts this script once per node):
#     HOSTFILE=hostfile NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> NPROC=8 scripts/launch_deepspeed.sh stage=dit_b2 ...
set -euo pipefail
NPROC=${NPROC:-8}
PORT=${MASTER_PORT:-29500}
export COGVX_RUN_ID=${COGVX_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}  # every node names the run directory alike
if [[ -z "${HOSTFILE:-}" && ! -f hostfile ]]; then
  # one node: the launcher's own no-ssh mode over a one-line hostfile
  HOSTFILE=$(mktemp)
  trap 'rm -f "$HOSTFILE"' EXIT
  echo "localhost slots=$NPROC" > "$HOSTFILE"
  NODES=(--no_ssh --node_rank 0 --master_addr 127.0.0.1)
else
  HOSTFILE=${HOSTFILE:-hostfile}
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch_deepspeed.sh: HOSTFILE=$HOSTFILE does not exist; give a file with one \"host slots=N\" line per node," \
         "or unset HOSTFILE to train on this node alone." >&2
    exit 2
  fi
  if [[ -n "${NODE_RANK:-}" ]]; then
    NODES=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0 with NODE_RANK}")
  else
    NODES=()
  fi
fi
NNODES=$(grep -cve '^\s*$' "$HOSTFILE")
# not exec: the trap removes the temporary hostfile when the launcher ends
deepspeed "${NODES[@]}" --no_local_rank --hostfile "$HOSTFILE" --master_port "$PORT" \
  --module cogvx_train.cli.train trainer.devices="$NPROC" trainer.num_nodes="$NNODES" "$@"
