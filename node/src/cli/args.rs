//! The `maos` command tree (clap): every subcommand, flag and environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "maos", version, about = "MAOS: a multi-agent operating system on a Raft cluster")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand)]
pub enum Commands {
    /// Run a node.
    Serve(ServeArgs),
    /// Start a local 3-node cluster, run a planned multi-agent workflow, kill the leader mid-way,
    /// show that the workflow completes with nothing lost or duplicated, stop.
    Demo {
        /// Keep the cluster's data directory instead of deleting it.
        #[arg(long)]
        keep_data: bool,
        /// Leave the cluster (and its dashboards) running after the summary, until Ctrl-C.
        #[arg(long)]
        keep: bool,
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
    /// API keys and who a token authenticates as (docs/SECURITY.md).
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Check a running cluster and this node's configuration for security problems; each
    /// finding with its severity and fix (exit code 8 when one is high).
    SecurityScan {
        /// Also probe every member's Raft port as a stranger would.
        #[arg(long)]
        comprehensive: bool,
        /// The node configuration to inspect (else MAOS_CONFIG, else the defaults and MAOS_*).
        #[arg(long, short, env = "MAOS_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// The audit log: who changed what, and refused authentications.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
pub enum AuthCommand {
    /// Create, list and revoke API keys (admin).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Show the principal and roles the token authenticates as.
    Whoami {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// The newest audit records (admin): PostgreSQL's audit_log, or embedded the answering
    /// node's audit.jsonl.
    List {
        /// Only records newer than this: 1h, 30m, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Only this principal's records (key:<id>, anonymous, unauthenticated).
        #[arg(long)]
        principal: Option<String>,
        /// At most this many (1..=1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key and print its secret, once.
    Create {
        /// A name for people: ci, alice-laptop.
        #[arg(long)]
        name: String,
        /// admin, operator, submitter, worker or viewer.
        #[arg(long)]
        role: String,
        /// Lifetime: 90d, 12h, 30m or seconds (default: never expires).
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List the keys (never their secrets).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a key: every node refuses it once the revocation applies there.
    Revoke {
        /// The key's id (the 16 hex digits after `maos_`).
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
pub enum DbCommand {
    /// Apply the migrations this build carries that the database does not have yet.
    Migrate(DbArgs),
    /// Show each migration and whether the database has it (exit code 3 when some are pending).
    Status(DbArgs),
}

#[derive(Args)]
pub struct DbArgs {
    #[arg(long, short, env = "MAOS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides database.primary_url.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone)]
pub struct Target {
    /// API endpoints (host:port), comma-separated.
    #[arg(long, env = "MAOS_ENDPOINTS", default_value = "127.0.0.1:8000", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// API key or token (`maos_…`); else `MAOS_TOKEN`, else the file `~/.config/maos/token`.
    #[arg(long, env = "MAOS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA that signed the nodes' certificates (`security.tls.cert_file`); endpoints are then
    /// https. An `https://` endpoint without it is checked against the public web roots.
    #[arg(long, env = "MAOS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for nodes that require one (`security.tls.client_ca_file`); with --key.
    #[arg(long = "cert", env = "MAOS_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long = "key", env = "MAOS_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
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
pub enum TaskCommand {
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
        #[arg(long, value_delimiter = ',', value_parser = maos_client::views::parse_state)]
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
pub enum AgentCommand {
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
pub enum KvCommand {
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
pub enum ConfigCommand {
    /// Print the effective configuration as YAML.
    Show(ConfigArgs),
    /// Check the configuration; name every bad key and value.
    Validate(ConfigArgs),
}

#[derive(Args)]
pub struct ConfigArgs {
    #[arg(long, short, env = "MAOS_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// YAML configuration file.
    #[arg(long, short, env = "MAOS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: maos_node::config::Flags,
}
