//! Port forwarding into the pod (`kubectl port-forward`): each vsock connection to
//! [`agent_protocol::FORWARD_PORT`] names a TCP port (`TCP <port>\n`); the agent connects to
//! that port on the loopback of its own network namespace, which is the pod's (the pod's
//! containers share it), answers `OK` or `ERR <reason>`, then copies bytes both ways until both
//! sides are done. The host only opens these connections when containerd asks it to.

use std::time::Duration;

use agent_protocol::forward::parse_request;
use agent_protocol::stdio::{read_line, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_vsock::{VsockListener, VsockStream};

/// How long the host has to send its request line, and the pod's port to accept.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts forward connections for as long as the agent runs.
pub async fn serve(listener: VsockListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(forward(stream));
            }
            Err(e) => {
                tracing::warn!("forward accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn forward(mut stream: VsockStream) {
    let port = match tokio::time::timeout(STEP_TIMEOUT, read_line(&mut stream)).await {
        Err(_) => Err("no request within 10 s".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(line)) => parse_request(&line).map_err(|e| e.to_string()),
    };
    let connected = match port {
        Ok(port) => {
            match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await
            {
                Err(_) => Err(format!("127.0.0.1:{port} did not accept within 10 s")),
                Ok(Err(e)) => Err(format!("127.0.0.1:{port}: {e}")),
                Ok(Ok(tcp)) => Ok((port, tcp)),
            }
        }
        Err(why) => Err(why),
    };
    let (port, mut tcp) = match connected {
        Ok(c) => c,
        Err(why) => {
            tracing::info!("port forward refused: {why}");
            let _ = stream.write_all(&Reply::Err(why).encode()).await;
            return;
        }
    };
    if stream.write_all(&Reply::Ok.encode()).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
        Ok((to_pod, from_pod)) => {
            tracing::debug!(port, to_pod, from_pod, "port forward ended");
        }
        Err(e) => tracing::debug!(port, "port forward ended: {e}"),
    }
}
