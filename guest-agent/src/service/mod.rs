//! The ttRPC service: containers, their processes, and the stdio streams attached to them.
//! This file holds the agent's state, the helpers its handlers share, and the ttRPC dispatch;
//! the handlers live beside it, one file per concern.

mod attach;
mod lifecycle;
mod process;
mod sandbox;
mod stats;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agent_protocol::agent::{self as pb, Empty};
use agent_protocol::ttrpc::{self, r#async::TtrpcContext, Code};
use async_trait::async_trait;
use tokio::sync::watch;

use crate::oom::OomWatcher;
use crate::reaper::Reaper;
use crate::stdio::{self, Parked};

/// How long StartContainer and ExecProcess wait for the host to attach the declared streams.
pub const STDIO_ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long RemoveContainer and Shutdown wait for killed processes to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);

type Result<T> = ttrpc::Result<T>;

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    let msg = msg.into();
    tracing::info!("request failed ({code:?}): {msg}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn internal(msg: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INTERNAL, msg.to_string())
}

/// How a `container` crate error is reported: the ttRPC code, and the exit code a process that
/// failed to start gets (127: executable not found, 126: not executable).
fn classify(e: &container::Error) -> (Code, Option<i32>) {
    use container::Error as E;
    let code = match e {
        E::ExecutableNotFound { .. } | E::NoSuchProcess { .. } => Code::NOT_FOUND,
        E::PermissionDenied { .. } => Code::PERMISSION_DENIED,
        E::InvalidId(_) | E::InvalidSpec(_) | E::InvalidSignal(_) => Code::INVALID_ARGUMENT,
        E::Unsupported(_) => Code::UNIMPLEMENTED,
        E::AlreadyExists { .. } => Code::ALREADY_EXISTS,
        E::AlreadyStarted { .. } | E::NotRunning { .. } | E::Setup { .. } => {
            Code::FAILED_PRECONDITION
        }
        _ => Code::INTERNAL,
    };
    (code, e.exit_code_hint())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a process ended, published once its output is drained.
#[derive(Debug, Clone, Copy)]
struct Exit {
    code: i32,
    at_ms: u64,
}

struct Process {
    /// 0 when it never started.
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    close_stdin: watch::Sender<bool>,
    pty: Option<stdio::Fd>,
}

impl Process {
    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn failed_to_start(code: i32) -> Self {
        let (_, exit) = watch::channel(Some(Exit {
            code,
            at_ms: now_ms(),
        }));
        Self {
            pid: 0,
            exit,
            close_stdin: watch::channel(true).0,
            pty: None,
        }
    }
}

struct ContainerEntry {
    id: String,
    /// `None` once destroyed.
    container: Arc<Mutex<Option<container::Container>>>,
    /// Mounts the agent made for it (rootfs layers, extra mounts), innermost last.
    mounts: Vec<PathBuf>,
    dir: PathBuf,
    /// By exec id; "" is the init process.
    processes: Mutex<HashMap<String, Arc<Process>>>,
}

impl ContainerEntry {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                if exec_id.is_empty() {
                    status(
                        Code::FAILED_PRECONDITION,
                        format!("container {} is not started", self.id),
                    )
                } else {
                    status(
                        Code::NOT_FOUND,
                        format!("no process {exec_id} in container {}", self.id),
                    )
                }
            })
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The agent's RPC handlers, on its shared [`State`].
pub struct Agent(pub Arc<State>);

impl std::ops::Deref for Agent {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

/// The agent's state.
pub struct State {
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Arc<ContainerEntry>>>,
    parked: Parked,
    oom: Arc<OomWatcher>,
    sandbox_mounts: Mutex<Vec<PathBuf>>,
    /// The process owning the sandbox's shared namespaces, once CreateSandbox asked for any.
    holder: Mutex<Option<container::NamespaceHolder>>,
    shutting_down: AtomicBool,
    /// Test-only: panic shortly after the first Health reply (kernel command line
    /// [`crate::init::PANIC_AFTER_HEALTH_FLAG`]), to show that a panicking agent ends the VM.
    panic_after_health: AtomicBool,
}

impl State {
    pub fn new(reaper: Arc<Reaper>, oom: Arc<OomWatcher>, panic_after_health: bool) -> Self {
        Self {
            reaper,
            containers: Mutex::default(),
            parked: Parked::default(),
            oom,
            sandbox_mounts: Mutex::default(),
            holder: Mutex::default(),
            shutting_down: AtomicBool::new(false),
            panic_after_health: AtomicBool::new(panic_after_health),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<ContainerEntry>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("no container {id}")))
    }

    fn check_serving(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(status(Code::UNAVAILABLE, "the agent is shutting down"));
        }
        Ok(())
    }

    fn rpc_log(&self, name: &str, detail: &str) {
        tracing::info!("{name} {detail}");
    }
}

/// The ttRPC dispatch: each RPC is handled by the `Agent` method of the same name, in the file of
/// its concern (sandbox, lifecycle, process, stats); `async_trait` needs the impl in one block.
#[async_trait]
impl agent_protocol::agent_ttrpc::Agent for Agent {
    async fn version(
        &self,
        _: &TtrpcContext,
        req: pb::VersionRequest,
    ) -> Result<pb::VersionResponse> {
        Agent::version(self, req).await
    }

    async fn health(&self, _: &TtrpcContext, req: pb::HealthRequest) -> Result<pb::HealthResponse> {
        Agent::health(self, req).await
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> Result<Empty> {
        Agent::create_sandbox(self, req).await
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> Result<Empty> {
        Agent::create_container(self, req).await
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> Result<pb::ProcessStarted> {
        Agent::start_container(self, req).await
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> Result<pb::ProcessStarted> {
        Agent::exec_process(self, req).await
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> Result<Empty> {
        Agent::signal_process(self, req).await
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> Result<pb::WaitProcessResponse> {
        Agent::wait_process(self, req).await
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: pb::ResizePtyRequest) -> Result<Empty> {
        Agent::resize_pty(self, req).await
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: pb::CloseStdinRequest) -> Result<Empty> {
        Agent::close_stdin(self, req).await
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> Result<pb::ListProcessesResponse> {
        Agent::list_processes(self, req).await
    }

    async fn stats(&self, _: &TtrpcContext, req: pb::StatsRequest) -> Result<pb::StatsResponse> {
        Agent::stats(self, req).await
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> Result<Empty> {
        Agent::update_container(self, req).await
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        req: pb::GetOomEventRequest,
    ) -> Result<pb::OomEvent> {
        Agent::get_oom_event(self, req).await
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> Result<Empty> {
        Agent::remove_container(self, req).await
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: pb::ConfigureNetworkRequest,
    ) -> Result<Empty> {
        Agent::configure_network(self, req).await
    }

    async fn shutdown(&self, _: &TtrpcContext, req: pb::ShutdownRequest) -> Result<Empty> {
        Agent::shutdown(self, req).await
    }
}
