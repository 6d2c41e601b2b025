#!/usr/bin/env python3
"""Mints N tokens over tilld's native socket and prints one per line (for the gateway benchmark).

Usage: mint_tokens.py SOCKET SERVICE RULE USES N
"""
import json
import socket
import struct
import sys

path, service, rule, uses, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_UNIX)
s.connect(path)


def rt(obj):
    b = json.dumps(obj).encode()
    s.sendall(struct.pack(">I", len(b)) + b)
    size = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    return json.loads(s.recv(size, socket.MSG_WAITALL))


rt({"type": "hello", "protocol_version": 1, "client": "mint_tokens.py"})
out = sys.stdout
for _ in range(n):
    r = rt({"type": "mint", "service": service, "allow": [rule], "uses": uses, "ttl_secs": 3600})
    if r["type"] != "minted":
        sys.exit(f"mint refused: {r}")
    out.write(r["token"] + "\n")
