#!/usr/bin/env bash
# System-under-test script for ../shared/bench (contract in its README): runs dlms-bridge as the
# local broker + ThingsBoard gateway on the harness's ports.
#   start | stop | restart | pids
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${BRIDGE_BIN:-$ROOT/target/release/dlms-bridge}"
RUN="${BENCH_RUN_DIR:?BENCH_RUN_DIR not set}"
PIDFILE="$RUN/dlms-bridge.pid"
CONF="$RUN/dlms-bridge.toml"

build() {
  [ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --quiet)
}

write_config() {
  cat >"$CONF" <<TOML
[log]
level = "${BENCH_LOG_LEVEL:-info}"
[http]
# An ephemeral port: the default 8484 may be taken by another bridge on the machine.
listen = "${BENCH_HTTP_LISTEN:-127.0.0.1:0}"
[broker]
listen = "127.0.0.1:${BENCH_LOCAL_PORT:?}"
[thingsboard]
host = "${BENCH_TB_HOST:-127.0.0.1}"
port = ${BENCH_TB_PORT:?}
access_token = "${BENCH_TB_TOKEN:?}"
[store]
# BENCH_STORAGE is ignored: the queue is always the durable SQLite store.
path = "$RUN/queue.db"
[[mappings]]
topic_filter = "sensors/+/telemetry"
device_name_json = "\${deviceName}"
timeseries = ["*"]
TOML
}

launch() {
  "$BIN" --config "$CONF" run >>"$RUN/dlms-bridge.log" 2>&1 &
  echo $! >"$PIDFILE"
}

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$BENCH_LOCAL_PORT") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "dlms-bridge did not open port $BENCH_LOCAL_PORT; log: $RUN/dlms-bridge.log" >&2
  return 1
}

stop_bridge() {
  [ -f "$PIDFILE" ] || return 0
  local pid; pid="$(cat "$PIDFILE")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

case "${1:-}" in
  start) build; mkdir -p "$RUN"; write_config; launch; wait_port ;;
  stop) stop_bridge ;;
  restart) stop_bridge; launch; wait_port ;;
  pids) [ -f "$PIDFILE" ] && cat "$PIDFILE" ;;
  *) echo "usage: $0 start|stop|restart|pids" >&2; exit 2 ;;
esac
