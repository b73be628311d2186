//! `cargo xtask kernel`: build the guest kernel, or find it in the cache.
//!
//! Recipe (see `kernel-config/README.md`): extract the source tarball, `make tinyconfig`,
//! merge `kernel-config/microvm-x86_64.config`, `make olddefconfig`, check that every line of
//! the fragment survived into the final `.config`, then `make vmlinux bzImage`.
//!
//! The result lives outside the checkout in `<cache_dir>/kernel/<key>/` (`vmlinux`,
//! `bzImage`, `.config`). The key is a SHA-256 over the recipe version, the source tarball's
//! SHA-256 and the fragment's bytes. Hashing the tarball (~130 MB) takes about half a second,
//! so its hash is remembered in `<cache_dir>/kernel/source-sha256/` next to the tarball's
//! path, size and mtime: a repeated call with everything cached reads no tarball and runs no
//! command. A build runs in `<cache_dir>/kernel/tmp-<key>-<pid>/` and its outputs reach
//! `<key>/` by one rename, so an interrupted build never leaves a half result.

use crate::util;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, UNIX_EPOCH};

/// Bump when the way the kernel is built changes (commands, make variables, outputs), so
/// that cached kernels built the old way are not reused.
const RECIPE_VERSION: &str =
    "microvm-kernel-recipe-1: ARCH=x86_64 tinyconfig + merge_config.sh -m + olddefconfig; \
     make vmlinux bzImage; outputs vmlinux bzImage .config";

/// The kconfig fragment, relative to the workspace root.
const FRAGMENT: &str = "kernel-config/microvm-x86_64.config";

/// Debian's kernel source, from the `linux-source-6.1` package.
const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";
const DEFAULT_SOURCE_DEB: &str = "linux-source-6.1";

/// What building this configuration needs (no module signing or keyrings: no libssl-dev).
const BUILD_DEBS: &[&str] = &[
    "bc",
    "bison",
    "flex",
    "gcc",
    "libc6-dev",
    "libelf-dev",
    "make",
    "xz-utils",
];

/// Hex digits of the cache key used as the output folder's name.
const KEY_PREFIX_LEN: usize = 16;

/// Lines of the build log shown when a step fails.
const LOG_TAIL_LINES: usize = 40;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct KernelArgs {
    /// Kernel source tarball [default: /usr/src/linux-source-6.1.tar.xz, from Debian's
    /// linux-source-6.1, installed if missing].
    #[arg(long, value_name = "TARBALL")]
    pub source: Option<PathBuf>,
    /// Parallel make jobs [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
}

/// Builds the guest kernel unless it is cached, and returns the path of its `vmlinux`
/// (the `bzImage` and the final `.config` are beside it).
pub fn build(args: &KernelArgs) -> Result<PathBuf> {
    let source = match &args.source {
        Some(path) => path.clone(),
        None => {
            let path = PathBuf::from(DEFAULT_SOURCE);
            if !path.is_file() {
                util::ensure_debs(&[DEFAULT_SOURCE_DEB])?;
            }
            path
        }
    };
    let source = fs::canonicalize(&source)
        .with_context(|| format!("kernel source tarball {}", source.display()))?;
    let fragment_path = util::workspace_root().join(FRAGMENT);
    let fragment =
        fs::read(&fragment_path).with_context(|| format!("reading {}", fragment_path.display()))?;
    let wanted = parse_fragment(&String::from_utf8_lossy(&fragment))
        .with_context(|| format!("parsing {}", fragment_path.display()))?;

    let kernel_cache = util::cache_dir().join("kernel");
    let source_hash = source_sha256(&source, &kernel_cache.join("source-sha256"))?;
    let key = cache_key(RECIPE_VERSION, &source_hash, &fragment);
    let key = &key[..KEY_PREFIX_LEN];
    let out = kernel_cache.join(key);
    if is_complete(&out) {
        publish_current(&kernel_cache, key);
        return Ok(out.join("vmlinux"));
    }
    if out.exists() {
        // Not produced by this code (which renames complete folders only); start over.
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }

    util::ensure_debs(BUILD_DEBS)?;
    remove_stale_builds(&kernel_cache);
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let tmp = kernel_cache.join(format!("tmp-{key}-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let log = tmp.join("build.log");
    eprintln!(
        "xtask: building guest kernel {key} from {} with {jobs} jobs (about 5 min on 2 cores); log: {}",
        source.display(),
        log.display()
    );
    let started = Instant::now();
    build_in(&tmp, &log, &source, &fragment_path, &wanted, jobs)?;

    // Publish: one rename of a folder holding exactly the results.
    let staged = tmp.join("out");
    match fs::rename(&staged, &out) {
        Ok(()) => {}
        // Another build of the same key finished first: its result is as good.
        Err(_) if is_complete(&out) => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("moving {} to {}", staged.display(), out.display()))
        }
    }
    // The source tree is about 1 GB once built; keep nothing of it.
    let _ = fs::remove_dir_all(&tmp);
    eprintln!(
        "xtask: guest kernel built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    publish_current(&kernel_cache, key);
    Ok(out.join("vmlinux"))
}

/// Points `<cache>/kernel/current` at the kernel of this checkout, so `microvm run` and the
/// shim find it without flags (`sandbox::locate::kernel`). One symlink replaced by a rename,
/// so a reader sees the old or the new kernel, never none.
fn publish_current(kernel_cache: &Path, key: &str) {
    let tmp = kernel_cache.join(format!(".current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = std::os::unix::fs::symlink(key, &tmp)
        .and_then(|()| fs::rename(&tmp, kernel_cache.join("current")));
    if let Err(e) = result {
        eprintln!(
            "xtask: warning: cannot update {}/current: {e}",
            kernel_cache.display()
        );
    }
}

/// Every step of a build, inside `tmp`; leaves the results in `tmp/out/`.
fn build_in(
    tmp: &Path,
    log: &Path,
    source: &Path,
    fragment_path: &Path,
    wanted: &[Wanted],
    jobs: usize,
) -> Result<()> {
    let src = tmp.join("src");
    fs::create_dir_all(&src)?;
    let step = |what: &str, cmd: &mut Command| -> Result<()> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        util::run(cmd).map_err(|e| {
            anyhow::anyhow!(
                "{what} failed: {e:#}\n--- last lines of {} ---\n{}",
                log.display(),
                log_tail(log, LOG_TAIL_LINES)
            )
        })
    };
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(&src)
            .arg("ARCH=x86_64")
            .args(args)
            .env("KBUILD_BUILD_USER", "microvm")
            .env("KBUILD_BUILD_HOST", "xtask");
        cmd
    };

    step(
        "extracting the kernel source",
        Command::new("tar")
            .arg("-xf")
            .arg(source)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"),
    )?;
    step("make tinyconfig", &mut make(&["tinyconfig"]))?;
    step(
        "merging the config fragment",
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(&src)
            .env("ARCH", "x86_64")
            .args(["-m", ".config"])
            .arg(fragment_path),
    )?;
    step("make olddefconfig", &mut make(&["olddefconfig"]))?;

    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let problems = verify(wanted, &config);
    if !problems.is_empty() {
        bail!(
            "{} line(s) of {FRAGMENT} did not survive into the final .config (unmet \
             dependencies or a select from elsewhere; fix the fragment):\n  {}\n(final config: {})",
            problems.len(),
            problems.join("\n  "),
            config_path.display()
        );
    }

    step(
        "building the kernel",
        &mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]),
    )?;

    let staged = tmp.join("out");
    fs::create_dir_all(&staged)?;
    for (from, to) in [
        ("vmlinux", "vmlinux"),
        ("arch/x86/boot/bzImage", "bzImage"),
        (".config", ".config"),
    ] {
        fs::rename(src.join(from), staged.join(to))
            .with_context(|| format!("moving {from} out of the build tree"))?;
    }
    Ok(())
}

fn is_complete(dir: &Path) -> bool {
    ["vmlinux", "bzImage", ".config"]
        .iter()
        .all(|f| dir.join(f).is_file())
}

/// Removes `tmp-*-<pid>` build folders whose process is gone (interrupted builds).
fn remove_stale_builds(kernel_cache: &Path) {
    let Ok(entries) = fs::read_dir(kernel_cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("tmp-") else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The tarball's SHA-256 (hex), remembered in `memo_dir` under its path, size and mtime.
fn source_sha256(source: &Path, memo_dir: &Path) -> Result<String> {
    let meta = fs::metadata(source).with_context(|| format!("{}", source.display()))?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let identity = format!("{} {} {}", meta.len(), mtime, source.display());
    let memo = memo_dir.join(&sha256_hex(source.as_os_str().as_encoded_bytes())[..32]);
    if let Ok(text) = fs::read_to_string(&memo) {
        if let Some((hash, id)) = text.trim_end().split_once(' ') {
            if id == identity && hash.len() == 64 {
                return Ok(hash.to_string());
            }
        }
    }
    let mut file = fs::File::open(source).with_context(|| format!("{}", source.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hash = hex(&hasher.finalize());
    // Best effort: without the memo the next call just hashes again.
    let _ = fs::create_dir_all(memo_dir).and_then(|()| {
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, format!("{hash} {identity}\n"))?;
        fs::rename(&tmp, &memo)
    });
    Ok(hash)
}

/// The cache key (hex SHA-256) of a build: recipe, source and fragment.
fn cache_key(recipe: &str, source_sha256: &str, fragment: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [recipe.as_bytes(), source_sha256.as_bytes(), fragment] {
        // Length-prefixed, so no two different inputs concatenate alike.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    hex(&h.finalize())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One line of the fragment: `CONFIG_NAME=value`, or `value == None` for
/// `# CONFIG_NAME is not set` / `CONFIG_NAME=n`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    name: String,
    value: Option<String>,
}

/// Parses a kconfig fragment; comments and blank lines are skipped.
fn parse_fragment(text: &str) -> Result<Vec<Wanted>> {
    let mut wanted = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(name) = not_set(line) {
            wanted.push(Wanted {
                name: name.to_string(),
                value: None,
            });
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            bail!("line {}: expected CONFIG_NAME=value: {line}", i + 1);
        };
        if !name.starts_with("CONFIG_") || value.is_empty() {
            bail!("line {}: expected CONFIG_NAME=value: {line}", i + 1);
        }
        wanted.push(Wanted {
            name: name.to_string(),
            value: (value != "n").then(|| value.to_string()),
        });
    }
    Ok(wanted)
}

/// `Some(name)` for a `# CONFIG_NAME is not set` line.
fn not_set(line: &str) -> Option<&str> {
    let name = line.strip_prefix("# ")?.strip_suffix(" is not set")?;
    (name.starts_with("CONFIG_") && !name.contains(' ')).then_some(name)
}

/// The values of a `.config`: `Some(value)`, or `None` for `# CONFIG_X is not set`.
fn parse_config(text: &str) -> HashMap<&str, Option<&str>> {
    let mut values = HashMap::new();
    for line in text.lines() {
        if let Some(name) = not_set(line) {
            values.insert(name, None);
        } else if let Some((name, value)) = line.split_once('=') {
            if name.starts_with("CONFIG_") {
                values.insert(name, Some(value));
            }
        }
    }
    values
}

/// The fragment lines that the final `.config` does not honour, one message each.
/// A wanted value must be there exactly; "not set" is honoured by `is not set`, by `=n`, or
/// by the option being absent (its dependencies unmet).
fn verify(wanted: &[Wanted], config: &str) -> Vec<String> {
    let values = parse_config(config);
    let mut problems = Vec::new();
    for w in wanted {
        let have = values.get(w.name.as_str()).copied();
        let ok = match (&w.value, have) {
            (Some(want), Some(Some(got))) => want == got,
            (Some(_), _) => false,
            (None, Some(Some(got))) => got == "n",
            (None, _) => true,
        };
        if ok {
            continue;
        }
        let want = match &w.value {
            Some(v) => format!("{}={v}", w.name),
            None => format!("# {} is not set", w.name),
        };
        let got = match have {
            Some(Some(v)) => format!("{}={v}", w.name),
            Some(None) => "is not set".to_string(),
            None => "absent (dependencies unmet)".to_string(),
        };
        problems.push(format!("{want}: final .config has {got}"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAG: &str = "\
# comment
CONFIG_SMP=y

CONFIG_NR_CPUS=64
CONFIG_CMDLINE=\"console=ttyS0\"
# CONFIG_VT is not set
CONFIG_PCI=n
  CONFIG_PVH=y
";

    fn w(name: &str, value: Option<&str>) -> Wanted {
        Wanted {
            name: name.into(),
            value: value.map(Into::into),
        }
    }

    #[test]
    fn parses_fragment() {
        assert_eq!(
            parse_fragment(FRAG).unwrap(),
            vec![
                w("CONFIG_SMP", Some("y")),
                w("CONFIG_NR_CPUS", Some("64")),
                w("CONFIG_CMDLINE", Some("\"console=ttyS0\"")),
                w("CONFIG_VT", None),
                w("CONFIG_PCI", None),
                w("CONFIG_PVH", Some("y")),
            ]
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_fragment("CONFIG_SMP\n").is_err());
        assert!(parse_fragment("SMP=y\n").is_err());
        assert!(parse_fragment("CONFIG_SMP=\n").is_err());
    }

    #[test]
    fn verify_accepts_a_matching_config() {
        let config = "\
CONFIG_SMP=y
CONFIG_NR_CPUS=64
CONFIG_CMDLINE=\"console=ttyS0\"
# CONFIG_VT is not set
CONFIG_PVH=y
";
        // CONFIG_PCI is absent: its dependencies are unmet, so it is not set.
        assert_eq!(
            verify(&parse_fragment(FRAG).unwrap(), config),
            Vec::<String>::new()
        );
    }

    #[test]
    fn verify_reports_every_dropped_or_changed_option() {
        let config = "\
# CONFIG_SMP is not set
CONFIG_NR_CPUS=8
CONFIG_CMDLINE=\"console=ttyS0\"
CONFIG_VT=y
CONFIG_PCI=y
";
        let problems = verify(&parse_fragment(FRAG).unwrap(), config);
        assert_eq!(problems.len(), 5, "{problems:#?}");
        for (problem, name) in problems.iter().zip([
            "CONFIG_SMP=y",
            "CONFIG_NR_CPUS=64",
            "CONFIG_VT ",
            "CONFIG_PCI ",
            "CONFIG_PVH=y",
        ]) {
            assert!(problem.contains(name), "{problem} should be about {name}");
        }
        assert!(problems[4].contains("absent"));
        // A module is not a built-in.
        assert_eq!(
            verify(&[w("CONFIG_VIRTIO", Some("y"))], "CONFIG_VIRTIO=m\n").len(),
            1
        );
    }

    #[test]
    fn cache_key_is_deterministic_and_covers_every_input() {
        let base = cache_key("r1", "aa", b"CONFIG_SMP=y\n");
        assert_eq!(base.len(), 64);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(base, cache_key("r1", "aa", b"CONFIG_SMP=y\n"));
        assert_ne!(base, cache_key("r2", "aa", b"CONFIG_SMP=y\n"));
        assert_ne!(base, cache_key("r1", "ab", b"CONFIG_SMP=y\n"));
        assert_ne!(base, cache_key("r1", "aa", b"CONFIG_SMP=n\n"));
        // Boundaries between inputs matter.
        assert_ne!(cache_key("ab", "c", b""), cache_key("a", "bc", b""));
    }

    #[test]
    fn source_hash_is_memoized_and_invalidated() {
        let dir = std::env::temp_dir().join(format!("xtask-kernel-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.tar");
        fs::write(&src, b"abc").unwrap();
        let memo = dir.join("memo");
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(source_sha256(&src, &memo).unwrap(), expected);
        assert_eq!(fs::read_dir(&memo).unwrap().count(), 1);
        assert_eq!(source_sha256(&src, &memo).unwrap(), expected);
        // A different size invalidates the memo.
        fs::write(&src, b"abcd").unwrap();
        assert_eq!(source_sha256(&src, &memo).unwrap(), sha256_hex(b"abcd"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_fragment_asks_for_what_the_vmm_relies_on() {
        let text = fs::read_to_string(util::workspace_root().join(FRAGMENT)).unwrap();
        let wanted = parse_fragment(&text).unwrap();
        for name in [
            "CONFIG_64BIT",
            "CONFIG_SMP",
            "CONFIG_X86_MPPARSE",
            "CONFIG_MULTIUSER",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_PVH",
            "CONFIG_KVM_GUEST",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_DEVPORT",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_CGROUPS",
            "CONFIG_SECCOMP_FILTER",
        ] {
            assert!(
                wanted.contains(&w(name, Some("y"))),
                "{FRAGMENT} lacks {name}=y"
            );
        }
        for name in ["CONFIG_MODULES", "CONFIG_ACPI"] {
            assert!(
                !wanted.iter().any(|x| x.name == name && x.value.is_some()),
                "{FRAGMENT} must not enable {name}"
            );
        }
    }
}
