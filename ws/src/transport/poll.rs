//! Long-polling: `GET /poll`, for clients that can hold neither a WebSocket nor a stream.
//!
//! Stateless between polls: the cursor carries where the client is on every channel, and
//! history comes from the stream, so successive polls may reach different nodes with no
//! stickiness, and a client that keeps polling with its cursor misses nothing within the
//! history window, whatever node dies in between. A poll answers at once when anything is
//! after its cursor, else waits (up to `timeout` seconds, at most 60) for the first event.
//!
//! A poll is a connection for as long as it waits: it subscribes like any other (live first,
//! then the history after its cursor, no gap and no duplicate between them), collecting into
//! an [`Outbox`] that keeps frames instead of writing them, and hidden from presence.
//!
//! A polling client has no session for its requests: `POST /request` ([`request`]) takes one
//! `publish`, `presence` or `ping` at a time, identified like a poll, within a request rate per
//! client IP.

use fanout::Code;
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json,
    body::{Body, to_bytes},
    extract::{ConnectInfo, RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde_json::{Value, value::RawValue};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    admit::{Admitted, Refusal, admit},
    connection::{self, Connection},
    sse::{self, Query},
};
use crate::{
    cursor::Positions,
    node::Node,
    position::{ChannelKey, Position},
    protocol::{self, Op, Rejection},
    session::{Bucket, ReplyTo, Session},
    sink::{Bounds, Framing, Kick, Outbox, Outgoing, Parts, Sink},
};

/// How long a poll waits when it does not say.
const DEFAULT_TIMEOUT: u64 = 25;
/// The longest a poll may ask to wait.
const MAX_TIMEOUT: u64 = 60;
/// Most events one answer carries (the next poll takes the rest).
const MAX_EVENTS: usize = 1000;

/// Long-poll framing: each event as its JSON, for the answer's `events` array; the positions
/// they leave the client at, for its `cursor`.
#[derive(Debug)]
pub struct JsonFraming {
    positions: Positions,
}

impl Framing for JsonFraming {
    const TRACKS_POSITIONS: bool = true;
    const TRANSPORT: &'static str = "long_poll";

    fn shared(&self, frame: &Outgoing) -> Bytes {
        frame.json().clone()
    }

    fn write(&mut self, key: ChannelKey, seq: u64, shared: Bytes, out: &mut Parts) {
        if seq != 0 {
            self.positions.advance(key, seq);
        }
        out.push(shared);
    }

    fn own(&mut self, _: &str, json: &str) -> Bytes {
        Bytes::copy_from_slice(json.as_bytes())
    }

    fn enter(&mut self, key: ChannelKey, name: &str) {
        self.positions.enter(key, name);
    }

    fn leave(&mut self, key: ChannelKey) {
        self.positions.leave(key);
    }

    fn position(&mut self, key: ChannelKey, position: Position) {
        self.positions.set(key, position);
    }
}

pub(crate) async fn poll(
    State(node): State<Arc<Node>>,
    State(shutdown): State<CancellationToken>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    match answer(
        &node,
        &shutdown,
        peer,
        &headers,
        Query::parse(raw.as_deref()),
    )
    .await
    {
        Ok(answer) => Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn answer(
    node: &Arc<Node>,
    shutdown: &CancellationToken,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: Query,
) -> Result<Answer, Refusal> {
    let timeout = match query.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(text) => match text.parse::<u64>() {
            Ok(secs) if secs <= MAX_TIMEOUT => secs,
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    Code::InvalidQuery,
                    format!("timeout must be a whole number of seconds, 0 to {MAX_TIMEOUT}"),
                ));
            }
        },
    };
    let Admitted { identity, permit } = admit(
        node,
        peer,
        headers,
        query.token.as_deref(),
        query.user.as_deref(),
        "long_poll",
    )
    .await?;
    // What the query names is what the poll follows; the cursor says where on each.
    let channels = sse::channels(
        node,
        &identity,
        &query.channels,
        query.cursor.as_deref(),
        false,
    )?;
    let Some(epoch) = node.known_epoch().await else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::BusUnavailable,
            "this node has not reached the stream yet: try again with the same cursor",
        ));
    };
    let starts = sse::starts(node, channels).await;
    let positions: Vec<_> = starts
        .iter()
        .map(|start| {
            let from = start.resume.as_ref().map(|r| r.from.clone());
            (start.channel.clone(), from.unwrap_or_default())
        })
        .collect();
    let framing = JsonFraming {
        positions: Positions::new(epoch, &positions, node.bus().topology().regions()),
    };
    let bounds = Bounds {
        frames: MAX_EVENTS,
        bytes: node.config().queue_max_bytes,
    };
    // Out of the hub again when it is dropped, whatever the answer.
    let poll = Connection::hidden(node.clone(), identity, framing, bounds);
    let mut resumed = Vec::new();
    let joined = poll
        .join_all(starts, |channel, recovered, replayed| {
            resumed.push(connection::resumed(channel, recovered, replayed));
        })
        .await;
    if let Err(err) = joined {
        // The client asks again with the same cursor: nothing it missed is skipped.
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::BusUnavailable,
            err.to_string(),
        ));
    }
    let outbox = &poll.outbox;
    if !outbox.has_kept() && timeout > 0 {
        // The first event, the timeout, or the node going away: whichever comes first.
        tokio::select! {
            _ = outbox.waiting() => {}
            _ = tokio::time::sleep(Duration::from_secs(timeout)) => {}
            _ = shutdown.cancelled() => {}
            _ = outbox.kick().token().cancelled() => {}
        }
    }
    let (events, cursor) = outbox.take(|framing| framing.positions.encode(fanout::time::now_ms()));
    // Closed by the app (or the node): the client is told why, as a stream's `disconnect`.
    let disconnect = outbox
        .kick()
        .token()
        .is_cancelled()
        .then(|| outbox.kick().reason().directed().json());
    drop(poll);
    drop(permit);
    let events = events
        .into_iter()
        .filter_map(|json| RawValue::from_string(String::from_utf8(json.to_vec()).ok()?).ok())
        .collect();
    Ok(Answer {
        events,
        cursor,
        resumed,
        disconnect,
    })
}

/// A poll's answer. The events are written as they are (their fields in protocol order).
#[derive(Debug, serde::Serialize)]
struct Answer {
    events: Vec<Box<RawValue>>,
    cursor: String,
    resumed: Vec<Value>,
    /// Why the poll was closed early (the app disconnected the user), as SSE's `disconnect`.
    #[serde(skip_serializing_if = "Option::is_none")]
    disconnect: Option<Value>,
}

/// Most client IPs whose request rate is remembered at once.
const MAX_RATES: usize = 10_000;

/// The request rates of stateless clients, one token bucket per IP:
/// `FANOUT_PUBLISH_RATE_PER_SEC` publishes and presence queries per second, as one connection
/// has. Bounded: the buckets of idle clients are forgotten when the table fills, and beyond
/// that requests are refused.
#[derive(Debug, Clone, Default)]
pub struct RequestRates(Arc<Mutex<HashMap<IpAddr, Bucket>>>);

impl RequestRates {
    fn take(&self, ip: IpAddr, rate: u32) -> bool {
        let mut rates = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if rates.len() >= MAX_RATES && !rates.contains_key(&ip) {
            rates.retain(|_, bucket| !bucket.is_full());
            if rates.len() >= MAX_RATES {
                return false;
            }
        }
        rates.entry(ip).or_insert_with(|| Bucket::new(rate)).take()
    }
}

/// `POST /request`: one request of a client without a live stream (a polling client),
/// `user`/`token` in the query (or `Authorization: Bearer <token>`), one protocol request as
/// the body: `publish`, `presence` or `ping`. The answer is `200` with its reply frame (an
/// error frame for a refused op, `unsupported_op` for ops that need a live stream), or a JSON
/// error as for a poll (401, 413, 429 `rate_limited`).
pub(crate) async fn request(
    State(node): State<Arc<Node>>,
    State(rates): State<RequestRates>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| token.trim().to_string());
    let token = query.token.or(bearer);
    let Admitted { identity, permit } = match admit(
        &node,
        peer,
        &headers,
        token.as_deref(),
        query.user.as_deref(),
        "long_poll",
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let limit = node.config().max_message_bytes;
    let Ok(body) = to_bytes(body, limit).await else {
        let message = format!("a request may be at most {limit} bytes (FANOUT_MAX_MESSAGE_BYTES)");
        return Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            message,
        )
        .into_response();
    };
    let reply = |json: String| {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response()
    };
    let text = String::from_utf8_lossy(&body);
    let request = match protocol::parse(&text) {
        Ok(request) => request,
        Err(rejection) => return reply(rejection.encode()),
    };
    let name = match &request.op {
        Op::Publish { .. } => "publish",
        Op::Presence { .. } => "presence",
        Op::Ping => "ping",
        Op::Subscribe { .. } => "subscribe",
        Op::Unsubscribe(_) => "unsubscribe",
        Op::Info { .. } => "info",
        Op::Refresh { .. } => "refresh",
        Op::Rpc { .. } => "rpc",
    };
    if !matches!(name, "publish" | "presence" | "ping" | "rpc") {
        let mut rejection = Rejection::new(
            Code::UnsupportedOp,
            format!(
                "{name:?} needs a live connection (WebSocket or SSE); a poll names its channels \
                 in its query"
            ),
        );
        rejection.op = Some(name.to_string());
        rejection.id = request.id;
        return reply(rejection.encode());
    }
    let rate = node.config().publish_rate_per_sec;
    if name != "ping" && !rates.take(peer.ip(), rate) {
        let message = format!(
            "at most {rate} publishes and presence queries per second from one address \
             (FANOUT_PUBLISH_RATE_PER_SEC)"
        );
        return Refusal::new(StatusCode::TOO_MANY_REQUESTS, Code::RateLimited, message)
            .into_response();
    }
    // A session for this one request, in no channel and hidden from presence.
    let kick = Kick::new(node.closing_token().child_token());
    let bounds = Bounds {
        frames: 1,
        bytes: node.config().queue_max_bytes,
    };
    let framing = JsonFraming {
        positions: Positions::new(node.epoch(), &[], &[]),
    };
    let outbox = Arc::new(Outbox::collecting(framing, kick, bounds));
    let mut session = Session::new(Uuid::new_v4(), node.clone(), outbox, identity);
    let (to, replied) = tokio::sync::oneshot::channel();
    session.act(request, ReplyTo::Caller(to)).await;
    let replied = replied.await;
    drop(permit);
    match replied {
        Ok(json) => reply(json),
        Err(_) => Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Internal,
            "the request got no reply",
        )
        .into_response(),
    }
}
