#!/usr/bin/env bash
# Builds the control-plane binaries the tests, the demo and the benchmarks run:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (k8s.io/kubernetes),
# etcd (go.etcd.io/etcd/server/v3), kwok (sigs.k8s.io/kwok), helm (helm.sh/helm/v3) and
# hey (the bench's load generator), from Go modules at the versions pinned in
# hack/versions.env; and installs kwok's stages and cert-manager's CRDs from theirs. Also
# refcheck (hack/refcheck), the image-reference oracle of the unit tests.
#
# Output: $PREWARM_CACHE_DIR (default ~/.cache/prewarm)/<tool>-<version>/bin/<binary>.
# Each folder is keyed by version and filled atomically, so a second run with the
# binaries present does nothing, a fresh clone on the same machine reuses them, and an
# interrupted build never leaves a half-written binary behind.
#
# refcheck's folder is keyed by a hash of its source and go.mod/go.sum instead.
#
# Usage: hack/build-binaries.sh [--print-dirs | refcheck]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${PREWARM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/prewarm}"
k8s_dir="$cache/kubernetes-$KUBERNETES_VERSION/bin"
etcd_dir="$cache/etcd-$ETCD_VERSION/bin"
kwok_dir="$cache/kwok-$KWOK_VERSION/bin"
helm_dir="$cache/helm-$HELM_VERSION/bin"
crds_dir="$cache/cert-manager-$CERT_MANAGER_VERSION/crds"
hey_dir="$cache/hey-$HEY_VERSION/bin"
# refcheck is our own source (hack/refcheck): keyed by it, including go.mod's versions
refcheck_key="$(cat "$here/refcheck/go.mod" "$here/refcheck/go.sum" "$here/refcheck/main.go" | sha256sum | cut -c1-12)"
refcheck_dir="$cache/refcheck-$refcheck_key/bin"

if [[ "${1:-}" == "--print-dirs" ]]; then
  printf '%s\n' "$k8s_dir" "$etcd_dir" "$kwok_dir" "$helm_dir" "$crds_dir" "$hey_dir" "$refcheck_dir"
  exit 0
fi

started=$SECONDS
step() { printf '[build-binaries %4ds] %s\n' "$((SECONDS - started))" "$*"; }

command -v go >/dev/null || { echo "build-binaries: 'go' is not on PATH; install Go >= 1.26" >&2; exit 1; }
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
mkdir -p "$cache/logs" "$cache/src"

# run_logged LOG CMD...: runs CMD with its output in LOG, printing a progress line every
# 100 packages compiled (go build -v names each one). On failure shows the log's tail.
run_logged() {
  local log="$1"; shift
  local rc
  set +e
  "$@" 2>&1 | tee "$log" | awk '
      /^(#|go: downloading)/ { next }
      { n++; if (n % 100 == 0) { printf "    ... %d packages compiled (now %s)\n", n, $0; fflush() } }'
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -ne 0 ]]; then
    echo "build-binaries: command failed (exit $rc): $*" >&2
    echo "---- last 40 lines of $log ----" >&2
    tail -n 40 "$log" >&2
    exit "$rc"
  fi
}

have_all() { local d="$1"; shift; for b in "$@"; do [[ -x "$d/$b" ]] || return 1; done; }

# finish TMPDIR DESTDIR: moves freshly built binaries into place in one rename.
finish() {
  mkdir -p "$(dirname "$2")"
  rm -rf "$2"
  mv "$1" "$2"
}

build_kubernetes() {
  if have_all "$k8s_dir" kube-apiserver kube-controller-manager kube-scheduler kubectl; then
    step "kubernetes $KUBERNETES_VERSION: present in $k8s_dir"; return
  fi
  local src="$cache/src/kubernetes-$KUBERNETES_VERSION"
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  step "kubernetes $KUBERNETES_VERSION: downloading k8s.io/kubernetes module (~60 MB, once per machine)"
  mkdir -p "$src"
  (cd "$src" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null)
  local upstream_mod
  upstream_mod="$(cd "$src" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  # Our module takes the release's own requirements verbatim (so every dependency is at
  # the version upstream tested) and points each staging module, which upstream
  # replaces with ./staging/src/k8s.io/X, at its published k8s.io/X v0.<minor>.<patch>.
  step "kubernetes $KUBERNETES_VERSION: writing build module in $src (staging modules -> $staging)"
  {
    echo "module prewarm.local/k8s-binaries"
    echo
    sed -n '/^go /p; /^godebug /p' "$upstream_mod"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    awk '/^require \(/,/^\)/' "$upstream_mod"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/[a-z0-9-]*$#\t\1 => \1 '"$staging"'#p' "$upstream_mod"
    echo ")"
  } > "$src/go.mod"
  cat > "$src/tools.go" <<'EOF'
//go:build tools

package tools
EOF
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local pkg=k8s.io/component-base/version
  local cpkg=k8s.io/client-go/pkg/version
  local ld="-s -w"
  for p in $pkg $cpkg; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date -X $p.gitCommit=prewarm-module-build"
  done
  local tmp="$src/out.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  step "kubernetes $KUBERNETES_VERSION: downloading dependencies and compiling kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (cold: 10-20 min on 2 cores)"
  run_logged "$cache/logs/kubernetes-$KUBERNETES_VERSION.log" \
    bash -c "cd '$src' && go build -v -trimpath -ldflags '$ld' -o '$tmp/' \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl"
  finish "$tmp" "$k8s_dir"
  step "kubernetes $KUBERNETES_VERSION: built; $("$k8s_dir/kube-apiserver" --version)"
}

build_etcd() {
  if have_all "$etcd_dir" etcd; then step "etcd $ETCD_VERSION: present in $etcd_dir"; return; fi
  # go.etcd.io/etcd/server/v3 carries replace directives, so `go install mod@version` is
  # refused; a module of ours that requires it builds its main package instead.
  local src="$cache/src/etcd-$ETCD_VERSION"
  mkdir -p "$src"
  cat > "$src/go.mod" <<EOF
module prewarm.local/etcd-binary

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  local tmp="$src/out.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  step "etcd $ETCD_VERSION: downloading and compiling go.etcd.io/etcd/server/v3 (cold: 2-4 min)"
  run_logged "$cache/logs/etcd-$ETCD_VERSION.log" \
    bash -c "cd '$src' && go get go.etcd.io/etcd/server/v3@$ETCD_VERSION && go build -v -trimpath -ldflags '-s -w' -o '$tmp/etcd' go.etcd.io/etcd/server/v3"
  finish "$tmp" "$etcd_dir"
  step "etcd $ETCD_VERSION: built; $("$etcd_dir/etcd" --version | head -1)"
}

build_go_install() { # NAME VERSION DIR PACKAGE LDFLAGS
  local name="$1" version="$2" dir="$3" pkg="$4" ld="$5"
  if have_all "$dir" "$name"; then step "$name $version: present in $dir"; return; fi
  local tmp="$cache/src/$name-$version.out.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  step "$name $version: downloading and compiling $pkg@$version (cold: 3-6 min)"
  run_logged "$cache/logs/$name-$version.log" \
    env GOBIN="$tmp" go install -v -trimpath -ldflags "$ld" "$pkg@$version"
  finish "$tmp" "$dir"
  step "$name $version: built in $dir"
}

# kwok simulates nodes and pods through Stage configurations; without any it refuses to
# start. Its module ships the standard "fast" set (nodes Ready at once and kept alive by
# a Lease heartbeat; pods Running with init containers Completed; deletions finished),
# which we take from the module cache, at the same version as the binary.
install_kwok_stages() {
  local dest="$cache/kwok-$KWOK_VERSION/stages"
  if [[ -f "$dest/pod-ready.yaml" ]]; then step "kwok stages: present in $dest"; return; fi
  local mod
  mod="$(cd "$cache/src" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  local tmp="$dest.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  cp "$mod/kustomize/stage/node/fast/node-initialize.yaml" \
     "$mod/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
     "$mod/kustomize/stage/pod/fast/pod-ready.yaml" \
     "$mod/kustomize/stage/pod/fast/pod-complete.yaml" \
     "$mod/kustomize/stage/pod/fast/pod-delete.yaml" "$tmp/"
  chmod 644 "$tmp"/*.yaml
  finish "$tmp" "$dest"
  step "kwok stages: installed in $dest"
}

# cert-manager's CRDs, so the chart's Issuer/Certificate objects can be applied to the test
# API server (no cert-manager controller runs there). Plain YAML in its Go module.
install_cert_manager_crds() {
  if [[ -f "$crds_dir/cert-manager.io_certificates.yaml" ]]; then
    step "cert-manager $CERT_MANAGER_VERSION CRDs: present in $crds_dir"; return
  fi
  step "cert-manager $CERT_MANAGER_VERSION CRDs: downloading the module (once per machine)"
  local mod
  mod="$(cd "$cache/src" && go mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  local tmp="$crds_dir.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  cp "$mod"/deploy/crds/cert-manager.io_*.yaml "$tmp/"
  chmod 644 "$tmp"/*.yaml
  finish "$tmp" "$crds_dir"
  step "cert-manager CRDs: installed in $crds_dir"
}

# refcheck: github.com/distribution/reference, the image-name parser of the kubelet,
# containerd and CRI-O, behind a line-oriented CLI; the oracle tests/unit/test_images_runtime.py
# compares webhook/images.py with. Its go.mod pins the version k8s.io/kubernetes requires.
build_refcheck() {
  if have_all "$refcheck_dir" refcheck; then step "refcheck: present in $refcheck_dir"; return; fi
  local tmp="$cache/src/refcheck-$refcheck_key.out.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  step "refcheck: compiling hack/refcheck (cold: under a minute)"
  run_logged "$cache/logs/refcheck-$refcheck_key.log" \
    bash -c "cd '$here/refcheck' && GOFLAGS=-mod=readonly go build -v -trimpath -ldflags '-s -w' -o '$tmp/refcheck' ."
  finish "$tmp" "$refcheck_dir"
  step "refcheck: built in $refcheck_dir"
}

# `build-binaries.sh refcheck` builds only the oracle (the unit tests need nothing else)
if [[ "${1:-}" == "refcheck" ]]; then
  build_refcheck
  exit 0
fi

step "cache: $cache (override with PREWARM_CACHE_DIR); $(go version)"
build_etcd
build_kubernetes
build_go_install kwok "$KWOK_VERSION" "$kwok_dir" sigs.k8s.io/kwok/cmd/kwok \
  "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
install_kwok_stages
install_cert_manager_crds
# helm's release builds stamp the Kubernetes version it assumes offline (`helm template`,
# `helm lint`) from its client-go; without it helm assumes v1.20 and charts requiring a
# newer kubeVersion refuse to render.
helm_k8s_minor="$(cd "$cache/src" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" \
  | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' | xargs sed -n 's#^\s*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p')"
build_go_install helm "$HELM_VERSION" "$helm_dir" helm.sh/helm/v3/cmd/helm \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION
   -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor
   -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor"
# hey: the HTTP load generator of `make bench` (a Go client with keep-alive and a fixed
# per-worker rate, so the measured latencies are the server's, not a Python client's).
build_go_install hey "$HEY_VERSION" "$hey_dir" github.com/rakyll/hey "-s -w"
build_refcheck
step "all binaries ready"
printf '  %s\n' "$k8s_dir" "$etcd_dir" "$kwok_dir" "$helm_dir" "$crds_dir" "$hey_dir" "$refcheck_dir"
