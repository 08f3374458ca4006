//! Settings: documented defaults < optional TOML file < `FANOUT_*` environment variables,
//! parsed once into typed values: enums ([`Storage`], [`LogFormat`]), lists ([`List`]:
//! regions; [`Urls`]: NATS servers), secrets that mask themselves
//! ([`crate::secret::Secret`]); what is left to check (ranges, names) is checked at start-up,
//! naming the setting.
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
    /// Names the variable of the setting that could not be read, when the message names its
    /// key.
    fn from(err: config::ConfigError) -> Self {
        let message = err.to_string();
        let key = message
            .split_once("for key `")
            .and_then(|(_, rest)| rest.split('`').next());
        ConfigError::Load(match key {
            Some(key) => format!("{message} (set by {})", env_name(key)),
            None => message,
        })
    }
}

/// A setting that is one of a few words: read from its word, refused with the words it may
/// be.
pub trait Word: Sized + Copy + 'static {
    /// Every value, with its word.
    const WORDS: &'static [(&'static str, Self)];

    fn parse(word: &str) -> Result<Self, String> {
        Self::WORDS
            .iter()
            .find(|(w, _)| *w == word)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let words: Vec<String> =
                    Self::WORDS.iter().map(|(w, _)| format!("{w:?}")).collect();
                format!("{word:?}: use {}", words.join(" or "))
            })
    }
}

/// Where the stream keeps events (`FANOUT_HISTORY_STORAGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Storage {
    /// On disk: survives a NATS restart.
    #[default]
    File,
    Memory,
}

impl Word for Storage {
    const WORDS: &'static [(&'static str, Storage)] =
        &[("file", Storage::File), ("memory", Storage::Memory)];
}

impl TryFrom<String> for Storage {
    type Error = String;
    fn try_from(word: String) -> Result<Storage, String> {
        Storage::parse(&word)
    }
}

/// How log lines are written (`FANOUT_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, with the trace id inside traced spans.
    Json,
}

impl Word for LogFormat {
    const WORDS: &'static [(&'static str, LogFormat)] =
        &[("text", LogFormat::Text), ("json", LogFormat::Json)];
}

impl TryFrom<String> for LogFormat {
    type Error = String;
    fn try_from(word: String) -> Result<LogFormat, String> {
        LogFormat::parse(&word)
    }
}

/// A list setting: comma-separated in a variable (`eu,us`), a list or a string in a file.
/// Entries are trimmed, empty ones dropped, once, when the settings are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(Vec<String>);

impl List {
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> List {
        List(
            entries
                .into_iter()
                .map(|entry| entry.as_ref().trim().to_string())
                .filter(|entry| !entry.is_empty())
                .collect(),
        )
    }

    /// A comma-separated text's entries.
    pub fn parse(text: &str) -> List {
        List::new(text.split(','))
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.0.clone()
    }
}

impl std::ops::Deref for List {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<List, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Entries(Vec<String>),
        }
        Ok(match Raw::deserialize(deserializer)? {
            Raw::Text(text) => List::parse(&text),
            Raw::Entries(entries) => List::new(entries),
        })
    }
}

/// As its variable says it: comma-separated.
impl Serialize for List {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.join(","))
    }
}

/// NATS server URLs (`FANOUT_NATS_URL`): a [`List`] whose user and password (or token), if a
/// URL carries them, never print.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Urls(List);

impl Urls {
    pub fn parse(text: &str) -> Urls {
        Urls(List::parse(text))
    }
}

impl From<&str> for Urls {
    fn from(text: &str) -> Urls {
        Urls::parse(text)
    }
}

impl From<&str> for List {
    fn from(text: &str) -> List {
        List::parse(text)
    }
}

impl std::ops::Deref for Urls {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl Serialize for Urls {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let shown: Vec<String> = self.0.iter().map(|url| mask_userinfo(url)).collect();
        serializer.serialize_str(&shown.join(","))
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

/// What the command line asks for (clap reads it; `--help` says so).
#[derive(Debug, Default, PartialEq, Eq, clap::Parser)]
#[command(
    after_help = "Settings come from FILE (TOML) and FANOUT_* environment variables, the \
                  environment winning; see README.md, \"Configuration\"."
)]
pub struct Args {
    /// A TOML file of settings (a key `name` is the variable FANOUT_NAME).
    #[arg(long = "config", value_name = "FILE", env = "FANOUT_CONFIG")]
    pub file: Option<PathBuf>,
    /// Validate the settings, print them (secrets masked) and exit, starting nothing.
    #[arg(long)]
    pub check: bool,
}

impl Args {
    /// Reads `args` (the program's name first) as binary `name`'s command line (`about`:
    /// what `--help` says it is).
    pub fn parse_from(
        name: &'static str,
        about: &'static str,
        args: impl IntoIterator<Item = String>,
    ) -> Result<Args, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let command = Args::command().name(name).about(about);
        Args::from_arg_matches(&command.try_get_matches_from(args)?)
    }
}

/// What `--check` prints for a setting that is a secret.
pub use crate::secret::MASKED;

/// `key=value` lines of every setting (`FANOUT_KEY=value`, sorted): what `--check` prints.
/// Secrets are masked already: their types serialize so.
pub fn effective(settings: &[serde_json::Value]) -> Vec<String> {
    let mut lines: Vec<String> = settings
        .iter()
        .filter_map(|value| value.as_object())
        .flat_map(|fields| fields.iter())
        .map(|(key, value)| {
            let text = match value {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            format!("{}={text}", env_name(key))
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
    pub nats_url: Urls,
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
    pub history_storage: Storage,
    /// How long a publish waits for the stream's acknowledgement, milliseconds.
    pub publish_timeout_ms: u64,
    /// OTLP/HTTP collector base URL (`http://jaeger:4318`); `/v1/traces` is appended. Empty:
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT` decides, and without it tracing is off.
    pub otlp_endpoint: String,
    /// `text` (default) or `json` log lines.
    pub log_format: LogFormat,
    /// This process's region: the name of its NATS cluster (e.g. `eu`). Empty (with
    /// `regions` empty): one region, no region anywhere in names, subjects or frames.
    pub region: String,
    /// Every region of the tier, comma-separated (`eu,us`); `region` is one of them.
    pub regions: List,
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
    /// Serve CPU profiles at `GET /debug/pprof/profile` (`FANOUT_PROFILING`); off by default.
    pub profiling: bool,
    /// Where lifecycle webhooks go (`FANOUT_WEBHOOK_URL`); empty: no lifecycle events. The ws
    /// nodes report to the tier's decider only when it is set.
    pub webhook_url: String,
    /// Channels whose clients' publishes become `client_event`s (`FANOUT_WEBHOOK_CLIENT_EVENTS`,
    /// comma-separated patterns, `*` any run of characters).
    pub webhook_client_events: List,
    /// How long a vacated channel or a removed member waits for a comeback
    /// (`FANOUT_WEBHOOK_DEBOUNCE_MS`).
    pub webhook_debounce_ms: u64,
    /// The Pusher protocol's apps (`FANOUT_PUSHER_APPS`: `app_id:key:secret[:prefix]`,
    /// comma-separated; empty: off). A secret: masked wherever settings are shown.
    pub pusher_apps: crate::secret::Secret,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            nats_url: Urls::parse("nats://127.0.0.1:4222"),
            node_id: default_node_id(),
            prefix: "fanout".into(),
            history_max_age_secs: 600,
            history_max_messages: 1000,
            history_replicas: 1,
            history_storage: Storage::File,
            publish_timeout_ms: 5000,
            otlp_endpoint: String::new(),
            log_format: LogFormat::Text,
            region: String::new(),
            regions: List::default(),
            nats_tls_ca: String::new(),
            nats_tls_cert: String::new(),
            nats_tls_key: String::new(),
            nats_creds: String::new(),
            worker_threads: 0,
            profiling: false,
            webhook_url: String::new(),
            webhook_client_events: List::default(),
            webhook_debounce_ms: 3000,
            pusher_apps: crate::secret::Secret::default(),
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
        if self.nats_url.is_empty() {
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
        crate::pusher::apps(self.pusher_apps.expose())
            .map_err(|why| ConfigError::invalid("pusher_apps", why))?;
        if self.nats_tls_cert.is_empty() != self.nats_tls_key.is_empty() {
            return Err(ConfigError::invalid(
                "nats_tls_cert",
                "a client certificate needs its key (FANOUT_NATS_TLS_KEY), and the reverse",
            ));
        }
        Ok(())
    }

    fn validate_regions(&self) -> Result<(), ConfigError> {
        let regions = &self.regions;
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
        for region in regions.iter() {
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
        let mut unique = regions.to_vec();
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
                    self.region,
                    self.regions.join(",")
                ),
            ));
        }
        Ok(())
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

        // A value no variant takes is refused as it is read, naming its variable.
        let raw = serde_json::json!({ "history_storage": "disk" });
        let err = ConfigError::from(config::ConfigError::Message(
            serde_json::from_value::<Common>(raw)
                .unwrap_err()
                .to_string()
                + " for key `history_storage`",
        ))
        .to_string();
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
        assert_eq!(&*common.nats_url, ["nats://a:1", "nats://b:2"]);
        let file: Common =
            serde_json::from_value(serde_json::json!({ "regions": [" eu", "us", ""] })).unwrap();
        assert_eq!(&*file.regions, ["eu", "us"], "a file may list them");
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
            std::iter::once("fanout-ws".to_string())
                .chain(v.iter().map(|s| s.to_string()))
                .collect::<Vec<_>>()
        };
        let parsed = Args::parse_from("fanout-ws", "", args(&["--config", "a.toml"])).unwrap();
        assert_eq!(parsed.file, Some(PathBuf::from("a.toml")));
        assert!(!parsed.check);
        let parsed =
            Args::parse_from("fanout-ws", "", args(&["--check", "--config=b.toml"])).unwrap();
        assert_eq!(parsed.file, Some(PathBuf::from("b.toml")));
        assert!(parsed.check);
        let err = Args::parse_from("fanout-ws", "", args(&["--bogus"])).unwrap_err();
        assert!(err.to_string().contains("--bogus"), "{err}");
    }

    #[test]
    fn check_masks_secrets_and_nats_passwords() {
        #[derive(Serialize)]
        struct Shown {
            nats_url: Urls,
            jwt_secret: crate::secret::Secret,
            api_keys: crate::secret::Secret,
            heartbeat_secs: u64,
        }
        let settings = serde_json::to_value(Shown {
            nats_url: "nats://ada:hunter2@a:4222, nats://s3cret@b:4222,nats://c:4222".into(),
            jwt_secret: "hunter2".into(),
            api_keys: "".into(),
            heartbeat_secs: 25,
        })
        .unwrap();
        let lines = effective(&[settings]);
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
