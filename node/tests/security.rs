//! Auth on port 8000 with a real 3-node cluster (auth on): the bootstrap token, API keys per
//! role, every gRPC method (enumerated by server reflection) and every REST route (enumerated
//! from the OpenAPI document) refused without a credential and allowed to an admin, the viewer's
//! reach, submitters seeing only their own tasks and no fencing tokens, a revoked and an expired
//! key refused on every node within a second, and no secret in any node's log; the Raft port
//! (the cluster secret, and Propose refusing what only a leader proposes); JWTs of a configured
//! issuer; and the limits on port 8000: a caller over `security.rate_limit` answered
//! RESOURCE_EXHAUSTED (429 over REST) with when to retry, counted in a real Redis so the limit
//! holds across nodes and per node while Redis is down, calls without a valid credential limited
//! by source and not flooding the log, and "busy" past `network.max_concurrent_requests`.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use maos_client::proto::v1::auth_service_client::AuthServiceClient;
use maos_client::proto::v1::kv_service_client::KvServiceClient;
use maos_client::proto::v1::{
    CreateKeyRequest, ListAuditRequest, ListTasksRequest, PutRequest, RevokeKeyRequest, SubmitTaskRequest,
    WhoAmIRequest,
};
use maos_client::{Client, ClientError};
use maos_raft_store::tasks::TaskCommand;
use maos_raft_store::Command;
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions};
use maos_testkit::local_services::Redis;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const STEP: Duration = Duration::from_secs(60);

/// The gRPC methods a viewer may call (docs/SECURITY.md): reads only.
const VIEWER_METHODS: &[&str] = &[
    "maos.v1.TaskService/Get",
    "maos.v1.TaskService/List",
    "maos.v1.TaskService/Results",
    "maos.v1.TaskService/Watch",
    "maos.v1.AgentService/List",
    "maos.v1.ClusterService/Status",
    "maos.v1.KvService/Get",
    "maos.v1.KvService/Watch",
    "maos.v1.AuthService/WhoAmI",
];

/// Methods whose call with an empty request would change the cluster under the test (a
/// leadership transfer): checked for refusals only.
const DISRUPTIVE: &[&str] = &["maos.v1.ClusterService/TransferLeader"];

/// The Raft port's payload (`node/proto/maos/raft/v1/raft.proto`): JSON with a format version.
#[derive(Clone, PartialEq, prost::Message)]
struct RaftPayload {
    #[prost(uint32, tag = "1")]
    format_version: u32,
    #[prost(bytes = "vec", tag = "2")]
    json: Vec<u8>,
}

/// A codec of raw message bytes, so any method can be called with an empty message.
#[derive(Clone, Default)]
struct Raw;
struct RawCoder;

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len).to_vec()))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

/// Call `method` with one empty message; the code it answered (OK when a stream opened).
async fn call(channel: &Channel, method: &str, token: Option<&str>) -> anyhow::Result<Code> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    let mut request = tonic::Request::new(tokio_stream::once(Vec::<u8>::new()));
    request.set_timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    match grpc.streaming(request, PathAndQuery::from_str(&format!("/{method}"))?, Raw).await {
        Err(status) => Ok(status.code()),
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Err(status)) => Ok(status.code()),
                Ok(Ok(_)) | Err(_) => Ok(Code::Ok),
            }
        }
    }
}

/// Every method of every service the node's reflection lists.
async fn reflected_methods(channel: &Channel) -> anyhow::Result<Vec<String>> {
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let ask = |message| ServerReflectionRequest { host: String::new(), message_request: Some(message) };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([ask(MessageRequest::ListServices(String::new()))]))
        .await?
        .into_inner();
    let answer = answers.message().await?.ok_or_else(|| anyhow::anyhow!("no reflection answer"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("unexpected reflection answer")
    };
    let mut methods = Vec::new();
    for service in list.service.into_iter().map(|s| s.name) {
        let request = ask(MessageRequest::FileContainingSymbol(service.clone()));
        let mut answers = reflection.server_reflection_info(futures::stream::iter([request])).await?.into_inner();
        let answer = answers.message().await?.ok_or_else(|| anyhow::anyhow!("no answer for {service}"))?;
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
            anyhow::bail!("no descriptors for {service}")
        };
        let (package, name) = service.rsplit_once('.').unwrap_or(("", service.as_str()));
        for bytes in files.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice())?;
            if file.package() != package {
                continue;
            }
            for described in file.service.iter().filter(|s| s.name() == name) {
                methods.extend(described.method.iter().map(|m| format!("{service}/{}", m.name())));
            }
        }
    }
    methods.sort();
    methods.dedup();
    Ok(methods)
}

/// The REST routes of the OpenAPI document, with sample path parameters.
async fn documented_routes(http: &reqwest::Client, base: &str) -> anyhow::Result<Vec<(String, String)>> {
    let document: serde_json::Value = http.get(format!("{base}/api/v1/openapi.json")).send().await?.json().await?;
    let paths = document["paths"].as_object().ok_or_else(|| anyhow::anyhow!("no paths in the document"))?;
    let mut routes = Vec::new();
    for (template, operations) in paths {
        let path = template
            .replace("{task_id}", "0190-nope")
            .replace("{agent_id}", "nope")
            .replace("{action}", "pause")
            .replace("{id}", "99");
        for method in operations.as_object().into_iter().flat_map(|o| o.keys()) {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    anyhow::ensure!(routes.len() >= 15, "the document lists only {} operations", routes.len());
    Ok(routes)
}

async fn rest(
    http: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<u16> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut request = http.request(method.clone(), format!("{base}{path}")).timeout(Duration::from_secs(10));
    if method != reqwest::Method::GET {
        request = request.header("content-type", "application/json").body("{}");
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    // An event stream opens and stays open: its status is what counts.
    Ok(request.send().await?.status().as_u16())
}

/// GET `path` with `token`: the status and the JSON body.
async fn rest_body(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let answer = http.get(format!("{base}{path}")).bearer_auth(token).timeout(Duration::from_secs(10)).send().await?;
    let status = answer.status().as_u16();
    Ok((status, answer.json().await.unwrap_or_default()))
}

async fn create_key(channel: &Channel, admin: &str, role: &str, expires_in_s: u64) -> anyhow::Result<String> {
    let client = Client::from_channels(vec![("node".into(), channel.clone())])?.with_credentials(admin)?;
    let mut auth = AuthServiceClient::with_interceptor(channel.clone(), client.authorization());
    let answer =
        auth.create_key(CreateKeyRequest { name: format!("test-{role}"), role: role.into(), expires_in_s }).await?;
    Ok(answer.into_inner().secret)
}

fn who(
    channel: &Channel,
    token: &str,
) -> anyhow::Result<
    AuthServiceClient<tonic::service::interceptor::InterceptedService<Channel, maos_client::Authorization>>,
> {
    let client = Client::from_channels(vec![("node".into(), channel.clone())])?.with_credentials(token)?;
    Ok(AuthServiceClient::with_interceptor(channel.clone(), client.authorization()))
}

/// Wait until `token` is refused (UNAUTHENTICATED) by every node; how long that took.
async fn refused_everywhere(channels: &[Channel], token: &str, since: Instant) -> anyhow::Result<Duration> {
    for channel in channels {
        loop {
            match who(channel, token)?.who_am_i(WhoAmIRequest {}).await {
                Err(status) if status.code() == Code::Unauthenticated => break,
                _ if since.elapsed() > Duration::from_secs(10) => {
                    anyhow::bail!("a node still accepts the key after 10 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    Ok(since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_authenticated_and_checked_against_one_table() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let options = LocalClusterOptions { auth: true, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    let admin = cluster.wait_for_bootstrap_token(STEP).await?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;

    // The bootstrap token: written once, readable by its owner only.
    let path = cluster.bootstrap_token_path().ok_or_else(|| anyhow::anyhow!("no token file"))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "{} has mode {mode:o}", path.display());
    assert!(admin.starts_with("maos_"), "the token is recognisable in a leak scan");

    let channels: Vec<Channel> = (1..=3)
        .map(|id| cluster.client_of(id).and_then(|c| c.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))))
        .collect::<Result<_, _>>()?;
    let first = &channels[0];
    let base = format!("http://{}", cluster.nodes[&1].api_addr);
    let http = reqwest::Client::new();

    // The ways in that were open before: no credential, and a garbage one.
    let endpoints: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();
    let anonymous = Client::new(endpoints.clone())?.with_deadline(Duration::from_secs(5));
    let submit = SubmitTaskRequest { task_type: "coder".into(), description: "x".into(), ..Default::default() };
    match anonymous.submit(submit.clone()).await {
        Err(ClientError::Server(status)) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
        other => panic!("an anonymous submit must be refused: {other:?}"),
    }
    assert_eq!(rest(&http, &base, "DELETE", "/api/v1/cluster/nodes/1", None).await?, 401);
    assert_eq!(rest(&http, &base, "DELETE", "/api/v1/cluster/nodes/1", Some("garbage")).await?, 401);
    assert_eq!(call(first, "maos.v1.TaskService/Submit", Some("garbage")).await?, Code::Unauthenticated);
    assert_eq!(call(first, "maos.v1.KvService/Put", Some("garbage")).await?, Code::Unauthenticated);
    for public in ["/health", "/ready", "/metrics", "/api/v1/openapi.json"] {
        assert_eq!(rest(&http, &base, "GET", public, None).await?, 200, "{public} stays public");
    }

    let viewer = create_key(first, &admin, "viewer", 0).await?;
    let submitter = create_key(first, &admin, "submitter", 0).await?;
    let other_submitter = create_key(first, &admin, "submitter", 0).await?;
    let worker = create_key(first, &admin, "worker", 0).await?;
    let operator = create_key(first, &admin, "operator", 0).await?;

    // Every gRPC method: refused without a credential, allowed to an admin, the viewer's
    // reach exactly the read methods.
    let methods = reflected_methods(first).await?;
    assert!(methods.len() >= 35, "reflection listed only {methods:?}");
    for method in &methods {
        let public = method.starts_with("grpc.");
        let none = call(first, method, None).await?;
        if public {
            assert_ne!(none, Code::Unauthenticated, "{method} is public");
            continue;
        }
        assert_eq!(none, Code::Unauthenticated, "{method} without a credential");
        if !DISRUPTIVE.contains(&method.as_str()) {
            let as_admin = call(first, method, Some(&admin)).await?;
            assert!(
                !matches!(as_admin, Code::Unauthenticated | Code::PermissionDenied),
                "{method} refused an admin ({as_admin:?}): does it have a row in api/auth.rs's table?"
            );
        }
        let as_viewer = call(first, method, Some(&viewer)).await?;
        if VIEWER_METHODS.contains(&method.as_str()) {
            assert!(
                !matches!(as_viewer, Code::Unauthenticated | Code::PermissionDenied),
                "{method} as a viewer: {as_viewer:?}"
            );
        } else {
            assert_eq!(as_viewer, Code::PermissionDenied, "{method} as a viewer");
        }
    }
    // Some rows that matter most, role by role.
    for (method, token, expected_refused) in [
        ("maos.v1.ClusterService/RemoveNode", &operator, true),
        ("maos.v1.AuthService/CreateKey", &operator, true),
        ("maos.v1.AuthService/CreateKey", &submitter, true),
        ("maos.v1.TaskService/Retry", &submitter, true),
        ("maos.v1.AgentService/Terminate", &submitter, true),
        ("maos.v1.TaskService/Get", &worker, true),
        ("maos.v1.WorkerService/Heartbeat", &worker, false),
        ("maos.v1.TaskService/Submit", &submitter, false),
        ("maos.v1.AgentService/Pause", &operator, false),
    ] {
        let code = call(first, method, Some(token)).await?;
        assert_eq!(code == Code::PermissionDenied, expected_refused, "{method}: {code:?}");
    }

    // Every REST route of the document: 401 without a credential, never refused to an admin;
    // a viewer reads (GET) and changes nothing.
    for (method, path) in documented_routes(&http, &base).await? {
        let public = matches!(path.as_str(), "/health" | "/ready" | "/api/v1/openapi.json");
        let none = rest(&http, &base, &method, &path, None).await?;
        // /ready may answer 503 while a node catches up; never 401.
        assert_eq!(none == 401, !public, "{method} {path} without a credential: {none}");
        if path != "/api/v1/cluster/leader" {
            let as_admin = rest(&http, &base, &method, &path, Some(&admin)).await?;
            assert!(!matches!(as_admin, 401 | 403), "{method} {path} refused an admin ({as_admin})");
        }
        let as_viewer = rest(&http, &base, &method, &path, Some(&viewer)).await?;
        assert_eq!(as_viewer == 403, method != "GET", "{method} {path} as a viewer: {as_viewer}");
    }

    // The audit: refused authentications, key changes and control-plane calls, with who and
    // the outcome (embedded: node 1's audit.jsonl, where these calls went).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = ListAuditRequest { since_ms: 0, principal: String::new(), limit: 1_000 };
        let entries = who(first, &admin)?.list_audit(request).await?.into_inner().entries;
        let has = |action: &str, target: &str| entries.iter().any(|e| e.action == action && e.target.contains(target));
        let complete = has("auth.refused", "DELETE /api/v1/cluster/nodes/1")
            && has("auth.key.create", "")
            && has("call", "maos.v1.ClusterService/RemoveNode");
        if complete {
            // Each refusal names where it came from (the test's own loopback connection).
            let refused = entries.iter().find(|e| e.action == "auth.refused").map(|e| e.detail_json.clone());
            assert!(refused.as_deref().is_some_and(|d| d.contains("127.0.0.1:")), "refusal's source: {refused:?}");
            let created = entries.iter().find(|e| e.action == "auth.key.create").map(|e| e.principal.clone());
            assert!(created.is_some_and(|p| p.starts_with("key:")), "keys are created by the bootstrap admin's key");
            break;
        }
        assert!(Instant::now() < deadline, "the audit lacks entries: {entries:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A task records who submitted it; another submitter cannot see or cancel it.
    let mine = Client::new(endpoints.clone())?.with_credentials(&submitter)?;
    let theirs = Client::new(endpoints.clone())?.with_credentials(&other_submitter)?;
    let mut request = submit.clone();
    request.submitter = "someone-else".into();
    let task = mine.submit(request).await?.task_id;
    let view = mine.task(&task).await?;
    assert!(view.submitter.starts_with("key:"), "recorded submitter {:?}", view.submitter);
    assert!(matches!(theirs.task(&task).await, Err(ClientError::NotFound(_))));
    assert!(matches!(theirs.cancel(&task, "not mine").await, Err(ClientError::NotFound(_))));
    let admin_client = cluster.client()?;
    assert_eq!(admin_client.task(&task).await?.task_id, task, "an admin sees every task");

    // A running task's fencing token: shown to operators and admins, 0 to its submitter and viewers.
    let mut slow = submit.clone();
    slow.input = "sleep:20000".into();
    let slow = mine.submit(slow).await?.task_id;
    let deadline = Instant::now() + STEP;
    let token = loop {
        let view = admin_client.task(&slow).await?;
        if view.fencing_token > 0 {
            break view.fencing_token;
        }
        assert!(Instant::now() < deadline, "the slow task never ran: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let as_operator = Client::new(endpoints.clone())?.with_credentials(&operator)?;
    let as_viewer = Client::new(endpoints.clone())?.with_credentials(&viewer)?;
    assert_eq!(as_operator.task(&slow).await?.fencing_token, token, "an operator sees the token");
    assert_eq!(mine.task(&slow).await?.fencing_token, 0, "the submitter does not");
    assert_eq!(as_viewer.task(&slow).await?.fencing_token, 0, "a viewer does not");
    let listed = as_viewer.list_tasks(ListTasksRequest { page_size: 1_000, ..Default::default() }).await?;
    assert!(listed.tasks.iter().any(|t| t.task_id == slow), "the viewer lists the task");
    assert!(listed.tasks.iter().all(|t| t.fencing_token == 0), "a viewer's list shows no token");
    let (status, body) = rest_body(&http, &base, &format!("/api/v1/tasks/{slow}"), &viewer).await?;
    assert_eq!((status, body["fencing_token"].as_u64()), (200, Some(0)), "REST as a viewer: {body}");
    let (_, body) = rest_body(&http, &base, &format!("/api/v1/tasks/{slow}"), &operator).await?;
    assert_eq!(body["fencing_token"].as_u64(), Some(token), "REST as an operator: {body}");
    admin_client.cancel(&slow, "done with it").await?;

    // A client session is its opener's: another principal sending on it is refused, and the
    // opener's own write on it goes through.
    let opened: serde_json::Value = http
        .post(format!("{base}/api/v1/sessions"))
        .bearer_auth(&submitter)
        .json(&serde_json::json!({}))
        .send()
        .await?
        .json()
        .await?;
    let session = opened["session_id"].as_u64().ok_or_else(|| anyhow::anyhow!("no session: {opened}"))?;
    let submit_on_session = |token: &str| {
        http.post(format!("{base}/api/v1/tasks"))
            .bearer_auth(token)
            .header("maos-session", format!("{session}/1/0"))
            .json(&serde_json::json!({"task_type": "coder", "description": "on a session"}))
            .send()
    };
    let stolen = submit_on_session(&other_submitter).await?;
    let (status, said) = (stolen.status().as_u16(), stolen.text().await?);
    assert_eq!(status, 403, "another submitter wrote on the session: {said}");
    assert!(said.contains("opened by another principal"), "{said}");
    let own = submit_on_session(&submitter).await?;
    assert_eq!(own.status().as_u16(), 201, "{}", own.text().await?);

    // A revoked key is refused by every node within a second.
    let revoked = create_key(first, &admin, "viewer", 0).await?;
    who(first, &revoked)?.who_am_i(WhoAmIRequest {}).await?;
    let id = revoked.split('_').nth(1).unwrap_or_default().to_string();
    let started = Instant::now();
    who(first, &admin)?.revoke_key(RevokeKeyRequest { id }).await?;
    let took = refused_everywhere(&channels, &revoked, started).await?;
    println!("revoked key refused on all 3 nodes {} ms after the revoke was sent", took.as_millis());
    assert!(took < Duration::from_secs(1), "refused after {took:?}");

    // An expired key too.
    let short = create_key(first, &admin, "viewer", 1).await?;
    who(first, &short)?.who_am_i(WhoAmIRequest {}).await?;
    let created = Instant::now();
    let took = refused_everywhere(&channels, &short, created).await?;
    assert!(took < Duration::from_secs(2), "a 1 s key refused after {took:?}");

    // No secret reached a log.
    for (id, node) in &cluster.nodes {
        let log = std::fs::read_to_string(&node.log_path)?;
        for secret in [&admin, &viewer, &submitter, &other_submitter, &worker, &operator, &revoked, &short] {
            let secret_part = secret.rsplit('_').next().unwrap_or(secret);
            assert!(!log.contains(secret_part), "node {id}'s log holds a key's secret");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_off_is_explicit_and_loopback_only() -> anyhow::Result<()> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_maos"))
        .args(["config", "validate"])
        .env("MAOS_SECURITY_AUTH_ENABLED", "false")
        .env("MAOS_NETWORK_LISTEN_ADDR", "0.0.0.0:8000")
        .env("MAOS_DASHBOARD_LISTEN", "127.0.0.1:3001")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "auth off on 0.0.0.0 must be refused");
    assert!(stderr.contains("network.listen_addr") && stderr.contains("security.allow_insecure"), "{stderr}");
    let allowed = std::process::Command::new(env!("CARGO_BIN_EXE_maos"))
        .args(["config", "validate"])
        .env("MAOS_SECURITY_AUTH_ENABLED", "false")
        .env("MAOS_SECURITY_ALLOW_INSECURE", "true")
        .env("MAOS_NETWORK_LISTEN_ADDR", "0.0.0.0:8000")
        .output()?;
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_port_takes_only_calls_that_carry_the_cluster_secret() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let secret_file = root.path().join("cluster-secret");
    let secret = "4f0c0a3e9b7d1c2e5a6b8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
    std::fs::write(&secret_file, format!("{secret}\n"))?;
    let env = vec![("MAOS_SECURITY_CLUSTER_SECRET_FILE".to_string(), secret_file.display().to_string())];
    let options = LocalClusterOptions { env, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    // The members carry the secret: the cluster forms and replicates.
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    cluster.client()?.put("secret-test", "replicated").await?;
    cluster.wait_for_same_state(&[1, 2, 3], STEP).await?;

    // A stranger on the Raft port gets nothing, not even Hello.
    let raft =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[&1].raft_addr))?.connect().await?;
    for method in
        ["maos.raft.v1.RaftService/Propose", "maos.raft.v1.RaftService/Hello", "maos.raft.v1.RaftService/AppendEntries"]
    {
        assert_eq!(call(&raft, method, None).await?, Code::Unauthenticated, "{method} without the secret");
    }
    let mut grpc = tonic::client::Grpc::new(raft.clone());
    grpc.ready().await?;
    let mut request = tonic::Request::new(tokio_stream::once(Vec::<u8>::new()));
    request.metadata_mut().insert("x-maos-cluster-secret", secret.parse()?);
    let path = PathAndQuery::from_str("/maos.raft.v1.RaftService/Hello")?;
    let answered = grpc.streaming(request, path, Raw).await?.into_inner().message().await;
    assert!(answered.is_ok(), "Hello with the secret: {answered:?}");

    // Even with the secret, Propose takes only what a member forwards on a client's behalf:
    // a scheduling round, an expiry or an eviction is the leader's own, never forwarded.
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    let to_leader = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[&leader].raft_addr))?
        .connect()
        .await?;
    let propose = |commands: Vec<Command>| {
        let (channel, secret) = (to_leader.clone(), secret.to_string());
        async move {
            let payload = RaftPayload { format_version: 1, json: serde_json::to_vec(&commands)? };
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await?;
            let mut request = tonic::Request::new(tokio_stream::once(payload.encode_to_vec()));
            request.metadata_mut().insert("x-maos-cluster-secret", secret.parse()?);
            let path = PathAndQuery::from_str("/maos.raft.v1.RaftService/Propose")?;
            let bytes = grpc.streaming(request, path, Raw).await?.into_inner().message().await?.unwrap_or_default();
            let answer = RaftPayload::decode(bytes.as_slice())?;
            anyhow::Ok(String::from_utf8_lossy(&answer.json).to_string())
        }
    };
    let leaders_own = vec![
        Command::Task(TaskCommand::Tick),
        Command::Task(TaskCommand::ExtendLeases { by_ms: 60_000 }),
        Command::Task(TaskCommand::Evict { tasks: vec![("t".into(), 1)] }),
        Command::InitCluster { cluster_id: "forged".into(), cluster_name: "maos".into() },
    ];
    let answer = propose(leaders_own).await?;
    assert_eq!(answer.matches("proposed only by the leader itself").count(), 4, "{answer}");
    let answer = propose(vec![Command::KvPut { key: "forwarded".into(), value: "v".into(), ttl_ms: None }]).await?;
    assert!(answer.contains("kv_written"), "a client's write is forwarded: {answer}");

    let log = cluster.log_tail(1, 400);
    assert!(!log.contains(secret), "the secret is never logged");
    Ok(())
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_of_a_configured_issuer_are_principals_and_are_refused_once_expired() -> anyhow::Result<()> {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    let root = tempfile::tempdir()?;
    let signer = EncodingKey::from_ec_der(&rcgen::KeyPair::generate()?.serialize_der());
    let stranger = EncodingKey::from_ec_der(&rcgen::KeyPair::generate()?.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&signer, Algorithm::ES256)?;
    jwk.common.key_id = Some("k1".into());
    let jwks = root.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_string(&JwkSet { keys: vec![jwk] })?)?;
    let issuers = format!("[{{issuer: 'https://idp.test', audience: maos, jwks_file: '{}'}}]", jwks.display());
    let env = vec![("MAOS_SECURITY_JWT_ISSUERS".to_string(), issuers)];
    let options = LocalClusterOptions { auth: true, env, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    cluster.wait_for_bootstrap_token(STEP).await?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let channels: Vec<Channel> = (1..=3)
        .map(|id| cluster.client_of(id).and_then(|c| c.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))))
        .collect::<Result<_, _>>()?;
    let endpoints: Vec<String> = cluster.nodes.values().map(|n| n.api_addr.clone()).collect();

    let now = unix_now();
    let sign = |key: &EncodingKey, kid: &str, claims: serde_json::Value| -> anyhow::Result<String> {
        let header = Header { kid: Some(kid.into()), ..Header::new(Algorithm::ES256) };
        Ok(jsonwebtoken::encode(&header, &claims, key)?)
    };
    let claims = |sub: &str, roles: serde_json::Value| serde_json::json!({"sub": sub, "iss": "https://idp.test", "aud": "maos", "nbf": now - 1, "exp": now + 600, "roles": roles});

    // A viewer and a submitter from the identity provider.
    let viewer = sign(&signer, "k1", claims("alice", serde_json::json!(["viewer"])))?;
    let me = who(&channels[0], &viewer)?.who_am_i(WhoAmIRequest {}).await?.into_inner();
    assert_eq!((me.principal.as_str(), me.roles), ("jwt:https://idp.test:alice", vec!["viewer".to_string()]));
    let as_viewer = Client::new(endpoints.clone())?.with_credentials(&viewer)?;
    let submit = SubmitTaskRequest { task_type: "coder".into(), description: "x".into(), ..Default::default() };
    match as_viewer.submit(submit.clone()).await {
        Err(ClientError::Server(status)) => assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
        other => panic!("a viewer's submit must be refused: {other:?}"),
    }
    let submitter = sign(&signer, "k1", claims("bob", serde_json::json!("submitter")))?;
    let as_submitter = Client::new(endpoints.clone())?.with_credentials(&submitter)?;
    let task = as_submitter.submit(submit).await?.task_id;
    assert_eq!(
        as_submitter.task(&task).await?.submitter,
        "jwt:https://idp.test:bob",
        "the task records the JWT's principal"
    );
    let http = reqwest::Client::new();
    let base = format!("http://{}", cluster.nodes[&2].api_addr);
    let (status, _) = rest_body(&http, &base, "/api/v1/cluster", &viewer).await?;
    assert_eq!(status, 200, "REST takes the JWT too");

    // Refused: each required claim wrong or missing, a stranger's signature, an unknown key.
    let mut without_sub = claims("carol", serde_json::json!(["viewer"]));
    without_sub.as_object_mut().map(|c| c.remove("sub"));
    let mut cases = vec![("no sub", sign(&signer, "k1", without_sub)?)];
    for (what, field, value) in [
        ("expired", "exp", serde_json::json!(now - 10)),
        ("not yet valid", "nbf", serde_json::json!(now + 120)),
        ("another audience", "aud", serde_json::json!("other")),
        ("another issuer", "iss", serde_json::json!("https://evil.test")),
        ("no MAOS role", "roles", serde_json::json!(["root"])),
    ] {
        let mut wrong = claims("carol", serde_json::json!(["admin"]));
        wrong[field] = value;
        cases.push((what, sign(&signer, "k1", wrong)?));
    }
    cases.push(("a stranger's signature", sign(&stranger, "k1", claims("carol", serde_json::json!(["admin"])))?));
    cases.push(("an unknown kid", sign(&signer, "k9", claims("carol", serde_json::json!(["admin"])))?));
    for (what, token) in &cases {
        match who(&channels[0], token)?.who_am_i(WhoAmIRequest {}).await {
            Err(status) => assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}"),
            Ok(answer) => panic!("{what}: accepted as {:?}", answer.into_inner().principal),
        }
    }

    // A token is refused on every node within a second of its expiry.
    let exp = unix_now() + 2;
    let mut short = claims("dave", serde_json::json!(["viewer"]));
    short["exp"] = serde_json::json!(exp);
    let short = sign(&signer, "k1", short)?;
    for channel in &channels {
        who(channel, &short)?.who_am_i(WhoAmIRequest {}).await?;
    }
    let expires_in = std::time::UNIX_EPOCH + Duration::from_secs(exp as u64);
    tokio::time::sleep(expires_in.duration_since(std::time::SystemTime::now()).unwrap_or_default()).await;
    let took = refused_everywhere(&channels, &short, Instant::now()).await?;
    println!("an expired JWT refused on all 3 nodes {} ms after its exp", took.as_millis());
    assert!(took < Duration::from_secs(1), "refused {took:?} after its exp");

    for (id, node) in &cluster.nodes {
        let log = std::fs::read_to_string(&node.log_path)?;
        let signature = viewer.rsplit('.').next().unwrap_or_default();
        assert!(!log.contains(signature), "node {id}'s log holds a JWT");
    }
    Ok(())
}

// Limits on port 8000.

const RATE: f64 = 5.0;
const BURST: u64 = 10;

/// `calls` WhoAmI calls with `token`, spread over `channels` in turn: how many were answered,
/// the refusals (all must be RESOURCE_EXHAUSTED), and how long the calls took.
async fn burst(channels: &[Channel], token: &str, calls: usize) -> anyhow::Result<(u64, Vec<tonic::Status>, Duration)> {
    let started = Instant::now();
    let (mut answered, mut refused) = (0, Vec::new());
    for i in 0..calls {
        match who(&channels[i % channels.len()], token)?.who_am_i(WhoAmIRequest {}).await {
            Ok(_) => answered += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "a refusal other than the limit: {status:?}");
                refused.push(status);
            }
        }
    }
    Ok((answered, refused, started.elapsed()))
}

/// The most calls a caller may make in `elapsed` (its burst, the rate, one interval of slack).
fn allowed_within(elapsed: Duration) -> u64 {
    BURST + (RATE * elapsed.as_secs_f64()).ceil() as u64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_is_told_when_to_retry_on_every_node() -> anyhow::Result<()> {
    let mut redis = Redis::start()?;
    let root = tempfile::tempdir()?;
    let env = vec![
        ("MAOS_REDIS_URL".to_string(), redis.url()),
        ("MAOS_SECURITY_RATE_LIMIT_REQUESTS_PER_SECOND".to_string(), RATE.to_string()),
        ("MAOS_SECURITY_RATE_LIMIT_BURST".to_string(), BURST.to_string()),
    ];
    let options = LocalClusterOptions { auth: true, env, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    // As the demo does: wait for a leader first (the testkit then waits for the token itself).
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let admin = cluster.bootstrap_token().ok_or_else(|| anyhow::anyhow!("no bootstrap token"))?;
    let channels: Vec<Channel> = (1..=3)
        .map(|id| cluster.client_of(id).and_then(|c| c.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))))
        .collect::<Result<_, _>>()?;
    let request = CreateKeyRequest { name: "limited".into(), role: "submitter".into(), expires_in_s: 0 };
    let key = who(&channels[0], &admin)?.create_key(request).await?.into_inner().secret;
    // Let the new key reach every node, then let the admin's bucket refill.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Counted in Redis: three nodes together allow one burst, not one each.
    let (answered, refused, took) = burst(&channels, &key, 30).await?;
    println!("30 calls over 3 nodes in {} ms: {answered} answered, {} refused", took.as_millis(), refused.len());
    assert!(answered >= BURST, "only {answered} of the burst of {BURST} answered");
    assert!(answered <= allowed_within(took), "{answered} answered in {took:?}: the limit is not cluster-wide");
    let status = refused.first().ok_or_else(|| anyhow::anyhow!("nothing was refused"))?;
    assert!(status.message().contains("security.rate_limit"), "{status:?}");
    let retry_after: u64 =
        status.metadata().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    assert!((1..=2).contains(&retry_after), "retry-after {retry_after}: {status:?}");

    // Another principal has its own limit.
    who(&channels[1], &admin)?.who_am_i(WhoAmIRequest {}).await?;

    // REST: 429 with a Retry-After header.
    let http = reqwest::Client::new();
    let base = format!("http://{}", cluster.nodes[&2].api_addr);
    let mut limited = None;
    for _ in 0..3 * BURST {
        let answer = http.get(format!("{base}/api/v1/tasks")).bearer_auth(&key).send().await?;
        if answer.status() == 429 {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.ok_or_else(|| anyhow::anyhow!("REST never answered 429"))?;
    let header = limited.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert!(header.is_some_and(|s| s >= 1), "Retry-After: {header:?}");
    let body: serde_json::Value = limited.json().await?;
    assert_eq!(body["error"]["code"], "RESOURCE_EXHAUSTED", "{body}");

    // After the wait it was told, the caller is served again.
    tokio::time::sleep(Duration::from_secs(retry_after.max(1))).await;
    who(&channels[0], &key)?.who_am_i(WhoAmIRequest {}).await?;

    // Calls without a valid credential are limited by their source, and logged only while under it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // No call was refused so far: not the nodes' own (the dashboard asks members over the Raft
    // port), nor the harness's while it waited for a leader.
    for id in 1..=3 {
        let refused = cluster.log_tail(id, 100_000).matches("auth.refused").count();
        assert_eq!(refused, 0, "node {id} refused calls before any without a credential was made");
    }
    let mut codes = Vec::new();
    for _ in 0..40 {
        let answer = who(&channels[0], "maos_0000000000000000_nope")?.who_am_i(WhoAmIRequest {}).await;
        codes.push(answer.err().map(|s| s.code()));
    }
    let unauthenticated = codes.iter().filter(|c| **c == Some(Code::Unauthenticated)).count();
    let exhausted = codes.iter().filter(|c| **c == Some(Code::ResourceExhausted)).count();
    assert_eq!(unauthenticated + exhausted, 40, "{codes:?}");
    assert!(exhausted > 0 && unauthenticated as u64 <= allowed_within(Duration::from_secs(8)), "{codes:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logged = cluster.log_tail(1, 100_000).matches("auth.refused").count();
    assert!(logged <= unauthenticated, "{logged} refusals logged for {unauthenticated} answered UNAUTHENTICATED");

    let metrics = http.get(format!("http://{}/metrics", cluster.nodes[&1].api_addr)).send().await?.text().await?;
    assert!(metrics.contains("maos_requests_refused_total{reason=\"rate\"}"), "{metrics}");
    // The script ran by its digest: its text crossed the network once, not with every call.
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut redis.connect().await?).await?;
    let calls = |command: &str| -> u64 {
        let line = stats.lines().find(|l| l.starts_with(&format!("cmdstat_{command}:"))).unwrap_or("");
        line.split(['=', ',']).nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    assert!(calls("evalsha") > calls("eval"), "EVALSHA {} times, EVAL {}", calls("evalsha"), calls("eval"));

    // Redis down: each node counts alone, keeps serving, and says so.
    redis.kill()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (answered, refused, took) = burst(&channels[..1], &key, 3 * BURST as usize).await?;
    println!("Redis down: {answered} answered, {} refused in {} ms", refused.len(), took.as_millis());
    assert!(answered >= BURST && answered <= allowed_within(took), "{answered} answered in {took:?}");
    let metrics = http.get(format!("http://{}/metrics", cluster.nodes[&1].api_addr)).send().await?.text().await?;
    let fallbacks = metrics
        .lines()
        .find_map(|l| l.strip_prefix("maos_rate_limit_local_fallbacks_total "))
        .and_then(|n| n.trim().parse::<f64>().ok());
    assert!(fallbacks.is_some_and(|n| n >= BURST as f64), "fallbacks {fallbacks:?}: {metrics}");

    // Back up with an empty script cache: the nodes load the script again and share one limit.
    redis.resume()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for channel in &channels {
        // Calls on each node let its connections to Redis come back (each reconnects on its
        // first use; until then that call counts on the node alone).
        for _ in 0..2 * BURST {
            let _ = who(channel, &admin)?.who_am_i(WhoAmIRequest {}).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (answered, _, took) = burst(&channels, &key, 30).await?;
    println!("Redis back: {answered} of 30 answered in {} ms", took.as_millis());
    assert!(answered >= BURST && answered <= allowed_within(took), "{answered} answered in {took:?} after a restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_bound_of_calls_in_flight_a_node_answers_busy_at_once() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let env = vec![("MAOS_NETWORK_MAX_CONCURRENT_REQUESTS".to_string(), "2".to_string())];
    let options = LocalClusterOptions { nodes: 1, env, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1], STEP).await?;
    cluster.wait_ready(&[1], STEP).await?;
    let client = cluster.client()?;

    // 64 writes at once, each a Raft commit: two are served at a time, the rest told "busy" at
    // once, with how long to wait.
    let channel = client.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let writes = (0..64).map(|i| {
        let mut kv = KvServiceClient::new(channel.clone());
        async move { kv.put(PutRequest { key: format!("busy-{i}"), value: "v".into(), ttl_ms: 0 }).await }
    });
    let answers = futures::future::join_all(writes).await;
    let mut served = 0;
    let mut busy = 0;
    for answer in &answers {
        match answer {
            Ok(_) => served += 1,
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(status.message().contains("network.max_concurrent_requests"), "{status:?}");
                assert!(status.metadata().get("grpc-retry-pushback-ms").is_some(), "no pushback: {status:?}");
                busy += 1;
            }
            Err(status) => panic!("a write failed otherwise: {status:?}"),
        }
    }
    println!("64 writes at once with 2 in flight: {served} served, {busy} busy");
    assert!(served >= 2 && busy > 0, "{served} served, {busy} busy");

    // The SDK waits out the pushback within its deadline: every write lands.
    let client = &client;
    let writes = (0..64).map(|i| async move { client.put(&format!("sdk-{i}"), "v").await });
    for answer in futures::future::join_all(writes).await {
        answer?;
    }

    // Public probes are never refused, and the count is on /metrics.
    let http = reqwest::Client::new();
    let metrics = http.get(format!("http://{}/metrics", cluster.nodes[&1].api_addr)).send().await?.text().await?;
    assert!(metrics.contains("maos_requests_refused_total{reason=\"busy\"}"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_the_dashboard_needs_a_readers_key() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let options = LocalClusterOptions { nodes: 1, auth: true, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1], STEP).await?;
    cluster.wait_ready(&[1], STEP).await?;
    let admin = cluster.bootstrap_token().ok_or_else(|| anyhow::anyhow!("no bootstrap token"))?;
    let channel = cluster.client_of(1)?.channel(0).ok_or_else(|| anyhow::anyhow!("no channel"))?;
    let key = |role: &str| {
        let (channel, admin, role) = (channel.clone(), admin.clone(), role.to_string());
        async move {
            let request = CreateKeyRequest { name: format!("dash-{role}"), role, expires_in_s: 0 };
            let created = who(&channel, &admin)?.create_key(request).await?.into_inner();
            anyhow::Ok((created.key.map(|k| k.id).unwrap_or_default(), created.secret))
        }
    };
    let (viewer_id, viewer) = key("viewer").await?;
    let (_, submitter) = key("submitter").await?;
    let base = format!("http://{}", cluster.nodes[&1].dashboard_addr);
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;

    // Without a key: the pages send the browser to sign in, live streams answer 401, and the
    // sign-in page's own stylesheet is served.
    let page = http.get(format!("{base}/tasks")).send().await?;
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers().get("location").and_then(|v| v.to_str().ok()), Some("/login"));
    assert_eq!(http.get(format!("{base}/sse/overview")).send().await?.status(), 401);
    let login = http.get(format!("{base}/login")).send().await?.text().await?;
    let stylesheet = login.split("href=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or_default();
    assert!(stylesheet.starts_with("/assets/"), "{login}");
    assert_eq!(http.get(format!("{base}{stylesheet}")).send().await?.status(), 200);

    // A wrong key, or one whose role may not read every task, is refused and says why.
    let sign_in = |key: String| http.post(format!("{base}/login")).form(&[("key", key)]).send();
    let refused = sign_in("maos_0000000000000000_nope".into()).await?;
    assert_eq!(refused.status(), 401);
    let refused = sign_in(submitter).await?;
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await?.contains("viewer, operator or admin"));

    // A viewer's key signs in: kept in an HttpOnly, SameSite=Strict cookie.
    let signed_in = sign_in(viewer.clone()).await?;
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers().get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(cookie.starts_with("maos_dashboard=") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(!cookie.contains("Secure"), "no TLS here: {cookie}");
    let pair = cookie.split(';').next().unwrap_or_default().to_string();
    let page = http.get(format!("{base}/tasks")).header("cookie", &pair).send().await?;
    assert_eq!(page.status(), 200);
    assert!(page.text().await?.contains("Sign out"));

    // Revoked, the key no longer opens the dashboard.
    who(&channel, &admin)?.revoke_key(RevokeKeyRequest { id: viewer_id }).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = http.get(format!("{base}/tasks")).header("cookie", &pair).send().await?;
        if page.status() == 303 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "a revoked key still opens the dashboard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
