//! Support for the case-pipeline tests: a server running the demo workflow (stand-in MOQUI
//! scripts), synthetic cases dropped into its watched folder, an RPC client over a real
//! AMQP connection, and waits on the store.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use mqic::config::Config;
use mqic::demo::cases::{write_case, write_case_files, CaseSpec};
use mqic::store::records::{CaseRecord, CaseStatus};
use mqic::store::Store;
use serde_json::{json, Value};

use crate::support::TestServer;

/// The demo workflow on a fresh data dir, stand-in scripts written, AMQP on port 0.
pub fn workflow_config(data_dir: &Path) -> Config {
    std::fs::create_dir_all(data_dir).unwrap();
    let data_dir = std::fs::canonicalize(data_dir).unwrap();
    let bin = mqic::demo::run::standin_dir(&data_dir);
    mqic::demo::write_standins(&bin).unwrap();
    let mut config = mqic::demo::run::demo_config(&data_dir, &bin).unwrap();
    config.amqp.listen = "127.0.0.1:0".parse().unwrap();
    config.web.listen = "127.0.0.1:0".parse().unwrap();
    for step in &mut config.workflows.get_mut("demo").unwrap().steps {
        step.retry.backoff_initial_secs = 0.2;
        step.retry.backoff_max_secs = 1.0;
    }
    config
}

/// A server running the demo workflow; `tweak` adjusts the config first.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        let data_dir = c.data_dir.clone();
        *c = workflow_config(&data_dir);
        tweak(c);
    })
    .await
}

pub fn scan_dir(server: &TestServer) -> PathBuf {
    server.app.config.scan_dir()
}

pub fn store(server: &TestServer) -> Store {
    server.app.pipeline.conductor.store.clone()
}

/// Writes a tiny synthetic case (marker last) into the watched folder; returns its id.
pub fn drop_case(scan: &Path, n: u32) -> String {
    let spec = CaseSpec::tiny(n);
    write_case(&scan.join(&spec.patient_id), &spec).unwrap();
    spec.patient_id
}

/// Writes a case without its ready marker (the scanner leaves it alone).
pub fn drop_unmarked_case(scan: &Path, n: u32) -> (String, PathBuf) {
    let spec = CaseSpec::tiny(n);
    let dir = scan.join(&spec.patient_id);
    write_case_files(&dir, &spec).unwrap();
    (spec.patient_id, dir)
}

/// Polls the store until `cond` holds for the case (60 s at most).
pub async fn wait_case(
    store: &Store,
    id: &str,
    what: &str,
    cond: impl Fn(&CaseRecord) -> bool,
) -> CaseRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = store.case(&id.into()).unwrap() {
            if cond(&c) {
                return c;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "case {id}: timed out waiting for {what}; it is {c:#?}\nhistory: {:#?}",
                    store.history(&id.into()).unwrap()
                );
            }
        } else if tokio::time::Instant::now() > deadline {
            panic!("case {id}: timed out waiting for {what}; it was never recorded");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_status(store: &Store, id: &str, status: CaseStatus) -> CaseRecord {
    wait_case(store, id, status.name(), |c| c.status == status).await
}

/// Ledger lines (`<case> <step> <attempt>`) the stand-ins appended.
pub fn ledger(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An RPC client over a real lapin connection: publishes to `mqic.rpc` with routing key
/// `methods.<name>` and waits for the reply on an exclusive queue.
pub struct Rpc {
    channel: lapin::Channel,
    reply_queue: String,
    consumer: lapin::Consumer,
    next: u64,
}

impl Rpc {
    pub async fn connect(url: &str) -> Rpc {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .expect("lapin connects");
        let channel = conn.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_queue = q.name().to_string();
        let consumer = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "rpc-client".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        std::mem::forget(conn);
        Rpc {
            channel,
            reply_queue,
            consumer,
            next: 0,
        }
    }

    /// Sends a raw request body; returns the reply JSON.
    pub async fn raw(&mut self, routing_key: &str, body: Value) -> Value {
        self.next += 1;
        let correlation = format!("corr-{}", self.next);
        self.channel
            .basic_publish(
                "mqic.rpc".into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                serde_json::to_vec(&body).unwrap().as_slice(),
                BasicProperties::default()
                    .with_reply_to(self.reply_queue.as_str().into())
                    .with_correlation_id(correlation.as_str().into()),
            )
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(20), self.consumer.next())
            .await
            .expect("an RPC reply within 20 s")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(
            delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(correlation.as_str()),
            "the reply carries the request's correlation_id"
        );
        serde_json::from_slice(&delivery.data).unwrap()
    }

    /// Calls a method with version 1.0.0; returns the reply JSON.
    pub async fn call(&mut self, method: &str, payload: Value) -> Value {
        self.raw(
            &format!("methods.{method}"),
            json!({"command": method, "payload": payload, "version": "1.0.0", "session_id": "test"}),
        )
        .await
    }
}
