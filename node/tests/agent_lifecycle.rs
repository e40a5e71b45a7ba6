//! Agent pools through the API on a 3-node cluster: list, spawn within `system.max_agents`,
//! pause (no new work), terminate (the running attempt goes elsewhere), resume; and the scoped
//! credential an agent gets in its envelope (its workflow's keys only, while its lease lives;
//! with auth and TLS on, taken by every node over the envelope's `https://` endpoint and CA).

#[path = "support/certs.rs"]
mod certs;
#[path = "support/tasks.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{get, output_of, tasks_client, STEP};
use maos_client::proto::v1::agent_service_client::AgentServiceClient;
use maos_client::proto::v1::kv_service_client::KvServiceClient;
use maos_client::proto::v1::{
    AgentRequest, AgentState, GetRequest, ListAgentsRequest, PutRequest, SpawnAgentRequest, SubmitTaskRequest,
    TaskState,
};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use tonic::transport::Channel;
use tonic::Code;

fn options(pairs: &[(&str, &str)]) -> LocalClusterOptions {
    let mut env = vec![
        ("MAOS_SCHEDULER_LEASE_MS".to_string(), "3000".to_string()),
        ("MAOS_SCHEDULER_LEASE_RENEW_INTERVAL_MS".to_string(), "500".to_string()),
    ];
    env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    LocalClusterOptions { env, ..Default::default() }
}

async fn agent_state(agents: &mut AgentServiceClient<Channel>, agent_id: &str) -> anyhow::Result<(i32, String)> {
    let list = agents.list(ListAgentsRequest::default()).await?.into_inner();
    let agent =
        list.agents.into_iter().find(|a| a.agent_id == agent_id).ok_or_else(|| anyhow::anyhow!("no {agent_id}"))?;
    Ok((agent.state, agent.task_id))
}

async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    while !check().await? {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_spawned_paused_terminated_and_resumed_through_the_api() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let options = options(&[("MAOS_AGENTS_TYPES", "{coder: {slots: 1}}"), ("MAOS_SYSTEM_MAX_AGENTS", "2")]);
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let channel = cluster.client_of(leader)?.channel(0).ok_or_else(|| anyhow::anyhow!("channel"))?;
    let mut agents = AgentServiceClient::new(channel);
    let mut tasks = tasks_client(&cluster, leader)?;
    wait_until("three registered agents", || {
        let mut agents = agents.clone();
        async move { Ok(agents.list(ListAgentsRequest::default()).await?.into_inner().total == 3) }
    })
    .await?;

    // Spawn: one more coder on node 1 fits within max_agents 2; a third does not.
    let spawned = agents.spawn(SpawnAgentRequest { node_id: 1, agent_type: "coder".into() }).await?.into_inner();
    assert_eq!((spawned.agent_id.as_str(), spawned.state), ("n1/coder/1", AgentState::Idle as i32));
    let refused = agents.spawn(SpawnAgentRequest { node_id: 1, agent_type: "coder".into() }).await.expect_err("limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("system.max_agents"), "{}", refused.message());
    let unknown = agents.spawn(SpawnAgentRequest { node_id: 2, agent_type: "poet".into() }).await.expect_err("type");
    assert_eq!(unknown.code(), Code::FailedPrecondition, "a type the node does not run: {unknown:?}");
    let missing = agents.pause(AgentRequest { agent_id: "n9/coder/0".into() }).await.expect_err("unknown agent");
    assert_eq!(missing.code(), Code::NotFound);

    // Pause every coder but node 2's: the work goes there.
    for agent_id in ["n1/coder/0", "n1/coder/1", "n3/coder/0"] {
        let paused = agents.pause(AgentRequest { agent_id: agent_id.into() }).await?.into_inner();
        assert_eq!(paused.state, AgentState::Draining as i32);
    }
    let request = SubmitTaskRequest {
        task_type: "coder".into(),
        description: "long job".into(),
        input: "sleep:3000".into(),
        max_retries: 2,
        ..Default::default()
    };
    let task_id = tasks.submit(request).await?.into_inner().task_id;
    wait_until("the task to run on node 2", || {
        let mut tasks = tasks.clone();
        let task_id = task_id.clone();
        async move { Ok(get(&mut tasks, &task_id).await?.state == TaskState::Running as i32) }
    })
    .await?;
    assert_eq!(get(&mut tasks, &task_id).await?.node_id, 2);
    assert_eq!(agent_state(&mut agents, "n2/coder/0").await?, (AgentState::Busy as i32, task_id.clone()));

    // Terminate the busy agent: its attempt fails and, once node 1 resumes, runs there.
    let terminated = agents.terminate(AgentRequest { agent_id: "n2/coder/0".into() }).await?.into_inner();
    assert_eq!(terminated.state, AgentState::Terminated as i32);
    let view = get(&mut tasks, &task_id).await?;
    assert_eq!(view.state, TaskState::Queued as i32, "{view:?}");
    assert!(view.cause.contains("terminated"), "{view:?}");
    let again = agents.resume(AgentRequest { agent_id: "n2/coder/0".into() }).await.expect_err("terminated stays");
    assert_eq!(again.code(), Code::FailedPrecondition);
    agents.resume(AgentRequest { agent_id: "n1/coder/0".into() }).await?;
    wait_until("the task to complete", || {
        let mut tasks = tasks.clone();
        let task_id = task_id.clone();
        async move { Ok(get(&mut tasks, &task_id).await?.state == TaskState::Completed as i32) }
    })
    .await?;
    let view = get(&mut tasks, &task_id).await?;
    assert_eq!(view.attempt, 2);
    assert!(output_of(&view.result).contains("sleep:3000"), "{}", view.result);
    let result: serde_json::Value = serde_json::from_str(&view.result)?;
    assert_eq!(result["agent"], "n1/coder/0");
    Ok(())
}

/// `agents.types` with one `command` type, `name`: a Python agent that writes its envelope to the
/// file returned, works `seconds`, and succeeds.
fn envelope_keeper(dir: &Path, name: &str, seconds: u32) -> anyhow::Result<(String, std::path::PathBuf)> {
    let script = dir.join(format!("{name}.py"));
    let out = dir.join("envelope.json");
    std::fs::write(
        &script,
        format!(
            "import json, sys, time\nenvelope = json.load(sys.stdin)\nopen({out:?}, 'w').write(json.dumps(envelope))\n\
             time.sleep({seconds})\nprint(json.dumps({{'result': 'done'}}))\n",
            out = out.display().to_string()
        ),
    )?;
    let types =
        format!("{{{name}: {{backend: command, slots: 1, command: [/usr/bin/python3, {}]}}}}", script.display());
    Ok((types, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_credential_reaches_only_its_workflow_while_its_lease_lives() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (types, out) = envelope_keeper(root.path(), "sharer", 4)?;
    let mut cluster = LocalCluster::new(
        Path::new(env!("CARGO_BIN_EXE_maos")),
        root.path(),
        options(&[("MAOS_AGENTS_TYPES", &types)]),
    )?;
    cluster.start_all()?;
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    // The nodes register their pools after a leader is known: wait for them before submitting.
    let client = std::sync::Arc::new(cluster.client()?);
    wait_until("the sharer agents to register", || {
        let client = client.clone();
        async move { Ok(client.agents(0).await?.total >= 3) }
    })
    .await?;
    let mut tasks = tasks_client(&cluster, leader)?;
    let request = SubmitTaskRequest { task_type: "sharer".into(), description: "share".into(), ..Default::default() };
    let task_id = tasks.submit(request).await?.into_inner().task_id;
    wait_until("the agent's envelope", || {
        let out = out.clone();
        async move { Ok(std::fs::read_to_string(&out).is_ok_and(|t| t.ends_with('}'))) }
    })
    .await?;
    let envelope: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    assert_eq!(envelope["task_id"], task_id.as_str());
    let endpoint = envelope["api"]["endpoint"].as_str().unwrap_or_default().to_string();
    let credential = envelope["api"]["credential"].as_str().unwrap_or_default().to_string();
    let mut kv = KvServiceClient::new(Channel::from_shared(endpoint)?.connect().await?);
    let put = |key: &str, credential: &str, ttl_ms: u64| {
        let mut request = tonic::Request::new(PutRequest { key: key.into(), value: "v".into(), ttl_ms });
        request.metadata_mut().insert("authorization", format!("Bearer {credential}").parse().expect("ascii"));
        request
    };
    let own = format!("workflows/{task_id}/notes");
    kv.put(put(&own, &credential, 0)).await?;
    // The SDK's credentials hook does the same.
    let sdk = maos_client::Client::new([envelope["api"]["endpoint"].as_str().unwrap_or_default()])?
        .with_credentials(&credential)?;
    sdk.put(&own, "from the sdk").await?;
    let refused = sdk.put("elsewhere", "x").await.expect_err("outside the workflow");
    assert!(
        matches!(&refused, maos_client::ClientError::Server(s) if s.code() == Code::PermissionDenied),
        "{refused:?}"
    );
    let outside = kv.put(put("workflows/someone-else/notes", &credential, 0)).await.expect_err("outside");
    assert_eq!(outside.code(), Code::PermissionDenied, "{outside:?}");
    let forged = credential.replacen(':', ":1", 2);
    let refused = kv.put(put(&own, &forged, 0)).await.expect_err("forged");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // Shared state with a TTL disappears on its own.
    let scratch = format!("workflows/{task_id}/scratch");
    kv.put(put(&scratch, &credential, 300)).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let gone = kv.get(GetRequest { key: scratch, stale: false }).await?.into_inner();
    assert!(!gone.found, "expired after its TTL");
    // Once the attempt ends the credential is worthless.
    wait_until("the task to complete", || {
        let mut tasks = tasks.clone();
        let task_id = task_id.clone();
        async move { Ok(get(&mut tasks, &task_id).await?.state == TaskState::Completed as i32) }
    })
    .await?;
    let late = kv.put(put(&own, &credential, 0)).await.expect_err("lease over");
    assert_eq!(late.code(), Code::PermissionDenied, "{late:?}");
    Ok(())
}

/// Issue 12: an agent's credential is keyed by the cluster's auth secret (replicated), not by a
/// key its node drew at start, so any node takes it while the lease lives; over TLS the envelope
/// names an `https://` endpoint and the CA that signed the port's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_and_tls_on_an_agent_credential_is_taken_by_every_node() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let (types, out) = envelope_keeper(root.path(), "holder", 6)?;
    let tls = Some(certs::api_tls(root.path())?);
    let options = LocalClusterOptions { auth: true, tls, ..options(&[("MAOS_AGENTS_TYPES", &types)]) };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let client = std::sync::Arc::new(cluster.client()?);
    wait_until("the holder agents to register", || {
        let client = client.clone();
        async move { Ok(client.agents(0).await?.total >= 3) }
    })
    .await?;
    let request = SubmitTaskRequest { task_type: "holder".into(), description: "hold".into(), ..Default::default() };
    let task_id = client.submit(request).await?.task_id;
    wait_until("the agent's envelope", || {
        let out = out.clone();
        async move { Ok(std::fs::read_to_string(&out).is_ok_and(|t| t.ends_with('}'))) }
    })
    .await?;
    let envelope: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let credential = envelope["api"]["credential"].as_str().unwrap_or_default().to_string();
    let own = format!("workflows/{task_id}/notes");
    let endpoint = envelope["api"]["endpoint"].as_str().unwrap_or_default().to_string();
    assert!(endpoint.starts_with("https://"), "the port speaks TLS: {}", envelope["api"]);
    let ca_file = envelope["api"]["ca_file"].as_str().ok_or_else(|| anyhow::anyhow!("no CA: {}", envelope["api"]))?;
    let tls = maos_client::Tls { ca_pem: Some(std::fs::read_to_string(ca_file)?), identity: None };
    let agent = maos_client::Client::new_with_tls([endpoint], Some(&tls))?.with_credentials(&credential)?;
    agent.put(&own, "through the envelope's endpoint").await?;
    for id in 1..=3 {
        let addr = cluster.nodes[&id].api_addr.clone();
        let node = maos_client::Client::new_with_tls([addr], Some(&tls))?.with_credentials(&credential)?;
        node.put(&own, &format!("through node {id}")).await.map_err(|e| anyhow::anyhow!("node {id}: {e}"))?;
    }
    Ok(())
}
