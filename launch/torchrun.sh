#!/usr/bin/env bash
# Multi-process training with torchrun, on one node or many.
#
#   launch/torchrun.sh RECIPE [key.sub=value ...]
#
# One node:   NPROC_PER_NODE=8 launch/torchrun.sh recipes/my.yaml distributed.backend=ddp
# Many nodes: on every node, the same command with
#             NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<host of node 0> [MASTER_PORT=29500]
# Environment (defaults): NPROC_PER_NODE (number of GPUs, 1 without), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (required with NNODES > 1), MASTER_PORT (29500; one node without it: a free port),
# PYTHON (python3: the interpreter whose environment has surgsigma_train installed).
#
# The exit code is the trainer's: 0 done, 75 preempted (checkpoint saved; rerun to resume),
# 2 bad recipe, 3 bad data (do not retry), 76 infrastructure (retry). SIGUSR2 or SIGTERM to this
# process asks the run to save and stop.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"

if [[ "$NNODES" -gt 1 || -n "${MASTER_ADDR:-}" ]]; then
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the host of node 0)" >&2
    exit 2
  fi
  rendezvous=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR"
              --master-port="${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
  rendezvous=(--nnodes=1 --node-rank=0 --master-addr=127.0.0.1 --master-port="$MASTER_PORT")
else
  rendezvous=(--standalone)  # one node: torchrun picks a free port, so two runs on one machine do not clash
fi

# surgsigma_train.launch.torchrun is torchrun that returns the trainer's exit code (torchrun's own is
# 1 for any failure) and forwards SIGUSR2/SIGTERM to the workers instead of killing them.
exec "$PYTHON" -m surgsigma_train.launch.torchrun "${rendezvous[@]}" --nproc-per-node="$NPROC_PER_NODE" \
  -m surgsigma_train.cli train "$@"
