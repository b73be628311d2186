//! containerd's CRI plugin, as kubelet uses it: a private containerd (Debian's 1.6.20, or the
//! 2.x that `cargo xtask peers` builds) with runtime handlers `microvm` (this shim) and `runc`
//! (the control), CNI's bridge, ptp, macvlan, host-local and loopback plugins (Debian's
//! `containernetworking-plugins`), and images pulled from Debian's `docker-registry` on
//! loopback; driven with `crictl` and `critest` (cri-tools, also built by `cargo xtask peers`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    dump_logs, private_dir, remove_private_dir, sh, spawn_containerd, stop_containerd, text,
    write_shim_config,
};
use test_support::image::BusyboxImage;
use test_support::registry::LoopbackRegistry;

/// The images in the registry, as `<repository>:<tag>`.
pub const BUSYBOX: &str = "busybox:test";
pub const PAUSE: &str = "pause:test";

/// What critest's specs exec in [`BUSYBOX`] besides busybox's applets, none of which Debian's
/// busybox-static has: `pgrep` (execSync with timeout: "pgrep sleep || true" must print
/// nothing, on stderr either) and `ipcs` (the IPC namespace specs), from procps and util-linux.
pub const CRITEST_PROGRAMS: &[&str] = &["/usr/bin/pgrep", "/usr/bin/ipcs"];

/// The programs `cargo xtask peers` builds.
pub struct Peers {
    pub crictl: PathBuf,
    pub critest: PathBuf,
    /// The folder holding containerd 2.x's `containerd`, `ctr` and `containerd-shim-runc-v2`.
    pub containerd2: PathBuf,
}

/// `$MICROVM_PEERS` (else `<cache>/peers`): the newest `cri-tools-*` and `containerd-*` there.
pub fn peers() -> Result<Peers, String> {
    let root = std::env::var_os("MICROVM_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| testbed::cache_dir().join("peers"));
    let newest = |prefix: &str, binary: &str| -> Result<PathBuf, String> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path().join("bin"))
            .filter(|bin| bin.join(binary).is_file())
            .collect();
        found.sort();
        found.pop().ok_or_else(|| {
            format!(
                "no {prefix}*/bin/{binary} in {} (run `cargo xtask peers`, or set MICROVM_PEERS)",
                root.display()
            )
        })
    };
    let cri_tools = newest("cri-tools-", "critest")?;
    Ok(Peers {
        crictl: cri_tools.join("crictl"),
        critest: cri_tools.join("critest"),
        containerd2: newest("containerd-", "containerd")?,
    })
}

/// Which containerd serves CRI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Debian 12's containerd 1.6.20 (`containerd` on PATH), config version 2.
    Debian16 = 0,
    /// containerd 2.x from `cargo xtask peers`, config version 3.
    V2 = 1,
}

/// The pod network's CNI plugin, each with host-local IPAM on a /24 of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// `bridge`: a veth per pod into a host bridge that holds the gateway (`.1`).
    Bridge = 0,
    /// `ptp`: a veth per pod, routed by the host; the host's end holds the gateway (`.1`) and
    /// the pod reaches even its own subnet through it.
    Ptp = 1,
    /// `macvlan` (bridge mode) of a dummy host link; the host reaches the pods through a
    /// macvlan of its own on that link, which holds the gateway (`.254`).
    Macvlan = 2,
}

/// The host links the macvlan network needs beside what its plugin makes.
struct HostLinks {
    /// The macvlan plugin's `master`.
    master: String,
    /// The host's own macvlan of `master`, holding the gateway address.
    host: String,
}

impl HostLinks {
    fn of(flavor: Flavor) -> HostLinks {
        HostLinks {
            master: format!("mvcrim{}", flavor as u8),
            host: format!("mvcrih{}", flavor as u8),
        }
    }
}

impl Flavor {
    /// The CNI bridge on the host.
    pub fn bridge(self) -> String {
        format!("mvcri{}", self as u8)
    }
}

/// The network's first three octets, `10.<99 - network>.<flavor>` (each containerd and
/// network its own, so all can run at once).
fn net_prefix(flavor: Flavor, network: Network) -> String {
    format!("10.{}.{}", 99 - network as u8, flavor as u8)
}

/// Debian's `docker-registry` on a loopback port, holding [`BUSYBOX`] and [`PAUSE`].
pub struct Registry {
    pub dir: PathBuf,
    pub port: u16,
    server: Mutex<Option<LoopbackRegistry>>,
}

impl Registry {
    pub fn start() -> Result<Registry, String> {
        let dir = private_dir("reg")?;
        let server = LoopbackRegistry::start(&dir, Duration::from_secs(60))?;
        let registry = Registry {
            dir,
            port: server.port,
            server: Mutex::new(Some(server)),
        };
        // The pause image: as the CRI sandbox's only process it must outlive everything. Its
        // process is named `busybox`, not `sleep`: a container shares the sandbox's PID
        // namespace (CRI's default), where critest's "pgrep sleep" must find nothing.
        for (name, cmd, host_programs) in [
            (BUSYBOX, &["sh"][..], CRITEST_PROGRAMS),
            (PAUSE, &["busybox", "sleep", "2147483647"][..], &[][..]),
        ] {
            let image = BusyboxImage {
                cmd: cmd.iter().map(|a| a.to_string()).collect(),
                host_programs: host_programs.iter().map(PathBuf::from).collect(),
                containerd_name: Some(name.into()),
                ref_name: "test".into(),
                ..Default::default()
            }
            .write(&registry.dir.join(name.replace(':', "-")))
            .map_err(|e| format!("build the image {name}: {e}"))?;
            let push = Command::new("skopeo")
                .args(["copy", "-q", "--dest-tls-verify=false"])
                .arg(format!("oci-archive:{}", image.archive.display()))
                .arg(format!("docker://{}", registry.image(name)))
                .output()
                .map_err(|e| format!("skopeo (apt-get install skopeo): {e}"))?;
            if !push.status.success() {
                return Err(format!("skopeo copy {name}: {}", text(&push)));
            }
        }
        Ok(registry)
    }

    /// `127.0.0.1:<port>/<name>`.
    pub fn image(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }

    pub fn stop(&self) {
        drop(self.server.lock().unwrap().take());
        remove_private_dir(&self.dir);
    }
}

/// A private containerd with its CRI plugin enabled.
pub struct Cri {
    pub flavor: Flavor,
    pub network: Network,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub crictl: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Cri {
    pub fn start(
        flavor: Flavor,
        network: Network,
        peers: &Peers,
        registry: &Registry,
    ) -> Result<Cri, String> {
        // The testbed's kernel has these as modules and does not always load them on demand.
        let _ = sh(
            "for m in bridge veth tun br_netfilter sch_ingress cls_u32 act_mirred dummy macvlan; \
                    do modprobe $m; done",
        );
        let dir = private_dir("cri")?;
        let shim_toml = write_shim_config(&dir)?;
        if network == Network::Macvlan {
            let address = format!("{}.254/24", net_prefix(flavor, network));
            make_host_links(&HostLinks::of(flavor), &address)?;
        }
        write_cni_config(&dir, flavor, network)?;
        write_hosts_toml(&dir, registry)?;
        let sandbox_image = registry.image(PAUSE);
        let config = match flavor {
            Flavor::Debian16 => config_v2(&dir, &shim_toml, &sandbox_image),
            Flavor::V2 => config_v3(&dir, &shim_toml, &sandbox_image),
        };
        std::fs::write(dir.join("config.toml"), config).map_err(|e| e.to_string())?;
        let (binary, path_first) = match flavor {
            Flavor::Debian16 => (PathBuf::from("containerd"), None),
            Flavor::V2 => (
                peers.containerd2.join("containerd"),
                Some(peers.containerd2.as_path()),
            ),
        };
        let child = spawn_containerd(&binary, &dir, path_first)?;
        let cri = Cri {
            flavor,
            network,
            sock: dir.join("c.sock"),
            dir,
            crictl: peers.crictl.clone(),
            child: Mutex::new(Some(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = cri.crictl(&["info"]);
            if out.status.success() {
                break;
            }
            if Instant::now() > deadline {
                cri.dump_logs();
                return Err(format!(
                    "{flavor:?}'s CRI did not answer within 120 s: {}",
                    text(&out)
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(cri)
    }

    /// The endpoint critest and crictl take.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// `crictl` against this containerd (RPC timeout 5 minutes: a pod VM boots under TCG).
    pub fn crictl(&self, args: &[&str]) -> Output {
        let mut c = Command::new("timeout");
        c.arg("600").arg(&self.crictl);
        self.crictl_args(&mut c, args).output().expect("run crictl")
    }

    /// `crictl ARGS` against this containerd, to spawn (a command that runs until killed).
    pub fn crictl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.crictl);
        self.crictl_args(&mut c, args);
        c
    }

    fn crictl_args<'c>(&self, c: &'c mut Command, args: &[&str]) -> &'c mut Command {
        c.args(["--timeout", "300s", "--config", "/dev/null"])
            .args(["--runtime-endpoint", &self.endpoint()])
            .args(["--image-endpoint", &self.endpoint()])
            .args(args)
            .stdin(Stdio::null())
    }

    /// `crictl ARGS`, its trimmed stdout, or an error with everything it printed.
    pub fn crictl_ok(&self, args: &[&str]) -> Result<String, String> {
        let out = self.crictl(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "crictl {} ({:?}): {}",
                args.join(" "),
                self.flavor,
                text(&out)
            ))
        }
    }

    /// `crictl ARGS` (with `-o json` among them), parsed.
    pub fn crictl_json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.crictl_ok(args)?).map_err(|e| e.to_string())
    }

    /// `crictl create` of the container config in the pod, then `crictl start`: the container's id.
    pub fn create_and_start(
        &self,
        pod: &str,
        ctr_config: &std::path::Path,
        pod_config: &std::path::Path,
    ) -> Result<String, String> {
        let ctr = self.crictl_ok(&[
            "create",
            pod,
            &ctr_config.display().to_string(),
            &pod_config.display().to_string(),
        ])?;
        self.crictl_ok(&["start", &ctr])?;
        Ok(ctr)
    }

    /// `crictl inspect` (`what`: "inspect" for a container, "inspectp" for a pod) through a
    /// go template: one field of the object's status.
    pub fn inspect_field(&self, what: &str, id: &str, template: &str) -> Result<String, String> {
        self.crictl_ok(&[what, "-o", "go-template", "--template", template, id])
    }

    /// The CNI network's subnet; pods' addresses begin with [`Cri::pod_prefix`].
    pub fn subnet(&self) -> String {
        format!("{}.0/24", net_prefix(self.flavor, self.network))
    }

    pub fn pod_prefix(&self) -> String {
        format!("{}.", net_prefix(self.flavor, self.network))
    }

    /// The host's address on the CNI network, the pods' default gateway.
    pub fn gateway(&self) -> String {
        let last = if self.network == Network::Macvlan {
            254
        } else {
            1
        };
        format!("{}.{last}", net_prefix(self.flavor, self.network))
    }

    /// host-local's leases: one file per address handed out, named by the address.
    pub fn leases(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("ipam").join(CNI_NETWORK))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.pod_prefix()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A pod's folder, `<dir>/pods/<name>`, and its sandbox config as kubelet sends it (name,
    /// namespace, uid, hostname, the log directory `<folder>/logs`, `linux`) written to
    /// `pod.json` there: (folder, config file).
    pub fn pod_config(
        &self,
        name: &str,
        linux: serde_json::Value,
    ) -> Result<(PathBuf, PathBuf), String> {
        let dir = self.dir.join("pods").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let config = serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "attempt": 0},
            "hostname": name,
            "log_directory": dir.join("logs"),
            "linux": linux,
        });
        let file = write_json(&dir.join("pod.json"), &config)?;
        Ok((dir, file))
    }

    /// The pod's address on the CNI network.
    pub fn pod_ip(&self, pod: &str) -> Result<String, String> {
        self.inspect_field("inspectp", pod, "{{.status.network.ip}}")
    }

    pub fn dump_logs(&self) {
        dump_logs(&self.dir, 300);
    }

    pub fn stop(&self) {
        // CRI's leftovers, if a scenario failed half way: every pod, then the daemon.
        if let Ok(pods) = self.crictl_ok(&["pods", "-q"]) {
            for pod in pods.lines() {
                let _ = self.crictl(&["stopp", pod]);
                let _ = self.crictl(&["rmp", "-f", pod]);
            }
        }
        stop_containerd(&self.child, &self.dir);
        // The host's macvlan goes with its master; ptp leaves no host link of its own.
        let link = match self.network {
            Network::Bridge => self.flavor.bridge(),
            Network::Ptp => return,
            Network::Macvlan => HostLinks::of(self.flavor).master,
        };
        let _ = sh(&format!("ip link del {link} 2>/dev/null"));
    }
}

/// The macvlan plugin's master (a dummy link: the pods' frames go nowhere else) and the host's
/// own macvlan of it with the gateway address, so the host reaches the pods (a macvlan's master
/// does not hear its macvlans).
fn make_host_links(links: &HostLinks, address: &str) -> Result<(), String> {
    let HostLinks { master, host } = links;
    let _ = sh(&format!("ip link del {master} 2>/dev/null"));
    let cmd = format!(
        "ip link add {master} type dummy && ip link set {master} up && \
         ip link add {host} link {master} type macvlan mode bridge && \
         ip addr add {address} dev {host} && ip link set {host} up"
    );
    let out = sh(&cmd);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd}: {}", text(&out)))
    }
}

/// The CNI network's name, and host-local's folder of leases under its `dataDir`.
const CNI_NETWORK: &str = "microvm-cri-test";

/// The network's conflist: its plugin with host-local IPAM and a default route through the
/// host (CRI runs the loopback plugin itself).
fn write_cni_config(dir: &Path, flavor: Flavor, network: Network) -> Result<(), String> {
    let conf = dir.join("cni");
    std::fs::create_dir_all(&conf).map_err(|e| e.to_string())?;
    let prefix = net_prefix(flavor, network);
    let mut range = serde_json::json!({"subnet": format!("{prefix}.0/24")});
    if network == Network::Macvlan {
        range["gateway"] = format!("{prefix}.254").into();
    }
    let ipam = serde_json::json!({
        "type": "host-local",
        "ranges": [[range]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": dir.join("ipam"),
    });
    let plugin = match network {
        Network::Bridge => serde_json::json!({
            "type": "bridge",
            "bridge": flavor.bridge(),
            "isGateway": true,
            "ipMasq": false,
            "ipam": ipam,
        }),
        Network::Ptp => serde_json::json!({"type": "ptp", "ipMasq": false, "ipam": ipam}),
        Network::Macvlan => serde_json::json!({
            "type": "macvlan",
            "master": HostLinks::of(flavor).master,
            "mode": "bridge",
            "ipam": ipam,
        }),
    };
    let list = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [plugin],
    });
    std::fs::write(conf.join("10-microvm-test.conflist"), list.to_string())
        .map_err(|e| e.to_string())
}

/// containerd's registry host config: the loopback registry speaks plain HTTP.
fn write_hosts_toml(dir: &Path, registry: &Registry) -> Result<(), String> {
    let host = format!("127.0.0.1:{}", registry.port);
    let d = dir.join("certs.d").join(&host);
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .map_err(|e| e.to_string())
}

/// The daemon's own places, the same in both config versions.
fn daemon_section(version: u32, dir: &Path) -> String {
    format!(
        "version = {version}\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
         [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
         [debug]\n  level = \"debug\"\n",
        d = dir.display()
    )
}

/// The two handlers' tables under `runtimes` (`prefix` is that table's path).
fn runtimes(prefix: &str, shim_toml: &Path) -> String {
    format!(
        "[{prefix}.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         [{prefix}.microvm]\n  runtime_type = \"io.containerd.microvm.v2\"\n  \
         pod_annotations = [\"io.kubernetes.cri.*\"]\n\
         [{prefix}.microvm.options]\n  ConfigPath = \"{}\"\n",
        shim_toml.display()
    )
}

/// containerd 1.6/1.7: `version = 2`, everything CRI under `io.containerd.grpc.v1.cri`.
fn config_v2(dir: &Path, shim_toml: &Path, sandbox_image: &str) -> String {
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    format!(
        "{}[{cri}]\n  sandbox_image = \"{sandbox_image}\"\n  disable_apparmor = true\n  \
         enable_selinux = false\n\
         [{cri}.containerd]\n  snapshotter = \"overlayfs\"\n  default_runtime_name = \"runc\"\n\
         {}[{cri}.cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{d}/cni\"\n\
         [{cri}.registry]\n  config_path = \"{d}/certs.d\"\n",
        daemon_section(2, dir),
        runtimes(&format!("{cri}.containerd.runtimes"), shim_toml),
        d = dir.display()
    )
}

/// containerd 2.x: `version = 3`, CRI split into the `images` and `runtime` plugins.
fn config_v3(dir: &Path, shim_toml: &Path, sandbox_image: &str) -> String {
    let images = "plugins.\"io.containerd.cri.v1.images\"";
    let runtime = "plugins.\"io.containerd.cri.v1.runtime\"";
    format!(
        "{}[{images}]\n  snapshotter = \"overlayfs\"\n\
         [{images}.pinned_images]\n  sandbox = \"{sandbox_image}\"\n\
         [{images}.registry]\n  config_path = \"{d}/certs.d\"\n\
         [{runtime}]\n  enable_selinux = false\n\
         [{runtime}.containerd]\n  default_runtime_name = \"runc\"\n\
         {}[{runtime}.cni]\n  bin_dirs = [\"/usr/lib/cni\"]\n  conf_dir = \"{d}/cni\"\n",
        daemon_section(3, dir),
        runtimes(&format!("{runtime}.containerd.runtimes"), shim_toml),
        d = dir.display()
    )
}

/// The number at `pointer` in crictl's JSON (protobuf's uint64 figures come as strings, under
/// `value`); 0 when missing.
pub fn figure(json: &serde_json::Value, pointer: &str) -> u64 {
    json.pointer(pointer)
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `value` as JSON in `path`; the path.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<PathBuf, String> {
    std::fs::write(path, value.to_string()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}
