//! An external worker: serves one agent type and answers `worker <name>: <input>`.
//! An input `sleep:<ms>` sleeps first (at most `max_sleep_ms`).
//!
//! `cargo run -p maos-client --example echo_worker -- 127.0.0.1:8000,127.0.0.1:8001 my-worker scraper [max_sleep_ms]`

use std::time::Duration;

use maos_client::{Client, Worker, WorkerAgentType};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoints, name, agent_type, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: echo_worker ENDPOINTS NAME AGENT_TYPE [MAX_SLEEP_MS]  (ENDPOINTS: host:port,host:port)");
    };
    let max_sleep_ms: u64 = match rest.first() {
        Some(ms) => {
            ms.parse().map_err(|_| anyhow::anyhow!("MAX_SLEEP_MS must be a number of milliseconds, not {ms:?}"))?
        }
        None => u64::MAX,
    };
    let client = Client::new(endpoints.split(','))?;
    let worker = Worker::register(client, name, vec![WorkerAgentType::new(agent_type, 2)]).await?;
    println!("worker {name} registered as {}", worker.id());
    let name = name.clone();
    worker
        .run(move |assignment| {
            let name = name.clone();
            async move {
                if let Some(ms) = assignment.input.strip_prefix("sleep:").and_then(|ms| ms.parse::<u64>().ok()) {
                    tokio::time::sleep(Duration::from_millis(ms.min(max_sleep_ms))).await;
                }
                Ok(format!("worker {name}: {}", assignment.input))
            }
        })
        .await?;
    Ok(())
}
