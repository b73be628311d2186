//! From `IMAGE` to what a run needs: the image config and the root filesystem disk, through the
//! `image` crate's store (`ImageStore::ensure`, `rootfs_disk`, `resolve_user`).
//!
//! Until the store is implemented (its methods answer "not implemented yet"), an OCI image
//! layout directory is handled here by a stopgap: layers extracted with tar into a staging tree,
//! an ext4 disk made with `mke2fs -d`, cached by manifest digest under
//! `$MICROVM_HOME/images/stopgap/`. No whiteouts, no registry, no archives. It goes once the
//! store lands.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use image::{Fetched, ImageConfiguration, ImageStore, PullOptions, User};

/// An image ready for a run.
pub struct RunImage {
    pub id: String,
    pub config: ImageConfiguration,
    pub disk: PathBuf,
    pub fstype: String,
    pub fetched: Fetched,
    pub disk_built: bool,
    stored: Option<image::Image>,
}

fn not_implemented(e: &image::Error) -> bool {
    e.to_string().starts_with("not implemented yet")
}

pub fn open_store() -> Result<ImageStore> {
    let root = ImageStore::default_root();
    ImageStore::open(&root).with_context(|| format!("open the image store {}", root.display()))
}

pub async fn prepare(store: &ImageStore, reference: &str, opts: &PullOptions) -> Result<RunImage> {
    match store.ensure(reference, opts).await {
        Ok((img, fetched)) => {
            let disk = store
                .rootfs_disk(&img)
                .with_context(|| format!("the root filesystem disk of {reference}"))?;
            Ok(RunImage {
                id: img.id.clone(),
                config: img.config.clone(),
                disk: disk.path,
                fstype: disk.fstype,
                fetched,
                disk_built: disk.built,
                stored: Some(img),
            })
        }
        Err(e) if not_implemented(&e) => stopgap::prepare(store.root(), reference),
        Err(e) => Err(anyhow::Error::new(e).context(format!("image {reference}"))),
    }
}

/// `-u`/the image's User as uid, gid and supplementary groups.
pub fn resolve_user(store: &ImageStore, img: &RunImage, user: &str) -> Result<User> {
    if user.is_empty() {
        return Ok(User {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
        });
    }
    if let Some(stored) = &img.stored {
        match store.resolve_user(stored, user) {
            Ok(u) => return Ok(u),
            Err(e) if not_implemented(&e) => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("user {user:?}"))),
        }
    }
    stopgap::resolve_user(&img.disk, user)
}

mod stopgap {
    use super::*;
    use serde_json::Value;

    fn blob(layout: &Path, digest: &str) -> Result<PathBuf> {
        let (alg, hex) = digest
            .split_once(':')
            .with_context(|| format!("bad digest {digest:?}"))?;
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) || alg.contains('/') {
            bail!("bad digest {digest:?}");
        }
        Ok(layout.join("blobs").join(alg).join(hex))
    }

    fn read_json(p: &Path) -> Result<Value> {
        let b = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parse {}", p.display()))
    }

    /// The linux/amd64 manifest digest of an index (following nested indexes).
    fn manifest_digest(layout: &Path, index: &Value) -> Result<String> {
        let manifests = index["manifests"]
            .as_array()
            .context("index without manifests")?;
        let pick = manifests
            .iter()
            .find(|m| m["platform"]["architecture"] == "amd64" || m["platform"].is_null())
            .context("no linux/amd64 manifest")?;
        let digest = pick["digest"].as_str().context("manifest without digest")?;
        let media = pick["mediaType"].as_str().unwrap_or_default();
        if media.contains("index") {
            return manifest_digest(layout, &read_json(&blob(layout, digest)?)?);
        }
        Ok(digest.to_string())
    }

    pub fn prepare(store_root: &Path, reference: &str) -> Result<RunImage> {
        let layout = Path::new(reference);
        if !layout.join("index.json").is_file() {
            bail!(
                "image {reference}: the image store is not implemented yet in this build; only \
                 OCI image layout directories can be run"
            );
        }
        let index = read_json(&layout.join("index.json"))?;
        let digest = manifest_digest(layout, &index)?;
        let manifest = read_json(&blob(layout, &digest)?)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .context("manifest without config")?;
        let config: ImageConfiguration = serde_json::from_slice(
            &std::fs::read(blob(layout, config_digest)?).context("read the image config")?,
        )
        .context("parse the image config")?;
        let cache = store_root.join("stopgap");
        std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
        let disk = cache.join(format!("{}.ext4", digest.replace(':', "-")));
        let built = !disk.is_file();
        if built {
            let staging = tempfile::Builder::new()
                .prefix("unpack-")
                .tempdir_in(&cache)?;
            let root = staging.path().join("root");
            std::fs::create_dir(&root)?;
            for layer in manifest["layers"]
                .as_array()
                .context("manifest without layers")?
            {
                let d = layer["digest"].as_str().context("layer without digest")?;
                let status = Command::new("tar")
                    .arg("-xf")
                    .arg(blob(layout, d)?)
                    .arg("-C")
                    .arg(&root)
                    .args(["--no-same-owner", "--numeric-owner"])
                    .status()
                    .context("run tar")?;
                if !status.success() {
                    bail!("tar failed on layer {d}");
                }
            }
            let tmp = staging.path().join("disk.ext4");
            crate::volumes::ext4_from_dir(&root, &tmp, 0)?;
            std::fs::rename(&tmp, &disk)?;
        }
        let fetched = Fetched {
            blobs_downloaded: 0,
            blobs_imported: usize::from(built),
        };
        Ok(RunImage {
            id: digest,
            config,
            disk,
            fstype: "ext4".into(),
            fetched,
            disk_built: built,
            stored: None,
        })
    }

    /// Numeric `uid[:gid]`, or names looked up in the disk's /etc/passwd and /etc/group.
    pub fn resolve_user(disk: &Path, user: &str) -> Result<User> {
        let (u, g) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        let cat = |path: &str| -> String {
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat {path}"))
                .arg(disk)
                .stderr(std::process::Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let passwd = cat("/etc/passwd");
        let entry = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && (f[0] == u || f[2] == u));
        let (uid, mut gid) = match (u.parse::<u32>(), &entry) {
            (Ok(uid), Some(f)) => (uid, f[3].parse().unwrap_or(0)),
            (Ok(uid), None) => (uid, 0),
            (Err(_), Some(f)) => (f[2].parse()?, f[3].parse()?),
            (Err(_), None) => bail!("unable to find user {u}: no matching entries in passwd file"),
        };
        if let Some(g) = g {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => cat("/etc/group")
                    .lines()
                    .map(|l| l.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() > 2 && f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .with_context(|| format!("unable to find group {g}"))?,
            };
        }
        Ok(User {
            uid,
            gid,
            additional_gids: vec![],
        })
    }
}
