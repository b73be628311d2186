//! Running code inside another network namespace without moving the caller.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* only. Each call here
//! spawns a thread, moves that thread into the namespace, runs the work there and lets the
//! thread end, so the caller's threads (a tokio runtime, a shim's workers) never change
//! namespace. Sockets (netlink included) and tap fds opened on that thread belong to the
//! namespace for their whole life, whatever thread later uses them.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
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
