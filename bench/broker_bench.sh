#!/usr/bin/env bash
# The local broker alone against Mosquitto on this machine, same load client
# (examples/broker_bench.rs): QoS 1 publisher → subscriber throughput and latency (1 and 4
# publishers, closed loop), latency at a paced 1,000 msg/s, and connection churn
# (connect/CONNACK/DISCONNECT per second). Prints one table with the ratio ours / Mosquitto and
# the load average before and after each run.
#
#   bench/broker_bench.sh                      # builds the release bridge of this checkout
#   BRIDGE_BIN=/path/to/dlms-bridge bench/broker_bench.sh   # another build (e.g. a branch)
#   MESSAGES=200000 CHURN_SECONDS=10 bench/broker_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
MESSAGES="${MESSAGES:-200000}"
PACED_SECONDS="${PACED_SECONDS:-10}"
CHURN_SECONDS="${CHURN_SECONDS:-10}"
command -v mosquitto >/dev/null || { echo "mosquitto is not installed (apt-get install mosquitto)" >&2; exit 2; }

cargo build --release --quiet --example broker_bench
LOAD="$TARGET/release/examples/broker_bench"
if [ -z "${BRIDGE_BIN:-}" ]; then
    cargo build --release --quiet
    BRIDGE_BIN="$TARGET/release/dlms-bridge"
fi

dir=$(mktemp -d)
pid=""
stop() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi
}
trap 'stop; rm -rf "$dir"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listening on $1" >&2; exit 1
}

# name port → JSON lines in $dir/name.jsonl
measure() {
    local name=$1 port=$2 out="$dir/$1.jsonl"
    : > "$out"
    run() {
        echo "  $name $*: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        "$LOAD" --port "$port" "$@" >> "$out"
        sleep 1
    }
    run throughput --messages "$MESSAGES" --publishers 1
    run throughput --messages "$MESSAGES" --publishers 4
    run paced --rate 1000 --seconds "$PACED_SECONDS"
    run churn --concurrency 16 --seconds "$CHURN_SECONDS"
    echo "  $name RSS after the runs: $(ps -o rss= -p "$pid" | tr -d ' ') kB" >&2
    echo "{\"mode\":\"rss\",\"rss_kb\":$(ps -o rss= -p "$pid" | tr -d ' ')}" >> "$out"
}

echo "uptime: $(uptime)" >&2

ours=$(free_port)
closed=$(free_port)  # nothing listens here: the uplink retries quietly in the background
cat > "$dir/bridge.toml" <<TOML
[log]
level = "warn"
[broker]
listen = "127.0.0.1:$ours"
[thingsboard]
host = "127.0.0.1"
port = $closed
access_token = "bench"
[store]
path = "$dir/queue.db"
TOML
"$BRIDGE_BIN" --config "$dir/bridge.toml" run > "$dir/bridge.log" 2>&1 &
pid=$!
wait_port "$ours"
echo "ours: $BRIDGE_BIN" >&2
measure ours "$ours"
stop

theirs=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nuser %s\n' "$theirs" "$(id -un)" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
pid=$!
wait_port "$theirs"
echo "mosquitto: $( (mosquitto -h || true) | head -1)" >&2
measure mosquitto "$theirs"
stop

echo "uptime: $(uptime)" >&2
python3 - "$dir/ours.jsonl" "$dir/mosquitto.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1])]
theirs = [json.loads(l) for l in open(sys.argv[2])]
rows = []
for o, m in zip(ours, theirs):
    mode = o["mode"]
    if mode == "throughput":
        label = f"QoS 1 throughput, {o['publishers']} publisher(s)"
        rows.append((label + " msg/s", o["msg_per_s"], m["msg_per_s"]))
        rows.append((label + " p99 ms", o["p99_ms"], m["p99_ms"]))
        rows.append((label + " lost", o["lost"], m["lost"]))
    elif mode == "paced":
        rows.append((f"paced {o['rate']} msg/s p50 ms", o["p50_ms"], m["p50_ms"]))
        rows.append((f"paced {o['rate']} msg/s p99 ms", o["p99_ms"], m["p99_ms"]))
        rows.append((f"paced {o['rate']} msg/s lost", o["lost"], m["lost"]))
    elif mode == "churn":
        rows.append(("connection churn conn/s", o["conn_per_s"], m["conn_per_s"]))
        rows.append(("connection churn failed", o["failed"], m["failed"]))
    elif mode == "rss":
        rows.append(("RSS after the runs, MB", o["rss_kb"] / 1024, m["rss_kb"] / 1024))
print(f"| {'metric':44} | {'ours':>10} | {'mosquitto':>10} | {'ours/mosq':>9} |")
print(f"|{'-'*46}|{'-'*12}|{'-'*12}|{'-'*11}|")
for name, a, b in rows:
    ratio = f"{a / b:.2f}" if b else "-"
    print(f"| {name:44} | {a:10.2f} | {b:10.2f} | {ratio:>9} |")
PY
