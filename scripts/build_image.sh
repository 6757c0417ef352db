#!/usr/bin/env bash
# Build the project's image (Dockerfile).
#
#   bash scripts/build_image.sh [TAG] [-- BUILD OPTIONS...]
#       With docker, podman or buildah (the first found), from the Dockerfile's defaults:
#       python:3.11-slim and CPU torch. TAG defaults to ghcr.io/simclr-kubeflow/simclr:0.1.0.
#       CUDA: bash scripts/build_image.sh ghcr.io/simclr-kubeflow/simclr:0.1.0-cuda -- \
#                 --build-arg TORCH_INDEX_URL=https://pypi.org/simple
#
#   bash scripts/build_image.sh --local [TAG]
#       Without any registry or Docker engine (what tests/test_image.py does): Debian's buildah
#       (vfs storage, chroot isolation) builds FROM a local base made by `debootstrap
#       --variant=minbase bookworm` (python3 + venv), cached in ~/.cache/simclr-kubeflow. pip
#       inside the build uses this machine's pip sources (index, extra indexes and find-links
#       of `pip config`; local paths bind-mounted read-only on /mnt; its CA bundle), so torch
#       comes from where .venv's came from. TAG defaults to localhost/simclr-kubeflow:test.
#       Storage: $BUILDAH_ROOT (default ~/.cache/simclr-kubeflow/buildah; about 13 GB with this
#       machine's CUDA torch, 20 GB while building; remove it with rm -rf). Run the image:
#         B="buildah --root $BUILDAH_ROOT --runroot $BUILDAH_RUNROOT --storage-driver vfs"
#         $B from --name simclr localhost/simclr-kubeflow:test
#         $B run --isolation chroot simclr -- simclr env
#
#   bash scripts/build_image.sh --install-tools
#       Install buildah and debootstrap with apt-get (as root, or with sudo) and exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/simclr-kubeflow"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The base's packages: Python 3.11 with venv/ensurepip (what python:3.11-slim has), and CA
# certificates so pip can reach an https index.
BASE_PACKAGES="python3,python3-venv,ca-certificates"
BASE_IMAGE_NAME="localhost/simclr-base:bookworm"

install_tools() {
    local missing=()
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n" || {
            echo "build_image: ${missing[*]} missing, and not root (no passwordless sudo) to install them" >&2
            return 3
        }
    fi
    command -v apt-get >/dev/null 2>&1 || { echo "build_image: ${missing[*]} missing and no apt-get" >&2; return 3; }
    echo "build_image: installing ${missing[*]} with apt-get" >&2
    $sudo apt-get update -qq >&2 || return 3
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null || return 3
}

if [ "${1:-}" = "--install-tools" ]; then
    install_tools
    exit $?
fi

if [ "${1:-}" != "--local" ]; then
    TAG="ghcr.io/simclr-kubeflow/simclr:0.1.0"
    if [ $# -gt 0 ] && [ "$1" != "--" ]; then TAG="$1"; shift; fi
    [ "${1:-}" = "--" ] && shift
    for tool in docker podman buildah; do
        if command -v "$tool" >/dev/null 2>&1; then
            set -x
            exec "$tool" build -t "$TAG" "$@" .
        fi
    done
    echo "build_image: no docker, podman or buildah; try: bash scripts/build_image.sh --install-tools" >&2
    exit 3
fi

# ------------------------------------------------------------------ --local: buildah + debootstrap
shift
TAG="${1:-localhost/simclr-kubeflow:test}"
install_tools
BUILDAH_ROOT="${BUILDAH_ROOT:-$CACHE_DIR/buildah}"
BUILDAH_RUNROOT="${BUILDAH_RUNROOT:-$BUILDAH_ROOT-run}"
buildah_() { buildah --root "$BUILDAH_ROOT" --runroot "$BUILDAH_RUNROOT" --storage-driver vfs "$@"; }
export BUILDAH_ISOLATION=chroot
mkdir -p "$CACHE_DIR" "$BUILDAH_ROOT" "$BUILDAH_RUNROOT"

# 1. The base root filesystem, made once and cached (key: suite, variant and packages).
key=$(printf '%s' "bookworm minbase $BASE_PACKAGES" | sha256sum | cut -c1-12)
ROOTFS_TAR="$CACHE_DIR/debootstrap-bookworm-minbase-$key.tar"
if [ ! -s "$ROOTFS_TAR" ]; then
    work=$(mktemp -d "$CACHE_DIR/debootstrap.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "build_image: debootstrap --variant=minbase bookworm (+ $BASE_PACKAGES), cached as $ROOTFS_TAR" >&2
    start=$SECONDS
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$work/rootfs" "$DEBIAN_MIRROR" \
        > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # What an image needs no copy of: downloaded .debs, package lists, logs.
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* \
        "$work/rootfs/var/log/"* "$work/rootfs/debootstrap"
    tar --numeric-owner -C "$work/rootfs" -cf "$work/rootfs.tar" .
    mv "$work/rootfs.tar" "$ROOTFS_TAR"
    rm -rf "$work"; trap - EXIT
    echo "build_image: base made in $((SECONDS - start)) s" >&2
fi

# 2. The base image: FROM scratch + ADD rootfs.tar / (ADD unpacks a local tarball).
if ! buildah_ inspect --type image "$BASE_IMAGE_NAME" >/dev/null 2>&1; then
    ctx=$(mktemp -d)
    ln "$ROOTFS_TAR" "$ctx/rootfs.tar" 2>/dev/null || cp "$ROOTFS_TAR" "$ctx/rootfs.tar"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' > "$ctx/Containerfile"
    buildah_ build --isolation chroot --quiet -f "$ctx/Containerfile" -t "$BASE_IMAGE_NAME" "$ctx" >/dev/null
    rm -rf "$ctx"
fi

# 3. This machine's pip sources, as build arguments and read-only bind mounts.
mapfile -t PIP_ARGS < <("$PYTHON" - <<'EOF'
import os, re, subprocess, sys

def setting(name):
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        return env
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():  # ':env:.name=...' lines come first, as pip applies them
        m = re.match(r"^[\w:]*\.%s='(.*)'$" % re.escape(name), line)
        if m:
            return m.group(1)
    return ""

index = setting("index-url") or "https://pypi.org/simple"
extra = setting("extra-index-url").split()
links = setting("find-links").split()

# Local sources are bind-mounted only onto directories every Debian base has and leaves empty
# (/mnt, /srv, /media): buildah leaves a mount point it had to create in the image, and
# these exist already, so nothing of this machine stays behind in the image.
def local_root(source):
    path = source[len("file://"):] if source.startswith("file://") else source
    if not (path.startswith("/") and os.path.isdir(path)):
        return None
    path = os.path.normpath(path)
    # A local "simple" index links to ../files/...: mount the directory above it.
    return os.path.dirname(path) if os.path.basename(path) == "simple" else path

roots = sorted({r for r in map(local_root, [index, *extra, *links]) if r})
mounts = {}
if roots:
    common = os.path.commonpath(roots)
    if common != "/":
        mounts = {common: "/mnt"}
    elif len(roots) <= 3:
        mounts = dict(zip(roots, ["/mnt", "/srv", "/media"]))
    else:
        sys.exit(f"build_image: too many unrelated local pip sources to mount: {roots}")

def inside(source):
    for host, target in mounts.items():
        for prefix in ("file://", ""):
            if source.startswith(prefix + host):
                return prefix + target + source[len(prefix + host):]
    return source

print("--build-arg=TORCH_INDEX_URL=" + inside(index))
print("--build-arg=PIP_INDEX_URL=" + inside(index))
if extra:
    print("--build-arg=PIP_EXTRA_INDEX_URL=" + " ".join(map(inside, extra)))
if links:
    print("--build-arg=PIP_FIND_LINKS=" + " ".join(map(inside, links)))
for host, target in mounts.items():
    print(f"--volume={host}:{target}:ro")
# The CA bundle pip trusts here (e.g. with a TLS-intercepting proxy) is trusted in the build
# too: mounted over the base's own bundle (ca-certificates), which the image keeps.
cert = setting("cert")
if cert and os.path.isfile(cert):
    print(f"--volume={os.path.realpath(cert)}:/etc/ssl/certs/ca-certificates.crt:ro")
    print("--build-arg=PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
EOF
)

# 4. The image itself.
echo "build_image: buildah build -t $TAG (base $BASE_IMAGE_NAME; ${PIP_ARGS[*]})" >&2
start=$SECONDS
buildah_ build --isolation chroot --layers=false \
    --build-arg "BASE_IMAGE=$BASE_IMAGE_NAME" "${PIP_ARGS[@]}" \
    -f Dockerfile -t "$TAG" .
echo "build_image: built $TAG in $((SECONDS - start)) s (storage: $BUILDAH_ROOT)" >&2
