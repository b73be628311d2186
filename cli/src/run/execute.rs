//! A run's VM from boot to shutdown: [`execute`] starts the sandbox, creates and starts the
//! container with its stdio, forwards signals and the window size, waits, shuts the VM down.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use sandbox::agent_protocol::ttrpc::Code;
use sandbox::{
    Console, ContainerConfig, Disk, KernelParam, ProcessIo, Rootfs, RootfsSource, Sandbox,
    SandboxConfig, SandboxSettings,
};

use super::Plan;
use crate::network;
use crate::state::{RunDir, Status};
use crate::volumes;

/// Times of the phases, for `--timings`.
#[derive(Default)]
pub(super) struct Timings {
    pub(super) start: Option<Instant>,
    pub(super) prepare: Duration,
    pub(super) sandbox_start: Duration,
    pub(super) container_start: Duration,
    pub(super) workload: Duration,
    pub(super) teardown: Duration,
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
pub(super) struct Ended {
    pub(super) code: i32,
    pub(super) note: Option<String>,
}

/// Boots the VM, runs the container to its end, shuts the VM down.
pub(super) async fn execute(
    plan: &Plan,
    rd: &RunDir,
    stdio: Stdio,
    t: &mut Timings,
) -> Result<Ended> {
    let mut cfg = SandboxConfig::new(&plan.vmm, &plan.kernel, &plan.agent);
    cfg.cpus = plan.cpus;
    cfg.memory_mib = plan.memory_mib;
    cfg.disks = plan
        .disks
        .iter()
        .map(|(path, read_only)| Disk {
            path: path.clone(),
            read_only: *read_only,
            rate_limit: plan.disk_rate,
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
    cfg.start_timeout = Duration::from_secs(plan.boot_timeout_s);
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
    // The run's network before its VMM: the VMM starts in the run's namespace, on the tap.
    // After the signal handlers (a Ctrl-C here is seen once the boot starts); undone by
    // `finish` (or `microvm rm`) whatever happens from here on.
    let net = match plan.network.mode {
        network::Mode::None => None,
        network::Mode::Bridge => {
            let (dir, id, np) = (rd.path.clone(), plan.id.clone(), plan.network.clone());
            let attached =
                tokio::task::spawn_blocking(move || network::attach(&dir, &id, &np)).await??;
            cfg.nets.push(network::net_config(&attached.plumbing)?);
            cfg.netns = Some(attached.netns.clone());
            Some(attached)
        }
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
        let started = start_container(&sb, plan, rd, stdio, net.as_ref(), t).await;
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
    net: Option<&network::Attached>,
    t: &mut Timings,
) -> Result<Started> {
    let phase = Instant::now();
    let dns = match net {
        Some(n) => {
            sb.configure_network(&n.plumbing.interface.agent_request())
                .await
                .context("configure the guest's network")?;
            n.dns.clone()
        }
        None => network::Dns::default(),
    };
    sb.create_sandbox(&SandboxSettings {
        dns_servers: dns.servers,
        dns_search: dns.search,
        dns_options: dns.options,
        hostname: plan.hostname.clone(),
        hosts: network::hosts::hosts_file(
            &plan.hostname,
            net.and_then(network::Attached::address),
            &plan.network.add_hosts,
        ),
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
            let open = |p: PathBuf| -> Result<OwnedFd> { Ok(crate::state::open_log(&p)?.into()) };
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
