//! The WebSocket transport: the axum routes, the upgrade, and one task per socket that reads
//! requests, answers them and keeps the heartbeat. It knows WebSocket and the [`Node`]'s API,
//! not NATS.
//!
//! The upgrade is done here rather than by a WebSocket library, so that the connection's
//! socket can be shared: fan-out writes events into it directly ([`Outbox`]), and the
//! connection's task only reads, answers, and writes out what the socket could not take at
//! once. An idle connection is its task, its socket and a few hub entries: no read or write
//! buffers are kept while nothing is in flight.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{
        ConnectInfo, Query, Request as HttpRequest, State, connect_info::Connected,
        rejection::QueryRejection,
    },
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
    serve::IncomingStream,
};
use bytes::Bytes;
use fanout::telemetry;
use hyper_util::rt::TokioIo;
use metrics::{counter, gauge};
use serde_json::{json, value::RawValue};
use std::collections::HashMap;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    auth::Identity,
    disconnect::{self, Disconnect},
    frame::{self, Decoder, FrameError, Incoming},
    hub::{ConnId, Kick, Profile, SubscribeError},
    node::Node,
    outbox::{Outbox, channel_key},
    protocol::{self, Op, Rejection, Request, Resumed},
};

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the node knows of a TCP connection when a request arrives on it: the peer's address,
/// and a duplicate of the socket that `/ws` takes to write to it directly. (The HTTP server
/// keeps the original until the upgrade hands it over; then it is closed.)
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    socket: Arc<Mutex<Option<OwnedFd>>>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            socket: Arc::new(Mutex::new(stream.io().as_fd().try_clone_to_owned().ok())),
        }
    }
}

impl Peer {
    fn take_socket(&self) -> Option<OwnedFd> {
        self.socket.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[derive(Debug, Clone)]
struct AppState {
    node: Arc<Node>,
    sockets: TaskTracker,
}

/// The node's HTTP surface: `/ws`, `/healthz`, `/readyz`.
pub fn router(node: Arc<Node>, sockets: TaskTracker) -> Router {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/debug/state", get(debug_state))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(AppState { node, sockets })
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let ready = node.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "node": node.id(),
        "nats": node.nats_state(),
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    gauge!("fanout_nats_connected").set(if state.node.bus().is_connected() {
        1.0
    } else {
        0.0
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render_metrics(),
    )
        .into_response()
}

/// What an operator looks at instead of attaching a debugger.
async fn debug_state(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let channels: Vec<_> = node
        .hub()
        .channels()
        .into_iter()
        .map(|(channel, subscribers)| json!({"channel": channel, "subscribers": subscribers}))
        .collect();
    Json(json!({
        "node": node.id(),
        "uptime_secs": node.uptime().as_secs(),
        "connections": node.hub().connections(),
        "channels": channels,
        "nats": {
            "state": node.nats_state(),
            "stream": node.bus().stream_name(),
            "stream_ready": node.bus().stream_ready(),
        },
    }))
    .into_response()
}

async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    mut request: HttpRequest,
) -> Response {
    let Query(params) = match params {
        Ok(params) => params,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                &rejection.body_text(),
            );
        }
    };
    let key = match handshake(request.method(), &headers) {
        Ok(key) => key,
        Err((status, message)) => return error(status, "websocket_required", message),
    };
    let node = &state.node;
    let origins = node.config().origins();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
        if !origins.is_empty() && !origins.iter().any(|allowed| allowed == origin) {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                &format!("origin {origin:?} may not connect (FANOUT_ALLOWED_ORIGINS)"),
            );
        }
    }
    let identity = match node.verifier().identify(
        params.get("token").map(String::as_str),
        params.get("user").map(String::as_str),
    ) {
        Ok(identity) => identity,
        Err(err) => {
            counter!("fanout_ws_auth_failures_total", "code" => err.code).increment(1);
            return error(StatusCode::UNAUTHORIZED, err.code, &err.message);
        }
    };
    let Some(permit) = node.admit(peer.addr.ip()) else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            &format!(
                "{} already holds {} connections (FANOUT_MAX_CONNECTIONS_PER_IP)",
                peer.addr.ip(),
                node.config().max_connections_per_ip
            ),
        );
    };
    let (Some(on_upgrade), Some(socket)) = (
        request
            .extensions_mut()
            .remove::<hyper::upgrade::OnUpgrade>(),
        peer.take_socket(),
    ) else {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this connection cannot be upgraded",
        );
    };
    let AppState { node, sockets } = state.clone();
    let conn = Uuid::new_v4();
    // A connection logs only at debug level; its span (entered on every poll) exists only
    // when those logs are on.
    let span = if tracing::enabled!(target: "fanout_ws", tracing::Level::DEBUG) {
        tracing::info_span!(target: telemetry::LOG_CONTEXT, "conn", node_id = %node.id(), %conn, user = %identity.user)
    } else {
        tracing::Span::none()
    };
    // Upgraded sockets are invisible to axum's graceful shutdown (tokio-rs/axum#3003): the
    // tracker is how shutdown waits for them.
    let fut = sockets.track_future(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => serve(upgraded, socket, node, conn, identity).await,
                Err(err) => tracing::debug!(%err, "upgrade failed"),
            }
            drop(permit);
        }
        .instrument(span),
    );
    tokio::spawn(fut);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(&key))
        .body(Body::empty())
        .expect("a valid response")
}

/// The `Sec-WebSocket-Accept` answer to a `Sec-WebSocket-Key` (RFC 6455 4.2.2): the base64
/// of the SHA-1 of the key and the protocol's GUID.
fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = Sha1::new()
        .chain_update(key.as_bytes())
        .chain_update(GUID)
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Checks an upgrade request (RFC 6455 4.2.1); returns its `Sec-WebSocket-Key`.
fn handshake(method: &Method, headers: &HeaderMap) -> Result<String, (StatusCode, &'static str)> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .unwrap_or_default()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    if method != Method::GET {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade must be a GET",
        ));
    }
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err((
            StatusCode::BAD_REQUEST,
            "this endpoint speaks WebSocket: send Connection: upgrade and Upgrade: websocket",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13"));
    }
    match headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) if !key.is_empty() => Ok(key.to_string()),
        _ => Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing")),
    }
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The socket failed or the client vanished: nothing more to say.
    Gone,
    /// The client sent a close frame (with this code): answer it.
    ClientClosed(Option<u16>),
    /// The node closes it with this code.
    Close(Disconnect),
}

/// Reads what the HTTP server had already read past the handshake (a client may send its
/// first frames right behind it). Returns false if the client is already gone.
fn take_read_ahead(
    upgraded: &mut TokioIo<hyper::upgrade::Upgraded>,
    decoder: &mut Decoder,
) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut chunk = [0u8; 1024];
    loop {
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut *upgraded).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return false,
            Poll::Ready(Ok(())) => decoder.buf.extend_from_slice(buf.filled()),
            Poll::Ready(Err(_)) => return false,
            Poll::Pending => return true,
        }
    }
}

async fn serve(
    upgraded: hyper::upgrade::Upgraded,
    socket: OwnedFd,
    node: Arc<Node>,
    conn: ConnId,
    identity: Identity,
) {
    let mut decoder = Decoder::default();
    let mut upgraded = TokioIo::new(upgraded);
    let open = take_read_ahead(&mut upgraded, &mut decoder);
    // From here on the duplicate is the socket: the HTTP server's copy is closed.
    drop(upgraded);
    let stream = std::net::TcpStream::from(socket);
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(stream))
    {
        Ok(stream) if open => stream,
        Ok(_) => return,
        Err(err) => return tracing::warn!(%err, "cannot take over an upgraded socket"),
    };
    let _ = stream.set_nodelay(true);
    let kick = Kick::new(node.closing_token().child_token());
    let outbox = Arc::new(Outbox::new(
        stream,
        kick.clone(),
        node.config().queue_capacity,
    ));
    let profile = Profile {
        user: identity.user.as_str().into(),
        info: identity
            .info
            .as_ref()
            .and_then(|info| serde_json::value::to_raw_value(info).ok()),
    };
    node.hub().add_conn(conn, outbox.clone(), profile);
    counter!("fanout_ws_connections_opened_total").increment(1);
    tracing::debug!("connected");
    let end = session(&outbox, &mut decoder, &node, conn, identity).await;
    node.hub().remove_conn(conn);
    let reason = match &end {
        End::Gone | End::ClientClosed(_) => "client",
        End::Close(disconnect) => disconnect.name,
    };
    counter!("fanout_ws_connections_closed_total", "reason" => reason).increment(1);
    let close = match end {
        End::Gone => None,
        End::ClientClosed(code) => {
            tracing::debug!(?code, "client closed");
            // Echo the client's code when it is one that may be sent (RFC 6455 7.4).
            let code = code
                .filter(|c| matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999))
                .unwrap_or(1000);
            Some(frame::close(code, ""))
        }
        End::Close(reason) => {
            tracing::debug!(code = reason.code, reason = reason.reason, "closing");
            Some(frame::close(reason.code, reason.reason))
        }
    };
    if let Some(close) = close {
        outbox.send(close);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, outbox.flush()).await;
    }
    // Presence answers in flight may still hold the outbox: close the socket now.
    if let Some(stream) = outbox.stream() {
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
    }
}

/// What a connection's requests change.
struct Session {
    identity: Identity,
    /// Publishes, info updates and presence queries.
    publish_budget: Bucket,
    /// Presence queries in flight; created on the first one.
    queries: Option<Arc<tokio::sync::Semaphore>>,
}

/// Most presence queries one connection may have in flight.
const MAX_QUERIES: usize = 4;

/// A token bucket: `rate` per second, bursts up to `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: tokio::time::Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The instant a unix time (seconds) falls at.
fn deadline(unix_secs: u64) -> tokio::time::Instant {
    let left = unix_secs.saturating_sub(fanout::time::now_ms() / 1000);
    tokio::time::Instant::now() + Duration::from_secs(left)
}

/// Reads what the socket has into the decoder, through a buffer on the stack: an idle
/// connection keeps no read buffer (a 4 KiB one per connection, reserved for a read that
/// found nothing, was half of an idle connection's memory).
fn read_into(stream: &tokio::net::TcpStream, decoder: &mut Decoder) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = stream.try_read(&mut chunk)?;
    decoder.buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Bytes read per system call.
const READ_CHUNK: usize = 4096;

/// What woke a connection's task.
enum Wake {
    Kicked,
    Expired,
    /// Frames wait for the socket.
    Backlog,
    Readable(std::io::Result<()>),
    Tick,
}

/// Sends `frames` and waits until they are written, unless the connection is cut off first.
async fn reply(outbox: &Outbox, frames: impl IntoIterator<Item = Bytes>) -> Result<(), End> {
    for frame in frames {
        outbox.send(frame);
    }
    if outbox.is_written() {
        return Ok(());
    }
    // Boxed: only a connection whose socket is full waits here; inline, the wait would take
    // room in every connection's task.
    Box::pin(flush(outbox)).await
}

async fn flush(outbox: &Outbox) -> Result<(), End> {
    let kick = outbox.kick();
    tokio::select! {
        biased;
        written = outbox.flush() => written.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}

/// The connection's life: welcome, then requests and heartbeats until one side ends it.
/// Events do not pass through here: fan-out writes them.
async fn session(
    outbox: &Arc<Outbox>,
    decoder: &mut Decoder,
    node: &Arc<Node>,
    conn: ConnId,
    identity: Identity,
) -> End {
    let config = node.config();
    let kick = outbox.kick();
    let Some(stream) = outbox.stream() else {
        return End::Gone;
    };
    let welcome = protocol::welcome(&protocol::Welcome {
        node: node.id(),
        conn: &conn.to_string(),
        user: &identity.user,
        heartbeat: config.heartbeat_secs,
        epoch: &node.epoch(),
    });
    if let Err(end) = reply(outbox, [frame::text(&welcome)]).await {
        return end;
    }
    let heartbeat = config.heartbeat();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong = false;
    let mut state = Session {
        identity,
        publish_budget: Bucket::new(config.publish_rate_per_sec),
        queries: None,
    };
    let cancelled = kick.token().cancelled();
    tokio::pin!(cancelled);
    let mut expires_at = state.identity.expires_at;
    let mut expiry = expires_at.map(|at| Box::pin(tokio::time::sleep_until(deadline(at))));
    loop {
        // Whole messages already read come first.
        loop {
            let message = match decoder.next(config.max_message_bytes) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(FrameError::TooBig(_)) => return End::Close(disconnect::MESSAGE_TOO_BIG),
                Err(FrameError::InvalidUtf8) => return End::Close(disconnect::INVALID_DATA),
                Err(FrameError::Protocol(why)) => {
                    tracing::debug!(why, "protocol error");
                    return End::Close(disconnect::PROTOCOL_ERROR);
                }
            };
            awaiting_pong = false;
            let step = match message {
                Incoming::Text(text) => {
                    // Boxed: answering may await a publish or a replay, whose futures are
                    // large; inline they would sit in every idle connection's task.
                    let frames = Box::pin(answer(node, outbox, conn, &text, &mut state)).await;
                    reply(outbox, frames.iter().map(|f| frame::text(f))).await
                }
                Incoming::Binary => {
                    let rejection = Rejection::new(
                        "unsupported_frame",
                        "binary frames are not supported; send JSON text frames",
                    );
                    reply(outbox, [frame::text(&rejection.encode())]).await
                }
                Incoming::Ping(payload) => reply(outbox, [frame::pong(&payload)]).await,
                Incoming::Pong => Ok(()),
                Incoming::Close(code) => Err(End::ClientClosed(code)),
            };
            if let Err(end) = step {
                return end;
            }
            if state.identity.expires_at != expires_at {
                // A refresh moved the deadline.
                expires_at = state.identity.expires_at;
                expiry = expires_at.map(|at| Box::pin(tokio::time::sleep_until(deadline(at))));
            }
        }
        let wake = tokio::select! {
            biased;
            _ = &mut cancelled => Wake::Kicked,
            _ = async { expiry.as_mut().unwrap().await }, if expiry.is_some() => Wake::Expired,
            _ = outbox.waiting() => Wake::Backlog,
            readable = stream.readable() => Wake::Readable(readable),
            _ = ticker.tick() => Wake::Tick,
        };
        let step = match wake {
            Wake::Kicked => Err(End::Close(kick.reason())),
            Wake::Expired => Err(End::Close(disconnect::TOKEN_EXPIRED)),
            Wake::Backlog => Box::pin(flush(outbox)).await,
            Wake::Readable(Err(_)) => Err(End::Gone),
            Wake::Readable(Ok(())) => match read_into(stream, decoder) {
                Ok(0) => Err(End::Gone),
                Ok(_) => Ok(()),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                Err(_) => Err(End::Gone),
            },
            Wake::Tick => {
                if awaiting_pong {
                    Err(End::Close(disconnect::HEARTBEAT_TIMEOUT))
                } else {
                    awaiting_pong = true;
                    reply(outbox, [frame::ping()]).await
                }
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

/// Acts on one request and returns the frames to send (the reply). A resuming `subscribe`
/// writes its reply and the replayed events itself, ahead of the live events it held back.
async fn answer(
    node: &Arc<Node>,
    outbox: &Arc<Outbox>,
    conn: ConnId,
    text: &str,
    state: &mut Session,
) -> Vec<String> {
    let Session {
        identity,
        publish_budget,
        queries,
    } = state;
    let Request { id, op } = match protocol::parse(text) {
        Ok(request) => request,
        Err(rejection) => return vec![rejection.encode()],
    };
    let reject = |code, message: String, op: &str| {
        let mut rejection = Rejection::new(code, message);
        rejection.op = Some(op.to_string());
        rejection.id = id.clone();
        vec![rejection.encode()]
    };
    match op {
        Op::Ping => vec![protocol::pong(id.as_ref())],
        Op::Subscribe { channel, .. } if !identity.may_subscribe(&channel) => reject(
            "forbidden",
            format!("your token does not allow subscribing to {channel:?}"),
            "subscribe",
        ),
        Op::Subscribe {
            channel,
            presence: true,
            ..
        } if channel.is_broadcast() => reject(
            "reserved_channel",
            "\"broadcast\" reaches every connection; it has no presence".into(),
            "subscribe",
        ),
        Op::Subscribe {
            channel,
            since,
            epoch,
            presence,
        } => {
            // Live frames wait from here until `subscribed` (and a replay) is written, behind
            // it: the protocol promises `subscribed` before any frame of the channel.
            outbox.hold();
            if let Err(err) = node.subscribe(conn, &channel, presence).await {
                outbox.release_held();
                let code = match err {
                    SubscribeError::TooMany(_) => "too_many_subscriptions",
                    SubscribeError::UnknownConn => "internal",
                };
                return reject(code, err.to_string(), "subscribe");
            }
            let Some(since) = since else {
                outbox.send(frame::text(&protocol::subscribed(
                    &channel,
                    id.as_ref(),
                    None,
                )));
                outbox.release_held();
                return Vec::new();
            };
            let replay = node.replay(&channel, since, epoch.as_deref()).await;
            let resumed = Resumed {
                recovered: replay.recovered,
                replayed: replay.events.len(),
                epoch: &replay.epoch,
            };
            outbox.send(frame::text(&protocol::subscribed(
                &channel,
                id.as_ref(),
                Some(resumed),
            )));
            let with_trace = node.config().event_trace_id;
            for event in &replay.events {
                if let Ok(event) = protocol::event(event, with_trace) {
                    outbox.send(frame::text(&event));
                }
            }
            // The held live events follow, without those the replay (or the client) has.
            outbox.release(channel_key(channel.as_str()), replay.skip_upto);
            Vec::new()
        }
        Op::Publish { channel, .. } if !identity.may_publish(&channel) => reject(
            "forbidden",
            format!("your token does not allow publishing to {channel:?}"),
            "publish",
        ),
        Op::Publish { .. } if !publish_budget.take() => reject(
            "rate_limited",
            format!(
                "at most {} publishes per second (FANOUT_PUBLISH_RATE_PER_SEC)",
                node.config().publish_rate_per_sec
            ),
            "publish",
        ),
        Op::Publish { channel, data } => {
            let data = serde_json::to_vec(&data).expect("a JSON value serializes");
            match node.publish(&channel, data.into()).await {
                Ok(published) => {
                    counter!("fanout_ws_client_publishes_total").increment(1);
                    vec![protocol::published(
                        &channel,
                        published.seq,
                        &published.id,
                        id.as_ref(),
                    )]
                }
                Err(err) => reject("bus_unavailable", err.to_string(), "publish"),
            }
        }
        Op::Presence { channel, .. } if channel.is_broadcast() => reject(
            "reserved_channel",
            "\"broadcast\" reaches every connection; it has no presence".into(),
            "presence",
        ),
        Op::Presence { channel, .. } if !identity.may_subscribe(&channel) => reject(
            "forbidden",
            format!("your token does not allow subscribing to {channel:?}"),
            "presence",
        ),
        Op::Presence { .. } | Op::Info { .. } if !publish_budget.take() => reject(
            "rate_limited",
            format!(
                "at most {} publishes, info updates and presence queries per second \
                 (FANOUT_PUBLISH_RATE_PER_SEC)",
                node.config().publish_rate_per_sec
            ),
            if matches!(op, Op::Info { .. }) {
                "info"
            } else {
                "presence"
            },
        ),
        Op::Presence {
            channel,
            count_only,
        } => {
            // A query may wait for a slow node (up to the query timeout): answer it off this
            // task, so events keep flowing meanwhile.
            let in_flight =
                queries.get_or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES)));
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                return reject(
                    "too_many_requests",
                    format!("at most {MAX_QUERIES} presence queries in flight per connection"),
                    "presence",
                );
            };
            let (node, outbox) = (node.clone(), outbox.clone());
            tokio::spawn(
                async move {
                    let frame = match node.presence(&channel, count_only).await {
                        Ok(answer) => protocol::presence(&answer, id.as_ref()),
                        Err(err) => {
                            let mut rejection = Rejection::new("bus_unavailable", err.to_string());
                            rejection.op = Some("presence".into());
                            rejection.id = id;
                            rejection.encode()
                        }
                    };
                    // In order with whatever else is written to the connection.
                    outbox.send(frame::text(&frame));
                    drop(permit);
                }
                .in_current_span(),
            );
            Vec::new()
        }
        Op::Info { info } => {
            let info = info.and_then(|info| RawValue::from_string(info).ok());
            let reply = protocol::info_updated(info.as_deref(), id.as_ref());
            node.set_info(conn, info);
            vec![reply]
        }
        Op::Refresh { token } => match node.verifier().identify(Some(&token), None) {
            Ok(fresh) if fresh.user == identity.user => {
                *identity = fresh;
                vec![protocol::refreshed(identity.expires_at, id.as_ref())]
            }
            Ok(_) => reject(
                "invalid_token",
                "the new token is for another user".into(),
                "refresh",
            ),
            Err(err) => reject(err.code, err.message, "refresh"),
        },
        Op::Unsubscribe(channel) if channel.is_broadcast() => reject(
            "reserved_channel",
            "every connection receives \"broadcast\"; it cannot be unsubscribed".into(),
            "unsubscribe",
        ),
        Op::Unsubscribe(channel) => {
            node.unsubscribe(conn, &channel);
            outbox.release(channel_key(channel.as_str()), None);
            vec![protocol::unsubscribed(&channel, id.as_ref())]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_publish_budget_is_a_burst_then_a_rate() {
        let mut bucket = Bucket::new(3);
        assert!((0..3).all(|_| bucket.take()), "a full burst");
        assert!(!bucket.take());
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!bucket.take(), "0.9 of a token");
        tokio::time::advance(Duration::from_millis(40)).await;
        assert!(bucket.take(), "one token per third of a second");
        assert!(!bucket.take());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            (0..5).filter(|_| bucket.take()).count(),
            3,
            "never more than a burst"
        );
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
