//! Compiles the Istio and xDS protos in `src/proto` with protox, a protobuf compiler written in
//! Rust, so building needs no `protoc` binary on the machine; and has the release build's linker
//! lay out the agent's hot functions together (`scripts/hot-symbols.txt`, see
//! `scripts/code-order`).

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
    order_hot_code();
    Ok(())
}

/// The kernel maps code in 64 KiB runs around each page touched, so the agent's resident code
/// is the runs its connections' functions are scattered over; listed first, they share runs.
/// Only for release builds linked by rust-lld (the default for x86_64 Linux since Rust 1.90;
/// GNU ld has no `--symbol-ordering-file`). `NODETUNNEL_CODE_ORDER=off` leaves the order alone.
fn order_hot_code() {
    println!("cargo:rerun-if-changed=scripts/hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=NODETUNNEL_CODE_ORDER");
    let wanted = std::env::var("NODETUNNEL_CODE_ORDER").map_or(true, |value| value != "off");
    let release = std::env::var("PROFILE").is_ok_and(|profile| profile == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !(wanted && release && target == "x86_64-unknown-linux-gnu" && rustc_links_with_lld()) {
        return;
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let order = std::path::Path::new(&manifest).join("scripts/hot-symbols.txt");
    if order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=nodetunnel=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Names from another toolchain or lockfile are simply not found.
        println!("cargo:rustc-link-arg-bin=nodetunnel=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether the compiler is Rust 1.90 or later, whose x86_64 Linux target links with rust-lld,
/// and no flag picks another linker.
fn rustc_links_with_lld() -> bool {
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if ["linker", "fuse-ld", "link-self-contained"]
        .iter()
        .any(|option| flags.contains(option))
    {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let Ok(output) = std::process::Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&output.stdout);
    let minor = version
        .split_whitespace()
        .nth(1)
        .and_then(|number| number.split('.').nth(1))
        .and_then(|minor| minor.parse::<u32>().ok());
    version.starts_with("rustc 1.") && minor.is_some_and(|minor| minor >= 90)
}
