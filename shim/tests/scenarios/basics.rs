//! A container run end to end.

use std::path::Path;

use crate::common::{check, sh, text, Containerd, EventLog};

/// `ctr run --rm` prints the workload's output from a guest kernel; exit codes 0 and 3 come
/// through; `ctr events` shows create, start, exit, delete in that order.
pub fn run_basics(c: &Containerd) -> Result<(), String> {
    let events = EventLog::start(c)?;
    let host_release = text(&sh("uname -r")).trim().to_string();
    let out = c.ctr(&c.run_args(&["--rm"], "basic1", &["sh", "-c", "echo X; uname -r"]));
    let printed = text(&out);
    check(out.status.code() == Some(0), || {
        format!("ctr run exited {:?}: {printed}", out.status)
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    check(lines.first() == Some(&"X"), || {
        format!("expected X first: {printed}")
    })?;
    let guest_release = lines.get(1).copied().unwrap_or("");
    check(
        !guest_release.is_empty() && guest_release != host_release,
        || format!("guest kernel {guest_release:?} vs host {host_release:?}: not in a VM?"),
    )?;
    check(
        !Path::new("/run/containerd/runc/default/basic1").exists(),
        || "runc state exists: runc ran it".into(),
    )?;
    let out = c.ctr(&c.run_args(&["--rm"], "basic3", &["sh", "-c", "echo three >&2; exit 3"]));
    check(out.status.code() == Some(3), || {
        format!("exit 3 came back as {:?}: {}", out.status, text(&out))
    })?;
    check(
        String::from_utf8_lossy(&out.stderr).contains("three"),
        || format!("stderr lost: {}", text(&out)),
    )?;
    let (log, topics) = events.topics("basic1")?;
    check(
        topics
            == [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit",
                "/tasks/delete",
            ],
        || format!("task events of basic1: {topics:?}\n{log}"),
    )
}
