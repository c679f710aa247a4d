#!/usr/bin/env python3
"""1,000 meters with a daily load profile (issue #12 benchmark): N built-in simulated meters in
one process (`dlms-bridge simulate --profile-rows 96`: Profile generic 1.0.99.1.0.255, one entry
per 15 min, one day), a bridge started with N `[[meters]]` each reading that profile (first
read = the last 24 h by range access), a plain Mosquitto standing in for ThingsBoard (the
uplink's token is just a username there) and a subscriber that records every profile entry
ThingsBoard would receive. The bridge spreads each meter's first poll over the poll interval
(--interval, 10 s), so that much of the wall time is the spread, not work. Measures, from the bridge's start until all N x ROWS entries have
arrived: wall time (and when every meter's read position was stored, i.e. all entries read and
queued), the bridge's CPU seconds and its peak RSS; then checks that every meter
delivered exactly ROWS distinct entries, one capture period apart, none twice.
Prints one JSON line.

  bench/profiles.py --meters 1000 --rows 96
Needs: target/release/dlms-bridge, mosquitto, paho-mqtt (the bench harness's lgvenv has it).
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, threading, time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = "1.0.99.1.0.255"
ENERGY = "1.0.1.8.0.255"


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    sys.exit("port %d did not open" % port)


def proc_stat(pid):
    """CPU seconds (user + system) and current / peak RSS in MB of a process."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    cpu = (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    status = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v
    mb = lambda k: int(status[k].split()[0]) / 1024.0
    return cpu, mb("VmRSS"), mb("VmHWM")


def loadavg():
    with open("/proc/loadavg") as f:
        return " / ".join(f.read().split()[:3])


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--meters", type=int, default=1000)
    a.add_argument("--rows", type=int, default=96, help="profile entries per meter (96 = one day)")
    a.add_argument("--period", type=int, default=900, help="capture period, s")
    a.add_argument("--interval", type=float, default=10,
                   help="meter poll interval, s: the bridge spreads first polls (and so the first profile reads) over it")
    a.add_argument("--transport", default="hdlc")
    a.add_argument("--sim-port", type=int, default=31000, help="first simulated meter port")
    a.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    a.add_argument("--bin", default=os.path.join(ROOT, "target/release/dlms-bridge"))
    args = a.parse_args()
    if args.rows * args.period > 86400:
        sys.exit("the bridge's first read goes back 24 h: rows x period must fit in a day")
    load_before = loadavg()
    tmp = tempfile.mkdtemp(prefix="profiles-bench-")
    tb_port, local_port = free_port(), free_port()
    conf_m = os.path.join(tmp, "mosquitto.conf")
    with open(conf_m, "w") as f:
        f.write("listener %d 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\n" % tb_port)
    procs, ok = [], False
    mosq = subprocess.Popen(["mosquitto", "-c", conf_m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(mosq)
    try:
        wait_port(tb_port)
        # Every profile entry as ThingsBoard would receive it: (device, ts) pairs, and all of them
        # (to catch an entry sent twice).
        seen, total, lock = {}, [0], threading.Lock()

        def on_msg(c, u, m):
            try:
                body = json.loads(m.payload)
            except ValueError:
                return
            with lock:
                for dev, entries in body.items():
                    for e in entries if isinstance(entries, list) else [entries]:
                        if isinstance(e, dict) and "active_energy" in e.get("values", {}):
                            seen.setdefault(dev, set()).add(e["ts"])
                            total[0] += 1

        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="profiles-sink")
        sub.on_message = on_msg
        sub.connect("127.0.0.1", tb_port)
        sub.subscribe("v1/gateway/telemetry", 1)
        sub.loop_start()

        sim = subprocess.Popen([args.bin, "simulate", "--port", str(args.sim_port), "--count", str(args.meters),
                                "--transport", args.transport, "--profile-rows", str(args.rows),
                                "--profile-period", str(args.period)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(sim)
        wait_port(args.sim_port + args.meters - 1)
        cfg = os.path.join(tmp, "bridge.toml")
        with open(cfg, "w") as f:
            f.write('[log]\nlevel = "warn"\n[broker]\nlisten = "127.0.0.1:%d"\n' % local_port)
            f.write('[thingsboard]\nport = %d\naccess_token = "bench"\n' % tb_port)
            f.write('[store]\npath = "%s/queue.db"\n' % tmp)
            for i in range(args.meters):
                # One register (voltage) polled every INTERVAL besides the profile, which is read at
                # the first poll (the last 24 h) and then every capture period.
                f.write('[[meters]]\nname = "m-%04d"\nhost = "127.0.0.1"\nport = %d\ntransport = "%s"\n'
                        'interval = "%dms"\nregisters = [{ key = "voltage", obis = "1.0.32.7.0.255" }]\n'
                        '[[meters.profiles]]\nobis = "%s"\ninterval = "%ds"\ncolumns = ["%s"]\n'
                        % (i, args.sim_port + i, args.transport, int(args.interval * 1000), PROFILE,
                           args.period, ENERGY))
        expected = args.meters * args.rows
        t0 = time.time()
        bridge = subprocess.Popen([args.bin, "--config", cfg, "run"],
                                  stdout=open(os.path.join(tmp, "bridge.log"), "w"), stderr=subprocess.STDOUT)
        procs.insert(0, bridge)
        t_first = t_read = None
        done = False
        while time.time() - t0 < args.timeout:
            time.sleep(0.05)
            with lock:
                n = sum(len(s) for s in seen.values())
            if n and t_first is None:
                t_first = time.time() - t0
            # A meter's read position is stored once its entries are handed on to the queue.
            if t_read is None and sum(1 for f in os.listdir(tmp) if f.endswith(".pos")) >= args.meters:
                t_read = time.time() - t0
            if n >= expected:
                done = True
                break
            if bridge.poll() is not None:
                sys.exit("bridge exited with %s; log: %s/bridge.log" % (bridge.returncode, tmp))
        elapsed = time.time() - t0
        cpu, rss, peak = proc_stat(bridge.pid)
        time.sleep(3)  # anything sent twice would arrive now
        with lock:
            per = {d: sorted(s) for d, s in seen.items()}
            entries, sent = sum(len(s) for s in per.values()), total[0]
        step = args.period * 1000
        complete = sum(1 for i in range(args.meters)
                       if len(per.get("m-%04d" % i, [])) == args.rows
                       and all(b - a == step for a, b in zip(per["m-%04d" % i], per["m-%04d" % i][1:])))
        out = {
            "meters": args.meters, "rows_per_meter": args.rows, "interval_s": args.interval,
            "expected_entries": expected,
            "entries_received": entries, "entries_sent_twice": sent - entries,
            "meters_complete": complete, "all_arrived": done,
            "seconds_to_all_read": round(t_read or 0, 2),
            "seconds_to_first_entry": round(t_first or 0, 2), "seconds_to_all_entries": round(elapsed, 2),
            "bridge_cpu_s": round(cpu, 2), "bridge_rss_mb_at_end": round(rss, 1), "bridge_peak_rss_mb": round(peak, 1),
            "load_before": load_before, "load_after": loadavg(),
        }
        print(json.dumps(out))
        sub.loop_stop()
        if not done or complete != args.meters or sent != entries:
            sys.exit("incomplete or duplicated; bridge log and queue kept in %s" % tmp)
        ok = True
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
