//! The command-line contract: ready lines, clean exit on SIGTERM, one-line reasons for a
//! busy port or a bad config, `config check`/`config default`, `version`.

use std::io::Write;

use crate::process::{mqic, ServeProcess};

#[test]
fn serve_prints_ready_line_and_exits_zero_on_sigterm() {
    let serve = ServeProcess::start(&[]);
    assert!(serve.addr.ip().is_loopback());
    std::net::TcpStream::connect(serve.addr).expect("accepting AMQP");
    let (status, _) = serve.terminate();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigint_also_drains_and_exits_zero() {
    let mut serve = ServeProcess::start(&[]);
    serve.signal("INT");
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_320() {
    let serve = ServeProcess::start(&[]);
    let mut client = crate::support::RawClient::connect(serve.addr).await;
    client.handshake(2047, 131_072, 60).await;
    client.open().await;
    serve.signal("TERM");
    let text = client.expect_connection_close(320).await;
    assert!(text.starts_with("CONNECTION_FORCED"), "{text}");
    client
        .send_method(
            0,
            amq_protocol::protocol::AMQPClass::Connection(
                amq_protocol::protocol::connection::AMQPMethod::CloseOk(
                    amq_protocol::protocol::connection::CloseOk {},
                ),
            ),
        )
        .await;
    let mut serve = serve;
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn busy_port_fails_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = mqic()
        .args([
            "serve",
            "--amqp-listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason = stderr.trim();
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    assert!(reason.to_lowercase().contains("in use"), "{reason}");
}

#[test]
fn bad_config_fails_with_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mqic.toml");
    std::fs::write(&path, "[amqp]\nlisten = \"127.0.0.1:0\"\nheartbeat = 5\n").unwrap();
    for args in [vec!["serve", "--config"], vec!["config", "check"]] {
        let out = mqic().args(&args).arg(&path).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr.trim();
        assert_eq!(reason.lines().count(), 1, "{reason}");
        assert!(reason.contains("line 3"), "{reason}");
        assert!(reason.contains("heartbeat"), "{reason}");
    }
}

#[test]
fn default_config_is_printed_and_checks_ok() {
    let out = mqic().args(["config", "default"]).output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let check = mqic()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn hash_password_output_logs_in() {
    let mut child = mqic()
        .args(["config", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(mqic::amqp::auth::verify_password(hash.trim(), b"s3cret"));
}

#[test]
fn version_names_commit_and_target() {
    let out = mqic().arg("version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("mqic {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains("commit") && text.contains("target x86_64"),
        "{text}"
    );
}

#[test]
fn second_instance_on_the_same_data_dir_is_refused() {
    let first = ServeProcess::start(&[]);
    let out = mqic()
        .args(["serve", "--amqp-listen", "127.0.0.1:0", "--data-dir"])
        .arg(first.dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another mqic"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let serve = ServeProcess::start(&["--log-format", "json"]);
    let (status, stderr) = serve.terminate();
    assert!(status.success());
    let lines: Vec<_> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
}
