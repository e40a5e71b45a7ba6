//! TLS on the API port, with real processes and certificates made here (rcgen): gRPC, REST,
//! `/ready` and `/metrics` over TLS on one port (ALPN `h2` for gRPC, `http/1.1` for the HTTP
//! client), the CLI with `--ca-file`, plaintext and a wrong CA refused, the certificate replaced
//! on disk and served to new connections without a restart; and mutual TLS, where a client
//! without a certificate from the client CA, or with one its revocation list names (read again
//! when it changes), is refused. Mutual TLS between members on the Raft port
//! (`security.peer_tls`): a stranger's certificate, none, or plaintext is refused, and a
//! node whose certificate another CA signed cannot join; with auth and TLS on the API port too,
//! membership calls and a leadership transfer sent to a follower still reach the leader.

use std::path::Path;
use std::time::Duration;

#[path = "support/certs.rs"]
mod certs;

use certs::{api_tls, Ca};
use maos_client::{Client, Tls};
use maos_testkit::local_cluster::{free_loopback_addr, LocalCluster, LocalClusterOptions, TlsFiles};

const STEP: Duration = Duration::from_secs(30);

/// Write `text` to `path` whole: a reader sees the old file or the new one.
fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text)?;
    std::fs::rename(staged, path)?;
    Ok(())
}

fn tls_with(ca_pem: &str) -> Tls {
    Tls { ca_pem: Some(ca_pem.to_string()), identity: None }
}

/// Whether a client of `addr` with `tls` gets an answer (a key-value write).
async fn answers(addr: &str, tls: Option<&Tls>) -> Result<u64, maos_client::ClientError> {
    let client = Client::new_with_tls([addr.to_string()], tls)?.with_deadline(Duration::from_secs(3));
    client.put("tls/probe", "x").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_port_serves_grpc_rest_and_metrics_over_tls_and_reloads_its_certificate() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let ca = Ca::new("maos test CA 1")?;
    let (cert, key) = ca.sign(&["127.0.0.1", "localhost"])?;
    let files = TlsFiles {
        cert_file: root.path().join("node.pem"),
        key_file: root.path().join("node.key"),
        ca_file: ca.write(root.path(), "ca.pem")?,
        ..Default::default()
    };
    std::fs::write(&files.cert_file, cert)?;
    std::fs::write(&files.key_file, key)?;
    let options = LocalClusterOptions { tls: Some(files.clone()), ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), root.path(), options)?;
    cluster.start_all()?;
    // Status over gRPC and /ready over HTTP/1.1, both through TLS.
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let addr = cluster.nodes[&1].api_addr.clone();

    let client = cluster.client()?;
    let revision = client.put("tls/key", "over tls").await?;
    assert!(revision > 0);
    assert_eq!(client.get("tls/key", false).await?.map(|(v, _)| v), Some("over tls".to_string()));

    // REST and /metrics on the same port (reqwest offers only http/1.1 in its ALPN).
    let (http, scheme) = cluster.http()?;
    assert_eq!(scheme, "https");
    let status = http.get(format!("https://{addr}/api/v1/cluster")).send().await?;
    assert_eq!(status.status(), 200);
    assert_eq!(status.version(), reqwest::Version::HTTP_11);
    let metrics = http.get(format!("https://{addr}/metrics")).send().await?.text().await?;
    assert!(metrics.contains("maos_raft_term"), "{metrics:.200}");
    // The dashboard speaks TLS with the same certificate.
    let dashboard = http.get(format!("https://{}/", cluster.nodes[&1].dashboard_addr)).send().await?;
    assert_eq!(dashboard.status(), 200);

    // The CLI with --ca-file.
    let maos = env!("CARGO_BIN_EXE_maos");
    let ca_file = files.ca_file.display().to_string();
    let health = std::process::Command::new(maos)
        .args(["health", "--endpoints", &addr, "--ca-file", &ca_file])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(
        health.status.success(),
        "{}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );
    // Without --ca-file the CLI cannot reach the nodes, and says what to pass.
    let plain_health = std::process::Command::new(maos)
        .args(["health", "--endpoints", &addr])
        .stdin(std::process::Stdio::null())
        .output()?;
    let said =
        format!("{}{}", String::from_utf8_lossy(&plain_health.stdout), String::from_utf8_lossy(&plain_health.stderr));
    assert_eq!(plain_health.status.code(), Some(5), "{said}");
    assert!(said.contains("--ca-file"), "{said}");
    let put = std::process::Command::new(maos)
        .args(["kv", "put", "tls/cli", "yes", "--endpoints", &addr, "--ca-file", &ca_file])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));

    // Plaintext gets no answer; neither does a client that trusts another CA.
    let plain = answers(&addr, None).await;
    assert!(plain.is_err(), "a plaintext client was answered: {plain:?}");
    let plain_http = reqwest::Client::new().get(format!("http://{addr}/health")).timeout(STEP).send().await;
    assert!(plain_http.is_err(), "plain HTTP was answered: {plain_http:?}");
    let other = Ca::new("another CA")?;
    let wrong = answers(&addr, Some(&tls_with(&other.pem))).await;
    assert!(wrong.is_err(), "a client trusting another CA was answered: {wrong:?}");

    // Replace the certificate with one from the other CA: new connections get it, without a
    // restart; the connection already open keeps working.
    let pid = cluster.pid(1);
    let (cert, key) = other.sign(&["127.0.0.1"])?;
    replace(&files.key_file, &key)?;
    replace(&files.cert_file, &cert)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while answers(&addr, Some(&tls_with(&other.pem))).await.is_err() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the new certificate was not served within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = answers(&addr, Some(&tls_with(&ca.pem))).await;
    assert!(old.is_err(), "a new connection still got the old certificate: {old:?}");
    assert!(client.get("tls/key", false).await.is_ok(), "the open connection broke on the reload");
    assert!(cluster.pid(1) == pid && cluster.exit_status(1)?.is_none(), "node 1 restarted or stopped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_its_certificates_are_answered() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let server_ca = Ca::new("maos servers")?;
    let client_ca = Ca::new("maos clients")?;
    let (cert, key) = server_ca.sign(&["127.0.0.1"])?;
    let (client_cert, client_key) = client_ca.sign(&["operator.example"])?;
    let dir = root.path();
    for (name, text) in
        [("node.pem", &cert), ("node.key", &key), ("client.pem", &client_cert), ("client.key", &client_key)]
    {
        std::fs::write(dir.join(name), text)?;
    }
    let files = TlsFiles {
        cert_file: dir.join("node.pem"),
        key_file: dir.join("node.key"),
        ca_file: server_ca.write(dir, "ca.pem")?,
        client_ca_file: Some(client_ca.write(dir, "client-ca.pem")?),
        client_identity: Some((dir.join("client.pem"), dir.join("client.key"))),
    };
    let crl_file = dir.join("revoked.pem");
    std::fs::write(&crl_file, client_ca.crl(1, &[])?)?;
    let env = vec![("MAOS_SECURITY_TLS_CRL_FILE".to_string(), crl_file.display().to_string())];
    let options = LocalClusterOptions { tls: Some(files), env, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), dir, options)?;
    cluster.start_all()?;
    // The cluster's clients present the client certificate: answered.
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let addr = cluster.nodes[&1].api_addr.clone();
    assert!(cluster.client()?.put("mtls/key", "v").await? > 0);

    // No certificate, or one another CA signed: refused in the handshake.
    let bare = answers(&addr, Some(&tls_with(&server_ca.pem))).await;
    assert!(bare.is_err(), "a client without a certificate was answered: {bare:?}");
    let stranger_ca = Ca::new("strangers")?;
    let (stranger_cert, stranger_key) = stranger_ca.sign(&["stranger.example"])?;
    let stranger = Tls { ca_pem: Some(server_ca.pem.clone()), identity: Some((stranger_cert, stranger_key)) };
    let refused = answers(&addr, Some(&stranger)).await;
    assert!(refused.is_err(), "a client with a stranger's certificate was answered: {refused:?}");

    // The CLI with --cert and --key.
    let put = std::process::Command::new(env!("CARGO_BIN_EXE_maos"))
        .args(["kv", "put", "mtls/cli", "yes", "--endpoints", &addr])
        .args(["--ca-file", &dir.join("ca.pem").display().to_string()])
        .args(["--cert", &dir.join("client.pem").display().to_string()])
        .args(["--key", &dir.join("client.key").display().to_string()])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));

    // A certificate the CA signed is answered until the revocation list names it: the new list
    // is read without a restart, and the others' certificates are still answered.
    let lost =
        Tls { ca_pem: Some(server_ca.pem.clone()), identity: Some(client_ca.sign_serial(&["laptop.example"], 4242)?) };
    answers(&addr, Some(&lost)).await?;
    replace(&crl_file, &client_ca.crl(2, &[4242])?)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while answers(&addr, Some(&lost)).await.is_ok() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the revoked certificate is still answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cluster.client()?.put("mtls/after-revocation", "v").await? > 0);
    Ok(())
}

/// `Hello` on the Raft port at `addr` over TLS trusting `ca_pem`, presenting `identity` (a
/// certificate and its key, PEM) when given: whether a member would be answered.
async fn raft_hello(addr: &str, ca_pem: &str, identity: Option<&(String, String)>) -> anyhow::Result<()> {
    let mut tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .timeout(Duration::from_secs(5));
    hello_on(endpoint.connect().await?).await
}

/// `Hello` on `channel`, its request and answer read as empty messages (`()`): only whether
/// the call was answered matters here.
async fn hello_on(channel: tonic::transport::Channel) -> anyhow::Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/maos.raft.v1.RaftService/Hello");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let mut answer = grpc.streaming(tonic::Request::new(tokio_stream::once(())), path, codec).await?.into_inner();
    answer.message().await?;
    Ok(())
}

/// A node process outside `cluster`, as id 4 at `raft` and `api`, with `security.peer_tls` from
/// `files` (certificate, key, CA): it knows the cluster and waits to be added.
fn fourth_node(
    cluster: &LocalCluster,
    dir: &Path,
    (raft, api): (&str, &str),
    files: [&Path; 3],
) -> anyhow::Result<std::process::Child> {
    let peers = format!("{},4={raft}/{api}", cluster.peers_arg());
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_maos"))
        .args(["serve", "--node-id", "4", "--listen", api, "--raft-listen", raft, "--peers", &peers])
        .arg("--data-dir")
        .arg(dir.join("node-4"))
        .env("MAOS_SECURITY_AUTH_ENABLED", "false")
        .env("MAOS_DASHBOARD_ENABLED", "false")
        .env("MAOS_SECURITY_PEER_TLS_CERT_FILE", files[0])
        .env("MAOS_SECURITY_PEER_TLS_KEY_FILE", files[1])
        .env("MAOS_SECURITY_PEER_TLS_CA_FILE", files[2])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

/// The CLI run with `args`, as the bootstrap admin, checking the API port's certificate.
fn maos_admin(cluster: &LocalCluster, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let token = cluster.bootstrap_token().ok_or_else(|| anyhow::anyhow!("no bootstrap token"))?;
    let ca = &cluster.options().tls.as_ref().ok_or_else(|| anyhow::anyhow!("no API TLS"))?.ca_file;
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_maos"))
        .args(args)
        .env("MAOS_TOKEN", token)
        .env("MAOS_CA_FILE", ca)
        .stdin(std::process::Stdio::null())
        .output()?)
}

/// `maos cluster add-node` of node 4 at `raft` and `api`, sent to `endpoint`: the CLI's output.
fn add_fourth(
    cluster: &LocalCluster,
    endpoint: &str,
    (raft, api): (&str, &str),
) -> anyhow::Result<std::process::Output> {
    let add = ["cluster", "add-node", "--id", "4", "--raft-addr", raft, "--api-addr", api];
    maos_admin(cluster, &[&add[..], &["--endpoints", endpoint, "--json"]].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_speak_mutual_tls_and_a_node_without_the_clusters_certificate_cannot_join() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path();
    let members = Ca::new("maos members")?;
    let ca_file = members.write(dir, "members-ca.pem")?;
    let options = LocalClusterOptions {
        // A shorter deadline for add-node, so the refused join below gives up sooner.
        env: vec![("MAOS_RAFT_REQUEST_TIMEOUT_MS".into(), "4000".into())],
        // Auth and TLS on the API port as well: members never call each other there.
        auth: true,
        tls: Some(api_tls(dir)?),
        ..Default::default()
    };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), dir, options)?;
    let mut identities = Vec::new();
    for id in 1..=3u64 {
        let (cert, key) = members.sign(&["127.0.0.1"])?;
        let (cert_file, key_file) = (dir.join(format!("member-{id}.pem")), dir.join(format!("member-{id}.key")));
        std::fs::write(&cert_file, &cert)?;
        std::fs::write(&key_file, &key)?;
        cluster.set_node_env(id, "MAOS_SECURITY_PEER_TLS_CERT_FILE", &cert_file.display().to_string());
        cluster.set_node_env(id, "MAOS_SECURITY_PEER_TLS_KEY_FILE", &key_file.display().to_string());
        cluster.set_node_env(id, "MAOS_SECURITY_PEER_TLS_CA_FILE", &ca_file.display().to_string());
        identities.push((cert, key));
    }
    cluster.start_all()?;
    // The members elect a leader and replicate over mutual TLS.
    let (leader, _) = cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    // Membership calls sent to a follower are forwarded to the leader's Raft port (an API port's
    // credentials and TLS are the clients'), and so is a transfer's call to its target.
    cluster.wait_for_bootstrap_token(STEP).await?;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap_or(1);
    let via_follower = cluster.nodes[&follower].api_addr.clone();
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    cluster.client()?.put("peer-tls", "replicated").await?;
    cluster.wait_for_same_state(&[1, 2, 3], STEP).await?;

    // On the Raft port, only a member's certificate is answered.
    let raft = cluster.nodes[&1].raft_addr.clone();
    raft_hello(&raft, &members.pem, Some(&identities[1])).await?;
    let strangers = Ca::new("strangers")?;
    let stranger = strangers.sign(&["127.0.0.1"])?;
    let refused = raft_hello(&raft, &members.pem, Some(&stranger)).await;
    assert!(refused.is_err(), "a stranger's certificate was answered on the Raft port");
    let refused = raft_hello(&raft, &members.pem, None).await;
    assert!(refused.is_err(), "a client without a certificate was answered on the Raft port");
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{raft}"))?.timeout(Duration::from_secs(5));
    let refused = match plaintext.connect().await {
        Ok(channel) => hello_on(channel).await,
        Err(error) => Err(error.into()),
    };
    assert!(refused.is_err(), "plaintext was answered on the Raft port");

    // The scan's stranger probe tells mutual TLS from a port it cannot reach.
    let scan = maos_admin(
        &cluster,
        &["security-scan", "--comprehensive", "--json", "--endpoints", &cluster.nodes[&1].api_addr],
    )?;
    let findings: serde_json::Value = serde_json::from_slice(&scan.stdout)?;
    let probed = findings.as_array().map_or(0, |f| {
        f.iter()
            .filter(|f| f["finding"].as_str().is_some_and(|s| s.contains("not plaintext gRPC (mutual TLS)")))
            .count()
    });
    assert_eq!(probed, 3, "{findings}");

    // A node whose certificate another CA signed cannot join: add-node gives up, and it never
    // holds the cluster's data.
    let (stranger_cert, stranger_key) = (dir.join("stranger.pem"), dir.join("stranger.key"));
    std::fs::write(&stranger_cert, &stranger.0)?;
    std::fs::write(&stranger_key, &stranger.1)?;
    let (raft_4, api_4) = (free_loopback_addr()?, free_loopback_addr()?);
    let addrs = (raft_4.as_str(), api_4.as_str());
    let mut fourth = fourth_node(&cluster, dir, addrs, [&stranger_cert, &stranger_key, &ca_file])?;
    let refused = add_fourth(&cluster, &via_follower, addrs)?;
    fourth.kill().ok();
    fourth.wait().ok();
    let said = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success(), "a stranger joined: {}", String::from_utf8_lossy(&refused.stdout));
    assert!(said.contains("did not catch up"), "{said}");
    let status = cluster.status(1).await?;
    let fourth_status = status.members.iter().find(|m| m.id == 4);
    assert!(fourth_status.is_some_and(|m| !m.voter), "the stranger became a voter: {:?}", status.members);

    // The same node with a member's certificate catches up and becomes a voter.
    let (member_cert, member_key) = members.sign(&["127.0.0.1"])?;
    std::fs::write(&stranger_cert, member_cert)?;
    std::fs::write(&stranger_key, member_key)?;
    let mut fourth = fourth_node(&cluster, dir, addrs, [&stranger_cert, &stranger_key, &ca_file])?;
    let joined = add_fourth(&cluster, &via_follower, addrs)?;
    let said = format!("{}{}", String::from_utf8_lossy(&joined.stdout), String::from_utf8_lossy(&joined.stderr));
    let removed = maos_admin(&cluster, &["cluster", "remove-node", "4", "--endpoints", &via_follower])?;
    fourth.kill().ok();
    fourth.wait().ok();
    assert!(joined.status.success(), "a member's certificate could not join: {said}");
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));

    // A leadership transfer sent to a follower works too (the leader asks the target to stand).
    let to = follower.to_string();
    let moved = maos_admin(&cluster, &["cluster", "transfer-leader", "--to", &to, "--endpoints", &via_follower])?;
    assert!(moved.status.success(), "transfer-leader: {}", String::from_utf8_lossy(&moved.stderr));
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;

    // New files on disk are read again without a restart, and the members go on replicating.
    let (cert, key) = members.sign(&["127.0.0.1"])?;
    replace(&dir.join("member-1.key"), &key)?;
    replace(&dir.join("member-1.pem"), &cert)?;
    let deadline = std::time::Instant::now() + STEP;
    while !cluster.log_tail(1, 10_000).contains("the Raft port's TLS files were read again") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "node 1 did not read its new peer certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    raft_hello(&raft, &members.pem, Some(&identities[2])).await?;
    cluster.client()?.put("peer-tls", "after the reload").await?;
    cluster.wait_for_same_state(&[1, 2, 3], STEP).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_listed_in_client_principals_is_that_principal() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path();
    let server_ca = Ca::new("maos servers")?;
    let client_ca = Ca::new("maos clients")?;
    let (cert, key) = server_ca.sign(&["127.0.0.1"])?;
    std::fs::write(dir.join("node.pem"), cert)?;
    std::fs::write(dir.join("node.key"), key)?;
    let (ops_cert, ops_key) = client_ca.sign(&["ops-bot.example"])?;
    std::fs::write(dir.join("ops.pem"), &ops_cert)?;
    std::fs::write(dir.join("ops.key"), &ops_key)?;
    let files = TlsFiles {
        cert_file: dir.join("node.pem"),
        key_file: dir.join("node.key"),
        ca_file: server_ca.write(dir, "ca.pem")?,
        client_ca_file: Some(client_ca.write(dir, "client-ca.pem")?),
        client_identity: Some((dir.join("ops.pem"), dir.join("ops.key"))),
    };
    let principals = "[{name: ops-bot.example, role: operator}, {name: wall.example, role: viewer}]";
    let env = vec![("MAOS_SECURITY_TLS_CLIENT_PRINCIPALS".to_string(), principals.to_string())];
    let options = LocalClusterOptions { tls: Some(files), auth: true, env, ..Default::default() };
    let mut cluster = LocalCluster::new(Path::new(env!("CARGO_BIN_EXE_maos")), dir, options)?;
    cluster.start_all()?;
    cluster.wait_for_leader(&[1, 2, 3], STEP).await?;
    cluster.wait_ready(&[1, 2, 3], STEP).await?;
    let addr = cluster.nodes[&1].api_addr.clone();
    // No API key: the certificate is the principal, with the role listed for its name.
    let as_cert = |identity: (String, String)| {
        let tls = Tls { ca_pem: Some(server_ca.pem.clone()), identity: Some(identity) };
        Client::new_with_tls([addr.clone()], Some(&tls)).map(|c| c.with_deadline(Duration::from_secs(5)))
    };
    let ops = as_cert((ops_cert, ops_key))?;
    assert!(ops.put("cert/ops", "written by a certificate").await? > 0);
    let refused = as_cert(client_ca.sign(&["wall.example"])?)?.put("cert/wall", "x").await;
    let said = format!("{refused:?}");
    assert!(said.contains("PermissionDenied") && said.contains("cert:wall.example"), "{said}");
    let refused = as_cert(client_ca.sign(&["unlisted.example"])?)?.put("cert/other", "x").await;
    let said = format!("{refused:?}");
    assert!(said.contains("Unauthenticated") && said.contains("client_principals"), "{said}");
    Ok(())
}
