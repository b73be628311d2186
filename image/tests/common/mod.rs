//! Test images built here from Debian's busybox-static, written as OCI layouts, OCI archives
//! and docker-archives, and a reader of the built ext4 disks through `debugfs`.
#![allow(dead_code)] // each test binary uses a different part

use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MTIME: u64 = 1_700_000_000;

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One layer's tar, built entry by entry.
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        self.tar.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A file with PAX `SCHILY.xattr.*` records.
    pub fn file_with_xattrs(
        mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        let keys: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.tar
            .append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(path, data, mode, 0, 0)
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        h.set_link_name_literal(target).unwrap();
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        h.set_link_name_literal(target).unwrap();
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn node(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0o620, 0, 5, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    /// An entry whose name (and link name) go into the header byte for byte, as a hostile
    /// layer would have them: the tar crate's own setters refuse `..`.
    pub fn raw(
        mut self,
        name: &str,
        kind: tar::EntryType,
        link: Option<&str>,
        data: &[u8],
    ) -> Self {
        let mut h = Self::header(kind, 0o644, 0, 0, data.len() as u64);
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            h.set_link_name_literal(link).unwrap();
        }
        h.set_cksum();
        self.tar.append(&h, data).unwrap();
        self
    }

    pub fn whiteout(self, path: &str) -> Self {
        self.file(path, b"", 0o644, 0, 0)
    }

    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
}

/// The base layer: busybox-static with a few applets, /etc/passwd and /etc/group.
pub fn busybox_layer() -> Layer {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian's busybox-static) is needed to build test images");
    Layer::new()
        .dir("bin", 0o755, 0, 0)
        .file("bin/busybox", &busybox, 0o755, 0, 0)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "/bin/busybox")
        .dir("etc", 0o755, 0, 0)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:100::/:/bin/sh\n",
            0o644,
            0,
            0,
        )
        .file(
            "etc/group",
            b"root:x:0:\nusers:x:100:alice\nalice:x:1000:\nwheel:x:10:alice,bob\n",
            0o644,
            0,
            0,
        )
        .dir("tmp", 0o1777, 0, 0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer blob ready for a manifest.
pub struct Blob {
    pub bytes: Vec<u8>,
    pub media_type: &'static str,
    pub digest: String,
    pub diff_id: String,
}

pub fn compress(tar: &[u8], how: Compression) -> Blob {
    let (bytes, media_type) = match how {
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(tar).unwrap();
            (
                enc.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => (
            zstd::encode_all(tar, 1).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    Blob {
        digest: sha256(&bytes),
        diff_id: sha256(tar),
        bytes,
        media_type,
    }
}

/// An image: its layers, config and manifest as bytes.
pub struct TestImage {
    pub layers: Vec<Blob>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl TestImage {
    pub fn new(layers: Vec<Blob>, cmd: &[&str]) -> Self {
        Self::for_arch(layers, cmd, "amd64")
    }

    pub fn for_arch(layers: Vec<Blob>, cmd: &[&str], arch: &str) -> Self {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Cmd": cmd,
                "Env": ["PATH=/bin", "GREETING=hello"],
                "WorkingDir": "/tmp",
                "User": "alice",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        Self::with_config(layers, config)
    }

    /// An image with these exact config bytes.
    pub fn with_config(layers: Vec<Blob>, config: Vec<u8>) -> Self {
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.bytes.len()}))
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(&config),
                "size": config.len(),
            },
            "layers": layer_descs,
        }))
        .unwrap();
        Self {
            layers,
            config,
            manifest,
        }
    }

    /// A one-layer image whose config is 9 MiB: past the store's 8 MiB limit for configs.
    pub fn with_oversized_config() -> Self {
        let layer = compress(
            &Layer::new().file("f", b"x", 0o644, 0, 0).finish(),
            Compression::Gzip,
        );
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            "padding": "x".repeat(9 << 20),
        }))
        .unwrap();
        Self::with_config(vec![layer], config)
    }

    pub fn id(&self) -> String {
        sha256(&self.manifest)
    }

    /// Writes an OCI image layout at `dir`, its index naming the manifest `ref_name`.
    pub fn write_layout(&self, dir: &Path, ref_name: Option<&str>) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let digest = sha256(bytes);
            std::fs::write(blobs.join(digest.strip_prefix("sha256:").unwrap()), bytes).unwrap();
        };
        put(&self.config);
        put(&self.manifest);
        for l in &self.layers {
            put(&l.bytes);
        }
        let mut desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.id(),
            "size": self.manifest.len(),
        });
        if let Some(name) = ref_name {
            desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    /// `docker save` (the format before docker 25): manifest.json, `<id>.json`, and one
    /// `<dir>/layer.tar` per layer (docker's are uncompressed; other tools' may not be).
    pub fn write_docker_archive(&self, out: &Path, repo_tags: &[&str]) {
        let mut tar = tar::Builder::new(std::fs::File::create(out).unwrap());
        let config_name = format!("{}.json", &sha256(&self.config)[7..]);
        let mut layer_names = Vec::new();
        let add = |tar: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(MTIME);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, data).unwrap();
        };
        for l in &self.layers {
            let name = format!("{}/layer.tar", &l.digest[7..]);
            add(&mut tar, &name, &l.bytes);
            layer_names.push(name);
        }
        add(&mut tar, &config_name, &self.config);
        let manifest = serde_json::json!([{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]);
        add(
            &mut tar,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        tar.finish().unwrap();
    }
}

/// An OCI archive: the layout directory `dir` in a tar, members named `./...` as skopeo does.
pub fn tar_layout(dir: &Path, out: &Path) {
    let mut tar = tar::Builder::new(std::fs::File::create(out).unwrap());
    tar.append_dir_all(".", dir).unwrap();
    tar.finish().unwrap();
}

/// A store in a fresh temporary directory.
pub fn store() -> (tempfile::TempDir, image::ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = image::ImageStore::open(dir.path().join("store")).unwrap();
    (dir, store)
}

/// What `debugfs -R 'stat PATH'` says about a path of an ext4 image.
#[derive(Debug)]
pub struct Stat {
    pub inode: u64,
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u32,
    pub raw: String,
}

pub fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .output()
        .expect("debugfs (e2fsprogs) runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    text[at..].split_whitespace().next()
}

pub fn stat(disk: &Path, path: &str) -> Option<Stat> {
    let raw = debugfs(disk, &format!("stat \"{path}\""));
    if raw.contains("File not found") {
        return None;
    }
    let kind_at = raw.find("Type: ").expect(&raw) + 6;
    let kind = raw[kind_at..]
        .split("  ")
        .next()
        .unwrap()
        .trim()
        .to_string();
    Some(Stat {
        inode: field(&raw, "Inode:").unwrap().parse().unwrap(),
        kind,
        mode: u32::from_str_radix(field(&raw, "Mode:").unwrap(), 8).unwrap(),
        uid: field(&raw, "User:").unwrap().parse().unwrap(),
        gid: field(&raw, "Group:").unwrap().parse().unwrap(),
        size: field(&raw, "Size:").unwrap().parse().unwrap(),
        links: field(&raw, "Links:").unwrap().parse().unwrap(),
        raw,
    })
}

pub fn cat(disk: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(disk)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every path under `dir` (recursively, not following symlinks).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.clone());
            if std::fs::symlink_metadata(&p)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                out.extend(walk(&p));
            }
        }
    }
    out
}
