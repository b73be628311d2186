//! Host signals and terminal size changes, forwarded to a guest process.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use agent_protocol::agent as pb;
use agent_protocol::ttrpc::{self, context, Code};

use crate::process::process_ref;
use crate::{Error, Result, Sandbox, WindowSize};

impl Sandbox {
    /// Forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 received by this process
    /// to a guest process until the returned task is aborted (or the process is gone).
    pub fn forward_signals(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut listeners = Vec::new();
        for k in kinds {
            let mut s = signal(SignalKind::from_raw(k))
                .map_err(|e| Error::io(format!("handle signal {k}"), e))?;
            let tx = tx.clone();
            listeners.push(tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(k).is_err() {
                        return;
                    }
                }
            }));
        }
        let client = self.client.clone();
        let timeout = self.rpc_timeout;
        let process = process_ref(container_id, exec_id);
        Ok(tokio::spawn(async move {
            let _guards = AbortOnDrop(listeners);
            while let Some(sig) = rx.recv().await {
                let req = pb::SignalProcessRequest {
                    process: process.clone(),
                    signal: sig as u32,
                    ..Default::default()
                };
                let r = client
                    .signal_process(context::with_timeout(timeout.as_nanos() as i64), &req)
                    .await;
                if let Err(e) = r {
                    tracing::debug!("forwarding signal {sig}: {e}");
                    if matches!(&e, ttrpc::Error::RpcStatus(s) if s.code() == Code::NOT_FOUND) {
                        return;
                    }
                }
            }
        }))
    }

    /// Keeps a guest terminal's size equal to the host terminal `tty`'s: sets it now and on
    /// every SIGWINCH, until the returned task is aborted.
    pub fn forward_window_size(
        &self,
        container_id: &str,
        exec_id: &str,
        tty: BorrowedFd<'_>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let tty: OwnedFd = tty
            .try_clone_to_owned()
            .map_err(|e| Error::io("dup the terminal", e))?;
        let mut winch =
            signal(SignalKind::window_change()).map_err(|e| Error::io("handle SIGWINCH", e))?;
        let client = self.client.clone();
        let timeout = self.rpc_timeout;
        let process = process_ref(container_id, exec_id);
        Ok(tokio::spawn(async move {
            loop {
                if let Some(ws) = window_size(&tty) {
                    let req = pb::ResizePtyRequest {
                        process: process.clone(),
                        rows: ws.rows.into(),
                        cols: ws.cols.into(),
                        ..Default::default()
                    };
                    let _ = client
                        .resize_pty(context::with_timeout(timeout.as_nanos() as i64), &req)
                        .await;
                }
                if winch.recv().await.is_none() {
                    return;
                }
            }
        }))
    }
}

/// The window size of a host terminal.
pub fn window_size(tty: &impl AsRawFd) -> Option<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into our stack variable.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
