#!/usr/bin/env bash
# Build the pinned e2e components from Go modules with the local Go toolchain, and cache
# them under $HOME/.cache/imagebuild/<key>/bin: the control plane (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, etcd), kwok, helm, the real node's
# kubelet and crictl, the executor images' buildkitd, buildctl and rootlesskit, and the
# pod sandbox's pause (C, from the kubernetes module, linked statically with gcc).
#
# Versions come ONLY from e2e/versions.env; <key> is derived from the pins of what
# is built here (plus RECIPE_REV below), so a warm cache returns immediately.
#
# Usage:  e2e/build-components.sh [--force]
#   stdout: exactly one line, the bin directory (BIN=$(e2e/build-components.sh));
#           kwok stage configs are in $BIN/../share/kwok (stages-default.yaml)
#   stderr: progress, timings, diagnostics
# Env:
#   IMAGEBUILD_CACHE     cache root            (default $HOME/.cache/imagebuild)
#   IMAGEBUILD_GOMODCACHE / IMAGEBUILD_GOCACHE  Go module/build caches
#                        (default <cache root>/go/mod and <cache root>/go/build; those
#                        defaults are removed after a build unless IMAGEBUILD_KEEP_GO_CACHE=1)
#   BUILD_NICE           nice level for go commands (default 19)
# Requires only bash, coreutils, awk, gcc and Go >= GO_MIN_VERSION; modules come from
# the Go module proxy. The finished tree is renamed into place atomically.
set -euo pipefail

# Bump when the build recipe (flags, tags, package list) changes: invalidates caches.
RECIPE_REV=3
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet etcd kwok helm
  crictl buildkitd buildctl rootlesskit pause)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSIONS_FILE="${SCRIPT_DIR}/versions.env"
CACHE_ROOT="${IMAGEBUILD_CACHE:-${HOME}/.cache/imagebuild}"

FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[build-components] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f "$VERSIONS_FILE" ]] || die "missing $VERSIONS_FILE"

# ---- cache key (cheap: no go invocation on the warm path) -------------------
# Only the pins of what is built here make the key: not the Prometheus operator's CRDs
# (fetched by e2e/cluster) nor the Debian packages and suite (installed by e2e/cluster,
# used by e2e/build-images.sh).
pins=$(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$VERSIONS_FILE" |
  grep -vE '^(PROMETHEUS_OPERATOR_VERSION|DEBIAN_[A-Z_]*)=' | sort)
# shellcheck disable=SC1090
source <(printf '%s\n' "$pins")
for v in KUBERNETES_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION CRI_TOOLS_VERSION \
  BUILDKIT_VERSION ROOTLESSKIT_VERSION GO_MIN_VERSION; do
  [[ -n "${!v:-}" ]] || die "$v not set in $VERSIONS_FILE"
done
hash=$(printf 'recipe=%s\n%s\n' "$RECIPE_REV" "$pins" | sha256sum | cut -c1-12)
KEY="k8s-${KUBERNETES_VERSION}-${hash}"
OUT="${CACHE_ROOT}/${KEY}"
BIN="${OUT}/bin"

is_complete() {
  local d=$1 b
  [[ -f "$d/manifest.txt" ]] || return 1
  for b in "${BINARIES[@]}"; do [[ -x "$d/bin/$b" ]] || return 1; done
  [[ -f "$d/share/kwok/stages-default.yaml" ]]
}

if [[ $FORCE -eq 0 ]] && is_complete "$OUT"; then
  log "cache hit ($KEY): binaries in $BIN"
  echo "$BIN"
  exit 0
fi

# ---- cold path --------------------------------------------------------------
exec 3>&1 1>&2   # everything below logs to stderr; the result goes to fd 3
mkdir -p "$CACHE_ROOT"

# Serialize concurrent builds of the same key.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${CACHE_ROOT}/.lock-${KEY}"
  flock 9
  if [[ $FORCE -eq 0 ]] && is_complete "$OUT"; then
    log "cache filled by a concurrent run ($KEY): binaries in $BIN"
    echo "$BIN" >&3
    exit 0
  fi
fi

command -v go >/dev/null 2>&1 || die "go not found in PATH (need Go >= $GO_MIN_VERSION)"
export GOTOOLCHAIN=local   # never download a toolchain: use the machine's Go
GOVER=$(go env GOVERSION)
if [[ "$(printf '%s\n%s\n' "${GO_MIN_VERSION}" "${GOVER#go}" | sort -V | head -n1)" != "${GO_MIN_VERSION}" ]]; then
  die "Go ${GOVER#go} is older than the required ${GO_MIN_VERSION}"
fi

export CGO_ENABLED=0
export GOFLAGS="-modcacherw -buildvcs=false"
export GOMODCACHE="${IMAGEBUILD_GOMODCACHE:-${CACHE_ROOT}/go/mod}"
export GOCACHE="${IMAGEBUILD_GOCACHE:-${CACHE_ROOT}/go/build}"
NICE=(nice -n "${BUILD_NICE:-19}")
gocmd() { "${NICE[@]}" go "$@"; }

start=$SECONDS
SRC="${CACHE_ROOT}/src-${KEY}"
rm -rf "${CACHE_ROOT}/.tmp-${KEY}".* 2>/dev/null || true   # leftovers of killed runs
TMP=$(mktemp -d "${CACHE_ROOT}/.tmp-${KEY}.XXXXXX")
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin"
rm -rf "$SRC"; mkdir -p "$SRC"

log "cold build of $KEY with $GOVER (src: $SRC)"
log "versions: kubernetes=$KUBERNETES_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION"
log "versions: cri-tools=$CRI_TOOLS_VERSION buildkit=$BUILDKIT_VERSION rootlesskit=$ROOTLESSKIT_VERSION"

# upstream_edits GOMOD STAGING_VERSION
# Prints `go mod edit` flags reproducing the upstream main module's godebug and
# replace directives. `X => ./staging/src/X` becomes `X => X@STAGING_VERSION`
# (the published copy); other local (filesystem) replaces are dropped, since a
# released module's requires already name their published versions.
upstream_edits() {
  awk -v sv="$2" '
    function rep(line,   parts, l, r, n) {
      split(line, parts, "=>")
      n = split(parts[1], l, " "); if (n == 0) return
      split(parts[2], r, " ")
      if (r[1] ~ /^\.\/staging\/src\//) {
        if (sv == "") return
        sub(/^\.\/staging\/src\//, "", r[1])
        print "-replace=" l[1] "=" r[1] "@" sv
      } else if (r[1] ~ /^(\.|\/)/) {
        print "note: dropping local replace " l[1] " => " r[1] > "/dev/stderr"
      } else {
        print "-replace=" l[1] (n > 1 ? "@" l[2] : "") "=" r[1] "@" r[2]
      }
    }
    { sub(/\/\/.*/, "") }
    NF == 0 { next }
    blk != "" && $1 == ")" { blk = ""; next }
    ($1 == "replace" || $1 == "godebug") && $2 == "(" { blk = $1; next }
    blk == "godebug" { print "-godebug=" $1; next }
    blk == "replace" { rep($0); next }
    $1 == "godebug" { print "-godebug=" $2; next }
    $1 == "replace" { sub(/^[ \t]*replace[ \t]+/, ""); rep($0); next }
  ' "$1"
}

# setup_module NAME MODULE VERSION STAGING_VERSION PKG...
# Creates $SRC/NAME: a scratch main module requiring MODULE@VERSION with the
# upstream go directive, godebug settings and (generated) replaces, and the
# main packages as `tool` directives; then `go mod tidy`.
setup_module() {
  local name=$1 mod=$2 ver=$3 sv=$4; shift 4
  local dir="$SRC/$name" gomod godir pkg
  mkdir -p "$dir"
  gomod=$(cd "$dir" && gocmd mod download -json "${mod}@${ver}" | awk -F'"' '$2 == "GoMod" {print $4}')
  [[ -f "$gomod" ]] || die "could not download ${mod}@${ver}"
  godir=$(awk '$1 == "go" {print $2; exit}' "$gomod")
  printf 'module imagebuild.local/%s\n\ngo %s\n' "$name" "${godir:-$GO_MIN_VERSION}" > "$dir/go.mod"
  local -a edits=("-require=${mod}@${ver}")
  mapfile -t -O 1 edits < <(upstream_edits "$gomod" "$sv")
  for pkg in "$@"; do edits+=("-tool=$pkg"); done
  (cd "$dir" && go mod edit "${edits[@]}")
  log "[$name] go.mod: ${mod}@${ver}, $(grep -c '=>' "$dir/go.mod" || true) replaces; go mod tidy"
  (cd "$dir" && gocmd mod tidy)
}

# build NAME LDFLAGS TAGS PKG...   -> $TMP/bin/<basename of each PKG>
build() {
  local name=$1 ldflags=$2 tags=$3; shift 3
  local t0=$SECONDS
  log "[$name] go build $*"
  (cd "$SRC/$name" && gocmd build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$TMP/bin/" "$@")
  log "[$name] built in $((SECONDS - t0))s"
}

# --- kubernetes ---
K8S_MAJOR=${KUBERNETES_VERSION#v}; K8S_MAJOR=${K8S_MAJOR%%.*}
K8S_MINOR=${KUBERNETES_VERSION#v*.}; K8S_MINOR=${K8S_MINOR%%.*}
K8S_PATCH=${KUBERNETES_VERSION##*.}
STAGING_VERSION="v0.${K8S_MINOR}.${K8S_PATCH}"
K8S_PKGS=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
          k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
          k8s.io/kubernetes/cmd/kubelet)
setup_module kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION" "$STAGING_VERSION" "${K8S_PKGS[@]}"
k8s_ld=""
for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=$K8S_MAJOR -X $p.gitMinor=$K8S_MINOR"
done
# same tags as upstream hack/lib/golang.sh for non-debug builds
build kubernetes "$k8s_ld" "selinux,notest,grpcnotrace" "${K8S_PKGS[@]}"

# The pod sandbox's pause process, from the same module's C source, static.
k8s_dir=$(cd "$SRC/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
command -v gcc >/dev/null || die "gcc not found (needed for pause)"
gcc -Os -static -Wall -DVERSION="$KUBERNETES_VERSION" -o "$TMP/bin/pause" "$k8s_dir/build/pause/linux/pause.c"
strip "$TMP/bin/pause" 2>/dev/null || true
log "[pause] built"

# --- crictl (the real node's CRI client: inspection, and removing pods on `down`) ---
setup_module cri-tools sigs.k8s.io/cri-tools "$CRI_TOOLS_VERSION" "" sigs.k8s.io/cri-tools/cmd/crictl
build cri-tools "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION" "" sigs.k8s.io/cri-tools/cmd/crictl

# --- BuildKit and rootlesskit (the executor images'; static, as upstream builds them) ---
setup_module buildkit github.com/moby/buildkit "$BUILDKIT_VERSION" "" \
  github.com/moby/buildkit/cmd/buildkitd github.com/moby/buildkit/cmd/buildctl
build buildkit "-X github.com/moby/buildkit/version.Version=$BUILDKIT_VERSION -X github.com/moby/buildkit/version.Package=github.com/moby/buildkit" \
  "osusergo netgo static_build seccomp" github.com/moby/buildkit/cmd/buildkitd github.com/moby/buildkit/cmd/buildctl
ROOTLESSKIT_MODULE=github.com/rootless-containers/rootlesskit/v${ROOTLESSKIT_VERSION:1:1}
setup_module rootlesskit "$ROOTLESSKIT_MODULE" "$ROOTLESSKIT_VERSION" "" "$ROOTLESSKIT_MODULE/cmd/rootlesskit"
build rootlesskit "" "" "$ROOTLESSKIT_MODULE/cmd/rootlesskit"

# --- etcd (package main lives at the root of go.etcd.io/etcd/server/v3) ---
setup_module etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "" go.etcd.io/etcd/server/v3
t0=$SECONDS
( cd "$SRC/etcd"
  gocmd build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
    -o "$TMP/bin/etcd" go.etcd.io/etcd/server/v3 )
log "[etcd] built in $((SECONDS - t0))s"

# --- kwok ---
setup_module kwok sigs.k8s.io/kwok "$KWOK_VERSION" "" sigs.k8s.io/kwok/cmd/kwok
build kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" "" sigs.k8s.io/kwok/cmd/kwok
# kwok refuses to start without Stage definitions (--config or --enable-crds=Stage):
# ship upstream's stage YAMLs plus the set kwokctl uses by default
# (node-fast + node-heartbeat-with-lease + pod-fast) as one --config file.
kwok_dir=$(cd "$SRC/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
mkdir -p "$TMP/share/kwok/stage"
( cd "$kwok_dir/kustomize/stage" &&
  find . -name '*.yaml' ! -path '*/testdata/*' ! -name kustomization.yaml -exec cp --parents {} "$TMP/share/kwok/stage/" \; )
chmod -R u+w "$TMP/share"
for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
         pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  [[ -f "$TMP/share/kwok/stage/$f.yaml" ]] || die "kwok stage $f.yaml not found in $kwok_dir"
  printf -- '---\n'; grep -v '^---$' "$TMP/share/kwok/stage/$f.yaml"
done > "$TMP/share/kwok/stages-default.yaml"

# --- helm ---
setup_module helm helm.sh/helm/v3 "$HELM_VERSION" "" helm.sh/helm/v3/cmd/helm
hk=$(cd "$SRC/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)   # v0.<minor>.<patch>
hk_minor=${hk#v0.}; hk_minor=${hk_minor%%.*}
helm_ld="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$hk_minor"
done
build helm "$helm_ld" "" helm.sh/helm/v3/cmd/helm

# ---- smoke test, manifest, atomic publish -------------------------------------
for b in "${BINARIES[@]}"; do [[ -x "$TMP/bin/$b" ]] || die "missing binary $b"; done
expect_version() {   # expect_version WANT CMD...
  local want=$1 got; shift
  got=$("$@" 2>&1) || die "'$*' failed: $got"
  [[ "$got" == *"$want"* ]] || die "'$*' printed '$got', expected '$want'"
  log "ok: $(basename "$1") -> $(head -n1 <<<"$got")"
}
expect_version "$KUBERNETES_VERSION" "$TMP/bin/kube-apiserver" --version
expect_version "$KUBERNETES_VERSION" "$TMP/bin/kube-controller-manager" --version
expect_version "$KUBERNETES_VERSION" "$TMP/bin/kube-scheduler" --version
expect_version "$KUBERNETES_VERSION" "$TMP/bin/kubectl" version --client
expect_version "$KUBERNETES_VERSION" "$TMP/bin/kubelet" --version
expect_version "$KUBERNETES_VERSION" "$TMP/bin/pause" -v
expect_version "$CRI_TOOLS_VERSION" "$TMP/bin/crictl" --version
expect_version "$BUILDKIT_VERSION" "$TMP/bin/buildkitd" --version
expect_version "$BUILDKIT_VERSION" "$TMP/bin/buildctl" --version
expect_version "${ROOTLESSKIT_VERSION#v}" "$TMP/bin/rootlesskit" --version
expect_version "${ETCD_VERSION#v}" "$TMP/bin/etcd" --version
expect_version "$HELM_VERSION" "$TMP/bin/helm" version --short
expect_version "${KWOK_VERSION#v}" "$TMP/bin/kwok" --version
[[ -s "$TMP/share/kwok/stages-default.yaml" ]] || die "kwok default stages missing"

elapsed=$((SECONDS - start))
{
  echo "key=$KEY"
  echo "recipe_rev=$RECIPE_REV"
  printf '%s\n' "$pins"
  echo "staging_version=$STAGING_VERSION"
  echo "go=$GOVER"
  echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "build_seconds=$elapsed"
  echo "kwok_stages=share/kwok/stages-default.yaml"
} > "$TMP/manifest.txt"

if [[ -e "$OUT" ]]; then   # --force or an incomplete tree from an older script
  mv -T "$OUT" "$TMP.old"
fi
mv -T "$TMP" "$OUT"
rm -rf "$TMP.old"
trap - EXIT

log "cold build took ${elapsed}s"
# The binaries are all that is kept: the Go build and module caches and the module sources
# take several GiB that a CI machine's disk may not have to spare for the tests (a CI run once
# ran out of space compiling them). IMAGEBUILD_KEEP_GO_CACHE=1 keeps them for rebuilds.
if [[ "${IMAGEBUILD_KEEP_GO_CACHE:-0}" != 1 ]]; then
  # Only the caches this script chose: a cache the caller named is theirs.
  [[ -n "${IMAGEBUILD_GOMODCACHE:-}" ]] || rm -rf "$GOMODCACHE"
  [[ -n "${IMAGEBUILD_GOCACHE:-}" ]] || rm -rf "$GOCACHE"
  rm -rf "$SRC"
  log "removed the Go caches and module sources (IMAGEBUILD_KEEP_GO_CACHE=1 keeps them)"
fi
log "binaries in $BIN: $(cd "$BIN" && echo *)"
echo "$BIN" >&3
