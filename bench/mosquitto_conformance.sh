#!/usr/bin/env bash
# Run tests/broker_conformance.rs against a real Mosquitto (dev check of the tests' expectations;
# not part of CI). Starts two Mosquitto instances on ephemeral loopback ports — one anonymous,
# one with a password file (user/secret) — runs the tests against them, stops them.
#
#   bench/mosquitto_conformance.sh [cargo test filter...]
#   TEST=broker_hostile bench/mosquitto_conformance.sh      # the hostile-client tests
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "mosquitto is not installed (apt-get install mosquitto)" >&2; exit 2; }

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # name port extra-config
    # `user`: stay the invoking user (as root Mosquitto would switch to `mosquitto`, which
    # cannot read this private temp dir).
    printf 'listener %s 127.0.0.1\nuser %s\n%s\n' "$2" "$(id -un)" "$3" > "$dir/$1.conf"
    mosquitto -c "$dir/$1.conf" > "$dir/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "mosquitto $1 did not start:" >&2; cat "$dir/$1.log" >&2; exit 1
}

anon=$(free_port)
auth=$(free_port)
touch "$dir/passwd"; chmod 600 "$dir/passwd"
mosquitto_passwd -b "$dir/passwd" user secret
start anon "$anon" "allow_anonymous true"
start auth "$auth" "allow_anonymous false
password_file $dir/passwd"
(mosquitto -h || true) | head -1

BROKER_CONFORMANCE_ADDR=127.0.0.1:$anon BROKER_CONFORMANCE_AUTH_ADDR=127.0.0.1:$auth \
    cargo test --test "${TEST:-broker_conformance}" -- "$@"
