//! The typed configuration. It is parsed once, from TOML, into these structs; an unknown key
//! or a bad value stops start-up with the key and its line. The defaults in code equal the
//! embedded `assets/mqic.toml` (a test checks it), so a missing key and no file at all mean
//! the same thing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::amqp::auth::{self, User, Users};
use crate::amqp::broker::Limits;

pub mod management;
pub mod pipeline;

pub use management::{ManagementConfig, PrometheusConfig};
pub use pipeline::{
    ArchiverConfig, BrokerConfig, ConductorConfig, CuratorConfig, ExecutorConfig, ExitPolicy,
    HostConfig, HostKind, PipelineConfig, RetryPolicy, ScanMode, ScannerConfig, StepConfig,
    StepKind, WorkersConfig, WorkflowConfig,
};

/// The default configuration file, compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../../assets/mqic.toml");

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where mqic keeps its state.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub amqp: AmqpConfig,
    pub broker: BrokerConfig,
    pub scanner: ScannerConfig,
    pub conductor: ConductorConfig,
    pub workers: WorkersConfig,
    pub executor: ExecutorConfig,
    pub archiver: ArchiverConfig,
    pub curator: CuratorConfig,
    pub hosts: Vec<HostConfig>,
    pub workflows: std::collections::BTreeMap<String, WorkflowConfig>,
    pub management: ManagementConfig,
    pub prometheus: PrometheusConfig,
    pub web: WebConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./mqic-data"),
            log: LogConfig::default(),
            amqp: AmqpConfig::default(),
            broker: BrokerConfig::default(),
            scanner: ScannerConfig::default(),
            conductor: ConductorConfig::default(),
            workers: WorkersConfig::default(),
            executor: ExecutorConfig::default(),
            archiver: ArchiverConfig::default(),
            curator: CuratorConfig::default(),
            hosts: vec![HostConfig::local("local")],
            workflows: Default::default(),
            management: ManagementConfig::default(),
            prometheus: PrometheusConfig::default(),
            web: WebConfig::default(),
        }
    }
}

/// `[web]`: the dashboard.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Ask for a login even on a loopback address (always asked for elsewhere).
    pub require_login: bool,
    /// Hours a login lasts.
    pub session_hours: u64,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            require_login: false,
            session_hours: 12,
        }
    }
}

impl WebConfig {
    /// Whether the dashboard asks for a login: bound beyond loopback, or configured so.
    pub fn login_required(&self) -> bool {
        self.require_login || !self.listen.ip().is_loopback()
    }
}

/// The user tags that may log in to the dashboard (as RabbitMQ's management UI).
pub const WEB_TAGS: &[&str] = &["administrator", "management", "monitoring", "policymaker"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `mqic=debug`); `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

/// `[amqp]`: the embedded broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub listen: SocketAddr,
    pub vhosts: Vec<String>,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_secs: u16,
    pub handshake_timeout_secs: u64,
    pub max_message_size: u64,
    pub max_connections: usize,
    pub memory_high_watermark: Watermark,
    /// Below this much free space under the data dir, publishers are blocked.
    #[serde(deserialize_with = "disk_free_limit")]
    pub disk_free_limit: u64,
    pub loopback_users: Vec<String>,
    pub users: Vec<UserConfig>,
    pub tls: Option<TlsConfig>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            listen: "127.0.0.1:5672".parse().expect("valid address"),
            vhosts: vec!["/".into()],
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat_secs: 60,
            handshake_timeout_secs: 10,
            max_message_size: 16 * 1024 * 1024,
            max_connections: 4096,
            memory_high_watermark: Watermark::Fraction(0.4),
            disk_free_limit: 50_000_000,
            loopback_users: vec!["guest".into()],
            users: vec![UserConfig {
                name: "guest".into(),
                password_hash: "bXFpYxMdLzgI7a9g+49ciQyCWD15wV0CEjSw1w1R5i1AdomK".into(),
                tags: vec!["administrator".into()],
                vhosts: vec!["/".into()],
            }],
            tls: None,
        }
    }
}

/// `[[amqp.users]]`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// RabbitMQ SHA-256 format: base64(salt ++ sha256(salt ++ password)).
    #[serde(deserialize_with = "password_hash")]
    pub password_hash: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "default_vhosts")]
    pub vhosts: Vec<String>,
}

impl std::fmt::Debug for UserConfig {
    /// Hashes are secrets too: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .field("tags", &self.tags)
            .field("vhosts", &self.vhosts)
            .finish()
    }
}

fn default_vhosts() -> Vec<String> {
    vec!["/".into()]
}

fn password_hash<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !auth::is_valid_hash(&s) {
        return Err(serde::de::Error::custom(
            "password_hash is not a RabbitMQ SHA-256 hash (make one with `mqic config hash-password`)",
        ));
    }
    Ok(s)
}

/// `[amqp.tls]`: an AMQPS listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The memory high watermark: a share of physical memory or an absolute size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Watermark {
    Fraction(f64),
    Bytes(u64),
}

impl Watermark {
    /// The limit in bytes on a machine with `total` bytes of memory.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Watermark::Fraction(f) => (total as f64 * f) as u64,
            Watermark::Bytes(b) => b,
        }
    }

    pub fn parse(s: &str) -> Result<Watermark, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("'{s}' is not a percentage"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("'{s}' is not between 0% and 100%"));
            }
            return Ok(Watermark::Fraction(p / 100.0));
        }
        parse_size(s).map(Watermark::Bytes).ok_or_else(|| {
            format!("'{s}' is neither a percentage (\"40%\") nor a size (\"512MiB\")")
        })
    }
}

impl<'de> Deserialize<'de> for Watermark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Watermark::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `disk_free_limit`: a size in bytes, "50MB", "1GiB" or a plain integer.
fn disk_free_limit<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size(s.trim()).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "disk_free_limit '{s}' is not a size (\"50MB\", \"1GiB\" or a number of bytes)"
            ))
        }),
    }
}

/// Parses "512MiB", "2GiB", "100MB", "4096" (bytes).
fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A configuration error, one line: what is wrong, where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!(" line {line}")
                })
                .unwrap_or_default();
            ConfigError(format!(
                "{origin}{location}: {}",
                e.message().trim().replace('\n', " ")
            ))
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// The embedded defaults.
    pub fn embedded() -> Config {
        Config::from_toml(DEFAULT_TOML, "embedded mqic.toml").expect("the embedded config is valid")
    }

    /// Checks what serde cannot: cross-field rules.
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.pipeline()
            .validate()
            .and_then(|()| self.curator.validate())
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        management::validate(self.amqp.listen, &self.management, &self.prometheus)
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let a = &self.amqp;
        let fail =
            |key: &str, why: String| Err(ConfigError(format!("{origin}: amqp.{key}: {why}")));
        if a.frame_max < 4096 {
            return fail(
                "frame_max",
                format!("{} is below the minimum 4096", a.frame_max),
            );
        }
        if a.channel_max == 0 {
            return fail("channel_max", "must be at least 1".into());
        }
        if a.max_message_size > 512 * 1024 * 1024 {
            return fail("max_message_size", "must be at most 512 MiB".into());
        }
        if a.vhosts.is_empty() {
            return fail("vhosts", "at least one vhost is needed".into());
        }
        for user in &a.users {
            if let Some(v) = user
                .vhosts
                .iter()
                .find(|v| *v != "*" && !a.vhosts.contains(v))
            {
                return fail(
                    "users",
                    format!(
                        "user '{}' names vhost '{v}', which is not in amqp.vhosts",
                        user.name
                    ),
                );
            }
        }
        self.validate_web(origin)?;
        Ok(())
    }

    fn validate_web(&self, origin: &str) -> Result<(), ConfigError> {
        let w = &self.web;
        let fail = |key: &str, why: String| Err(ConfigError(format!("{origin}: web.{key}: {why}")));
        if !w.enabled {
            return Ok(());
        }
        if w.session_hours == 0 || w.session_hours > 24 * 30 {
            return fail(
                "session_hours",
                format!("{} is not between 1 and 720", w.session_hours),
            );
        }
        if w.login_required() {
            let loopback_only = !w.listen.ip().is_loopback();
            let can_log_in = self.amqp.users.iter().any(|u| {
                u.tags.iter().any(|t| WEB_TAGS.contains(&t.as_str()))
                    && !(loopback_only && self.amqp.loopback_users.contains(&u.name))
            });
            if !can_log_in {
                return fail(
                    "listen",
                    format!(
                        "the dashboard on {} needs a login, but no [[amqp.users]] entry can log in there (one needs a tag among {} and, off loopback, must not be in amqp.loopback_users)",
                        w.listen,
                        WEB_TAGS.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    /// The pipeline sections, for validation and the workers.
    pub fn pipeline(&self) -> PipelineConfig<'_> {
        PipelineConfig {
            broker: &self.broker,
            scanner: &self.scanner,
            hosts: &self.hosts,
            workflows: &self.workflows,
            conductor: &self.conductor,
        }
    }

    /// The scanned folder.
    pub fn scan_dir(&self) -> PathBuf {
        pipeline::resolve(&self.data_dir, &self.scanner.dir, "cases")
    }

    /// Where downloaded results go.
    pub fn results_dir(&self) -> PathBuf {
        pipeline::resolve(&self.data_dir, &self.conductor.results_dir, "results")
    }

    /// Where store backups go.
    pub fn backup_dir(&self) -> PathBuf {
        pipeline::resolve(&self.data_dir, &self.archiver.backup_dir, "backups")
    }

    /// A host's work root.
    pub fn work_root(&self, host: &HostConfig) -> PathBuf {
        pipeline::resolve(
            &self.data_dir,
            &host.work_root,
            &format!("work/{}", host.name),
        )
    }

    /// The broker limits this config sets.
    pub fn limits(&self) -> Limits {
        let a = &self.amqp;
        Limits {
            frame_max: a.frame_max,
            channel_max: a.channel_max,
            heartbeat_secs: a.heartbeat_secs,
            max_message_size: a.max_message_size as usize,
            max_connections: a.max_connections,
            handshake_timeout: Duration::from_secs(a.handshake_timeout_secs),
        }
    }

    /// The users this config defines.
    pub fn users(&self) -> Users {
        Users::new(self.amqp.users.iter().map(|u| {
            User::new(
                u.name.clone(),
                u.password_hash.clone(),
                u.tags.clone(),
                u.vhosts.clone(),
                self.amqp.loopback_users.contains(&u.name),
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_equal_code_defaults() {
        assert_eq!(Config::embedded(), Config::default());
        assert_eq!(Config::from_toml("", "empty").unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let err = Config::from_toml(
            "data_dir = \"/x\"\n\n[amqp]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n",
            "lab.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("lab.toml line 5:"), "{err}");
        assert!(err.contains("unknown field `lisen`"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn bad_values_are_reported_with_their_line() {
        let err = Config::from_toml("[amqp]\nmemory_high_watermark = \"lots\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml line 2:"), "{err}");
        let err = Config::from_toml("[amqp]\nfr ame_max = 1\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = Config::from_toml("[amqp]\nframe_max = 100\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("amqp.frame_max"), "{err}");
        let err = Config::from_toml(
            "[[amqp.users]]\nname = \"x\"\npassword_hash = \"plain\"\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 3") && err.contains("password_hash"),
            "{err}"
        );
    }

    #[test]
    fn watermarks_and_sizes() {
        assert_eq!(Watermark::parse("40%").unwrap(), Watermark::Fraction(0.4));
        assert_eq!(
            Watermark::parse("512MiB").unwrap(),
            Watermark::Bytes(512 << 20)
        );
        assert_eq!(
            Watermark::parse("2GB").unwrap(),
            Watermark::Bytes(2_000_000_000)
        );
        assert!(Watermark::parse("120%").is_err());
        assert!(Watermark::parse("12 parsecs").is_err());
        assert_eq!(Watermark::Fraction(0.5).bytes(1000), 500);
    }

    #[test]
    fn disk_free_limit_takes_a_size_and_names_a_bad_one() {
        let c = Config::from_toml("[amqp]\ndisk_free_limit = \"1GiB\"\n", "c.toml").unwrap();
        assert_eq!(c.amqp.disk_free_limit, 1 << 30);
        let c = Config::from_toml("[amqp]\ndisk_free_limit = 4096\n", "c.toml").unwrap();
        assert_eq!(c.amqp.disk_free_limit, 4096);
        assert_eq!(Config::default().amqp.disk_free_limit, 50_000_000);
        let err = Config::from_toml("[amqp]\n\ndisk_free_limit = \"lots\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("disk_free_limit") && err.contains("'lots'"),
            "{err}"
        );
    }

    #[test]
    fn user_hashes_are_not_printed() {
        let c = Config::default();
        assert!(!format!("{c:?}").contains("bXFpY"));
    }
}
