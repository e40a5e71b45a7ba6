//! `maos cluster add-node / members / remove-node` against a running 3-node cluster.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use maos_testkit::local_cluster::{free_loopback_addr, LocalCluster, LocalClusterOptions};

const STEP: Duration = Duration::from_secs(30);

fn cli(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_maos")).args(args).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(
        output.status.success(),
        "maos {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_as_learner_then_voter_and_leaves() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let binary = Path::new(env!("CARGO_BIN_EXE_maos"));
    let mut cluster = LocalCluster::new(binary, root.path(), LocalClusterOptions::default())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.client()?.put("seen-by-the-new-node", "yes").await?;

    // A fourth node that knows the cluster but is not in it: it waits to be added.
    let (api, raft) = (free_loopback_addr()?, free_loopback_addr()?);
    let data = root.path().join("node-4");
    let peers = format!("{},4={raft}/{api}", cluster.peers_arg());
    let mut fourth = Command::new(binary)
        .args(["serve", "--node-id", "4", "--listen", &api, "--raft-listen", &raft, "--peers", &peers])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;

    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let endpoint = cluster.nodes[&follower].api_addr.clone();
    let result = async {
        let added = cli(&[
            "cluster",
            "add-node",
            "--id",
            "4",
            "--raft-addr",
            &raft,
            "--api-addr",
            &api,
            "--endpoints",
            &endpoint,
            "--json",
        ])?;
        let members: serde_json::Value = serde_json::from_str(&added)?;
        let voters = members.as_array().map(|m| m.iter().filter(|m| m["voter"] == true).count()).unwrap_or(0);
        anyhow::ensure!(voters == 4, "after add-node, 4 voters expected: {added}");

        let fourth_client = maos_client::Client::new([api.clone()])?;
        let read = fourth_client.get("seen-by-the-new-node", false).await?;
        anyhow::ensure!(read.map(|(v, _)| v) == Some("yes".into()), "the new node must serve the cluster's data");

        let table = cli(&["cluster", "members", "--endpoints", &api])?;
        anyhow::ensure!(table.lines().count() == 5 && table.contains(&raft), "members table: {table}");

        let removed = cli(&["cluster", "remove-node", "4", "--endpoints", &endpoint, "--json"])?;
        let members: serde_json::Value = serde_json::from_str(&removed)?;
        anyhow::ensure!(members.as_array().map(|m| m.len()) == Some(3), "after remove-node: {removed}");

        let unknown = Command::new(binary).args(["cluster", "remove-node", "9", "--endpoints", &endpoint]).output()?;
        anyhow::ensure!(!unknown.status.success(), "removing an unknown node must fail");
        anyhow::ensure!(String::from_utf8_lossy(&unknown.stderr).contains("node 9 is not a member"));
        Ok(())
    }
    .await;
    fourth.kill().ok();
    fourth.wait().ok();
    result
}
