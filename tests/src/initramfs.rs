//! Builds initramfs images (cpio "newc" archives, uncompressed: the kernel takes them as is)
//! in-process, so tests need no `cpio` tool and no root for device nodes.

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

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

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
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        let mut offset = 0usize;
        for (ino, e) in self.entries.iter().enumerate() {
            offset += write_entry(&mut out, ino as u32 + 1, e)?;
        }
        let trailer = Entry {
            name: "TRAILER!!!".into(),
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        };
        offset += write_entry(&mut out, 0, &trailer)?;
        // Pad to a 512-byte boundary like cpio(1) does.
        let pad = (512 - offset % 512) % 512;
        out.write_all(&vec![0; pad])?;
        Ok(())
    }

    pub fn write_file(&self, path: &Path) -> io::Result<PathBuf> {
        let f = std::fs::File::create(path)?;
        self.write_to(io::BufWriter::new(f))?;
        Ok(path.to_path_buf())
    }
}

fn write_entry(out: &mut impl Write, ino: u32, e: &Entry) -> io::Result<usize> {
    let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
    let name_len = e.name.len() + 1;
    let header = format!(
        "070701{ino:08x}{:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
        e.mode,
        0, // uid
        0, // gid
        0, // mtime
        e.data.len(),
        0, // dev major
        0, // dev minor
        e.rdev.0,
        e.rdev.1,
        0, // check
    );
    out.write_all(header.as_bytes())?;
    out.write_all(e.name.as_bytes())?;
    out.write_all(&[0])?;
    let mut n = header.len() + name_len;
    let pad = (4 - n % 4) % 4;
    out.write_all(&[0; 3][..pad])?;
    n += pad;
    out.write_all(&e.data)?;
    n += e.data.len();
    let pad = (4 - n % 4) % 4;
    out.write_all(&[0; 3][..pad])?;
    Ok(n + pad)
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

    #[test]
    fn archive_round_trips_through_cpio() {
        let mut i = Initramfs::new();
        i.file("etc/hello.txt", "hi there\n", 0o644);
        i.symlink("bin/sh", "busybox");
        let dir = tempfile::tempdir().unwrap();
        let img = i.write_file(&dir.path().join("i.cpio")).unwrap();
        let len = std::fs::metadata(&img).unwrap().len();
        assert_eq!(len % 512, 0);
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
}
