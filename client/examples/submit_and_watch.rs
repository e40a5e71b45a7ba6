//! Submit a task and watch it (and its subtasks) to the end.
//!
//! `cargo run -p maos-client --example submit_and_watch -- 127.0.0.1:8000,127.0.0.1:8001 mixed "research three topics"`

use maos_client::proto::v1::{SubmitTaskRequest, TaskState};
use maos_client::Client;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, endpoints, task_type, description, ..] = args.as_slice() else {
        anyhow::bail!("usage: submit_and_watch ENDPOINTS TASK_TYPE DESCRIPTION [INPUT]");
    };
    let client = Client::new(endpoints.split(','))?;
    let request = SubmitTaskRequest {
        task_type: task_type.clone(),
        description: description.clone(),
        input: args.get(4).cloned().unwrap_or_default(),
        ..Default::default()
    };
    let task = client.submit(request).await?;
    println!("submitted {}", task.task_id);
    let mut events = client.watch(&task.task_id, true).await?;
    while let Some(event) = events.message().await? {
        let state = TaskState::try_from(event.state).map(|s| s.as_str_name()).unwrap_or("?");
        println!("{} {state} attempt {} {}", event.task_id, event.attempt, event.progress_message);
        if event.finished {
            println!("{}", if event.result.is_empty() { &event.cause } else { &event.result });
            break;
        }
    }
    Ok(())
}
