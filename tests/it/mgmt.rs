//! The management API, Prometheus metrics and the operator CLI: router tests without a
//! socket (auth, every endpoint family, definitions, health), then real clients against a
//! real `mqic serve` (rabbitmqadmin, promtool, the `mqic` commands), and the one-line
//! answer when no daemon runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use mqic::config::UserConfig;
use mqic::mgmt::{self, Listener, Mgmt};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::process::mqic;
use crate::support::{have_program, TestServer};

const LOOPBACK: &str = "127.0.0.1:40000";

fn user(name: &str, password: &str, tags: &[&str], vhosts: &[&str]) -> UserConfig {
    UserConfig {
        name: name.into(),
        password_hash: mqic::amqp::auth::hash_password(password),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        vhosts: vhosts.iter().map(|v| v.to_string()).collect(),
    }
}

/// A server with vhosts `/` and `other` (guest may open both) and extra users: `watcher`
/// (monitoring), `limited` (management, vhost `other` only) and `plain` (no tags).
async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.amqp.vhosts = vec!["/".into(), "other".into()];
        c.amqp.users[0].vhosts.push("other".into()); // guest
        c.amqp
            .users
            .push(user("watcher", "w", &["monitoring"], &["/"]));
        c.amqp
            .users
            .push(user("limited", "l", &["management"], &["other"]));
        c.amqp.users.push(user("plain", "p", &[], &["/"]));
    })
    .await
}

fn state(server: &TestServer) -> Arc<Mgmt> {
    Mgmt::new(
        server.app.broker.clone(),
        Some(server.app.pipeline.conductor.store.clone()),
        Some(server.app.memory.clone()),
        Some(server.app.disk.clone()),
        vec![Listener {
            protocol: "amqp",
            addr: server.addr,
        }],
        server.app.config.data_dir.clone(),
    )
}

/// The API router as seen from `peer`.
fn router(server: &TestServer, peer: &str) -> Router {
    let peer: SocketAddr = peer.parse().unwrap();
    mgmt::api_router(state(server)).layer(MockConnectInfo(peer))
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: Option<Value>,
) -> Answer {
    let mut req = Request::builder().method(method).uri(path);
    if let Some((u, p)) = auth {
        use base64::Engine;
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header(header::AUTHORIZATION, format!("Basic {cred}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
    }
}

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

async fn guest(app: &Router, method: &str, path: &str, body: Option<Value>) -> Answer {
    call(app, method, path, GUEST, body).await
}

/// `POST /api/exchanges/%2F/{exchange}/publish` as guest.
async fn publish_via_api(app: &Router, exchange: &str, body: Value) -> Answer {
    let path = format!("/api/exchanges/%2F/{exchange}/publish");
    guest(app, "POST", &path, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_uses_the_broker_users_and_the_loopback_rule() {
    let server = server().await;
    let app = router(&server, LOOPBACK);
    let none = call(&app, "GET", "/api/overview", None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(none.headers[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let bad = call(&app, "GET", "/api/overview", Some(("guest", "nope")), None).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad.json["error"], "not_authorized");
    let unknown = call(&app, "GET", "/api/whoami", Some(("mallory", "x")), None).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let me = guest(&app, "GET", "/api/whoami", None).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json["name"], "guest");
    assert_eq!(me.json["tags"], json!(["administrator"]));

    // guest is a loopback user: refused from elsewhere, as on AMQP.
    let remote = router(&server, "10.1.2.3:5555");
    let far = guest(&remote, "GET", "/api/whoami", None).await;
    assert_eq!(far.status, StatusCode::UNAUTHORIZED, "{}", far.json);
    let watcher = call(&remote, "GET", "/api/queues", Some(("watcher", "w")), None).await;
    assert_eq!(
        watcher.status,
        StatusCode::OK,
        "non-loopback users may log in"
    );

    // No management tag: no API at all.
    let plain = call(&app, "GET", "/api/whoami", Some(("plain", "p")), None).await;
    assert_eq!(plain.status, StatusCode::UNAUTHORIZED);
    assert_eq!(plain.json["reason"], "Not management user");

    // monitoring reads everything but changes nothing outside its vhosts' objects.
    let defs = call(
        &app,
        "POST",
        "/api/definitions",
        Some(("watcher", "w")),
        Some(json!({})),
    )
    .await;
    assert_eq!(defs.status, StatusCode::FORBIDDEN);
    let users = call(&app, "GET", "/api/users", Some(("watcher", "w")), None).await;
    assert_eq!(users.status, StatusCode::FORBIDDEN);

    // management: only its own vhosts.
    let lim = Some(("limited", "l"));
    let other_vhost = call(&app, "GET", "/api/queues/%2F", lim, None).await;
    assert_eq!(other_vhost.status, StatusCode::FORBIDDEN);
    let all = call(&app, "GET", "/api/queues", lim, None).await;
    assert_eq!(all.json, json!([]), "sees no queue of vhost /");
    let put = call(&app, "PUT", "/api/queues/%2F/sneaky", lim, Some(json!({}))).await;
    assert_eq!(put.status, StatusCode::FORBIDDEN);
    assert!(server
        .app
        .broker
        .vhost("/")
        .unwrap()
        .queue("sneaky")
        .is_none());
    let own = call(&app, "PUT", "/api/queues/other/mine", lim, Some(json!({}))).await;
    assert_eq!(own.status, StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_and_nodes_carry_every_field_the_tools_need() {
    let server = server().await;
    let app = router(&server, LOOPBACK);
    let o = guest(&app, "GET", "/api/overview", None).await;
    assert_eq!(o.status, StatusCode::OK);
    // rabbitmqadmin v2's Overview (rabbitmq_http_client) and Telegraf's required fields.
    for key in [
        "cluster_name",
        "node",
        "erlang_full_version",
        "erlang_version",
        "rabbitmq_version",
        "product_name",
        "product_version",
        "statistics_db_event_queue",
        "churn_rates",
        "queue_totals",
        "object_totals",
        "message_stats",
        "listeners",
    ] {
        assert!(
            o.json.get(key).is_some_and(|v| !v.is_null()),
            "missing {key}: {}",
            o.json
        );
    }
    for key in [
        "connections",
        "channels",
        "queues",
        "exchanges",
        "consumers",
    ] {
        assert!(o.json["object_totals"][key].is_u64(), "{key}");
    }
    assert!(
        o.json["object_totals"]["queues"].as_u64().unwrap() >= 11,
        "the workflow topology"
    );
    assert!(o.json["queue_totals"]["messages_ready"].is_u64());
    assert_eq!(o.json["listeners"][0]["protocol"], "amqp");
    assert_eq!(o.json["listeners"][0]["port"], server.addr.port());
    let nodes = guest(&app, "GET", "/api/nodes", None).await;
    let n = &nodes.json[0];
    for key in [
        "name",
        "uptime",
        "run_queue",
        "processors",
        "os_pid",
        "fd_total",
        "proc_total",
        "mem_limit",
        "mem_alarm",
        "disk_free_limit",
        "disk_free_alarm",
        "rates_mode",
        "enabled_plugins",
        "being_drained",
        "mem_used",
        "disk_free",
        "fd_used",
        "sockets_used",
        "sockets_total",
        "proc_used",
    ] {
        assert!(
            n.get(key).is_some_and(|v| !v.is_null()),
            "node field {key}: {n}"
        );
    }
    assert!(n["mem_used"].as_u64().unwrap() > 0);
    let one = guest(
        &app,
        "GET",
        &format!("/api/nodes/{}", n["name"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(one.status, StatusCode::OK);
    let vhosts = guest(&app, "GET", "/api/vhosts", None).await;
    let names: Vec<&str> = vhosts
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["/", "other"]);
    let missing = guest(&app, "GET", "/api/no-such-thing", None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_declare_publish_get_purge_and_delete() {
    let server = server().await;
    let app = router(&server, LOOPBACK);
    let put = guest(
        &app,
        "PUT",
        "/api/queues/%2F/jobs",
        Some(json!({"durable": true, "arguments": {"x-max-length": 10}})),
    )
    .await;
    assert_eq!(put.status, StatusCode::CREATED, "{}", put.json);
    let again = guest(
        &app,
        "PUT",
        "/api/queues/%2F/jobs",
        Some(json!({"durable": "true", "arguments": {"x-max-length": 10}})),
    )
    .await;
    assert_eq!(
        again.status,
        StatusCode::NO_CONTENT,
        "rabbitmqadmin's string booleans"
    );
    let clash = guest(
        &app,
        "PUT",
        "/api/queues/%2F/jobs",
        Some(json!({"durable": false})),
    )
    .await;
    assert_eq!(clash.status, StatusCode::BAD_REQUEST);
    assert!(
        clash.json["reason"]
            .as_str()
            .unwrap()
            .contains("inequivalent arg 'durable'"),
        "{}",
        clash.json
    );
    let bad = guest(
        &app,
        "PUT",
        "/api/queues/%2F/x",
        Some(json!({"arguments": {"x-max-length": "lots"}})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let reserved = guest(&app, "PUT", "/api/queues/%2F/amq.mine", Some(json!({}))).await;
    assert_eq!(reserved.status, StatusCode::FORBIDDEN);
    let not_json = call(&app, "PUT", "/api/queues/%2F/y", GUEST, None).await;
    assert_eq!(
        not_json.status,
        StatusCode::CREATED,
        "an empty body takes the defaults"
    );

    for i in 0..3 {
        let p = publish_via_api(
            &app,
            "amq.default",
            json!({
                "routing_key": "jobs", "payload": format!("job {i}"), "payload_encoding": "string",
                "properties": {"delivery_mode": 2, "headers": {"n": i}}
            }),
        )
        .await;
        assert_eq!(p.json, json!({"routed": true}));
    }
    let binary = publish_via_api(
        &app,
        "amq.default",
        json!({
            "routing_key": "jobs", "payload": "/w==", "payload_encoding": "base64", "properties": {}
        }),
    )
    .await;
    assert_eq!(binary.json, json!({"routed": true}));
    let nowhere = publish_via_api(
        &app,
        "amq.direct",
        json!({
            "routing_key": "nobody", "payload": "x", "payload_encoding": "string", "properties": {}
        }),
    )
    .await;
    assert_eq!(nowhere.json, json!({"routed": false}));
    let bad_props = publish_via_api(
        &app,
        "amq.default",
        json!({
            "routing_key": "jobs", "payload": "x", "properties": {"expiration": "soon"}
        }),
    )
    .await;
    assert_eq!(bad_props.status, StatusCode::BAD_REQUEST);

    let q = guest(&app, "GET", "/api/queues/%2F/jobs", None).await;
    assert_eq!(q.json["messages_ready"], 4);
    assert_eq!(q.json["messages"], 4);
    assert_eq!(q.json["type"], "classic");
    assert_eq!(q.json["arguments"], json!({"x-max-length": 10}));
    assert_eq!(q.json["message_stats"]["publish"], 4);

    let peek = guest(
        &app,
        "POST",
        "/api/queues/%2F/jobs/get",
        Some(json!({"count": 2, "ackmode": "ack_requeue_true", "encoding": "auto"})),
    )
    .await;
    let got = peek.json.as_array().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["payload"], "job 0");
    assert_eq!(got[0]["payload_encoding"], "string");
    assert_eq!(got[0]["properties"]["delivery_mode"], 2);
    assert_eq!(got[0]["properties"]["headers"]["n"], 0);
    assert_eq!(got[1]["message_count"], 2);
    let q = guest(&app, "GET", "/api/queues/%2F/jobs", None).await;
    assert_eq!(q.json["messages_ready"], 4, "requeued");
    let take = guest(
        &app,
        "POST",
        "/api/queues/%2F/jobs/get",
        Some(json!({"count": "3", "ackmode": "ack_requeue_false", "encoding": "auto"})),
    )
    .await;
    let got = take.json.as_array().unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["redelivered"], true);
    let last = guest(
        &app,
        "POST",
        "/api/queues/%2F/jobs/get",
        Some(json!({"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"})),
    )
    .await;
    assert_eq!(last.json[0]["payload_encoding"], "base64");
    assert_eq!(last.json[0]["payload"], "/w==");
    let bad_mode = guest(
        &app,
        "POST",
        "/api/queues/%2F/jobs/get",
        Some(json!({"count": 1, "ackmode": "keep"})),
    )
    .await;
    assert_eq!(bad_mode.status, StatusCode::BAD_REQUEST);

    let purge = guest(&app, "DELETE", "/api/queues/%2F/jobs/contents", None).await;
    assert_eq!(purge.status, StatusCode::NO_CONTENT);
    assert_eq!(
        guest(&app, "GET", "/api/queues/%2F/jobs", None).await.json["messages_ready"],
        0
    );

    let list = guest(
        &app,
        "GET",
        "/api/queues/%2F?columns=name,messages&sort=name",
        None,
    )
    .await;
    let names: Vec<&str> = list
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"jobs") && names.contains(&"conductor_queue"),
        "{names:?}"
    );
    assert!(list.json[0].get("vhost").is_none(), "columns honoured");
    let page = guest(&app, "GET", "/api/queues?page=1&page_size=2", None).await;
    assert_eq!(page.json["items"].as_array().unwrap().len(), 2);
    assert!(page.json["total_count"].as_u64().unwrap() >= 12);

    let del = guest(&app, "DELETE", "/api/queues/%2F/jobs", None).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(
        guest(&app, "GET", "/api/queues/%2F/jobs", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        guest(&app, "DELETE", "/api/queues/%2F/jobs", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let busy = guest(
        &app,
        "DELETE",
        "/api/queues/%2F/conductor_queue?if-unused=true",
        None,
    )
    .await;
    assert_eq!(
        busy.status,
        StatusCode::BAD_REQUEST,
        "the conductor consumes it"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_and_bindings() {
    let server = server().await;
    let app = router(&server, LOOPBACK);
    let put = guest(
        &app,
        "PUT",
        "/api/exchanges/%2F/lab.events",
        Some(json!({"type": "topic", "durable": true})),
    )
    .await;
    assert_eq!(put.status, StatusCode::CREATED);
    assert_eq!(
        guest(
            &app,
            "PUT",
            "/api/exchanges/%2F/lab.events",
            Some(json!({"type": "direct"}))
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        guest(
            &app,
            "PUT",
            "/api/exchanges/%2F/x",
            Some(json!({"type": "weird"}))
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
    guest(&app, "PUT", "/api/queues/%2F/audit", Some(json!({}))).await;
    let bind = guest(
        &app,
        "POST",
        "/api/bindings/%2F/e/lab.events/q/audit",
        Some(json!({"routing_key": "case.#", "arguments": {}})),
    )
    .await;
    assert_eq!(bind.status, StatusCode::CREATED);
    assert_eq!(bind.headers[header::LOCATION], "case.%23");
    let between = guest(&app, "GET", "/api/bindings/%2F/e/lab.events/q/audit", None).await;
    assert_eq!(between.json.as_array().unwrap().len(), 1);
    assert_eq!(between.json[0]["properties_key"], "case.%23");
    let one = guest(
        &app,
        "GET",
        "/api/bindings/%2F/e/lab.events/q/audit/case.%23",
        None,
    )
    .await;
    assert_eq!(one.json["routing_key"], "case.#");
    let routed = publish_via_api(&app, "lab.events", json!({"routing_key": "case.done", "payload": "{}", "payload_encoding": "string", "properties": {}})).await;
    assert_eq!(routed.json["routed"], true);
    let src = guest(
        &app,
        "GET",
        "/api/exchanges/%2F/lab.events/bindings/source",
        None,
    )
    .await;
    assert_eq!(src.json[0]["destination"], "audit");
    let qb = guest(&app, "GET", "/api/queues/%2F/audit/bindings", None).await;
    assert_eq!(
        qb.json.as_array().unwrap().len(),
        2,
        "the default exchange's and ours: {}",
        qb.json
    );
    let all = guest(&app, "GET", "/api/bindings/%2F", None).await;
    assert!(all
        .json
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["source"] == "mqic.rpc"));
    let x = guest(&app, "GET", "/api/exchanges/%2F/amq.default", None).await;
    assert_eq!(x.json["name"], "");
    let unbind = guest(
        &app,
        "DELETE",
        "/api/bindings/%2F/e/lab.events/q/audit/case.%23",
        None,
    )
    .await;
    assert_eq!(unbind.status, StatusCode::NO_CONTENT);
    assert_eq!(
        guest(&app, "GET", "/api/bindings/%2F/e/lab.events/q/audit", None)
            .await
            .json,
        json!([])
    );
    assert_eq!(
        guest(&app, "DELETE", "/api/exchanges/%2F/amq.direct", None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        guest(&app, "DELETE", "/api/exchanges/%2F/lab.events", None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        guest(&app, "GET", "/api/exchanges/%2F/lab.events", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_export_and_import() {
    let source = server().await;
    let app = router(&source, LOOPBACK);
    guest(
        &app,
        "PUT",
        "/api/exchanges/%2F/lab.x",
        Some(json!({"type": "fanout"})),
    )
    .await;
    guest(
        &app,
        "PUT",
        "/api/queues/%2F/lab.q",
        Some(json!({"arguments": {"x-message-ttl": 60000}})),
    )
    .await;
    guest(
        &app,
        "POST",
        "/api/bindings/%2F/e/lab.x/q/lab.q",
        Some(json!({"routing_key": "k"})),
    )
    .await;
    let defs = guest(&app, "GET", "/api/definitions", None).await.json;
    assert!(defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "guest"));
    assert!(defs["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| !x["name"].as_str().unwrap().starts_with("amq.")));
    assert!(defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "lab.q"));
    assert!(defs["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["source"] == "lab.x"));
    assert!(
        defs["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| !q["name"].as_str().unwrap().starts_with("amq.gen")),
        "exclusive queues are not exported"
    );

    let target = server().await;
    let app2 = router(&target, LOOPBACK);
    let mut foreign = defs.clone();
    foreign["users"] = json!([{"name": "mallory", "password_hash": "x", "tags": []}]);
    let refused = guest(&app2, "POST", "/api/definitions", Some(foreign)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.json["reason"].as_str().unwrap().contains("mallory"));
    assert!(
        target
            .app
            .broker
            .vhost("/")
            .unwrap()
            .queue("lab.q")
            .is_none(),
        "nothing applied"
    );
    let policies = guest(
        &app2,
        "POST",
        "/api/definitions",
        Some(json!({"policies": [{"name": "p"}]})),
    )
    .await;
    assert_eq!(policies.status, StatusCode::BAD_REQUEST);

    let ok = guest(&app2, "POST", "/api/definitions", Some(defs)).await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT, "{}", ok.json);
    let q = guest(&app2, "GET", "/api/queues/%2F/lab.q", None).await;
    assert_eq!(q.json["arguments"]["x-message-ttl"], 60000);
    let b = guest(&app2, "GET", "/api/bindings/%2F/e/lab.x/q/lab.q", None).await;
    assert_eq!(b.json[0]["routing_key"], "k");
    let vhost_only = guest(&app2, "GET", "/api/definitions/%2F", None).await;
    assert!(vhost_only.json.get("users").is_none());
    let into_other = guest(&app2, "POST", "/api/definitions/other", Some(json!({"queues": [{"name": "moved", "durable": true, "auto_delete": false, "arguments": {}}]}))).await;
    assert_eq!(into_other.status, StatusCode::NO_CONTENT);
    assert!(target
        .app
        .broker
        .vhost("other")
        .unwrap()
        .queue("moved")
        .is_some());
    source.stop().await;
    target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_aliveness() {
    let server = server().await;
    let app = router(&server, LOOPBACK);
    for path in [
        "/api/health/checks/alarms",
        "/api/health/checks/local-alarms",
        "/api/health/checks/virtual-hosts",
        "/api/health/checks/is-in-service",
        "/api/aliveness-test/%2F",
        &format!("/api/health/checks/port-listener/{}", server.addr.port()),
        "/api/health/checks/protocol-listener/amqp091",
    ] {
        let a = guest(&app, "GET", path, None).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.json);
        assert_eq!(a.json["status"], "ok", "{path}");
    }
    let port = guest(&app, "GET", "/api/health/checks/port-listener/1", None).await;
    assert_eq!(port.status, StatusCode::SERVICE_UNAVAILABLE);
    server.app.broker.set_memory_alarm(true);
    let alarm = guest(&app, "GET", "/api/health/checks/alarms", None).await;
    assert_eq!(alarm.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(alarm.json["alarms"][0]["resource"], "memory");
    server.app.broker.set_memory_alarm(false);
    assert_eq!(
        guest(&app, "GET", "/api/aliveness-test/nope", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_and_consumers_are_listed_and_a_connection_can_be_closed() {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let server = server().await;
    let app = router(&server, LOOPBACK);
    let props = lapin::ConnectionProperties::default().with_connection_name("lab-tool".into());
    let conn = lapin::Connection::connect(&server.url(), props)
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "watched".into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let _consumer = ch
        .basic_consume(
            "watched".into(),
            "tool-1".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let conns = guest(&app, "GET", "/api/connections/", None).await.json;
    let mine = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["user_provided_name"] == "lab-tool")
        .unwrap_or_else(|| panic!("{conns}"))
        .clone();
    assert_eq!(mine["type"], "network");
    assert_eq!(mine["user"], "guest");
    assert_eq!(mine["channels"], 1);
    assert_eq!(mine["client_properties"]["connection_name"], "lab-tool");
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "direct"),
        "mqic's own connection"
    );
    let name = mine["name"].as_str().unwrap().to_string();
    // A second channel in confirm mode: its confirms are counted as they go out.
    let pc = conn.create_channel().await.unwrap();
    pc.confirm_select(Default::default()).await.unwrap();
    for _ in 0..3 {
        pc.basic_publish(
            "".into(),
            "watched".into(),
            Default::default(),
            b"x",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let chans = guest(&app, "GET", "/api/channels", None).await.json;
    let mine_chans: Vec<&Value> = chans
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["connection_details"]["name"] == name.as_str())
        .collect();
    let consuming = mine_chans.iter().find(|c| c["consumer_count"] == 1);
    let consuming = consuming.unwrap_or_else(|| panic!("{chans}"));
    assert_eq!(consuming["confirm"], false);
    let confirming = mine_chans.iter().find(|c| c["confirm"] == true);
    let confirming = confirming.unwrap_or_else(|| panic!("{chans}"));
    assert_eq!(confirming["messages_unconfirmed"], 0, "{chans}");
    assert!(
        consuming["connection_details"]["peer_port"]
            .as_u64()
            .unwrap()
            > 0
    );
    pc.close(200, "done".into()).await.unwrap();
    let consumers = guest(&app, "GET", "/api/consumers/%2F", None).await.json;
    let c = consumers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer_tag"] == "tool-1")
        .unwrap();
    assert_eq!(c["queue"]["name"], "watched");
    assert_eq!(c["channel_details"]["connection_name"], name.as_str());
    let q = guest(&app, "GET", "/api/queues/%2F/watched", None)
        .await
        .json;
    assert_eq!(q["consumers"], 1);

    let encoded = mgmt::api::percent_encode(&name);
    let close = guest(&app, "DELETE", &format!("/api/connections/{encoded}"), None).await;
    assert_eq!(close.status, StatusCode::NO_CONTENT);
    crate::support::eventually("the client sees the close", || !conn.status().connected()).await;
    crate::support::eventually("the registry forgets it", || {
        server
            .app
            .broker
            .stats
            .connections()
            .iter()
            .all(|c| c.name != name)
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_help_type_and_per_queue_labels_and_pass_promtool() {
    let server = crate::workflow::start(|_| {}).await;
    let scan = crate::workflow::scan_dir(&server);
    let id = crate::workflow::drop_case(&scan, 61);
    let store = crate::workflow::store(&server);
    crate::workflow::wait_status(&store, &id, mqic::store::records::CaseStatus::Completed).await;
    let m = state(&server);
    let app = mgmt::metrics_router(m.clone());
    let resp = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE],
        mgmt::metrics::CONTENT_TYPE
    );
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for needle in [
        "# TYPE rabbitmq_queue_messages_ready gauge",
        "rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"conductor_queue\"} 0",
        "rabbitmq_queue_consumers{vhost=\"/\",queue=\"conductor_queue\"} 1",
        "# TYPE rabbitmq_global_messages_received_total counter",
        "rabbitmq_connections ",
        "rabbitmq_channels ",
        "mqic_cases{status=\"COMPLETED\"} 1",
        "# TYPE mqic_step_duration_seconds histogram",
        "mqic_step_duration_seconds_count{step=\"simulate\"} 1",
        "mqic_step_duration_seconds_bucket{step=\"simulate\",le=\"+Inf\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let published: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "rabbitmq_queue_messages_published_total{vhost=\"/\",queue=\"conductor_queue\"} ",
            )
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        published >= 1.0,
        "the case's messages went through the conductor queue"
    );
    // The case was copied to its (local) step host and its results back: the bytes moved
    // are summed in the store, so the counter is the store's, not this process's.
    let case = store.case(&id.as_str().into()).unwrap().unwrap();
    let step_bytes = |name: &str| {
        case.done
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| d.bytes)
            .unwrap()
    };
    let mut totals = Vec::new();
    for (direction, step, counter) in [
        (
            "upload",
            "upload",
            mqic::conductor::driver::TRANSFER_BYTES_UPLOAD,
        ),
        (
            "download",
            "download",
            mqic::conductor::driver::TRANSFER_BYTES_DOWNLOAD,
        ),
    ] {
        let line = format!("mqic_transfer_bytes_total{{direction=\"{direction}\"}} ");
        let value: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line:?} in:\n{text}"))
            .parse()
            .unwrap();
        assert!(value > 0, "{direction}: {value}");
        assert_eq!(value, step_bytes(step), "{direction}");
        assert_eq!(store.counter(counter).unwrap(), value);
        totals.push((counter, value));
    }
    assert!(text.contains("# TYPE mqic_transfer_bytes_total counter"));
    if have_program("metrics_pass_promtool", "promtool") {
        promtool_check(&text);
    }
    // The totals are in the store file: they are there after mqic stops.
    let path = store.path().to_path_buf();
    drop((store, m));
    let TestServer { app, dir: _dir, .. } = server;
    app.shutdown().await;
    let reopened = mqic::store::Store::open(&path).unwrap();
    for (counter, value) in totals {
        assert_eq!(reopened.counter(counter).unwrap(), value, "{counter}");
    }
}

/// A real `mqic serve` with every listener on port 0; the three ready lines give the
/// addresses. SIGTERM on drop.
struct Daemon {
    child: Child,
    amqp: SocketAddr,
    management: String,
    prometheus: String,
    /// Kept open: mqic's stdout stays readable for as long as it runs.
    _out: BufReader<std::process::ChildStdout>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(config: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = mqic();
        cmd.arg("serve");
        match config {
            Some(text) => {
                let path = dir.path().join("mqic.toml");
                std::fs::write(&path, text).unwrap();
                cmd.arg("--config").arg(path);
                cmd.args([
                    "--web-listen",
                    "127.0.0.1:0",
                    "--management-listen",
                    "127.0.0.1:0",
                ])
                .args(["--prometheus-listen", "127.0.0.1:0"]);
            }
            None => {
                cmd.args([
                    "--amqp-listen",
                    "127.0.0.1:0",
                    "--web-listen",
                    "127.0.0.1:0",
                    "--management-listen",
                    "127.0.0.1:0",
                    "--prometheus-listen",
                    "127.0.0.1:0",
                    "--data-dir",
                ])
                .arg(dir.path().join("data"));
            }
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .env("MQIC_DEMO_BATCH_SLEEP", "0.05")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        // amqp, management, prometheus and dashboard.
        for _ in 0..4 {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            lines.push(line.trim().to_string());
        }
        let after = |prefix: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in {lines:?}"))
                .to_string()
        };
        Daemon {
            amqp: after("amqp listening on ").parse().unwrap(),
            management: after("management API listening on ")
                .trim_end_matches("/api/")
                .to_string(),
            prometheus: after("prometheus metrics listening on ").to_string(),
            child,
            _out: out,
            _dir: dir,
        }
    }

    fn broker(&self) -> String {
        format!("amqp://guest:guest@{}/%2F", self.amqp)
    }

    fn mgmt_port(&self) -> String {
        self.management.rsplit(':').next().unwrap().to_string()
    }

    fn cli(&self, args: &[&str]) -> Output {
        mqic()
            .args(args)
            .args(["--broker", &self.broker()])
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP GET (no client library): status line and body.
fn http_get(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(authority).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs an admin CLI with its login arguments; its stdout, the test failing when it fails.
fn admin_ok(program: &str, login: &[&str], args: &[&str]) -> String {
    let out = Command::new(program)
        .args(login)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

#[test]
fn rabbitmqadmin_lists_declares_publishes_and_gets_against_mqic_serve() {
    if !have_program("rabbitmqadmin_against_mqic", "rabbitmqadmin") {
        return;
    }
    let d = Daemon::start(None);
    let port = d.mgmt_port();
    let login = ["-H", "127.0.0.1", "-P", &port, "-u", "guest", "-p", "guest"];
    let admin = |args: &[&str]| admin_ok("rabbitmqadmin", &login, args);
    let queues: Value =
        serde_json::from_str(&admin(&["-f", "raw_json", "list", "queues"])).unwrap();
    assert!(queues
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "conductor_queue"));
    let exchanges = admin(&["list", "exchanges", "name", "type"]);
    assert!(
        exchanges.contains("mqic.rpc") && exchanges.contains("topic"),
        "{exchanges}"
    );
    assert!(admin(&["show", "overview"]).contains("3.13.7"));
    admin(&["declare", "queue", "name=from-admin", "durable=false"]);
    admin(&["declare", "exchange", "name=admin.x", "type=fanout"]);
    admin(&[
        "declare",
        "binding",
        "source=admin.x",
        "destination=from-admin",
    ]);
    admin(&[
        "publish",
        "exchange=admin.x",
        "routing_key=any",
        "payload=hello from rabbitmqadmin",
    ]);
    let got: Value = serde_json::from_str(&admin(&[
        "-f",
        "raw_json",
        "get",
        "queue=from-admin",
        "ackmode=ack_requeue_false",
    ]))
    .unwrap();
    assert_eq!(got[0]["payload"], "hello from rabbitmqadmin");
    assert_eq!(got[0]["exchange"], "admin.x");
    let listed: Value = serde_json::from_str(&admin(&[
        "-f", "raw_json", "list", "queues", "name", "messages",
    ]))
    .unwrap();
    let q = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "from-admin")
        .unwrap();
    assert_eq!(q["messages"], 0);
    assert!(admin(&["list", "bindings"]).contains("admin.x"));
    assert!(admin(&["list", "connections"]).contains("in-process"));
    assert!(admin(&["list", "nodes"]).contains("mqic@"));
    assert!(admin(&["list", "users"]).contains("administrator"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defs.json");
    admin(&["export", file.to_str().unwrap()]);
    let defs: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "from-admin"));
    admin(&["import", file.to_str().unwrap()]);
    admin(&["delete", "queue", "name=from-admin"]);
    assert!(!admin(&["list", "queues", "name"]).contains("from-admin"));
    let refused = Command::new("rabbitmqadmin")
        .args([
            "-H",
            "127.0.0.1",
            "-P",
            &d.mgmt_port(),
            "-u",
            "guest",
            "-p",
            "wrong",
            "list",
            "queues",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("Access refused"),
        "{}",
        stderr(&refused)
    );
}

/// rabbitmqadmin v2, the Rust one (`cargo install rabbitmqadmin --root /opt/rabbitmqadmin2`,
/// as `.ci/run` does; Debian's `rabbitmqadmin` is v1), or `MQIC_RABBITMQADMIN2`.
fn rabbitmqadmin_v2() -> Option<String> {
    let path = std::env::var("MQIC_RABBITMQADMIN2")
        .unwrap_or_else(|_| "/opt/rabbitmqadmin2/bin/rabbitmqadmin".into());
    std::path::Path::new(&path).is_file().then_some(path)
}

#[test]
fn rabbitmqadmin_v2_shows_lists_declares_publishes_and_gets_against_mqic_serve() {
    const TEST: &str = "rabbitmqadmin_v2_against_mqic";
    let Some(program) = rabbitmqadmin_v2() else {
        crate::support::skip(
            TEST,
            "rabbitmqadmin v2 (/opt/rabbitmqadmin2/bin/rabbitmqadmin) not found",
        );
        return;
    };
    let d = Daemon::start(None);
    let port = d.mgmt_port();
    let login = [
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--username",
        "guest",
        "--password",
        "guest",
        "--non-interactive",
    ];
    let admin = |args: &[&str]| admin_ok(&program, &login, args);
    // `show overview` deserializes every field it knows: a missing one fails the command.
    let overview = admin(&["show", "overview"]);
    assert!(
        overview.contains("mqic") && overview.contains("3.13.7"),
        "{overview}"
    );
    assert!(admin(&["show", "churn"]).contains("connections opened"));
    assert!(admin(&["list", "queues"]).contains("conductor_queue"));
    assert!(admin(&["list", "exchanges"]).contains("mqic.rpc"));
    admin(&[
        "declare",
        "queue",
        "--name",
        "from-admin2",
        "--durable",
        "false",
    ]);
    admin(&[
        "declare", "exchange", "--name", "admin2.x", "--type", "fanout",
    ]);
    admin(&[
        "declare",
        "binding",
        "--source",
        "admin2.x",
        "--destination-type",
        "queue",
        "--destination",
        "from-admin2",
        "--routing-key",
        "any",
    ]);
    let published = admin(&[
        "publish",
        "message",
        "--exchange",
        "admin2.x",
        "--routing-key",
        "any",
        "--payload",
        "hello from rabbitmqadmin v2",
    ]);
    assert!(published.contains("routed"), "{published}");
    assert!(admin(&["list", "bindings"]).contains("admin2.x"));
    let defs: Value = serde_json::from_str(&admin(&["definitions", "export", "--stdout"])).unwrap();
    assert!(defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "from-admin2"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defs.json");
    std::fs::write(&file, defs.to_string()).unwrap();
    admin(&["definitions", "import", "--file", file.to_str().unwrap()]);
    let got = admin(&["get", "messages", "--queue", "from-admin2"]);
    assert!(got.contains("hello from rabbitmqadmin v2"), "{got}");
    admin(&["purge", "queue", "--name", "from-admin2"]);
    assert!(admin(&["list", "connections"]).contains("in-process"));
    // mqic's own workers consume over in-process channels.
    assert!(admin(&["list", "channels"]).contains("in-process"));
    assert!(admin(&["list", "consumers"]).contains("conductor_queue"));
    assert!(admin(&["list", "users"]).contains("administrator"));
    assert!(admin(&["list", "nodes"]).contains("mqic@"));
    assert!(admin(&["list", "permissions"]).contains("guest"));
    for what in [
        "vhosts",
        "policies",
        "parameters",
        "vhost_limits",
        "user_limits",
        "feature_flags",
        "deprecated_features",
    ] {
        admin(&["list", what]);
    }
    let amqp_port = d.amqp.port().to_string();
    for check in [
        &["health_check", "local_alarms"][..],
        &["health_check", "cluster_wide_alarms"],
        &["health_check", "port_listener", "--port", &amqp_port],
        &["health_check", "protocol_listener", "--protocol", "amqp"],
    ] {
        assert!(admin(check).contains("passed"), "{check:?}");
    }
    admin(&["delete", "queue", "--name", "from-admin2"]);
    admin(&["delete", "exchange", "--name", "admin2.x"]);
    assert!(!admin(&["list", "queues"]).contains("from-admin2"));
    let refused = Command::new(&program)
        .args(["--host", "127.0.0.1", "--port", &port])
        .args([
            "--username",
            "guest",
            "--password",
            "wrong",
            "--non-interactive",
        ])
        .args(["list", "queues"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("Login failed"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn prometheus_endpoint_of_a_running_daemon_passes_promtool() {
    let d = Daemon::start(None);
    let (status, body) = http_get(&d.prometheus);
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"conductor_queue\"}"));
    assert!(body.contains("mqic_cases{status=\"NEW\"} 0"));
    let (status, _) = http_get(&format!("{}/api/overview", d.management));
    assert!(status.contains("401"), "the API needs a login: {status}");
    if have_program("prometheus_endpoint_passes_promtool", "promtool") {
        promtool_check(&body);
    }
}

/// `promtool check metrics` on `text`: no complaint, not even a lint warning.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "promtool: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

fn demo_config_text(dir: &std::path::Path) -> String {
    let config = crate::workflow::workflow_config(&dir.join("data"));
    mqic::demo::run::demo_config_text(
        &config.data_dir,
        &mqic::demo::run::standin_dir(&config.data_dir),
    )
}

#[test]
fn cli_status_cases_case_queues_retry_and_publish_against_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(Some(&demo_config_text(dir.path())));
    let scan = dir.path().join("data").join("cases");
    let id = crate::workflow::drop_case(&scan, 62);

    // Wait (bounded) for the case to complete, through the CLI itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = d.cli(&["cases", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["case_id"] == id.as_str() && c["status"] == "COMPLETED")
        {
            break;
        }
        assert!(Instant::now() < deadline, "case never completed: {list}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let table = d.cli(&["cases"]);
    let text = stdout(&table);
    assert!(text.starts_with("CASE"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&id) && l.contains("COMPLETED") && l.contains("100%")),
        "{text}"
    );
    let filtered = d.cli(&["cases", "--status", "failed", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&filtered.stdout).unwrap(),
        json!([])
    );
    let bad_status = d.cli(&["cases", "--status", "SLEEPING"]);
    assert!(!bad_status.status.success());
    assert_eq!(stderr(&bad_status).lines().count(), 1);

    let status = d.cli(&["status"]);
    assert!(status.status.success());
    assert!(
        stdout(&status).contains("COMPLETED 1"),
        "{}",
        stdout(&status)
    );
    let status: Value = serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["cases"]["COMPLETED"], 1);

    let case = d.cli(&["case", &id]);
    let text = stdout(&case);
    assert!(
        text.contains("COMPLETED") && text.contains("simulate") && text.contains("TRANSITION"),
        "{text}"
    );
    let case: Value = serde_json::from_slice(&d.cli(&["case", &id, "--json"]).stdout).unwrap();
    assert_eq!(case["case"]["status"], "COMPLETED");
    assert!(case["history"].as_array().unwrap().len() >= 3);

    // A completed case cannot be retried: one line, non-zero.
    let retry = d.cli(&["retry", &id]);
    assert!(!retry.status.success());
    assert_eq!(stderr(&retry).lines().count(), 1, "{}", stderr(&retry));
    let cancel_missing = d.cli(&["cancel", "no-such-case"]);
    assert!(stderr(&cancel_missing).contains("no case"));

    let queues = mqic()
        .args([
            "queues",
            "--broker",
            &d.broker(),
            "--management",
            &d.management,
        ])
        .output()
        .unwrap();
    assert!(queues.status.success(), "{}", stderr(&queues));
    assert!(
        stdout(&queues)
            .lines()
            .any(|l| l.starts_with("conductor_queue")),
        "{}",
        stdout(&queues)
    );
    let queues: Value = serde_json::from_slice(
        &mqic()
            .args([
                "queues",
                "--json",
                "--broker",
                &d.broker(),
                "--management",
                &d.management,
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(queues
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "archiver_queue"));

    // publish: a valid envelope goes; a bad one or an unknown queue is one line.
    let published = d.cli(&[
        "publish",
        "archiver_queue",
        r#"{"command":"archive_data","payload":{}}"#,
        "--json",
    ]);
    assert!(published.status.success(), "{}", stderr(&published));
    let answer: Value = serde_json::from_slice(&published.stdout).unwrap();
    assert_eq!(answer["command"], "archive_data");
    for (queue, body, expect) in [
        ("archiver_queue", "not json", "not a valid message envelope"),
        (
            "archiver_queue",
            r#"{"command":"reboot","payload":{}}"#,
            "unknown_command",
        ),
        (
            "conductor_queue",
            r#"{"command":"new_case_found","payload":{}}"#,
            "case_id",
        ),
        (
            "no_such_queue",
            r#"{"command":"archive_data","payload":{}}"#,
            "no queue named 'no_such_queue'",
        ),
    ] {
        let out = d.cli(&["publish", queue, body]);
        assert!(!out.status.success(), "{queue} {body}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn commands_say_one_line_when_no_daemon_runs() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = format!("amqp://guest:secret@127.0.0.1:{port}/%2F");
    let http = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["status"],
        vec!["cases"],
        vec!["case", "x"],
        vec!["retry", "x"],
        vec!["cancel", "x"],
        vec!["queues", "--management", &http],
        vec![
            "publish",
            "archiver_queue",
            r#"{"command":"archive_data","payload":{}}"#,
        ],
    ] {
        let out = mqic()
            .args(&args)
            .args(["--broker", &broker])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("mqic: "), "{err}");
        assert!(
            err.contains("not reachable") || err.contains("cannot reach"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("secret"),
            "the password is never shown: {err}"
        );
        assert!(out.stdout.is_empty());
    }
}

/// The value of an unlabelled (or fully labelled) sample in a metrics text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_queue_deletion_and_rates_follow_traffic() {
    use lapin::options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    let server = server().await;
    let m = state(&server);
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "counted".into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    m.rates.sample(&m);
    for _ in 0..5 {
        ch.basic_publish(
            "".into(),
            "counted".into(),
            BasicPublishOptions::default(),
            b"x",
            Default::default(),
        )
        .await
        .unwrap();
    }
    crate::support::eventually("five ready", || {
        server
            .app
            .broker
            .vhost("/")
            .unwrap()
            .queue("counted")
            .is_some_and(|q| q.message_count() == 5)
    })
    .await;
    for _ in 0..2 {
        let got = ch
            .basic_get("counted".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    crate::support::eventually("two acked", || {
        server
            .app
            .broker
            .vhost("/")
            .unwrap()
            .queue("counted")
            .is_some_and(|q| q.counters().acked == 2)
    })
    .await;
    m.rates.sample(&m);
    let r = m.rates.queue("/", "counted");
    assert!(r.publish > 0.0 && r.get > 0.0 && r.ack > 0.0, "{r:?}");
    // The same state as the sampler (a fresh router would have no samples yet).
    let app =
        mgmt::api_router(m.clone()).layer(MockConnectInfo(LOOPBACK.parse::<SocketAddr>().unwrap()));
    let q = guest(&app, "GET", "/api/queues/%2F/counted", None)
        .await
        .json;
    assert_eq!(q["message_stats"]["publish"], 5);
    assert_eq!(q["message_stats"]["get"], 2);
    assert_eq!(q["message_stats"]["ack"], 2);
    assert!(
        q["message_stats"]["publish_details"]["rate"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let before = mgmt::metrics::render(&m);
    let delivered = "rabbitmq_global_messages_delivered_get_manual_ack_total{protocol=\"amqp091\"}";
    let received = "rabbitmq_global_messages_received_total{protocol=\"amqp091\"}";
    let deleted = "rabbitmq_queues_deleted_total";
    ch.queue_delete("counted".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let after = mgmt::metrics::render(&m);
    assert_eq!(
        sample(&after, delivered),
        sample(&before, delivered),
        "counters never go down"
    );
    assert!(sample(&after, delivered) >= 2.0);
    assert!(sample(&after, received) >= 5.0);
    assert_eq!(sample(&after, deleted), sample(&before, deleted) + 1.0);
    assert!(
        !after.contains("queue=\"counted\""),
        "the deleted queue's series are gone"
    );
    server.stop().await;
}
