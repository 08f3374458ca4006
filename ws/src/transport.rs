//! The WebSocket transport: the axum routes, the upgrade, and one task per socket that reads
//! requests, writes queued frames in batches, and keeps the heartbeat. It knows WebSocket and
//! the [`Node`]'s API, not NATS.
//!
//! One task per connection (not a reader and a writer) keeps an idle connection small: the
//! socket, a bounded queue and a cancellation token. Every write races the connection's token,
//! so a client that stopped reading cannot hold its task once the hub has cut it off.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{
        State, WebSocketUpgrade,
        ws::{CloseFrame, Message, WebSocket, rejection::WebSocketUpgradeRejection},
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use fanout::telemetry;
use futures_util::SinkExt;
use metrics::{counter, gauge};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    disconnect::{self, Disconnect},
    hub::{ConnId, Kick, Recipient, SubscribeError},
    node::Node,
    protocol::{self, Frame, Op, Rejection, Request},
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
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
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
    let config = state.node.config();
    let AppState { node, sockets } = state.clone();
    ws.read_buffer_size(config.ws_buffer_bytes)
        .write_buffer_size(config.ws_buffer_bytes)
        .max_message_size(config.max_message_bytes)
        .max_frame_size(config.max_message_bytes)
        // Upgraded sockets are invisible to axum's graceful shutdown (tokio-rs/axum#3003):
        // the tracker is how shutdown waits for them.
        .on_upgrade(move |socket| {
            let conn = Uuid::new_v4();
            let span = tracing::info_span!(target: telemetry::LOG_CONTEXT, "conn", node_id = %node.id(), %conn);
            sockets.track_future(serve(socket, node, conn).instrument(span))
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

async fn serve(mut socket: WebSocket, node: Arc<Node>, conn: ConnId) {
    let kick = Kick::new(node.shutdown_token().child_token());
    let (queue, frames) = mpsc::channel(node.config().queue_capacity);
    node.hub()
        .add_conn(conn, Recipient::new(queue, kick.clone()));
    counter!("fanout_ws_connections_opened_total").increment(1);
    tracing::debug!("connected");
    let end = session(&mut socket, &node, conn, &kick, frames).await;
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

/// The connection's life: welcome, then requests, queued frames and heartbeats until one
/// side ends it.
async fn session(
    socket: &mut WebSocket,
    node: &Node,
    conn: ConnId,
    kick: &Kick,
    mut frames: mpsc::Receiver<Frame>,
) -> End {
    let config = node.config();
    let welcome = protocol::welcome(node.id(), &conn.to_string(), config.heartbeat_secs);
    if let Err(end) = send(socket, kick, Message::Text(welcome.into())).await {
        return end;
    }
    let heartbeat = config.heartbeat();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong = false;
    loop {
        let step = tokio::select! {
            biased;
            _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
            incoming = socket.recv() => {
                awaiting_pong = false;
                on_incoming(socket, node, conn, kick, incoming).await
            }
            Some(first) = frames.recv() => write_frames(socket, kick, first, &mut frames).await,
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
    node: &Node,
    conn: ConnId,
    kick: &Kick,
    incoming: Option<Result<Message, axum::Error>>,
) -> Result<(), End> {
    let reply = match incoming {
        None | Some(Ok(Message::Close(_))) => return Err(End::Gone),
        Some(Err(err)) => return Err(read_error(err)),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
        Some(Ok(Message::Binary(_))) => Rejection::new(
            "unsupported_frame",
            "binary frames are not supported; send JSON text frames",
        )
        .encode(),
        Some(Ok(Message::Text(text))) => answer(node, conn, &text).await,
    };
    send(socket, kick, Message::Text(reply.into())).await
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

/// Acts on one request and returns the reply frame.
async fn answer(node: &Node, conn: ConnId, text: &str) -> String {
    let Request { id, op } = match protocol::parse(text) {
        Ok(request) => request,
        Err(rejection) => return rejection.encode(),
    };
    let reject = |code, message: String, op: &str| {
        let mut rejection = Rejection::new(code, message);
        rejection.op = Some(op.to_string());
        rejection.id = id.clone();
        rejection.encode()
    };
    match op {
        Op::Ping => protocol::pong(id.as_ref()),
        Op::Subscribe(channel) => match node.subscribe(conn, &channel).await {
            Ok(()) => protocol::channel_reply("subscribed", &channel, id.as_ref()),
            Err(err @ SubscribeError::TooMany(_)) => {
                reject("too_many_subscriptions", err.to_string(), "subscribe")
            }
            Err(err @ SubscribeError::UnknownConn) => {
                reject("internal", err.to_string(), "subscribe")
            }
        },
        Op::Unsubscribe(channel) if channel.is_broadcast() => reject(
            "reserved_channel",
            "every connection receives \"broadcast\"; it cannot be unsubscribed".into(),
            "unsubscribe",
        ),
        Op::Unsubscribe(channel) => {
            node.unsubscribe(conn, &channel);
            protocol::channel_reply("unsubscribed", &channel, id.as_ref())
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

/// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]) with one flush.
async fn write_frames(
    socket: &mut WebSocket,
    kick: &Kick,
    first: Frame,
    frames: &mut mpsc::Receiver<Frame>,
) -> Result<(), End> {
    let batch = async {
        socket.feed(Message::Text(first)).await?;
        for _ in 1..MAX_BATCH {
            let Ok(frame) = frames.try_recv() else { break };
            socket.feed(Message::Text(frame)).await?;
        }
        socket.flush().await
    };
    tokio::select! {
        written = batch => written.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}
