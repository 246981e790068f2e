//! The files `packaging/` ships (issue 7) against the code they configure: the packaged
//! `/etc/mqic/mqic.toml` loads, and the systemd unit's command lines parse with this CLI.
//! The packages themselves are built, installed and purged by `.ci/package test`.

use std::path::Path;

use clap::Parser;
use mqic::cli::{Cli, Command, ConfigCommand};
use mqic::config::Config;

use crate::process::mqic;

fn packaging(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

#[test]
fn packaged_config_loads_with_data_in_var_lib() {
    let config = Config::load(&packaging("mqic.toml")).expect("packaging/mqic.toml is valid");
    assert_eq!(config.data_dir, Path::new("/var/lib/mqic"));
    assert_eq!(config.scan_dir(), Path::new("/var/lib/mqic/cases"));
    assert!(config.amqp.listen.ip().is_loopback());
    assert!(config.hosts.iter().any(|h| h.name == "local"));

    let out = mqic()
        .args(["config", "check"])
        .arg(packaging("mqic.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
}

/// The `key=value` lines of the unit's `[Service]` section.
fn service_lines(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut lines = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').expect("key=value");
            lines.push((k.to_string(), v.to_string()));
        }
    }
    lines
}

#[test]
fn unit_commands_parse_and_the_unit_keeps_detached_steps() {
    let unit = std::fs::read_to_string(packaging("mqic.service")).unwrap();
    let service = service_lines(&unit);
    let get = |key: &str| {
        service
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("mqic.service sets no {key}"))
    };

    let start: Vec<&str> = get("ExecStart").split_whitespace().collect();
    assert_eq!(start[0], "/usr/bin/mqic");
    let cli = Cli::try_parse_from(start.iter().map(|a| a.trim_start_matches("/usr/bin/")))
        .unwrap_or_else(|e| panic!("ExecStart does not parse: {e}"));
    let Command::Serve(args) = cli.command else {
        panic!("ExecStart does not run `mqic serve`")
    };
    assert_eq!(
        args.config.as_deref(),
        Some(Path::new("/etc/mqic/mqic.toml"))
    );

    let pre: Vec<&str> = get("ExecStartPre").split_whitespace().collect();
    let cli = Cli::try_parse_from(pre.iter().map(|a| a.trim_start_matches("/usr/bin/")))
        .unwrap_or_else(|e| panic!("ExecStartPre does not parse: {e}"));
    assert!(matches!(
        cli.command,
        Command::Config(ConfigCommand::Check { .. })
    ));

    // The local executor's steps live in their own sessions and must outlive a restart.
    assert_eq!(get("KillMode"), "process");
    assert_eq!(get("KillSignal"), "SIGTERM");
    assert_eq!(get("User"), "mqic");
    assert_eq!(get("Restart"), "on-failure");
    assert!(get("StateDirectory")
        .split_whitespace()
        .any(|d| d == "mqic"));
    assert_eq!(get("ConfigurationDirectory"), "mqic");
    assert_eq!(get("ProtectSystem"), "strict");
    for key in ["NoNewPrivileges", "ProtectHome", "PrivateTmp"] {
        assert_eq!(get(key), "yes", "{key}");
    }
    // TMPDIR points into the state directory, which the service may write.
    let tmp = get("Environment").trim_start_matches("TMPDIR=");
    assert!(tmp.starts_with("/var/lib/mqic/"), "{tmp}");
}
