//! The ttRPC service: containers, their processes, and the stdio streams attached to them.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agent_protocol::agent::{self as pb, Empty};
use agent_protocol::stdio::{Header, Reply};
use agent_protocol::ttrpc::{self, r#async::TtrpcContext, Code};
use async_trait::async_trait;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources};
use tokio::sync::watch;
use tokio_vsock::VsockStream;

use crate::etc_files;
use crate::init::{self, CGROUP_PARENT, STATE_DIR};
use crate::mounts;
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
    /// [`init::PANIC_AFTER_HEALTH_FLAG`]), to show that a panicking agent ends the VM.
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

    /// Starts the holder of the sandbox's shared namespaces (pod semantics). Asking again for
    /// what is shared already is fine; asking for more is refused: containers may exist
    /// already, and one sandbox has one holder.
    async fn share_namespaces(&self, wanted: Vec<LinuxNamespaceType>) -> Result<()> {
        let refuse = |have: &[LinuxNamespaceType]| {
            status(
                Code::FAILED_PRECONDITION,
                format!(
                    "the sandbox shares {} namespaces already; sharing cannot change (asked: {})",
                    ns_names(have),
                    ns_names(&wanted)
                ),
            )
        };
        if let Some(h) = self
            .holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if wanted.iter().all(|t| h.types().contains(t)) {
                return Ok(());
            }
            return Err(refuse(h.types()));
        }
        let types = wanted.clone();
        let holder = tokio::task::spawn_blocking(move || container::NamespaceHolder::spawn(&types))
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("shared namespaces: {e}")))?;
        let mut slot = self.holder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = slot.as_ref() {
            // A concurrent CreateSandbox won.
            let err = refuse(h.types());
            let _ = holder.kill();
            return Err(err);
        }
        tracing::info!(
            pid = holder.pid(),
            "containers created from now on share the sandbox's {} namespaces",
            ns_names(holder.types())
        );
        *slot = Some(holder);
        Ok(())
    }

    /// The namespaces a new container joins: the sandbox's shared ones.
    fn shared_namespaces(&self) -> Result<Vec<(LinuxNamespaceType, PathBuf)>> {
        match self
            .holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            None => Ok(Vec::new()),
            Some(h) if h.is_running() => Ok(h.join_list()),
            Some(h) => Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "the process holding the sandbox's shared namespaces ({}) has died",
                    h.pid()
                ),
            )),
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

    /// A new connection on the stdio port: reads its header and parks the stream.
    pub async fn accept_stdio(&self, mut stream: VsockStream) {
        use tokio::io::AsyncWriteExt;
        let header = tokio::time::timeout(
            Duration::from_secs(10),
            agent_protocol::stdio::read_line(&mut stream),
        )
        .await;
        let result = match header {
            Err(_) => Err("no header within 10 s".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(line)) => match Header::parse(&line) {
                Err(e) => Err(e.to_string()),
                Ok(h) => self.check_attach(&h).map(|()| h),
            },
        };
        match result {
            Ok(h) => {
                if stream.write_all(&Reply::Ok.encode()).await.is_err() {
                    return;
                }
                tracing::debug!(container = %h.container_id, exec = %h.exec_id, stream = %h.stream, "stdio attached");
                if let Err(why) = self
                    .parked
                    .park(&h.container_id, &h.exec_id, h.stream, stream)
                {
                    tracing::warn!("stdio: {why}");
                }
            }
            Err(why) => {
                tracing::info!("stdio stream refused: {why}");
                let _ = stream.write_all(&Reply::Err(why).encode()).await;
            }
        }
    }

    fn check_attach(&self, h: &Header) -> std::result::Result<(), String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("the agent is shutting down".into());
        }
        let c = self
            .container(&h.container_id)
            .map_err(|_| format!("no container {}", h.container_id))?;
        let running = c
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&h.exec_id)
            .is_some_and(|p| p.exited().is_none());
        if running {
            return Err(format!(
                "process {:?} of container {} is running already",
                h.exec_id, h.container_id
            ));
        }
        Ok(())
    }

    /// Starts the init process (`process` None) or an exec'd one, with its stdio.
    async fn launch(
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

    /// Mounts a container's rootfs (and its extra mounts) under its state directory.
    fn mount_rootfs(
        dir: &Path,
        rootfs: &pb::Rootfs,
        extra: &[pb::Mount],
        done: &mut Vec<PathBuf>,
    ) -> Result<PathBuf> {
        let root = dir.join("rootfs");
        let lower = dir.join("lower");
        fs::create_dir_all(&root).map_err(internal)?;
        let failed =
            |what: &str, e: nix::Error| status(Code::FAILED_PRECONDITION, format!("{what}: {e}"));
        // Where the source ends up: the rootfs itself, or the overlay's lower layer.
        let target = if rootfs.writable { &lower } else { &root };
        fs::create_dir_all(target).map_err(internal)?;
        match &rootfs.source {
            Some(pb::rootfs::Source::Block(b)) => {
                if b.path.is_empty() || b.fstype.is_empty() {
                    return Err(status(
                        Code::INVALID_ARGUMENT,
                        "rootfs.block needs a path and an fstype",
                    ));
                }
                let mut opts = b.options.clone();
                if rootfs.writable {
                    opts.push("ro".into());
                }
                mounts::mount_fs(&b.path, target, &b.fstype, &opts).map_err(|e| {
                    failed(&format!("mount {} ({}) as the rootfs", b.path, b.fstype), e)
                })?;
            }
            Some(pb::rootfs::Source::Directory(d)) => {
                if !Path::new(d).is_absolute() || !Path::new(d).is_dir() {
                    return Err(status(
                        Code::INVALID_ARGUMENT,
                        format!("rootfs directory {d:?} is not an absolute path to a directory"),
                    ));
                }
                mounts::mount_fs(d, target, "bind", &["rbind".into()])
                    .map_err(|e| failed(&format!("bind {d}"), e))?;
            }
            _ => return Err(status(Code::INVALID_ARGUMENT, "no rootfs source")),
        }
        done.push(target.clone());
        if rootfs.writable {
            let upper = dir.join("upper");
            let work = dir.join("work");
            fs::create_dir_all(&upper).map_err(internal)?;
            fs::create_dir_all(&work).map_err(internal)?;
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            );
            mounts::mount_fs("overlay", &root, "overlay", &[data])
                .map_err(|e| failed("overlay over the rootfs", e))?;
            done.push(root.clone());
        }
        // Mount points are resolved inside the rootfs (openat2 RESOLVE_IN_ROOT): a symlink in
        // the image cannot take a mount outside it.
        let root_dir = container::RootDir::open(&root)
            .map_err(|e| status(Code::INTERNAL, format!("open the rootfs: {e}")))?;
        for m in extra {
            let point = root_dir
                .mkdir_all(Path::new(&m.destination), 0o755)
                .map_err(|e| {
                    status(
                        Code::FAILED_PRECONDITION,
                        format!("create mount point {}: {e}", m.destination),
                    )
                })?;
            // The path the kernel resolved inside the root, symlink-free. Nothing can change
            // the rootfs between here and the mount (no process of the container runs yet; the
            // image's layers are read-only). A path rather than the fd's magic link, because a
            // read-only bind's remount must find the new mount on top of the directory.
            let dest = fs::read_link(container::fd_path(&point)).map_err(internal)?;
            drop(point);
            mounts::mount_fs(&m.source, &dest, &m.fstype, &m.options).map_err(|e| {
                failed(
                    &format!("mount {} ({}) on {}", m.source, m.fstype, m.destination),
                    e,
                )
            })?;
            done.push(dest);
        }
        Ok(root)
    }

    fn unmount_all(paths: &[PathBuf]) -> std::result::Result<(), String> {
        let mut err = Ok(());
        for p in paths.iter().rev() {
            if let Err(e) = mounts::unmount(p) {
                err = Err(format!("unmount {}: {e}", p.display()));
            }
        }
        err
    }

    /// Kills every process of a container and waits for them to be reaped (bounded).
    async fn kill_and_wait(&self, entry: &ContainerEntry) {
        let live: Vec<Arc<Process>> = entry
            .all_processes()
            .into_iter()
            .filter(|p| p.exited().is_none())
            .collect();
        let handle = entry.container.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = handle.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                if let Err(e) = c.signal_all(libc::SIGKILL) {
                    tracing::warn!("kill all: {e}");
                }
            }
        })
        .await;
        for p in live {
            let mut rx = p.exit.clone();
            if tokio::time::timeout(KILL_WAIT, rx.wait_for(Option::is_some))
                .await
                .is_err()
            {
                tracing::warn!(pid = p.pid, "a killed process was not reaped in time");
            }
        }
    }

    /// Removes a container: kill, destroy, unmount. The entry is gone whatever happens.
    async fn remove(&self, entry: Arc<ContainerEntry>) -> std::result::Result<(), String> {
        self.kill_and_wait(&entry).await;
        self.parked.discard(&entry.id, None);
        self.oom.unwatch(&entry.id);
        let handle = entry.container.clone();
        let destroyed = tokio::task::spawn_blocking(move || {
            match handle.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(c) => c.destroy().map_err(|e| e.to_string()),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        let unmounted = State::unmount_all(&entry.mounts);
        let _ = fs::remove_dir_all(&entry.dir);
        destroyed.and(unmounted)
    }

    fn rpc_log(&self, name: &str, detail: &str) {
        tracing::info!("{name} {detail}");
    }
}

/// "pid+ipc" for a list of namespace types.
fn ns_names(types: &[LinuxNamespaceType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("+")
}

fn process_ref(p: &protobuf::MessageField<pb::ProcessRef>) -> Result<(String, String)> {
    let p = p
        .as_ref()
        .ok_or_else(|| status(Code::INVALID_ARGUMENT, "no process given"))?;
    Ok((p.container_id.clone(), p.exec_id.clone()))
}

#[async_trait]
impl agent_protocol::agent_ttrpc::Agent for Agent {
    async fn version(
        &self,
        _: &TtrpcContext,
        _: pb::VersionRequest,
    ) -> Result<pb::VersionResponse> {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(pb::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: agent_protocol::PROTOCOL_VERSION,
            kernel_release: kernel,
            ..Default::default()
        })
    }

    async fn health(&self, _: &TtrpcContext, _: pb::HealthRequest) -> Result<pb::HealthResponse> {
        self.check_serving()?;
        if self.panic_after_health.swap(false, Ordering::SeqCst) {
            tracing::warn!("{}: panicking in 500 ms", init::PANIC_AFTER_HEALTH_FLAG);
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                panic!("test-only panic requested on the kernel command line");
            });
        }
        Ok(pb::HealthResponse {
            uptime_ms: init::uptime_ms(),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> Result<Empty> {
        self.check_serving()?;
        self.rpc_log("CreateSandbox", &req.hostname);
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(|e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("hostname {:?}: {e}", req.hostname),
                )
            })?;
        }
        etc_files::write(Path::new("/etc"), &req)
            .map_err(|(file, e)| internal(format!("/etc/{file}: {e}")))?;
        let mut sysctls: Vec<(&String, &String)> = req.sysctls.iter().collect();
        sysctls.sort();
        for (key, value) in sysctls {
            let valid = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !key.split('.').any(|p| p.is_empty() || p == "..");
            if !valid {
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!("invalid sysctl name {key:?}"),
                ));
            }
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            fs::write(&path, value).map_err(|e| {
                status(Code::INVALID_ARGUMENT, format!("sysctl {key}={value}: {e}"))
            })?;
        }
        for m in &req.mounts {
            let dest = Path::new(&m.destination);
            if !dest.is_absolute() || mounts::inside(Path::new("/"), &m.destination).is_none() {
                return Err(status(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "sandbox mount destination {:?} must be absolute, without ..",
                        m.destination
                    ),
                ));
            }
            fs::create_dir_all(dest).map_err(internal)?;
            mounts::mount_fs(&m.source, dest, &m.fstype, &m.options).map_err(|e| {
                status(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "mount {} ({}) on {}: {e}",
                        m.source, m.fstype, m.destination
                    ),
                )
            })?;
            self.sandbox_mounts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(dest.to_path_buf());
        }
        let mut shared = Vec::new();
        if req.share_pid_namespace {
            shared.push(LinuxNamespaceType::Pid);
        }
        if req.share_ipc_namespace {
            shared.push(LinuxNamespaceType::Ipc);
        }
        if !shared.is_empty() {
            self.share_namespaces(shared).await?;
        }
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> Result<Empty> {
        self.check_serving()?;
        self.rpc_log("CreateContainer", &req.id);
        if !agent_protocol::valid_id(&req.id) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("invalid container id {:?}", req.id),
            ));
        }
        let spec_text = std::str::from_utf8(&req.spec_json).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("the OCI spec is not UTF-8: {e}"),
            )
        })?;
        let spec = container::parse_spec(spec_text).map_err(|e| {
            let (code, _) = classify(&e);
            status(code, format!("create container {}: {e}", req.id))
        })?;
        let rootfs = req
            .rootfs
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "no rootfs"))?;
        let shared = self.shared_namespaces()?;
        // Reserve the id while the rootfs is being mounted.
        let dir = Path::new(STATE_DIR).join("containers").join(&req.id);
        {
            let map = self.containers.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&req.id) || dir.exists() {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("container {} exists", req.id),
                ));
            }
            fs::create_dir_all(&dir).map_err(internal)?;
        }
        let mut mounted = Vec::new();
        let root = match State::mount_rootfs(&dir, rootfs, &req.mounts, &mut mounted) {
            Ok(r) => r,
            Err(e) => {
                let _ = State::unmount_all(&mounted);
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let opts = container::CreateOptions {
            id: req.id.clone(),
            rootfs: root,
            spec,
            cgroup_parent: PathBuf::from(CGROUP_PARENT),
            join_namespaces: shared,
        };
        let created = tokio::task::spawn_blocking(move || container::Container::create(opts))
            .await
            .map_err(internal)?;
        let c = match created {
            Ok(c) => c,
            Err(e) => {
                let _ = State::unmount_all(&mounted);
                let _ = fs::remove_dir_all(&dir);
                let (code, _) = classify(&e);
                return Err(status(code, format!("create container {}: {e}", req.id)));
            }
        };
        if let Err(e) = self.oom.watch(&req.id, &c.memory_events_path()) {
            tracing::warn!("cannot watch OOM events of {}: {e}", req.id);
        }
        let entry = Arc::new(ContainerEntry {
            id: req.id.clone(),
            container: Arc::new(Mutex::new(Some(c))),
            mounts: mounted,
            dir,
            processes: Mutex::default(),
        });
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id, entry);
        Ok(Empty::new())
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> Result<pb::ProcessStarted> {
        self.check_serving()?;
        self.rpc_log("StartContainer", &req.id);
        let entry = self.container(&req.id)?;
        let stdio = req.stdio.clone().unwrap_or_default();
        let pid = self.launch(entry, "", None, &stdio).await?;
        Ok(pb::ProcessStarted {
            pid,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
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

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> Result<Empty> {
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

    async fn wait_process(
        &self,
        _: &TtrpcContext,
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

    async fn resize_pty(&self, _: &TtrpcContext, req: pb::ResizePtyRequest) -> Result<Empty> {
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

    async fn close_stdin(&self, _: &TtrpcContext, req: pb::CloseStdinRequest) -> Result<Empty> {
        let (cid, eid) = process_ref(&req.process)?;
        let p = self.container(&cid)?.process(&eid)?;
        let _ = p.close_stdin.send(true);
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> Result<pb::ListProcessesResponse> {
        let entry = self.container(&req.container_id)?;
        let handle = entry.container.clone();
        let pids = tokio::task::spawn_blocking(move || {
            match handle.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(c) => c.pids().map_err(|e| internal(e.to_string())),
                None => Ok(Vec::new()),
            }
        })
        .await
        .map_err(internal)??;
        Ok(pb::ListProcessesResponse {
            pids: pids.into_iter().map(|p| p as u32).collect(),
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: pb::StatsRequest) -> Result<pb::StatsResponse> {
        let entry = self.container(&req.container_id)?;
        let handle = entry.container.clone();
        let (s, oom) = tokio::task::spawn_blocking(move || {
            let guard = handle.lock().unwrap_or_else(|e| e.into_inner());
            let c = guard
                .as_ref()
                .ok_or_else(|| status(Code::NOT_FOUND, "container removed"))?;
            let s = c.stats().map_err(|e| internal(e.to_string()))?;
            let oom = c.oom_kill_count().map_err(|e| internal(e.to_string()))?;
            Ok::<_, ttrpc::Error>((s, oom))
        })
        .await
        .map_err(internal)??;
        Ok(pb::StatsResponse {
            memory_usage: s.memory_usage,
            memory_limit: s.memory_limit,
            cpu_usage_usec: s.cpu_usage_usec,
            pids_current: s.pids_current,
            oom_kill_count: oom,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> Result<Empty> {
        self.rpc_log("UpdateContainer", &req.container_id);
        self.check_serving()?;
        let resources: LinuxResources =
            serde_json::from_slice(&req.resources_json).map_err(|e| {
                status(
                    Code::INVALID_ARGUMENT,
                    format!("resources_json is not an OCI LinuxResources object: {e}"),
                )
            })?;
        let entry = self.container(&req.container_id)?;
        let handle = entry.container.clone();
        tokio::task::spawn_blocking(move || {
            let guard = handle.lock().unwrap_or_else(|e| e.into_inner());
            let c = guard
                .as_ref()
                .ok_or_else(|| status(Code::NOT_FOUND, "container removed"))?;
            c.update(&resources).map_err(|e| {
                let (code, _) = classify(&e);
                status(code, format!("update container {}: {e}", c.id()))
            })
        })
        .await
        .map_err(internal)??;
        Ok(Empty::new())
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: pb::GetOomEventRequest,
    ) -> Result<pb::OomEvent> {
        self.oom
            .next()
            .await
            .ok_or_else(|| status(Code::UNAVAILABLE, "no more OOM events"))
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> Result<Empty> {
        self.rpc_log("RemoveContainer", &req.id);
        let entry = self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("no container {}", req.id)))?;
        self.remove(entry)
            .await
            .map_err(|e| internal(format!("remove container {}: {e}", req.id)))?;
        Ok(Empty::new())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: pb::ConfigureNetworkRequest,
    ) -> Result<Empty> {
        use crate::network::{NetError, Plan};
        self.check_serving()?;
        self.rpc_log(
            "ConfigureNetwork",
            &format!("{} interfaces", req.interfaces.len()),
        );
        let applied = match Plan::from_request(&req) {
            Ok(plan) => plan.apply().await,
            Err(e) => Err(e),
        };
        applied.map_err(|e| match e {
            NetError::Invalid(m) => status(Code::INVALID_ARGUMENT, m),
            NetError::NotFound(m) => status(Code::NOT_FOUND, m),
            NetError::Failed(m) => status(Code::FAILED_PRECONDITION, m),
        })?;
        Ok(Empty::new())
    }

    async fn shutdown(&self, _: &TtrpcContext, _: pb::ShutdownRequest) -> Result<Empty> {
        self.rpc_log("Shutdown", "");
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(Empty::new());
        }
        let entries: Vec<Arc<ContainerEntry>> = self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, v)| v)
            .collect();
        let sandbox_mounts: Vec<PathBuf> = std::mem::take(
            &mut *self
                .sandbox_mounts
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        // Reply first; the reset follows a moment later.
        let state = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for e in entries {
                if let Err(why) = state.remove(e).await {
                    tracing::warn!("shutdown: {why}");
                }
            }
            let _ = State::unmount_all(&sandbox_mounts);
            tracing::info!("shutdown: resetting the VM");
            let _ = tokio::task::spawn_blocking(|| init::reboot()).await;
        });
        Ok(Empty::new())
    }
}
