//! The task service: containerd's Task API (v2) on top of one [`Sandbox`] per pod.
//!
//! The first Create boots the pod's VM (with the agent as init and N pre-attached slot disks);
//! each container gets one slot disk holding an ext4 image of its rootfs. Process exits are
//! collected by one task per process, which publishes TaskExit and then wakes Wait.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::TtrpcResult;
use sandbox::agent_protocol::ttrpc::Code as AgentCode;
use sandbox::{
    Console, ContainerConfig, Disk, Rootfs, RootfsSource, Sandbox, SandboxConfig, SandboxSettings,
    WindowSize,
};
use tokio::sync::watch;

use crate::config::ShimConfig;
use crate::pod;
use crate::rootfs::{self, HostMount};
use crate::stdio::{LogContext, Logger, StdioPaths};

/// `Any.type_url` of CRI's runtime options for runtimes it does not know (`ConfigPath`).
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An agent error with the agent's code kept (NOT_FOUND stays NOT_FOUND, ...).
fn agent_err(e: sandbox::Error) -> ttrpc::Error {
    let code = match e.code() {
        Some(AgentCode::NOT_FOUND) => Code::NOT_FOUND,
        Some(AgentCode::ALREADY_EXISTS) => Code::ALREADY_EXISTS,
        Some(AgentCode::INVALID_ARGUMENT) => Code::INVALID_ARGUMENT,
        Some(AgentCode::FAILED_PRECONDITION) => Code::FAILED_PRECONDITION,
        Some(AgentCode::UNIMPLEMENTED) => Code::UNIMPLEMENTED,
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}

fn unimplemented(what: &str) -> ttrpc::Error {
    status(
        Code::UNIMPLEMENTED,
        format!("{what} is not implemented by the microvm shim"),
    )
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone)]
struct ProcState {
    pid: u32,
    status: ProcStatus,
    exit_code: u32,
    exited_at: Option<Timestamp>,
}

/// A container's init process ("" exec id) or an exec'd process.
struct Proc {
    container_id: String,
    exec_id: String,
    stdio: StdioPaths,
    /// The OCI process (JSON) of an exec.
    spec: Vec<u8>,
    state: Mutex<ProcState>,
    /// Becomes true once the exit is recorded (and TaskExit published).
    exited: watch::Sender<bool>,
    /// CloseIO came (containerd's copy of a short stdin can finish before or during Start):
    /// Start drops `stdin_writer` as soon as it has one.
    stdin_closed: std::sync::atomic::AtomicBool,
    /// Our write end of the stdin FIFO while the process runs; CloseIO drops it, so the guest's
    /// stdin ends after everything containerd wrote has been copied.
    stdin_writer: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The `binary://` logging program fed by the process's output, ended after the exit.
    logger: Mutex<Option<Logger>>,
}

impl Proc {
    fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Arc<Self> {
        Arc::new(Proc {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                pid: 0,
                status: ProcStatus::Created,
                exit_code: 0,
                exited_at: None,
            }),
            exited: watch::channel(false).0,
            stdin_closed: Default::default(),
            stdin_writer: Mutex::new(None),
            logger: Mutex::new(None),
        })
    }

    fn state(&self) -> ProcState {
        self.state.lock().unwrap().clone()
    }

    /// Lets the logging binary (if any) finish, in the background: called once the process's
    /// output is complete (or it never started).
    fn finish_logger(&self) {
        if let Some(logger) = self.logger.lock().unwrap().take() {
            tokio::task::spawn_blocking(move || logger.finish());
        }
    }

    fn set_exit(&self, code: u32) {
        let mut s = self.state.lock().unwrap();
        s.status = ProcStatus::Stopped;
        s.exit_code = code;
        s.exited_at = Some(timestamp(SystemTime::now()));
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    slot: usize,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

/// The pod's VM and its slot disks.
struct Pod {
    sandbox: Option<Arc<Sandbox>>,
    /// Which container holds each slot disk.
    slots: Vec<Option<String>>,
    slot_bytes: u64,
    oom_task: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    namespace: String,
    /// This shim's socket address (removed when the shim exits).
    address: String,
    state_dir: PathBuf,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Pod>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The OOM-kill count last published per container. Both the agent's OOM events and each
    /// exit (which checks the count first) publish through it, so TaskOOM precedes the
    /// TaskExit of a process the OOM killer ended, and no kill is published twice.
    oom_published: tokio::sync::Mutex<HashMap<String, u64>>,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(
        namespace: String,
        address: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let state_dir = pod::state_dir(&address);
        Service {
            inner: Arc::new(Inner {
                namespace,
                address,
                state_dir,
                publisher,
                exit,
                pod: tokio::sync::Mutex::new(Pod {
                    sandbox: None,
                    slots: Vec::new(),
                    slot_bytes: 0,
                    oom_task: None,
                }),
                containers: Mutex::new(HashMap::new()),
                oom_published: Default::default(),
            }),
        }
    }
}

impl Inner {
    async fn publish<E: Event + MessageDyn>(&self, event: E) {
        let topic = event.topic();
        let ctx = ttrpc::context::with_timeout(0);
        if let Err(e) = self
            .publisher
            .publish(ctx, &topic, &self.namespace, Box::new(event))
            .await
        {
            tracing::warn!("publish {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = c
            .execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                status(
                    Code::NOT_FOUND,
                    format!("process {exec_id} of container {id} not found"),
                )
            })?;
        Ok((c, p))
    }

    async fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.pod
            .lock()
            .await
            .sandbox
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }

    /// Boots the pod's VM if this is its first container. The pod's VM size is the config's
    /// default plus this (first) container's pod resources.
    async fn ensure_vm(
        self: &Arc<Self>,
        pod: &mut Pod,
        cfg: &ShimConfig,
        spec: &serde_json::Value,
    ) -> anyhow::Result<Arc<Sandbox>> {
        use anyhow::Context;
        if let Some(s) = &pod.sandbox {
            return Ok(s.clone());
        }
        let kernel = match &cfg.kernel {
            Some(k) => k.clone(),
            None => sandbox::locate::kernel()?,
        };
        let agent = match &cfg.agent {
            Some(a) => a.clone(),
            None => sandbox::locate::agent()?,
        };
        let microvm = match &cfg.microvm {
            Some(m) => m.clone(),
            None => sandbox::locate::microvm()?,
        };
        let dir = &self.state_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let slot_bytes = cfg.slot_size_gib << 30;
        let mut disks = Vec::new();
        for k in 0..cfg.slots {
            let path = dir.join(format!("slot{k}.img"));
            rootfs::create_slot(&path, slot_bytes)?;
            disks.push(Disk {
                path,
                read_only: true,
            });
        }
        let (extra_cpus, extra_mib) = pod::pod_resources(spec);
        let mut sc = SandboxConfig::new(microvm, kernel, agent);
        sc.cpus = cfg.cpus.saturating_add(extra_cpus);
        sc.memory_mib = cfg.memory_mib + extra_mib;
        sc.disks = disks;
        sc.console = Console::File(dir.join(pod::CONSOLE_LOG));
        sc.state_dir = Some(dir.clone());
        sc.start_timeout = Duration::from_secs(cfg.boot_timeout_s);
        sc.cmdline.push_str(&format!(" RUST_LOG={}", cfg.log_level));
        let started = std::time::Instant::now();
        let sandbox = match Sandbox::start(sc.clone()).await {
            Ok(s) => s,
            // The open early-boot bugs (rare): a triple fault, or a guest that never gets to
            // the agent. One announced retry.
            Err(e @ (sandbox::Error::VmmExited { .. } | sandbox::Error::AgentTimeout { .. })) => {
                tracing::warn!("the VM ended during boot, retrying once: {e}");
                Sandbox::start(sc)
                    .await
                    .context("boot the pod's VM (second try)")?
            }
            Err(e) => return Err(e).context("boot the pod's VM"),
        };
        tracing::info!(
            "pod VM up in {:.1} s ({} vCPU, {} MiB)",
            started.elapsed().as_secs_f64(),
            sandbox_cpus(cfg, extra_cpus),
            cfg.memory_mib + extra_mib
        );
        if let Some(pid) = sandbox.vmm_pid() {
            std::fs::write(dir.join(pod::VMM_PID_FILE), pid.to_string())
                .context("write the VMM pid file")?;
        }
        let hostname = spec
            .pointer("/hostname")
            .and_then(|h| h.as_str())
            .unwrap_or("")
            .to_string();
        sandbox
            .create_sandbox(&SandboxSettings {
                hostname,
                ..Default::default()
            })
            .await
            .context("set up the pod in the guest")?;
        let sandbox = Arc::new(sandbox);
        pod.slots = vec![None; cfg.slots];
        pod.slot_bytes = slot_bytes;
        pod.sandbox = Some(sandbox.clone());
        pod.oom_task = Some(self.spawn_oom_watch(sandbox.clone()));
        Ok(sandbox)
    }

    fn spawn_oom_watch(self: &Arc<Self>, sandbox: Arc<Sandbox>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Ok(ev) = sandbox.next_oom_event().await {
                let Some(me) = me.upgrade() else { return };
                me.publish_oom(&ev.container_id, ev.oom_kill_count).await;
            }
        })
    }

    /// Publishes TaskOOM if `count` is above the OOM-kill count already published for the
    /// container.
    async fn publish_oom(&self, container_id: &str, count: u64) {
        let mut published = self.oom_published.lock().await;
        let seen = published.entry(container_id.to_string()).or_default();
        if count <= *seen {
            return;
        }
        *seen = count;
        tracing::info!(container = container_id, oom_kills = count, "OOM kill");
        self.publish(TaskOOM {
            container_id: container_id.into(),
            ..Default::default()
        })
        .await;
    }

    /// Runs a started process's exit collection: waits for it (and its output), records the
    /// exit, publishes TaskExit, then wakes Wait.
    fn spawn_waiter(
        self: &Arc<Self>,
        proc_: Arc<Proc>,
        process: sandbox::Process,
        sandbox: std::sync::Weak<Sandbox>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let pid = process.pid;
            let code = match process.wait().await {
                Ok(exit) => exit.code as u32,
                Err(e) => {
                    tracing::warn!("wait for {}/{}: {e}", proc_.container_id, proc_.exec_id);
                    255
                }
            };
            // An OOM kill that ended it is published first (the agent's OOM event may still
            // be on its way).
            if code == 128 + libc::SIGKILL as u32 {
                // Not through the pod lock: a Create in progress holds it for seconds.
                if let Some(sb) = sandbox.upgrade() {
                    if let Ok(stats) = sb.stats(&proc_.container_id).await {
                        me.publish_oom(&proc_.container_id, stats.oom_kill_count)
                            .await;
                    }
                }
            }
            proc_.set_exit(code);
            let st = proc_.state();
            let id = if proc_.exec_id.is_empty() {
                proc_.container_id.clone()
            } else {
                proc_.exec_id.clone()
            };
            me.publish(TaskExit {
                container_id: proc_.container_id.clone(),
                id,
                pid,
                exit_status: code,
                exited_at: st.exited_at.into(),
                ..Default::default()
            })
            .await;
            proc_.exited.send_replace(true);
            proc_.finish_logger();
        });
    }

    /// Ends the VM and the shim once no container is left.
    async fn finish_if_empty(self: &Arc<Self>) {
        if !self.containers.lock().unwrap().is_empty() {
            return;
        }
        let mut pod = self.pod.lock().await;
        if let Some(t) = pod.oom_task.take() {
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
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_file(pod::socket_path(&self.address));
        self.exit.signal();
    }
}

fn sandbox_cpus(cfg: &ShimConfig, extra: u8) -> u8 {
    cfg.cpus.saturating_add(extra)
}

/// `ConfigPath` from CRI's runtime options (`runtimeoptions.v1.Options`: type_url = 1,
/// config_path = 2), read without generated code.
pub fn config_path_from_options(any: &Any) -> Option<PathBuf> {
    if !any.type_url.ends_with(RUNTIME_OPTIONS_TYPE) {
        return None;
    }
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            return input
                .read_string()
                .ok()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
        }
        let wt = containerd_shim::protos::protobuf::rt::WireType::new(wire)?;
        input.skip_field(wt).ok()?;
    }
    None
}

/// `Any.type_url` (typeurl's name) of runtime-spec `LinuxResources`, the JSON containerd
/// sends in UpdateTaskRequest for Linux containers.
const LINUX_RESOURCES_TYPE: &str = "opencontainers/runtime-spec/1/LinuxResources";

/// The `LinuxResources` JSON of an update, checked by decoding it (an error names the type or
/// the field at fault); other types (e.g. `WindowsResources`) are refused.
pub fn linux_resources_json(any: &Any) -> Result<Vec<u8>, String> {
    let name = any.type_url.trim_start_matches('/');
    if !(name == LINUX_RESOURCES_TYPE || name.ends_with(&format!("/{LINUX_RESOURCES_TYPE}"))) {
        return Err(format!(
            "update resources of type {:?}: only runtime-spec LinuxResources ({LINUX_RESOURCES_TYPE}) \
             is supported",
            any.type_url
        ));
    }
    let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
        .map_err(|e| format!("update resources are not a valid LinuxResources JSON: {e}"))?;
    serde_json::to_vec(&resources).map_err(|e| e.to_string())
}

/// Host bind mounts cannot reach the guest (no shared filesystem): they are left out, with a
/// warning. Everything else (proc, sysfs, tmpfs, devpts, mqueue, cgroup) is created in the
/// guest.
fn guest_spec(spec: &serde_json::Value) -> serde_json::Value {
    let mut spec = spec.clone();
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        mounts.retain(|m| {
            let is_bind = m.get("type").and_then(|t| t.as_str()) == Some("bind")
                || m.get("options")
                    .and_then(|o| o.as_array())
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
            if is_bind {
                tracing::warn!(
                    "host bind mount left out (not supported in a microVM yet): {}",
                    m.get("destination").and_then(|d| d.as_str()).unwrap_or("?")
                );
            }
            !is_bind
        });
    }
    spec
}

fn guest_disk(slot: usize) -> String {
    format!("/dev/vd{}", (b'a' + slot as u8) as char)
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!("create {:?}", req.id);
        let me = &self.inner;
        if me.containers.lock().unwrap().contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(unimplemented("restoring from a checkpoint"));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .check()
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let bundle = PathBuf::from(&req.bundle);
        let (_, spec) = pod::read_spec(&bundle).map_err(|e| {
            status(
                Code::INVALID_ARGUMENT,
                format!("read {}/config.json: {e}", bundle.display()),
            )
        })?;
        let config_path = req.options.as_ref().and_then(config_path_from_options);
        let cfg = ShimConfig::load(config_path.as_deref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;

        // The pod lock is held through the slot's image build: containers of one pod are
        // created one after another.
        let mut pod = me.pod.lock().await;
        let sandbox = me
            .ensure_vm(&mut pod, &cfg, &spec)
            .await
            .map_err(|e| status(Code::INTERNAL, format!("{e:#}")))?;
        let slot = pod.slots.iter().position(Option::is_none).ok_or_else(|| {
            status(
                Code::RESOURCE_EXHAUSTED,
                format!(
                    "the pod's VM has {} container slots and all are in use (the VMM cannot \
                     hotplug disks; raise `slots` in the shim config)",
                    pod.slots.len()
                ),
            )
        })?;
        let slot_file = me.state_dir.join(format!("slot{slot}.img"));
        let slot_bytes = pod.slot_bytes;

        // The rootfs tree: the snapshotter's mounts on <bundle>/rootfs, or a rootfs already
        // there (no mounts given).
        let root_path = spec
            .pointer("/root/path")
            .and_then(|p| p.as_str())
            .unwrap_or("rootfs");
        let tree = bundle.join(root_path);
        let mounts: Vec<HostMount> = req
            .rootfs
            .iter()
            .map(|m| HostMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let mounted = !mounts.is_empty();
        let tree2 = tree.clone();
        let built = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let r = rootfs::mount_all(&mounts, &tree2)
                .and_then(|_| rootfs::rootfs_image(&tree2, &slot_file, slot_bytes));
            if mounted {
                if let Err(e) = rootfs::unmount_all(&tree2) {
                    tracing::warn!("{e}");
                }
            }
            r.map(|size| (size, started.elapsed()))
        })
        .await
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        tracing::info!(
            container = %req.id,
            "rootfs image of {} MiB in slot {slot} built in {:.2} s",
            built.0 >> 20,
            built.1.as_secs_f64()
        );
        let spec_json = serde_json::to_vec(&guest_spec(&spec))
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
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
                let console = sandbox.console_tail();
                let mut err = agent_err(e);
                if let ttrpc::Error::RpcStatus(s) = &mut err {
                    if !console.is_empty() {
                        s.message.push_str(&format!("; VM console:\n{console}"));
                    }
                }
                err
            })?;
        pod.slots[slot] = Some(req.id.clone());
        drop(pod);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            slot,
            init: Proc::new(&req.id, "", stdio, Vec::new()),
            execs: Mutex::new(HashMap::new()),
        });
        me.containers
            .lock()
            .unwrap()
            .insert(req.id.clone(), container);
        me.publish(TaskCreate {
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

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        tracing::info!("start {:?}", req.id);
        let me = &self.inner;
        let (c, p) = me.process(&req.id, &req.exec_id)?;
        if p.state().status != ProcStatus::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("process {}/{} was already started", req.id, req.exec_id),
            ));
        }
        let sandbox = me.sandbox().await?;
        // Blocking: a logging binary is waited for until it is ready.
        let (stdio, container_id, namespace) =
            (p.stdio.clone(), c.id.clone(), me.namespace.clone());
        let opened = tokio::task::spawn_blocking(move || {
            stdio.open(LogContext {
                container_id: &container_id,
                namespace: &namespace,
            })
        })
        .await
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?
        .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let io = opened.io;
        *p.logger.lock().unwrap() = opened.logger;
        // Stored first, then the flag read; CloseIO sets the flag first, then takes the writer:
        // whichever comes second drops it, even when CloseIO arrives while we start.
        *p.stdin_writer.lock().unwrap() = opened.stdin_writer;
        if p.stdin_closed.load(std::sync::atomic::Ordering::SeqCst) {
            p.stdin_writer.lock().unwrap().take();
        }
        let process = match if req.exec_id.is_empty() {
            sandbox.start_container(&c.id, io).await
        } else {
            sandbox.exec(&c.id, &req.exec_id, &p.spec, io).await
        } {
            Ok(process) => process,
            Err(e) => {
                // The output descriptors are gone with the failed start: the logger reads EOF.
                p.finish_logger();
                return Err(agent_err(e));
            }
        };
        let pid = process.pid;
        {
            let mut s = p.state.lock().unwrap();
            s.pid = pid;
            s.status = ProcStatus::Running;
        }
        if req.exec_id.is_empty() {
            me.publish(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        } else {
            me.publish(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        }
        // Only now: the exit event must follow the start event.
        me.spawn_waiter(p, process, Arc::downgrade(&sandbox));
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        tracing::info!("delete {:?}", req.id);
        let me = &self.inner;
        let (c, p) = me.process(&req.id, &req.exec_id)?;
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
        let exited_at = st
            .exited_at
            .clone()
            .unwrap_or_else(|| timestamp(SystemTime::now()));
        if !req.exec_id.is_empty() {
            c.execs.lock().unwrap().remove(&req.exec_id);
            return Ok(api::DeleteResponse {
                pid: st.pid,
                exit_status: st.exit_code,
                exited_at: MessageField::some(exited_at),
                ..Default::default()
            });
        }
        {
            let mut pod = me.pod.lock().await;
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
        }
        let _ = rootfs::unmount_all(&c.bundle.join("rootfs"));
        me.containers.lock().unwrap().remove(&c.id);
        me.oom_published.lock().await.remove(&c.id);
        me.publish(TaskDelete {
            container_id: c.id.clone(),
            pid: st.pid,
            exit_status: st.exit_code,
            exited_at: MessageField::some(exited_at.clone()),
            id: c.id.clone(),
            ..Default::default()
        })
        .await;
        Ok(api::DeleteResponse {
            pid: st.pid,
            exit_status: st.exit_code,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("exec {:?}", req.id);
        let me = &self.inner;
        let c = me.container(&req.id)?;
        if c.init.state().status != ProcStatus::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .check()
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        {
            let mut execs = c.execs.lock().unwrap();
            if execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.id, &req.exec_id, stdio, spec),
            );
        }
        me.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("resize pty {:?}", req.id);
        let me = &self.inner;
        me.process(&req.id, &req.exec_id)?;
        let ws = WindowSize {
            rows: req.height.min(u16::MAX as u32) as u16,
            cols: req.width.min(u16::MAX as u32) as u16,
        };
        me.sandbox()
            .await?
            .resize_pty(&req.id, &req.exec_id, ws)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id)?;
        let st = p.state();
        let status = match st.status {
            ProcStatus::Created => api::Status::CREATED,
            ProcStatus::Running => api::Status::RUNNING,
            ProcStatus::Stopped => api::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: st.pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: st.exit_code,
            exited_at: st.exited_at.into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let me = &self.inner;
        me.container(&req.id)?;
        let pids = me
            .sandbox()
            .await?
            .list_processes(&req.id)
            .await
            .map_err(agent_err)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| api::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        tracing::info!("kill {:?}", req.id);
        let me = &self.inner;
        let (_, p) = me.process(&req.id, &req.exec_id)?;
        match p.state().status {
            ProcStatus::Stopped => {
                return Err(status(Code::NOT_FOUND, "process already finished"));
            }
            ProcStatus::Created => {
                // Never started: nothing runs in the guest; it is simply over.
                p.set_exit(128 + req.signal);
                p.exited.send_replace(true);
                return Ok(api::Empty::new());
            }
            ProcStatus::Running => {}
        }
        me.sandbox()
            .await?
            .signal(&req.id, &req.exec_id, req.signal as i32, req.all)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("close io {:?}", req.id);
        let me = &self.inner;
        let (_, p) = me.process(&req.id, &req.exec_id)?;
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        // containerd calls CloseIO once its own input has ended, possibly before or during
        // Start. Dropping our write end of the FIFO makes the copy into the guest end, after
        // everything written so far, with end-of-file (an RPC to close the guest's stdin at
        // once could overtake data still on its way).
        p.stdin_closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        drop(p.stdin_writer.lock().unwrap().take());
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        tracing::info!("wait {:?}", req.id);
        let (_, p) = self.inner.process(&req.id, &req.exec_id)?;
        let mut rx = p.exited.subscribe();
        rx.wait_for(|done| *done)
            .await
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        let st = p.state();
        Ok(api::WaitResponse {
            exit_status: st.exit_code,
            exited_at: st.exited_at.into(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let me = &self.inner;
        me.container(&req.id)?;
        let s = me
            .sandbox()
            .await?
            .stats(&req.id)
            .await
            .map_err(agent_err)?;
        let metrics = cg2::Metrics {
            pids: MessageField::some(cg2::PidsStat {
                current: s.pids_current,
                ..Default::default()
            }),
            cpu: MessageField::some(cg2::CPUStat {
                usage_usec: s.cpu_usage_usec,
                ..Default::default()
            }),
            memory: MessageField::some(cg2::MemoryStat {
                usage: s.memory_usage,
                usage_limit: s.memory_limit.unwrap_or(u64::MAX),
                ..Default::default()
            }),
            memory_events: MessageField::some(cg2::MemoryEvents {
                oom_kill: s.oom_kill_count,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics
            .write_to_bytes()
            .map_err(|e| status(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v2.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .container(&req.id)
            .map(|c| c.init.state().pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let me = self.inner.clone();
        if me.containers.lock().unwrap().is_empty() {
            tokio::spawn(async move { me.finish_if_empty().await });
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("update {:?}", req.id);
        let me = &self.inner;
        let c = me.container(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update without resources"))?;
        let json = linux_resources_json(any).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        me.sandbox()
            .await?
            .update_container(&c.id, &json)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Pause"))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Resume"))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Checkpoint"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_options_config_path() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/microvm/a.toml"}
        let mut value = vec![0x0a, 1, b'x', 0x12, 19];
        value.extend_from_slice(b"/etc/microvm/a.toml");
        let any = Any {
            type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            config_path_from_options(&any),
            Some(PathBuf::from("/etc/microvm/a.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        };
        assert_eq!(config_path_from_options(&other), None);
    }

    #[test]
    fn update_resources_decoding() {
        let any = |type_url: &str, value: &str| Any {
            type_url: type_url.into(),
            value: value.as_bytes().to_vec(),
            ..Default::default()
        };
        let json = linux_resources_json(&any(
            "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
            r#"{"memory":{"limit":50000000},"cpu":{"quota":20000}}"#,
        ))
        .unwrap();
        let back: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(back["memory"]["limit"], 50000000);
        assert_eq!(back["cpu"]["quota"], 20000);
        let e = linux_resources_json(&any(
            "types.containerd.io/opencontainers/runtime-spec/1/WindowsResources",
            "{}",
        ))
        .unwrap_err();
        assert!(e.contains("WindowsResources") && e.contains("only"), "{e}");
        let e = linux_resources_json(&any(
            "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
            r#"{"memory":{"limit":"lots"}}"#,
        ))
        .unwrap_err();
        assert!(e.contains("not a valid LinuxResources"), "{e}");
    }

    #[test]
    fn host_bind_mounts_stay_on_the_host() {
        let spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/x/hosts", "options": ["rbind"]},
            {"destination": "/data", "source": "/x/data", "options": ["bind", "ro"]}
        ]});
        let g = guest_spec(&spec);
        let dests: Vec<&str> = g["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests, vec!["/proc"]);
        assert_eq!(guest_disk(0), "/dev/vda");
        assert_eq!(guest_disk(7), "/dev/vdh");
    }
}
