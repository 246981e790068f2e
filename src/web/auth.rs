//! Sessions and cross-site protection.
//!
//! - Bound to a loopback address (the default), the dashboard can be read without a login,
//!   as RabbitMQ lets `guest` in from localhost; `GET /ui/api/session` hands the page a
//!   session of its own. Bound anywhere else (or with `require_login`), every `/ui/api` and
//!   `/ui/events` request needs a session from `POST /ui/api/login`: a broker user (from
//!   `[[amqp.users]]`, password checked against its hash in constant time) with a management
//!   tag; loopback-only users cannot log in from elsewhere.
//! - The session cookie is `HttpOnly; SameSite=Strict`; it carries a random id, never a name.
//! - Every state-changing request (any method but GET/HEAD) needs a session and passes the
//!   CSRF checks: an `X-CSRF-Token` header equal to the session's token (a page on another
//!   site cannot read it), an `Origin`, when sent, equal to the `Host`, and a
//!   `Sec-Fetch-Site`, when sent, of `same-origin` or `none`. Login, which has no session
//!   yet, passes the Origin and Sec-Fetch-Site checks.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;

use super::Web;
use crate::amqp::auth::Users;
use crate::config::{WebConfig, WEB_TAGS};

/// The session cookie's name.
pub const COOKIE: &str = "mqic_session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at most (the oldest are dropped beyond it).
const MAX_SESSIONS: usize = 1024;

#[derive(Debug, Clone)]
pub struct Session {
    /// The user, or `None` for a loopback session without a login.
    pub user: Option<String>,
    pub csrf: String,
    expires: Instant,
}

/// The dashboard's users and sessions.
pub struct Auth {
    pub login_required: bool,
    users: Users,
    lifetime: Duration,
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal strings, compared in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(config: &WebConfig, users: Users) -> Auth {
        Auth {
            login_required: config.login_required(),
            users,
            lifetime: Duration::from_secs(config.session_hours.max(1) * 3600),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn create(&self, user: Option<String>) -> (String, Session) {
        let id = random_token();
        let session = Session {
            user,
            csrf: random_token(),
            expires: Instant::now() + self.lifetime,
        };
        let mut sessions = self.sessions.lock();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session a request's cookie names.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut sessions = self.sessions.lock();
        let s = sessions.get(&id)?;
        if s.expires <= Instant::now() {
            sessions.remove(&id);
            return None;
        }
        // Logged-in sessions only count where a login is asked for.
        if self.login_required && s.user.is_none() {
            return None;
        }
        Some(s.clone())
    }

    fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.sessions.lock().remove(&id);
        }
    }

    /// Checks a login; the user must have a management tag.
    fn check(&self, name: &str, password: &str, peer: IpAddr) -> Result<(), String> {
        match self.users.login(name, password.as_bytes(), peer) {
            Ok(user) if user.tags.iter().any(|t| WEB_TAGS.contains(&t.as_str())) => Ok(()),
            Ok(_) => Err(format!("user '{name}' has no management tag")),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(id: &str, max_age: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        max_age.as_secs()
    ))
    .expect("a hex token is a valid header value")
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The cross-site checks every state-changing request passes: `Origin` (when sent) names
/// this host, and `Sec-Fetch-Site` (when sent) is same-origin or none.
pub fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if site != "same-origin" && site != "none" {
            return Err("cross-site request refused");
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if host.is_empty() || authority != Some(host) {
            return Err("cross-origin request refused");
        }
    }
    Ok(())
}

/// The guard in front of `/ui/api` and `/ui/events`.
pub async fn guard(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let open = matches!(path, "/ui/api/session" | "/ui/api/login");
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let headers = request.headers();
    if changes {
        if let Err(why) = same_origin(headers) {
            return error(StatusCode::FORBIDDEN, why);
        }
    }
    if open {
        return next.run(request).await;
    }
    let session = web.auth.session(headers);
    if changes {
        let Some(session) = session else {
            return error(StatusCode::UNAUTHORIZED, "log in first");
        };
        let token = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !same(token, &session.csrf) {
            return error(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
        }
    } else if web.auth.login_required && session.is_none() {
        return error(StatusCode::UNAUTHORIZED, "log in first");
    }
    next.run(request).await
}

fn peer(connect: Option<Extension<ConnectInfo<SocketAddr>>>) -> IpAddr {
    // Without connection info (router tests) the peer counts as remote: the safe side.
    connect
        .map(|c| c.0 .0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// `GET /ui/api/session`: who is logged in, and the CSRF token for this session. On
/// loopback without `require_login`, a session is created on the spot.
pub async fn session(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Some(s) = web.auth.session(&headers) {
        return Json(json!({
            "user": s.user, "csrf": s.csrf, "login_required": web.auth.login_required,
        }))
        .into_response();
    }
    if web.auth.login_required {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "log in first", "login_required": true})),
        )
            .into_response();
    }
    let (id, s) = web.auth.create(None);
    (
        [(header::SET_COOKIE, set_cookie(&id, web.auth.lifetime))],
        Json(json!({"user": null, "csrf": s.csrf, "login_required": false})),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct Login {
    user: String,
    password: String,
}

/// `POST /ui/api/login` with `{"user", "password"}`.
pub async fn login(
    State(web): State<Arc<Web>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<Login>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(login)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"user\": ..., \"password\": ...}",
        );
    };
    let peer = peer(connect);
    let (user, password) = (login.user, login.password);
    let checked = {
        let web = web.clone();
        let user = user.clone();
        tokio::task::spawn_blocking(move || web.auth.check(&user, &password, peer)).await
    };
    match checked {
        Ok(Ok(())) => {
            tracing::info!(user = %user, %peer, "dashboard login");
            let (id, s) = web.auth.create(Some(user.clone()));
            (
                [(header::SET_COOKIE, set_cookie(&id, web.auth.lifetime))],
                Json(json!({"user": user, "csrf": s.csrf, "login_required": web.auth.login_required})),
            )
                .into_response()
        }
        Ok(Err(why)) => {
            tracing::warn!(%peer, "dashboard login refused: {why}");
            error(StatusCode::UNAUTHORIZED, "login refused")
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "login check failed"),
    }
}

/// `POST /ui/api/logout`.
pub async fn logout(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    web.auth.remove(&headers);
    (
        [(header::SET_COOKIE, set_cookie("", Duration::ZERO))],
        Json(json!({"logged_out": true})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }

    #[test]
    fn origin_must_match_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(same_origin(&h).is_err());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(same_origin(&h).is_err());
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h).is_ok());
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; mqic_session=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("xyz"));
    }
}
