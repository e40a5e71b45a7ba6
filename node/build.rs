fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/maos/raft/v1/raft.proto"], &["proto"])?;
    // `sqlx::migrate!` embeds node/migrations; a new file there must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
