# One image for the gateway and the processor (the command picks the part):
#   docker build -t captionstream:cpu .
#   docker build -t captionstream:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# docker-compose.kafka.yml builds both; docs/deployment.md explains the deployment.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# torch first, from the index that decides the build. Default: the CPU wheels (PyPI's
# Linux wheels bundle CUDA libraries, gigabytes a CPU host never uses). For CUDA, pass
# the index matching the hosts' driver, e.g. https://download.pytorch.org/whl/cu128.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY captionstream ./captionstream
COPY schemas ./schemas
COPY ingest ./ingest
COPY processor ./processor
COPY gateway ./gateway
RUN pip install .

# An unprivileged user owning the mount points, so that named volumes mounted there
# (blobs, the model cache) start out writable by it.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin captionstream \
    && mkdir -p /data/blobs /models \
    && chown -R captionstream /data /models
USER captionstream
ENV CAPTIONSTREAM_DATA_DIR=/data HF_HOME=/models
VOLUME ["/data", "/models"]
# gateway HTTP; worker /healthz, /readyz and /metrics (with CAPTIONSTREAM_METRICS_PORT)
EXPOSE 8000 6066
ENTRYPOINT ["captionstream"]
