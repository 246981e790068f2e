//! SSH benchmark against a real loopback OpenSSH sshd (started here, stopped at the end):
//! upload-and-verify and download-and-verify of the realistic synthetic case (about 220
//! files, 45 MB) through mqic's SFTP transfer worker, against OpenSSH `sftp -b` (`put -r` /
//! `get -r`, no verification) in the same run; and the per-step overhead of running `true`
//! through the remote runner. Times include connecting and authenticating, as for `sftp`.
//! Prints `SKIP` and exits 0 when sshd is missing. Run: `cargo bench --bench ssh`.

#[path = "../tests/it/sshd.rs"]
mod sshd;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqic::demo::cases::{write_case, CaseSpec};
use mqic::hpc::local::Outcome;
use mqic::hpc::remote::RemoteRunner;
use mqic::hpc::ssh::SshHost;
use mqic::protocol::{ExecuteRequest, StepRef, TransferRequest};
use mqic::workers::transfer::sftp::SftpBackend;
use mqic::workers::transfer::{Direction, TransferWorker};

const RUNS: usize = 3;
const EXEC_RUNS: u32 = 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn sftp_batch(sshd: &sshd::Sshd, batch: &str) -> Duration {
    let file = sshd.dir.path().join("batch");
    std::fs::write(&file, batch).unwrap();
    let start = Instant::now();
    let status = Command::new("sftp")
        .arg("-q")
        .arg("-b")
        .arg(&file)
        .arg("-i")
        .arg(&sshd.key)
        .arg("-P")
        .arg(sshd.port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
        .arg("-o")
        .arg("StrictHostKeyChecking=yes")
        .arg(format!("{}@127.0.0.1", sshd.user))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("sftp runs");
    assert!(status.success(), "sftp failed");
    start.elapsed()
}

fn request(local: &Path, remote: &Path) -> TransferRequest {
    TransferRequest {
        step: StepRef {
            case_id: "bench".into(),
            step: "upload".into(),
            attempt: 1,
        },
        host: "gpu".into(),
        local_dir: local.display().to_string(),
        remote_dir: remote.display().to_string(),
    }
}

#[tokio::main]
async fn main() {
    // `RUST_LOG=mqic=debug` prints the transfer's phase timings.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(why) = sshd::unavailable() {
        println!("SKIP ssh bench: {why}");
        return;
    }
    if std::env::var_os("PATH")
        .is_none_or(|p| !std::env::split_paths(&p).any(|d| d.join("sftp").is_file()))
    {
        println!("SKIP ssh bench: sftp not found");
        return;
    }
    let sshd = sshd::Sshd::start();
    let root = std::fs::canonicalize(sshd.dir.path()).unwrap();
    let scan = root.join("scan");
    let results = root.join("results");
    let remote = root.join("remote");
    for d in [&scan, &results, &remote] {
        std::fs::create_dir_all(d).unwrap();
    }
    let case = scan.join("P0001");
    let summary = write_case(&case, &CaseSpec::realistic(1)).unwrap();
    let mb = summary.bytes as f64 / 1e6;
    println!("case: {} files, {mb:.1} MB", summary.files);

    let (mut up, mut down, mut sup, mut sdown) = (vec![], vec![], vec![], vec![]);
    for run in 0..RUNS {
        // A fresh host each run: connect and authenticate are in the time, as for sftp.
        let worker = |host: Arc<SshHost>| {
            TransferWorker::with_backends(
                vec![scan.clone(), results.clone()],
                vec![(
                    "gpu".into(),
                    remote.clone(),
                    Arc::new(SftpBackend::new(host)) as _,
                )],
            )
        };
        let dst = remote.join(format!("mqic-{run}"));
        let start = Instant::now();
        let w = worker(Arc::new(SshHost::new(sshd.target("gpu")).unwrap()));
        let done = w
            .transfer(&request(&case, &dst), Direction::Upload)
            .await
            .unwrap();
        up.push(start.elapsed());
        assert_eq!(done.skipped, 0);

        let back = results.join(format!("mqic-{run}"));
        let start = Instant::now();
        let w = worker(Arc::new(SshHost::new(sshd.target("gpu")).unwrap()));
        w.transfer(&request(&back, &dst), Direction::Download)
            .await
            .unwrap();
        down.push(start.elapsed());

        let sdst = remote.join(format!("sftp-{run}"));
        sup.push(sftp_batch(
            &sshd,
            &format!("put -r {} {}\n", case.display(), sdst.display()),
        ));
        let sback = results.join(format!("sftp-{run}"));
        sdown.push(sftp_batch(
            &sshd,
            &format!("get -r {} {}\n", sdst.display(), sback.display()),
        ));
    }
    let rate = |d: Duration| mb / d.as_secs_f64();
    let (up, down, sup, sdown) = (median(up), median(down), median(sup), median(sdown));
    println!(
        "upload:   mqic (verified) {:>7.1} MB/s ({:.2} s)   sftp -b put -r {:>7.1} MB/s ({:.2} s)   ratio {:.2}x",
        rate(up), up.as_secs_f64(), rate(sup), sup.as_secs_f64(), sup.as_secs_f64() / up.as_secs_f64()
    );
    println!(
        "download: mqic (verified) {:>7.1} MB/s ({:.2} s)   sftp -b get -r {:>7.1} MB/s ({:.2} s)   ratio {:.2}x",
        rate(down), down.as_secs_f64(), rate(sdown), sdown.as_secs_f64(), sdown.as_secs_f64() / down.as_secs_f64()
    );

    // Per-step overhead: `true` run through the remote runner on a warm session.
    let host = Arc::new(SshHost::new(sshd.target("gpu")).unwrap());
    let runner = RemoteRunner::new(
        root.join("attempts"),
        vec![("gpu".into(), host, remote.clone())],
        4096,
    );
    let mut times = Vec::new();
    for attempt in 1..=EXEC_RUNS {
        let req = ExecuteRequest {
            step: StepRef {
                case_id: "bench".into(),
                step: "true".into(),
                attempt,
            },
            host: "gpu".into(),
            command: "true".into(),
            workdir: None,
            gpu_id: None,
            timeout_secs: 60,
            progress_patterns: vec![],
            retryable_patterns: vec![],
        };
        let start = Instant::now();
        let outcome = runner
            .start_or_attach(&req)
            .await
            .unwrap()
            .wait(|_| {})
            .await;
        times.push(start.elapsed());
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
    }
    let m = median(times.clone());
    println!(
        "remote step `true`: median {:.0} ms, min {:.0} ms over {EXEC_RUNS} steps (start, detach, first poll, exit)",
        m.as_secs_f64() * 1e3,
        times.iter().min().unwrap().as_secs_f64() * 1e3
    );
}
