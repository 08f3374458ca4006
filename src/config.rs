//! Settings: documented defaults < optional TOML file < `FANOUT_*` environment variables.
//!
//! Each binary has one serde `Config` of its own; the settings both share live in [`Common`].
//! A binary deserializes the same sources twice, once into [`Common`] and once into its own
//! struct, so every setting keeps a flat name: the TOML key `nats_url` is the environment
//! variable `FANOUT_NATS_URL`. (Flat structs rather than `#[serde(flatten)]`, because
//! flattening loses the string-to-number conversion environment values need.)
//!
//! This module validates what it owns and names the offending setting in every error; it does
//! not connect to anything.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Most regions a tier has.
pub const MAX_REGIONS: usize = 16;

/// Prefix of every environment variable.
pub const ENV_PREFIX: &str = "FANOUT";

/// A setting that is missing, malformed or out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The message already includes the cause, so it is not repeated as a source.
    #[error("cannot read configuration: {0}")]
    Load(String),
    #[error("invalid setting {setting} ({env}): {message}", env = env_name(setting))]
    Invalid {
        setting: &'static str,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
}

impl From<config::ConfigError> for ConfigError {
    fn from(err: config::ConfigError) -> Self {
        let message = err.to_string();
        ConfigError::Load(if message.contains("for key `") {
            format!("{message} (a key `name` is set by the variable {ENV_PREFIX}_NAME)")
        } else {
            message
        })
    }
}

impl ConfigError {
    pub fn invalid(setting: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting,
            message: message.into(),
        }
    }
}

/// The environment variables a settings struct reads: one per field, plus `FANOUT_CONFIG`.
/// (Serializes `settings` to learn its field names, so the list cannot drift from the code.)
pub fn env_names(settings: &impl Serialize) -> Vec<String> {
    let value = serde_json::to_value(settings).expect("settings serialize");
    let mut names: Vec<String> = value
        .as_object()
        .map(|fields| fields.keys().map(|key| env_name(key)).collect())
        .unwrap_or_default();
    names.push(env_name("config"));
    names
}

/// The environment variable that sets `key`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.to_ascii_uppercase())
}

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `--config FILE` (or `--config=FILE`), else `FANOUT_CONFIG`.
    pub file: Option<PathBuf>,
    /// `--check`: validate the settings, print them and exit, without starting.
    pub check: bool,
}

/// Reads `--config FILE` (or `--config=FILE`, else `FANOUT_CONFIG`) and `--check`. Any other
/// argument is an error, so a typo never goes unnoticed.
pub fn args_from(mut args: impl Iterator<Item = String>, usage: &str) -> Result<Args, ConfigError> {
    let mut parsed = Args::default();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            let path = args
                .next()
                .ok_or_else(|| ConfigError::Usage(format!("--config needs a file\n{usage}")))?;
            parsed.file = Some(PathBuf::from(path));
        } else if let Some(path) = arg.strip_prefix("--config=") {
            parsed.file = Some(PathBuf::from(path));
        } else if arg == "--check" {
            parsed.check = true;
        } else if arg == "-h" || arg == "--help" {
            return Err(ConfigError::Usage(usage.to_string()));
        } else {
            return Err(ConfigError::Usage(format!(
                "unknown argument {arg:?}\n{usage}"
            )));
        }
    }
    parsed.file = parsed
        .file
        .or_else(|| std::env::var_os(env_name("config")).map(PathBuf::from));
    Ok(parsed)
}

/// What `--check` prints for a setting that is a secret.
pub const MASKED: &str = "********";

/// `key=value` lines of every setting (`FANOUT_KEY=value`, sorted), with the values of
/// `secrets` masked and any password or token in `nats_url` hidden: what `--check` prints.
pub fn effective(settings: &[serde_json::Value], secrets: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = settings
        .iter()
        .filter_map(|value| value.as_object())
        .flat_map(|fields| fields.iter())
        .map(|(key, value)| {
            let text = match value {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let shown = if key == "nats_url" {
                list(&text)
                    .iter()
                    .map(|url| mask_userinfo(url))
                    .collect::<Vec<_>>()
                    .join(",")
            } else if secrets.contains(&key.as_str()) && !text.is_empty() {
                MASKED.to_string()
            } else {
                text
            };
            format!("{}={shown}", env_name(key))
        })
        .collect();
    lines.sort();
    lines.dedup();
    lines
}

/// `nats://user:pass@host` → `nats://user:********@host`; `nats://token@host` →
/// `nats://********@host`.
fn mask_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{MASKED}"),
        None => MASKED.to_string(),
    };
    if scheme.is_empty() {
        format!("{masked}@{host}")
    } else {
        format!("{scheme}://{masked}@{host}")
    }
}

/// Deserializes defaults (the struct's `Default`) < `file` < environment into `T`.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(file) = file {
        builder = builder.add_source(
            config::File::from(file)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let sources = builder
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__"),
        )
        .build()?;
    Ok(sources.try_deserialize()?)
}

/// One binary's settings: [`Common`] plus its own. The defaults of [`Settings::load`] and
/// [`Settings::env_names`] are the same for every binary.
pub trait Settings: Default + Serialize + DeserializeOwned {
    fn common(&self) -> &Common;
    fn common_mut(&mut self) -> &mut Common;
    /// The `listen` setting (`host:port`).
    fn listen(&self) -> &str;
    /// Checks this binary's own settings (the common ones are checked by [`Settings::load`]).
    fn validate(&self) -> Result<(), ConfigError>;
    /// What `--check` verifies beyond [`Settings::validate`]: what the binary would read at
    /// start (key files, for example). By default nothing more.
    fn check(&self) -> Result<(), ConfigError> {
        Ok(())
    }
    /// The settings whose values `--check` masks.
    fn secrets() -> &'static [&'static str] {
        &[]
    }

    /// Defaults < `file` < environment, validated.
    fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut settings: Self = load(file)?;
        *settings.common_mut() = load(file)?;
        settings.common().validate()?;
        parse_listen(settings.listen())?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every environment variable this binary reads.
    fn env_names() -> Vec<String> {
        let mut names = env_names(&Common::default());
        names.extend(env_names(&Self::default()));
        names.sort();
        names.dedup();
        names
    }
}

/// Settings both binaries share.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Common {
    /// NATS servers, comma-separated (`nats://a:4222,nats://b:4222`). The client connects to
    /// one and fails over to the others.
    pub nats_url: String,
    /// This process's name in logs, in NATS (`/connz`) and in the `welcome` frame.
    /// Default: the host name.
    pub node_id: String,
    /// First token(s) of every NATS subject and of the stream name.
    pub prefix: String,
    /// How long the stream keeps an event (history window), seconds.
    pub history_max_age_secs: u64,
    /// How many events the stream keeps per channel.
    pub history_max_messages: i64,
    /// Stream replicas: 1 for a single NATS server, 3 in a three-node cluster.
    pub history_replicas: usize,
    /// `file` (survives a NATS restart) or `memory`.
    pub history_storage: String,
    /// How long a publish waits for the stream's acknowledgement, milliseconds.
    pub publish_timeout_ms: u64,
    /// OTLP/HTTP collector base URL (`http://jaeger:4318`); `/v1/traces` is appended. Empty:
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT` decides, and without it tracing is off.
    pub otlp_endpoint: String,
    /// `text` (default) or `json` log lines.
    pub log_format: String,
    /// This process's region: the name of its NATS cluster (e.g. `eu`). Empty (with
    /// `regions` empty): one region, no region anywhere in names, subjects or frames.
    pub region: String,
    /// Every region of the tier, comma-separated (`eu,us`); `region` is one of them.
    pub regions: String,
    /// PEM file of the CA(s) that signed the NATS servers' certificates (implies TLS).
    pub nats_tls_ca: String,
    /// PEM client certificate and key, for NATS servers that verify clients (mutual TLS).
    pub nats_tls_cert: String,
    pub nats_tls_key: String,
    /// A NATS `.creds` file (user JWT and NKey seed), the standard for NATS accounts.
    pub nats_creds: String,
    /// Runtime worker threads (`FANOUT_WORKER_THREADS`); 0: one per CPU this process may use.
    /// Where several fanout processes share a few cores, 1 each costs less CPU per event.
    pub worker_threads: usize,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            nats_url: "nats://127.0.0.1:4222".into(),
            node_id: default_node_id(),
            prefix: "fanout".into(),
            history_max_age_secs: 600,
            history_max_messages: 1000,
            history_replicas: 1,
            history_storage: "file".into(),
            publish_timeout_ms: 5000,
            otlp_endpoint: String::new(),
            log_format: "text".into(),
            region: String::new(),
            regions: String::new(),
            nats_tls_ca: String::new(),
            nats_tls_cert: String::new(),
            nats_tls_key: String::new(),
            nats_creds: String::new(),
            worker_threads: 0,
        }
    }
}

fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fanout".into())
}

impl Common {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_threads > 1024 {
            return Err(ConfigError::invalid(
                "worker_threads",
                "must be between 0 (one per CPU) and 1024",
            ));
        }
        if self.nats_servers().is_empty() {
            return Err(ConfigError::invalid("nats_url", "no server given"));
        }
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !id_ok {
            return Err(ConfigError::invalid(
                "node_id",
                format!(
                    "{:?}: use 1-64 letters, digits, '_', '-' or '.'",
                    self.node_id
                ),
            ));
        }
        let prefix_ok = self.prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        });
        if !prefix_ok {
            return Err(ConfigError::invalid(
                "prefix",
                format!(
                    "{:?}: use NATS subject tokens of letters, digits, '_' or '-', separated by '.'",
                    self.prefix
                ),
            ));
        }
        if self.history_max_age_secs == 0 {
            return Err(ConfigError::invalid(
                "history_max_age_secs",
                "must be at least 1",
            ));
        }
        if self.history_max_messages < 1 {
            return Err(ConfigError::invalid(
                "history_max_messages",
                "must be at least 1",
            ));
        }
        if !(1..=5).contains(&self.history_replicas) {
            return Err(ConfigError::invalid(
                "history_replicas",
                "must be between 1 and 5",
            ));
        }
        if !matches!(self.history_storage.as_str(), "file" | "memory") {
            return Err(ConfigError::invalid(
                "history_storage",
                format!("{:?}: use \"file\" or \"memory\"", self.history_storage),
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::invalid(
                "log_format",
                format!("{:?}: use \"text\" or \"json\"", self.log_format),
            ));
        }
        let endpoint = self.otlp_endpoint.trim();
        let http = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !(endpoint.is_empty() || http) {
            return Err(ConfigError::invalid(
                "otlp_endpoint",
                format!("{endpoint:?}: give the collector's base URL, e.g. http://jaeger:4318"),
            ));
        }
        if self.publish_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "publish_timeout_ms",
                "must be at least 1",
            ));
        }
        self.validate_regions()?;
        if self.nats_tls_cert.is_empty() != self.nats_tls_key.is_empty() {
            return Err(ConfigError::invalid(
                "nats_tls_cert",
                "a client certificate needs its key (FANOUT_NATS_TLS_KEY), and the reverse",
            ));
        }
        Ok(())
    }

    fn validate_regions(&self) -> Result<(), ConfigError> {
        let regions = self.regions();
        match (self.region.is_empty(), regions.is_empty()) {
            (true, true) => return Ok(()),
            (false, true) => {
                return Err(ConfigError::invalid(
                    "regions",
                    "list every region (FANOUT_REGIONS=eu,us) when FANOUT_REGION is set",
                ));
            }
            (true, false) => {
                return Err(ConfigError::invalid(
                    "region",
                    "name this process's region (one of FANOUT_REGIONS)",
                ));
            }
            (false, false) => {}
        }
        for region in &regions {
            let ok = region.len() <= 32
                && region.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
                });
            if !ok {
                return Err(ConfigError::invalid(
                    "regions",
                    format!(
                        "{region:?}: use 1-32 lowercase letters, digits, '_' or '-' (the NATS cluster's name)"
                    ),
                ));
            }
        }
        let mut unique = regions.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != regions.len() {
            return Err(ConfigError::invalid("regions", "a region is listed twice"));
        }
        if regions.len() > MAX_REGIONS {
            return Err(ConfigError::invalid(
                "regions",
                format!("at most {MAX_REGIONS} regions"),
            ));
        }
        if !regions.contains(&self.region) {
            return Err(ConfigError::invalid(
                "region",
                format!(
                    "{:?} is not one of FANOUT_REGIONS ({})",
                    self.region, self.regions
                ),
            ));
        }
        Ok(())
    }

    /// The regions of [`Common::regions`], in the order given; empty for one region.
    pub fn regions(&self) -> Vec<String> {
        list(&self.regions)
    }

    /// The servers of [`Common::nats_url`], trimmed, empty entries dropped.
    pub fn nats_servers(&self) -> Vec<String> {
        list(&self.nats_url)
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

/// The entries of a comma-separated setting, trimmed, empty ones dropped.
pub fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(String::from)
        .collect()
}

/// Parses a `listen` setting (`host:port`, port 0 for any free port).
pub fn parse_listen(value: &str) -> Result<std::net::SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            ConfigError::invalid("listen", format!("{value:?} is not a host:port address"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Common::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_setting() {
        let common = Common {
            prefix: "fan.*".into(),
            ..Common::default()
        };
        let err = common.validate().unwrap_err().to_string();
        assert!(
            err.contains("prefix") && err.contains("FANOUT_PREFIX"),
            "{err}"
        );

        let common = Common {
            history_storage: "disk".into(),
            ..Common::default()
        };
        let err = common.validate().unwrap_err().to_string();
        assert!(err.contains("FANOUT_HISTORY_STORAGE"), "{err}");

        let err = parse_listen("nope").unwrap_err().to_string();
        assert!(err.contains("FANOUT_LISTEN"), "{err}");
        assert_eq!(parse_listen("127.0.0.1:0").unwrap().port(), 0);
    }

    #[test]
    fn regions_are_both_or_neither() {
        let with = |region: &str, regions: &str| Common {
            region: region.into(),
            regions: regions.into(),
            ..Common::default()
        };
        with("eu", "eu,us").validate().unwrap();
        with("", "").validate().unwrap();
        for (region, regions, env) in [
            ("eu", "", "FANOUT_REGIONS"),
            ("", "eu,us", "FANOUT_REGION"),
            ("ap", "eu,us", "FANOUT_REGION"),
            ("eu", "eu,eu", "FANOUT_REGIONS"),
            ("eu", "eu,U S", "FANOUT_REGIONS"),
        ] {
            let err = with(region, regions).validate().unwrap_err().to_string();
            assert!(err.contains(env), "{region}/{regions}: {err}");
        }
    }

    #[test]
    fn servers_are_comma_separated() {
        let common = Common {
            nats_url: " nats://a:1, nats://b:2 ,".into(),
            ..Common::default()
        };
        assert_eq!(common.nats_servers(), ["nats://a:1", "nats://b:2"]);
    }

    #[test]
    fn toml_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fanout.toml");
        std::fs::write(&path, "prefix = \"fromfile\"\nhistory_max_messages = 7\n").unwrap();
        let common: Common = load(Some(&path)).unwrap();
        assert_eq!(common.prefix, "fromfile");
        assert_eq!(common.history_max_messages, 7);
        assert_eq!(common.history_max_age_secs, 600);
        let missing = load::<Common>(Some(&dir.path().join("missing.toml")));
        assert!(missing.is_err());
    }

    #[test]
    fn args_name_the_config_file() {
        let args = |v: &[&str]| {
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into_iter()
        };
        let parsed = args_from(args(&["--config", "a.toml"]), "usage").unwrap();
        assert_eq!(parsed.file, Some(PathBuf::from("a.toml")));
        assert!(!parsed.check);
        let parsed = args_from(args(&["--check", "--config=b.toml"]), "usage").unwrap();
        assert_eq!(parsed.file, Some(PathBuf::from("b.toml")));
        assert!(parsed.check);
        assert!(args_from(args(&["--bogus"]), "usage").is_err());
    }

    #[test]
    fn check_masks_secrets_and_nats_passwords() {
        let settings = serde_json::json!({
            "nats_url": "nats://ada:hunter2@a:4222, nats://s3cret@b:4222,nats://c:4222",
            "jwt_secret": "hunter2",
            "api_keys": "",
            "heartbeat_secs": 25,
        });
        let lines = effective(&[settings], &["jwt_secret", "api_keys"]);
        assert_eq!(
            lines,
            [
                "FANOUT_API_KEYS=",
                "FANOUT_HEARTBEAT_SECS=25",
                "FANOUT_JWT_SECRET=********",
                "FANOUT_NATS_URL=nats://ada:********@a:4222,nats://********@b:4222,nats://c:4222",
            ]
        );
    }
}
