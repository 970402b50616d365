# The pipeline image: CLI, workers, beat and migrations in one.
#   docker build -t llm-batch-pipeline .                                         # CPU PyTorch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t llm-batch-pipeline:cuda .
# The `flower` target adds Flower on top (it is not a dependency of the package).
# Debian trixie: its postgresql-client (17) is at least the server's major version (postgres:16 in
# docker-compose.yml), which pg_dump needs for the nightly backups.
FROM python:3.11-slim-trixie AS pipeline

# PyPI's default torch wheel is a multi-GB CUDA build; the CPU index keeps the default image small.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# pg_dump for the nightly database backup that beat runs (db/backup.py); g++ builds the engine's
# CPU kernels on first use (workers/native_kernels.py), without it workers run the slower PyTorch path.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends postgresql-client g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.5,<3"
COPY . .
RUN pip install . \
    && useradd --create-home --uid 10001 pipeline \
    && mkdir -p /data \
    && chown pipeline /data
USER pipeline
# Results, backups and KV cache snapshots (see PIPELINE_RESULTS_DIR, _BACKUPS_DIR, _CACHE_DIR).
VOLUME ["/data"]
CMD ["pipeline", "--help"]

FROM pipeline AS flower
USER root
RUN pip install "flower>=2.0,<3"
USER pipeline
