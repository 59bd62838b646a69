#!/bin/sh
# One node of the demo job: a torchrun agent on the etcd-rdzv backend, one worker running
# examples/allreduce_worker.py for a long time (a stand-in for training).
#
# Every container of the `trainer` service runs this, so `docker compose up --scale trainer=N`
# gives an elastic job of N nodes (within RDZV_NNODES). Nodes joining or leaving make the
# others restart their workers and rendezvous again, which is what the dashboards show.
# Settings come from the environment (defaults below); arguments are passed to the worker.
set -eu

RDZV_ENDPOINT="${RDZV_ENDPOINT:-etcd:2379}"
RDZV_ID="${RDZV_ID:-demo}"
RDZV_NNODES="${RDZV_NNODES:-1:8}"
RDZV_CONF="${RDZV_CONF:-}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
TRAINER_STEPS="${TRAINER_STEPS:-1000000}"
TRAINER_STEP_SECONDS="${TRAINER_STEP_SECONDS:-2}"
# How long a collective may wait for a peer: when a node dies mid-step, the others notice
# after at most this long, fail, and rendezvous again without it.
TRAINER_COLLECTIVE_TIMEOUT="${TRAINER_COLLECTIVE_TIMEOUT:-30}"
TRAINER_MAX_RESTARTS="${TRAINER_MAX_RESTARTS:-1000}"
TRAINER_OUT="${TRAINER_OUT:-/tmp/etcd-rdzv-results}"
TRAINER_WORKER="${TRAINER_WORKER:-/opt/etcd-rdzv/examples/allreduce_worker.py}"

# The address the other nodes reach this one at; rank 0's becomes MASTER_ADDR. A replica's
# host name is its container id, which Docker's DNS need not resolve for the other
# containers, so use the container's IP (its /etc/hosts entry) instead.
if [ -z "${TRAINER_LOCAL_ADDR:-}" ]; then
    TRAINER_LOCAL_ADDR="$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')"
fi

set -- \
    --nnodes="${RDZV_NNODES}" \
    --nproc-per-node="${NPROC_PER_NODE}" \
    --rdzv-backend=etcd-rdzv \
    --rdzv-endpoint="${RDZV_ENDPOINT}" \
    --rdzv-id="${RDZV_ID}" \
    ${RDZV_CONF:+"--rdzv-conf=${RDZV_CONF}"} \
    --max-restarts="${TRAINER_MAX_RESTARTS}" \
    --local-addr="${TRAINER_LOCAL_ADDR}" \
    "${TRAINER_WORKER}" \
    --out="${TRAINER_OUT}" \
    --steps="${TRAINER_STEPS}" \
    --step-seconds="${TRAINER_STEP_SECONDS}" \
    --timeout="${TRAINER_COLLECTIVE_TIMEOUT}" \
    "$@"

echo "trainer-entrypoint: torchrun $*" >&2
# exec: torchrun gets SIGTERM from `docker compose stop` / scale-down (through init), stops its
# workers and leaves the rendezvous open for the remaining nodes.
exec torchrun "$@"
