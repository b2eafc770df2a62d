//! Generates the Rust code for every `.proto` file with a vendored `protoc`,
//! so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchboard_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/switchboard/push/v1/push.proto",
                "proto/switchboard/presence/v1/presence.proto",
                "proto/switchboard/bridge/v1/bridge.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
