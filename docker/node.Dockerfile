# syntax=docker/dockerfile:1
# Tessera hospital node, CPU build.
# Build from the repository root (the context is the root; docker/node.Dockerfile.dockerignore
# keeps everything but the package sources out of it):
#   docker build -f docker/node.Dockerfile -t tessera/node:0.1.0 .
# Run with a read-only root: state in /var/lib/tessera, DICOM read-only at /data/dicom,
# the startup bundle read-only at /etc/tessera/bundle, a tmpfs at /tmp.

# The base image by digest (the OCI index of python:3.11-slim-bookworm, Python 3.11.16, as
# docker-library/repo-info recorded it in August 2026). To move to a newer build, take the
# digest that `docker buildx imagetools inspect python:3.11-slim-bookworm` prints.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:fe556eaffd0d96abd8685b83bb8a69addd0dc730fa193669a7df0d49ddcfac02

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# torch first, pinned and from the CPU index: otherwise the resolver pulls a multi-GB CUDA build.
RUN python -m venv /opt/tessera \
 && /opt/tessera/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tessera/ tessera/
COPY broker/ broker/
COPY node/ node/
COPY aggregator/ aggregator/
# A regular (non-editable) install: the runtime stage gets the venv and no source tree.
# pip writes the bytecode at install time, so the read-only runtime never needs to.
RUN /opt/tessera/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG PYTHON_IMAGE
LABEL org.opencontainers.image.title="tessera-node" \
      org.opencontainers.image.description="Tessera federated-learning hospital node (CPU): DICOM intake, local training, secret-shared updates, ONNX inference" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tessera" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# A fixed UID/GID so volume ownership is predictable across hosts and Kubernetes fsGroup.
RUN groupadd --system --gid 10001 tessera \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tessera --no-create-home \
      --shell /usr/sbin/nologin tessera \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/tessera \
 && install -d -m 0755 /etc/tessera /etc/tessera/bundle /data/dicom
COPY --from=builder /opt/tessera /opt/tessera
# Nothing writes under the image: bytecode is precompiled, HOME and caches live on the state
# volume, scratch space on the /tmp tmpfs. That is what makes --read-only work.
ENV PATH=/opt/tessera/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/tessera \
    XDG_CACHE_HOME=/var/lib/tessera/cache \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /var/lib/tessera
EXPOSE 8080 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["tessera"]
CMD ["node", "run", "--config", "/etc/tessera/node.toml"]
