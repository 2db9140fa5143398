//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/weft/identity/v1/identity.proto",
        "proto/weft/admin/v1/admin.proto",
        "proto/weft/config/v1/config.proto",
        "proto/spiffe/workload.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // etcd's API: a client only (the control plane talks to etcd, never serves it).
    let etcd = ["proto/etcd/etcd.proto"];
    let fds = protox::compile(etcd, ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    for f in files.iter().chain(&etcd) {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
