//! A node refuses to start, says why and what to do, and writes nothing, when its data dir
//! belongs to another cluster, its id collides with a member's, or a peer address is malformed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use maos_testkit::local_cluster::{free_loopback_addr, free_loopback_port, LocalCluster, LocalClusterOptions};

const STEP: Duration = Duration::from_secs(30);

fn maos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_maos"))
}

/// Every file under `dir` with its bytes, to prove a refused start changed nothing.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    files
}

/// Run `maos serve` with `args`; it must exit non-zero within the deadline. Returns stderr.
fn refused(args: &[&str]) -> anyhow::Result<String> {
    let mut child = maos()
        .arg("serve")
        .args(args)
        .env("MAOS_SYSTEM_LOG_LEVEL", "WARN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            let output = child.wait_with_output()?;
            let stderr = String::from_utf8_lossy(&output.stderr).to_string();
            anyhow::ensure!(!status.success(), "maos serve {args:?} started but should have refused: {stderr}");
            return Ok(stderr);
        }
        if std::time::Instant::now() > deadline {
            child.kill()?;
            anyhow::bail!("maos serve {args:?} kept running; it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `maos serve` arguments for node `id` on `dir` with fresh loopback ports, then `extra`.
fn serve_args(id: &str, dir: &Path, extra: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut args: Vec<String> = ["--node-id", id, "--data-dir"].map(String::from).to_vec();
    args.push(dir.to_string_lossy().into_owned());
    args.extend(["--listen".to_string(), free_loopback_addr()?, "--raft-listen".to_string(), free_loopback_addr()?]);
    args.extend(extra.iter().map(|a| a.to_string()));
    Ok(args)
}

fn refused_serve(id: &str, dir: &Path, extra: &[&str]) -> anyhow::Result<String> {
    let args = serve_args(id, dir, extra)?;
    refused(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn a_malformed_peer_address_is_refused_before_anything_is_written() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    for (peers, named) in [
        ("1=127.0.0.1:70001/127.0.0.1:8001", "cluster.peers[0].raft_addr"),
        ("1=127.0.0.1:7001/nohost", "cluster.peers[0].api_addr"),
        ("1=127.0.0.1:7001", "ID=RAFT_ADDR/API_ADDR"),
    ] {
        let stderr = refused_serve("1", &data, &["--peers", peers])?;
        assert!(stderr.contains(named), "{peers}: error should name {named}: {stderr}");
        assert!(!data.exists(), "{peers}: a refused start must not create the data dir");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colliding_id_or_a_foreign_data_dir_is_refused_and_left_untouched() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let binary = Path::new(env!("CARGO_BIN_EXE_maos"));

    // A one-node cluster of its own, to own a data dir of another cluster.
    let other_root = root.path().join("other");
    let mut other = LocalCluster::new(binary, &other_root, LocalClusterOptions { nodes: 1, ..Default::default() })?;
    other.start_all()?;
    other.wait_for_leader(&[1], STEP).await?;
    let other_data = other.nodes[&1].data_dir.clone();
    let deadline = tokio::time::Instant::now() + STEP;
    while !std::fs::read_to_string(other_data.join("node.json"))?.contains("\"cluster_id\": \"")
        || std::fs::read_to_string(other_data.join("node.json"))?.contains("\"cluster_id\": \"\"")
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the other cluster never recorded its id");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other.stop();

    let mut cluster = LocalCluster::new(binary, &root.path().join("main"), LocalClusterOptions::default())?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    // The cluster id is recorded shortly after the first leader is elected.
    let deadline = tokio::time::Instant::now() + STEP;
    while cluster.status(1).await?.cluster_id.is_empty() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the cluster never recorded its id");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Node id 2 is a member at another address.
    let fresh = root.path().join("fresh");
    let stderr = refused_serve("2", &fresh, &["--peers", &cluster.peers_arg_except(Some(2))])?;
    assert!(stderr.contains("node id 2 is already a member"), "{stderr}");
    assert!(stderr.contains("choose an unused node.id"), "{stderr}");
    assert!(!fresh.exists(), "a refused start must not create the data dir");

    // The other cluster's data dir (node 1 there), pointed at this cluster.
    let before = contents(&other_data);
    let stderr = refused_serve("1", &other_data, &["--peers", &cluster.peers_arg_except(Some(1))])?;
    assert!(stderr.contains("this data is from another cluster"), "{stderr}");
    assert_eq!(contents(&other_data), before, "a refused start must not change the data dir");

    // The same data dir under another cluster name, and under another node id.
    let stderr = refused_serve("1", &other_data, &["--cluster-name", "elsewhere"])?;
    assert!(stderr.contains("belongs to cluster \"maos\""), "{stderr}");
    let stderr = refused_serve("7", &other_data, &[])?;
    assert!(stderr.contains("belongs to node 1"), "{stderr}");
    assert_eq!(contents(&other_data), before, "a refused start must not change the data dir");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_with_different_peer_lists_do_not_form_a_cluster() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster =
        LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), LocalClusterOptions::default())?;
    // Node 3 believes the cluster is nodes 1 and 3 only.
    let partial = cluster.peers_arg_except(Some(2));
    cluster.override_peers(3, partial);
    cluster.start_all()?;
    let deadline = tokio::time::Instant::now() + STEP;
    while !std::fs::read_to_string(&cluster.nodes[&1].log_path)
        .unwrap_or_default()
        .contains("different cluster.peers lists")
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "node 1 never reported the disagreement:\n{}",
            cluster.log_tail(1, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in [1, 2, 3] {
        let status = cluster.status(id).await?;
        assert!(status.members.is_empty() && status.leader_id.is_none(), "node {id} joined a cluster: {status:?}");
    }
    Ok(())
}

#[test]
fn a_port_in_use_is_refused_naming_the_address_and_the_listener() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind(free_loopback_addr()?)?;
    let addr = taken.local_addr()?.to_string();
    let raft = free_loopback_addr()?;
    let peers = format!("1={raft}/{addr}");
    let data = root.path().join("data");
    let data_arg = data.to_string_lossy();
    let args =
        ["--node-id", "1", "--data-dir", &data_arg, "--listen", &addr, "--raft-listen", &raft, "--peers", &peers];
    let stderr = refused(&args)?;
    assert!(stderr.contains(&format!("cannot listen on {addr} (client API)")), "{stderr}");
    assert!(stderr.contains("is another process using the port?"), "{stderr}");
    // The cause is printed once, not repeated as a second source.
    assert_eq!(stderr.matches("Address already in use").count(), 1, "{stderr}");
    Ok(())
}

#[test]
fn test_ports_come_from_below_the_ephemeral_range_and_never_repeat_in_a_process() -> anyhow::Result<()> {
    // An outgoing connection's source port comes from the ephemeral range; a port planned for a
    // node there can be taken between planning and binding, and the node then fails to start.
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let first: u16 = range.split_whitespace().next().unwrap_or_default().parse()?;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let port = free_loopback_port()?;
        assert!(port < first, "{port} is inside the ephemeral range starting at {first}");
        assert!(seen.insert(port), "{port} handed out twice");
    }
    Ok(())
}
