//! Server-side control of users and connections, and the history API: the endpoints that
//! let the app's backend act on clients wherever they are connected (every node, transport
//! and region). Each command is one scatter-gather over NATS that every ws node carries out
//! and answers ([`fanout::control`]); rules that must outlive it (a block, a revoked token,
//! a removed history) are stored first in the tier's bucket, which every node follows,
//! present and future.
//!
//! | method | path | answer |
//! |---|---|---|
//! | POST | `/v1/users/{user}/disconnect` | `{"disconnected", "partial"}` |
//! | POST | `/v1/users/{user}/subscribe`, `/unsubscribe` | `{"subscribed"` or `"unsubscribed", "partial"}` |
//! | GET | `/v1/users/{user}/connections` | `{"user", "connections":[...], "partial"}` |
//! | POST, DELETE | `/v1/users/{user}/block` | `{"user", "blocked", "until"?, "disconnected"?, "partial"?}` |
//! | POST | `/v1/tokens/revoke` | `{"revoked", "disconnected", "partial"}` |
//! | GET | `/v1/channels` | `{"channels":[{"channel","subscribers","regions"?}], "truncated", "partial"}` |
//! | GET, DELETE | `/v1/channels/{channel}/history` | a page of stored events; their removal |
//! | POST, DELETE | `/v1/regions/{region}/evacuate` | `{"region", "evacuated", "at"?, "partial"?}` |

use std::collections::{BTreeMap, HashMap};

use axum::{
    Json, Router,
    extract::{Path, Query, State, rejection::BytesRejection, rejection::PathRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use fanout::{
    Channel, Code,
    control::{Answer, Command, MAX_CHANNELS, Rule},
    time::now_ms,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json, value::RawValue};

use crate::{ApiError, routes::AppState};

/// Longest user id (as the ws nodes accept it).
const MAX_USER: usize = 128;
/// Longest close reason: what fits in a WebSocket close frame.
const MAX_REASON: usize = 123;
/// Most events in one history page.
const MAX_PAGE: usize = 1_000;
/// Events in a history page unless `limit` says otherwise.
const PAGE: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users/{user}/disconnect", post(disconnect))
        .route("/v1/users/{user}/subscribe", post(subscribe))
        .route("/v1/users/{user}/unsubscribe", post(unsubscribe))
        .route("/v1/users/{user}/connections", get(connections))
        .route("/v1/users/{user}/block", post(block).delete(unblock))
        .route("/v1/tokens/revoke", post(revoke))
        .route("/v1/channels", get(channels))
        .route(
            "/v1/channels/{channel}/history",
            get(history).delete(remove_history),
        )
        .route(
            "/v1/regions/{region}/evacuate",
            post(evacuate).delete(end_evacuation),
        )
}

/// The region of a path: one of the tier's, with another to go to.
fn region_of(
    state: &AppState,
    region: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    let Path(region) = region
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, e.body_text()))?;
    let regions = &state.bus().topology().regions();
    if !regions.iter().any(|known| **known == *region) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Code::UnknownRegion,
            format!("no region {region:?} in this tier (FANOUT_REGIONS)"),
        ));
    }
    if regions.len() < 2 {
        return Err(bad(
            Code::InvalidRequest,
            "this tier has one region: there is nowhere to evacuate it to",
        ));
    }
    Ok(region)
}

/// `POST /v1/regions/{region}/evacuate`: every ws node of the region closes its clients
/// towards the other regions (1001 with `regions`, spread as a drain) and takes no new ones
/// (503 `region_evacuated`); the region's APIs refuse publishes (503 `region_evacuated`,
/// with the other regions), until `DELETE` ends it.
async fn evacuate(
    State(state): State<AppState>,
    region: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let region = region_of(&state, region)?;
    let at = now_ms();
    let rule = Rule::Evacuate {
        region: region.clone(),
        at,
        until: None,
    };
    state.bus().rules().set(&rule).await?;
    if state.region() == region {
        state.set_evacuated(true);
    }
    // The nodes follow the bucket; the command only makes them start now.
    let (_, partial) = command(&state, &Command::Apply { rule }).await?;
    tracing::warn!(%region, "region evacuated");
    Ok(
        Json(json!({"region": region, "evacuated": true, "at": at, "partial": partial}))
            .into_response(),
    )
}

/// `DELETE /v1/regions/{region}/evacuate`: the region takes clients and publishes again
/// (its clients stay where they went until they reconnect).
async fn end_evacuation(
    State(state): State<AppState>,
    region: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let region = region_of(&state, region)?;
    state
        .bus()
        .rules()
        .lift(&fanout::control::key("evacuate", &region))
        .await?;
    if state.region() == region {
        state.set_evacuated(false);
    }
    tracing::warn!(%region, "region evacuation ended");
    Ok(Json(json!({"region": region, "evacuated": false})).into_response())
}

/// Follows the evacuations of this API's region (the tier's rules) until `shutdown`: while
/// one lasts, publishes are refused. Follows again after a failure.
pub async fn follow_evacuations(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    use futures_util::StreamExt;
    if state.region().is_empty() {
        return;
    }
    let key = fanout::control::key("evacuate", state.region());
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match state.bus().rules().follow().await {
            Ok(changes) => {
                futures_util::pin_mut!(changes);
                loop {
                    let change = tokio::select! {
                        change = changes.next() => change,
                        _ = shutdown.cancelled() => return,
                    };
                    let Some(change) = change else { break };
                    pause = std::time::Duration::from_millis(100);
                    match change {
                        fanout::bus::RuleChange::Set(rule) if rule.key() == key => {
                            state.set_evacuated(true);
                        }
                        fanout::bus::RuleChange::Gone(gone) if gone == key => {
                            state.set_evacuated(false);
                        }
                        _ => {}
                    }
                }
            }
            Err(err) => tracing::debug!(%err, "cannot follow the control rules yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

fn bad(code: Code, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// The user of a path: 1-128 printable characters, as a token's `sub`.
fn user_of(user: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(user) = user.map_err(|e| bad(Code::InvalidUser, e.body_text()))?;
    if user.is_empty() || user.len() > MAX_USER || user.chars().any(char::is_control) {
        return Err(bad(
            Code::InvalidUser,
            format!("a user id is 1-{MAX_USER} printable characters"),
        ));
    }
    Ok(user)
}

/// A JSON body of type `T` (an empty body is `{}`): `invalid_json` when it is not JSON,
/// `invalid_request` when it is not of the shape.
fn body_of<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), Code::InvalidBody, rejection.body_text())
    })?;
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    serde_json::from_slice(body).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => bad(Code::InvalidRequest, err.to_string()),
        _ => ApiError::invalid_json(err),
    })
}

/// A channel named in a body or a path: valid, and not fanout's own.
fn channel_of(name: &str) -> Result<Channel, ApiError> {
    let channel = Channel::parse(name).map_err(ApiError::invalid_channel)?;
    if channel.is_internal() {
        return Err(bad(
            Code::ReservedChannel,
            format!(
                "channels starting with {:?} are fanout's own",
                fanout::channel::INTERNAL_PREFIX
            ),
        ));
    }
    Ok(channel)
}

/// Sends `command` to every ws node: their answers, and whether one is missing.
async fn command(state: &AppState, command: &Command) -> Result<(Vec<Answer>, bool), ApiError> {
    state
        .bus()
        .rpc()
        .control(command, &state.directory())
        .await
        .map_err(|err| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::BusUnavailable,
                err.to_string(),
            )
        })
}

fn affected(answers: &[Answer]) -> usize {
    answers.iter().map(|a| a.affected).sum()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    reconnect: Option<bool>,
}

/// `POST /v1/users/{user}/disconnect`: closes every connection of the user. `reconnect`
/// (default true) picks the range: 4000-4499 (the client reconnects) or 4500-4999 (it does
/// not); `code` defaults to 4005 or 4500, and must fall in the range `reconnect` names.
async fn disconnect(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(user)?;
    let DisconnectBody {
        code,
        reason,
        reconnect,
    } = body_of(body)?;
    let reconnect = match (code, reconnect) {
        (_, Some(reconnect)) => reconnect,
        (Some(code), None) => code < 4500,
        (None, None) => true,
    };
    let code = code.unwrap_or(if reconnect { 4005 } else { 4500 });
    let range = if reconnect { 4000..=4499 } else { 4500..=4999 };
    if !range.contains(&code) {
        return Err(bad(
            Code::InvalidRequest,
            format!(
                "\"code\" must be in {}-{} with \"reconnect\": {reconnect}",
                range.start(),
                range.end()
            ),
        ));
    }
    let reason = reason.unwrap_or_else(|| match reconnect {
        true => "disconnected by the server".into(),
        false => "disconnected by the server: do not reconnect".into(),
    });
    if reason.len() > MAX_REASON {
        return Err(bad(
            Code::InvalidRequest,
            format!("\"reason\" must be at most {MAX_REASON} bytes (a close frame's room)"),
        ));
    }
    let (answers, partial) = command(&state, &Command::Disconnect { user, code, reason }).await?;
    Ok(Json(json!({"disconnected": affected(&answers), "partial": partial})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

/// `POST /v1/users/{user}/subscribe`: subscribes every present connection of the user to
/// `channel` (a long-poll client has none between its polls).
async fn subscribe(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    membership(&state, user, body, true).await
}

/// `POST /v1/users/{user}/unsubscribe`: takes every connection of the user out of `channel`.
async fn unsubscribe(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    membership(&state, user, body, false).await
}

/// A server-side subscribe (`join`) or unsubscribe of every connection of the user.
async fn membership(
    state: &AppState,
    user: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
    join: bool,
) -> Result<Response, ApiError> {
    let user = user_of(user)?;
    let ChannelBody { channel } = body_of(body)?;
    let channel = channel_of(&channel)?;
    if channel.is_broadcast() {
        return Err(bad(
            Code::ReservedChannel,
            "every connection receives \"broadcast\", always",
        ));
    }
    let channel = channel.as_str().to_string();
    let (command, counted) = match join {
        true => (Command::Subscribe { user, channel }, "subscribed"),
        false => (Command::Unsubscribe { user, channel }, "unsubscribed"),
    };
    let (answers, partial) = self::command(state, &command).await?;
    Ok(Json(json!({counted: affected(&answers), "partial": partial})).into_response())
}

/// `GET /v1/users/{user}/connections`: every connection of the user, on every node.
async fn connections(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(user)?;
    let (answers, partial) = command(&state, &Command::Connections { user: user.clone() }).await?;
    let truncated = answers.iter().any(|a| a.truncated);
    let mut connections: Vec<_> = answers.into_iter().flat_map(|a| a.connections).collect();
    connections.sort_by(|a, b| {
        (a.connected_since, &a.node, &a.id).cmp(&(b.connected_since, &b.node, &b.id))
    });
    let mut body = json!({"user": user, "connections": connections, "partial": partial});
    if truncated {
        body["truncated"] = json!(true);
    }
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockBody {
    /// Unix seconds; none: until lifted.
    #[serde(default)]
    until: Option<u64>,
}

/// `POST /v1/users/{user}/block`: the user's connects are refused (HTTP 403 `user_blocked`)
/// and their present connections closed (4501), on every node, until `until` or until lifted.
async fn block(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(user)?;
    let BlockBody { until } = body_of(body)?;
    future(until)?;
    let rule = Rule::Block {
        user: user.clone(),
        until,
    };
    let (disconnected, partial) = enact(&state, rule).await?;
    let mut body =
        json!({"user": user, "blocked": true, "disconnected": disconnected, "partial": partial});
    if let Some(until) = until {
        body["until"] = json!(until);
    }
    Ok(Json(body).into_response())
}

/// `DELETE /v1/users/{user}/block`: lifts the block.
async fn unblock(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = user_of(user)?;
    state
        .bus()
        .rules()
        .lift(&fanout::control::key("block", &user))
        .await?;
    Ok(Json(json!({"user": user, "blocked": false})).into_response())
}

/// An end in the future, if any.
fn future(until: Option<u64>) -> Result<(), ApiError> {
    match until {
        Some(until) if until <= now_ms() / 1000 => Err(bad(
            Code::InvalidRequest,
            "\"until\" is in the past (unix seconds)",
        )),
        _ => Ok(()),
    }
}

/// Stores `rule`, then has every node apply it now: the connections closed, and whether a
/// node did not answer (it applies the rule as it reads it from the bucket).
async fn enact(state: &AppState, rule: Rule) -> Result<(usize, bool), ApiError> {
    state.bus().rules().set(&rule).await?;
    let (answers, partial) = command(state, &Command::Apply { rule }).await?;
    Ok((affected(&answers), partial))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    issued_before: Option<u64>,
    /// When the revocation may be forgotten (unix seconds: the token's `exp`); none: kept.
    #[serde(default)]
    until: Option<u64>,
}

/// `POST /v1/tokens/revoke`: `{"jti"}` (one token) or `{"user","issued_before"}` (the
/// user's tokens issued before then): refused on connect (401 `token_revoked`) and refresh,
/// and connections holding them closed (4502), everywhere.
async fn revoke(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let RevokeBody {
        jti,
        user,
        issued_before,
        until,
    } = body_of(body)?;
    future(until)?;
    let rule = match (jti, user, issued_before) {
        (Some(jti), None, None) if !jti.is_empty() && jti.len() <= 256 => {
            Rule::RevokeToken { jti, until }
        }
        (None, Some(user), Some(issued_before)) => {
            let user = user_of(Ok(Path(user)))?;
            Rule::RevokeUser {
                user,
                issued_before,
                until,
            }
        }
        _ => {
            return Err(bad(
                Code::InvalidRequest,
                "give {\"jti\"} (1-256 bytes) or {\"user\",\"issued_before\"}, and optionally \"until\"",
            ));
        }
    };
    let (disconnected, partial) = enact(&state, rule).await?;
    Ok(
        Json(json!({"revoked": true, "disconnected": disconnected, "partial": partial}))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelsQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/channels?prefix=&limit=`: the channels with subscribers (on any node), by name,
/// their subscribers in all and per region.
async fn channels(
    State(state): State<AppState>,
    query: Result<Query<ChannelsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(ChannelsQuery { prefix, limit }) =
        query.map_err(|e| bad(Code::InvalidQuery, e.body_text()))?;
    let limit = limit.unwrap_or(100);
    if !(1..=MAX_CHANNELS).contains(&limit) {
        return Err(bad(
            Code::InvalidQuery,
            format!("\"limit\" must be 1-{MAX_CHANNELS}"),
        ));
    }
    let (answers, partial) = command(&state, &Command::Channels { prefix, limit }).await?;
    let mut truncated = answers.iter().any(|a| a.truncated);
    let mut merged: BTreeMap<String, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for answer in answers {
        for (channel, count) in answer.channels {
            let entry = merged.entry(channel).or_default();
            entry.0 += count;
            if let Some(region) = &answer.region {
                *entry.1.entry(region.clone()).or_default() += count;
            }
        }
    }
    truncated |= merged.len() > limit;
    let channels: Vec<Value> = merged
        .into_iter()
        .take(limit)
        .map(|(channel, (subscribers, regions))| {
            let mut entry = json!({"channel": channel, "subscribers": subscribers});
            if !regions.is_empty() {
                entry["regions"] = json!(regions);
            }
            entry
        })
        .collect();
    Ok(
        Json(json!({"channels": channels, "truncated": truncated, "partial": partial}))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    reverse: bool,
}

/// `GET /v1/channels/{channel}/history?since=&limit=&reverse=`: a page of the channel's
/// stored events as `event` frames carry them, oldest first (newest first with `reverse`),
/// after `since` (before it with `reverse`): a seq with one region, `eu:41,us:7` (or that
/// as a JSON object) with regions. `first` and `last` are the channel's first and last
/// stored seqs (per region with regions); `next` is the `since` of the next page, when there
/// is one.
async fn history(
    State(state): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(channel) = channel.map_err(|e| bad(Code::InvalidChannel, e.body_text()))?;
    let channel = channel_of(&channel)?;
    let Query(HistoryQuery {
        since,
        limit,
        reverse,
    }) = query.map_err(|e| bad(Code::InvalidQuery, e.body_text()))?;
    let limit = limit.unwrap_or(PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(bad(
            Code::InvalidQuery,
            format!("\"limit\" must be 1-{MAX_PAGE}"),
        ));
    }
    let bus = state.bus();
    let topology = bus.topology();
    let regions = topology.count();
    let since = positions(topology, since.as_deref())?;
    let log = bus.log();
    // Per region: the events of the page's stretch, each region's in order.
    let mut found: Vec<fanout::Envelope> = Vec::new();
    let mut bounds = Vec::new();
    let mut more = false;
    for region in 0..regions {
        let from = since.get(&region).copied();
        // The channel's whole stored history is at most the per-channel limit: a reverse
        // page reads it forward and takes its end.
        let events = if reverse {
            let mut all = log.history(&channel, region, 0, None).await?;
            if let Some(before) = from {
                all.retain(|e| e.seq < before);
            }
            let keep = all.len().saturating_sub(limit);
            more |= keep > 0;
            all.split_off(keep)
        } else {
            log.page(&channel, region, from.unwrap_or(0), limit + 1)
                .await?
        };
        let first = log
            .page(&channel, region, 0, 1)
            .await?
            .first()
            .map(|e| e.seq);
        let last = log.last_of(&channel, region).await?;
        bounds.push((first, last));
        found.extend(events);
    }
    // One order across regions: by time, then region and seq.
    found.sort_by_key(|e| (e.ts, e.region, e.seq));
    if reverse {
        found.reverse();
    }
    more |= found.len() > limit;
    found.truncate(limit);
    let mut events = Vec::with_capacity(found.len());
    for envelope in &found {
        match envelope.frame_json(false) {
            Ok(json) => events.push(RawValue::from_string(json).map_err(ApiError::invalid_json)?),
            Err(err) => tracing::warn!(seq = envelope.seq, %err, "a stored event that is not JSON"),
        }
    }
    // Where the next page starts, per region: past what this page holds.
    let mut next: HashMap<u8, u64> = since.clone();
    for envelope in &found {
        let at = next.entry(envelope.region).or_insert(envelope.seq);
        *at = match reverse {
            true => (*at).min(envelope.seq),
            false => (*at).max(envelope.seq),
        };
    }
    let per_region = |values: Vec<Option<u64>>| -> Value {
        if topology.regions().is_empty() {
            json!(values[0])
        } else {
            let map: BTreeMap<&str, Option<u64>> = topology
                .regions()
                .iter()
                .map(|r| &**r)
                .zip(values)
                .collect();
            json!(map)
        }
    };
    let mut body = json!({
        "channel": channel,
        "events": events,
        "first": per_region(bounds.iter().map(|b| b.0).collect()),
        "last": per_region(bounds.iter().map(|b| b.1).collect()),
    });
    if more {
        body["next"] = if topology.regions().is_empty() {
            json!(next.get(&0).copied().unwrap_or(0))
        } else {
            let map: BTreeMap<&str, u64> = (0..regions)
                .filter_map(|r| {
                    next.get(&r)
                        .map(|seq| (&*topology.regions()[r as usize], *seq))
                })
                .collect();
            json!(map)
        };
    }
    Ok(Json(body).into_response())
}

/// A history query's `since`: a seq (one region), or a seq per region (`eu:41,us:7`, or
/// `{"eu":41}`), by region index.
fn positions(
    topology: &fanout::bus::Topology,
    since: Option<&str>,
) -> Result<HashMap<u8, u64>, ApiError> {
    let Some(since) = since.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(HashMap::new());
    };
    let invalid = |message: String| bad(Code::InvalidQuery, message);
    if topology.regions().is_empty() {
        let seq = since.parse::<u64>().map_err(|_| {
            invalid("this tier has one region: \"since\" is a seq (a number)".into())
        })?;
        return Ok(HashMap::from([(0, seq)]));
    }
    let pairs: Vec<(String, u64)> = if since.starts_with('{') {
        serde_json::from_str::<BTreeMap<String, u64>>(since)
            .map_err(|err| invalid(format!("\"since\" is not an object of seqs: {err}")))?
            .into_iter()
            .collect()
    } else {
        since
            .split(',')
            .map(|pair| {
                let (region, seq) = pair.split_once(':').ok_or_else(|| {
                    invalid(format!(
                        "this tier has regions ({}): \"since\" is region:seq pairs, e.g. {}:41",
                        topology.regions().join(","),
                        topology.regions()[0]
                    ))
                })?;
                let seq = seq
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| invalid(format!("{seq:?} is not a seq")))?;
                Ok((region.trim().to_string(), seq))
            })
            .collect::<Result<_, ApiError>>()?
    };
    pairs
        .into_iter()
        .map(|(region, seq)| match topology.index(&region) {
            Some(index) => Ok((index, seq)),
            None => Err(invalid(format!(
                "\"since\" names region {region:?}, which is not one of this tier's ({})",
                topology.regions().join(",")
            ))),
        })
        .collect()
}

/// `DELETE /v1/channels/{channel}/history`: removes the channel's stored events from every
/// region's copies; a client resuming from before the removal is told `recovered: false`.
async fn remove_history(
    State(state): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(channel) = channel.map_err(|e| bad(Code::InvalidChannel, e.body_text()))?;
    let channel = channel_of(&channel)?;
    let last = state.bus().log().remove(&channel).await?;
    // Kept as long as the stream keeps events: after that, no resume reaches back to it.
    let keep = state.history_max_age_secs() + 60;
    let rule = Rule::Removed {
        channel: channel.as_str().to_string(),
        at: now_ms(),
        last,
        until: Some(now_ms() / 1000 + keep),
    };
    state.bus().rules().set(&rule).await?;
    // Nodes that answer know at once; the others read it from the bucket.
    let _ = command(&state, &Command::Apply { rule }).await;
    Ok((
        StatusCode::OK,
        Json(json!({"channel": channel, "removed": true})),
    )
        .into_response())
}
