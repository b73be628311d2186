//! What the shim knows of each container and process: their state as containerd sees it, and
//! the one lookup of "container/exec or NOT_FOUND" every request goes through.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_shim::protos::api;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use tokio::sync::watch;

use super::status::{status, timestamp};
use super::Inner;
use crate::rootfs::BundleRootfs;
use crate::stdio::{Logger, StdioPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcStatus {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone)]
pub(crate) struct ProcState {
    pub pid: u32,
    pub status: ProcStatus,
    pub exit_code: u32,
    pub exited_at: Option<Timestamp>,
}

impl ProcState {
    /// When it ended, or now for a process that never ran.
    fn exited_at_or_now(&self) -> Timestamp {
        self.exited_at
            .clone()
            .unwrap_or_else(|| timestamp(SystemTime::now()))
    }

    pub fn delete_response(&self) -> api::DeleteResponse {
        api::DeleteResponse {
            pid: self.pid,
            exit_status: self.exit_code,
            exited_at: MessageField::some(self.exited_at_or_now()),
            ..Default::default()
        }
    }

    pub fn wait_response(&self) -> api::WaitResponse {
        api::WaitResponse {
            exit_status: self.exit_code,
            exited_at: self.exited_at.clone().into(),
            ..Default::default()
        }
    }
}

/// A container's init process ("" exec id) or an exec'd process.
pub(crate) struct Proc {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// The OCI process (JSON) of an exec.
    pub spec: Vec<u8>,
    state: Mutex<ProcState>,
    /// Becomes true once the exit is recorded (and TaskExit published).
    pub exited: watch::Sender<bool>,
    /// CloseIO came (containerd's copy of a short stdin can finish before or during Start):
    /// Start drops `stdin_writer` as soon as it has one.
    stdin_closed: AtomicBool,
    /// Our write end of the stdin FIFO while the process runs; CloseIO drops it, so the guest's
    /// stdin ends after everything containerd wrote has been copied.
    stdin_writer: Mutex<Option<OwnedFd>>,
    /// A read end of the stdin FIFO held until the process is deleted, as runc's shim holds
    /// it: once the guest process has exited our copy's read end is gone, and containerd's next
    /// write into the FIFO (a terminal's input) would fail; with a terminal, containerd then
    /// closes the client's output stream, losing output not yet passed on.
    stdin_hold: Mutex<Option<OwnedFd>>,
    /// The `binary://` logging program fed by the process's output, ended after the exit.
    logger: Mutex<Option<Logger>>,
}

impl Proc {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Arc<Self> {
        Arc::new(Proc {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                pid: 0,
                status: ProcStatus::Created,
                exit_code: 0,
                exited_at: None,
            }),
            exited: watch::channel(false).0,
            stdin_closed: Default::default(),
            stdin_writer: Mutex::new(None),
            stdin_hold: Mutex::new(None),
            logger: Mutex::new(None),
        })
    }

    pub fn state(&self) -> ProcState {
        self.state.lock().unwrap().clone()
    }

    /// The id containerd knows this process by in events: the exec id, or the container's.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn set_running(&self, pid: u32) {
        let mut s = self.state.lock().unwrap();
        s.pid = pid;
        s.status = ProcStatus::Running;
    }

    pub fn set_exit(&self, code: u32) {
        let mut s = self.state.lock().unwrap();
        s.status = ProcStatus::Stopped;
        s.exit_code = code;
        s.exited_at = Some(timestamp(SystemTime::now()));
    }

    /// Refuses unless the process has the given status, naming what it is instead.
    pub fn require(&self, want: ProcStatus, what: &str) -> TtrpcResult<()> {
        if self.state().status == want {
            return Ok(());
        }
        Err(status(
            Code::FAILED_PRECONDITION,
            format!("process {}/{} {what}", self.container_id, self.exec_id),
        ))
    }

    pub fn set_logger(&self, logger: Option<Logger>) {
        *self.logger.lock().unwrap() = logger;
    }

    /// Lets the logging binary (if any) finish, in the background: called once the process's
    /// output is complete (or it never started).
    pub fn finish_logger(&self) {
        if let Some(logger) = self.logger.lock().unwrap().take() {
            tokio::task::spawn_blocking(move || logger.finish());
        }
    }

    /// Keeps our write end of the stdin FIFO, unless CloseIO came already. Stored first, then
    /// the flag read; CloseIO sets the flag first, then takes the writer: whichever comes
    /// second drops it, even when CloseIO arrives while the process starts.
    /// Holds a read end of the stdin FIFO until this process is dropped (see `stdin_hold`).
    pub fn hold_stdin_reader(&self, reader: Option<OwnedFd>) {
        *self.stdin_hold.lock().unwrap() = reader;
    }

    pub fn keep_stdin_writer(&self, writer: Option<OwnedFd>) {
        *self.stdin_writer.lock().unwrap() = writer;
        if self.stdin_closed.load(Ordering::SeqCst) {
            self.stdin_writer.lock().unwrap().take();
        }
    }

    /// CloseIO: the guest's stdin ends after everything written so far (see `stdin_writer`).
    pub fn close_stdin(&self) {
        self.stdin_closed.store(true, Ordering::SeqCst);
        drop(self.stdin_writer.lock().unwrap().take());
    }
}

pub(crate) struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// Its root filesystem directory (beneath the bundle), unmounted again at Delete.
    pub rootfs: BundleRootfs,
    pub slot: usize,
    pub init: Arc<Proc>,
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Inner {
    pub(crate) fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    /// Whether `pid` is the (guest) pid of the init of a running container of this shim: what
    /// containerd's `/proc/<pid>/ns/<type>` paths name for the pod's later containers.
    pub(crate) fn init_running(&self, pid: u32) -> bool {
        self.containers.lock().unwrap().values().any(|c| {
            let st = c.init.state();
            st.status == ProcStatus::Running && st.pid == pid
        })
    }

    /// The container's init process ("" exec id) or one of its execs, or NOT_FOUND.
    pub(crate) fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> TtrpcResult<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = c.execs.lock().unwrap().get(exec_id).cloned();
        let p = p.ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("process {exec_id} of container {id} not found"),
            )
        })?;
        Ok((c, p))
    }

    /// containerd's view of a process (State).
    pub(crate) fn state_response(&self, c: &Container, p: &Proc) -> api::StateResponse {
        let st = p.state();
        let status = match st.status {
            ProcStatus::Created => api::Status::CREATED,
            ProcStatus::Running => api::Status::RUNNING,
            ProcStatus::Stopped => api::Status::STOPPED,
        };
        api::StateResponse {
            id: c.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: st.pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: st.exit_code,
            exited_at: st.exited_at.into(),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        }
    }
}
