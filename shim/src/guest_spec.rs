//! The OCI spec as the guest gets it: what only exists on the host is taken out.

/// Host bind mounts cannot reach the guest (no shared filesystem): they are left out, with a
/// warning. Everything else (proc, sysfs, tmpfs, devpts, mqueue, cgroup) is created in the
/// guest.
pub fn guest_spec(spec: &serde_json::Value) -> serde_json::Value {
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

/// The guest's block device of slot disk `slot`.
pub fn guest_disk(slot: usize) -> String {
    format!("/dev/vd{}", (b'a' + slot as u8) as char)
}

#[cfg(test)]
mod tests {
    use super::*;

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
