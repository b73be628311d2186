//! End-to-end tests of `microvm run`'s network: the real binary, real guests, the real CNI
//! plugins (Debian's containernetworking-plugins in /usr/lib/cni) on microvm's own network
//! (`microvm0`, 10.89.0.0/16). Relays itself into the testbed like `run.rs`.
//!
//! Needs root, iptables and the CNI plugins; busybox's `httpd`, `nc`, `wget` and `ip` in the
//! test image serve and probe.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

mod common;

use common::*;

/// host-local's leases for microvm's network.
const LEASES: &str = "/var/lib/cni/networks/microvm";
const BRIDGE_IP: &str = "10.89.0.1";

fn main() -> ExitCode {
    let args = match common::prepare() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let trials = vec![
        trial("network_bad_publish_starts_nothing", bad_publish),
        trial("network_none_has_only_lo", network_none),
        trial(
            "network_bridge_publish_two_runs_and_nothing_left",
            bridge_publish_two_runs,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a run may leave on the host: its namespace, links on the bridge, rules naming its
/// address or id, its lease.
fn traces(ids: &[String], ips: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for ns in sh("ip netns list").lines() {
        if ns.starts_with("microvm-") {
            found.push(format!("netns {ns}"));
        }
    }
    for l in sh("ip -o link show master microvm0 2>/dev/null").lines() {
        found.push(format!("link on the bridge: {l}"));
    }
    for l in sh("ip -o link").lines() {
        if l.contains("tap0_mvm") {
            found.push(format!("tap: {l}"));
        }
    }
    for l in sh("iptables-save").lines() {
        let names_run = ids.iter().any(|id| l.contains(id.as_str()))
            || ips
                .iter()
                .any(|ip| l.contains(&format!("{ip}/")) || l.contains(&format!("{ip}:")));
        if names_run {
            found.push(format!("rule: {l}"));
        }
    }
    for e in std::fs::read_dir(LEASES).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<Ipv4Addr>().is_ok() {
            found.push(format!("lease {name}"));
        }
    }
    found
}

/// The run's id (its directory's name) from its name.
fn run_id(env: &Env, name: &str) -> String {
    for dir in std::fs::read_dir(env.home.join("runs")).unwrap().flatten() {
        let rec = std::fs::read_to_string(dir.path().join("run.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&rec).unwrap_or_default();
        if v["name"] == name {
            return v["id"].as_str().unwrap().to_string();
        }
    }
    panic!("no run {name}");
}

/// The IPv4 address of the run's `eth0`, through `exec`.
fn address(env: &Env, name: &str) -> String {
    let o = env.microvm(
        &["exec", name, "ip", "-4", "-o", "addr", "show", "eth0"],
        None,
    );
    assert_eq!(o.code, 0, "{o:?}");
    let word = o
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet address: {o:?}"));
    word.split('/').next().unwrap().to_string()
}

/// An HTTP GET of `/` at `addr`, retried until it answers (httpd starts after the run does).
fn http_get(addr: SocketAddr) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match got {
            Ok(body) if body.contains("200") => return body,
            other if Instant::now() > deadline => panic!("GET {addr}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// `exec RUN CMD` until it succeeds (a server in another run may still be starting).
fn exec_until_ok(env: &Env, name: &str, cmd: &str) -> Out {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let o = env.microvm(&["exec", name, "sh", "-c", cmd], None);
        if o.code == 0 {
            return o;
        }
        assert!(Instant::now() < deadline, "{cmd}: {o:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_exited(env: &Env, name: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ps = env.microvm(&["ps", "-a"], None);
        if ps
            .stdout
            .lines()
            .any(|l| l.contains(name) && l.contains("exited"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never exited: {ps:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

/// A bad `-p` (port 0, 70000, garbage), `--network host`, and `-p` with `--network none`:
/// status 125, the reason on stderr, no run, no VMM, no namespace.
fn bad_publish(env: &Env) {
    let img = env.img.layout_str();
    for (args, why) in [
        (vec!["-p", "0:80"], "out of range"),
        (vec!["-p", "70000:80"], "out of range"),
        (vec!["-p", "8080:0"], "out of range"),
        (vec!["-p", "garbage"], "give the host port"),
        (vec!["-p", "x:80"], "not a port number"),
        (vec!["-p", "8080:80/sctp"], "not tcp or udp"),
        (vec!["--network", "host"], "cannot share the host's"),
        (vec!["--network", "none", "-p", "8080:80"], "--network none"),
        (vec!["-p", "8080:80", "-p", "8080:81"], "published twice"),
        (vec!["--add-host", "nocolon"], "want NAME:IP"),
        (vec!["--add-host", "db:10.0.0.300"], "not an IP address"),
        (vec!["--add-host", "a b:10.0.0.1"], "not a host name"),
        (vec!["--hostname", "bad\nname"], "not a host name"),
    ] {
        let mut a = vec!["run", "--rm"];
        a.extend(&args);
        a.extend([img, "true"]);
        let o = env.microvm(&a, None);
        assert_eq!(o.code, 125, "{args:?}: {o:?}");
        assert!(o.stderr.contains(why), "{args:?}: {o:?}");
        assert!(!o.stdout.contains("true"), "{o:?}");
    }
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!(ps.stdout, "", "a refused run left state: {ps:?}");
    assert!(vmm_processes(&env.home).is_empty());
    assert_eq!(traces(&[], &[]), Vec::<String>::new());
}

/// docker's /etc/hosts without an address of the container's own, with `--add-host`.
const HOSTS_HEAD: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
     fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
     ff02::2\tip6-allrouters\n192.0.2.10\tdb.test\n";

/// `--network none`: the container has only `lo` (up), and the VM no network device; its
/// /etc/hosts (bound over the image's) has loopback and `--add-host`, /etc/hostname
/// `--hostname`.
fn network_none(env: &Env) {
    let img = env.img.layout_str();
    let o = env.microvm(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--hostname",
            "quiet",
            "--add-host",
            "db.test:192.0.2.10",
            img,
            "sh",
            "-c",
            "ls /sys/class/net; ip -o link | wc -l; cat /etc/hosts /etc/hostname",
        ],
        None,
    );
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, format!("lo\n1\n{HOSTS_HEAD}quiet\n").as_str()),
        "{o:?}"
    );
    assert_eq!(traces(&[], &[]), Vec::<String>::new());
}

/// Two detached runs on the bridge: the host reaches one's httpd through `-p 18080:80` (on
/// loopback and on the bridge address) and through its own address; each gets its own address
/// and they reach each other; a run reaches a host listener on the bridge address; `--dns`
/// lands in `/etc/resolv.conf`, `/etc/hosts` maps the hostname to the run's address (with
/// `--add-host`'s line) and `/etc/hostname` is the default hostname, the run id; `ps` shows
/// the published port while web runs. Then one run is killed (`microvm kill`), the other's monitor is
/// SIGKILLed and the run removed with `microvm rm`: no namespace, tap, veth, iptables rule or
/// lease is left.
fn bridge_publish_two_runs(env: &Env) {
    let img = env.img.layout_str();
    let serve = |word: &str| {
        format!("mkdir -p /www && echo {word} > /www/index.html && exec httpd -f -p 80 -h /www")
    };
    let web = env.microvm(
        &[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            "18080:80",
            "--dns",
            "192.0.2.53",
            "--hostname",
            "web-host",
            "--add-host",
            "db.test:192.0.2.10",
            img,
            "sh",
            "-c",
            &serve("hello-from-web"),
        ],
        None,
    );
    assert_eq!((web.code, web.stdout.as_str()), (0, "web\n"), "{web:?}");
    let other = env.microvm(
        &[
            "run",
            "-d",
            "--name",
            "other",
            img,
            "sh",
            "-c",
            &serve("hello-from-other"),
        ],
        None,
    );
    assert_eq!(other.code, 0, "{other:?}");
    let (ip1, ip2) = (address(env, "web"), address(env, "other"));
    assert!(
        ip1.starts_with("10.89.") && ip2.starts_with("10.89."),
        "{ip1} {ip2}"
    );
    assert_ne!(ip1, ip2, "two runs got the same address");
    let ids = vec![run_id(env, "web"), run_id(env, "other")];
    let ips = vec![ip1.clone(), ip2.clone()];
    // Both are on the host while they run (so the checks after their end could fail).
    let live = traces(&ids, &ips);
    for want in ["netns microvm-", "lease", "link on the bridge", "DNAT"] {
        assert!(live.iter().any(|t| t.contains(want)), "{want}: {live:?}");
    }

    // The host reaches web: the published port, on loopback and the bridge's address, and its
    // own address.
    for addr in [
        "127.0.0.1:18080".to_string(),
        format!("{BRIDGE_IP}:18080"),
        format!("{ip1}:80"),
    ] {
        let body = http_get(addr.parse().unwrap());
        assert!(body.contains("hello-from-web"), "{addr}: {body}");
    }
    // The runs reach each other.
    let o = exec_until_ok(env, "web", &format!("wget -q -O - http://{ip2}/"));
    assert_eq!(o.stdout, "hello-from-other\n", "{o:?}");
    let o = exec_until_ok(env, "other", &format!("wget -q -O - http://{ip1}/"));
    assert_eq!(o.stdout, "hello-from-web\n", "{o:?}");
    // A run reaches the host on the bridge's address.
    let listener = TcpListener::bind("0.0.0.0:19099").unwrap();
    let accepted = std::thread::spawn(move || {
        let (mut s, from) = listener.accept().unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        (from.ip().to_string(), got)
    });
    let o = env.microvm(
        &[
            "exec",
            "web",
            "sh",
            "-c",
            &format!("echo reach-host | nc {BRIDGE_IP} 19099"),
        ],
        None,
    );
    assert_eq!(o.code, 0, "{o:?}");
    let (from, got) = accepted.join().unwrap();
    assert_eq!(
        (from.as_str(), got.as_str()),
        (ip1.as_str(), "reach-host\n")
    );
    // The guest's configuration: default route via the bridge, --dns.
    let o = env.microvm(
        &["exec", "web", "sh", "-c", "ip route; cat /etc/resolv.conf"],
        None,
    );
    assert!(
        o.stdout.contains(&format!("default via {BRIDGE_IP}")),
        "{o:?}"
    );
    assert!(o.stdout.contains("nameserver 192.0.2.53"), "{o:?}");
    // /etc/hosts and /etc/hostname, bound over the image's (one mount each).
    let o = env.microvm(
        &[
            "exec",
            "web",
            "sh",
            "-c",
            "cat /etc/hosts /etc/hostname; grep -c -e ' /etc/hosts ' -e ' /etc/hostname ' /proc/mounts",
        ],
        None,
    );
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (
            0,
            format!("{HOSTS_HEAD}{ip1}\tweb-host\nweb-host\n2\n").as_str()
        ),
        "{o:?}"
    );
    let o = env.microvm(&["exec", "other", "cat", "/etc/hostname"], None);
    assert_eq!(o.stdout, format!("{}\n", ids[1]), "{o:?}");
    // ps: web's published port; other has none.
    let ps = env.microvm(&["ps"], None);
    let line = |name: &str| {
        ps.stdout
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name}: {ps:?}"))
            .to_string()
    };
    assert!(
        ps.stdout.lines().next().unwrap().ends_with("PORTS"),
        "{ps:?}"
    );
    assert!(
        line("web ").trim_end().ends_with("0.0.0.0:18080->80/tcp"),
        "{ps:?}"
    );
    assert!(!line("other").contains("->"), "{ps:?}");

    // web ends by `microvm kill` (its monitor cleans up); other's monitor is SIGKILLed and
    // `microvm rm` cleans up after it.
    let k = env.microvm(&["kill", "web"], None);
    assert_eq!(k.code, 0, "{k:?}");
    wait_exited(env, "web");
    let ps = env.microvm(&["ps", "-a"], None);
    assert!(
        ps.stdout
            .lines()
            .any(|l| l.contains("web ") && l.contains("exited") && !l.contains("->")),
        "an ended run still shows its ports: {ps:?}"
    );
    let other_dir = env.home.join("runs").join(&ids[1]);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(other_dir.join("run.json")).unwrap()).unwrap();
    let monitor = rec["owner_pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) of the run's monitor, a process this test started through microvm.
    assert_eq!(unsafe { libc::kill(monitor, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + TIMEOUT;
    while Path::new(&format!("/proc/{monitor}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Only other's network is still there.
    let before_rm = traces(&ids, &ips);
    assert!(
        before_rm
            .iter()
            .all(|t| !t.contains(&ip1) && !t.contains(&ids[0])),
        "web left: {before_rm:?}"
    );
    assert!(
        before_rm.iter().any(|t| t.contains(&ids[1])),
        "{before_rm:?}"
    );
    let rm = env.microvm(&["rm", "web", "other"], None);
    assert_eq!(rm.code, 0, "{rm:?}");
    let deadline = Instant::now() + TIMEOUT;
    while !vmm_processes(&env.home).is_empty() {
        assert!(
            Instant::now() < deadline,
            "VMMs left: {:?}",
            vmm_processes(&env.home)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = traces(&ids, &ips);
    assert!(left.is_empty(), "left behind: {left:?}");
}
