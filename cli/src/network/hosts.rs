//! The container's `/etc/hosts` and `/etc/hostname`, as docker writes them: the CLI composes
//! the text, the agent writes it into the guest's `/etc`, and the container's spec binds the
//! guest's files over the image's (so an image's own copies are hidden, never edited).

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One `--add-host NAME:IP`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddHost {
    pub name: String,
    pub ip: IpAddr,
}

/// A host name as RFC 1123 has it: dot-separated labels of ASCII letters, digits and `-`
/// (not at a label's ends), 1-63 bytes each, at most `max` bytes in all. Anything else (a
/// space, a newline, `#`) would change the meaning of the hosts file it is written into.
fn check_host_name(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("{s:?} must be 1 to {max} characters"));
    }
    for label in s.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{s:?} is not a host name (dot-separated labels of letters, digits and '-', \
                 not starting or ending with '-')"
            ));
        }
    }
    Ok(())
}

/// `--hostname`: a host name the kernel takes (at most 64 bytes).
pub fn parse_hostname(s: &str) -> Result<String, String> {
    check_host_name(s, 64)?;
    Ok(s.to_string())
}

/// `--add-host NAME:IP` (an IPv6 address may be bracketed: `NAME:[::1]`).
pub fn parse_add_host(s: &str) -> Result<AddHost, String> {
    let Some((name, ip)) = s.split_once(':') else {
        return Err(format!("--add-host {s:?}: want NAME:IP"));
    };
    check_host_name(name, 253).map_err(|e| format!("--add-host {s:?}: {e}"))?;
    if ip == "host-gateway" {
        return Err(format!(
            "--add-host {s:?}: host-gateway is not supported; give the address"
        ));
    }
    let bare = ip
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(ip);
    let ip: IpAddr = bare
        .parse()
        .map_err(|_| format!("--add-host {s:?}: {ip:?} is not an IP address"))?;
    Ok(AddHost {
        name: name.to_string(),
        ip,
    })
}

/// docker's `/etc/hosts`: loopback, the IPv6 well-known names, the `--add-host` entries, then
/// the container's own address (when it has one) under its hostname.
pub fn hosts_file(hostname: &str, own: Option<IpAddr>, extra: &[AddHost]) -> String {
    let mut text = String::from(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         ff00::0\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    for h in extra {
        let _ = writeln!(text, "{}\t{}", h.ip, h.name);
    }
    if let Some(ip) = own {
        let _ = writeln!(text, "{ip}\t{hostname}");
    }
    text
}

/// Binds the guest's `path` (which the agent writes) over the container's, read-only.
pub fn bind_from_guest(spec: &mut Value, path: &str) {
    if let Some(mounts) = spec.pointer_mut("/mounts").and_then(Value::as_array_mut) {
        mounts.push(json!({
            "destination": path, "type": "bind", "source": path,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        }));
    }
}

/// The container sees the guest's `/etc/hosts` and `/etc/hostname` (every run has them).
pub fn bind_hosts_files(spec: &mut Value) {
    bind_from_guest(spec, "/etc/hosts");
    bind_from_guest(spec, "/etc/hostname");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_is_dockers() {
        let extra = [
            parse_add_host("db.internal:192.0.2.10").unwrap(),
            parse_add_host("v6:[2001:db8::1]").unwrap(),
        ];
        let text = hosts_file("box", Some("10.89.0.7".parse().unwrap()), &extra);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "127.0.0.1\tlocalhost");
        assert_eq!(lines[1], "::1\tlocalhost ip6-localhost ip6-loopback");
        assert_eq!(
            &lines[lines.len() - 3..],
            [
                "192.0.2.10\tdb.internal",
                "2001:db8::1\tv6",
                "10.89.0.7\tbox"
            ]
        );
        // No network: no address of its own to map.
        let none = hosts_file("box", None, &[]);
        assert!(none.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(!none.contains("box"), "{none}");
    }

    #[test]
    fn add_host_forms() {
        let h = parse_add_host("my-host.example:10.0.0.5").unwrap();
        assert_eq!(h.name, "my-host.example");
        assert_eq!(h.ip, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(
            parse_add_host("x:::1").unwrap().ip,
            "::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_add_host_is_refused_with_the_reason() {
        for (bad, why) in [
            ("nocolon", "want NAME:IP"),
            (":10.0.0.1", "must be 1 to"),
            ("bad name:10.0.0.1", "not a host name"),
            ("x\n1.2.3.4 evil:10.0.0.1", "not a host name"),
            ("-lead:10.0.0.1", "not a host name"),
            ("a..b:10.0.0.1", "not a host name"),
            ("x:10.0.0.256", "not an IP address"),
            ("x:", "not an IP address"),
            ("x:10.0.0.1 extra", "not an IP address"),
            ("x:host-gateway", "not supported"),
        ] {
            let e = parse_add_host(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn hostname_is_checked() {
        assert_eq!(parse_hostname("web-1.local").unwrap(), "web-1.local");
        for bad in ["", "has space", "new\nline", "x#y", &"a".repeat(65)] {
            assert!(parse_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spec_binds_the_guests_files() {
        let mut spec = json!({"mounts": []});
        bind_hosts_files(&mut spec);
        let dests: Vec<&str> = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests, ["/etc/hosts", "/etc/hostname"]);
        assert_eq!(spec["mounts"][0]["source"], "/etc/hosts");
        assert_eq!(spec["mounts"][0]["type"], "bind");
    }
}
