#!/usr/bin/env bash
# Container smoke test: build the aggregator image with buildah (no Docker daemon, no registry)
# and check it inside: `tessera --version`, then the image's own HEALTHCHECK command, which
# must fail with nothing listening and pass with a health server on 8080.
#
#   sudo docker/smoke-test.sh            # from the repository root, as root, on Debian
#
# What it needs: root, `apt-get install buildah debootstrap`, a Debian mirror (the base image
# is made with debootstrap because no container registry may be reachable), PyPI, and
# torch==2.13.0 (CPU). Where the PyPI-only network cannot reach the PyTorch CPU index, point
# TORCH_WHEELHOUSE at a folder holding the torch-2.13.0+cpu wheel; the script serves it and
# its dependencies to the build as a local package index.
#
# Time: about 5 minutes cold on a 2-core machine (debootstrap 80 s, build 2-3 min), so it is
# not part of CI. It binds 127.0.0.1:8080 on the host briefly (chroot isolation shares the
# host network).
# Storage is vfs under $SMOKE_DIR (default /var/tmp/tessera-smoke); delete it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE_DIR=${SMOKE_DIR:-/var/tmp/tessera-smoke}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${DEBIAN_SUITE:-bookworm}
PORT=8080
BASE=localhost/tessera-smoke-base:${SUITE}
IMAGE=localhost/tessera-aggregator:smoke
B=(buildah --storage-driver vfs --root "$SMOKE_DIR/storage" --runroot "$SMOKE_DIR/run")
start=$SECONDS
step() { printf '== [%4ss] %s\n' "$((SECONDS - start))" "$*"; }

for tool in buildah debootstrap python3; do
  command -v "$tool" >/dev/null || { echo "smoke-test: $tool is missing (apt-get install buildah debootstrap)" >&2; exit 2; }
done
mkdir -p "$SMOKE_DIR"

# 1. Base image: a minimal Debian with Python 3.11, the stand-in for python:3.11-slim.
# It trusts the host's CA bundle (PIP_CERT), so that pip inside the build works behind the
# same TLS-inspecting proxy as the host, where there is one.
CA_BUNDLE=${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if ! "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  if [ ! -f "$SMOKE_DIR/rootfs/.complete" ]; then
    step "debootstrap $SUITE"
    rm -rf "$SMOKE_DIR/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      "$SUITE" "$SMOKE_DIR/rootfs" "$MIRROR" >"$SMOKE_DIR/debootstrap.log"
    rm -rf "$SMOKE_DIR/rootfs/var/cache/apt/archives/"*.deb "$SMOKE_DIR/rootfs/var/lib/apt/lists/"*
    touch "$SMOKE_DIR/rootfs/.complete"
  fi
  step "import the root filesystem as $BASE"
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  cp -a "$SMOKE_DIR/rootfs/." "$mnt/"
  rm -f "$mnt/.complete"
  install -m 0644 "$CA_BUNDLE" "$mnt/etc/ssl/certs/smoke-ca-bundle.crt"
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --cmd /bin/sh --env PIP_CERT=/etc/ssl/certs/smoke-ca-bundle.crt "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$BASE" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
fi

# 2. torch: the Dockerfile installs torch==2.13.0 from TORCH_INDEX_URL (the PyTorch CPU index).
build_args=(--build-arg "PYTHON_IMAGE=$BASE")
volumes=()
if [ -n "${TORCH_WHEELHOUSE:-}" ]; then
  step "local package index for torch from $TORCH_WHEELHOUSE"
  rm -rf "$SMOKE_DIR/wheels" "$SMOKE_DIR/index"
  python3 -m pip download --isolated --quiet --only-binary=:all: --dest "$SMOKE_DIR/wheels" \
    --find-links "$TORCH_WHEELHOUSE" --index-url https://pypi.org/simple "torch==2.13.0"
  # PEP 503 layout: one folder per normalised project name, linking its wheels.
  python3 - "$SMOKE_DIR/wheels" "$SMOKE_DIR/index" <<'PY'
import pathlib, re, sys
wheels, index = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    folder = index / project
    folder.mkdir(parents=True, exist_ok=True)
    (folder / wheel.name).hardlink_to(wheel)
    with open(folder / "index.html", "a") as page:
        page.write(f'<a href="{wheel.name}">{wheel.name}</a>\n')
PY
  build_args+=(--build-arg "TORCH_INDEX_URL=file:///torch-index")
  volumes+=(-v "$SMOKE_DIR/index:/torch-index:ro")
fi

# 3. Build with the chroot isolation (no user namespaces or runc needed) and vfs storage.
step "buildah bud docker/aggregator.Dockerfile"
"${B[@]}" bud --isolation chroot --format docker --layers=false --pull=false \
  --ignorefile docker/aggregator.Dockerfile.dockerignore "${build_args[@]}" "${volumes[@]}" \
  -f docker/aggregator.Dockerfile -t "$IMAGE" . >"$SMOKE_DIR/build.log" 2>&1 \
  || { tail -n 40 "$SMOKE_DIR/build.log" >&2; exit 1; }

# 4. Inside the image, as its own non-root user.
ctr=$("${B[@]}" from --pull=false "$IMAGE")
trap '"${B[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
run() { "${B[@]}" run --isolation chroot "$ctr" -- "$@"; }

step "tessera --version"
version=$(run tessera --version)
echo "$version"
[[ $version == "tessera "* ]] || { echo "smoke-test: unexpected version output" >&2; exit 1; }
[ "$(run id -u)" = 10001 ] || { echo "smoke-test: the image does not run as UID 10001" >&2; exit 1; }

# The HEALTHCHECK exactly as the image declares it (["CMD", argv...]).
health=$("${B[@]}" inspect --type image "$IMAGE" | python3 -c '
import json, shlex, sys
test = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]
assert test[0] == "CMD", test
print(shlex.join(test[1:]))')
step "health check with nothing listening (must fail)"
if run sh -c "$health" 2>/dev/null; then
  echo "smoke-test: the health check passed with no server on $PORT" >&2; exit 1
fi
step "health check against a running health server (must pass)"
serve="from prometheus_client import CollectorRegistry; from tessera.observability.http import HealthServer; import time; HealthServer($PORT, CollectorRegistry(), host='127.0.0.1').start(); time.sleep(30)"
run sh -c "python -c \"$serve\" & sleep 3; $health && echo healthy"

step "passed in $((SECONDS - start)) s"
