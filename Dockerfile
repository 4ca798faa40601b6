# One image for the master and the workers of docker-compose.yml: tpi on Python 3.11 with CPU
# torch, and iproute2 for the link shaping at container start (docker/entrypoint.sh). No model
# inside: the master's is mounted read-only, the workers fetch their shards from the master.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*

# torch first and explicitly, as .ci/run does; the CPU build, not the multi-GB CUDA one
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0

WORKDIR /opt/tpi
COPY pyproject.toml README.md ./
COPY tpi ./tpi
COPY launcher ./launcher
RUN pip install --no-cache-dir ".[master]"
COPY docker ./docker

# split files (master) and fetched shards (workers) live here: a volume per service in docker-compose.yml
ENV TPI_CACHE=/cache PYTHONUNBUFFERED=1
ENTRYPOINT ["/opt/tpi/docker/entrypoint.sh"]
CMD ["--help"]
