//! A process running in the sandbox, and the RPCs that name one.

use agent_protocol::agent as pb;
use agent_protocol::agent_ttrpc::AgentClient;
use agent_protocol::ttrpc::context;

use crate::{Error, Exit, Result};

/// A process started in the sandbox, with its stdio being copied.
pub struct Process {
    pub container_id: String,
    /// Empty for a container's init process.
    pub exec_id: String,
    /// Its pid in the guest.
    pub pid: u32,
    pub(crate) client: AgentClient,
    pub(crate) outputs: Vec<std::thread::JoinHandle<std::io::Result<u64>>>,
}

impl Process {
    /// Waits for the process to exit and for all its output to be written to the host
    /// descriptors given at start.
    pub async fn wait(self) -> Result<Exit> {
        let exit = wait_rpc(&self.client, &self.container_id, &self.exec_id).await?;
        for h in self.outputs {
            let joined = tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| Error::io("join a stdio thread", std::io::Error::other(e)))?;
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Error::io("copy process output", e)),
                Err(_) => {
                    return Err(Error::io(
                        "copy process output",
                        std::io::Error::other("the copy thread panicked"),
                    ))
                }
            }
        }
        Ok(exit)
    }
}

pub(crate) fn process_ref(
    container_id: &str,
    exec_id: &str,
) -> protobuf::MessageField<pb::ProcessRef> {
    protobuf::MessageField::some(pb::ProcessRef {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    })
}

pub(crate) async fn wait_rpc(
    client: &AgentClient,
    container_id: &str,
    exec_id: &str,
) -> Result<Exit> {
    let req = pb::WaitProcessRequest {
        process: process_ref(container_id, exec_id),
        ..Default::default()
    };
    let r = client
        .wait_process(context::with_timeout(0), &req)
        .await
        .map_err(|e| Error::rpc("WaitProcess", e))?;
    Ok(Exit {
        code: r.exit_code,
        at_ms: r.exited_at_ms,
    })
}

pub(crate) fn check_id(id: &str) -> Result<()> {
    if agent_protocol::valid_id(id) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid id {id:?} (1 to 64 of A-Z a-z 0-9 _ . -)"
        )))
    }
}
