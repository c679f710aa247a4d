#!/usr/bin/env python3
"""Memory of idle local clients, plain or TLS: opens N MQTT 3.1.1 connections (CONNECT,
keep-alive 60, CONNACK checked) to a running bridge and prints its RSS growth per client.

    python3 bench/broker_tls_idle.py --pid PID --mode tls --port 8884 --cafile ca.crt -n 1000
    python3 bench/broker_tls_idle.py --pid PID --mode plain --port 1884 -n 1000

Use a fresh bridge per mode (the allocator reuses what an earlier run freed). Standard library
only (socket, ssl).
"""
import argparse
import socket
import ssl
import struct
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def connect_packet(client_id):
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"  # MQTT 3.1.1, clean session, keep-alive 60 s
    payload = struct.pack(">H", len(cid)) + cid
    return b"\x10" + bytes([len(var) + len(payload)]) + var + payload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--mode", choices=["plain", "tls"], required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cafile")
    ap.add_argument("-n", type=int, default=1000)
    a = ap.parse_args()
    ctx = ssl.create_default_context(cafile=a.cafile) if a.mode == "tls" else None
    before = rss_kb(a.pid)
    socks = []
    for i in range(a.n):
        s = socket.create_connection((a.host, a.port), timeout=10)
        if ctx:
            s = ctx.wrap_socket(s, server_hostname=a.host)
        s.sendall(connect_packet(f"idle-{a.mode}-{i}"))
        ack = s.recv(4)
        if ack != b"\x20\x02\x00\x00":
            raise SystemExit(f"client {i}: no CONNACK 0 ({ack!r})")
        socks.append(s)
    time.sleep(1)
    after = rss_kb(a.pid)
    print(f"{a.mode}: {a.n} idle clients, RSS {before} kB -> {after} kB, "
          f"+{(after - before) / a.n:.1f} kB per client")
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
