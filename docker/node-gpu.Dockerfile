# syntax=docker/dockerfile:1
# Tessera hospital node, GPU build: CUDA base image and the CUDA build of torch.
#   docker build -f docker/node-gpu.Dockerfile -t tessera/node-gpu:0.1.0 \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:<digest> .
# Needs the NVIDIA container toolkit on the host (docker run --gpus all ...). Mounts and the
# read-only root are as for docker/node.Dockerfile.
#
# Builder and runtime share one base image, so the venv's interpreter path (/usr/bin/python3)
# is the same in both stages. The torch wheel brings its own CUDA libraries (nvidia-* wheels),
# so the runtime needs only a CUDA "base" image whose driver compatibility covers them.

# The CUDA base image, by digest, is a required build argument: no digest of
# nvidia/cuda:12.8.1-base-ubuntu24.04 that we could verify is recorded here. Take it from
# `docker buildx imagetools inspect nvidia/cuda:12.8.1-base-ubuntu24.04` and pass
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:<digest>
ARG CUDA_IMAGE

FROM ${CUDA_IMAGE} AS builder
ARG CUDA_IMAGE
# Refuse a base image named by tag alone: a tag can be moved to other bytes under us.
RUN case "${CUDA_IMAGE}" in *@sha256:*) ;; *) echo "CUDA_IMAGE='${CUDA_IMAGE}' is not pinned by digest: pass --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:<digest>, the digest printed by: docker buildx imagetools inspect nvidia/cuda:12.8.1-base-ubuntu24.04" >&2; exit 1 ;; esac
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
# Distribution packages are left unpinned on purpose: the base image tag pins the release,
# and pinning exact Ubuntu revisions breaks the build whenever the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# The CUDA build of torch, pinned, from the PyTorch CUDA index: only this image carries it.
RUN python3 -m venv /opt/tessera \
 && /opt/tessera/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tessera/ tessera/
COPY broker/ broker/
COPY node/ node/
COPY aggregator/ aggregator/
# pip writes the bytecode at install time, so the read-only runtime never needs to.
RUN /opt/tessera/bin/pip install --no-cache-dir .

FROM ${CUDA_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CUDA_IMAGE
LABEL org.opencontainers.image.title="tessera-node-gpu" \
      org.opencontainers.image.description="Tessera federated-learning hospital node (CUDA): DICOM intake, local GPU training, secret-shared updates, ONNX inference" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tessera" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tessera \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tessera --no-create-home \
      --shell /usr/sbin/nologin tessera \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/tessera \
 && install -d -m 0755 /etc/tessera /etc/tessera/bundle /data/dicom
COPY --from=builder /opt/tessera /opt/tessera
ENV PATH=/opt/tessera/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/tessera \
    XDG_CACHE_HOME=/var/lib/tessera/cache \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/tessera
EXPOSE 8080 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["tessera"]
CMD ["node", "run", "--config", "/etc/tessera/node.toml"]
