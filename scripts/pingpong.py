#!/usr/bin/env python3
"""The machine's own Unix-socket round trip between two processes, no Till involved: the floor under
every c=1 socket figure in docs/BENCHMARKS.md. Run it plain (the kernel places the two processes) and
under `taskset -c 0` (both on one CPU) to see how much of a round trip is the cross-CPU wake-up.

Each line is also run with busy-polling (a side that waits for bytes reads its socket non-blocking in a
loop for up to 200 µs before it blocks), on the serving side, the asking side, and both: what
`till_protocol::io` does for tilld and till-client. Under `taskset -c 0` the "both" line shows why
Till never busy-polls on one CPU: each side spins out its whole window before the other can run."""
import os
import socket
import time

N = 5000
SPIN_NS = 200_000


def recv(s, spin):
    if spin:
        end = time.perf_counter_ns() + SPIN_NS
        while time.perf_counter_ns() < end:
            try:
                return s.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
    return s.recv(64)


def run(spin_server, spin_client):
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        while True:
            d = recv(b, spin_server)
            if not d:
                os._exit(0)
            b.send(d)
    b.close()
    samples = []
    for _ in range(N):
        t = time.perf_counter_ns()
        a.send(b"x")
        recv(a, spin_client)
        samples.append(time.perf_counter_ns() - t)
    a.close()
    os.waitpid(pid, 0)
    samples.sort()
    return samples


for label, server, client in [
    ("blocking both sides", False, False),
    ("busy-poll: serving side", True, False),
    ("busy-poll: asking side", False, True),
    ("busy-poll: both sides", True, True),
]:
    s = run(server, client)
    print(
        f"unix socket ping-pong, 1 byte, {label:<24} p10 {s[N // 10] / 1000:6.1f} µs  "
        f"p50 {s[N // 2] / 1000:6.1f} µs  p90 {s[N * 9 // 10] / 1000:6.1f} µs"
    )
