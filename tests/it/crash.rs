//! Crash consistency of the case pipeline: a real `mqic serve` is killed with SIGKILL at
//! random points while 20 cases run, and restarted on the same data dir each time. In the
//! end every case completes, every step ran exactly once (the stand-in steps append to a
//! ledger when they finish), and no GPU lease is left behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mqic::store::records::CaseStatus;
use mqic::store::Store;
use rand::Rng;

use crate::process::mqic;
use crate::workflow::{drop_case, ledger, workflow_config};

/// Starts `mqic serve` on `config`, returns once it prints its ready line.
fn serve(config: &Path, ledger: &Path) -> Child {
    let mut child = mqic()
        .args(["serve", "--config"])
        .arg(config)
        .args([
            "--web-listen",
            "127.0.0.1:0",
            "--management-listen",
            "127.0.0.1:0",
        ])
        .args(["--prometheus-listen", "127.0.0.1:0"])
        .env("MQIC_LEDGER", ledger)
        .env("MQIC_DEMO_BATCH_SLEEP", "0.05")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mqic starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("amqp listening on"), "{line:?}");
    child
}

/// The demo workflow as a config file for the child process.
fn config_file(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let config = workflow_config(&data);
    let text = mqic::demo::run::demo_config_text(
        &config.data_dir,
        &mqic::demo::run::standin_dir(&config.data_dir),
    );
    let path = dir.join("mqic.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn kill_9_at_random_points_during_20_cases_loses_nothing_and_runs_every_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let ledger_file = dir.path().join("ledger");
    let scan = dir.path().join("data").join("cases");
    std::fs::create_dir_all(&scan).unwrap();
    let mut rng = rand::rng();
    let mut child = serve(&config, &ledger_file);
    let ids: Vec<String> = (1..=20).map(|n| drop_case(&scan, 700 + n)).collect();
    let kills = 12;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(150..900)));
        child.kill().unwrap();
        child.wait().unwrap();
        child = serve(&config, &ledger_file);
    }
    // Let the last one finish the work, then stop it cleanly and read its store.
    let store_path = dir.path().join("data").join("mqic.redb");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // Wait for every step to have run, then for the downloads to be recorded.
        let wait_until = Instant::now() + Duration::from_secs(60);
        while ledger(&ledger_file).len() < 2 * ids.len() && Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(2));
        // SIGTERM, then read the store (it has one owner at a time).
        // SAFETY: the child is ours.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap();
        let store = Store::open(&store_path).unwrap();
        let cases = store.cases().unwrap();
        assert!(
            cases.iter().all(|c| c.status != CaseStatus::Failed),
            "a case failed: {:#?}",
            cases
                .iter()
                .filter(|c| c.status == CaseStatus::Failed)
                .collect::<Vec<_>>()
        );
        if cases.len() == ids.len() && cases.iter().all(|c| c.status == CaseStatus::Completed) {
            assert!(
                store.leases().unwrap().is_empty(),
                "no GPU lease left behind: {:?}",
                store.leases().unwrap()
            );
            break;
        }
        drop(store);
        assert!(
            Instant::now() < deadline,
            "cases did not all complete in time: {cases:#?}"
        );
        child = serve(&config, &ledger_file);
    }
    let lines = ledger(&ledger_file);
    for id in &ids {
        for step in ["interpret", "simulate"] {
            let runs: Vec<&String> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("{id} {step} ")))
                .collect();
            assert_eq!(
                runs.len(),
                1,
                "{id} {step} ran {} times: {runs:?}",
                runs.len()
            );
        }
    }
    assert_eq!(lines.len(), 2 * ids.len(), "{lines:?}");
}
