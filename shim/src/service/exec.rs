//! Requests on a running process: Exec (adding a process), ResizePty, Kill, CloseIO, Wait.

use std::sync::Arc;

use containerd_shim::protos::api;
use containerd_shim::protos::events::task::TaskExecAdded;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use sandbox::WindowSize;

use super::process::{Proc, ProcStatus};
use super::status::{agent_err, internal, invalid, status};
use super::Inner;
use crate::stdio::StdioPaths;

impl Inner {
    pub(crate) async fn exec(
        self: &Arc<Self>,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.init.require(ProcStatus::Running, "is not running")?;
        let stdio = StdioPaths::checked(&req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(invalid)?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| invalid("exec without a process spec"))?;
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
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
        .await;
        Ok(api::Empty::new())
    }

    pub(crate) async fn resize_pty(&self, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        self.process(&req.id, &req.exec_id)?;
        let ws = WindowSize {
            rows: req.height.min(u16::MAX as u32) as u16,
            cols: req.width.min(u16::MAX as u32) as u16,
        };
        self.sandbox()
            .await?
            .resize_pty(&req.id, &req.exec_id, ws)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    pub(crate) async fn kill(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
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
        self.sandbox()
            .await?
            .signal(&req.id, &req.exec_id, req.signal as i32, req.all)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    /// containerd calls CloseIO once its own input has ended, possibly before or during Start.
    /// Dropping our write end of the FIFO makes the copy into the guest end, after everything
    /// written so far, with end-of-file (an RPC to close the guest's stdin at once could
    /// overtake data still on its way).
    pub(crate) fn close_io(&self, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(api::Empty::new())
    }

    pub(crate) async fn wait(&self, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        let mut rx = p.exited.subscribe();
        rx.wait_for(|done| *done).await.map_err(internal)?;
        Ok(p.state().wait_response())
    }
}
