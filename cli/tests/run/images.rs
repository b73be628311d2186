//! Where images come from: a layout, an archive, a registry on loopback; `pull`, `images`,
//! `rmi`.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// A second run of the same image fetches and builds nothing; an OCI archive and a registry
/// (Debian's docker-registry on loopback, the image pushed with skopeo) work too.
pub fn image_sources(env: &Env) {
    let img = env.img.layout_str();
    let debug = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.env("RUST_LOG", "warn,microvm=debug");
        run_cmd(c, None)
    };
    let fetched_nothing = "blobs_downloaded: 0, blobs_imported: 0 }, disk built: false";
    let o = debug(&["run", "--rm", img, "true"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains("Fetched {") && !o.stderr.contains(fetched_nothing),
        "{o:?}"
    );
    let o = debug(&["run", "--rm", img, "true"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains(fetched_nothing),
        "the second run fetched something: {o:?}"
    );

    let o = env.microvm(
        &[
            "run",
            "--rm",
            env.img.archive.to_str().unwrap(),
            "echo",
            "from-archive",
        ],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "from-archive\n"), "{o:?}");

    let registry =
        test_support::registry::LoopbackRegistry::start(&env.dir, Duration::from_secs(30))
            .expect("loopback registry");
    let reference = format!("127.0.0.1:{}/busybox:t", registry.port);
    let push = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{img}:t"))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        push.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&push.stderr)
    );
    let o = env.microvm(
        &["run", "--rm", "--insecure", &reference, "echo", "ok"],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "ok\n"), "{o:?}");
}

/// `pull`, `images`, `rmi` on the store (no VM).
pub fn pull_images_rmi(env: &Env) {
    let img = env.img.layout_str();
    let o = env.microvm(&["pull", img], None);
    assert_eq!(o.code, 0, "{o:?}");
    let id = o.stdout.trim().to_string();
    assert!(id.starts_with("sha256:"), "{o:?}");
    assert!(
        !o.stderr.contains("0 blob(s) downloaded, 0 imported"),
        "{o:?}"
    );
    let o = env.microvm(&["pull", img], None);
    assert_eq!(o.stdout.trim(), id, "{o:?}");
    assert!(
        o.stderr.contains("0 blob(s) downloaded, 0 imported"),
        "{o:?}"
    );
    let o = env.microvm(&["images"], None);
    assert_eq!(o.code, 0, "{o:?}");
    let short = &id["sha256:".len().."sha256:".len() + 12];
    let line = o
        .stdout
        .lines()
        .find(|l| l.contains(short))
        .unwrap_or_else(|| panic!("{short} not listed: {o:?}"));
    let name = line.split_whitespace().next().unwrap().to_string();
    let o = env.microvm(&["rmi", &name], None);
    assert_eq!((o.code, o.stdout.trim()), (0, name.as_str()), "{o:?}");
    let o = env.microvm(&["images"], None);
    assert!(!o.stdout.contains(short), "{o:?}");
    let o = env.microvm(&["rmi", &name], None);
    assert_eq!(o.code, 1, "removing a missing image: {o:?}");
}
