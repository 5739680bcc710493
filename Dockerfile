# notellm-stream worker image. The worker never imports torch: the image holds ONNX Runtime only.
#
#   CPU (default):  docker build -t notellm-worker .
#   GPU:            docker build -t notellm-worker:gpu --build-arg RUNTIME=gpu \
#                     --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
#
# The model package (notellm.json + tokenizer.json + graph files, written by `notellm export`) is not
# baked in: mount it at /models/notellm (read-only), e.g. from a PVC or an init container.
ARG BASE=python:3.11-slim
FROM ${BASE} AS runtime
ARG RUNTIME=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CUDA base images have no Python of their own.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 python3-pip python3.11-venv && \
      ln -sf /usr/bin/python3.11 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY notellm ./notellm
COPY export ./export
COPY schemas ./schemas
# Core dependencies only (no [model] extra: no torch). For the GPU image, onnxruntime-gpu replaces
# onnxruntime: both install the same `onnxruntime` package, so never both.
RUN python -m pip install . && \
    if [ "$RUNTIME" = "gpu" ]; then \
      python -m pip uninstall -y onnxruntime && python -m pip install --no-deps "onnxruntime-gpu>=1.20" ; fi && \
    python -c "import onnxruntime as o; print('providers:', o.get_available_providers())"
RUN useradd --system --uid 10001 notellm && mkdir -p /data /models && chown notellm /data
USER 10001
ENV NOTELLM_MODEL__DIR=/models/notellm \
    NOTELLM_MILVUS__URI=/data/milvus/notes.db \
    NOTELLM_HTTP__PORT=8088 \
    NOTELLM_LOG__FORMAT=json
EXPOSE 8088
ENTRYPOINT ["notellm"]
CMD ["worker", "run"]
