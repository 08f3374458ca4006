//! `fanout`: the whole tier in one process, for trying fanout out, for tests and for an MVP
//! (goeasy's "all in one executable"): the API on `FANOUT_LISTEN` (default `0.0.0.0:8080`,
//! with the demo page), a ws node on `FANOUT_WS_LISTEN` (default `0.0.0.0:8081`), and, when no
//! `FANOUT_NATS_URL` is given, a nats-server child with JetStream in `FANOUT_DATA_DIR` (default
//! `fanout-data`), so that history survives a restart. The child is stopped on exit, and dies
//! with this process if it is killed; nothing is left running.
//!
//! # Layout
//! - [`Config`]: the API's and the ws node's settings, read from the same sources as their own
//!   binaries read them, plus the two of this binary.
//! - [`nats`]: the nats-server child.
//! - [`run`]: both servers on one runtime and one shutdown.
//!
//! It adds nothing to what `fanout-api` and `fanout-ws` do: each runs exactly as its own binary
//! would (its own NATS connection, its own drain), so whatever holds for them holds here.

pub mod nats;

use std::path::Path;

use fanout::{
    ConfigError,
    config::{Settings, Urls, parse_listen},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The settings: the API's and the ws node's (both binaries' `FANOUT_*` variables), plus
/// `FANOUT_WS_LISTEN` and `FANOUT_DATA_DIR`. `FANOUT_LISTEN` is the API's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where the ws node listens (`FANOUT_WS_LISTEN`); the API takes `FANOUT_LISTEN`.
    pub ws_listen: String,
    /// Where the nats-server child keeps its JetStream store (`FANOUT_DATA_DIR`), when no
    /// `FANOUT_NATS_URL` is given.
    pub data_dir: String,
    /// (Flattened for `--check`'s list; the API's last, so that `listen` is the API's.)
    #[serde(flatten)]
    pub ws: fanout_ws::Config,
    #[serde(flatten)]
    pub api: fanout_api::Config,
    /// No `FANOUT_NATS_URL` was given: this process starts its own nats-server.
    #[serde(skip)]
    pub own_nats: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ws_listen: "0.0.0.0:8081".into(),
            data_dir: "fanout-data".into(),
            ws: fanout_ws::Config::default(),
            api: fanout_api::Config::default(),
            own_nats: true,
        }
    }
}

/// This binary's own settings, read apart from the servers' (see [`fanout::config`] on why
/// nothing is flattened when reading).
#[derive(Deserialize)]
#[serde(default)]
struct Own {
    ws_listen: String,
    data_dir: String,
    nats_url: Option<String>,
}

impl Default for Own {
    fn default() -> Self {
        let defaults = Config::default();
        Own {
            ws_listen: defaults.ws_listen,
            data_dir: defaults.data_dir,
            nats_url: None,
        }
    }
}

impl Settings for Config {
    fn common(&self) -> &fanout::Common {
        &self.api.common
    }
    fn common_mut(&mut self) -> &mut fanout::Common {
        &mut self.api.common
    }
    fn listen(&self) -> &str {
        &self.api.listen
    }
    fn validate(&self) -> Result<(), ConfigError> {
        self.api.validate()?;
        self.ws.validate()
    }
    fn check(&self) -> Result<(), ConfigError> {
        self.ws.check()
    }

    /// Each server's settings as its own binary reads them, then this binary's two.
    fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let own: Own = fanout::config::load(file)?;
        let api = fanout_api::Config::load(file)?;
        let mut ws = fanout_ws::Config::load(file)?;
        parse_listen(&own.ws_listen).map_err(|_| {
            ConfigError::invalid(
                "ws_listen",
                format!("{:?} is not a host:port address", own.ws_listen),
            )
        })?;
        ws.listen = own.ws_listen.clone();
        let own_nats = own.nats_url.is_none_or(|url| url.trim().is_empty());
        if own_nats && own.data_dir.trim().is_empty() {
            return Err(ConfigError::invalid(
                "data_dir",
                "give a directory for the nats-server's store (or FANOUT_NATS_URL)",
            ));
        }
        let mut config = Config {
            ws_listen: own.ws_listen,
            data_dir: own.data_dir,
            ws,
            api,
            own_nats,
        };
        if own_nats {
            // None was given: `--check` shows that, and `run` fills in the child's.
            config.api.common.nats_url = Urls::default();
            config.ws.common.nats_url = Urls::default();
        }
        Ok(config)
    }
}

/// Why the process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on FANOUT_WS_LISTEN {addr}: {source}")]
    WsListen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error("API: {0}")]
    Api(#[from] fanout_api::RunError),
    #[error("ws node: {0}")]
    Ws(#[from] fanout_ws::RunError),
}

/// Runs the API on `listener` and a ws node on `FANOUT_WS_LISTEN` (after starting a
/// nats-server child when none was given) until `shutdown` is cancelled or either server
/// fails; then both drain, and the child is stopped.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let Config {
        ws_listen,
        data_dir,
        mut ws,
        mut api,
        own_nats,
    } = config;
    let ws_addr = parse_listen(&ws_listen)?;
    let ws_listener = fanout::process::listen(ws_addr).map_err(|source| RunError::WsListen {
        addr: ws_listen.clone(),
        source,
    })?;
    let nats = if own_nats {
        let nats = nats::Nats::start(Path::new(&data_dir)).await?;
        api.common.nats_url = Urls::parse(nats.url());
        ws.common.nats_url = Urls::parse(nats.url());
        Some(nats)
    } else {
        None
    };
    // Either server ending (an error: NATS refused, say) stops the other.
    let api_done = shutdown.clone();
    let ws_done = shutdown.clone();
    let (api_result, ws_result) = tokio::join!(
        async move {
            let result = fanout_api::run(api, listener, api_done.clone()).await;
            api_done.cancel();
            result
        },
        async move {
            let result = fanout_ws::run(ws, ws_listener, ws_done.clone()).await;
            ws_done.cancel();
            result
        },
    );
    if let Some(nats) = nats {
        nats.stop().await;
    }
    api_result?;
    ws_result?;
    Ok(())
}
