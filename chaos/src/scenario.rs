//! One simulated run: a 3-node cluster, a client writing through it, a leader crash, a
//! partition, healing, and the invariants checked at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use maos_client::Client;
use maos_node::config::{Config, PeerConfig};
use maos_node::server::Clock;
use maos_raft_store::mem::{MemLogStore, MemSnapshots};
use maos_raft_store::runtime::seed_thread_rng;
use maos_raft_store::{StateMachineHandle, StateMachineStore, Validation};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::invariants;
use crate::transport::{sim_channel, SimTransport};

/// Nodes in a simulated cluster.
pub const NODES: u64 = 3;
/// Upper bound on client writes in one run.
pub const WRITES_MAX: usize = 400;
/// Simulated time allowed for the final write (liveness) and for replicas to converge.
const LIVENESS_WINDOW: Duration = Duration::from_secs(30);
/// Simulated time after which a run is abandoned as hung.
const SIMULATION_LIMIT: Duration = Duration::from_secs(300);

/// Everything about a run, derived from its seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioPlan {
    pub seed: u64,
    pub max_latency_ms: u64,
    pub write_interval_ms: u64,
    pub crash_leader_at_ms: u64,
    pub restart_after_ms: u64,
    pub partitioned_node: u64,
    pub partition_at_ms: u64,
    pub partition_for_ms: u64,
}

impl ScenarioPlan {
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let crash_leader_at_ms = rng.gen_range(3_000..6_000);
        let restart_after_ms = rng.gen_range(1_000..4_000);
        let partition_at_ms = crash_leader_at_ms + restart_after_ms + rng.gen_range(2_000..4_000);
        Self {
            seed,
            max_latency_ms: rng.gen_range(1..20),
            write_interval_ms: rng.gen_range(10..50),
            crash_leader_at_ms,
            restart_after_ms,
            partitioned_node: rng.gen_range(1..=NODES),
            partition_at_ms,
            partition_for_ms: rng.gen_range(2_000..5_000),
        }
    }

    fn heal_at_ms(&self) -> u64 {
        self.partition_at_ms + self.partition_for_ms
    }
}

/// What a run observed; equal for two runs of the same seed when the simulation is deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub seed: u64,
    pub acknowledged: usize,
    pub leaders_by_term: BTreeMap<u64, BTreeSet<u64>>,
    pub final_index: u64,
    pub final_hash: String,
    pub events: Vec<String>,
}

#[derive(Default)]
struct Observations {
    leaders_by_term: BTreeMap<u64, BTreeSet<u64>>,
    /// The state hash first seen at each applied index, and by which node.
    hash_at_index: BTreeMap<u64, (u64, String)>,
    /// Replicas seen with a different state at the same applied index.
    divergences: Vec<String>,
    states: BTreeMap<u64, StateMachineHandle>,
    acknowledged: BTreeMap<String, String>,
    events: Vec<String>,
}

type Shared = Arc<Mutex<Observations>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Observations> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn record(shared: &Shared, event: String) {
    tracing::info!(%event, "chaos");
    lock(shared).events.push(event);
}

/// Compare this replica's state at `index` with the first state any replica reported there.
fn record_applied(shared: &Shared, node: u64, index: u64, hash: String) {
    let mut observations = lock(shared);
    match observations.hash_at_index.get(&index) {
        Some((first, seen)) if *seen != hash => {
            let divergence = format!("at index {index}: n{node} has {hash}, n{first} had {seen}");
            observations.divergences.push(divergence);
        }
        Some(_) => {}
        None => {
            observations.hash_at_index.insert(index, (node, hash));
        }
    }
}

fn host(id: u64) -> String {
    format!("n{id}")
}

fn sim_clock() -> Clock {
    Arc::new(|| turmoil::since_epoch().map(|d| d.as_millis() as u64).unwrap_or(0))
}

fn node_config(id: u64) -> Config {
    let mut config = Config::default();
    config.node.id = id;
    config.network.listen_addr = "0.0.0.0:8000".into();
    config.network.raft_listen_addr = "0.0.0.0:7000".into();
    config.network.advertise_addr = Some(format!("{}:8000", host(id)));
    config.network.raft_advertise_addr = Some(format!("{}:7000", host(id)));
    config.cluster.peers = (1..=NODES)
        .map(|peer| PeerConfig {
            id: peer,
            raft_addr: format!("{}:7000", host(peer)),
            api_addr: format!("{}:8000", host(peer)),
        })
        .collect();
    // Small snapshot thresholds so runs also exercise snapshot building and installing.
    config.raft.snapshot_after_logs = 64;
    config.raft.logs_kept_after_snapshot = 16;
    config.raft.request_timeout_ms = 3_000;
    // The simulated network has no strangers; the simulation is about faults, not auth.
    config.security.auth.enabled = false;
    config.security.allow_insecure = true;
    config
}

/// Run one scenario. `Err` names the broken invariant; the caller prints the seed.
pub fn run(plan: &ScenarioPlan) -> Result<Outcome, String> {
    seed_thread_rng(plan.seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(plan.seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(SIMULATION_LIMIT)
        .max_message_latency(Duration::from_millis(plan.max_latency_ms))
        .build();
    let shared: Shared = Arc::default();

    for id in 1..=NODES {
        let log = MemLogStore::new();
        let snapshots = MemSnapshots::default();
        let shared = shared.clone();
        let config = node_config(id);
        config.validate().map_err(|e| e.to_string())?;
        sim.host(host(id), move || {
            let (log, snapshots, shared, config) = (log.clone(), snapshots.clone(), shared.clone(), config.clone());
            async move {
                let state_machine = StateMachineStore::open(snapshots, Validation::EveryBatch)?;
                let node =
                    maos_node::server::start(&config, log, state_machine, Arc::new(SimTransport), sim_clock()).await?;
                lock(&shared).states.insert(id, node.core.state.clone());
                let mut metrics = node.core.raft.metrics();
                let mut last_index = None;
                loop {
                    {
                        let m = metrics.borrow_and_update();
                        if let Err(fatal) = &m.running_state {
                            return Err(format!("n{id}: Raft stopped: {fatal}").into());
                        }
                        if m.state == ServerState::Leader {
                            lock(&shared).leaders_by_term.entry(m.current_term).or_default().insert(id);
                        }
                    }
                    let (index, hash) = {
                        let state = node.core.state.read();
                        (state.last_applied.map(|l| l.index).unwrap_or(0), state.state_hash())
                    };
                    if last_index != Some(index) {
                        last_index = Some(index);
                        record_applied(&shared, id, index, hash);
                    }
                    if metrics.changed().await.is_err() {
                        return Err(format!("n{id}: Raft stopped").into());
                    }
                }
            }
        });
    }

    let client_shared = shared.clone();
    let client_plan = plan.clone();
    sim.client("client", async move {
        let channels = (1..=NODES)
            .map(|id| {
                let addr = format!("{}:8000", host(id));
                sim_channel(&addr).map(|channel| (addr, channel))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = Client::from_channels(channels)?.with_deadline(Duration::from_secs(5));
        let writes_until = Duration::from_millis(client_plan.heal_at_ms() + 1_000);
        let mut i = 0;
        while turmoil::elapsed() < writes_until && i < WRITES_MAX {
            let (key, value) = (format!("key/{i:04}"), format!("value {i}"));
            match client.put(&key, &value).await {
                Ok(_) => {
                    lock(&client_shared).acknowledged.insert(key, value);
                }
                Err(error) => {
                    let at = turmoil::elapsed().as_millis();
                    lock(&client_shared).events.push(format!("{at}ms write {key} failed: {error}"));
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(client_plan.write_interval_ms)).await;
        }
        // Liveness: once every fault has healed, a write must commit.
        let now = turmoil::elapsed();
        if now < writes_until {
            tokio::time::sleep(writes_until - now).await;
        }
        let deadline = turmoil::elapsed() + LIVENESS_WINDOW;
        loop {
            match client.put("final", "committed").await {
                Ok(_) => {
                    lock(&client_shared).acknowledged.insert("final".into(), "committed".into());
                    return Ok(());
                }
                Err(error) if turmoil::elapsed() < deadline => {
                    tracing::debug!(%error, "final write not committed yet");
                }
                Err(error) => return Err(format!("liveness: no write committed after healing: {error}").into()),
            }
        }
    });

    let mut crashed: Option<u64> = None;
    let mut restarted = false;
    let mut partitioned = false;
    let mut healed = false;
    loop {
        let now_ms = sim.elapsed().as_millis() as u64;
        if crashed.is_none() && now_ms >= plan.crash_leader_at_ms {
            let leader = {
                let observations = lock(&shared);
                observations.leaders_by_term.iter().next_back().and_then(|(_, nodes)| nodes.iter().next().copied())
            }
            .unwrap_or(1);
            sim.crash(host(leader));
            record(&shared, format!("{now_ms}ms crash leader n{leader}"));
            crashed = Some(leader);
        }
        if let (Some(node), false) = (crashed, restarted) {
            if now_ms >= plan.crash_leader_at_ms + plan.restart_after_ms {
                sim.bounce(host(node));
                record(&shared, format!("{now_ms}ms restart n{node}"));
                restarted = true;
            }
        }
        let others: Vec<String> = (1..=NODES).filter(|id| *id != plan.partitioned_node).map(host).collect();
        if !partitioned && now_ms >= plan.partition_at_ms {
            for other in &others {
                sim.partition(host(plan.partitioned_node), other.as_str());
            }
            record(&shared, format!("{now_ms}ms partition n{}", plan.partitioned_node));
            partitioned = true;
        }
        if partitioned && !healed && now_ms >= plan.heal_at_ms() {
            for other in &others {
                sim.repair(host(plan.partitioned_node), other.as_str());
            }
            record(&shared, format!("{now_ms}ms heal n{}", plan.partitioned_node));
            healed = true;
        }
        if sim.step().map_err(|e| format!("simulation: {e}"))? {
            break;
        }
    }

    if !healed {
        return Err(format!("the client finished before the faults healed; plan: {plan:?}"));
    }
    // Heal phase: step until every replica has applied the same state, within a bound.
    let converge_until = sim.elapsed() + LIVENESS_WINDOW;
    let mut views = BTreeMap::new();
    while sim.elapsed() < converge_until {
        views = lock(&shared)
            .states
            .iter()
            .map(|(id, state)| {
                let state = state.read();
                (*id, (state.last_applied.map(|l| l.index).unwrap_or(0), state.state_hash()))
            })
            .collect();
        if views.len() as u64 == NODES && invariants::converged(&views).is_ok() {
            break;
        }
        sim.step().map_err(|e| format!("simulation: {e}"))?;
    }

    let observations = lock(&shared);
    invariants::election_safety(&observations.leaders_by_term)?;
    invariants::state_machine_safety(&observations.divergences)?;
    invariants::converged(&views)?;
    let final_state: BTreeMap<String, String> = observations
        .states
        .values()
        .next()
        .map(|state| state.read().app.kv.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect())
        .unwrap_or_default();
    invariants::acknowledged_writes_present(&observations.acknowledged, &final_state)?;
    let (final_index, final_hash) = views.values().next().cloned().unwrap_or_default();
    Ok(Outcome {
        seed: plan.seed,
        acknowledged: observations.acknowledged.len(),
        leaders_by_term: observations.leaders_by_term.clone(),
        final_index,
        final_hash,
        events: observations.events.clone(),
    })
}
