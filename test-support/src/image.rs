//! A one-layer busybox image (Debian's busybox-static and a symlink per applet, optionally host
//! programs with their shared libraries), built in the test with `tar`, `sha2` and `serde_json`,
//! written as an OCI image layout and, from it, as an OCI archive (what `skopeo copy ...
//! oci-archive:` writes and `ctr images import` reads).

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::sha256_hex;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What goes into the image; [`BusyboxImage::default`] is a plain busybox with `/etc/passwd`.
#[derive(Debug, Clone)]
pub struct BusyboxImage {
    /// The config's `Env`.
    pub env: Vec<String>,
    /// The config's `Cmd`.
    pub cmd: Vec<String>,
    /// Directories (path, mode, owner uid = gid) besides `bin`.
    pub dirs: Vec<(String, u32, u64)>,
    /// Regular files (path, contents, mode), owned by root.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Host programs (absolute paths) put into `bin/` under their own names, each with the
    /// shared libraries and the loader it links (at their host paths): what Debian's
    /// busybox-static lacks, e.g. procps' `pgrep`.
    pub host_programs: Vec<PathBuf>,
    /// `org.opencontainers.image.ref.name` of the manifest in `index.json`.
    pub ref_name: String,
    /// `io.containerd.image.name` (the name `ctr images import` gives it), if any.
    pub containerd_name: Option<String>,
}

impl Default for BusyboxImage {
    fn default() -> Self {
        let dirs = ["dev", "proc", "sys", "tmp", "etc", "root", "run"]
            .into_iter()
            .map(|d| (d.to_string(), if d == "tmp" { 0o1777 } else { 0o755 }, 0))
            .collect();
        BusyboxImage {
            env: vec!["PATH=/bin".into()],
            cmd: vec!["sh".into()],
            dirs,
            files: vec![(
                "etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
                0o644,
            )],
            host_programs: Vec::new(),
            ref_name: "latest".into(),
            containerd_name: None,
        }
    }
}

/// Where [`BusyboxImage::write`] put the image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// The same image as an OCI archive (a tar of the layout).
    pub archive: PathBuf,
}

impl BuiltImage {
    /// The layout's path as a command-line argument (`microvm run LAYOUT ...`).
    pub fn layout_str(&self) -> &str {
        self.layout
            .to_str()
            .expect("the image is written under a UTF-8 temporary directory")
    }
}

/// The static busybox of this host (`apt-get install busybox-static`).
pub fn busybox() -> Result<&'static Path, Error> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or_else(|| "busybox not found (apt-get install busybox-static)".into())
}

impl BusyboxImage {
    /// Writes the image into `dir` (created): `dir/layout` and `dir/image.tar`.
    pub fn write(&self, dir: &Path) -> Result<BuiltImage, Error> {
        let layout = dir.join("layout");
        std::fs::create_dir_all(layout.join("blobs/sha256"))?;
        let layer = self.layer()?;
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": self.env, "Cmd": self.cmd, "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]},
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": add_blob(&layout, &config)?,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": add_blob(&layout, &layer)?,
                "size": layer.len(),
            }],
        }))?;
        let mut annotations = json!({"org.opencontainers.image.ref.name": self.ref_name});
        if let Some(name) = &self.containerd_name {
            annotations["io.containerd.image.name"] = json!(name);
        }
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": add_blob(&layout, &manifest)?,
                "size": manifest.len(),
                "annotations": annotations,
                "platform": {"architecture": "amd64", "os": "linux"},
            }],
        }))?;
        std::fs::write(layout.join("index.json"), index)?;
        std::fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let archive = dir.join("image.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&archive)?);
        tar.append_dir_all(".", &layout)?;
        tar.finish()?;
        Ok(BuiltImage { layout, archive })
    }

    /// The layer: `bin/busybox`, a symlink per applet, the directories and files, the host
    /// programs and their libraries.
    fn layer(&self) -> Result<Vec<u8>, Error> {
        let busybox = busybox()?;
        let list = Command::new(busybox).arg("--list").output()?;
        let mut b = tar::Builder::new(Vec::new());
        let header = |kind: tar::EntryType, mode: u32, uid: u64, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_size(size);
            h.set_mtime(1_700_000_000);
            h
        };
        let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64| {
            let mut h = header(tar::EntryType::Directory, mode, uid, 0);
            b.append_data(&mut h, path, io::empty())
        };
        dir(&mut b, "bin", 0o755, 0)?;
        for (path, mode, uid) in &self.dirs {
            dir(&mut b, path, *mode, *uid)?;
        }
        let bytes = std::fs::read(busybox)?;
        let mut h = header(tar::EntryType::Regular, 0o755, 0, bytes.len() as u64);
        b.append_data(&mut h, "bin/busybox", bytes.as_slice())?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
                b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
            }
        }
        for (path, data, mode) in &self.files {
            let mut h = header(tar::EntryType::Regular, *mode, 0, data.len() as u64);
            b.append_data(&mut h, path, data.as_slice())?;
        }
        let mut libraries = BTreeSet::new();
        for program in &self.host_programs {
            let name = program
                .file_name()
                .ok_or_else(|| format!("{}: not a program path", program.display()))?;
            let bytes = std::fs::read(program)
                .map_err(|e| format!("host program {}: {e}", program.display()))?;
            let mut h = header(tar::EntryType::Regular, 0o755, 0, bytes.len() as u64);
            b.append_data(&mut h, Path::new("bin").join(name), bytes.as_slice())?;
            libraries.extend(shared_libraries(program)?);
        }
        // Each library at its host path (its contents, not the host's symlinks to it), under
        // directories of its own: the image's `lib` is a directory even where the host's is a
        // link into `usr`.
        let mut dirs: BTreeSet<PathBuf> = self.dirs.iter().map(|d| PathBuf::from(&d.0)).collect();
        dirs.insert("bin".into());
        for library in &libraries {
            let relative = library.strip_prefix("/")?;
            let parents: Vec<&Path> = relative.ancestors().skip(1).collect();
            for parent in parents
                .into_iter()
                .rev()
                .filter(|p| !p.as_os_str().is_empty())
            {
                if dirs.insert(parent.to_path_buf()) {
                    let mut h = header(tar::EntryType::Directory, 0o755, 0, 0);
                    b.append_data(&mut h, parent, io::empty())?;
                }
            }
            let bytes = std::fs::read(library)?;
            let mut h = header(tar::EntryType::Regular, 0o755, 0, bytes.len() as u64);
            b.append_data(&mut h, relative, bytes.as_slice())?;
        }
        Ok(b.into_inner()?)
    }
}

/// The absolute paths `ldd` gives for what `program` loads: its shared libraries and the
/// dynamic loader; none for a static program.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd").arg(program).output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(format!("ldd {}: {stderr}", program.display()).into());
    }
    // `libc.so.6 => /lib/.../libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`, and
    // `linux-vdso.so.1 (0x...)`, which is no file.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

/// Stores `data` in the layout's blobs; returns its digest (`sha256:...`).
pub fn add_blob(layout: &Path, data: &[u8]) -> io::Result<String> {
    let hex = sha256_hex(data);
    std::fs::write(layout.join("blobs/sha256").join(&hex), data)?;
    Ok(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_archive_hold_a_consistent_image() {
        if busybox().is_err() {
            eprintln!("no busybox here: skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("test-support-{}", std::process::id()));
        let image = BusyboxImage {
            containerd_name: Some("example.com/bb:t".into()),
            ..Default::default()
        };
        let built = image.write(&dir).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(built.layout.join("index.json")).unwrap())
                .unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "example.com/bb:t"
        );
        // Every blob is stored under its own digest, the manifest's among them.
        for entry in std::fs::read_dir(built.layout.join("blobs/sha256")).unwrap() {
            let entry = entry.unwrap();
            let data = std::fs::read(entry.path()).unwrap();
            assert_eq!(entry.file_name().to_string_lossy(), sha256_hex(&data));
        }
        let digest = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        assert!(built.layout.join("blobs/sha256").join(digest).is_file());
        let names: Vec<String> = tar::Archive::new(std::fs::File::open(&built.archive).unwrap())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.iter().any(|n| n.ends_with("index.json")), "{names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A host program comes with every library it loads, so that it runs in the unpacked layer
    /// alone (checked with `chroot` where the test runs as root).
    #[test]
    fn host_program_runs_from_the_layer_alone() {
        let pgrep = Path::new("/usr/bin/pgrep");
        if busybox().is_err() || !pgrep.is_file() {
            eprintln!("no busybox or no procps here: skipped");
            return;
        }
        let image = BusyboxImage {
            host_programs: vec![pgrep.into()],
            ..Default::default()
        };
        let layer = image.layer().unwrap();
        let mut seen_dirs = vec![String::new()];
        let mut files = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let parent = Path::new(&path).parent().unwrap().display().to_string();
            assert!(seen_dirs.contains(&parent), "{path} before its directory");
            match entry.header().entry_type() {
                tar::EntryType::Directory => seen_dirs.push(path),
                tar::EntryType::Regular => files.push(path),
                _ => {}
            }
        }
        assert!(files.contains(&"bin/pgrep".to_string()), "{files:?}");
        let libraries = shared_libraries(pgrep).unwrap();
        assert!(
            libraries.iter().any(|l| l.ends_with("libc.so.6")),
            "{libraries:?}"
        );
        for library in &libraries {
            let inside = library.strip_prefix("/").unwrap().display().to_string();
            assert!(files.contains(&inside), "{inside} missing: {files:?}");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: the chroot run is skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("test-support-chroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        tar::Archive::new(layer.as_slice()).unpack(&dir).unwrap();
        let out = Command::new("chroot")
            .arg(&dir)
            .args(["/bin/pgrep", "--version"])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("procps"));
    }
}
