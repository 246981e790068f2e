//! A real OpenSSH server for tests and benchmarks: `/usr/sbin/sshd -D -e` with a temporary
//! config, host key and authorized key on a free loopback port, logging in as the current
//! user (root works: the authorized keys file is given by absolute path). Self-contained, so
//! `benches/ssh.rs` includes it too.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mqic::config::{HostConfig, HostKind};
use mqic::hpc::ssh::SshTarget;

pub const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd, killed (by its pid) on drop.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The client's private key (mode 600).
    pub key: PathBuf,
    /// A known_hosts file holding the server's key for `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    /// The user tests log in as (whoever runs them).
    pub user: String,
    pub log: PathBuf,
    config: PathBuf,
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "mqic-test", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen failed");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Why no server can be started here (the program is missing), for a SKIP line.
pub fn unavailable() -> Option<String> {
    if !Path::new(SSHD).is_file() {
        return Some(format!("{SSHD} not found"));
    }
    for program in ["ssh-keygen", "sha256sum"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{program} not found"));
        }
    }
    None
}

impl Sshd {
    /// Starts a server; panics when it cannot (call [`unavailable`] first).
    pub fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("temp dir");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let host_key = etc.join("ssh_host_ed25519_key");
        keygen(&host_key);
        let key = dir.path().join("client_ed25519");
        keygen(&key);
        let authorized = etc.join("authorized_keys");
        std::fs::copy(key.with_extension("pub"), &authorized).unwrap();
        // The privilege-separation directory systemd would make.
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = String::from_utf8(
            Command::new("id")
                .arg("-un")
                .output()
                .expect("id runs")
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        let log = dir.path().join("sshd.log");
        for _ in 0..5 {
            let port = free_port();
            let config = etc.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\n\
                     AuthorizedKeysFile {ak}\nPubkeyAuthentication yes\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                     PermitRootLogin prohibit-password\nStrictModes no\nLogLevel ERROR\n\
                     Subsystem sftp internal-sftp\n",
                    hk = host_key.display(),
                    pid = dir.path().join("sshd.pid").display(),
                    ak = authorized.display(),
                ),
            )
            .unwrap();
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("sshd starts");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !up {
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            let known_hosts = dir.path().join("known_hosts");
            let host_pub = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
            let mut fields = host_pub.split_whitespace();
            let (alg, b64) = (fields.next().unwrap(), fields.next().unwrap());
            std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {alg} {b64}\n")).unwrap();
            return Sshd {
                child,
                port,
                dir,
                key,
                known_hosts,
                user,
                log,
                config,
            };
        }
        panic!(
            "sshd did not start; its log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the listening server (sessions already open keep their own processes).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and keys, after [`Sshd::stop`].
    pub fn restart(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&self.log).unwrap())
                .spawn()
                .expect("sshd starts");
            let up_by = Instant::now() + Duration::from_secs(5);
            while Instant::now() < up_by {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    self.child = child;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("sshd did not start again on port {}", self.port);
    }

    /// The target of this server as `name`, with its known_hosts file.
    pub fn target(&self, name: &str) -> SshTarget {
        SshTarget {
            name: name.into(),
            address: "127.0.0.1".into(),
            port: self.port,
            user: self.user.clone(),
            key_file: self.key.clone(),
            known_hosts: self.known_hosts.clone(),
            accept_new: false,
        }
    }

    /// A `[[hosts]]` entry for this server.
    pub fn host_config(&self, name: &str, work_root: &Path, gpus: Vec<u32>) -> HostConfig {
        let mut h = HostConfig::local(name);
        h.kind = HostKind::Ssh;
        h.work_root = work_root.to_path_buf();
        h.gpus = gpus;
        h.address = "127.0.0.1".into();
        h.port = self.port;
        h.user = self.user.clone();
        h.key_file = self.key.clone();
        h.known_hosts = self.known_hosts.clone();
        h
    }

    /// A known_hosts file that records another key for this server.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        let other = self.dir.path().join("other_host_key");
        if !other.exists() {
            keygen(&other);
        }
        let text = std::fs::read_to_string(other.with_extension("pub")).unwrap();
        let mut fields = text.split_whitespace();
        let (alg, b64) = (fields.next().unwrap(), fields.next().unwrap());
        let path = self.dir.path().join("known_hosts.wrong");
        std::fs::write(&path, format!("[127.0.0.1]:{} {alg} {b64}\n", self.port)).unwrap();
        path
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
