//! `cargo xtask peers`: the Kubernetes-side programs the CRI tests drive, built from the Go
//! module proxy (`go env GOPROXY`) and cached outside the checkout by version, like the kernel:
//!
//! - `crictl` and `critest` from `sigs.k8s.io/cri-tools` (critest is a Go test binary: `go test
//!   -c ./cmd/critest`, as cri-tools' own Makefile builds it);
//! - containerd 2.x from `github.com/containerd/containerd/v2`: `containerd`, `ctr` and its
//!   runc shim `containerd-shim-runc-v2` (the CRI tests' control handler under 2.x).
//!
//! Each lands in `<cache>/peers/<name>-<version>/bin/`, renamed into place whole once every
//! binary is built, so a cache hit needs neither Go nor the network. The shim's CRI tests find
//! them there (or through `MICROVM_PEERS`, the folder above).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, run};

/// One Go module version and the binaries built from it.
pub struct Peer {
    /// The cache folder's name (`<name>-<version>`).
    pub name: &'static str,
    pub module: &'static str,
    pub version: &'static str,
    pub binaries: &'static [Binary],
}

/// A binary: how `go` builds it from the module's source tree.
pub struct Binary {
    pub name: &'static str,
    /// `go build` or, for a test binary, `go test -c`.
    pub test_binary: bool,
    pub package: &'static str,
    pub cgo: bool,
    pub tags: &'static str,
    /// The Go variable that holds the version the binary prints (set with `-ldflags -X`).
    pub version_var: &'static str,
}

/// cri-tools: the newest the module proxy serves whose go.mod this Go builds (1.26).
pub const CRI_TOOLS: Peer = Peer {
    name: "cri-tools",
    module: "sigs.k8s.io/cri-tools",
    version: "v1.37.0",
    binaries: &[
        Binary {
            name: "crictl",
            test_binary: false,
            package: "./cmd/crictl",
            cgo: false,
            tags: "",
            version_var: "sigs.k8s.io/cri-tools/pkg/version.Version",
        },
        Binary {
            name: "critest",
            test_binary: true,
            package: "./cmd/critest",
            cgo: false,
            tags: "",
            version_var: "sigs.k8s.io/cri-tools/pkg/version.Version",
        },
    ],
};

/// containerd 2.x without the btrfs, devmapper and zfs snapshotters (they need C libraries;
/// the tests use `native` and `overlayfs`).
pub const CONTAINERD: Peer = Peer {
    name: "containerd",
    module: "github.com/containerd/containerd/v2",
    version: "v2.4.2",
    binaries: &[
        Binary {
            name: "containerd",
            test_binary: false,
            package: "./cmd/containerd",
            cgo: true,
            tags: "no_btrfs no_devmapper no_zfs",
            version_var: "github.com/containerd/containerd/v2/version.Version",
        },
        Binary {
            name: "ctr",
            test_binary: false,
            package: "./cmd/ctr",
            cgo: false,
            tags: "",
            version_var: "github.com/containerd/containerd/v2/version.Version",
        },
        Binary {
            name: "containerd-shim-runc-v2",
            test_binary: false,
            package: "./cmd/containerd-shim-runc-v2",
            cgo: true,
            tags: "",
            version_var: "github.com/containerd/containerd/v2/version.Version",
        },
    ],
};

pub const ALL: [&Peer; 2] = [&CRI_TOOLS, &CONTAINERD];

/// Builds every peer the cache lacks and prints `NAME PATH` for each binary.
pub fn peers() -> Result<()> {
    for peer in ALL {
        let bin = build(peer)?;
        for b in peer.binaries {
            println!("{} {}", b.name, bin.join(b.name).display());
        }
    }
    Ok(())
}

/// `<cache>/peers/<name>-<version>/bin`, built first if any binary is missing.
pub fn build(peer: &Peer) -> Result<PathBuf> {
    let peers = cache_dir().join("peers");
    let root = peers.join(format!("{}-{}", peer.name, peer.version));
    let bin = root.join("bin");
    if peer.binaries.iter().all(|b| bin.join(b.name).is_file()) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&peers)?;
    let tmp = peers.join(format!(
        "tmp-{}-{}-{}",
        peer.name,
        peer.version,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = build_into(peer, &tmp);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(tmp.join("out"), &root)
            .with_context(|| format!("move the build to {}", root.display()))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| bin)
}

/// Downloads the module's source through the proxy, copies it out of Go's read-only module
/// cache and builds each binary into `<tmp>/out/bin`.
fn build_into(peer: &Peer, tmp: &Path) -> Result<()> {
    let go = go_binary()?;
    eprintln!(
        "xtask: building {}@{} from the Go module proxy (minutes on 2 cores)",
        peer.module, peer.version
    );
    let at = format!("{}@{}", peer.module, peer.version);
    let out = Command::new(&go)
        .args(["mod", "download", "-json", &at])
        .current_dir(std::env::temp_dir())
        .env("GO111MODULE", "on")
        .output()
        .with_context(|| format!("{} mod download {at}", go.display()))?;
    if !out.status.success() {
        bail!(
            "go mod download {at}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("go mod download's JSON")?;
    let dir = info["Dir"]
        .as_str()
        .with_context(|| format!("no Dir in go mod download's answer for {at}"))?;
    let src = tmp.join("src");
    std::fs::create_dir_all(tmp)?;
    run(Command::new("cp").arg("-r").arg(dir).arg(&src))?;
    run(Command::new("chmod").arg("-R").arg("u+w").arg(&src))?;
    let bin = tmp.join("out/bin");
    std::fs::create_dir_all(&bin)?;
    for b in peer.binaries {
        let mut cmd = Command::new(&go);
        if b.test_binary {
            cmd.args(["test", "-c"]);
        } else {
            cmd.arg("build");
        }
        cmd.arg("-o")
            .arg(bin.join(b.name))
            .arg("-trimpath")
            .arg("-ldflags")
            .arg(format!("-s -w -X {}={}", b.version_var, peer.version));
        if !b.tags.is_empty() {
            cmd.args(["-tags", b.tags]);
        }
        cmd.arg(b.package)
            .current_dir(&src)
            .env("CGO_ENABLED", if b.cgo { "1" } else { "0" })
            .env("GOFLAGS", "-mod=mod -buildvcs=false");
        run(&mut cmd)?;
    }
    Ok(())
}

/// `go` from PATH, else Go's usual install folder.
fn go_binary() -> Result<PathBuf> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("go")).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/local/go/bin/go")])
        .find(|p| p.is_file())
        .context("Go is needed to build the CRI peers (go on PATH or /usr/local/go/bin/go)")
}
