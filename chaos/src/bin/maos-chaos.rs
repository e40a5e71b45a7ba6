//! `maos-chaos`: run simulated seeds beyond the test command's.
//!
//! - `maos-chaos sweep --seeds N [--from S] [--jobs J]`: seeds S..S+N on J threads; each failure
//!   with its replay command, then a summary (seeds per second, faults per run).
//! - `maos-chaos run --seed S`: one seed in this fresh process, with its plan and events: the
//!   exact replay of a failure (a run depends only on its seed).
//!
//! - `maos-chaos faults --seconds N [--seed S]`: the fault runner ([`maos_chaos::fault_run`]) over
//!   real `maos serve` processes (the `maos` binary beside this one, or `MAOS_BIN`), each on a
//!   network namespace of its own (needs root): faults for N seconds, then the checks.
//!
//! `MAOS_CHAOS_LOG=<tracing filter>` prints the simulated nodes' logs.

use maos_chaos::fault_run::{self, FaultRunOptions};
use maos_chaos::{run, sweep, ScenarioPlan};

const USAGE: &str =
    "usage: maos-chaos sweep --seeds N [--from S] [--jobs J] | maos-chaos run --seed S | maos-chaos faults --seconds N [--seed S]";

fn main() {
    if let Ok(filter) = std::env::var("MAOS_CHAOS_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("sweep") => options(&args[1..]).and_then(|o| run_sweep(&o)),
        Some("run") => options(&args[1..]).and_then(|o| replay(&o)),
        Some("faults") => options(&args[1..]).and_then(|o| faults(&o)),
        _ => Err(USAGE.to_string()),
    };
    match outcome {
        Ok(passed) => std::process::exit(if passed { 0 } else { 1 }),
        Err(message) => {
            eprintln!("maos-chaos: {message}");
            std::process::exit(2);
        }
    }
}

#[derive(Debug, Default)]
struct Options {
    seeds: Option<u64>,
    from: Option<u64>,
    jobs: Option<u64>,
    seed: Option<u64>,
    seconds: Option<u64>,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut options = Options::default();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let number = value.parse::<u64>().map_err(|_| format!("{flag}: {value:?} is not a whole number"))?;
        let slot = match flag.as_str() {
            "--seeds" => &mut options.seeds,
            "--from" => &mut options.from,
            "--jobs" => &mut options.jobs,
            "--seed" => &mut options.seed,
            "--seconds" => &mut options.seconds,
            other => return Err(format!("unknown option {other}; {USAGE}")),
        };
        *slot = Some(number);
    }
    Ok(options)
}

fn replay(options: &Options) -> Result<bool, String> {
    let seed = options.seed.ok_or_else(|| format!("run needs --seed; {USAGE}"))?;
    let plan = ScenarioPlan::from_seed(seed);
    println!("seed {seed}: plan {plan:?}");
    match run(&plan) {
        Ok(outcome) => {
            println!(
                "seed {seed}: ok, {} writes acknowledged, {} shared-key operations ({} unanswered), {} submits ({} answered), {} faults, final index {}, hash {}",
                outcome.acknowledged,
                outcome.shared_operations,
                outcome.shared_unanswered,
                outcome.submits,
                outcome.submits_acknowledged,
                outcome.faults,
                outcome.final_index,
                outcome.final_hash
            );
            outcome.events.iter().for_each(|event| println!("  {event}"));
            Ok(true)
        }
        Err(error) => {
            println!("seed {seed}: FAILED: {error}");
            Ok(false)
        }
    }
}

fn run_sweep(options: &Options) -> Result<bool, String> {
    let count = options.seeds.ok_or_else(|| format!("sweep needs --seeds; {USAGE}"))?;
    let from = options.from.unwrap_or(1);
    let jobs = options.jobs.unwrap_or(1) as usize;
    let seeds: Vec<u64> = (from..from.saturating_add(count)).collect();
    let found = sweep(&seeds, jobs);
    println!("sweep of seeds {from}..={}: {}", from.saturating_add(count).saturating_sub(1), found.summary(jobs));
    Ok(found.failed.is_empty())
}

fn faults(options: &Options) -> Result<bool, String> {
    let seconds = options.seconds.ok_or_else(|| format!("faults needs --seconds; {USAGE}"))?;
    let seed = options.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let binary = match std::env::var_os("MAOS_BIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program's directory: {e}"))?
            .with_file_name("maos"),
    };
    if !binary.exists() {
        return Err(format!(
            "no maos binary at {}; build it (cargo build --bin maos) or set MAOS_BIN",
            binary.display()
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let options = FaultRunOptions { binary, duration: std::time::Duration::from_secs(seconds), seed };
    println!("fault run, seed {seed}, {seconds} s of faults (replay the same choices with --seed {seed})");
    let report = runtime.block_on(fault_run::run(&options)).map_err(|e| format!("{e:#}"))?;
    print!("{report}");
    Ok(report.passed())
}
