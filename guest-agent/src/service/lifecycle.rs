//! Container lifecycle: Create (rootfs and mounts), Start, Update and Remove (kill, destroy,
//! unmount).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent_protocol::agent::{self as pb, Empty};
use agent_protocol::ttrpc::Code;
use oci_spec::runtime::LinuxResources;

use super::{classify, internal, status, Agent, ContainerEntry, Process, Result, State, KILL_WAIT};
use crate::init::{CGROUP_PARENT, STATE_DIR};
use crate::mounts;

impl State {
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

    pub(super) fn unmount_all(paths: &[PathBuf]) -> std::result::Result<(), String> {
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
    pub(super) async fn remove(
        &self,
        entry: Arc<ContainerEntry>,
    ) -> std::result::Result<(), String> {
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
}

impl Agent {
    pub(super) async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<Empty> {
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

    pub(super) async fn start_container(
        &self,
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

    pub(super) async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<Empty> {
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

    pub(super) async fn remove_container(&self, req: pb::RemoveContainerRequest) -> Result<Empty> {
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
}
