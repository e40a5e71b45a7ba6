//! Hosts the fault runner makes itself: one network namespace per node, each joined to a bridge
//! in the runner's namespace by a veth pair, so a node can be cut off for real (its link goes
//! down: packets to and from it are dropped, open connections hang, as on a real partition).
//!
//! Made with Debian's iproute2 (`ip netns`, `ip link`), which needs root; everything made is
//! removed on drop. Addresses are in 10.77.0.0/16, one /24 per runner, chosen so none is in use.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

/// One runner's hosts.
#[derive(Debug)]
pub struct Hosts {
    tag: String,
    subnet: u8,
    nodes: Vec<u64>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output().context("cannot run `ip` (Debian's iproute2)")?;
    if !output.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

impl Hosts {
    /// A namespace and address for each of `nodes`, all up. Fails with `ip`'s own error when
    /// namespaces cannot be made here (not root, no iproute2).
    pub fn create(nodes: &[u64]) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!("{}", (std::process::id() * 7 + NEXT.fetch_add(1, Ordering::Relaxed)) % 10_000);
        let in_use = String::from_utf8_lossy(&Command::new("ip").args(["-4", "addr"]).output()?.stdout).into_owned();
        let subnet = (0..250u32)
            .map(|i| ((std::process::id() + i) % 250) as u8)
            .find(|s| !in_use.contains(&format!("10.77.{s}.")))
            .context("every 10.77.x.0/24 is in use")?;
        let hosts = Self { tag, subnet, nodes: nodes.to_vec() };
        hosts.build().map_err(|e| e.context("making the fault runner's network namespaces (needs root)"))?;
        Ok(hosts)
    }

    fn build(&self) -> anyhow::Result<()> {
        let bridge = self.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.77.{}.1/24", self.subnet), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for id in &self.nodes {
            let (namespace, outside, inside) = (self.namespace(*id), self.outside(*id), self.inside(*id));
            ip(&["netns", "add", &namespace])?;
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside])?;
            ip(&["link", "set", &inside, "netns", &namespace])?;
            ip(&["link", "set", &outside, "master", &bridge, "up"])?;
            let address = format!("{}/24", self.address(*id));
            ip(&["-n", &namespace, "addr", "add", &address, "dev", &inside])?;
            ip(&["-n", &namespace, "link", "set", &inside, "up"])?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn bridge(&self) -> String {
        format!("mcb{}", self.tag)
    }
    fn namespace(&self, id: u64) -> String {
        format!("maos-chaos-{}-{id}", self.tag)
    }
    fn outside(&self, id: u64) -> String {
        format!("mc{}h{id}", self.tag)
    }
    fn inside(&self, id: u64) -> String {
        format!("mc{}n{id}", self.tag)
    }

    /// Node `id`'s address, reachable from the runner and from the other nodes.
    pub fn address(&self, id: u64) -> String {
        format!("10.77.{}.{}", self.subnet, 10 + id)
    }

    /// The launcher that runs a program on node `id`'s host (`ip netns exec` execs it in place).
    pub fn launcher(&self, id: u64) -> Vec<String> {
        ["ip", "netns", "exec"].iter().map(|s| s.to_string()).chain([self.namespace(id)]).collect()
    }

    /// Cut node `id` off from everyone (its link goes down).
    pub fn cut(&self, id: u64) -> anyhow::Result<()> {
        ip(&["link", "set", &self.outside(id), "down"])
    }

    /// Join node `id` again.
    pub fn heal(&self, id: u64) -> anyhow::Result<()> {
        ip(&["link", "set", &self.outside(id), "up"])
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        for id in &self.nodes {
            let _ = ip(&["netns", "del", &self.namespace(*id)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}
