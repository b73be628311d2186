//! The pod's VM: booted by the pod's first Create (with the agent as init and N pre-attached
//! slot disks), ended once no container is left.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use sandbox::{Console, Disk, Sandbox, SandboxConfig, SandboxSettings};

use super::status::status;
use super::Inner;
use crate::config::ShimConfig;
use crate::console::ConsoleLog;
use crate::guest_spec::namespaces::network_sysctls;
use crate::mounts::PodShare;
use crate::pod::{self, VmSize};
use crate::pod_identity::PodIdentity;
use crate::{podnet, rootfs};

/// The pod's VM and its slot disks.
#[derive(Default)]
pub(crate) struct Pod {
    pub sandbox: Option<Arc<Sandbox>>,
    /// Which container holds each slot disk.
    pub slots: Vec<Option<String>>,
    pub slot_bytes: u64,
    pub oom_task: Option<tokio::task::JoinHandle<()>>,
    /// The pod's console log, capped by a task of its own.
    pub console: Option<ConsoleLog>,
    pub console_task: Option<tokio::task::JoinHandle<()>>,
    /// Carries `kubectl port-forward` connections into the VM (on the pod's network only).
    pub forward_task: Option<tokio::task::JoinHandle<()>>,
    /// What the pod is (from its first container): what later containers must match.
    pub identity: Option<PodIdentity>,
    /// The pod's network namespace on the host (the CRI sandbox's CNI namespace), where the
    /// VM's network device belongs. Never passed into the guest.
    pub host_netns: Option<std::path::PathBuf>,
    /// The VM's tap joined to the pod's `eth0` in `host_netns` (none when that namespace has no
    /// `eth0`), unplumbed when the VM ends.
    pub net: Option<hostnet::Plumbing>,
    /// The pod's virtio-fs share, where its containers' bind sources are attached (none when
    /// no virtiofsd was found).
    pub share: Option<PodShare>,
}

impl Pod {
    /// A free slot disk, or RESOURCE_EXHAUSTED naming the setting to raise.
    pub fn free_slot(&self) -> TtrpcResult<usize> {
        self.slots.iter().position(Option::is_none).ok_or_else(|| {
            status(
                Code::RESOURCE_EXHAUSTED,
                format!(
                    "the pod's VM has {} container slots and all are in use (the VMM cannot \
                     hotplug disks; raise `slots` in the shim config)",
                    self.slots.len()
                ),
            )
        })
    }
}

/// What `Sandbox::start` gets: the config's paths (else `sandbox::locate`'s), the slot disks,
/// the pod's size.
fn sandbox_config(
    cfg: &ShimConfig,
    dir: &std::path::Path,
    size: VmSize,
) -> anyhow::Result<SandboxConfig> {
    let kernel = match &cfg.kernel {
        Some(k) => k.clone(),
        None => sandbox::locate::kernel()?,
    };
    let agent = match &cfg.agent {
        Some(a) => a.clone(),
        None => sandbox::locate::agent()?,
    };
    let vmm = match &cfg.vmm {
        Some(m) => m.clone(),
        None => sandbox::locate::vmm()?,
    };
    let slot_bytes = cfg.slot_size_gib << 30;
    let mut disks = Vec::new();
    for k in 0..cfg.slots {
        let path = dir.join(format!("slot{k}.img"));
        rootfs::create_slot(&path, slot_bytes)?;
        disks.push(Disk {
            path,
            read_only: true,
            rate_limit: None,
        });
    }
    let mut sc = SandboxConfig::new(vmm, kernel, agent);
    sc.cpus = size.cpus;
    sc.memory_mib = size.memory_mib;
    sc.disks = disks;
    sc.console = Console::File(dir.join(pod::CONSOLE_LOG));
    sc.state_dir = Some(dir.to_path_buf());
    sc.start_timeout = Duration::from_secs(cfg.boot_timeout_s);
    sc.kernel_params
        .push(sandbox::KernelParam::new("RUST_LOG", &cfg.log_level));
    Ok(sc)
}

impl Inner {
    pub(crate) async fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.pod
            .lock()
            .await
            .sandbox
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }

    /// Boots the pod's VM of `size` for its first container (`spec`), on the pod's network
    /// when `host_netns` (the pod's CNI namespace) has an `eth0`. The pod's state directory and
    /// everything the shim puts there are the shim's only (0700, files 0600).
    pub(crate) async fn boot_vm(
        self: &Arc<Self>,
        pod: &mut Pod,
        cfg: &ShimConfig,
        spec: &serde_json::Value,
        size: VmSize,
        host_netns: Option<&Path>,
    ) -> anyhow::Result<Arc<Sandbox>> {
        let dir = &self.state_dir;
        for d in [Path::new(pod::STATE_ROOT), dir] {
            pod::private_dir(d).with_context(|| format!("create {}", d.display()))?;
        }
        let console = ConsoleLog::create(dir.join(pod::CONSOLE_LOG), cfg.console_log_max_kib << 10)
            .context("create the console log")?;
        if let Some(old) = pod.console_task.replace(console.clone().spawn_cap_task()) {
            old.abort();
        }
        pod.console = Some(console);
        let mut sc = sandbox_config(cfg, dir, size)?;
        sc.cgroup_parent = pod::cgroup_parent(spec);
        pod.share = pod_share(cfg, dir, &mut sc)?;
        if let Some(netns) = host_netns {
            self.plumb(pod, &mut sc, netns).await?;
        }
        let booted = self.start_vm(pod, cfg, spec, sc).await;
        if booted.is_err() {
            unplumb(pod).await;
        }
        booted
    }

    /// Joins a tap to the pod's `eth0` in `netns` and puts it on the VM's config, with the VMM
    /// to run in that namespace. The namespace is recorded first in the state directory, for a
    /// `delete` after a killed shim.
    async fn plumb(
        &self,
        pod: &mut Pod,
        sc: &mut SandboxConfig,
        netns: &Path,
    ) -> anyhow::Result<()> {
        pod::write_private(
            &self.state_dir.join(podnet::NETNS_FILE),
            netns.as_os_str().as_encoded_bytes(),
        )
        .context("record the pod's network namespace")?;
        pod.host_netns = Some(netns.to_path_buf());
        let ns = netns.to_path_buf();
        let plumbing = tokio::task::spawn_blocking(move || podnet::plumb(&ns))
            .await?
            .with_context(|| {
                format!(
                    "connect the VM to the pod's network namespace {}",
                    netns.display()
                )
            })?;
        if let Some(p) = plumbing {
            sc.nets
                .push(podnet::net_config(&p).map_err(anyhow::Error::msg)?);
            sc.netns = Some(netns.to_path_buf());
            pod.net = Some(p);
        }
        Ok(())
    }

    async fn start_vm(
        self: &Arc<Self>,
        pod: &mut Pod,
        cfg: &ShimConfig,
        spec: &serde_json::Value,
        sc: SandboxConfig,
    ) -> anyhow::Result<Arc<Sandbox>> {
        let dir = &self.state_dir;
        let started = std::time::Instant::now();
        let sandbox = match Sandbox::start(sc.clone()).await {
            Ok(s) => s,
            // The open early-boot bugs (rare): a triple fault, or a guest that never gets to
            // the agent. One announced retry.
            Err(e @ (sandbox::Error::VmmExited { .. } | sandbox::Error::AgentTimeout { .. })) => {
                tracing::warn!("the VM ended during boot, retrying once: {e}");
                Sandbox::start(sc.clone())
                    .await
                    .context("boot the pod's VM (second try)")?
            }
            Err(e) => return Err(e).context("boot the pod's VM"),
        };
        tracing::info!(
            "pod VM up in {:.1} s ({} vCPU, {} MiB)",
            started.elapsed().as_secs_f64(),
            sc.cpus,
            sc.memory_mib
        );
        if let Some(pid) = sandbox.vmm_pid() {
            pod::write_private(&dir.join(pod::VMM_PID_FILE), pid.to_string().as_bytes())
                .context("write the VMM pid file")?;
        }
        if let Some(p) = &pod.net {
            sandbox
                .configure_network(&p.interface.agent_request())
                .await
                .context("configure the pod's network in the guest")?;
        }
        let hostname = spec
            .pointer("/hostname")
            .and_then(|h| h.as_str())
            .unwrap_or("")
            .to_string();
        // On the pod's network the VM's network namespace is the pod's: its sysctls go there.
        let sysctls = match &pod.net {
            Some(_) => network_sysctls(spec),
            None => Default::default(),
        };
        sandbox
            .create_sandbox(&SandboxSettings {
                hostname,
                sysctls,
                mounts: match pod.share {
                    Some(_) => vec![sandbox::share::guest_mount()],
                    None => Vec::new(),
                },
                ..Default::default()
            })
            .await
            .context("set up the pod in the guest")?;
        let sandbox = Arc::new(sandbox);
        pod.slots = vec![None; cfg.slots];
        pod.slot_bytes = cfg.slot_size_gib << 30;
        pod.sandbox = Some(sandbox.clone());
        pod.oom_task = Some(self.spawn_oom_watch(sandbox.clone()));
        if let (Some(_), Some(netns)) = (&pod.net, &pod.host_netns) {
            match crate::port_forward::start(netns, &sandbox).await {
                Ok(task) => pod.forward_task = Some(task),
                Err(e) => tracing::warn!("kubectl port-forward will not reach this pod: {e:#}"),
            }
        }
        Ok(sandbox)
    }

    /// Ends the VM and the shim once no container is left.
    pub(crate) async fn finish_if_empty(self: &Arc<Self>) {
        if !self.containers.lock().unwrap().is_empty() {
            return;
        }
        let mut pod = self.pod.lock().await;
        for t in [
            pod.oom_task.take(),
            pod.console_task.take(),
            pod.forward_task.take(),
        ]
        .into_iter()
        .flatten()
        {
            t.abort();
        }
        if let Some(sb) = pod.sandbox.take() {
            match Arc::try_unwrap(sb) {
                Ok(sb) => {
                    if let Err(e) = sb.shutdown(Duration::from_secs(10)).await {
                        tracing::warn!("VM shutdown: {e}");
                    }
                }
                // Someone still holds it (an RPC in flight): dropping our reference is enough,
                // the last one kills the VMM.
                Err(sb) => drop(sb),
            }
        }
        unplumb(&mut pod).await;
        pod.share = None;
        crate::mounts::remove_state_dir(&self.state_dir);
        let _ = std::fs::remove_file(pod::socket_path(&self.address));
        self.exit.signal();
    }
}

/// The pod's share root, made before the VM boots, and the live share on the VM's config; none
/// (with a warning) when no virtiofsd is found.
fn pod_share(
    cfg: &ShimConfig,
    dir: &Path,
    sc: &mut SandboxConfig,
) -> anyhow::Result<Option<PodShare>> {
    let virtiofsd = match &cfg.virtiofsd {
        Some(v) => v.clone(),
        None => match sandbox::locate::virtiofsd() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("the pod's VM gets no volumes: {e}");
                return Ok(None);
            }
        },
    };
    let share = PodShare::create(dir).context("make the pod's share")?;
    sc.live_share = true;
    sc.virtiofsd = Some(virtiofsd);
    Ok(Some(share))
}

/// Removes the pod's tap and redirects, if it has them (the VMM must be gone, or going: a
/// VMM still holding the tap only loses its link).
async fn unplumb(pod: &mut Pod) {
    if let Some(p) = pod.net.take() {
        let _ = tokio::task::spawn_blocking(move || podnet::unplumb(&p.netns)).await;
    }
}
