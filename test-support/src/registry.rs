//! Debian's `docker-registry` on a loopback port, for tests that pull images the way users do.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A registry serving `127.0.0.1:<port>`, its config and storage in a directory of the test's;
/// killed and reaped when dropped.
pub struct LoopbackRegistry {
    child: Child,
    pub port: u16,
}

impl LoopbackRegistry {
    /// Starts it with its config and storage under `dir` and returns once it accepts
    /// connections, or an error after `listen_within`.
    pub fn start(dir: &Path, listen_within: Duration) -> Result<LoopbackRegistry, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("pick a loopback port: {e}"))?
            .port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .map_err(|e| format!("write {}: {e}", config.display()))?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("docker-registry (apt-get install docker-registry): {e}"))?;
        let registry = LoopbackRegistry { child, port };
        let deadline = Instant::now() + listen_within;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "the registry did not listen within {listen_within:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(registry)
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
