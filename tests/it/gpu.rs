//! GPU monitoring end to end: a real `mqic serve` child process finds a fake `nvidia-smi`
//! (a bash script printing CSV from files this test rewrites) first on its PATH. The curator
//! samples it, `list_gpus` shows what it saw, and the conductor leases only GPUs that are
//! seen, idle and roomy: a case skips the GPU with a foreign process and the one short of
//! memory, a case waits while no GPU qualifies, and proceeds once one frees.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use mqic::demo::cases::{write_case, CaseSpec};
use serde_json::{json, Value};

use crate::process::mqic;
use crate::support::have_program;
use crate::workflow::Rpc;

const HEADER_GPUS: &str = "index, uuid, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB], temperature.gpu";
const HEADER_APPS: &str = "gpu_uuid, pid, process_name, used_gpu_memory [MiB]";

/// The fake: answers exactly the two queries the curator sends, from files in `dir`.
fn write_fake_smi(bin: &Path, state: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    let script = format!(
        r#"#!/bin/bash
# A stand-in for nvidia-smi, driven by files the test rewrites.
state='{state}'
if [ "$2" != "--format=csv" ]; then echo "unexpected arguments: $*" >&2; exit 2; fi
case "$1" in
  --query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu)
    cat "$state/gpus.csv" ;;
  --query-compute-apps=gpu_uuid,pid,process_name,used_memory)
    cat "$state/apps.csv" ;;
  *) echo "unexpected query: $1" >&2; exit 2 ;;
esac
"#,
        state = state.display()
    );
    let path = bin.join("nvidia-smi");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// One GPU row: (index, memory used MiB). Every GPU is an 80 GB H100.
fn set_state(state: &Path, gpus: &[(u32, u64)], apps: &[(u32, u32, &str)]) {
    let mut g = format!("{HEADER_GPUS}\n");
    for (i, used) in gpus {
        g.push_str(&format!(
            "{i}, GPU-{i:04}, NVIDIA H100 80GB HBM3, 3 %, {used} MiB, 81559 MiB, 35\n"
        ));
    }
    let mut a = format!("{HEADER_APPS}\n");
    for (gpu, pid, name) in apps {
        a.push_str(&format!("GPU-{gpu:04}, {pid}, {name}, 900 MiB\n"));
    }
    // Renamed into place, so the script never reads half a file.
    for (name, text) in [("gpus.csv", g), ("apps.csv", a)] {
        let tmp = state.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, state.join(name)).unwrap();
    }
}

/// `mqic serve` with the fake first on PATH; killed on drop.
struct Serve {
    child: Child,
    url: String,
    /// Where Prometheus `/metrics` is served (`host:port`).
    metrics: String,
    log: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn serve(dir: &Path, bin: &Path, ledger: &Path) -> Serve {
    let data = dir.join("data");
    let ledger = mqic::conductor::template::shell_quote(&ledger.display().to_string());
    serve_config(
        dir,
        &format!(
            r#"
data_dir = "{data}"
[log]
level = "info"
[amqp]
listen = "127.0.0.1:0"
[conductor]
default_workflow = "gpu"
[archiver]
interval_secs = 0
[curator]
interval_ms = 150
timeout_ms = 5000
nvml = false
[[hosts]]
name = "local"
gpus = [0, 1, 2]
min_free_memory_mib = 2000
[[workflows.gpu.steps]]
name = "simulate"
kind = "local"
gpu = true
timeout_secs = 60
command = "echo {{case_id}} {{gpu_id}} >> {ledger}"
"#,
            data = data.display(),
        ),
        bin,
    )
}

/// `mqic serve` with `config` and `bin` first on its PATH; killed on drop.
fn serve_config(dir: &Path, config_text: &str, bin: &Path) -> Serve {
    let config = dir.join("mqic.toml");
    std::fs::write(&config, config_text).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = dir.join("mqic.log");
    let mut child = mqic()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args([
            "--web-listen",
            "127.0.0.1:0",
            "--management-listen",
            "127.0.0.1:0",
        ])
        .args(["--prometheus-listen", "127.0.0.1:0"])
        .env("PATH", path)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("mqic starts");
    // The ready lines: amqp, management API, prometheus (then the dashboard).
    let mut out = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).expect("ready line");
        lines.push(line.trim().to_string());
    }
    let after = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {lines:?}"))
            .to_string()
    };
    let addr = after("amqp listening on ");
    let metrics = after("prometheus metrics listening on http://")
        .trim_end_matches("/metrics")
        .to_string();
    Serve {
        child,
        url: format!("amqp://guest:guest@{addr}/%2f"),
        metrics,
        log,
    }
}

/// `GET /metrics` over plain HTTP/1.0; the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// Calls `method` until `cond` holds on the reply payload (60 s at most).
async fn wait_for(
    rpc: &mut Rpc,
    serve: &Serve,
    method: &str,
    payload: Value,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = rpc.call(method, payload.clone()).await;
        let body = reply["payload"].clone();
        if reply["status"] == "success" && cond(&body) {
            return body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; last {method} reply: {reply:#}\nmqic log:\n{}",
                std::fs::read_to_string(&serve.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn gpu(gpus: &Value, index: u64) -> &Value {
    gpus.as_array()
        .and_then(|a| a.iter().find(|g| g["index"] == index))
        .unwrap_or(&Value::Null)
}

fn ledger_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn case_status(case: &Value) -> String {
    case["case"]["status"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curator_samples_a_fake_nvidia_smi_and_the_conductor_leases_accordingly() {
    let test = "gpu::the_curator_samples_a_fake_nvidia_smi_and_the_conductor_leases_accordingly";
    if !have_program(test, "bash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(dir.path()).unwrap();
    let (bin, state, ledger) = (dir.join("bin"), dir.join("state"), dir.join("ledger"));
    std::fs::create_dir_all(&state).unwrap();
    write_fake_smi(&bin, &state);
    // GPU 0 runs someone's python, GPU 1 has 1559 MiB free (2000 needed), GPU 2 is idle.
    set_state(
        &state,
        &[(0, 900), (1, 80_000), (2, 4)],
        &[(0, 4242, "python")],
    );
    let serve = serve(&dir, &bin, &ledger);
    let mut rpc = Rpc::connect(&serve.url).await;

    let gpus = wait_for(
        &mut rpc,
        &serve,
        "list_gpus",
        json!({"history": 5}),
        "a first sample of every GPU",
        |g| (0..3).all(|i| gpu(g, i)["status"] == "ok"),
    )
    .await;
    let g0 = gpu(&gpus, 0);
    assert_eq!(g0["uuid"], "GPU-0000");
    assert_eq!(g0["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(g0["memory_total_mib"], 81559);
    assert_eq!(g0["temperature_c"], 35);
    assert_eq!(g0["utilization_pct"], 3);
    assert_eq!(g0["foreign_processes"], 1);
    assert_eq!(g0["processes"][0]["pid"], 4242);
    assert_eq!(g0["processes"][0]["name"], "python");
    assert_eq!(g0["leasable"], false);
    assert!(g0["history"].as_array().is_some_and(|h| !h.is_empty()));
    // The same sample in Prometheus, per GPU.
    let metrics = scrape(&serve.metrics);
    for line in [
        "mqic_gpu_utilization_percent{host=\"local\",index=\"0\"} 3",
        "mqic_gpu_memory_total_bytes{host=\"local\",index=\"0\"} 85520809984",
        "mqic_gpu_temperature_celsius{host=\"local\",index=\"0\"} 35",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    let g1 = gpu(&gpus, 1);
    assert_eq!(g1["memory_free_mib"], 1559);
    assert_eq!(g1["leasable"], false);
    assert_eq!(g1["not_leasable_because"], "1559 MiB free, 2000 MiB needed");
    assert_eq!(gpu(&gpus, 2)["leasable"], true);
    let status = rpc.call("get_status", json!({})).await["payload"].clone();
    assert_eq!(status["gpus"], 3);
    assert_eq!(status["gpus_passing_checks"], 1);

    // A case skips the occupied GPU 0 and the full GPU 1 and runs on GPU 2.
    let scan = dir.join("data").join("cases");
    let first = CaseSpec::tiny(1);
    write_case(&scan.join(&first.patient_id), &first).unwrap();
    let id1 = first.patient_id.clone();
    wait_for(
        &mut rpc,
        &serve,
        "get_case",
        json!({"case_id": id1}),
        "the first case to complete",
        |c| case_status(c) == "COMPLETED",
    )
    .await;
    assert_eq!(ledger_lines(&ledger), [format!("{id1} 2")]);

    // GPU 2 disappears from the samples: no GPU qualifies, so the next case waits.
    set_state(&state, &[(0, 900), (1, 80_000)], &[(0, 4242, "python")]);
    wait_for(
        &mut rpc,
        &serve,
        "list_gpus",
        json!({}),
        "GPU 2 to be missing",
        |g| gpu(g, 2)["status"] == "missing" && gpu(g, 2)["leasable"] == false,
    )
    .await;
    let second = CaseSpec::tiny(2);
    write_case(&scan.join(&second.patient_id), &second).unwrap();
    let id2 = second.patient_id.clone();
    wait_for(
        &mut rpc,
        &serve,
        "get_case",
        json!({"case_id": id2}),
        "the second case to wait for a GPU",
        |c| case_status(c) == "PENDING_RESOURCE",
    )
    .await;
    // Several more samples pass and it still waits: nothing was leased behind its back.
    let sampled = |g: &Value| gpu(g, 0)["sampled"].as_str().unwrap_or("").to_string();
    let mut seen = sampled(&rpc.call("list_gpus", json!({})).await["payload"]);
    for _ in 0..3 {
        let before = seen.clone();
        let g = wait_for(
            &mut rpc,
            &serve,
            "list_gpus",
            json!({}),
            "another sample",
            |g| sampled(g) != before,
        )
        .await;
        seen = sampled(&g);
    }
    let waiting = rpc.call("get_case", json!({"case_id": id2})).await;
    assert_eq!(case_status(&waiting["payload"]), "PENDING_RESOURCE");
    assert_eq!(ledger_lines(&ledger).len(), 1);

    // The foreign process ends: GPU 0 qualifies and the waiting case runs there.
    set_state(&state, &[(0, 900), (1, 80_000)], &[]);
    wait_for(
        &mut rpc,
        &serve,
        "get_case",
        json!({"case_id": id2}),
        "the second case to complete once GPU 0 frees",
        |c| case_status(c) == "COMPLETED",
    )
    .await;
    assert_eq!(
        ledger_lines(&ledger),
        [format!("{id1} 2"), format!("{id2} 0")]
    );
    let gpus = rpc.call("list_gpus", json!({})).await["payload"].clone();
    assert_eq!(gpu(&gpus, 0)["foreign_processes"], 0);
    assert_eq!(gpu(&gpus, 1)["leasable"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_gpu_monitoring_configured_gpus_are_leased_as_before() {
    // The curator runs, but there is no NVML (nvml = false) and no nvidia-smi: CI's case.
    let server = crate::workflow::start(|c| {
        c.workers.curator = true;
        c.curator.nvml = false;
        c.curator.nvidia_smi = "mqic-test-no-such-nvidia-smi".into();
        c.curator.interval_ms = 100;
    })
    .await;
    let store = crate::workflow::store(&server);
    let scan = crate::workflow::scan_dir(&server);
    let id = crate::workflow::drop_case(&scan, 1);
    crate::workflow::wait_status(&store, &id, mqic::store::records::CaseStatus::Completed).await;
    let gpus = store.gpus().unwrap();
    assert!(!gpus.is_empty());
    assert!(
        gpus.iter().all(|g| g.state.is_none()),
        "no monitoring data is recorded: {gpus:?}"
    );
    let mut rpc = Rpc::connect(&server.url()).await;
    let listed = rpc.call("list_gpus", json!({})).await;
    assert!(listed["payload"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["monitored"] == false && g["leasable"].is_boolean()));
    server.stop().await;
}

fn gpu_on<'a>(gpus: &'a Value, host: &str, index: u64) -> &'a Value {
    gpus.as_array()
        .and_then(|a| a.iter().find(|g| g["host"] == host && g["index"] == index))
        .unwrap_or(&Value::Null)
}

/// The same fake, on the SSH host: the curator runs it through the host's session (the
/// sshd serves this machine, so the script's path in the test's temp dir is the server's),
/// and the conductor leases only the SSH host's GPU that is idle and roomy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_nvidia_smi_on_the_ssh_host_drives_the_curator_and_the_gpu_choice() {
    let test = "gpu::a_fake_nvidia_smi_on_the_ssh_host_drives_the_curator_and_the_gpu_choice";
    if !have_program(test, "bash") {
        return;
    }
    let Some(sshd) = crate::ssh::sshd(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(dir.path()).unwrap();
    let (bin, state, ledger) = (dir.join("bin"), dir.join("state"), dir.join("ledger"));
    let remote = dir.join("gpu-work");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    write_fake_smi(&bin, &state);
    // GPU 0 runs someone's python, GPU 1 has 1559 MiB free (2000 needed), GPU 2 is idle.
    set_state(
        &state,
        &[(0, 900), (1, 80_000), (2, 4)],
        &[(0, 4242, "python")],
    );
    let host = sshd.host_config("gpu", &remote, vec![0, 1, 2]);
    let q = |p: &Path| mqic::conductor::template::shell_quote(&p.display().to_string());
    let config = format!(
        r#"
data_dir = "{data}"
[log]
level = "info"
[amqp]
listen = "127.0.0.1:0"
[conductor]
default_workflow = "gpu"
[archiver]
interval_secs = 0
[curator]
interval_ms = 150
timeout_ms = 5000
nvml = false
nvidia_smi = "{smi}"
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
gpus = [0, 1, 2]
min_free_memory_mib = 2000
[[workflows.gpu.steps]]
name = "upload"
kind = "upload"
host = "gpu"
timeout_secs = 60
[[workflows.gpu.steps]]
name = "simulate"
kind = "execute"
host = "gpu"
gpu = true
timeout_secs = 60
command = "echo {{case_id}} {{gpu_id}} >> {ledger}"
"#,
        data = dir.join("data").display(),
        smi = bin.join("nvidia-smi").display(),
        port = host.port,
        user = host.user,
        key = host.key_file.display().to_string(),
        kh = host.known_hosts.display().to_string(),
        remote = remote.display().to_string(),
        ledger = q(&ledger),
    );
    // Nothing on mqic's own PATH: the fake is reached only through the SSH host.
    let serve = serve_config(&dir, &config, &dir.join("no-bin"));
    let mut rpc = Rpc::connect(&serve.url).await;

    let gpus = wait_for(
        &mut rpc,
        &serve,
        "list_gpus",
        json!({}),
        "a first sample of every GPU of the SSH host",
        |g| (0..3).all(|i| gpu_on(g, "gpu", i)["status"] == "ok"),
    )
    .await;
    let g0 = gpu_on(&gpus, "gpu", 0);
    assert_eq!(g0["uuid"], "GPU-0000");
    assert_eq!(g0["foreign_processes"], 1);
    assert_eq!(g0["processes"][0]["pid"], 4242);
    assert_eq!(g0["leasable"], false);
    let g1 = gpu_on(&gpus, "gpu", 1);
    assert_eq!(g1["leasable"], false);
    assert_eq!(g1["not_leasable_because"], "1559 MiB free, 2000 MiB needed");
    assert_eq!(gpu_on(&gpus, "gpu", 2)["leasable"], true);

    // A case skips the occupied GPU 0 and the full GPU 1 and runs on GPU 2 of the host.
    let scan = dir.join("data").join("cases");
    let first = CaseSpec::tiny(1);
    write_case(&scan.join(&first.patient_id), &first).unwrap();
    let id1 = first.patient_id.clone();
    wait_for(
        &mut rpc,
        &serve,
        "get_case",
        json!({"case_id": id1}),
        "the case to complete on the SSH host",
        |c| case_status(c) == "COMPLETED",
    )
    .await;
    assert_eq!(ledger_lines(&ledger), [format!("{id1} 2")]);
    // The step ran on the host: its attempt directory is under the host's work root.
    assert!(remote
        .join(".mqic-attempts")
        .join(&id1)
        .join("simulate/1/exit")
        .is_file());
}
