//! Turmoil simulations of a 3-node cluster under a leader crash and a partition.
//!
//! The test command runs the fixed seeds below. Replay one with
//! `MAOS_CHAOS_SEEDS=<seed> cargo test -p maos-chaos --test simulation`, or run more with
//! `MAOS_CHAOS_SEEDS=1-200`.

use maos_chaos::{run, ScenarioPlan};

const FIXED_SEEDS: &[u64] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

/// `MAOS_CHAOS_LOG=debug` (any tracing filter) prints the nodes' logs of a replayed run.
fn init_logging() {
    if let Ok(filter) = std::env::var("MAOS_CHAOS_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("MAOS_CHAOS_SEEDS") {
        Ok(text) => text
            .split(',')
            .flat_map(|part| match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (u64, u64) =
                        (a.trim().parse().expect("seed range start"), b.trim().parse().expect("seed range end"));
                    (a..=b).collect::<Vec<_>>()
                }
                None => vec![part.trim().parse().expect("a seed is a number")],
            })
            .collect(),
        Err(_) => FIXED_SEEDS.to_vec(),
    }
}

#[test]
fn clusters_stay_safe_and_live_under_crashes_and_partitions() {
    init_logging();
    let mut failures = Vec::new();
    for seed in seeds() {
        let plan = ScenarioPlan::from_seed(seed);
        match run(&plan) {
            Ok(outcome) => println!(
                "seed {seed}: ok, {} writes acknowledged, {} terms with a leader, final index {}",
                outcome.acknowledged,
                outcome.leaders_by_term.len(),
                outcome.final_index
            ),
            Err(error) => {
                println!("seed {seed}: FAILED: {error}\n  plan: {plan:?}\n  replay: MAOS_CHAOS_SEEDS={seed} cargo test -p maos-chaos --test simulation");
                failures.push(seed);
            }
        }
    }
    assert!(failures.is_empty(), "failing seeds: {failures:?} (each replays with MAOS_CHAOS_SEEDS=<seed>)");
}

#[test]
fn a_seed_replays_the_same_run() {
    let plan = ScenarioPlan::from_seed(11);
    let first = run(&plan).unwrap_or_else(|e| panic!("seed 11 failed: {e}"));
    let second = run(&plan).unwrap_or_else(|e| panic!("seed 11 failed on replay: {e}"));
    assert_eq!(first, second, "the same seed must give the same run");
}
