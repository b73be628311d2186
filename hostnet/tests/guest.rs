//! End to end with a real guest: a pod network namespace with a veth into the host (as CNI's
//! bridge plugin would leave it, an address on each side), a tap plumbed into it by hostnet, a
//! VM on that tap (the VMM started inside the namespace, attaching to the tap by name), the
//! agent's `ConfigureNetwork` with the veth's identity, then TCP both ways between the host and
//! a container in the guest, and a teardown that leaves no tap or qdisc.
//!
//! Needs `MICROVM_KERNEL`; the static agent is built here unless `MICROVM_AGENT` names one;
//! the VMM `microvm-vmm` comes from `MICROVM_BIN_DIR` or this test's target directory (`cargo
//! build -p microvm-vmm`). On a host whose KVM cannot boot an unmodified guest, the binary re-runs itself inside
//! the testbed.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use sandbox::vmm_api::NetConfig;
use sandbox::{
    Console, ContainerConfig, Disk, ProcessIo, Rootfs, RootfsSource, Sandbox, SandboxConfig,
};

const RELAY_ENV: &[&str] = &[
    "MICROVM_KERNEL",
    "MICROVM_BIN_DIR",
    "MICROVM_AGENT",
    "RUST_LOG",
    "RUST_BACKTRACE",
];
const POD_NS: &str = "mvm-e2e-pod";
const HOST_VETH: &str = "mvm-e2e-h";
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const MTU: u32 = 1400;

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let have_kernel = std::env::var_os("MICROVM_KERNEL").is_some();
    if !args.list && !testbed::in_testbed() && have_kernel {
        match build_agent() {
            // SAFETY: set before any other thread of this process exists.
            Ok(agent) => unsafe { std::env::set_var("MICROVM_AGENT", agent) },
            Err(e) => {
                eprintln!("guest network tests: {e}");
                return ExitCode::from(101);
            }
        }
        if let Err(why) = vmm::host::check_can_boot_guests() {
            return testbed::relay_current_exe("guest network tests", &why.to_string(), RELAY_ENV);
        }
    }
    let trials = vec![Trial::test(
        "pod_network_host_and_container_reach_each_other_through_the_veth",
        || run(pod_network),
    )];
    libtest_mimic::run(&args, trials).exit_code()
}

fn run(test: fn(&Path) -> Result<(), String>) -> Result<(), Failed> {
    let dir = tempfile::Builder::new()
        .prefix("hostnet-guest-")
        .tempdir()
        .map_err(|e| Failed::from(e.to_string()))?;
    let outcome = test(dir.path());
    if outcome.is_err() {
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
        eprintln!("--- console ---\n{console}--- end of console ---");
    }
    outcome.map_err(Failed::from)
}

/// The pod namespace and its veth pair, deleted on drop (the pair goes with the namespace).
struct PodNetns;

impl PodNetns {
    fn new() -> Result<Self, String> {
        // The testbed's kernel has these as modules, and does not always load them on demand;
        // elsewhere they are loaded or built in already (an error here is harmless).
        for module in ["veth", "tun", "sch_ingress", "cls_u32", "act_mirred"] {
            let _ = Command::new("modprobe").arg(module).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", POD_NS])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", POD_NS])?;
        let ns = PodNetns;
        let mtu = MTU.to_string();
        ip(&[
            "link", "add", HOST_VETH, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
            &mtu, "netns", POD_NS,
        ])?;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", HOST_VETH])?;
        ip(&["link", "set", HOST_VETH, "up"])?;
        ip(&[
            "-n",
            POD_NS,
            "addr",
            "add",
            &format!("{POD_IP}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", POD_NS, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            POD_NS,
            "route",
            "add",
            "default",
            "via",
            &HOST_IP.to_string(),
        ])?;
        Ok(ns)
    }

    fn path() -> PathBuf {
        Path::new("/var/run/netns").join(POD_NS)
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", POD_NS]).status();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn pod_network(dir: &Path) -> Result<(), String> {
    let _ns = PodNetns::new()?;
    let plumbing = hostnet::plumb(&PodNetns::path(), "eth0", hostnet::DEFAULT_TAP)
        .map_err(|e| format!("plumb: {e}"))?;
    let pod = plumbing.interface.clone();
    let mac = pod.mac.map(|b| format!("{b:02x}")).join(":");

    // The VMM runs inside the pod's namespace (the sandbox enters it with setns, as for the
    // shim and `microvm run`; `ip netns exec` would also remount /sys, hiding the jail's cgroup
    // leaf), where it finds the tap by name; the guest device gets the veth's MAC and MTU.
    let vmm = vmm_bin()?;
    let kernel = PathBuf::from(std::env::var_os("MICROVM_KERNEL").ok_or("MICROVM_KERNEL unset")?);
    let agent = PathBuf::from(std::env::var_os("MICROVM_AGENT").ok_or("MICROVM_AGENT unset")?);
    let mut cfg = SandboxConfig::new(&vmm, &kernel, &agent);
    cfg.netns = Some(PodNetns::path());
    cfg.nets.push(NetConfig {
        tap_name: plumbing.tap.clone(),
        mac: pod.mac,
        mtu: u16::try_from(pod.mtu).map_err(|_| format!("MTU {} is too large", pod.mtu))?,
    });
    cfg.disks.push(Disk {
        path: busybox_disk(dir)?,
        read_only: true,
        rate_limit: None,
    });
    cfg.console = Console::File(dir.join("console.log"));
    cfg.state_dir = Some(dir.join("state"));
    cfg.start_timeout = Duration::from_secs(120);

    // The guest connects here first, then serves on 8080.
    let listener = TcpListener::bind((HOST_IP, 9090)).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let guest = rt.block_on(async {
        let sb = Sandbox::start(cfg)
            .await
            .map_err(|e| format!("start: {e}"))?;
        sb.configure_network(&pod.agent_request())
            .await
            .map_err(|e| format!("ConfigureNetwork: {e}"))?;
        let script = format!(
            "B=/bin/busybox; $B ip -o link show eth0; $B ip -o addr show dev eth0; $B ip route; \
             echo hi-host | $B nc {HOST_IP} 9090 || exit 3; \
             exec $B nc -l -p 8080 -e $B echo from-guest"
        );
        sb.create_container(&container(&script))
            .await
            .map_err(|e| format!("create: {e}"))?;
        let (out_r, out_w) = std::io::pipe().map_err(|e| e.to_string())?;
        let output = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(out_r).read_to_string(&mut text);
            text
        });
        let process = sb
            .start_container(
                "net",
                ProcessIo {
                    stdout: Some(out_w.into()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("start: {e}"))?;
        let from_guest = tokio::task::spawn_blocking(move || host_side(listener))
            .await
            .map_err(|e| e.to_string())??;
        let exit = process.wait().await.map_err(|e| format!("wait: {e}"))?;
        let shown = output.join().unwrap_or_default();
        sb.shutdown(Duration::from_secs(30))
            .await
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>((from_guest, exit.code, shown))
    });
    let (from_guest, code, shown) = guest?;
    eprintln!("guest's view:\n{shown}");
    if from_guest != "from-guest\n" || code != 0 {
        return Err(format!("host read {from_guest:?}, container exit {code}"));
    }
    for want in [
        format!("mtu {MTU}"),
        mac.clone(),
        format!("inet {POD_IP}/24"),
        format!("default via {HOST_IP} dev eth0"),
    ] {
        if !shown.contains(&want) {
            return Err(format!("the guest's eth0 lacks {want:?}:\n{shown}"));
        }
    }

    plumbing.unplumb().map_err(|e| format!("unplumb: {e}"))?;
    let tap = hostnet::link_state(&PodNetns::path(), &plumbing.tap).map_err(|e| e.to_string())?;
    let veth = hostnet::link_state(&PodNetns::path(), "eth0")
        .map_err(|e| e.to_string())?
        .ok_or("eth0 is gone")?;
    if tap.is_some() || veth.ingress_qdisc || !veth.ingress_filters.is_empty() {
        return Err(format!("teardown left {tap:?} / {veth:?}"));
    }
    Ok(())
}

/// The host's half: the guest's connection to HOST_IP:9090 arrives with "hi-host", then the
/// host connects to the container's server on POD_IP:8080 (retried until it listens; the
/// test's own runner bounds the whole test) and returns what it sent.
fn host_side(listener: TcpListener) -> Result<String, String> {
    let (conn, peer) = listener.accept().map_err(|e| e.to_string())?;
    if peer.ip() != POD_IP {
        return Err(format!("the guest connected from {peer}"));
    }
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line != "hi-host\n" {
        return Err(format!("the guest sent {line:?}"));
    }
    for _ in 0..600 {
        match TcpStream::connect((POD_IP, 8080)) {
            Ok(mut s) => {
                let mut text = String::new();
                s.read_to_string(&mut text).map_err(|e| e.to_string())?;
                return Ok(text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => return Err(format!("connect to {POD_IP}:8080: {e}")),
        }
    }
    Err("the container's server never listened".into())
}

fn container(script: &str) -> ContainerConfig {
    // No "network" namespace: the container shares the guest's, which ConfigureNetwork set up.
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "sh", "-c", script],
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
    });
    ContainerConfig {
        id: "net".into(),
        spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: Rootfs {
            source: RootfsSource::Block {
                path: "/dev/vda".into(),
                fstype: "ext4".into(),
                options: vec![],
            },
            writable: true,
        },
        mounts: vec![],
    }
}

/// An ext4 image holding only `/bin/busybox` (applets are run through it) and mount points.
fn busybox_disk(dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox not found (apt-get install busybox-static)")?;
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    let image = dir.join("rootfs.ext4");
    std::fs::File::create(&image).map_err(|e| e.to_string())?;
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("16M")
        .status()
        .map_err(|e| format!("mkfs.ext4: {e}"))?
        .success();
    ok.then_some(image).ok_or_else(|| "mkfs.ext4 failed".into())
}

/// `<target>/<profile>` from this executable's path, `<target>/<profile>/deps/guest-<hash>`.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .ok_or_else(|| "cannot locate the target directory".into())
}

fn vmm_bin() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("MICROVM_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => profile_dir()?,
    };
    let bin = dir.join("microvm-vmm");
    bin.is_file()
        .then_some(bin.clone())
        .ok_or_else(|| format!("{} is missing (cargo build -p microvm-vmm)", bin.display()))
}

fn build_agent() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?;
    let target = profile_dir()?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("no target directory")?;
    testbed::static_agent(root, &target)
}
