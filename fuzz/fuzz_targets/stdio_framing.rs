//! The stdio stream framing as the host reads it from the guest: `read_line` on the stream
//! (the agent's answer line comes first, then raw bytes), `Reply::parse` of that line, and
//! `Header::parse` (what the agent parses, so that a header the host encodes always parses
//! back). Lines never pass `MAX_LINE` and never swallow bytes after their newline.
#![no_main]

use agent_protocol::stdio::{read_line, Header, Reply, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let mut stream = data;
    if let Ok(line) = rt.block_on(read_line(&mut stream)) {
        assert!(line.len() < MAX_LINE);
        assert!(!line.contains(&b'\n'));
        assert_eq!(
            data.len() - stream.len(),
            line.len() + 1,
            "read_line took bytes after the newline"
        );
        if let Ok(reply) = Reply::parse(&line) {
            let encoded = reply.encode();
            assert!(encoded.len() <= MAX_LINE);
            let again = Reply::parse(&encoded).expect("an encoded reply parses");
            if let Reply::Ok = reply {
                assert_eq!(again, Reply::Ok);
            }
        }
    }
    if let Ok(header) = Header::parse(data) {
        let encoded = header.encode().expect("a parsed header encodes");
        assert!(encoded.len() <= MAX_LINE);
        assert_eq!(Header::parse(&encoded).expect("round trip"), header);
    }
});
