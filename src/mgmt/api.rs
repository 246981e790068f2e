//! The read-only views: overview, nodes, queues, exchanges, bindings, connections, channels,
//! consumers, vhosts, users, permissions, whoami. Shapes follow RabbitMQ's management API
//! (field names and types clients deserialize); what mqic does not track is left out rather
//! than reported as a made-up value (see README, "Management API").

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::json::{list, table_to_json, ListQuery};
use super::rates::RateSet;
use super::{ApiError, ApiResult, AuthUser, Mgmt};
use crate::amqp::broker::VHost;
use crate::amqp::exchange::{Binding, Destination};
use crate::amqp::queue::Queue;
use crate::amqp::stats::{ConnectionInfo, Counters, QueueCounters};

type M = State<Arc<Mgmt>>;
type U = Extension<AuthUser>;
type Q = Query<ListQuery>;

/// `{"rate": r}`.
fn rate(r: f64) -> Value {
    json!({ "rate": r })
}

/// A queue's (or vhost's, or the broker's) `message_stats`.
pub fn message_stats(c: &QueueCounters, r: &RateSet) -> Value {
    json!({
        "publish": c.published, "publish_details": rate(r.publish),
        "deliver": c.delivered_ack, "deliver_details": rate(r.deliver),
        "deliver_no_ack": c.delivered_no_ack, "deliver_no_ack_details": rate(r.deliver_no_ack),
        "get": c.get_ack, "get_details": rate(r.get),
        "get_no_ack": c.get_no_ack, "get_no_ack_details": rate(r.get_no_ack),
        "deliver_get": c.delivered_total(), "deliver_get_details": rate(r.deliver_get),
        "ack": c.acked, "ack_details": rate(r.ack),
        "redeliver": c.redelivered, "redeliver_details": rate(r.redeliver),
    })
}

fn depth(ready: u64, unacked: u64, r: &RateSet) -> Value {
    json!({
        "messages": ready + unacked, "messages_details": rate(r.messages),
        "messages_ready": ready, "messages_ready_details": rate(r.messages_ready),
        "messages_unacknowledged": unacked,
        "messages_unacknowledged_details": rate(r.messages_unacknowledged),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(x), Value::Object(y)) = (a.as_object_mut(), b) {
        x.extend(y);
    }
    a
}

pub fn queue_json(m: &Mgmt, q: &Queue) -> Value {
    let (ready, unacked, ready_bytes) = q.stats();
    let consumers = q.consumers();
    let r = m.rates.queue(&q.vhost, q.name());
    let owner = q
        .owner
        .and_then(|id| m.broker.stats.connection(id))
        .map(|c| json!({"name": c.name, "peer_host": c.peer.map(|p| p.ip().to_string()), "peer_port": c.peer.map(|p| p.port())}));
    let base = json!({
        "name": q.name(),
        "vhost": q.vhost,
        "type": "classic",
        "durable": q.spec.durable,
        "auto_delete": q.spec.auto_delete,
        "exclusive": q.spec.exclusive,
        "arguments": table_to_json(&q.spec.arguments),
        "node": m.node,
        "state": "running",
        "policy": null,
        "effective_policy_definition": {},
        "consumers": consumers.len(),
        "exclusive_consumer_tag": consumers.iter().find(|c| c.exclusive).map(|c| c.tag.clone()),
        "single_active_consumer_tag": q.args.single_active_consumer
            .then(|| consumers.first().map(|c| c.tag.clone())).flatten(),
        "message_bytes": ready_bytes,
        "message_bytes_ready": ready_bytes,
        "message_stats": message_stats(&q.counters(), &r),
        "owner_pid_details": owner,
    });
    merge(base, depth(ready as u64, unacked as u64, &r))
}

pub fn exchange_json(vhost: &str, x: &crate::amqp::exchange::Exchange) -> Value {
    json!({
        "name": x.name(),
        "vhost": vhost,
        "type": x.spec.kind.as_str(),
        "durable": x.spec.durable,
        "auto_delete": x.spec.auto_delete,
        "internal": x.spec.internal,
        "arguments": table_to_json(&x.spec.arguments),
        "policy": null,
        "user_who_performed_action": "",
        "message_stats": {},
    })
}

/// Characters kept as they are in a properties key (RFC 3986 unreserved).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RabbitMQ's binding "properties key", decoded: the routing key (`~` when empty), plus
/// `~` and a hash of the arguments when there are any.
pub fn props_key_raw(routing_key: &str, arguments: &amq_protocol::types::FieldTable) -> String {
    if arguments.inner().is_empty() {
        return if routing_key.is_empty() {
            "~".into()
        } else {
            routing_key.to_string()
        };
    }
    let digest = Sha256::digest(table_to_json(arguments).to_string().as_bytes());
    use base64::Engine;
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..6]);
    format!("{routing_key}~{hash}")
}

/// A binding as JSON; `source` "" is the default exchange.
pub fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    let (kind, dest) = match &b.destination {
        Destination::Queue(q) => ("queue", q.to_string()),
        Destination::Exchange(x) => ("exchange", x.to_string()),
    };
    let raw = props_key_raw(&b.routing_key, &b.arguments);
    json!({
        "source": source,
        "vhost": vhost,
        "destination": dest,
        "destination_type": kind,
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": if raw == "~" { raw } else { percent_encode(&raw) },
    })
}

/// Every binding of a vhost, the default exchange's implicit ones first (as RabbitMQ).
pub fn vhost_bindings(v: &VHost) -> Vec<Value> {
    let mut queues: Vec<String> = v
        .all_queues()
        .iter()
        .map(|q| q.name().to_string())
        .collect();
    queues.sort();
    let mut out: Vec<Value> = queues
        .iter()
        .map(|q| {
            binding_json(
                &v.name,
                "",
                &Binding {
                    destination: Destination::Queue(q.as_str().into()),
                    routing_key: q.clone(),
                    arguments: Default::default(),
                },
            )
        })
        .collect();
    let mut exchanges = v.exchanges();
    exchanges.sort_by(|a, b| a.name().cmp(b.name()));
    for x in exchanges {
        for b in x.bindings() {
            out.push(binding_json(&v.name, x.name(), &b));
        }
    }
    out
}

fn peer_host(c: &ConnectionInfo) -> Value {
    json!(c.peer.map(|p| p.ip().to_string()))
}

/// `connection_details` of a channel or consumer. Clients (rabbitmqadmin v2) require a host
/// string and a port number here, so an in-process connection reports `""` and port 0.
fn connection_details(c: &ConnectionInfo) -> Value {
    json!({
        "name": c.name,
        "peer_host": c.peer.map(|p| p.ip().to_string()).unwrap_or_default(),
        "peer_port": c.peer.map_or(0, |p| p.port()),
    })
}

pub fn connection_json(m: &Mgmt, c: &ConnectionInfo) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let (recv, send) = m.rates.octets(c.id);
    let props = table_to_json(&c.client_properties);
    json!({
        "name": c.name,
        "node": m.node,
        "vhost": c.vhost,
        "user": c.user,
        "type": if c.is_direct() { "direct" } else { "network" },
        "protocol": if c.is_direct() { "Direct 0-9-1" } else { "AMQP 0-9-1" },
        "peer_host": peer_host(c),
        "peer_port": c.peer.map(|p| p.port()),
        "state": "running",
        "channels": c.channels().len(),
        "connected_at": c.connected_at_ms,
        "client_properties": props,
        "user_provided_name": props.get("connection_name"),
        "frame_max": c.frame_max,
        "channel_max": c.channel_max,
        "timeout": c.heartbeat,
        "recv_oct": c.recv_oct.load(Relaxed),
        "send_oct": c.send_oct.load(Relaxed),
        "recv_oct_details": rate(recv),
        "send_oct_details": rate(send),
    })
}

fn channel_name(c: &ConnectionInfo, number: u16) -> String {
    format!("{} ({number})", c.name)
}

fn channels_json(m: &Mgmt, user: &AuthUser) -> Vec<Value> {
    let mut out = Vec::new();
    for c in m.broker.stats.connections() {
        if !user.may_see(&c.vhost) {
            continue;
        }
        let mut chans = c.channels();
        chans.sort_by_key(|ch| ch.id);
        for ch in chans {
            out.push(json!({
                "name": channel_name(&c, ch.id),
                "number": ch.id,
                "node": m.node,
                "vhost": c.vhost,
                "user": c.user,
                "state": "running",
                "connection_details": connection_details(&c),
                "consumer_count": ch.consumers().len(),
                "messages_unacknowledged": ch.unacked_count(),
                "confirm": ch.confirm_mode(),
                "messages_unconfirmed": ch.unconfirmed(),
                "global_prefetch_count": ch.global_prefetch(),
                "prefetch_count": ch.global_prefetch(),
            }));
        }
    }
    out
}

fn consumers_json(m: &Mgmt, v: &VHost) -> Vec<Value> {
    let mut out = Vec::new();
    for q in v.all_queues() {
        for c in q.consumers() {
            let conn = m.broker.stats.connection(c.channel.connection);
            let details = conn.as_ref().map(|k| {
                let peer = connection_details(k);
                json!({
                    "name": channel_name(k, c.channel.id),
                    "number": c.channel.id,
                    "connection_name": k.name,
                    "peer_host": peer["peer_host"],
                    "peer_port": peer["peer_port"],
                    "user": k.user,
                    "node": m.node,
                })
            });
            out.push(json!({
                "consumer_tag": c.tag,
                "queue": {"name": q.name(), "vhost": v.name},
                "channel_details": details,
                "ack_required": !c.no_ack,
                "exclusive": c.exclusive,
                "prefetch_count": c.prefetch,
                "arguments": table_to_json(&c.arguments),
                "active": true,
                "activity_status": "up",
                "priority": c.priority,
                // mqic has no default consumer timeout: 0 here means none applies.
                "consumer_timeout": q.args.consumer_timeout.unwrap_or(0),
            }));
        }
    }
    out
}

/// The vhosts a user may see.
fn visible_vhosts(m: &Mgmt, user: &AuthUser) -> Vec<Arc<VHost>> {
    m.broker
        .vhosts()
        .into_iter()
        .filter(|v| user.may_see(&v.name))
        .collect()
}

/// One vhost the user may see, or 404/403.
pub fn visible_vhost(m: &Mgmt, user: &AuthUser, name: &str) -> ApiResult<Arc<VHost>> {
    let v = m.broker.vhost(name).ok_or_else(ApiError::not_found)?;
    if !user.may_see(name) {
        return Err(ApiError::forbidden(format!(
            "user '{}' has no access to vhost '{name}'",
            user.0.name
        )));
    }
    Ok(v)
}

fn vhost_json(m: &Mgmt, v: &VHost) -> Value {
    let (queues, totals) = v.queues_and_totals();
    let (mut ready, mut unacked) = (0u64, 0u64);
    for q in &queues {
        let (r, u, _) = q.stats();
        ready += r as u64;
        unacked += u as u64;
    }
    let r = m.rates.vhost(&v.name);
    let base = json!({
        "name": v.name,
        "description": "",
        "tags": [],
        "metadata": {"description": "", "tags": []},
        "default_queue_type": "classic",
        "tracing": false,
        "cluster_state": {m.node.clone(): "running"},
        "message_stats": message_stats(&totals, &r),
    });
    merge(base, depth(ready, unacked, &r))
}

fn exchange_types() -> Value {
    json!([
        {"name": "direct", "description": "AMQP direct exchange, as per the AMQP specification", "enabled": true},
        {"name": "fanout", "description": "AMQP fanout exchange, as per the AMQP specification", "enabled": true},
        {"name": "headers", "description": "AMQP headers exchange, as per the AMQP specification", "enabled": true},
        {"name": "topic", "description": "AMQP topic exchange, as per the AMQP specification", "enabled": true},
    ])
}

fn listeners_json(m: &Mgmt) -> Value {
    Value::Array(
        m.listeners
            .iter()
            .map(|l| {
                json!({"node": m.node, "protocol": l.protocol, "ip_address": l.addr.ip().to_string(),
                       "port": l.addr.port(), "socket_opts": {}})
            })
            .collect(),
    )
}

fn contexts_json(m: &Mgmt) -> Value {
    Value::Array(
        m.listeners
            .iter()
            .filter(|l| l.protocol.starts_with("http"))
            .map(|l| {
                let description = if l.protocol == "http" {
                    "RabbitMQ Management"
                } else {
                    "RabbitMQ Prometheus"
                };
                json!({"node": m.node, "description": description, "path": "/",
                       "ip": l.addr.ip().to_string(), "port": l.addr.port().to_string()})
            })
            .collect(),
    )
}

/// `GET /api/overview`: every field rabbitmqadmin v2 deserializes, plus Telegraf's.
pub async fn overview(State(m): M, Extension(user): U) -> Json<Value> {
    let vhosts = visible_vhosts(&m, &user);
    let mut totals = QueueCounters::default();
    let (mut ready, mut unacked, mut queues, mut exchanges, mut consumers) = (0u64, 0u64, 0, 0, 0);
    for v in &vhosts {
        let (qs, t) = v.queues_and_totals();
        totals += t;
        queues += qs.len();
        exchanges += v.exchanges().len();
        for q in &qs {
            let (r, u, _) = q.stats();
            ready += r as u64;
            unacked += u as u64;
            consumers += q.consumer_count() as usize;
        }
    }
    let connections = m.broker.stats.connections();
    let channels: usize = connections.iter().map(|c| c.channels().len()).sum();
    let k = &m.broker.stats.counters;
    let r = m.rates.broker();
    let stats = merge(
        message_stats(&totals, &r),
        json!({
            "drop_unroutable": Counters::get(&k.unroutable_dropped),
            "return_unroutable": Counters::get(&k.unroutable_returned),
        }),
    );
    Json(json!({
        "management_version": super::RABBITMQ_COMPAT_VERSION,
        "rates_mode": "basic",
        "exchange_types": exchange_types(),
        "product_name": super::PRODUCT_NAME,
        "product_version": super::PRODUCT_VERSION,
        "rabbitmq_version": super::RABBITMQ_COMPAT_VERSION,
        "erlang_version": "n/a",
        "erlang_full_version": format!("n/a (mqic {} is written in Rust)", super::PRODUCT_VERSION),
        "cluster_name": m.node,
        "node": m.node,
        "disable_stats": false,
        "enable_queue_totals": true,
        "statistics_db_event_queue": 0,
        "churn_rates": {
            "connection_created": Counters::get(&k.connections_opened),
            "connection_closed": Counters::get(&k.connections_closed),
            "channel_created": Counters::get(&k.channels_opened),
            "channel_closed": Counters::get(&k.channels_closed),
            "queue_declared": Counters::get(&k.queues_declared),
            "queue_created": Counters::get(&k.queues_created),
            "queue_deleted": totals.deleted_queues,
        },
        "queue_totals": depth(ready, unacked, &r),
        "object_totals": {
            "connections": connections.len(),
            "channels": channels,
            "exchanges": exchanges,
            "queues": queues,
            "consumers": consumers,
        },
        "message_stats": stats,
        "listeners": listeners_json(&m),
        "contexts": contexts_json(&m),
    }))
}

/// Open file descriptors and their limit.
pub fn fds() -> (u64, u64) {
    let used = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    let total = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    };
    (used, total)
}

fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn node_json(m: &Mgmt) -> Value {
    let (fd_used, fd_total) = fds();
    let threads_max: u64 = std::fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    json!({
        "name": m.node,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "os_pid": std::process::id().to_string(),
        "uptime": m.started.elapsed().as_millis() as u64,
        "processors": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_used": crate::memory::resident_bytes().unwrap_or(0),
        "mem_limit": m.memory.as_ref().map(|w| w.limit()).unwrap_or(0),
        "mem_alarm": m.broker.memory_alarm_on(),
        "disk_free": crate::disk::free_bytes(&m.data_dir).unwrap_or(0),
        "disk_free_limit": m.disk.as_ref().map_or(0, |d| d.limit()),
        "disk_free_alarm": m.broker.disk_alarm_on(),
        "fd_used": fd_used,
        "fd_total": fd_total,
        "sockets_used": m.broker.connections.load(std::sync::atomic::Ordering::Relaxed),
        "sockets_total": m.broker.limits.max_connections,
        "proc_used": threads(),
        "proc_total": threads_max,
        "run_queue": 0,
        "rates_mode": "basic",
        "enabled_plugins": [],
        "partitions": [],
        "exchange_types": exchange_types(),
        "auth_mechanisms": [
            {"name": "PLAIN", "description": "SASL PLAIN authentication mechanism", "enabled": true},
            {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": true},
        ],
        "applications": [{"name": "mqic", "description": "MQI Communicator", "version": super::PRODUCT_VERSION}],
        "contexts": contexts_json(m),
        "listeners": listeners_json(m),
    })
}

pub async fn nodes(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    user.check_monitoring()?;
    Ok(Json(list(vec![node_json(&m)], &q)?))
}

pub async fn node(
    State(m): M,
    Extension(user): U,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    user.check_monitoring()?;
    if name != m.node {
        return Err(ApiError::not_found());
    }
    Ok(Json(node_json(&m)))
}

/// A list over every vhost the user may see (`vhost` None) or over one (`/api/X/VHOST`):
/// `items` gives one vhost's objects.
fn list_vhosts(
    m: &Mgmt,
    user: &AuthUser,
    vhost: Option<&str>,
    q: &ListQuery,
    items: impl Fn(&Arc<VHost>) -> Vec<Value>,
) -> ApiResult<Json<Value>> {
    let vhosts = match vhost {
        Some(name) => vec![visible_vhost(m, user, name)?],
        None => visible_vhosts(m, user),
    };
    Ok(Json(list(vhosts.iter().flat_map(items).collect(), q)?))
}

fn sorted_queues(m: &Mgmt, v: &VHost) -> Vec<Value> {
    let mut qs = v.all_queues();
    qs.sort_by(|a, b| a.name().cmp(b.name()));
    qs.iter().map(|x| queue_json(m, x)).collect()
}

pub async fn queues(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, None, &q, |v| sorted_queues(&m, v))
}

pub async fn queues_in(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, Some(&vhost), &q, |v| sorted_queues(&m, v))
}

pub async fn queue(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(&m, &user, &vhost)?;
    let q = v.queue(&name).ok_or_else(ApiError::not_found)?;
    Ok(Json(queue_json(&m, &q)))
}

pub async fn queue_bindings(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(&m, &user, &vhost)?;
    v.queue(&name).ok_or_else(ApiError::not_found)?;
    let items = vhost_bindings(&v)
        .into_iter()
        .filter(|b| b["destination_type"] == "queue" && b["destination"] == name.as_str())
        .collect();
    Ok(Json(list(items, &q)?))
}

fn sorted_exchanges(v: &VHost) -> Vec<Value> {
    let mut xs = v.exchanges();
    xs.sort_by(|a, b| a.name().cmp(b.name()));
    xs.iter().map(|x| exchange_json(&v.name, x)).collect()
}

pub async fn exchanges(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, None, &q, |v| sorted_exchanges(v))
}

pub async fn exchanges_in(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, Some(&vhost), &q, |v| sorted_exchanges(v))
}

/// The exchange a URL names: `amq.default` is the default exchange "".
pub fn url_exchange(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

pub async fn exchange(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(&m, &user, &vhost)?;
    let x = v
        .exchange(url_exchange(&name))
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(exchange_json(&v.name, &x)))
}

pub async fn exchange_bindings_source(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    exchange_bindings(&m, &user, &vhost, &name, "source", &q)
}

pub async fn exchange_bindings_destination(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    exchange_bindings(&m, &user, &vhost, &name, "destination", &q)
}

fn exchange_bindings(
    m: &Mgmt,
    user: &AuthUser,
    vhost: &str,
    name: &str,
    side: &str,
    q: &ListQuery,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(m, user, vhost)?;
    let name = url_exchange(name);
    v.exchange(name).ok_or_else(ApiError::not_found)?;
    let items = vhost_bindings(&v)
        .into_iter()
        .filter(|b| b[side] == name && (side == "source" || b["destination_type"] == "exchange"))
        .collect();
    Ok(Json(list(items, q)?))
}

pub async fn bindings(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, None, &q, |v| vhost_bindings(v))
}

pub async fn bindings_in(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, Some(&vhost), &q, |v| vhost_bindings(v))
}

/// The bindings between one source and one destination (`kind` "q" or "e").
pub fn bindings_between(v: &VHost, source: &str, kind: &str, destination: &str) -> Vec<Value> {
    let kind = if kind == "q" { "queue" } else { "exchange" };
    vhost_bindings(v)
        .into_iter()
        .filter(|b| {
            b["source"] == source
                && b["destination_type"] == kind
                && b["destination"] == destination
        })
        .collect()
}

pub async fn connections(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    let items = m
        .broker
        .stats
        .connections()
        .iter()
        .filter(|c| user.may_see(&c.vhost))
        .map(|c| connection_json(&m, c))
        .collect();
    Ok(Json(list(items, &q)?))
}

pub async fn connection(
    State(m): M,
    Extension(user): U,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = m
        .broker
        .stats
        .connections()
        .into_iter()
        .find(|c| c.name == name && user.may_see(&c.vhost))
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(connection_json(&m, &c)))
}

pub async fn channels(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    Ok(Json(list(channels_json(&m, &user), &q)?))
}

pub async fn consumers(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, None, &q, |v| consumers_json(&m, v))
}

pub async fn consumers_in(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    list_vhosts(&m, &user, Some(&vhost), &q, |v| consumers_json(&m, v))
}

pub async fn vhosts(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    let items = visible_vhosts(&m, &user)
        .iter()
        .map(|v| vhost_json(&m, v))
        .collect();
    Ok(Json(list(items, &q)?))
}

pub async fn vhost(
    State(m): M,
    Extension(user): U,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let v = visible_vhost(&m, &user, &name)?;
    Ok(Json(vhost_json(&m, &v)))
}

fn user_json(u: &crate::amqp::auth::User) -> Value {
    json!({"name": u.name, "tags": u.tags, "limits": {}})
}

pub async fn users(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    let items = m.broker.users.all().iter().map(|u| user_json(u)).collect();
    Ok(Json(list(items, &q)?))
}

pub async fn user(
    State(m): M,
    Extension(me): U,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    me.check_admin()?;
    let u = m.broker.users.get(&name).ok_or_else(ApiError::not_found)?;
    Ok(Json(user_json(u)))
}

pub async fn whoami(Extension(user): U) -> Json<Value> {
    Json(json!({"name": user.0.name, "tags": user.0.tags, "is_internal_user": true}))
}

/// Permissions, derived from each user's vhosts (mqic grants a vhost whole or not at all).
pub fn permissions_list(m: &Mgmt) -> Vec<Value> {
    let vhosts: Vec<String> = m.broker.vhosts().iter().map(|v| v.name.clone()).collect();
    let mut out = Vec::new();
    for u in m.broker.users.all() {
        for v in &vhosts {
            if u.may_open(v) {
                out.push(json!({"user": u.name, "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}));
            }
        }
    }
    out
}

pub async fn permissions(State(m): M, Extension(user): U, Query(q): Q) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    Ok(Json(list(permissions_list(&m), &q)?))
}

pub async fn permission(
    State(m): M,
    Extension(user): U,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    permissions_list(&m)
        .into_iter()
        .find(|p| p["vhost"] == vhost.as_str() && p["user"] == name.as_str())
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

pub async fn user_permissions(
    State(m): M,
    Extension(user): U,
    Path(name): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    m.broker.users.get(&name).ok_or_else(ApiError::not_found)?;
    let items = permissions_list(&m)
        .into_iter()
        .filter(|p| p["user"] == name.as_str())
        .collect();
    Ok(Json(list(items, &q)?))
}

pub async fn vhost_permissions(
    State(m): M,
    Extension(user): U,
    Path(vhost): Path<String>,
    Query(q): Q,
) -> ApiResult<Json<Value>> {
    user.check_admin()?;
    m.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let items = permissions_list(&m)
        .into_iter()
        .filter(|p| p["vhost"] == vhost.as_str())
        .collect();
    Ok(Json(list(items, &q)?))
}

/// Lists mqic has nothing in (policies, parameters, limits, ...): an empty array, so the
/// tools that list them work.
pub async fn empty_list(Extension(_user): U) -> Json<Value> {
    Json(json!([]))
}

pub async fn cluster_name(State(m): M, Extension(_user): U) -> Json<Value> {
    Json(json!({"name": m.node}))
}
