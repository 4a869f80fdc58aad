#!/bin/bash
# em-fit under torchrun (no SLURM): torchrun starts one process per device and sets RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which Lightning picks up (TorchElasticEnvironment).
#   One node, 8 GPUs:     scripts/torchrun.sh 8 configs/qwen2.5-14b-instruct/rank1-l24-downproj.yaml --trainer.strategy ddp
#   Node k of 2 (k=0,1):  NNODES=2 NODE_RANK=k MASTER_ADDR=<node 0> scripts/torchrun.sh 8 CONFIG.yaml --config configs/strategies/fsdp2.yaml
#   CPU, 2 processes:     scripts/torchrun.sh 2 configs/smoke.yaml --trainer.accelerator cpu --trainer.strategy ddp
set -euo pipefail
nproc=${1:?usage: torchrun.sh NPROC_PER_NODE CONFIG.yaml [em-fit options...]}
config=${2:?usage: torchrun.sh NPROC_PER_NODE CONFIG.yaml [em-fit options...]}
shift 2
nnodes=${NNODES:-1}
exec torchrun --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m em_lightning.cli fit --config "$config" --trainer.num_nodes "$nnodes" --trainer.devices "$nproc" "$@"
