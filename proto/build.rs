//! Compiles `fedcart/v1/fedcart.proto` with the pure-Rust `protox` compiler, so a
//! fresh clone builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "fedcart/v1/fedcart.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
