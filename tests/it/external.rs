//! Tools a lab already uses, unchanged, against a real `mqic serve`: a pika script, the
//! rabbitmq-c command-line tools and a Node amqplib service.

use std::path::Path;
use std::process::Command;

use crate::process::ServeProcess;
use crate::support::{have_program, skip};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn pika_script_round_trip() {
    if !have_program("pika_script_round_trip", "python3") {
        return;
    }
    let has_pika = Command::new("python3")
        .args(["-c", "import pika"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pika {
        skip("pika_script_round_trip", "python3-pika not found");
        return;
    }
    let serve = ServeProcess::start(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pika_smoke.py");
    let out = run(Command::new("python3").arg(script).arg(serve.url()));
    assert!(out.contains("pika smoke ok"), "{out}");
}

#[test]
fn amqp_tools_publish_and_consume() {
    if !have_program("amqp_tools_publish_and_consume", "amqp-publish")
        || !have_program("amqp_tools_publish_and_consume", "amqp-consume")
        || !have_program("amqp_tools_publish_and_consume", "amqp-declare-queue")
    {
        return;
    }
    let serve = ServeProcess::start(&[]);
    let url = serve.url();
    let q = run(Command::new("amqp-declare-queue").args(["--url", &url, "-d", "-q", "tools_q"]));
    assert_eq!(q.trim(), "tools_q");
    run(Command::new("amqp-publish").args([
        "--url",
        &url,
        "-r",
        "tools_q",
        "-C",
        "text/plain",
        "-H",
        "case: c-42",
        "-b",
        "from amqp-publish",
    ]));
    let got =
        run(Command::new("amqp-consume").args(["--url", &url, "-q", "tools_q", "-c", "1", "cat"]));
    assert_eq!(got, "from amqp-publish");
}

#[test]
fn node_amqplib_round_trip() {
    if !have_program("node_amqplib_round_trip", "node") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/node");
    if !dir.join("node_modules/amqplib").is_dir() {
        skip(
            "node_amqplib_round_trip",
            "amqplib not found (run `npm ci --prefix tests/clients/node`)",
        );
        return;
    }
    let serve = ServeProcess::start(&[]);
    let out = run(Command::new("node")
        .arg(dir.join("smoke.js"))
        .arg(serve.url()));
    assert!(out.contains("amqplib smoke ok"), "{out}");
}
