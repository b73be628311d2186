//! PID 1 duties: the kernel filesystems, the console log, the boot marker, the reset.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

use nix::mount::MsFlags;

/// Where the agent keeps its per-container state (on the /run tmpfs).
pub const STATE_DIR: &str = "/run/microvm";
/// The cgroup every container's cgroup lives under.
pub const CGROUP_PARENT: &str = "/sys/fs/cgroup/microvm";

/// Test-only kernel command-line word: the agent panics 500 ms after its first `Health` reply,
/// so a test can see that a panicking agent resets the VM. Only the host sets the kernel
/// command line (at boot), so no container can reach this.
pub const PANIC_AFTER_HEALTH_FLAG: &str = "microvm.agent_panic_after_health=1";

/// Whether the kernel command line has `word` (a whole word).
pub fn cmdline_has(word: &str) -> bool {
    fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.split_whitespace().any(|w| w == word))
}

/// The argument the agent re-executes itself with once it runs from its tmpfs root.
pub const SWITCHED_ARG: &str = "--switched-root";

/// Leaves the initramfs: copies the agent onto a fresh tmpfs, makes that tmpfs the root
/// (`MS_MOVE` onto `/`, `chroot`, as switch_root(8) does) and re-executes the agent there with
/// [`SWITCHED_ARG`]. Returns only on failure.
///
/// Why: the initramfs root (rootfs) is the one mount with no parent, and `pivot_root(2)`
/// refuses it, so the container crate could only `chroot` containers (escapable with
/// CAP_SYS_CHROOT). The initramfs copy of the agent is unlinked, so its memory is freed once
/// the new image runs.
pub fn leave_initramfs(exe: &str) -> io::Result<std::convert::Infallible> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| io::Error::other(format!("{what}: {e}"))
    };
    let image = fs::read(exe)?;
    let new_root = Path::new("/newroot");
    fs::create_dir_all(new_root)?;
    nix::mount::mount(
        Some("rootfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(err("mount a tmpfs on /newroot"))?;
    for d in ["dev", "proc", "sys", "run", "tmp", "etc"] {
        fs::create_dir_all(new_root.join(d))?;
    }
    let init = new_root.join("init");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&init)?
        .write_all(&image)?;
    drop(image);
    let _ = fs::remove_file(exe);
    nix::unistd::chdir(new_root).map_err(err("chdir /newroot"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(err("move /newroot onto /"))?;
    nix::unistd::chroot(".").map_err(err("chroot"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    let path = c"/init";
    let arg = std::ffi::CString::new(SWITCHED_ARG).expect("no NUL");
    let e = nix::unistd::execv(path, &[path, arg.as_c_str()]).unwrap_err();
    Err(io::Error::other(format!("exec /init on the new root: {e}")))
}

struct Fs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// Mounts the kernel filesystems (each one only if its target is not a mount point already),
/// makes the usual /dev links, and enables the cgroup v2 controllers for containers.
pub fn mount_kernel_filesystems() -> io::Result<()> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let table = [
        Fs {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        Fs {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
        Fs {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
        Fs {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("mode=0620,ptmxmode=0666,gid=5"),
        },
        Fs {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=1777"),
        },
        Fs {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: Some("nsdelegate"),
        },
        Fs {
            source: "run",
            target: "/run",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=0755"),
        },
        Fs {
            source: "tmp",
            target: "/tmp",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=1777"),
        },
    ];
    for fs in &table {
        fs::create_dir_all(fs.target)?;
        if is_mount_point(Path::new(fs.target)) {
            continue;
        }
        nix::mount::mount(
            Some(fs.source),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            fs.data,
        )
        .map_err(|e| io::Error::other(format!("mount {} on {}: {e}", fs.fstype, fs.target)))?;
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            std::os::unix::fs::symlink(target, link)?;
        }
    }
    if fs::symlink_metadata("/dev/ptmx").is_err() {
        std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx")?;
    }
    fs::create_dir_all(STATE_DIR)?;
    fs::create_dir_all("/etc")?;
    enable_cgroup_controllers()
}

/// Whether `path` is a mount point (its device differs from its parent's, or it is "/").
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(me), Some(parent)) = (fs::metadata(path), path.parent()) else {
        return false;
    };
    match fs::metadata(parent) {
        Ok(p) => p.dev() != me.dev() || p.ino() == me.ino(),
        Err(_) => false,
    }
}

/// Enables every available controller in the root's and [`CGROUP_PARENT`]'s subtree_control.
fn enable_cgroup_controllers() -> io::Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    let available = fs::read_to_string(root.join("cgroup.controllers"))?;
    fs::create_dir_all(CGROUP_PARENT)?;
    for dir in [root, Path::new(CGROUP_PARENT)] {
        for c in available.split_whitespace() {
            // One at a time: a controller the kernel refuses does not block the others.
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")) {
                tracing::warn!("cannot enable the {c} controller in {}: {e}", dir.display());
            }
        }
    }
    Ok(())
}

/// Writes `value` to port 0x3f0 through /dev/port: the VMM logs it as a boot marker.
pub fn boot_marker(value: u8) {
    let r = fs::OpenOptions::new()
        .write(true)
        .open("/dev/port")
        .and_then(|f| f.write_at(&[value], 0x3f0));
    if let Err(e) = r {
        tracing::warn!("cannot write boot marker {value}: {e}");
    }
}

/// The console, for logs: /dev/console, opened without becoming our controlling terminal.
pub fn open_console() -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
}

/// Syncs, unmounts everything it can (innermost first) and resets the VM. Does not return.
/// When the agent is not PID 1 (a developer running it by hand) it exits instead.
pub fn reboot() -> ! {
    nix::unistd::sync();
    if std::process::id() != 1 {
        std::process::exit(0);
    }
    unmount_all();
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached if reboot(2) failed: nothing else can end the VM.
    let _ = writeln!(io::stderr(), "microvm-agent: reboot failed: {e:?}");
    loop {
        std::thread::park();
    }
}

/// Unmounts every mount in reverse order of /proc/self/mounts; a busy one read-only.
fn unmount_all() {
    let Ok(text) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let targets: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .collect();
    for target in targets.iter().rev() {
        if target == "/" {
            continue;
        }
        if nix::mount::umount2(target.as_str(), nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::mount(
                None::<&str>,
                target.as_str(),
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
}

/// /proc/self/mounts escapes space, tab, newline and backslash as \ooo.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How long the orderly reset after a panic (sync, unmount) may take before a watchdog resets
/// the VM without them.
const PANIC_RESET_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A panic must not hang the VM: log it to the console and reset. The message goes straight
/// to the console first (the logger's lock may be held by the panicking thread), and a
/// watchdog thread resets the VM without syncing if the orderly reset hangs (a stuck disk).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("microvm-agent: PANIC: {info}; resetting the VM");
        if let Ok(mut c) = open_console() {
            let _ = writeln!(c, "{msg}");
        }
        if std::process::id() == 1 {
            let _ = std::thread::Builder::new().spawn(|| {
                std::thread::sleep(PANIC_RESET_GRACE);
                let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            });
        }
        tracing::error!("{msg}");
        reboot();
    }));
}

/// Milliseconds since boot (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/run/a\\040b"), "/run/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/end\\04"), "/end\\04");
    }
}
