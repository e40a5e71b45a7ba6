fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/maos/v1/kv.proto",
            "proto/maos/v1/cluster.proto",
            "proto/maos/v1/tasks.proto",
            "proto/maos/v1/agents.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
