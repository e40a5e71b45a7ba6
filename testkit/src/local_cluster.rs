//! A real cluster of `maos serve` processes on loopback, for the demo, tests and benchmarks.
//!
//! Each node gets free ports, its own data directory under one root, and a log file there.
//! Dropping the cluster kills every process it started.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use maos_client::proto::v1::StatusResponse;
use maos_client::Client;

/// The file in a node's data dir that holds the bootstrap admin token (`maos serve` writes it;
/// the same name as the node's `raft::housekeeping::BOOTSTRAP_TOKEN_FILE`).
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";

/// Knobs for a local cluster.
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    pub nodes: u64,
    pub cluster_name: String,
    /// Passed as `MAOS_RAFT_SNAPSHOT_AFTER_LOGS`.
    pub snapshot_after_logs: u64,
    /// Passed as `MAOS_RAFT_LOGS_KEPT_AFTER_SNAPSHOT`.
    pub logs_kept_after_snapshot: u64,
    /// Passed as `MAOS_SYSTEM_LOG_LEVEL`.
    pub log_level: String,
    /// More environment for every node (`MAOS_*` overrides).
    pub env: Vec<(String, String)>,
    /// `security.auth.enabled`. Off by default here, so tests and benchmarks that are not about
    /// auth call without tokens (every node listens on loopback only). On, the first leader
    /// writes the bootstrap admin token to its data dir and [`LocalCluster::client`] uses it.
    pub auth: bool,
    /// TLS on every node's API port (`security.tls.*`); the cluster's clients then check the
    /// nodes' certificates against `ca_file`.
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS on the API port: the nodes' certificate and key (one for all, naming
/// 127.0.0.1) and the CA that signed it; for mutual TLS, the CA the nodes require client
/// certificates from, and the certificate and key the cluster's clients present.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            cluster_name: "maos".into(),
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 1_000,
            log_level: "INFO".into(),
            env: Vec::new(),
            auth: false,
            tls: None,
        }
    }
}

/// One node of a local cluster.
#[derive(Debug)]
pub struct LocalNode {
    pub id: u64,
    pub api_addr: String,
    pub raft_addr: String,
    /// Where the node serves its dashboard (`MAOS_DASHBOARD_LISTEN`): a free port of its own,
    /// so clusters of parallel tests never collide on 3001.
    pub dashboard_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl LocalNode {
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

/// A local cluster of processes.
#[derive(Debug)]
pub struct LocalCluster {
    binary: PathBuf,
    options: LocalClusterOptions,
    pub nodes: BTreeMap<u64, LocalNode>,
    /// `--peers` values that replace the planned list for some nodes (to test disagreement).
    peers_override: BTreeMap<u64, String>,
    /// More environment for one node, after the options' (see [`LocalCluster::set_node_env`]).
    node_env: BTreeMap<u64, Vec<(String, String)>>,
    /// A program and arguments that run one node's `maos serve` (see [`LocalCluster::set_launcher`]).
    launchers: BTreeMap<u64, Vec<String>>,
}

/// A free loopback address for a server that a test or benchmark starts next
/// (see [`free_loopback_port`]).
pub fn free_loopback_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_loopback_port()?))
}

/// A free loopback port for a server that a test or benchmark starts next.
///
/// The port is bound then released, so it is taken from below the kernel's ephemeral range: a
/// port from inside it could become the source port of some outgoing connection before the server
/// binds it (a node would then fail to start with "address in use"). A process-wide counter keeps
/// concurrent tests of one process apart; the process id spreads processes over the range.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = unassigned_port_range();
    let span = high.saturating_sub(low);
    if span == 0 {
        let listener = TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
        return Ok(listener.local_addr()?.port());
    }
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(low + offset).context("port range")?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {low}..{high}")
}

/// Ports the kernel never hands out by itself: those below `ip_local_port_range` (or above it
/// when little is left below).
fn unassigned_port_range() -> (u32, u32) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|text| {
        let mut bounds = text.split_whitespace().map(|n| n.parse::<u32>().ok());
        Some((bounds.next()??, bounds.next()??))
    });
    let (first, last) = ephemeral.unwrap_or((32768, 60999));
    if first >= 12_000 {
        (10_000, first)
    } else {
        (last + 1, 65_536)
    }
}

impl LocalCluster {
    /// Plan a cluster of `options.nodes` nodes under `root`, run by `binary`. Starts nothing.
    pub fn new(binary: &Path, root: &Path, options: LocalClusterOptions) -> anyhow::Result<Self> {
        let mut nodes = BTreeMap::new();
        for id in 1..=options.nodes {
            let dir = root.join(format!("node-{id}"));
            nodes.insert(
                id,
                LocalNode {
                    id,
                    api_addr: free_loopback_addr()?,
                    raft_addr: free_loopback_addr()?,
                    dashboard_addr: free_loopback_addr()?,
                    data_dir: dir.join("data"),
                    log_path: dir.join("maos.log"),
                    child: None,
                },
            );
        }
        Ok(Self {
            binary: binary.to_path_buf(),
            options,
            nodes,
            peers_override: BTreeMap::new(),
            node_env: BTreeMap::new(),
            launchers: BTreeMap::new(),
        })
    }

    /// The `--peers` value naming every planned node.
    pub fn peers_arg(&self) -> String {
        self.peers_arg_except(None)
    }

    /// The `--peers` value naming every planned node but `excluded`.
    pub fn peers_arg_except(&self, excluded: Option<u64>) -> String {
        self.nodes
            .values()
            .filter(|n| Some(n.id) != excluded)
            .map(|n| format!("{}={}/{}", n.id, n.raft_addr, n.api_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The options the nodes start with.
    pub fn options(&self) -> &LocalClusterOptions {
        &self.options
    }

    /// The options, to change before (re)starting nodes.
    pub fn options_mut(&mut self) -> &mut LocalClusterOptions {
        &mut self.options
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).and_then(|n| n.child.as_ref()).map(Child::id)
    }

    /// Start node `id` with `peers` as its `--peers` instead of the planned list.
    pub fn override_peers(&mut self, id: u64, peers: String) {
        self.peers_override.insert(id, peers);
    }

    /// Set `key=value` in node `id`'s environment from its next start on (for example
    /// `LD_PRELOAD` and `FAKETIME` to run it with its clock off).
    pub fn set_node_env(&mut self, id: u64, key: &str, value: &str) {
        self.node_env.entry(id).or_default().push((key.to_string(), value.to_string()));
    }

    /// Run node `id` as `launcher… <binary> serve …` from its next start on: for example
    /// `ip netns exec <namespace>`, which puts it on a host of its own (the launcher must exec the
    /// binary in its own process, so the node's pid is the one signalled and killed).
    pub fn set_launcher(&mut self, id: u64, launcher: Vec<String>) {
        self.launchers.insert(id, launcher);
    }

    /// The command that runs node `id`, for callers that want to change it before spawning.
    pub fn command(&self, id: u64) -> anyhow::Result<Command> {
        let node = self.nodes.get(&id).ok_or_else(|| anyhow!("no node {id} in this cluster"))?;
        let mut command = match self.launchers.get(&id).and_then(|l| l.split_first()) {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command
            .arg("serve")
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--listen")
            .arg(&node.api_addr)
            .arg("--raft-listen")
            .arg(&node.raft_addr)
            .arg("--peers")
            .arg(self.peers_override.get(&id).cloned().unwrap_or_else(|| self.peers_arg()))
            .arg("--cluster-name")
            .arg(&self.options.cluster_name)
            .env("MAOS_RAFT_SNAPSHOT_AFTER_LOGS", self.options.snapshot_after_logs.to_string())
            .env("MAOS_RAFT_LOGS_KEPT_AFTER_SNAPSHOT", self.options.logs_kept_after_snapshot.to_string())
            .env("MAOS_SYSTEM_LOG_LEVEL", &self.options.log_level)
            .env("MAOS_DASHBOARD_LISTEN", &node.dashboard_addr)
            .env("MAOS_SECURITY_AUTH_ENABLED", self.options.auth.to_string())
            .envs(self.options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(self.node_env.get(&id).into_iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        if let Some(tls) = &self.options.tls {
            command
                .env("MAOS_SECURITY_TLS_CERT_FILE", &tls.cert_file)
                .env("MAOS_SECURITY_TLS_KEY_FILE", &tls.key_file)
                .env("MAOS_SECURITY_TLS_CA_FILE", &tls.ca_file);
            if let Some(client_ca) = &tls.client_ca_file {
                command.env("MAOS_SECURITY_TLS_CLIENT_CA_FILE", client_ca);
            }
        }
        Ok(command)
    }

    /// Start (or restart) node `id`, appending its output to its log file.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let mut command = self.command(id)?;
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id} in this cluster"))?;
        if node.is_running() {
            bail!("node {id} is already running");
        }
        if let Some(dir) = node.log_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = File::options().create(true).append(true).open(&node.log_path)?;
        command.stdout(log.try_clone()?).stderr(log);
        node.child = Some(command.spawn().with_context(|| format!("cannot run {}", self.binary.display()))?);
        Ok(())
    }

    /// Start every node.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        ids.into_iter().try_for_each(|id| self.start_node(id))
    }

    /// `kill -9` node `id` and reap it.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id} in this cluster"))?;
        if let Some(mut child) = node.child.take() {
            child.kill().ok();
            child.wait()?;
        }
        Ok(())
    }

    /// Send signal `signal` (`libc::SIGTERM`, ...) to node `id`'s process; it is not reaped.
    pub fn signal(&self, id: u64, signal: i32) -> anyhow::Result<()> {
        let pid = self.pid(id).ok_or_else(|| anyhow!("node {id} is not running"))?;
        let pid = i32::try_from(pid).map_err(|_| anyhow!("node {id}'s pid {pid} does not fit a pid_t"))?;
        // SAFETY: kill(2) takes plain integers and touches no memory of this process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("signal {signal} to node {id} (pid {pid}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// How node `id`'s process ended, if it has (reaping it); `None` while it runs.
    pub fn exit_status(&mut self, id: u64) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id} in this cluster"))?;
        match node.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("node {id} was not started"),
        }
    }

    /// Kill every node.
    pub fn stop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let _ = self.kill(id);
        }
    }

    /// Where the bootstrap admin token is, once the first leader has written it.
    pub fn bootstrap_token_path(&self) -> Option<PathBuf> {
        self.nodes.values().map(|n| n.data_dir.join(BOOTSTRAP_TOKEN_FILE)).find(|path| path.exists())
    }

    /// The bootstrap admin token, once written.
    pub fn bootstrap_token(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.bootstrap_token_path()?).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    }

    /// Wait for the bootstrap admin token (auth on).
    pub async fn wait_for_bootstrap_token(&self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(token) = self.bootstrap_token() {
                return Ok(token);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("no node wrote {BOOTSTRAP_TOKEN_FILE} within {timeout:?} (is security.auth.enabled on?)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `client` with the bootstrap token when auth is on and the token is written.
    fn authorized(&self, client: Client) -> anyhow::Result<Client> {
        match self.options.auth.then(|| self.bootstrap_token()).flatten() {
            Some(token) => Ok(client.with_credentials(&token)?),
            None => Ok(client),
        }
    }

    /// A client of every node (with auth on, as the bootstrap admin once its token exists).
    pub fn client(&self) -> anyhow::Result<Client> {
        let client = Client::new_with_tls(self.nodes.values().map(|n| n.api_addr.clone()), self.tls()?.as_ref())?
            .with_deadline(Duration::from_secs(15));
        self.authorized(client)
    }

    /// A client of node `id` alone.
    pub fn client_of(&self, id: u64) -> anyhow::Result<Client> {
        let node = self.nodes.get(&id).ok_or_else(|| anyhow!("no node {id} in this cluster"))?;
        let client = Client::new_with_tls([node.api_addr.clone()], self.tls()?.as_ref())?;
        self.authorized(client.with_deadline(Duration::from_secs(15)))
    }

    /// How clients check the nodes' certificates, when the cluster runs TLS.
    pub fn tls(&self) -> anyhow::Result<Option<maos_client::Tls>> {
        let Some(files) = &self.options.tls else { return Ok(None) };
        let (cert, key) = files.client_identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())).unzip();
        Ok(Some(maos_client::Tls::from_files(Some(&files.ca_file), cert, key)?))
    }

    /// An HTTP client of the API port (over TLS when the cluster runs it), and the URL scheme.
    pub fn http(&self) -> anyhow::Result<(reqwest::Client, &'static str)> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
        let Some(files) = &self.options.tls else { return Ok((builder.build()?, "http")) };
        for ca in reqwest::Certificate::from_pem_bundle(&std::fs::read(&files.ca_file)?)? {
            builder = builder.add_root_certificate(ca);
        }
        if let Some((cert, key)) = &files.client_identity {
            let pem = [std::fs::read(key)?, b"\n".to_vec(), std::fs::read(cert)?].concat();
            builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
        }
        Ok((builder.build()?, "https"))
    }

    /// Node `id`'s status (without the state hash).
    pub async fn status(&self, id: u64) -> anyhow::Result<StatusResponse> {
        let client = self.client_of(id)?.with_deadline(Duration::from_secs(2));
        Ok(client.status_of(0, false).await?)
    }

    /// Node `id`'s status with the state hash.
    pub async fn status_with_hash(&self, id: u64) -> anyhow::Result<StatusResponse> {
        let client = self.client_of(id)?.with_deadline(Duration::from_secs(10));
        Ok(client.status_of(0, true).await?)
    }

    /// Wait until every node in `among` that answers agrees on one leader in `among`;
    /// returns (leader, term).
    pub async fn wait_for_leader(&self, among: &[u64], timeout: Duration) -> anyhow::Result<(u64, u64)> {
        // With auth on, Status needs the bootstrap token, which the first leader writes: wait for
        // it instead of polling without it (every refused poll is logged and audited).
        if self.options.auth && self.bootstrap_token().is_none() {
            self.wait_for_bootstrap_token(timeout).await?;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        let mut silent = Vec::new();
        while tokio::time::Instant::now() < deadline {
            let mut seen = Vec::new();
            silent.clear();
            for id in among {
                match self.status(*id).await {
                    Ok(status) => seen.push((status.leader_id, status.current_term)),
                    Err(error) => {
                        last = format!("node {id}: {error}");
                        silent.push(*id);
                    }
                }
            }
            if seen.len() == among.len() {
                if let Some((Some(leader), term)) = seen.first().copied() {
                    if seen.iter().all(|s| *s == (Some(leader), term)) && among.contains(&leader) {
                        return Ok((leader, term));
                    }
                }
                last = format!("views differ: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A node that never answered usually says why in its log (a port taken, a bad config).
        let logs: String = silent
            .iter()
            .map(|id| format!("\n--- last lines of node {id}'s log ---\n{}", self.log_tail(*id, 30)))
            .collect();
        bail!("no agreed leader among {among:?} within {timeout:?}: {last}{logs}")
    }

    /// Wait until every node in `among` answers 200 on `/ready`: a member that knows a leader,
    /// whose task-data store holds its schema and whose agent pool is registered (a submit right
    /// after the election can otherwise find a type not served yet, or the schema not migrated).
    pub async fn wait_ready(&self, among: &[u64], timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (http, scheme) = self.http()?;
        for id in among {
            let addr = &self.nodes.get(id).with_context(|| format!("no node {id}"))?.api_addr;
            loop {
                let last = match http.get(format!("{scheme}://{addr}/ready")).send().await {
                    Ok(answer) if answer.status() == 200 => break,
                    Ok(answer) => format!("{}: {}", answer.status(), answer.text().await.unwrap_or_default().trim()),
                    Err(error) => error.to_string(),
                };
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "node {id} was not ready within {timeout:?}: {last}\n--- last lines of its log ---\n{}",
                        self.log_tail(*id, 30)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Wait until every node in `among` has applied the same state; returns the state hash.
    pub async fn wait_for_same_state(&self, among: &[u64], timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        while tokio::time::Instant::now() < deadline {
            let mut views = Vec::new();
            for id in among {
                match self.status_with_hash(*id).await {
                    Ok(status) => views.push((status.last_applied_index, status.state_hash)),
                    Err(error) => last = format!("node {id}: {error}"),
                }
            }
            if views.len() == among.len() && views.windows(2).all(|w| w[0] == w[1]) {
                return Ok(views[0].1.clone());
            }
            if views.len() == among.len() {
                last = format!("views differ: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("nodes {among:?} did not converge within {timeout:?}: {last}")
    }

    /// The last `lines` lines of node `id`'s log, for error reports.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let Some(node) = self.nodes.get(&id) else { return String::new() };
        let text = std::fs::read_to_string(&node.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
