//! Compiles the .proto files under `proto/` to Rust.
//!
//! `protox` (a pure-Rust protobuf compiler) turns them into a
//! FileDescriptorSet, so no `protoc` binary is needed; `tonic-prost-build`
//! then generates prost messages plus tonic clients and servers.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
    "istio/v1/auth/ca.proto",
    "istio/workload/zds/zds.proto",
    "google/rpc/status.proto",
    "envoy/type/v3/semantic_version.proto",
    "xds/core/v3/context_params.proto",
    "envoy/config/core/v3/base.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/service/discovery/v3/ads.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/extensions/filters/http/fault/v3/fault.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    for f in FILES {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }

    let fds = protox::compile(FILES, [&root]).map_err(|e| format!("protox: {e:?}"))?;
    // Kept for reflection at run time (what a message carries that these
    // files do not declare).
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    let mut config = tonic_prost_build::Config::new();
    // Every message implements prost::Name with the type URL xDS uses
    // (type.googleapis.com/<full name>), so Any::from_msg/to_msg work.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    // Ordered maps: deterministic encoding (stable bytes, comparable output).
    config.btree_map(["."]);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .include_file("_includes.rs")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
