# The demo trainer: torchrun agents on the etcd-rdzv backend running examples/allreduce_worker.py.
# Built by docker-compose.yml with the repository root as the context (.dockerignore keeps
# it to what this file copies):  docker compose build trainer
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in a layer of its own: the CPU build (PyPI's default wheel is the multi-GB CUDA
# one), and a code change does not download it again. Same version as the Makefile's.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/etcd-rdzv
# What `pip install .` needs (README.md is the package's long description), then the project.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && python -c "import etcd_rdzv"
COPY examples ./examples
COPY docker/trainer-entrypoint.sh /usr/local/bin/trainer-entrypoint
RUN chmod 0755 /usr/local/bin/trainer-entrypoint \
    && useradd --create-home --uid 10001 --user-group trainer

# Neither torchrun nor the workers need root.
USER trainer
WORKDIR /home/trainer
# The agent's Prometheus metrics (ETCD_RDZV_METRICS_PORT).
EXPOSE 9401
ENTRYPOINT ["/usr/local/bin/trainer-entrypoint"]
