//! SSH benchmark against a real loopback OpenSSH sshd (started here, stopped at the end):
//! upload-and-verify and download-and-verify of the realistic synthetic case (about 220
//! files, 45 MB) through mqic's SFTP transfer worker, against OpenSSH `sftp -b` (`put -r` /
//! `get -r`, no verification) in the same run, once with OpenSSH's default cipher and once
//! with the AES-GCM cipher mqic prefers on CPUs with AES instructions; and the per-step
//! overhead of running `true` through the remote runner. Times include connecting and
//! authenticating, as for `sftp`. Prints `SKIP` and exits 0 when sshd is missing.
//! Run: `cargo bench --bench ssh`.

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

/// OpenSSH's cipher for the second reference run: the one mqic prefers on a CPU with AES
/// instructions (OpenSSH's own default is chacha20-poly1305).
const GCM: &str = "aes256-gcm@openssh.com";

fn sftp_batch(sshd: &sshd::Sshd, batch: &str, cipher: Option<&str>) -> Duration {
    let opts: Vec<String> = cipher
        .map(|c| vec!["-c".into(), c.into()])
        .unwrap_or_default();
    sftp_batch_with(sshd, batch, &opts)
}

/// `sftp -b` with extra options before the usual ones.
fn sftp_batch_with(sshd: &sshd::Sshd, batch: &str, opts: &[String]) -> Duration {
    let file = sshd.dir.path().join("batch");
    std::fs::write(&file, batch).unwrap();
    let start = Instant::now();
    let status = Command::new("sftp")
        .args(opts)
        .arg("-q")
        .arg("-b")
        .arg(&file)
        .args(ssh_opts(sshd, "-P"))
        .arg(format!("{}@127.0.0.1", sshd.user))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("sftp runs");
    assert!(status.success(), "sftp failed");
    start.elapsed()
}

/// Key, port (`port_flag`: `-P` for sftp, `-p` for ssh) and host key checking.
fn ssh_opts(sshd: &sshd::Sshd, port_flag: &str) -> Vec<String> {
    vec![
        "-i".into(),
        sshd.key.display().to_string(),
        port_flag.into(),
        sshd.port.to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", sshd.known_hosts.display()),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
    ]
}

/// An OpenSSH control master on `path` (`ssh -M`), so later `sftp` runs reuse its
/// connection: OpenSSH's way of keeping a session open. `exit` stops it.
fn control_master(sshd: &sshd::Sshd, path: &Path, op: &str) {
    let mut ssh = Command::new("ssh");
    ssh.arg("-o").arg(format!("ControlPath={}", path.display()));
    match op {
        "start" => ssh.args(["-M", "-N", "-f", "-o", "ControlPersist=300"]),
        _ => ssh.args(["-O", "exit"]),
    };
    let status = ssh
        .args(ssh_opts(sshd, "-p"))
        .arg(format!("{}@127.0.0.1", sshd.user))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("ssh runs");
    assert!(status.success() || op != "start", "ssh -M failed");
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
    let (mut gup, mut gdown) = (vec![], vec![]);
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

        for (cipher, up, down) in [
            (None, &mut sup, &mut sdown),
            (Some(GCM), &mut gup, &mut gdown),
        ] {
            let tag = if cipher.is_some() { "gcm" } else { "sftp" };
            let sdst = remote.join(format!("{tag}-{run}"));
            up.push(sftp_batch(
                &sshd,
                &format!("put -r {} {}\n", case.display(), sdst.display()),
                cipher,
            ));
            let sback = results.join(format!("{tag}-{run}"));
            down.push(sftp_batch(
                &sshd,
                &format!("get -r {} {}\n", sdst.display(), sback.display()),
                cipher,
            ));
        }
    }
    let rate = |d: Duration| mb / d.as_secs_f64();
    let (up, down, sup, sdown) = (median(up), median(down), median(sup), median(sdown));
    let (gup, gdown) = (median(gup), median(gdown));
    println!(
        "upload:   mqic (verified) {:>7.1} MB/s ({:.2} s)   sftp -b put -r {:>7.1} MB/s ({:.2} s)   ratio {:.2}x",
        rate(up), up.as_secs_f64(), rate(sup), sup.as_secs_f64(), sup.as_secs_f64() / up.as_secs_f64()
    );
    println!(
        "download: mqic (verified) {:>7.1} MB/s ({:.2} s)   sftp -b get -r {:>7.1} MB/s ({:.2} s)   ratio {:.2}x",
        rate(down), down.as_secs_f64(), rate(sdown), sdown.as_secs_f64(), sdown.as_secs_f64() / down.as_secs_f64()
    );

    println!(
        "OpenSSH with -c {GCM} (mqic's choice on a CPU with AES instructions): upload {:.1} MB/s ({:.2} s, mqic ratio {:.2}x), download {:.1} MB/s ({:.2} s, mqic ratio {:.2}x)",
        rate(gup), gup.as_secs_f64(), gup.as_secs_f64() / up.as_secs_f64(),
        rate(gdown), gdown.as_secs_f64(), gdown.as_secs_f64() / down.as_secs_f64()
    );

    // As mqic runs: one session per host, kept open between transfers (its first transfer
    // above paid for connecting; this one is not timed).
    let host = Arc::new(SshHost::new(sshd.target("gpu")).unwrap());
    let warm = TransferWorker::with_backends(
        vec![scan.clone(), results.clone()],
        vec![(
            "gpu".into(),
            remote.clone(),
            Arc::new(SftpBackend::new(host.clone())) as _,
        )],
    );
    let (mut wup, mut wdown) = (vec![], vec![]);
    for run in 0..=RUNS {
        let dst = remote.join(format!("warm-{run}"));
        let start = Instant::now();
        warm.transfer(&request(&case, &dst), Direction::Upload)
            .await
            .unwrap();
        let t_up = start.elapsed();
        let back = results.join(format!("warm-{run}"));
        let start = Instant::now();
        warm.transfer(&request(&back, &dst), Direction::Download)
            .await
            .unwrap();
        if run > 0 {
            wup.push(t_up);
            wdown.push(start.elapsed());
        }
    }
    let (wup, wdown) = (median(wup), median(wdown));
    // OpenSSH with its connection kept open too (a control master); each sftp run still
    // starts its own ssh client and SFTP server.
    let cm = root.join("cm");
    control_master(&sshd, &cm, "start");
    let mux = vec!["-o".to_string(), format!("ControlPath={}", cm.display())];
    let (mut mup, mut mdown) = (vec![], vec![]);
    for run in 0..RUNS {
        let sdst = remote.join(format!("mux-{run}"));
        mup.push(sftp_batch_with(
            &sshd,
            &format!("put -r {} {}\n", case.display(), sdst.display()),
            &mux,
        ));
        let sback = results.join(format!("mux-{run}"));
        mdown.push(sftp_batch_with(
            &sshd,
            &format!("get -r {} {}\n", sdst.display(), sback.display()),
            &mux,
        ));
    }
    control_master(&sshd, &cm, "exit");
    let (mup, mdown) = (median(mup), median(mdown));
    println!(
        "session kept open (as mqic runs): upload {:.1} MB/s ({:.2} s, ratio to sftp -b {:.2}x), download {:.1} MB/s ({:.2} s, ratio {:.2}x)",
        rate(wup), wup.as_secs_f64(), sup.as_secs_f64() / wup.as_secs_f64(),
        rate(wdown), wdown.as_secs_f64(), sdown.as_secs_f64() / wdown.as_secs_f64()
    );
    println!(
        "OpenSSH sftp -b through a control master (connection kept open): upload {:.1} MB/s ({:.2} s, mqic kept-open ratio {:.2}x), download {:.1} MB/s ({:.2} s, ratio {:.2}x)",
        rate(mup), mup.as_secs_f64(), mup.as_secs_f64() / wup.as_secs_f64(),
        rate(mdown), mdown.as_secs_f64(), mdown.as_secs_f64() / wdown.as_secs_f64()
    );
    host.disconnect().await;

    // The fixed part of each: connect, authenticate and start SFTP (sftp also quits).
    let mut fixed = (vec![], vec![]);
    for _ in 0..RUNS {
        fixed.0.push(sftp_batch(&sshd, "pwd\n", None));
        let start = Instant::now();
        let host = SshHost::new(sshd.target("gpu")).unwrap();
        host.sftp().await.unwrap();
        fixed.1.push(start.elapsed());
        host.disconnect().await;
    }
    println!(
        "connect, authenticate and start SFTP: mqic {:.0} ms, OpenSSH sftp -b (and quit) {:.0} ms",
        median(fixed.1).as_secs_f64() * 1e3,
        median(fixed.0).as_secs_f64() * 1e3
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
