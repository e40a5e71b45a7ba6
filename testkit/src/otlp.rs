//! An OTLP/gRPC trace collector on loopback, for tests and benchmarks: nodes export to it as
//! they would to a real OpenTelemetry Collector. It counts every span it receives and, when made
//! with [`Collector::keeping`], keeps what each one is (a test looks up one trace); a benchmark's
//! [`Collector::counting`] keeps nothing, so hundreds of thousands of spans cost no memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// One exported span, as the collector saw it (ids in lowercase hex, as in `traceparent`).
#[derive(Debug, Clone)]
pub struct Seen {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The resource's `service.instance.id`: the node that made it.
    pub instance: String,
}

#[derive(Clone, Default)]
pub struct Collector {
    count: Arc<AtomicU64>,
    /// `None`: count only.
    kept: Option<Arc<Mutex<Vec<Seen>>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = Vec::new();
        for resource in request.into_inner().resource_spans {
            let spans = resource.scope_spans.into_iter().flat_map(|s| s.spans);
            let Some(kept) = &self.kept else {
                self.count.fetch_add(spans.count() as u64, Ordering::Relaxed);
                continue;
            };
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            let instance = attributes
                .iter()
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| kv.value.as_ref().and_then(|v| v.value.clone()))
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in spans {
                seen.push(Seen {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    instance: instance.clone(),
                });
            }
            self.count.fetch_add(seen.len() as u64, Ordering::Relaxed);
            kept.lock().map_err(|_| tonic::Status::internal("poisoned"))?.append(&mut seen);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Keeps every span it receives.
    pub fn keeping() -> Self {
        Self { kept: Some(Default::default()), ..Default::default() }
    }

    /// Counts the spans it receives and keeps none.
    pub fn counting() -> Self {
        Self::default()
    }

    /// Serve on a free loopback port until the process ends; returns the endpoint for
    /// `tracing.otlp_endpoint`.
    pub async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        Ok(endpoint)
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every kept span (none when counting only).
    pub fn kept(&self) -> Vec<Seen> {
        self.kept.as_ref().and_then(|kept| kept.lock().ok().map(|s| s.clone())).unwrap_or_default()
    }

    /// The kept spans of one trace.
    pub fn of_trace(&self, trace_id: &str) -> Vec<Seen> {
        self.kept().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }
}
