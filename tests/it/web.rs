//! The dashboard: its router without a socket (API, assets, login off loopback, CSRF), its
//! event stream with a real HTTP client, and the page itself in a real headless Chromium
//! driven over the DevTools protocol (watch a case progress live, click Retry on a failed
//! case, see it run again, save a screenshot).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use mqic::config::{Config, UserConfig};
use mqic::store::records::CaseStatus;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::support::{have_program, TestServer};
use crate::workflow::{self, drop_case, drop_unmarked_case, wait_status};

fn router(server: &TestServer, config: &Config) -> Router {
    let web = mqic::web::Web::new(
        config,
        server.app.broker.clone(),
        server.app.pipeline.conductor.clone(),
    );
    mqic::web::router(web)
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `name=value` of the Set-Cookie header.
    fn cookie(&self) -> String {
        let c = self
            .headers
            .get(header::SET_COOKIE)
            .expect("a session cookie")
            .to_str()
            .unwrap();
        c.split(';').next().unwrap().to_string()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.expect("the router answers");
    let status = res.status();
    let headers = res.headers().clone();
    let body = axum::body::to_bytes(res.into_body(), 1 << 24)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn get(path: &str) -> axum::http::request::Builder {
    Request::builder()
        .uri(path)
        .header(header::HOST, "127.0.0.1:8080")
}

fn post(path: &str) -> axum::http::request::Builder {
    Request::builder()
        .method("POST")
        .uri(path)
        .header(header::HOST, "127.0.0.1:8080")
}

/// A request with the session cookie and no body.
trait CookieOnly {
    fn cookie_only(self, cookie: &str) -> Request<Body>;
}

impl CookieOnly for axum::http::request::Builder {
    fn cookie_only(self, cookie: &str) -> Request<Body> {
        self.header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap()
    }
}

/// The JSON a GET answers (no session: loopback reads need none).
async fn get_json(app: &Router, path: &str) -> Value {
    let a = send(app, get(path).body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
    a.json()
}

/// A loopback session: (cookie, csrf token).
async fn loopback_session(app: &Router) -> (String, String) {
    let a = send(app, get("/ui/api/session").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let set = a.headers[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    (a.cookie(), a.json()["csrf"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_are_served_from_the_binary() {
    let server = workflow::start(|_| {}).await;
    let app = router(&server, &server.app.config);
    let index = send(&app, get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(index.status, StatusCode::OK);
    assert!(index.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(index.text().contains("/ui/static/app.js"));
    assert!(index.headers.contains_key(header::CONTENT_SECURITY_POLICY));
    for (path, kind, needle) in [
        ("/ui/static/app.js", "text/javascript", "EventSource"),
        ("/ui/static/app.css", "text/css", ".banner"),
    ] {
        let a = send(&app, get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(a.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with(kind));
        assert!(a.text().contains(needle), "{path}");
    }
    let missing = send(
        &app,
        get("/ui/static/../../etc/passwd")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let missing = send(&app, get("/nothing-here").body(Body::empty()).unwrap()).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_reads_the_store_and_retry_goes_through_the_state_machine() {
    let server = workflow::start(|_| {}).await;
    let store = workflow::store(&server);
    let scan = workflow::scan_dir(&server);
    let app = router(&server, &server.app.config);
    let ok_id = drop_case(&scan, 601);
    let (bad_id, dir) = drop_unmarked_case(&scan, 602);
    std::fs::write(dir.join("MQIC_DEMO_FAIL"), "exit\n").unwrap();
    mqic::demo::cases::mark_ready(&dir).unwrap();
    wait_status(&store, &ok_id, CaseStatus::Completed).await;
    wait_status(&store, &bad_id, CaseStatus::Failed).await;

    let overview = send(&app, get("/ui/api/overview").body(Body::empty()).unwrap())
        .await
        .json();
    assert_eq!(overview["status"]["cases"]["COMPLETED"], 1, "{overview}");
    assert_eq!(overview["status"]["cases"]["FAILED"], 1, "{overview}");
    assert_eq!(overview["health"], "warning", "{overview}");
    let queues = overview["queues"]["queues"].as_array().unwrap();
    assert!(
        queues.iter().any(|q| q["name"] == "conductor_queue"),
        "{overview}"
    );
    assert_eq!(overview["gpus"].as_array().unwrap().len(), 2, "{overview}");
    assert!(!overview["workers"].as_array().unwrap().is_empty());

    let all = send(&app, get("/ui/api/cases").body(Body::empty()).unwrap()).await;
    assert_eq!(all.json().as_array().unwrap().len(), 2);
    let failed = send(
        &app,
        get("/ui/api/cases?status=failed")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(failed.as_array().unwrap().len(), 1);
    assert_eq!(failed[0]["case_id"], bad_id.as_str());
    let searched = send(
        &app,
        get(&format!("/ui/api/cases?q={}", ok_id.to_lowercase()))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(searched.as_array().unwrap().len(), 1);
    assert_eq!(searched[0]["case_id"], ok_id.as_str());
    let bad_status = send(
        &app,
        get("/ui/api/cases?status=sleeping")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(bad_status.status, StatusCode::BAD_REQUEST);

    let detail = send(
        &app,
        get(&format!("/ui/api/cases/{bad_id}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(detail["case"]["status"], "FAILED");
    assert_eq!(detail["case"]["failure"]["step"], "simulate");
    assert!(detail["history"].as_array().unwrap().len() >= 3, "{detail}");
    let log = send(
        &app,
        get(&format!("/ui/api/cases/{bad_id}/log"))
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .json();
    assert_eq!(log["attempt"]["step"], "simulate", "{log}");
    assert!(
        log["text"].as_str().unwrap().contains("FATAL ERROR"),
        "{log}"
    );
    let none = send(&app, get("/ui/api/cases/NOPE").body(Body::empty()).unwrap()).await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    let sneaky = send(
        &app,
        get("/ui/api/cases/..%2F..%2Fetc/log")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(sneaky.status, StatusCode::NOT_FOUND, "{}", sneaky.text());

    // Retry: refused without a session, without the token, from another origin.
    let retry = |cookie: Option<&str>, token: Option<&str>, origin: Option<&str>, id: &str| {
        let mut b = post(&format!("/ui/api/cases/{id}/retry"));
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        if let Some(t) = token {
            b = b.header("x-csrf-token", t);
        }
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(Body::empty()).unwrap()
    };
    let a = send(&app, retry(None, None, None, &bad_id)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.text());
    let (cookie, csrf) = loopback_session(&app).await;
    let a = send(&app, retry(Some(&cookie), None, None, &bad_id)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    let a = send(&app, retry(Some(&cookie), Some("0000"), None, &bad_id)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    let a = send(
        &app,
        retry(
            Some(&cookie),
            Some(&csrf),
            Some("http://evil.example"),
            &bad_id,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    let mut cross = retry(Some(&cookie), Some(&csrf), None, &bad_id);
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    assert_eq!(send(&app, cross).await.status, StatusCode::FORBIDDEN);
    assert_eq!(
        store.case(&bad_id.as_str().into()).unwrap().unwrap().status,
        CaseStatus::Failed,
        "no refused request changed the case"
    );
    // A completed case cannot be retried: the state machine says why (409).
    let a = send(
        &app,
        retry(
            Some(&cookie),
            Some(&csrf),
            Some("http://127.0.0.1:8080"),
            &ok_id,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
    assert!(a.json()["error"].as_str().unwrap().contains("only FAILED"));
    // The failed one can, once its input is fixed; it runs again and completes.
    let config = &server.app.config;
    let uploaded = config
        .work_root(&config.hosts[0])
        .join(&bad_id)
        .join("input");
    std::fs::remove_file(uploaded.join("MQIC_DEMO_FAIL")).unwrap();
    let a = send(
        &app,
        retry(
            Some(&cookie),
            Some(&csrf),
            Some("http://127.0.0.1:8080"),
            &bad_id,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let now = a.json()["status"].as_str().unwrap().to_string();
    assert!(now == "QUEUED" || now == "PROCESSING", "{now}");
    let case = wait_status(&store, &bad_id, CaseStatus::Completed).await;
    assert_eq!(case.manual_retries, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_and_queue_rates_come_from_the_broker() {
    use lapin::options::{BasicAckOptions, BasicPublishOptions};
    let server = workflow::start(|_| {}).await;
    let app = router(&server, &server.app.config);
    let (conn, ch, mut consumer) = lab_tool(&server, "router-lab-tool").await;
    let listed = get_json(&app, "/ui/api/connections").await;
    let rows = listed["connections"].as_array().unwrap();
    let mine = rows
        .iter()
        .find(|c| c["client"] == "router-lab-tool")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(mine["type"], "network", "{mine}");
    assert_eq!(mine["user"], "guest", "{mine}");
    assert_eq!(mine["vhost"], "/", "{mine}");
    assert_eq!(mine["channels"], 1, "{mine}");
    assert_eq!(mine["consumers"], 1, "{mine}");
    assert!(mine["recv_oct"].as_u64().unwrap() > 0, "{mine}");
    assert!(
        rows.iter().any(|c| c["type"] == "direct"),
        "mqic's own in-process connections are listed: {listed}"
    );
    let chan = listed["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connection_id"] == mine["id"])
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        (chan["number"].as_u64(), chan["consumers"].as_u64()),
        (Some(1), Some(1))
    );

    // The overview carries the same list (so the page updates it live over SSE).
    let overview = get_json(&app, "/ui/api/overview").await;
    assert!(overview["connection_list"]["connections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["client"] == "router-lab-tool"));

    // Publish, consume and ack 5 messages: the counters move, and the rates (taken between
    // two looks) turn positive.
    let first = get_json(&app, "/ui/api/queues").await;
    let row = |v: &Value| {
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "lab-watched")
            .cloned()
            .unwrap_or_else(|| panic!("{v}"))
    };
    assert_eq!(row(&first)["deliver_rate"], 0.0);
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            "lab-watched".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    for _ in 0..5 {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Each look after the first rates the interval since the last rated one, so the three
    // counters may move in different intervals: every rate must have been positive once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = [0.0f64; 3];
    let q = loop {
        let q = row(&get_json(&app, "/ui/api/queues").await);
        for (i, k) in ["publish_rate", "deliver_rate", "ack_rate"]
            .iter()
            .enumerate()
        {
            seen[i] = seen[i].max(q[k].as_f64().unwrap());
        }
        if q["acked"] == 5 && seen.iter().all(|r| *r > 0.0) {
            break q;
        }
        assert!(tokio::time::Instant::now() < deadline, "{q} {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (q["published"].as_u64(), q["delivered"].as_u64()),
        (Some(5), Some(5))
    );

    conn.close(200, "done".into()).await.unwrap();
    loop {
        let listed = get_json(&app, "/ui/api/connections").await;
        if !listed.to_string().contains("router-lab-tool") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still listed after close: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

fn ops_user(password: &str) -> UserConfig {
    let text = format!(
        "[[amqp.users]]\nname = \"ops\"\npassword_hash = \"{}\"\ntags = [\"management\"]\n",
        mqic::amqp::auth::hash_password(password)
    );
    Config::from_toml(&text, "test").unwrap().amqp.users[0].clone()
}

fn login(user: &str, password: &str, peer: &str) -> Request<Body> {
    let mut req = post("/ui/api/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"user": user, "password": password}).to_string(),
        ))
        .unwrap();
    let peer: SocketAddr = peer.parse().unwrap();
    // What axum's `into_make_service_with_connect_info` puts there.
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_everything_needs_a_login() {
    // The configuration refuses a non-loopback dashboard nobody can log in to.
    let err = Config::from_toml("[web]\nlisten = \"0.0.0.0:8080\"\n", "lab.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("web.listen"), "{err}");
    assert!(Config::from_toml("[web]\nsession_hours = 0\n", "lab.toml").is_err());

    let server = workflow::start(|_| {}).await;
    let mut config = server.app.config.clone();
    config.web.listen = "0.0.0.0:8080".parse().unwrap();
    config.amqp.users.push(ops_user("s3cret-pass"));
    let app = router(&server, &config);

    for path in [
        "/ui/api/overview",
        "/ui/api/cases",
        "/ui/events",
        "/ui/api/session",
    ] {
        let a = send(&app, get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!a.headers.contains_key(header::SET_COOKIE), "{path}");
    }
    // The page itself loads (it shows the login form).
    assert_eq!(
        send(&app, get("/").body(Body::empty()).unwrap())
            .await
            .status,
        StatusCode::OK
    );
    let wrong = send(&app, login("ops", "guess", "192.0.2.7:5000")).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(!wrong.headers.contains_key(header::SET_COOKIE));
    // guest is loopback-only: refused from elsewhere even with the right password.
    let guest = send(&app, login("guest", "guest", "192.0.2.7:5000")).await;
    assert_eq!(guest.status, StatusCode::UNAUTHORIZED);
    // ... and accepted from loopback (a browser on the mqic machine itself).
    let local = send(&app, login("guest", "guest", "127.0.0.1:5000")).await;
    assert_eq!(local.status, StatusCode::OK, "{}", local.text());
    assert_eq!(local.json()["user"], "guest");
    // A login from another site is refused before the password is looked at.
    let mut forged = login("ops", "s3cret-pass", "192.0.2.7:5000");
    forged
        .headers_mut()
        .insert(header::ORIGIN, "http://evil.example".parse().unwrap());
    assert_eq!(send(&app, forged).await.status, StatusCode::FORBIDDEN);

    let ok = send(&app, login("ops", "s3cret-pass", "192.0.2.7:5000")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let cookie = ok.cookie();
    let csrf = ok.json()["csrf"].as_str().unwrap().to_string();
    assert_eq!(ok.json()["user"], "ops");
    let overview = send(&app, get("/ui/api/overview").cookie_only(&cookie)).await;
    assert_eq!(overview.status, StatusCode::OK);
    let session = send(&app, get("/ui/api/session").cookie_only(&cookie))
        .await
        .json();
    assert_eq!(session["csrf"], csrf.as_str());
    // Logged in, a state change still needs the token.
    let no_token = send(&app, post("/ui/api/cases/X/cancel").cookie_only(&cookie)).await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    let with_token = send(
        &app,
        post("/ui/api/cases/X/cancel")
            .header(header::COOKIE, &cookie)
            .header("x-csrf-token", &csrf)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        with_token.status,
        StatusCode::NOT_FOUND,
        "{}",
        with_token.text()
    );
    // After logout the cookie is worthless.
    let out = send(
        &app,
        post("/ui/api/logout")
            .header(header::COOKIE, &cookie)
            .header("x-csrf-token", &csrf)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(out.status, StatusCode::OK);
    let after = send(&app, get("/ui/api/overview").cookie_only(&cookie)).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// Reads an SSE stream until `want` matches an event (name, data); 60 s at most.
async fn read_events(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    mut want: impl FnMut(&str, &Value) -> bool,
) -> (String, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if data.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&data).expect("event data is JSON");
            if want(&name, &value) {
                return (name, value);
            }
        }
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the awaited event came within 60 s")
            .expect("the stream stays open")
            .expect("the stream reads");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_pushes_case_changes_to_a_real_http_client() {
    let server = workflow::start(|_| {}).await;
    let addr = server.app.web_addr.expect("the dashboard is enabled");
    let client = reqwest::Client::new();
    let res = client
        .get(format!("http://{addr}/ui/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = res.bytes_stream();
    let mut buf = String::new();
    let (_, snapshot) = read_events(&mut stream, &mut buf, |n, _| n == "snapshot").await;
    assert_eq!(snapshot["cases"], json!([]));
    assert_eq!(snapshot["overview"]["status"]["total_cases"], 0);

    let id = drop_case(&workflow::scan_dir(&server), 611);
    let (_, found) = read_events(&mut stream, &mut buf, |n, v| {
        n == "cases"
            && v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["case_id"] == id.as_str())
    })
    .await;
    assert!(found["rows"][0]["status"].is_string());
    let (_, done) = read_events(&mut stream, &mut buf, |n, v| {
        n == "cases"
            && v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["case_id"] == id.as_str() && r["status"] == "COMPLETED")
    })
    .await;
    assert!(done.to_string().contains("\"progress\":1.0"), "{done}");
    let (_, overview) = read_events(&mut stream, &mut buf, |n, v| {
        n == "overview" && v["status"]["cases"]["COMPLETED"] == 1
    })
    .await;
    assert_eq!(overview["health"], "healthy", "{overview}");

    // The log stream of the case gives the last attempt with a local log.
    let res = client
        .get(format!("http://{addr}/ui/events/log/{id}"))
        .send()
        .await
        .unwrap();
    let mut log = res.bytes_stream();
    let mut buf = String::new();
    let (_, attempt) = read_events(&mut log, &mut buf, |n, _| n == "attempt").await;
    assert_eq!(attempt["attempt"]["step"], "simulate", "{attempt}");
    assert!(
        attempt["text"]
            .as_str()
            .unwrap()
            .contains("Generating particles"),
        "{attempt}"
    );
    drop(stream);
    drop(log);
    // Open streams do not hold up shutdown.
    let res = client
        .get(format!("http://{addr}/ui/events"))
        .send()
        .await
        .unwrap();
    let stop = tokio::time::timeout(Duration::from_secs(8), server.stop()).await;
    assert!(stop.is_ok(), "shutdown waited on an open event stream");
    drop(res);
}

// ---------------------------------------------------------------------------------------
// A real headless Chromium, driven over the DevTools protocol.

/// Chromium in its own process group, killed (the group) when dropped.
struct Chromium {
    child: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Starts Chromium on `url`; returns it and the page's DevTools WebSocket URL.
async fn chromium(program: &Path, url: &str) -> (Chromium, String) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(program)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("chromium starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(ws) = line.strip_prefix("DevTools listening on ") {
                let _ = tx.send(ws.trim().to_string());
            }
        }
    });
    let browser = Chromium {
        child,
        _profile: profile,
    };
    let ws = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("chromium prints its DevTools address");
    // ws://127.0.0.1:PORT/devtools/browser/ID -> the page's socket from /json/list.
    let http = ws
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = reqwest::get(format!("http://{http}/json/list"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let list: Value = serde_json::from_str(&text).unwrap();
        if let Some(page) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page" && t["url"].as_str().unwrap_or("").starts_with(url))
        {
            return (
                browser,
                page["webSocketDebuggerUrl"].as_str().unwrap().to_string(),
            );
        }
        assert!(tokio::time::Instant::now() < deadline, "no page in {list}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal DevTools-protocol client: commands with ids, replies matched by id.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the DevTools socket opens");
        Cdp { ws, next: 0 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        use tokio_tungstenite::tungstenite::Message;
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
        let wait = async {
            while let Some(m) = self.ws.next().await {
                let Ok(Message::Text(t)) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == json!(id) {
                    if let Some(e) = v.get("error") {
                        panic!("{method}: {e}");
                    }
                    return v["result"].clone();
                }
            }
            panic!("the DevTools socket closed during {method}");
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer in 30 s"))
    }

    /// Evaluates an expression in the page: its value, or the exception it threw.
    async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// Evaluates `expression` until it gives something other than null/false (an exception,
    /// e.g. while the page loads, counts as not yet); 90 s at most.
    async fn until(&mut self, what: &str, expression: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.try_eval(expression).await;
            match &v {
                Ok(v) if v == "REPLACED" => panic!("{what}: a row was replaced, not updated"),
                Ok(v) if !(v.is_null() || *v == json!(false)) => return v.clone(),
                _ => {}
            }
            if tokio::time::Instant::now() > deadline {
                let page = self.try_eval("document.body.innerText").await;
                panic!("timed out waiting for {what} (last: {v:?}); the page shows:\n{page:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A lapin connection named `name` with one channel consuming from a queue `lab-watched`.
async fn lab_tool(
    server: &TestServer,
    name: &str,
) -> (lapin::Connection, lapin::Channel, lapin::Consumer) {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let props = lapin::ConnectionProperties::default().with_connection_name(name.into());
    let conn = lapin::Connection::connect(&server.url(), props)
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "lab-watched".into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let consumer = ch
        .basic_consume(
            "lab-watched".into(),
            "lab-tool".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    (conn, ch, consumer)
}

fn screenshot_path() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("web-dashboard.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_watches_a_case_live_and_retries_a_failed_one() {
    const TEST: &str = "chromium_watches_a_case_live_and_retries_a_failed_one";
    if !have_program(TEST, "chromium") {
        return;
    }
    let program = crate::support::which("chromium").unwrap();
    // Slow the simulated MOQUI down (about 4 s a run) so progress can be watched.
    let server = workflow::start(|c| {
        for step in &mut c.workflows.get_mut("demo").unwrap().steps {
            if step.name == "simulate" {
                // `{{`/`}}` are the template's escaped braces; the env of other tests
                // (MQIC_DEMO_BATCH_SLEEP) must not speed this one up.
                let cmd = step.command.as_mut().unwrap();
                let slow = cmd.replace("${{MQIC_DEMO_BATCH_SLEEP:-0.25}}", "0.4");
                assert_ne!(&slow, cmd, "the simulate command changed: {cmd}");
                *cmd = slow;
            }
        }
    })
    .await;
    let store = workflow::store(&server);
    let scan = workflow::scan_dir(&server);
    let url = format!(
        "http://{}/",
        server.app.web_addr.expect("the dashboard is enabled")
    );
    let (_browser, page) = chromium(&program, &format!("{url}#/cases")).await;
    let mut cdp = Cdp::connect(&page).await;
    cdp.call("Runtime.enable", json!({})).await;
    cdp.until(
        "the cases page",
        "document.getElementById('case-count').textContent.includes('of 0 cases')",
    )
    .await;
    // A mark that a full page reload would wipe.
    cdp.eval("window.__mark = 42").await;

    let (bad, dir) = drop_unmarked_case(&scan, 621);
    std::fs::write(dir.join("MQIC_DEMO_FAIL"), "exit\n").unwrap();
    mqic::demo::cases::mark_ready(&dir).unwrap();
    let good = drop_case(&scan, 622);

    // Watch the good case's row: it shows progress between 0 and 100 % while it runs, then
    // COMPLETED, all in the same row element, without a reload.
    let row = |id: &str| {
        format!(
            "(() => {{ const r = document.querySelector('tr[data-case=\"{id}\"]'); if (!r) return null; \
             if (!window.__rows) window.__rows = {{}}; \
             if (window.__rows['{id}'] && window.__rows['{id}'] !== r) return 'REPLACED'; \
             window.__rows['{id}'] = r; \
             return {{status: r.children[1].textContent, pct: r.querySelector('.pct').textContent, step: r.children[3].textContent}}; }})()"
        )
    };
    let running = cdp
        .until(
            "the good case running with partial progress",
            &format!(
                "(() => {{ const v = {}; if (v === 'REPLACED') return v; return v && v.status === 'PROCESSING' && v.step.startsWith('simulate') && parseInt(v.pct) > 0 && parseInt(v.pct) < 100 ? v : null; }})()",
                row(&good)
            ),
        )
        .await;
    println!("seen live: {running}");
    // The same row moves on without a reload: a later progress value while still running.
    let first = running["pct"]
        .as_str()
        .unwrap()
        .trim_end_matches('%')
        .to_string();
    let later = cdp
        .until(
            "the good case's progress moving on",
            &format!(
                "(() => {{ const v = {}; if (v === 'REPLACED') return v; return v && (v.status === 'PROCESSING' && parseInt(v.pct) > {first}) ? v : null; }})()",
                row(&good)
            ),
        )
        .await;
    println!("then: {later}");
    let done = cdp
        .until(
            "the good case completed",
            &format!(
                "(() => {{ const v = {}; if (v === 'REPLACED') return v; return v && v.status === 'COMPLETED' ? v : null; }})()",
                row(&good)
            ),
        )
        .await;
    assert_eq!(done["pct"], "100%");
    cdp.until(
        "the bad case failed",
        &format!(
            "(() => {{ const v = {}; return v && v.status === 'FAILED'; }})()",
            row(&bad)
        ),
    )
    .await;
    assert_eq!(
        cdp.eval("window.__mark").await,
        json!(42),
        "the page reloaded"
    );
    let banner = cdp
        .eval("document.getElementById('banner').classList.contains('hidden')")
        .await;
    assert_eq!(banner, json!(true), "no reconnect banner without a loss");

    // Open the failed case: the failure record and the failed attempt's log are there.
    cdp.eval(&format!("location.hash = '#/case/{bad}'")).await;
    cdp.until(
        "the failure record",
        "document.getElementById('cd-failure-facts').textContent.includes('exit_code_2')",
    )
    .await;
    cdp.until(
        "the failed attempt's log",
        "document.getElementById('cd-log').textContent.includes('FATAL ERROR')",
    )
    .await;
    cdp.until(
        "an enabled Retry button",
        "!document.getElementById('cd-retry').disabled",
    )
    .await;

    // Fix the input on the host copy, click Retry, watch it run again.
    let config = &server.app.config;
    let uploaded = config.work_root(&config.hosts[0]).join(&bad).join("input");
    std::fs::remove_file(uploaded.join("MQIC_DEMO_FAIL")).unwrap();
    cdp.eval("document.getElementById('cd-retry').click()")
        .await;
    cdp.until(
        "the retry accepted",
        "document.getElementById('toast').textContent.includes('Retry accepted')",
    )
    .await;
    cdp.until(
        "the case running again, live in its log",
        "document.getElementById('cd-status').textContent === 'PROCESSING' && \
         document.getElementById('cd-log-title').textContent.includes('running') && \
         !document.getElementById('cd-log').textContent.includes('FATAL ERROR') && \
         document.getElementById('cd-log').textContent.includes('Generating particles')",
    )
    .await;
    let shot = cdp
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let path = screenshot_path();
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {}", path.display());
    cdp.until(
        "the retried case completed, with the bytes its transfers moved",
        "document.getElementById('cd-status').textContent === 'COMPLETED' && \
         /Transferred.*upload \\d.*download \\d/.test(document.getElementById('cd-facts').textContent)",
    )
    .await;
    let case = wait_status(&store, &bad, CaseStatus::Completed).await;
    assert_eq!(case.manual_retries, 1);

    // The overview, updated live: both cases completed, throughput counted, no warning.
    cdp.eval("location.hash = '#/overview'").await;
    cdp.until(
        "the overview with two completed cases",
        "document.getElementById('ov-status-legend').textContent.includes('COMPLETED 2') && \
         document.getElementById('ov-health').textContent === 'healthy' && \
         document.querySelectorAll('#ov-throughput rect').length > 0 && \
         document.getElementById('ov-queues').textContent.includes('conductor_queue')",
    )
    .await;
    let shot = cdp
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let overview = screenshot_path().with_file_name("web-overview.png");
    std::fs::write(&overview, &png).unwrap();
    println!("screenshot: {}", overview.display());
    assert_eq!(
        cdp.eval("window.__mark").await,
        json!(42),
        "the page reloaded"
    );
    assert_eq!(
        cdp.eval("document.getElementById('banner').classList.contains('hidden')")
            .await,
        json!(true)
    );

    // A real AMQP client (lapin) with a channel and a consumer shows up in the connections
    // view, live; the queues view shows its consume rates next to publish.
    let (conn, _ch, _consumer) = lab_tool(&server, "chromium-lab-tool").await;
    cdp.eval("location.hash = '#/connections'").await;
    let seen = cdp
        .until(
            "the lab tool's connection and channel listed",
            "(() => { const r = Array.from(document.querySelectorAll('#connections-body tr')) \
               .find((tr) => tr.children[1].textContent === 'chromium-lab-tool'); \
               if (!r || r.children[2].textContent !== 'network' || r.children[5].textContent !== '1' || \
                   r.children[6].textContent !== '1') return null; \
               const ch = Array.from(document.querySelectorAll('#channels-body tr')) \
               .find((tr) => tr.children[0].textContent === r.children[0].textContent + ' (1)'); \
               return ch && ch.children[3].textContent === '1' ? r.children[0].textContent : null; })()",
        )
        .await;
    println!("connection listed: {seen}");
    let shot = cdp
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let connections = screenshot_path().with_file_name("web-connections.png");
    std::fs::write(&connections, &png).unwrap();
    println!("screenshot: {}", connections.display());
    conn.close(200, "done".into()).await.unwrap();
    cdp.until(
        "the closed connection gone from the view",
        "!document.getElementById('connections-body').textContent.includes('chromium-lab-tool')",
    )
    .await;
    cdp.eval("location.hash = '#/queues'").await;
    cdp.until(
        "the queues view with deliver and ack rates",
        "document.querySelector('#page-queues thead').textContent.includes('Deliver /s') && \
         document.querySelector('#page-queues thead').textContent.includes('Ack /s') && \
         document.getElementById('queues-body').textContent.includes('lab-watched')",
    )
    .await;

    // A real loss (mqic stops): the banner comes, after its grace period.
    server.stop().await;
    cdp.until(
        "the reconnecting banner after mqic stopped",
        "!document.getElementById('banner').classList.contains('hidden')",
    )
    .await;
    drop(cdp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqic_demo_prints_the_dashboard_url_where_its_cases_can_be_watched() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = crate::process::mqic()
        .args(["demo", "--cases", "2", "--keep", "--data-dir"])
        .arg(dir.path().join("demo"))
        .env("MQIC_DEMO_BATCH_SLEEP", "0.01")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mqic demo starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let url = loop {
        let line = next_line(&mut rx).await;
        if let Some(rest) = line.trim().strip_prefix("dashboard: ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // Wait for the demo to finish its cases (it keeps serving), then look at them.
    loop {
        if next_line(&mut rx).await.starts_with("serving until Ctrl-C") {
            break;
        }
    }
    let page = reqwest::get(&url).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/ui/static/app.js"));
    let cases: Value = serde_json::from_str(
        &reqwest::get(format!("{url}ui/api/cases"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 2, "{cases:?}");
    assert!(
        cases.iter().all(|c| c["status"] == "COMPLETED"),
        "{cases:?}"
    );
    // SAFETY: SIGINT to the child this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("a line within 60 s")
        .expect("mqic demo keeps running")
}
