//! Compiles the Istio and xDS protos in `src/proto` with protox, a protobuf compiler written in
//! Rust, so building needs no `protoc` binary on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "src/proto/workload.proto",
        "src/proto/authorization.proto",
        "src/proto/citadel.proto",
        "src/proto/discovery.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["src/proto"])?;
    tonic_build::configure()
        .build_client(true)
        // The server side serves the fake istiod of the tests; it costs nothing unless used.
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
