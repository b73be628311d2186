//! What `/proc/<pid>/task/<tid>/status` says about each thread of a running process: its
//! seccomp state now, and whatever else a test asks for by field name (`Uid`, `CapEff`,
//! `NoNewPrivs`, ...).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

/// One thread's status fields.
#[derive(Debug, Clone)]
pub struct ThreadStatus {
    pub tid: u32,
    /// `Name:`, the thread's name (`vcpu0`, ...).
    pub name: String,
    fields: BTreeMap<String, String>,
}

impl ThreadStatus {
    /// The value of `key:` with surrounding whitespace removed.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The value of `key:` as a number (the first word, for fields like `Uid` that hold several).
    pub fn number(&self, key: &str) -> Option<u64> {
        self.field(key)?.split_whitespace().next()?.parse().ok()
    }

    /// `Seccomp: 2` (filter mode) and at least one filter installed.
    pub fn seccomp_filtered(&self) -> bool {
        self.number("Seccomp") == Some(2) && self.number("Seccomp_filters").unwrap_or(0) >= 1
    }
}

/// Every thread of process `pid`, in tid order.
pub fn threads(pid: u32) -> io::Result<Vec<ThreadStatus>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        match thread(&entry.path(), tid) {
            Ok(t) => out.push(t),
            // The thread ended between the listing and the read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|t| t.tid);
    Ok(out)
}

fn thread(dir: &Path, tid: u32) -> io::Result<ThreadStatus> {
    let text = std::fs::read_to_string(dir.join("status"))?;
    let fields: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    Ok(ThreadStatus {
        tid,
        name: fields.get("Name").cloned().unwrap_or_default(),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_threads() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (running_tx, running) = std::sync::mpsc::channel::<()>();
        // std names the thread as it starts, before running the closure.
        let t = std::thread::Builder::new()
            .name("proc-status-t".into())
            .spawn(move || {
                running_tx.send(()).unwrap();
                rx.recv().unwrap()
            })
            .unwrap();
        running.recv().unwrap();
        let all = threads(std::process::id()).unwrap();
        assert!(all.iter().any(|t| t.name == "proc-status-t"), "{all:?}");
        let me = &all[0];
        assert_eq!(me.tid, std::process::id());
        assert!(me.number("Seccomp").is_some(), "{me:?}");
        assert!(me.field("Uid").is_some());
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
