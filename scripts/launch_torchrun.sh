#!/usr/bin/env bash
# Launch cogvx-train with torchrun on one node or several.
#   one node, 8 GPUs:   NPROC=8 scripts/launch_torchrun.sh stage=dit_b1 model=5b trainer=ddp
#   node i of N:        NNODES=N NODE_RANK=i MASTER_ADDR=host0 NPROC=8 scripts/launch_torchrun.sh stage=dit_b1 ...
# Every rank checks at start-up that all ranks run the same resolved config and names the one that does not.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export COGVX_RUN_ID=${COGVX_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}   # one run directory for all ranks: set the same value on every node
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m cogvx_train.cli.train trainer.devices="$NPROC" trainer.num_nodes="$NNODES" "$@"
