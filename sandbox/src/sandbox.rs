//! A running sandbox: starting it, attaching to one, waiting for its end.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use agent_protocol::agent as pb;
use agent_protocol::agent_ttrpc::AgentClient;
use agent_protocol::ttrpc::{self, context};
use vmm_api::{FsConfig, KernelCmdline, VmConfig, VsockConfig};

use crate::jail::VmJail;
use crate::vmm::{self, connect_agent, console_tail, remove_sockets, Vmm};
use crate::{io, locate, share, Console, Error, Result, SandboxConfig};

/// The VMM's config for a sandbox: `cfg`'s kernel, size, disks, net devices and command line
/// additions, the agent's initramfs and a vsock device on `uds`. Paths are made absolute, as the contract
/// wants (a relative path would be resolved against the VMM's working directory).
fn vm_config(cfg: &SandboxConfig, initrd: &Path, uds: &Path) -> Result<VmConfig> {
    let absolute = |p: &Path| {
        std::path::absolute(p).map_err(|e| Error::io(format!("make {} absolute", p.display()), e))
    };
    let mut disks = cfg.disks.clone();
    for d in &mut disks {
        d.path = absolute(&d.path)?;
    }
    let vm = VmConfig {
        kernel: absolute(&cfg.kernel)?,
        initrd: Some(absolute(initrd)?),
        cmdline: KernelCmdline::with_params(cfg.kernel_params.clone()),
        vcpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        disks,
        vsock: Some(VsockConfig {
            guest_cid: cfg.guest_cid.into(),
            uds_path: absolute(uds)?,
        }),
        rng: cfg.rng,
        nets: cfg.nets.clone(),
        fs: Vec::new(),
        force: false,
        seccomp: Default::default(),
        jail: None,
    };
    vm.validate()
        .map_err(|e| Error::Invalid(format!("VM config: {e}")))?;
    Ok(vm)
}

/// A running microVM with the agent answering.
pub struct Sandbox {
    // Dropped first: the VMM dies before its state directory goes.
    pub(crate) vmm: Vmm,
    /// Serves the shared directories; dropped after the VMM.
    _virtiofsd: Option<share::Virtiofsd>,
    pub(crate) client: AgentClient,
    state_dir: PathBuf,
    /// Kept to remove the directory on drop.
    _temp: Option<tempfile::TempDir>,
    console: Console,
    pub(crate) rpc_timeout: Duration,
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
        // The agent runs as init from an initramfs holding nothing else: a dynamically linked
        // one would make the guest reset at once without a word.
        locate::check_static_agent(&cfg.agent).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut image = initramfs::Initramfs::new();
        image
            .host_file("init", &cfg.agent)
            .map_err(|e| Error::io(format!("read the agent {}", cfg.agent.display()), e))?;
        image
            .write_file(&initrd)
            .map_err(|e| Error::io(format!("write {}", initrd.display()), e))?;

        let mut vm = vm_config(&cfg, &initrd, &uds)?;
        let virtiofsd = match cfg.shares.is_empty() && !cfg.live_share {
            true => None,
            false => {
                let binary = match &cfg.virtiofsd {
                    Some(p) => p.clone(),
                    None => locate::virtiofsd().map_err(|e| Error::Invalid(e.to_string()))?,
                };
                let d = share::Virtiofsd::spawn(
                    &binary,
                    &state_dir,
                    &cfg.shares,
                    cfg.live_share,
                    &cfg.console,
                )?;
                vm.fs.push(FsConfig {
                    tag: share::SHARE_TAG.into(),
                    socket: std::path::absolute(&d.socket)
                        .map_err(|e| Error::io("resolve the virtiofsd socket", e))?,
                });
                Some(d)
            }
        };
        let jail = match cfg.jail {
            true => Some(VmJail::prepare(&mut vm, cfg.cgroup_parent.as_deref())?),
            false => None,
        };
        let child = vmm::spawn(
            &cfg.vmm,
            &vm,
            &cfg.console,
            &state_dir,
            cfg.netns.as_deref(),
        )?;
        // From here on, dropping `vmm` kills the VMM.
        let mut vmm = Vmm {
            child: Some(child),
            uds,
            jail,
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
            vmm: Vmm {
                child: None,
                uds,
                jail: None,
            },
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

    pub(crate) fn ctx(&self) -> context::Context {
        context::with_timeout(self.rpc_timeout.as_nanos() as i64)
    }
}

impl Sandbox {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VMM that exits at once is reported with its status, not waited for.
    #[tokio::test]
    async fn a_vmm_that_exits_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, crate::locate::tests::tiny_elf(None)).unwrap();
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

    /// A dynamically linked agent (this test binary) is refused with one line, before any VMM
    /// starts (`/bin/false` as the VMM would otherwise be reported as `VmmExited`).
    #[tokio::test]
    async fn a_dynamic_agent_is_refused_before_the_vmm_starts() {
        let dir = tempfile::tempdir().unwrap();
        let agent = std::env::current_exe().unwrap();
        let mut cfg = SandboxConfig::new("/bin/false", "/nonexistent-kernel", &agent);
        cfg.state_dir = Some(dir.path().join("state"));
        cfg.console = Console::File(dir.path().join("console.log"));
        let err = Sandbox::start(cfg).await.err().expect("must fail");
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Invalid(_)) && msg.contains("dynamically linked"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }
}
