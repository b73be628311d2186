//! The ttRPC statuses the task service answers with, and containerd's timestamps.

use std::time::SystemTime;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{self, Code};
use sandbox::agent_protocol::ttrpc::Code as AgentCode;

pub(crate) fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// `INVALID_ARGUMENT` with the error's text: a request or spec the shim cannot take.
pub(crate) fn invalid(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INVALID_ARGUMENT, e.to_string())
}

/// `INTERNAL` with the error's text.
pub(crate) fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INTERNAL, e.to_string())
}

/// An agent error with the agent's code kept (NOT_FOUND stays NOT_FOUND, ...).
pub(crate) fn agent_err(e: sandbox::Error) -> ttrpc::Error {
    let code = match e.code() {
        Some(AgentCode::NOT_FOUND) => Code::NOT_FOUND,
        Some(AgentCode::ALREADY_EXISTS) => Code::ALREADY_EXISTS,
        Some(AgentCode::INVALID_ARGUMENT) => Code::INVALID_ARGUMENT,
        Some(AgentCode::FAILED_PRECONDITION) => Code::FAILED_PRECONDITION,
        Some(AgentCode::UNIMPLEMENTED) => Code::UNIMPLEMENTED,
        _ => Code::INTERNAL,
    };
    status(code, e.to_string())
}

pub(crate) fn unimplemented(what: &str) -> ttrpc::Error {
    status(
        Code::UNIMPLEMENTED,
        format!("{what} is not implemented by the microvm shim"),
    )
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}
