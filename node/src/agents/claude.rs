//! The `claude` backend: one Anthropic Messages API conversation per attempt.
//!
//! `POST {base_url}/v1/messages` with `x-api-key` and `anthropic-version`. A 429, a 5xx (529
//! included) or a timed-out request is retried with exponential backoff that honours
//! `retry-after`, within `max_retries` and the attempt's own deadline; other errors fail the
//! attempt with the API's error type and message. Token usage comes back with the outcome and is
//! recorded on the task. The key is held in [`ApiKey`], which never prints, and is scrubbed from
//! every error text.

use std::fmt;
use std::time::Duration;

use maos_raft_store::tasks::TokenUsage;
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use super::envelope::{Envelope, Outcome, OutcomeKind};
use crate::telemetry::traces;

/// The Messages API version this backend speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// First retry pause; doubled per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Upper bound on one pause, whatever `retry-after` asks.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Upper bound on a response body read.
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// An API key. Its `Debug` and `Display` print `[redacted]`.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        Self(key.trim().to_string())
    }

    /// From `CLAUDE_API_KEY`, else `ANTHROPIC_API_KEY`, else the first line of `file`.
    pub fn from_environment(file: Option<&std::path::Path>) -> Result<Self, String> {
        let usable = |key: Self, source: &str| match reqwest::header::HeaderValue::from_str(&key.0) {
            Ok(_) => Ok(key),
            Err(_) => Err(format!(
                "{source}: the key holds characters an HTTP header cannot carry; check for stray quotes or spaces"
            )),
        };
        for name in ["CLAUDE_API_KEY", "ANTHROPIC_API_KEY"] {
            if let Some(key) = std::env::var(name).ok().filter(|k| !k.trim().is_empty()) {
                return usable(Self::new(key), name);
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("agents.claude.api_key_file: cannot read {}: {e}", path.display()))?;
            let key = text.lines().next().unwrap_or_default().trim().to_string();
            if !key.is_empty() {
                return usable(Self(key), "agents.claude.api_key_file");
            }
            return Err(format!("agents.claude.api_key_file: {} is empty", path.display()));
        }
        Err("a claude agent needs an API key: set CLAUDE_API_KEY (or ANTHROPIC_API_KEY) or agents.claude.api_key_file"
            .into())
    }

    /// The key as a header value, marked sensitive (kept out of HTTP-level debug output).
    fn header(&self) -> reqwest::header::HeaderValue {
        let mut value = reqwest::header::HeaderValue::from_str(&self.0)
            .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }

    /// `text` with every occurrence of the key replaced.
    fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.0, "[redacted]")
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Settings of one claude agent type.
#[derive(Debug, Clone)]
pub struct ClaudeBackend {
    pub http: reqwest::Client,
    pub base_url: String,
    pub key: ApiKey,
    pub model: String,
    pub max_tokens: u32,
    pub system_prompt: Option<String>,
    pub max_retries: u32,
    /// Agent types the planner may use in a plan (this node's).
    pub known_types: Vec<String>,
}

#[derive(Deserialize)]
struct MessagesResponse {
    content: Vec<ContentBlock>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

/// A request that did not give an answer.
enum Attempt {
    Retry { why: String, after: Option<Duration> },
    Fatal(String),
}

impl ClaudeBackend {
    /// An HTTP client whose every request ends after `request_timeout`.
    pub fn http_client(request_timeout: Duration) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("the HTTP client could not be built: {e}"))
    }

    fn prompt(&self, envelope: &Envelope) -> String {
        let mut prompt = format!("Task ({}): {}\n", envelope.task_type, envelope.description);
        if !envelope.input.is_empty() {
            prompt.push_str(&format!("\nInput:\n{}\n", envelope.input));
        }
        if !envelope.dependency_results.is_empty() {
            prompt.push_str("\nResults of the tasks this one builds on:\n");
            for (task_id, result) in &envelope.dependency_results {
                prompt.push_str(&format!("- {task_id}: {result}\n"));
            }
        }
        if let Some(checkpoint) = &envelope.checkpoint {
            prompt.push_str(&format!("\nAn earlier attempt saved this progress:\n{}\n", checkpoint.data));
        }
        if envelope.planning {
            prompt.push_str(&format!(
                "\nDo not do the task. Split it into subtasks and answer with JSON only: \
                 {{\"subtasks\": [{{\"key\": \"short-name\", \"task_type\": \"one of: {}\", \"description\": \"...\", \
                 \"input\": \"...\", \"depends_on\": [\"keys of subtasks that must finish first\"]}}]}}\n",
                self.known_types.join(", ")
            ));
        }
        prompt
    }

    /// One Messages API call's span, in the attempt's when the task's trace is recorded (the
    /// GenAI semantic conventions' names: model and token counts).
    fn call_span(&self, envelope: &Envelope, retry: u32) -> tracing::Span {
        if !traces::enabled() || envelope.trace_parent.is_empty() {
            return tracing::Span::none();
        }
        tracing::info_span!(
            target: traces::TARGET,
            "claude",
            otel.name = %format!("chat {}", self.model),
            otel.kind = "client",
            gen_ai.system = "anthropic",
            gen_ai.operation.name = "chat",
            gen_ai.request.model = %self.model,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            retry,
        )
    }

    /// Run one attempt: a conversation of one request (retried as allowed).
    pub async fn run(&self, envelope: &Envelope) -> Outcome {
        let system = self.system_prompt.clone().unwrap_or_else(|| {
            format!("You are a {} agent in MAOS, a multi-agent system. Answer concisely.", envelope.task_type)
        });
        let body = json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": system,
            "messages": [{"role": "user", "content": self.prompt(envelope)}],
        });
        let url = format!("{}/v1/messages", self.base_url.trim_end_matches('/'));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(envelope.timeout_ms);
        let mut last = String::new();
        for retry in 0..=self.max_retries {
            let span = self.call_span(envelope, retry);
            let request = self.request(&url, &body).instrument(span.clone());
            let answer = match tokio::time::timeout_at(deadline, request).await {
                Ok(Ok(outcome)) => {
                    span.record("gen_ai.usage.input_tokens", outcome.usage.input_tokens);
                    span.record("gen_ai.usage.output_tokens", outcome.usage.output_tokens);
                    Ok(outcome)
                }
                Ok(answer) => answer,
                Err(_) => {
                    let last = if last.is_empty() { "the request timed out".to_string() } else { last };
                    return Outcome::failed(format!("Messages API: the attempt's deadline passed ({last})"), true);
                }
            };
            match answer {
                Ok(outcome) => return outcome,
                Err(Attempt::Fatal(error)) => return Outcome::failed(self.key.scrub(&error), false),
                Err(Attempt::Retry { why, after }) => {
                    last = self.key.scrub(&why);
                    if retry == self.max_retries {
                        break;
                    }
                    let backoff = BACKOFF_BASE.saturating_mul(1 << retry.min(16));
                    let pause = after.unwrap_or(backoff).min(BACKOFF_MAX);
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Outcome::failed(
                            format!("Messages API: {last}; no time left in the attempt to retry"),
                            true,
                        );
                    }
                    tracing::warn!(task_id = %envelope.task_id, retry = retry + 1, pause_ms = pause.as_millis() as u64, error = %last, "Messages API request failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
        Outcome::failed(format!("Messages API: {last} (gave up after {} retries)", self.max_retries), true)
    }

    async fn request(&self, url: &str, body: &serde_json::Value) -> Result<Outcome, Attempt> {
        let response = self
            .http
            .post(url)
            .header("x-api-key", self.key.header())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header("content-type", "application/json")
            .json(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(Attempt::Retry { why: "the request timed out".into(), after: None })
            }
            Err(e) => {
                return Err(Attempt::Retry { why: format!("the request failed: {}", without_url(&e)), after: None })
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let bytes = match read_body(response).await {
            Ok(bytes) => bytes,
            Err(e) if status.is_success() => return Err(Attempt::Retry { why: e, after: None }),
            Err(_) => Vec::new(),
        };
        if status.is_success() {
            let parsed: MessagesResponse = serde_json::from_slice(&bytes).map_err(|e| Attempt::Retry {
                why: format!("malformed response body (HTTP {status}): {e}"),
                after: None,
            })?;
            let text: String = parsed
                .content
                .iter()
                .filter(|block| block.kind == "text")
                .filter_map(|block| block.text.as_deref())
                .collect::<Vec<_>>()
                .join("");
            let usage = parsed
                .usage
                .map(|u| TokenUsage { input_tokens: u.input_tokens, output_tokens: u.output_tokens })
                .unwrap_or_default();
            return Ok(Outcome { kind: OutcomeKind::Completed(text), usage, spawn_failed: false });
        }
        let detail = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => format!("HTTP {} {}: {}", status.as_u16(), body.error.kind, body.error.message),
            Err(_) => format!("HTTP {} with an unreadable error body", status.as_u16()),
        };
        if status.as_u16() == 429 || status.is_server_error() {
            Err(Attempt::Retry { why: detail, after: retry_after })
        } else {
            Err(Attempt::Fatal(format!("Messages API refused the request: {detail}")))
        }
    }
}

/// Read a body up to [`RESPONSE_BYTES_MAX`].
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                    return Err(format!("the response body is over {RESPONSE_BYTES_MAX} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err("the response timed out".into()),
            Err(e) => return Err(format!("reading the response failed: {}", without_url(&e))),
        }
    }
}

/// A reqwest error's text without the URL (which is harmless, but keeps messages short).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "the API");
    }
    text
}
