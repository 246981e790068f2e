//! The API's operations: declare and delete queues and exchanges, bind and unbind, purge,
//! publish, get, close a connection, export and import definitions, the aliveness test and
//! the health checks. Declares, publishes and gets go through an in-process connection
//! ([`LocalConnection`]) as the request's user, so they follow exactly the rules (and update
//! the same counters) an AMQP client meets.

use std::sync::Arc;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::FieldTable;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::api::{bindings_between, props_key_raw, url_exchange, visible_vhost};
use super::json::{
    encode_payload, json_to_properties, json_to_table, properties_to_json, table_to_json,
};
use super::{ApiError, ApiResult, AuthUser, Mgmt};
use crate::amqp::{LocalConnection, LocalEvent};

type M = State<Arc<Mgmt>>;
type U = Extension<AuthUser>;

/// A request body as a JSON object; an empty body is `{}`.
fn body_object(body: &Bytes) -> ApiResult<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// A boolean field; rabbitmqadmin sends `"true"`/`"false"` strings, which RabbitMQ accepts.
fn flag(m: &Map<String, Value>, key: &str, default: bool) -> ApiResult<bool> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be true or false, not {other}"
        ))),
    }
}

/// A non-negative integer field (a number or a numeric string).
fn count(m: &Map<String, Value>, key: &str, default: u64) -> ApiResult<u64> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().expect("checked")),
        Some(Value::String(s)) if s.parse::<u64>().is_ok() => Ok(s.parse().expect("checked")),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be a non-negative integer, not {other}"
        ))),
    }
}

fn text<'a>(m: &'a Map<String, Value>, key: &str, default: &'a str) -> ApiResult<&'a str> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key} must be a string, not {other}"
        ))),
    }
}

fn arguments(m: &Map<String, Value>) -> ApiResult<FieldTable> {
    json_to_table(m.get("arguments").unwrap_or(&Value::Null))
}

/// An in-process connection to `vhost` as the request's user (who needs access to it).
fn direct(m: &Mgmt, user: &AuthUser, vhost: &str) -> ApiResult<LocalConnection> {
    m.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    user.check_vhost(vhost)?;
    Ok(LocalConnection::open(&m.broker, vhost, &user.0.name)?)
}

fn created(new: bool) -> Response {
    if new {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

fn check_name(name: &str, what: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::bad_request(format!(
            "{what} names are 1 to 255 bytes"
        )));
    }
    Ok(())
}

/// Declares a queue from a management-API description; returns whether it was created.
pub fn declare_queue(
    m: &Mgmt,
    user: &AuthUser,
    vhost: &str,
    name: &str,
    body: &Map<String, Value>,
) -> ApiResult<bool> {
    check_name(name, "queue")?;
    if flag(body, "exclusive", false)? {
        return Err(ApiError::bad_request(
            "exclusive queues belong to an AMQP connection and cannot be declared over HTTP",
        ));
    }
    let durable = flag(body, "durable", true)?;
    let auto_delete = flag(body, "auto_delete", false)?;
    let args = arguments(body)?;
    let mut conn = direct(m, user, vhost)?;
    let existed = m.broker.vhost(vhost).and_then(|v| v.queue(name)).is_some();
    conn.channel()
        .queue_declare(name, durable, false, auto_delete, args)?;
    Ok(!existed)
}

/// Declares an exchange; returns whether it was created.
pub fn declare_exchange(
    m: &Mgmt,
    user: &AuthUser,
    vhost: &str,
    name: &str,
    body: &Map<String, Value>,
) -> ApiResult<bool> {
    check_name(name, "exchange")?;
    let kind = text(body, "type", "")?;
    if kind.is_empty() {
        return Err(ApiError::bad_request(
            "type is required (direct, fanout, topic or headers)",
        ));
    }
    let durable = flag(body, "durable", true)?;
    let auto_delete = flag(body, "auto_delete", false)?;
    let internal = flag(body, "internal", false)?;
    let args = arguments(body)?;
    let mut conn = direct(m, user, vhost)?;
    let existed = m
        .broker
        .vhost(vhost)
        .and_then(|v| v.exchange(name))
        .is_some();
    conn.channel()
        .exchange_declare(name, kind, durable, auto_delete, internal, args)?;
    Ok(!existed)
}

/// Binds `destination` (a queue for `kind` "q", an exchange for "e") to `source`.
pub fn bind(
    m: &Mgmt,
    user: &AuthUser,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
    body: &Map<String, Value>,
) -> ApiResult<String> {
    user.check_vhost(vhost)?;
    let v = m.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let routing_key = text(body, "routing_key", "")?.to_string();
    let args = arguments(body)?;
    let key = props_key_raw(&routing_key, &args);
    let connection = m.broker.next_connection_id();
    match kind {
        "q" => v.bind_queue(destination, source, &routing_key, args, connection)?,
        "e" => v.bind_exchange(destination, source, &routing_key, args)?,
        _ => return Err(ApiError::not_found()),
    }
    Ok(key)
}

#[derive(Debug, Default, Deserialize)]
pub struct DeleteQuery {
    #[serde(rename = "if-unused")]
    pub if_unused: Option<bool>,
    #[serde(rename = "if-empty")]
    pub if_empty: Option<bool>,
}

/// A vhost the user may change (403 otherwise), 404 when there is none.
fn user_vhost(
    m: &Mgmt,
    user: &AuthUser,
    vhost: &str,
) -> ApiResult<Arc<crate::amqp::broker::VHost>> {
    user.check_vhost(vhost)?;
    m.broker.vhost(vhost).ok_or_else(ApiError::not_found)
}

pub async fn put_queue(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let body = body_object(&body)?;
    Ok(created(declare_queue(&m, &user, &vhost, &name, &body)?))
}

pub async fn delete_queue(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    let v = user_vhost(&m, &user, &vhost)?;
    v.queue(&name).ok_or_else(ApiError::not_found)?;
    v.delete_queue(
        &name,
        m.broker.next_connection_id(),
        q.if_unused == Some(true),
        q.if_empty == Some(true),
    )?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/queues/{vhost}/{name}/contents`: purge.
pub async fn purge_queue(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let v = user_vhost(&m, &user, &vhost)?;
    let q = v.queue(&name).ok_or_else(ApiError::not_found)?;
    q.check_access(m.broker.next_connection_id())?;
    q.purge();
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put_exchange(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let body = body_object(&body)?;
    Ok(created(declare_exchange(&m, &user, &vhost, &name, &body)?))
}

pub async fn delete_exchange(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<StatusCode> {
    let v = user_vhost(&m, &user, &vhost)?;
    let name = url_exchange(&name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    v.delete_exchange(name, q.if_unused == Some(true))?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_bindings_between(
    State(m): M,
    Extension(user): U,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(&m, &user, &vhost)?;
    if kind != "q" && kind != "e" {
        return Err(ApiError::not_found());
    }
    Ok(Json(Value::Array(bindings_between(
        &v,
        url_exchange(&source),
        &kind,
        &destination,
    ))))
}

pub async fn post_binding(
    State(m): M,
    Extension(user): U,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let body = body_object(&body)?;
    let key = bind(&m, &user, &vhost, &source, &kind, &destination, &body)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, super::api::percent_encode(&key))],
    )
        .into_response())
}

fn find_binding(
    v: &crate::amqp::broker::VHost,
    source: &str,
    kind: &str,
    destination: &str,
    props: &str,
) -> ApiResult<Value> {
    bindings_between(v, source, kind, destination)
        .into_iter()
        .find(|b| {
            let args = json_to_table(&b["arguments"]).unwrap_or_default();
            props_key_raw(b["routing_key"].as_str().unwrap_or(""), &args) == props
        })
        .ok_or_else(ApiError::not_found)
}

pub async fn get_binding(
    State(m): M,
    Extension(user): U,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(&m, &user, &vhost)?;
    Ok(Json(find_binding(
        &v,
        url_exchange(&source),
        &kind,
        &destination,
        &props,
    )?))
}

pub async fn delete_binding(
    State(m): M,
    Extension(user): U,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let v = user_vhost(&m, &user, &vhost)?;
    let b = find_binding(&v, &source, &kind, &destination, &props)?;
    let rk = b["routing_key"].as_str().unwrap_or("");
    let args = json_to_table(&b["arguments"])?;
    match kind.as_str() {
        "q" => v.unbind_queue(
            &destination,
            &source,
            rk,
            args,
            m.broker.next_connection_id(),
        )?,
        _ => v.unbind_exchange(&destination, &source, rk, args)?,
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/exchanges/{vhost}/{name}/publish`: `{routing_key, payload, payload_encoding,
/// properties}` → `{"routed": bool}`.
pub async fn publish(
    State(m): M,
    Extension(user): U,
    Path((vhost, exchange)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let body = body_object(&body)?;
    let routing_key = text(&body, "routing_key", "")?;
    if routing_key.len() > 255 {
        return Err(ApiError::bad_request("routing_key is at most 255 bytes"));
    }
    let payload = match body.get("payload") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(ApiError::bad_request("payload (a string) is required")),
    };
    let payload = match text(&body, "payload_encoding", "string")? {
        "string" => payload.as_bytes().to_vec(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|e| ApiError::bad_request(format!("payload is not valid base64: {e}")))?,
        other => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding must be string or base64, not '{other}'"
            )))
        }
    };
    let max = m.broker.limits.max_message_size;
    if payload.len() > max {
        return Err(ApiError::bad_request(format!(
            "message size {} is larger than configured max size {max}",
            payload.len()
        )));
    }
    let properties = json_to_properties(body.get("properties").unwrap_or(&Value::Null))?;
    let routed = publish_one(
        &m,
        &user,
        &vhost,
        url_exchange(&exchange),
        routing_key,
        &properties,
        payload,
    )?;
    Ok(Json(json!({ "routed": routed })))
}

/// Publishes one message as `user`; true when some queue took it.
pub fn publish_one(
    m: &Mgmt,
    user: &AuthUser,
    vhost: &str,
    exchange: &str,
    routing_key: &str,
    properties: &AMQPProperties,
    body: Vec<u8>,
) -> ApiResult<bool> {
    let v = m.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    if !exchange.is_empty() && v.exchange(exchange).is_none() {
        return Err(ApiError::not_found());
    }
    let mut conn = direct(m, user, vhost)?;
    let mut ch = conn.channel();
    ch.publish(exchange, routing_key, true, properties, body)?;
    // A mandatory message nobody took comes back at once (routing is synchronous).
    while let Some(event) = ch.try_next_event() {
        if matches!(event, LocalEvent::Return { .. }) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `POST /api/queues/{vhost}/{name}/get`: `{count, ackmode, encoding, truncate}`.
pub async fn get_messages(
    State(m): M,
    Extension(user): U,
    Path((vhost, queue)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let body = body_object(&body)?;
    let n = count(&body, "count", 1)?.min(10_000);
    let ackmode = text(&body, "ackmode", "ack_requeue_true")?;
    let (requeue, reject) = match ackmode {
        "ack_requeue_true" => (true, false),
        "reject_requeue_true" => (true, true),
        "ack_requeue_false" => (false, false),
        "reject_requeue_false" => (false, true),
        other => {
            return Err(ApiError::bad_request(format!(
                "ackmode must be ack_requeue_true, ack_requeue_false, reject_requeue_true or reject_requeue_false, not '{other}'"
            )))
        }
    };
    let auto = match text(&body, "encoding", "auto")? {
        "auto" => true,
        "base64" => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "encoding must be auto or base64, not '{other}'"
            )))
        }
    };
    let truncate = match body.get("truncate") {
        None | Some(Value::Null) => None,
        _ => Some(count(&body, "truncate", 0)? as usize),
    };
    let v = m.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    v.queue(&queue).ok_or_else(ApiError::not_found)?;
    let mut conn = direct(&m, &user, &vhost)?;
    let mut ch = conn.channel();
    let mut out = Vec::new();
    let mut last_tag = None;
    for _ in 0..n {
        let Some(got) = ch.get(&queue, false)? else {
            break;
        };
        last_tag = Some(got.delivery_tag);
        let body = &got.message.body;
        let shown = match truncate {
            Some(t) if t < body.len() => &body[..t],
            _ => &body[..],
        };
        let (payload, encoding) = encode_payload(shown, auto);
        out.push(json!({
            "payload_bytes": body.len(),
            "redelivered": got.redelivered,
            "exchange": got.message.exchange,
            "routing_key": got.message.routing_key,
            "message_count": got.message_count,
            "properties": properties_to_json(&got.message.decoded_properties()),
            "payload": payload,
            "payload_encoding": encoding,
        }));
    }
    if let Some(tag) = last_tag {
        if reject || requeue {
            ch.nack(tag, true, requeue)?;
        } else {
            ch.ack(tag, true)?;
        }
    }
    Ok(Json(Value::Array(out)))
}

/// `DELETE /api/connections/{name}`: closes it with 320 CONNECTION_FORCED.
pub async fn close_connection(
    State(m): M,
    Extension(user): U,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let c = m
        .broker
        .stats
        .connections()
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(ApiError::not_found)?;
    if !(user.is_admin() || c.user == user.0.name) {
        return Err(ApiError::forbidden(
            "only administrators may close others' connections",
        ));
    }
    if c.is_direct() {
        return Err(ApiError::bad_request(
            "in-process connections belong to mqic itself and cannot be closed",
        ));
    }
    c.close_requested.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/definitions[/{vhost}]`: users, vhosts, permissions, queues, exchanges, bindings
/// (exclusive queues and the predeclared exchanges are left out, as in RabbitMQ).
pub fn export(m: &Mgmt, only: Option<&str>) -> Value {
    let vhosts: Vec<_> = m
        .broker
        .vhosts()
        .into_iter()
        .filter(|v| only.is_none_or(|o| o == v.name))
        .collect();
    let mut queues = Vec::new();
    let mut exchanges = Vec::new();
    let mut bindings = Vec::new();
    for v in &vhosts {
        let mut qs = v.all_queues();
        qs.sort_by(|a, b| a.name().cmp(b.name()));
        for q in qs.iter().filter(|q| !q.spec.exclusive) {
            queues.push(
                json!({"name": q.name(), "vhost": v.name, "durable": q.spec.durable,
                "auto_delete": q.spec.auto_delete, "arguments": table_to_json(&q.spec.arguments)}),
            );
        }
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.name().cmp(b.name()));
        for x in &xs {
            if !x.name().is_empty() && !x.name().starts_with("amq.") {
                exchanges.push(
                    json!({"name": x.name(), "vhost": v.name, "type": x.spec.kind.as_str(),
                    "durable": x.spec.durable, "auto_delete": x.spec.auto_delete,
                    "internal": x.spec.internal, "arguments": table_to_json(&x.spec.arguments)}),
                );
            }
        }
        let exported: Vec<&str> = queues.iter().filter_map(|q| q["name"].as_str()).collect();
        for b in super::api::vhost_bindings(v) {
            let to_exclusive = b["destination_type"] == "queue"
                && !exported.contains(&b["destination"].as_str().unwrap_or(""));
            if b["source"] != "" && !to_exclusive {
                bindings.push(json!({"source": b["source"], "vhost": b["vhost"],
                    "destination": b["destination"], "destination_type": b["destination_type"],
                    "routing_key": b["routing_key"], "arguments": b["arguments"]}));
            }
        }
    }
    let mut out = json!({
        "rabbit_version": super::RABBITMQ_COMPAT_VERSION,
        "rabbitmq_version": super::RABBITMQ_COMPAT_VERSION,
        "product_name": super::PRODUCT_NAME,
        "product_version": super::PRODUCT_VERSION,
        "parameters": [],
        "policies": [],
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    });
    if only.is_none() {
        let o = out.as_object_mut().expect("an object");
        o.insert("users".into(), Value::Array(m.broker.users.all().iter().map(|u| json!({
            "name": u.name, "password_hash": u.password_hash(),
            "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": u.tags, "limits": {},
        })).collect()));
        o.insert("vhosts".into(), Value::Array(vhosts.iter().map(|v| json!({
            "name": v.name, "limits": [], "metadata": {"description": "", "tags": []},
        })).collect()));
        o.insert(
            "permissions".into(),
            Value::Array(super::api::permissions_list(m)),
        );
        o.insert("topic_permissions".into(), json!([]));
        o.insert("global_parameters".into(), json!([]));
    }
    out
}

pub async fn get_definitions(State(m): M, Extension(user): U) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    Ok(Json(export(&m, None)))
}

pub async fn get_vhost_definitions(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    m.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    Ok(Json(export(&m, Some(&vhost))))
}

pub async fn post_definitions(
    State(m): M,
    Extension(user): U,
    body: Bytes,
) -> ApiResult<StatusCode> {
    user.check_admin()?;
    import(&m, &user, &body_object(&body)?, None)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn post_vhost_definitions(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    user.check_admin()?;
    m.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    import(&m, &user, &body_object(&body)?, Some(&vhost))?;
    Ok(StatusCode::NO_CONTENT)
}

fn items<'a>(defs: &'a Map<String, Value>, key: &str) -> ApiResult<Vec<&'a Map<String, Value>>> {
    match defs.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_object().ok_or_else(|| {
                    ApiError::bad_request(format!("{key}: every entry must be an object"))
                })
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be an array"))),
    }
}

/// Imports definitions: everything is checked first, then exchanges, queues and bindings
/// are declared (an existing, equivalent object is fine). Users and vhosts come from the
/// config file in mqic, so users and permissions must match configured ones; policies and
/// runtime parameters are refused (mqic has none). Global parameters (cluster name, ids)
/// are ignored.
pub fn import(
    m: &Mgmt,
    user: &AuthUser,
    defs: &Map<String, Value>,
    only: Option<&str>,
) -> ApiResult<()> {
    for key in ["policies", "parameters", "operator_policies"] {
        if !items(defs, key)?.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{key}: mqic has no policies or runtime parameters; remove them from the file"
            )));
        }
    }
    for u in items(defs, "users")? {
        let name = text(u, "name", "")?;
        if m.broker.users.get(name).is_none() {
            return Err(ApiError::bad_request(format!(
                "user '{name}' is not configured; mqic's users come from [[amqp.users]] in its config file"
            )));
        }
    }
    for v in items(defs, "vhosts")? {
        let name = text(v, "name", "")?;
        if m.broker.vhost(name).is_none() {
            return Err(ApiError::bad_request(format!(
                "vhost '{name}' does not exist; mqic's vhosts come from amqp.vhosts in its config file"
            )));
        }
    }
    let vhost_of = |x: &Map<String, Value>| -> ApiResult<String> {
        let v = match only {
            Some(v) => v.to_string(),
            None => text(x, "vhost", "")?.to_string(),
        };
        if m.broker.vhost(&v).is_none() {
            return Err(ApiError::bad_request(format!("vhost '{v}' does not exist")));
        }
        user.check_vhost(&v)?;
        Ok(v)
    };
    let exchanges = items(defs, "exchanges")?;
    let queues = items(defs, "queues")?;
    let bindings = items(defs, "bindings")?;
    for x in exchanges.iter().chain(&queues).chain(&bindings) {
        vhost_of(x)?;
        arguments(x)?;
    }
    for x in &exchanges {
        declare_exchange(m, user, &vhost_of(x)?, text(x, "name", "")?, x)?;
    }
    for q in &queues {
        declare_queue(m, user, &vhost_of(q)?, text(q, "name", "")?, q)?;
    }
    for b in &bindings {
        let kind = match text(b, "destination_type", "queue")? {
            "queue" => "q",
            "exchange" => "e",
            other => {
                return Err(ApiError::bad_request(format!(
                    "destination_type must be queue or exchange, not '{other}'"
                )))
            }
        };
        bind(
            m,
            user,
            &vhost_of(b)?,
            text(b, "source", "")?,
            kind,
            text(b, "destination", "")?,
            b,
        )?;
    }
    Ok(())
}

fn health_ok() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

fn health_failed(reason: impl Into<String>, extra: Value) -> Response {
    let mut body = json!({"status": "failed", "reason": reason.into()});
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// `/api/health/checks/alarms` and `local-alarms`: 503 while a memory or disk alarm is on.
pub async fn alarms(State(m): M, Extension(_user): U) -> Response {
    let mut on = Vec::new();
    if m.broker.memory_alarm_on() {
        on.push(json!({"node": m.node, "resource": "memory"}));
    }
    if m.broker.disk_alarm_on() {
        on.push(json!({"node": m.node, "resource": "disk"}));
    }
    if on.is_empty() {
        health_ok()
    } else {
        health_failed(
            "resource alarm(s) in effect in the cluster",
            json!({"alarms": on}),
        )
    }
}

/// Checks that always pass on a single running node (every vhost is up, nothing is
/// quorum- or mirror-critical, the node serves clients once it answers at all).
pub async fn always_ok(Extension(_user): U) -> Response {
    health_ok()
}

pub async fn port_listener(State(m): M, Extension(_user): U, Path(port): Path<String>) -> Response {
    let Ok(port) = port.parse::<u16>() else {
        return ApiError::bad_request(format!("'{port}' is not a port number")).into_response();
    };
    if m.listeners.iter().any(|l| l.addr.port() == port) {
        health_ok()
    } else {
        let ports: Vec<u16> = m.listeners.iter().map(|l| l.addr.port()).collect();
        health_failed(
            "No active listener",
            json!({"missing": port, "ports": ports}),
        )
    }
}

pub async fn protocol_listener(
    State(m): M,
    Extension(_user): U,
    Path(protocol): Path<String>,
) -> Response {
    let wanted = match protocol.as_str() {
        "amqp091" | "amqp0.9.1" | "amqp0-9-1" | "amqp" => "amqp",
        "amqps" | "amqp/ssl" => "amqp/ssl",
        "http" | "management" => "http",
        "prometheus" | "http/prometheus" => "http/prometheus",
        other => other,
    };
    if m.listeners.iter().any(|l| l.protocol == wanted) {
        health_ok()
    } else {
        let protocols: Vec<&str> = m.listeners.iter().map(|l| l.protocol).collect();
        health_failed(
            "No active listener",
            json!({"missing": protocol, "protocols": protocols}),
        )
    }
}

/// `/api/health/checks/virtual-hosts`: every configured vhost exists and accepts work.
pub async fn virtual_hosts(State(m): M, Extension(_user): U) -> Response {
    if m.broker.vhosts().is_empty() {
        health_failed("no virtual hosts", json!({}))
    } else {
        health_ok()
    }
}

/// `GET /api/aliveness-test/{vhost}`: declares `aliveness-test`, publishes a message to it
/// and gets it back, as RabbitMQ does.
pub async fn aliveness(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
) -> ApiResult<Response> {
    let mut conn = direct(&m, &user, &vhost)?;
    let mut ch = conn.channel();
    let mut probe = || -> Result<bool, crate::amqp::AmqpError> {
        ch.queue_declare("aliveness-test", false, false, false, FieldTable::default())?;
        ch.publish(
            "",
            "aliveness-test",
            false,
            &AMQPProperties::default(),
            b"test_message".to_vec(),
        )?;
        Ok(ch
            .get("aliveness-test", true)?
            .is_some_and(|g| &g.message.body[..] == b"test_message"))
    };
    Ok(match probe() {
        Ok(true) => health_ok(),
        Ok(false) => health_failed("the test message did not come back", json!({})),
        Err(e) => health_failed(e.text, json!({})),
    })
}
