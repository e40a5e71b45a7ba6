//! The `maos` command line: `serve`, `demo`, `status`, `cluster`, `kv`, `config`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::{AddNodeRequest, Member, RemoveNodeRequest};
use maos_client::Client;
use maos_node::config::{parse_peer_list, Config};

#[derive(Parser)]
#[command(name = "maos", version, about = "MAOS: a multi-agent operating system on a Raft cluster")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a node.
    Serve(ServeArgs),
    /// Start a local 3-node cluster, fail the leader over, show that every write survived, stop.
    Demo {
        /// Keep the cluster's data directory instead of deleting it.
        #[arg(long)]
        keep_data: bool,
    },
    /// Show each node's view of the cluster.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The coordination key-value space.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Show or check the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Args, Clone)]
struct Target {
    /// API endpoints (host:port), comma-separated.
    #[arg(long, env = "MAOS_ENDPOINTS", default_value = "127.0.0.1:8000", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List the members.
    Members {
        #[command(flatten)]
        target: Target,
    },
    /// Add a node: as a learner that catches up, then as a voter.
    AddNode {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        api_addr: String,
        /// Leave it a learner (it replicates but does not vote).
        #[arg(long)]
        learner_only: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a node.
    RemoveNode {
        id: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum KvCommand {
    /// Write a key.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        target: Target,
    },
    /// Read a key (linearizable unless --stale).
    Get {
        key: String,
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration as YAML.
    Show(ConfigArgs),
    /// Check the configuration; name every bad key and value.
    Validate(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    #[arg(long, short, env = "MAOS_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// YAML configuration file.
    #[arg(long, short, env = "MAOS_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides node.id.
    #[arg(long)]
    node_id: Option<u64>,
    /// Overrides node.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides network.listen_addr (client API).
    #[arg(long)]
    listen: Option<String>,
    /// Overrides network.raft_listen_addr.
    #[arg(long)]
    raft_listen: Option<String>,
    /// Overrides network.advertise_addr.
    #[arg(long)]
    advertise: Option<String>,
    /// Overrides network.raft_advertise_addr.
    #[arg(long)]
    raft_advertise: Option<String>,
    /// Overrides cluster.peers: ID=RAFT_ADDR/API_ADDR, comma-separated.
    #[arg(long)]
    peers: Option<String>,
    /// Overrides cluster.name.
    #[arg(long)]
    cluster_name: Option<String>,
}

/// Deadline of a membership change from the CLI; the server bounds its own part tighter.
const ADMIN_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn admin_call<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => anyhow::bail!("{}", status.message()),
        Err(_) => anyhow::bail!("no answer within {} s", ADMIN_CALL_TIMEOUT.as_secs()),
    }
}

fn environment() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn load_config(file: Option<&PathBuf>) -> anyhow::Result<(Config, Vec<String>)> {
    let loaded = Config::load(file.map(|p| p.as_path()), &environment())?;
    Ok((loaded.config, loaded.unknown_env))
}

fn apply_flags(config: &mut Config, args: &ServeArgs) -> anyhow::Result<()> {
    if let Some(id) = args.node_id {
        config.node.id = id;
    }
    if let Some(dir) = &args.data_dir {
        config.node.data_dir = dir.clone();
    }
    if let Some(addr) = &args.listen {
        config.network.listen_addr = addr.clone();
    }
    if let Some(addr) = &args.raft_listen {
        config.network.raft_listen_addr = addr.clone();
    }
    if let Some(addr) = &args.advertise {
        config.network.advertise_addr = Some(addr.clone());
    }
    if let Some(addr) = &args.raft_advertise {
        config.network.raft_advertise_addr = Some(addr.clone());
    }
    if let Some(peers) = &args.peers {
        config.cluster.peers = parse_peer_list(peers).map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
    }
    if let Some(name) = &args.cluster_name {
        config.cluster.name = name.clone();
    }
    Ok(())
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},openraft=warn", level.to_lowercase())));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

fn print_members(members: &[Member], json: bool) {
    if json {
        let rows: Vec<_> = members
            .iter()
            .map(
                |m| serde_json::json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr, "voter": m.voter}),
            )
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!("{:<6} {:<8} {:<24} {:<24}", "ID", "ROLE", "RAFT", "API");
    for m in members {
        println!("{:<6} {:<8} {:<24} {:<24}", m.id, if m.voter { "voter" } else { "learner" }, m.raft_addr, m.api_addr);
    }
}

async fn cluster_client(target: &Target) -> anyhow::Result<(Client, ClusterServiceClient<tonic::transport::Channel>)> {
    let client = Client::new(target.endpoints.clone())?;
    let channel = client.channel(0).context("no endpoint")?;
    Ok((client, ClusterServiceClient::new(channel)))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Serve(args) => {
            let (mut config, unknown_env) = load_config(args.config.as_ref())?;
            apply_flags(&mut config, &args)?;
            config.validate()?;
            init_tracing(&config.system.log_level);
            for name in unknown_env {
                tracing::warn!(variable = %name, "environment variable names no configuration key; ignored");
            }
            maos_node::serve::serve(config).await
        }
        Commands::Demo { keep_data } => {
            let binary = std::env::current_exe().context("cannot find the maos binary")?;
            let root = tempfile::Builder::new().prefix("maos-demo-").tempdir()?;
            let result = maos_node::demo::run(&binary, root.path()).await;
            if keep_data || result.is_err() {
                let kept = root.keep();
                println!("data and node logs kept in {}", kept.display());
            }
            result
        }
        Commands::Status { target } => {
            let client = Client::new(target.endpoints.clone())?;
            let mut rows = Vec::new();
            for (index, endpoint) in client.endpoints().iter().enumerate() {
                match client.status_of(index, true).await {
                    Ok(s) => rows.push(serde_json::json!({
                        "endpoint": endpoint, "node_id": s.node_id, "role": s.role, "term": s.current_term,
                        "leader_id": s.leader_id, "last_log_index": s.last_log_index,
                        "last_applied_index": s.last_applied_index, "state_hash": s.state_hash,
                        "cluster_id": s.cluster_id, "cluster_name": s.cluster_name,
                    })),
                    Err(error) => rows.push(serde_json::json!({"endpoint": endpoint, "error": error.to_string()})),
                }
            }
            if target.json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<22} {:<5} {:<10} {:<6} {:<7} {:<9} {:<17}",
                    "ENDPOINT", "NODE", "ROLE", "TERM", "LEADER", "APPLIED", "STATE HASH"
                );
                for row in rows {
                    if let Some(error) = row.get("error") {
                        println!(
                            "{:<22} unreachable: {}",
                            row["endpoint"].as_str().unwrap_or(""),
                            error.as_str().unwrap_or("")
                        );
                        continue;
                    }
                    println!(
                        "{:<22} {:<5} {:<10} {:<6} {:<7} {:<9} {:<17}",
                        row["endpoint"].as_str().unwrap_or(""),
                        row["node_id"],
                        row["role"].as_str().unwrap_or(""),
                        row["term"],
                        row["leader_id"],
                        row["last_applied_index"],
                        row["state_hash"].as_str().unwrap_or("").get(..16).unwrap_or(""),
                    );
                }
            }
            Ok(())
        }
        Commands::Cluster(ClusterCommand::Members { target }) => {
            let (client, _) = cluster_client(&target).await?;
            let status = client.status_of(0, false).await?;
            print_members(&status.members, target.json);
            Ok(())
        }
        Commands::Cluster(ClusterCommand::AddNode { id, raft_addr, api_addr, learner_only, target }) => {
            let (_, mut cluster) = cluster_client(&target).await?;
            let response =
                admin_call(cluster.add_node(AddNodeRequest { id, raft_addr, api_addr, learner_only })).await?;
            print_members(&response.members, target.json);
            Ok(())
        }
        Commands::Cluster(ClusterCommand::RemoveNode { id, target }) => {
            let (_, mut cluster) = cluster_client(&target).await?;
            let response = admin_call(cluster.remove_node(RemoveNodeRequest { id })).await?;
            print_members(&response.members, target.json);
            Ok(())
        }
        Commands::Kv(KvCommand::Put { key, value, target }) => {
            let revision = Client::new(target.endpoints)?.put(&key, &value).await?;
            println!("revision {revision}");
            Ok(())
        }
        Commands::Kv(KvCommand::Get { key, stale, target }) => {
            match Client::new(target.endpoints)?.get(&key, stale).await? {
                Some((value, revision)) if target.json => {
                    println!("{}", serde_json::json!({"key": key, "value": value, "revision": revision}))
                }
                Some((value, _)) => println!("{value}"),
                None => anyhow::bail!("key {key:?} not found"),
            }
            Ok(())
        }
        Commands::Config(ConfigCommand::Show(args)) => {
            let (config, _) = load_config(args.config.as_ref())?;
            print!("{}", serde_yaml::to_string(&config)?);
            Ok(())
        }
        Commands::Config(ConfigCommand::Validate(args)) => {
            let (config, unknown_env) = load_config(args.config.as_ref())?;
            config.validate()?;
            for name in unknown_env {
                eprintln!("warning: {name} names no configuration key");
            }
            println!("configuration is valid");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
