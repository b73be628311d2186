//! Events to containerd, in order through containerd-shim's one publisher queue: the single
//! place that publishes, the OOM events, and each started process's exit collection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc;
use sandbox::Sandbox;

use super::process::Proc;
use super::Inner;

/// What an OOM-kill count reported by the guest means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OomNews {
    /// A new kill of one of this shim's containers: publish TaskOOM.
    Publish,
    /// Published already.
    Known,
    /// Not a container of this shim (now): the guest's word is not taken for it.
    NotOurs,
}

/// The OOM-kill count published per container. Both the agent's OOM events and each exit
/// (which checks the count first) go through it, so TaskOOM precedes the TaskExit of a
/// process the OOM killer ended, and no kill is published twice. It holds only containers of
/// this shim that exist (pruned at each record), so a guest reporting made-up ids cannot make
/// it grow.
#[derive(Debug, Default)]
pub(crate) struct OomLedger {
    published: HashMap<String, u64>,
}

impl OomLedger {
    /// Records a count the guest reported for `id`; `ours` says which ids are this shim's
    /// containers now.
    pub fn record(&mut self, id: &str, count: u64, ours: impl Fn(&str) -> bool) -> OomNews {
        self.published.retain(|known, _| ours(known));
        if !ours(id) {
            return OomNews::NotOurs;
        }
        let seen = self.published.entry(id.to_string()).or_default();
        if count <= *seen {
            return OomNews::Known;
        }
        *seen = count;
        OomNews::Publish
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.published.len()
    }
}

/// Counts something the guest can trigger at will, and says when to log it: the first time,
/// then at each power of two.
#[derive(Debug, Default)]
pub(crate) struct RateLimitedLog(AtomicU64);

impl RateLimitedLog {
    /// Counts one; whether to log this one.
    pub fn note(&self) -> bool {
        (self.0.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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
    /// container, and the container is one of this shim's (the id comes from the guest).
    pub(crate) async fn publish_oom(&self, container_id: &str, count: u64) {
        // Held through the publish: an exit waiting on it is published after this TaskOOM.
        let mut ledger = self.oom.lock().await;
        let news = {
            let containers = self.containers.lock().unwrap();
            ledger.record(container_id, count, |id| containers.contains_key(id))
        };
        match news {
            OomNews::Publish => {}
            OomNews::Known => return,
            OomNews::NotOurs => {
                if self.oom_ignored.note() {
                    tracing::warn!(
                        "the guest reported an OOM kill of {:?}, which is no container of \
                         this pod: ignored ({} so far)",
                        container_id.chars().take(80).collect::<String>(),
                        self.oom_ignored.count()
                    );
                }
                return;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_counts_are_published_only_for_our_containers() {
        let mut ledger = OomLedger::default();
        let ours = |id: &str| id == "c1";
        // Another pod's container, or an id the guest made up: nothing kept, nothing published.
        for i in 0..1000 {
            assert_eq!(
                ledger.record(&format!("other-{i}"), 1, ours),
                OomNews::NotOurs
            );
        }
        assert_eq!(ledger.len(), 0);
        assert_eq!(ledger.record("c1", 1, ours), OomNews::Publish);
        assert_eq!(ledger.record("c1", 1, ours), OomNews::Known);
        assert_eq!(ledger.record("c1", 0, ours), OomNews::Known);
        assert_eq!(ledger.record("c1", 2, ours), OomNews::Publish);
        assert_eq!(ledger.len(), 1);
        // c1 deleted: pruned, and a late report for it is not published.
        let none = |_: &str| false;
        assert_eq!(ledger.record("c1", 3, none), OomNews::NotOurs);
        assert_eq!(ledger.len(), 0);
    }

    #[test]
    fn guest_triggered_logs_are_rate_limited() {
        let log = RateLimitedLog::default();
        let logged = (0..1000).filter(|_| log.note()).count();
        assert_eq!(logged, 10); // 1, 2, 4, ..., 512
        assert_eq!(log.count(), 1000);
    }
}
