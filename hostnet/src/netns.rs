//! Running code inside another network namespace without moving the caller.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* only. Each call here
//! spawns a thread, moves that thread into the namespace, runs the work there and lets the
//! thread end, so the caller's threads (a tokio runtime, a shim's workers) never change
//! namespace. Sockets (netlink included) and tap fds opened on that thread belong to the
//! namespace for their whole life, whatever thread later uses them.
//!
//! [`create`] and [`remove`] make and delete a named namespace as `ip netns add`/`del` do: a new
//! namespace held by a bind mount of its nsfs file (`/run/netns/NAME`), so it outlives every
//! process in it and can be entered by path.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use rtnetlink::Handle;

use crate::Error;

/// Runs `work` on a new thread that entered the network namespace at `netns` (a bind mount such
/// as `/var/run/netns/cni-…`, or `/proc/PID/ns/net`), and returns its result.
pub fn run_in<R, F>(netns: &Path, work: F) -> Result<R, Error>
where
    F: FnOnce() -> Result<R, Error> + Send + 'static,
    R: Send + 'static,
{
    let path = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("hostnet-netns".into())
        .spawn(move || {
            enter(&path)?;
            work()
        })
        .map_err(|source| Error::Thread(source.to_string()))?;
    thread
        .join()
        .map_err(|_| Error::Thread("the netns thread panicked".into()))?
}

/// Runs the netlink conversation `talk` inside the network namespace at `netns`: the netlink
/// socket is opened on a thread in that namespace and driven by a runtime of its own there.
pub fn with_netlink<R, F, Fut>(netns: &Path, talk: F) -> Result<R, Error>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Error>>,
    R: Send + 'static,
{
    run_in(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::Thread(format!("netlink runtime: {e}")))?;
        runtime.block_on(async move {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
            let driver = tokio::spawn(connection);
            let result = talk(handle).await;
            driver.abort();
            result
        })
    })
}

fn enter(netns: &PathBuf) -> Result<(), Error> {
    let ns = File::open(netns).map_err(|source| Error::Netns {
        path: netns.clone(),
        source,
    })?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns {
        path: netns.clone(),
        source: e.into(),
    })
}

/// Creates a new, empty network namespace (only a loopback device, down) held by a bind mount
/// at `path` (its parent directory must exist; `/run/netns/NAME` for one that `ip netns` lists).
/// Fails if `path` exists. The namespace lives until [`remove`].
pub fn create(path: &Path) -> Result<(), Error> {
    let err = |source: std::io::Error| Error::Netns {
        path: path.to_path_buf(),
        source,
    };
    // The mount point: an empty file, made here so that an existing one is an error, not a
    // namespace silently replaced.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let target = path.to_path_buf();
    let made = std::thread::Builder::new()
        .name("hostnet-netns-new".into())
        .spawn(move || -> Result<(), std::io::Error> {
            // This thread alone moves into the new namespace, and ends after the bind mount.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .map_err(|e| Error::Thread(e.to_string()))?
        .join()
        .map_err(|_| Error::Thread("the netns thread panicked".into()))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

/// Deletes the namespace [`create`] made at `path`: unmounts it (lazily: a process still in it,
/// or an fd open on it, keeps it alive until they end) and removes the file. Idempotent: a
/// missing `path` is nothing to do; a file that is not mounted is only removed.
pub fn remove(path: &Path) -> Result<(), Error> {
    let err = |source: std::io::Error| Error::Netns {
        path: path.to_path_buf(),
        source,
    };
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(err(e.into())),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}
