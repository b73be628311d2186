//! What containerd sends as protobuf `Any`s (CRI's runtime options, Update's resources) and
//! the container-wide queries: Pids, Stats, Update.

use std::path::PathBuf;

use containerd_shim::protos::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::TtrpcResult;

use super::status::{agent_err, internal, invalid};
use super::Inner;

/// `Any.type_url` of CRI's runtime options for runtimes it does not know (`ConfigPath`).
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

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

/// containerd's cgroup v2 `Metrics` from the agent's figures.
fn metrics(s: &sandbox::agent_protocol::agent::StatsResponse) -> cg2::Metrics {
    cg2::Metrics {
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
    }
}

impl Inner {
    pub(crate) async fn pids(&self, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.container(&req.id)?;
        let sandbox = self.sandbox().await?;
        let pids = sandbox.list_processes(&req.id).await.map_err(agent_err)?;
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

    pub(crate) async fn stats(&self, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        self.container(&req.id)?;
        let sandbox = self.sandbox().await?;
        let s = sandbox.stats(&req.id).await.map_err(agent_err)?;
        let value = metrics(&s).write_to_bytes().map_err(internal)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v2.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub(crate) async fn update(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| invalid("update without resources"))?;
        let json = linux_resources_json(any).map_err(invalid)?;
        let sandbox = self.sandbox().await?;
        sandbox
            .update_container(&c.id, &json)
            .await
            .map_err(agent_err)?;
        Ok(api::Empty::new())
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
}
