//! Compiles the tests' own gRPC service (`proto/echo.proto`) with the same
//! pure-Rust toolchain as the proto crate: no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let fds = protox::compile(["echo.proto"], ["proto"]).map_err(|e| format!("protox: {e:?}"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
