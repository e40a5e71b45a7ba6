//! The `maos` command line: `serve`, `demo`, `health`, `status`, `task`, `agent`, `cluster`,
//! `kv`, `config`, `completions`. Exit codes: see `maos_node::cli`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::{AddNodeRequest, ListTasksRequest, Member, RemoveNodeRequest, TransferLeaderRequest};
use maos_client::{AgentChange, Client};
use maos_node::cli;
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
    /// Start a local 3-node cluster, run a planned multi-agent workflow, kill the leader mid-way,
    /// show that the workflow completes with nothing lost or duplicated, stop.
    Demo {
        /// Keep the cluster's data directory instead of deleting it.
        #[arg(long)]
        keep_data: bool,
    },
    /// Check each node's /health and /ready (exit code 5 when one is not).
    Health {
        /// Also show Raft, storage, task and agent status.
        #[arg(long)]
        all_components: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show each node's view of the cluster.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Submit, inspect and control tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// List and control agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The coordination key-value space.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Show or check the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The PostgreSQL task-data schema (`database.primary_url`).
    #[command(subcommand)]
    Db(DbCommand),
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the migrations this build carries that the database does not have yet.
    Migrate(DbArgs),
    /// Show each migration and whether the database has it (exit code 3 when some are pending).
    Status(DbArgs),
}

#[derive(Args)]
struct DbArgs {
    #[arg(long, short, env = "MAOS_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides database.primary_url.
    #[arg(long)]
    database_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    /// Form a new cluster from the peers the nodes were started with (needed with
    /// `cluster.bootstrap: manual`), then wait for its leader. Harmless on a formed cluster.
    Init {
        #[command(flatten)]
        target: Target,
    },
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
    /// Move leadership to a voter.
    TransferLeader {
        /// The node to lead.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Submit a task; with --wait, follow it to its end.
    Submit {
        /// The agent type to run it (`mixed`: plan it first).
        #[arg(long = "type")]
        task_type: String,
        #[arg(long, short)]
        description: String,
        /// Input text, or @FILE to read it from a file.
        #[arg(long)]
        input: Option<String>,
        /// low, normal, high or critical.
        #[arg(long, default_value = "normal")]
        priority: String,
        /// Task ids that must complete first (comma-separated).
        #[arg(long, value_delimiter = ',')]
        depends_on: Vec<String>,
        /// Seconds one attempt may run.
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(long, default_value_t = 3)]
        max_retries: u32,
        /// Subtasks of this task running at once, at most.
        #[arg(long)]
        max_agents: Option<u32>,
        /// Plan it into subtasks first.
        #[arg(long)]
        plan: bool,
        /// Makes a retried submit return the first task instead of a second one.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Follow the task until it ends (exit code 7 if it fails).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List tasks (newest last).
    List {
        /// Only these states (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = maos_node::cli::parse_state)]
        state: Vec<i32>,
        #[arg(long = "type")]
        task_type: Option<String>,
        /// Only the subtasks of this task.
        #[arg(long)]
        parent: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Show one task.
    Show {
        task_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Cancel a task and its subtasks.
    Cancel {
        task_id: String,
        #[arg(long, default_value = "cancelled from the command line")]
        reason: String,
        #[command(flatten)]
        target: Target,
    },
    /// Run a failed or cancelled task again.
    Retry {
        task_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// A task's result and its subtasks'.
    Results {
        task_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Follow a task (and its subtasks) until it ends (exit code 7 if it fails).
    Watch {
        task_id: String,
        /// Also show its subtasks' events.
        #[arg(long)]
        children: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// List agents.
    List {
        /// Only this node's (or worker's) agents.
        #[arg(long)]
        node: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Add an agent of a type the node runs.
    Spawn {
        agent_type: String,
        /// The node (default: the one that takes the call).
        #[arg(long)]
        node: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Drain an agent: it finishes its attempt and takes no more.
    Pause {
        agent_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Let a paused or failed agent take work again.
    Resume {
        agent_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Stop an agent for good; its attempt runs elsewhere.
    Terminate {
        agent_id: String,
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
        // Typed, so the exit code says what went wrong (3 refused, 4 not found, 5 unavailable).
        Ok(Err(status)) => Err(maos_client::ClientError::from_status(status).into()),
        Err(_) => Err(maos_client::ClientError::Unavailable {
            deadline_ms: ADMIN_CALL_TIMEOUT.as_millis() as u64,
            last: "no answer from the first endpoint".into(),
        }
        .into()),
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

/// `maos cluster init`: ask the first endpoint to form the cluster, then wait for a leader.
async fn cluster_init(target: &Target) -> anyhow::Result<()> {
    let (client, mut cluster) = cluster_client(target).await?;
    let answer = admin_call(cluster.initialize(maos_client::proto::v1::InitializeRequest {})).await?;
    let deadline = tokio::time::Instant::now() + ADMIN_CALL_TIMEOUT;
    let spinner = ['|', '/', '-', '\\'];
    let mut turn = 0;
    let status = loop {
        match client.status_of(0, false).await {
            Ok(status) if status.leader_id.is_some() => break status,
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(cli::Unhealthy(format!(
                    "the cluster formed but elected no leader within {} s; check `maos status`",
                    ADMIN_CALL_TIMEOUT.as_secs()
                ))
                .into());
            }
            _ => {}
        }
        if !target.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r{} waiting for a leader", spinner[turn % spinner.len()]);
            turn += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if target.json {
        let members: Vec<u64> = answer.members.iter().map(|m| m.id).collect();
        println!(
            "{}",
            serde_json::json!({"already_initialized": answer.already_initialized, "members": members,
                "leader_id": status.leader_id, "term": status.current_term})
        );
    } else {
        if turn > 0 {
            eprintln!("\r                       \r");
        }
        let what = if answer.already_initialized { "was already formed" } else { "formed" };
        println!(
            "cluster {} {what}: leader node {} (term {})",
            status.cluster_name,
            status.leader_id.unwrap_or(0),
            status.current_term
        );
        print_members(&answer.members, false);
    }
    Ok(())
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
        Commands::Health { all_components, target } => {
            maos_node::cli::health(&target.endpoints, all_components, target.json).await
        }
        Commands::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "maos", &mut std::io::stdout());
            Ok(())
        }
        Commands::Task(command) => task_command(command).await,
        Commands::Agent(command) => agent_command(command).await,
        Commands::Cluster(ClusterCommand::TransferLeader { to, target }) => {
            let (_, mut cluster) = cluster_client(&target).await?;
            let answer = admin_call(cluster.transfer_leader(TransferLeaderRequest { node_id: to })).await?;
            if target.json {
                println!("{}", serde_json::json!({"leader_id": answer.leader_id, "term": answer.term}));
            } else {
                println!("node {} leads (term {})", answer.leader_id, answer.term);
            }
            Ok(())
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
        Commands::Cluster(ClusterCommand::Init { target }) => cluster_init(&target).await,
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
            let (mut config, _) = load_config(args.config.as_ref())?;
            // Passwords in URLs are secrets: shown as ***.
            for url in [config.database.primary_url.as_mut(), config.redis.url.as_mut()].into_iter().flatten() {
                *url = maos_node::config::redact_url(url);
            }
            print!("{}", serde_yaml::to_string(&config)?);
            Ok(())
        }
        Commands::Db(command) => db_command(command).await,
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

async fn db_command(command: DbCommand) -> anyhow::Result<()> {
    let (DbCommand::Migrate(args) | DbCommand::Status(args)) = &command;
    let (mut config, _) = load_config(args.config.as_ref())?;
    if let Some(url) = &args.database_url {
        config.database.primary_url = Some(url.clone());
    }
    config.validate()?;
    if config.database.primary_url.is_none() {
        anyhow::bail!(
            "database.primary_url is not set: task data is embedded in the replicated state and has no schema; set MAOS_DATABASE_PRIMARY_URL or --database-url"
        );
    }
    let metrics = Default::default();
    let store = maos_node::storage::postgres::PgStore::connect_lazy(
        config.database.primary_url.as_deref().unwrap_or_default(),
        &config.database,
        metrics,
    )?;
    if let DbCommand::Migrate(_) = command {
        store.migrate().await?;
    }
    let status = store.migration_status().await?;
    let pending = status.iter().filter(|m| m.installed_on.is_none()).count();
    if args.json {
        println!("{}", serde_json::json!({ "database": store.name, "migrations": status, "pending": pending }));
    } else {
        println!("database {}", store.name);
        println!("{:<10} {:<28} APPLIED", "VERSION", "DESCRIPTION");
        for m in &status {
            println!("{:<10} {:<28} {}", m.version, m.description, m.installed_on.as_deref().unwrap_or("pending"));
        }
        if pending == 0 {
            println!("the schema is current");
        } else {
            println!("{pending} pending: run `maos db migrate`");
        }
    }
    if pending > 0 {
        return Err(cli::Refused(format!("{pending} migration(s) pending")).into());
    }
    Ok(())
}

fn client(target: &Target) -> anyhow::Result<Client> {
    Ok(Client::new(target.endpoints.clone())?)
}

async fn task_command(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Submit {
            task_type,
            description,
            input,
            priority,
            depends_on,
            timeout,
            max_retries,
            max_agents,
            plan,
            idempotency_key,
            wait,
            target,
        } => {
            let request = cli::submit_request(
                task_type,
                description,
                input,
                &priority,
                depends_on,
                timeout,
                max_retries,
                max_agents,
                plan,
                idempotency_key,
            )?;
            let client = client(&target)?;
            let answer = client.submit(request).await?;
            if target.json {
                println!("{}", serde_json::json!({"task_id": answer.task_id, "duplicate": answer.duplicate}));
            } else if answer.duplicate {
                println!("{} (already submitted with this idempotency key)", answer.task_id);
            } else {
                println!("{}", answer.task_id);
            }
            if wait {
                let last = cli::watch(&client, &answer.task_id, true, target.json).await?;
                if !target.json {
                    println!("{}", last.result);
                }
            }
            Ok(())
        }
        TaskCommand::List { state, task_type, parent, limit, target } => {
            let request = ListTasksRequest {
                states: state,
                task_type: task_type.unwrap_or_default(),
                parent: parent.unwrap_or_default(),
                ..Default::default()
            };
            let tasks = cli::list_all(&client(&target)?, request, limit.max(1)).await?;
            cli::print_tasks(&tasks, target.json);
            Ok(())
        }
        TaskCommand::Show { task_id, target } => {
            cli::print_task(&client(&target)?.task(&task_id).await?, target.json);
            Ok(())
        }
        TaskCommand::Cancel { task_id, reason, target } => {
            let cancelled = client(&target)?.cancel(&task_id, &reason).await?;
            if target.json {
                println!("{}", serde_json::json!({"cancelled": cancelled}));
            } else {
                println!("cancelled {} task(s): {}", cancelled.len(), cancelled.join(", "));
            }
            Ok(())
        }
        TaskCommand::Retry { task_id, target } => {
            cli::print_task(&client(&target)?.retry(&task_id).await?, target.json);
            Ok(())
        }
        TaskCommand::Results { task_id, target } => {
            let results = client(&target)?.results(&task_id).await?;
            if target.json {
                let children: Vec<_> = results
                    .children
                    .iter()
                    .map(|c| {
                        serde_json::json!({"task_id": c.task_id, "plan_key": c.plan_key,
                        "state": cli::state_name(c.state), "result": c.result, "cause": c.cause})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"task_id": results.task_id, "state": cli::state_name(results.state),
                        "result": results.result, "cause": results.cause, "children": children})
                );
            } else {
                println!("{} {}", results.task_id, cli::state_name(results.state));
                for child in &results.children {
                    println!("  {:<16} {:<10} {}", child.plan_key, cli::state_name(child.state), child.result);
                }
                println!("{}", if results.result.is_empty() { &results.cause } else { &results.result });
            }
            Ok(())
        }
        TaskCommand::Watch { task_id, children, target } => {
            cli::watch(&client(&target)?, &task_id, children, target.json).await.map(|_| ())
        }
    }
}

async fn agent_command(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::List { node, target } => {
            let list = client(&target)?.agents(node.unwrap_or(0)).await?;
            cli::print_agents(&list.agents, target.json);
            if !target.json {
                println!("{} agents, {} busy", list.total, list.active);
            }
            Ok(())
        }
        AgentCommand::Spawn { agent_type, node, target } => {
            let view = client(&target)?.spawn_agent(node.unwrap_or(0), &agent_type).await?;
            cli::print_agents(&[view], target.json);
            Ok(())
        }
        AgentCommand::Pause { agent_id, target } => {
            cli::change_agent(&client(&target)?, &agent_id, AgentChange::Pause, target.json).await
        }
        AgentCommand::Resume { agent_id, target } => {
            cli::change_agent(&client(&target)?, &agent_id, AgentChange::Resume, target.json).await
        }
        AgentCommand::Terminate { agent_id, target } => {
            cli::change_agent(&client(&target)?, &agent_id, AgentChange::Terminate, target.json).await
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
            ExitCode::from(cli::exit_code(&error))
        }
    }
}
