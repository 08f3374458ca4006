//! `fanout-api`'s settings: [`fanout::Common`] plus what only the API uses.

use std::path::Path;

use fanout::{Common, ConfigError, config};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(skip)]
    pub common: Common,
    /// Address to serve HTTP on (`FANOUT_LISTEN`); port 0 picks a free one.
    pub listen: String,
    /// Largest accepted event body, bytes (`FANOUT_BODY_LIMIT_BYTES`). Larger bodies get 413.
    pub body_limit_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: Common::default(),
            listen: "0.0.0.0:8080".into(),
            body_limit_bytes: 64 * 1024,
        }
    }
}

impl Config {
    /// Defaults < `file` < environment, validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config: Config = config::load(file)?;
        config.common = config::load(file)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        config::parse_listen(&self.listen)?;
        if self.body_limit_bytes == 0 || self.body_limit_bytes > 1024 * 1024 {
            return Err(ConfigError::invalid(
                "body_limit_bytes",
                "must be between 1 and 1048576 (NATS's default max_payload)",
            ));
        }
        Ok(())
    }
}
