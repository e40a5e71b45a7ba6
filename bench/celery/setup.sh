#!/usr/bin/env bash
# The venv `maos-bench e2e --peer celery` runs Celery from: Celery 5 with its Redis transport,
# every package pinned, next to the build (not in the clone). Run once; it is idempotent.
#   bench/celery/setup.sh            # makes $CARGO_TARGET_DIR/celery-bench (default /var/cache/maos-target)
set -euo pipefail
venv="${CARGO_TARGET_DIR:-/var/cache/maos-target}/celery-bench"
pins=(
  "celery[redis]==5.5.3" "kombu==5.5.4" "redis==5.2.1" "amqp==5.4.2" "async-timeout==5.0.1"
  "billiard==4.3.2" "click==8.5.1" "click-didyoumean==0.3.1" "click-plugins==1.1.1.2"
  "click-repl==0.4.1" "packaging==26.4" "prompt_toolkit==3.0.53" "python-dateutil==4.0.0"
  "typing_extensions==4.16.0" "tzdata==2026.6" "vine==5.1.0" "wcwidth==0.9.4"
)
if ! "$venv/bin/python" -c 'import sys, celery, kombu.transport.redis; sys.exit(celery.__version__ != "5.5.3")' 2>/dev/null; then
  command -v redis-server >/dev/null || { echo "setup: redis-server is missing: apt-get install redis-server" >&2; exit 1; }
  dpkg -s python3-venv >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q python3-venv; }
  echo "setup: making a Python venv with Celery in $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "${pins[@]}"
fi
echo "$venv/bin/python"
