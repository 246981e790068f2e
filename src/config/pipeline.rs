//! The case pipeline's configuration: the broker the workflow uses, the scanner, the hosts
//! steps run on, the workflows, the executor and the archiver. Parsed with the rest of the
//! config; [`PipelineConfig::validate`] rejects what serde cannot (an unknown placeholder in
//! a command template, a regex that does not compile, a step naming an unknown host) so a
//! mistake stops start-up instead of failing a case at 3 a.m.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::conductor::template::Template;

/// `[broker]`: which broker the workflow talks through.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `amqp://user:pass@host:port/vhost`. Unset: the embedded broker, in-process.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanMode {
    /// inotify (or the platform's watcher) with a debouncer.
    Notify,
    /// Periodic rescans, for network filesystems where inotify sees nothing.
    Poll,
}

/// `[scanner]`: how new cases are found.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScannerConfig {
    pub enabled: bool,
    /// The watched folder; empty means `<data_dir>/cases`.
    pub dir: PathBuf,
    pub mode: ScanMode,
    /// How often polling mode rescans (and the debouncer's tick in notify mode).
    pub poll_interval_ms: u64,
    /// How long events settle before a directory is looked at.
    pub debounce_ms: u64,
    /// A case is ready when this file exists inside it. Empty: quiet period only.
    pub ready_marker: String,
    /// A case without the marker is ready after this many seconds with no writes; 0 = never.
    pub quiet_period_secs: u64,
    /// How many directory levels below `dir` a case sits: 1 = `<dir>/<case>`,
    /// 3 = `<dir>/<room>/<patient>/<study>`.
    pub case_depth: usize,
    /// Names (any path part) to ignore; `*` matches any run of characters.
    pub ignore: Vec<String>,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        ScannerConfig {
            enabled: true,
            dir: PathBuf::new(),
            mode: ScanMode::Notify,
            poll_interval_ms: 1000,
            debounce_ms: 100,
            ready_marker: "_CASE_READY".into(),
            quiet_period_secs: 0,
            case_depth: 1,
            ignore: vec![
                "*.extracting".into(),
                "*.zip.tmp".into(),
                "*.backup.*".into(),
                "extract_*.tmp".into(),
                ".*".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    /// This machine: steps run as child processes, transfers are local copies.
    Local,
    /// A server reached over SSH ([`crate::hpc::ssh`]): steps run through a detaching
    /// wrapper, transfers go over SFTP and are verified by `sha256sum` on the server.
    Ssh,
}

/// `[[hosts]]`: a machine steps run on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    #[serde(default = "local_kind")]
    pub kind: HostKind,
    /// Where case directories live on the host; empty means `<data_dir>/work/<name>`.
    #[serde(default)]
    pub work_root: PathBuf,
    /// GPU indices on the host that mqic may lease.
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// A monitored GPU with less free memory than this is not leased.
    #[serde(default = "default_min_free_memory_mib")]
    pub min_free_memory_mib: u64,
    /// `ssh` hosts: the server's name or IP address.
    #[serde(default)]
    pub address: String,
    /// `ssh` hosts: the SSH port.
    #[serde(default = "ssh_port")]
    pub port: u16,
    /// `ssh` hosts: the user to log in as.
    #[serde(default)]
    pub user: String,
    /// `ssh` hosts: the private key (OpenSSH format, unencrypted); keep it mode 600.
    #[serde(default)]
    pub key_file: PathBuf,
    /// `ssh` hosts: the known_hosts file the server's key is checked against.
    #[serde(default)]
    pub known_hosts: PathBuf,
    /// `ssh` hosts: accept and record an unknown server key (never a changed one).
    #[serde(default)]
    pub accept_new: bool,
}

fn ssh_port() -> u16 {
    22
}

impl HostConfig {
    /// A `local` host with no GPUs and the default work root.
    pub fn local(name: &str) -> HostConfig {
        HostConfig {
            name: name.into(),
            kind: HostKind::Local,
            work_root: PathBuf::new(),
            gpus: Vec::new(),
            min_free_memory_mib: default_min_free_memory_mib(),
            address: String::new(),
            port: ssh_port(),
            user: String::new(),
            key_file: PathBuf::new(),
            known_hosts: PathBuf::new(),
            accept_new: false,
        }
    }

    /// The checks of one host's own keys. Errors name the key: `hosts[gpu1].user: ...`.
    pub fn validate(&self) -> Result<(), String> {
        let key = |field: &str| format!("hosts[{}].{field}", self.name);
        match self.kind {
            HostKind::Local => {
                let set = [
                    ("address", !self.address.is_empty()),
                    ("user", !self.user.is_empty()),
                    ("key_file", !self.key_file.as_os_str().is_empty()),
                    ("known_hosts", !self.known_hosts.as_os_str().is_empty()),
                    ("accept_new", self.accept_new),
                    ("port", self.port != ssh_port()),
                ];
                if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                    return Err(format!("{}: only for kind = \"ssh\"", key(field)));
                }
            }
            HostKind::Ssh => {
                if self.address.trim().is_empty() {
                    return Err(format!("{}: an ssh host needs an address", key("address")));
                }
                if self.port == 0 {
                    return Err(format!("{}: must be 1 to 65535", key("port")));
                }
                if self.user.is_empty() {
                    return Err(format!("{}: an ssh host needs a user", key("user")));
                }
                for (field, path) in [
                    ("key_file", &self.key_file),
                    ("known_hosts", &self.known_hosts),
                ] {
                    if path.as_os_str().is_empty() {
                        return Err(format!("{}: an ssh host needs one", key(field)));
                    }
                }
                if !self.work_root.is_absolute() {
                    return Err(format!(
                        "{}: an ssh host needs an absolute work root on the server",
                        key("work_root")
                    ));
                }
            }
        }
        Ok(())
    }
}

fn local_kind() -> HostKind {
    HostKind::Local
}

fn default_min_free_memory_mib() -> u64 {
    1024
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// Copy the case to the host.
    Upload,
    /// Run the command on the host.
    Execute,
    /// Copy results back from the host.
    Download,
    /// Run the command on this machine.
    Local,
}

/// How a failed step is retried.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub backoff_initial_secs: f64,
    pub backoff_max_secs: f64,
    /// Each delay is scaled by a random factor in `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_initial_secs: 5.0,
            backoff_max_secs: 300.0,
            jitter: 0.2,
        }
    }
}

/// Whether a non-zero exit code is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitPolicy {
    #[default]
    Permanent,
    Retryable,
}

/// `[[workflows.<name>.steps]]`: one step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub name: String,
    pub kind: StepKind,
    #[serde(default = "local_host")]
    pub host: String,
    /// Whether the step needs a GPU lease (only GPU steps take one).
    #[serde(default)]
    pub gpu: bool,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// The command template for `execute` and `local` steps.
    #[serde(default)]
    pub command: Option<String>,
    /// The working directory template; default: the case's directory on the host.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Transfer source/destination templates for `upload` and `download` steps.
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub dest: Option<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Progress regexes: two captures `(done, total)` or one percentage capture.
    #[serde(default)]
    pub progress: Vec<String>,
    /// Output patterns that make a failure retryable.
    #[serde(default)]
    pub retryable_patterns: Vec<String>,
    #[serde(default)]
    pub nonzero_exit: ExitPolicy,
}

fn local_host() -> String {
    "local".into()
}

fn default_timeout() -> u64 {
    3600
}

impl StepConfig {
    /// The source and destination templates of a transfer step, with their defaults.
    pub fn transfer_paths(&self) -> (String, String) {
        let (src, dst) = match self.kind {
            StepKind::Upload => ("{case_dir}", "{remote_case_dir}/input"),
            _ => ("{remote_case_dir}/output", "{result_dir}"),
        };
        (
            self.source.clone().unwrap_or_else(|| src.into()),
            self.dest.clone().unwrap_or_else(|| dst.into()),
        )
    }
}

/// `[workflows.<name>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    pub steps: Vec<StepConfig>,
}

/// `[conductor]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConductorConfig {
    /// The workflow a case runs when `new_case_found` names none.
    pub default_workflow: String,
    /// A GPU lease outlives its step's timeout by this much before it is reclaimed.
    pub lease_grace_secs: u64,
    /// Where downloaded results go; empty means `<data_dir>/results`.
    pub results_dir: PathBuf,
    /// How many events the store keeps for the dashboard.
    pub event_log_len: u64,
}

impl Default for ConductorConfig {
    fn default() -> Self {
        ConductorConfig {
            default_workflow: "default".into(),
            lease_grace_secs: 60,
            results_dir: PathBuf::new(),
            event_log_len: 10_000,
        }
    }
}

/// `[workers]`: which queue workers run inside `mqic serve`. Turn one off when `mqic worker`
/// processes on other hosts do that job (two executors on one queue would share the work,
/// which is fine, but the lab may want steps to run only there).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    pub executor: bool,
    pub transfer: bool,
    /// GPU monitoring (see [`CuratorConfig`]). Off: configured GPUs are leased unchecked.
    pub curator: bool,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            executor: true,
            transfer: true,
            curator: true,
        }
    }
}

/// `[curator]`: GPU monitoring.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CuratorConfig {
    /// `system_monitor` is published this often; each one samples every host with GPUs.
    pub interval_ms: u64,
    /// One sampling command (nvidia-smi, locally or over SSH) that runs longer is killed
    /// and the host's GPUs are in error.
    pub timeout_ms: u64,
    /// Samples kept per GPU for the dashboard's plots.
    pub history_len: usize,
    /// Try NVML (`libnvidia-ml.so.1`) for this machine's GPUs before nvidia-smi.
    pub nvml: bool,
    /// The nvidia-smi program: a name looked up on PATH, or a path.
    pub nvidia_smi: String,
}

impl Default for CuratorConfig {
    fn default() -> Self {
        CuratorConfig {
            interval_ms: 10_000,
            timeout_ms: 10_000,
            history_len: 2880,
            nvml: true,
            nvidia_smi: "nvidia-smi".into(),
        }
    }
}

impl CuratorConfig {
    /// A GPU state older than this is stale (its GPU counts as missing): three intervals
    /// plus the time the two queries of one sample may take.
    pub fn stale_after_ms(&self) -> u64 {
        self.interval_ms
            .saturating_mul(3)
            .saturating_add(self.timeout_ms.saturating_mul(2))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms < 100 {
            return Err("curator.interval_ms: must be at least 100".into());
        }
        if self.timeout_ms < 100 {
            return Err("curator.timeout_ms: must be at least 100".into());
        }
        if self.history_len == 0 || self.history_len > 1_000_000 {
            return Err("curator.history_len: must be between 1 and 1000000".into());
        }
        if self.nvidia_smi.trim().is_empty() {
            return Err("curator.nvidia_smi: must name a program".into());
        }
        Ok(())
    }
}

/// `[executor]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Steps run at once by one executor.
    pub max_parallel: u16,
    /// Output kept in memory and sent with a result (the whole output stays in the log file).
    pub output_tail_bytes: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            max_parallel: 8,
            output_tail_bytes: 64 * 1024,
        }
    }
}

/// `[archiver]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {
    /// Finished cases older than this move to the archive tables.
    pub retention_days: u64,
    /// `archive_data` is published this often; 0 = only on request.
    pub interval_secs: u64,
    /// Where store backups go; empty means `<data_dir>/backups`.
    pub backup_dir: PathBuf,
    /// How many backups are kept.
    pub keep_backups: usize,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        ArchiverConfig {
            retention_days: 180,
            interval_secs: 86_400,
            backup_dir: PathBuf::new(),
            keep_backups: 7,
        }
    }
}

/// Every pipeline section, with the data dir they are resolved against.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig<'a> {
    pub broker: &'a BrokerConfig,
    pub scanner: &'a ScannerConfig,
    pub hosts: &'a [HostConfig],
    pub workflows: &'a BTreeMap<String, WorkflowConfig>,
    pub conductor: &'a ConductorConfig,
}

/// Resolves an empty configured path to `<data_dir>/<default>`, a relative one against
/// the data dir's parent working directory (as given).
pub fn resolve(data_dir: &Path, configured: &Path, default: &str) -> PathBuf {
    if configured.as_os_str().is_empty() {
        data_dir.join(default)
    } else {
        configured.to_path_buf()
    }
}

impl PipelineConfig<'_> {
    /// Cross-field checks. Errors name the key: `workflows.moqui.steps[1].command: ...`.
    pub fn validate(&self) -> Result<(), String> {
        if self.scanner.case_depth == 0 || self.scanner.case_depth > 8 {
            return Err("scanner.case_depth: must be between 1 and 8".into());
        }
        if self.scanner.ready_marker.is_empty() && self.scanner.quiet_period_secs == 0 {
            return Err(
                "scanner: with ready_marker empty, quiet_period_secs must be above 0".into(),
            );
        }
        if let Some(url) = &self.broker.url {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err("broker.url: must start with amqp:// or amqps://".into());
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for h in self.hosts {
            if !names.insert(h.name.as_str()) {
                return Err(format!("hosts: the name '{}' is used twice", h.name));
            }
            h.validate()?;
        }
        if !self.workflows.is_empty()
            && !self
                .workflows
                .contains_key(&self.conductor.default_workflow)
        {
            return Err(format!(
                "conductor.default_workflow: no workflow named '{}'",
                self.conductor.default_workflow
            ));
        }
        for (wname, w) in self.workflows {
            if w.steps.is_empty() {
                return Err(format!(
                    "workflows.{wname}.steps: at least one step is needed"
                ));
            }
            let mut step_names = std::collections::BTreeSet::new();
            for (i, s) in w.steps.iter().enumerate() {
                let key = format!("workflows.{wname}.steps[{i}]");
                if !step_names.insert(s.name.as_str()) {
                    return Err(format!("{key}.name: '{}' is used twice", s.name));
                }
                if s.name.is_empty()
                    || !s
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(format!("{key}.name: use letters, digits, '_' and '-' only"));
                }
                let host = self.hosts.iter().find(|h| h.name == s.host);
                let Some(host) = host else {
                    return Err(format!("{key}.host: no host named '{}'", s.host));
                };
                if s.gpu && host.gpus.is_empty() {
                    return Err(format!(
                        "{key}.gpu: the step needs a GPU but host '{}' lists none",
                        host.name
                    ));
                }
                if s.timeout_secs == 0 {
                    return Err(format!("{key}.timeout_secs: must be above 0"));
                }
                if s.retry.max_attempts == 0 {
                    return Err(format!("{key}.retry.max_attempts: must be at least 1"));
                }
                if !(0.0..1.0).contains(&s.retry.jitter) {
                    return Err(format!("{key}.retry.jitter: must be in [0, 1)"));
                }
                match s.kind {
                    StepKind::Execute | StepKind::Local => {
                        let Some(command) = &s.command else {
                            return Err(format!(
                                "{key}.command: an {:?} step needs a command",
                                s.kind
                            )
                            .to_lowercase());
                        };
                        Template::parse_command(command)
                            .map_err(|e| format!("{key}.command: {e}"))?;
                        if s.source.is_some() || s.dest.is_some() {
                            return Err(format!(
                                "{key}: source/dest are for upload and download steps"
                            ));
                        }
                    }
                    StepKind::Upload | StepKind::Download => {
                        if s.command.is_some() {
                            return Err(format!("{key}.command: transfer steps take no command"));
                        }
                        let (src, dst) = s.transfer_paths();
                        Template::parse(&src).map_err(|e| format!("{key}.source: {e}"))?;
                        Template::parse(&dst).map_err(|e| format!("{key}.dest: {e}"))?;
                    }
                }
                if let Some(w) = &s.workdir {
                    Template::parse(w).map_err(|e| format!("{key}.workdir: {e}"))?;
                }
                for (j, p) in s.progress.iter().chain(&s.retryable_patterns).enumerate() {
                    regex::Regex::new(p).map_err(|e| {
                        format!(
                            "{key}: pattern {j} '{p}' is not a valid regex: {}",
                            e.to_string().lines().last().unwrap_or("")
                        )
                    })?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod curator_tests {
    use crate::config::Config;

    #[test]
    fn curator_keys_are_validated_and_min_free_memory_defaults_per_host() {
        let c = Config::from_toml("[[hosts]]\nname = \"local\"\ngpus = [0]\n", "t").unwrap();
        assert_eq!(c.hosts[0].min_free_memory_mib, 1024);
        assert!(c.workers.curator);
        assert_eq!(c.curator.stale_after_ms(), 3 * 10_000 + 2 * 10_000);
        for (text, key) in [
            ("[curator]\ninterval_ms = 10\n", "curator.interval_ms"),
            ("[curator]\ntimeout_ms = 0\n", "curator.timeout_ms"),
            ("[curator]\nhistory_len = 0\n", "curator.history_len"),
            ("[curator]\nnvidia_smi = \" \"\n", "curator.nvidia_smi"),
            ("[curator]\nintervall_ms = 100\n", "intervall_ms"),
        ] {
            let err = Config::from_toml(text, "t").unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
