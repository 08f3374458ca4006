//! `fanout-ws`'s settings: [`fanout::Common`] plus what only a WebSocket node uses.

use std::time::Duration;

use fanout::{
    Common, ConfigError,
    config::{Settings, Word},
    secret::Secret,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};

/// Who may connect (`FANOUT_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum AuthMode {
    /// Anyone, as `?user=` (development only).
    None,
    /// A JWT (see [`crate::auth`]).
    Jwt,
}

impl Word for AuthMode {
    const WORDS: &'static [(&'static str, AuthMode)] =
        &[("none", AuthMode::None), ("jwt", AuthMode::Jwt)];
}

impl TryFrom<String> for AuthMode {
    type Error = String;
    fn try_from(word: String) -> Result<AuthMode, String> {
        AuthMode::parse(&word)
    }
}

/// Whether WebSocket clients that offer permessage-deflate get it (`FANOUT_COMPRESSION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Compression {
    /// Never negotiated: every frame as it is.
    Off,
    /// Negotiated with every client that offers it (RFC 7692), each event compressed once.
    On,
}

impl Word for Compression {
    const WORDS: &'static [(&'static str, Compression)] =
        &[("off", Compression::Off), ("on", Compression::On)];
}

impl TryFrom<String> for Compression {
    type Error = String;
    fn try_from(word: String) -> Result<Compression, String> {
        Compression::parse(&word)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    #[serde(skip)]
    pub common: Common,
    /// Address to serve `/ws` on (`FANOUT_LISTEN`); port 0 picks a free one.
    pub listen: String,
    /// Seconds between server pings; a client that has not answered by the next one is
    /// closed (4002). Sent to clients in `welcome`.
    pub heartbeat_secs: u64,
    /// Channels one connection may be in at once.
    pub max_subscriptions: usize,
    /// Largest frame a client may send, bytes; larger ones close the connection with 1009.
    /// A compressed message counts as it inflates.
    pub max_message_bytes: usize,
    /// permessage-deflate (RFC 7692) with the WebSocket clients that offer it: `on` or `off`.
    pub compression: Compression,
    /// Frames smaller than this many bytes go uncompressed (compressing them gains little).
    pub compression_min_bytes: usize,
    /// Channels whose events clients may take as fossil deltas (`"delta":"fossil"`),
    /// comma-separated patterns (`scores:*`); empty: none. The node keeps each such
    /// channel's last event while it has subscribers.
    pub delta_channels: String,
    /// Frames waiting for a connection's socket before it counts as a slow consumer and is
    /// closed (4001).
    pub queue_capacity: usize,
    /// Bytes waiting for a connection's socket before it counts as a slow consumer and is
    /// closed (4001), whichever of the two bounds comes first (centrifuge's default: 1 MiB).
    pub queue_max_bytes: usize,
    /// Recent events each channel keeps in memory (0: none), so that a resume from a recent
    /// position (every long-poll, most reconnects) needs no read from the stream.
    pub recent_events: usize,
    /// Bytes of recent events all channels together may keep.
    pub recent_max_bytes: usize,
    /// 0 (the default): every event is written as soon as it arrives. Otherwise a channel's
    /// events are written at most every this many milliseconds, together: several frames per
    /// `send` at rates where each event would be one, for less CPU per delivery at the cost
    /// of up to this much latency.
    pub coalesce_ms: u64,
    /// On shutdown, clients are closed (1001) spread over this window, milliseconds, so they
    /// reconnect to the other nodes gradually. 0 closes them all at once.
    pub drain_window_ms: u64,
    /// The most clients per second a drain sends to the rest of the tier: a node with more
    /// than `drain_rate × drain_window_ms` clients still closes them within the window, but
    /// tells them (`reconnect_after_ms`) to come back spread over `clients / drain_rate`
    /// seconds, so the nodes that take them see at most this rate of connects and resumes.
    pub drain_rate: u64,
    /// How long shutdown waits for connections to close after the drain, seconds.
    pub shutdown_timeout_secs: u64,
    /// Put the trace id in `event` frames (`"trace"`), so a page can link to the trace.
    pub event_trace_id: bool,
    /// `none` (anyone, as `?user=`: development only) or `jwt` (see [`crate::auth`]).
    pub auth: AuthMode,
    /// HS256 secret, with `auth = "jwt"`.
    pub jwt_secret: Secret,
    /// Path of a PEM public key (RSA for RS256, Ed25519 for EdDSA), with `auth = "jwt"`.
    pub jwt_public_key: String,
    /// Browser origins allowed to connect, comma-separated (`https://app.example`); empty:
    /// any. Requests without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: String,
    /// Connections one IP address may hold at once; 0: no limit.
    pub max_connections_per_ip: usize,
    /// Connections this node holds at most; beyond, new ones are answered 503 with
    /// `Retry-After` before any work. 0: no limit.
    pub max_connections: usize,
    /// New connections this node admits per second (a token bucket; 0: no limit); beyond,
    /// 503 with `Retry-After`.
    pub accept_rate: u32,
    /// Resume replays that read the stream at once on this node (each channel of a resuming
    /// subscribe is one); more wait their turn. Replays from the recent events in memory do
    /// not count. Bounds what a reconnect storm asks of NATS.
    pub replay_concurrency: usize,
    /// The bucket's size: new connections admitted at once (0: as many as `accept_rate`).
    pub accept_burst: u32,
    /// Events one connection may publish per second (and in a burst); over it: `rate_limited`.
    pub publish_rate_per_sec: u32,
    /// Bytes the node may hold on behalf of all its clients together: incomplete frames and
    /// fragmented messages they sent, and what waits for their sockets. A connection that
    /// would take more is closed with 1013 ("try again later"); the others are not touched.
    pub max_buffered_bytes: usize,
    /// A frame (or fragmented message) a client has started must be complete within this
    /// many milliseconds, else the connection is closed with 1008.
    pub frame_timeout_ms: u64,
    /// An HTTP request's head (a WebSocket upgrade's included) must arrive within this many
    /// milliseconds of the connection (or of the previous request), else the socket is closed.
    pub handshake_timeout_ms: u64,
    /// Every this many milliseconds the node publishes a probe through the stream and must
    /// get it back through its subscription; two missing in a row make it unready (503)
    /// and rebuild its subscriptions. 0: off.
    pub canary_interval_ms: u64,
    /// Where browsers reach this node, announced for discovery (`GET /v1/nodes`). Empty:
    /// `ws://{host}:<listening port>/ws`, where the page replaces `{host}` with its own host.
    /// `{node}` becomes this node's id: behind a proxy that routes by node (the compose
    /// files' edge: `ws://{host}:8081/node/{node}/ws`), every replica can share one setting.
    pub public_url: String,
    /// UDP address of the WebTransport listener (HTTP/3, `https://<node>/wt`); empty: off.
    pub webtransport_listen: String,
    /// Where browsers reach the WebTransport listener, announced for discovery. Empty:
    /// `https://{host}:<its port>/wt`; `{node}` becomes this node's id.
    pub webtransport_public_url: String,
    /// PEM certificate chain and key for WebTransport; both empty: a self-signed ECDSA
    /// certificate, renewed, whose hash the node announces.
    pub tls_cert: String,
    pub tls_key: String,
    /// Proxy hooks (`crate::proxy`): where the app's backend decides connects, subscribes,
    /// client publishes, refreshes and answers client `rpc`s. Empty: that hook is off.
    pub proxy_connect_url: String,
    pub proxy_subscribe_url: String,
    pub proxy_publish_url: String,
    pub proxy_refresh_url: String,
    pub proxy_rpc_url: String,
    /// How long a hook may take before the client is told `proxy_timeout`.
    pub proxy_timeout_ms: u64,
    /// Which of the client's HTTP headers go to the connect hook (comma-separated names,
    /// any case; `cookie` forwards the cookies).
    pub proxy_headers: String,
    /// PEM certificates trusted for `https://` hooks besides the system's roots.
    pub proxy_ca: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: Common::default(),
            listen: "0.0.0.0:8081".into(),
            heartbeat_secs: 25,
            max_subscriptions: 128,
            max_message_bytes: 64 * 1024,
            compression: Compression::On,
            compression_min_bytes: 256,
            delta_channels: String::new(),
            queue_capacity: 512,
            queue_max_bytes: 1 << 20,
            recent_events: 64,
            recent_max_bytes: 64 << 20,
            coalesce_ms: 0,
            drain_window_ms: 3000,
            drain_rate: 2000,
            replay_concurrency: 32,
            shutdown_timeout_secs: 10,
            event_trace_id: false,
            auth: AuthMode::None,
            jwt_secret: Secret::default(),
            jwt_public_key: String::new(),
            allowed_origins: String::new(),
            max_connections_per_ip: 0,
            max_connections: 0,
            accept_rate: 0,
            accept_burst: 0,
            publish_rate_per_sec: 10,
            public_url: String::new(),
            max_buffered_bytes: 64 << 20,
            frame_timeout_ms: 10_000,
            handshake_timeout_ms: 30_000,
            canary_interval_ms: 5000,
            webtransport_listen: String::new(),
            webtransport_public_url: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            proxy_connect_url: String::new(),
            proxy_subscribe_url: String::new(),
            proxy_publish_url: String::new(),
            proxy_refresh_url: String::new(),
            proxy_rpc_url: String::new(),
            proxy_timeout_ms: 1000,
            proxy_headers: String::new(),
            proxy_ca: String::new(),
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
    /// The JWT settings as the node would read them at start (the key file included).
    fn check(&self) -> Result<(), ConfigError> {
        self.jwt_key().map(drop)
    }
}

impl Config {
    /// The key tokens are checked with (`None` with `auth = "none"`): `jwt_secret` (HS256) or
    /// the PEM file `jwt_public_key` (RS256 or EdDSA, by what the file holds); exactly one.
    pub fn jwt_key(&self) -> Result<Option<(DecodingKey, Algorithm)>, ConfigError> {
        match self.auth {
            AuthMode::None => Ok(None),
            AuthMode::Jwt => match (self.jwt_secret.is_empty(), self.jwt_public_key.is_empty()) {
                (false, true) => Ok(Some((
                    DecodingKey::from_secret(self.jwt_secret.expose().as_bytes()),
                    Algorithm::HS256,
                ))),
                (true, false) => public_key(&self.jwt_public_key).map(Some),
                _ => Err(ConfigError::invalid(
                    "auth",
                    "\"jwt\" needs exactly one of FANOUT_JWT_SECRET (HS256) or FANOUT_JWT_PUBLIC_KEY (RS256/EdDSA)",
                )),
            },
        }
    }

    /// Checks the settings only this binary has (see [`Settings::load`] for the rest).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&'static str, usize, usize, usize); 17] = [
            (
                "compression_min_bytes",
                self.compression_min_bytes,
                0,
                16 << 20,
            ),
            (
                "proxy_timeout_ms",
                self.proxy_timeout_ms as usize,
                1,
                600_000,
            ),
            (
                "max_buffered_bytes",
                self.max_buffered_bytes,
                1 << 20,
                1 << 40,
            ),
            (
                "frame_timeout_ms",
                self.frame_timeout_ms as usize,
                100,
                3_600_000,
            ),
            (
                "handshake_timeout_ms",
                self.handshake_timeout_ms as usize,
                100,
                3_600_000,
            ),
            ("recent_events", self.recent_events, 0, 100_000),
            ("recent_max_bytes", self.recent_max_bytes, 0, 1 << 34),
            ("heartbeat_secs", self.heartbeat_secs as usize, 1, 3600),
            ("max_subscriptions", self.max_subscriptions, 1, 100_000),
            ("max_message_bytes", self.max_message_bytes, 128, 16 << 20),
            ("queue_capacity", self.queue_capacity, 1, 1 << 20),
            ("queue_max_bytes", self.queue_max_bytes, 64 * 1024, 1 << 30),
            (
                "shutdown_timeout_secs",
                self.shutdown_timeout_secs as usize,
                1,
                3600,
            ),
            ("drain_window_ms", self.drain_window_ms as usize, 0, 600_000),
            ("drain_rate", self.drain_rate as usize, 1, 1_000_000),
            ("replay_concurrency", self.replay_concurrency, 1, 10_000),
            ("coalesce_ms", self.coalesce_ms as usize, 0, 1000),
        ];
        if self.canary_interval_ms != 0 && !(100..=600_000).contains(&self.canary_interval_ms) {
            return Err(ConfigError::invalid(
                "canary_interval_ms",
                format!(
                    "{} is outside 100..=600000 (or 0: off)",
                    self.canary_interval_ms
                ),
            ));
        }
        for (setting, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{value} is outside {min}..={max}"),
                ));
            }
        }
        self.webtransport_addr()?;
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return Err(ConfigError::invalid(
                "tls_cert",
                "FANOUT_TLS_CERT and FANOUT_TLS_KEY go together (neither: a self-signed certificate)",
            ));
        }
        for (setting, _) in self.proxy_urls() {
            self.proxy_poster(setting)?;
        }
        Ok(())
    }

    /// Each proxy hook's setting and URL (empty: off).
    pub fn proxy_urls(&self) -> [(&'static str, &str); 5] {
        [
            ("proxy_connect_url", &self.proxy_connect_url),
            ("proxy_subscribe_url", &self.proxy_subscribe_url),
            ("proxy_publish_url", &self.proxy_publish_url),
            ("proxy_refresh_url", &self.proxy_refresh_url),
            ("proxy_rpc_url", &self.proxy_rpc_url),
        ]
    }

    /// The client of the hook set by `setting` (`None`: off).
    pub fn proxy_poster(
        &self,
        setting: &'static str,
    ) -> Result<Option<fanout::post::Poster>, ConfigError> {
        let url = self
            .proxy_urls()
            .into_iter()
            .find(|(name, _)| *name == setting)
            .map_or("", |(_, url)| url)
            .trim();
        if url.is_empty() {
            return Ok(None);
        }
        fanout::post::Poster::new(
            url,
            &self.proxy_ca,
            "FANOUT_PROXY_CA",
            Duration::from_millis(self.proxy_timeout_ms),
        )
        .map(Some)
        .map_err(|why| ConfigError::invalid(setting, why))
    }

    /// The WebTransport listener's UDP address (`None`: off).
    pub fn webtransport_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        match self.webtransport_listen.trim() {
            "" => Ok(None),
            addr => addr.parse().map(Some).map_err(|_| {
                ConfigError::invalid(
                    "webtransport_listen",
                    format!("{addr:?} is not a host:port address (empty: off)"),
                )
            }),
        }
    }

    /// The allowed origins, parsed; empty means any.
    pub fn origins(&self) -> Vec<String> {
        fanout::config::list(&self.allowed_origins)
            .into_iter()
            .map(|origin| origin.trim_end_matches('/').to_string())
            .filter(|origin| !origin.is_empty())
            .collect()
    }

    pub fn frame_timeout(&self) -> Duration {
        Duration::from_millis(self.frame_timeout_ms)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}

fn public_key(path: &str) -> Result<(DecodingKey, Algorithm), ConfigError> {
    let pem = std::fs::read(path).map_err(|err| {
        ConfigError::invalid("jwt_public_key", format!("cannot read {path}: {err}"))
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    Err(ConfigError::invalid(
        "jwt_public_key",
        format!("{path} is neither an RSA nor an Ed25519 public key in PEM"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_are_checked() {
        Config::default().validate().unwrap();
        let config = Config {
            queue_capacity: 0,
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("FANOUT_QUEUE_CAPACITY"), "{err}");
    }
}
