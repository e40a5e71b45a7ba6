//! `maos kv put|get`: the coordination key-value space.

use maos_client::Client;

use super::args::KvCommand;

/// `maos kv …`.
pub async fn run(command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Put { key, value, target } => {
            let revision = Client::new(target.endpoints)?.put(&key, &value).await?;
            println!("revision {revision}");
            Ok(())
        }
        KvCommand::Get { key, stale, target } => {
            match Client::new(target.endpoints)?.get(&key, stale).await? {
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
