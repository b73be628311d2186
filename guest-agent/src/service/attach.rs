//! Stdio attach: a host stream's header is checked and the stream parked until its process starts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use agent_protocol::stdio::{Header, Reply};
use tokio_vsock::VsockStream;

use super::State;

impl State {
    /// A new connection on the stdio port: reads its header and parks the stream.
    pub async fn accept_stdio(&self, mut stream: VsockStream) {
        use tokio::io::AsyncWriteExt;
        let header = tokio::time::timeout(
            Duration::from_secs(10),
            agent_protocol::stdio::read_line(&mut stream),
        )
        .await;
        let result = match header {
            Err(_) => Err("no header within 10 s".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(line)) => match Header::parse(&line) {
                Err(e) => Err(e.to_string()),
                Ok(h) => self.check_attach(&h).map(|()| h),
            },
        };
        match result {
            Ok(h) => {
                if stream.write_all(&Reply::Ok.encode()).await.is_err() {
                    return;
                }
                tracing::debug!(container = %h.container_id, exec = %h.exec_id, stream = %h.stream, "stdio attached");
                if let Err(why) = self
                    .parked
                    .park(&h.container_id, &h.exec_id, h.stream, stream)
                {
                    tracing::warn!("stdio: {why}");
                }
            }
            Err(why) => {
                tracing::info!("stdio stream refused: {why}");
                let _ = stream.write_all(&Reply::Err(why).encode()).await;
            }
        }
    }

    fn check_attach(&self, h: &Header) -> std::result::Result<(), String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("the agent is shutting down".into());
        }
        let c = self
            .container(&h.container_id)
            .map_err(|_| format!("no container {}", h.container_id))?;
        let running = c
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&h.exec_id)
            .is_some_and(|p| p.exited().is_none());
        if running {
            return Err(format!(
                "process {:?} of container {} is running already",
                h.exec_id, h.container_id
            ));
        }
        Ok(())
    }
}
