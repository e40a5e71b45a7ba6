# Sourced by scripts/demo and scripts/test: install what the build needs, pick the target dir.
# Installs only what is missing, so repeated runs cost nothing.

need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)   # bindgen for RocksDB's C API
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)  # tonic-prost-build
[ -x /usr/bin/python3 ] || need+=(python3)                       # the test suite's command agents
dpkg -s python3-venv >/dev/null 2>&1 || need+=(python3-venv)      # the Python client test's grpcio
if [ "${MAOS_SETUP_SERVICES:-0}" = 1 ]; then
  # The task-data tests start their own PostgreSQL and Redis servers on loopback.
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  # The dashboard's browser tests: Node.js runs `node --test` with playwright-core, which drives
  # Debian's chromium (no browser download).
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  [ -x /usr/bin/chromium ] || need+=(chromium)
  # The clock-skew test runs one node an hour ahead under libfaketime.
  dpkg -s libfaketime >/dev/null 2>&1 || need+=(faketime)
  # The fault runner puts each node on a network namespace of its own (ip netns, veth, bridge).
  [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  # Packages must not start their services: the tests start and stop their own.
  no_start=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    no_start=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  if [ -n "$no_start" ]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup.rs) first" >&2; exit 1; }

# The build lives outside the clone so every clone and CI run on this machine reuses it.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/maos-target 2>/dev/null && [ -w /var/cache/maos-target ]; then
    CARGO_TARGET_DIR=/var/cache/maos-target
  else
    CARGO_TARGET_DIR="$HOME/.cache/maos-target"
  fi
fi
export CARGO_TARGET_DIR

# For the tests only: the Python client test (node/tests/python_client.rs) generates stubs from
# client/proto with grpcio-tools, in its own venv next to the build.
setup_python_grpc() {
  if [ ! -x "$CARGO_TARGET_DIR/python-grpc/bin/python" ] || ! "$CARGO_TARGET_DIR/python-grpc/bin/python" -c "import grpc, grpc_tools" 2>/dev/null; then
    echo "setup: making a Python venv with grpcio in $CARGO_TARGET_DIR/python-grpc"
    /usr/bin/python3 -m venv "$CARGO_TARGET_DIR/python-grpc"
    "$CARGO_TARGET_DIR/python-grpc/bin/pip" install -q "grpcio==1.68.1" "grpcio-tools==1.68.1"
  fi
}

# For the tests only: the Python SDK's tests (node/tests/python_sdk.rs) run in their own venv next
# to the build, with pinned versions of everything; the SDK itself is reinstalled from
# ./sdk/python on every run, so each run tests the repository's current SDK.
setup_python_sdk() {
  local venv="$CARGO_TARGET_DIR/python-sdk"
  local pins=(
    "grpcio==1.68.1" "grpcio-tools==1.68.1" "protobuf==5.29.6" "googleapis-common-protos==1.66.0"
    "setuptools==75.6.0" "pytest==8.3.4" "pytest-asyncio==0.24.0" "pluggy==1.7.0" "iniconfig==2.3.1"
    "packaging==26.4" "cryptography==44.0.0" "cffi==2.1.1" "pycparser==3.12"
    # Optional for the SDK (trace context); its tests use it.
    "opentelemetry-api==1.39.1" "importlib_metadata==8.7.1" "zipp==4.1.2" "typing_extensions==4.16.0"
  )
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: making a Python venv for the SDK's tests in $venv"
    /usr/bin/python3 -m venv "$venv"
  fi
  # Quick when they are installed already.
  "$venv/bin/pip" install -q "${pins[@]}"
  # The build hook needs grpcio-tools and setuptools, already pinned in the venv: no isolated build.
  "$venv/bin/pip" install -q --force-reinstall --no-deps --no-build-isolation ./sdk/python
}

# For the tests only: promtool (node/tests/prometheus.rs checks a live node's /metrics, the alert
# rules and their unit tests, and the Grafana dashboard's expressions). From Debian's prometheus
# package, unpacked next to the build and never installed, so no Prometheus service starts.
setup_promtool() {
  local dir="$CARGO_TARGET_DIR/prometheus"
  if [ ! -x "$dir/usr/bin/promtool" ]; then
    echo "setup: unpacking Debian's prometheus package (for promtool) into $dir"
    local download
    download="$(mktemp -d)"
    if ! (cd "$download" && apt-get download prometheus >/dev/null 2>&1); then
      local sudo=""
      [ "$(id -u)" -ne 0 ] && sudo="sudo"
      $sudo apt-get update -qq
      (cd "$download" && apt-get download prometheus >/dev/null)
    fi
    mkdir -p "$dir"
    dpkg -x "$download"/prometheus_*.deb "$dir"
    rm -rf "$download"
  fi
  export MAOS_PROMTOOL="$dir/usr/bin/promtool"
}

# For the tests only: cargo-deny, pinned, built once into the target directory (about 2.5
# minutes on 2 cores, from crates.io), for the dependency policy in deny.toml.
setup_cargo_deny() {
  local root="$CARGO_TARGET_DIR/tools" version="0.20.2"
  if ! "$root/bin/cargo-deny" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
    echo "setup: building cargo-deny $version into $root"
    cargo install cargo-deny --version "$version" --locked --quiet --root "$root" --target-dir "$CARGO_TARGET_DIR/tools-build"
  fi
  export PATH="$root/bin:$PATH"
}

# For the tests only: the dashboard's browser tests (node/tests/dashboard_browser.rs) use
# playwright-core, pinned by node/tests/browser/package-lock.json, installed next to the build
# with `npm ci` (no browser download: the tests launch /usr/bin/chromium).
setup_browser_tests() {
  local dir="$CARGO_TARGET_DIR/browser-tests"
  local lock=node/tests/browser/package-lock.json
  mkdir -p "$dir"
  if ! cmp -s "$lock" "$dir/package-lock.json" || [ ! -f "$dir/node_modules/playwright-core/package.json" ]; then
    echo "setup: installing playwright-core for the browser tests in $dir"
    cp node/tests/browser/package.json "$lock" "$dir/"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  fi
}

# For the tests only: schemathesis (node/tests/openapi_schemathesis.rs) checks a live node against
# its OpenAPI document, from its own venv next to the build, every package pinned.
setup_schemathesis() {
  local venv="$CARGO_TARGET_DIR/schemathesis"
  local pins=(
    "schemathesis==4.32.5" "hypothesis==6.170.17" "hypothesis-graphql==0.13.5" "graphql-core==3.3.2"
    "jsonschema_rs==0.60.3" "requests==2.34.2" "urllib3==2.8.0" "certifi==2026.10.19.post1" "idna==3.20"
    "charset-normalizer==3.5.3" "click==8.5.1" "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2"
    "Pygments==2.21.0" "PyYAML==6.0.4" "Werkzeug==3.1.9" "MarkupSafe==3.0.4" "harfile==0.6.0" "anyio==4.16.0"
    "pyrate-limiter==4.5.1" "sortedcontainers==2.4.0" "typing_extensions==4.16.0" "pytest==9.2.0"
    "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4"
  )
  if [ ! -x "$venv/bin/schemathesis" ] || [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version 4.32.5" ]; then
    echo "setup: making a Python venv with schemathesis in $venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q "${pins[@]}"
  fi
}
