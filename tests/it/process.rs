//! A real `mqic serve` child process, for tests of the command-line contract and for
//! external clients (pika, amqp-tools, amqplib) that must see exactly what a lab sees.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// The `mqic` binary cargo built for these tests.
pub fn mqic() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqic"))
}

/// A running `mqic serve`, stopped with SIGTERM on drop.
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

impl ServeProcess {
    /// Starts `mqic serve --amqp-listen 127.0.0.1:0` on a fresh data dir plus `extra` args,
    /// and waits for its ready line.
    pub fn start(extra: &[&str]) -> ServeProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = mqic()
            .arg("serve")
            .arg("--amqp-listen")
            .arg("127.0.0.1:0")
            .args(["--management-listen", "127.0.0.1:0"])
            .args(["--prometheus-listen", "127.0.0.1:0"])
            .args(["--web-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mqic starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout piped"))
            .read_line(&mut line)
            .expect("ready line");
        let addr = line
            .trim()
            .strip_prefix("amqp listening on ")
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
            .parse()
            .expect("address in ready line");
        ServeProcess { child, addr, dir }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Sends a signal by name (TERM, INT, KILL).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGTERM, then the exit status and everything written to stderr.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let status = self.child.wait().expect("mqic exits");
        let mut stderr = String::new();
        use std::io::Read;
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        (status, stderr)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
