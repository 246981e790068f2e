//! A small HTTP/1.1 client for the management API (what `mqic queues` uses): one GET with
//! basic auth, JSON back. Plain HTTP only; the API listens on loopback by default.

use anyhow::{bail, Context};
use axum::http::{header, Request};
use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::Value;

/// `GET {base}{path}` as `user`; the JSON body of a 2xx answer, else an error with the
/// API's reason.
pub async fn get_json(base: &str, path: &str, user: &str, password: &str) -> anyhow::Result<Value> {
    let authority = base
        .strip_prefix("http://")
        .with_context(|| format!("management URL '{base}' must start with http://"))?
        .trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        bail!("management URL '{base}' must be http://HOST:PORT");
    }
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot reach the management API at {base}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let request = Request::get(path)
        .header(header::HOST, authority)
        .header(header::AUTHORIZATION, format!("Basic {credentials}"))
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        let reason = json["reason"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{path}: HTTP {status}: {reason}");
    }
    if json.is_null() {
        bail!("{path}: the answer is not JSON");
    }
    Ok(json)
}
