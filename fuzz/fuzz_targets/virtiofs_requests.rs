//! virtio-fs: arbitrary FUSE requests from a hostile guest, served by the daemon microvm ships
//! (the `virtiofsd` crate's `Server` over its `PassthroughFs`, the code behind the `virtiofsd`
//! binary) on a scratch shared directory, confined the way the daemon is: the serving thread's
//! root is the share (virtiofsd's `--sandbox chroot`; microvm starts it with `--sandbox
//! namespace`, a `pivot_root` into the share, the same view), without `CAP_MKNOD` and
//! `CAP_SETFCAP` (microvm's `--modcaps=-mknod:-setfcap`), no xattrs, no file handles.
//!
//! Input: the daemon first gets the guest kernel's `FUSE_INIT`, then up to [`MAX_REQUESTS`]
//! requests, each `len:u16 reply:u16` and `len & 0x7fff` bytes of request (header and body,
//! read by the daemon from one descriptor, or two when `len`'s top bit is set), answered into a
//! `reply`-byte writable descriptor (none when 0).
//!
//! After every input, nothing beside the share has changed: the scratch directory holds only
//! `share` and `outside`, and `outside` and its `secret` keep their content, inode, mode, owner
//! and times. Before each input the share is as its fixture makes it (files, a directory, a
//! hard link, symbolic links to `../outside/secret`, to `/outside/secret` and to `..`): made
//! again after any input that changed it. Needs
//! root (`chroot`), as `cargo xtask fuzz` has in CI.
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use caps::{CapSet, Capability, CapsHashSet};
use fs_vhost_user_backend::bitmap::BitmapMmapRegion;
use fs_virtio_queue::desc::split::Descriptor as SplitDescriptor;
use fs_virtio_queue::desc::RawDescriptor;
use fs_virtio_queue::mock::MockSplitQueue;
use fs_vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use libfuzzer_sys::fuzz_target;
use microvm_fuzz::tree::tree_state;
use microvm_fuzz::Input;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtiofsd::descriptor_utils::{Reader, Writer};
use virtiofsd::passthrough::{self, PassthroughFs};
use virtiofsd::server::Server;

/// The thread that plays the daemon.
const SERVING_THREAD: &str = "virtiofsd";
/// Requests per input, so one input cannot run for long.
const MAX_REQUESTS: usize = 32;
/// Guest memory: the queue's rings in the first page, the request at [`REQUEST_AT`] (up to
/// 32 KiB), the reply at [`REPLY_AT`] (up to 64 KiB).
const MEM_SIZE: usize = 0x10_0000;
const REQUEST_AT: u64 = 0x1_0000;
const REPLY_AT: u64 = 0x9_0000;
/// What the daemon may hold open for the guest (microvm bounds it with `RLIMIT_NOFILE`).
const GUEST_FD_LIMIT: u64 = 4096;
/// Files the daemon writes stay small (a guest's `fallocate` of a terabyte fails with EFBIG
/// instead of filling the fuzzing machine's disk).
const MAX_FILE_SIZE: u64 = 64 << 20;
/// `FUSE_INIT` and the flags a Linux guest sends.
const FUSE_INIT: u32 = 26;
const INIT_FLAGS: u32 = 0x3fff_ffff;

/// The scratch directory and the serving thread.
struct Harness {
    base: tempfile::TempDir,
    outside_before: Vec<String>,
    /// The fixture's change times when it was last made: equal, it is still as made.
    share_stamp: Vec<(i64, i64, u64)>,
    inputs: Sender<Vec<u8>>,
    served: Receiver<()>,
}

fuzz_target!(|data: &[u8]| {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    let harness = HARNESS.get_or_init(|| Mutex::new(Harness::start()));
    let mut h = harness.lock().unwrap();
    let share = h.base.path().join("share");
    if share_stamp(&share) != h.share_stamp {
        make_share(&share);
        h.share_stamp = share_stamp(&share);
    }
    h.inputs.send(data.to_vec()).unwrap();
    h.served.recv().expect("the serving thread ended");
    let after = outside_state(h.base.path());
    assert_eq!(
        h.outside_before, after,
        "something beside the share changed"
    );
});

impl Harness {
    fn start() -> Harness {
        limit_file_size();
        let base = tempfile::tempdir().unwrap();
        fs::create_dir(base.path().join("outside")).unwrap();
        fs::write(base.path().join("outside/secret"), "secret\n").unwrap();
        fs::set_permissions(
            base.path().join("outside/secret"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let share = base.path().join("share");
        fs::create_dir(&share).unwrap();
        make_share(&share);
        let outside_before = outside_state(base.path());
        let share_stamp = share_stamp(&share);
        // Opened before the thread's root moves into the share, as virtiofsd does.
        let proc_self_fd = fs::File::open("/proc/self/fd").unwrap();
        let (inputs, requests) = channel::<Vec<u8>>();
        let (done, served) = channel();
        report_daemon_panics();
        std::thread::Builder::new()
            .name(SERVING_THREAD.into())
            .spawn(move || serve(&share, proc_self_fd, requests, done))
            .unwrap();
        Harness {
            base,
            outside_before,
            share_stamp,
            inputs,
            served,
        }
    }
}

/// The serving thread: confined once, then a fresh daemon per input.
fn serve(share: &Path, proc_self_fd: fs::File, inputs: Receiver<Vec<u8>>, done: Sender<()>) {
    confine(share);
    let mem =
        GuestMemoryMmap::<BitmapMmapRegion>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    for input in inputs {
        // A daemon panic ends this input (the daemon would be gone); see `report_daemon_panics`.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_one(&mem, &proc_self_fd, &input)
        }));
        done.send(()).unwrap();
    }
}

/// One input: a fresh daemon, the guest's `FUSE_INIT`, then the input's requests.
fn serve_one(mem: &GuestMemoryMmap<BitmapMmapRegion>, proc_self_fd: &fs::File, input: &[u8]) {
    let config = passthrough::Config {
        proc_sfd_rawfd: Some(proc_self_fd.try_clone().unwrap()),
        guest_fd_limit: GUEST_FD_LIMIT,
        ..Default::default()
    };
    let server = Server::new(PassthroughFs::new(config).expect("the passthrough fs"));
    request(&server, mem, &init_request(), false, 256);
    let mut input = Input(input);
    for _ in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        let len = input.u16();
        let reply = input.u16();
        let message = input.bytes(usize::from(len & 0x7fff));
        request(&server, mem, message, len & 0x8000 != 0, reply);
    }
}

/// A panic inside the daemon's code (the `virtiofsd` crate) is reported once per place (a
/// `finding: ` line, which `cargo xtask fuzz` shows) and ends the input, instead of libFuzzer's
/// abort: virtiofsd 1.14.0 has guest-reachable `unwrap`s (`fuzz/findings/README.md`), and a
/// panic kills only the worker of the one VM whose guest sent the request (its share stops
/// answering; the host, the VMM and other VMs go on). Any other panic (this harness's checks,
/// the invariant) still aborts, and so does every sanitizer report.
fn report_daemon_panics() {
    let libfuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let in_daemon =
            std::thread::current().name() == Some(SERVING_THREAD) && at.contains("/virtiofsd-");
        if !in_daemon {
            return libfuzzer_hook(info);
        }
        static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let mut seen = SEEN.lock().unwrap();
        if !seen.contains(&at) {
            let what = info.payload_as_str().unwrap_or("");
            eprintln!("finding: virtiofsd panics at {at}: {what}");
            seen.push(at);
        }
    }));
}

/// This thread's own root (`unshare(CLONE_FS)`, then `chroot`) and working directory are the
/// share; its capabilities are what virtiofsd keeps by default minus `mknod` and `setfcap`.
fn confine(share: &Path) {
    // SAFETY: unshare(CLONE_FS) takes no pointers; it gives this thread its own root and
    // working directory, so the chroot below moves only the serving thread.
    let rc = unsafe { libc::unshare(libc::CLONE_FS) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_FS): {}",
        std::io::Error::last_os_error()
    );
    std::os::unix::fs::chroot(share).expect("chroot into the share (this target needs root)");
    std::env::set_current_dir("/").unwrap();
    let keep: CapsHashSet = [
        Capability::CAP_CHOWN,
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_FOWNER,
        Capability::CAP_FSETID,
        Capability::CAP_SETGID,
        Capability::CAP_SETUID,
    ]
    .into_iter()
    .collect();
    caps::set(None, CapSet::Effective, &keep).unwrap();
    caps::set(None, CapSet::Permitted, &keep).unwrap();
    caps::clear(None, CapSet::Inheritable).unwrap();
}

/// One request on a fresh queue: its descriptor chain, as the daemon's queue handler reads it.
fn request(
    server: &Server<PassthroughFs>,
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    message: &[u8],
    split: bool,
    reply: u16,
) {
    mem.write_slice(&[0; 0x1000], GuestAddress(0)).unwrap();
    mem.write_slice(message, GuestAddress(REQUEST_AT)).unwrap();
    let len = message.len() as u32;
    let mut descs = Vec::new();
    if split && len > 1 {
        descs.push(desc(REQUEST_AT, len / 2, 0));
        descs.push(desc(REQUEST_AT + u64::from(len / 2), len - len / 2, 0));
    } else if len > 0 {
        descs.push(desc(REQUEST_AT, len, 0));
    }
    if reply > 0 {
        descs.push(desc(REPLY_AT, u32::from(reply), VRING_DESC_F_WRITE as u16));
    }
    if descs.is_empty() {
        return;
    }
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue
        .build_desc_chain(&descs)
        .expect("a chain inside memory");
    let (Ok(reader), Ok(writer)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    else {
        return;
    };
    let _ = server.handle_message(reader, writer, None::<&mut ()>);
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// The guest kernel's `FUSE_INIT`: protocol 7.38, its feature flags (and no `flags2`).
fn init_request() -> Vec<u8> {
    let mut m = Vec::new();
    let body_len = 16 + 48;
    m.extend_from_slice(&(40 + body_len as u32).to_le_bytes());
    m.extend_from_slice(&FUSE_INIT.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    m.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen, padding
    for word in [7u32, 38, 128 << 10, INIT_FLAGS] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    m.extend_from_slice(&[0; 48]); // flags2 and unused
    m
}

/// The share's fixture, made again from nothing (whatever the last input left: modes, owners).
fn make_share(share: &Path) {
    std::os::unix::fs::chown(share, Some(0), Some(0)).unwrap();
    fs::set_permissions(share, fs::Permissions::from_mode(0o755)).unwrap();
    for entry in fs::read_dir(share).unwrap() {
        let path = entry.unwrap().path();
        let is_dir = fs::symlink_metadata(&path).unwrap().is_dir();
        if is_dir {
            fs::remove_dir_all(&path).unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
    }
    fs::write(share.join("a"), "hello\n").unwrap();
    fs::create_dir(share.join("d")).unwrap();
    fs::write(share.join("d/b"), "inner\n").unwrap();
    fs::hard_link(share.join("a"), share.join("d/a-link")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", share.join("up")).unwrap();
    std::os::unix::fs::symlink("/outside/secret", share.join("abs")).unwrap();
    std::os::unix::fs::symlink("..", share.join("d/dotdot")).unwrap();
}

/// The change time (and size) of the share and of every fixture entry: any write, create, remove,
/// rename, chmod or chown in the fixture changes one of them (reads do not), so an input that
/// changed nothing leaves the share to the next one without making it again.
fn share_stamp(share: &Path) -> Vec<(i64, i64, u64)> {
    ["", "a", "d", "d/b", "d/a-link", "up", "abs", "d/dotdot"]
        .iter()
        .map(|name| {
            fs::symlink_metadata(share.join(name))
                .map_or((-1, -1, 0), |m| (m.ctime(), m.ctime_nsec(), m.size()))
        })
        .collect()
}

/// What must not change: everything in the scratch directory but the share, and the secret's
/// content.
fn outside_state(base: &Path) -> Vec<String> {
    let mut state = tree_state(base, Some(&base.join("share")));
    state.push(fs::read_to_string(base.join("outside/secret")).unwrap_or_default());
    state
}

/// `RLIMIT_FSIZE` for the whole process, with `SIGXFSZ` ignored: past it a write fails
/// (EFBIG) instead of killing the fuzzer.
fn limit_file_size() {
    let limit = libc::rlimit {
        rlim_cur: MAX_FILE_SIZE,
        rlim_max: MAX_FILE_SIZE,
    };
    // SAFETY: setrlimit reads the struct it is given; signal() installs SIG_IGN, no handler.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
