//! A microvm pod whose cgroup parent is a systemd slice, as kubelet's systemd cgroup driver
//! names it (`<top>-pod<uid>.slice`): containerd hands the shim `<slice>:cri-containerd:<id>`,
//! and the VM's jail leaf is made in the slice's folder (`<top>.slice/<top>-pod<uid>.slice`),
//! which is what kubelet's cAdvisor reads for the pod: the slice's memory then holds the guest's
//! RAM and the slice holds the VMM. After rmp no cgroup is left in it. (containerd's own
//! PodSandboxStats loads the parent as a cgroupfs path, so it cannot read a slice, for runc's
//! pods as much as for microvm's; no systemd is needed for any of this.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::common::check;
use crate::common::cri::{Cri, BUSYBOX};
use crate::World;

/// The slices' top level, as kubelet's `kubepods`.
const TOP: &str = "microvmcri";

pub fn microvm_pod_in_a_slice(w: &World, c: &Cri) -> Result<(), String> {
    let pod_part = format!("pod{}", c.flavor as u8);
    let slice = format!("{TOP}-{pod_part}.slice");
    let folder = Path::new("/sys/fs/cgroup")
        .join(format!("{TOP}.slice"))
        .join(&slice);
    let name = format!("slice-{:?}", c.flavor).to_lowercase();
    let (dir, pod_json) = c.pod_config(&name, serde_json::json!({"cgroup_parent": slice}))?;
    let ctr_json = crate::common::cri::write_json(
        &dir.join("ctr.json"),
        &serde_json::json!({
            "metadata": {"name": "app"},
            "image": {"image": w.registry.image(BUSYBOX)},
            "command": ["sleep", "600"],
            "log_path": "app.log",
            "linux": {},
        }),
    )?;
    c.crictl_ok(&["pull", &w.registry.image(BUSYBOX)])?;
    let pod = c.crictl_ok(&[
        "runp",
        "--runtime",
        "microvm",
        &pod_json.display().to_string(),
    ])?;
    let result = (|| {
        c.create_and_start(&pod, &ctr_json, &pod_json)?;
        // The jailed VMM (the jail's supervisor stays with the shim), and KVM's worker threads
        // for the VM, which the kernel puts in its owner's cgroup (no command line).
        let inside: Vec<(u32, String)> = procs_beneath(&folder)
            .into_iter()
            .map(|p| (p, program(p)))
            .collect();
        let vmm = |prog: &str| prog.ends_with("microvm-vmm");
        check(
            inside.iter().any(|(_, prog)| vmm(prog))
                && inside.iter().all(|(_, prog)| vmm(prog) || prog.is_empty()),
            || format!("{} holds {inside:?}, not the pod's VMM", folder.display()),
        )?;
        let memory: u64 = std::fs::read_to_string(folder.join("memory.current"))
            .map_err(|e| format!("{}: {e}", folder.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("memory.current: {e}"))?;
        eprintln!(
            "microvm pod in {slice}: the slice's memory.current {:.1} MiB",
            memory as f64 / f64::from(1 << 20)
        );
        check(memory >= 16 << 20, || {
            format!("the slice's memory.current is {memory}, under the guest's 16 MiB")
        })
    })();
    let stopped = c.crictl_ok(&["stopp", &pod]);
    let removed = c.crictl_ok(&["rmp", &pod]);
    let left = subfolders(&folder);
    let _ = std::fs::remove_dir(&folder);
    let _ = std::fs::remove_dir(folder.parent().unwrap_or(&folder));
    result?;
    stopped?;
    removed?;
    check(left.is_empty(), || {
        format!("cgroups left in {} after rmp: {left:?}", folder.display())
    })
}

fn subfolders(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// The program a process runs (its `argv[0]`).
fn program(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(first).into_owned()
}

/// Every pid in `dir`'s cgroup and the cgroups beneath it.
fn procs_beneath(dir: &Path) -> BTreeSet<u32> {
    let mut pids: BTreeSet<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subfolders(dir) {
        pids.extend(procs_beneath(&sub));
    }
    pids
}
