//! Compiles `fedcart/v1/fedcart.proto` with the pure-Rust `protox` compiler, so a
//! fresh clone builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "fedcart/v1/fedcart.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Bulk payloads as `bytes::Bytes`: decoded as slices of the received
        // buffer instead of copies, and one model's bytes shared by every
        // download of it (coordinator/src/service.rs, client/src/transfer.rs).
        .bytes(".fedcart.v1.ModelChunk.data")
        .bytes(".fedcart.v1.UpdateChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
