//! Where a process's stdout (and then stderr) goes: FIFO paths, or a log URI as containerd's
//! runc shim takes them (`file:///path`, `binary:///path?key=value`).

use std::fs::{OpenOptions, Permissions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::StdioError;

/// Where a process's stdout (and then stderr) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Sink {
    /// FIFO paths (or nothing).
    Fifos,
    File(PathBuf),
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

pub(super) fn parse_sink(uri: &str) -> Result<Sink, StdioError> {
    if uri.is_empty() || !uri.contains("://") || uri.starts_with("fifo://") {
        return Ok(Sink::Fifos);
    }
    let bad = |why: &str| StdioError::BadUri {
        uri: uri.into(),
        why: why.into(),
    };
    let u = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "file" | "binary") {
        return Err(StdioError::Unsupported(uri.into()));
    }
    if u.host_str().is_some_and(|h| !h.is_empty()) {
        return Err(bad(
            "has a host part; write an absolute path after three slashes (binary:///usr/bin/x)",
        ));
    }
    let path = u.to_file_path().map_err(|()| bad("not an absolute path"))?;
    if path.as_os_str().len() <= 1 {
        return Err(bad("no path"));
    }
    Ok(match u.scheme() {
        "file" => Sink::File(path),
        _ => {
            // containerd's order: each key, then its (first) value.
            let mut args = Vec::new();
            for (k, v) in u.query_pairs() {
                args.push(k.into_owned());
                args.push(v.into_owned());
            }
            Sink::Binary { path, args }
        }
    })
}

pub(super) fn check_fifo(p: &str) -> Result<(), StdioError> {
    if p.contains("://") && !p.starts_with("fifo://") {
        return Err(StdioError::Unsupported(p.into()));
    }
    Ok(())
}

pub(super) fn path_of(p: &str) -> &str {
    p.strip_prefix("fifo://").unwrap_or(p)
}

/// A log file for stdout and stderr: appended to, created 0640 with its missing directories
/// 0755 (the modes containerd's runc shim gives them; set explicitly, since the shim's umask
/// is 077). Two descriptors of one open file (O_APPEND: each write lands at the end).
pub(super) fn open_log_file(path: &Path) -> Result<(OwnedFd, OwnedFd), StdioError> {
    let err = |source| StdioError::Open {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => {
                    std::fs::set_permissions(d, Permissions::from_mode(0o755)).map_err(err)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
        }
    }
    let (f, created) = match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            OpenOptions::new().append(true).open(path).map_err(err)?,
            false,
        ),
        Err(e) => return Err(err(e)),
    };
    if created {
        f.set_permissions(Permissions::from_mode(0o640))
            .map_err(err)?;
    }
    let second = f.try_clone().map_err(err)?;
    Ok((f.into(), second.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stdio::tests::{both_to, CTX};
    use crate::stdio::StdioPaths;
    use std::io::Write;

    #[test]
    fn log_uris_parse_like_containerd() {
        assert_eq!(parse_sink("/run/x/fifo").unwrap(), Sink::Fifos);
        assert_eq!(parse_sink("").unwrap(), Sink::Fifos);
        assert_eq!(
            parse_sink("file:///var/log/c%201.log").unwrap(),
            Sink::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            parse_sink("binary:///usr/bin/logger?tag=web&-p=local0.info").unwrap(),
            Sink::Binary {
                path: "/usr/bin/logger".into(),
                args: vec![
                    "tag".into(),
                    "web".into(),
                    "-p".into(),
                    "local0.info".into()
                ]
            }
        );
        let e = parse_sink("binary://usr/bin/logger")
            .unwrap_err()
            .to_string();
        assert!(e.contains("three slashes"), "{e}");
        let e = parse_sink("http://x/y").unwrap_err().to_string();
        assert!(e.contains("not supported"), "{e}");
        let p = StdioPaths {
            stdin: "file:///x".into(),
            ..Default::default()
        };
        assert!(p.check().is_err());
        let p = StdioPaths {
            stdout: "binary:///nonexistent/logger".into(),
            ..Default::default()
        };
        let e = p.check().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/logger"), "{e}");
    }

    #[test]
    fn a_new_log_file_and_its_directories_get_their_own_modes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a/b/c.log");
        drop(open_log_file(&log).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&log), 0o640);
        assert_eq!(mode(&dir.path().join("a")), 0o755);
        assert_eq!(mode(&dir.path().join("a/b")), 0o755);
        // An existing file keeps its mode.
        std::fs::set_permissions(&log, Permissions::from_mode(0o600)).unwrap();
        drop(open_log_file(&log).unwrap());
        assert_eq!(mode(&log), 0o600);
    }

    #[test]
    fn file_uri_appends_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/c.log");
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "before\n").unwrap();
        let uri = format!("file://{}", log.display());
        let opened = both_to(uri).open(CTX).unwrap();
        assert!(opened.logger.is_none());
        std::fs::File::from(opened.io.stdout.unwrap())
            .write_all(b"out\n")
            .unwrap();
        std::fs::File::from(opened.io.stderr.unwrap())
            .write_all(b"err\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "before\nout\nerr\n");
    }
}
