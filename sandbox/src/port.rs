//! TCP connections to a port of the VM's loopback (`kubectl port-forward`), through the agent's
//! forward port ([`agent_protocol::forward`]).

use agent_protocol::forward::encode_request;
use agent_protocol::stdio::{read_line, Reply};
use tokio::io::AsyncWriteExt;

use crate::io::connect_port;
use crate::{Error, Result, Sandbox};

impl Sandbox {
    /// A stream to `127.0.0.1:port` in the VM's network namespace: the agent connected to it and
    /// said so. Refused (with the agent's reason) when nothing there accepts.
    pub async fn connect_guest_port(&self, port: u16) -> Result<tokio::net::UnixStream> {
        let what = || format!("port {port} in the VM");
        let mut s = connect_port(self.vsock_path(), agent_protocol::FORWARD_PORT)
            .await
            .map_err(|e| Error::io(format!("connect to {}", what()), e))?;
        s.write_all(&encode_request(port))
            .await
            .map_err(|e| Error::io(format!("ask for {}", what()), e))?;
        let reply = read_line(&mut s)
            .await
            .map_err(|e| Error::Invalid(format!("no answer for {}: {e}", what())))?;
        match Reply::parse(&reply) {
            Ok(Reply::Ok) => Ok(s),
            Ok(Reply::Err(reason)) => Err(Error::Invalid(format!("{}: {reason}", what()))),
            Err(e) => Err(Error::Invalid(format!("{}: {e}", what()))),
        }
    }
}
