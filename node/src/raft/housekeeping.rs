//! Housekeeping: the cluster's identity recorded once by a leader, this node's addresses
//! registered in the replicated state, and the leader's eviction of finished tasks past their
//! retention (`tasks.retention`, `tasks.retained_max`) in bounded batches through the log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::auth::{ApiKeyRecord, AuthCommand, Role};
use maos_raft_store::runtime::MaosRuntime;
use maos_raft_store::tasks::{TaskCommand, TaskId, EVICT_BATCH_MAX};
use maos_raft_store::{Command, MaosNode};
use openraft::AsyncRuntime;
use tokio::sync::watch;

use crate::raft::core::NodeCore;

/// How often housekeeping checks the cluster identity and this node's registration.
pub(crate) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);
/// Keep the cluster identity recorded and this node's addresses registered; with
/// `bootstrap_dir` (auth on), bootstrap auth as the first leader (see [`AuthBootstrap`]).
pub(crate) async fn housekeeping(
    core: Arc<NodeCore>,
    me: MaosNode,
    bootstrap_dir: Option<PathBuf>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut bootstrap = bootstrap_dir.map(AuthBootstrap::new);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HOUSEKEEPING_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if core.leader().is_none() {
            continue;
        }
        let (has_identity, registered) = {
            let state = core.state.read();
            let registered =
                state.app.nodes.get(&core.id).is_some_and(|r| r.raft_addr == me.raft_addr && r.api_addr == me.api_addr);
            (state.app.cluster.is_some(), registered)
        };
        if !has_identity && core.is_leader() {
            // Drawn from openraft's runtime random source: seeded in simulations, so runs replay.
            let bytes: [u8; 16] = rand::Rng::gen(&mut <MaosRuntime as AsyncRuntime>::thread_rng());
            let cluster_id = uuid::Builder::from_random_bytes(bytes).into_uuid().to_string();
            let command = Command::InitCluster { cluster_id, cluster_name: core.cluster_name.clone() };
            if let Err(error) = core.write(command).await {
                tracing::debug!(node_id = core.id, %error, "recording the cluster identity failed; will retry");
            }
        }
        if let Some(step) = bootstrap.as_mut() {
            if step.run(&core).await {
                bootstrap = None;
            }
        }
        if !registered && core.members().contains_key(&core.id) {
            let command = Command::RegisterNode {
                node_id: core.id,
                raft_addr: me.raft_addr.clone(),
                api_addr: me.api_addr.clone(),
            };
            if let Err(error) = core.write(command).await {
                tracing::debug!(node_id = core.id, %error, "registering this node failed; will retry");
            }
        }
    }
}

/// The name of the bootstrap admin token's file in the data dir.
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";

/// Auth's bootstrap: the first leader draws the cluster's auth secret and an admin key, proposes
/// both, and once the state holds its key writes the key's token, once, mode 0600, to
/// `<data dir>/bootstrap-token`. A node that finds auth bootstrapped by another is done.
struct AuthBootstrap {
    dir: PathBuf,
    /// The key this node proposed (id, token), until the state shows what became of it.
    proposed: Option<(String, String)>,
}

impl AuthBootstrap {
    fn new(dir: PathBuf) -> Self {
        Self { dir, proposed: None }
    }

    /// One round; true when there is nothing left to do on this node.
    async fn run(&mut self, core: &NodeCore) -> bool {
        let (bootstrapped, mine) = {
            let state = core.state.read();
            let auth = &state.app.auth;
            (auth.bootstrapped(), self.proposed.as_ref().is_some_and(|(id, _)| auth.keys.contains_key(id)))
        };
        if mine {
            if let Some((id, token)) = self.proposed.take() {
                self.write_token(&id, &token);
            }
            return true;
        }
        if bootstrapped {
            return true;
        }
        if !core.is_leader() {
            return false;
        }
        let (id, token, command) = self.proposed.clone().map_or_else(
            || {
                let secret = maos_raft_store::auth::new_auth_secret();
                let key = maos_raft_store::auth::new_key(&secret);
                let admin = ApiKeyRecord {
                    id: key.id.clone(),
                    name: "bootstrap".into(),
                    role: Role::Admin,
                    hash: key.hash,
                    created_by: "bootstrap".into(),
                    created_at_ms: 0,
                    expires_at_ms: None,
                };
                (key.id, key.token, Some(Command::Auth(AuthCommand::Bootstrap { secret, admin })))
            },
            |(id, token)| (id, token, None),
        );
        self.proposed = Some((id, token));
        if let Some(command) = command {
            match core.write(command).await {
                Ok(_) => tracing::info!(node_id = core.id, "auth bootstrapped"),
                Err(error) => tracing::debug!(node_id = core.id, %error, "bootstrapping auth failed; will retry"),
            }
        }
        // A failed write may still have applied: the next round reads the state and decides.
        if !core.state.read().app.auth.bootstrapped() {
            self.proposed = None;
        }
        false
    }

    fn write_token(&self, id: &str, token: &str) {
        let path = self.dir.join(BOOTSTRAP_TOKEN_FILE);
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::create_dir_all(&self.dir)?;
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            file.write_all(format!("{token}\n").as_bytes())?;
            file.sync_all()
        })();
        match written {
            Ok(()) => tracing::info!(
                key = id,
                path = %path.display(),
                "the bootstrap admin token is written (mode 0600); use it for `maos auth key create`, then keep it safe or revoke it"
            ),
            Err(error) => tracing::error!(
                key = id,
                path = %path.display(),
                %error,
                "could not write the bootstrap admin token; it is lost: restart with a fresh cluster or revoke key {id} from another admin key"
            ),
        }
    }
}

/// Between eviction rounds, when the last one had less than a full batch.
pub(crate) const EVICTION_INTERVAL: Duration = Duration::from_millis(500);
/// Finished tasks one eviction round looks at, at most (tasks still needed are passed over).
const EVICTION_SCAN_MAX: usize = 50_000;

/// How far the PostgreSQL mirror has caught up: the applied index of the projector's last
/// complete round, at which every task's state was in PostgreSQL. With PostgreSQL the leader
/// evicts only tasks whose final state the mirror holds, so `Get` can answer from it after.
#[derive(Debug, Default)]
pub struct MirrorProgress(AtomicU64);

impl MirrorProgress {
    pub fn mirrored_through(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn record(&self, applied_index: u64) {
        self.0.fetch_max(applied_index, Ordering::AcqRel);
    }
}

/// On the leader, evict finished tasks past their retention (or over `tasks.retained_max`), at
/// most [`EVICT_BATCH_MAX`] per command. With a mirror (`mirror`), the tasks chosen at applied
/// index `i` are proposed only once the mirror has caught up with `i`; apply checks again that
/// each still finished when chosen, so a task changed since is kept.
pub(crate) async fn evict_finished(
    core: Arc<NodeCore>,
    mirror: Option<Arc<MirrorProgress>>,
    mut stopped: watch::Receiver<bool>,
) {
    // Chosen at an applied index, waiting for the mirror to reach it.
    let mut waiting: Option<(u64, Vec<(TaskId, u64)>)> = None;
    let mut full = false;
    loop {
        let pause = if full { Duration::ZERO } else { EVICTION_INTERVAL };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        full = false;
        if !core.is_leader() {
            waiting = None;
            continue;
        }
        // Retention is an expiry: only a leader whose clock a quorum's agree with evicts.
        if !core.clock_bound.may_expire() {
            continue;
        }
        if let Some((chosen_at, tasks)) = waiting.take() {
            if mirror.as_ref().is_some_and(|m| m.mirrored_through() < chosen_at) {
                waiting = Some((chosen_at, tasks));
                continue;
            }
            full = tasks.len() == EVICT_BATCH_MAX;
            propose_eviction(&core, tasks).await;
            continue;
        }
        let now_ms = (core.clock)();
        let (applied, tasks, keys_due) = {
            let state = core.state.read();
            let table = &state.app.tasks;
            if !table.eviction_due(now_ms) {
                continue;
            }
            let tasks = table.eviction_candidates(now_ms, EVICT_BATCH_MAX, EVICTION_SCAN_MAX);
            let keys_due = table.retired_key_expiries.first().is_some_and(|(at, _)| *at <= now_ms);
            (state.last_applied.map(|id| id.index).unwrap_or(0), tasks, keys_due)
        };
        match (&mirror, tasks.is_empty()) {
            (_, true) if keys_due => propose_eviction(&core, tasks).await,
            (_, true) => {}
            (Some(_), false) => waiting = Some((applied, tasks)),
            (None, false) => {
                full = tasks.len() == EVICT_BATCH_MAX;
                propose_eviction(&core, tasks).await;
            }
        }
    }
}

async fn propose_eviction(core: &NodeCore, tasks: Vec<(TaskId, u64)>) {
    let named = tasks.len();
    match core.write(Command::Task(TaskCommand::Evict { tasks })).await {
        Ok(response) => tracing::debug!(node_id = core.id, named, ?response, "evicted finished tasks"),
        Err(error) => tracing::debug!(node_id = core.id, %error, "evicting finished tasks failed; next round"),
    }
}
