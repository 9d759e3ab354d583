#!/usr/bin/env bash
# gptlab under torchrun, for those who launch with it directly. gptlab's Accelerator reads
# the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...), so training is the
# same as under `accelerate launch`.
#
#   launch/torchrun.sh [hydra overrides]                     # one machine, all its GPUs (1 process on CPU)
#   NPROC_PER_NODE=2 launch/torchrun.sh debug=smoke          # 2 processes (gloo on a CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh ...   # then NODE_RANK=1 on the other node
#
# SIGTERM and SIGUSR1 reach the trainers as SIGTERM (launch/forward_signals.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
nnodes=${NNODES:-1}

args=(--nnodes "$nnodes" --nproc_per_node "$nproc")
if ((nnodes > 1)); then
  args+=(--node_rank "${NODE_RANK:?set NODE_RANK (0 on the head node)}"
         --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the head node}" --master_port "${MASTER_PORT:-29500}")
else
  # One machine: a free port, so two jobs on one box never collide.
  args+=(--standalone)
fi

exec "$here/forward_signals.sh" torchrun "${args[@]}" "$here/../train.py" "$@"
