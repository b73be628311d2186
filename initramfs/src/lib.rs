//! Initramfs images (cpio "newc" archives, uncompressed: the kernel takes them as is) written
//! in-process: no `cpio` tool (whose `find | cpio` pipeline silently yields an empty archive
//! when it is missing) and no root for device nodes.
//!
//! [`Cpio`] streams entries to a writer; [`Initramfs`] collects a tree (parents created
//! automatically, host programs with their shared libraries) and writes it through `Cpio`.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// An initramfs under construction. Parent directories are added automatically.
#[derive(Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
    dirs: BTreeSet<String>,
}

struct Entry {
    name: String,
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

impl Initramfs {
    /// A skeleton with /dev/console (so init has stdio before devtmpfs is mounted) and the
    /// usual mount points.
    pub fn new() -> Self {
        let mut i = Self::default();
        for d in ["dev", "proc", "sys", "tmp", "mnt", "run", "bin", "sbin"] {
            i.dir(d);
        }
        i.char_device("dev/console", 5, 1);
        i
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        let path = path.trim_matches('/');
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                self.entries.push(Entry {
                    name: prefix.clone(),
                    mode: S_IFDIR | 0o755,
                    rdev: (0, 0),
                    data: Vec::new(),
                });
            }
        }
        self
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    pub fn file(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        let path = path.trim_start_matches('/');
        self.parent(path);
        self.entries.push(Entry {
            name: path.to_string(),
            mode: S_IFREG | (mode & 0o7777),
            rdev: (0, 0),
            data: data.into(),
        });
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let path = path.trim_start_matches('/');
        self.parent(path);
        self.entries.push(Entry {
            name: path.to_string(),
            mode: S_IFLNK | 0o777,
            rdev: (0, 0),
            data: target.as_bytes().to_vec(),
        });
        self
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let path = path.trim_start_matches('/');
        self.parent(path);
        self.entries.push(Entry {
            name: path.to_string(),
            mode: S_IFCHR | 0o600,
            rdev: (major, minor),
            data: Vec::new(),
        });
        self
    }

    /// Copies a host file into the image at `path`.
    pub fn host_file(&mut self, path: &str, host: &Path) -> io::Result<&mut Self> {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(host)?;
        let mode = std::fs::metadata(host)?.permissions().mode();
        Ok(self.file(path, data, mode))
    }

    /// Copies a host executable to `path` together with the shared libraries `ldd` lists,
    /// at their host paths, so a dynamically linked program runs in the guest.
    pub fn host_program(&mut self, path: &str, host: &Path) -> io::Result<&mut Self> {
        self.host_file(path, host)?;
        for lib in shared_libraries(host)? {
            let real = std::fs::canonicalize(&lib)?;
            let name = lib.to_string_lossy().trim_start_matches('/').to_string();
            if !self.entries.iter().any(|e| e.name == name) {
                self.host_file(&name, &real)?;
            }
        }
        Ok(self)
    }

    /// busybox (static) at /bin/busybox, with /bin/sh.
    pub fn busybox(&mut self) -> io::Result<&mut Self> {
        let bb = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .ok_or_else(|| {
                io::Error::other("busybox not found (apt-get install busybox-static)")
            })?;
        self.host_file("bin/busybox", bb)?;
        self.symlink("bin/sh", "busybox");
        Ok(self)
    }

    /// Writes the archive.
    pub fn write_to(&self, out: impl Write) -> io::Result<()> {
        let mut cpio = Cpio::new(out);
        for e in &self.entries {
            cpio.entry(&e.name, e.mode, e.rdev, &e.data)?;
        }
        cpio.finish()?;
        Ok(())
    }

    pub fn write_file(&self, path: &Path) -> io::Result<PathBuf> {
        let f = std::fs::File::create(path)?;
        self.write_to(io::BufWriter::new(f))?;
        Ok(path.to_path_buf())
    }
}

/// A streaming writer of `newc` cpio archives.
pub struct Cpio<W: Write> {
    out: W,
    written: u64,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio {
            out,
            written: 0,
            ino: 0,
        }
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Writes one entry of any type (`mode` includes the `S_IF*` type bits).
    pub fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large for cpio"))?;
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }
}

/// The shared libraries a host program needs (absolute paths, dynamic loader included).
fn shared_libraries(program: &Path) -> io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(program).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn archive_round_trips_through_cpio() {
        let mut i = Initramfs::new();
        i.file("etc/hello.txt", "hi there\n", 0o644);
        i.symlink("bin/sh", "busybox");
        let dir = tempfile::tempdir().unwrap();
        let img = i.write_file(&dir.path().join("i.cpio")).unwrap();
        let len = std::fs::metadata(&img).unwrap().len();
        assert_eq!(len % 4, 0, "newc entries are 4-byte aligned");
        // When cpio(1) is installed, it must list exactly what we put in.
        if let Ok(out) = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&img)
            .output()
        {
            let listing = String::from_utf8_lossy(&out.stdout);
            for name in ["dev/console", "etc", "etc/hello.txt", "bin/sh"] {
                assert!(
                    listing.lines().any(|l| l == name),
                    "{name} missing in\n{listing}"
                );
            }
        }
        let bytes = std::fs::read(&img).unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.windows(9).any(|w| w == b"hi there\n"));
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn parents_are_created_once() {
        let mut i = Initramfs::default();
        i.file("a/b/c.txt", "x", 0o644);
        i.file("a/b/d.txt", "y", 0o644);
        let names: Vec<&str> = i.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["a", "a/b", "a/b/c.txt", "a/b/d.txt"]);
    }

    #[test]
    fn cpio_layout() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.dir("bin", 0o755).unwrap();
        cpio.file("bin/x", 0o755, b"hello").unwrap();
        cpio.char_dev("console", 0o600, 5, 1).unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The file's header: mode 0100755, size 5, name "bin/x" + NUL, data padded to 4.
        let second = &bytes[116..]; // 110-byte header + "bin\0", padded to 4
        assert!(second.starts_with(b"070701"));
        assert_eq!(&second[14..22], b"000081ED");
        assert_eq!(&second[54..62], b"00000005");
        assert_eq!(&second[110..116], b"bin/x\0");
        assert_eq!(&second[116..121], b"hello");
        assert!(bytes.ends_with(b"TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn cpio_is_read_by_gnu_cpio() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("no cpio: skipped");
            return;
        }
        let mut cpio = Cpio::new(Vec::new());
        cpio.dir("bin", 0o755).unwrap();
        cpio.file("bin/odd", 0o644, b"abc").unwrap();
        cpio.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = cpio.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("cpio")
            .args(["-i", "--quiet", "--make-directories"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("bin/odd")).unwrap(), b"abc");
        assert_eq!(
            std::fs::read(dir.path().join("init")).unwrap(),
            b"#!/bin/sh\n"
        );
    }
}
