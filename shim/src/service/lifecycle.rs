//! A container's life: Create (the pod's VM booted on the first, the rootfs image written into
//! a slot disk, the container created in the guest), Start (of the init or an exec), Delete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::TtrpcResult;
use sandbox::agent_protocol::ttrpc::Code as AgentCode;
use sandbox::{ContainerConfig, Rootfs, RootfsSource};

use super::process::{Container, Proc, ProcStatus};
use super::requests::config_path_from_options;
use super::status::{agent_err, internal, invalid, status, unimplemented};
use super::Inner;
use crate::config::ShimConfig;
use crate::console::ConsoleLog;
use crate::guest_spec::namespaces::{check_host_netns, use_vm_network};
use crate::guest_spec::{guest_disk, guest_spec, PodView};
use crate::mounts;
use crate::pod;
use crate::pod_identity;
use crate::rootfs::{self, BundleRootfs, HostMount};
use crate::stdio::{LogContext, StdioPaths};

/// The snapshotter's mounts on `tree` (none: a tree already there), an ext4 image of it
/// written into the slot file, the mounts undone. Blocking. Returns the image's size and how
/// long it took.
fn build_rootfs_image(
    mounts: &[HostMount],
    tree: &BundleRootfs,
    slot_file: &Path,
    slot_bytes: u64,
) -> Result<(u64, Duration), rootfs::RootfsError> {
    let started = std::time::Instant::now();
    let r = rootfs::mount_all(mounts, tree)
        .and_then(|_| rootfs::rootfs_image(tree.path(), slot_file, slot_bytes));
    if !mounts.is_empty() {
        if let Err(e) = rootfs::unmount_all(tree) {
            tracing::warn!("{e}");
        }
    }
    r.map(|size| (size, started.elapsed()))
}

/// How much of the console's end an error quotes.
const CONSOLE_TAIL_BYTES: u64 = 4096;

/// An agent error with the end of the VM's console appended (what the guest said about it).
fn with_console(e: sandbox::Error, console: Option<&ConsoleLog>) -> ttrpc::Error {
    let console = console
        .map(|c| c.tail(CONSOLE_TAIL_BYTES))
        .unwrap_or_default();
    let mut err = agent_err(e);
    if let ttrpc::Error::RpcStatus(s) = &mut err {
        if !console.is_empty() {
            s.message.push_str(&format!("; VM console:\n{console}"));
        }
    }
    err
}

/// Removes a container's bind sources from the pod's share.
fn detach_binds(pod: &mut super::vm::Pod, id: &str) {
    if let Some(share) = pod.share.as_mut() {
        share.detach(id);
    }
}

impl Inner {
    pub(crate) async fn create(
        self: &Arc<Self>,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.containers.lock().unwrap().contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("restoring from a checkpoint"));
        }
        let stdio = StdioPaths::checked(&req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(invalid)?;
        let bundle = PathBuf::from(&req.bundle);
        let (_, spec) = pod::read_spec(&bundle)
            .map_err(|e| invalid(format!("read {}/config.json: {e}", bundle.display())))?;
        let tree =
            BundleRootfs::resolve(&bundle, rootfs::spec_root_path(&spec)).map_err(invalid)?;
        let config_path = req.options.as_ref().and_then(config_path_from_options);
        let cfg = ShimConfig::load(config_path.as_deref()).map_err(invalid)?;

        // The pod lock is held through the slot's image build: containers of one pod are
        // created one after another.
        let mut pod = self.pod.lock().await;
        let identity = pod_identity::admit(pod.identity.as_ref(), &req.id, &spec)
            .map_err(|e| status(Code::PERMISSION_DENIED, e.to_string()))?;
        let running = |pid| self.init_running(pid);
        let mut guest = guest_spec(
            &spec,
            &PodView {
                first: pod.identity.is_none(),
                running: &running,
            },
        )
        .map_err(invalid)?;
        if let Some(netns) = &guest.host_netns {
            check_host_netns(netns).map_err(invalid)?;
        }
        // Before any VM boots: a refused bind source costs nothing.
        let binds = mounts::open_binds(&guest.spec).map_err(invalid)?;
        let sandbox = match pod.sandbox.clone() {
            Some(sandbox) => sandbox,
            None => {
                let size = pod::vm_size(&cfg, &spec).map_err(invalid)?;
                self.boot_vm(&mut pod, &cfg, &spec, size, guest.host_netns.as_deref())
                    .await
                    .map_err(|e| internal(format!("{e:#}")))?
            }
        };
        if guest.host_netns.is_some() && pod.net.is_some() {
            use_vm_network(&mut guest.spec);
        }
        let slot = pod.free_slot()?;
        match pod.share.as_mut() {
            Some(share) => share.attach(&req.id, &mut guest.spec, binds),
            None => mounts::refuse_without_share(&binds),
        }
        .map_err(|e| status(Code::FAILED_PRECONDITION, e.to_string()))?;
        let slot_file = self.state_dir.join(format!("slot{slot}.img"));
        let slot_bytes = pod.slot_bytes;

        // The rootfs tree: the snapshotter's mounts on <bundle>/rootfs, or a rootfs already
        // there (no mounts given).
        let mounts: Vec<HostMount> = req.rootfs.iter().map(HostMount::from).collect();
        let tree2 = tree.clone();
        let built = tokio::task::spawn_blocking(move || {
            build_rootfs_image(&mounts, &tree2, &slot_file, slot_bytes)
        })
        .await
        .map_err(internal)
        .and_then(|r| r.map_err(internal));
        let (size, took) = built.inspect_err(|_| detach_binds(&mut pod, &req.id))?;
        tracing::info!(
            container = %req.id,
            "rootfs image of {} MiB in slot {slot} built in {:.2} s",
            size >> 20,
            took.as_secs_f64()
        );
        let spec_json = serde_json::to_vec(&guest.spec).map_err(internal)?;
        sandbox
            .create_container(&ContainerConfig {
                id: req.id.clone(),
                spec_json,
                rootfs: Rootfs {
                    source: RootfsSource::Block {
                        path: guest_disk(slot),
                        fstype: "ext4".into(),
                        options: vec![],
                    },
                    writable: true,
                },
                mounts: vec![],
            })
            .await
            .map_err(|e| {
                detach_binds(&mut pod, &req.id);
                with_console(e, pod.console.as_ref())
            })?;
        pod.slots[slot] = Some(req.id.clone());
        pod.identity.get_or_insert(identity);
        drop(pod);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle,
            rootfs: tree,
            slot,
            init: Proc::new(&req.id, "", stdio, Vec::new()),
            execs: Mutex::new(HashMap::new()),
        });
        self.containers
            .lock()
            .unwrap()
            .insert(req.id.clone(), container);
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: 0,
            ..Default::default()
        })
        .await;
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    pub(crate) async fn start(
        self: &Arc<Self>,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        p.require(ProcStatus::Created, "was already started")?;
        let sandbox = self.sandbox().await?;
        // Blocking: a logging binary is waited for until it is ready.
        let (stdio, container_id, namespace) =
            (p.stdio.clone(), c.id.clone(), self.namespace.clone());
        let opened = tokio::task::spawn_blocking(move || {
            stdio.open(LogContext {
                container_id: &container_id,
                namespace: &namespace,
            })
        })
        .await
        .map_err(internal)?
        .map_err(invalid)?;
        p.set_logger(opened.logger);
        p.keep_stdin_writer(opened.stdin_writer);
        p.hold_stdin_reader(opened.io.stdin.as_ref().and_then(|fd| fd.try_clone().ok()));
        let started = if req.exec_id.is_empty() {
            sandbox.start_container(&c.id, opened.io).await
        } else {
            sandbox.exec(&c.id, &req.exec_id, &p.spec, opened.io).await
        };
        let process = started.map_err(|e| {
            // The output descriptors are gone with the failed start: the logger reads EOF.
            p.finish_logger();
            agent_err(e)
        })?;
        let pid = process.pid;
        p.set_running(pid);
        if req.exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        } else {
            self.publish(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        }
        // Only now: the exit event must follow the start event.
        self.spawn_waiter(p, process, Arc::downgrade(&sandbox));
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    pub(crate) async fn delete(
        self: &Arc<Self>,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let st = p.state();
        if st.status == ProcStatus::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "process {}/{} is still running: kill it first",
                    req.id, req.exec_id
                ),
            ));
        }
        let response = st.delete_response();
        if !req.exec_id.is_empty() {
            c.execs.lock().unwrap().remove(&req.exec_id);
            return Ok(response);
        }
        {
            let mut pod = self.pod.lock().await;
            if let Some(sb) = &pod.sandbox {
                match sb.remove_container(&c.id).await {
                    Ok(()) => {}
                    Err(e) if e.code() == Some(AgentCode::NOT_FOUND) => {}
                    Err(e) => tracing::warn!("remove {} in the guest: {e}", c.id),
                }
            }
            if let Some(s) = pod.slots.get_mut(c.slot) {
                *s = None;
            }
            detach_binds(&mut pod, &c.id);
        }
        let _ = rootfs::unmount_all(&c.rootfs);
        self.containers.lock().unwrap().remove(&c.id);
        self.publish(TaskDelete {
            container_id: c.id.clone(),
            pid: response.pid,
            exit_status: response.exit_status,
            exited_at: response.exited_at.clone(),
            id: c.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(response)
    }
}
