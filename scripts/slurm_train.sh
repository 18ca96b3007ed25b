#!/bin/bash
# Multi-node training with SLURM: one srun task per node, each starting torchrun for its GPUs;
# the torchrun agents meet at a c10d rendezvous on the first node.
#
#   sbatch scripts/slurm_train.sh -c configs/train_fsdp.yaml parallel.dp_replicate=2
#
#SBATCH --job-name=colodiffusion
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# export NCCL_SOCKET_IFNAME=ib0   # pick the fast interconnect if NCCL guesses wrong
# export NCCL_DEBUG=WARN

srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" \
  --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" \
  -m colodiffusion train run.dir="runs/$SLURM_JOB_NAME" train.resume=auto "$@"
