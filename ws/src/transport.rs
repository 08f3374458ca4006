//! The WebSocket transport: the axum routes, the upgrade, and one task per socket that reads
//! requests, writes queued frames in batches, and keeps the heartbeat. It knows WebSocket and
//! the [`Node`]'s API, not NATS.
//!
//! One task per connection (not a reader and a writer) keeps an idle connection small: the
//! socket, a bounded queue and a cancellation token. Every write races the connection's token,
//! so a client that stopped reading cannot hold its task once the hub has cut it off.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{
        ConnectInfo, Query, State, WebSocketUpgrade,
        rejection::QueryRejection,
        ws::{CloseFrame, Message, WebSocket, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use fanout::{Channel, telemetry};
use futures_util::SinkExt;
use metrics::{counter, gauge};
use serde_json::{json, value::RawValue};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    auth::Identity,
    disconnect::{self, Disconnect},
    hub::{ConnId, Kick, PRESENCE_SEQ, Profile, Queued, Recipient, SubscribeError},
    node::Node,
    protocol::{self, Frame, Op, Rejection, Request, Resumed},
};

/// Most queued frames written before one flush (one write syscall, as far as the buffer allows).
const MAX_BATCH: usize = 64;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
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
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return error(
                rejection.status(),
                "websocket_required",
                &rejection.body_text(),
            );
        }
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
    let Some(permit) = node.admit(peer.ip()) else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            &format!(
                "{} already holds {} connections (FANOUT_MAX_CONNECTIONS_PER_IP)",
                peer.ip(),
                node.config().max_connections_per_ip
            ),
        );
    };
    let config = node.config();
    let AppState { node, sockets } = state.clone();
    ws.read_buffer_size(config.ws_buffer_bytes)
        .write_buffer_size(config.ws_buffer_bytes)
        .max_message_size(config.max_message_bytes)
        .max_frame_size(config.max_message_bytes)
        // Upgraded sockets are invisible to axum's graceful shutdown (tokio-rs/axum#3003):
        // the tracker is how shutdown waits for them.
        .on_upgrade(move |socket| {
            let conn = Uuid::new_v4();
            let span = tracing::info_span!(target: telemetry::LOG_CONTEXT, "conn", node_id = %node.id(), %conn, user = %identity.user);
            sockets.track_future(
                async move {
                    serve(socket, node, conn, identity).await;
                    drop(permit);
                }
                .instrument(span),
            )
        })
}

/// How a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed, or the socket failed: nothing more to say.
    Gone,
    /// The node closes it with this code.
    Close(Disconnect),
}

async fn serve(mut socket: WebSocket, node: Arc<Node>, conn: ConnId, identity: Identity) {
    let kick = Kick::new(node.closing_token().child_token());
    let (queue, frames) = mpsc::channel(node.config().queue_capacity);
    let replies = queue.clone();
    let profile = Profile {
        user: identity.user.as_str().into(),
        info: identity
            .info
            .as_ref()
            .and_then(|info| serde_json::value::to_raw_value(info).ok()),
    };
    node.hub()
        .add_conn(conn, Recipient::new(queue, kick.clone()), profile);
    counter!("fanout_ws_connections_opened_total").increment(1);
    tracing::debug!("connected");
    let end = session(&mut socket, &node, conn, &kick, (replies, frames), identity).await;
    node.hub().remove_conn(conn);
    let reason = match &end {
        End::Gone => "client",
        End::Close(disconnect) => disconnect.name,
    };
    counter!("fanout_ws_connections_closed_total", "reason" => reason).increment(1);
    match end {
        End::Close(reason) => {
            tracing::debug!(code = reason.code, reason = reason.reason, "closing");
            let frame = CloseFrame {
                code: reason.code,
                reason: reason.reason.into(),
            };
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
        }
        End::Gone => {
            tracing::debug!("client went away");
            // Completes the closing handshake if the client started one.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close()).await;
        }
    }
}

/// What a connection's requests change.
struct Session {
    identity: Identity,
    replayed: Replayed,
    /// Publishes, info updates and presence queries.
    publish_budget: Bucket,
    /// Where answers computed off the connection's task go (presence): its own queue, so
    /// they are written in order with the events.
    replies: mpsc::Sender<Queued>,
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

/// Per channel, the seq up to which this connection already has the events (from a replay,
/// or before it resumed): queued live events up to it are skipped. Empty unless resumed.
type Replayed = HashMap<Channel, u64>;

/// The connection's life: welcome, then requests, queued frames and heartbeats until one
/// side ends it.
async fn session(
    socket: &mut WebSocket,
    node: &Arc<Node>,
    conn: ConnId,
    kick: &Kick,
    (replies, mut frames): (mpsc::Sender<Queued>, mpsc::Receiver<Queued>),
    identity: Identity,
) -> End {
    let config = node.config();
    let welcome = protocol::welcome(&protocol::Welcome {
        node: node.id(),
        conn: &conn.to_string(),
        user: &identity.user,
        heartbeat: config.heartbeat_secs,
        epoch: &node.epoch(),
    });
    if let Err(end) = send(socket, kick, Message::Text(welcome.into())).await {
        return end;
    }
    let heartbeat = config.heartbeat();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong = false;
    let mut state = Session {
        identity,
        replayed: Replayed::new(),
        publish_budget: Bucket::new(config.publish_rate_per_sec),
        replies,
        queries: None,
    };
    loop {
        let expiry = state.identity.expires_at.map(deadline);
        let step = tokio::select! {
            biased;
            _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
            _ = async { tokio::time::sleep_until(expiry.unwrap()).await }, if expiry.is_some() => {
                Err(End::Close(disconnect::TOKEN_EXPIRED))
            }
            incoming = socket.recv() => {
                awaiting_pong = false;
                // Boxed: answering a request may await a publish or a replay, whose futures are
                // large; inline they would sit in every idle connection's task (measured:
                // 13.2 instead of 8.7 KiB per connection).
                Box::pin(on_incoming(socket, node, conn, kick, incoming, &mut state)).await
            }
            Some(first) = frames.recv() => {
                write_frames(socket, kick, first, &mut frames, &state.replayed).await
            }
            _ = ticker.tick() => {
                if awaiting_pong {
                    Err(End::Close(disconnect::HEARTBEAT_TIMEOUT))
                } else {
                    awaiting_pong = true;
                    send(socket, kick, Message::Ping(Default::default())).await
                }
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

async fn on_incoming(
    socket: &mut WebSocket,
    node: &Arc<Node>,
    conn: ConnId,
    kick: &Kick,
    incoming: Option<Result<Message, axum::Error>>,
    state: &mut Session,
) -> Result<(), End> {
    let replies = match incoming {
        None | Some(Ok(Message::Close(_))) => return Err(End::Gone),
        Some(Err(err)) => return Err(read_error(err)),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
        Some(Ok(Message::Binary(_))) => vec![Frame::from(
            Rejection::new(
                "unsupported_frame",
                "binary frames are not supported; send JSON text frames",
            )
            .encode(),
        )],
        Some(Ok(Message::Text(text))) => answer(node, conn, &text, state).await,
    };
    let batch = async {
        for reply in replies {
            socket.feed(Message::Text(reply)).await?;
        }
        socket.flush().await
    };
    tokio::select! {
        sent = batch => sent.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}

/// A read error: an oversized frame gets 1009; anything else means the socket is gone.
fn read_error(err: axum::Error) -> End {
    let inner = err.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => End::Close(disconnect::MESSAGE_TOO_BIG),
        _ => {
            tracing::debug!(err = %inner, "read failed");
            End::Gone
        }
    }
}

/// Acts on one request and returns the frames to send: the reply, then (for a resuming
/// `subscribe`) the replayed events.
async fn answer(node: &Arc<Node>, conn: ConnId, text: &str, state: &mut Session) -> Vec<Frame> {
    let Session {
        identity,
        replayed,
        publish_budget,
        replies,
        queries,
    } = state;
    let Request { id, op } = match protocol::parse(text) {
        Ok(request) => request,
        Err(rejection) => return vec![rejection.encode().into()],
    };
    let reject = |code, message: String, op: &str| {
        let mut rejection = Rejection::new(code, message);
        rejection.op = Some(op.to_string());
        rejection.id = id.clone();
        vec![Frame::from(rejection.encode())]
    };
    match op {
        Op::Ping => vec![protocol::pong(id.as_ref()).into()],
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
            if let Err(err) = node.subscribe(conn, &channel, presence).await {
                let code = match err {
                    SubscribeError::TooMany(_) => "too_many_subscriptions",
                    SubscribeError::UnknownConn => "internal",
                };
                return reject(code, err.to_string(), "subscribe");
            }
            let Some(since) = since else {
                return vec![protocol::subscribed(&channel, id.as_ref(), None).into()];
            };
            // Live events are queued from here on; the replay covers what came before, and
            // the queue skips what the replay (or the client) already has.
            let replay = node.replay(&channel, since, epoch.as_deref()).await;
            let resumed = Resumed {
                recovered: replay.recovered,
                replayed: replay.events.len(),
                epoch: &replay.epoch,
            };
            let mut frames =
                vec![protocol::subscribed(&channel, id.as_ref(), Some(resumed)).into()];
            let with_trace = node.config().event_trace_id;
            frames.extend(
                replay
                    .events
                    .iter()
                    .filter_map(|event| protocol::event(event, with_trace).ok()),
            );
            match replay.skip_upto {
                Some(upto) => replayed.insert(channel, upto),
                None => replayed.remove(&channel),
            };
            frames
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
                    vec![
                        protocol::published(&channel, published.seq, &published.id, id.as_ref())
                            .into(),
                    ]
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
            let (node, replies) = (node.clone(), replies.clone());
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
                    let reply = Queued {
                        channel,
                        seq: PRESENCE_SEQ,
                        frame: frame.into(),
                    };
                    // Fails only when the connection is gone.
                    let _ = replies.send(reply).await;
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
            vec![reply.into()]
        }
        Op::Refresh { token } => match node.verifier().identify(Some(&token), None) {
            Ok(fresh) if fresh.user == identity.user => {
                *identity = fresh;
                vec![protocol::refreshed(identity.expires_at, id.as_ref()).into()]
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
            replayed.remove(&channel);
            vec![protocol::unsubscribed(&channel, id.as_ref()).into()]
        }
    }
}

/// Sends one message, unless the connection is cut off first.
async fn send(socket: &mut WebSocket, kick: &Kick, message: Message) -> Result<(), End> {
    tokio::select! {
        sent = socket.send(message) => sent.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}

/// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]) with one flush, leaving
/// out events the connection already got from a replay.
async fn write_frames(
    socket: &mut WebSocket,
    kick: &Kick,
    first: Queued,
    frames: &mut mpsc::Receiver<Queued>,
    replayed: &Replayed,
) -> Result<(), End> {
    let fresh = |queued: &Queued| {
        queued.seq == PRESENCE_SEQ
            || replayed
                .get(&queued.channel)
                .is_none_or(|&upto| queued.seq > upto)
    };
    let batch = async {
        let mut written = 0;
        let mut next = Some(first);
        while let Some(queued) = next.take() {
            if fresh(&queued) {
                socket.feed(Message::Text(queued.frame)).await?;
                written += 1;
            }
            if written < MAX_BATCH {
                next = frames.try_recv().ok();
            }
        }
        socket.flush().await
    };
    tokio::select! {
        written = batch => written.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}
