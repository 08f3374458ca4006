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

use std::{net::SocketAddr, time::Duration};

use axum::{
    Json,
    extract::{ConnectInfo, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde_json::{Value, json, value::RawValue};
use uuid::Uuid;

use super::{
    Admitted, AppState, Refusal, admit,
    sse::{self, Query, Start},
};
use crate::{
    cursor::{Position, Positions},
    session::Session,
    sink::{Bounds, ChannelKey, Framing, Kick, Outbox, Outgoing, Parts, Sink},
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

    fn shared(frame: &Outgoing) -> Bytes {
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
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    match answer(&state, peer, &headers, Query::parse(raw.as_deref())).await {
        Ok(answer) => Json(answer).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn answer(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: Query,
) -> Result<Answer, Refusal> {
    let node = &state.node;
    let timeout = match query.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(text) => match text.parse::<u64>() {
            Ok(secs) if secs <= MAX_TIMEOUT => secs,
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
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
    )?;
    // What the query names is what the poll follows; the cursor says where on each.
    let channels = sse::channels(
        node,
        &identity,
        &query.channels,
        query.cursor.as_deref(),
        false,
    )?;
    let starts = sse::starts(node, channels).await;
    let positions: Vec<_> = starts
        .iter()
        .map(|start| (start.channel.clone(), start.resume.as_ref().map(|r| r.from)))
        .collect();
    let framing = JsonFraming {
        positions: Positions::new(node.epoch(), &positions),
    };
    let config = node.config();
    let bounds = Bounds {
        frames: MAX_EVENTS,
        bytes: config.queue_max_bytes,
    };
    let kick = Kick::new(node.closing_token().child_token());
    let outbox = std::sync::Arc::new(Outbox::collecting(framing, kick, bounds));
    let conn = Uuid::new_v4();
    node.hub().add_hidden_conn(conn, outbox.clone());
    let session = Session::new(conn, node.clone(), outbox.clone(), identity);
    let mut resumed = Vec::new();
    for Start {
        channel,
        resume,
        resuming,
    } in starts
    {
        let joined = session
            .join(&channel, resume, |replay| {
                if let Some(replay) = replay.filter(|_| resuming) {
                    resumed.push(json!({
                        "channel": channel,
                        "recovered": replay.recovered,
                        "replayed": replay.events.len(),
                    }));
                }
            })
            .await;
        if let Err(err) = joined {
            tracing::warn!(%channel, %err, "cannot follow a poll's channel");
        }
    }
    if !outbox.has_kept() && timeout > 0 {
        // The first event, the timeout, or the node going away: whichever comes first.
        tokio::select! {
            _ = outbox.waiting() => {}
            _ = tokio::time::sleep(Duration::from_secs(timeout)) => {}
            _ = state.shutdown.cancelled() => {}
            _ = outbox.kick().token().cancelled() => {}
        }
    }
    let (events, cursor) = outbox.take(|framing| framing.positions.cursor());
    node.hub().remove_conn(conn);
    drop(permit);
    let events = events
        .into_iter()
        .filter_map(|json| RawValue::from_string(String::from_utf8(json.to_vec()).ok()?).ok())
        .collect();
    Ok(Answer {
        events,
        cursor: cursor.encode(),
        resumed,
    })
}

/// A poll's answer. The events are written as they are (their fields in protocol order).
#[derive(Debug, serde::Serialize)]
struct Answer {
    events: Vec<Box<RawValue>>,
    cursor: String,
    resumed: Vec<Value>,
}
