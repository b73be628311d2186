//! `kubectl port-forward` into the pod's VM. containerd dials `localhost:PORT` inside the pod's
//! network namespace on the host; [`hostnet::loopback::redirect`] makes every such connection
//! reach a listener of the shim's there, and each one is carried to the same port of the VM's
//! loopback through the agent ([`Sandbox::connect_guest_port`]).
//!
//! The accept loop holds the sandbox weakly: it must not keep the VMM alive once the pod ends
//! (the task is aborted then too). A connection being forwarded holds only its two streams.

use std::path::Path;
use std::sync::{Arc, Weak};

use anyhow::Context;
use sandbox::Sandbox;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Starts forwarding connections made to `127.0.0.1` in `netns` into the VM of `sandbox`, until
/// the returned task is aborted.
pub async fn start(netns: &Path, sandbox: &Arc<Sandbox>) -> anyhow::Result<JoinHandle<()>> {
    let ns = netns.to_path_buf();
    let listener = tokio::task::spawn_blocking(move || hostnet::loopback::redirect(&ns))
        .await?
        .with_context(|| format!("in the pod's network namespace {}", netns.display()))?;
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let sandbox = Arc::downgrade(sandbox);
    Ok(tokio::spawn(accept_loop(listener, sandbox)))
}

async fn accept_loop(listener: TcpListener, sandbox: Weak<Sandbox>) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let Some(sb) = sandbox.upgrade() else {
                    return;
                };
                tokio::spawn(async move {
                    if let Err(e) = forward(conn, sb).await {
                        tracing::info!("port forward: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("port forward accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One forwarded connection: its original port, the guest's end, then bytes both ways.
async fn forward(mut conn: TcpStream, sandbox: Arc<Sandbox>) -> anyhow::Result<()> {
    let port = hostnet::loopback::original_port(&conn).context("the connection's port")?;
    let guest = sandbox.connect_guest_port(port).await;
    drop(sandbox);
    let mut guest = guest?;
    let (sent, received) = tokio::io::copy_bidirectional(&mut conn, &mut guest)
        .await
        .with_context(|| format!("port {port}"))?;
    tracing::debug!(port, sent, received, "port forward ended");
    Ok(())
}
