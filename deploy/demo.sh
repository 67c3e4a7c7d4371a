#!/usr/bin/env bash
# `make demo`: an embedded herder stack in a temporary folder: started, looked at, stopped.
set -euo pipefail

HERDER="${HERDER:-.venv/bin/herder}"
folder="$(mktemp -d "${TMPDIR:-/tmp}/herder-demo.XXXXXX")"
export HERDER_DATA_DIR="$folder"
pid=""

cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" || true
    fi
    rm -rf "$folder"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step "herder up --port 0 &"
"$HERDER" up --port 0 --log-level warning &
pid=$!

for _ in $(seq 1 150); do
    "$HERDER" status >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "herder up exited early" >&2; exit 1; }
    sleep 0.2
done

step "herder status"
"$HERDER" status

step "herder token create demo-integrator --role integrator"
"$HERDER" token create demo-integrator --role integrator >/dev/null
echo "(the secret went to stdout once; herder keeps only its hash)"

step "herder token list"
"$HERDER" token list

step "herder tap --since 1m --count 2"
"$HERDER" tap --since 1m --count 2 2>/dev/null

step "kill -TERM $pid   # what Ctrl-C does"
kill -TERM "$pid"
wait "$pid"
pid=""
if pgrep -f "$folder" >/dev/null; then
    echo "a process of the demo stack is still running" >&2
    exit 1
fi
echo "stopped; no nats-server left behind"
