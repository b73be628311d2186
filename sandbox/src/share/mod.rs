//! Host directories shared live into the guest through virtio-fs: one virtiofsd per VM, serving
//! one share (the tag [`SHARE_TAG`]) that holds only that VM's directories.
//!
//! The share's root is `<state_dir>/share`, an empty read-only directory with one subdirectory
//! per shared directory (`0`, `1`, ...). virtiofsd is started in steps that confine it before it
//! reads a single guest request:
//!
//! 1. **Its own mount namespace** (made here, before exec): the share root bind-mounted onto
//!    itself read-only, and each host directory bind-mounted onto its subdirectory, read-only
//!    for a read-only share. These mounts exist only in the daemon's namespace: nothing on the
//!    host's mount table changes, and nothing needs cleaning up when the daemon dies.
//! 2. **A user namespace** in which guest ids are host ids far from any real user: guest uid/gid
//!    `g` is host id [`SHARE_ID_BASE`]` + g` for `g` below [`SHARE_ID_COUNT`]; host ids outside
//!    that range (root included) are unmapped, so the daemon holds no capability over their
//!    files. A guest therefore cannot create a device node (no `mknod` outside the initial user
//!    namespace), cannot make a setuid-root file (files it creates belong to the mapped range,
//!    and it cannot chmod files of unmapped owners), and writes only where the mapped ids may
//!    write. The user namespace is made by a short-lived holder process whose id maps this
//!    (root) process writes; the daemon then joins it.
//! 3. **virtiofsd's own sandbox**: `--sandbox namespace` (new mount, PID and network namespaces,
//!    `pivot_root` into the share root, so no path outside it exists for the daemon),
//!    `--seccomp kill`, capabilities dropped to what file serving needs minus `mknod` and
//!    `setfcap`, no extended attributes (so no file capabilities either).
//!
//! The mounts' read-only flags are locked from the daemon's point of view (they were made in a
//! more privileged namespace), so a `:ro` share stays read-only whatever the guest sends.
//!
//! **A live share** ([`crate::SandboxConfig::live_share`], the containerd shim's one share per
//! pod): the caller owns the share root ([`share_root`]), makes it a shared mount of its own
//! before the VM starts and bind-mounts directories and files under it while the VM runs. The
//! daemon's namespace is then made a slave of the caller's (step 1 uses `MS_SLAVE` instead of
//! `MS_PRIVATE`; virtiofsd's own sandbox keeps slave propagation), so mounts the caller adds or
//! removes under the root appear and disappear in the daemon's view, and nothing the daemon
//! does propagates back.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{Console, Error, Mount, Result};

/// The virtio-fs tag of the one share of a VM.
pub const SHARE_TAG: &str = "microvm";
/// Where the agent mounts the share in the guest; shared directory `i` is `<this>/<i>`.
pub const GUEST_SHARE_DIR: &str = "/run/shares/microvm";
/// Host uid and gid that guest id 0 has on shared files (guest id `g` is this plus `g`).
pub const SHARE_ID_BASE: u32 = 1_000_000_000;
/// How many guest ids are mapped (0 to 65535); others cannot own shared files.
pub const SHARE_ID_COUNT: u32 = 65_536;
/// Open files the daemon may hold: bounds what a guest flooding it with lookups can make it
/// keep (each inode the guest holds is an open `O_PATH` descriptor).
const DAEMON_MAX_FILES: u64 = 65_536;

/// A host directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    pub host: PathBuf,
    pub read_only: bool,
}

/// The share root of a VM whose state directory is `state_dir`: the directory virtiofsd serves.
pub fn share_root(state_dir: &Path) -> PathBuf {
    state_dir.join("share")
}

/// The guest path of shared directory `index` (once the guest mounted [`guest_mount`]).
pub fn guest_path(index: usize) -> String {
    format!("{GUEST_SHARE_DIR}/{index}")
}

/// The sandbox mount that makes the share visible in the guest at [`GUEST_SHARE_DIR`].
pub fn guest_mount() -> Mount {
    Mount {
        source: SHARE_TAG.into(),
        destination: GUEST_SHARE_DIR.into(),
        fstype: "virtiofs".into(),
        options: Vec::new(),
    }
}

/// A running virtiofsd; dropping it kills and reaps it.
pub(crate) struct Virtiofsd {
    child: Child,
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::io(context, e)
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} has a NUL byte", p.display())))
}

/// The mounts the daemon's namespace gets, as C strings made before the fork.
struct NamespaceMounts {
    root: CString,
    /// (host directory, its mount point under the root, read-only)
    shares: Vec<(CString, CString, bool)>,
    /// Mounts made later under the root (in the caller's namespace) reach the daemon.
    live: bool,
}

impl Virtiofsd {
    /// Lays out the share root under `state_dir` and starts `binary` serving it. With `live`,
    /// the root is the caller's (see the module docs) and `shares` must be empty.
    pub fn spawn(
        binary: &Path,
        state_dir: &Path,
        shares: &[SharedDir],
        live: bool,
        output: &Console,
    ) -> Result<Virtiofsd> {
        let root = share_root(state_dir);
        let mut mounts = NamespaceMounts {
            root: cstr(&root)?,
            shares: Vec::new(),
            live,
        };
        if live {
            if !shares.is_empty() {
                return Err(Error::Invalid(
                    "a live share takes no fixed shared directories".into(),
                ));
            }
            if !root.is_dir() {
                return Err(Error::Invalid(format!(
                    "the live share root {} is not a directory",
                    root.display()
                )));
            }
        } else {
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).map_err(io(format!("create {}", root.display())))?;
            searchable(&root)?;
        }
        for (i, s) in shares.iter().enumerate() {
            let point = root.join(i.to_string());
            fs::create_dir(&point).map_err(io(format!("create {}", point.display())))?;
            searchable(&point)?;
            let md = fs::metadata(&s.host).map_err(io(format!("shared {}", s.host.display())))?;
            if !md.is_dir() {
                return Err(Error::Invalid(format!(
                    "shared {} is not a directory",
                    s.host.display()
                )));
            }
            mounts
                .shares
                .push((cstr(&s.host)?, cstr(&point)?, s.read_only));
        }
        let socket = state_dir.join("virtiofs.sock");
        let _ = fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).map_err(io(format!("listen on {}", socket.display())))?;
        // A chrooted process (the testbed's L1) may not create user namespaces (EPERM); then
        // the daemon runs as the unprivileged host id SHARE_ID_BASE without one (no pivot_root
        // either: virtiofsd's own sandbox needs a user namespace when not root).
        let holder = match UserNamespaceHolder::start() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(
                    "no user namespace for virtiofsd ({e}); it runs as uid {SHARE_ID_BASE} \
                     without its namespace sandbox"
                );
                None
            }
        };
        let userns = match &holder {
            Some(h) => Some(
                fs::File::open(format!("/proc/{}/ns/user", h.0.id()))
                    .map_err(io("open the share's user namespace"))?,
            ),
            None => None,
        };

        let mut cmd = Command::new(binary);
        cmd.arg(format!("--fd={}", listener.as_raw_fd()))
            .arg("--shared-dir=.");
        match holder {
            Some(_) => cmd.arg("--sandbox=namespace"),
            None => cmd.arg("--sandbox=none"),
        };
        cmd.args([
            "--seccomp=kill",
            "--modcaps=-mknod:-setfcap",
            "--inode-file-handles=never",
            "--rlimit-nofile=0",
            "--log-level=warn",
        ])
        .stdin(Stdio::null());
        if !live && shares.iter().all(|s| s.read_only) {
            cmd.arg("--readonly");
        }
        output.redirect(&mut cmd)?;
        let max_files = max_files();
        let listener_fd = listener.as_raw_fd();
        let userns_fd = userns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and makes only raw system
        // calls on memory prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || confine(listener_fd, userns_fd, max_files, &mounts));
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("start virtiofsd {}", binary.display())))?;
        drop(holder);
        tracing::debug!(pid = child.id(), "virtiofsd started");
        Ok(Virtiofsd { child, socket })
    }
}

/// Makes a directory of the share's layout 0755 whatever the umask: the daemon, an unmapped id
/// in its user namespace, must search the root and list it (the directories hold nothing but
/// mount points, and the root is bound read-only in the daemon's namespace).
fn searchable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(io(format!("chmod {}", dir.display())))
}

/// [`DAEMON_MAX_FILES`], or this process's hard limit if that is lower (raising it needs
/// `CAP_SYS_RESOURCE`).
fn max_files() -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return 1024;
    }
    cur.rlim_max.min(DAEMON_MAX_FILES)
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs in the daemon's process between fork and exec: the steps 1 and 2 of the module docs.
fn confine(
    listener: RawFd,
    userns: Option<RawFd>,
    max_files: u64,
    mounts: &NamespaceMounts,
) -> std::io::Result<()> {
    // SAFETY (whole function): raw system calls on descriptors this process owns and on C
    // strings that live in the closure; nothing here allocates.
    unsafe {
        // The listening socket is the one descriptor the daemon inherits on purpose.
        check(libc::fcntl(listener, libc::F_SETFD, 0))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        let files = libc::rlimit {
            rlim_cur: max_files,
            rlim_max: max_files,
        };
        check(libc::setrlimit(libc::RLIMIT_NOFILE, &files))?;
        check(libc::unshare(libc::CLONE_NEWNS))?;
        let none = std::ptr::null::<libc::c_char>();
        // A live share receives the caller's later mounts under its root; nothing the daemon
        // mounts ever propagates back either way.
        let propagation = if mounts.live {
            libc::MS_SLAVE
        } else {
            libc::MS_PRIVATE
        };
        check(libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | propagation,
            std::ptr::null(),
        ))?;
        bind(&mounts.root, &mounts.root, true, false)?;
        for (host, point, read_only) in &mounts.shares {
            // A read-only share is not recursive: a read-only remount covers one mount only,
            // and a submount under it would stay writable.
            bind(host, point, *read_only, !*read_only)?;
        }
        // The daemon reaches the share root through its working directory (`--shared-dir=.`),
        // entered while this process is still host root: once in the user namespace (or as the
        // unmapped id), it may not search the root's ancestors (a 0700 home or state directory).
        check(libc::chdir(mounts.root.as_ptr()))?;
        match userns {
            Some(userns) => {
                check(libc::setns(userns, libc::CLONE_NEWUSER))?;
                check(libc::setresgid(0, 0, 0))?;
                check(libc::setresuid(0, 0, 0))?;
            }
            None => {
                check(libc::setresgid(SHARE_ID_BASE, SHARE_ID_BASE, SHARE_ID_BASE))?;
                check(libc::setresuid(SHARE_ID_BASE, SHARE_ID_BASE, SHARE_ID_BASE))?;
            }
        }
    }
    Ok(())
}

/// Bind-mounts `src` on `dst` with nosuid and nodev, read-only if asked.
///
/// # Safety
/// Raw `mount(2)` calls; only for the daemon's child between fork and exec.
unsafe fn bind(
    src: &CString,
    dst: &CString,
    read_only: bool,
    recursive: bool,
) -> std::io::Result<()> {
    let none = std::ptr::null::<libc::c_char>();
    let rec = if recursive { libc::MS_REC } else { 0 };
    check(libc::mount(
        src.as_ptr(),
        dst.as_ptr(),
        none,
        libc::MS_BIND | rec,
        std::ptr::null(),
    ))?;
    let ro = if read_only { libc::MS_RDONLY } else { 0 };
    check(libc::mount(
        none,
        dst.as_ptr(),
        none,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | ro,
        std::ptr::null(),
    ))
}

/// A process that only holds a new user namespace with the share's id maps, so the daemon can
/// join it (a process cannot give itself a map of more than its own id, and the daemon's own
/// parent is busy in `spawn` until it execs). Killed once the daemon joined.
struct UserNamespaceHolder(Child);

impl UserNamespaceHolder {
    fn start() -> Result<Self> {
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: unshare is a plain system call, safe between fork and exec.
        unsafe {
            cmd.pre_exec(|| check(libc::unshare(libc::CLONE_NEWUSER)));
        }
        let holder = UserNamespaceHolder(
            cmd.spawn()
                .map_err(io("start the user namespace holder (sleep)"))?,
        );
        let map = format!("0 {SHARE_ID_BASE} {SHARE_ID_COUNT}\n");
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{}/{file}", holder.0.id());
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(map.as_bytes()))
                .map_err(io(format!("write {path}")))?;
        }
        Ok(holder)
    }
}

impl Drop for UserNamespaceHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests;
