//! A local etcd cluster and a minimal etcd KV client, for side-by-side benchmarks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use maos_testkit::local_cluster::free_loopback_addr;
use tonic::transport::Channel;

mod proto {
    tonic::include_proto!("etcdserverpb");
}

/// A client of one etcd member's KV service.
#[derive(Clone)]
pub struct KvClient(proto::kv_client::KvClient<Channel>);

impl KvClient {
    pub fn connect(addr: &str) -> anyhow::Result<Self> {
        let channel = maos_client::endpoint(addr)?.connect_lazy();
        Ok(Self(proto::kv_client::KvClient::new(channel)))
    }

    pub async fn put(&mut self, key: String, value: &str) -> Result<(), String> {
        let request =
            proto::PutRequest { key: key.into_bytes(), value: value.as_bytes().to_vec(), ..Default::default() };
        self.0.put(request).await.map(|_| ()).map_err(|status| status.to_string())
    }
}

/// A local etcd cluster of separate processes; killed on drop.
pub struct EtcdCluster {
    children: Vec<Child>,
    client_addrs: Vec<String>,
    pub version: String,
}

impl EtcdCluster {
    pub async fn start(binary: &Path, root: &Path, members: usize) -> anyhow::Result<Self> {
        let version = Command::new(binary)
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run {} (install Debian's etcd-server)", binary.display()))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let peers: Vec<(String, String, PathBuf)> = (1..=members)
            .map(|i| Ok((free_loopback_addr()?, free_loopback_addr()?, root.join(format!("e{i}")))))
            .collect::<anyhow::Result<_>>()?;
        let initial_cluster = peers
            .iter()
            .enumerate()
            .map(|(i, (_, peer, _))| format!("e{}=http://{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for (i, (client, peer, dir)) in peers.iter().enumerate() {
            std::fs::create_dir_all(dir)?;
            let log = std::fs::File::create(dir.with_extension("log"))?;
            let child = Command::new(binary)
                .args(["--name", &format!("e{}", i + 1)])
                .arg("--data-dir")
                .arg(dir)
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &format!("http://{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            children.push(child);
        }
        let cluster = Self { children, client_addrs: peers.iter().map(|(c, _, _)| c.clone()).collect(), version };
        let mut probe = KvClient::connect(&cluster.client_addrs[0])?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match probe.put("bench/ready".into(), "1").await {
                Ok(()) => break,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => anyhow::bail!("etcd did not become ready: {error}"),
            }
        }
        Ok(cluster)
    }

    pub fn client_addrs(&self) -> Vec<String> {
        self.client_addrs.clone()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
