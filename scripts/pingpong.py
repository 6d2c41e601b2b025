#!/usr/bin/env python3
"""The machine's own Unix-socket round trip between two processes, no Till involved: the floor under
every c=1 socket figure in docs/BENCHMARKS.md. Run it plain (the kernel places the two processes) and
under `taskset -c 0` (both on one CPU) to see how much of a round trip is the cross-CPU wake-up."""
import os
import socket
import time

N = 5000
a, b = socket.socketpair()
pid = os.fork()
if pid == 0:
    a.close()
    while True:
        d = b.recv(64)
        if not d:
            os._exit(0)
        b.send(d)
b.close()
samples = []
for _ in range(N):
    t = time.perf_counter_ns()
    a.send(b"x")
    a.recv(64)
    samples.append(time.perf_counter_ns() - t)
a.close()
os.waitpid(pid, 0)
samples.sort()
print(
    f"unix socket ping-pong, 1 byte: p10 {samples[N // 10] / 1000:.1f} µs  "
    f"p50 {samples[N // 2] / 1000:.1f} µs  p90 {samples[N * 9 // 10] / 1000:.1f} µs"
)
