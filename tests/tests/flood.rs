//! A hostile guest floods the serial console, vsock and the block device: the VMM's own memory
//! stays bounded, the host can still reach the guest through the VMM while the flood goes on,
//! and the VMM exits cleanly afterwards.
//!
//! "The VMM's own memory" is its resident set outside guest RAM (`/proc/<pid>/smaps`, every
//! mapping but the guest RAM one): guest RAM is the guest's to fill, up to its configured size,
//! whatever the VMM does; what a flood must not grow is everything else. Each bound below is
//! derived from the caps in the code and is far below what the flood would leave behind if the
//! VMM buffered it.
//!
//! Like `guest.rs`, the binary re-runs itself inside the testbed where this host's KVM cannot
//! boot a guest.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use microvm_tests::guest::{connect_to_guest, initramfs, run_trials, trial, Artifacts, Boot};

/// Guest RAM of every flood VM (the default), to tell its mapping apart in `smaps`.
const MEMORY_MIB: u64 = 128;
/// The VMM's resident memory outside guest RAM, at most, during any flood: its code, heap and
/// thread stacks (a few MiB at rest), the console's 64 KiB buffer, vsock rings of 256 KiB per
/// connection (8 in the vsock flood: 2 MiB). Each flood pushes more than this through.
const OWN_RSS_MAX_KIB: u64 = 24 * 1024;

fn main() -> ExitCode {
    let trials = vec![
        trial("serial_flood_into_an_undrained_stdout", serial_flood),
        trial("vsock_flood_the_host_does_not_read", vsock_flood),
        trial("block_flood", block_flood),
    ];
    run_trials("flood tests", trials)
}

/// Samples the VMM's resident memory outside guest RAM until stopped; gives the largest sample.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(Ordering::Relaxed) {
                // The VMM may be gone (exited) between two samples.
                if let Some(kib) = own_rss_kib(pid) {
                    max = max.max(kib);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        });
        Self { stop, thread }
    }

    /// The largest resident size (KiB) outside guest RAM seen.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `Rss` of every mapping of `pid` but guest RAM (the one anonymous mapping of [`MEMORY_MIB`]);
/// `None` if the process is gone or guest RAM is not mapped yet.
fn own_rss_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest_ram, mut size) = (0, None, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let kib = |w: Option<&str>| w.and_then(|v| v.parse::<u64>().ok());
        match words.next() {
            Some("Size:") => size = kib(words.next())?,
            Some("Rss:") => {
                let rss = kib(words.next())?;
                if size == MEMORY_MIB * 1024 && guest_ram.is_none() {
                    guest_ram = Some(rss);
                } else {
                    total += rss;
                }
            }
            _ => {}
        }
    }
    guest_ram.map(|_| total)
}

fn assert_bounded(what: &str, own_kib: u64, stderr: &str) {
    eprintln!("{what}: VMM resident outside guest RAM, at most {own_kib} KiB");
    assert!(own_kib > 0, "{what}: no RSS sample taken");
    assert!(
        own_kib <= OWN_RSS_MAX_KIB,
        "{what}: the VMM grew to {own_kib} KiB outside guest RAM (bound {OWN_RSS_MAX_KIB} KiB)\n\
         --- stderr ---\n{stderr}"
    );
}

/// Host -> guest -> host through the VMM's vsock socket: connects to the guest's echo on `port`
/// and checks a short message comes back. No time limit beyond the connect's: only that it
/// completes while a flood goes on.
fn ping(uds: &Path, port: u32) {
    let (mut s, mut r) = connect_to_guest(uds, port);
    s.write_all(b"ping through the flood").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, b"ping through the flood");
}

/// A host listener for a guest-initiated vsock connection at `path` in `dir`: the jailed VMM
/// connects as its own unprivileged uid, so the directory must let it through and the socket
/// take it.
fn listen_for_the_vmm(dir: &Path, path: &str) -> UnixListener {
    let listener = UnixListener::bind(path).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    listener
}

/// The next connection to `listener`, or a panic after two minutes (the guest never connected:
/// a test that fails, not one that hangs).
fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no guest connection to the host listener: {e}"),
        }
    }
}

/// A pipe whose write end, the VMM's stdout, is non-blocking: once the 64 KiB pipe is full every
/// write fails with `EAGAIN` (what a console nobody drains looks like to the VMM).
fn nonblocking_pipe() -> (std::fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and ours.
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// Reads the pipe until the VMM closes it, a chunk at a time with pauses: a slow reader.
fn drain_slowly(mut pipe: std::fs::File) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut all, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("console pipe: {e}"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// Serial bytes the guest writes while nobody reads the console. Each is one port write, one VM
/// exit: about 2 KiB/s in the emulated testbed, so this flood is small and its bound is on
/// growth.
const SERIAL_BYTES: u64 = 512 << 10;
/// How much the VMM's memory outside guest RAM may grow during the serial flood: the console's
/// 64 KiB buffer and allocator slack. A console that kept what the host did not take would grow
/// by the flood less the 64 KiB pipe, about 440 KiB.
const SERIAL_GROWTH_MAX_KIB: u64 = 256;

/// The guest writes [`SERIAL_BYTES`] to COM1 while the VMM's stdout is a full non-blocking pipe:
/// the console buffer (64 KiB) drops what the host does not take. The host pings the guest
/// during the flood, then drains the console, and the guest's last lines get through.
fn serial_flood(art: &Artifacts, dir: &Path) {
    let uds = dir.join("v.sock");
    let done = listen_for_the_vmm(dir, &format!("{}_5001", uds.display()));
    let body = format!(
        "guest-tool vsock-echo 6000 & E=$!; guest-tool serial-flood {SERIAL_BYTES}; wait $E; \
         guest-tool vsock-send 2 5001 16; guest-tool vsock-echo 6001"
    );
    let initrd = initramfs(art, dir, &body);
    let (console, stdout) = nonblocking_pipe();
    let vm = Boot::new(art, &initrd)
        .arg("--vsock")
        .arg(format!("3,{}", uds.display()))
        .stdout(stdout)
        .timeout(Duration::from_secs(600))
        .spawn();
    ping(&uds, 6000);
    // The guest is up and its flood under way: what the VMM holds from here on is the flood's.
    let vmm = vm.vmm_pid();
    let base = own_rss_kib(vmm).expect("the VMM's smaps");
    let rss = RssSampler::start(vmm);
    // The flood is over when the guest connects to host port 5001.
    let mut s = accept(&done);
    let mut hello = Vec::new();
    (&s).take(16).read_to_end(&mut hello).unwrap();
    s.write_all(&hello).unwrap();
    drop(s);
    let own_kib = rss.stop();
    let drained = drain_slowly(console);
    ping(&uds, 6001);
    let out = vm.wait();
    let console = drained.join().unwrap();
    assert_bounded("serial flood", own_kib, &out.stderr);
    let growth = own_kib.saturating_sub(base);
    eprintln!("serial flood: {growth} KiB of growth from {base} KiB");
    assert!(
        growth <= SERIAL_GROWTH_MAX_KIB,
        "serial flood: the VMM grew by {growth} KiB (from {base} KiB) outside guest RAM (bound \
         {SERIAL_GROWTH_MAX_KIB} KiB)\n--- stderr ---\n{}",
        out.stderr
    );
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    assert!(
        console.contains("VSOCK-ECHO-DONE") && console.contains("GUEST-END rc=0"),
        "the drained console lacks the guest's last lines:\n{}",
        &console[console.len().saturating_sub(2000)..]
    );
    assert!(
        out.stderr.contains("bytes of guest output dropped")
            || out.stderr.contains("did not take the guest's output"),
        "the flood never met a full console:\n{}\n--- console ---\n{}",
        out.stderr,
        &console[..console.len().min(3000)]
    );
}

/// Guest connections to the host in the vsock flood, and bytes each sends.
const VSOCK_CONNECTIONS: u64 = 8;
const VSOCK_BYTES: u64 = 4 << 20;

/// The guest opens [`VSOCK_CONNECTIONS`] connections to the host and sends [`VSOCK_BYTES`] on
/// each; the host accepts them and reads nothing. Each connection may hold 256 KiB in the VMM
/// (its advertised receive buffer) beyond what the host socket takes: 2 MiB in all, where a VMM
/// buffering every byte would hold nearly 32 MiB. Meanwhile a host-initiated connection to the
/// guest's echo completes; then the host reads every stream to its end and the guest finishes.
fn vsock_flood(art: &Artifacts, dir: &Path) {
    let uds = dir.join("v.sock");
    let listener = listen_for_the_vmm(dir, &format!("{}_5000", uds.display()));
    let body = format!(
        "guest-tool vsock-echo 6000 & E=$!; \
         guest-tool vsock-flood 5000 {VSOCK_CONNECTIONS} {VSOCK_BYTES}; wait $E"
    );
    let initrd = initramfs(art, dir, &body);
    let vm = Boot::new(art, &initrd)
        .arg("--vsock")
        .arg(format!("3,{}", uds.display()))
        .timeout(Duration::from_secs(600))
        .spawn();
    let streams: Vec<_> = (0..VSOCK_CONNECTIONS).map(|_| accept(&listener)).collect();
    // The guest runs (so the jailed VMM is up, below `microvm boot`) and floods.
    let rss = RssSampler::start(vm.vmm_pid());
    ping(&uds, 6000);
    // Let the stalled streams fill every buffer the VMM is willing to hold.
    std::thread::sleep(Duration::from_secs(3));
    let own_kib = rss.stop();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| std::thread::spawn(move || std::io::copy(&mut s, &mut std::io::sink())))
        .collect();
    for r in readers {
        assert_eq!(
            r.join().unwrap().unwrap(),
            VSOCK_BYTES,
            "a stream lost bytes"
        );
    }
    let out = vm.wait();
    out.expect_ok(&["VSOCK-FLOOD-DONE", "VSOCK-ECHO-DONE", "GUEST-END rc=0"]);
    assert_bounded("vsock flood", own_kib, &out.stderr);
}

/// Rounds of reading and writing the whole disk in the block flood.
const BLOCK_ROUNDS: u32 = 4;
const DISK_MIB: u64 = 32;

/// The guest reads and writes its whole disk [`BLOCK_ROUNDS`] times with O_DIRECT (every request
/// reaches the VMM, 256 in flight at most: the queue's size) while the host pings it; the VMM
/// serves each request straight between the image and guest memory, so its own memory does not
/// grow with the bytes moved (256 MiB).
fn block_flood(art: &Artifacts, dir: &Path) {
    let uds = dir.join("v.sock");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; (DISK_MIB << 20) as usize]).unwrap();
    let body = format!(
        "guest-tool vsock-echo 6000 & E=$!; \
         for i in $(seq {BLOCK_ROUNDS}); do \
           dd if=/dev/zero of=/dev/vda bs=256k count={} oflag=direct 2>/dev/null & W=$!; \
           dd if=/dev/vda of=/dev/null bs=256k iflag=direct 2>/dev/null; wait $W; \
         done; echo BLOCK-FLOOD-DONE; wait $E",
        DISK_MIB * 4
    );
    let initrd = initramfs(art, dir, &body);
    let vm = Boot::new(art, &initrd)
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("3,{}", uds.display()))
        .timeout(Duration::from_secs(600))
        .spawn();
    ping(&uds, 6000);
    // The guest runs (so the jailed VMM is up, below `microvm boot`) and its flood goes on.
    let rss = RssSampler::start(vm.vmm_pid());
    let out = vm.wait();
    let own_kib = rss.stop();
    out.expect_ok(&["BLOCK-FLOOD-DONE", "VSOCK-ECHO-DONE", "GUEST-END rc=0"]);
    assert_bounded("block flood", own_kib, &out.stderr);
}
