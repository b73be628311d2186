//! Pulls from a real registry: Debian's `docker-registry` (distribution 2.8) on loopback, fed
//! with images built here and pushed with oci-client; one anonymous, one behind htpasswd
//! (bcrypt) basic auth.

mod common;

use common::*;
use image::{Error, Fetched, PullOptions};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REGISTRY: &str = "/usr/bin/docker-registry";

struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry on 127.0.0.1 at a free port; with `htpasswd`, behind basic auth.
    fn start(htpasswd: Option<(&str, &str)>) -> Self {
        assert!(
            Path::new(REGISTRY).exists(),
            "{REGISTRY} is missing: these tests need Debian's registry \
             (apt-get install docker-registry; .ci/run installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: microvm-test\n",
            storage.display()
        );
        if let Some((user, password)) = htpasswd {
            let hash = bcrypt::hash_with_result(password, 5)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoA);
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: microvm-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let registry = Self {
            child,
            port,
            storage,
            _dir: dir,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut head = [0u8; 8];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The file where the registry keeps a blob.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    async fn push(&self, repo_tag: &str, image: &TestImage, auth: &RegistryAuth) {
        let reference: Reference = format!("{}/{repo_tag}", self.host()).parse().unwrap();
        let client = push_client();
        client
            .auth(&reference, auth, RegistryOperation::Push)
            .await
            .unwrap();
        for (bytes, digest) in std::iter::once((image.config.clone(), sha256(&image.config))).chain(
            image
                .layers
                .iter()
                .map(|l| (l.bytes.clone(), l.digest.clone())),
        ) {
            client.push_blob(&reference, bytes, &digest).await.unwrap();
        }
        client
            .push_manifest_raw(
                &reference,
                image.manifest.clone(),
                http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
            )
            .await
            .unwrap();
    }

    /// An index under `repo_tag` with an arm64 image listed before the amd64 one.
    async fn push_multi_arch(&self, repo: &str, tag: &str, arm: &TestImage, amd: &TestImage) {
        let mut entries = Vec::new();
        for (image, arch) in [(arm, "arm64"), (amd, "amd64")] {
            self.push(
                &format!("{repo}@{}", image.id()),
                image,
                &RegistryAuth::Anonymous,
            )
            .await;
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.id(),
                "size": image.manifest.len(),
                "platform": {"os": "linux", "architecture": arch},
            }));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }))
        .unwrap();
        let reference: Reference = format!("{}/{repo}:{tag}", self.host()).parse().unwrap();
        push_client()
            .push_manifest_raw(
                &reference,
                index,
                http::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
            )
            .await
            .unwrap();
    }
}

fn push_client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

fn insecure() -> PullOptions {
    PullOptions {
        insecure: true,
        ..Default::default()
    }
}

fn image_with(marker: &str, arch: &str) -> TestImage {
    TestImage::for_arch(
        vec![
            compress(&busybox_layer().finish(), Compression::Gzip),
            compress(
                &Layer::new()
                    .file("marker", marker.as_bytes(), 0o644, 0, 0)
                    .finish(),
                Compression::Zstd,
            ),
        ],
        &["/bin/cat", "/marker"],
        arch,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_plain_http_registry_once() {
    let registry = Registry::start(None);
    let img = image_with("from the registry", "amd64");
    registry
        .push("test/busybox:1", &img, &RegistryAuth::Anonymous)
        .await;
    let (_tmp, store) = store();
    let name = format!("{}/test/busybox:1", registry.host());

    // Without --insecure the client speaks TLS to a plain HTTP server: a clear failure.
    let err = store
        .ensure(&name, &PullOptions::default())
        .await
        .unwrap_err();
    eprintln!("without --insecure: {err}");
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    assert!(err.to_string().contains(&name), "{err}");

    let (image, fetched) = store.ensure(&name, &insecure()).await.unwrap();
    assert_eq!(image.id, img.id());
    assert_eq!(image.names, vec![name.clone()]);
    assert_eq!(
        fetched,
        Fetched {
            blobs_downloaded: 3,
            blobs_imported: 0
        }
    );
    let cmd = image
        .config
        .config()
        .as_ref()
        .unwrap()
        .cmd()
        .clone()
        .unwrap();
    assert_eq!(cmd, vec!["/bin/cat".to_string(), "/marker".into()]);

    // Again: from the store. And `pull` asks the registry but downloads no blob.
    let (again, fetched) = store.ensure(&name, &insecure()).await.unwrap();
    assert_eq!(
        (again.id.as_str(), fetched),
        (img.id().as_str(), Fetched::default())
    );
    let (again, fetched) = store.pull(&name, &insecure()).await.unwrap();
    assert_eq!(
        (again.id.as_str(), fetched),
        (img.id().as_str(), Fetched::default())
    );
    // By digest: already stored, so no network at all (the registry is not even asked).
    let by_digest = format!("{}/test/busybox@{}", registry.host(), img.id());
    let (same, fetched) = store
        .ensure(&by_digest, &PullOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (same.id.as_str(), fetched),
        (img.id().as_str(), Fetched::default())
    );
    assert!(same.names.contains(&by_digest));

    let disk = store.rootfs_disk(&image).unwrap();
    assert!(disk.built);
    assert_eq!(cat(&disk.path, "/marker"), "from the registry");
    assert!(!store.rootfs_disk(&image).unwrap().built);

    // A tag moved to a new image that shares the base layer: only the new blobs come.
    let moved = image_with("moved on", "amd64");
    registry
        .push("test/busybox:1", &moved, &RegistryAuth::Anonymous)
        .await;
    let (image, fetched) = store.pull(&name, &insecure()).await.unwrap();
    assert_eq!(image.id, moved.id());
    assert_eq!(
        fetched.blobs_downloaded, 2,
        "config and the top layer; the base is shared"
    );
    let old = store.get(&img.id()).unwrap().unwrap();
    assert_eq!(
        old.names,
        vec![by_digest.clone()],
        "the tag moved off the old image"
    );

    // An index: linux/amd64 is chosen although arm64 comes first.
    let arm = image_with("arm64", "arm64");
    let amd = image_with("amd64", "amd64");
    registry
        .push_multi_arch("test/multi", "latest", &arm, &amd)
        .await;
    let (multi, _) = store
        .ensure(&format!("{}/test/multi", registry.host()), &insecure())
        .await
        .unwrap();
    assert_eq!(multi.id, amd.id());
    assert_eq!(
        multi.names,
        vec![format!("{}/test/multi:latest", registry.host())]
    );
    assert_eq!(multi.config.architecture().to_string(), "amd64");

    // Unknown repositories and tags say so.
    let err = store
        .ensure(
            &format!("{}/test/nothing:here", registry.host()),
            &insecure(),
        )
        .await
        .unwrap_err()
        .to_string();
    eprintln!("unknown tag: {err}");
    assert!(err.contains("test/nothing:here"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_corrupted_on_the_wire_is_refused() {
    let registry = Registry::start(None);
    let img = image_with("to be corrupted", "amd64");
    registry
        .push("test/corrupt:1", &img, &RegistryAuth::Anonymous)
        .await;
    // Flip a byte of the top layer where the registry keeps it: it serves what it has.
    let layer = &img.layers[1].digest;
    let file = registry.blob_file(layer);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 5;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let (_tmp, store) = store();
    let err = store
        .ensure(&format!("{}/test/corrupt:1", registry.host()), &insecure())
        .await
        .unwrap_err();
    eprintln!("corrupted on the wire: {err}");
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err:?}");
    assert!(err.to_string().contains(layer.as_str()), "{err}");
    assert!(!store.root().join("blobs/sha256").join(&layer[7..]).exists());
    assert!(store.list().unwrap().is_empty());

    // A blob that grew: cut off past the size the manifest gives.
    let img = image_with("to be extended", "amd64");
    registry
        .push("test/longer:1", &img, &RegistryAuth::Anonymous)
        .await;
    let layer = &img.layers[1].digest;
    let file = registry.blob_file(layer);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0u8; 100_000]);
    std::fs::write(&file, &bytes).unwrap();
    let err = store
        .ensure(&format!("{}/test/longer:1", registry.host()), &insecure())
        .await
        .unwrap_err();
    eprintln!("longer on the wire: {err}");
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err:?}");
    assert!(err.to_string().contains(layer.as_str()), "{err}");
    assert!(!store.root().join("blobs/sha256").join(&layer[7..]).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry_needs_the_credentials() {
    let registry = Registry::start(Some(("tester", "s3cret")));
    let img = image_with("behind a password", "amd64");
    let creds = RegistryAuth::Basic("tester".into(), "s3cret".into());
    registry.push("private/busybox:1", &img, &creds).await;
    let name = format!("{}/private/busybox:1", registry.host());
    let (_tmp, store) = store();

    let err = store.ensure(&name, &insecure()).await.unwrap_err();
    eprintln!("anonymous: {err}");
    assert!(
        matches!(err, Error::Unauthorized { .. }),
        "anonymous: {err:?}"
    );
    assert!(err.to_string().contains(&registry.host()), "{err}");

    let wrong = PullOptions {
        username: Some("tester".into()),
        password: Some("wrong".into()),
        ..insecure()
    };
    let err = store.ensure(&name, &wrong).await.unwrap_err();
    eprintln!("wrong password: {err}");
    assert!(
        matches!(err, Error::Unauthorized { .. }),
        "wrong password: {err:?}"
    );
    assert!(store.list().unwrap().is_empty());

    let right = PullOptions {
        username: Some("tester".into()),
        password: Some("s3cret".into()),
        ..insecure()
    };
    let (image, fetched) = store.ensure(&name, &right).await.unwrap();
    assert_eq!(image.id, img.id());
    assert_eq!(fetched.blobs_downloaded, 3);
    let disk = store.rootfs_disk(&image).unwrap();
    assert_eq!(cat(&disk.path, "/marker"), "behind a password");
}

/// A manifest whose config is past 8 MiB: refused by the size the manifest gives, before any
/// blob (the manifest included) is downloaded or stored, naming the config's digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_config_is_refused_before_any_download() {
    let registry = Registry::start(None);
    let img = TestImage::with_oversized_config();
    registry
        .push("test/bigconfig:1", &img, &RegistryAuth::Anonymous)
        .await;
    let (_tmp, store) = store();
    let err = store
        .ensure(
            &format!("{}/test/bigconfig:1", registry.host()),
            &insecure(),
        )
        .await
        .unwrap_err();
    let digest = sha256(&img.config);
    assert!(
        matches!(&err, Error::TooLarge { what: "config", digest: d, .. } if *d == digest),
        "{err:?}"
    );
    assert!(err.to_string().contains(&digest), "{err}");
    assert!(walk(&store.root().join("blobs/sha256")).is_empty());
}
