//! `containerd-shim-microvm-v2`: containerd's shim v2 for `runtime_type =
//! "io.containerd.microvm.v2"`. One shim process and one microVM per pod; see README.md.

mod config;
mod console;
mod guest_spec;
mod mounts;
mod pod;
mod pod_identity;
mod podnet;
mod port_forward;
mod rootfs;
mod service;
mod stdio;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, Error, Flags, StartOpts};

const RUNTIME_ID: &str = "io.containerd.microvm.v2";

struct MicrovmShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: String,
    address: String,
    socket: String,
}

#[async_trait]
impl Shim for MicrovmShim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        MicrovmShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
        }
    }

    /// Starts (or finds) the pod's shim: containers with the same sandbox-id annotation share
    /// one deterministic socket address, so a second container's start reaches the running
    /// shim (containerd-shim's `spawn` sees the address in use and answering, and only writes
    /// `<bundle>/address`).
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd writes the runtime options to stdin. Read them here so that `spawn` (which
        // parses stdin as runc's options to place the shim in a cgroup) sees none: ours are
        // CRI's runtimeoptions, and the create request carries them again anyway.
        let mut options = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut options);
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let (_, spec) = pod::read_spec(&bundle).map_err(|e| {
            Error::InvalidArgument(format!("read {}/config.json: {e}", bundle.display()))
        })?;
        let grouping = pod::grouping(&spec, &opts.id);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        std::fs::write(bundle.join("address"), &address)
            .map_err(|e| Error::Other(format!("write {}/address: {e}", bundle.display())))?;
        Ok(address)
    }

    /// `delete`: containerd runs this when the shim is gone (crashed, killed) or unreachable.
    /// Cleans up this container; when the pod's shim is dead, also its VMM and state.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        };
        let spec = pod::read_spec(&bundle).map(|(_, spec)| spec).ok();
        // Only ever beneath the bundle, as Create mounted it.
        let root_path = spec.as_ref().map_or("rootfs", rootfs::spec_root_path);
        if let Err(e) = rootfs::BundleRootfs::resolve(&bundle, root_path)
            .and_then(|rootfs| rootfs::unmount_all(&rootfs))
        {
            eprintln!("{e}");
        }
        let grouping = spec
            .as_ref()
            .map_or_else(|| self.id.clone(), |spec| pod::grouping(spec, &self.id));
        let address = pod::shim_address(&self.address, &self.namespace, &grouping);
        if !shim_answers(pod::socket_path(&address)) {
            let dir = pod::state_dir(&address);
            kill_vmm(&dir);
            if let Some(netns) = podnet::recorded(&dir) {
                podnet::unplumb(&netns);
            }
            mounts::remove_state_dir(&dir);
            let _ = std::fs::remove_file(pod::socket_path(&address));
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(service::timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    /// The serving shim: its socket (bound by containerd-shim under the umask `main` sets) is
    /// made 0600 explicitly, then it runs until the pod is over.
    async fn wait(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let socket = pod::socket_path(&self.socket);
        if let Err(e) = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!("chmod 0600 {socket}: {e}");
        }
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(
            self.namespace.clone(),
            self.socket.clone(),
            publisher,
            self.exit.clone(),
        )
    }
}

/// Whether a shim listens on this socket.
fn shim_answers(path: &str) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Kills the VMM named by the pod's pid file, if that pid is still a process working in this
/// state directory (so a recycled pid is never hit).
fn kill_vmm(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join(pod::VMM_PID_FILE)) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    // The sandbox starts the VMM in the pod's state directory (its arguments name no path).
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    if cwd.is_none() || cwd != std::fs::canonicalize(dir).ok() {
        return;
    }
    // SAFETY: kill(2) on a pid verified above to be this pod's VMM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        // Not our child: init (or a subreaper) reaps it; wait until it is gone.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::main]
async fn main() {
    // Everything the shim and its children (the VMM's vsock sockets, mke2fs) create is private
    // unless given a mode explicitly: not whatever umask containerd passed down.
    // SAFETY: umask(2) only sets this process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    let config = Config {
        // The shim's children are the VMM (a std::process::Child the sandbox waits for) and
        // mke2fs; a SIGCHLD reaper reaping them behind those waits would break them.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    run::<MicrovmShim>(RUNTIME_ID, Some(config)).await;
}
