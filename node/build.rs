fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/maos/raft/v1/raft.proto"], &["proto"])?;
    // `sqlx::migrate!` embeds node/migrations; a new file there must rebuild the crate. Naming
    // any path turns off cargo's default of rerunning on every change, so the protos are named too.
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
