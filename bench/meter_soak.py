#!/usr/bin/env python3
"""1,000-meter polling soak (issue #3 benchmark): N built-in simulated meters in one process
(`dlms-bridge simulate`), the bridge polling all of them every INTERVAL in another, a plain
Mosquitto standing in for ThingsBoard (the uplink's token is just a username there), and a
subscriber counting telemetry entries per meter. Prints one JSON line: polls expected vs received
per meter (missed = expected - received), the bridge's CPU % of one core and peak/avg RSS.

  bench/meter_soak.py --meters 1000 --interval 1 --seconds 300
Needs: target/release/dlms-bridge, mosquitto, paho-mqtt (the bench harness's lgvenv has it).
"""
import argparse, json, os, socket, subprocess, sys, tempfile, threading, time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit("port %d did not open" % port)


def proc_stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    ticks = int(rest[11]) + int(rest[12])
    with open("/proc/%d/status" % pid) as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return ticks / os.sysconf("SC_CLK_TCK"), rss / 1024.0


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--meters", type=int, default=1000)
    a.add_argument("--interval", type=float, default=1.0)
    a.add_argument("--seconds", type=float, default=300)
    a.add_argument("--transport", default="hdlc")
    a.add_argument("--bin", default=os.path.join(ROOT, "target/release/dlms-bridge"))
    args = a.parse_args()
    tmp = tempfile.mkdtemp(prefix="meter-soak-")
    tb_port, local_port = free_port(), free_port()
    conf_m = os.path.join(tmp, "mosquitto.conf")
    open(conf_m, "w").write("listener %d 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\n" % tb_port)
    mosq = subprocess.Popen(["mosquitto", "-c", conf_m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(tb_port)
    # Count telemetry entries per device as ThingsBoard would receive them.
    counts, lock = {}, threading.Lock()
    def on_msg(c, u, m):
        try:
            body = json.loads(m.payload)
        except ValueError:
            return
        with lock:
            for dev, entries in body.items():
                counts[dev] = counts.get(dev, 0) + (len(entries) if isinstance(entries, list) else 1)
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-sink")
    sub.on_message = on_msg
    sub.connect("127.0.0.1", tb_port); sub.subscribe("v1/gateway/telemetry", 1); sub.loop_start()

    sim_base = 30000
    sim = subprocess.Popen([args.bin, "simulate", "--port", str(sim_base), "--count", str(args.meters),
                            "--transport", args.transport], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(sim_base + args.meters - 1)
    cfg = os.path.join(tmp, "bridge.toml")
    with open(cfg, "w") as f:
        f.write('[log]\nlevel = "warn"\n[broker]\nlisten = "127.0.0.1:%d"\n' % local_port)
        f.write('[thingsboard]\nport = %d\naccess_token = "soak"\n' % tb_port)
        f.write('[store]\npath = "%s/queue.db"\n' % tmp)
        for i in range(args.meters):
            f.write('[[meters]]\nname = "m-%04d"\nhost = "127.0.0.1"\nport = %d\ntransport = "%s"\ninterval = "%dms"\n'
                    % (i, sim_base + i, args.transport, int(args.interval * 1000)))
    bridge = subprocess.Popen([args.bin, "--config", cfg, "run"], stdout=open(os.path.join(tmp, "bridge.log"), "w"),
                              stderr=subprocess.STDOUT)
    wait_port(local_port)
    # Warm-up: every meter associated and reporting, then measure a clean window.
    end = time.time() + 60
    while time.time() < end:
        with lock:
            if len(counts) >= args.meters:
                break
        time.sleep(0.2)
    time.sleep(2 * args.interval)
    with lock:
        start_counts = dict(counts)
    cpu0, _ = proc_stat(bridge.pid)
    t0 = time.time()
    rss = []
    while time.time() - t0 < args.seconds:
        time.sleep(1)
        rss.append(proc_stat(bridge.pid)[1])
    cpu1, _ = proc_stat(bridge.pid)
    elapsed = time.time() - t0
    time.sleep(2)  # let the last polls of the window reach the sink
    with lock:
        got = {d: counts.get(d, 0) - start_counts.get(d, 0) for d in ["m-%04d" % i for i in range(args.meters)]}
    expected = int(elapsed / args.interval)
    per = sorted(got.values())
    out = {
        "meters": args.meters, "interval_s": args.interval, "seconds": round(elapsed, 1),
        "expected_polls_per_meter": expected,
        "received_min": per[0], "received_median": per[len(per) // 2], "received_max": per[-1],
        "meters_missing_polls": sum(1 for v in per if v < expected - 1),
        "bridge_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / elapsed, 1),
        "bridge_rss_mb_avg": round(sum(rss) / len(rss), 1), "bridge_rss_mb_max": round(max(rss), 1),
    }
    print(json.dumps(out))
    for p in (bridge, sim, mosq):
        p.terminate()
    for p in (bridge, sim, mosq):
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
    sub.loop_stop()


if __name__ == "__main__":
    main()
