//! The shim through containerd's CRI plugin, as kubelet drives it: `crictl` (runp, create,
//! start, exec, logs, stats, stop, rmp) against Debian's containerd 1.6.20 and containerd 2.x,
//! each with the runtime handler `microvm` (this shim) and `runc` (the control), CNI's bridge
//! plugin for the pod network (ptp and macvlan in `cni_plugins`) and images pulled from a
//! loopback registry; `critest`'s
//! PodSandbox and Container basics with both handlers; and several microvm pods at once.
//!
//! Needs what `shim/tests/containerd.rs` needs, plus `crictl`, `critest` and containerd 2.x
//! from `cargo xtask peers` (found in `<cache>/peers` or `$MICROVM_PEERS`), Debian's
//! `containernetworking-plugins`, `docker-registry` and `skopeo`. On a host whose KVM cannot
//! boot an unmodified guest the test binary re-runs itself inside the testbed.

mod at_once;
mod cni_plugins;
#[path = "../common/mod.rs"]
mod common;
mod containers;
mod critest;
mod lifecycle;
mod slices;
mod streaming;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

use common::cri::{peers, Cri, Flavor, Network, Peers, Registry};

/// Set (to anything) to add critest's Security Context scenario.
const SECURITY_CONTEXT_VAR: &str = "CRITEST_SECURITY_CONTEXT";

const RELAY_ENV: &[&str] = &[
    SECURITY_CONTEXT_VAR,
    "MICROVM_KERNEL",
    "MICROVM_AGENT",
    "MICROVM_VMM",
    "MICROVM_VIRTIOFSD",
    "MICROVM_PEERS",
    "SHIM_TEST_LOG",
    "CRITEST_FOCUS",
    "RUST_BACKTRACE",
];

/// What every scenario shares: the peers, the registry, and one CRI containerd per flavor and
/// pod network (started on first use, stopped at the end).
struct World {
    peers: Peers,
    registry: Registry,
    cris: [OnceLock<Result<Cri, String>>; 6],
}

static WORLD: OnceLock<Result<World, String>> = OnceLock::new();

fn world() -> Result<&'static World, String> {
    WORLD
        .get_or_init(|| {
            Ok(World {
                peers: peers()?,
                registry: Registry::start()?,
                cris: std::array::from_fn(|_| OnceLock::new()),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn cri(flavor: Flavor, network: Network) -> Result<(&'static World, &'static Cri), String> {
    let w = world()?;
    let slot = &w.cris[flavor as usize * 3 + network as usize];
    let c = slot
        .get_or_init(|| Cri::start(flavor, network, &w.peers, &w.registry))
        .as_ref()
        .map_err(Clone::clone)?;
    Ok((w, c))
}

type Scenario = fn(&World, &Cri) -> Result<(), String>;

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    if !args.list && !testbed::in_testbed() {
        if let Err(e) = find_artifacts() {
            eprintln!("cri tests: {e}");
            return ExitCode::from(101);
        }
        if let Err(why) = vmm::host::check_can_boot_guests() {
            return testbed::relay_current_exe("cri tests", &why.to_string(), RELAY_ENV);
        }
    }
    // Every scenario under 1.6, then under 2.x; each containerd (one per flavor and pod
    // network) is started for its first scenario.
    let scenarios: [(&str, Network, Scenario); 9] = [
        (
            "crictl_runc_pod_lifecycle",
            Network::Bridge,
            lifecycle::runc_control,
        ),
        (
            "crictl_microvm_pod_lifecycle",
            Network::Bridge,
            lifecycle::microvm_pod,
        ),
        (
            "critest_basics_microvm_and_runc",
            Network::Bridge,
            critest::basics,
        ),
        (
            "crictl_runc_containers_attach_oom_restart",
            Network::Bridge,
            containers::runc_control,
        ),
        (
            "crictl_microvm_containers_attach_oom_restart",
            Network::Bridge,
            containers::microvm_pod,
        ),
        (
            "crictl_microvm_pods_at_once",
            Network::Bridge,
            at_once::microvm_pods,
        ),
        (
            "crictl_microvm_pod_in_a_systemd_slice",
            Network::Bridge,
            slices::microvm_pod_in_a_slice,
        ),
        (
            "crictl_microvm_and_runc_pods_on_ptp",
            Network::Ptp,
            cni_plugins::pods_talk,
        ),
        (
            "crictl_microvm_and_runc_pods_on_macvlan",
            Network::Macvlan,
            cni_plugins::pods_talk,
        ),
    ];
    // critest's Security Context specs (both handlers, about 330 s per containerd in L1) run
    // only when asked: with them this binary outgrows the testbed relay's 20 minutes.
    let security_context: &[(&str, Network, Scenario)] =
        if std::env::var_os(SECURITY_CONTEXT_VAR).is_some() {
            &[(
                "critest_security_context_microvm_and_runc",
                Network::Bridge,
                critest::security_context,
            )]
        } else {
            &[]
        };
    let trials = [(Flavor::Debian16, "1_6"), (Flavor::V2, "2")]
        .into_iter()
        .flat_map(|(flavor, version)| {
            scenarios
                .iter()
                .chain(security_context)
                .map(move |&(stem, network, f)| {
                    trial(format!("{stem}_containerd_{version}"), flavor, network, f)
                })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(w)) = WORLD.get() {
        for slot in &w.cris {
            if let Some(Ok(c)) = slot.get() {
                c.stop();
            }
        }
        w.registry.stop();
    }
    conclusion.exit_code()
}

/// MICROVM_KERNEL and MICROVM_AGENT as the containerd test finds them, and MICROVM_PEERS.
fn find_artifacts() -> Result<(), String> {
    common::find_artifacts("cri tests")?;
    if std::env::var_os("MICROVM_PEERS").is_none() {
        // SAFETY: set before any other thread of this process exists.
        unsafe { std::env::set_var("MICROVM_PEERS", testbed::cache_dir().join("peers")) };
    }
    peers().map(drop)
}

fn trial(name: String, flavor: Flavor, network: Network, f: Scenario) -> Trial {
    Trial::test(name.clone(), move || {
        let started = Instant::now();
        let (w, c) = cri(flavor, network).map_err(Failed::from)?;
        let r = f(w, c);
        eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
        if r.is_err() {
            c.dump_logs();
        }
        r.map_err(Failed::from)
    })
}
