//! Observation RPCs: a container's stats and process list, and the OOM event stream.

use agent_protocol::agent as pb;
use agent_protocol::ttrpc::{self, Code};

use super::{internal, status, Agent, Result};

impl Agent {
    pub(super) async fn stats(&self, req: pb::StatsRequest) -> Result<pb::StatsResponse> {
        let entry = self.container(&req.container_id)?;
        let handle = entry.container.clone();
        let (s, oom) = tokio::task::spawn_blocking(move || {
            let guard = handle.lock().unwrap_or_else(|e| e.into_inner());
            let c = guard
                .as_ref()
                .ok_or_else(|| status(Code::NOT_FOUND, "container removed"))?;
            let s = c.stats().map_err(|e| internal(e.to_string()))?;
            let oom = c.oom_kill_count().map_err(|e| internal(e.to_string()))?;
            Ok::<_, ttrpc::Error>((s, oom))
        })
        .await
        .map_err(internal)??;
        Ok(pb::StatsResponse {
            memory_usage: s.memory_usage,
            memory_limit: s.memory_limit,
            cpu_usage_usec: s.cpu_usage_usec,
            pids_current: s.pids_current,
            oom_kill_count: oom,
            ..Default::default()
        })
    }

    pub(super) async fn list_processes(
        &self,
        req: pb::ListProcessesRequest,
    ) -> Result<pb::ListProcessesResponse> {
        let entry = self.container(&req.container_id)?;
        let handle = entry.container.clone();
        let pids = tokio::task::spawn_blocking(move || {
            match handle.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(c) => c.pids().map_err(|e| internal(e.to_string())),
                None => Ok(Vec::new()),
            }
        })
        .await
        .map_err(internal)??;
        Ok(pb::ListProcessesResponse {
            pids: pids.into_iter().map(|p| p as u32).collect(),
            ..Default::default()
        })
    }

    pub(super) async fn get_oom_event(&self, _: pb::GetOomEventRequest) -> Result<pb::OomEvent> {
        self.oom
            .next()
            .await
            .ok_or_else(|| status(Code::UNAVAILABLE, "no more OOM events"))
    }
}
