//! The dashboard: an axum server on `[web] listen` (127.0.0.1:8080 by default) with a
//! one-page app whose HTML, CSS and JS are compiled into the binary (no CDN: lab networks
//! are offline).
//!
//! - [`api`]: the JSON API under `/ui/api/...`, answered by the conductor's RPC handlers
//!   ([`crate::conductor::rpc::answer`]), so Retry and Cancel take the same path as the RPC.
//! - [`hub`]: one task that watches the store's event log and the broker and pushes deltas
//!   to every `/ui/events` server-sent-event stream; [`logtail`] streams a step's log.
//! - [`auth`]: sessions, login (required off loopback), and the CSRF checks every
//!   state-changing request passes.
//!
//! Paths: `/` (the app), `/ui/static/*` (assets), `/ui/api/*` (JSON), `/ui/events` (SSE).
//! `/api/*` is left to the RabbitMQ-compatible management API.

pub mod api;
pub mod auth;
pub mod hub;
pub mod logtail;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::amqp::Broker;
use crate::conductor::driver::Conductor;
use crate::config::Config;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Everything a request handler reads.
pub struct Web {
    pub conductor: Arc<Conductor>,
    pub broker: Arc<Broker>,
    /// The vhosts whose queues are shown.
    pub vhosts: Vec<String>,
    /// Where the local executor keeps attempt directories (step logs).
    pub attempts_root: PathBuf,
    pub auth: auth::Auth,
    pub hub: Arc<hub::Hub>,
}

impl Web {
    pub fn new(config: &Config, broker: Arc<Broker>, conductor: Arc<Conductor>) -> Arc<Web> {
        let hub = hub::Hub::new();
        Arc::new(Web {
            auth: auth::Auth::new(&config.web, config.users()),
            vhosts: config.amqp.vhosts.clone(),
            attempts_root: config.data_dir.join("attempts"),
            conductor,
            broker,
            hub,
        })
    }
}

/// The dashboard's routes.
pub fn router(web: Arc<Web>) -> Router {
    let api = Router::new()
        .route("/ui/api/session", get(auth::session))
        .route("/ui/api/login", post(auth::login))
        .route("/ui/api/logout", post(auth::logout))
        .route("/ui/api/overview", get(api::overview))
        .route("/ui/api/cases", get(api::cases))
        .route("/ui/api/cases/{id}", get(api::case))
        .route("/ui/api/cases/{id}/log", get(api::log))
        .route("/ui/api/cases/{id}/retry", post(api::retry))
        .route("/ui/api/cases/{id}/cancel", post(api::cancel))
        .route("/ui/api/gpus", get(api::gpus))
        .route("/ui/api/workers", get(api::workers))
        .route("/ui/api/queues", get(api::queues))
        .route("/ui/api/connections", get(api::connections))
        .route("/ui/events", get(hub::events))
        .route("/ui/events/log/{id}", get(logtail::events))
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            auth::guard,
        ));
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/static/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/static/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .merge(api)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(web)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

/// Binds the dashboard's listener (so a busy port fails start-up with a clear line).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the dashboard on {addr}"))
}

/// Serves the dashboard and runs its hub until `shutdown` turns true.
pub async fn run(listener: TcpListener, web: Arc<Web>, mut shutdown: watch::Receiver<bool>) {
    let hub = tokio::spawn(web.hub.clone().run(web.clone(), shutdown.clone()));
    let app = router(web).into_make_service_with_connect_info::<SocketAddr>();
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!("dashboard server stopped: {e}");
    }
    hub.abort();
}
