//! TLS on the API port, with real processes and certificates made here (rcgen): gRPC, REST,
//! `/ready` and `/metrics` over TLS on one port (ALPN `h2` for gRPC, `http/1.1` for the HTTP
//! client), the CLI with `--ca-file`, plaintext and a wrong CA refused, the certificate replaced
//! on disk and served to new connections without a restart; and mutual TLS, where a client
//! without a certificate from the client CA is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use maos_client::{Client, Tls};
use maos_testkit::local_cluster::{LocalCluster, LocalClusterOptions, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

const STEP: Duration = Duration::from_secs(30);

/// A CA that signs certificates for tests.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    /// A certificate for `names` (IP addresses or DNS names) and its key, as PEM.
    fn sign(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let key = KeyPair::generate()?;
        Ok((params.signed_by(&key, &self.issuer)?.pem(), key.serialize_pem()))
    }

    fn write(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem)?;
        Ok(path)
    }
}

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
    let options = LocalClusterOptions { tls: Some(files), ..Default::default() };
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
    Ok(())
}
