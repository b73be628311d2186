//! Events to containerd, in order through containerd-shim's one publisher queue: the single
//! place that publishes, the OOM events, and each started process's exit collection.

use std::sync::{Arc, Weak};

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc;
use sandbox::Sandbox;

use super::process::Proc;
use super::Inner;

impl Inner {
    /// Publishes one event; a failure is logged (containerd may be restarting).
    pub(crate) async fn publish<E: Event + MessageDyn>(&self, event: E) {
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

    /// Publishes the agent's OOM events for as long as the VM runs.
    pub(crate) fn spawn_oom_watch(
        self: &Arc<Self>,
        sandbox: Arc<Sandbox>,
    ) -> tokio::task::JoinHandle<()> {
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
    pub(crate) async fn publish_oom(&self, container_id: &str, count: u64) {
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
    pub(crate) fn spawn_waiter(
        self: &Arc<Self>,
        proc_: Arc<Proc>,
        process: sandbox::Process,
        sandbox: Weak<Sandbox>,
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
            me.publish(TaskExit {
                container_id: proc_.container_id.clone(),
                id: proc_.event_id().to_string(),
                pid,
                exit_status: code,
                exited_at: proc_.state().exited_at.into(),
                ..Default::default()
            })
            .await;
            proc_.exited.send_replace(true);
            proc_.finish_logger();
        });
    }
}
