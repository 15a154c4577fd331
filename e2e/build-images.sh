#!/usr/bin/env bash
# Assemble the container images the local environment's real node runs, as one OCI image
# layout cached under $HOME/.cache/imagebuild/images-<key>/oci, each image tagged with a short
# name there and listed with its repository and tag in images.txt beside it (e2e/cluster
# pushes them into the local registry under those). No image is downloaded:
# the root filesystem comes from Debian's packages (mmdebstrap, with this machine's apt
# sources), the programs from e2e/build-components.sh.
#
#   imagebuild/buildkit:<BUILDKIT_VERSION>  rootful executor: Debian's essential set, git, runc,
#                                          ca-certificates, uidmap; buildkitd, buildctl,
#                                          rootlesskit; runs as root (executor.mode privileged)
#   imagebuild/buildkit:<BUILDKIT_VERSION>-rootless  the same as user 1000, with newuidmap/newgidmap
#                                          given file capabilities instead of setuid (a
#                                          setuid newuidmap is refused in a pod here)
#   imagebuild/buildkit:<BUILDKIT_VERSION>-rootless-setuid
#                                          the rootless image with Debian's setuid
#                                          newuidmap left as it is: its daemon cannot start
#                                          on the real node (the tests' broken executor)
#   imagebuild/pause:<KUBERNETES_VERSION>   the pod sandbox image (containerd's sandbox_image)
#   imagebuild/busybox:<version>          busybox-static, a small base for test images
#
# Usage:  e2e/build-images.sh BIN_DIR
#   BIN_DIR: the output of e2e/build-components.sh
#   stdout:  exactly one line, the directory holding oci/ and images.txt
#            (lines "<name in the layout> <repository>:<tag>")
#   stderr:  progress
# Env: IMAGEBUILD_CACHE (cache root, default $HOME/.cache/imagebuild).
# Requires root (mmdebstrap, setcap), mmdebstrap, umoci, setcap, busybox-static.
set -euo pipefail

# Bump when the recipe (packages, layers, configs) changes: invalidates the cache.
RECIPE_REV=2

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT="${IMAGEBUILD_CACHE:-${HOME}/.cache/imagebuild}"
BIN=${1:?usage: e2e/build-images.sh BIN_DIR}

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# shellcheck disable=SC1091
source "$SCRIPT_DIR/versions.env"
[[ -f "$BIN/../manifest.txt" ]] || die "$BIN is not a build of e2e/build-components.sh"
component_key=$(sed -n 's/^key=//p' "$BIN/../manifest.txt")
busybox_version=$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null) ||
  die "busybox-static is not installed"
# 1:1.35.0-4+deb12u1 -> 1.35.0: a valid tag.
busybox_tag=${busybox_version#*:}
busybox_tag=${busybox_tag%%-*}
PACKAGES="ca-certificates,git,runc=$DEBIAN_RUNC,uidmap"
hash=$(printf 'recipe=%s\ncomponents=%s\nsuite=%s\npackages=%s\nbusybox=%s\n' \
  "$RECIPE_REV" "$component_key" "$DEBIAN_SUITE" "$PACKAGES" "$busybox_version" |
  sha256sum | cut -c1-12)
OUT="$CACHE_ROOT/images-$hash"

if [[ -f "$OUT/done" ]]; then
  log "cache hit (images-$hash): $OUT"
  echo "$OUT"
  exit 0
fi
[[ $(id -u) == 0 ]] || die "building the executor images needs root (mmdebstrap, setcap)"
for tool in mmdebstrap umoci setcap; do
  command -v "$tool" >/dev/null || die "$tool not found"
done

exec 9>"$CACHE_ROOT/.lock-images-$hash"
flock 9
if [[ -f "$OUT/done" ]]; then
  echo "$OUT"
  exit 0
fi
t0=$SECONDS
rm -rf "$CACHE_ROOT/.tmp-images-$hash".* 2>/dev/null || true
TMP=$(mktemp -d "$CACHE_ROOT/.tmp-images-$hash.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# ---- the Debian root filesystem (one layer, shared by the executor images) -------------
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [[ -s $f ]] && grep -qE '^[[:space:]]*(deb|Types:)' "$f" && sources+=("$f")
done
((${#sources[@]})) || die "no apt sources on this machine"
log "debian $DEBIAN_SUITE root filesystem (mmdebstrap: $PACKAGES)"
# The rootless user, as BuildKit's rootless image has it: uid 1000 with a subordinate id
# range, and its state and temporary directories (its runtime directory is in the buildkit
# layer: mmdebstrap leaves /run empty).
# shellcheck disable=SC2016 # expanded by mmdebstrap, with $1 the root
user_hook='set -e
echo "user:x:1000:1000:user:/home/user:/bin/sh" >>"$1/etc/passwd"
echo "user:x:1000:" >>"$1/etc/group"
echo "user:100000:65536" >"$1/etc/subuid"
echo "user:100000:65536" >"$1/etc/subgid"
mkdir -p "$1/home/user/.local/share/buildkit" "$1/home/user/.local/tmp"
chown -R 1000:1000 "$1/home/user"'
mmdebstrap --quiet --mode=root --variant=essential --include="$PACKAGES" \
  --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Check-Date "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook="$user_hook" \
  "$DEBIAN_SUITE" "$TMP/debian.tar" "${sources[@]}" >&2

# ---- the other layers -------------------------------------------------------------------
layer() { # layer NAME DIR: DIR's contents as an uncompressed tar, with file capabilities
  tar --xattrs --xattrs-include=security.capability --numeric-owner -C "$2" -cf "$TMP/$1.tar" .
}
mkdir -p "$TMP/buildkit/usr/local/bin" "$TMP/buildkit/run/user/1000"
cp "$BIN/buildkitd" "$BIN/buildctl" "$BIN/rootlesskit" "$TMP/buildkit/usr/local/bin/"
chown 1000:1000 "$TMP/buildkit/run/user/1000"
chmod 700 "$TMP/buildkit/run/user/1000"
layer buildkit "$TMP/buildkit"

# newuidmap/newgidmap with file capabilities in place of setuid (upstream's rootless image
# does the same); the copies replace Debian's in a layer of their own.
mkdir -p "$TMP/caps"
tar -C "$TMP/caps" -xf "$TMP/debian.tar" ./usr/bin/newuidmap ./usr/bin/newgidmap
chmod 0755 "$TMP/caps/usr/bin/newuidmap" "$TMP/caps/usr/bin/newgidmap"
setcap cap_setuid=ep "$TMP/caps/usr/bin/newuidmap"
setcap cap_setgid=ep "$TMP/caps/usr/bin/newgidmap"
layer caps "$TMP/caps"

mkdir -p "$TMP/pause"
cp "$BIN/pause" "$TMP/pause/pause"
layer pause "$TMP/pause"

mkdir -p "$TMP/busybox/bin" "$TMP/busybox/tmp"
chmod 1777 "$TMP/busybox/tmp"
cp /bin/busybox "$TMP/busybox/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ $applet == busybox ]] || ln -s busybox "$TMP/busybox/bin/$applet"
done
layer busybox "$TMP/busybox"

# ---- the images ---------------------------------------------------------------------------
L="$TMP/oci"
umoci init --layout "$L"
umoci new --image "$L:empty"
add() { # add FROM TO LAYER...
  local from=$1 to=$2 l
  shift 2
  for l in "$@"; do
    umoci raw add-layer --image "$L:$from" --tag "$to" --history.created_by "imagebuild e2e: $l layer" "$TMP/$l.tar"
    from=$to
  done
}
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
rootless_config=(--config.user 1000:1000 --config.env "PATH=$path" --config.env HOME=/home/user
  --config.env USER=user --config.env XDG_RUNTIME_DIR=/run/user/1000
  --config.env TMPDIR=/home/user/.local/tmp
  --config.env BUILDKIT_HOST=unix:///run/user/1000/buildkit/buildkitd.sock
  --config.workingdir /home/user --config.entrypoint rootlesskit --config.entrypoint buildkitd)
add empty buildkit debian buildkit
umoci config --image "$L:buildkit" --config.user 0:0 --config.env "PATH=$path" \
  --config.workingdir / --config.entrypoint buildkitd
add empty buildkit-rootless-setuid debian buildkit
umoci config --image "$L:buildkit-rootless-setuid" "${rootless_config[@]}"
add buildkit-rootless-setuid buildkit-rootless caps
umoci config --image "$L:buildkit-rootless" "${rootless_config[@]}"
add empty pause pause
umoci config --image "$L:pause" --config.user 65535:65535 --config.entrypoint /pause
add empty busybox busybox
umoci config --image "$L:busybox" --config.env "PATH=$path" --config.cmd sh
umoci rm --image "$L:empty"
umoci gc --layout "$L"

mkdir -p "$TMP/out"
mv "$L" "$TMP/out/oci"
cat >"$TMP/out/images.txt" <<EOF
buildkit imagebuild/buildkit:$BUILDKIT_VERSION
buildkit-rootless imagebuild/buildkit:$BUILDKIT_VERSION-rootless
buildkit-rootless-setuid imagebuild/buildkit:$BUILDKIT_VERSION-rootless-setuid
pause imagebuild/pause:$KUBERNETES_VERSION
busybox imagebuild/busybox:$busybox_tag
EOF
touch "$TMP/out/done"
rm -rf "$OUT"
mv -T "$TMP/out" "$OUT"
log "built in $((SECONDS - t0))s: $(cut -d' ' -f2 "$OUT/images.txt" | tr '\n' ' ')"
echo "$OUT"
