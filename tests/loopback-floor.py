#!/usr/bin/env python3
"""The kernel's floor for fan-out on this machine: one small write per delivery per connection.

`make bench-compare` runs it next to the peer. N loopback TCP connections (TCP_NODELAY, as the
servers set), a reader process draining them with epoll, and a sender writing SIZE bytes to each
connection in turn, ROUNDS times, pausing between rounds so the reader keeps up (the fixed-rate
fan-out pattern: no two frames for one connection are ever queued together). It prints one JSON
line: the sender's and the reader's kernel CPU per write, in microseconds. On loopback the
kernel runs the receiving side's TCP processing in the sender's context, so the sender's figure
is what any server pays per delivery there before its own code runs; the reader's is what the
benchmark client pays at least.

    python3 tests/loopback-floor.py [--connections 100] [--size 190] [--rounds 2000]
"""
import argparse
import json
import os
import resource
import selectors
import socket
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--size", type=int, default=190, help="bytes per write (a delivery's HTTP/2 DATA frame is about this)")
    ap.add_argument("--rounds", type=int, default=2000)
    a = ap.parse_args()
    if not (1 <= a.connections <= 5000 and 1 <= a.size <= 65536 and 1 <= a.rounds <= 100000):
        ap.error("connections 1..5000, size 1..65536, rounds 1..100000")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(a.connections)
    port = listener.getsockname()[1]
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        listener.close()
        os.close(report_r)
        os._exit(read_all(port, a, report_w))
    os.close(report_w)
    listener.settimeout(10)
    conns = []
    for _ in range(a.connections):
        c, _ = listener.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(c)
    msg = b"x" * a.size
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(a.rounds):
        for c in conns:
            c.sendall(msg)
        time.sleep(0.0005)
    after = resource.getrusage(resource.RUSAGE_SELF)
    reader = json.loads(os.read(report_r, 4096) or b"{}")
    _, status = os.waitpid(pid, 0)
    writes = a.connections * a.rounds
    print(json.dumps({
        "system": "loopback-floor",
        "connections": a.connections,
        "write_bytes": a.size,
        "writes": writes,
        "sender_sys_us_per_write": round((after.ru_stime - before.ru_stime) / writes * 1e6, 2),
        "reader_sys_us_per_write": round(reader.get("sys_s", 0.0) / writes * 1e6, 2),
        "reader_ok": status == 0,
    }))


def read_all(port, a, report_w):
    """The reader: connects, drains every byte, reports its kernel CPU. Bounded by a deadline."""
    sel = selectors.DefaultSelector()
    for _ in range(a.connections):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.setblocking(False)
        sel.register(c, selectors.EVENT_READ)
    want, got = a.connections * a.size * a.rounds, 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + 300
    while got < want and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            try:
                got += len(key.fileobj.recv(65536))
            except BlockingIOError:
                pass
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.write(report_w, json.dumps({"sys_s": after.ru_stime - before.ru_stime}).encode())
    return 0 if got == want else 1


if __name__ == "__main__":
    main()
