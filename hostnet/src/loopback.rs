//! The pod namespace's loopback, led into the VM for `kubectl port-forward`.
//!
//! containerd's CRI plugin forwards a port by entering the pod's network namespace on the host
//! and dialing `localhost:PORT` there (`tcp4`, then `tcp6`). With the pod in a VM, nothing
//! listens in that namespace: its `eth0` only mirrors frames to the VM's tap. So [`redirect`]
//! opens a listener on `127.0.0.1` in the namespace and adds a `nat OUTPUT` rule that sends every
//! TCP connection to `127.0.0.1` there to it; the listener's owner reads each connection's
//! original port (`SO_ORIGINAL_DST`, [`original_port`]) and carries it into the VM. Nothing but
//! containerd's port-forward makes connections in the pod's namespace on the host, and the rule
//! and listener end with the namespace.

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use crate::{netns, Error};

/// A TCP listener on `127.0.0.1` inside `netns` that every TCP connection made to `127.0.0.1`
/// in that namespace reaches (`iptables -t nat -A OUTPUT ... -j REDIRECT`; the `iptables`
/// program must be installed).
pub fn redirect(netns: &Path) -> Result<TcpListener, Error> {
    load_modules();
    netns::run_in(netns, || {
        let err = |what: &str, e: &dyn std::fmt::Display| Error::Redirect(format!("{what}: {e}"));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| err("listen on 127.0.0.1", &e))?;
        let port = listener
            .local_addr()
            .map_err(|e| err("the listener's port", &e))?
            .port()
            .to_string();
        // Children inherit the calling thread's network namespace: this one's.
        let out = Command::new("iptables")
            .args(["-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"])
            .args(["-d", "127.0.0.1/32", "-j", "REDIRECT", "--to-ports", &port])
            .output()
            .map_err(|e| err("run iptables", &e))?;
        if !out.status.success() {
            return Err(err(
                "iptables -t nat -A OUTPUT ... -j REDIRECT",
                &String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        Ok(listener)
    })
}

/// The port a connection accepted by a [`redirect`] listener was made to.
pub fn original_port(conn: &impl AsRawFd) -> std::io::Result<u16> {
    // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u16::from_be(addr.sin_port))
}

/// The kernel modules of the rule (iptables' nf_tables backend, NAT, the REDIRECT target):
/// loaded first, best effort, because not every kernel loads them on demand (the testbed's
/// does not always).
const MODULES: &[&str] = &[
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_nat",
    "xt_REDIRECT",
    "xt_tcpudp",
];

fn load_modules() {
    let done = Command::new("modprobe")
        .args(["-a", "-q"])
        .args(MODULES)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    tracing::debug!("modprobe of the redirect's modules: {done:?}");
}
