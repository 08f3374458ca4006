//! Proxy hooks: the app's backend decides, over HTTP, what a client may do (Centrifugo's
//! proxies are the model). Each hook is a `POST` of JSON to its URL
//! (`FANOUT_PROXY_CONNECT_URL`, `_SUBSCRIBE_URL`, `_PUBLISH_URL`, `_REFRESH_URL`,
//! `_RPC_URL`): a `200` with a JSON answer allows (and says more: who the client is, channel
//! info, replaced data, a result), a `4xx` with `{"error":{"code","message"}}` refuses, and the
//! client gets that code and message (an error frame, a close, or the HTTP status).
//!
//! A backend that is slow or down is never waited for beyond `FANOUT_PROXY_TIMEOUT_MS`: the
//! client is told `proxy_timeout` or `proxy_unavailable`. After [`TRIP`] failures in a row a
//! hook's breaker opens: calls fail at once (`proxy_unavailable`) for [`COOL_DOWN`], then go to
//! the backend again, and one more failure opens it again. `/readyz` reports each breaker; the
//! node stays ready (its clients can still do whatever needs no hook).
//!
//! It knows HTTP and the hooks' JSON, not the protocol: the session and the transports say
//! what to send and act on the answer.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use axum::http::HeaderMap;
use bytes::Bytes;
use fanout::{
    ConfigError,
    post::{PostError, Poster},
    time::now_ms,
};
use metrics::{counter, gauge, histogram};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::Config;

/// Failures in a row that open a hook's breaker.
pub const TRIP: u32 = 5;
/// How long an open breaker fails calls at once before one tries the backend again.
pub const COOL_DOWN: Duration = Duration::from_secs(5);

/// The hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Subscribe,
    Publish,
    Refresh,
    Rpc,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Connect,
        Hook::Subscribe,
        Hook::Publish,
        Hook::Refresh,
        Hook::Rpc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Subscribe => "subscribe",
            Hook::Publish => "publish",
            Hook::Refresh => "refresh",
            Hook::Rpc => "rpc",
        }
    }

    fn setting(self) -> &'static str {
        match self {
            Hook::Connect => "proxy_connect_url",
            Hook::Subscribe => "proxy_subscribe_url",
            Hook::Publish => "proxy_publish_url",
            Hook::Refresh => "proxy_refresh_url",
            Hook::Rpc => "proxy_rpc_url",
        }
    }
}

/// Why a hook did not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The backend refused, with its HTTP status, code and message.
    #[error("{message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// The backend could not be reached, failed (5xx) or answered what is not an answer; or
    /// the breaker is open.
    #[error("{0}")]
    Unavailable(String),
    /// No answer within the timeout.
    #[error("the app's backend did not answer within {0:?}")]
    Timeout(Duration),
}

impl ProxyError {
    /// The code the client gets.
    pub fn code(&self) -> &str {
        match self {
            ProxyError::Refused { code, .. } => code,
            ProxyError::Unavailable(_) => fanout::Code::ProxyUnavailable.as_str(),
            ProxyError::Timeout(_) => fanout::Code::ProxyTimeout.as_str(),
        }
    }

    /// The HTTP status a refused request gets.
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::Refused { status, .. } => *status,
            ProxyError::Unavailable(_) => 502,
            ProxyError::Timeout(_) => 504,
        }
    }
}

/// The configured hooks.
#[derive(Debug)]
pub struct Proxy {
    hooks: [Option<Endpoint>; 5],
    /// The client's headers the connect hook gets, lowercase.
    headers: Vec<String>,
}

#[derive(Debug)]
struct Endpoint {
    hook: Hook,
    poster: Poster,
    /// Failures in a row.
    failures: AtomicU32,
    /// While open: until when (ms since `epoch`); 0: closed.
    open_until: AtomicU64,
    epoch: Instant,
}

/// A refusal's body, as the backend sends it.
#[derive(Deserialize)]
struct Refusal {
    error: RefusalError,
}

#[derive(Deserialize)]
struct RefusalError {
    code: String,
    #[serde(default)]
    message: String,
}

impl Proxy {
    pub fn from_config(config: &Config) -> Result<Proxy, ConfigError> {
        let mut hooks: [Option<Endpoint>; 5] = Default::default();
        for (slot, hook) in hooks.iter_mut().zip(Hook::ALL) {
            *slot = config.proxy_poster(hook.setting())?.map(|poster| Endpoint {
                hook,
                poster,
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                epoch: Instant::now(),
            });
        }
        Ok(Proxy {
            hooks,
            headers: fanout::config::list(&config.proxy_headers)
                .into_iter()
                .map(|name| name.to_ascii_lowercase())
                .collect(),
        })
    }

    fn endpoint(&self, hook: Hook) -> Option<&Endpoint> {
        self.hooks[hook as usize].as_ref()
    }

    /// Whether `hook` is on.
    pub fn has(&self, hook: Hook) -> bool {
        self.endpoint(hook).is_some()
    }

    /// The client's headers the connect hook gets (`FANOUT_PROXY_HEADERS`).
    pub fn forwarded(&self, headers: &HeaderMap) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|name| {
                let values: Vec<&str> = headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!values.is_empty()).then(|| {
                    let sep = if name == "cookie" { "; " } else { ", " };
                    (name.clone(), values.join(sep))
                })
            })
            .collect()
    }

    /// Calls `hook` with `request`: its answer, or why there is none. A hook that is off
    /// allows with the default answer.
    pub async fn call<T: DeserializeOwned + Default>(
        &self,
        hook: Hook,
        request: &impl Serialize,
    ) -> Result<T, ProxyError> {
        let Some(endpoint) = self.endpoint(hook) else {
            return Ok(T::default());
        };
        let name = hook.name();
        if let Some(left) = endpoint.open_for() {
            counter!("fanout_ws_proxy_requests_total", "hook" => name, "outcome" => "breaker_open")
                .increment(1);
            return Err(ProxyError::Unavailable(format!(
                "the app's backend failed {TRIP} times in a row: the {name} hook tries it \
                 again in {} ms",
                left.as_millis()
            )));
        }
        let body: Bytes = serde_json::to_vec(request)
            .expect("a hook request serializes")
            .into();
        let started = Instant::now();
        // Boxed: the exchange's state is kilobytes, and every connection's task would
        // otherwise keep room for it (an rpc, a publish may call a hook) all its life.
        let answer = Box::pin(
            endpoint
                .poster
                .call(&[("content-type", "application/json".into())], body),
        )
        .await;
        histogram!("fanout_ws_proxy_duration_seconds", "hook" => name)
            .record(started.elapsed().as_secs_f64());
        let result = match answer {
            Ok((200, body)) => serde_json::from_slice::<T>(if body.is_empty() {
                b"{}"
            } else {
                &body
            })
            .map_err(|err| {
                ProxyError::Unavailable(format!(
                    "the app's backend answered the {name} hook with what is not its answer: {err}"
                ))
            }),
            Ok((status @ 400..=499, body)) => Err(match serde_json::from_slice::<Refusal>(&body) {
                Ok(Refusal { error }) if valid_code(&error.code) => ProxyError::Refused {
                    status,
                    code: error.code,
                    message: error.message,
                },
                _ => ProxyError::Refused {
                    status,
                    code: fanout::Code::Forbidden.as_str().to_string(),
                    message: format!("the app's backend refused (HTTP {status})"),
                },
            }),
            Ok((status, _)) => Err(ProxyError::Unavailable(format!(
                "the app's backend answered the {name} hook with HTTP {status}"
            ))),
            Err(PostError::Timeout(timeout)) => Err(ProxyError::Timeout(timeout)),
            Err(PostError::Failed(why)) => Err(ProxyError::Unavailable(format!(
                "the app's backend cannot be reached for the {name} hook: {why}"
            ))),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ProxyError::Refused { .. }) => "refused",
            Err(ProxyError::Timeout(_)) => "timeout",
            Err(ProxyError::Unavailable(_)) => "unavailable",
        };
        counter!("fanout_ws_proxy_requests_total", "hook" => name, "outcome" => outcome)
            .increment(1);
        match &result {
            Ok(_) | Err(ProxyError::Refused { .. }) => endpoint.succeeded(),
            Err(_) => endpoint.failed(),
        }
        result
    }

    /// Each hook that is on, and its breaker, for `/readyz`.
    pub fn report(&self) -> Option<Value> {
        let hooks: serde_json::Map<String, Value> = self
            .hooks
            .iter()
            .flatten()
            .map(|endpoint| {
                let breaker = match endpoint.open_for() {
                    Some(_) => "open",
                    None => "closed",
                };
                (
                    endpoint.hook.name().to_string(),
                    json!({
                        "breaker": breaker,
                        "failures": endpoint.failures.load(Ordering::Relaxed),
                    }),
                )
            })
            .collect();
        (!hooks.is_empty()).then_some(Value::Object(hooks))
    }
}

/// A code a client may be given: what fanout's own codes look like.
fn valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Endpoint {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// How long the breaker stays open, if it is.
    fn open_for(&self) -> Option<Duration> {
        let until = self.open_until.load(Ordering::Acquire);
        let now = self.now();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            gauge!("fanout_ws_proxy_breaker_open", "hook" => self.hook.name()).set(0.0);
            tracing::info!(hook = self.hook.name(), "the app's backend answers again");
        }
    }

    fn failed(&self) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= TRIP {
            // Open (again, after a failed try): the next call waits for the cool-down.
            let until = self.now() + COOL_DOWN.as_millis() as u64;
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                gauge!("fanout_ws_proxy_breaker_open", "hook" => self.hook.name()).set(1.0);
                tracing::warn!(
                    hook = self.hook.name(),
                    failures,
                    "the app's backend keeps failing: its breaker is open"
                );
            }
        }
    }
}

/// What the connect hook gets.
#[derive(Debug, Serialize)]
pub struct ConnectRequest<'a> {
    pub transport: &'static str,
    pub remote_addr: String,
    pub node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    pub headers: BTreeMap<String, String>,
    /// The user a token (or `?user=`) named, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
}

/// What the connect hook answers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectAnswer {
    /// Who the client is (required unless a token already said).
    #[serde(default)]
    pub user: Option<String>,
    /// Shown to others in presence.
    #[serde(default)]
    pub info: Option<Value>,
    /// Channels the connection is subscribed to at once (server-side).
    #[serde(default)]
    pub channels: Vec<String>,
    /// Unix seconds when the connection expires unless the refresh hook extends it.
    #[serde(default)]
    pub expire_at: Option<u64>,
}

/// What the subscribe hook gets.
#[derive(Debug, Serialize)]
pub struct SubscribeRequest<'a> {
    pub client: String,
    pub user: &'a str,
    pub channel: &'a str,
    pub transport: &'static str,
    pub node: &'a str,
}

/// What the subscribe hook answers: optionally the member's info in this channel.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeAnswer {
    #[serde(default)]
    pub info: Option<Value>,
}

/// What the publish hook gets.
#[derive(Debug, Serialize)]
pub struct PublishRequest<'a> {
    pub client: String,
    pub user: &'a str,
    pub channel: &'a str,
    pub data: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
}

/// What the publish hook answers: optionally the data to publish instead.
#[derive(Debug, Default, Deserialize)]
pub struct PublishAnswer {
    #[serde(default)]
    pub data: Option<Value>,
}

/// What the refresh hook gets.
#[derive(Debug, Serialize)]
pub struct RefreshRequest<'a> {
    pub client: String,
    pub user: &'a str,
    pub transport: &'static str,
    pub node: &'a str,
}

/// What the refresh hook answers: the connection's new expiry.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshAnswer {
    #[serde(default)]
    pub expire_at: Option<u64>,
    #[serde(default)]
    pub info: Option<Value>,
}

/// What the rpc hook gets.
#[derive(Debug, Serialize)]
pub struct RpcRequest<'a> {
    pub client: String,
    pub user: &'a str,
    pub method: &'a str,
    pub data: &'a Value,
}

/// What the rpc hook answers.
#[derive(Debug, Default, Deserialize)]
pub struct RpcAnswer {
    #[serde(default)]
    pub result: Value,
}

/// Whether `expire_at` (unix seconds) is still ahead.
pub fn ahead(expire_at: u64) -> bool {
    expire_at > now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_the_backend_may_give_look_like_ours() {
        assert!(valid_code("not_allowed"));
        assert!(valid_code("e42"));
        assert!(!valid_code(""));
        assert!(!valid_code("Bad Code"));
        assert!(!valid_code(&"x".repeat(65)));
    }

    #[tokio::test]
    async fn a_breaker_opens_after_failures_and_closes_on_an_answer() {
        let endpoint = Endpoint {
            hook: Hook::Connect,
            poster: Poster::new("http://127.0.0.1:9/", "", "CA", Duration::from_millis(10))
                .unwrap(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        for _ in 0..TRIP - 1 {
            endpoint.failed();
        }
        assert!(endpoint.open_for().is_none());
        endpoint.failed();
        assert!(endpoint.open_for().is_some_and(|d| d <= COOL_DOWN));
        endpoint.succeeded();
        assert!(endpoint.open_for().is_none());
        assert_eq!(endpoint.failures.load(Ordering::Relaxed), 0);
    }
}
