//! Many seeds on several threads: the test command's seeds and `maos-chaos sweep`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{run, Outcome, ScenarioPlan};

/// What a sweep found.
#[derive(Debug, Default)]
pub struct Sweep {
    pub passed: Vec<Outcome>,
    /// Failing seeds with the broken invariant.
    pub failed: Vec<(u64, String)>,
    pub elapsed: Duration,
}

impl Sweep {
    /// A one-line summary: seeds, failures, speed, faults and client operations per run.
    pub fn summary(&self, jobs: usize) -> String {
        let seeds = self.passed.len() + self.failed.len();
        let per_run = |f: fn(&Outcome) -> usize| {
            self.passed.iter().map(f).sum::<usize>() as f64 / self.passed.len().max(1) as f64
        };
        let failed: Vec<u64> = self.failed.iter().map(|(seed, _)| *seed).collect();
        format!(
            "{seeds} seeds: {} passed, {} failed {failed:?}; {:.1} s on {jobs} threads ({:.2} seeds/s); per passing run {:.1} faults injected, {:.0} client operations ({:.1} unanswered)",
            self.passed.len(),
            self.failed.len(),
            self.elapsed.as_secs_f64(),
            seeds as f64 / self.elapsed.as_secs_f64().max(1e-9),
            per_run(|o| o.faults),
            per_run(|o| o.acknowledged + o.shared_operations + o.submits),
            per_run(|o| o.shared_unanswered + o.submits - o.submits_acknowledged),
        )
    }
}

/// Run `seeds` on `jobs` threads (each run is single-threaded, as turmoil is). A failure is
/// printed at once with the command that replays it in a fresh process.
pub fn sweep(seeds: &[u64], jobs: usize) -> Sweep {
    let next = AtomicU64::new(0);
    let found = Mutex::new(Sweep::default());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, 64) {
            scope.spawn(|| loop {
                let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed) as usize) else { return };
                let plan = ScenarioPlan::from_seed(seed);
                let result = run(&plan);
                let mut found = found.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(outcome) => found.passed.push(outcome),
                    Err(error) => {
                        println!(
                            "seed {seed}: FAILED: {error}\n  plan: {plan:?}\n  replay: maos-chaos run --seed {seed}"
                        );
                        found.failed.push((seed, error));
                    }
                }
            });
        }
    });
    let mut found = found.into_inner().unwrap_or_else(|p| p.into_inner());
    found.passed.sort_by_key(|o| o.seed);
    found.failed.sort_by_key(|(seed, _)| *seed);
    found.elapsed = started.elapsed();
    found
}
