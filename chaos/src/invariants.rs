//! The invariants a simulation checks. One function per invariant, each naming its source.

use std::collections::{BTreeMap, BTreeSet};

/// Election Safety (Raft, figure 3), in openraft's form: at most one leader per leader id.
/// openraft's default (advanced) leader id is (term, node id), totally ordered, and a voter may
/// grant a greater one in the same term, so two nodes can lead one term, each under its own id
/// that every log id it writes carries (openraft's docs, "leader_id_adv"; standard Raft's one
/// leader per term is its `single-term-leader` feature). `leaders` maps each leader id (term,
/// node) seen in a leader's committed vote to the nodes seen leading under it.
pub fn election_safety(leaders: &BTreeMap<(u64, u64), BTreeSet<u64>>) -> Result<(), String> {
    match leaders.iter().find(|((_, node), nodes)| nodes.len() != 1 || !nodes.contains(node)) {
        Some(((term, node), nodes)) => Err(format!("leader id T{term}-N{node} was held by {nodes:?}")),
        None => Ok(()),
    }
}

/// State Machine Safety (Raft, figure 3): if a server has applied a log entry at an index, no
/// other server applies a different entry there. Checked as it runs: each replica's state hash at
/// each applied index it passes through is compared with the first one seen at that index.
pub fn state_machine_safety(divergences: &[String]) -> Result<(), String> {
    match divergences.first() {
        Some(first) => Err(format!("{} divergences, first {first}", divergences.len())),
        None => Ok(()),
    }
}

/// State Machine Safety (Raft, figure 3), after healing: every replica applied the same entries,
/// so every replica reports the same applied index and state hash.
pub fn converged(views: &BTreeMap<u64, (u64, String)>) -> Result<(), String> {
    let distinct: BTreeSet<&(u64, String)> = views.values().collect();
    if distinct.len() == 1 {
        Ok(())
    } else {
        Err(format!("replicas differ after healing: {views:?}"))
    }
}

/// Leader Completeness as a client observes it: a write acknowledged to a client is committed,
/// so it is in every later leader's log and in the final state.
pub fn acknowledged_writes_present(
    acknowledged: &BTreeMap<String, String>,
    final_state: &BTreeMap<String, String>,
) -> Result<(), String> {
    let missing: Vec<&String> =
        acknowledged.iter().filter(|(k, v)| final_state.get(*k) != Some(*v)).map(|(k, _)| k).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{} acknowledged writes missing or changed, first: {:?}", missing.len(), missing.first()))
    }
}

/// Linearizability (Herlihy and Wing, 1990): every operation on the shared keys appears to take
/// effect at one instant between its call and its answer, in an order a single copy of each key
/// could produce. A write applied twice (a blind resend after an ambiguous failure), a stale
/// read or a lost write breaks it. Checked by [`crate::linearizability::check`].
pub fn linearizable(history: &[crate::linearizability::Operation]) -> Result<(), String> {
    crate::linearizability::check(history).map_err(|e| format!("the shared keys' history is not linearizable: {e}"))
}

/// One task submit as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit {
    /// Unique per submit, so the final state shows how many tasks it made.
    pub description: String,
    pub keyed: bool,
    /// The task id answered, if the submit was answered.
    pub acknowledged: Option<String>,
}

/// Exactly once for submits (MAOS's promise, checked as Jepsen's set checker counts lost and
/// duplicated elements): an acknowledged submit made exactly the task it answered, and an
/// unanswered one at most one task. `final_tasks` maps a description to the ids holding it.
pub fn submits_exist_once(submits: &[Submit], final_tasks: &BTreeMap<String, Vec<String>>) -> Result<(), String> {
    for submit in submits {
        let made = final_tasks.get(&submit.description).map_or(&[][..], Vec::as_slice);
        let fine = match &submit.acknowledged {
            Some(id) => made == std::slice::from_ref(id),
            None => made.len() <= 1,
        };
        if !fine {
            return Err(format!(
                "submit {:?} ({}, answered {:?}) made tasks {made:?}",
                submit.description,
                if submit.keyed { "with an idempotency key" } else { "without a key or session" },
                submit.acknowledged
            ));
        }
    }
    Ok(())
}

/// No replica's replicated clock ran ahead of true time by more than `allowed_ms`: a leader whose
/// clock is off stamps the quorum's time, so it never pushes the replicated clock (which never
/// goes back) ahead, where every lease and key would expire early and later leaders' expiry
/// would stall (issue 16, break 3; TigerBeetle's `clock.zig`, DESIGN.md "No single node's clock
/// decides an expiry").
pub fn replicated_time_bounded(ahead_ms: &BTreeMap<u64, i64>, allowed_ms: i64) -> Result<(), String> {
    match ahead_ms.iter().find(|(_, ahead)| **ahead > allowed_ms) {
        Some((node, ahead)) => Err(format!(
            "n{node}'s replicated clock ran {ahead} ms ahead of true time (allowed {allowed_ms} ms): a leader stamped its own clock, off from the quorum's"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_invariant_detects_its_violation() {
        let two_leaders = BTreeMap::from([((3, 1), BTreeSet::from([1, 2]))]);
        assert!(election_safety(&two_leaders).is_err());
        assert!(election_safety(&BTreeMap::from([((3, 1), BTreeSet::from([2]))])).is_err(), "led under another's id");
        let ordered = BTreeMap::from([
            ((3, 1), BTreeSet::from([1])),
            ((3, 2), BTreeSet::from([2])),
            ((4, 2), BTreeSet::from([2])),
        ]);
        assert!(election_safety(&ordered).is_ok());

        let diverged = BTreeMap::from([(1, (5, "a".to_string())), (2, (5, "b".to_string()))]);
        assert!(converged(&diverged).is_err());
        let lagging = BTreeMap::from([(1, (5, "a".to_string())), (2, (4, "a".to_string()))]);
        assert!(converged(&lagging).is_err());

        assert!(state_machine_safety(&["at index 3: n2 has a, n1 had b".into()]).is_err());
        assert!(state_machine_safety(&[]).is_ok());

        let acked = BTreeMap::from([("k".to_string(), "v".to_string())]);
        assert!(acknowledged_writes_present(&acked, &BTreeMap::new()).is_err());
        assert!(acknowledged_writes_present(&acked, &acked).is_ok());

        let submit = |acknowledged: Option<&str>| Submit {
            description: "t".into(),
            keyed: false,
            acknowledged: acknowledged.map(str::to_string),
        };
        let made = |ids: &[&str]| BTreeMap::from([("t".to_string(), ids.iter().map(|i| i.to_string()).collect())]);
        assert!(submits_exist_once(&[submit(Some("a"))], &made(&["a"])).is_ok());
        assert!(submits_exist_once(&[submit(Some("a"))], &BTreeMap::new()).is_err(), "lost");
        assert!(submits_exist_once(&[submit(Some("a"))], &made(&["a", "b"])).is_err(), "duplicated");
        assert!(submits_exist_once(&[submit(Some("a"))], &made(&["b"])).is_err(), "another task");
        assert!(submits_exist_once(&[submit(None)], &BTreeMap::new()).is_ok());
        assert!(submits_exist_once(&[submit(None)], &made(&["b"])).is_ok());
        assert!(submits_exist_once(&[submit(None)], &made(&["a", "b"])).is_err(), "duplicated unanswered");
    }
}
