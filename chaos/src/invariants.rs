//! The invariants a simulation checks. One function per invariant, each naming its source.

use std::collections::{BTreeMap, BTreeSet};

/// Election Safety (Raft, figure 3): at most one leader can be elected in a given term.
/// `leaders` maps each term to the nodes seen leading in it.
pub fn election_safety(leaders: &BTreeMap<u64, BTreeSet<u64>>) -> Result<(), String> {
    match leaders.iter().find(|(_, nodes)| nodes.len() > 1) {
        Some((term, nodes)) => Err(format!("term {term} had leaders {nodes:?}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_invariant_detects_its_violation() {
        let two_leaders = BTreeMap::from([(3, BTreeSet::from([1, 2]))]);
        assert!(election_safety(&two_leaders).is_err());
        assert!(election_safety(&BTreeMap::from([(3, BTreeSet::from([1])), (4, BTreeSet::from([2]))])).is_ok());

        let diverged = BTreeMap::from([(1, (5, "a".to_string())), (2, (5, "b".to_string()))]);
        assert!(converged(&diverged).is_err());
        let lagging = BTreeMap::from([(1, (5, "a".to_string())), (2, (4, "a".to_string()))]);
        assert!(converged(&lagging).is_err());

        assert!(state_machine_safety(&["at index 3: n2 has a, n1 had b".into()]).is_err());
        assert!(state_machine_safety(&[]).is_ok());

        let acked = BTreeMap::from([("k".to_string(), "v".to_string())]);
        assert!(acknowledged_writes_present(&acked, &BTreeMap::new()).is_err());
        assert!(acknowledged_writes_present(&acked, &acked).is_ok());
    }
}
