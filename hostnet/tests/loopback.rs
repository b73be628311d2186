//! The loopback redirect for port forwarding, in a real network namespace (needs root and
//! `iptables`): a connection to any port of `127.0.0.1` made inside the namespace reaches the
//! redirect's listener, which reads the port it was made to; the caller's own namespace is not
//! touched, and the rule goes with the namespace.

use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::Command;

use hostnet::{loopback, netns};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

#[test]
fn connections_to_the_namespaces_loopback_reach_the_listener_with_their_port() {
    let name = format!("hn-lo-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let path = PathBuf::from("/run/netns").join(&name);
    let result = std::panic::catch_unwind(|| {
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let listener = loopback::redirect(&path).expect("redirect");
        let own = listener.local_addr().unwrap().port();
        for port in [8080u16, 9, 65535] {
            netns::run_in(&path, move || {
                TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                    .map(drop)
                    .map_err(|e| hostnet::Error::Thread(format!("connect to {port}: {e}")))
            })
            .expect("a connection inside the namespace");
            let (conn, _) = listener.accept().unwrap();
            assert_eq!(loopback::original_port(&conn).unwrap(), port);
        }
        // This process's own namespace has no such rule: the listener's port, bound in the
        // other namespace, is not reachable here.
        // (Should something of this host listen on that port by chance, it is not ours.)
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, own));
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_err(),
            "the listener was reached from outside its namespace"
        );
        let rules = Command::new("ip")
            .args([
                "netns", "exec", &name, "iptables", "-t", "nat", "-S", "OUTPUT",
            ])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains(&format!("--to-ports {own}")),
            "the namespace's rules: {rules}"
        );
    });
    ip(&["netns", "del", &name]);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
