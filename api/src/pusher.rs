//! The Pusher protocol's HTTP API (`FANOUT_PUSHER_APPS`), so that Pusher's server libraries
//! publish to fanout unchanged: every request is checked with Pusher's signature
//! ([`fanout::pusher`]), an event is acknowledged only once stored, as every fanout publish,
//! and a Pusher channel is the fanout channel of the app's prefix and its name, so that
//! fanout's clients and Pusher's see the same events.
//!
//! | method | path | answer |
//! |---|---|---|
//! | POST | `/apps/{app_id}/events` | `{}` once every channel's copy is stored |
//! | POST | `/apps/{app_id}/batch_events` | `{}` once every event is stored |
//! | GET | `/apps/{app_id}/channels` | `{"channels":{name:{}}}` (`filter_by_prefix`, `info=user_count`) |
//! | GET | `/apps/{app_id}/channels/{name}` | `{"occupied","subscription_count"?,"user_count"?}` |
//! | GET | `/apps/{app_id}/channels/{name}/users` | `{"users":[{"id"}]}` (presence channels) |
//! | POST | `/apps/{app_id}/users/{user_id}/terminate_connections` | `{}` |
//!
//! An event's `name` travels with it ([`fanout::envelope::HEADER_EVENT`]); its `data`, a
//! string in Pusher's API, is stored as that JSON string.

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    extract::{
        FromRequestParts, Path, State,
        rejection::{BytesRejection, PathRejection},
    },
    http::{Method, StatusCode, Uri, request::Parts as RequestParts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use fanout::{
    Channel, Code, Data,
    control::Command,
    pusher::{App, SignatureError},
    time::now_ms,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiError, routes::AppState};

/// Most channels one event goes to (Pusher's limit).
const MAX_CHANNELS: usize = 100;
/// Most events in one batch (Pusher's limit).
const MAX_BATCH: usize = 10;
/// Longest event name (Pusher's limit).
const MAX_NAME: usize = 200;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/apps/{app_id}/events", post(events))
        .route("/apps/{app_id}/batch_events", post(batch_events))
        .route("/apps/{app_id}/channels", get(channels))
        .route("/apps/{app_id}/channels/{name}", get(channel))
        .route("/apps/{app_id}/channels/{name}/users", get(users))
        .route(
            "/apps/{app_id}/users/{user_id}/terminate_connections",
            post(terminate),
        )
}

/// A path's parts, or the JSON error of a path that cannot be read.
fn path_of<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(parts)| parts)
        .map_err(|e| bad(Code::InvalidRequest, e.body_text()))
}

fn bad(code: Code, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// A signed request: its app, its query, its body.
struct Signed {
    app: App,
    query: Vec<(String, String)>,
    body: Bytes,
}

impl Signed {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The fanout channel of the app's channel `name`.
    fn channel(&self, name: &str) -> Result<Channel, ApiError> {
        let fanout = fanout::pusher::fanout_name(name);
        let channel = Channel::parse(&format!("{}{fanout}", self.app.prefix))
            .map_err(ApiError::invalid_channel)?;
        if channel.is_internal() || channel.is_broadcast() {
            return Err(bad(
                Code::ReservedChannel,
                format!("{name:?} is fanout's own channel"),
            ));
        }
        Ok(channel)
    }
}

/// What a request's signature covers besides its body: its method, path and query.
struct Signable {
    method: Method,
    uri: Uri,
    query: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Signable {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut RequestParts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Signable {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            query: parts.uri.query().map(String::from),
        })
    }
}

/// Checks a request's app and signature (Pusher's answers: 404 for an unknown app, 401 for a
/// signature that does not hold, with why).
fn signed(
    state: &AppState,
    app_id: &str,
    request: &Signable,
    body: Result<Bytes, BytesRejection>,
) -> Result<Signed, ApiError> {
    let Signable { method, uri, query } = request;
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), Code::InvalidBody, rejection.body_text())
    })?;
    let Some(app) = state.pusher_apps().iter().find(|a| a.id == app_id).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("no Pusher app {app_id:?} (FANOUT_PUSHER_APPS)"),
        ));
    };
    let query: Vec<(String, String)> = query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    app.verify_request(method.as_str(), uri.path(), &query, &body, now_ms() / 1000)
        .map_err(|err: SignatureError| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                Code::Unauthorized,
                err.to_string(),
            )
        })?;
    Ok(Signed { app, query, body })
}

fn json_of<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => bad(Code::InvalidRequest, err.to_string()),
        _ => ApiError::invalid_json(err),
    })
}

/// One event as Pusher's API takes it.
#[derive(Debug, Deserialize)]
struct Event {
    name: String,
    data: Value,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    /// The Pusher connection that does not get the event (the one whose action caused it).
    #[serde(default)]
    socket_id: Option<String>,
    // `info` (channel attributes in the answer) is taken and not acted on: unknown fields
    // are ignored, and the answer is `{}`.
}

impl Event {
    /// Its channels and the data stored for it.
    fn checked(&self, signed: &Signed) -> Result<(Vec<Channel>, Data), ApiError> {
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return Err(bad(
                Code::InvalidEvent,
                format!("an event's name is 1-{MAX_NAME} characters"),
            ));
        }
        let names: Vec<&String> = match (&self.channel, &self.channels) {
            (Some(one), None) => vec![one],
            (None, Some(many)) if !many.is_empty() && many.len() <= MAX_CHANNELS => {
                many.iter().collect()
            }
            _ => {
                return Err(bad(
                    Code::InvalidEvent,
                    format!("give \"channel\", or \"channels\" (1-{MAX_CHANNELS})"),
                ));
            }
        };
        let channels = names
            .into_iter()
            .map(|name| signed.channel(name))
            .collect::<Result<Vec<_>, _>>()?;
        let bytes = serde_json::to_vec(&self.data).expect("JSON serializes");
        let data = Data::from(Bytes::from(bytes)).named(&self.name);
        let data = match self.socket_id.as_deref() {
            None => data,
            Some(socket_id) => match fanout::pusher::conn_of(socket_id) {
                Some(conn) => data.excluding(conn),
                None => {
                    return Err(bad(
                        Code::InvalidEvent,
                        format!("invalid socket_id {socket_id:?}: it is <digits>.<digits>"),
                    ));
                }
            },
        };
        Ok((channels, data))
    }
}

async fn events(
    State(state): State<AppState>,
    app_id: Result<Path<String>, PathRejection>,
    request: Signable,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let app_id = path_of(app_id)?;
    let signed = signed(&state, &app_id, &request, body)?;
    let event: Event = json_of(&signed.body)?;
    let (channels, data) = event.checked(&signed)?;
    let outgoing = channels
        .iter()
        .map(|channel| (channel, data.clone(), None))
        .collect();
    store(&state, outgoing).await?;
    Ok(Json(json!({})).into_response())
}

#[derive(Debug, Deserialize)]
struct Batch {
    batch: Vec<Event>,
}

async fn batch_events(
    State(state): State<AppState>,
    app_id: Result<Path<String>, PathRejection>,
    request: Signable,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let app_id = path_of(app_id)?;
    let signed = signed(&state, &app_id, &request, body)?;
    let batch: Batch = json_of(&signed.body)?;
    if batch.batch.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BatchTooLarge,
            format!("at most {MAX_BATCH} events in a batch"),
        ));
    }
    let checked = batch
        .batch
        .iter()
        .map(|event| event.checked(&signed))
        .collect::<Result<Vec<_>, _>>()?;
    let outgoing = checked
        .iter()
        .flat_map(|(channels, data)| channels.iter().map(|c| (c, data.clone(), None)))
        .collect();
    store(&state, outgoing).await?;
    Ok(Json(json!({})).into_response())
}

/// Stores every event: an error unless every one is stored.
async fn store(
    state: &AppState,
    outgoing: Vec<(&Channel, Data, Option<&str>)>,
) -> Result<(), ApiError> {
    state.evacuated()?;
    for stored in state.bus().log().publish_many(outgoing).await {
        stored?;
    }
    Ok(())
}

async fn channels(
    State(state): State<AppState>,
    app_id: Result<Path<String>, PathRejection>,
    request: Signable,
) -> Result<Response, ApiError> {
    let app_id = path_of(app_id)?;
    let signed = signed(&state, &app_id, &request, Ok(Bytes::new()))?;
    let prefix = format!(
        "{}{}",
        signed.app.prefix,
        signed.param("filter_by_prefix").unwrap_or_default()
    );
    let command = Command::Channels {
        prefix,
        limit: fanout::control::MAX_CHANNELS,
    };
    let (answers, _) = state
        .bus()
        .rpc()
        .control(&command, &state.directory())
        .await?;
    let mut found: BTreeMap<String, usize> = BTreeMap::new();
    for answer in answers {
        for (channel, count) in answer.channels {
            *found.entry(channel).or_default() += count;
        }
    }
    let channels: serde_json::Map<String, Value> = found
        .into_keys()
        .filter_map(|name| {
            let name = name.strip_prefix(signed.app.prefix.as_str())?;
            // Users' channels are not channels to Pusher's API.
            if name.starts_with(fanout::pusher::FANOUT_USER_CHANNEL) {
                return None;
            }
            Some((name.to_string(), json!({})))
        })
        .collect();
    Ok(Json(json!({"channels": channels})).into_response())
}

async fn channel(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Signable,
) -> Result<Response, ApiError> {
    let (app_id, name) = path_of(path)?;
    let signed = signed(&state, &app_id, &request, Ok(Bytes::new()))?;
    let channel = signed.channel(&name)?;
    let info = signed.param("info").unwrap_or_default().to_string();
    let presence = state
        .bus()
        .rpc()
        .presence(&channel, !name.starts_with("presence-"), &state.directory())
        .await?;
    let mut answer = json!({"occupied": presence.count > 0});
    if info.split(',').any(|i| i == "subscription_count") {
        answer["subscription_count"] = json!(presence.count);
    }
    if info.split(',').any(|i| i == "user_count") {
        answer["user_count"] = json!(users_of(&presence).len());
    }
    Ok(Json(answer).into_response())
}

async fn users(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Signable,
) -> Result<Response, ApiError> {
    let (app_id, name) = path_of(path)?;
    let signed = signed(&state, &app_id, &request, Ok(Bytes::new()))?;
    if !name.starts_with("presence-") {
        return Err(bad(
            Code::InvalidChannel,
            "only presence channels have users",
        ));
    }
    let channel = signed.channel(&name)?;
    let presence = state
        .bus()
        .rpc()
        .presence(&channel, false, &state.directory())
        .await?;
    let users: Vec<Value> = users_of(&presence)
        .into_iter()
        .map(|id| json!({"id": id}))
        .collect();
    Ok(Json(json!({"users": users})).into_response())
}

/// A presence answer's users, each once (a user may have several connections).
fn users_of(presence: &fanout::presence::Presence) -> std::collections::BTreeSet<&str> {
    presence
        .members
        .iter()
        .flatten()
        .map(|m| m.user.as_str())
        .collect()
}

async fn terminate(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Signable,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (app_id, user) = path_of(path)?;
    signed(&state, &app_id, &request, body)?;
    let command = Command::Disconnect {
        user,
        code: 4500,
        reason: "connections terminated".into(),
    };
    state
        .bus()
        .rpc()
        .control(&command, &state.directory())
        .await?;
    Ok(Json(json!({})).into_response())
}
