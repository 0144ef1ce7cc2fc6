# One image for the gateway and the processor (the command picks the part).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# CPU build by default; build with --build-arg TORCH_SPEC=... for a CUDA one.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY captionstream ./captionstream
COPY schemas ./schemas
COPY ingest ./ingest
COPY processor ./processor
COPY gateway ./gateway
RUN pip install .
ENV CAPTIONSTREAM_DATA_DIR=/data HF_HOME=/models
VOLUME ["/data", "/models"]
ENTRYPOINT ["captionstream"]
