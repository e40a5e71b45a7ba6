fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("maos_v1_descriptor.bin");
    tonic_prost_build::configure().file_descriptor_set_path(&descriptors).compile_protos(
        &[
            "proto/maos/v1/kv.proto",
            "proto/maos/v1/cluster.proto",
            "proto/maos/v1/tasks.proto",
            "proto/maos/v1/agents.proto",
            "proto/maos/v1/auth.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
