//! What a target that writes files must leave alone beside its own directory, as lines that
//! compare equal only if nothing there changed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Every entry below `dir` (symbolic links not followed), sorted, each a line with its inode,
/// mode, owner, size, and modification and change times (so a new hard link, a chmod, a chown
/// or a write shows). `free`, an entry the target may change, is listed by name only and not
/// descended into.
pub fn tree_state(dir: &Path, free: Option<&Path>) -> Vec<String> {
    let mut lines = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if Some(path.as_path()) == free {
                lines.push(path.display().to_string());
                continue;
            }
            let m = fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                todo.push(path.clone());
            }
            lines.push(format!(
                "{} ino {} mode {:o} owner {}:{} size {} mtime {}.{} ctime {}.{}",
                path.display(),
                m.ino(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            ));
        }
    }
    lines.sort();
    lines
}
