#!/usr/bin/env bash
# Flash-wear benchmark: dlms-bridge at a steady rate through ../shared/bench (the Rust publisher,
# QoS 1), measuring in the middle of the load, on the bridge process only:
#   fsyncs/s          perf tracepoint counts of fsync + fdatasync (no overhead), and
#                     `strace -f -c -e trace=fsync,fdatasync` in a second window (cross-check;
#                     strace slows the traced process, so it runs after the CPU window)
#   write amplification  /proc/PID/io write_bytes (bytes sent to the block layer) per payload
#                     byte published (the loadgen's JSON payload, measured, times the rate the
#                     publisher achieved)
#   CPU               utime+stime from /proc/PID/stat over the first window, % of one core
#   p99               the harness's end-to-end latency over the whole run
# Usage: bench/flash.sh [RATE=1000] [DEVICES=100] [SECONDS=45]
# Env: BRIDGE_BIN (default target/release/dlms-bridge), LOADGEN (default
#      target/release/examples/loadgen), DLMS_BRIDGE_STORE__COMMIT_INTERVAL (e.g. 0s, 25ms),
#      WINDOW (s, default 10), FLASH_PORT_BASE (default 23883: TB, +1 local broker),
#      BENCH_DIR (default /work/shared/bench), NO_STRACE=1 to skip the strace window,
#      BREAKDOWN=1 for a third window: write syscalls (bytes, calls, fsyncs) per file,
#      PROFILE_OUT=FILE for a last window: `perf record` call stacks into FILE (flame graph:
#      perf script -i FILE | inferno-collapse-perf | inferno-flamegraph > flame.svg).
# Prints one summary line (and the breakdown); the harness JSON is kept in the run directory it names.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RATE="${1:-1000}"
DEVICES="${2:-100}"
SECONDS_LOAD="${3:-45}"
WINDOW="${WINDOW:-10}"
BENCH_DIR="${BENCH_DIR:-/work/shared/bench}"
export BRIDGE_BIN="${BRIDGE_BIN:-$ROOT/target/release/dlms-bridge}"
LOADGEN="${LOADGEN:-$ROOT/target/release/examples/loadgen}"
PORT_BASE="${FLASH_PORT_BASE:-23883}"
RUN_ROOT="$(mktemp -d /tmp/dlms-flash.XXXXXX)"
OUT="$RUN_ROOT/result.json"

[ -x "$BRIDGE_BIN" ] || { echo "no bridge binary at $BRIDGE_BIN (cargo build --release)" >&2; exit 2; }
[ -x "$LOADGEN" ] || { echo "no loadgen at $LOADGEN (cargo build --release --example loadgen)" >&2; exit 2; }

"$BENCH_DIR/run_bench.sh" --sut "$ROOT/bench/sut.sh" --loadgen "$LOADGEN" \
  -D "$DEVICES" -R "$RATE" -T "$SECONDS_LOAD" --qos 1 \
  --tb-port "$PORT_BASE" --local-port "$((PORT_BASE + 1))" \
  --run-root "$RUN_ROOT" --out "$OUT" --label "flash" >"$RUN_ROOT/harness.log" 2>&1 &
HARNESS=$!

# The bridge's pid (from the SUT's pid file), then the publisher starting.
PID=""
for _ in $(seq 1 600); do
  f="$(find "$RUN_ROOT" -name dlms-bridge.pid 2>/dev/null | head -n1)"
  if [ -n "$f" ] && [ -s "$f" ]; then PID="$(cat "$f")"; break; fi
  sleep 0.1
done
[ -n "$PID" ] || { echo "bridge did not start; see $RUN_ROOT/harness.log" >&2; wait "$HARNESS" || true; exit 1; }
for _ in $(seq 1 600); do
  pgrep -f -- "--port $((PORT_BASE + 1)) " >/dev/null 2>&1 && break
  sleep 0.1
done
sleep 5 # past the start of the load: steady state

io_write() { awk '/^write_bytes/ {print $2}' "/proc/$PID/io"; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$PID/stat"; }
HZ="$(getconf CLK_TCK)"

w0="$(io_write)"; c0="$(cpu_ticks)"; t0="$(date +%s.%N)"
perf stat -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -p "$PID" \
  -o "$RUN_ROOT/perf.csv" -- sleep "$WINDOW" 2>/dev/null
w1="$(io_write)"; c1="$(cpu_ticks)"; t1="$(date +%s.%N)"
load="$(cut -d' ' -f1-3 /proc/loadavg)"
fsyncs="$(awk -F, '/sys_enter_f/ {s += $1} END {print s + 0}' "$RUN_ROOT/perf.csv")"

strace_fsyncs="-"
if [ -z "${NO_STRACE:-}" ]; then
  timeout -s INT "$WINDOW" strace -f -c -e trace=fsync,fdatasync -p "$PID" -o "$RUN_ROOT/strace.txt" \
    >/dev/null 2>&1 || true
  strace_fsyncs="$(awk '$NF == "fsync" || $NF == "fdatasync" {s += $4} END {print s + 0}' "$RUN_ROOT/strace.txt")"
fi

# Where the bytes go: every write syscall for a window, summed per file (strace -y names the
# file of each fd). Syscall bytes, not block-layer bytes: a small write into a 4 KiB page that
# was already written back still costs the block layer a whole page.
breakdown="-"
if [ -n "${BREAKDOWN:-}" ]; then
  timeout -s INT "$WINDOW" strace -f -y -e trace=pwrite64,write,fsync,fdatasync -p "$PID" \
    -o "$RUN_ROOT/writes.txt" >/dev/null 2>&1 || true
  breakdown="$(python3 - "$RUN_ROOT/writes.txt" "$WINDOW" <<'PY'
import re, sys
calls, nbytes, syncs = {}, {}, {}
for line in open(sys.argv[1]):
    m = re.search(r'(pwrite64|write|fsync|fdatasync)\(\d+<([^>]*)>.*\)\s+=\s+(\d+)', line)
    if not m:
        continue
    call, path, ret = m.group(1), m.group(2), int(m.group(3))
    name = path.rsplit('/', 1)[-1]
    key = name if name.startswith('queue.db') else ('socket' if 'socket:' in path else 'other')
    if call in ('fsync', 'fdatasync'):
        syncs[key] = syncs.get(key, 0) + 1
    else:
        calls[key] = calls.get(key, 0) + 1
        nbytes[key] = nbytes.get(key, 0) + ret
w = float(sys.argv[2])
print(' '.join(f'{k}:{nbytes[k] / w:.0f}B/s,{calls[k] / w:.0f}w/s,{syncs.get(k, 0) / w:.0f}sync/s'
               for k in sorted(nbytes)))
PY
)"
fi

# CPU profile for a flame graph: sampled call stacks (DWARF unwinding: release builds have no
# frame pointers), user space of the bridge only. Needs a binary with debug info, e.g.
# CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_PROFILE_RELEASE_STRIP=false.
if [ -n "${PROFILE_OUT:-}" ]; then
  perf record -F 499 -e cpu-clock --call-graph dwarf,16384 -p "$PID" -o "$PROFILE_OUT" \
    -- sleep "$WINDOW" >/dev/null 2>&1 || echo "perf record failed (perf_event_paranoid?)" >&2
fi

wait "$HARNESS" || true

# Payload bytes per message: the loadgen's JSON for a device name of this length.
PAYLOAD="$(printf '{"deviceName":"meter-0042","ts":1764480000000,"voltage_l1":230.2,"current_l1":4.5,"frequency":60.0,"active_power":957.1,"active_energy":124456.0,"seq":2000,"sent_us":1764480000000123}' | wc -c)"
python3 - "$OUT" "$RATE" "$PAYLOAD" "$w0" "$w1" "$c0" "$c1" "$t0" "$t1" "$HZ" "$fsyncs" \
  "$strace_fsyncs" "$WINDOW" "$load" "${DLMS_BRIDGE_STORE__COMMIT_INTERVAL:-default}" "$breakdown" <<'PY'
import json, sys
(out, rate, payload, w0, w1, c0, c1, t0, t1, hz, fsyncs, strace_f, window, load, interval,
 breakdown) = sys.argv[1:]
dt = float(t1) - float(t0)
r = {}
try:
    r = json.load(open(out))
except Exception as e:
    print(f"no harness result ({e})", file=sys.stderr)
lat = r.get("lat_ms") or {}
res = r.get("resources_load") or {}
wps = (int(w1) - int(w0)) / dt
# Per payload byte actually published: at high rates the publisher may fall behind the rate
# asked for (the harness's achieved_rate over the whole run).
achieved = min(float(rate), float(r.get("achieved_rate") or rate))
pay = achieved * int(payload)
cpu = (int(c1) - int(c0)) / int(hz) / dt * 100
st = "-" if strace_f == "-" else f"{int(strace_f) / float(window):.1f}"
print(f"commit_interval={interval} rate={rate} achieved={achieved:.0f} fsyncs/s={int(fsyncs) / dt:.1f} "
      f"strace_fsyncs/s={st} write_bytes/s={wps:.0f} payload_bytes/s={pay:.0f} "
      f"written/payload={wps / pay:.2f} cpu%={cpu:.1f} harness_cpu%={res.get('cpu_mean_pct')} "
      f"p50_ms={lat.get('p50')} p99_ms={lat.get('p99')} lost={r.get('lost')} "
      f"load=\"{load}\" result={out}")
if breakdown != "-":
    print(f"write syscalls per file (strace window): {breakdown}")
PY
