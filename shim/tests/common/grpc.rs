//! containerd's gRPC `Tasks.Update`, which Debian's ctr 1.6.20 lacks.

use std::path::Path;

pub const LINUX_RESOURCES: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
pub const WINDOWS_RESOURCES: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/WindowsResources";

/// containerd's `Tasks.Update` over its gRPC socket (Debian's ctr 1.6.20 has no `task
/// update`; containerd passes the request to the shim's Task.Update as it does for CRI's
/// UpdateContainerResources). One unary gRPC call on HTTP/2: the request is
/// `containerd.services.tasks.v1.UpdateTaskRequest` {container_id = 1, resources = 2}, which
/// has the shim API's `UpdateTaskRequest` field numbers, so that type encodes it.
pub fn grpc_task_update(sock: &Path, id: &str, type_url: &str, json: &str) -> Result<(), String> {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::{Message, MessageField};
    let req = UpdateTaskRequest {
        id: id.into(),
        resources: MessageField::some(Any {
            type_url: type_url.into(),
            value: json.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let body = req.write_to_bytes().map_err(|e| e.to_string())?;
    // gRPC message framing: not compressed, big-endian length.
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let e = |what: &str, err: &dyn std::fmt::Display| format!("{what}: {err}");
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|x| e("connect", &x))?;
        let (client, conn) = h2::client::handshake(stream)
            .await
            .map_err(|x| e("HTTP/2 handshake", &x))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.map_err(|x| e("HTTP/2", &x))?;
        let request = http::Request::builder()
            .method("POST")
            .uri("http://containerd/containerd.services.tasks.v1.Tasks/Update")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("containerd-namespace", "default")
            .body(())
            .map_err(|x| e("request", &x))?;
        let (response, mut send) = client
            .send_request(request, false)
            .map_err(|x| e("send", &x))?;
        send.send_data(bytes::Bytes::from(framed), true)
            .map_err(|x| e("send", &x))?;
        let (parts, mut body) = response.await.map_err(|x| e("response", &x))?.into_parts();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|x| e("response body", &x))?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|x| e("trailers", &x))?
            .unwrap_or_default();
        // A trailers-only reply (errors) carries the status in the headers.
        let get = |k: &str| {
            trailers
                .get(k)
                .or_else(|| parts.headers.get(k))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        match get("grpc-status").as_str() {
            "0" => Ok(()),
            code => Err(format!(
                "gRPC status {code} (HTTP {}): {}",
                parts.status,
                get("grpc-message")
            )),
        }
    })
}
