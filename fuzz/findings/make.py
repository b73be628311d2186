#!/usr/bin/env python3
"""Writes the inputs of fuzz/findings/README.md (virtiofs_requests' input format)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def fuse(opcode, nodeid, body, reply):
    msg = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, 2, nodeid, 0, 0, 1, 0, 0) + body
    return struct.pack("<HH", len(msg), reply) + msg


LOOKUP, OPEN, READ, OPENDIR, READDIR, READDIRPLUS = 1, 14, 15, 27, 28, 44
lookup_a = fuse(LOOKUP, 1, b"a\x00", 256)  # inode 2
open_a = fuse(OPEN, 2, struct.pack("<II", os.O_RDWR, 0), 256)  # handle 0


def read_in(offset, size):
    return struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)


inputs = {
    # a READ whose reply buffer is shorter than the 16-byte reply header
    "virtiofsd-1.14.0-read-short-reply": lookup_a + open_a + fuse(READ, 2, read_in(0, 4096), 8),
    "virtiofsd-1.14.0-readdir-short-reply": fuse(OPENDIR, 1, struct.pack("<II", 0, 0), 256)
    + fuse(READDIR, 1, read_in(0, 0), 8),
    "virtiofsd-1.14.0-readdirplus-short-reply": fuse(OPENDIR, 1, struct.pack("<II", 0, 0), 256)
    + fuse(READDIRPLUS, 1, read_in(0, 0), 8),
    # a READ at an offset past i64::MAX
    "virtiofsd-1.14.0-read-offset-overflow": lookup_a + open_a + fuse(READ, 2, read_in(1 << 63, 16), 256),
}
for name, data in inputs.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
