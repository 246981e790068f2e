//! The RabbitMQ-compatible management HTTP API (`/api/...`, port 15672 by default) and the
//! Prometheus endpoint (`/metrics`, port 15692), so rabbitmqadmin, Telegraf, health probes,
//! Prometheus and Grafana dashboards work against mqic unchanged.
//!
//! Reading order: this file (state, errors, basic auth, the routers, serving), [`api`] (the
//! read-only object views), [`ops`] (declare, delete, bind, purge, publish, get,
//! definitions, health checks), [`json`] (JSON shapes and list conventions), [`rates`]
//! (message rates sampled every few seconds), [`metrics`] (the Prometheus text format),
//! [`client`] (the small HTTP client `mqic queues` uses), [`commands`] (the operator
//! commands of the command line: status, cases, case, retry, cancel, queues, publish).
//!
//! Everything here reads the broker through its read-only accessors and changes it only
//! through the same operations AMQP clients use.

pub mod api;
pub mod client;
pub mod commands;
pub mod json;
pub mod metrics;
pub mod ops;
pub mod rates;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::amqp::auth::User;
use crate::amqp::reply::{AmqpError, ReplyCode};
use crate::amqp::Broker;
use crate::disk::DiskFreeLimit;
use crate::memory::MemoryWatermark;
use crate::store::Store;

/// The product name and version the API reports.
pub const PRODUCT_NAME: &str = "mqic";
pub const PRODUCT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The RabbitMQ version whose management API this one follows (clients branch on it).
pub const RABBITMQ_COMPAT_VERSION: &str = "3.13.7";

/// A listener the node has, for `/api/overview`, `/api/nodes` and the health checks.
#[derive(Debug, Clone)]
pub struct Listener {
    /// RabbitMQ's protocol names: `amqp`, `amqp/ssl`, `http`, `http/prometheus`.
    pub protocol: &'static str,
    pub addr: SocketAddr,
}

/// What the management API and the metrics endpoint read.
pub struct Mgmt {
    pub broker: Arc<Broker>,
    /// The case store, for the `mqic_` workflow metrics (None: broker metrics only).
    pub store: Option<Store>,
    pub memory: Option<Arc<MemoryWatermark>>,
    /// The disk free limit in force (None: not enforced by this process).
    pub disk: Option<Arc<DiskFreeLimit>>,
    pub listeners: Vec<Listener>,
    /// `mqic@<hostname>`, like a RabbitMQ node name.
    pub node: String,
    pub data_dir: PathBuf,
    pub started: Instant,
    pub rates: rates::Rates,
}

impl Mgmt {
    pub fn new(
        broker: Arc<Broker>,
        store: Option<Store>,
        memory: Option<Arc<MemoryWatermark>>,
        disk: Option<Arc<DiskFreeLimit>>,
        listeners: Vec<Listener>,
        data_dir: PathBuf,
    ) -> Arc<Mgmt> {
        Arc::new(Mgmt {
            broker,
            store,
            memory,
            disk,
            listeners,
            node: format!("mqic@{}", hostname()),
            data_dir,
            started: Instant::now(),
            rates: rates::Rates::default(),
        })
    }
}

/// The machine's host name (for the node name).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// An API error: RabbitMQ's `{"error": ..., "reason": ...}` with its status code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub reason: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            reason: reason.into(),
        }
    }

    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "Object Not Found", "Not Found")
    }

    pub fn unauthorized(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "not_authorized", reason)
    }

    pub fn forbidden(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "not_authorised", reason)
    }
}

impl From<AmqpError> for ApiError {
    fn from(e: AmqpError) -> ApiError {
        match e.code {
            ReplyCode::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.text),
            ReplyCode::AccessRefused => ApiError::forbidden(e.text),
            _ => ApiError::bad_request(e.text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.error, "reason": self.reason})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The tags that let a user into the management API at all.
const MANAGEMENT_TAGS: &[&str] = &["management", "policymaker", "monitoring", "administrator"];

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct AuthUser(pub User);

impl AuthUser {
    pub fn is_admin(&self) -> bool {
        self.0.tags.iter().any(|t| t == "administrator")
    }

    /// Administrators and monitoring users see every vhost.
    pub fn sees_all(&self) -> bool {
        self.0
            .tags
            .iter()
            .any(|t| t == "administrator" || t == "monitoring")
    }

    pub fn may_see(&self, vhost: &str) -> bool {
        self.sees_all() || self.0.may_open(vhost)
    }

    /// Changing a vhost's objects needs access to the vhost (as an AMQP connection would).
    pub fn check_vhost(&self, vhost: &str) -> ApiResult<()> {
        if self.0.may_open(vhost) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "user '{}' has no access to vhost '{vhost}'",
                self.0.name
            )))
        }
    }

    pub fn check_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("administrator tag required"))
        }
    }

    pub fn check_monitoring(&self) -> ApiResult<()> {
        if self.sees_all() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "administrator or monitoring tag required",
            ))
        }
    }
}

/// Basic auth with the broker's users: the same password check and loopback rule as AMQP
/// (`guest` only from loopback); a user needs a management tag. A request without a peer
/// address (never the case on a socket) counts as non-loopback.
pub async fn authenticate(State(m): State<Arc<Mgmt>>, mut req: Request, next: Next) -> Response {
    // The socket's peer; router tests without a socket give one with `MockConnectInfo`.
    let ext = req.extensions();
    let peer = ext
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0))
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let Some((name, password)) = basic_credentials(req.headers().get(header::AUTHORIZATION)) else {
        return ApiError::unauthorized("Not_Authorized").into_response();
    };
    let user = match m.broker.users.login(&name, password.as_bytes(), peer) {
        Ok(u) => u.clone(),
        Err(e) => {
            tracing::info!(%peer, "management API login refused: {e}");
            return ApiError::unauthorized("Login failed").into_response();
        }
    };
    if !user
        .tags
        .iter()
        .any(|t| MANAGEMENT_TAGS.contains(&t.as_str()))
    {
        return ApiError::unauthorized("Not management user").into_response();
    }
    req.extensions_mut().insert(AuthUser(user));
    next.run(req).await
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(value: Option<&HeaderValue>) -> Option<(String, String)> {
    let text = value?.to_str().ok()?;
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, password) = raw.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Serves `router` on `listener` until shutdown (peer addresses reach the auth check).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!("HTTP listener stopped: {e}");
    }
}

/// Registers `path` and `path/` (clients differ on the trailing slash).
fn both<S: Clone + Send + Sync + 'static>(
    r: axum::Router<S>,
    path: &str,
    method: axum::routing::MethodRouter<S>,
) -> axum::Router<S> {
    r.route(path, method.clone())
        .route(&format!("{path}/"), method)
}

async fn no_such_route() -> ApiError {
    ApiError::not_found()
}

/// The management API (`/api/...`), every route behind basic auth.
pub fn api_router(m: Arc<Mgmt>) -> axum::Router {
    use axum::routing::{delete, get, post};
    let mut r = axum::Router::new();
    for (path, handler) in [
        ("/api/overview", get(api::overview)),
        ("/api/nodes", get(api::nodes)),
        ("/api/queues", get(api::queues)),
        ("/api/exchanges", get(api::exchanges)),
        ("/api/bindings", get(api::bindings)),
        ("/api/connections", get(api::connections)),
        ("/api/channels", get(api::channels)),
        ("/api/consumers", get(api::consumers)),
        ("/api/vhosts", get(api::vhosts)),
        ("/api/users", get(api::users)),
        ("/api/permissions", get(api::permissions)),
        (
            "/api/definitions",
            get(ops::get_definitions).post(ops::post_definitions),
        ),
        ("/api/whoami", get(api::whoami)),
        ("/api/cluster-name", get(api::cluster_name)),
    ] {
        r = both(r, path, handler);
    }
    for path in [
        "/api/parameters",
        "/api/global-parameters",
        "/api/policies",
        "/api/operator-policies",
        "/api/vhost-limits",
        "/api/vhost-limits/{vhost}",
        "/api/user-limits",
        "/api/user-limits/{user}",
        "/api/topic-permissions",
        "/api/extensions",
        "/api/feature-flags",
        "/api/deprecated-features",
        "/api/deprecated-features/used",
    ] {
        r = both(r, path, get(api::empty_list));
    }
    let r = r
        .route("/api/nodes/{name}", get(api::node))
        .route("/api/queues/{vhost}", get(api::queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(api::queue)
                .put(ops::put_queue)
                .delete(ops::delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/bindings",
            get(api::queue_bindings),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            delete(ops::purge_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(ops::get_messages))
        .route("/api/exchanges/{vhost}", get(api::exchanges_in))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(api::exchange)
                .put(ops::put_exchange)
                .delete(ops::delete_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(api::exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(api::exchange_bindings_destination),
        )
        .route("/api/exchanges/{vhost}/{name}/publish", post(ops::publish))
        .route("/api/bindings/{vhost}", get(api::bindings_in))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(ops::list_bindings_between).post(ops::post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(ops::get_binding).delete(ops::delete_binding),
        )
        .route(
            "/api/connections/{name}",
            get(api::connection).delete(ops::close_connection),
        )
        .route("/api/consumers/{vhost}", get(api::consumers_in))
        .route("/api/vhosts/{name}", get(api::vhost))
        .route(
            "/api/vhosts/{name}/permissions",
            get(api::vhost_permissions),
        )
        .route("/api/users/{name}", get(api::user))
        .route("/api/users/{name}/permissions", get(api::user_permissions))
        .route("/api/permissions/{vhost}/{user}", get(api::permission))
        .route(
            "/api/definitions/{vhost}",
            get(ops::get_vhost_definitions).post(ops::post_vhost_definitions),
        )
        .route("/api/aliveness-test/{vhost}", get(ops::aliveness))
        .route("/api/health/checks/alarms", get(ops::alarms))
        .route("/api/health/checks/local-alarms", get(ops::alarms))
        .route("/api/health/checks/virtual-hosts", get(ops::virtual_hosts))
        .route(
            "/api/health/checks/port-listener/{port}",
            get(ops::port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(ops::protocol_listener),
        );
    let mut r = r;
    for path in [
        "/api/health/checks/is-in-service",
        "/api/health/checks/ready-to-serve-clients",
        "/api/health/checks/node-is-quorum-critical",
        "/api/health/checks/node-is-mirror-sync-critical",
    ] {
        r = r.route(path, get(ops::always_ok));
    }
    // Bodies carry at most one message (base64 makes it 4/3 larger) plus its JSON.
    let body_limit = m.broker.limits.max_message_size / 3 * 4 + 64 * 1024;
    r.route_layer(axum::middleware::from_fn_with_state(
        m.clone(),
        authenticate,
    ))
    .fallback(no_such_route)
    .layer(axum::extract::DefaultBodyLimit::max(body_limit))
    .with_state(m)
}

/// The Prometheus endpoint: `/metrics` and `/metrics/per-object` (no auth, as RabbitMQ's).
pub fn metrics_router(m: Arc<Mgmt>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/metrics", get(metrics::metrics))
        .route("/metrics/per-object", get(metrics::metrics))
        .with_state(m)
}

/// The HTTP listeners the config asks for, bound before anything else starts (so a busy
/// port stops start-up with one line).
pub struct Bound {
    pub management: Option<TcpListener>,
    pub prometheus: Option<TcpListener>,
}

pub async fn bind(config: &crate::config::Config) -> anyhow::Result<Bound> {
    use anyhow::Context;
    let listen = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for {what} on {addr}"))
    };
    Ok(Bound {
        management: match config.management.enabled {
            true => Some(listen(config.management.listen, "the management API").await?),
            false => None,
        },
        prometheus: match config.prometheus.enabled {
            true => Some(listen(config.prometheus.listen, "Prometheus").await?),
            false => None,
        },
    })
}

/// Where the HTTP listeners ended up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    pub management: Option<SocketAddr>,
    pub prometheus: Option<SocketAddr>,
}

/// Starts the bound listeners and the rate sampler.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    bound: Bound,
    broker: Arc<Broker>,
    store: Option<Store>,
    memory: Arc<MemoryWatermark>,
    disk: Arc<DiskFreeLimit>,
    amqp: (SocketAddr, Option<SocketAddr>),
    data_dir: PathBuf,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Addrs> {
    let addrs = Addrs {
        management: bound
            .management
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?,
        prometheus: bound
            .prometheus
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?,
    };
    let mut listeners = vec![Listener {
        protocol: "amqp",
        addr: amqp.0,
    }];
    listeners.extend(amqp.1.map(|addr| Listener {
        protocol: "amqp/ssl",
        addr,
    }));
    listeners.extend(addrs.management.map(|addr| Listener {
        protocol: "http",
        addr,
    }));
    listeners.extend(addrs.prometheus.map(|addr| Listener {
        protocol: "http/prometheus",
        addr,
    }));
    let m = Mgmt::new(broker, store, Some(memory), Some(disk), listeners, data_dir);
    tasks.spawn(rates::run(m.clone(), shutdown.clone()));
    if let Some(l) = bound.management {
        tasks.spawn(serve(l, api_router(m.clone()), shutdown.clone()));
    }
    if let Some(l) = bound.prometheus {
        tasks.spawn(serve(l, metrics_router(m), shutdown));
    }
    Ok(addrs)
}
