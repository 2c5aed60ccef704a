//! Generates the prost message types of `tollgate/quota/v1/quota.proto`.
//! Only messages: the gRPC service lives in `tollgate-quota` (tonic), which
//! reuses these types, so this crate stays buildable for wasm32-wasip1.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.compile_protos(&["tollgate/quota/v1/quota.proto"], &["."])?;
    println!("cargo:rerun-if-changed=tollgate/quota/v1/quota.proto");
    Ok(())
}
