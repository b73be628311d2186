//! `cargo xtask demo`: the README's main command. Builds the guest kernel, the static guest
//! agent and `microvm`, builds a busybox OCI image locally (no network), and runs a container
//! from it with `microvm run`: directly on a host with hardware KVM, inside the testbed on a host
//! whose KVM cannot boot guests. The container prints a greeting and what it runs on.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::kernel::{self, KernelArgs};
use crate::util::{ensure_debs, run, workspace_root};

const DEMO_SCRIPT: &str = "echo; \
echo \"Hello from a container in a microVM: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPU(s), \
$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB\"; \
echo \"user $(id -u):$(id -g), hostname $(hostname), cwd $(pwd), GREETING=$GREETING\"; \
echo \"pid 1 in the container: $(cat /proc/1/comm); processes: $(ls -d /proc/[0-9]* | wc -l)\"";

pub fn demo() -> Result<()> {
    ensure_debs(&[
        "busybox-static",
        "e2fsprogs",
        "containernetworking-plugins",
        "iptables",
    ])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let agent = crate::agent::build()?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .args(["build", "-q", "-p", "microvm", "-p", "microvm-vmm"])
        .current_dir(&root))?;
    let microvm = crate::util::target_dir().join("debug/microvm");
    let work = crate::util::cache_dir().join("demo");
    let layout = busybox_oci_layout(&work.join("busybox-oci"), &["GREETING=hello"])?;
    let home = work.join("home");

    let argv: Vec<String> = vec![
        microvm.display().to_string(),
        "run".into(),
        "--rm".into(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "128m".into(),
        layout.display().to_string(),
        "sh".into(),
        "-c".into(),
        DEMO_SCRIPT.into(),
    ];
    let code = if vmm::host::check_can_boot_guests().is_ok() {
        eprintln!("demo: running a busybox container in a microVM on this host");
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("MICROVM_KERNEL", &vmlinux)
            .env("MICROVM_AGENT", &agent)
            .env("MICROVM_HOME", &home)
            .status()?
            .code()
            .unwrap_or(125)
    } else {
        eprintln!(
            "demo: this host cannot boot guests; running `microvm run` inside the testbed \
             (an emulated nested-KVM host; a minute or two)"
        );
        testbed::ensure_prerequisites()?;
        testbed::Testbed::new()
            .env("MICROVM_KERNEL", &vmlinux)
            .env("MICROVM_AGENT", &agent)
            .env("MICROVM_HOME", &home)
            .run(&argv, &root)?
    };
    if code != 0 {
        bail!("`microvm run` exited with status {code}");
    }
    eprintln!("demo: the container ran in its own microVM and exited 0");
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a blob into the layout and returns its digest ("sha256:...").
fn add_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let hex = sha256_hex(data);
    std::fs::write(layout.join("blobs/sha256").join(&hex), data)?;
    Ok(format!("sha256:{hex}"))
}

fn json_strings(v: &[&str]) -> String {
    let items: Vec<String> = v
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", items.join(","))
}

/// A one-layer OCI image layout at `dir` (replaced): Debian's busybox-static with its applets
/// in /bin, /etc/passwd and /etc/group (root and user 1000), Cmd `sh`, Env PATH plus `env`.
/// Built with the system `tar`, no network. Returns `dir`.
pub fn busybox_oci_layout(dir: &Path, env: &[&str]) -> Result<PathBuf> {
    let tree = dir.with_extension("rootfs");
    busybox_rootfs(&tree)?;
    let made = oci_layout_of(&tree, dir, env);
    std::fs::remove_dir_all(&tree)?;
    made
}

/// A one-layer OCI image layout at `dir` (replaced) of the root filesystem tree `tree`, Cmd
/// `sh`, Env PATH=/bin plus `env`. Returns `dir`.
pub fn oci_layout_of(tree: &Path, dir: &Path, env: &[&str]) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let layer_path = dir.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--numeric-owner",
            "--sort=name",
            "--mtime=@1700000000",
            "-C",
        ])
        .arg(tree)
        .arg("-cf")
        .arg(&layer_path)
        .arg("."))?;
    let layer = std::fs::read(&layer_path)?;
    std::fs::remove_file(&layer_path)?;
    let layer_digest = add_blob(dir, &layer)?;
    let mut all_env = vec!["PATH=/bin"];
    all_env.extend_from_slice(env);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":{},"Cmd":["sh"],"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#,
        json_strings(&all_env)
    );
    let config_digest = add_blob(dir, config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_digest = add_blob(dir, manifest.as_bytes())?;
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"latest"}},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            manifest.len()
        ),
    )?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(dir.to_path_buf())
}

/// Debian's busybox-static with its applets in /bin, /etc/passwd and /etc/group (root and user
/// 1000), /tmp 1777: a root filesystem tree at `tree` (replaced).
pub fn busybox_rootfs(tree: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox not found (apt-get install busybox-static)")?;
    let _ = std::fs::remove_dir_all(tree);
    for d in [
        "bin",
        "etc",
        "root",
        "tmp",
        "dev",
        "proc",
        "sys",
        "run",
        "home/user",
    ] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy(busybox, tree.join("bin/busybox"))?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
        }
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )?;
    std::fs::write(tree.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
    run(Command::new("chmod").arg("1777").arg(tree.join("tmp")))?;
    run(Command::new("chown")
        .arg("1000:1000")
        .arg(tree.join("home/user")))?;
    Ok(())
}
