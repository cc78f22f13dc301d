#!/usr/bin/env bash
# Installs the non-Python tools the tests, load tests and deploy renders need; `make deps` calls it.
# Idempotent: each step is skipped when its tool is already there at the right version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.cache/bin"
BUILD="$ROOT/.cache/build"
FERRETDB_VERSION="v1.24.2"
GHZ_VERSION="v0.93.0"
mkdir -p "$BIN" "$BUILD"

step() { printf '[deps] %s\n' "$*"; }

# Captured rather than piped into `grep -q`, which under pipefail can fail on SIGPIPE.
ferretdb_is_current() {
    local reported
    reported="$("$BIN/ferretdb" --version 2>/dev/null)" || return 1
    [[ "$reported" == *"version: $FERRETDB_VERSION"* ]]
}

# apt-get needs root; use sudo only when we are not root already.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT_UPDATED=0

apt_install() {  # apt_install <command> <package>
    local cmd="$1" pkg="$2"
    if command -v "$cmd" >/dev/null 2>&1; then
        step "$pkg: present ($(command -v "$cmd"))"
        return
    fi
    step "$pkg: installing with apt-get"
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$pkg" >/dev/null
}

apt_install redis-server redis-server
apt_install h2load nghttp2-client
# The browser test (tests/clients/test_typescript_client.py) drives Debian's Chromium headless.
apt_install chromium chromium
# The CDN-tier test (tests/edge/test_cdn.py) puts Varnish in front of the edge; it runs its own
# varnishd, so the packaged service is never started.
apt_install varnishd varnish

if ! command -v go >/dev/null 2>&1; then
    export PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null 2>&1; then
    echo "[deps] Go is required (looked in PATH and /usr/local/go/bin); install Go >= 1.22" >&2
    exit 1
fi
# The Go toolchain's VCS stamping fails in copied module sources and containers without git metadata.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"

# FerretDB: `go install` leaves build/version/version.txt empty (their release tooling writes it), and
# the binary then panics at start; so build from a copy of the module source with the file filled in.
if [ -x "$BIN/ferretdb" ] && ferretdb_is_current; then
    step "ferretdb $FERRETDB_VERSION: present ($BIN/ferretdb)"
else
    step "ferretdb $FERRETDB_VERSION: building into $BIN/ferretdb"
    src_dir="$(go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    if [ -z "$src_dir" ] || [ ! -d "$src_dir" ]; then
        echo "[deps] go mod download did not report a source directory for FerretDB" >&2
        exit 1
    fi
    rm -rf "$BUILD/ferretdb-src"
    cp -R "$src_dir" "$BUILD/ferretdb-src"
    chmod -R u+w "$BUILD/ferretdb-src"
    printf '%s\n' "$FERRETDB_VERSION" >"$BUILD/ferretdb-src/build/version/version.txt"
    (cd "$BUILD/ferretdb-src" && go build -o "$BIN/ferretdb" ./cmd/ferretdb)
    if ! ferretdb_is_current; then
        echo "[deps] the built $BIN/ferretdb does not report $FERRETDB_VERSION" >&2
        exit 1
    fi
fi

if [ -x "$BIN/ghz" ]; then
    step "ghz $GHZ_VERSION: present ($BIN/ghz)"
else
    step "ghz $GHZ_VERSION: installing into $BIN/ghz"
    GOBIN="$BIN" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
fi

# Envoy's reference rate-limit service: the edge's quotas shared by every Envoy, counted in Redis.
# The module proxy lists no tagged release, so a pseudo-version pins a commit of main (2026-01-22).
# `go install` names the binary after its package directory (service_cmd): build aside, rename.
RATELIMIT_VERSION="v1.4.1-0.20260122083618-3fb702589d36"
if [ -x "$BIN/ratelimit" ] && [ "$(cat "$BIN/ratelimit.version" 2>/dev/null)" = "$RATELIMIT_VERSION" ]; then
    step "ratelimit $RATELIMIT_VERSION: present ($BIN/ratelimit)"
else
    step "ratelimit $RATELIMIT_VERSION: installing into $BIN/ratelimit"
    rm -rf "$BUILD/ratelimit-bin"
    GOBIN="$BUILD/ratelimit-bin" go install "github.com/envoyproxy/ratelimit/src/service_cmd@$RATELIMIT_VERSION"
    mv "$BUILD/ratelimit-bin/service_cmd" "$BIN/ratelimit"
    printf '%s\n' "$RATELIMIT_VERSION" >"$BIN/ratelimit.version"
fi

# kustomize renders the mesh/ overlays (`make render-dev`, `make render-prod`, tests/mesh). v5.8.2 is the
# newest release whose go.mod the installed toolchain accepts (v5.8.3 asks for Go 1.27).
KUSTOMIZE_VERSION="v5.8.2"
if [ -x "$BIN/kustomize" ] && [ "$(cat "$BIN/kustomize.version" 2>/dev/null)" = "$KUSTOMIZE_VERSION" ]; then
    step "kustomize $KUSTOMIZE_VERSION: present ($BIN/kustomize)"
else
    step "kustomize $KUSTOMIZE_VERSION: installing into $BIN/kustomize"
    GOBIN="$BIN" go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
    printf '%s\n' "$KUSTOMIZE_VERSION" >"$BIN/kustomize.version"
fi

# Istio's own analyzer (`istioctl analyze --use-kube=false`) over the rendered overlays in tests/mesh:
# it applies Istio's semantic validation, which the strict schema check does not. The module proxy
# serves istio.io/istio only as pseudo-versions (its tags are not Go-module semver), so this pins the
# snapshot of 2026-08-27 (1.30 in development). Large: several minutes of compiling on a cold cache.
ISTIOCTL_VERSION="v0.0.0-20260827124520-eed52ebb66ad"
if [ -x "$BIN/istioctl" ] && [ "$(cat "$BIN/istioctl.version" 2>/dev/null)" = "$ISTIOCTL_VERSION" ]; then
    step "istioctl $ISTIOCTL_VERSION: present ($BIN/istioctl)"
else
    step "istioctl $ISTIOCTL_VERSION: building into $BIN/istioctl (several minutes on a cold cache)"
    GOBIN="$BIN" go install "istio.io/istio/istioctl/cmd/istioctl@$ISTIOCTL_VERSION"
    printf '%s\n' "$ISTIOCTL_VERSION" >"$BIN/istioctl.version"
fi

# The schema validator for mesh/ (tests/mesh/validate), pinned by its go.sum. Built here rather than
# by the test that uses it: a cold build compiles the Kubernetes API types for minutes on two cores,
# and inside pytest it would hold up the suite's event loop while other tests' servers wait on it.
step "mesh validator: building into $BIN/mesh-validate"
(cd "$ROOT/tests/mesh/validate" && GOFLAGS="$GOFLAGS -mod=readonly" CGO_ENABLED=0 go build -o "$BIN/mesh-validate" .)

# Observability (observability/, `make observe`, tests/observability): Prometheus and promtool, Alertmanager
# and amtool, Jaeger. Each is a large Go build (a cold build of Prometheus took 12 minutes on two busy
# cores, Jaeger 10, Alertmanager 1); each is rebuilt only when its pinned version changes.
PROMETHEUS_VERSION="v0.316.0"
if [ -x "$BIN/prometheus" ] && [ -x "$BIN/promtool" ] \
        && [ "$(cat "$BIN/prometheus.version" 2>/dev/null)" = "$PROMETHEUS_VERSION" ]; then
    step "prometheus + promtool $PROMETHEUS_VERSION: present ($BIN/prometheus)"
else
    step "prometheus + promtool $PROMETHEUS_VERSION: building into $BIN (about 10 minutes on a cold cache)"
    GOBIN="$BIN" go install "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
        "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
    printf '%s\n' "$PROMETHEUS_VERSION" >"$BIN/prometheus.version"
fi

# Alertmanager embeds its web UI's built assets, which the module source lacks (`go install` fails on
# the embed pattern); build from a copy of the source with a page saying so. The API is unaffected.
ALERTMANAGER_VERSION="v0.35.0"
if [ -x "$BIN/alertmanager" ] && [ -x "$BIN/amtool" ] \
        && [ "$(cat "$BIN/alertmanager.version" 2>/dev/null)" = "$ALERTMANAGER_VERSION" ]; then
    step "alertmanager + amtool $ALERTMANAGER_VERSION: present ($BIN/alertmanager)"
else
    step "alertmanager + amtool $ALERTMANAGER_VERSION: building into $BIN"
    src_dir="$(go mod download -json "github.com/prometheus/alertmanager@$ALERTMANAGER_VERSION" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    if [ -z "$src_dir" ] || [ ! -d "$src_dir" ]; then
        echo "[deps] go mod download did not report a source directory for Alertmanager" >&2
        exit 1
    fi
    rm -rf "$BUILD/alertmanager-src"
    cp -R "$src_dir" "$BUILD/alertmanager-src"
    chmod -R u+w "$BUILD/alertmanager-src"
    for ui in elm mantine; do
        mkdir -p "$BUILD/alertmanager-src/ui/app/dist/$ui"
        printf '<p>This Alertmanager was built without its web UI; use the API: /api/v2/alerts</p>\n' \
            >"$BUILD/alertmanager-src/ui/app/dist/$ui/index.html"
    done
    (cd "$BUILD/alertmanager-src" && go build -o "$BIN/alertmanager" ./cmd/alertmanager \
        && go build -o "$BIN/amtool" ./cmd/amtool)
    printf '%s\n' "$ALERTMANAGER_VERSION" >"$BIN/alertmanager.version"
fi

# Jaeger v2 (all-in-one: OTLP in, in-memory storage, query API), pinned by tools/jaeger/go.mod and go.sum.
JAEGER_VERSION="$(sed -n 's#^[[:space:]]*github.com/jaegertracing/jaeger \(v[^ ]*\).*#\1#p' \
    "$ROOT/tools/jaeger/go.mod" | head -n 1)"
if [ -x "$BIN/jaeger" ] && [ "$(cat "$BIN/jaeger.version" 2>/dev/null)" = "$JAEGER_VERSION" ]; then
    step "jaeger $JAEGER_VERSION: present ($BIN/jaeger)"
else
    step "jaeger $JAEGER_VERSION: building into $BIN/jaeger (about 10 minutes on a cold cache)"
    (cd "$ROOT/tools/jaeger" && GOFLAGS="$GOFLAGS -mod=readonly" go build -o "$BIN/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger)
    printf '%s\n' "$JAEGER_VERSION" >"$BIN/jaeger.version"
fi
