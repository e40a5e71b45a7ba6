//! Behind one address that fronts all three nodes (a TCP load balancer, as users run), a client
//! keeps submitting while the leader is killed: every acknowledged task exists exactly once, and
//! no submit created a second task.

#[path = "support/tasks.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{options, STEP};
use maos_client::proto::v1::{ListTasksRequest, SubmitTaskRequest};
use maos_client::Client;
use maos_testkit::local_cluster::LocalCluster;
use tokio::net::{TcpListener, TcpStream};

/// Submits in the run, at most; and the longest it may take.
const SUBMITS: usize = 300;
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// A round-robin TCP balancer on loopback: each connection goes to the next backend that accepts.
async fn balancer(backends: Vec<String>) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backends = backends.clone();
            let next = next.clone();
            tokio::spawn(async move {
                for _ in 0..backends.len() {
                    let backend = &backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                    if let Ok(mut outbound) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    Ok(address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submits_through_a_balancer_survive_a_leader_kill_without_loss_or_duplicates() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options())?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let backends: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let front = balancer(backends).await?;
    let client = Client::new([front])?.with_deadline(Duration::from_secs(20));
    let deadline = tokio::time::Instant::now() + STEP;
    while client.agents(0).await.map(|a| a.total).unwrap_or(0) < 6 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "agents never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = tokio::time::Instant::now();
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = 0;
    for i in 0..SUBMITS {
        if started.elapsed() > RUN_LIMIT {
            break;
        }
        if i == SUBMITS / 3 {
            cluster.kill(leader)?;
        }
        let key = format!("lb-{i:04}");
        let request = SubmitTaskRequest {
            task_type: "coder".into(),
            description: key.clone(),
            idempotency_key: key.clone(),
            ..Default::default()
        };
        // The SDK retries through the balancer with the same key until its deadline.
        match client.submit(request).await {
            Ok(answer) => {
                acknowledged.insert(key, answer.task_id);
            }
            Err(error) => {
                refused += 1;
                eprintln!("submit {key} not acknowledged: {error}");
            }
        }
    }
    assert!(acknowledged.len() >= SUBMITS * 9 / 10, "{} of {SUBMITS} acknowledged ({refused} not)", acknowledged.len());

    // Read everything back through the balancer.
    // Tasks by idempotency key: the state machine keeps one per key, so also count descriptions.
    let mut by_description: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut request = ListTasksRequest { page_size: 1_000, ..Default::default() };
    loop {
        let page = client.list_tasks(request.clone()).await?;
        for task in page.tasks {
            by_description.entry(task.description.clone()).or_default().push(task.task_id);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    for (key, task_id) in &acknowledged {
        let found = by_description.get(key).cloned().unwrap_or_default();
        assert_eq!(found, vec![task_id.clone()], "acknowledged submit {key}: exactly its task");
    }
    let duplicated: Vec<_> = by_description.iter().filter(|(k, ids)| k.starts_with("lb-") && ids.len() > 1).collect();
    assert!(duplicated.is_empty(), "duplicates: {duplicated:?}");
    Ok(())
}
