#!/usr/bin/env bash
# Multi-node DropPos pre-training under torchrun (one process per GPU).
#
# torchrun only launches processes and hosts the rendezvous store; it runs no Python in the
# workers. Every worker is the droppos-pipeline binary, which reads RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR, MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE and joins the c10d
# process group (NCCL on GPUs). Run this script on every node, e.g. 2 nodes x 8 GPUs:
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun-multinode.sh --config configs/<recipe>.toml
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/torchrun-multinode.sh --config configs/<recipe>.toml
#
# Arguments after the script name go to `droppos-pipeline train`. The global batch is
# batch-per-GPU x GPUs x accumulation steps; the learning rate is scaled from it as in the recipe.
#
# Settings (environment):
#   NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs on this node), MASTER_ADDR (127.0.0.1),
#   MASTER_PORT (29500), DROPPOS_BIN (droppos-pipeline on PATH, else the release build),
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME: the network interface to use between nodes
#   (e.g. ib0, eth0) when the default route is not the right one.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l)"
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
BIN="${DROPPOS_BIN:-$(command -v droppos-pipeline || echo "${CARGO_TARGET_DIR:-$HOME/.cache/droppos-pipeline/target}/release/droppos-pipeline")}"
[ -x "$BIN" ] || { echo "droppos-pipeline not found (set DROPPOS_BIN)" >&2; exit 1; }

# --no-python: the workers are the Rust binary itself. --rdzv-backend static keeps the
# classic MASTER_ADDR:MASTER_PORT store hosted by node 0's agent.
exec torchrun \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" \
    --no-python \
    "$BIN" train "$@"
