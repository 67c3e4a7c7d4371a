#!/usr/bin/env bash
# `make demo`: an embedded herder stack in a temporary folder, one unattended robot, and its jobs:
# two run to Successful, a long task is soft-stopped, another that ignores stops is hard-killed.
# Everything stops at the end, and the demo exits 0 only if every step did what it should.
set -euo pipefail

HERDER="${HERDER:-.venv/bin/herder}"
PYTHON="${PYTHON:-$(dirname "$HERDER")/python}"
EXAMPLES="$(cd "$(dirname "$0")/../examples" && pwd)"
folder="$(mktemp -d "${TMPDIR:-/tmp}/herder-demo.XXXXXX")"
export HERDER_DATA_DIR="$folder/stack"
stack_pid=""
robot_pid=""
ROBOT=demo-robot
HOST="$(hostname -s 2>/dev/null | tr -c 'A-Za-z0-9_\n-' '-' | cut -c1-40)"
HOST="${HOST:-demo-host}"

stop() {
    local pid="$1"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" || true
    fi
}

cleanup() {
    stop "$robot_pid"
    stop "$stack_pid"
    rm -rf "$folder"
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
say() { printf '%s\n' "$*"; }
die() { printf 'demo failed: %s\n' "$*" >&2; exit 1; }

# field JSON-FIELD COMMAND...: one field of a command's --json output.
field() {
    local name="$1"
    shift
    "$@" --json | "$PYTHON" -c "import json, sys; print(json.load(sys.stdin)['$name'])"
}

# wait_for WHAT SECONDS COMMAND...: until the command succeeds.
wait_for() {
    local what="$1" seconds="$2"
    shift 2
    for _ in $(seq 1 $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not happen within $seconds s"
}

job_is() { [ "$(field state "$HERDER" job show "$1")" = "$2" ]; }
robot_is() { [ "$(field status "$HERDER" robot show "$1")" = "$2" ]; }

step "herder up --port 0 &"
"$HERDER" up --port 0 --log-level warning >"$folder/stack.log" 2>&1 &
stack_pid=$!
wait_for "the stack starting" 30 "$HERDER" status
"$HERDER" status

step "herder robot add $ROBOT --type unattended --host $HOST --group demo --save-token robot.token"
"$HERDER" robot add "$ROBOT" --type unattended --host "$HOST" --group demo --save-token "$folder/robot.token"

step "herder robot run $ROBOT --token-file robot.token &"
"$HERDER" robot run "$ROBOT" --token-file "$folder/robot.token" --heartbeat 1 --work-dir "$folder/robot" \
    --log-level warning >"$folder/robot.log" 2>&1 &
robot_pid=$!
wait_for "the robot connecting" 30 robot_is "$ROBOT" Available
"$HERDER" robot list

for example in hello rf-hello long-task; do
    step "herder package publish examples/$example"
    "$HERDER" package publish "$EXAMPLES/$example"
done
"$HERDER" package list

step "herder job start hello --robot $ROBOT --input '{\"name\": \"herder\"}' --wait"
"$HERDER" job start hello --robot "$ROBOT" --input '{"name": "herder"}' --wait || die "hello did not succeed"

step "herder job start rf-hello --group demo --wait"
"$HERDER" job start rf-hello --group demo --wait || die "rf-hello did not succeed"

step "herder job start long-task --robot $ROBOT --input '{\"step_s\": 0.3}'"
long="$(field id "$HERDER" job start long-task --robot "$ROBOT" --input '{"step_s": 0.3}')"
say "job $long"
wait_for "the long task starting" 30 job_is "$long" Running
sleep 2
step "herder job stop ${long:0:12}   # soft stop: the script sees should_stop() and ends itself"
"$HERDER" job stop "$long"
wait_for "the long task stopping itself" 30 job_is "$long" Stopped
"$HERDER" job logs "$long" | tail -n 4

step "herder job start long-task --robot $ROBOT --input '{\"honour_stop\": false}' --kill-grace 3"
stubborn="$(field id "$HERDER" job start long-task --robot "$ROBOT" --input '{"honour_stop": false, "step_s": 0.3}' --kill-grace 3)"
say "job $stubborn"
wait_for "the stubborn task starting" 30 job_is "$stubborn" Running
sleep 1
step "herder job stop ${stubborn:0:12}   # this one ignores soft stops"
"$HERDER" job stop "$stubborn"
sleep 2
"$HERDER" job show "$stubborn" | grep -E '^(state|reason)'
step "herder job kill ${stubborn:0:12}   # hard stop: SIGTERM to its process group, SIGKILL after the grace period"
"$HERDER" job kill "$stubborn"
wait_for "the stubborn task being killed" 30 job_is "$stubborn" Stopped
"$HERDER" job show "$stubborn" | grep -E '^(state|reason)'

step "herder job list"
"$HERDER" job list

step "kill -TERM robot and stack   # what Ctrl-C does"
stop "$robot_pid"
robot_pid=""
stop "$stack_pid"
stack_pid=""
if pgrep -f "$folder" >/dev/null; then
    die "a process of the demo is still running"
fi
say "stopped; no robot, script or nats-server left behind"
