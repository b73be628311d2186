//! Processes: launching one with its stdio and supervisor, and the exec, signal, wait, resize and
//! close-stdin RPCs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use agent_protocol::agent::{self as pb, Empty};
use agent_protocol::ttrpc::Code;
use tokio::sync::watch;

use super::{
    classify, internal, now_ms, status, Agent, ContainerEntry, Exit, Process, Result, State,
    STDIO_ATTACH_TIMEOUT,
};
use crate::stdio;

impl State {
    /// Starts the init process (`process` None) or an exec'd one, with its stdio.
    pub(super) async fn launch(
        &self,
        entry: Arc<ContainerEntry>,
        exec_id: &str,
        process: Option<oci_spec::runtime::Process>,
        cfg: &pb::Stdio,
    ) -> Result<u32> {
        let cid = entry.id.clone();
        if cfg.terminal && cfg.stderr {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "a terminal has no separate stderr (stdio.stderr must be false)",
            ));
        }
        if let Some(p) = entry
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
        {
            if exec_id.is_empty() {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {cid} was started already"),
                ));
            }
            if p.exited().is_none() {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("process {exec_id} of container {cid} is running"),
                ));
            }
        }
        let wanted = [cfg.stdin, cfg.stdout, cfg.stderr];
        let mut streams = self
            .parked
            .take(&cid, exec_id, wanted, STDIO_ATTACH_TIMEOUT)
            .await
            .map_err(|e| status(Code::DEADLINE_EXCEEDED, e))?;

        // Our ends of the process's stdio: [stdin write end, stdout read end, stderr read end],
        // or the pty master.
        let mut ours: [Option<stdio::Fd>; 3] = [None, None, None];
        let child_stdio = if cfg.terminal {
            let rows = if cfg.rows == 0 { 24 } else { cfg.rows as u16 };
            let cols = if cfg.cols == 0 { 80 } else { cfg.cols as u16 };
            container::Stdio::Terminal { rows, cols }
        } else {
            let mut theirs: [Option<OwnedFd>; 3] = [None, None, None];
            for i in 0..3 {
                if wanted[i] {
                    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(|e| internal(format!("pipe: {e}")))?;
                    let (mine, child) = if i == 0 { (w, r) } else { (r, w) };
                    ours[i] = Some(stdio::async_fd(mine).map_err(internal)?);
                    theirs[i] = Some(child);
                }
            }
            let [stdin, stdout, stderr] = theirs;
            container::Stdio::Fds {
                stdin,
                stdout,
                stderr,
            }
        };

        let reaper = self.reaper.clone();
        let handle = entry.container.clone();
        let is_init = process.is_none();
        let spawned = tokio::task::spawn_blocking(move || {
            // Spawn and register under the reaper's lock (see reaper.rs).
            let mut registry = reaper.lock();
            let mut guard = handle.lock().unwrap_or_else(|e| e.into_inner());
            let Some(c) = guard.as_mut() else {
                return Err(None);
            };
            let spawned = match &process {
                None => c.start(child_stdio),
                Some(p) => c.exec(p, child_stdio),
            }
            .map_err(Some)?;
            let exit_rx = registry.register(spawned.pid);
            Ok((spawned, exit_rx))
        })
        .await
        .map_err(internal)?;

        let (spawned, exit_rx) = match spawned {
            Ok(s) => s,
            Err(None) => {
                return Err(status(
                    Code::NOT_FOUND,
                    format!("container {cid} was removed"),
                ))
            }
            Err(Some(e)) => {
                let (code, exit_code) = classify(&e);
                if let Some(exit_code) = exit_code {
                    entry
                        .processes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(
                            exec_id.to_string(),
                            Arc::new(Process::failed_to_start(exit_code)),
                        );
                }
                let what = if is_init {
                    format!("start container {cid}")
                } else {
                    format!("exec {exec_id} in container {cid}")
                };
                // The streams close as they drop: the host reads EOF.
                return Err(status(code, format!("{what}: {e}")));
            }
        };
        let pid = spawned.pid;
        tracing::info!(container = %cid, exec = %exec_id, pid, "process started");

        let (exited_tx, exited_rx) = watch::channel(false);
        let (close_tx, close_rx) = watch::channel(false);
        let (exit_tx, exit_rx_pub) = watch::channel(None);
        let mut outputs = Vec::new();
        let mut pty = None;
        // From here on nothing returns early: the process runs and must be supervised.
        let master = spawned.pty_master.and_then(|m| match stdio::async_fd(m) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(pid, "cannot poll the terminal: {e}; its output is lost");
                None
            }
        });
        if let Some(master) = master {
            pty = Some(master.clone());
            // Without a host stream the terminal is still drained, so the process never blocks.
            outputs.push(tokio::spawn(stdio::pump_output(
                master.clone(),
                streams[1].take(),
                exited_rx.clone(),
                true,
            )));
            if let Some(input) = streams[0].take() {
                tokio::spawn(stdio::pump_input(
                    input,
                    master,
                    exited_rx.clone(),
                    close_rx,
                    true,
                ));
            }
        } else {
            for i in [1, 2] {
                if let (Some(fd), Some(dst)) = (ours[i].take(), streams[i].take()) {
                    outputs.push(tokio::spawn(stdio::pump_output(
                        fd,
                        Some(dst),
                        exited_rx.clone(),
                        false,
                    )));
                }
            }
            if let (Some(fd), Some(src)) = (ours[0].take(), streams[0].take()) {
                tokio::spawn(stdio::pump_input(
                    src,
                    fd,
                    exited_rx.clone(),
                    close_rx,
                    false,
                ));
            }
        }

        let record = Arc::new(Process {
            pid,
            exit: exit_rx_pub,
            close_stdin: close_tx,
            pty,
        });
        entry
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_string(), record);

        // The supervisor: exit status, then drained output, then the published exit.
        let oom = self.oom.clone();
        let exec = exec_id.to_string();
        tokio::spawn(async move {
            let status = exit_rx.await.unwrap_or(0xff << 8);
            let code = container::wait_status_to_exit_code(status);
            let at_ms = now_ms();
            let _ = exited_tx.send(true);
            let mut bytes = 0;
            for o in outputs {
                bytes += o.await.unwrap_or(0);
            }
            tracing::info!(container = %cid, exec = %exec, pid, code, bytes, "process exited");
            oom.check(&cid);
            let _ = exit_tx.send(Some(Exit { code, at_ms }));
        });
        Ok(pid as u32)
    }
}

fn process_ref(p: &protobuf::MessageField<pb::ProcessRef>) -> Result<(String, String)> {
    let p = p
        .as_ref()
        .ok_or_else(|| status(Code::INVALID_ARGUMENT, "no process given"))?;
    Ok((p.container_id.clone(), p.exec_id.clone()))
}

impl Agent {
    pub(super) async fn exec_process(
        &self,
        req: pb::ExecProcessRequest,
    ) -> Result<pb::ProcessStarted> {
        self.check_serving()?;
        self.rpc_log(
            "ExecProcess",
            &format!("{} {}", req.container_id, req.exec_id),
        );
        if !agent_protocol::valid_id(&req.exec_id) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        let entry = self.container(&req.container_id)?;
        let init_running = entry
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get("")
            .is_some_and(|p| p.exited().is_none());
        if !init_running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.container_id),
            ));
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(&req.process_json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("invalid OCI process: {e}")))?;
        let stdio = req.stdio.clone().unwrap_or_default();
        let pid = self
            .launch(entry, &req.exec_id, Some(process), &stdio)
            .await?;
        Ok(pb::ProcessStarted {
            pid,
            ..Default::default()
        })
    }

    pub(super) async fn signal_process(&self, req: pb::SignalProcessRequest) -> Result<Empty> {
        let (cid, eid) = process_ref(&req.process)?;
        self.rpc_log(
            "SignalProcess",
            &format!("{cid} {eid:?} {} all={}", req.signal, req.all),
        );
        let entry = self.container(&cid)?;
        let signal = req.signal as i32;
        if nix::sys::signal::Signal::try_from(signal).is_err() {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("invalid signal {signal}"),
            ));
        }
        let handle = entry.container.clone();
        let reaper = self.reaper.clone();
        let pid = if req.all {
            None
        } else {
            let p = entry.process(&eid)?;
            if p.exited().is_some() || p.pid == 0 {
                return Err(status(
                    Code::NOT_FOUND,
                    format!("process {eid:?} of container {cid} has exited"),
                ));
            }
            Some(p.pid)
        };
        tokio::task::spawn_blocking(move || {
            let registry = reaper.lock();
            let guard = handle.lock().unwrap_or_else(|e| e.into_inner());
            let c = guard
                .as_ref()
                .ok_or_else(|| status(Code::NOT_FOUND, "container removed"))?;
            match pid {
                None => c.signal_all(signal),
                Some(pid) if registry.is_live(pid) => c.signal(pid, signal),
                Some(pid) => {
                    return Err(status(Code::NOT_FOUND, format!("process {pid} has exited")))
                }
            }
            .map_err(|e| status(classify(&e).0, e.to_string()))
        })
        .await
        .map_err(internal)??;
        Ok(Empty::new())
    }

    pub(super) async fn wait_process(
        &self,
        req: pb::WaitProcessRequest,
    ) -> Result<pb::WaitProcessResponse> {
        let (cid, eid) = process_ref(&req.process)?;
        let p = self.container(&cid)?.process(&eid)?;
        let mut rx = p.exit.clone();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.expect("waited for Some"),
            Err(_) => return Err(internal("the process supervisor went away")),
        };
        Ok(pb::WaitProcessResponse {
            exit_code: exit.code,
            exited_at_ms: exit.at_ms,
            ..Default::default()
        })
    }

    pub(super) async fn resize_pty(&self, req: pb::ResizePtyRequest) -> Result<Empty> {
        let (cid, eid) = process_ref(&req.process)?;
        let p = self.container(&cid)?.process(&eid)?;
        let pty = p.pty.as_ref().ok_or_else(|| {
            status(
                Code::FAILED_PRECONDITION,
                format!("process {eid:?} of container {cid} has no terminal"),
            )
        })?;
        let ws = libc::winsize {
            ws_row: req.rows as u16,
            ws_col: req.cols as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from our stack.
        let r = unsafe { libc::ioctl(pty.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r != 0 {
            return Err(internal(format!(
                "TIOCSWINSZ: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Empty::new())
    }

    pub(super) async fn close_stdin(&self, req: pb::CloseStdinRequest) -> Result<Empty> {
        let (cid, eid) = process_ref(&req.process)?;
        let p = self.container(&cid)?.process(&eid)?;
        let _ = p.close_stdin.send(true);
        Ok(Empty::new())
    }
}
