//! `cargo xtask demo`: the README's main command. Builds the guest kernel and `microvm`, makes
//! a busybox initramfs, and boots it in a microVM: directly on a host with hardware KVM,
//! inside the testbed on a host whose KVM cannot boot guests. The guest prints a greeting and
//! what it runs on, then resets the VM.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use initramfs::Initramfs;

use crate::kernel::{self, KernelArgs};
use crate::util::{ensure_debs, run, workspace_root};

const DEMO_INIT: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo
echo \"Hello from a microVM: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPUs, \\
$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB\"
echo \"guest kernel command line: $(cat /proc/cmdline)\"
reboot -f
";

pub fn demo() -> Result<()> {
    ensure_debs(&["busybox-static"])?;
    let vmlinux = kernel::build(&KernelArgs::default())?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .args(["build", "-q", "-p", "microvm"])
        .current_dir(&root))?;
    let microvm = root.join("target/debug/microvm");
    let initrd_dir = crate::util::cache_dir().join("demo");
    std::fs::create_dir_all(&initrd_dir)?;
    let mut initramfs = Initramfs::new();
    initramfs.busybox()?;
    initramfs.file("init", DEMO_INIT, 0o755);
    let initrd = initramfs.write_file(&initrd_dir.join("demo.cpio"))?;

    let argv = boot_argv(&microvm, &vmlinux, &initrd);
    let code = if vmm::host::check_can_boot_guests().is_ok() {
        eprintln!("demo: booting a microVM on this host");
        Command::new(&argv[0])
            .args(&argv[1..])
            .status()?
            .code()
            .unwrap_or(1)
    } else {
        eprintln!(
            "demo: this host cannot boot guests; booting the microVM inside the testbed \
             (an emulated nested-KVM host; under a minute)"
        );
        testbed::ensure_prerequisites()?;
        testbed::Testbed::new().run(&argv, &root)?
    };
    if code != 0 {
        bail!("the microVM exited with status {code}");
    }
    eprintln!("demo: the microVM booted, greeted, and reset (exit status 0)");
    Ok(())
}

fn boot_argv(microvm: &Path, kernel: &Path, initrd: &Path) -> Vec<String> {
    vec![
        microvm.display().to_string(),
        "boot".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "256".into(),
    ]
}
