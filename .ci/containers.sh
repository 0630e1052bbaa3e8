#!/usr/bin/env bash
# The container test: build the image, run the compose stack for real, check, scale, tear down.
#
#   bash .ci/containers.sh            # from the repository root; CI sets CI=true
#
# Installs the container tools when they are missing (podman, debootstrap, docker-compose: Debian
# packages), then runs tests/containers with pytest. Under CI a missing tool is a failure, never a skip.
# Bounded: every command inside has its own timeout, and the pytest run is interrupted (SIGINT, so its
# teardown still runs) after $GRADCHECK_CONTAINERS_TIMEOUT seconds (default 1500), killed 120 s later.
# Whatever happens, the exit trap removes the compose project's containers and stops the podman API
# service the test started (by the pid it recorded).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TIMEOUT=${GRADCHECK_CONTAINERS_TIMEOUT:-1500}
started=$(date +%s)

need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v docker-compose >/dev/null || need+=(docker-compose)
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "containers: installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        timeout 600 apt-get update -qq
        timeout 900 apt-get install -y -qq podman debootstrap docker-compose >/dev/null
    else
        echo "containers: missing ${need[*]} and cannot install them (not root or no apt-get)" >&2
        [ "${CI:-}" = true ] && exit 1
    fi
fi

STATE=$(mktemp -d /tmp/gradcheck-containers.XXXXXX)
export GRADCHECK_CONTAINERS_STATE=$STATE
# Every podman / compose command the test ran, with its output (kept after the run).
export GRADCHECK_CONTAINERS_LOG=${GRADCHECK_CONTAINERS_LOG:-/tmp/gradcheck-containers-commands.log}
cleanup() {
    if [ -s "$STATE/podman-service.pid" ]; then
        pid=$(cat "$STATE/podman-service.pid")
        if kill -0 "$pid" 2>/dev/null; then
            echo "containers: stopping podman service $pid left by the test"
            kill "$pid" 2>/dev/null || true
        fi
    fi
    if command -v podman >/dev/null; then
        left=$(podman ps -a -q --filter label=com.docker.compose.project=gradcheck-ci 2>/dev/null || true)
        if [ -n "$left" ]; then
            echo "containers: removing containers left by the test: $left"
            # shellcheck disable=SC2086
            podman rm -f $left >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$STATE"
}
trap cleanup EXIT

# This machine's podman needs runc and no default ulimits (see tests/containers/conftest.py).
if [ -z "${CONTAINERS_CONF:-}" ]; then
    printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' >"$STATE/containers.conf"
    export CONTAINERS_CONF=$STATE/containers.conf
fi

status=0
timeout --signal=INT --kill-after=120 "$TIMEOUT" \
    "$PY" -m pytest tests/containers -m containers -p no:cacheprovider -v -rfEsP --durations=0 || status=$?
echo "containers: finished in $(($(date +%s) - started)) s (exit $status); commands: $GRADCHECK_CONTAINERS_LOG"
exit "$status"
