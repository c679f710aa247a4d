#!/usr/bin/env python3
"""Gurux's own client as a poller, for comparison with ours (bench/dlms_faults.py).

A GXDLMSReader-style loop written on the Gurux library (gurux-dlms, the same pinned version the
meter uses): SNRM/UA, AARQ/AARE, then every INTERVAL one GET-with-list of the five default
registers. Each request is sent and its answer awaited for TIMEOUT; with no complete answer the
same bytes are sent again, up to 3 tries (GXDLMSReader's retry rule); an error ends the
connection, which is opened again at the next interval (GXDLMSReader reads once and exits; a
poller has to come back). Prints one JSON line: polls, good polls, failed polls.

  bench/gurux_client_loop.py --port 14000 --interval 2 --timeout 1 --seconds 120
"""
import argparse, json, socket, time

from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
from gurux_dlms.enums import InterfaceType
from gurux_dlms.objects import GXDLMSRegister

TRIES = 3
OBIS = ["1.0.32.7.0.255", "1.0.31.7.0.255", "1.0.14.7.0.255", "1.0.1.7.0.255", "1.0.1.8.0.255"]


class Reader:
    def __init__(self, host, port, timeout, wrapper):
        self.host, self.port, self.timeout, self.wrapper = host, port, timeout, wrapper
        self.client = None
        self.sock = None
        self.regs = [GXDLMSRegister(o) for o in OBIS]

    def packet(self, data, reply):
        """Send `data`, wait for one complete answer; resend the same bytes on silence."""
        notify = GXReplyData()
        rd = GXByteBuffer()
        self.sock.sendall(bytes(data))
        tries = 0
        while not self.client.getData(rd, reply, notify):
            self.sock.settimeout(self.timeout)
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                tries += 1
                if tries == TRIES:
                    raise TimeoutError("no reply")
                self.sock.sendall(bytes(data))
                continue
            if not chunk:
                raise ConnectionError("closed")
            rd.set(chunk)
        if reply.error:
            raise RuntimeError("dlms error %d" % reply.error)

    def block(self, data, reply):
        if isinstance(data, list):
            for it in data:
                reply.clear()
                self.block(it, reply)
            return
        self.packet(data, reply)
        while reply.isMoreData():
            self.packet(self.client.receiverReady(reply), reply)

    def open(self):
        self.close()
        # A fresh Gurux client per connection: no state survives a failed one.
        self.client = GXDLMSClient(True, 16, 1,
                                   interfaceType=InterfaceType.WRAPPER if self.wrapper else InterfaceType.HDLC)
        self.sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = GXReplyData()
        data = self.client.snrmRequest()
        if data:
            self.packet(data, reply)
            self.client.parseUAResponse(reply.data)
        reply = GXReplyData()
        self.block(self.client.aarqRequest(), reply)
        self.client.parseAareResponse(reply.data)
        # Scalers once per association in one GET-with-list, as our poller does.
        values = []
        for data in self.client.readList([(r, 3) for r in self.regs]):
            reply = GXReplyData()
            self.block(data, reply)
            values.extend(reply.value or [])
        if len(values) != len(self.regs):
            raise ValueError("%d scalers" % len(values))

    def poll(self):
        values = []
        for data in self.client.readList([(r, 2) for r in self.regs]):
            reply = GXReplyData()
            self.block(data, reply)
            values.extend(reply.value or [])
        if len(values) != len(self.regs):
            raise ValueError("%d values" % len(values))
        return values

    def close(self):
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--interval", type=float, default=2.0)
    a.add_argument("--timeout", type=float, default=1.0)
    a.add_argument("--seconds", type=float, default=120.0)
    a.add_argument("--wrapper", action="store_true")
    args = a.parse_args()
    r = Reader(args.host, args.port, args.timeout, args.wrapper)
    start = time.monotonic()
    polls = good = 0
    k = 0
    while True:
        at = start + k * args.interval
        if at >= start + args.seconds:
            break
        now = time.monotonic()
        if now < at:
            time.sleep(at - now)
        elif now - at >= args.interval:
            k = int((now - start) // args.interval) + 1  # overran: skip missed ticks
            continue
        k += 1
        polls += 1
        try:
            if r.sock is None:
                r.open()
            r.poll()
            good += 1
        except Exception:  # noqa: BLE001 - any failure ends the connection, as in GXDLMSReader
            r.close()
    r.close()
    print(json.dumps({"client": "gurux", "polls": polls, "good": good, "failed": polls - good}))


if __name__ == "__main__":
    main()
