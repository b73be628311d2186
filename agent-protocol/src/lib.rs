//! The protocol between the host (`sandbox` crate) and the guest agent (`microvm-agent`).
//!
//! - [`agent`]: the messages of `proto/agent.proto`; [`agent_ttrpc`]: the async ttRPC client
//!   ([`agent_ttrpc::AgentClient`]) and server trait ([`agent_ttrpc::Agent`]).
//! - [`stdio`]: the one-line header that opens a process's stdio stream on [`STDIO_PORT`].
//! - [`forward`]: the one-line request that forwards a TCP connection to the pod's loopback on
//!   [`FORWARD_PORT`] (`kubectl port-forward`).
//! - [`valid_id`]: the rule container and exec ids follow.
//!
//! See README.md for the whole protocol.

#[allow(
    clippy::all,
    unused,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    unused,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod forward;
pub mod stdio;

pub use ttrpc;

/// The vsock port the agent serves ttRPC on.
pub const AGENT_PORT: u32 = 1024;
/// The vsock port the agent accepts stdio streams on.
pub const STDIO_PORT: u32 = 1025;
/// The vsock port the agent accepts forwarded TCP connections on.
pub const FORWARD_PORT: u32 = 1026;
/// The protocol revision; bumped on incompatible changes ([`agent::VersionResponse`]).
pub const PROTOCOL_VERSION: u32 = 1;
/// The guest boot-marker value the agent writes to port 0x3f0 once it serves requests.
pub const READY_BOOT_MARKER: u8 = 1;

/// Whether `id` is a valid container or exec id: 1 to 64 of `[A-Za-z0-9_.-]`, and not `.` or
/// `..` (ids name directories in the guest).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "x.y_z", &"a".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(65), "a\n"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn messages_round_trip() {
        let mut req = agent::CreateContainerRequest::new();
        req.id = "c1".into();
        req.spec_json = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        let mut rootfs = agent::Rootfs::new();
        let mut block = agent::BlockDeviceRootfs::new();
        block.path = "/dev/vda".into();
        block.fstype = "ext4".into();
        rootfs.set_block(block);
        rootfs.writable = true;
        req.rootfs = protobuf::MessageField::some(rootfs);
        let bytes = req.write_to_bytes().unwrap();
        let back = agent::CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.rootfs.block().path, "/dev/vda");

        let sandbox = agent::CreateSandboxRequest {
            hostname: "pod".into(),
            share_pid_namespace: true,
            share_ipc_namespace: true,
            ..Default::default()
        };
        let back =
            agent::CreateSandboxRequest::parse_from_bytes(&sandbox.write_to_bytes().unwrap())
                .unwrap();
        assert!(back.share_pid_namespace && back.share_ipc_namespace);
        // An older host's request (no sharing fields) shares nothing.
        let old = agent::CreateSandboxRequest {
            hostname: "pod".into(),
            ..Default::default()
        };
        let back =
            agent::CreateSandboxRequest::parse_from_bytes(&old.write_to_bytes().unwrap()).unwrap();
        assert!(!back.share_pid_namespace && !back.share_ipc_namespace);

        let mut stats = agent::StatsResponse::new();
        assert_eq!(stats.memory_limit, None);
        stats.memory_limit = Some(0);
        let back =
            agent::StatsResponse::parse_from_bytes(&stats.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back.memory_limit, Some(0), "optional keeps a present zero");
    }
}
