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
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    cluster.client()?.put("seen-by-the-new-node", "yes").await?;

    // A fourth node that knows the cluster but is not in it: it waits to be added.
    let (api, raft) = (free_loopback_addr()?, free_loopback_addr()?);
    let data = root.path().join("node-4");
    let peers = format!("{},4={raft}/{api}", cluster.peers_arg());
    let mut fourth = Command::new(binary)
        .args(["serve", "--node-id", "4", "--listen", &api, "--raft-listen", &raft, "--peers", &peers])
        .arg("--data-dir")
        .arg(&data)
        // As the cluster: auth off, so nothing may listen beyond loopback (no dashboard here).
        .env("MAOS_SECURITY_AUTH_ENABLED", "false")
        .env("MAOS_DASHBOARD_ENABLED", "false")
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

        // A node that does not run is not made a voter: openraft's blocking add counts a learner
        // within its lag threshold of a short log as caught up, though it never answered.
        let nowhere = free_loopback_addr()?;
        let args = ["cluster", "add-node", "--id", "5", "--raft-addr", &nowhere, "--api-addr", &nowhere];
        let absent = Command::new(binary).args(args).args(["--endpoints", &endpoint]).output()?;
        let said = String::from_utf8_lossy(&absent.stderr).to_string();
        anyhow::ensure!(
            !absent.status.success() && said.contains("did not catch up"),
            "adding a node that is down: {said}"
        );
        let table = cli(&["cluster", "members", "--endpoints", &endpoint, "--json"])?;
        let members: serde_json::Value = serde_json::from_str(&table)?;
        let fifth = members.as_array().and_then(|m| m.iter().find(|m| m["id"] == 5).cloned());
        anyhow::ensure!(fifth.is_some_and(|m| m["voter"] == false), "node 5 must stay a learner: {table}");
        cli(&["cluster", "remove-node", "5", "--endpoints", &endpoint])?;

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

/// Issue 16: removing the leader (as a new user did, `DELETE /api/v1/cluster/nodes/<leader>`)
/// left it reporting itself as a learner under itself and answering calls after 10 s with "no
/// leader known". A removed node now says at once, on `/ready` and on every call, that it was
/// removed and by which membership change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_leader_knows_it_and_says_so_at_once() -> anyhow::Result<()> {
    use maos_client::proto::v1::kv_service_client::KvServiceClient;
    use maos_client::proto::v1::PutRequest;

    let root = tempfile::tempdir()?;
    let mut cluster =
        LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), LocalClusterOptions::default())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let endpoint = cluster.nodes[&leader].api_addr.clone();
    let http = reqwest::Client::builder().timeout(STEP).build()?;
    let answer = http.delete(format!("http://{endpoint}/api/v1/cluster/nodes/{leader}")).send().await?;
    let status = answer.status();
    anyhow::ensure!(status.is_success(), "removing the leader: {status} {}", answer.text().await?);

    // The others go on under a new leader.
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let (new_leader, _) = cluster.wait_for_leader(&others, STEP).await?;
    assert_ne!(new_leader, leader);
    cluster.client_of(new_leader)?.put("after-the-removal", "written").await?;

    // The removed node says so on /ready.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let ready = http.get(format!("http://{endpoint}/ready")).send().await?;
        let (status, text) = (ready.status(), ready.text().await?);
        if text.contains("was removed from the cluster by the membership change at log index") {
            assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{text}");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let view = cluster.client_of(leader)?.status_of(0, true).await;
            anyhow::bail!("/ready never said node {leader} was removed: {status} {text}\nits view: {view:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And a call to it is refused at once, naming the removal, so a client moves on.
    let channel = cluster.client_of(leader)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let started = tokio::time::Instant::now();
    let refused = KvServiceClient::new(channel)
        .put(PutRequest { key: "to-the-removed-node".into(), value: "x".into(), ttl_ms: 0 })
        .await
        .expect_err("a removed node serves no write");
    assert!(started.elapsed() < Duration::from_secs(3), "the refusal took {:?}", started.elapsed());
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("was removed from the cluster"), "{}", refused.message());
    Ok(())
}
