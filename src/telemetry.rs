//! Logs, traces and metrics set-up, and the few helpers the hot paths use.
//!
//! - **Logs**: `tracing-subscriber`, human-readable by default, JSON lines with
//!   `FANOUT_LOG_FORMAT=json`; level from `RUST_LOG` (default `info`). Spans that carry a
//!   `trace_id` field put it on every line logged inside them.
//! - **Traces**: OpenTelemetry through `tracing-opentelemetry`, exported over OTLP/HTTP
//!   (protobuf) by `opentelemetry-otlp`, which is how Jaeger v2 takes them natively. On when
//!   `FANOUT_OTLP_ENDPOINT` (the collector's base URL; `/v1/traces` is appended) or the
//!   standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; off
//!   otherwise, and then [`tracing_enabled`] is false and the per-event spans are never
//!   created. The SDK reads `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_BSP_*` itself.
//! - **Trace context** crosses NATS as W3C `traceparent` / `tracestate` headers
//!   ([`inject`], [`continue_trace`]).
//! - **Metrics**: the `metrics` facade with a Prometheus recorder, rendered by
//!   [`render_metrics`] for `GET /metrics`.

use std::{
    io::IsTerminal,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::{
    KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::Common;

static TRACING: AtomicBool = AtomicBool::new(false);

/// Target of spans that exist only to put ids (`node_id`, `conn`) on log lines: long-lived,
/// one per connection, and never exported as traces.
pub const LOG_CONTEXT: &str = "fanout::log_context";

/// Whether spans are exported. Hot paths create their per-event spans only when it is true.
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is pending.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter (bounded by the SDK's timeout).
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(%err, "trace exporter shutdown");
        }
    }
}

/// Where spans go, if anywhere: `FANOUT_OTLP_ENDPOINT` (base URL) wins; otherwise the
/// exporter's own standard variables.
fn otlp_endpoint(common: &Common) -> Option<Option<String>> {
    let base = common.otlp_endpoint.trim().trim_end_matches('/');
    if !base.is_empty() {
        return Some(Some(format!("{base}/v1/traces")));
    }
    let standard = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ];
    standard
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
        .then_some(None)
}

/// Installs logging, tracing (when configured) and the W3C propagator for this process.
/// `service` is `fanout-api` or `fanout-ws`; the node id becomes `service.instance.id`.
pub fn init(service: &'static str, common: &Common) -> Result<Telemetry, TelemetryError> {
    let mut telemetry = Telemetry::default();
    let mut otel_layer = None;
    if let Some(endpoint) = otlp_endpoint(common) {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        if let Some(endpoint) = &endpoint {
            use opentelemetry_otlp::WithExportConfig;
            exporter = exporter.with_endpoint(endpoint);
        }
        let exporter = exporter.build()?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.instance.id", common.node_id.clone()))
            .build();
        // The batch processor runs on its own thread with a blocking HTTP client: no
        // dependency on the Tokio runtime, and nothing on the request path waits for it.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(service);
        // Only fanout's own spans become OTel spans. Without a filter of its own this layer
        // would enable every TRACE-level callsite of every dependency (hyper, async-nats,
        // tungstenite) and pay for them on every message: 9x the CPU per delivery, measured.
        let ours = Targets::new()
            .with_target("fanout", Level::INFO)
            .with_target("fanout_api", Level::INFO)
            .with_target("fanout_ws", Level::INFO)
            .with_target(LOG_CONTEXT, tracing::level_filters::LevelFilter::OFF);
        otel_layer = Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(ours),
        );
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        telemetry.provider = Some(provider);
        TRACING.store(true, Ordering::Relaxed);
    }

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = common.log_format == crate::config::LogFormat::Json;
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed()
    };
    let installed = tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt.with_filter(filter))
        .try_init();
    if installed.is_err() {
        // A subscriber is already installed (tests start several servers in one process).
        tracing::debug!("logging already initialised");
    }
    if let Some(endpoint) = otlp_endpoint(common) {
        let to = endpoint.unwrap_or_else(|| "the OTEL_EXPORTER_OTLP_* endpoint".into());
        tracing::info!(service, "exporting traces over OTLP/HTTP to {to}");
    }
    Ok(telemetry)
}

/// Installs plain logging only (tests, tools). Safe to call more than once.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Writes the trace context of `span` into message headers through `set(name, value)`.
pub fn inject(span: &tracing::Span, mut set: impl FnMut(&str, String)) {
    struct Headers<'a>(&'a mut dyn FnMut(&str, String));
    impl Injector for Headers<'_> {
        fn set(&mut self, key: &str, value: String) {
            (self.0)(key, value)
        }
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut Headers(&mut set));
}

/// Makes `span` a child of the remote span described by W3C `traceparent` / `tracestate`
/// (from an HTTP request or a NATS message), and records its `trace_id` field.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    struct Headers<'a>(Option<&'a str>, Option<&'a str>);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                "traceparent" => self.0,
                "tracestate" => self.1,
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent", "tracestate"]
        }
    }
    if traceparent.is_some() {
        let parent = TraceContextPropagator::new().extract(&Headers(traceparent, tracestate));
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Records the span's trace id in its `trace_id` field, so log lines inside it carry it.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// The trace id in a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), if well formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();
/// Labels on every series of this process (`region`, with regions), set by [`init_metrics`].
static GLOBAL_LABELS: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Histogram buckets for `*_seconds` metrics: 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];

/// The process's Prometheus recorder, installed on first use.
fn metrics_handle() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for (key, value) in GLOBAL_LABELS.get().into_iter().flatten() {
            builder = builder.add_global_label(key, value);
        }
        let recorder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed, in which case ours stays empty.
        let _ = metrics::set_global_recorder(recorder);
        // Keep histogram memory bounded between scrapes.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("spawn the metrics upkeep thread");
        handle
    })
}

/// A metric's kind, for [`Metric`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric a binary exposes: described (`# HELP`) at start, and, unless it has labels or
/// `zero` is false, present from the first scrape with the value 0, so `rate()` and alerts
/// see a series before the first event (Prometheus's advice for counters).
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label sets to create at 0 (`&[]` for none; `&[&[]]` for the unlabelled series).
    pub zero: &'static [&'static [(&'static str, &'static str)]],
}

const fn metric(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    zero: &'static [&'static [(&'static str, &'static str)]],
) -> Metric {
    Metric {
        name,
        kind,
        help,
        zero,
    }
}

const UNLABELLED: &[&[(&str, &str)]] = &[&[]];

/// What both binaries expose.
pub const COMMON_METRICS: &[Metric] = &[
    metric(
        "fanout_nats_connected",
        Kind::Gauge,
        "1 while this process is connected to NATS, else 0 (set at each scrape).",
        UNLABELLED,
    ),
    metric(
        "fanout_profiling_active",
        Kind::Gauge,
        "1 while a CPU profile of this process is being taken (/debug/pprof/profile), else 0.",
        UNLABELLED,
    ),
];

/// Installs the metrics recorder now (so counters recorded before the first scrape count),
/// describes `catalogue` and creates its series (see [`Metric`]). With regions every series
/// carries `region="<this region>"`, for dashboards per region (the first call's region
/// holds for the process).
pub fn init_metrics(common: &Common, catalogue: &[&[Metric]]) {
    if !common.region.is_empty() {
        let _ = GLOBAL_LABELS.set(vec![("region".into(), common.region.clone())]);
    }
    metrics_handle();
    for metric in catalogue.iter().copied().flatten() {
        let Metric {
            name,
            kind,
            help,
            zero,
        } = *metric;
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, metrics::Unit::Seconds, help),
        }
        for labels in zero {
            let labels: Vec<metrics::Label> = labels
                .iter()
                .map(|(key, value)| metrics::Label::new(*key, *value))
                .collect();
            match kind {
                Kind::Counter => metrics::counter!(name, labels).absolute(0),
                Kind::Gauge => metrics::gauge!(name, labels).set(0.0),
                Kind::Histogram => drop(metrics::histogram!(name, labels)),
            }
        }
    }
}

/// The Prometheus text exposition of every metric of this process.
pub fn render_metrics() -> String {
    metrics_handle().render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_comes_from_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_of("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_of(""), None);
    }

    #[test]
    fn the_fanout_endpoint_gets_the_traces_path() {
        let common = Common {
            otlp_endpoint: "http://jaeger:4318/".into(),
            ..Common::default()
        };
        assert_eq!(
            otlp_endpoint(&common),
            Some(Some("http://jaeger:4318/v1/traces".into()))
        );
    }
}
