//! The GPU server over SSH against a real OpenSSH sshd on loopback: host keys, exec, and the
//! SFTP transfer worker with a realistic synthetic case (about 220 files, 45 MB).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use mqic::bus::BoxFuture;
use mqic::demo::cases::{write_case, CaseSpec};
use mqic::hpc::ssh::{SshError, SshHost};
use mqic::protocol::{StepRef, TransferRequest};
use mqic::workers::transfer::sftp::SftpBackend;
use mqic::workers::transfer::{
    Direction, FileDigest, Side, TransferBackend, TransferFailure, TransferWorker, Tree,
    PART_SUFFIX,
};
use sha2::{Digest, Sha256};

use crate::sshd::{unavailable, Sshd};
use crate::support::skip;

/// Awaits `fut`, panicking with `what` after 120 s (debug builds move 45 MB slowly).
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(120), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 120 s waiting for: {what}"))
}

/// A server, or `None` after printing the SKIP line (a failure under MQIC_TEST_STRICT=1).
pub fn sshd(test: &str) -> Option<Sshd> {
    match unavailable() {
        Some(why) => {
            skip(test, &why);
            None
        }
        None => Some(Sshd::start()),
    }
}

fn host(sshd: &Sshd) -> Arc<SshHost> {
    Arc::new(SshHost::new(sshd.target("gpu1")).unwrap())
}

#[tokio::test]
async fn a_changed_host_key_is_refused_naming_host_and_file() {
    let Some(sshd) = sshd("a_changed_host_key_is_refused_naming_host_and_file") else {
        return;
    };
    let mut target = sshd.target("gpu1");
    target.known_hosts = sshd.wrong_known_hosts();
    target.accept_new = true; // never overrides a changed key
    let err = within("exec", SshHost::new(target.clone()).unwrap().exec("true"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SshError::HostKeyChanged { line: 1, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("gpu1"), "{text}");
    assert!(
        text.contains(&target.known_hosts.display().to_string()),
        "{text}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn an_unknown_host_is_refused_unless_accept_new() {
    let Some(sshd) = sshd("an_unknown_host_is_refused_unless_accept_new") else {
        return;
    };
    let mut target = sshd.target("gpu1");
    target.known_hosts = sshd.dir.path().join("fresh_known_hosts");
    std::fs::write(&target.known_hosts, "").unwrap();
    let err = within("exec", SshHost::new(target.clone()).unwrap().exec("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::UnknownHostKey { .. }), "{err}");
    assert!(err.to_string().contains("fresh_known_hosts"), "{err}");
    assert_eq!(std::fs::read_to_string(&target.known_hosts).unwrap(), "");

    target.accept_new = true;
    let out = within(
        "exec",
        SshHost::new(target.clone()).unwrap().exec("echo hi"),
    )
    .await
    .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    let learned = std::fs::read_to_string(&target.known_hosts).unwrap();
    assert!(
        learned.contains(&format!("[127.0.0.1]:{}", sshd.port)),
        "{learned}"
    );

    // Recorded now: accepted without accept_new.
    target.accept_new = false;
    let out = within("exec", SshHost::new(target).unwrap().exec("echo again"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"again\n");
}

#[tokio::test]
async fn exec_reports_exit_codes_stderr_and_large_output_on_one_session() {
    let Some(sshd) = sshd("exec_reports_exit_codes_stderr_and_large_output_on_one_session") else {
        return;
    };
    let host = host(&sshd);
    let out = within("exec", host.exec("echo out; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(out.status, Some(3));
    assert!(!out.success());
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = within("exec", host.exec("true")).await.unwrap();
    assert!(out.success());

    let out = within(
        "large",
        host.exec("head -c 6000000 /dev/zero | tr '\\000' a; echo; echo end"),
    )
    .await
    .unwrap();
    assert!(out.success());
    assert_eq!(out.stdout.len(), 6_000_000 + 1 + 4);
    assert!(out.stdout.ends_with(b"a\nend\n"));

    let out = within("stdin", host.exec_with_input("wc -c", &[7u8; 100_000]))
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy().trim(), "100000");

    // Several commands at once share the session (more than sshd's MaxSessions of 10).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let host = host.clone();
        tasks.spawn(async move { host.exec(&format!("echo {i}; exit {}", i % 5)).await });
    }
    let mut seen = 0;
    while let Some(r) = within("parallel", tasks.join_next()).await {
        let out = r.unwrap().unwrap();
        let i: u32 = out.stdout_lossy().trim().parse().unwrap();
        assert_eq!(out.status, Some(i % 5));
        seen += 1;
    }
    assert_eq!(seen, 24);
}

#[tokio::test]
async fn quick_commands_keep_status_stdout_stderr_and_input_and_survive_bad_syntax() {
    let Some(sshd) =
        sshd("quick_commands_keep_status_stdout_stderr_and_input_and_survive_bad_syntax")
    else {
        return;
    };
    let host = host(&sshd);
    let out = host
        .run("printf 'no newline'; echo oops >&2; exit 3", &[])
        .await
        .unwrap();
    assert_eq!(out.status, Some(3));
    assert_eq!(out.stdout, b"no newline");
    assert_eq!(out.stderr_lossy(), "oops\n");
    // A syntax error is the command's failure, not the helper's end.
    let out = host.run("echo 'unbalanced", &[]).await.unwrap();
    assert_ne!(out.status, Some(0));
    let out = host.run("cat; exit", b"line 1\n$(x) 'q'").await.unwrap();
    assert_eq!(out.status, Some(0));
    assert_eq!(out.stdout, b"line 1\n$(x) 'q'");
    // Several at once share the helpers; variables do not leak between commands.
    let (a, b, c) = tokio::join!(
        host.run("x=1; echo ${x}a", &[]),
        host.run("echo ${x}b", &[]),
        host.run("sleep 0.2; echo c", &[]),
    );
    assert_eq!(a.unwrap().stdout, b"1a\n");
    assert_eq!(b.unwrap().stdout, b"b\n");
    assert_eq!(c.unwrap().stdout, b"c\n");
}

#[tokio::test]
async fn the_session_reconnects_after_it_dropped() {
    let Some(sshd) = sshd("the_session_reconnects_after_it_dropped") else {
        return;
    };
    let host = host(&sshd);
    assert!(within("exec", host.exec("true")).await.unwrap().success());
    host.disconnect().await;
    assert!(within("exec", host.exec("true")).await.unwrap().success());
}

fn sha(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    format!("{:x}", Sha256::digest(&data))
}

/// Every regular file under `root` with its SHA-256.
fn hashes(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                pending.push(e.path());
            } else if t.is_file() {
                out.insert(
                    e.path().strip_prefix(root).unwrap().to_path_buf(),
                    sha(&e.path()),
                );
            }
        }
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    scan: PathBuf,
    results: PathBuf,
    remote: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let fx = Fixture {
        scan: root.join("scan"),
        results: root.join("results"),
        remote: root.join("remote-work"),
        _dir: dir,
    };
    for d in [&fx.scan, &fx.results, &fx.remote] {
        std::fs::create_dir_all(d).unwrap();
    }
    fx
}

impl Fixture {
    fn worker(&self, backend: Arc<dyn TransferBackend>) -> TransferWorker {
        TransferWorker::with_backends(
            vec![self.scan.clone(), self.results.clone()],
            vec![("gpu1".into(), self.remote.clone(), backend)],
        )
    }
}

fn request(local: &Path, remote: &Path) -> TransferRequest {
    TransferRequest {
        step: StepRef {
            case_id: "case1".into(),
            step: "upload".into(),
            attempt: 1,
        },
        host: "gpu1".into(),
        local_dir: local.display().to_string(),
        remote_dir: remote.display().to_string(),
    }
}

fn part_files(root: &Path) -> usize {
    hashes(root)
        .keys()
        .filter(|p| p.to_string_lossy().ends_with(PART_SUFFIX))
        .count()
}

#[tokio::test]
async fn a_realistic_case_goes_up_and_comes_back_verified_and_resumes() {
    let Some(sshd) = sshd("a_realistic_case_goes_up_and_comes_back_verified_and_resumes") else {
        return;
    };
    let fx = fixture();
    let case = fx.scan.join("G2").join("P0001");
    let summary = write_case(&case, &CaseSpec::realistic(1)).unwrap();
    let local = hashes(&case);
    assert!(local.len() >= 200, "{} files", local.len());
    let backend = Arc::new(SftpBackend::new(host(&sshd)));
    let worker = fx.worker(backend.clone());
    let remote = fx.remote.join("P0001").join("input");

    let seen = std::sync::Mutex::new(Vec::new());
    let done = within(
        "upload",
        worker.transfer_with_progress(&request(&case, &remote), Direction::Upload, &|p| {
            seen.lock().unwrap().push(p)
        }),
    )
    .await
    .unwrap();
    assert_eq!(done.files as usize, local.len());
    assert_eq!(done.skipped, 0);
    assert_eq!(done.bytes, summary.bytes);
    assert_eq!(hashes(&remote), local, "every file arrived intact");
    let seen = seen.into_inner().unwrap();
    let last = seen.last().unwrap();
    assert_eq!((last.files_done, last.bytes_done), (done.files, done.bytes));
    assert!(seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done));

    // A corrupted file on the server is found by its hash and sent again, alone.
    let victim = hashes(&remote)
        .keys()
        .find(|p| p.extension().is_some_and(|e| e == "ptn"))
        .unwrap()
        .clone();
    let mut data = std::fs::read(remote.join(&victim)).unwrap();
    data[10] ^= 0xff;
    std::fs::write(remote.join(&victim), data).unwrap();
    let again = within(
        "re-upload",
        worker.transfer(&request(&case, &remote), Direction::Upload),
    )
    .await
    .unwrap();
    assert_eq!(
        again.skipped,
        done.files - 1,
        "only the corrupted file went again"
    );
    assert_eq!(hashes(&remote), local);

    // And back down into the results directory.
    let back = fx.results.join("P0001");
    let mut down_req = request(&back, &remote);
    down_req.step.step = "download".into();
    let down = within("download", worker.transfer(&down_req, Direction::Download))
        .await
        .unwrap();
    assert_eq!(down.files, done.files);
    assert_eq!(hashes(&back), local);
    assert_eq!(part_files(&back) + part_files(&remote), 0);
}

/// [`SftpBackend`], except that the first `bad` copies are corrupted on the server after
/// being written (the server is this machine).
struct Corrupting {
    inner: SftpBackend,
    bad: AtomicU32,
}

impl TransferBackend for Corrupting {
    fn list(&self, side: Side, root: PathBuf) -> BoxFuture<'_, std::io::Result<Tree>> {
        self.inner.list(side, root)
    }
    fn hash(
        &self,
        side: Side,
        path: PathBuf,
    ) -> BoxFuture<'_, std::io::Result<Option<FileDigest>>> {
        self.inner.hash(side, path)
    }
    fn hash_many(
        &self,
        side: Side,
        paths: Vec<PathBuf>,
    ) -> BoxFuture<'_, std::io::Result<Vec<Option<FileDigest>>>> {
        self.inner.hash_many(side, paths)
    }
    fn copy_to_temp(
        &self,
        direction: Direction,
        src: PathBuf,
        temp: PathBuf,
    ) -> BoxFuture<'_, std::io::Result<u64>> {
        Box::pin(async move {
            let n = self
                .inner
                .copy_to_temp(direction, src, temp.clone())
                .await?;
            if self
                .bad
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let mut data = std::fs::read(&temp)?;
                data[0] ^= 1;
                std::fs::write(&temp, data)?;
            }
            Ok(n)
        })
    }
    fn rename(&self, side: Side, from: PathBuf, to: PathBuf) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.rename(side, from, to)
    }
    fn remove(&self, side: Side, path: PathBuf) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.remove(side, path)
    }
    fn make_dir(&self, side: Side, path: PathBuf) -> BoxFuture<'_, std::io::Result<bool>> {
        self.inner.make_dir(side, path)
    }
    fn resolve(&self, side: Side, path: PathBuf) -> BoxFuture<'_, std::io::Result<PathBuf>> {
        self.inner.resolve(side, path)
    }
}

#[tokio::test]
async fn a_copy_corrupted_in_flight_is_retried_then_reported_precisely() {
    let Some(sshd) = sshd("a_copy_corrupted_in_flight_is_retried_then_reported_precisely") else {
        return;
    };
    let fx = fixture();
    let case = fx.scan.join("c1");
    std::fs::create_dir_all(case.join("beam")).unwrap();
    std::fs::write(case.join("beam/dose.raw"), vec![42u8; 300_000]).unwrap();
    std::fs::write(case.join("plan.txt"), b"plan").unwrap();
    let remote = fx.remote.join("c1");
    let host = host(&sshd);
    let flaky = fx.worker(Arc::new(Corrupting {
        inner: SftpBackend::new(host.clone()),
        bad: AtomicU32::new(2),
    }));
    let done = within(
        "upload",
        flaky.transfer(&request(&case, &remote), Direction::Upload),
    )
    .await
    .unwrap();
    assert_eq!((done.files, done.skipped), (2, 0));
    assert_eq!(hashes(&remote), hashes(&case));

    std::fs::remove_dir_all(&remote).unwrap();
    let broken = fx.worker(Arc::new(Corrupting {
        inner: SftpBackend::new(host),
        bad: AtomicU32::new(u32::MAX),
    }));
    let err = within(
        "upload",
        broken.transfer(&request(&case, &remote), Direction::Upload),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.error_type(), err.code()),
        ("ChecksumMismatch", "checksum_mismatch")
    );
    assert!(err.to_string().contains("after 3 tries"), "{err}");
    assert!(
        hashes(&remote).is_empty(),
        "no final name and no temporary is left"
    );
}

#[tokio::test]
async fn an_interrupted_upload_resumes_where_it_stopped() {
    let Some(sshd) = sshd("an_interrupted_upload_resumes_where_it_stopped") else {
        return;
    };
    let fx = fixture();
    let case = fx.scan.join("P0002");
    write_case(&case, &CaseSpec::realistic(2)).unwrap();
    let worker = fx.worker(Arc::new(SftpBackend::new(host(&sshd))));
    let remote = fx.remote.join("P0002");
    let req = request(&case, &remote);
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let on_progress = |p: mqic::workers::transfer::TransferProgress| {
        tx.send_replace(p.files_done);
    };
    let cut = tokio::select! {
        r = worker.transfer_with_progress(&req, Direction::Upload, &on_progress) => Some(r),
        _ = async { while *rx.borrow_and_update() < 8 { rx.changed().await.unwrap(); } } => None,
    };
    assert!(cut.is_none(), "the upload was cut off midway");
    let partial = hashes(&remote)
        .keys()
        .filter(|p| !p.to_string_lossy().ends_with(PART_SUFFIX))
        .count();
    assert!(partial >= 8, "{partial} files were in place");

    let done = within("resume", worker.transfer(&req, Direction::Upload))
        .await
        .unwrap();
    assert!(
        done.skipped as usize >= partial,
        "{} skipped of {partial}",
        done.skipped
    );
    assert!(done.skipped < done.files);
    assert_eq!(hashes(&remote), hashes(&case));
}

#[tokio::test]
async fn hostile_names_and_escaping_paths_do_no_harm() {
    let Some(sshd) = sshd("hostile_names_and_escaping_paths_do_no_harm") else {
        return;
    };
    let fx = fixture();
    let name = "$(touch pwned)";
    let case = fx.scan.join(name);
    std::fs::create_dir_all(case.join("`touch pwned2`")).unwrap();
    std::fs::write(case.join("`touch pwned2`/a'b\"c $x.ptn"), vec![1u8; 4096]).unwrap();
    std::fs::write(case.join("x\\ny.txt"), b"odd").unwrap();
    std::fs::write(case.join("line\nbreak.txt"), b"odd too").unwrap();
    let worker = fx.worker(Arc::new(SftpBackend::new(host(&sshd))));
    let remote = fx.remote.join(name);
    let done = within(
        "upload",
        worker.transfer(&request(&case, &remote), Direction::Upload),
    )
    .await
    .unwrap();
    assert_eq!(done.files, 3);
    assert_eq!(hashes(&remote), hashes(&case));
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    for dir in [Path::new(&home), &fx.remote, &fx.scan, Path::new("/")] {
        assert!(!dir.join("pwned").exists(), "pwned in {}", dir.display());
        assert!(!dir.join("pwned2").exists(), "pwned2 in {}", dir.display());
    }

    for remote_dir in [
        format!("{}/../escaped", fx.remote.display()),
        "/etc".to_string(),
        "relative/path".to_string(),
    ] {
        let mut req = request(&case, Path::new("/"));
        req.remote_dir = remote_dir.clone();
        let err = worker.transfer(&req, Direction::Upload).await.unwrap_err();
        assert!(
            matches!(err, TransferFailure::PathRefused(_)),
            "{remote_dir}: {err}"
        );
    }
    let mut req = request(&case, &remote);
    req.local_dir = format!("{}/../../etc", fx.scan.display());
    let err = worker
        .transfer(&req, Direction::Download)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferFailure::PathRefused(_)), "{err}");
    assert!(!fx.remote.parent().unwrap().join("escaped").exists());

    // A symlink planted on the server cannot carry a download out of the root either.
    std::os::unix::fs::symlink("/etc", fx.remote.join("link")).unwrap();
    let mut req = request(&fx.results.join("x"), &fx.remote.join("link"));
    req.step.step = "download".into();
    let err = worker
        .transfer(&req, Direction::Download)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferFailure::PathRefused(_)), "{err}");
}

// ---- Remote execution ------------------------------------------------------------------

use mqic::conductor::template::shell_quote;
use mqic::hpc::local::Outcome;
use mqic::hpc::remote::RemoteRunner;
use mqic::protocol::ExecuteRequest;

struct Remote {
    _dir: tempfile::TempDir,
    root: PathBuf,
    work: PathBuf,
}

fn remote_fixture() -> Remote {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let r = Remote {
        root: root.join("attempts"),
        work: root.join("remote-work"),
        _dir: dir,
    };
    std::fs::create_dir_all(&r.work).unwrap();
    r
}

fn runner(sshd: &Sshd, r: &Remote) -> RemoteRunner {
    let host = Arc::new(SshHost::new(sshd.target("gpu1")).unwrap());
    RemoteRunner::new(&r.root, vec![("gpu1".into(), host, r.work.clone())], 4096)
        .with_kill_grace(std::time::Duration::from_millis(500))
}

fn exec_request(attempt: u32, command: &str) -> ExecuteRequest {
    ExecuteRequest {
        step: StepRef {
            case_id: "case-9".into(),
            step: "simulate".into(),
            attempt,
        },
        host: "gpu1".into(),
        command: command.into(),
        workdir: None,
        gpu_id: Some(1),
        timeout_secs: 600,
        progress_patterns: vec![r"Generating particles for \((\d+) of (\d+) batches\)".into()],
        retryable_patterns: vec!["No free GPU remains".into()],
    }
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for its reaper is gone for our purpose.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}

fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test]
async fn a_remote_step_reports_exit_codes_output_progress_and_retryable_patterns() {
    let Some(sshd) =
        sshd("a_remote_step_reports_exit_codes_output_progress_and_retryable_patterns")
    else {
        return;
    };
    let r = remote_fixture();
    let runner = runner(&sshd, &r);
    let req = exec_request(
        1,
        "for i in 1 2 3 4; do echo \"Generating particles for ($i of 4 batches)\"; sleep 0.2; done; \
         echo \"gpu=$MQIC_GPU_ID case=$MQIC_CASE_ID\"; echo to-stderr >&2",
    );
    let handle = runner.start_or_attach(&req).await.unwrap();
    assert!(!handle.reattached());
    assert!(handle.pid().is_some());
    let mut seen = Vec::new();
    let outcome = within("wait", handle.wait(|p| seen.push(p.fraction))).await;
    let Outcome::Succeeded {
        tail, exit_code, ..
    } = outcome
    else {
        panic!("expected success, got {outcome:?}");
    };
    assert_eq!(exit_code, 0);
    assert!(tail.contains("gpu=1 case=case-9"), "{tail}");
    assert!(tail.contains("to-stderr"), "{tail}");
    assert_eq!(seen.last(), Some(&1.0));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    let outcome = within(
        "fail",
        runner
            .start_or_attach(&exec_request(2, "echo 'FATAL ERROR: dose grid'; exit 3"))
            .await
            .unwrap()
            .wait(|_| {}),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Failed { exit_code: 3, retryable: false, ref tail, .. } if tail.contains("dose grid")),
        "{outcome:?}"
    );
    let outcome = within(
        "nogpu",
        runner
            .start_or_attach(&exec_request(
                3,
                "echo 'No free GPU remains after BeamLayerMultiGpu filtering'; exit 1",
            ))
            .await
            .unwrap()
            .wait(|_| {}),
    )
    .await;
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                exit_code: 1,
                retryable: true,
                ..
            }
        ),
        "{outcome:?}"
    );

    // A hostile command text stays one command; the remote directory is the attempt's own.
    let outcome = within(
        "quoting",
        runner
            .start_or_attach(&exec_request(4, "echo '$(touch pwned)' \"a'b\""))
            .await
            .unwrap()
            .wait(|_| {}),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Succeeded { ref tail, .. } if tail.contains("$(touch pwned) a'b")),
        "{outcome:?}"
    );
    assert!(r
        .work
        .join(".mqic-attempts/case-9/simulate/4/exit")
        .exists());
}

#[tokio::test]
async fn timeout_and_cancel_kill_the_whole_remote_process_group() {
    let Some(sshd) = sshd("timeout_and_cancel_kill_the_whole_remote_process_group") else {
        return;
    };
    let r = remote_fixture();
    let runner = runner(&sshd, &r);
    let gc = r.work.join("grandchild.pid");
    let mut req = exec_request(
        1,
        &format!(
            "trap '' TERM; sleep 300 & echo $! > {}; echo started; wait",
            shell_quote(&gc.display().to_string())
        ),
    );
    req.timeout_secs = 1;
    let outcome = within(
        "timeout",
        runner.start_or_attach(&req).await.unwrap().wait(|_| {}),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::TimedOut { ref tail } if tail.contains("started")),
        "{outcome:?}"
    );
    let gc_pid = read_pid_file(&gc).expect("the step wrote its grandchild's pid");
    poll_until("grandchild gone after the timeout", || process_gone(gc_pid)).await;

    let gc2 = r.work.join("grandchild2.pid");
    let req = exec_request(
        2,
        &format!(
            "sleep 300 & echo $! > {}; wait",
            shell_quote(&gc2.display().to_string())
        ),
    );
    let handle = runner.start_or_attach(&req).await.unwrap();
    let wrapper = handle.pid().unwrap();
    let waiter = tokio::spawn(handle.wait(|_| {}));
    poll_until("grandchild started", || read_pid_file(&gc2).is_some()).await;
    assert!(runner.cancel("gpu1", &req.step).await.unwrap());
    let outcome = within("cancel", waiter).await.unwrap();
    assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
    let gc2_pid = read_pid_file(&gc2).unwrap();
    poll_until("grandchild gone after the cancel", || process_gone(gc2_pid)).await;
    assert!(process_gone(wrapper));
}

#[tokio::test]
async fn a_new_runner_reattaches_to_a_running_remote_step_instead_of_starting_it_again() {
    let Some(sshd) =
        sshd("a_new_runner_reattaches_to_a_running_remote_step_instead_of_starting_it_again")
    else {
        return;
    };
    let r = remote_fixture();
    let ledger = r.work.join("ledger");
    let go = r.work.join("go");
    let req = exec_request(
        1,
        &format!(
            "echo run >> {l}; echo 'Generating particles for (1 of 2 batches)'; \
             i=0; while [ ! -e {g} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; \
             echo 'Generating particles for (2 of 2 batches)'",
            l = shell_quote(&ledger.display().to_string()),
            g = shell_quote(&go.display().to_string()),
        ),
    );
    let first = runner(&sshd, &r);
    let handle = first.start_or_attach(&req).await.unwrap();
    let pid = handle.pid();
    poll_until("ledger written", || ledger.exists()).await;
    drop(handle);
    drop(first);

    let after = runner(&sshd, &r);
    assert_eq!(after.unreported().await.unwrap(), vec![req.clone()]);
    let handle = after.start_or_attach(&req).await.unwrap();
    assert!(handle.reattached());
    if handle.is_finished() {
        panic!("finished already: {:?}", handle.wait(|_| {}).await);
    }
    assert_eq!(handle.pid(), pid);
    std::fs::write(&go, "").unwrap();
    let mut seen = Vec::new();
    let outcome = within("wait", handle.wait(|p| seen.push(p.fraction))).await;
    assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
    assert_eq!(seen.last(), Some(&1.0));
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "run\n");
    // The local copy of the output holds each line once across the restart.
    let local_log = r.root.join("case-9/simulate/1/output.log");
    assert_eq!(
        std::fs::read_to_string(&local_log).unwrap(),
        std::fs::read_to_string(r.work.join(".mqic-attempts/case-9/simulate/1/output.log"))
            .unwrap()
    );

    // Finished now: attaching again collects the exit, runs nothing.
    let later = runner(&sshd, &r);
    let handle = later.start_or_attach(&req).await.unwrap();
    assert!(handle.is_finished());
    let again = within("finished", handle.wait(|_| {})).await;
    assert!(matches!(again, Outcome::Succeeded { .. }), "{again:?}");
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "run\n");
}

#[tokio::test]
async fn a_remote_steps_output_streams_into_the_local_attempt_log() {
    let Some(sshd) = sshd("a_remote_steps_output_streams_into_the_local_attempt_log") else {
        return;
    };
    let r = remote_fixture();
    let runner = runner(&sshd, &r);
    let go = r.work.join("go");
    let req = exec_request(
        1,
        &format!(
            "echo 'first line'; echo 'to stderr' >&2; \
             i=0; while [ ! -e {g} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; \
             echo 'last line'",
            g = shell_quote(&go.display().to_string()),
        ),
    );
    let handle = runner.start_or_attach(&req).await.unwrap();
    let waiter = tokio::spawn(handle.wait(|_| {}));
    // Where the dashboard's live tail reads the local runner's steps.
    let local_log = r.root.join("case-9/simulate/1/output.log");
    let read = || std::fs::read_to_string(&local_log).unwrap_or_default();
    poll_until(
        "the first lines in the local log while the step runs",
        || read().contains("first line") && read().contains("to stderr"),
    )
    .await;
    assert!(!read().contains("last line"));
    std::fs::write(&go, "").unwrap();
    let outcome = within("wait", waiter).await.unwrap();
    assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
    let remote_log =
        std::fs::read_to_string(r.work.join(".mqic-attempts/case-9/simulate/1/output.log"))
            .unwrap();
    assert_eq!(read(), remote_log);
    assert_eq!(read().matches("first line").count(), 1);
    assert!(read().ends_with("last line\n"), "{}", read());
}

#[tokio::test]
async fn an_unreachable_host_at_start_is_a_retryable_failure() {
    let Some(sshd) = sshd("an_unreachable_host_at_start_is_a_retryable_failure") else {
        return;
    };
    let r = remote_fixture();
    let mut target = sshd.target("gpu1");
    // A port nobody listens on.
    target.port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = Arc::new(SshHost::new(target).unwrap());
    let runner = RemoteRunner::new(&r.root, vec![("gpu1".into(), host, r.work.clone())], 4096);
    let err = within("start", runner.start_or_attach(&exec_request(1, "true")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, mqic::hpc::local::LocalError::Remote { retryable: true, ref detail } if detail.contains("unreachable")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_step_times_out_while_its_host_is_away_and_is_killed_when_it_returns() {
    let Some(mut sshd) =
        sshd("a_step_times_out_while_its_host_is_away_and_is_killed_when_it_returns")
    else {
        return;
    };
    let r = remote_fixture();
    let host = Arc::new(SshHost::new(sshd.target("gpu1")).unwrap());
    let runner = RemoteRunner::new(
        &r.root,
        vec![("gpu1".into(), host.clone(), r.work.clone())],
        4096,
    )
    .with_kill_grace(std::time::Duration::from_millis(500));
    let gc = r.work.join("grandchild.pid");
    let mut req = exec_request(
        1,
        &format!(
            "sleep 300 & echo $! > {}; echo started; wait",
            shell_quote(&gc.display().to_string())
        ),
    );
    req.timeout_secs = 3;
    let handle = runner.start_or_attach(&req).await.unwrap();
    let waiter = tokio::spawn(handle.wait(|_| {}));
    poll_until("the step started", || read_pid_file(&gc).is_some()).await;
    let gc_pid = read_pid_file(&gc).unwrap();
    // The server goes away: no listener, and the open session is closed.
    sshd.stop();
    host.disconnect().await;
    let outcome = within("the timeout while the host is away", waiter)
        .await
        .unwrap();
    assert!(
        matches!(outcome, Outcome::TimedOut { ref tail } if tail.contains("unreachable")),
        "{outcome:?}"
    );
    assert!(!process_gone(gc_pid), "nothing could reach the host yet");
    // Back again: the group is killed and the attempt marked timed out on the host.
    sshd.restart();
    poll_until("the step's group killed once the host is back", || {
        process_gone(gc_pid)
    })
    .await;
    assert!(r
        .work
        .join(".mqic-attempts/case-9/simulate/1/timed_out")
        .exists());
}

// ---- The whole pipeline on the sshd host -------------------------------------------------

/// The demo workflow with every step on the ssh host `gpu`: upload, interpret and simulate
/// run there, results come back. `ledger` is named in the commands (the server's
/// environment is not mqic's).
fn ssh_workflow_text(data_dir: &Path, sshd: &Sshd, remote: &Path, ledger: &Path) -> String {
    let bin = mqic::demo::run::standin_dir(data_dir);
    mqic::demo::write_standins(&bin).unwrap();
    let q = |p: &Path| {
        shell_quote(&p.display().to_string())
            .replace('{', "{{")
            .replace('}', "}}")
    };
    let host = sshd.host_config("gpu", remote, vec![0, 1]);
    format!(
        r#"
data_dir = {data:?}
[log]
level = "warn"
[amqp]
listen = "127.0.0.1:0"
[conductor]
default_workflow = "demo"
[archiver]
interval_secs = 0
[[hosts]]
name = "local"
[[hosts]]
name = "gpu"
kind = "ssh"
address = "127.0.0.1"
port = {port}
user = {user:?}
key_file = {key:?}
known_hosts = {kh:?}
work_root = {remote:?}
gpus = [0, 1]
[[workflows.demo.steps]]
name = "upload"
kind = "upload"
host = "gpu"
timeout_secs = 120
[[workflows.demo.steps]]
name = "interpret"
kind = "execute"
host = "gpu"
timeout_secs = 120
command = "MQIC_LEDGER={ledger} sh {interp} {{remote_case_dir}}/input {{remote_case_dir}}/tps"
[[workflows.demo.steps]]
name = "simulate"
kind = "execute"
host = "gpu"
gpu = true
timeout_secs = 600
command = "MQIC_LEDGER={ledger} MQIC_DEMO_BATCH_SLEEP=0.3 sh {moqui} {{remote_case_dir}}/input {{remote_case_dir}}/output {{gpu_id}}"
progress = ['Generating particles for \((\d+) of (\d+) batches\)']
retryable_patterns = ['No free GPU remains']
retry = {{ max_attempts = 3, backoff_initial_secs = 0.2, backoff_max_secs = 1 }}
[[workflows.demo.steps]]
name = "download"
kind = "download"
host = "gpu"
timeout_secs = 120
"#,
        data = data_dir.display().to_string(),
        port = host.port,
        user = host.user,
        key = host.key_file.display().to_string(),
        kh = host.known_hosts.display().to_string(),
        remote = remote.display().to_string(),
        ledger = q(ledger),
        interp = q(&bin.join("interpreter-standin.sh")),
        moqui = q(&bin.join("moqui-standin.sh")),
    )
}

fn serve(config: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut child = crate::process::mqic()
        .args(["serve", "--config"])
        .arg(config)
        .args([
            "--web-listen",
            "127.0.0.1:0",
            "--management-listen",
            "127.0.0.1:0",
        ])
        .args(["--prometheus-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mqic starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("amqp listening on"), "{line:?}");
    child
}

// Every path that does not panic stops and waits for the child it started.
#[allow(clippy::zombie_processes)]
#[test]
fn the_pipeline_runs_on_the_ssh_host_and_survives_kill_9_mid_step() {
    use mqic::store::records::CaseStatus;
    use mqic::store::Store;
    let Some(sshd) = sshd("the_pipeline_runs_on_the_ssh_host_and_survives_kill_9_mid_step") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let data = root.join("data");
    let remote = root.join("gpu-work");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    let ledger = root.join("ledger");
    let config = root.join("mqic.toml");
    std::fs::write(&config, ssh_workflow_text(&data, &sshd, &remote, &ledger)).unwrap();
    let scan = data.join("cases");
    std::fs::create_dir_all(&scan).unwrap();

    let mut child = serve(&config);
    let id = crate::workflow::drop_case(&scan, 901);
    // Kill mqic while the simulation runs on the host.
    let sim = remote
        .join(".mqic-attempts")
        .join(&id)
        .join("simulate")
        .join("1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !sim.join("pid").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the simulation never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!sim.join("exit").exists(), "killed mid-step");
    let pid = read_pid_file(&sim.join("pid")).unwrap();
    assert!(!process_gone(pid), "the step runs on without mqic");

    let mut child = serve(&config);
    let results = data.join("results").join(&id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let output = remote.join(&id).join("output");
        let arrived = results.is_dir()
            && output.is_dir()
            && !hashes(&output).is_empty()
            && hashes(&results) == hashes(&output);
        if arrived && crate::workflow::ledger(&ledger).len() >= 2 {
            // Give the report a moment to reach the store before stopping.
            std::thread::sleep(std::time::Duration::from_secs(1));
            // SAFETY: the child is ours.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
            let store = Store::open(&data.join("mqic.redb")).unwrap();
            let case = store.case(&id.as_str().into()).unwrap().unwrap();
            if case.status == CaseStatus::Completed {
                break;
            }
            assert_ne!(case.status, CaseStatus::Failed, "{case:#?}");
            drop(store);
            child = serve(&config);
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: the child is ours.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
            let store = Store::open(&data.join("mqic.redb")).unwrap();
            panic!(
                "the case did not complete: {:#?}\nhistory: {:#?}\nledger: {:?}",
                store.case(&id.as_str().into()).unwrap(),
                store.history(&id.as_str().into()).unwrap(),
                crate::workflow::ledger(&ledger)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let lines = crate::workflow::ledger(&ledger);
    for step in ["interpret", "simulate"] {
        let runs = lines
            .iter()
            .filter(|l| l.starts_with(&format!("{id} {step} ")))
            .count();
        assert_eq!(runs, 1, "{step} ran {runs} times: {lines:?}");
    }
    assert_eq!(
        hashes(&results),
        hashes(&remote.join(&id).join("output")),
        "the results came back intact"
    );
    assert!(!hashes(&results).is_empty());
}
