#!/usr/bin/env bash
# Builds the services' OCI image without a container engine: `make image` runs it (as root: mmdebstrap
# and chroot need it).
#
#   layer 1  Debian bookworm, essential packages + python3 (3.11) + CA certificates, from mmdebstrap
#   layer 2  the runtime dependencies, exactly as uv.lock pins them (hashes checked, wheels only)
#   layer 3  the services and the generated stubs
#
# Output under .cache/image/: oci/ (an OCI image layout, tag $IMAGE_TAG), backend.oci.tar (the same as
# an oci-archive for `podman load` / `skopeo copy`), rootfs/ (the flattened root filesystem, to look
# into), packages.txt (every Debian package and Python distribution inside, with versions).
# The build stage (uv, its cache, the export of the lock) stays outside the image; no compiler is
# installed, since every dependency comes as a wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tools/image/recipe.env
source "$ROOT/tools/image/recipe.env"
OUT="$ROOT/.cache/image"
UV="${UV:-$ROOT/.cache/uv/bin/uv}"
IMAGE_TAG="${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)}"
ARCH="$(uname -m)"
case "$ARCH" in
    x86_64) OCI_ARCH=amd64 ;;
    aarch64) OCI_ARCH=arm64 ;;
    *) echo "[image] unsupported architecture $ARCH" >&2; exit 1 ;;
esac

step() { printf '[image] %s\n' "$*"; }
started=$SECONDS

if [ "$(id -u)" -ne 0 ]; then
    echo "[image] run as root (mmdebstrap and chroot need it): sudo make image" >&2
    exit 1
fi

bash "$ROOT/tools/image/install_tools.sh" mmdebstrap umoci

# Timestamps (files mmdebstrap writes, history, config) come from the last commit, not the clock.
SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)"
export SOURCE_DATE_EPOCH
work="$OUT/build"
rm -rf "$work" "$OUT/rootfs" "$OUT/oci" "$OUT/backend.oci.tar"
mkdir -p "$work"
rootfs="$work/rootfs"

# Layer 1. Without a mirror argument mmdebstrap takes Debian's own archive for the suite and adds its
# -updates and -security suites, so a rebuild picks up security fixes. The merged-/usr hook replaces the
# usrmerge package, which would pull in perl (45 MB). Documentation, manuals and translations are left
# out; copyright files stay.
step "layer 1: Debian $DEBIAN_SUITE + ${DEBIAN_PACKAGES// /, } (mmdebstrap)"
mmdebstrap --mode=root --variant=essential --include="${DEBIAN_PACKAGES// /,}" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$DEBIAN_SUITE" "$rootfs" >"$OUT/mmdebstrap.log" 2>&1 \
    || { tail -n 30 "$OUT/mmdebstrap.log" >&2; echo "[image] mmdebstrap failed; see $OUT/mmdebstrap.log" >&2; exit 1; }

python_version="$(chroot "$rootfs" python3 -c 'import platform; print(platform.python_version())')"
if [[ "$python_version" != "$PYTHON_VERSION".* ]]; then
    echo "[image] $DEBIAN_SUITE ships Python $python_version, the recipe pins $PYTHON_VERSION" >&2
    exit 1
fi
glibc="$(chroot "$rootfs" getconf GNU_LIBC_VERSION | awk '{print $2}')"
step "python $python_version, glibc $glibc"

# The service account the manifests run as (runAsUser/runAsGroup); no home, no shell, no password.
echo "fittracker:x:$APP_UID:$APP_GID:FitTracker services:/nonexistent:/usr/sbin/nologin" >>"$rootfs/etc/passwd"
echo "fittracker:x:$APP_GID:" >>"$rootfs/etc/group"
echo "fittracker:!*:::::::" >>"$rootfs/etc/shadow"
# Writable only where a volume is mounted: the data directory and /tmp (declared volumes below).
install -d -m 0750 -o "$APP_UID" -g "$APP_GID" "$rootfs$DATA_DIR"
chmod 1777 "$rootfs/tmp"
# What apt and dpkg leave behind for a later install; the image never installs anything.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/usr/lib/python3.11/test

# Layer 2: `uv export --locked` refuses a uv.lock that no longer matches pyproject.toml; the install
# checks every hash, takes wheels only (no compiler in the image, none needed) and installs nothing
# the export does not list.
step "layer 2: runtime dependencies from uv.lock (uv $("$UV" --version | awk '{print $2}'), no dev group)"
"$UV" export --project "$ROOT" --locked --no-dev --no-emit-project --format requirements-txt --quiet \
    >"$work/requirements.txt"
"$UV" pip install --quiet --require-hashes --no-deps --only-binary :all: \
    --python-version "$PYTHON_VERSION" --python-platform "$ARCH-manylinux_${glibc/./_}" \
    --target "$rootfs$SITE_DIR" -r "$work/requirements.txt"
# Console scripts carry the build machine's interpreter path; the services never call them.
rm -rf "$rootfs$SITE_DIR/bin"

# Layer 3: the code python imports at run time, nothing else (no tests, tools or protos).
step "layer 3: services/ and clients/python/generated/"
install -d "$rootfs$APP_DIR/clients/python"
cp -r "$ROOT/services" "$rootfs$APP_DIR/services"
cp -r "$ROOT/clients/python/generated" "$rootfs$APP_DIR/clients/python/generated"
find "$rootfs$APP_DIR" "$rootfs$SITE_DIR" -name __pycache__ -prune -exec rm -rf {} +

# Bytecode compiled once by the image's own interpreter: the root filesystem is read-only at run time,
# so without it every start would compile every module again. Unchecked hashes: the files never change.
step "compiling bytecode"
chroot "$rootfs" python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash "$SITE_DIR" "$APP_DIR" >/dev/null
# Every shared library a wheel brings must resolve inside the image (grpcio needs libstdc++, say).
unresolved="$(find "$rootfs$SITE_DIR" -name '*.so*' -type f -printf "$SITE_DIR/%P\n" \
    | xargs chroot "$rootfs" sh -c 'for f; do ldd "$f" | sed -n "s|^[[:space:]]*\([^ ]*\) => not found|$f needs \1|p"; done' sh)"
if [ -n "$unresolved" ]; then
    echo "[image] shared libraries the image lacks (add their Debian packages to recipe.env):" >&2
    echo "$unresolved" >&2
    exit 1
fi
chown -R root:root "$rootfs$APP_DIR" "$rootfs$SITE_DIR"
chmod -R go-w,a+rX "$rootfs$APP_DIR" "$rootfs$SITE_DIR"

{
    echo "# Debian $DEBIAN_SUITE packages"
    chroot "$rootfs" dpkg-query -W -f '${Package} ${Version}\n'
    echo "# Python distributions ($SITE_DIR)"
    grep -E '^[A-Za-z0-9]' "$work/requirements.txt" | awk '{print $1}'
} >"$OUT/packages.txt"

# Split the tree into its three layers, then assemble the image.
mkdir -p "$work/layers"
mv "$rootfs$APP_DIR" "$work/layers/app"
mv "$rootfs$SITE_DIR" "$work/layers/site"
step "assembling the OCI image $IMAGE_NAME:$IMAGE_TAG (umoci)"
umoci init --layout "$OUT/oci"
umoci new --image "$OUT/oci:$IMAGE_TAG"
created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
history_of() { echo --history.created "$created" --history.created_by "$1"; }
# shellcheck disable=SC2046  # history_of prints options, split on purpose
umoci insert --image "$OUT/oci:$IMAGE_TAG" $(history_of "mmdebstrap-$DEBIAN_SUITE") "$rootfs" /
# shellcheck disable=SC2046
umoci insert --image "$OUT/oci:$IMAGE_TAG" $(history_of "uv-pip-install-uv.lock") "$work/layers/site" "$SITE_DIR"
# shellcheck disable=SC2046
umoci insert --image "$OUT/oci:$IMAGE_TAG" $(history_of "copy-services") "$work/layers/app" "$APP_DIR"
config=(
    --config.user "$APP_UID:$APP_GID"
    --config.workingdir "$APP_DIR"
    --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    --config.env "PYTHONPATH=$APP_DIR:$APP_DIR/clients/python/generated:$SITE_DIR"
    --config.env "PYTHONDONTWRITEBYTECODE=1"
    --config.env "PYTHONUNBUFFERED=1"
    --config.env "FITTRACKER_HOST=0.0.0.0"
    --config.env "FITTRACKER_DATA_DIR=$DATA_DIR"
    --config.volume "$DATA_DIR"
    --config.volume /tmp
    --config.stopsignal SIGTERM
    --config.label "org.opencontainers.image.title=$IMAGE_NAME"
    --config.label "org.opencontainers.image.version=$IMAGE_TAG"
    --config.label "org.opencontainers.image.revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    --config.label "org.opencontainers.image.base.name=debian:$DEBIAN_SUITE"
    --architecture "$OCI_ARCH" --os linux
)
for port in 50051 50052 50053 50054 50055; do config+=(--config.exposedports "$port/tcp"); done
# Exec form, no shell and no init in between: python is PID 1 and gets SIGTERM itself; the services
# handle it (drain, then exit 0). `python -m services.<name>` picks the service; user is the default.
umoci config --image "$OUT/oci:$IMAGE_TAG" --created "$created" --no-history "${config[@]}" \
    --clear config.entrypoint --config.cmd python --config.cmd -m --config.cmd services.user
umoci gc --layout "$OUT/oci"

# The flattened tree, to look into without unpacking the layers.
mv "$work/layers/site" "$rootfs$SITE_DIR"
mv "$work/layers/app" "$rootfs$APP_DIR"
mv "$rootfs" "$OUT/rootfs"
python3 "$ROOT/tools/image/layout.py" archive "$OUT/oci" "$IMAGE_TAG" "$IMAGE_NAME:$IMAGE_TAG" "$OUT/backend.oci.tar"
rm -rf "$work"

layers_bytes="$(python3 "$ROOT/tools/image/layout.py" size "$OUT/oci" "$IMAGE_TAG")"
step "done in $((SECONDS - started)) s: $OUT/oci (tag $IMAGE_TAG), $OUT/backend.oci.tar"
step "size: $layers_bytes; root filesystem $(du -sh --apparent-size "$OUT/rootfs" | cut -f1)"
