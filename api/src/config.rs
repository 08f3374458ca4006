//! `fanout-api`'s settings: [`fanout::Common`] plus what only the API uses.

use fanout::{Common, ConfigError, config::Settings, secret::Secret};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    #[serde(skip)]
    pub common: Common,
    /// Address to serve HTTP on (`FANOUT_LISTEN`); port 0 picks a free one.
    pub listen: String,
    /// Largest accepted event body, bytes (`FANOUT_BODY_LIMIT_BYTES`). Larger bodies get 413.
    pub body_limit_bytes: usize,
    /// Most events one `POST /v1/batch` may carry (`FANOUT_BATCH_MAX_EVENTS`); more get 413.
    pub batch_max_events: usize,
    /// Largest accepted `POST /v1/batch` body, bytes (`FANOUT_BATCH_MAX_BYTES`); larger get
    /// 413. Each event's `data` is also held to `FANOUT_BODY_LIMIT_BYTES`.
    pub batch_max_bytes: usize,
    /// The ws nodes the demo page offers (`FANOUT_WS_URLS`): comma-separated `[name=]url`,
    /// e.g. `ws-1=ws://{host}:8081/ws,ws-2=ws://{host}:8082/ws`. `{host}` becomes the host
    /// the page was loaded from.
    pub ws_urls: String,
    /// Jaeger UI base URL (`FANOUT_JAEGER_UI`, e.g. `http://{host}:16686`): the page links each
    /// traced event to its trace there. Needs `FANOUT_EVENT_TRACE_ID=true` on the ws nodes.
    pub jaeger_ui: String,
    /// API keys, comma-separated (`FANOUT_API_KEYS`). When set, every `/v1` endpoint and
    /// `POST /ping` need `Authorization: Bearer <key>`.
    pub api_keys: Secret,
    /// Keep `POST /ping` (the demo) open even when API keys are set (`FANOUT_PUBLIC_PING`).
    pub public_ping: bool,
    /// The webhook signing secret(s), comma-separated (`FANOUT_WEBHOOK_SECRET`): each gives
    /// a `v1` in `X-Fanout-Signature` (a second one during rotation).
    pub webhook_secret: Secret,
    /// Extra certificate authorities (PEM file) a webhook receiver's certificate may chain
    /// to, besides the system's (`FANOUT_WEBHOOK_CA`).
    pub webhook_ca: String,
    /// How long a webhook receiver has to answer, ms (`FANOUT_WEBHOOK_TIMEOUT_MS`).
    pub webhook_timeout_ms: u64,
    /// Most events in one webhook (`FANOUT_WEBHOOK_BATCH_MAX`).
    pub webhook_batch_max: usize,
    /// How long a webhook waits for more events before it goes, ms (`FANOUT_WEBHOOK_BATCH_MS`).
    pub webhook_batch_ms: u64,
    /// How long a webhook is retried before it goes to the dead letters, seconds
    /// (`FANOUT_WEBHOOK_RETRY_SECS`).
    pub webhook_retry_secs: u64,
}

/// One entry of [`Config::ws_urls`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WsNode {
    pub name: String,
    pub url: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: Common::default(),
            listen: "0.0.0.0:8080".into(),
            body_limit_bytes: 64 * 1024,
            batch_max_events: 1000,
            batch_max_bytes: 8 * 1024 * 1024,
            ws_urls: String::new(),
            jaeger_ui: String::new(),
            api_keys: Secret::default(),
            public_ping: false,
            webhook_secret: Secret::default(),
            webhook_ca: String::new(),
            webhook_timeout_ms: 4000,
            webhook_batch_max: 20,
            webhook_batch_ms: 250,
            webhook_retry_secs: 86_400,
        }
    }
}

impl Settings for Config {
    fn common(&self) -> &Common {
        &self.common
    }
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
    fn listen(&self) -> &str {
        &self.listen
    }
    fn validate(&self) -> Result<(), ConfigError> {
        Config::validate(self)
    }
}

impl Config {
    /// Checks the settings only this binary has (see [`Settings::load`] for the rest).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.body_limit_bytes == 0 || self.body_limit_bytes > 1024 * 1024 {
            return Err(ConfigError::invalid(
                "body_limit_bytes",
                "must be between 1 and 1048576 (NATS's default max_payload)",
            ));
        }
        // A batch's acknowledgements wait in one subscription's queue (async-nats holds
        // 65,536 messages per subscription): stay well inside it.
        if self.batch_max_events == 0 || self.batch_max_events > 10_000 {
            return Err(ConfigError::invalid(
                "batch_max_events",
                "must be between 1 and 10000",
            ));
        }
        if self.batch_max_bytes == 0 || self.batch_max_bytes > 256 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "batch_max_bytes",
                "must be between 1 and 268435456",
            ));
        }
        self.ws_nodes()?;
        if self.webhook_batch_max == 0 || self.webhook_batch_max > 1000 {
            return Err(ConfigError::invalid(
                "webhook_batch_max",
                "must be between 1 and 1000",
            ));
        }
        if self.webhook_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "webhook_timeout_ms",
                "must be at least 1",
            ));
        }
        if !self.common.webhook_url.is_empty() {
            self.webhook_poster()
                .map_err(|why| ConfigError::invalid("webhook_url", why))?;
        }
        Ok(())
    }

    /// The webhook receiver's client (`FANOUT_WEBHOOK_URL`, `FANOUT_WEBHOOK_CA`,
    /// `FANOUT_WEBHOOK_TIMEOUT_MS`).
    pub fn webhook_poster(&self) -> Result<fanout::post::Poster, String> {
        fanout::post::Poster::new(
            &self.common.webhook_url,
            &self.webhook_ca,
            "FANOUT_WEBHOOK_CA",
            std::time::Duration::from_millis(self.webhook_timeout_ms),
        )
    }

    /// The webhook signing secrets.
    pub fn webhook_secrets(&self) -> Vec<String> {
        fanout::config::list(self.webhook_secret.expose())
    }

    /// The configured API keys.
    pub fn keys(&self) -> Vec<String> {
        fanout::config::list(self.api_keys.expose())
    }

    /// Parses [`Config::ws_urls`]; unnamed entries are called `node-1`, `node-2`, ...
    pub fn ws_nodes(&self) -> Result<Vec<WsNode>, ConfigError> {
        fanout::config::list(&self.ws_urls)
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let (name, url) = match entry.split_once('=') {
                    Some((name, url)) if !name.contains("://") => (name.trim(), url.trim()),
                    _ => ("", entry.as_str()),
                };
                if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                    return Err(ConfigError::invalid(
                        "ws_urls",
                        format!("{entry:?}: each entry is [name=]ws://… or [name=]wss://…"),
                    ));
                }
                let name = if name.is_empty() {
                    format!("node-{}", i + 1)
                } else {
                    name.to_string()
                };
                Ok(WsNode {
                    name,
                    url: url.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_are_named_entries() {
        let config = Config {
            ws_urls: "ws-1=ws://{host}:8081/ws, wss://b.example/ws ,".into(),
            ..Config::default()
        };
        let nodes = config.ws_nodes().unwrap();
        assert_eq!(
            nodes,
            [
                WsNode {
                    name: "ws-1".into(),
                    url: "ws://{host}:8081/ws".into()
                },
                WsNode {
                    name: "node-2".into(),
                    url: "wss://b.example/ws".into()
                },
            ]
        );
        let bad = Config {
            ws_urls: "http://x".into(),
            ..Config::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("FANOUT_WS_URLS")
        );
    }
}
