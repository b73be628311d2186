//! Runs inside test guests: the guest end of the vsock and network tests, and a hostile driver that
//! scribbles on virtio queues. Linux only; talks to the kernel through libc.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use microvm_tests::guest::{fnv1a, pattern_byte, FNV_INIT};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> u64 {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    match args.get(1).map(String::as_str) {
        Some("vsock-send") => vsock_send(arg(2) as u32, arg(3) as u32, arg(4)),
        Some("vsock-echo") => vsock_echo(arg(2) as u32),
        Some("tcp-send") => tcp_send(
            args.get(2).map_or_else(|| usage(), String::as_str),
            arg(3) as u16,
            arg(4),
        ),
        Some("scribble") => scribble(arg(2)),
        Some("serial-flood") => serial_flood(arg(2)),
        Some("vsock-flood") => vsock_flood(arg(2) as u32, arg(3), arg(4)),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: guest-tool vsock-send CID PORT BYTES | vsock-echo PORT | tcp-send ADDR PORT BYTES \
         | scribble ROUNDS | serial-flood BYTES | vsock-flood PORT CONNECTIONS BYTES"
    );
    std::process::exit(2)
}

fn check(ret: libc::c_int, what: &str) -> libc::c_int {
    if ret < 0 {
        eprintln!("{what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    ret
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> libc::c_int {
    // SAFETY: plain socket(2) call.
    check(
        unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) },
        "socket",
    )
}

/// Connects to CID:PORT, sends BYTES of the test pattern while reading back the peer's echo,
/// and checks the echo is the same stream.
fn vsock_send(cid: u32, port: u32, bytes: u64) {
    send_and_verify_echo(vsock_connect(cid, port), bytes, "VSOCK");
}

/// A vsock stream connected to CID:PORT (exits on failure).
fn vsock_connect(cid: u32, port: u32) -> File {
    let fd = vsock_socket();
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of the given size.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    check(r, "connect");
    // SAFETY: fd is a connected socket we own.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes BYTES to the COM1 data register through `/dev/port`, one byte per `pwrite` (the UART
/// takes one byte per port write), as lines of 63 letters and a newline; prints
/// `SERIAL-FLOOD-DONE` at the end.
fn serial_flood(bytes: u64) {
    use std::os::unix::fs::FileExt;
    const COM1: u64 = 0x3f8;
    let port = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/port")
        .unwrap_or_else(|e| {
            eprintln!("/dev/port: {e}");
            std::process::exit(1)
        });
    for i in 0..bytes {
        let b = if i % 64 == 63 {
            b'\n'
        } else {
            b'a' + (i % 26) as u8
        };
        port.write_all_at(&[b], COM1).expect("port write");
    }
    println!("SERIAL-FLOOD-DONE bytes={bytes}");
}

/// Opens CONNECTIONS connections to host port PORT at once and sends BYTES on each (blocking
/// when the host does not read), then closes them; prints `VSOCK-FLOOD-DONE`.
fn vsock_flood(port: u32, connections: u64, bytes: u64) {
    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let mut sock = vsock_connect(libc::VMADDR_CID_HOST, port);
            std::thread::spawn(move || {
                let buf = vec![b'v'; 64 * 1024];
                let mut sent = 0u64;
                while sent < bytes {
                    let n = (bytes - sent).min(buf.len() as u64) as usize;
                    sock.write_all(&buf[..n]).expect("send");
                    sent += n as u64;
                }
            })
        })
        .collect();
    for s in senders {
        s.join().expect("sender");
    }
    println!("VSOCK-FLOOD-DONE connections={connections} bytes={bytes}");
}

/// Connects to ADDR:PORT over TCP and does what `vsock_send` does.
fn tcp_send(addr: &str, port: u16, bytes: u64) {
    let stream = std::net::TcpStream::connect((addr, port)).unwrap_or_else(|e| {
        eprintln!("connect {addr}:{port}: {e}");
        std::process::exit(1);
    });
    send_and_verify_echo(File::from(OwnedFd::from(stream)), bytes, "TCP");
}

/// Sends BYTES of the test pattern on `sock` while reading back the peer's echo; prints
/// `<TAG>-SEND-OK bytes=N fnv=H` if the echo is the same stream.
fn send_and_verify_echo(sock: File, bytes: u64, tag: &str) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut writer = sock.try_clone().expect("dup");
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut hash = FNV_INIT;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern_byte(sent + i as u64);
            }
            writer.write_all(&buf[..n]).expect("send");
            hash = fnv1a(hash, &buf[..n]);
            sent += n as u64;
        }
        // SAFETY: shutting down the write half of our own socket.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        hash
    });
    let (received, hash, mismatch) = read_and_verify(sock);
    let sent_hash = sender.join().expect("sender");
    if received != bytes || hash != sent_hash || mismatch {
        println!("{tag}-SEND-BAD received={received} of {bytes} mismatch={mismatch}");
        std::process::exit(1);
    }
    println!("{tag}-SEND-OK bytes={received} fnv={hash:016x}");
}

fn read_and_verify(mut sock: File) -> (u64, u64, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut received, mut hash, mut mismatch) = (0u64, FNV_INIT, false);
    loop {
        let n = sock.read(&mut buf).expect("recv");
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            mismatch |= *b != pattern_byte(received + i as u64);
        }
        hash = fnv1a(hash, &buf[..n]);
        received += n as u64;
    }
    (received, hash, mismatch)
}

/// Listens on PORT, accepts one connection, echoes everything back until EOF.
fn vsock_echo(port: u32) {
    let fd = vsock_socket();
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of the given size.
    let r = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    check(r, "bind");
    // SAFETY: listen(2) on our socket.
    check(unsafe { libc::listen(fd, 1) }, "listen");
    println!("VSOCK-ECHO-LISTENING {port}");
    // SAFETY: accept(2) on our listening socket; we do not need the peer address.
    let conn = check(
        unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) },
        "accept",
    );
    // SAFETY: conn is a connected socket we own.
    let mut sock = File::from(unsafe { OwnedFd::from_raw_fd(conn) });
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut hash) = (0u64, FNV_INIT);
    loop {
        let n = sock.read(&mut buf).expect("recv");
        if n == 0 {
            break;
        }
        hash = fnv1a(hash, &buf[..n]);
        sock.write_all(&buf[..n]).expect("send");
        total += n as u64;
    }
    // SAFETY: shutting down the write half of our own socket.
    unsafe { libc::shutdown(conn, libc::SHUT_WR) };
    println!("VSOCK-ECHO-DONE bytes={total} fnv={hash:016x}");
}

/// A tiny xorshift PRNG: reproducible garbage.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Pages of our own, locked, with their guest-physical addresses (from /proc/self/pagemap).
struct PhysPages {
    virt: *mut u8,
    phys: Vec<u64>,
}

fn phys_pages(count: usize) -> PhysPages {
    // SAFETY: anonymous private mapping of `count` pages; checked for MAP_FAILED below.
    let virt = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            count * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
            -1,
            0,
        )
    };
    if virt == libc::MAP_FAILED {
        eprintln!("mmap: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let virt = virt.cast::<u8>();
    let mut pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let mut phys = Vec::new();
    for i in 0..count {
        let va = virt as u64 + i as u64 * 4096;
        let mut entry = [0u8; 8];
        use std::io::{Seek, SeekFrom};
        pagemap.seek(SeekFrom::Start(va / 4096 * 8)).unwrap();
        pagemap.read_exact(&mut entry).unwrap();
        let e = u64::from_le_bytes(entry);
        assert!(e >> 63 == 1, "page not present");
        phys.push((e & ((1 << 55) - 1)) * 4096);
    }
    PhysPages { virt, phys }
}

/// The virtio-mmio windows the kernel was told about (`virtio_mmio.device=4K@ADDR:IRQ`).
fn virtio_windows() -> Vec<u64> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(|w| w.split('@').nth(1)?.split(':').next().map(str::to_string))
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// Acts as a hostile driver: resets each virtio device, sets its queues up on pages we own,
/// fills them with garbage descriptor chains (loops, out-of-range addresses, absurd lengths,
/// bad indices, indirect tables), notifies, and pokes random registers.
fn scribble(rounds: u64) {
    let windows = virtio_windows();
    println!("SCRIBBLE windows={}", windows.len());
    let pages = phys_pages(3);
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
        .expect("open /dev/mem");
    let mut rng = Garbage(0x9e37_79b9_7f4a_7c15);
    for &base in &windows {
        // SAFETY: maps one page of device MMIO through /dev/mem; the mapping is used only
        // through volatile accesses below and never unmapped (the process exits soon).
        let regs = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&mem),
                base as libc::off_t,
            )
        };
        assert!(regs != libc::MAP_FAILED, "mmap {base:#x}");
        let w = |off: usize, v: u32| {
            // SAFETY: off is inside the mapped page and 4-byte aligned.
            unsafe { std::ptr::write_volatile(regs.cast::<u8>().add(off).cast::<u32>(), v) }
        };
        for round in 0..rounds {
            // Fill our pages: descriptors, avail ring, used ring, all garbage.
            for p in 0..3 {
                for i in 0..512 {
                    let mut v = rng.next();
                    if p == 0 && i % 2 == 0 {
                        // Descriptor addresses: ours, beyond RAM, or near the top of the space.
                        v = match rng.next() % 4 {
                            0 => pages.phys[2],
                            1 => 0xffff_ffff_ffff_f000,
                            2 => 0x7_0000_0000,
                            _ => pages.phys[(rng.next() % 3) as usize] + rng.next() % 8192,
                        };
                    }
                    // SAFETY: i < 512 u64s = one page of our own mapping.
                    unsafe { *pages.virt.add(p * 4096).cast::<u64>().add(i) = v };
                }
            }
            w(0x70, 0); // reset
            w(0x70, 1 | 2);
            w(0x24, 1);
            w(0x20, 1); // VERSION_1
            w(0x24, 0);
            w(0x20, (rng.next() as u32) & 0x3000_0000); // ring features, maybe
            w(0x70, 1 | 2 | 8);
            for q in 0..3u32 {
                w(0x30, q);
                w(0x38, [256, 16, 1, 0, 3, 0xffff][(rng.next() % 6) as usize]);
                let (d, a, u) = (pages.phys[0], pages.phys[1], pages.phys[2]);
                let d = if round % 5 == 4 { 0xffff_0000 } else { d };
                w(0x80, d as u32);
                w(0x84, (d >> 32) as u32);
                w(0x90, a as u32);
                w(0x94, (a >> 32) as u32);
                w(0xa0, u as u32);
                w(0xa4, (u >> 32) as u32);
                w(0x44, 1);
            }
            w(0x70, 1 | 2 | 8 | 4); // DRIVER_OK
            for _ in 0..16 {
                w(0x50, (rng.next() % 4) as u32);
            }
            // Random register and config writes.
            for _ in 0..32 {
                let off = (rng.next() % 0x200) as usize & !3;
                w(off, rng.next() as u32);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        w(0x70, 0);
    }
    println!("SCRIBBLE-DONE");
}
