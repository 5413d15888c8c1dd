//! Generates the Rust code of the contract in `proto/` and a descriptor set for reflection.
//!
//! No system `protoc` is needed: the vendored one is used unless `PROTOC` is set.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "switchboard/auth/v1/auth.proto",
    "switchboard/presence/v1/presence.proto",
    "switchboard/messaging/v1/messaging.proto",
    "switchboard/errors/v1/errors.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // A build script is single-threaded, so setting the variable races with nothing.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    // `build_transport(false)`: the generated `XxxClient::connect(dst)` helper would clash
    // with the `Connect` RPCs of presence and messaging; clients use `XxxClient::new(channel)`.
    tonic_prost_build::configure()
        .build_transport(false)
        // Small stream buffers; see src/codec.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        // Messaging's servers come from the second pass below; leaving these out keeps
        // a server type whose Connect would encode every delivery per stream from being used.
        .server_mod_attribute("switchboard.messaging.v1", "#[cfg(any())]")
        .file_descriptor_set_path(out.join("switchboard_descriptor.bin"))
        .compile_protos(&files, std::slice::from_ref(&root))?;
    // Messaging's servers again, over the types generated above, except that Connect
    // answers `EncodedConnectResponse`: a frame encoded once per instance and shared by every
    // stream it goes to (see src/encoded.rs). Same wire format, same descriptors.
    let servers = out.join("servers");
    std::fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_transport(false)
        .build_client(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .extern_path(".switchboard.messaging.v1", "crate::messaging::v1")
        .extern_path(
            ".switchboard.messaging.v1.ConnectResponse",
            "crate::encoded::EncodedConnectResponse",
        )
        .out_dir(&servers)
        .compile_protos(&files[2..3], &[root])?;
    Ok(())
}
