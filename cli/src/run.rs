//! `microvm run`: an image to a container in its own microVM, in the foreground or detached
//! (`-d`: a `microvm __monitor` process in its own session owns the VM).
//!
//! The run is planned here (image, user, command, spec, volume disks, VM size) and written to
//! `plan.json` in the run's directory; [`execute`] boots the VM and runs the container from the
//! plan, in this process or in the monitor.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandbox::agent_protocol::ttrpc::Code;
use sandbox::{
    Console, ContainerConfig, Disk, KernelParam, ProcessIo, Rootfs, RootfsSource, Sandbox,
    SandboxConfig, SandboxSettings,
};
use serde::{Deserialize, Serialize};

use crate::images;
use crate::spec::{self, Limits, ProcessTemplate};
use crate::state::{self, RunDir, RunRecord, Status};
use crate::volumes::{self, MountSpec, PlannedMount, TmpfsSpec, VolumeSpec};
use crate::ExitError;

/// Guest memory on top of the container's limit: the kernel, the agent and the tmpfs overlay's
/// metadata.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// The VM's memory when `--memory` is not given (no container limit then).
pub const DEFAULT_VM_MIB: u64 = 256;
const MIN_VM_MIB: u64 = 128;

/// Where the kernel and the agent come from (found without flags; these override).
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// The guest kernel [default: $MICROVM_KERNEL, else what `cargo xtask kernel` built]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The static guest agent [default: $MICROVM_AGENT, else what `cargo xtask agent` built]
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// How to reach a registry.
#[derive(clap::Args, Debug, Clone)]
pub struct PullArgs {
    /// Plain HTTP, no TLS verification, for this registry
    #[arg(long)]
    pub insecure: bool,
    /// No progress output while pulling
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl PullArgs {
    pub fn options(&self) -> image::PullOptions {
        image::PullOptions {
            insecure: self.insecure,
            username: std::env::var("MICROVM_REGISTRY_USER").ok(),
            password: std::env::var("MICROVM_REGISTRY_PASSWORD").ok(),
            progress: !self.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Run in the background; print the run's id
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Remove the run's state when it ends
    #[arg(long)]
    pub rm: bool,
    /// A name for the run (for exec, stop, logs, ...)
    #[arg(long)]
    pub name: Option<String>,
    /// Keep stdin open and stream it to the container
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal (pty)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set a variable: KEY=VALUE, or KEY to pass this environment's value
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read variables from a file (KEY=VALUE lines, # comments)
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Replace the image's entrypoint
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Working directory inside the container
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User: name|uid[:group|gid]
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// The container's hostname [default: the run id]
    #[arg(long)]
    pub hostname: Option<String>,
    /// CPUs: the VM's vCPUs (rounded up) and the container's CPU quota
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Memory limit of the container (bare number: MiB; or 512k, 64m, 1g); the VM gets 64 MiB more
    #[arg(short = 'm', long, value_parser = parse_memory, value_name = "BYTES")]
    pub memory: Option<u64>,
    /// A host directory shared live (virtio-fs): HOSTPATH:CTRPATH[:ro|:rw]; HOSTPATH is created
    /// if missing
    #[arg(short = 'v', long = "volume", value_parser = volumes::parse, value_name = "HOST:CTR[:ro|:rw]")]
    pub volumes: Vec<VolumeSpec>,
    /// A mount: type=bind,source=HOSTDIR,target=CTRPATH[,readonly] or
    /// type=tmpfs,target=CTRPATH[,tmpfs-size=N][,tmpfs-mode=M]
    #[arg(long = "mount", value_parser = volumes::parse_mount, value_name = "SPEC")]
    pub mounts: Vec<MountSpec>,
    /// A tmpfs at CTRPATH (options as mount(8) takes them: size=64m,mode=1777,exec)
    #[arg(long = "tmpfs", value_parser = volumes::parse_tmpfs, value_name = "CTRPATH[:OPTS]")]
    pub tmpfs: Vec<TmpfsSpec>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub pull: PullArgs,
    /// Print the phases' durations on stderr when the run ends
    #[arg(long, hide = true)]
    pub timings: bool,
    /// The image: a registry reference, an OCI layout directory, or an OCI/docker archive
    pub image: String,
    /// The command (replaces the image's Cmd)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    let c: f64 = s.parse().map_err(|_| format!("bad CPU count {s:?}"))?;
    if !(0.01..=64.0).contains(&c) {
        return Err(format!("--cpus must be between 0.01 and 64, not {c}"));
    }
    Ok(c)
}

/// Bytes from "64" (MiB), "512k", "64m", "1g", "100b".
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib");
    let (num, mult) = match lower.char_indices().last() {
        Some((i, 'b')) => (&lower[..i], 1),
        Some((i, 'k')) => (&lower[..i], 1 << 10),
        Some((i, 'm')) => (&lower[..i], 1 << 20),
        Some((i, 'g')) => (&lower[..i], 1 << 30),
        _ => (lower, 1 << 20),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad memory size {s:?}"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("memory size {s:?} is too large"))?;
    if bytes < 6 << 20 {
        return Err(format!("memory limit {s:?} is below the minimum of 6 MiB"));
    }
    Ok(bytes)
}

/// Everything [`execute`] needs, resolved; the monitor of a detached run reads it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    /// The VMM binary (`microvm-vmm`).
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub agent: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    /// /dev/vda: the image (read-only).
    pub disks: Vec<(PathBuf, bool)>,
    /// Host directories shared into the VM (virtio-fs), with read-only flags.
    pub shares: Vec<(PathBuf, bool)>,
    pub rootfs_fstype: String,
    pub spec: serde_json::Value,
    /// The container's mounts besides its rootfs.
    pub mounts: Vec<PlannedMount>,
    pub hostname: String,
    pub interactive: bool,
    pub tty: bool,
    pub memory_limit: Option<u64>,
    pub timings: bool,
}

/// Times of the phases, for `--timings`.
#[derive(Default)]
struct Timings {
    start: Option<Instant>,
    prepare: Duration,
    sandbox_start: Duration,
    container_start: Duration,
    workload: Duration,
    teardown: Duration,
}

fn env_from_cli(args: &RunArgs) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in &args.env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("env file {}", f.display()))?;
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.extend(env_item(line));
        }
    }
    for e in &args.env {
        out.extend(env_item(e));
    }
    Ok(out)
}

/// `K=V` as is; a bare `K` takes this environment's value (and is dropped when unset, like
/// docker).
fn env_item(s: &str) -> Option<String> {
    if s.contains('=') {
        Some(s.to_string())
    } else {
        std::env::var(s).ok().map(|v| format!("{s}={v}"))
    }
}

fn locate(vm: &VmArgs) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let kernel = match &vm.kernel {
        Some(k) => k.clone(),
        None => sandbox::locate::kernel()?,
    };
    let agent = match &vm.agent {
        Some(a) => a.clone(),
        None => sandbox::locate::agent()?,
    };
    for (what, p) in [("kernel", &kernel), ("agent", &agent)] {
        if !p.is_file() {
            bail!("the {what} {} does not exist or is not a file", p.display());
        }
    }
    let vmm = sandbox::locate::vmm()?;
    Ok((vmm, kernel, agent))
}

/// `microvm run`. Returns the container's exit status.
pub fn run(args: RunArgs) -> Result<i32> {
    if let Err(e) = vmm::host::check_can_boot_guests() {
        return Err(ExitError::new(125, format!("{e}")).into());
    }
    let started = Instant::now();
    if let Some(n) = &args.name {
        state::check_name(n)?;
        if let Ok((_, r)) = state::find(n) {
            if r.name == *n {
                bail!(
                    "the name {n:?} is in use by run {}; remove it with `microvm rm {n}`",
                    r.id
                );
            }
        }
    }
    if args.tty && args.detach && args.interactive {
        bail!("-d with -i has no stdin to stream; use `microvm exec -it` into the run");
    }
    let (vmm, kernel, agent) = locate(&args.vm)?;
    let rt = runtime()?;
    let store = images::open_store(args.pull.options().progress)?;
    let img = rt.block_on(images::prepare(&store, &args.image, &args.pull.options()))?;
    tracing::debug!(
        "image {}: Fetched {{ blobs_downloaded: {}, blobs_imported: {} }}, disk built: {}",
        img.id,
        img.fetched.blobs_downloaded,
        img.fetched.blobs_imported,
        img.disk_built
    );
    let cfg = img.config.config().clone().unwrap_or_default();
    let strings = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
    let command = spec::command(
        &strings(cfg.entrypoint()),
        &strings(cfg.cmd()),
        args.entrypoint.as_deref(),
        &args.cmd,
    );
    if command.is_empty() {
        bail!("no command: the image has neither Entrypoint nor Cmd; give one");
    }
    let user_text = args
        .user
        .clone()
        .or_else(|| cfg.user().clone())
        .unwrap_or_default();
    let user = images::resolve_user(&store, &img, &user_text)?;
    let id = state::new_id()?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("run-{}", &id[..8]));
    let hostname = args.hostname.clone().unwrap_or_else(|| id.clone());
    let cwd = args
        .workdir
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        bail!("the working directory {cwd:?} must be absolute");
    }
    let process = ProcessTemplate {
        args: command,
        env: spec::merge_env(
            &strings(cfg.env()),
            &hostname,
            args.tty,
            &env_from_cli(&args)?,
        ),
        cwd,
        uid: user.uid,
        gid: user.gid,
        additional_gids: user.additional_gids.clone(),
        terminal: args.tty,
    };
    let limits = Limits {
        memory_bytes: args.memory,
        cpus: args.cpus,
    };
    let rd = RunDir::new(&id)?;
    // The VMM's vsock socket and its `_<port>` listeners must fit a unix socket path.
    let longest = rd.vsock().as_os_str().len() + "_4294967295".len();
    if longest > 107 {
        bail!(
            "the run directory {} is too long for unix socket paths (108 bytes); set \
             MICROVM_HOME to a shorter directory",
            rd.path.display()
        );
    }
    rd.create()?;
    let record = RunRecord {
        id: id.clone(),
        name,
        image: args.image.clone(),
        image_id: img.id.clone(),
        created_unix: state::now_unix(),
        status: Status::Created,
        exit_code: None,
        owner_pid: Some(std::process::id()),
        detached: args.detach,
        remove: args.rm,
        note: None,
        process: process.clone(),
    };
    rd.write(&record)?;
    // From here on a failure must not leave a half-made run behind.
    let planned = (|| -> Result<Plan> {
        let disks = vec![(img.disk.clone(), true)];
        let mut binds = args.volumes.clone();
        let mut tmpfs = args.tmpfs.clone();
        for m in &args.mounts {
            match m {
                MountSpec::Bind(b) => binds.push(b.clone()),
                MountSpec::Tmpfs(t) => tmpfs.push(t.clone()),
            }
        }
        let (shares, mounts) = volumes::plan(&binds, &tmpfs)?;
        let memory_mib = match args.memory {
            Some(b) => (b.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB).max(MIN_VM_MIB),
            None => DEFAULT_VM_MIB,
        };
        Ok(Plan {
            id: id.clone(),
            vmm,
            kernel,
            agent,
            cpus: args.cpus.map_or(1, |c| c.ceil() as u8),
            memory_mib,
            disks,
            shares,
            rootfs_fstype: img.fstype.clone(),
            spec: spec::runtime_spec(&process, &hostname, limits),
            mounts,
            hostname,
            interactive: args.interactive,
            tty: args.tty,
            memory_limit: args.memory,
            timings: args.timings,
        })
    })();
    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&rd.path);
            return Err(e);
        }
    };
    rd.write(&record)?;
    state::write_atomic(&rd.plan_path(), &serde_json::to_vec_pretty(&plan)?)?;
    let prepare = started.elapsed();
    if args.detach {
        return detach(&rd, &record);
    }
    let mut timings = Timings {
        start: Some(started),
        prepare,
        ..Default::default()
    };
    let outcome = rt.block_on(execute(&plan, &rd, Stdio::Foreground, &mut timings));
    drop(rt);
    finish(&rd, &plan, outcome, &mut timings)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Where the container's stdio goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// This process's stdin (with `-i`), stdout and stderr; the terminal with `-t`.
    Foreground,
    /// The run's log files.
    Detached,
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().context("dup a descriptor")
}

/// What happened to the container.
struct Ended {
    code: i32,
    note: Option<String>,
}

/// Boots the VM, runs the container to its end, shuts the VM down.
async fn execute(plan: &Plan, rd: &RunDir, stdio: Stdio, t: &mut Timings) -> Result<Ended> {
    let mut cfg = SandboxConfig::new(&plan.vmm, &plan.kernel, &plan.agent);
    cfg.cpus = plan.cpus;
    cfg.memory_mib = plan.memory_mib;
    cfg.disks = plan
        .disks
        .iter()
        .map(|(path, read_only)| Disk {
            path: path.clone(),
            read_only: *read_only,
        })
        .collect();
    cfg.shares = plan
        .shares
        .iter()
        .map(|(host, read_only)| sandbox::SharedDir {
            host: host.clone(),
            read_only: *read_only,
        })
        .collect();
    cfg.console = Console::File(rd.console());
    cfg.state_dir = Some(rd.path.clone());
    cfg.start_timeout = Duration::from_secs(180);
    if let Ok(level) = std::env::var("MICROVM_AGENT_LOG") {
        cfg.kernel_params.push(KernelParam::new("RUST_LOG", level));
    }
    // In the foreground, a signal that ends programs (a Ctrl-C at the terminal, a `kill`)
    // ends the run while the VM boots and the container is being started: listened for before
    // the VMM starts. The handlers do not reach the VMM: handled signals are reset to their
    // defaults at exec, and the VMM is in a process group of its own, out of the terminal's
    // reach. Once the container runs, `forward_signals` hands them to it instead.
    let mut boot_signals = match stdio {
        Stdio::Foreground => Some(BootSignals::listen()?),
        Stdio::Detached => None,
    };
    let phase = Instant::now();
    let booting = async {
        // The open early-boot triple-fault bug (see the README): one announced retry.
        let sb = match Sandbox::start(cfg.clone()).await {
            Ok(sb) => sb,
            Err(e @ sandbox::Error::VmmExited { .. })
                if e.to_string().contains("triple-faulted") =>
            {
                tracing::warn!("the VM did not start ({e}); retrying once");
                Sandbox::start(cfg).await.context("start the VM")?
            }
            Err(e) => return Err(anyhow!(e).context("start the VM")),
        };
        t.sandbox_start = phase.elapsed();
        let started = start_container(&sb, plan, rd, stdio, t).await;
        Ok((sb, started))
    };
    let (sb, started) = match boot_signals.as_mut() {
        None => booting.await?,
        Some(signals) => tokio::select! {
            booted = booting => booted?,
            // The boot's future is dropped: a started VMM is killed and reaped, its sockets
            // removed (the sandbox's `Vmm` drop), a raw terminal restored.
            signo = signals.recv() => {
                return Ok(Ended {
                    code: 128 + signo,
                    note: Some(format!(
                        "{} while the VM was starting; the run ended",
                        signal_name(signo)
                    )),
                });
            }
        },
    };
    let running_since = Instant::now();
    let ended = match started {
        Ok(Started::Running(process, raw)) => {
            wait_container(&sb, plan, rd, stdio, process, raw, boot_signals).await
        }
        Ok(Started::Ended(ended)) => Ok(ended),
        Err(e) => Err(e),
    };
    let code_known = Instant::now();
    if ended.is_ok() {
        t.workload = code_known.duration_since(running_since);
    }
    let down = sb.shutdown(Duration::from_secs(30)).await;
    if let Err(e) = down {
        tracing::warn!("the VM did not shut down cleanly: {e}");
    }
    t.teardown = code_known.elapsed();
    ended
}

/// The signals that end a foreground run during its boot: those a terminal or `kill` sends to
/// end a program. (Handled rather than ignored: an ignored disposition would survive the VMM's
/// exec.)
struct BootSignals(Vec<(i32, tokio::signal::unix::Signal)>);

impl BootSignals {
    fn listen() -> Result<BootSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut listeners = Vec::new();
        for k in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            let s = signal(SignalKind::from_raw(k))
                .with_context(|| format!("handle {}", signal_name(k)))?;
            listeners.push((k, s));
        }
        Ok(BootSignals(listeners))
    }

    fn poll_any(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<i32> {
        for (k, s) in &mut self.0 {
            if let std::task::Poll::Ready(Some(())) = s.poll_recv(cx) {
                return std::task::Poll::Ready(*k);
            }
        }
        std::task::Poll::Pending
    }

    /// The next one to arrive.
    async fn recv(&mut self) -> i32 {
        std::future::poll_fn(|cx| self.poll_any(cx)).await
    }

    /// The ones that arrived and were not received yet.
    fn arrived(&mut self) -> Vec<i32> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        while let std::task::Poll::Ready(k) = self.poll_any(&mut cx) {
            out.push(k);
        }
        out
    }
}

fn signal_name(signo: i32) -> String {
    match signo {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        n => format!("signal {n}"),
    }
}

/// How far [`start_container`] got.
enum Started {
    /// The container's process runs (and the terminal is raw while it does, with `-it`).
    Running(sandbox::Process, Option<crate::term::RawMode>),
    /// It could not be started (a missing or non-executable program).
    Ended(Ended),
}

/// Creates the sandbox and the container and starts the container's process.
async fn start_container(
    sb: &Sandbox,
    plan: &Plan,
    rd: &RunDir,
    stdio: Stdio,
    t: &mut Timings,
) -> Result<Started> {
    let phase = Instant::now();
    sb.create_sandbox(&SandboxSettings {
        hostname: plan.hostname.clone(),
        mounts: match plan.shares.is_empty() {
            true => Vec::new(),
            false => vec![sandbox::share::guest_mount()],
        },
        ..Default::default()
    })
    .await?;
    let container = ContainerConfig {
        id: plan.id.clone(),
        spec_json: serde_json::to_vec(&plan.spec)?,
        rootfs: Rootfs {
            source: RootfsSource::Block {
                path: "/dev/vda".into(),
                fstype: plan.rootfs_fstype.clone(),
                options: vec!["ro".into()],
            },
            writable: true,
        },
        mounts: plan.mounts.iter().map(volumes::container_mount).collect(),
    };
    sb.create_container(&container).await?;
    let mut raw = None;
    let io = match stdio {
        Stdio::Foreground => {
            let stdin = std::io::stdin();
            let terminal = if plan.tty {
                let size = sandbox::window_size(&stdin.as_fd())
                    .or_else(|| sandbox::window_size(&std::io::stdout().as_fd()));
                Some(size.unwrap_or(sandbox::WindowSize { rows: 24, cols: 80 }))
            } else {
                None
            };
            if plan.tty && plan.interactive {
                raw = crate::term::RawMode::enter(stdin.as_fd()).context("raw mode")?;
            }
            ProcessIo {
                stdin: if plan.interactive {
                    Some(dup(stdin.as_fd())?)
                } else {
                    None
                },
                stdout: Some(dup(std::io::stdout().as_fd())?),
                stderr: if plan.tty {
                    None
                } else {
                    Some(dup(std::io::stderr().as_fd())?)
                },
                terminal,
            }
        }
        Stdio::Detached => {
            let open = |p: PathBuf| -> Result<OwnedFd> {
                Ok(std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .with_context(|| format!("open {}", p.display()))?
                    .into())
            };
            ProcessIo {
                stdin: None,
                stdout: Some(open(rd.stdout_log())?),
                stderr: if plan.tty {
                    None
                } else {
                    Some(open(rd.stderr_log())?)
                },
                terminal: plan
                    .tty
                    .then_some(sandbox::WindowSize { rows: 24, cols: 80 }),
            }
        }
    };
    let process = match sb.start_container(&plan.id, io).await {
        Ok(p) => p,
        Err(e) if matches!(e.code(), Some(Code::NOT_FOUND | Code::PERMISSION_DENIED)) => {
            // Like docker: the reason on stderr, 127 (not found) or 126 (not executable).
            drop(raw);
            let code = sb.wait(&plan.id, "").await.map_or(
                if e.code() == Some(Code::NOT_FOUND) {
                    127
                } else {
                    126
                },
                |x| x.code,
            );
            return Ok(Started::Ended(Ended {
                code,
                note: Some(format!("{e}")),
            }));
        }
        Err(e) => return Err(e.into()),
    };
    t.container_start = phase.elapsed();
    Ok(Started::Running(process, raw))
}

/// Runs the started container to its end; `boot_signals` (foreground) are handed over to
/// `forward_signals`.
async fn wait_container(
    sb: &Sandbox,
    plan: &Plan,
    rd: &RunDir,
    stdio: Stdio,
    process: sandbox::Process,
    raw: Option<crate::term::RawMode>,
    boot_signals: Option<BootSignals>,
) -> Result<Ended> {
    // Now `exec`, `stop` and `kill` can reach it, and `run -d` returns.
    rd.update(|r| {
        r.status = Status::Running;
        r.owner_pid = Some(std::process::id());
    })?;
    let mut tasks = Vec::new();
    if stdio == Stdio::Foreground {
        // Those that came after `start_container` answered and before `forward_signals`
        // listens go to the container too.
        let arrived = boot_signals.map(|mut s| s.arrived()).unwrap_or_default();
        tasks.push(sb.forward_signals(&plan.id, "")?);
        for signo in arrived {
            if let Err(e) = sb.signal(&plan.id, "", signo, false).await {
                tracing::debug!("forwarding signal {signo}: {e}");
            }
        }
        if plan.tty {
            // The terminal whose size the pty follows: stdin's, else stdout's (`-t` without
            // `-i` may have stdin redirected, like docker).
            let stdin = std::io::stdin();
            let stdout = std::io::stdout();
            let terminal = [stdin.as_fd(), stdout.as_fd()]
                .into_iter()
                .find(|fd| sandbox::window_size(fd).is_some());
            if let Some(terminal) = terminal {
                tasks.push(sb.forward_window_size(&plan.id, "", terminal)?);
            }
        }
    }
    let exit = process.wait().await;
    for t in tasks {
        t.abort();
    }
    drop(raw);
    let exit = exit?;
    let mut note = None;
    if exit.code == 137 && plan.memory_limit.is_some() {
        if let Ok(st) = sb.stats(&plan.id).await {
            if st.oom_kill_count > 0 {
                note = Some(format!(
                    "the container ran out of memory (limit {} MiB) and was killed",
                    plan.memory_limit.unwrap_or(0) >> 20
                ));
            }
        }
    }
    let _ = sb.remove_container(&plan.id).await;
    Ok(Ended {
        code: exit.code,
        note,
    })
}

/// After the VM is gone: record the end, print timings, remove the run with `--rm`. Returns
/// the exit status.
fn finish(rd: &RunDir, plan: &Plan, outcome: Result<Ended>, t: &mut Timings) -> Result<i32> {
    let record = rd.read()?;
    let (code, note) = match &outcome {
        Ok(e) => (e.code, e.note.clone()),
        Err(e) => (125, Some(format!("{e:#}"))),
    };
    if let Ok(e) = &outcome {
        if let Some(n) = &e.note {
            eprintln!("microvm: {n}");
        }
    }
    rd.update(|r| {
        r.status = Status::Exited;
        r.exit_code = Some(code);
        r.note = note.clone();
    })?;
    if plan.timings {
        let total = t.start.map_or(Duration::ZERO, |s| s.elapsed());
        let vmm_setup = vmm_setup_ms(rd);
        let to_agent = t.sandbox_start.as_secs_f64() * 1000.0 - vmm_setup.unwrap_or(0.0);
        eprintln!(
            "microvm timings: prepare {:.1} ms, vmm setup {} ms, kernel to agent ready {:.1} ms, \
             container start {:.1} ms, workload {:.1} ms, teardown {:.1} ms, total {:.1} ms",
            t.prepare.as_secs_f64() * 1000.0,
            vmm_setup.map_or("?".into(), |v| format!("{v:.1}")),
            to_agent,
            t.container_start.as_secs_f64() * 1000.0,
            t.workload.as_secs_f64() * 1000.0,
            t.teardown.as_secs_f64() * 1000.0,
            total.as_secs_f64() * 1000.0,
        );
    }
    if record.remove {
        let _ = std::fs::remove_dir_all(&rd.path);
    }
    match outcome {
        Ok(e) => Ok(e.code),
        Err(e) => Err(ExitError::new(125, format!("{e:#}")).into()),
    }
}

/// The VMM's "first KVM_RUN at X ms" from the console log: its setup time.
fn vmm_setup_ms(rd: &RunDir) -> Option<f64> {
    let text = std::fs::read_to_string(rd.console()).ok()?;
    let at = text.find("first KVM_RUN at ")? + "first KVM_RUN at ".len();
    text[at..].split_whitespace().next()?.parse().ok()
}

/// `run -d`: starts the monitor in its own session and returns once the container runs.
fn detach(rd: &RunDir, record: &RunRecord) -> Result<i32> {
    let exe = std::env::current_exe().context("find this executable")?;
    let log = std::fs::File::create(rd.path.join("monitor.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__monitor")
        .arg(&rd.path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child only calls it before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("start the monitor")?;
    let pid = child.id();
    rd.update(|r| r.owner_pid = Some(pid))?;
    // The monitor is not waited for: it outlives this process (init reaps it).
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = rd.read()?;
        match r.status {
            Status::Running => {
                println!("{}", record.name);
                return Ok(0);
            }
            Status::Exited => {
                let note = r.note.unwrap_or_default();
                if r.exit_code == Some(125) {
                    return Err(ExitError::new(125, note).into());
                }
                // It ran and ended already (for example a missing executable).
                if !note.is_empty() {
                    eprintln!("microvm: {note}");
                }
                println!("{}", record.name);
                return Ok(r.exit_code.unwrap_or(125));
            }
            Status::Created if !state::pid_alive(pid) => {
                let log = std::fs::read_to_string(rd.path.join("monitor.log")).unwrap_or_default();
                bail!("the monitor of run {} died: {}", record.id, log.trim());
            }
            Status::Created if Instant::now() > deadline => {
                bail!("run {} did not start within 300 s", record.id);
            }
            Status::Created => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `microvm __monitor RUNDIR`: owns a detached run's VM until the container ends.
pub fn monitor(dir: PathBuf) -> Result<i32> {
    let rd = RunDir { path: dir };
    let plan: Plan =
        serde_json::from_slice(&std::fs::read(rd.plan_path())?).context("read the run's plan")?;
    rd.update(|r| r.owner_pid = Some(std::process::id()))?;
    // `microvm stop` ends the container through the agent; the monitor itself ignores the
    // terminal signals it could still get.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut t = Timings::default();
    let rt = runtime()?;
    let outcome = rt.block_on(execute(&plan, &rd, Stdio::Detached, &mut t));
    drop(rt);
    finish(&rd, &plan, outcome, &mut t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("64"), Ok(64 << 20));
        assert_eq!(parse_memory("64m"), Ok(64 << 20));
        assert_eq!(parse_memory("64MiB"), Ok(64 << 20));
        assert_eq!(parse_memory("1g"), Ok(1 << 30));
        assert_eq!(parse_memory("8192k"), Ok(8 << 20));
        assert!(parse_memory("5").is_err(), "below the minimum");
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999999g").is_err());
    }

    #[test]
    fn env_items() {
        assert_eq!(env_item("A=b=c"), Some("A=b=c".into()));
        std::env::set_var("MICROVM_TEST_ENV_ITEM", "v");
        assert_eq!(
            env_item("MICROVM_TEST_ENV_ITEM"),
            Some("MICROVM_TEST_ENV_ITEM=v".into())
        );
        assert_eq!(env_item("MICROVM_TEST_UNSET_VARIABLE"), None);
    }
}
