//! A local server that speaks the Anthropic Messages API's HTTP shapes: success bodies with
//! usage, JSON error bodies, `retry-after`, a request that never answers, and a malformed body.
//! Each connection serves one request (`connection: close`); replies are served in order and the
//! last one repeats.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
pub enum Reply {
    /// 200 with a message of `text` and this usage.
    Message { text: String, input_tokens: u64, output_tokens: u64 },
    /// An error status with the API's JSON error body and extra headers.
    Error { status: u16, kind: String, message: String, headers: Vec<(String, String)> },
    /// A status and a raw body.
    Raw { status: u16, body: String },
    /// Never answer.
    Hang,
}

impl Reply {
    pub fn message(text: &str, input_tokens: u64, output_tokens: u64) -> Self {
        Reply::Message { text: text.into(), input_tokens, output_tokens }
    }

    pub fn error(status: u16, kind: &str, message: &str) -> Self {
        Reply::Error { status, kind: kind.into(), message: message.into(), headers: Vec::new() }
    }

    pub fn rate_limited(retry_after_s: u64) -> Self {
        Reply::Error {
            status: 429,
            kind: "rate_limit_error".into(),
            message: "Number of request tokens has exceeded your per-minute rate limit".into(),
            headers: vec![("retry-after".into(), retry_after_s.to_string())],
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub struct FakeMessages {
    pub base_url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeMessages {
    pub async fn start(replies: Vec<Reply>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let mut served = 0usize;
            while let Ok((mut socket, _)) = listener.accept().await {
                let reply = replies[served.min(replies.len() - 1)].clone();
                served += 1;
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else { return };
                    log.lock().expect("log").push(request);
                    let (status, body, headers) = match reply {
                        Reply::Hang => {
                            tokio::time::sleep(Duration::from_secs(3_600)).await;
                            return;
                        }
                        Reply::Message { text, input_tokens, output_tokens } => (
                            200,
                            serde_json::json!({
                                "id": "msg_fake", "type": "message", "role": "assistant", "model": "fake",
                                "content": [{"type": "text", "text": text}],
                                "stop_reason": "end_turn",
                                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                            })
                            .to_string(),
                            Vec::new(),
                        ),
                        Reply::Error { status, kind, message, headers } => (
                            status,
                            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
                                .to_string(),
                            headers,
                        ),
                        Reply::Raw { status, body } => (status, body, Vec::new()),
                    };
                    let mut head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                        body.len()
                    );
                    for (name, value) in headers {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(body.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Ok(Self { base_url, seen })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut data = Vec::new();
    let mut buffer = [0u8; 4096];
    let header_end = loop {
        let n = socket.read(&mut buffer).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buffer[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if data.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&data[..header_end]).to_string();
    let mut lines = head.lines();
    let path = lines.next()?.split_whitespace().nth(1)?.to_string();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while data.len() < header_end + length {
        let n = socket.read(&mut buffer).await.ok()?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buffer[..n]);
    }
    let body = serde_json::from_slice(&data[header_end..]).unwrap_or(serde_json::Value::Null);
    Some(Seen { at: Instant::now(), path, headers, body })
}
