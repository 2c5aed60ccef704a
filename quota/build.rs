//! Generates the tonic server and client of `tollgate.quota.v1.Quota`,
//! reusing the prost messages of `tollgate-proto` (extern_path) so the
//! filter and the service share one set of types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .extern_path(".tollgate.quota.v1", "::tollgate_proto::quota::v1")
        .compile_with_config(config, &["tollgate/quota/v1/quota.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto/tollgate/quota/v1/quota.proto");
    Ok(())
}
