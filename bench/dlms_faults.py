#!/usr/bin/env python3
"""Readings delivered by a faulty meter (issue #12): our poller vs Gurux's own client.

For each fault mode of the Gurux meter (none, --corrupt-every 3, --no-reply-every 4,
--drop-every 5) two independent meter processes are started (fault counters are per process and
port), one polled by our meter actor (examples/poll_meter.rs, release build) and one by a
GXDLMSReader-style loop on the Gurux library (bench/gurux_client_loop.py), all at the same time,
interval 2 s / timeout 1 s, for 120 s. Prints a table and a JSON line; the load average is
printed before and after.

  cargo build --release --example poll_meter && bench/dlms_faults.py [--seconds 120]
"""
import argparse, json, os, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
MODES = [("none", []), ("corrupt-every 3", ["--corrupt-every", "3"]),
         ("no-reply-every 4", ["--no-reply-every", "4"]), ("drop-every 5", ["--drop-every", "5"])]


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def meter_sim():
    for p in (os.environ.get("METER_SIM"), os.path.join(ROOT, "..", "shared", "meter-sim", "gurux_meter.py"),
              "/work/shared/meter-sim/gurux_meter.py"):
        if p and os.path.exists(p):
            return p
    sys.exit("gurux_meter.py not found; set METER_SIM")


def start_meter(args):
    port = free_port()
    p = subprocess.Popen([sys.executable, meter_sim(), "--host", "127.0.0.1", "--port", str(port)] + args,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if not line.startswith("gurux_meter"):
        sys.exit("meter did not start: %r" % line)
    return p, port


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--seconds", type=int, default=120)
    a.add_argument("--interval", type=float, default=2.0)
    a.add_argument("--timeout", type=float, default=1.0)
    a.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                 "release", "examples", "poll_meter"))
    args = a.parse_args()
    print("load average before:", open("/proc/loadavg").read().strip())
    meters, runs = [], []
    for name, fault in MODES:
        for client in ("dlms-bridge", "gurux"):
            m, port = start_meter(fault)
            meters.append(m)
            if client == "dlms-bridge":
                cmd = [args.bin, "127.0.0.1", str(port), str(int(args.interval * 1000)),
                       str(int(args.timeout * 1000)), str(args.seconds)]
            else:
                cmd = [sys.executable, os.path.join(HERE, "gurux_client_loop.py"), "--port", str(port),
                       "--interval", str(args.interval), "--timeout", str(args.timeout),
                       "--seconds", str(args.seconds)]
            runs.append((name, client, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                         stderr=subprocess.DEVNULL, text=True)))
    results = {}
    for name, client, p in runs:
        out, _ = p.communicate(timeout=args.seconds + 120)
        results.setdefault(name, {})[client] = json.loads(out.strip().splitlines()[-1])
    for m in meters:
        m.kill()
    print("load average after: ", open("/proc/loadavg").read().strip())
    healthy = results["none"]["dlms-bridge"]["good"]
    print("%-18s %12s %8s %10s %14s" % ("fault", "dlms-bridge", "gurux", "% healthy", "our retries"))
    for name, _ in MODES:
        ours, theirs = results[name]["dlms-bridge"], results[name]["gurux"]
        print("%-18s %12d %8d %9.0f%% %14s" % (name, ours["good"], theirs["good"],
                                              100.0 * ours["good"] / max(healthy, 1),
                                              ours.get("link_retries_total")))
    print(json.dumps({"seconds": args.seconds, "interval": args.interval, "timeout": args.timeout,
                      "results": results}))


if __name__ == "__main__":
    main()
