#!/usr/bin/env python3
"""Writes the committed seed inputs of every fuzz target into corpus/<target>/.

Each seed is a real session in the target's input format (see fuzz/src/lib.rs and each
target's comments): a driver that sets up queues and sends well-formed requests, so that the
fuzzer starts from inputs that reach deep into the device and mutates from there.
Run it from anywhere: `python3 fuzz/corpus/seeds.py`.
"""

import io
import json
import os
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ALL_FEATURES = 0xFFFF_FFFF_FFFF_FFFF


def write(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


# --- the device input format (fuzz/src/lib.rs) ---

RAW, HUGE, WRITE, INDIRECT, NEXT = 1, 2, 4, 8, 16


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<BQHH", flags, addr, length, nxt)


def chain(queue, *descs):
    return struct.pack("<BBB", 0, queue, len(descs)) + b"".join(descs)


def notify(queue):
    return struct.pack("<BB", 1, queue)


def poke(at, data):
    return struct.pack("<BIB", 2, at, len(data)) + data


BACKEND = b"\x03"


def device_input(data, steps, features=ALL_FEATURES, log2=(8, 8, 8, 8)):
    return struct.pack("<Q4BH", features, *log2, len(data)) + data + b"".join(steps)


def placed(items, size):
    """A data area with each (offset, bytes) written at its offset."""
    buf = bytearray(size)
    for off, b in items:
        buf[off : off + len(b)] = b
    return bytes(buf)


# --- virtio-blk ---

def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8
blk_data = placed(
    [
        (0x000, blk_header(IN, 0)),
        (0x020, blk_header(OUT, 2)),
        (0x040, blk_header(GET_ID, 0)),
        (0x060, blk_header(FLUSH, 0)),
        (0x080, blk_header(IN, 127)),
        (0x0A0, blk_header(OUT, 0xFFFF_FFFF_FFFF_FFF0)),
        (0x1000, b"written by the guest" * 20),
    ],
    0x1200,
)
blk_steps = [
    chain(0, desc(0x000, 16), desc(0x2000, 512, WRITE), desc(0x3000, 1, WRITE)),
    chain(0, desc(0x020, 16), desc(0x1000, 1024), desc(0x3001, 1, WRITE)),
    chain(0, desc(0x040, 16), desc(0x2400, 20, WRITE), desc(0x3002, 1, WRITE)),
    chain(0, desc(0x060, 16), desc(0x3003, 1, WRITE)),
    notify(0),
    # The last sector, then one past the end, then a write far past it.
    chain(0, desc(0x080, 16), desc(0x2000, 1024, WRITE), desc(0x3004, 1, WRITE)),
    chain(0, desc(0x0A0, 16), desc(0x1000, 512), desc(0x3005, 1, WRITE)),
    notify(0),
]
write("virtio_block", "requests", b"\x00" + device_input(blk_data, blk_steps))
write("virtio_block", "read_only", b"\x01" + device_input(blk_data, blk_steps))

# --- virtio-rng ---

write(
    "virtio_rng",
    "requests",
    device_input(
        b"",
        [
            chain(0, desc(0x1000, 64, WRITE)),
            chain(0, desc(0x2000, 4096, WRITE), desc(0x4000, 16, WRITE)),
            chain(0, desc(0x1000, 16)),  # device-readable: nothing to fill
            notify(0),
        ],
    ),
)

# --- virtio-vsock ---

GUEST_CID, HOST_CID = 3, 2
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def vsock_hdr(op, src_port=5000, dst_port=1024, length=0, flags=0, buf_alloc=65536, fwd=0):
    return struct.pack(
        "<QQIIIHHIII", GUEST_CID, HOST_CID, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd
    )


vsock_data = placed(
    [
        (0x000, vsock_hdr(REQUEST)),
        (0x040, vsock_hdr(RW, length=5)),
        (0x080, b"hello"),
        (0x0C0, vsock_hdr(CREDIT_REQUEST)),
        (0x100, vsock_hdr(CREDIT_UPDATE, fwd=20)),
        (0x140, vsock_hdr(SHUTDOWN, flags=3)),
        (0x180, vsock_hdr(RST)),
        (0x1C0, vsock_hdr(REQUEST, src_port=5001, dst_port=4000)),  # nobody listens
    ],
    0x200,
)
rx_buffers = [chain(0, desc(0x1000 + i * 0x200, 0x200, WRITE)) for i in range(8)]
write(
    "virtio_vsock",
    "session",
    device_input(
        vsock_data,
        rx_buffers
        + [
            chain(1, desc(0x000, 44)),
            chain(1, desc(0x1C0, 44)),
            notify(1),
            notify(0),
            chain(1, desc(0x040, 44), desc(0x080, 5)),
            notify(1),
            BACKEND,
            notify(0),
            chain(1, desc(0x0C0, 44)),
            chain(1, desc(0x100, 44)),
            notify(1),
            BACKEND,
            chain(1, desc(0x140, 44)),
            chain(1, desc(0x180, 44)),
            notify(1),
            notify(0),
        ],
    ),
)

# --- virtio-net ---

GUEST_MAC = bytes([2, 0, 0, 0, 0, 2])
BROADCAST = b"\xff" * 6


def arp_request(src_mac, src_ip, dst_ip):
    return (
        BROADCAST
        + src_mac
        + b"\x08\x06"
        + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
        + src_mac
        + bytes(src_ip)
        + b"\x00" * 6
        + bytes(dst_ip)
    )


VNET_HDR = b"\x00" * 12
guest_arp = arp_request(GUEST_MAC, [10, 9, 0, 2], [10, 9, 0, 1])
host_frame = arp_request(bytes([2, 0, 0, 0, 0, 1]), [10, 9, 0, 1], [10, 9, 0, 2])
net_data = placed([(0x000, VNET_HDR + guest_arp)], 0x100)
net_rx = [chain(0, desc(0x1000 + i * 0x800, 0x800, WRITE)) for i in range(4)]
# An RX chain split into header and frame, and one too small for any frame.
net_rx += [
    chain(0, desc(0x4000, 12, WRITE), desc(0x4100, 1514, WRITE)),
    chain(0, desc(0x5000, 8, WRITE)),
]
frames = struct.pack("<B", 1) + struct.pack("<H", len(host_frame)) + host_frame
write(
    "virtio_net",
    "arp",
    frames
    + device_input(
        net_data,
        net_rx
        + [
            notify(0),
            chain(1, desc(0x000, 12 + len(guest_arp))),
            chain(1, desc(0x000, 12), desc(0x00C, len(guest_arp))),
            notify(1),
            BACKEND,
            notify(0),
        ],
        log2=(8, 8, 0, 0),
    ),
)

# --- virtio-mmio ---


def reg(offset, value):
    return struct.pack("<BBI", 2, offset // 4, value)


def read(offset, size=4):
    return struct.pack("<BHB", 0, offset, size)


def mmio_poke(at, data):
    return struct.pack("<BIB", 3, at, len(data)) + data


EVENT_LOOP = b"\x04"
STATUS, DEV_FEAT, DEV_FEAT_SEL, DRV_FEAT, DRV_FEAT_SEL = 0x70, 0x10, 0x14, 0x20, 0x24
QSEL, QNUM, QREADY, QNOTIFY, ISR, IACK = 0x30, 0x38, 0x44, 0x50, 0x60, 0x64
QDESC, QDRIVER, QDEVICE = 0x80, 0x90, 0xA0

init = [
    reg(STATUS, 0),
    reg(STATUS, 1),
    reg(STATUS, 3),
    read(0x000),
    read(0x008),
    reg(DEV_FEAT_SEL, 1),
    read(DEV_FEAT),
    reg(DRV_FEAT_SEL, 1),
    reg(DRV_FEAT, 1),  # VIRTIO_F_VERSION_1
    reg(STATUS, 11),
    read(STATUS),
    reg(QSEL, 0),
    read(0x034),
    reg(QNUM, 16),
    reg(QDESC, 0x0),
    reg(QDESC + 4, 0),
    reg(QDRIVER, 0x1000),
    reg(QDEVICE, 0x2000),
    reg(QREADY, 1),
    reg(STATUS, 15),
]


def mmio_session(device, request_descs, extra=()):
    table = b"".join(
        struct.pack("<QIHH", addr, length, flags, i + 1)
        for i, (addr, length, flags) in enumerate(request_descs)
    )
    avail = struct.pack("<HHH", 0, 1, 0)
    return bytes([device]) + b"".join(
        init
        + [mmio_poke(0x0, table), mmio_poke(0x1000, avail), reg(QNOTIFY, 0), EVENT_LOOP]
        + [read(ISR), reg(IACK, 1), read(0x100, 8), read(0x104, 1)]
        + list(extra)
        + [reg(STATUS, 0), read(STATUS)]
    )


VRING_NEXT, VRING_WRITE = 1, 2
write("virtio_mmio", "rng", mmio_session(0, [(0x10000, 64, VRING_WRITE)]))
blk_req = struct.pack("<IIQ", IN, 0, 0)
write(
    "virtio_mmio",
    "block",
    mmio_session(
        1,
        [(0x10000, 16, VRING_NEXT), (0x11000, 512, VRING_NEXT | VRING_WRITE), (0x12000, 1, VRING_WRITE)],
        [mmio_poke(0x10000, blk_req), struct.pack("<BHBQ", 1, 0x100, 1, 0x55)],
    ),
)

# --- agent replies ---


def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def field_varint(n, v):
    return varint(n << 3) + varint(v)


def field_bytes(n, b):
    return varint(n << 3 | 2) + varint(len(b)) + b


def reply(next_call, payload, status=None, stream_id=None, msg_type=None):
    flags = (status is not None) | (stream_id is not None) << 1 | (msg_type is not None) << 2
    code, msg = status or (0, b"")
    return (
        struct.pack("<BBIB", next_call, flags, code, len(msg))
        + msg
        + struct.pack("<H", len(payload))
        + payload
        + struct.pack("<IB", stream_id or 0, msg_type or 0)
    )


VERSION, HEALTH, LIST, STATS, WAIT, OOM, CREATE, SIGNAL, REMOVE = range(9)
health = field_varint(1, 1234)
version = field_bytes(1, b"0.1.0") + field_varint(2, 1) + field_bytes(3, b"6.1")
pids = field_bytes(1, varint(1) + varint(42))
stats = field_varint(1, 4096) + field_varint(2, 8192) + field_varint(4, 3)
wait = field_varint(1, (1 << 64) - 1) + field_varint(2, 99)  # exit code -1
oom = field_bytes(1, b"../other-pod") + field_varint(2, 1)
write(
    "agent_replies",
    "calls",
    reply(VERSION, health)
    + reply(LIST, version)
    + reply(STATS, pids)
    + reply(WAIT, stats)
    + reply(OOM, wait)
    + reply(CREATE, oom)
    + reply(SIGNAL, b"")
    + reply(REMOVE, b"", status=(5, b"no such container"))
    + reply(HEALTH, b""),
)
write(
    "agent_replies",
    "bad_frames",
    reply(HEALTH, health)
    + reply(VERSION, b"\xff\xff\xff", stream_id=7)
    + reply(STATS, b"", msg_type=1),
)

# --- stdio framing ---

for name, line in [
    ("ok", b"OK\nraw output bytes"),
    ("err", b"ERR no such container c1\n"),
    ("header", b"STDIO stdout c1 exec-1\n"),
    ("header_init", b"STDIO stdin web.1\n"),
    ("long", b"E" * 300 + b"\n"),
]:
    write("stdio_framing", name, line)

# --- image layers ---


def layer(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


write(
    "image_layer",
    "tree",
    layer(
        [
            entry("etc", tarfile.DIRTYPE, mode=0o755),
            entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
            entry("bin", tarfile.DIRTYPE, mode=0o755),
            entry("bin/sh", data=b"#!", mode=0o4755),
            entry("bin/ash", tarfile.SYMTYPE, link="sh"),
            entry("bin/hard", tarfile.LNKTYPE, link="bin/sh"),
            entry("etc/.wh.passwd"),
            entry("etc/.wh..wh..opq"),
            entry("dev", tarfile.DIRTYPE),
            entry("dev/null", tarfile.CHRTYPE),
            entry("fifo", tarfile.FIFOTYPE),
        ]
    ),
)
write(
    "image_layer",
    "escapes",
    layer(
        [
            entry("../outside/file", data=b"escaped"),
            entry("/abs", data=b"absolute"),
            entry("up", tarfile.SYMTYPE, link="../outside"),
            entry("up/file", data=b"through a symlink"),
            entry("abs", tarfile.SYMTYPE, link="/"),
            entry("abs/tmp/x", data=b"through /"),
            entry("hard", tarfile.LNKTYPE, link="../outside/file"),
            entry("hard2", tarfile.LNKTYPE, link="up/file"),
            entry("up/.wh.file"),
            entry("a/b/../../../outside/x", data=b"dots"),
        ]
    ),
)
long = "d/" * 60 + "f"
write("image_layer", "long_names", layer([entry(long, data=b"x"), entry("l", tarfile.SYMTYPE, link=long)]))

# --- image config, manifest, users ---

manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "a" * 64, "size": 100},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "b" * 64, "size": 1}],
}
index = {
    "schemaVersion": 2,
    "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "c" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "d" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}, "annotations": {"vnd.docker.reference.type": "x"}},
    ],
}
config = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"User": "1000:1000", "Env": ["PATH=/bin"], "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"],
               "WorkingDir": "/", "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "b"}},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "e" * 64]},
    "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "x"}],
}
write("image_config", "manifest", b"\x00" + json.dumps(manifest).encode())
write("image_config", "index", b"\x00" + json.dumps(index).encode())
write("image_config", "config", b"\x01" + json.dumps(config).encode())
write(
    "image_config",
    "users",
    b"\x02"
    + b"root:x:0:0::/root:/bin/sh\nweb:x:1000:1000::/:/bin/sh\n"
    + b"\x00"
    + b"root:x:0:\nweb:x:1000:web\nextra:x:2000:web\n"
    + b"\x00"
    + b"web:extra",
)

# --- virtio-fs requests (fuzz_targets/virtiofs_requests.rs) ---
# Each record: len:u16 (top bit: two readable descriptors) reply:u16, then the FUSE request. The
# share holds a, d/, d/b, d/a-link, up -> ../outside/secret, abs -> /outside/secret, d/dotdot -> ..
# The daemon numbers inodes from 2 in lookup order and file handles from 0; files stop at 64 MiB.

(LOOKUP, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN,
 READ, WRITE, STATFS, RELEASE) = (1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
OPENDIR, READDIR, CREATE, FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = (
    27, 28, 35, 43, 44, 45, 46, 47)
FUSE_SEQ = [0]


def fuse(opcode, nodeid, body=b"", reply=4096, split=False, uid=0, gid=0):
    FUSE_SEQ[0] += 1
    msg = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, FUSE_SEQ[0], nodeid, uid, gid, 1, 0, 0)
    msg += body
    return struct.pack("<HH", len(msg) | (0x8000 if split else 0), reply) + msg


def cstr(*names):
    return b"".join(n + b"\x00" for n in names)


def read_in(fh, offset, size):
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def setattr_in(valid, mode=0, uid=0, gid=0, size=0):
    return struct.pack("<IIQQQQQQIIIIIIII", valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, gid, 0)


fs_sessions = {
    # lookup a (2), open, read, and the directory listed with and without attributes
    "read": [fuse(LOOKUP, 1, cstr(b"a")), fuse(OPEN, 2, struct.pack("<II", os.O_RDONLY, 0)),
             fuse(READ, 2, read_in(0, 0, 4096)), fuse(OPENDIR, 1, struct.pack("<II", 0, 0)),
             fuse(READDIR, 1, read_in(1, 0, 4096)), fuse(READDIRPLUS, 1, read_in(1, 0, 4096), split=True),
             fuse(RELEASE, 2, struct.pack("<QIIQ", 0, 0, 0, 0)), fuse(STATFS, 1)],
    # create, write far out (sparse), fallocate, lseek for data, setattr truncate and chmod setuid
    "write": [fuse(CREATE, 1, struct.pack("<IIII", os.O_RDWR, 0o644, 0o022, 0) + cstr(b"new")),
              fuse(WRITE, 2, struct.pack("<QQIIQII", 0, 1 << 40, 5, 0, 0, 0, 0) + b"data\n"),
              fuse(WRITE, 2, struct.pack("<QQIIQII", 0, 1 << 24, 5, 0, 0, 0, 0) + b"data\n", split=True),
              fuse(FALLOCATE, 2, struct.pack("<QQQII", 0, 0, 1 << 20, 0, 0)),
              fuse(LSEEK, 2, struct.pack("<QQII", 0, 0, 3, 0)),
              fuse(SETATTR, 2, setattr_in(1 << 3, size=8192)),
              fuse(SETATTR, 2, setattr_in(1, mode=0o4755)),
              fuse(GETATTR, 2, struct.pack("<IIQ", 0, 0, 0))],
    # the ways out a guest tries: .. of the root, the planted links, a link and a rename upwards
    "escape": [fuse(LOOKUP, 1, cstr(b"..")), fuse(MKDIR, 2, struct.pack("<II", 0o755, 0) + cstr(b"escaped")),
               fuse(LOOKUP, 1, cstr(b"up")), fuse(READLINK, 3),
               fuse(OPEN, 3, struct.pack("<II", os.O_RDWR, 0)),
               fuse(LOOKUP, 1, cstr(b"d")), fuse(LOOKUP, 4, cstr(b"dotdot")),
               fuse(LOOKUP, 4, cstr(b"..")), fuse(LOOKUP, 1, cstr(b"outside/secret")),
               fuse(LOOKUP, 1, cstr(b"../outside/secret")),
               fuse(SYMLINK, 1, cstr(b"s", b"/outside")), fuse(LINK, 1, struct.pack("<Q", 3) + cstr(b"l")),
               fuse(RENAME, 4, struct.pack("<Q", 2) + cstr(b"b", b"../moved")),
               fuse(MKNOD, 1, struct.pack("<IIII", 0o20644, 0x0801, 0, 0) + cstr(b"sda")),
               fuse(UNLINK, 1, cstr(b"up"))],
    # a directory tree made and taken apart, renames across directories, copy_file_range
    "tree": [fuse(MKDIR, 1, struct.pack("<II", 0o700, 0) + cstr(b"x")), fuse(LOOKUP, 1, cstr(b"a")),
             fuse(LOOKUP, 1, cstr(b"d")), fuse(RENAME2, 1, struct.pack("<QII", 2, 0, 0) + cstr(b"a", b"a2")),
             fuse(RENAME, 2, struct.pack("<Q", 4) + cstr(b"a2", b"a3")),
             fuse(OPEN, 3, struct.pack("<II", os.O_RDWR, 0)), fuse(OPEN, 3, struct.pack("<II", os.O_RDWR, 0)),
             fuse(COPY_FILE_RANGE, 3, struct.pack("<QQQQQQQ", 0, 0, 3, 1, 6, 8, 0)),
             fuse(RMDIR, 1, cstr(b"x")), fuse(UNLINK, 4, cstr(b"b"))],
}
for name, records in fs_sessions.items():
    write("virtiofs_requests", name, b"".join(records))
