#!/usr/bin/env bash
# Launch cogvx-train with the deepspeed launcher and a hostfile ("host slots=8" per line).
#   HOSTFILE=hostfile NPROC=8 scripts/launch_deepspeed.sh stage=dit_b2 model=5b trainer=deepspeed_zero2 init_from=...
set -euo pipefail
HOSTFILE=${HOSTFILE:-hostfile}
NPROC=${NPROC:-8}
NNODES=$(grep -cve '^\s*$' "$HOSTFILE")
export COGVX_RUN_ID=${COGVX_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
exec deepspeed --no_local_rank --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
  --module cogvx_train.cli.train trainer.devices="$NPROC" trainer.num_nodes="$NNODES" "$@"
