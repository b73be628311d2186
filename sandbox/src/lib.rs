//! The host side of a microVM sandbox, shared by `microvm run` and the containerd shim.
//!
//! [`Sandbox::start`] builds an initramfs holding only the static guest agent as `/init`,
//! starts the VMM (`microvm boot`) as a child process with the kernel, that initramfs, the disks
//! and a vsock device, and waits until the agent answers `Health`. Then every agent RPC is a
//! typed async method; processes get their stdin/stdout/stderr attached to host file
//! descriptors (or a terminal) through their own vsock streams, and [`Process::wait`] returns
//! only after all their output was written to those descriptors.
//!
//! Dropping a [`Sandbox`] kills and reaps the VMM and removes its sockets (and its state
//! directory when the sandbox made it). [`Sandbox::shutdown`] asks the agent to end the VM
//! cleanly instead.
//!
//! The API is async (tokio): the ttRPC client runs on the caller's runtime.

mod io;
pub mod locate;
pub mod share;

pub use share::SharedDir;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use agent_protocol;
use agent_protocol::agent as pb;
use agent_protocol::agent_ttrpc::AgentClient;
use agent_protocol::stdio::{Header, Stream};
use agent_protocol::ttrpc::{self, context, Code};

/// The guest command line the sandbox boots with unless told otherwise: serial console, reset
/// through the i8042 on reboot and panic, no PCI probing, quiet (the same as
/// `vmm::DEFAULT_CMDLINE`).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host file, socket or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The VMM ended before the agent answered (the console's end is included).
    #[error("the VMM exited ({status}) before the agent answered{}", tail(.console))]
    VmmExited { status: ExitStatus, console: String },
    /// The agent did not answer `Health` in time.
    #[error("the guest agent did not answer within {timeout:?}{}", tail(.console))]
    AgentTimeout { timeout: Duration, console: String },
    /// The agent answered an RPC with an error status.
    #[error("{method}: {message} ({code:?})")]
    Rpc {
        method: &'static str,
        code: Code,
        message: String,
    },
    /// The RPC did not get through (connection lost, timeout on the host side).
    #[error("{method}: {source}")]
    Transport {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    /// The agent refused a stdio stream.
    #[error("the agent refused the stream {what}: {reason}")]
    StdioRefused { what: String, reason: String },
    /// A request the sandbox will not send (bad id, inconsistent stdio, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

fn tail(console: &str) -> String {
    if console.is_empty() {
        String::new()
    } else {
        format!("; console:\n{console}")
    }
}

impl Error {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The agent's status code, for an [`Error::Rpc`].
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn rpc(method: &'static str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => Error::Rpc {
                method,
                code: s.code(),
                message: s.message,
            },
            other => Error::Transport {
                method,
                source: other,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A disk for the guest (`/dev/vda`, `/dev/vdb`, ... in order).
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Where the VMM's output (the guest's serial console and the VMM's own log) goes.
#[derive(Debug, Clone)]
pub enum Console {
    Null,
    Inherit,
    /// Appended to this file.
    File(PathBuf),
}

impl Console {
    /// Sends a child process's stdout and stderr where this console goes.
    fn redirect(&self, cmd: &mut Command) -> Result<()> {
        match self {
            Console::Null => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
            Console::Inherit => {}
            Console::File(path) => {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                let f2 = f
                    .try_clone()
                    .map_err(|e| Error::io("dup the console file", e))?;
                cmd.stdout(f).stderr(f2);
            }
        }
        Ok(())
    }
}

/// How to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The `microvm` binary.
    pub microvm: PathBuf,
    /// The guest kernel (vmlinux or bzImage).
    pub kernel: PathBuf,
    /// The static `microvm-agent` binary; it becomes the initramfs's `/init`.
    pub agent: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disks: Vec<Disk>,
    /// The guest kernel command line (`RUST_LOG=debug` on it sets the agent's log level).
    pub cmdline: String,
    /// A virtio-rng device (the guest's entropy source).
    pub rng: bool,
    pub console: Console,
    /// Where the vsock socket and the initramfs go; `None`: a temporary directory, removed
    /// when the sandbox is dropped. Unix socket paths must stay under 108 bytes.
    pub state_dir: Option<PathBuf>,
    /// How long [`Sandbox::start`] waits for the agent.
    pub start_timeout: Duration,
    /// The host-side deadline of each RPC except `WaitProcess` and `GetOomEvent` (which wait
    /// as long as it takes).
    pub rpc_timeout: Duration,
    /// The guest's vsock context id.
    pub guest_cid: u32,
    /// Host directories shared live into the guest (virtio-fs, one virtiofsd for all of them):
    /// the guest mounts [`share::guest_mount`] and finds directory `i` at
    /// [`share::guest_path`]`(i)`.
    pub shares: Vec<SharedDir>,
    /// The virtio-fs daemon; `None`: [`locate::virtiofsd`].
    pub virtiofsd: Option<PathBuf>,
}

impl SandboxConfig {
    pub fn new(
        microvm: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        agent: impl Into<PathBuf>,
    ) -> Self {
        Self {
            microvm: microvm.into(),
            kernel: kernel.into(),
            agent: agent.into(),
            cpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            cmdline: DEFAULT_CMDLINE.into(),
            rng: true,
            console: Console::Null,
            state_dir: None,
            start_timeout: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(60),
            guest_cid: 3,
            shares: Vec::new(),
            virtiofsd: None,
        }
    }
}

/// Guest-wide settings ([`Sandbox::create_sandbox`]).
#[derive(Debug, Clone, Default)]
pub struct SandboxSettings {
    pub hostname: String,
    pub dns_servers: Vec<String>,
    pub dns_search: Vec<String>,
    pub dns_options: Vec<String>,
    pub sysctls: BTreeMap<String, String>,
    /// Guest mounts (absolute guest destinations).
    pub mounts: Vec<Mount>,
    /// Containers created afterwards share one PID namespace (Kubernetes'
    /// `shareProcessNamespace`): they see each other's processes.
    pub share_pid_namespace: bool,
    /// Containers created afterwards share one IPC namespace (Kubernetes always does this
    /// within a pod): SysV IPC and POSIX message queues are common to them.
    pub share_ipc_namespace: bool,
}

/// A filesystem the agent mounts (see agent.proto's `Mount`).
#[derive(Debug, Clone, Default)]
pub struct Mount {
    pub source: String,
    pub destination: String,
    pub fstype: String,
    pub options: Vec<String>,
}

impl Mount {
    fn to_pb(&self) -> pb::Mount {
        pb::Mount {
            source: self.source.clone(),
            destination: self.destination.clone(),
            fstype: self.fstype.clone(),
            options: self.options.clone(),
            ..Default::default()
        }
    }
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone)]
pub enum RootfsSource {
    /// A guest block device ("/dev/vda") with its filesystem type.
    Block {
        path: String,
        fstype: String,
        options: Vec<String>,
    },
    /// A guest directory (for example on a [`SandboxSettings`] mount).
    Directory(String),
}

#[derive(Debug, Clone)]
pub struct Rootfs {
    pub source: RootfsSource,
    /// A tmpfs-backed overlay on top, so the container can write.
    pub writable: bool,
}

/// A container to create.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub id: String,
    /// The OCI runtime spec (config.json) as JSON.
    pub spec_json: Vec<u8>,
    pub rootfs: Rootfs,
    /// Mounted inside the rootfs (destinations are container paths).
    pub mounts: Vec<Mount>,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// A process's stdio on the host: descriptors the sandbox reads (stdin) or writes (stdout,
/// stderr); `None` is /dev/null for the process. With `terminal`, the process gets a pty in the
/// guest: stdin feeds it, stdout gets its output, and stderr must be `None`.
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub terminal: Option<WindowSize>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128+N for a signal N (127/126: the executable was missing or not
    /// executable).
    pub code: i32,
    /// When the agent saw it (Unix time in ms, guest clock).
    pub at_ms: u64,
}

/// A process started in the sandbox, with its stdio being copied.
pub struct Process {
    pub container_id: String,
    /// Empty for a container's init process.
    pub exec_id: String,
    /// Its pid in the guest.
    pub pid: u32,
    client: AgentClient,
    outputs: Vec<std::thread::JoinHandle<std::io::Result<u64>>>,
}

impl Process {
    /// Waits for the process to exit and for all its output to be written to the host
    /// descriptors given at start.
    pub async fn wait(self) -> Result<Exit> {
        let exit = wait_rpc(&self.client, &self.container_id, &self.exec_id).await?;
        for h in self.outputs {
            let joined = tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| Error::io("join a stdio thread", std::io::Error::other(e)))?;
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Error::io("copy process output", e)),
                Err(_) => {
                    return Err(Error::io(
                        "copy process output",
                        std::io::Error::other("the copy thread panicked"),
                    ))
                }
            }
        }
        Ok(exit)
    }
}

fn process_ref(container_id: &str, exec_id: &str) -> protobuf::MessageField<pb::ProcessRef> {
    protobuf::MessageField::some(pb::ProcessRef {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    })
}

async fn wait_rpc(client: &AgentClient, container_id: &str, exec_id: &str) -> Result<Exit> {
    let req = pb::WaitProcessRequest {
        process: process_ref(container_id, exec_id),
        ..Default::default()
    };
    let r = client
        .wait_process(context::with_timeout(0), &req)
        .await
        .map_err(|e| Error::rpc("WaitProcess", e))?;
    Ok(Exit {
        code: r.exit_code,
        at_ms: r.exited_at_ms,
    })
}

/// The VMM child process: killed, reaped and its sockets removed when dropped. A sandbox
/// reached through [`Sandbox::connect`] has no child and leaves the VMM and its sockets alone.
struct Vmm {
    child: Option<Child>,
    uds: PathBuf,
}

impl Vmm {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            remove_sockets(&self.uds);
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running microVM with the agent answering.
pub struct Sandbox {
    // Dropped first: the VMM dies before its state directory goes.
    vmm: Vmm,
    /// Serves the shared directories; dropped after the VMM.
    _virtiofsd: Option<share::Virtiofsd>,
    client: AgentClient,
    state_dir: PathBuf,
    /// Kept to remove the directory on drop.
    _temp: Option<tempfile::TempDir>,
    console: Console,
    rpc_timeout: Duration,
}

/// Retries CONNECT to the agent port until `Health` answers.
async fn connect_agent(vmm: &mut Vmm, console: &Console, timeout: Duration) -> Result<AgentClient> {
    let started = Instant::now();
    loop {
        if let Some(status) = vmm.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            vmm.child = None;
            return Err(Error::VmmExited {
                status,
                console: console_tail(console),
            });
        }
        if started.elapsed() > timeout {
            return Err(Error::AgentTimeout {
                timeout,
                console: console_tail(console),
            });
        }
        let attempt = async {
            let s = io::connect_port(&vmm.uds, agent_protocol::AGENT_PORT)
                .await
                .ok()?;
            let client = AgentClient::new(ttrpc::r#async::Client::new(
                ttrpc::r#async::transport::Socket::from(s),
            ));
            client
                .health(
                    context::with_timeout(2_000_000_000),
                    &pb::HealthRequest::new(),
                )
                .await
                .ok()?;
            Some(client)
        };
        if let Ok(Some(client)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
            tracing::debug!("agent answered after {:?}", started.elapsed());
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last 4 KiB of the console file, if the console goes to one.
fn console_tail(console: &Console) -> String {
    match console {
        Console::File(p) => {
            let text = fs::read(p).unwrap_or_default();
            let start = text.len().saturating_sub(4096);
            String::from_utf8_lossy(&text[start..]).into_owned()
        }
        _ => String::new(),
    }
}

impl Sandbox {
    /// Starts the VMM and waits until the agent answers `Health`.
    pub async fn start(cfg: SandboxConfig) -> Result<Sandbox> {
        let (state_dir, temp) = match &cfg.state_dir {
            Some(d) => {
                fs::create_dir_all(d)
                    .map_err(|e| Error::io(format!("create {}", d.display()), e))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("microvm-sandbox-")
                    .tempdir()
                    .map_err(|e| Error::io("create a temporary directory", e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let uds = state_dir.join("vsock.sock");
        remove_sockets(&uds);
        let initrd = state_dir.join("initramfs.cpio");
        let mut image = initramfs::Initramfs::new();
        image
            .host_file("init", &cfg.agent)
            .map_err(|e| Error::io(format!("read the agent {}", cfg.agent.display()), e))?;
        image
            .write_file(&initrd)
            .map_err(|e| Error::io(format!("write {}", initrd.display()), e))?;

        let mut cmd = Command::new(&cfg.microvm);
        cmd.arg("boot")
            .arg("--kernel")
            .arg(&cfg.kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(&cfg.cmdline)
            .arg("--cpus")
            .arg(cfg.cpus.to_string())
            .arg("--memory")
            .arg(cfg.memory_mib.to_string())
            .arg("--vsock")
            .arg(format!("{},{}", cfg.guest_cid, uds.display()))
            .stdin(Stdio::null());
        // A process group of its own: a terminal's SIGINT, SIGQUIT or SIGTSTP goes to the
        // foreground group (the program that started the sandbox), never to the VMM, so that
        // program decides what a Ctrl-C does (end the sandbox, which kills the VMM on drop, or
        // forward it to the guest). No PR_SET_PDEATHSIG: it fires when the spawning *thread*
        // exits, and async runtimes start and end their threads at will.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        for d in &cfg.disks {
            let mut arg = d.path.clone().into_os_string();
            if d.read_only {
                arg.push(",ro");
            }
            cmd.arg("--disk").arg(arg);
        }
        if cfg.rng {
            cmd.arg("--rng");
        }
        let virtiofsd = match cfg.shares.is_empty() {
            true => None,
            false => {
                let binary = match &cfg.virtiofsd {
                    Some(p) => p.clone(),
                    None => locate::virtiofsd().map_err(|e| Error::Invalid(e.to_string()))?,
                };
                let d = share::Virtiofsd::spawn(&binary, &state_dir, &cfg.shares, &cfg.console)?;
                let mut arg = std::ffi::OsString::from(format!("{},", share::SHARE_TAG));
                arg.push(&d.socket);
                cmd.arg("--fs").arg(arg);
                Some(d)
            }
        };
        cfg.console.redirect(&mut cmd)?;
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("start {}", cfg.microvm.display()), e))?;
        tracing::debug!(pid = child.id(), "VMM started");
        // From here on, dropping `vmm` kills the VMM.
        let mut vmm = Vmm {
            child: Some(child),
            uds,
        };
        let client = connect_agent(&mut vmm, &cfg.console, cfg.start_timeout).await?;
        Ok(Sandbox {
            vmm,
            _virtiofsd: virtiofsd,
            client,
            state_dir,
            _temp: temp,
            console: cfg.console.clone(),
            rpc_timeout: cfg.rpc_timeout,
        })
    }

    /// Connects to the agent of a VM that another process started (for example `microvm exec`
    /// into a detached run), through the VMM's vsock socket. Dropping the returned sandbox
    /// closes the connection and leaves the VM running; [`Sandbox::shutdown`] still ends it.
    pub async fn connect(vsock_path: impl Into<PathBuf>, rpc_timeout: Duration) -> Result<Sandbox> {
        let uds = vsock_path.into();
        let state_dir = uds.parent().map(Path::to_path_buf).unwrap_or_default();
        let s = tokio::time::timeout(
            rpc_timeout,
            io::connect_port(&uds, agent_protocol::AGENT_PORT),
        )
        .await
        .map_err(|_| {
            Error::io(
                format!("connect to {}", uds.display()),
                std::io::ErrorKind::TimedOut.into(),
            )
        })?
        .map_err(|e| Error::io(format!("connect to {}", uds.display()), e))?;
        let client = AgentClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::from(s),
        ));
        let sandbox = Sandbox {
            vmm: Vmm { child: None, uds },
            _virtiofsd: None,
            client,
            state_dir,
            _temp: None,
            console: Console::Null,
            rpc_timeout,
        };
        sandbox.health().await?;
        Ok(sandbox)
    }

    /// The end of the console (when it goes to a file), to show what the guest said.
    pub fn console_tail(&self) -> String {
        console_tail(&self.console)
    }

    /// The VMM's pid.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.child.as_ref().map(Child::id)
    }

    /// The VMM's vsock unix socket (guest connections to host port P reach `<it>_P`).
    pub fn vsock_path(&self) -> &Path {
        &self.vmm.uds
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The raw ttRPC client, for callers that need more than these methods.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    fn ctx(&self) -> context::Context {
        context::with_timeout(self.rpc_timeout.as_nanos() as i64)
    }

    pub async fn version(&self) -> Result<pb::VersionResponse> {
        self.client
            .version(self.ctx(), &pb::VersionRequest::new())
            .await
            .map_err(|e| Error::rpc("Version", e))
    }

    /// The guest's uptime, once the agent answers.
    pub async fn health(&self) -> Result<Duration> {
        let r = self
            .client
            .health(self.ctx(), &pb::HealthRequest::new())
            .await
            .map_err(|e| Error::rpc("Health", e))?;
        Ok(Duration::from_millis(r.uptime_ms))
    }

    pub async fn create_sandbox(&self, s: &SandboxSettings) -> Result<()> {
        let req = pb::CreateSandboxRequest {
            hostname: s.hostname.clone(),
            dns_servers: s.dns_servers.clone(),
            dns_search: s.dns_search.clone(),
            dns_options: s.dns_options.clone(),
            sysctls: s.sysctls.clone().into_iter().collect(),
            mounts: s.mounts.iter().map(Mount::to_pb).collect(),
            share_pid_namespace: s.share_pid_namespace,
            share_ipc_namespace: s.share_ipc_namespace,
            ..Default::default()
        };
        self.client
            .create_sandbox(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("CreateSandbox", e))?;
        Ok(())
    }

    pub async fn create_container(&self, c: &ContainerConfig) -> Result<()> {
        check_id(&c.id)?;
        let mut rootfs = pb::Rootfs {
            writable: c.rootfs.writable,
            ..Default::default()
        };
        match &c.rootfs.source {
            RootfsSource::Block {
                path,
                fstype,
                options,
            } => rootfs.set_block(pb::BlockDeviceRootfs {
                path: path.clone(),
                fstype: fstype.clone(),
                options: options.clone(),
                ..Default::default()
            }),
            RootfsSource::Directory(d) => rootfs.set_directory(d.clone()),
        }
        let req = pb::CreateContainerRequest {
            id: c.id.clone(),
            spec_json: c.spec_json.clone(),
            rootfs: protobuf::MessageField::some(rootfs),
            mounts: c.mounts.iter().map(Mount::to_pb).collect(),
            ..Default::default()
        };
        self.client
            .create_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("CreateContainer", e))?;
        Ok(())
    }

    /// Attaches the stdio streams of a process that is about to start; returns the stdio
    /// message for the start request and the copy threads.
    async fn attach(
        &self,
        container_id: &str,
        exec_id: &str,
        io: ProcessIo,
    ) -> Result<(
        pb::Stdio,
        Vec<std::thread::JoinHandle<std::io::Result<u64>>>,
    )> {
        if io.terminal.is_some() && io.stderr.is_some() {
            return Err(Error::Invalid(
                "a terminal has no separate stderr: give stdout only".into(),
            ));
        }
        let mut stdio = pb::Stdio {
            stdin: io.stdin.is_some(),
            stdout: io.stdout.is_some(),
            stderr: io.stderr.is_some(),
            terminal: io.terminal.is_some(),
            ..Default::default()
        };
        if let Some(ws) = io.terminal {
            stdio.rows = ws.rows.into();
            stdio.cols = ws.cols.into();
        }
        let mut outputs = Vec::new();
        let mut streams = Vec::new();
        for (fd, which) in [
            (io.stdin, Stream::Stdin),
            (io.stdout, Stream::Stdout),
            (io.stderr, Stream::Stderr),
        ] {
            if let Some(fd) = fd {
                let header = Header::new(which, container_id, exec_id);
                let s = io::open_stream(&self.vmm.uds, &header).await?;
                streams.push((fd, which, s));
            }
        }
        // Threads start only once every stream is open, so a failure leaves nothing running.
        for (fd, which, s) in streams {
            let spawned = match which {
                Stream::Stdin => io::spawn_input(fd, s).map(|_| None),
                _ => io::spawn_output(s, fd, which).map(Some),
            }
            .map_err(|e| Error::io("start a stdio thread", e))?;
            outputs.extend(spawned);
        }
        Ok((stdio, outputs))
    }

    /// Runs the container's init process with `io` attached.
    pub async fn start_container(&self, id: &str, io: ProcessIo) -> Result<Process> {
        check_id(id)?;
        let (stdio, outputs) = self.attach(id, "", io).await?;
        let req = pb::StartContainerRequest {
            id: id.into(),
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        let r = self
            .client
            .start_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("StartContainer", e))?;
        Ok(Process {
            container_id: id.into(),
            exec_id: String::new(),
            pid: r.pid,
            client: self.client.clone(),
            outputs,
        })
    }

    /// Runs another process (an OCI `process` object as JSON) in a running container.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
        io: ProcessIo,
    ) -> Result<Process> {
        check_id(container_id)?;
        check_id(exec_id)?;
        let (stdio, outputs) = self.attach(container_id, exec_id, io).await?;
        let req = pb::ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process_json: process_json.to_vec(),
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        let r = self
            .client
            .exec_process(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("ExecProcess", e))?;
        Ok(Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            pid: r.pid,
            client: self.client.clone(),
            outputs,
        })
    }

    /// Sends `signal` to one process ("" = init), or with `all` to every process of the
    /// container.
    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<()> {
        let req = pb::SignalProcessRequest {
            process: process_ref(container_id, exec_id),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.client
            .signal_process(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("SignalProcess", e))?;
        Ok(())
    }

    /// Waits for a process's exit (the raw RPC; [`Process::wait`] also waits for the host side
    /// of its output).
    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<Exit> {
        wait_rpc(&self.client, container_id, exec_id).await
    }

    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        ws: WindowSize,
    ) -> Result<()> {
        let req = pb::ResizePtyRequest {
            process: process_ref(container_id, exec_id),
            rows: ws.rows.into(),
            cols: ws.cols.into(),
            ..Default::default()
        };
        self.client
            .resize_pty(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("ResizePty", e))?;
        Ok(())
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = pb::CloseStdinRequest {
            process: process_ref(container_id, exec_id),
            ..Default::default()
        };
        self.client
            .close_stdin(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("CloseStdin", e))?;
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = pb::ListProcessesRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .list_processes(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("ListProcesses", e))?;
        Ok(r.pids)
    }

    pub async fn stats(&self, container_id: &str) -> Result<pb::StatsResponse> {
        let req = pb::StatsRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.client
            .stats(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("Stats", e))
    }

    /// Changes a container's cgroup resources: `resources_json` is an OCI runtime-spec
    /// `linux.resources` object (`LinuxResources`) as JSON; only the fields it has change.
    pub async fn update_container(&self, container_id: &str, resources_json: &[u8]) -> Result<()> {
        let req = pb::UpdateContainerRequest {
            container_id: container_id.into(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.client
            .update_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("UpdateContainer", e))?;
        Ok(())
    }

    /// Configures the guest's network interfaces (found by MAC), routes and neighbours, for
    /// example from `hostnet::PodInterface::agent_request`.
    pub async fn configure_network(&self, req: &pb::ConfigureNetworkRequest) -> Result<()> {
        self.client
            .configure_network(self.ctx(), req)
            .await
            .map_err(|e| Error::rpc("ConfigureNetwork", e))?;
        Ok(())
    }

    /// Waits for the next out-of-memory kill in any container.
    pub async fn next_oom_event(&self) -> Result<pb::OomEvent> {
        self.client
            .get_oom_event(context::with_timeout(0), &pb::GetOomEventRequest::new())
            .await
            .map_err(|e| Error::rpc("GetOomEvent", e))
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let req = pb::RemoveContainerRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client
            .remove_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("RemoveContainer", e))?;
        Ok(())
    }

    /// Asks the agent to end the VM and waits (up to `timeout`) for the VMM to exit; kills it
    /// after that. Returns the VMM's exit status.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<ExitStatus> {
        let sent = self
            .client
            .shutdown(self.ctx(), &pb::ShutdownRequest::new())
            .await;
        if self.vmm.child.is_none() {
            // Attached: without the request sent, there is nothing to wait for.
            sent.as_ref()
                .map_err(|e| Error::rpc("Shutdown", e.clone()))?;
        }
        match self.wait_vmm(timeout).await {
            Ok(status) => Ok(status),
            Err(e) => Err(match sent {
                Err(rpc) => Error::rpc("Shutdown", rpc),
                Ok(_) => e,
            }),
        }
    }

    /// Waits (up to `timeout`) until the VM ends by itself, without asking it to: the agent
    /// resets the VM after `Shutdown`, when it panics, or when it cannot set up the guest.
    /// Returns the VMM's exit status; on timeout the VMM is killed and the error says so. An
    /// attached sandbox ([`Sandbox::connect`]) reports status 0 once the VMM's socket stops
    /// answering.
    pub async fn wait_exit(mut self, timeout: Duration) -> Result<ExitStatus> {
        self.wait_vmm(timeout).await
    }

    async fn wait_vmm(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let Some(mut child) = self.vmm.child.take() else {
            // Attached: not our child. The VMM is gone once its socket stops answering.
            while Instant::now() < deadline {
                if std::os::unix::net::UnixStream::connect(&self.vmm.uds).is_err() {
                    return Ok(std::os::unix::process::ExitStatusExt::from_raw(0));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Err(Error::io(
                "wait for the VM",
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the VM did not end within {timeout:?}"),
                ),
            ));
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    remove_sockets(&self.vmm.uds);
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    remove_sockets(&self.vmm.uds);
                    return Err(Error::io(
                        "wait for the VMM",
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the VMM did not exit within {timeout:?}; killed"),
                        ),
                    ));
                }
                Err(e) => return Err(Error::io("wait for the VMM", e)),
            }
        }
    }

    /// Kills the VMM now and reaps it (what drop does).
    pub fn kill(&mut self) {
        self.vmm.kill();
    }

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

fn check_id(id: &str) -> Result<()> {
    if agent_protocol::valid_id(id) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid id {id:?} (1 to 64 of A-Z a-z 0-9 _ . -)"
        )))
    }
}

/// Removes the VMM's vsock socket and the `<socket>_<port>` listeners beside it.
fn remove_sockets(uds: &Path) {
    let _ = fs::remove_file(uds);
    let (Some(dir), Some(name)) = (uds.parent(), uds.file_name()) else {
        return;
    };
    let prefix = format!("{}_", name.to_string_lossy());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        for name in ["vsock.sock", "vsock.sock_5000", "other"] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        remove_sockets(&uds);
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["other".to_string()]);
    }

    #[test]
    fn errors_carry_the_agents_status() {
        let e = Error::rpc(
            "StartContainer",
            ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "executable not found")),
        );
        assert_eq!(e.code(), Some(Code::NOT_FOUND));
        assert_eq!(
            e.to_string(),
            "StartContainer: executable not found (NOT_FOUND)"
        );
    }

    /// A VMM that exits at once is reported with its status, not waited for.
    #[tokio::test]
    async fn a_vmm_that_exits_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"\x7fELF").unwrap();
        let console = dir.path().join("console.log");
        let mut cfg = SandboxConfig::new("/bin/false", "/nonexistent-kernel", &agent);
        cfg.state_dir = Some(dir.path().join("state"));
        cfg.console = Console::File(console);
        let started = Instant::now();
        let err = Sandbox::start(cfg).await.err().expect("must fail");
        assert!(matches!(err, Error::VmmExited { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!dir.path().join("state/vsock.sock").exists());
    }
}
