#!/usr/bin/env bash
# Checks of the deployment files: deploy/ (Dockerfile, Prometheus, Grafana), helm/roomcast,
# docker-compose.yml and .dockerignore. One command:
#
#   tests/deploy/check.sh
#
# Installs what it needs when missing: helm (built with Go into the cache, a few minutes the
# first time), promtool (Debian's prometheus package) and PyYAML (python3-yaml). Uses the
# roomcast binary from ROOMCAST_BIN, or builds target/debug/roomcast.
# Ends with "deploy: N passed, M failed"; exits non-zero if anything failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE="${ROOMCAST_CACHE:-$HOME/.cache/roomcast}"
CHART=helm/roomcast
TESTS=tests/deploy

PASSED=0
FAILED=0
FAILURES=()
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

say() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# check NAME CMD...: runs one check, its output indented; counts it.
check() {
  local name="$1"
  shift
  local start=$SECONDS
  printf -- '--- %s\n' "$name"
  if "$@" >"$WORK/out" 2>&1; then
    PASSED=$((PASSED + 1))
    grep -E '^(Ran [0-9]+ tests|validating with|building)' "$WORK/out" | sed 's/^/     /'
    printf 'ok   %s (%ss)\n' "$name" $((SECONDS - start))
  else
    FAILED=$((FAILED + 1))
    FAILURES+=("$name")
    sed 's/^/     /' "$WORK/out" | tail -n 60
    printf 'FAIL %s (%ss)\n' "$name" $((SECONDS - start))
  fi
}

# expect_failure PATTERN CMD...: CMD must fail and say PATTERN.
expect_failure() {
  local pattern="$1"
  shift
  if "$@" >"$WORK/neg" 2>&1; then
    echo "expected a failure, but it succeeded: $*"
    return 1
  fi
  if ! grep -qE -- "$pattern" "$WORK/neg"; then
    echo "failed, but without /$pattern/: $*"
    cat "$WORK/neg"
    return 1
  fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq >/dev/null && apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --------------------------------------------------------------------------- tools
say "tools"
HELM="$(command -v helm || true)"
if [ -z "$HELM" ] || ! "$HELM" version --short 2>/dev/null | grep -q '^v3\.'; then
  HELM="$CACHE/bin/helm"
  # A go-installed helm reports "v3.22" as its version; the module version is in the binary.
  if [ ! -x "$HELM" ] || ! go version -m "$HELM" 2>/dev/null | grep -qE "helm.sh/helm/v3[[:space:]]+${HELM_VERSION}[[:space:]]"; then
    command -v go >/dev/null || { echo "helm is missing and Go is not installed to build it"; exit 1; }
    echo "building helm $HELM_VERSION with Go into $CACHE/bin (a few minutes, once)"
    mkdir -p "$CACHE/bin"
    start=$SECONDS
    GOBIN="$CACHE/bin" go install "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" || exit 1
    echo "helm built in $((SECONDS - start))s"
  fi
fi
echo "helm: $HELM ($("$HELM" version --short))"

# promtool alone, unpacked from Debian's prometheus package: installing the package would start
# a Prometheus server on :9090 wherever systemd runs, the demo's admin port.
PROMTOOL="$(command -v promtool || true)"
if [ -z "$PROMTOOL" ]; then
  PROMTOOL="$CACHE/bin/promtool"
  if [ ! -x "$PROMTOOL" ]; then
    echo "unpacking promtool from Debian's prometheus package into $CACHE/bin (once)"
    if [ -z "$apt_updated" ]; then as_root apt-get update -qq >/dev/null && apt_updated=1; fi
    deb="$(mktemp -d)"
    (cd "$deb" && apt-get download -qq prometheus >/dev/null 2>&1) || { echo "apt-get download prometheus failed"; exit 1; }
    dpkg-deb -x "$deb"/prometheus_*.deb "$deb/x" || exit 1
    mkdir -p "$CACHE/bin" && cp "$deb/x/usr/bin/promtool" "$PROMTOOL" && rm -rf "$deb"
  fi
fi
promtool() { "$PROMTOOL" "$@"; }
echo "promtool: $PROMTOOL ($(promtool --version 2>&1 | head -n 1))"

PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
    echo "installing PyYAML (Debian package python3-yaml)"
    apt_install python3-yaml || exit 1
  fi
  PY=/usr/bin/python3
fi
"$PY" -c 'import tomllib' 2>/dev/null || { echo "$PY is older than 3.11 (no tomllib)"; exit 1; }
echo "python: $("$PY" --version)"

if [ -n "${ROOMCAST_BIN:-}" ]; then
  BIN="$ROOMCAST_BIN"
else
  echo "building the roomcast binary (cargo build --locked -p roomcast --bin roomcast)"
  cargo build --locked -q -p roomcast --bin roomcast || exit 1
  BIN="$("$ROOT/scripts/target-dir")/debug/roomcast"
fi
[ -x "$BIN" ] || { echo "no roomcast binary at $BIN"; exit 1; }
export ROOMCAST_BIN="$BIN"

if ! openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/jwt.key" 2>/dev/null ||
  ! openssl pkey -in "$WORK/jwt.key" -pubout -out "$WORK/jwt.pub" 2>/dev/null; then
  echo "openssl cannot make an RSA key"
  exit 1
fi
PUBKEY=(-f "$TESTS/values-publickey.yaml" --set-file "auth.publicKey=$WORK/jwt.pub")

# --------------------------------------------------------------------------- chart
say "helm chart"
check "helm lint --strict (defaults)" "$HELM" lint --strict "$CHART"
check "helm lint --strict (every feature on)" "$HELM" lint --strict "$CHART" -f "$TESTS/values-all.yaml"
check "helm lint --strict (public-key JWT)" "$HELM" lint --strict "$CHART" "${PUBKEY[@]}"

mkdir -p "$WORK/render"
# render OUT [helm template args...]
render() {
  local out="$1"
  shift
  "$HELM" template roomcast "$CHART" --namespace rt "$@" >"$out"
}
check "helm template (defaults)" render "$WORK/render/defaults.yaml"
check "helm template (every feature on)" render "$WORK/render/all.yaml" -f "$TESTS/values-all.yaml"
check "helm template (public-key JWT)" render "$WORK/render/publickey.yaml" "${PUBKEY[@]}"

refusals() {
  expect_failure 'terminationGracePeriodSeconds' \
    "$HELM" template r "$CHART" --set terminationGracePeriodSeconds=10 || return 1
  expect_failure 'image/tag' "$HELM" template r "$CHART" --set image.tag=latest || return 1
  expect_failure 'additional properties|not allowed' "$HELM" template r "$CHART" --set config.server.listen=x || return 1
  expect_failure 'looks like a secret' \
    "$HELM" template r "$CHART" --set-string 'kafka.properties.sasl\.password=x' || return 1
  expect_failure 'set by roomcast itself' \
    "$HELM" template r "$CHART" --set-string 'kafka.properties.group\.id=x' || return 1
  expect_failure 'auth.publicKey' "$HELM" template r "$CHART" --set auth.algorithm=ES256 || return 1
  expect_failure 'auth.secret|16' "$HELM" template r "$CHART" --set auth.secret=short || return 1
  expect_failure 'existingSecret' \
    "$HELM" template r "$CHART" --set-string 'kafka.secretProperties.keys.sasl\.password=pw' || return 1
  expect_failure 'HS256|EdDSA|enum|one of' "$HELM" template r "$CHART" --set auth.algorithm=none || return 1
  expect_failure 'kafkaConcurrency|minimum' \
    "$HELM" template r "$CHART" --set config.resume.kafkaConcurrency=0 || return 1
  expect_failure 'additional properties|not allowed' \
    "$HELM" template r "$CHART" --set config.resume.bufferSize=1 || return 1
}
check "chart refuses bad values" refusals
check "every helm command and values example in the docs renders as written" \
  "$PY" "$TESTS/test_doc_commands.py" "$HELM" "$ROOT"

# NOTES.txt is only rendered by install/upgrade, which need a cluster: render it through a copy
# of the chart where it is a named template, output in a ConfigMap.
notes() {
  local copy="$WORK/notes-chart"
  rm -rf "$copy" && cp -r "$CHART" "$copy" || return 1
  { echo '{{- define "roomcast.notes" -}}'; cat "$copy/templates/NOTES.txt"; echo '{{- end }}'; } \
    >"$copy/templates/_notes.tpl"
  rm "$copy/templates/NOTES.txt"
  cat >"$copy/templates/notes-render.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ include "roomcast.notes" . | toJson }}
EOF
  "$HELM" template roomcast "$copy" --namespace rt --show-only templates/notes-render.yaml >"$WORK/notes-default.yaml" &&
    "$HELM" template roomcast "$copy" --namespace rt -f "$TESTS/values-all.yaml" \
      --show-only templates/notes-render.yaml >"$WORK/notes-all.yaml" || return 1
  "$PY" - "$WORK/notes-default.yaml" "$WORK/notes-all.yaml" <<'EOF'
import sys, yaml
default = yaml.safe_load(open(sys.argv[1]))["data"]["notes"]
every = yaml.safe_load(open(sys.argv[2]))["data"]["notes"]
for text, wanted in ((default, ["port-forward svc/roomcast 8080:80", "svc/roomcast-admin", "Secret roomcast-jwt",
                                "terminationGracePeriodSeconds is 25"]),
                     (every, ["wss://rt.example.com/ws", "Secret roomcast-jwt, key secret", "prometheus-adapter",
                              "roomcast_connections"])):
    for w in wanted:
        assert w in text, f"NOTES lacks {w!r}:\n{text}"
EOF
}
check "NOTES.txt renders (defaults and every feature on)" notes
check "rendered manifests (probes, securityContext, grace, labels, images, ingress, checksum, config)" \
  "$PY" "$TESTS/test_chart.py" "$WORK/render"

# --------------------------------------------------------------------------- Prometheus
say "Prometheus rules"
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool test rules (every alert fires on its trouble)" promtool test rules "$TESTS/alerts_test.yml"
prometheus_rule() {
  "$PY" - "$WORK/render/all.yaml" "$WORK/prometheusrule.yml" <<'EOF' || return 1
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
assert len(docs) == 1, "no PrometheusRule rendered"
yaml.safe_dump(docs[0]["spec"], open(sys.argv[2], "w"), sort_keys=False)
EOF
  promtool check rules "$WORK/prometheusrule.yml"
}
check "promtool check rules (the chart's PrometheusRule)" prometheus_rule

# --------------------------------------------------------------------------- metric names
say "metric names"
check "alerts and dashboard use only metrics roomcast exports (live binary)" "$PY" "$TESTS/test_metrics.py"

# --------------------------------------------------------------------------- compose, image
say "docker compose and image"
# `docker compose config` where a Compose plugin exists; otherwise the same loader (compose-go)
# built from tests/deploy/composecheck into the cache. Either must also refuse a broken file.
compose_config() {
  local validate
  if docker compose version >/dev/null 2>&1; then
    validate=(docker compose config -q -f)
  elif command -v docker-compose >/dev/null 2>&1; then
    validate=(docker-compose config -q -f)
  else
    command -v go >/dev/null || { echo "no Compose plugin and no Go to build compose-go"; return 1; }
    local sum bin
    sum="$(cat "$TESTS"/composecheck/go.mod "$TESTS"/composecheck/go.sum "$TESTS"/composecheck/main.go | sha256sum | cut -c1-16)"
    bin="$CACHE/bin/composecheck-$sum"
    if [ ! -x "$bin" ]; then
      echo "no Compose plugin here: building compose-go's loader (tests/deploy/composecheck)"
      mkdir -p "$CACHE/bin"
      (cd "$TESTS/composecheck" && go build -o "$bin" .) || return 1
    fi
    validate=("$bin")
  fi
  echo "validating with: ${validate[*]}"
  "${validate[@]}" docker-compose.yml >/dev/null || return 1
  sed 's/^    read_only: true$/    read_only: true\n    no_such_key: 1/' docker-compose.yml > "$WORK/broken-compose.yml"
  if "${validate[@]}" "$WORK/broken-compose.yml" >"$WORK/broken.out" 2>&1; then
    echo "the validator accepted a compose file with an unknown key"
    return 1
  fi
  grep -q no_such_key "$WORK/broken.out" || { cat "$WORK/broken.out"; return 1; }
}
check "docker compose config (or compose-go, its loader)" compose_config
check "compose, Dockerfile, .dockerignore and demo producer (structure)" "$PY" "$TESTS/test_compose.py"
check "shell syntax of the demo producer" bash -n deploy/demo-producer.sh

# --------------------------------------------------------------------------- summary
echo
if [ "$FAILED" -gt 0 ]; then
  printf 'failed: %s\n' "${FAILURES[@]}"
fi
echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
