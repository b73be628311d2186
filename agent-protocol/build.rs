//! Generates the Rust messages and the async ttRPC client/server for `proto/agent.proto` into
//! `OUT_DIR` (pure Rust codegen: no `protoc` needed).

fn main() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=proto/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc codegen for proto/agent.proto");
    // The generated files start with inner attributes and `//!` comments, which `include!`
    // cannot take: drop them (lib.rs puts the equivalent `allow`s on the modules).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("read generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("write generated code");
    }
}
