# notellm-stream worker image. The worker never imports torch: the image holds ONNX Runtime only.
#
#   CPU (default):  DOCKER_BUILDKIT=1 docker build -t notellm-worker:0.1.0 .
#   GPU:            DOCKER_BUILDKIT=1 docker build -t notellm-worker:0.1.0-gpu --build-arg RUNTIME=gpu .
#   Here:           scripts/image build [--gpu]   (a locally made Debian base, the CA bundle as a secret)
#
# BASE is any Debian/Ubuntu image: with a Python >= 3.11 of its own (the default, python:3.11-slim) or
# without one (a bare Debian such as the one `scripts/image base` makes with debootstrap), in which case
# the distribution's python3 is installed. Either way the project goes into a virtual environment
# (/opt/venv), never into the system interpreter (PEP 668).
#
# The GPU variant uses the same base: onnxruntime-gpu with its CUDA and cuDNN libraries from NVIDIA's
# PyPI wheels (the `cuda` and `cudnn` extras), loaded by the worker with onnxruntime.preload_dlls(). The
# node needs only the NVIDIA driver (the container toolkit mounts libcuda), not a CUDA base image.
#
# Behind a TLS-intercepting proxy, pass its CA bundle as a BuildKit secret: it is mounted for the pip
# step only and never lands in a layer:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
#
# The model package (notellm.json + tokenizer.json + graph files, written by `notellm export`) is not
# baked in: mount it at /models/notellm (read-only), from a PVC or an init container (see deploy/).
# The image runs as uid 10001 and needs no writable path but /tmp (and /data for a milvus-lite db), so it
# runs with a read-only root filesystem.
ARG BASE=python:3.11-slim

# --------------------------------------------------------------------------------------------------------
FROM ${BASE} AS python
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# tini as PID 1: forwards SIGTERM to the worker and reaps the encoder's and milvus-lite's children.
RUN set -eu; \
    pkgs="tini"; \
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
      pkgs="$pkgs python3 python3-venv"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# --------------------------------------------------------------------------------------------------------
FROM python AS build
ARG RUNTIME=cpu
ARG ORT_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY notellm ./notellm
COPY export ./export
COPY schemas ./schemas
# Core dependencies only (no [model] extra: no torch). onnxruntime-gpu replaces onnxruntime: both install
# the same `onnxruntime` package, so the GPU variant uninstalls the CPU one first, never both.
RUN --mount=type=secret,id=ca,required=false set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip=/opt/venv/bin/pip; \
    $pip install --no-compile . ; \
    if [ "$RUNTIME" = gpu ]; then \
      $pip uninstall -y onnxruntime; \
      $pip install --no-compile "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}"; fi; \
    $pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true; \
    find /opt/venv -depth \( -name __pycache__ -o -name tests -path '*/site-packages/*/tests' \) -prune -exec rm -rf {} + ; \
    /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib >/dev/null; \
    /opt/venv/bin/python -c "import onnxruntime as o; print('providers:', o.get_available_providers())"

# --------------------------------------------------------------------------------------------------------
FROM python AS runtime
ARG RUNTIME=cpu
LABEL org.opencontainers.image.title="notellm-stream worker" \
      org.opencontainers.image.description="Kafka -> NoteLLM ONNX encoder -> Milvus ingestion worker (${RUNTIME})" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
RUN set -eu; \
    if command -v useradd >/dev/null; then \
      useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin notellm; \
    else echo 'notellm:x:10001:10001::/nonexistent:/usr/sbin/nologin' >> /etc/passwd; \
         echo 'notellm:x:10001:' >> /etc/group; fi; \
    mkdir -p /data /models/notellm; chown 10001:10001 /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    NOTELLM_MODEL__DIR=/models/notellm \
    NOTELLM_MILVUS__URI=/data/milvus/notes.db \
    NOTELLM_HTTP__HOST=0.0.0.0 \
    NOTELLM_HTTP__PORT=8088 \
    NOTELLM_LOG__FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 8088
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "notellm"]
CMD ["worker", "run"]
