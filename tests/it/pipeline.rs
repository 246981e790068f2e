//! The case pipeline end to end: cases dropped into the watched folder run through the demo
//! workflow (upload, interpret, simulate on a leased GPU, download) on the embedded broker,
//! over TCP with the `Remote` bus, with an executor in a separate `mqic worker` process, and
//! against a real RabbitMQ; bad envelopes are dead-lettered; the RPC answers; cancel kills.

use std::path::Path;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use mqic::store::records::CaseStatus;
use serde_json::json;

use crate::process::mqic;
use crate::support::{declare_queue, skip, TestServer};
use crate::workflow::{self, drop_case, drop_unmarked_case, ledger, wait_case, wait_status, Rpc};

/// The ledger file the stand-ins append to; set once for the whole test process (the
/// executor's children inherit the environment).
fn ledger_path() -> &'static Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("mqic-it-ledger-{}", std::process::id()));
        // SAFETY: set before any test spawns a step, and never changed afterwards.
        unsafe {
            std::env::set_var("MQIC_LEDGER", &p);
            std::env::set_var("MQIC_DEMO_BATCH_SLEEP", "0.01");
        }
        p
    })
}

fn ledger_for(case: &str) -> Vec<String> {
    ledger(ledger_path())
        .into_iter()
        .filter(|l| l.split(' ').next() == Some(case))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_dropped_in_the_folder_complete_end_to_end() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let store = workflow::store(&server);
    let scan = workflow::scan_dir(&server);
    let ids: Vec<String> = (101..104).map(|n| drop_case(&scan, n)).collect();
    for id in &ids {
        let case = wait_status(&store, id, CaseStatus::Completed).await;
        assert_eq!(case.progress, 1.0);
        assert_eq!(
            case.done
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>(),
            ["upload", "interpret", "simulate", "download"]
        );
        let history = store.history(&id.as_str().into()).unwrap();
        assert_eq!(history.first().unwrap().to, CaseStatus::New);
        assert_eq!(history.last().unwrap().to, CaseStatus::Completed);
        assert!(
            history.iter().any(|h| h
                .reason
                .contains("simulate attempt 1 dispatched on GPU local:")),
            "{history:#?}"
        );
        let mut lines = ledger_for(id);
        lines.sort();
        assert_eq!(
            lines,
            [format!("{id} interpret 1"), format!("{id} simulate 1")]
        );
        let results = server.app.config.results_dir().join(id).join("Dose");
        let doses = std::fs::read_dir(&results)
            .unwrap_or_else(|e| panic!("{}: {e}", results.display()))
            .count();
        assert_eq!(doses, 2, "one RTDOSE per beam came back");
    }
    assert!(
        store.leases().unwrap().is_empty(),
        "no GPU lease left behind"
    );
    assert_eq!(store.outbox_len().unwrap(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_the_case_with_a_structured_reason_and_retry_case_reruns_it() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let store = workflow::store(&server);
    let scan = workflow::scan_dir(&server);
    let (id, dir) = drop_unmarked_case(&scan, 201);
    std::fs::write(dir.join("MQIC_DEMO_FAIL"), "exit\n").unwrap();
    mqic::demo::cases::mark_ready(&dir).unwrap();
    let case = wait_status(&store, &id, CaseStatus::Failed).await;
    let failure = case.failure.unwrap();
    assert_eq!(failure.code, "exit_code_2");
    assert_eq!(failure.phase, "execute");
    assert_eq!(failure.step.as_deref(), Some("simulate"));
    assert_eq!(failure.error_type, "RunningError");
    assert!(
        failure.output_tail.contains("FATAL ERROR"),
        "{}",
        failure.output_tail
    );
    assert!(
        store.leases().unwrap().is_empty(),
        "the GPU was released on failure"
    );

    let mut rpc = Rpc::connect(&server.url()).await;
    let refused = rpc
        .call("retry_case", json!({"case_id": "no-such-case"}))
        .await;
    assert_eq!(refused["status"], "failure");
    // The operator fixes the input where the failed step reads it: the retry resumes at
    // `simulate`, on the copy uploaded to the host, without uploading again.
    let config = &server.app.config;
    let uploaded = config.work_root(&config.hosts[0]).join(&id).join("input");
    std::fs::remove_file(uploaded.join("MQIC_DEMO_FAIL")).unwrap();
    let reply = rpc.call("retry_case", json!({"case_id": id})).await;
    assert_eq!(reply["status"], "success", "{reply}");
    let case = wait_status(&store, &id, CaseStatus::Completed).await;
    assert_eq!(case.manual_retries, 1);
    assert!(case.failure.is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_output_is_retried_with_backoff_until_the_budget_is_used() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let store = workflow::store(&server);
    let (id, dir) = drop_unmarked_case(&workflow::scan_dir(&server), 202);
    std::fs::write(dir.join("MQIC_DEMO_FAIL"), "nogpu\n").unwrap();
    mqic::demo::cases::mark_ready(&dir).unwrap();
    let case = wait_status(&store, &id, CaseStatus::Failed).await;
    let failure = case.failure.unwrap();
    assert_eq!(failure.category, mqic::protocol::FailureCategory::Retryable);
    assert_eq!(failure.attempt, Some(3));
    let history = store.history(&id.as_str().into()).unwrap();
    let retries = history
        .iter()
        .filter(|h| h.reason.contains("retry ") && h.to == CaseStatus::Queued)
        .count();
    assert_eq!(retries, 2, "{history:#?}");
    assert!(history
        .last()
        .unwrap()
        .reason
        .contains("retry budget of 3 attempts used up"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_case_kills_the_running_step_and_frees_its_gpu() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let store = workflow::store(&server);
    let (id, dir) = drop_unmarked_case(&workflow::scan_dir(&server), 203);
    std::fs::write(dir.join("MQIC_DEMO_FAIL"), "hang\n").unwrap();
    mqic::demo::cases::mark_ready(&dir).unwrap();
    let case = wait_case(&store, &id, "simulate running with a pid", |c| {
        c.step
            .as_ref()
            .is_some_and(|r| r.name == "simulate" && r.pid.is_some())
    })
    .await;
    let pid = case.step.unwrap().pid.unwrap() as i32;
    assert_eq!(store.leases().unwrap().len(), 1);
    let mut rpc = Rpc::connect(&server.url()).await;
    let reply = rpc.call("cancel_case", json!({"case_id": id})).await;
    assert_eq!(reply["payload"]["status"], "CANCELLED", "{reply}");
    assert!(store.leases().unwrap().is_empty());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "step process {pid} still alive after cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = rpc.call("cancel_case", json!({"case_id": id})).await;
    assert_eq!(again["status"], "failure");
    assert!(
        again["payload"]["error"]
            .as_str()
            .unwrap()
            .contains("CANCELLED"),
        "{again}"
    );
    server.stop().await;
}

async fn bad_message(ch: &lapin::Channel, body: &[u8]) {
    ch.basic_publish(
        "".into(),
        "conductor_queue".into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn header(props: &BasicProperties, name: &str) -> String {
    match props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
    {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_envelopes_are_dead_lettered_with_their_reason_and_work_goes_on() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    bad_message(&ch, b"this is not json").await;
    bad_message(&ch, br#"{"command":"launch","payload":{}}"#).await;
    bad_message(
        &ch,
        br#"{"command":"new_case_found","payload":{"case_id":"x"}}"#,
    )
    .await;
    bad_message(&ch, br#"{"command":"upload_case","payload":{"case_id":"x","step":"s","attempt":1,"host":"local","local_dir":"/a","remote_dir":"/b"}}"#).await;
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while reasons.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters so far: {reasons:?}"
        );
        match ch
            .basic_get(
                "conductor_queue.dlq".into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            Some(m) => reasons.push((
                header(&m.delivery.properties, "x-mqic-error"),
                header(&m.delivery.properties, "x-mqic-reason"),
                header(&m.delivery.properties, "x-mqic-original-queue"),
                String::from_utf8_lossy(&m.delivery.data).into_owned(),
            )),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(reasons[0].0, "not_json");
    assert_eq!(
        reasons[0].3, "this is not json",
        "the body is kept as it was"
    );
    assert_eq!(reasons[1].0, "unknown_command");
    assert!(reasons[1].1.contains("launch"));
    assert_eq!(reasons[2].0, "bad_payload");
    assert!(reasons[2].1.contains("case_path"), "{}", reasons[2].1);
    assert_eq!(reasons[3].0, "unexpected_command");
    assert!(reasons[3].1.contains("not a conductor command"));
    assert!(reasons.iter().all(|r| r.2 == "conductor_queue"));

    let store = workflow::store(&server);
    let id = drop_case(&workflow::scan_dir(&server), 204);
    wait_status(&store, &id, CaseStatus::Completed).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_methods_answer_and_unknown_ones_or_versions_get_a_failure_reply() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let store = workflow::store(&server);
    let id = drop_case(&workflow::scan_dir(&server), 205);
    wait_status(&store, &id, CaseStatus::Completed).await;
    let mut rpc = Rpc::connect(&server.url()).await;

    let status = rpc.call("get_status", json!({})).await;
    assert_eq!(status["status"], "success", "{status}");
    assert_eq!(status["version"], "1.0.0");
    assert_eq!(status["session_id"], "test");
    assert_eq!(status["payload"]["cases"]["COMPLETED"], 1);
    assert_eq!(status["payload"]["gpus"], 2);

    let list = rpc.call("list_cases", json!({"status": "completed"})).await;
    assert_eq!(list["payload"][0]["case_id"], id.as_str());
    let none = rpc.call("list_cases", json!({"status": "FAILED"})).await;
    assert_eq!(none["payload"], json!([]));
    let bad = rpc.call("list_cases", json!({"status": "SLEEPING"})).await;
    assert_eq!(bad["status"], "failure");

    let case = rpc.call("get_case", json!({"case_id": id})).await;
    assert_eq!(case["payload"]["case"]["status"], "COMPLETED");
    assert!(case["payload"]["history"].as_array().unwrap().len() >= 6);
    let missing = rpc.call("get_case", json!({"case_id": "nope"})).await;
    assert_eq!(missing["status"], "failure");

    let gpus = rpc.call("list_gpus", json!({})).await;
    assert_eq!(gpus["payload"].as_array().unwrap().len(), 2);
    let tasks = rpc.call("list_tasks", json!({})).await;
    assert_eq!(tasks["payload"], json!([]));
    let workers = rpc.call("list_workers", json!({})).await;
    let roles: Vec<&str> = workers["payload"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["role"].as_str())
        .collect();
    for role in ["conductor", "executor", "transfer", "scanner", "relay"] {
        assert!(roles.contains(&role), "{role} in {roles:?}");
    }

    let unknown = rpc.call("reboot", json!({})).await;
    assert_eq!(unknown["status"], "failure");
    assert!(unknown["payload"]["error"]
        .as_str()
        .unwrap()
        .contains("unknown method"));
    let v2 = rpc
        .raw(
            "methods.get_status",
            json!({"command": "get_status", "payload": {}, "version": "2.0.0", "session_id": "s2"}),
        )
        .await;
    assert_eq!(v2["status"], "failure");
    assert_eq!(v2["session_id"], "s2");
    assert!(v2["payload"]["error"]
        .as_str()
        .unwrap()
        .contains("unsupported protocol version"));
    let garbage = rpc.raw("methods.get_status", json!("garbage")).await;
    assert_eq!(garbage["status"], "failure");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_events_are_routed_on_the_events_topic_exchange() {
    ledger_path();
    let server = workflow::start(|_| {}).await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    let q = declare_queue(&ch, "watch-cases").await;
    ch.queue_bind(
        q.as_str().into(),
        "mqic.events".into(),
        "case.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let id = drop_case(&workflow::scan_dir(&server), 206);
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "watch".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut keys = Vec::new();
    while !keys.contains(&format!("case.completed.{id}")) {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("events so far: {keys:?}"))
            .unwrap()
            .unwrap();
        let event: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(event["case_id"], id.as_str());
        keys.push(d.routing_key.to_string());
    }
    assert!(keys.contains(&format!("case.queued.{id}")), "{keys:?}");
    assert!(keys.contains(&format!("case.processing.{id}")), "{keys:?}");
    assert!(
        keys.iter().all(|k| k.starts_with("case.")),
        "only case.# was bound: {keys:?}"
    );
    server.stop().await;
}

#[test]
fn a_pika_script_publishing_a_seed_new_case_found_starts_a_workflow() {
    let has_pika = std::process::Command::new("python3")
        .args(["-c", "import pika"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pika {
        skip(
            "a_pika_script_publishing_a_seed_new_case_found_starts_a_workflow",
            "python3 with pika not found",
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        ledger_path();
        let server = workflow::start(|_| {}).await;
        let (id, dir) = drop_unmarked_case(&workflow::scan_dir(&server), 207);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pika_new_case.py");
        let out = tokio::process::Command::new("python3")
            .arg(script)
            .arg(server.url())
            .arg(&id)
            .arg(&dir)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store = workflow::store(&server);
        let case = wait_status(&store, &id, CaseStatus::Completed).await;
        assert_eq!(case.case_path, dir.display().to_string());
        server.stop().await;
    });
}

/// A free loopback port (bound and released; good enough for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_bus_runs_the_pipeline_over_tcp_against_mqic() {
    ledger_path();
    let port = free_port();
    let server = workflow::start(|c| {
        c.amqp.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.broker.url = Some(format!("amqp://guest:guest@127.0.0.1:{port}/%2F"));
    })
    .await;
    assert!(
        server.app.pipeline.bus.describe().contains("127.0.0.1"),
        "{}",
        server.app.pipeline.bus.describe()
    );
    assert!(
        !server.app.pipeline.bus.describe().contains("guest:guest"),
        "no password in descriptions"
    );
    let store = workflow::store(&server);
    let ids: Vec<String> = (301..303)
        .map(|n| drop_case(&workflow::scan_dir(&server), n))
        .collect();
    for id in &ids {
        wait_status(&store, id, CaseStatus::Completed).await;
        assert_eq!(ledger_for(id).len(), 2);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_bus_runs_the_pipeline_against_a_real_rabbitmq() {
    let Ok(url) = std::env::var("MQIC_TEST_RABBITMQ_URL") else {
        skip(
            "the_remote_bus_runs_the_pipeline_against_a_real_rabbitmq",
            "MQIC_TEST_RABBITMQ_URL not set (no RabbitMQ)",
        );
        return;
    };
    ledger_path();
    let server = workflow::start(|c| c.broker.url = Some(url.clone())).await;
    let store = workflow::store(&server);
    let id = drop_case(&workflow::scan_dir(&server), 401);
    wait_status(&store, &id, CaseStatus::Completed).await;
    assert_eq!(ledger_for(&id).len(), 2);
    let mut rpc = Rpc::connect(&url).await;
    let status = rpc.call("get_status", json!({})).await;
    assert_eq!(status["status"], "success", "RPC over RabbitMQ: {status}");
    server.stop().await;
}

/// `mqic worker --role executor` against the server, keeping its attempts in `dir`.
fn spawn_executor(server: &TestServer, dir: &Path) -> tokio::process::Child {
    tokio::process::Command::from(mqic())
        .args(["worker", "--role", "executor", "--broker"])
        .arg(server.url())
        .arg("--data-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_in_a_separate_mqic_worker_process_runs_the_steps() {
    ledger_path();
    let server = workflow::start(|c| c.workers.executor = false).await;
    let worker_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_executor(&server, worker_dir.path());
    let store = workflow::store(&server);
    let id = drop_case(&workflow::scan_dir(&server), 501);
    wait_status(&store, &id, CaseStatus::Completed).await;
    assert_eq!(ledger_for(&id).len(), 2);
    let attempts = worker_dir.path().join("attempts").join(&id);
    assert!(
        attempts.join("simulate/1/output.log").exists(),
        "the worker process ran the step"
    );
    assert!(
        !server
            .app
            .config
            .data_dir
            .join("attempts")
            .join(&id)
            .exists(),
        "the server did not"
    );
    let worker_pid = child.id().unwrap();
    let mut rpc = Rpc::connect(&server.url()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let workers = rpc.call("list_workers", json!({})).await;
        let found = workers["payload"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["role"] == "executor" && w["pid"] == worker_pid && w["alive"] == true);
        if found {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{workers}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SAFETY: the child is ours.
    unsafe { libc::kill(worker_pid as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "worker exits 0 on SIGTERM: {status}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_picks_up_where_the_store_left_off() {
    ledger_path();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start_with(|c| {
        *c = workflow::workflow_config(&data);
    })
    .await;
    let store = workflow::store(&server);
    let (id, case_dir) = drop_unmarked_case(&workflow::scan_dir(&server), 601);
    std::fs::write(case_dir.join("MQIC_DEMO_FAIL"), "hang\n").unwrap();
    mqic::demo::cases::mark_ready(&case_dir).unwrap();
    wait_case(&store, &id, "simulate running", |c| {
        c.step
            .as_ref()
            .is_some_and(|r| r.name == "simulate" && r.pid.is_some())
    })
    .await;
    drop(store);
    server.stop().await;
    // The step is still running, detached. A new mqic on the same data dir finds the case
    // where it was, reattaches to the running attempt instead of starting it again, and
    // its conductor can still cancel it.
    let server = TestServer::start_with(|c| {
        *c = workflow::workflow_config(&data);
    })
    .await;
    let store = workflow::store(&server);
    let case = store.case(&id.as_str().into()).unwrap().unwrap();
    assert_eq!(case.status, CaseStatus::Processing);
    assert_eq!(case.step.as_ref().unwrap().attempt, 1, "not started again");
    let mut rpc = Rpc::connect(&server.url()).await;
    let reply = rpc.call("cancel_case", json!({"case_id": id})).await;
    assert_eq!(reply["payload"]["status"], "CANCELLED", "{reply}");
    server.stop().await;
}

#[test]
fn retry_cancel_and_archive_from_the_command_line_talk_to_the_daemon() {
    let serve = crate::process::ServeProcess::start(&[]);
    let url = serve.url();
    let out = mqic()
        .args(["cancel", "no-such-case", "--broker", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cancel_case: no case `no-such-case`"), "{err}");
    let out = mqic()
        .args(["retry", "no-such-case", "--broker", &url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("retry_case: no case"));
    let out = mqic().args(["archive", "--broker", &url]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"queued\":true"));
    let (status, _) = serve.terminate();
    assert!(status.success());

    let port = free_port();
    let out = mqic()
        .args([
            "cancel",
            "x",
            "--broker",
            &format!("amqp://guest:guest@127.0.0.1:{port}/%2F"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the mqic daemon"), "{err}");
    assert!(!err.contains("guest:guest"), "no password in errors: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_are_published_on_the_logs_exchange_by_severity() {
    let serve = crate::process::ServeProcess::start(&[]);
    let conn = lapin::Connection::connect(&serve.url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = declare_queue(&ch, "watch-warnings").await;
    ch.queue_bind(
        q.as_str().into(),
        "mqic.logs".into(),
        "warn".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    bad_message(&ch, b"not an envelope").await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "logs".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a warn line within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(d.routing_key.as_str(), "warn");
    let line: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(line["severity"], "warn");
    assert!(
        line["component"]
            .as_str()
            .unwrap()
            .starts_with("mqic::workers"),
        "{line}"
    );
    assert!(
        line["message"].as_str().unwrap().contains("dead-lettering"),
        "{line}"
    );
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_whichever_of_several_worker_processes_runs_the_step() {
    ledger_path();
    let server = workflow::start(|c| c.workers.executor = false).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let children: Vec<_> = dirs
        .iter()
        .map(|d| spawn_executor(&server, d.path()))
        .collect();
    let store = workflow::store(&server);
    let mut pids = Vec::new();
    for n in 0..2 {
        let (id, dir) = drop_unmarked_case(&workflow::scan_dir(&server), 510 + n);
        std::fs::write(dir.join("MQIC_DEMO_FAIL"), "hang\n").unwrap();
        mqic::demo::cases::mark_ready(&dir).unwrap();
        let case = wait_case(&store, &id, "simulate running with a pid", |c| {
            c.step
                .as_ref()
                .is_some_and(|r| r.name == "simulate" && r.pid.is_some())
        })
        .await;
        pids.push((id, case.step.unwrap().pid.unwrap() as i32));
    }
    let mut rpc = Rpc::connect(&server.url()).await;
    for (id, pid) in &pids {
        let reply = rpc.call("cancel_case", json!({"case_id": id})).await;
        assert_eq!(reply["payload"]["status"], "CANCELLED", "{reply}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(*pid, 0) } == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: step {pid} still alive"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(children);
    server.stop().await;
}
