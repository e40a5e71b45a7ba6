//! Turmoil simulations of a 3-node cluster under a leader crash, a partition and lost answers.
//!
//! The test command runs seeds 1 to [`SEEDS`] on two threads. Replay one in a fresh process with
//! `maos-chaos run --seed <seed>` (or `MAOS_CHAOS_SEEDS=<seed> cargo test --workspace --test
//! simulation`); run others with `MAOS_CHAOS_SEEDS=201-400` or `maos-chaos sweep`.

use maos_chaos::{run, sweep, ScenarioPlan};

/// Seeds the test command runs.
const SEEDS: u64 = 200;
/// Threads they run on.
const JOBS: usize = 2;

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
        Err(_) => (1..=SEEDS).collect(),
    }
}

#[test]
fn clusters_stay_safe_and_live_under_crashes_and_partitions() {
    init_logging();
    let seeds = seeds();
    // One seed (a replay) runs on this thread, so its logs reach the test writer.
    let found = match seeds.as_slice() {
        [seed] => {
            let plan = ScenarioPlan::from_seed(*seed);
            match run(&plan) {
                Ok(outcome) => maos_chaos::Sweep { passed: vec![outcome], ..Default::default() },
                Err(error) => {
                    println!("seed {seed}: FAILED: {error}\n  plan: {plan:?}");
                    maos_chaos::Sweep { failed: vec![(*seed, error)], ..Default::default() }
                }
            }
        }
        _ => sweep(&seeds, JOBS),
    };
    for outcome in &found.passed {
        println!(
            "seed {}: ok, {} writes acknowledged, {} shared-key operations ({} unanswered), {} submits ({} answered), {} terms with a leader, final index {}, hash {}, leaders {:?}, events {:?}",
            outcome.seed,
            outcome.acknowledged,
            outcome.shared_operations,
            outcome.shared_unanswered,
            outcome.submits,
            outcome.submits_acknowledged,
            outcome.leaders_by_term.len(),
            outcome.final_index,
            &outcome.final_hash[..16.min(outcome.final_hash.len())],
            outcome.leaders_by_term,
            outcome.events
        );
    }
    println!("{}", found.summary(JOBS));
    let failed: Vec<u64> = found.failed.iter().map(|(seed, _)| *seed).collect();
    assert!(failed.is_empty(), "failing seeds: {failed:?} (each replays with `maos-chaos run --seed <seed>`)");
}

/// Replaying a seed means running it again in a fresh process, as the failure message says.
/// (Two runs inside one process are not compared: some process-wide state in a dependency
/// carries over between runs and shifts proposal batching by an entry.)
#[test]
fn a_seed_replays_the_same_run_in_a_fresh_process() {
    let run_once = || {
        let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "clusters_stay_safe_and_live_under_crashes_and_partitions", "--nocapture"])
            .env("MAOS_CHAOS_SEEDS", "11")
            .env_remove("MAOS_CHAOS_LOG")
            .output()
            .expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(output.status.success(), "seed 11 failed: {stdout}");
        stdout.lines().find(|line| line.starts_with("seed 11:")).map(str::to_string).expect("a result line for seed 11")
    };
    let first = run_once();
    let second = run_once();
    assert_eq!(first, second, "the same seed must give the same run");
}
