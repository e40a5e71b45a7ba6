//! The replicated commands and their results.
//!
//! Every entry in the Raft log that carries application data is a [`Request`]:
//! a format version, the time the leader stamped on it, and one [`Command`].
//! The state machine never reads a clock; it uses `stamped_at_ms`.

use serde::{Deserialize, Serialize};

use crate::auth::{AuthCommand, AuthRejection};
use crate::tasks::{TaskCommand, TaskRejection, TaskResponse};
use crate::NodeId;

/// The newest version of the [`Request`] format this build writes.
///
/// Version 1 is the first. Version 2 adds the agent runtime's commands (agents, checkpoints,
/// progress, usage, plans, retry, fenced key-value writes), key TTLs and a task's `max_agents`,
/// which changes what `Assign` accepts: a version-1 node must stop rather than apply them
/// differently. Version 3 adds retention (`TaskCommand::Evict`, and the retention limits
/// `Configure` carries). Version 4 adds auth (`Command::Auth`). Older entries read and apply unchanged. A node stops applying (a storage error, never a panic or a silent
/// difference) at a request whose version is newer than it understands, so a mixed-version
/// cluster cannot diverge; upgrading the node lets it continue from that entry.
pub const REQUEST_FORMAT_VERSION: u16 = 4;

/// Upper bound on a coordination key, in bytes.
pub const KEY_BYTES_MAX: usize = 256;
/// Upper bound on a coordination value, in bytes.
pub const VALUE_BYTES_MAX: usize = 64 * 1024;
/// Upper bound on the number of coordination keys held by the state machine.
pub const KEYS_MAX: usize = 1_000_000;
/// Upper bound on a cluster name, in bytes.
pub const CLUSTER_NAME_BYTES_MAX: usize = 64;
/// Upper bound on a network address string, in bytes.
pub const ADDRESS_BYTES_MAX: usize = 256;

/// Upper bound on open client sessions; opening one more is refused, retryably.
pub const SESSIONS_MAX: usize = 4_096;
/// Upper bound on one session's answers not yet acknowledged (commands in flight).
pub const SESSION_ANSWERS_MAX: usize = 32_768;
/// Bounds on a session's time to live without a command.
pub const SESSION_TTL_MS_MIN: u64 = 1_000;
pub const SESSION_TTL_MS_MAX: u64 = 24 * 3_600_000;
/// Upper bound on a session owner's principal id, in bytes.
pub const SESSION_OWNER_BYTES_MAX: usize = 256;

/// Upper bound on commands in one log entry.
pub const BATCH_COMMANDS_MAX: usize = 1024;
/// Upper bound on the key and value bytes of the commands in one log entry (one command may
/// exceed it alone; it then travels alone).
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;

/// One log entry's application payload: a batch of commands proposed together.
///
/// The leader batches concurrent commands into one entry so that one log write and one
/// replication round serve them all (openraft 0.9 writes each entry to the log before taking
/// the next). Commands in a batch apply in order and each gets its own [`Response`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Format version of this request; see [`REQUEST_FORMAT_VERSION`].
    pub format_version: u16,
    /// Milliseconds since the Unix epoch, stamped by the leader that proposed the entry.
    /// Apply uses this instead of a clock so every replica computes the same state.
    pub stamped_at_ms: u64,
    pub commands: Vec<Command>,
}

impl Request {
    /// A request in the current format.
    pub fn new(stamped_at_ms: u64, commands: Vec<Command>) -> Self {
        Self { format_version: REQUEST_FORMAT_VERSION, stamped_at_ms, commands }
    }
}

/// The results of one entry: one [`Response`] per command, in order (none for blank and
/// membership entries).
pub type Responses = Vec<Response>;

/// The commands the replicated state machine applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Record the cluster's identity. Proposed once, by the node that initialised the group;
    /// a second, different identity is refused.
    InitCluster { cluster_id: String, cluster_name: String },
    /// Register (or re-register with new addresses) a node's advertised addresses.
    RegisterNode { node_id: NodeId, raft_addr: String, api_addr: String },
    /// Write a coordination key.
    ///
    /// With `ttl_ms` the key expires that long after the write (shared state); without, it
    /// stays until deleted.
    KvPut {
        key: String,
        value: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// Write a coordination key only if its current value is `expected` (`None`: absent).
    /// An expired key counts as absent.
    KvCompareAndSet {
        key: String,
        expected: Option<String>,
        value: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl_ms: Option<u64>,
    },
    /// Remove a coordination key; removing an absent key is not an error.
    KvDelete { key: String },
    /// A task, lease or scheduling command.
    Task(TaskCommand),
    /// A key-value write made on behalf of a lease (an agent's shared state): it applies only
    /// while `token` is `task_id`'s current lease, so a stale agent's write changes nothing.
    Fenced { task_id: String, token: u64, command: Box<Command> },
    /// Open a client session (Raft dissertation §6.3): its id is this command's fencing token,
    /// so no two sessions share one. It expires `ttl_ms` after its last command, by leader time.
    /// `owner` is the principal that opened it (empty: a node's own session); only commands
    /// sent by that principal go on it.
    OpenSession {
        ttl_ms: u64,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        owner: String,
    },
    /// `command` sent by session `client` as its `sequence`-th command (from 1). It applies once:
    /// a repeat of a sequence whose answer the session holds gets that answer again, without
    /// applying. Every sequence at or below `acknowledged` has its answer at the client, so the
    /// state forgets those answers. A refused command is not remembered (nothing applied).
    /// `owner` is the principal that sent it (empty: the node itself), which must be the
    /// session's: a session id is a log position, not a secret.
    Session {
        client: u64,
        sequence: u64,
        acknowledged: u64,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        owner: String,
        command: Box<Command>,
    },
    /// API keys and the auth secret (`auth.rs`).
    Auth(AuthCommand),
}

impl Command {
    /// The name of a command only the leader proposes itself (its scheduling round, expiry,
    /// eviction, the cluster's identity and auth bootstrap), which a member may therefore never
    /// forward: a node that lost the leadership while planning, or a member that was taken
    /// over, cannot have its plan applied by another leader. `None` for what a node sends on a
    /// client's or its own agents' behalf.
    pub fn leader_only(&self) -> Option<&'static str> {
        match self {
            Command::InitCluster { .. } => Some("InitCluster"),
            Command::Auth(AuthCommand::Bootstrap { .. }) => Some("Auth::Bootstrap"),
            Command::Task(TaskCommand::Assign { .. }) => Some("Task::Assign"),
            Command::Task(TaskCommand::Tick) => Some("Task::Tick"),
            Command::Task(TaskCommand::ExtendLeases { .. }) => Some("Task::ExtendLeases"),
            Command::Task(TaskCommand::Configure { .. }) => Some("Task::Configure"),
            Command::Task(TaskCommand::Evict { .. }) => Some("Task::Evict"),
            Command::Session { command, .. } | Command::Fenced { command, .. } => command.leader_only(),
            _ => None,
        }
    }

    /// The W3C `traceparent` of the trace this command continues (a submit's, when its trace is
    /// recorded), else empty.
    pub fn trace_parent(&self) -> &str {
        match self {
            Command::Task(TaskCommand::Submit { spec }) => &spec.trace_parent,
            Command::Session { command, .. } | Command::Fenced { command, .. } => command.trace_parent(),
            _ => "",
        }
    }

    /// The refusal of a [`Command::leader_only`] command sent by, or to, a node that does not lead.
    pub fn not_forwardable(name: &str) -> Rejection {
        Rejection::InvalidField {
            field: "command".into(),
            message: format!("{name} is proposed only by the leader itself, never forwarded (this node does not lead)"),
        }
    }

    /// Key and value bytes this command carries, for batch size limits.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::InitCluster { cluster_id, cluster_name } => cluster_id.len() + cluster_name.len(),
            Command::RegisterNode { raft_addr, api_addr, .. } => raft_addr.len() + api_addr.len(),
            Command::KvPut { key, value, .. } => key.len() + value.len(),
            Command::KvCompareAndSet { key, expected, value, .. } => {
                key.len() + value.len() + expected.as_ref().map_or(0, String::len)
            }
            Command::KvDelete { key } => key.len(),
            Command::Fenced { task_id, command, .. } => task_id.len() + command.payload_bytes(),
            Command::OpenSession { owner, .. } => 16 + owner.len(),
            Command::Session { owner, command, .. } => 24 + owner.len() + command.payload_bytes(),
            Command::Task(TaskCommand::Submit { spec }) => spec.description.len() + spec.input.len(),
            Command::Task(TaskCommand::Complete { result, .. }) => result.len(),
            Command::Task(TaskCommand::Fail { error, .. }) => error.len(),
            Command::Task(TaskCommand::SaveCheckpoint { data, .. }) => data.len(),
            Command::Task(TaskCommand::Expand { subtasks, .. }) => subtasks
                .iter()
                .map(|s| {
                    s.description.len() + s.input.len() + s.depends_on.iter().map(|d| d.len() + 8).sum::<usize>() + 64
                })
                .sum(),
            Command::Task(TaskCommand::Renew { leases, .. }) => {
                64 + leases.iter().map(|(id, _)| id.len() + 16).sum::<usize>()
            }
            Command::Task(TaskCommand::Evict { tasks }) => {
                64 + tasks.iter().map(|(id, _)| id.len() + 16).sum::<usize>()
            }
            Command::Task(_) => 64,
            Command::Auth(_) => 256,
        }
    }
}

/// The result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// A blank or membership entry, or a command with nothing to report.
    Applied,
    /// A key was written; `revision` is the cluster-wide write counter after this write.
    KvWritten { revision: u64 },
    /// A key was deleted (`existed` says whether it was present).
    KvDeleted { existed: bool },
    /// A compare-and-set found another value; nothing changed.
    KvCompareFailed { current: Option<String> },
    /// A task command's result.
    Task(TaskResponse),
    /// A client session was opened with this id.
    SessionOpened { client: u64 },
    /// The command was refused; nothing changed.
    Rejected(Rejection),
}

/// Why a command was refused. Every refusal leaves the state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    #[error("field `{field}` is invalid: {message}")]
    InvalidField { field: String, message: String },
    #[error("field `{field}` is {actual} bytes, over the limit of {limit}")]
    TooLarge { field: String, actual: usize, limit: usize },
    #[error("the coordination key space is full ({limit} keys); delete keys before writing new ones")]
    KeySpaceFull { limit: usize },
    #[error("an entry carries {count} commands, over the limit of {limit}")]
    BatchTooLarge { count: usize, limit: usize },
    #[error("{0}")]
    Task(#[from] TaskRejection),
    #[error("{0}")]
    Auth(#[from] AuthRejection),
    #[error("this cluster is already initialised as {existing_id}; refusing identity {proposed_id}")]
    ClusterIdentityConflict { existing_id: String, proposed_id: String },
    #[error("client session {client} is unknown or expired (no command within its time to live); open a new session; a command already sent on it may or may not have applied")]
    SessionExpired { client: u64 },
    #[error("{limit} client sessions are open, the most the cluster keeps; retry when one expires")]
    SessionsFull { limit: usize },
    #[error("client session {client} has {limit} commands without an acknowledged answer; wait for answers before sending more")]
    SessionWindowFull { client: u64, limit: usize },
    #[error("client session {client} already acknowledged the answer to command {sequence}; it cannot be sent again")]
    SessionSequenceAcknowledged { client: u64, sequence: u64 },
    #[error("client session {client} was opened by another principal than {sender:?}; open a session of your own (ClusterService.OpenSession)")]
    SessionNotYours { client: u64, sender: String },
}
