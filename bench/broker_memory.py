#!/usr/bin/env python3
"""Memory of the embedded broker under a flood and under many idle connections.

Starts the bridge binary (broker only: no meters, ThingsBoard unreachable), drives it with raw
MQTT 3.1.1 sockets and reads RSS from /proc/<pid>/status (VmRSS; VmHWM for the peak). Used by
bench/broker_memory.sh, which builds the release binary and writes the config; run that.

Scenarios (each in a fresh bridge process, so the peak belongs to the scenario):

  flood        CLIENTS subscribers of `flood/#` (QoS 1) that never read, one publisher sending
               MESSAGES x SIZE bytes (QoS 1: PUBACKs awaited, at most WINDOW unacknowledged),
               then every client leaves; RSS followed for SETTLE seconds.
  connections  CONNECTIONS idle clients connected at once, then all leave; RSS followed.

Prints one line per measurement and a final JSON line per scenario.
"""

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time


def rss_kb(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def mb(kb):
    return round(kb / 1024.0, 1)


def remaining_length(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + remaining_length(len(body)) + body


def mqtt_str(s):
    return struct.pack(">H", len(s)) + s


def connect_pkt(client_id, keep_alive=60):
    return packet(0x10, mqtt_str(b"MQTT") + b"\x04\x02" + struct.pack(">H", keep_alive)
                  + mqtt_str(client_id.encode()))


def subscribe_pkt(pkid, topic_filter, qos):
    return packet(0x82, struct.pack(">H", pkid) + mqtt_str(topic_filter) + bytes([qos]))


def publish_pkt(topic, payload, qos, pkid):
    body = mqtt_str(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


class Bridge:
    """The bridge under test, started with `--config`, stopped with SIGTERM."""

    def __init__(self, binary, config, port):
        self.proc = subprocess.Popen([binary, "--config", config, "run"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = port
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bridge did not start listening")
                time.sleep(0.1)

    def rss(self):
        return rss_kb(self.proc.pid)

    def peak(self):
        return rss_kb(self.proc.pid, "VmHWM")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Source addresses for the client sockets, round robin: spreads the ephemeral ports (and the
# TIME_WAIT entries a previous run left) over several loopback addresses.
SOURCES = [f"127.0.0.{i}" for i in range(1, 9)]


def open_client(port, client_id, i):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((SOURCES[i % len(SOURCES)], 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(connect_pkt(client_id))
    return s


def connect_many(port, n, prefix, subscribe=None):
    """n clients, CONNACK checked; optionally each subscribes (SUBACK checked)."""
    socks = []
    for i in range(n):
        socks.append(open_client(port, f"{prefix}-{i}", i))
        if len(socks) % 500 == 0:  # read the CONNACKs as we go: bounded backlog
            for s in socks[-500:]:
                check_connack(s)
    for s in socks[len(socks) - len(socks) % 500:]:
        check_connack(s)
    if subscribe:
        for s in socks:
            s.sendall(subscribe_pkt(1, subscribe, 1))
        for s in socks:
            suback = recv_exact(s, 5)
            if suback[0] != 0x90 or suback[4] > 2:
                raise RuntimeError(f"subscription refused: {suback.hex()}")
    return socks


def check_connack(s):
    ack = recv_exact(s, 4)
    if ack != b"\x20\x02\x00\x00":
        raise RuntimeError(f"connection refused: {ack.hex()}")


def flood(port, messages, size, qos, window):
    """Publish `messages` x `size` bytes to flood/t; returns the publish rate (msg/s)."""
    pub = open_client(port, "flood-publisher", 0)
    check_connack(pub)
    payload = b"x" * size
    acked = 0
    cond = threading.Condition()
    failed = []

    def read_acks():
        nonlocal acked
        buf = b""
        try:
            while acked < messages:
                chunk = pub.recv(65536)
                if not chunk:
                    raise ConnectionError("broker closed the publisher")
                buf += chunk
                n = len(buf) // 4  # PUBACK: 40 02 id id
                if n:
                    buf = buf[n * 4:]
                    with cond:
                        acked += n
                        cond.notify()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            failed.append(e)
            with cond:
                cond.notify()

    start = time.monotonic()
    reader = None
    if qos:
        reader = threading.Thread(target=read_acks, daemon=True)
        reader.start()
    sent = 0
    batch = 100
    while sent < messages:
        k = min(batch, messages - sent)
        if qos:
            with cond:
                if not cond.wait_for(lambda: failed or sent - acked <= window, timeout=120):
                    raise RuntimeError("no PUBACK for 120 s")
            if failed:
                raise failed[0]
        pub.sendall(b"".join(publish_pkt(b"flood/t", payload, qos, (sent + j) % 65535 + 1)
                             for j in range(k)))
        sent += k
    if qos:
        reader.join(timeout=300)
        if failed:
            raise failed[0]
        if acked < messages:
            raise RuntimeError(f"only {acked} of {messages} acknowledged")
    else:
        pub.sendall(b"\xc0\x00")  # PINGREQ: answered once everything before it was read
        if recv_exact(pub, 2) != b"\xd0\x00":
            raise RuntimeError("no PINGRESP after the flood")
    rate = messages / (time.monotonic() - start)
    return pub, rate


def follow(bridge, seconds, target_kb):
    """RSS every second for `seconds`; returns samples and the first second at or below target."""
    samples = []
    reached = None
    start = time.monotonic()
    for t in range(seconds + 1):
        while time.monotonic() < start + t:
            time.sleep(0.05)
        kb = bridge.rss()
        samples.append((t, kb))
        if reached is None and kb <= target_kb:
            reached = t
    return samples, reached


def report_follow(name, samples, reached, target_kb):
    marks = [1, 5, 10, 30, 60]
    picks = {t: kb for t, kb in samples if t in marks or t == samples[-1][0]}
    print(f"  {name}: " + ", ".join(f"{mb(kb)} MB after {t} s" for t, kb in sorted(picks.items())))
    when = f"after {reached} s" if reached is not None else "not within the window"
    print(f"  RSS at or below {mb(target_kb)} MB (2 x idle): {when}")
    return {str(t): mb(kb) for t, kb in sorted(picks.items())}


def scenario_flood(args):
    bridge = Bridge(args.binary, args.config, args.port)
    try:
        time.sleep(args.warmup)
        idle = bridge.rss()
        print(f"flood: idle {mb(idle)} MB")
        socks = connect_many(args.port, args.clients, "sub", subscribe=b"flood/#")
        time.sleep(1)
        with_clients = bridge.rss()
        print(f"  {args.clients} subscribers that never read: {mb(with_clients)} MB "
              f"(+{mb(with_clients - idle)})")
        pub, rate = flood(args.port, args.messages, args.size, args.qos, args.window)
        after_flood = bridge.rss()
        peak = bridge.peak()
        print(f"  {args.messages} x {args.size} B QoS {args.qos} published ({rate:.0f} msg/s): "
              f"{mb(after_flood)} MB now, peak {mb(peak)} MB")
        for s in socks:
            s.close()
        pub.close()
        target = 2 * idle
        samples, reached = follow(bridge, args.settle, target)
        after = report_follow("after every client left", samples, reached, target)
        return {"scenario": "flood", "idle_mb": mb(idle), "clients": args.clients,
                "with_clients_mb": mb(with_clients), "messages": args.messages,
                "size": args.size, "qos": args.qos, "publish_rate": round(rate),
                "after_flood_mb": mb(after_flood), "peak_mb": mb(peak), "after_left_mb": after,
                "back_to_2x_idle_s": reached}
    finally:
        bridge.stop()


def scenario_connections(args):
    bridge = Bridge(args.binary, args.config, args.port)
    try:
        time.sleep(args.warmup)
        idle = bridge.rss()
        print(f"connections: idle {mb(idle)} MB")
        start = time.monotonic()
        socks = connect_many(args.port, args.connections, "idle")
        took = time.monotonic() - start
        time.sleep(1)
        held = bridge.rss()
        peak = bridge.peak()
        print(f"  {args.connections} idle connections ({took:.1f} s to connect): {mb(held)} MB "
              f"(+{mb(held - idle)}), peak {mb(peak)} MB")
        for s in socks:
            s.close()
        target = 2 * idle
        samples, reached = follow(bridge, args.settle, target)
        after = report_follow("after they left", samples, reached, target)
        return {"scenario": "connections", "idle_mb": mb(idle), "connections": args.connections,
                "held_mb": mb(held), "peak_mb": mb(peak), "after_left_mb": after,
                "back_to_2x_idle_s": reached}
    finally:
        bridge.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--scenario", choices=["flood", "connections", "all"], default="all")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--qos", type=int, choices=[0, 1], default=1)
    p.add_argument("--window", type=int, default=1000,
                   help="QoS 1: most messages published and not yet acknowledged")
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--settle", type=int, default=60, help="seconds RSS is followed at the end")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the idle figure")
    args = p.parse_args()
    results = []
    if args.scenario in ("flood", "all"):
        results.append(scenario_flood(args))
    if args.scenario in ("connections", "all"):
        results.append(scenario_connections(args))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
