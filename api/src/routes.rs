//! The HTTP endpoints. Each one validates, publishes through [`fanout::Bus`] and answers;
//! none keeps state between requests.
//!
//! | method | path | answer |
//! |---|---|---|
//! | POST | `/v1/channels/{channel}/events` | 202 `{"id","channel","seq"}` (+ `"region"` with regions) |
//! | POST | `/v1/broadcast` | 202, to the `broadcast` channel |
//! | POST | `/v1/batch` | 202 `{"results":[...]}`: many events in one request, each answered on its own |
//! | POST | `/ping` | 200 `{"message":"pong"}` after broadcasting `{"sendTime": ...}` |
//! | GET | `/healthz` | 200 while the process runs |
//! | GET | `/readyz` | 200 when NATS is connected, the stream exists and takes a write (a probe, at most once a second), else 503 with the reason |
//! | GET | `/metrics` | Prometheus text format |
//! | GET | `/v1/nodes` | the live ws nodes (discovery) |
//! | GET | `/v1/stats` | the tier's live figures, gathered from every ws node over NATS (the `/admin` page's data) |
//! | GET | `/v1/channels/{channel}/presence` | who is in the channel across every ws node; `?count_only=true`: how many |
//! | GET | `/`, `/v1/config` | the demo page and its node list ([`crate::web`]) |
//! | GET | `/admin` | the operators' page, on `/v1/stats` ([`crate::web`]) |
//! | GET | `/openapi.json` | this API's OpenAPI document |

use std::time::{SystemTime, UNIX_EPOCH};

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, MatchedPath, Path, Request, State, rejection::BytesRejection,
        rejection::PathRejection,
    },
    http::{HeaderMap, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use fanout::{Bus, Channel, Code, Data, Published, telemetry};
use serde::{Deserialize, Serialize};
use serde_json::{json, value::RawValue};
use std::borrow::Cow;
use tracing::{Instrument, field::Empty};

use crate::{ApiError, Config, config::WsNode};

/// Longest accepted `Idempotency-Key`, bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// What every handler reads. One `Arc`: axum clones the state for each extractor and
/// middleware of every request, and one reference count is cheaper than eight (measured:
/// cloning and dropping the eight was 2.5% of the API's CPU per publish).
#[derive(Debug, Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

#[derive(Debug)]
pub struct Shared {
    bus: Bus,
    body_limit: usize,
    batch_max_events: usize,
    batch_max_bytes: usize,
    ws_nodes: std::sync::Arc<[WsNode]>,
    jaeger_ui: std::sync::Arc<str>,
    api_keys: std::sync::Arc<[String]>,
    public_ping: bool,
    /// `FANOUT_PROFILING`: whether `/debug/pprof/profile` answers.
    profiling: bool,
    nodes: std::sync::Arc<fanout::discovery::Directory>,
    /// The last check that the stream takes writes, and when (see [`readyz`]).
    write_check: std::sync::Arc<tokio::sync::Mutex<Option<WriteCheck>>>,
    probe_channel: Channel,
    node_id: String,
    /// The stream's last sequence as `GET /v1/stats` saw it, for the events stored per
    /// second.
    intake: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
    /// Lifecycle webhooks (`FANOUT_WEBHOOK_URL`), when on.
    webhooks: Option<std::sync::Arc<crate::webhooks::Webhooks>>,
    history_max_age_secs: u64,
    /// The Pusher protocol's apps (`FANOUT_PUSHER_APPS`).
    pusher_apps: Vec<fanout::pusher::App>,
    /// This API's region, and the tier's others.
    region: String,
    other_regions: Vec<String>,
    /// Its region is evacuated: publishes are refused (see [`AppState::evacuated`]).
    evacuated: std::sync::atomic::AtomicBool,
}

impl AppState {
    /// `config` must be validated (its `ws_urls` parse).
    pub fn new(
        bus: Bus,
        config: &Config,
        webhooks: Option<std::sync::Arc<crate::webhooks::Webhooks>>,
    ) -> Self {
        AppState(std::sync::Arc::new(Shared {
            bus,
            body_limit: config.body_limit_bytes,
            batch_max_events: config.batch_max_events,
            batch_max_bytes: config.batch_max_bytes,
            ws_nodes: config.ws_nodes().unwrap_or_default().into(),
            jaeger_ui: config.jaeger_ui.trim_end_matches('/').into(),
            api_keys: config.keys().into(),
            public_ping: config.public_ping,
            profiling: config.common.profiling,
            nodes: std::sync::Arc::default(),
            write_check: std::sync::Arc::default(),
            probe_channel: Channel::canary(&config.common.node_id),
            node_id: config.common.node_id.clone(),
            intake: std::sync::Mutex::default(),
            webhooks,
            history_max_age_secs: config.common.history_max_age_secs,
            pusher_apps: fanout::pusher::apps(config.common.pusher_apps.expose())
                .unwrap_or_default(),
            region: config.common.region.trim().to_string(),
            other_regions: config
                .common
                .regions
                .iter()
                .filter(|region| **region != config.common.region.trim())
                .map(ToString::to_string)
                .collect(),
            evacuated: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// This API's region (empty with one region).
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Says whether this API's region is evacuated.
    pub fn set_evacuated(&self, evacuated: bool) {
        self.evacuated
            .store(evacuated, std::sync::atomic::Ordering::Release);
    }

    /// Refuses a publish while this API's region is evacuated: 503 `region_evacuated`, with
    /// the regions to publish to instead (`"regions"`) and `Retry-After`.
    pub fn evacuated(&self) -> Result<(), ApiError> {
        if !self.evacuated.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::RegionEvacuated,
            format!(
                "region {} is evacuated: publish to another region's API ({})",
                self.region,
                self.other_regions.join(", ")
            ),
        );
        error.retry_after = Some(30);
        error.hint = Some(("regions", json!(self.other_regions)));
        Err(error)
    }

    /// The NATS bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The Pusher protocol's apps (validated with the settings).
    pub fn pusher_apps(&self) -> &[fanout::pusher::App] {
        &self.pusher_apps
    }

    /// How long the stream keeps an event (`FANOUT_HISTORY_MAX_AGE_SECS`).
    pub fn history_max_age_secs(&self) -> u64 {
        self.history_max_age_secs
    }

    /// The live ws nodes, fed by their announcements.
    pub fn directory(&self) -> std::sync::Arc<fanout::discovery::Directory> {
        self.nodes.clone()
    }

    /// Jaeger UI base URL for trace links on the page, or empty.
    pub fn jaeger_ui(&self) -> &str {
        &self.jaeger_ui
    }

    pub fn ws_nodes(&self) -> &[WsNode] {
        &self.ws_nodes
    }
}

/// Every endpoint: these, and `more` (the control endpoints of `control.rs`), all behind
/// the API key.
pub fn router(state: AppState, more: Router<AppState>) -> Router {
    let (limit, batch_max_bytes) = (state.body_limit, state.batch_max_bytes);
    Router::new()
        .route("/v1/channels/{channel}/events", post(publish_event))
        .route("/v1/channels/{channel}/volatile", post(publish_volatile))
        .route("/v1/broadcast", post(publish_broadcast))
        .route(
            "/v1/batch",
            post(publish_batch).layer(DefaultBodyLimit::max(batch_max_bytes)),
        )
        .route("/ping", post(ping))
        .route_layer(axum::middleware::from_fn(http_span))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(nodes))
        .route("/v1/stats", get(stats))
        .route("/v1/channels/{channel}/presence", get(presence))
        .route("/debug/pprof/profile", get(profile))
        .route("/v1/webhooks/dead", get(webhooks_dead))
        .route("/v1/webhooks/replay", post(webhooks_replay))
        .merge(more)
        .merge(crate::web::router(state.ws_nodes(), state.jaeger_ui()))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// With API keys configured, `/v1/*`, `/debug/*` and `POST /ping` (unless `public_ping`)
/// need `Authorization: Bearer <key>`: missing → 401, unknown → 403.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let guarded = path.starts_with("/v1/")
        || path.starts_with("/debug/")
        || (path == "/ping" && !state.public_ping);
    if state.api_keys.is_empty() || !guarded {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthorized,
                "this endpoint needs Authorization: Bearer <API key>",
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            response
        }
        // Every key is compared, in constant time, so timing tells nothing.
        Some(key)
            if state.api_keys.iter().fold(false, |ok, k| {
                ok | fanout::secret::same(k.as_bytes(), key.as_bytes())
            }) =>
        {
            next.run(request).await
        }
        Some(_) => {
            ApiError::new(StatusCode::FORBIDDEN, Code::Forbidden, "unknown API key").into_response()
        }
    }
}

/// The HTTP server span of a publishing request (when tracing is on), continuing the
/// caller's trace if the request carries `traceparent`.
async fn http_span(request: Request, next: Next) -> Response {
    if !telemetry::tracing_enabled() {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let name = format!("{method} {route}");
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = Empty,
        trace_id = Empty,
    );
    let headers = request.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    telemetry::continue_trace(&span, header("traceparent"), header("tracestate"));
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// The `202 Accepted` answer to a publish.
#[derive(Debug, Serialize)]
struct Accepted {
    id: String,
    channel: Channel,
    seq: u64,
    /// The region whose stream stored it (`seq` counts there); none with one region.
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

async fn publish_event(
    State(state): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    publish(&state, publishable(channel)?, &headers, body).await
}

/// The channel of a publish's path: valid, and not one of fanout's own.
fn publishable(channel: Result<Path<String>, PathRejection>) -> Result<Channel, ApiError> {
    let Path(channel) = channel
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidChannel, e.body_text()))?;
    let channel = Channel::parse(&channel).map_err(ApiError::invalid_channel)?;
    if channel.is_internal() {
        return Err(reserved());
    }
    Ok(channel)
}

/// `POST /v1/channels/{channel}/volatile`: an event that is not stored (no `seq`, at most
/// once, never replayed), handed to NATS without JetStream.
async fn publish_volatile(
    State(state): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let channel = publishable(channel)?;
    state.evacuated()?;
    let data = data_of(&state, &headers, body)?;
    let id = state.bus.publish_volatile(&channel, data).await?;
    metrics::counter!("fanout_api_events_accepted_total", "class" => "volatile", "duplicate" => "false")
        .increment(1);
    Ok((
        StatusCode::ACCEPTED,
        Json(VolatileAccepted {
            id,
            channel,
            volatile: true,
            region: state.bus.topology().region().map(|r| r.to_string()),
        }),
    ))
}

/// The `202 Accepted` answer to a volatile publish: handed to NATS, not stored.
#[derive(Debug, Serialize)]
struct VolatileAccepted {
    id: String,
    channel: Channel,
    volatile: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
}

async fn publish_broadcast(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    publish(&state, Channel::broadcast(), &headers, body).await
}

async fn publish(
    state: &AppState,
    channel: Channel,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    state.evacuated()?;
    let data = data_of(state, headers, body)?;
    let key = idempotency_key(headers)?;
    let started = std::time::Instant::now();
    let Published { id, seq, duplicate } = state.bus.log().publish(&channel, data, key).await?;
    metrics::histogram!("fanout_api_publish_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    count_accepted(&channel, duplicate);
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            id,
            channel,
            seq,
            region: state.bus.topology().region().map(|r| r.to_string()),
            duplicate,
        }),
    ))
}

/// A publish's data, read within the size limit: bytes as sent when the body is
/// `application/octet-stream` (JSON clients get them as base64, MessagePack clients as bin),
/// else JSON, checked to be one value.
fn data_of(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Data, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.body_limit)
        } else {
            ApiError::new(rejection.status(), Code::InvalidBody, rejection.body_text())
        }
    })?;
    if is_octet_stream(headers) {
        return Ok(Data::binary(body));
    }
    check_body(&body)?;
    Ok(body.into())
}

/// Whether the body is `application/octet-stream` (parameters aside, any case).
fn is_octet_stream(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/octet-stream"))
}

/// The answer to a publish on a `_fanout.` channel.
fn reserved() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        Code::ReservedChannel,
        format!(
            "channels starting with {:?} are fanout's own",
            fanout::channel::INTERNAL_PREFIX
        ),
    )
}

fn count_accepted(channel: &Channel, duplicate: bool) {
    let class = if channel.is_broadcast() {
        "broadcast"
    } else {
        "channel"
    };
    let duplicate = if duplicate { "true" } else { "false" };
    metrics::counter!("fanout_api_events_accepted_total", "class" => class, "duplicate" => duplicate)
        .increment(1);
}

/// `POST /v1/batch`: `{"events":[{"channel","data","idempotency_key"?}, ...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// One event of a batch. Parsed on its own, so that a malformed event fails alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchEvent<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// `{"results":[...]}`, serialized straight from the results (no JSON tree in between).
#[derive(Debug, Serialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

/// A batch's accepted events per metric label, counted once per request, not per event.
#[derive(Debug, Default)]
struct AcceptedCounts {
    counts: [u64; 4],
}

impl AcceptedCounts {
    fn add(&mut self, channel: &Channel, duplicate: bool) {
        self.counts[usize::from(channel.is_broadcast()) * 2 + usize::from(duplicate)] += 1;
    }

    fn record(&self) {
        for (i, &n) in self.counts.iter().enumerate() {
            if n > 0 {
                let class = if i >= 2 { "broadcast" } else { "channel" };
                let duplicate = if i % 2 == 1 { "true" } else { "false" };
                metrics::counter!("fanout_api_events_accepted_total", "class" => class, "duplicate" => duplicate)
                    .increment(n);
            }
        }
    }
}

/// One answer of a batch, in the request's order.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum BatchResult {
    Stored(Accepted),
    Failed { error: ErrorBody },
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    code: Code,
    message: String,
}

impl From<ApiError> for BatchResult {
    fn from(err: ApiError) -> Self {
        metrics::counter!("fanout_api_errors_total", "code" => err.code.as_str()).increment(1);
        BatchResult::Failed {
            error: ErrorBody {
                code: err.code,
                message: err.message,
            },
        }
    }
}

/// Many events in one request, all in flight to the stream at once. The request fails as a
/// whole only when it is not a batch (400), too large (413) or NATS is down (503); otherwise
/// it is answered 202 with one result per event, in order: `{"id","channel","seq"}` or
/// `{"error":{"code","message"}}`. Events on one channel are stored in the request's order.
async fn publish_batch(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.evacuated()?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::PayloadTooLarge,
                format!(
                    "the batch is larger than the limit of {} bytes (FANOUT_BATCH_MAX_BYTES)",
                    state.batch_max_bytes
                ),
            )
        } else {
            ApiError::new(rejection.status(), Code::InvalidBody, rejection.body_text())
        }
    })?;
    let batch: Batch = serde_json::from_slice(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidBatch,
            format!(r#"the body must be {{"events":[{{"channel","data","idempotency_key"?}}, ...]}}: {err}"#),
        )
    })?;
    if batch.events.len() > state.batch_max_events {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BatchTooLarge,
            format!(
                "{} events; a batch carries at most {} (FANOUT_BATCH_MAX_EVENTS)",
                batch.events.len(),
                state.batch_max_events
            ),
        ));
    }
    if !state.bus.is_connected() {
        return Err(fanout::BusError::Unavailable("not connected").into());
    }
    // Check every event first; the valid ones go out together.
    let checked: Vec<Result<Checked, ApiError>> = batch
        .events
        .iter()
        .map(|raw| check_event(state.body_limit, &body, raw))
        .collect();
    drop(batch);
    let outgoing: Vec<(&Channel, Data, Option<&str>)> = checked
        .iter()
        .filter_map(|event| event.as_ref().ok())
        .map(|(channel, data, key)| (channel, data.clone().into(), key.as_deref()))
        .collect();
    let started = std::time::Instant::now();
    let mut stored = state.bus.log().publish_many(outgoing).await.into_iter();
    metrics::histogram!("fanout_api_publish_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let region = state.bus.topology().region().map(|r| r.to_string());
    let mut accepted = AcceptedCounts::default();
    let results: Vec<BatchResult> = checked
        .into_iter()
        .map(|event| {
            let (channel, _, _) = event?;
            let published = stored
                .next()
                .expect("one answer per event sent")
                .map_err(ApiError::from)?;
            accepted.add(&channel, published.duplicate);
            Ok(BatchResult::Stored(Accepted {
                id: published.id,
                channel,
                seq: published.seq,
                region: region.clone(),
                duplicate: published.duplicate,
            }))
        })
        .map(|result: Result<BatchResult, ApiError>| result.unwrap_or_else(BatchResult::from))
        .collect();
    accepted.record();
    Ok((StatusCode::ACCEPTED, Json(BatchAnswer { results })).into_response())
}

/// A batch event that passed its checks: channel, data, idempotency key.
type Checked = (Channel, Bytes, Option<String>);

/// One batch event's checks: the same as a single publish's, answered with the same codes.
fn check_event(body_limit: usize, body: &Bytes, raw: &RawValue) -> Result<Checked, ApiError> {
    let event: BatchEvent = serde_json::from_str(raw.get()).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidEvent,
            format!(r#"an event is {{"channel","data","idempotency_key"?}}: {err}"#),
        )
    })?;
    let channel = Channel::parse(&event.channel).map_err(ApiError::invalid_channel)?;
    if channel.is_internal() {
        return Err(reserved());
    }
    let data = event.data.get().as_bytes();
    if data.len() > body_limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            format!("the event's data is larger than the limit of {body_limit} bytes"),
        ));
    }
    let key = match event.idempotency_key {
        None => None,
        Some(key) => {
            check_idempotency_key(&key)?;
            Some(key.into_owned())
        }
    };
    // `data` borrows from the body: the stored bytes are the bytes sent, without a copy.
    Ok((channel, body.slice_ref(data), key))
}

/// A publish's body must be one JSON value; it is stored as sent, never re-encoded.
fn check_body(body: &[u8]) -> Result<(), ApiError> {
    serde_json::from_slice::<&serde_json::value::RawValue>(body).map_err(ApiError::invalid_json)?;
    Ok(())
}

/// What a publish checks of its request before anything reaches NATS, for the fuzz target
/// of the HTTP publish body (`fuzz/`): the path's channel, the `Idempotency-Key`, the body.
/// The input is split at its first two NUL bytes: channel, key, body.
#[doc(hidden)]
pub fn fuzz_publish(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (channel, key, body) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if let Ok(channel) = std::str::from_utf8(channel) {
        let _ = Channel::parse(channel);
    }
    let mut headers = HeaderMap::new();
    if let Ok(value) = axum::http::HeaderValue::from_bytes(key) {
        headers.insert("idempotency-key", value);
    }
    let _ = idempotency_key(&headers);
    let _ = check_body(body);
}

/// What `POST /v1/batch` checks of its body before anything reaches NATS, for the fuzz
/// target of batch bodies (`fuzz/`): the whole body, then every event on its own. An event
/// that passes must carry a channel that parses and data that is one JSON value, cut from
/// the body as sent.
#[doc(hidden)]
pub fn fuzz_batch(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    let Ok(batch) = serde_json::from_slice::<Batch>(&body) else {
        return;
    };
    for raw in batch.events {
        if let Ok((channel, data, key)) = check_event(64 * 1024, &body, raw) {
            assert!(Channel::parse(channel.as_str()).is_ok());
            assert!(
                serde_json::from_slice::<&RawValue>(&data).is_ok(),
                "{data:?}"
            );
            assert!(key.is_none_or(|key| check_idempotency_key(&key).is_ok()));
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| invalid_key("must be printable ASCII"))?;
    check_idempotency_key(key)?;
    Ok(Some(key))
}

fn invalid_key(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        Code::InvalidIdempotencyKey,
        format!("Idempotency-Key {why}"),
    )
}

/// An idempotency key (header or batch field): 1-128 printable ASCII bytes, no whitespace.
fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    let invalid = invalid_key;
    if !key.is_ascii() {
        return Err(invalid("must be printable ASCII"));
    }
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(invalid(&format!("must be 1-{MAX_IDEMPOTENCY_KEY} bytes")));
    }
    if key
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(invalid("must not contain whitespace"));
    }
    Ok(())
}

/// The scaling-ws demo's endpoint: broadcasts `{"sendTime": "<now, Go time.ANSIC>"}`.
async fn ping(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data = serde_json::to_vec(&json!({"sendTime": fanout::time::ansic(now)}))
        .expect("a JSON object always serializes");
    let started = std::time::Instant::now();
    state
        .bus
        .log()
        .publish(&Channel::broadcast(), Bytes::from(data), None)
        .await?;
    metrics::histogram!("fanout_api_publish_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("fanout_api_events_accepted_total", "class" => "ping", "duplicate" => "false")
        .increment(1);
    Ok(Json(json!({"message": "pong"})))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let connected = if state.bus.is_connected() { 1.0 } else { 0.0 };
    metrics::gauge!("fanout_nats_connected").set(connected);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render_metrics(),
    )
}

#[derive(Debug, serde::Deserialize)]
struct PresenceParams {
    #[serde(default)]
    count_only: bool,
}

/// `{"channel","count","members":[{user,conn,node,info,joined_at}],"partial"}`, or without
/// `members` for `?count_only=true`. One NATS request whatever the number of members.
async fn presence(
    State(state): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
    params: Result<axum::extract::Query<PresenceParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(channel) = channel
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidChannel, e.body_text()))?;
    let channel = Channel::parse(&channel).map_err(ApiError::invalid_channel)?;
    if channel.is_broadcast() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::ReservedChannel,
            "\"broadcast\" reaches every connection; it has no presence",
        ));
    }
    let axum::extract::Query(params) = params
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidQuery, e.body_text()))?;
    let answer = state
        .bus
        .rpc()
        .presence(&channel, params.count_only, &state.nodes)
        .await
        .map_err(|err| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::BusUnavailable,
                err.to_string(),
            )
        })?;
    Ok(Json(answer).into_response())
}

/// The tier's live figures: every ws node's answer to a stats query (scatter-gather over
/// NATS, as presence), added up, with this API's view of NATS and the stream.
async fn stats(State(state): State<AppState>) -> Result<Response, ApiError> {
    use fanout::stats::{ApiStats, NatsHealth, Stats, aggregate};
    let (nodes, partial) = state.bus.rpc().stats(&state.nodes).await.map_err(|err| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::BusUnavailable,
            err.to_string(),
        )
    })?;
    let stream = state.bus.log().stream_stats().await.ok();
    let events_in = stream.as_ref().and_then(|s| state.intake_rate(s.last_seq));
    let (nodes, channels, regions, mut totals) = aggregate(nodes);
    totals.events_in_per_sec = events_in;
    let stats = Stats {
        generated_at: fanout::time::now_ms(),
        nodes,
        channels,
        regions,
        totals,
        api: ApiStats {
            node: state.node_id.clone(),
            region: state.bus.topology().region().map(|r| r.to_string()),
            nats: NatsHealth {
                state: state.bus.state().to_string(),
                stream: state.bus.log().stream_name().to_string(),
                stream_ready: state.bus.log().stream_ready(),
            },
            stream,
        },
        partial,
    };
    Ok(Json(stats).into_response())
}

impl Shared {
    /// Events stored per second from the stream's last sequence now and as seen by earlier
    /// calls within [`fanout::stats::RATE_WINDOW`]; `None` without a sample a second old.
    fn intake_rate(&self, last_seq: u64) -> Option<f64> {
        let now = std::time::Instant::now();
        let mut samples = self.intake.lock().unwrap_or_else(|e| e.into_inner());
        while samples
            .front()
            .is_some_and(|(then, _)| now.duration_since(*then) > fanout::stats::RATE_WINDOW)
        {
            samples.pop_front();
        }
        let rate = samples.front().and_then(|(then, seq)| {
            let secs = now.duration_since(*then).as_secs_f64();
            (secs >= 1.0).then(|| last_seq.saturating_sub(*seq) as f64 / secs)
        });
        samples.push_back((now, last_seq));
        // Bounded whatever the polling rate: one sample per 100 ms is plenty.
        if samples.len() > 128 {
            samples.pop_front();
        }
        rate
    }
}

/// The ws nodes that announced themselves within the last few seconds; `partial` while this
/// process has not followed announcements long enough to have heard every running node.
async fn nodes(State(state): State<AppState>) -> impl IntoResponse {
    Json(json!({ "nodes": state.nodes.live(), "partial": !state.nodes.is_complete() }))
}

/// A CPU profile of the API, in pprof's format, when `FANOUT_PROFILING` allows it.
async fn profile(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    match fanout::profiling::serve(state.profiling, uri.query()).await {
        Ok(profile) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            profile,
        )
            .into_response(),
        Err(err) => {
            let (status, code) = err.status_and_code();
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            ApiError::new(status, code, err.to_string()).into_response()
        }
    }
}

/// The webhooks, or the answer that they are off.
fn webhooks_of(state: &AppState) -> Result<&std::sync::Arc<crate::webhooks::Webhooks>, ApiError> {
    state.webhooks.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            Code::WebhooksOff,
            "lifecycle webhooks are off: set FANOUT_WEBHOOK_URL",
        )
    })
}

#[derive(Debug, Deserialize)]
struct DeadQuery {
    limit: Option<usize>,
}

/// `GET /v1/webhooks/dead`: the batches no receiver took within the retry window, oldest
/// first (`?limit=`, default 100, at most 1000).
async fn webhooks_dead(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let webhooks = webhooks_of(&state)?;
    let axum::extract::Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidQuery, e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidQuery,
            "limit is 1 to 1000",
        ));
    }
    let dead = webhooks.dead(limit).await?;
    let dead: Vec<serde_json::Value> = dead
        .into_iter()
        .map(|(seq, body)| serde_json::json!({"seq": seq, "events": body["events"], "time_ms": body["time_ms"]}))
        .collect();
    Ok(Json(serde_json::json!({ "dead": dead })))
}

/// `POST /v1/webhooks/replay` `{"since": <unix ms> | "<event id>"}`: sends the recorded
/// events again from that time, or after that event, in batches; `202 {"replaying": n}`.
async fn webhooks_replay(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let webhooks = webhooks_of(&state)?;
    let invalid = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidBody,
            format!(r#"the body is {{"since": <unix ms> | "<event id>"}}: {why}"#),
        )
    };
    let body = body.map_err(|e| invalid(&e.body_text()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| invalid(&e.to_string()))?;
    let count = match &value["since"] {
        serde_json::Value::Number(n) => {
            let since = n
                .as_u64()
                .ok_or_else(|| invalid("a time is a non-negative integer"))?;
            webhooks.replay(since, None).await?
        }
        serde_json::Value::String(id) => webhooks.replay(0, Some(id)).await?,
        _ => return Err(invalid("\"since\" is missing")),
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "replaying": count })),
    ))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// When the stream was last asked to take a write, and what it said.
type WriteCheck = (std::time::Instant, Result<(), String>);

/// How long one check that the stream takes writes stands for: `/readyz` asked more often
/// than this stores no more probes.
const WRITE_CHECK_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the stream takes writes: a probe stored on this process's canary channel, at most
/// once per [`WRITE_CHECK_FOR`] (one check at a time; the others wait for its answer).
async fn stream_takes_writes(state: &AppState) -> Result<(), String> {
    let mut last = state.write_check.lock().await;
    if let Some((at, result)) = &*last
        && at.elapsed() < WRITE_CHECK_FOR
    {
        return result.clone();
    }
    let probe = format!(r#"{{"probe":"readyz","at":{}}}"#, fanout::time::now_ms());
    let result = match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        state
            .bus
            .log()
            .publish(&state.probe_channel, Bytes::from(probe), None),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("the stream does not take writes: {err}")),
        Err(_) => Err("the stream did not acknowledge a write within 2 s".to_string()),
    };
    *last = Some((std::time::Instant::now(), result.clone()));
    result
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let write = if state.bus.is_ready() {
        stream_takes_writes(&state).await
    } else {
        Err("NATS or the stream is not ready".to_string())
    };
    let ready = write.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "nats": state.bus.state(),
        "stream": state.bus.log().stream_name(),
        "stream_ready": state.bus.log().stream_ready(),
        "stream_writable": write.is_ok(),
    });
    if let Err(reason) = write {
        body["reason"] = json!(reason);
    }
    if let Some(regions) = state.bus.log().regions_report() {
        body["region"] = json!(state.bus.topology().region().map(|r| &**r));
        body["regions"] = regions;
    }
    (status, Json(body))
}
