//! The pod's `console.log`: the guest's serial console and the VMM's log, which the VMM
//! appends to (its stdout and stderr). A guest can print without end and the file lies on a
//! tmpfs (RAM), so the shim caps it: when it passes the configured size, its last
//! `max_bytes` become `console.log.1` (replacing the one before) and `console.log` starts
//! empty again (the VMM's descriptor appends, so its next write lands at the new start). At
//! most about twice the cap is kept, plus what the guest writes between two checks; a write
//! that lands between the copy and the truncation is lost. Only the end of the log is ever
//! read back (for error messages), never the whole file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

/// How often the size is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A capped console log.
#[derive(Debug, Clone)]
pub struct ConsoleLog {
    path: PathBuf,
    max_bytes: u64,
}

impl ConsoleLog {
    /// Creates `path` (0600, empty) if missing, so the VMM's append-open keeps that mode.
    pub fn create(path: PathBuf, max_bytes: u64) -> std::io::Result<ConsoleLog> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        Ok(ConsoleLog { path, max_bytes })
    }

    #[cfg(test)]
    fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn rotated(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    /// Rotates the log if it is larger than the cap. Returns whether it did.
    pub fn enforce_cap(&self) -> std::io::Result<bool> {
        let mut f = OpenOptions::new().read(true).write(true).open(&self.path)?;
        let len = f.metadata()?.len();
        if len <= self.max_bytes {
            return Ok(false);
        }
        let tail = read_last(&mut f, self.max_bytes)?;
        let rotated = self.rotated();
        let mut tmp = rotated.clone().into_os_string();
        tmp.push(".tmp");
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        out.write_all(&tail)?;
        std::fs::rename(&tmp, &rotated)?;
        f.set_len(0)?;
        Ok(true)
    }

    /// The last `n` bytes of the log (reaching into `console.log.1` after a rotation), as
    /// text. Reads at most `n` bytes of each file.
    pub fn tail(&self, n: u64) -> String {
        let current = File::open(&self.path)
            .and_then(|mut f| read_last(&mut f, n))
            .unwrap_or_default();
        let mut out = Vec::new();
        let missing = n.saturating_sub(current.len() as u64);
        if missing > 0 {
            if let Ok(mut f) = File::open(self.rotated()) {
                out = read_last(&mut f, missing).unwrap_or_default();
            }
        }
        out.extend_from_slice(&current);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Checks the size every second until the task is aborted.
    pub fn spawn_cap_task(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(CHECK_EVERY);
            loop {
                every.tick().await;
                let log = self.clone();
                match tokio::task::spawn_blocking(move || log.enforce_cap()).await {
                    Ok(Ok(true)) => tracing::info!(
                        "{} passed {} KiB: rotated",
                        self.path.display(),
                        self.max_bytes >> 10
                    ),
                    Ok(Ok(false)) => {}
                    // Gone with the pod's state directory.
                    Ok(Err(_)) | Err(_) => return,
                }
            }
        })
    }
}

/// The last `n` bytes of a file (all of a shorter one), read from where they start.
fn read_last(f: &mut File, n: u64) -> std::io::Result<Vec<u8>> {
    let len = f.metadata()?.len();
    read_last_of(f, len, n)
}

/// The last `n` of `len` bytes: a seek to where they start, then one read of at most `n`.
fn read_last_of(r: &mut (impl Read + Seek), len: u64, n: u64) -> std::io::Result<Vec<u8>> {
    let start = len.saturating_sub(n);
    r.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    r.take(n).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_log_is_rotated_past_its_cap_and_only_its_end_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::create(dir.path().join("console.log"), 1000).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(log.path()), 0o600);
        // The VMM's descriptor: append-only, kept open across the rotation.
        let mut vmm = OpenOptions::new().append(true).open(log.path()).unwrap();
        let line = |i: usize| format!("line {i:04}\n"); // 10 bytes
        for i in 0..99 {
            vmm.write_all(line(i).as_bytes()).unwrap();
        }
        assert!(!log.enforce_cap().unwrap(), "990 bytes: under the cap");
        vmm.write_all(line(99).as_bytes()).unwrap();
        vmm.write_all(line(100).as_bytes()).unwrap();
        assert!(log.enforce_cap().unwrap());
        let rotated = std::fs::read_to_string(log.rotated()).unwrap();
        assert_eq!(rotated.len(), 1000);
        assert!(rotated.starts_with("line 0001\n") && rotated.ends_with("line 0100\n"));
        assert_eq!(mode(&log.rotated()), 0o600);
        assert_eq!(std::fs::metadata(log.path()).unwrap().len(), 0);
        // The VMM goes on writing, at the start of the emptied file.
        vmm.write_all(line(101).as_bytes()).unwrap();
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), line(101));
        // The tail reaches back into the rotated part, and only as far as asked.
        assert_eq!(log.tail(20), format!("{}{}", line(100), line(101)));
        assert_eq!(log.tail(5), "0101\n");
        assert_eq!(log.tail(1 << 20).len(), 1010);
    }

    /// A reader that records the lowest offset anything was read from.
    struct Watched {
        inner: std::io::Cursor<Vec<u8>>,
        lowest_read: u64,
    }

    impl Read for Watched {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.lowest_read = self.lowest_read.min(self.inner.position());
            self.inner.read(buf)
        }
    }

    impl Seek for Watched {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn the_end_is_read_from_where_it_starts() {
        let mut data = vec![b'x'; 1 << 20];
        data.extend_from_slice(b"the end\n");
        let len = data.len() as u64;
        let mut r = Watched {
            inner: std::io::Cursor::new(data),
            lowest_read: u64::MAX,
        };
        assert_eq!(read_last_of(&mut r, len, 8).unwrap(), b"the end\n");
        assert_eq!(r.lowest_read, len - 8, "nothing before the end was read");
        assert_eq!(
            read_last_of(&mut r, len, 2 * len).unwrap().len() as u64,
            len
        );
    }
}
