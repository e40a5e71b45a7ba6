//! Traces: OpenTelemetry spans exported over OTLP/gRPC (`tracing.*`, `docs/OPERATIONS.md`,
//! "Tracing").
//!
//! Only spans of the target [`TARGET`] are exported: a request on the API port, a task's submit,
//! its proposal on the leader, its assignment, the attempt and its report, a Claude call. Every
//! other span (the node span, openraft's) stays in the logs. A task's trace context is kept in
//! its record (`TaskSpec::trace_parent`, the W3C `traceparent` of its submit), so an attempt that
//! starts minutes later on another node joins the submit's trace; a task submitted with no
//! sampled trace gets no spans after its submit. With tracing off no span of this target is
//! created on a hot path (callers check [`enabled`]) and nothing is exported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `tracing` target of exported spans.
pub const TARGET: &str = "maos::trace";

/// Finished spans held for export at most; past this new ones are dropped (counted by the SDK),
/// so a collector that is down costs bounded memory.
const QUEUE_MAX: usize = 8_192;
/// How often finished spans are sent.
const EXPORT_EVERY: Duration = Duration::from_millis(500);
/// One export call's bound, and the flush's at a stop.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces: callers skip making spans of [`TARGET`] otherwise.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What the exporter needs (from `tracing.*`; the telemetry layer reads no configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    pub sample_ratio: f64,
    pub service_name: String,
    pub node_id: u64,
    /// For an `https://` endpoint: the CA bundle to check the collector against (else the web
    /// roots).
    pub ca_file: Option<std::path::PathBuf>,
}

/// The exporter of a process; [`Tracing::flush`] sends what is still queued.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Build the exporter and the layer that feeds it (must run inside the tokio runtime: the
    /// exporter's batches are sent by a task on it). Turns [`enabled`] on.
    pub fn start<S>(settings: &Settings) -> Result<(Self, Box<dyn Layer<S> + Send + Sync>), String>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT);
        if settings.endpoint.starts_with("https://") {
            let tls = tonic::transport::ClientTlsConfig::new();
            let tls = match &settings.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("tracing: cannot read the CA file {}: {e}", path.display()))?;
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tls.with_webpki_roots(),
            };
            exporter = exporter.with_tls_config(tls);
        }
        let exporter = exporter.build().map_err(|e| format!("tracing.otlp_endpoint: {e}"))?;
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE_MAX)
            .with_scheduled_delay(EXPORT_EVERY)
            .with_max_export_timeout(EXPORT_TIMEOUT)
            .build();
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).with_batch_config(batches).build();
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.instance.id", settings.node_id.to_string()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio))))
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("maos"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            // Nothing here reads OpenTelemetry's current context (spans are followed and
            // injected through `OpenTelemetrySpanExt`), so entering a span, at every poll of
            // an instrumented future, need not attach one; and every exported span has the
            // same target, so it is not an attribute.
            .with_context_activation(false)
            .with_target(false)
            .with_filter(Targets::new().with_target(TARGET, tracing::Level::INFO))
            .boxed();
        ENABLED.store(true, Ordering::Relaxed);
        Ok((Self { provider }, layer))
    }

    /// Send the spans still queued, within a bound (at a stop).
    pub async fn flush(self) {
        let provider = self.provider;
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(EXPORT_TIMEOUT));
        if let Ok(Ok(Err(error))) = tokio::time::timeout(EXPORT_TIMEOUT + Duration::from_secs(1), flushed).await {
            tracing::debug!(%error, "the last spans were not exported");
        }
    }
}

/// The W3C `traceparent` of `span` when it is recorded (sampled), else empty: what a task
/// keeps and what a command agent gets as `TRACEPARENT`.
pub fn traceparent_of(span: &tracing::Span) -> String {
    if !enabled() {
        return String::new();
    }
    let context = span.context();
    if !context.span().span_context().is_sampled() {
        return String::new();
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// [`traceparent_of`] the current span.
pub fn current_traceparent() -> String {
    traceparent_of(&tracing::Span::current())
}

struct One<'a>(&'a str, &'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == self.0).then_some(self.1)
    }

    fn keys(&self) -> Vec<&str> {
        vec![self.0]
    }
}

struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// Make `span` (not yet entered) a child of the W3C `traceparent`; an empty or malformed one
/// leaves it a root.
pub fn follow(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&One("traceparent", traceparent));
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Make `span` a child of the caller's trace (`traceparent` and `tracestate` headers, as gRPC
/// metadata or HTTP headers); without them it is a root, sampled by `tracing.sample_ratio`.
pub fn follow_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}
