//! An install into a temporary destdir from stand-in built files, and containerd itself
//! reading the drop-in it writes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// Stand-ins for the built files (their contents are what the install must copy).
fn fake_built(dir: &Path, virtiofsd: bool) -> Built {
    let file = |name: &str| {
        let p = dir.join(name);
        fs::write(&p, format!("built {name}")).unwrap();
        p
    };
    Built {
        microvm: file("microvm"),
        vmm: file("microvm-vmm"),
        shim: file("containerd-shim-microvm-v2"),
        agent: file("microvm-agent"),
        kernel: file("vmlinux"),
        virtiofsd: virtiofsd.then(|| file("virtiofsd")),
    }
}

fn args(prefix: &str, destdir: &Path) -> InstallArgs {
    InstallArgs {
        prefix: prefix.into(),
        destdir: Some(destdir.to_path_buf()),
        containerd_config: None,
        no_containerd_config: false,
        containerd_config_version: ContainerdSyntax::V2,
        debug_build: true,
        force: false,
    }
}

fn read_toml(path: &Path) -> toml::Table {
    toml::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// The `ConfigPath` option of the `microvm` handler in a containerd config's CRI `plugin`.
fn config_path(config: &toml::Table, plugin: &str) -> String {
    let handler = &config["plugins"][plugin]["containerd"]["runtimes"]["microvm"];
    handler["options"]["ConfigPath"]
        .as_str()
        .unwrap()
        .to_string()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn an_install_puts_every_file_in_place_with_its_mode() {
    let built_dir = tempfile::tempdir().unwrap();
    let built = fake_built(built_dir.path(), true);
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let out = install_built(&args("/usr/local", d), &built).unwrap();

    for (path, from, want_mode) in [
        ("usr/local/bin/microvm", &built.microvm, 0o755),
        ("usr/local/bin/microvm-vmm", &built.vmm, 0o755),
        (
            "usr/local/bin/containerd-shim-microvm-v2",
            &built.shim,
            0o755,
        ),
        ("usr/local/lib/microvm/microvm-agent", &built.agent, 0o755),
        (
            "usr/local/lib/microvm/virtiofsd",
            built.virtiofsd.as_ref().unwrap(),
            0o755,
        ),
        ("usr/local/share/microvm/vmlinux", &built.kernel, 0o644),
    ] {
        let p = d.join(path);
        assert_eq!(fs::read(&p).unwrap(), fs::read(from).unwrap(), "{path}");
        assert_eq!(mode(&p), want_mode, "{path}");
    }
    for path in [
        "etc/microvm/shim.toml",
        "etc/microvm/runtimeclass.yaml",
        "etc/containerd/conf.d/microvm.toml",
        "usr/local/share/microvm/install-manifest.sha256",
    ] {
        assert_eq!(mode(&d.join(path)), 0o644, "{path}");
    }

    // The shim config names files that exist on the (staged) target system, the ones the
    // lookup in `sandbox::locate` also tries for this prefix.
    let shim = read_toml(&d.join("etc/microvm/shim.toml"));
    for key in ["kernel", "agent", "vmm", "virtiofsd"] {
        let path = Path::new(shim[key].as_str().unwrap());
        assert!(path.starts_with("/usr/local"), "{key}: {}", path.display());
        assert!(staged(Some(d), path).is_file(), "{key}: {}", path.display());
    }
    assert_eq!(
        shim["kernel"].as_str(),
        Some("/usr/local/share/microvm/vmlinux")
    );
    assert_eq!(
        shim["agent"].as_str(),
        Some("/usr/local/lib/microvm/microvm-agent")
    );

    // The drop-in points containerd at that config, by its target path.
    let dropin = read_toml(&d.join("etc/containerd/conf.d/microvm.toml"));
    assert_eq!(
        config_path(&dropin, "io.containerd.grpc.v1.cri"),
        "/etc/microvm/shim.toml"
    );
    assert!(
        out.contains("imports = [\"/etc/containerd/conf.d/*.toml\"]"),
        "{out}"
    );
    assert!(out.contains("handler: microvm"), "{out}");
    assert!(
        out.starts_with(&format!("installed below {}", d.display())),
        "{out}"
    );

    // Nothing else was written: every staged file is one of these.
    let manifest =
        place::read_manifest(&d.join("usr/local/share/microvm/install-manifest.sha256")).unwrap();
    assert_eq!(manifest.len(), 9, "{manifest:?}");
    let mut all = Vec::new();
    walk(d, &mut all);
    assert_eq!(all.len(), 10, "{all:?}");

    // A second install over the first replaces its own files without --force.
    install_built(&args("/usr/local", d), &built).unwrap();
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn a_custom_prefix_keeps_its_config_inside_and_honours_the_named_dropin() {
    let built_dir = tempfile::tempdir().unwrap();
    let built = fake_built(built_dir.path(), false);
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let mut a = args("/opt/microvm", d);
    a.containerd_config = Some("/etc/containerd/conf.d/50-microvm.toml".into());
    a.containerd_config_version = ContainerdSyntax::V3;
    let out = install_built(&a, &built).unwrap();
    let shim = read_toml(&d.join("opt/microvm/etc/microvm/shim.toml"));
    assert!(!shim.contains_key("virtiofsd"));
    assert_eq!(shim["vmm"].as_str(), Some("/opt/microvm/bin/microvm-vmm"));
    let dropin = read_toml(&d.join("etc/containerd/conf.d/50-microvm.toml"));
    assert_eq!(dropin["version"].as_integer(), Some(3));
    assert_eq!(
        config_path(&dropin, "io.containerd.cri.v1.runtime"),
        "/opt/microvm/etc/microvm/shim.toml"
    );
    assert!(
        out.contains("MICROVM_KERNEL=/opt/microvm/share/microvm/vmlinux"),
        "{out}"
    );
    assert!(out.contains("cargo xtask virtiofsd"), "{out}");

    // --no-containerd-config writes none.
    let dest2 = tempfile::tempdir().unwrap();
    let mut a = args("/opt/microvm", dest2.path());
    a.no_containerd_config = true;
    install_built(&a, &built).unwrap();
    assert!(!dest2.path().join("opt/microvm/etc/containerd").exists());
    assert!(!dest2.path().join("etc").exists());
}

#[test]
fn a_users_own_file_is_not_replaced_without_force() {
    let built_dir = tempfile::tempdir().unwrap();
    let built = fake_built(built_dir.path(), false);
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let theirs = d.join("etc/containerd/conf.d/microvm.toml");
    fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    fs::write(&theirs, "# the operator's\n").unwrap();
    let e = install_built(&args("/usr/local", d), &built).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "# the operator's\n");
    assert!(!d.join("usr/local/bin/microvm").exists());
    let mut a = args("/usr/local", d);
    a.force = true;
    install_built(&a, &built).unwrap();
    assert!(fs::read_to_string(&theirs)
        .unwrap()
        .contains("io.containerd.microvm.v2"));
}

#[test]
fn a_relative_prefix_is_refused() {
    let e = Layout::new(Path::new("usr/local")).err().unwrap();
    assert!(e.to_string().contains("absolute"), "{e}");
}

/// `containerd --config MAIN config dump`, MAIN importing `dropin`; the dump as TOML.
fn containerd_dump(containerd: &Path, version: u32, dropin: &Path) -> toml::Table {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.toml");
    fs::write(
        &main,
        format!(
            "version = {version}\nimports = [\"{}\"]\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n",
            dropin.display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(containerd)
        .arg("--config")
        .arg(&main)
        .args(["config", "dump"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install Debian's containerd (apt-get install containerd) \
                 and build containerd 2.x with `cargo xtask peers`",
                containerd.display()
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {}",
        containerd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&text).unwrap()
}

/// Debian's containerd 1.6 and containerd 2.x (`cargo xtask peers`) both read the drop-in and
/// show the `microvm` handler with its config path; 2.x in both syntaxes (it migrates v2).
#[test]
fn containerd_accepts_the_dropin() {
    let built_dir = tempfile::tempdir().unwrap();
    let built = fake_built(built_dir.path(), true);
    let containerd2 = cache_dir()
        .join("peers")
        .join(crate::peers::CONTAINERD.name.to_string() + "-" + crate::peers::CONTAINERD.version)
        .join("bin/containerd");
    let cases = [
        (
            PathBuf::from("containerd"),
            2,
            ContainerdSyntax::V2,
            "io.containerd.grpc.v1.cri",
        ),
        (
            containerd2.clone(),
            3,
            ContainerdSyntax::V2,
            "io.containerd.cri.v1.runtime",
        ),
        (
            containerd2,
            3,
            ContainerdSyntax::V3,
            "io.containerd.cri.v1.runtime",
        ),
    ];
    for (containerd, main_version, syntax, plugin) in cases {
        let dest = tempfile::tempdir().unwrap();
        let mut a = args("/usr/local", dest.path());
        a.containerd_config_version = syntax;
        install_built(&a, &built).unwrap();
        let dropin = dest.path().join("etc/containerd/conf.d/microvm.toml");
        let dump = containerd_dump(&containerd, main_version, &dropin);
        let handler = &dump["plugins"][plugin]["containerd"]["runtimes"]["microvm"];
        let what = format!("{} reading syntax {syntax:?}", containerd.display());
        assert_eq!(
            handler["runtime_type"].as_str(),
            Some("io.containerd.microvm.v2"),
            "{what}: {handler:?}"
        );
        assert_eq!(
            handler["options"]["ConfigPath"].as_str(),
            Some("/etc/microvm/shim.toml"),
            "{what}: {handler:?}"
        );
        assert_eq!(
            handler["pod_annotations"].as_array().map(Vec::len),
            Some(1),
            "{what}"
        );
    }
}
