//! The claude backend against a local server that speaks the Messages API: success with usage,
//! 429 with retry-after, 500, a timeout, a malformed body, a refusal; the key never appears in
//! logs or in a failure cause.

#[path = "support/fake_messages.rs"]
mod fake_messages;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_messages::{FakeMessages, Reply};
use maos_node::agents::claude::{ApiKey, ClaudeBackend};
use maos_node::agents::envelope::{ApiAccess, Envelope, Outcome, OutcomeKind};

const KEY: &str = "sk-ant-test-0123456789abcdef-SECRET";

fn backend(base_url: &str, request_timeout: Duration, max_retries: u32) -> ClaudeBackend {
    ClaudeBackend {
        http: ClaudeBackend::http_client(request_timeout).expect("client"),
        base_url: base_url.into(),
        key: ApiKey::new(KEY.into()),
        model: "claude-test".into(),
        max_tokens: 256,
        system_prompt: None,
        max_retries,
        known_types: vec!["researcher".into(), "coder".into()],
    }
}

fn envelope(planning: bool) -> Envelope {
    Envelope {
        format: 1,
        task_id: "task-1".into(),
        attempt: 1,
        agent_id: "n1/researcher/0".into(),
        task_type: "researcher".into(),
        description: "summarise the findings".into(),
        input: "three papers".into(),
        planning,
        dependency_results: [("dep-1".to_string(), "paper A says X".to_string())].into(),
        checkpoint: None,
        fencing_token: 7,
        timeout_ms: 30_000,
        checkpoint_interval_ms: 300_000,
        api: ApiAccess {
            endpoint: "http://127.0.0.1:8000".into(),
            credential: "maos1:7:00:task-1".into(),
            ..Default::default()
        },
        trace_parent: String::new(),
    }
}

/// Everything the backend logs while `run` runs, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn run_logged(backend: &ClaudeBackend, envelope: &Envelope) -> (Outcome, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let outcome = backend.run(envelope).await;
    let logs = String::from_utf8_lossy(&captured.0.lock().expect("log")).to_string();
    (outcome, logs)
}

fn assert_no_key(outcome: &Outcome, logs: &str) {
    assert!(!logs.contains(KEY), "the key leaked into the logs:\n{logs}");
    assert!(!format!("{outcome:?}").contains(KEY), "the key leaked into the outcome: {outcome:?}");
}

#[tokio::test]
async fn a_message_completes_the_attempt_with_its_usage() -> anyhow::Result<()> {
    let server = FakeMessages::start(vec![Reply::message("X and Y", 120, 34)]).await?;
    let (outcome, logs) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 2), &envelope(false)).await;
    assert_eq!(outcome.kind, OutcomeKind::Completed("X and Y".into()));
    assert_eq!((outcome.usage.input_tokens, outcome.usage.output_tokens), (120, 34));
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.path, "/v1/messages");
    assert_eq!(request.header("x-api-key"), Some(KEY));
    assert_eq!(request.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(request.body["model"], "claude-test");
    assert_eq!(request.body["max_tokens"], 256);
    let prompt = request.body["messages"][0]["content"].as_str().unwrap_or_default();
    assert!(prompt.contains("summarise the findings") && prompt.contains("paper A says X"), "{prompt}");
    assert_no_key(&outcome, &logs);
    Ok(())
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_retry_after_asks() -> anyhow::Result<()> {
    let server = FakeMessages::start(vec![Reply::rate_limited(1), Reply::message("done", 1, 1)]).await?;
    let started = Instant::now();
    let (outcome, logs) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 2), &envelope(false)).await;
    assert_eq!(outcome.kind, OutcomeKind::Completed("done".into()));
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at.duration_since(seen[0].at);
    assert!(waited >= Duration::from_millis(950), "retried after {waited:?}, before retry-after's 1 s");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(logs.contains("rate_limit_error"), "the retry is logged with the API's error type:\n{logs}");
    assert_no_key(&outcome, &logs);
    Ok(())
}

#[tokio::test]
async fn a_500_is_retried_and_repeated_ones_fail_the_attempt_retryably() -> anyhow::Result<()> {
    let server =
        FakeMessages::start(vec![Reply::error(500, "api_error", "Internal server error"), Reply::message("ok", 1, 1)])
            .await?;
    let (outcome, _) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 2), &envelope(false)).await;
    assert_eq!(outcome.kind, OutcomeKind::Completed("ok".into()));

    let server = FakeMessages::start(vec![Reply::error(529, "overloaded_error", "Overloaded")]).await?;
    let (outcome, logs) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 1), &envelope(false)).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, retryable: true } => {
            assert!(error.contains("overloaded_error") && error.contains("gave up after 1 retries"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen().len(), 2, "one try and one retry");
    assert_no_key(&outcome, &logs);
    Ok(())
}

#[tokio::test]
async fn a_request_that_never_answers_times_out() -> anyhow::Result<()> {
    let server = FakeMessages::start(vec![Reply::Hang]).await?;
    let started = Instant::now();
    let (outcome, logs) = run_logged(&backend(&server.base_url, Duration::from_millis(300), 1), &envelope(false)).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, retryable: true } => assert!(error.contains("timed out"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_no_key(&outcome, &logs);
    Ok(())
}

#[tokio::test]
async fn a_malformed_body_fails_with_a_clear_cause() -> anyhow::Result<()> {
    let server =
        FakeMessages::start(vec![Reply::Raw { status: 200, body: "{\"content\": \"not a list\"".into() }]).await?;
    let (outcome, logs) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 0), &envelope(false)).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, .. } => assert!(error.contains("malformed response body"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert_no_key(&outcome, &logs);
    Ok(())
}

#[tokio::test]
async fn a_refusal_is_not_retried_and_an_echoed_key_is_scrubbed() -> anyhow::Result<()> {
    let echo = format!("invalid x-api-key: {KEY}");
    let server = FakeMessages::start(vec![Reply::error(401, "authentication_error", &echo)]).await?;
    let (outcome, logs) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 3), &envelope(false)).await;
    match &outcome.kind {
        OutcomeKind::Failed { error, retryable: false } => {
            assert!(error.contains("authentication_error") && error.contains("[redacted]"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen().len(), 1, "a 401 is not retried");
    assert_no_key(&outcome, &logs);
    Ok(())
}

#[tokio::test]
async fn a_planning_attempt_asks_for_a_plan_of_known_types() -> anyhow::Result<()> {
    let plan = r#"{"subtasks": [{"key": "a", "task_type": "researcher", "description": "look"}]}"#;
    let server = FakeMessages::start(vec![Reply::message(plan, 10, 10)]).await?;
    let (outcome, _) = run_logged(&backend(&server.base_url, Duration::from_secs(5), 0), &envelope(true)).await;
    assert_eq!(outcome.kind, OutcomeKind::Completed(plan.into()));
    let prompt = server.seen()[0].body["messages"][0]["content"].as_str().unwrap_or_default().to_string();
    assert!(prompt.contains("\"subtasks\"") && prompt.contains("researcher, coder"), "{prompt}");
    Ok(())
}
