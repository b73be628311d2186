//! The task service: containerd's Task API (v2) on top of one [`Sandbox`] per pod.
//!
//! The first Create boots the pod's VM (with the agent as init and N pre-attached slot disks);
//! each container gets one slot disk holding an ext4 image of its rootfs. Process exits are
//! collected by one task per process, which publishes TaskExit and then wakes Wait.
//!
//! Split along the task's seams: [`lifecycle`] (Create, Start, Delete), [`exec`] (requests on
//! a process), [`requests`] (Pids, Stats, Update and the `Any`s containerd sends), [`events`]
//! (publishing, OOM, exits), [`vm`] (the pod's VM), [`process`] (the state of containers and
//! processes), [`status`] (errors).
//!
//! [`Sandbox`]: sandbox::Sandbox

mod events;
mod exec;
mod lifecycle;
mod process;
mod requests;
mod status;
mod vm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;

use self::events::{OomLedger, RateLimitedLog};
use self::process::Container;
pub use self::status::timestamp;
use self::status::unimplemented;
use self::vm::Pod;
use crate::{pod, pod_identity};

struct Inner {
    namespace: String,
    /// This shim's socket address (removed when the shim exits).
    address: String,
    state_dir: PathBuf,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Pod>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom: tokio::sync::Mutex<OomLedger>,
    /// OOM reports of containers that are not this shim's.
    oom_ignored: RateLimitedLog,
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
                pod: Default::default(),
                containers: Default::default(),
                oom: Default::default(),
                oom_ignored: Default::default(),
            }),
        }
    }
}

/// Each request is logged (those that change something) and handed to its module.
#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!("create {:?}", req.id);
        pod_identity::check_namespace(&ctx.metadata, &self.inner.namespace)
            .map_err(|e| status::status(Code::PERMISSION_DENIED, e.to_string()))?;
        self.inner.create(req).await
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        tracing::info!("start {:?}", req.id);
        self.inner.start(req).await
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        tracing::info!("delete {:?}", req.id);
        self.inner.delete(req).await
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("exec {:?}", req.id);
        self.inner.exec(req).await
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("resize pty {:?}", req.id);
        self.inner.resize_pty(req).await
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id)?;
        Ok(self.inner.state_response(&c, &p))
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.inner.pids(req).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        tracing::info!("kill {:?}", req.id);
        self.inner.kill(req).await
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!("close io {:?}", req.id);
        self.inner.close_io(req)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        tracing::info!("wait {:?}", req.id);
        self.inner.wait(req).await
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.inner.stats(req).await
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
        self.inner.update(req).await
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
