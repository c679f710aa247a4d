#!/usr/bin/env bash
# Memory of the embedded broker (release binary, broker only: no meters, ThingsBoard
# unreachable): RSS idle, with 1,000 subscribers that never read, the peak of a 200,000 x 1 KiB
# QoS 1 flood to all of them, and RSS every second for a minute after every client has gone;
# then the same for 10,000 idle connections. Driver: bench/broker_memory.py (raw MQTT 3.1.1
# sockets, RSS from /proc/<pid>/status). Prints `uptime` before and after.
#
#   bench/broker_memory.sh                        # builds the release bridge of this checkout
#   BRIDGE_BIN=/path/to/dlms-bridge bench/broker_memory.sh   # another build
#   bench/broker_memory.sh --scenario flood --messages 50000 --qos 0 --settle 30
#   (any further arguments go to broker_memory.py; see its --help)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -z "${BRIDGE_BIN:-}" ]; then
    cargo build --release --quiet
    BRIDGE_BIN="$TARGET/release/dlms-bridge"
fi
# 10,000 connections: this process's sockets plus the bridge's (same limit, inherited).
hard=$(ulimit -Hn); [ "$hard" = unlimited ] && hard=65536
ulimit -n "$hard" 2>/dev/null || true
[ "$(ulimit -n)" -ge 12000 ] || echo "warning: open-file limit $(ulimit -n) is below what 10,000 connections need" >&2

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
closed=$(free_port)  # nothing listens here: the uplink retries quietly in the background
cat > "$dir/bridge.toml" <<TOML
[log]
level = "warn"
[broker]
listen = "127.0.0.1:$port"
[http]
listen = "127.0.0.1:0"
[thingsboard]
host = "127.0.0.1"
port = $closed
access_token = "bench"
[store]
path = "$dir/queue.db"
TOML
echo "binary: $BRIDGE_BIN" >&2
echo "uptime: $(uptime)" >&2
python3 "$ROOT/bench/broker_memory.py" --binary "$BRIDGE_BIN" --config "$dir/bridge.toml" --port "$port" "$@"
echo "uptime: $(uptime)" >&2
