//! Sandbox-wide RPCs: Version, Health, CreateSandbox (hostname, /etc files, sysctls, mounts,
//! shared namespaces), ConfigureNetwork and Shutdown.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::agent::{self as pb, Empty};
use agent_protocol::ttrpc::Code;
use oci_spec::runtime::LinuxNamespaceType;

use super::{internal, status, Agent, ContainerEntry, Result, State};
use crate::etc_files;
use crate::init;
use crate::mounts;

impl State {
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
    pub(super) fn shared_namespaces(&self) -> Result<Vec<(LinuxNamespaceType, PathBuf)>> {
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
}

/// "pid+ipc" for a list of namespace types.
fn ns_names(types: &[LinuxNamespaceType]) -> String {
    types
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("+")
}

impl Agent {
    pub(super) async fn version(&self, _: pb::VersionRequest) -> Result<pb::VersionResponse> {
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

    pub(super) async fn health(&self, _: pb::HealthRequest) -> Result<pb::HealthResponse> {
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

    pub(super) async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<Empty> {
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

    pub(super) async fn configure_network(
        &self,
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

    pub(super) async fn shutdown(&self, _: pb::ShutdownRequest) -> Result<Empty> {
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
