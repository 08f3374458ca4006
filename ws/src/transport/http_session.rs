//! `POST /session/{conn}`: the requests of a live HTTP stream (an SSE stream cannot carry
//! them the other way). The body is one protocol request; the answer is its reply frame,
//! `200` (an error frame for a refused op), after the stream's own task acted on it, in
//! order with the stream's other requests.
//!
//! A session is found on the node that holds its stream, by the `conn` of its `welcome`, and
//! authorized by the `session` secret of that `welcome` (`Authorization: Bearer <secret>`):
//! `401 invalid_session` without it or with another, `404 unknown_session` for a session this
//! node does not hold (never held, or closed).

use fanout::Code;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, to_bytes},
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::sync::{Notify, oneshot};

use super::admit::error;
use crate::{hub::ConnId, node::Node};

/// Requests one session may have waiting for its task.
pub const QUEUE: usize = 16;

/// How long a request waits for its reply (a publish waits for the stream's acknowledgement,
/// a presence query for every node).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A request for a session's task, with where its reply goes.
pub type Request = (String, oneshot::Sender<String>);

/// The live HTTP sessions of this node.
#[derive(Debug, Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<ConnId, Handle>>>);

#[derive(Debug, Clone)]
struct Handle {
    secret: Arc<str>,
    inbox: Arc<Inbox>,
}

/// A session's waiting requests: allocates nothing until the first one (an idle stream
/// costs what an idle WebSocket does; a channel's buffer would be 1 KiB each).
#[derive(Debug, Default)]
pub struct Inbox {
    queue: Mutex<Inner>,
    arrived: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    requests: VecDeque<Request>,
    closed: bool,
}

/// Why a request could not be handed to its session.
enum Refused {
    Full,
    Closed,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, request: Request) -> Result<(), Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        if inner.requests.len() >= QUEUE {
            return Err(Refused::Full);
        }
        inner.requests.push_back(request);
        drop(inner);
        self.arrived.notify_one();
        Ok(())
    }

    /// The next request, in order.
    pub async fn next(&self) -> Request {
        loop {
            if let Some(request) = self.lock().requests.pop_front() {
                return request;
            }
            self.arrived.notified().await;
        }
    }

    /// No more requests: those waiting are dropped (their callers get 404).
    fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.requests = VecDeque::new();
    }
}

impl Sessions {
    /// Registers session `conn`; its requests arrive in the returned inbox. The registration
    /// lasts until [`Sessions::remove`].
    pub fn insert(&self, conn: ConnId, secret: &str) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox::default());
        let handle = Handle {
            secret: secret.into(),
            inbox: inbox.clone(),
        };
        self.lock().insert(conn, handle);
        inbox
    }

    pub fn remove(&self, conn: &ConnId) {
        if let Some(handle) = self.lock().remove(conn) {
            handle.inbox.close();
        }
    }

    fn get(&self, conn: &ConnId) -> Option<Handle> {
        self.lock().get(conn).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Handle>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fresh session secret: 128 random bits, as hex.
pub fn secret() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub(crate) async fn request(
    State(sessions): State<Sessions>,
    State(node): State<Arc<Node>>,
    Path(conn): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let unknown = || {
        error(
            StatusCode::NOT_FOUND,
            Code::UnknownSession,
            &format!("no live session {conn:?} on this node (it closed, or is held elsewhere)"),
        )
    };
    let Some(handle) = ConnId::parse_str(&conn)
        .ok()
        .and_then(|id| sessions.get(&id))
    else {
        return unknown();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if !presented.is_some_and(|secret| {
        fanout::secret::same(secret.trim().as_bytes(), handle.secret.as_bytes())
    }) {
        return error(
            StatusCode::UNAUTHORIZED,
            Code::InvalidSession,
            "send Authorization: Bearer <session>, the secret of this session's welcome",
        );
    }
    let limit = node.config().max_message_bytes;
    let Ok(body) = to_bytes(body, limit).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            &format!("a request may be at most {limit} bytes (FANOUT_MAX_MESSAGE_BYTES)"),
        );
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let (reply, replied) = oneshot::channel();
    match handle.inbox.push((text, reply)) {
        Ok(()) => {}
        Err(Refused::Full) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                Code::TooManyRequests,
                &format!("at most {QUEUE} requests may wait for one session"),
            );
        }
        Err(Refused::Closed) => return unknown(),
    }
    match tokio::time::timeout(REPLY_TIMEOUT, replied).await {
        Ok(Ok(reply)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            reply,
        )
            .into_response(),
        Ok(Err(_)) => unknown(),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            Code::Timeout,
            &format!("no reply within {REPLY_TIMEOUT:?}"),
        ),
    }
}
