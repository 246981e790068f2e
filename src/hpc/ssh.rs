//! One SSH server (host kind `ssh`): a single russh session per host, reused by every exec
//! channel and by one SFTP session, kept alive, and reconnected with backoff when it drops.
//!
//! The server's key is checked against the configured known_hosts file: a changed key is
//! refused with a message naming the host and the file (and line); an unknown one is refused
//! unless `accept_new` is set for the host, in which case it is recorded there. The private
//! key is read once at start and never logged; a key file that group or others can read is
//! reported with a warning.
//!
//! [`SshHost::exec`] is the small building block other parts call (GPU monitoring runs
//! `nvidia-smi` with it): it returns the exit status, stdout and stderr of one command on its
//! own channel. [`SshHost::run`] gives the same answer through a `/bin/sh` kept open on the
//! session (the transfer worker hashes files with it, the remote runner starts, polls and
//! signals steps with it): sshd starts every exec through the user's login shell, which may
//! read a `.bashrc` that takes a quarter of a second, once per command.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::ChannelMsg;
use russh_sftp::client::SftpSession;

use crate::config::{HostConfig, HostKind};

/// Download throughput is window-bound: 16 MiB gave about 3x russh's 2 MiB default
/// (`dependencies.md` §1).
const WINDOW: u32 = 16 << 20;
/// A keepalive every so often; the session is dropped after this many unanswered.
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 3;
/// Connection attempts per [`SshHost::session`] call, with doubling waits in between.
const CONNECT_TRIES: u32 = 4;
const CONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// A TCP connect plus handshake that takes longer than this has failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Exec channels open at once per host. OpenSSH allows 10 sessions per connection
/// (`MaxSessions`); the SFTP session takes one, and some room is left.
pub const MAX_EXEC_CHANNELS: usize = 6;
/// Shells kept open per session for [`SshHost::run`]; with the exec channels and the SFTP
/// session that makes OpenSSH's 10.
const MAX_HELPERS: usize = 3;
/// [`SshHost::exec`] keeps at most this much of stdout and of stderr.
pub const MAX_EXEC_OUTPUT: usize = 64 << 20;

/// russh's algorithm preferences, with AES-256-GCM put first where the CPU has AES and
/// carry-less multiply instructions: then it costs both ends less CPU per byte than
/// ChaCha20-Poly1305 (russh's and OpenSSH's first choice), which matters when the transfer
/// shares a small machine's cores with sshd and hashing. Elsewhere the order is russh's.
fn preferred_algorithms() -> russh::Preferred {
    let mut preferred = russh::Preferred::default();
    #[cfg(target_arch = "x86_64")]
    let fast_aes = std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    let fast_aes = std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let fast_aes = false;
    if fast_aes {
        let gcm = russh::cipher::AES_256_GCM;
        let mut order = vec![gcm];
        order.extend(preferred.cipher.iter().copied().filter(|c| *c != gcm));
        preferred.cipher = order.into();
    }
    preferred
}

/// The connection settings of an `ssh` host, from its `[[hosts]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The host's name in the config (for messages).
    pub name: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub key_file: PathBuf,
    pub known_hosts: PathBuf,
    pub accept_new: bool,
}

impl SshTarget {
    /// The target of a configured host; `None` for a host that is not `kind = "ssh"`.
    pub fn from_config(host: &HostConfig) -> Option<SshTarget> {
        (host.kind == HostKind::Ssh).then(|| SshTarget {
            name: host.name.clone(),
            address: host.address.clone(),
            port: host.port,
            user: host.user.clone(),
            key_file: host.key_file.clone(),
            known_hosts: host.known_hosts.clone(),
            accept_new: host.accept_new,
        })
    }

    /// `user@address:port`, for messages.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}", self.user, self.address, self.port)
    }
}

/// Why an SSH operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    /// The server cannot be reached or the session broke: worth retrying later.
    #[error("host `{host}` ({target}) is unreachable: {detail}")]
    Unreachable {
        host: String,
        target: String,
        detail: String,
    },
    /// The server presented a key other than the one recorded: possibly an attack.
    #[error(
        "host `{host}` ({address}): the server's key does not match the one recorded at \
         line {line} of {file}; refusing to connect (if the server was reinstalled, remove \
         that line after checking the new key's fingerprint {fingerprint})"
    )]
    HostKeyChanged {
        host: String,
        address: String,
        file: String,
        line: usize,
        fingerprint: String,
    },
    /// The server's key is not in known_hosts and `accept_new` is off.
    #[error(
        "host `{host}` ({address}): the server's key {fingerprint} is not in {file}; refusing \
         to connect (add it to that file, or set accept_new = true for this host once)"
    )]
    UnknownHostKey {
        host: String,
        address: String,
        file: String,
        fingerprint: String,
    },
    /// The known_hosts file cannot be read or written.
    #[error("host `{host}`: known_hosts file {file}: {detail}")]
    KnownHosts {
        host: String,
        file: String,
        detail: String,
    },
    /// The private key cannot be loaded (the key itself is never shown).
    #[error("host `{host}`: key file {file}: {detail}")]
    Key {
        host: String,
        file: String,
        detail: String,
    },
    /// The server refused the key for this user.
    #[error("host `{host}`: the server refused public-key login for user `{user}`")]
    Auth { host: String, user: String },
    /// A channel or SFTP request failed on a working session.
    #[error("host `{host}`: {detail}")]
    Channel { host: String, detail: String },
}

impl SshError {
    /// Unreachable hosts and broken channels may work later; key and auth problems do not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SshError::Unreachable { .. } | SshError::Channel { .. }
        )
    }
}

/// What one command printed and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit status; `None` when the command was killed by a signal (see `signal`) or the
    /// server reported none.
    pub status: Option<u32>,
    /// The signal that ended it, e.g. `KILL`.
    pub signal: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// More than [`MAX_EXEC_OUTPUT`] bytes were printed on a stream and the rest was dropped.
    pub truncated: bool,
}

impl ExecOutput {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// What the host-key check found, for the error message after `connect` returns.
#[derive(Debug, Clone)]
enum KeyVerdict {
    Changed { line: usize, fingerprint: String },
    Unknown { fingerprint: String },
    FileError(String),
}

/// The russh handler: checks the server key against known_hosts.
struct Checker {
    target: Arc<SshTarget>,
    verdict: Arc<Mutex<Option<KeyVerdict>>>,
}

impl Checker {
    fn check(&self, key: &PublicKey) -> bool {
        let t = &self.target;
        let fingerprint = key.fingerprint(russh::keys::HashAlg::Sha256).to_string();
        let verdict = match russh::keys::check_known_hosts_path(
            &t.address,
            t.port,
            key,
            &t.known_hosts,
        ) {
            Ok(true) => return true,
            Ok(false) if t.accept_new => {
                match russh::keys::known_hosts::learn_known_hosts_path(
                    &t.address,
                    t.port,
                    key,
                    &t.known_hosts,
                ) {
                    Ok(()) => {
                        tracing::warn!(
                            host = %t.name,
                            file = %t.known_hosts.display(),
                            %fingerprint,
                            "accepted and recorded a new server key (accept_new)"
                        );
                        return true;
                    }
                    Err(e) => KeyVerdict::FileError(format!("cannot record the key: {e}")),
                }
            }
            Ok(false) => KeyVerdict::Unknown { fingerprint },
            Err(russh::keys::Error::KeyChanged { line }) => {
                KeyVerdict::Changed { line, fingerprint }
            }
            // A missing file knows no host: the key is unknown (or learned with accept_new).
            Err(russh::keys::Error::IO(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                if t.accept_new {
                    match russh::keys::known_hosts::learn_known_hosts_path(
                        &t.address,
                        t.port,
                        key,
                        &t.known_hosts,
                    ) {
                        Ok(()) => {
                            tracing::warn!(host = %t.name, file = %t.known_hosts.display(),
                                %fingerprint, "accepted and recorded a new server key (accept_new)");
                            return true;
                        }
                        Err(e) => KeyVerdict::FileError(format!("cannot record the key: {e}")),
                    }
                } else {
                    KeyVerdict::Unknown { fingerprint }
                }
            }
            Err(e) => KeyVerdict::FileError(e.to_string()),
        };
        *self.verdict.lock() = Some(verdict);
        false
    }
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_public_key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => Ok(self.check(key)),
            // Host certificates are not checked against a CA here: refused.
            russh::keys::PublicKeyOrCertificate::Certificate(_) => {
                *self.verdict.lock() = Some(KeyVerdict::FileError(
                    "the server offered a host certificate; only plain host keys are supported"
                        .into(),
                ));
                Ok(false)
            }
        }
    }
}

/// A live session: the russh handle and, once asked for, its SFTP session and helper shells.
struct Live {
    handle: client::Handle<Checker>,
    sftp: tokio::sync::OnceCell<Arc<SftpSession>>,
    /// Idle helper shells of this session (see [`SshHost::run`]).
    helpers: Mutex<Vec<Helper>>,
}

/// A `/bin/sh` kept running on one channel, reading commands from it. Each command runs in
/// a subshell with stdin from `/dev/null` (or the given input) and stderr to a temporary
/// file; after it, the shell prints a marker line with the exit status, the stderr, and the
/// marker again. The marker holds 128 random bits, so no output can fake it.
struct Helper {
    channel: Option<russh::Channel<client::Msg>>,
    marker: String,
}

impl Drop for Helper {
    fn drop(&mut self) {
        // A helper dropped mid-command is in an unknown state: its channel is closed.
        if let (Some(ch), Ok(rt)) = (self.channel.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = ch.close().await;
            });
        }
    }
}

/// The most a helper command may print before the helper is given up.
const MAX_HELPER_OUTPUT: usize = 16 << 20;

impl Helper {
    async fn start(handle: &client::Handle<Checker>) -> Result<Helper, String> {
        let channel = handle
            .channel_open_session()
            .await
            .map_err(|e| format!("cannot open a channel: {e}"))?;
        channel
            .exec(true, "exec /bin/sh")
            .await
            .map_err(|e| format!("exec failed: {e}"))?;
        let marker = format!("mqic-{:032x}", rand::random::<u128>());
        let mut helper = Helper {
            channel: Some(channel),
            marker,
        };
        let setup = "MQIC_ERR=$(mktemp) || exit 1; trap 'rm -f \"$MQIC_ERR\"' EXIT\n";
        helper.send(setup.as_bytes()).await?;
        let out = helper.run("true", &[]).await?;
        if out.status != Some(0) {
            return Err("the helper shell did not start".into());
        }
        Ok(helper)
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), String> {
        let ch = self.channel.as_ref().ok_or("the helper is closed")?;
        ch.data(bytes)
            .await
            .map_err(|e| format!("cannot write to the helper: {e}"))
    }

    async fn run(&mut self, command: &str, input: &[u8]) -> Result<ExecOutput, String> {
        use crate::conductor::template::shell_quote;
        let m = self.marker.clone();
        let stdin = if input.is_empty() {
            "</dev/null".to_string()
        } else {
            String::new()
        };
        let feed = if input.is_empty() {
            String::new()
        } else {
            format!(
                "printf '%s' {} | ",
                shell_quote(&String::from_utf8_lossy(input))
            )
        };
        // Through `eval` of one quoted word: whatever the command holds (even a syntax
        // error), the helper's own framing stays intact.
        let quoted = shell_quote(command);
        let framed = format!(
            "{feed}( eval {quoted} ) {stdin} 2>\"$MQIC_ERR\"; printf '\\n%s %s\\n' {m} \"$?\"; \
             head -c 65536 \"$MQIC_ERR\"; printf '\\n%s\\n' {m}\n"
        );
        self.send(framed.as_bytes()).await?;
        let status_mark = format!("\n{m} ").into_bytes();
        let end_mark = format!("\n{m}\n").into_bytes();
        let mut buf: Vec<u8> = Vec::new();
        let mut scanned = 0usize;
        let ch = self.channel.as_mut().ok_or("the helper is closed")?;
        loop {
            // The status line, then stderr up to the closing marker.
            if let Some(at) = find(&buf, &status_mark, scanned) {
                let rest = &buf[at + status_mark.len()..];
                if let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                    if let Some(end) = find(rest, &end_mark, nl) {
                        let status = std::str::from_utf8(&rest[..nl])
                            .ok()
                            .and_then(|s| s.trim().parse::<u32>().ok());
                        return Ok(ExecOutput {
                            status,
                            signal: None,
                            stderr: rest[nl + 1..end].to_vec(),
                            stdout: buf[..at].to_vec(),
                            truncated: false,
                        });
                    }
                }
            } else {
                scanned = buf.len().saturating_sub(status_mark.len());
            }
            if buf.len() > MAX_HELPER_OUTPUT {
                return Err("the helper printed too much".into());
            }
            match ch.wait().await {
                Some(ChannelMsg::Data { data }) => buf.extend_from_slice(&data),
                Some(ChannelMsg::ExtendedData { .. }) => {}
                Some(ChannelMsg::ExitStatus { .. } | ChannelMsg::Eof | ChannelMsg::Close)
                | None => return Err("the helper shell ended".into()),
                Some(_) => {}
            }
        }
    }
}

/// Where `needle` first occurs in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from >= hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// One configured SSH server. Cheap to share (`Arc`); every call reuses the one session.
pub struct SshHost {
    target: Arc<SshTarget>,
    config: Arc<client::Config>,
    key: Arc<PrivateKey>,
    live: tokio::sync::Mutex<Option<Arc<Live>>>,
    /// Limits exec channels to [`MAX_EXEC_CHANNELS`].
    channels: tokio::sync::Semaphore,
    /// Limits helper shells to [`MAX_HELPERS`].
    helper_permits: tokio::sync::Semaphore,
}

impl fmt::Debug for SshHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("SshHost")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// True when the key file can be read (or written) by group or others.
pub fn key_file_exposed(path: &Path) -> std::io::Result<bool> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o077 != 0)
}

impl SshHost {
    /// Loads the key and prepares the host; connects on first use. A key file readable by
    /// group or others is reported (and still used).
    pub fn new(target: SshTarget) -> Result<SshHost, SshError> {
        let key_err = |detail: String| SshError::Key {
            host: target.name.clone(),
            file: target.key_file.display().to_string(),
            detail,
        };
        match key_file_exposed(&target.key_file) {
            Ok(true) => tracing::warn!(
                host = %target.name,
                file = %target.key_file.display(),
                "the SSH key file is readable by group or others; run chmod 600 on it"
            ),
            Ok(false) => {}
            Err(e) => return Err(key_err(e.to_string())),
        }
        // The parser's message never contains key material.
        let key = russh::keys::load_secret_key(&target.key_file, None)
            .map_err(|e| key_err(format!("cannot load the private key: {e}")))?;
        let config = client::Config {
            window_size: WINDOW,
            preferred: preferred_algorithms(),
            keepalive_interval: Some(KEEPALIVE),
            keepalive_max: KEEPALIVE_MAX,
            inactivity_timeout: None,
            ..Default::default()
        };
        Ok(SshHost {
            target: Arc::new(target),
            config: Arc::new(config),
            key: Arc::new(key),
            live: tokio::sync::Mutex::new(None),
            channels: tokio::sync::Semaphore::new(MAX_EXEC_CHANNELS),
            helper_permits: tokio::sync::Semaphore::new(MAX_HELPERS),
        })
    }

    /// The host from its `[[hosts]]` entry; `None` for a host that is not `kind = "ssh"`.
    /// Roles in one process (executor, transfer) get the same [`SshHost`], so they share
    /// one session.
    pub fn from_config(host: &HostConfig) -> Option<Result<Arc<SshHost>, SshError>> {
        SshTarget::from_config(host).map(SshHost::shared)
    }

    /// The process's [`SshHost`] for `target`, made on first use.
    pub fn shared(target: SshTarget) -> Result<Arc<SshHost>, SshError> {
        static HOSTS: std::sync::OnceLock<Mutex<Vec<std::sync::Weak<SshHost>>>> =
            std::sync::OnceLock::new();
        let hosts = HOSTS.get_or_init(Default::default);
        let mut hosts = hosts.lock();
        hosts.retain(|w| w.strong_count() > 0);
        if let Some(h) = hosts
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|h| *h.target == target)
        {
            return Ok(h);
        }
        let host = Arc::new(SshHost::new(target)?);
        hosts.push(Arc::downgrade(&host));
        Ok(host)
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    pub fn name(&self) -> &str {
        &self.target.name
    }

    fn unreachable(&self, detail: impl fmt::Display) -> SshError {
        SshError::Unreachable {
            host: self.target.name.clone(),
            target: self.target.describe(),
            detail: detail.to_string(),
        }
    }

    fn channel_err(&self, detail: impl fmt::Display) -> SshError {
        SshError::Channel {
            host: self.target.name.clone(),
            detail: detail.to_string(),
        }
    }

    /// The live session, connecting (with backoff) when there is none or it dropped.
    async fn session(&self) -> Result<Arc<Live>, SshError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref() {
            if !l.handle.is_closed() {
                return Ok(l.clone());
            }
            tracing::info!(host = %self.target.name, "SSH session closed; reconnecting");
        }
        *live = None;
        let mut backoff = CONNECT_BACKOFF;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.connect().await {
                Ok(l) => {
                    let l = Arc::new(l);
                    *live = Some(l.clone());
                    return Ok(l);
                }
                Err(e) if e.is_retryable() && tries < CONNECT_TRIES => {
                    tracing::debug!(host = %self.target.name, error = %e, "connect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Forgets a session that failed under us, so the next call reconnects.
    async fn drop_session(&self, failed: &Arc<Live>) {
        let mut live = self.live.lock().await;
        if live.as_ref().is_some_and(|l| Arc::ptr_eq(l, failed)) {
            *live = None;
        }
    }

    /// Closes the session (the next call connects again).
    pub async fn disconnect(&self) {
        if let Some(l) = self.live.lock().await.take() {
            let _ = l
                .handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    async fn connect(&self) -> Result<Live, SshError> {
        let t = &self.target;
        let verdict = Arc::new(Mutex::new(None));
        let checker = Checker {
            target: t.clone(),
            verdict: verdict.clone(),
        };
        let started = std::time::Instant::now();
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client::connect(self.config.clone(), (t.address.as_str(), t.port), checker),
        )
        .await;
        let mut handle = match connected {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                return Err(match verdict.lock().take() {
                    Some(KeyVerdict::Changed { line, fingerprint }) => SshError::HostKeyChanged {
                        host: t.name.clone(),
                        address: format!("{}:{}", t.address, t.port),
                        file: t.known_hosts.display().to_string(),
                        line,
                        fingerprint,
                    },
                    Some(KeyVerdict::Unknown { fingerprint }) => SshError::UnknownHostKey {
                        host: t.name.clone(),
                        address: format!("{}:{}", t.address, t.port),
                        file: t.known_hosts.display().to_string(),
                        fingerprint,
                    },
                    Some(KeyVerdict::FileError(detail)) => SshError::KnownHosts {
                        host: t.name.clone(),
                        file: t.known_hosts.display().to_string(),
                        detail,
                    },
                    None => self.unreachable(e),
                })
            }
            Err(_) => return Err(self.unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
        let handshake_ms = started.elapsed().as_millis() as u64;
        // Only an RSA key needs the server's signature algorithms, which can mean waiting up
        // to a second for its EXT_INFO.
        let hash = if self.key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| self.unreachable(e))?
                .flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(
                t.user.clone(),
                PrivateKeyWithHashAlg::new(self.key.clone(), hash),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        if !auth.success() {
            return Err(SshError::Auth {
                host: t.name.clone(),
                user: t.user.clone(),
            });
        }
        tracing::info!(host = %t.name, target = %t.describe(), "SSH session open");
        tracing::debug!(
            host = %t.name,
            handshake_ms,
            auth_ms = started.elapsed().as_millis() as u64 - handshake_ms,
            "SSH connect timings"
        );
        Ok(Live {
            handle,
            sftp: tokio::sync::OnceCell::new(),
            helpers: Mutex::new(Vec::new()),
        })
    }

    /// Opens a session channel, reconnecting once when the session turns out to be dead.
    async fn channel(&self) -> Result<russh::Channel<client::Msg>, SshError> {
        let live = self.session().await?;
        match live.handle.channel_open_session().await {
            Ok(ch) => Ok(ch),
            Err(e) => {
                tracing::debug!(host = %self.target.name, error = %e, "channel refused; reconnecting");
                self.drop_session(&live).await;
                let live = self.session().await?;
                live.handle
                    .channel_open_session()
                    .await
                    .map_err(|e| self.unreachable(format!("cannot open a channel: {e}")))
            }
        }
    }

    /// Runs `command` through the user's shell on the server and collects its exit status,
    /// stdout and stderr (each up to [`MAX_EXEC_OUTPUT`]). The command string goes to the
    /// shell as is: quote every value in it with [`crate::conductor::template::shell_quote`].
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, SshError> {
        self.exec_with_input(command, &[]).await
    }

    /// [`SshHost::exec`] with `input` written to the command's stdin (then end of file).
    pub async fn exec_with_input(
        &self,
        command: &str,
        input: &[u8],
    ) -> Result<ExecOutput, SshError> {
        let _permit = self
            .channels
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut channel = self.channel().await?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| self.channel_err(format!("exec failed: {e}")))?;
        if !input.is_empty() {
            channel
                .data(input)
                .await
                .map_err(|e| self.channel_err(format!("cannot write stdin: {e}")))?;
        }
        channel
            .eof()
            .await
            .map_err(|e| self.channel_err(format!("cannot close stdin: {e}")))?;
        let mut out = ExecOutput::default();
        let keep = |buf: &mut Vec<u8>, data: &[u8], truncated: &mut bool| {
            let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
            if data.len() > room {
                *truncated = true;
            }
            buf.extend_from_slice(&data[..data.len().min(room)]);
        };
        // Data can arrive after the exit status: read until the channel is gone.
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => keep(&mut out.stdout, &data, &mut out.truncated),
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    keep(&mut out.stderr, &data, &mut out.truncated)
                }
                ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    out.signal = Some(format!("{signal_name:?}"))
                }
                _ => {}
            }
        }
        if out.status.is_none() && out.signal.is_none() {
            // No status at all: the session died under the command.
            let live = self.live.lock().await.clone();
            if let Some(l) = live.filter(|l| l.handle.is_closed()) {
                self.drop_session(&l).await;
                return Err(self.unreachable("the session closed during the command"));
            }
        }
        Ok(out)
    }

    /// [`SshHost::exec_with_input`] through a shell kept open on the session: the same
    /// answer without a new channel and a new login shell per command (a login shell that
    /// reads a heavy `.bashrc` can take a quarter of a second to start). For the short,
    /// idempotent commands of the transfer worker and the remote runner; their output is
    /// bounded. A helper that fails is dropped and the command runs as a plain exec.
    pub async fn run(&self, command: &str, input: &[u8]) -> Result<ExecOutput, SshError> {
        let permit = self
            .helper_permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let live = self.session().await?;
        let idle = live.helpers.lock().pop();
        let helper = match idle {
            Some(h) => Ok(h),
            None => Helper::start(&live.handle).await,
        };
        let failure = match helper {
            Ok(mut h) => match h.run(command, input).await {
                Ok(out) => {
                    live.helpers.lock().push(h);
                    return Ok(out);
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        drop(permit);
        tracing::debug!(host = %self.target.name, error = %failure, "helper shell failed; running the command on its own channel");
        self.exec_with_input(command, input).await
    }

    /// Starts a helper shell in the background when none is idle, so the next
    /// [`SshHost::run`] does not wait for a login shell.
    pub fn prewarm(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = me.helper_permits.try_acquire() else {
                return;
            };
            let Ok(live) = me.session().await else { return };
            if !live.helpers.lock().is_empty() {
                return;
            }
            match Helper::start(&live.handle).await {
                Ok(h) => live.helpers.lock().push(h),
                Err(e) => {
                    tracing::debug!(host = %me.target.name, error = %e, "helper shell did not start")
                }
            }
        });
    }

    /// The host's SFTP session (opened on the shared SSH session on first use, reopened after
    /// a reconnect).
    pub async fn sftp(&self) -> Result<Arc<SftpSession>, SshError> {
        let live = self.session().await?;
        let sftp = live
            .sftp
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                let channel = live
                    .handle
                    .channel_open_session()
                    .await
                    .map_err(|e| self.unreachable(format!("cannot open a channel: {e}")))?;
                channel
                    .request_subsystem(true, "sftp")
                    .await
                    .map_err(|e| self.channel_err(format!("sftp subsystem: {e}")))?;
                let config = russh_sftp::client::Config {
                    request_timeout_secs: 60,
                    ..Default::default()
                };
                let session = SftpSession::new_with_config(channel.into_stream(), config)
                    .await
                    .map_err(|e| self.channel_err(format!("sftp start: {e}")))?;
                tracing::debug!(
                    host = %self.target.name,
                    ms = started.elapsed().as_millis() as u64,
                    "SFTP session started"
                );
                Ok::<_, SshError>(Arc::new(session))
            })
            .await?;
        Ok(sftp.clone())
    }
}

/// The curator samples an SSH host's GPUs (`nvidia-smi`, the process table) through an exec
/// channel on the host's one session: the argument vector is shell-quoted word by word, exit
/// status 127 means the program is missing, and an unreachable host is a failure (its GPUs
/// then show as in error and are not leased).
impl crate::gpu::CommandRunner for SshHost {
    fn host(&self) -> &str {
        &self.target.name
    }

    fn run<'a>(
        &'a self,
        argv: &'a [String],
        timeout: Duration,
    ) -> crate::gpu::runner::BoxFuture<'a, Result<crate::gpu::CommandOutput, crate::gpu::RunError>>
    {
        use crate::gpu::{CommandOutput, RunError};
        Box::pin(async move {
            let program = argv.first().cloned().unwrap_or_default();
            let command = argv
                .iter()
                .map(|a| crate::conductor::template::shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ");
            // Through a helper shell: no login shell per sample (a heavy `.bashrc` costs
            // hundreds of ms per exec), and a query is safe to run twice on a fallback.
            match tokio::time::timeout(timeout, self.run(&command, &[])).await {
                Err(_) => Err(RunError::TimedOut {
                    program,
                    after: timeout,
                }),
                Ok(Err(e)) => Err(RunError::Failed(e.to_string())),
                Ok(Ok(out)) if out.status == Some(127) => Err(RunError::NotFound(program)),
                Ok(Ok(out)) => Ok(CommandOutput {
                    code: out.status.map(|s| s as i32),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_gcm_comes_first_only_where_the_cpu_speeds_it_up_and_nothing_is_dropped() {
        let default = russh::Preferred::default();
        let ours = preferred_algorithms();
        let mut a: Vec<String> = default
            .cipher
            .iter()
            .map(|c| c.as_ref().to_owned())
            .collect();
        let mut b: Vec<String> = ours.cipher.iter().map(|c| c.as_ref().to_owned()).collect();
        #[cfg(target_arch = "x86_64")]
        let fast = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq");
        #[cfg(not(target_arch = "x86_64"))]
        let fast = b.first() == Some(&"aes256-gcm@openssh.com".to_owned());
        if fast {
            assert_eq!(b[0], "aes256-gcm@openssh.com");
        } else {
            assert_eq!(a, b);
        }
        a.sort();
        b.sort();
        assert_eq!(a, b, "the same ciphers, only reordered");
        assert_eq!(ours.kex, default.kex);
    }

    #[test]
    fn a_group_readable_key_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!key_file_exposed(&key).unwrap());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(key_file_exposed(&key).unwrap());
    }

    #[test]
    fn a_missing_or_bad_key_is_a_clear_error_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let target = |key: PathBuf| SshTarget {
            name: "gpu1".into(),
            address: "127.0.0.1".into(),
            port: 22,
            user: "u".into(),
            key_file: key,
            known_hosts: dir.path().join("known_hosts"),
            accept_new: false,
        };
        let err = SshHost::new(target(dir.path().join("absent"))).unwrap_err();
        assert!(matches!(err, SshError::Key { .. }), "{err}");
        assert!(err.to_string().contains("gpu1"), "{err}");
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "SECRET-MATERIAL-NOT-A-KEY").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = SshHost::new(target(bad)).unwrap_err().to_string();
        assert!(!err.contains("SECRET-MATERIAL"), "{err}");
    }
}
