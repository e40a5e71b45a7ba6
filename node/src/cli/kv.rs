//! `maos kv put|get`: the coordination key-value space.

use super::args::KvCommand;

/// `maos kv …`.
pub async fn run(command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Put { key, value, target } => {
            let revision = super::client(&target)?.put(&key, &value).await?;
            println!("revision {revision}");
            Ok(())
        }
        KvCommand::Get { key, stale, target } => {
            match super::client(&target)?.get(&key, stale).await? {
                Some((value, revision)) if target.json => {
                    println!("{}", serde_json::json!({"key": key, "value": value, "revision": revision}))
                }
                Some((value, _)) => println!("{value}"),
                None => anyhow::bail!("key {key:?} not found"),
            }
            Ok(())
        }
    }
}
