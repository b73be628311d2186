//! The host's ttRPC client against a hostile agent: `sandbox::Sandbox::connect` and then the
//! calls the shim and CLI make, each answered by a fake agent with fuzzed ttRPC frames (any
//! status, any payload bytes for the reply message, a wrong stream id, a wrong message type),
//! decoded by the real client (ttrpc framing, protobuf messages from `agent-protocol`) and
//! turned into the sandbox's results. The fake agent hangs up when its replies run out, so
//! every call ends.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use microvm_fuzz::Input;
use sandbox::{Sandbox, SandboxSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

struct Host {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    uds: PathBuf,
    listener: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let uds = dir.path().join("vsock.sock");
        let listener = {
            let _guard = rt.enter();
            UnixListener::bind(&uds).expect("bind")
        };
        Host {
            rt,
            _dir: dir,
            uds,
            listener,
        }
    })
}

/// One reply of the fake agent:
/// `call:u8 flags:u8 code:u32 msg_len:u8 msg payload_len:u16 payload raw_id:u32 raw_type:u8`.
struct Reply {
    /// Which call the host makes after this reply was read (see `call`).
    next_call: u8,
    status: Option<(u32, Vec<u8>)>,
    payload: Vec<u8>,
    stream_id: Option<u32>,
    msg_type: Option<u8>,
}

impl Reply {
    fn read(r: &mut Input<'_>) -> Self {
        let next_call = r.u8();
        let flags = r.u8();
        let code = r.u32();
        let n = usize::from(r.u8());
        let msg = r.bytes(n).to_vec();
        let n = usize::from(r.u16());
        let payload = r.bytes(n).to_vec();
        let raw_id = r.u32();
        let raw_type = r.u8();
        Self {
            next_call,
            status: (flags & 1 != 0).then_some((code, msg)),
            payload,
            stream_id: (flags & 2 != 0).then_some(raw_id),
            msg_type: (flags & 4 != 0).then_some(raw_type),
        }
    }

    /// The ttRPC `Response { Status status = 1; bytes payload = 2; }` frame for `stream_id`.
    fn frame(&self, stream_id: u32) -> Vec<u8> {
        let mut body = Vec::new();
        if let Some((code, msg)) = &self.status {
            let mut status = Vec::new();
            status.push(0x08); // code, varint
            varint(&mut status, u64::from(*code));
            status.push(0x12); // message, bytes
            varint(&mut status, msg.len() as u64);
            status.extend_from_slice(msg);
            body.push(0x0a);
            varint(&mut body, status.len() as u64);
            body.extend_from_slice(&status);
        }
        body.push(0x12);
        varint(&mut body, self.payload.len() as u64);
        body.extend_from_slice(&self.payload);
        let mut frame = Vec::with_capacity(10 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&self.stream_id.unwrap_or(stream_id).to_be_bytes());
        frame.push(self.msg_type.unwrap_or(2)); // MESSAGE_TYPE_RESPONSE
        frame.push(0);
        frame.extend_from_slice(&body);
        frame
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The VMM's `CONNECT` handshake, then one reply per request until the replies run out.
async fn fake_agent(listener: &UnixListener, replies: &[Reply]) {
    let Ok((mut s, _)) = listener.accept().await else {
        return;
    };
    let mut line = [0u8; 13]; // "CONNECT 1024\n"
    if s.read_exact(&mut line).await.is_err() || s.write_all(b"OK 1\n").await.is_err() {
        return;
    }
    for reply in replies {
        let mut header = [0u8; 10];
        let read = tokio::time::timeout(Duration::from_millis(20), s.read_exact(&mut header));
        let Ok(Ok(_)) = read.await else {
            return; // the host waits for a reply it will not get: hang up
        };
        let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
        let stream_id = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let mut request = vec![0u8; len.min(1 << 20)];
        if s.read_exact(&mut request).await.is_err()
            || s.write_all(&reply.frame(stream_id)).await.is_err()
        {
            return;
        }
        // A reply for another stream, or not a response, leaves the host waiting for the one
        // it asked for: hang up now rather than after the 20 ms wait for a request that will
        // not come (that wait made this target 50 times slower than the others).
        let answered = reply.stream_id.is_none_or(|id| id == stream_id)
            && reply.msg_type.is_none_or(|t| t == 2);
        if !answered {
            return;
        }
    }
}

/// The host's calls, as the shim and the CLI make them; the results are what they act on.
async fn call(sandbox: &Sandbox, which: u8) {
    match which % 9 {
        0 => {
            let _ = sandbox.version().await;
        }
        1 => {
            let _ = sandbox.health().await;
        }
        2 => {
            let _ = sandbox.list_processes("c1").await;
        }
        3 => {
            let _ = sandbox.stats("c1").await;
        }
        4 => {
            let _ = sandbox.wait("c1", "e1").await;
        }
        5 => {
            if let Ok(oom) = sandbox.next_oom_event().await {
                // The shim only acts on ids that pass this check.
                let _ = agent_protocol::valid_id(&oom.container_id);
            }
        }
        6 => {
            let _ = sandbox.create_sandbox(&SandboxSettings::default()).await;
        }
        7 => {
            let _ = sandbox.signal("c1", "", 15, false).await;
        }
        _ => {
            let _ = sandbox.remove_container("c1").await;
        }
    }
}

// `Reply*` (at most 16).
fuzz_target!(|data: &[u8]| {
    let mut r = Input(data);
    let mut replies = Vec::new();
    while !r.is_empty() && replies.len() < 16 {
        replies.push(Reply::read(&mut r));
    }
    let host = host();
    host.rt.block_on(async {
        let agent = fake_agent(&host.listener, &replies);
        let client = async {
            // `connect` makes the first call (Health) itself.
            let Ok(sandbox) = Sandbox::connect(&host.uds, Duration::from_secs(5)).await else {
                return;
            };
            for reply in &replies {
                call(&sandbox, reply.next_call).await;
            }
        };
        // Whichever ends first: an agent that hung up ends the client's calls; a client that
        // gave up (a reply it refused) needs no more replies.
        let both = async {
            tokio::pin!(agent, client);
            tokio::select! {
                _ = &mut agent => (&mut client).await,
                _ = &mut client => {}
            }
        };
        tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .expect("a call did not end after the agent hung up");
    });
});
