//! The guest's `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`, written from a
//! `CreateSandbox` request. The host composes them; the agent writes what it is given, at fixed
//! names in the guest's own `/etc` (a container sees them only through binds in its spec, the
//! way docker mounts its copies over an image's).

use std::io;
use std::path::Path;

use agent_protocol::agent as pb;

/// Writes the files `req` asks for into `etc` (the guest's `/etc`). A file whose fields are
/// empty is left as it is.
pub fn write(etc: &Path, req: &pb::CreateSandboxRequest) -> Result<(), (&'static str, io::Error)> {
    if let Some(conf) = resolv_conf(req) {
        std::fs::write(etc.join("resolv.conf"), conf).map_err(|e| ("resolv.conf", e))?;
    }
    if !req.hosts.is_empty() {
        std::fs::write(etc.join("hosts"), &req.hosts).map_err(|e| ("hosts", e))?;
    }
    if !req.hostname.is_empty() {
        std::fs::write(etc.join("hostname"), format!("{}\n", req.hostname))
            .map_err(|e| ("hostname", e))?;
    }
    Ok(())
}

/// `/etc/resolv.conf`'s text, or `None` when the request has no DNS settings.
fn resolv_conf(req: &pb::CreateSandboxRequest) -> Option<String> {
    if req.dns_servers.is_empty() && req.dns_search.is_empty() && req.dns_options.is_empty() {
        return None;
    }
    let mut conf = String::new();
    if !req.dns_search.is_empty() {
        conf += &format!("search {}\n", req.dns_search.join(" "));
    }
    for s in &req.dns_servers {
        conf += &format!("nameserver {s}\n");
    }
    if !req.dns_options.is_empty() {
        conf += &format!("options {}\n", req.dns_options.join(" "));
    }
    Some(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_it_is_given() {
        let etc = tempfile::tempdir().unwrap();
        let req = pb::CreateSandboxRequest {
            hostname: "box".into(),
            dns_servers: vec!["192.0.2.53".into()],
            dns_search: vec!["example.test".into()],
            hosts: "127.0.0.1\tlocalhost\n10.89.0.7\tbox\n".into(),
            ..Default::default()
        };
        write(etc.path(), &req).unwrap();
        let read = |n: &str| std::fs::read_to_string(etc.path().join(n)).unwrap();
        assert_eq!(
            read("resolv.conf"),
            "search example.test\nnameserver 192.0.2.53\n"
        );
        assert_eq!(read("hosts"), req.hosts);
        assert_eq!(read("hostname"), "box\n");
    }

    #[test]
    fn empty_fields_leave_files_alone() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(etc.path().join("hosts"), "old\n").unwrap();
        write(etc.path(), &pb::CreateSandboxRequest::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.path().join("hosts")).unwrap(),
            "old\n"
        );
        assert!(!etc.path().join("resolv.conf").exists());
        assert!(!etc.path().join("hostname").exists());
    }
}
