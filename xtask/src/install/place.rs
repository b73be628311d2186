//! Putting files in place: each written beside its destination and renamed over it (a reader
//! never sees half a file), and a manifest of what was installed (`sha256sum` format) so a
//! reinstall replaces only its own unchanged files and refuses anyone else's without `--force`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// What a file is made from.
pub enum Source {
    /// A built file, copied.
    Copy(PathBuf),
    /// A generated text.
    Text(String),
}

/// One file to install: `path` is where it is used (on the target system, without the
/// destdir), `mode` its permission bits.
pub struct Item {
    pub path: PathBuf,
    pub source: Source,
    pub mode: u32,
}

/// `path` below `destdir` (staged installs, packaging), or `path` itself.
pub fn staged(destdir: Option<&Path>, path: &Path) -> PathBuf {
    match destdir {
        Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest's entries (target path → sha256); a missing manifest is an empty one.
pub fn read_manifest(file: &Path) -> Result<BTreeMap<PathBuf, String>> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", file.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (PathBuf::from(path), sum.to_string()))
        .collect())
}

/// Refuses (before anything is written) every existing file that the manifest does not list
/// with its current content, unless `force`.
fn check_ours(
    items: &[Item],
    destdir: Option<&Path>,
    manifest: &BTreeMap<PathBuf, String>,
    force: bool,
) -> Result<()> {
    let mut foreign = Vec::new();
    for item in items {
        let on_disk = staged(destdir, &item.path);
        let Ok(meta) = fs::symlink_metadata(&on_disk) else {
            continue;
        };
        let ours = meta.is_file()
            && manifest.get(&item.path).map(String::as_str)
                == Some(sha256_file(&on_disk)?.as_str());
        if !ours {
            foreign.push(on_disk.display().to_string());
        }
    }
    if !foreign.is_empty() && !force {
        bail!(
            "not replacing files this installer did not write (or that changed since): {}; \
             pass --force to replace them",
            foreign.join(", ")
        );
    }
    Ok(())
}

/// Writes `bytes` (or copies `source`) to a temporary file beside `dest`, sets `mode`, syncs
/// it and renames it over `dest`. Returns the content's sha256.
fn write_atomically(dest: &Path, source: &Source, mode: u32) -> Result<String> {
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent folder", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<String> {
        let bytes = match source {
            Source::Copy(from) => {
                fs::read(from).with_context(|| format!("read {}", from.display()))?
            }
            Source::Text(text) => text.clone().into_bytes(),
        };
        let mut file =
            fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        file.write_all(&bytes)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, dest)
            .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))?;
        Ok(hex(&Sha256::digest(&bytes)))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Installs `items` below `destdir` and records them in the manifest `manifest` (a target
/// path, like the items').
pub fn place(items: &[Item], destdir: Option<&Path>, manifest: &Path, force: bool) -> Result<()> {
    let manifest_file = staged(destdir, manifest);
    let mut entries = read_manifest(&manifest_file)?;
    check_ours(items, destdir, &entries, force)?;
    for item in items {
        let sum = write_atomically(&staged(destdir, &item.path), &item.source, item.mode)?;
        entries.insert(item.path.clone(), sum);
    }
    let text: String = entries
        .iter()
        .map(|(path, sum)| format!("{sum}  {}\n", path.display()))
        .collect();
    write_atomically(&manifest_file, &Source::Text(text), 0o644)?;
    Ok(())
}

/// Refuses an install that needs root: without a destdir, as another user than root, into a
/// folder whose nearest existing ancestor that user does not own (`/usr/local`, `/etc`).
pub fn check_privilege(euid: u32, destdir: Option<&Path>, paths: &[&Path]) -> Result<()> {
    if euid == 0 || destdir.is_some() {
        return Ok(());
    }
    for path in paths {
        let existing = path
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        let owner = fs::metadata(existing)
            .with_context(|| format!("stat {}", existing.display()))?
            .uid();
        if owner != euid {
            bail!(
                "installing into {} needs root (it is in {}, owned by uid {owner}): run it with \
                 sudo, or pick a prefix you own (--prefix ~/.local) or a staging --destdir",
                path.display(),
                existing.display()
            );
        }
    }
    Ok(())
}

/// The effective user id (the owner of `/proc/self`).
pub fn euid() -> Result<u32> {
    Ok(fs::metadata("/proc/self").context("stat /proc/self")?.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_item(path: &Path, text: &str) -> Item {
        Item {
            path: path.to_path_buf(),
            source: Source::Text(text.into()),
            mode: 0o644,
        }
    }

    #[test]
    fn a_reinstall_replaces_its_own_files_and_refuses_others() {
        let dest = tempfile::tempdir().unwrap();
        let d = Some(dest.path());
        let manifest = Path::new("/share/manifest");
        let conf = Path::new("/etc/a.toml");
        place(&[text_item(conf, "one")], d, manifest, false).unwrap();
        let on_disk = staged(d, conf);
        assert_eq!(fs::read_to_string(&on_disk).unwrap(), "one");
        // Ours and unchanged: replaced.
        place(&[text_item(conf, "two")], d, manifest, false).unwrap();
        assert_eq!(fs::read_to_string(&on_disk).unwrap(), "two");
        // Changed by the user: refused, left as it is, until --force.
        fs::write(&on_disk, "edited").unwrap();
        let e = place(&[text_item(conf, "three")], d, manifest, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(fs::read_to_string(&on_disk).unwrap(), "edited");
        place(&[text_item(conf, "three")], d, manifest, true).unwrap();
        assert_eq!(fs::read_to_string(&on_disk).unwrap(), "three");
        // A file the manifest never listed: refused, and nothing else was written either.
        let other = Path::new("/etc/b.toml");
        fs::write(staged(d, other), "theirs").unwrap();
        let first = Path::new("/etc/c.toml");
        let e = place(
            &[text_item(first, "c"), text_item(other, "b")],
            d,
            manifest,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("b.toml"), "{e}");
        assert!(!staged(d, first).exists());
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(staged(d, Path::new("/etc")))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn the_manifest_records_each_file_sha256() {
        let dest = tempfile::tempdir().unwrap();
        let d = Some(dest.path());
        let manifest = Path::new("/m");
        place(&[text_item(Path::new("/x"), "abc")], d, manifest, false).unwrap();
        let entries = read_manifest(&staged(d, manifest)).unwrap();
        assert_eq!(
            entries[Path::new("/x")],
            // sha256("abc")
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_system_prefix_needs_root_unless_staged() {
        let usr = Path::new("/usr/local/bin");
        let e = check_privilege(4242, None, &[usr]).unwrap_err().to_string();
        assert!(
            e.contains("needs root") && e.contains("/usr/local/bin"),
            "{e}"
        );
        check_privilege(0, None, &[usr]).unwrap();
        check_privilege(4242, Some(Path::new("/tmp/stage")), &[usr]).unwrap();
        // A folder the user owns (the test's own temporary folder) needs no root.
        let mine = tempfile::tempdir().unwrap();
        let missing_below = mine.path().join("prefix/bin");
        check_privilege(euid().unwrap(), None, &[&missing_below]).unwrap();
    }
}
