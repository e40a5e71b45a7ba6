//! Shared state watch: a watcher on one node sees the keys under its prefix, then every write,
//! delete and expiry made through another node.

#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{options, STEP};
use maos_client::proto::v1::kv_service_client::KvServiceClient;
use maos_client::proto::v1::{DeleteRequest, KeyEvent, PutRequest, WatchKeysRequest};
use maos_testkit::local_cluster::LocalCluster;

async fn next(stream: &mut tonic::Streaming<KeyEvent>) -> anyhow::Result<KeyEvent> {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(event))) => Ok(event),
        other => anyhow::bail!("no event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_node_sees_writes_deletes_and_expiry_made_through_another() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let [watcher_node, writer_node] = {
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
        [others[0], others[1]]
    };
    let channel =
        |id: u64| cluster.client_of(id).ok().and_then(|c| c.channel(0)).ok_or_else(|| anyhow::anyhow!("channel"));
    let mut writer = KvServiceClient::new(channel(writer_node)?);
    let put = |key: &str, value: &str, ttl_ms: u64| PutRequest { key: key.into(), value: value.into(), ttl_ms };
    writer.put(put("shared/a", "1", 0)).await?;
    writer.put(put("other/x", "ignored", 0)).await?;

    let mut watcher = KvServiceClient::new(channel(watcher_node)?);
    let mut stream = watcher.watch(WatchKeysRequest { prefix: "shared/".into() }).await?.into_inner();
    let first = next(&mut stream).await?;
    assert_eq!((first.key.as_str(), first.value.as_str(), first.initial), ("shared/a", "1", true));

    writer.put(put("shared/b", "2", 0)).await?;
    let event = next(&mut stream).await?;
    assert_eq!(
        (event.key.as_str(), event.value.as_str(), event.initial, event.deleted),
        ("shared/b", "2", false, false)
    );
    writer.put(put("shared/a", "1b", 0)).await?;
    assert_eq!(next(&mut stream).await?.value, "1b");
    writer.delete(DeleteRequest { key: "shared/b".into() }).await?;
    let deleted = next(&mut stream).await?;
    assert_eq!((deleted.key.as_str(), deleted.deleted), ("shared/b", true));
    writer.put(put("shared/scratch", "tmp", 300)).await?;
    assert_eq!(next(&mut stream).await?.key, "shared/scratch");
    let expired = next(&mut stream).await?;
    assert_eq!((expired.key.as_str(), expired.deleted), ("shared/scratch", true), "the TTL ran out");
    Ok(())
}
