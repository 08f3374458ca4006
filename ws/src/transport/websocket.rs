//! The WebSocket transport: `GET /ws`, the upgrade, and one task per socket that reads
//! requests, hands them to the connection's [`Session`], and keeps the heartbeat.
//!
//! The upgrade is done here rather than by a WebSocket library, so that the connection's
//! socket can be shared: fan-out writes events into it directly ([`Outbox`]), and the
//! connection's task only reads, answers, and writes out what the socket could not take at
//! once. An idle connection is its task, its socket and a few hub entries: no read or write
//! buffers are kept while nothing is in flight.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{ConnectInfo, Query, Request, State, rejection::QueryRejection},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use metrics::counter;
use tracing::Instrument;
use uuid::Uuid;

use tokio_util::task::TaskTracker;

use super::{
    admit::{Admitted, admit, error},
    connection::connection_span,
    frame::{self, Decoder, FrameError, Incoming},
    http::{Taken, Takeover},
};
use crate::{
    auth::Identity,
    disconnect::{self, Disconnect},
    hub::{ConnId, Profile},
    node::Node,
    position::ChannelKey,
    protocol::{self, Rejection},
    session::{self, ReplyTo, Session},
    sink::{Bounds, Conduit, Framing, Kick, Outbox, Outgoing, Parts},
};

/// WebSocket framing: each frame is one text frame, the same bytes for every connection.
#[derive(Debug, Default)]
pub struct WebSocket;

impl WebSocket {
    /// Its slot in [`Outgoing::framed`].
    const SLOT: usize = 0;
}

impl Framing for WebSocket {
    fn shared(frame: &Outgoing) -> bytes::Bytes {
        frame
            .framed(Self::SLOT, |_, json| frame::text_bytes(json))
            .clone()
    }

    fn write(&mut self, _: ChannelKey, _: u64, shared: bytes::Bytes, out: &mut Parts) {
        out.push(shared);
    }

    fn own(&mut self, _: &str, json: &str) -> bytes::Bytes {
        frame::text(json)
    }
}

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes read per system call.
const READ_CHUNK: usize = 4096;

pub(crate) async fn upgrade(
    State(node): State<Arc<Node>>,
    State(sockets): State<TaskTracker>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    request: Request,
) -> Response {
    let params = match params {
        Ok(Query(params)) => params,
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
    let token = params.get("token").map(String::as_str);
    let user = params.get("user").map(String::as_str);
    let Admitted { identity, permit } = match admit(&node, peer, &headers, token, user) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(takeover) = request.extensions().get::<Takeover>() else {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_required",
            "this connection cannot be upgraded",
        );
    };
    let socket = takeover.claim();
    let conn = Uuid::new_v4();
    let span = connection_span(&node, &conn, &identity.user);
    // Taken-over sockets are invisible to the HTTP server's graceful shutdown: the tracker is
    // how shutdown waits for them.
    tokio::spawn(
        sockets.track_future(
            async move {
                if let Ok(taken) = socket.await {
                    serve(taken, node, conn, identity).await;
                }
                drop(permit);
            }
            .instrument(span),
        ),
    );
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
pub(crate) fn accept_key(key: &str) -> String {
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
pub(crate) fn handshake(
    method: &Method,
    headers: &HeaderMap,
) -> Result<String, (StatusCode, &'static str)> {
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

/// A WebSocket connection's life on the node, from the socket hyper handed over.
async fn serve(taken: Taken, node: Arc<Node>, conn: ConnId, identity: Identity) {
    let Taken { stream, read_ahead } = taken;
    let mut decoder = Decoder::default();
    decoder.buf.extend_from_slice(&read_ahead);
    // Copied out: these bytes keep the HTTP server's whole read buffer (8 KiB) alive.
    drop(read_ahead);
    let config = node.config();
    let kick = Kick::new(node.closing_token().child_token());
    let bounds = Bounds {
        frames: config.queue_capacity,
        bytes: config.queue_max_bytes,
    };
    let outbox =
        Arc::new(Outbox::new(stream, WebSocket, kick, bounds).charged(node.budget().charge()));
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
    let mut session = Session::new(conn, node.clone(), outbox.clone(), identity);
    let end = run(&outbox, &mut decoder, &node, &mut session).await;
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
            let code = code.filter(|&c| frame::may_send(c)).unwrap_or(1000);
            Some(frame::close(code, ""))
        }
        End::Close(reason) => {
            tracing::debug!(code = reason.code, reason = reason.reason, "closing");
            Some(frame::close(reason.code, reason.reason))
        }
    };
    if let Some(close) = close {
        outbox.send_raw(close);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, outbox.flush()).await;
    }
    // Presence answers in flight may still hold the outbox: close the socket now.
    if let Some(stream) = outbox.stream() {
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
    }
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

/// What woke a connection's task.
enum Wake {
    Kicked,
    Expired,
    /// Frames wait for the socket.
    Backlog,
    Readable(std::io::Result<()>),
    Tick,
    /// A frame started and not finished in time.
    Stalled,
}

/// Waits until what was sent is written, unless the connection is cut off first: a client
/// that does not read cannot make the node queue replies without end.
async fn written(outbox: &Outbox<WebSocket>) -> Result<(), End> {
    if outbox.is_written() {
        return Ok(());
    }
    // Boxed: only a connection whose socket is full waits here; inline, the wait would take
    // room in every connection's task.
    Box::pin(flush(outbox)).await
}

async fn flush(outbox: &Outbox<WebSocket>) -> Result<(), End> {
    let kick = crate::sink::Sink::kick(outbox);
    tokio::select! {
        biased;
        written = outbox.flush() => written.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}

/// The connection's life: welcome, then requests and heartbeats until one side ends it.
/// Events do not pass through here: fan-out writes them.
async fn run(
    outbox: &Arc<Outbox<WebSocket>>,
    decoder: &mut Decoder,
    node: &Arc<Node>,
    session: &mut Session,
) -> End {
    let config = node.config();
    let kick = crate::sink::Sink::kick(&**outbox).clone();
    let Some(stream) = outbox.stream() else {
        return End::Gone;
    };
    let welcome = protocol::welcome(&protocol::Welcome {
        node: node.id(),
        conn: &session.conn().to_string(),
        user: &session.identity().user,
        heartbeat: config.heartbeat_secs,
        epoch: &node.epoch(),
        region: node.bus().topology().region().map(|r| &**r),
        session: None,
    });
    outbox.send("welcome", &welcome);
    if let Err(end) = written(outbox).await {
        return end;
    }
    let heartbeat = config.heartbeat();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong = false;
    let cancelled = kick.token().cancelled();
    tokio::pin!(cancelled);
    let mut expires_at = session.identity().expires_at;
    let mut expiry = expires_at.map(|at| Box::pin(tokio::time::sleep_until(session::deadline(at))));
    // What the decoder holds, charged to the node's budget; and while a frame is pending,
    // the time by which it must be complete (boxed: most connections never start one that
    // does not complete in the same read).
    let mut holding = node.budget().charge();
    let mut stall: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
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
            if matches!(message, Incoming::Text(_) | Incoming::Binary) {
                // A whole message is progress: the next pending one gets its own time.
                stall = None;
            }
            match message {
                Incoming::Text(text) => {
                    // Boxed: answering may await a publish or a replay, whose futures are
                    // large; inline they would sit in every idle connection's task.
                    Box::pin(session.handle(&text, ReplyTo::Stream)).await;
                }
                Incoming::Binary => {
                    let rejection = Rejection::new(
                        "unsupported_frame",
                        "binary frames are not supported; send JSON text frames",
                    );
                    outbox.send("error", &rejection.encode());
                }
                Incoming::Ping(payload) => outbox.send_raw(frame::pong(&payload)),
                Incoming::Pong => {}
                Incoming::Close(code) => return End::ClientClosed(code),
            }
            if let Err(end) = written(outbox).await {
                return end;
            }
            if session.identity().expires_at != expires_at {
                // A refresh moved the deadline.
                expires_at = session.identity().expires_at;
                expiry =
                    expires_at.map(|at| Box::pin(tokio::time::sleep_until(session::deadline(at))));
            }
        }
        if decoder.is_idle() {
            stall = None;
        } else if stall.is_none() {
            stall = Some(Box::pin(tokio::time::sleep(config.frame_timeout())));
        }
        if holding.set(decoder.held()).is_err() {
            return End::Close(disconnect::TRY_AGAIN_LATER);
        }
        let wake = tokio::select! {
            biased;
            _ = &mut cancelled => Wake::Kicked,
            _ = async { stall.as_mut().unwrap().await }, if stall.is_some() => Wake::Stalled,
            _ = async { expiry.as_mut().unwrap().await }, if expiry.is_some() => Wake::Expired,
            _ = outbox.waiting() => Wake::Backlog,
            readable = stream.readable() => Wake::Readable(readable),
            _ = ticker.tick() => Wake::Tick,
        };
        let step = match wake {
            Wake::Kicked => Err(End::Close(kick.reason())),
            Wake::Expired => Err(End::Close(disconnect::TOKEN_EXPIRED)),
            Wake::Stalled => Err(End::Close(disconnect::FRAME_TIMEOUT)),
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
                    outbox.send_raw(frame::ping());
                    written(outbox).await
                }
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_framed_once_for_every_connection() {
        let event = Outgoing::event(7, r#"{"op":"event"}"#);
        let a = WebSocket::shared(&event);
        let b = WebSocket::shared(&event);
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "one text frame for every connection"
        );
        assert_eq!(&a[..2], &[0x81, 14]);
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
