//! The live-update hub: one task watches the store's event log (every case change writes an
//! event in the same transaction) and the broker, and broadcasts deltas to every
//! `/ui/events` stream:
//!
//! - `snapshot` (first on every stream, and after a stream fell behind): `{overview, cases}`;
//! - `cases`: `{rows: [case summary | {case_id, removed: true}]}` for the cases that changed;
//! - `activity`: `{events: [...]}`, the new case and step events;
//! - `overview`: the overview (with the queues and the connections and their rates), sent
//!   only when it differs from the last one sent.
//!
//! The page applies deltas to rows keyed by case id, so rows keep their place.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch, Notify};

use super::api::call;
use super::Web;
use crate::conductor::rpc::case_summary;
use crate::protocol::events::Subject;
use crate::protocol::rpc::Method;
use crate::protocol::CaseId;
use crate::store::records::{now_ms, CaseStatus};

/// How often the hub looks at the store's event log.
const TICK: Duration = Duration::from_millis(300);
/// How often the overview is recomputed (and sent if it changed).
const OVERVIEW_EVERY: Duration = Duration::from_secs(1);
/// How often a GPU sample is kept, and how many per GPU (30 minutes).
const GPU_SAMPLE_EVERY: Duration = Duration::from_secs(5);
const GPU_SAMPLES: usize = 360;
/// Throughput buckets: one per minute, for the last hour.
const THROUGHPUT_MINUTES: u64 = 60;
/// Events read from the store per look.
const EVENT_BATCH: usize = 2000;

/// One message for the streams: an SSE event name and its JSON data.
#[derive(Debug, Clone)]
pub struct Msg {
    pub event: &'static str,
    pub data: String,
}

#[derive(Default)]
struct State_ {
    last_seq: u64,
    /// minute -> (completed, failed)
    throughput: std::collections::BTreeMap<u64, (u64, u64)>,
    gpu_history: HashMap<String, VecDeque<Value>>,
    last_gpu_sample: Option<Instant>,
    /// Queue and connection counters, for their rates.
    rates: Rates,
    last_overview: String,
}

/// Per-second rates of monotonic counters (a queue's publishes, deliveries and acks, a
/// connection's bytes): the change between the last two looks at least [`RATE_MIN`] apart.
#[derive(Default)]
struct Rates {
    /// key -> (counter values, when read)
    last: HashMap<String, (Vec<u64>, Instant)>,
    rates: HashMap<String, Vec<f64>>,
}

/// The shortest interval a rate is computed over (looks closer together reuse the last).
const RATE_MIN: Duration = Duration::from_millis(500);

impl Rates {
    /// The rates of `values` (read `now`) under `key`; zeros on the first look.
    fn update(&mut self, key: String, now: Instant, values: &[u64]) -> Vec<f64> {
        let zero = || vec![0.0; values.len()];
        match self.last.get(&key) {
            Some((before, at)) if now.duration_since(*at) >= RATE_MIN => {
                let secs = now.duration_since(*at).as_secs_f64();
                let r: Vec<f64> = values
                    .iter()
                    .zip(before)
                    .map(|(v, b)| (v.saturating_sub(*b) as f64 / secs * 10.0).round() / 10.0)
                    .collect();
                self.rates.insert(key.clone(), r.clone());
                self.last.insert(key, (values.to_vec(), now));
                r
            }
            Some(_) => self.rates.get(&key).cloned().unwrap_or_else(zero),
            None => {
                self.last.insert(key, (values.to_vec(), now));
                zero()
            }
        }
    }

    /// Forgets the keys starting with `prefix` that are not in `seen` (deleted queues,
    /// closed connections).
    fn retain(&mut self, prefix: &str, seen: &BTreeSet<String>) {
        let keep = |k: &String| !k.starts_with(prefix) || seen.contains(k);
        self.last.retain(|k, _| keep(k));
        self.rates.retain(|k, _| keep(k));
    }
}

pub struct Hub {
    tx: broadcast::Sender<Arc<Msg>>,
    wake: Notify,
    closed: watch::Sender<bool>,
    state: Mutex<State_>,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub {
            tx: broadcast::channel(256).0,
            wake: Notify::new(),
            closed: watch::channel(false).0,
            state: Mutex::new(State_::default()),
        })
    }

    /// Makes the hub look now (after a Retry or Cancel from the page).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Turns true when the dashboard stops: streams end.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// A receiver of every message the hub sends (tests and streams).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Msg>> {
        self.tx.subscribe()
    }

    fn send(&self, event: &'static str, data: &Value) {
        let _ = self.tx.send(Arc::new(Msg {
            event,
            data: data.to_string(),
        }));
    }

    /// Watches the store and broker until `shutdown`; then ends every stream.
    pub async fn run(self: Arc<Self>, web: Arc<Web>, mut shutdown: watch::Receiver<bool>) {
        if let Err(e) = self.init(&web).await {
            tracing::warn!("dashboard: cannot read the event log: {e}");
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_overview = Instant::now() - OVERVIEW_EVERY;
        loop {
            let woken = tokio::select! {
                _ = tick.tick() => false,
                _ = self.wake.notified() => true,
                _ = shutdown.changed() => break,
            };
            if *shutdown.borrow() {
                break;
            }
            let changed = match self.case_deltas(&web).await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::debug!("dashboard: event log: {e}");
                    false
                }
            };
            // Nobody watching: only keep the GPU samples going.
            let watched = self.tx.receiver_count() > 0;
            let due = if watched {
                OVERVIEW_EVERY
            } else {
                GPU_SAMPLE_EVERY
            };
            if (watched && (changed || woken)) || last_overview.elapsed() >= due {
                last_overview = Instant::now();
                match self.overview(&web).await {
                    Ok(o) => {
                        // Ignore the clock field when deciding whether anything changed.
                        let mut key = o.clone();
                        key["now"] = Value::Null;
                        let key = key.to_string();
                        let fresh = {
                            let mut st = self.state.lock();
                            std::mem::replace(&mut st.last_overview, key.clone()) != key
                        };
                        if fresh {
                            self.send("overview", &o);
                        }
                    }
                    Err(e) => tracing::debug!("dashboard: overview: {e}"),
                }
            }
        }
        let _ = self.closed.send(true);
    }

    /// Starts after the newest event, and fills the throughput buckets from the store.
    async fn init(&self, web: &Arc<Web>) -> Result<(), String> {
        let store = web.conductor.store.clone();
        let (last, cases) = tokio::task::spawn_blocking(move || {
            let mut last = 0;
            loop {
                let batch = store.events_after(last, 10_000)?;
                match batch.last() {
                    Some((seq, _)) => last = *seq,
                    None => break,
                }
            }
            Ok::<_, crate::store::StoreError>((last, store.cases()?))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mut st = self.state.lock();
        st.last_seq = last;
        let since = now_ms().saturating_sub(THROUGHPUT_MINUTES * 60_000);
        for c in cases.iter().filter(|c| c.updated_ms >= since) {
            let b = st.throughput.entry(c.updated_ms / 60_000).or_default();
            match c.status {
                CaseStatus::Completed => b.0 += 1,
                CaseStatus::Failed => b.1 += 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// Sends the cases that changed since the last look; returns how many events were read.
    async fn case_deltas(&self, web: &Arc<Web>) -> Result<usize, String> {
        let after = self.state.lock().last_seq;
        let store = web.conductor.store.clone();
        let (events, rows, resync) = tokio::task::spawn_blocking(move || {
            let events = store.events_after(after, EVENT_BATCH)?;
            // The log is bounded: a gap means events were trimmed before we read them.
            let resync = after != 0 && events.first().is_some_and(|(seq, _)| *seq > after + 1);
            let ids: BTreeSet<CaseId> = events.iter().map(|(_, e)| e.case_id.clone()).collect();
            let mut rows = Vec::new();
            if !resync {
                for id in ids {
                    rows.push(match store.case(&id)? {
                        Some(c) => case_summary(&c),
                        None => json!({"case_id": id, "removed": true}),
                    });
                }
            }
            Ok::<_, crate::store::StoreError>((events, rows, resync))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let Some((last, _)) = events.last() else {
            return Ok(0);
        };
        {
            let mut st = self.state.lock();
            st.last_seq = *last;
            for (_, e) in &events {
                if e.subject != Subject::Case {
                    continue;
                }
                let minute = now_ms() / 60_000;
                let b = st.throughput.entry(minute).or_default();
                match e.event.as_str() {
                    "completed" => b.0 += 1,
                    "failed" => b.1 += 1,
                    _ => {}
                }
            }
            let oldest = (now_ms() / 60_000).saturating_sub(THROUGHPUT_MINUTES);
            st.throughput.retain(|m, _| *m > oldest);
        }
        if resync {
            let snapshot = self.snapshot(web).await?;
            self.send("snapshot", &snapshot);
        } else {
            self.send("cases", &json!({ "rows": rows }));
        }
        let activity: Vec<Value> = events
            .iter()
            .rev()
            .take(50)
            .rev()
            .map(|(seq, e)| json!({"seq": seq, "event": e}))
            .collect();
        self.send("activity", &json!({ "events": activity }));
        Ok(events.len())
    }

    /// Every queue of the dashboard's vhosts (exclusive reply queues left out), with publish,
    /// deliver (consumed and got) and ack rates from the last two looks.
    pub fn queues(&self, web: &Web) -> Value {
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut rows = Vec::new();
        let mut seen = BTreeSet::new();
        let mut exclusive = 0;
        for vhost in &web.vhosts {
            let Some(v) = web.broker.vhost(vhost) else {
                continue;
            };
            for q in v.all_queues() {
                if q.owner.is_some() {
                    exclusive += 1;
                    continue;
                }
                let (ready, unacked, bytes) = q.stats();
                let c = q.counters();
                let key = format!("q:{vhost}\u{0}{}", q.name());
                let r = st.rates.update(
                    key.clone(),
                    now,
                    &[c.published, c.delivered_total(), c.acked],
                );
                seen.insert(key);
                rows.push(json!({
                    "vhost": vhost, "name": q.name(), "durable": q.spec.durable,
                    "ready": ready, "unacked": unacked, "messages": ready + unacked,
                    "bytes": bytes, "consumers": q.consumer_count(),
                    "published": c.published, "delivered": c.delivered_total(), "acked": c.acked,
                    "publish_rate": r[0], "deliver_rate": r[1], "ack_rate": r[2],
                }));
            }
        }
        st.rates.retain("q:", &seen);
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        json!({ "queues": rows, "exclusive_hidden": exclusive })
    }

    /// The open AMQP connections on the dashboard's vhosts (network and mqic's own
    /// in-process ones), oldest first, with byte rates, and their channels.
    pub fn connections(&self, web: &Web) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        let state = match (web.broker.memory_alarm_on(), web.broker.disk_alarm_on()) {
            (false, false) => "running",
            _ => "blocking (alarm)",
        };
        let mut st = self.state.lock();
        let mut rows = Vec::new();
        let mut channels = Vec::new();
        let mut seen = BTreeSet::new();
        for c in web.broker.stats.connections() {
            if !web.vhosts.contains(&c.vhost) {
                continue;
            }
            let (recv, send) = (c.recv_oct.load(Relaxed), c.send_oct.load(Relaxed));
            let key = format!("c:{}", c.id);
            let r = st.rates.update(key.clone(), now, &[recv, send]);
            seen.insert(key);
            let props = crate::mgmt::json::table_to_json(&c.client_properties);
            let mut chans = c.channels();
            chans.sort_by_key(|ch| ch.id);
            let mut consumers = 0;
            for ch in &chans {
                let n = ch.consumers().len();
                consumers += n;
                channels.push(json!({
                    "connection_id": c.id, "connection": c.name, "number": ch.id,
                    "user": c.user, "vhost": c.vhost, "consumers": n,
                    "unacked": ch.unacked_count(), "prefetch": ch.global_prefetch(),
                }));
            }
            rows.push(json!({
                "id": c.id, "name": c.name, "type": if c.is_direct() { "direct" } else { "network" },
                "client": props.get("connection_name").or_else(|| props.get("product")),
                "user": c.user, "vhost": c.vhost, "state": state,
                "channels": chans.len(), "consumers": consumers,
                "connected_at": c.connected_at_ms, "heartbeat": c.heartbeat,
                "recv_oct": recv, "send_oct": send, "recv_rate": r[0], "send_rate": r[1],
            }));
        }
        st.rates.retain("c:", &seen);
        json!({ "connections": rows, "channels": channels })
    }

    /// Samples kept per GPU: `{t, leased, ...numeric fields of list_gpus}`.
    pub fn gpu_history(&self) -> Value {
        let st = self.state.lock();
        json!(st
            .gpu_history
            .iter()
            .map(|(k, v)| (k.clone(), Value::Array(v.iter().cloned().collect())))
            .collect::<serde_json::Map<_, _>>())
    }

    fn sample_gpus(&self, gpus: &Value) {
        let mut st = self.state.lock();
        if st
            .last_gpu_sample
            .is_some_and(|t| t.elapsed() < GPU_SAMPLE_EVERY)
        {
            return;
        }
        st.last_gpu_sample = Some(Instant::now());
        let t = now_ms();
        for g in gpus.as_array().into_iter().flatten() {
            let Some(key) = g["gpu"].as_str() else {
                continue;
            };
            let mut sample = json!({"t": t, "leased": u8::from(!g["leased_by"].is_null())});
            if let Some(fields) = g.as_object() {
                for (k, v) in fields {
                    if v.is_number() && k != "index" {
                        sample[k] = v.clone();
                    }
                }
            }
            let h = st.gpu_history.entry(key.to_string()).or_default();
            h.push_back(sample);
            while h.len() > GPU_SAMPLES {
                h.pop_front();
            }
        }
    }

    /// Health, cases by status, throughput, queues, GPUs, workers, connections.
    pub async fn overview(&self, web: &Arc<Web>) -> Result<Value, String> {
        let status = call(web, Method::GetStatus, Value::Null).await?;
        let gpus = call(web, Method::ListGpus, Value::Null).await?;
        let workers = call(web, Method::ListWorkers, Value::Null).await?;
        self.sample_gpus(&gpus);
        let queues = self.queues(web);
        let connection_list = self.connections(web);
        let minute = now_ms() / 60_000;
        let throughput: Vec<Value> = {
            let st = self.state.lock();
            (minute.saturating_sub(THROUGHPUT_MINUTES - 1)..=minute)
                .map(|m| {
                    let (c, f) = st.throughput.get(&m).copied().unwrap_or_default();
                    json!({"minute": m * 60_000, "completed": c, "failed": f})
                })
                .collect()
        };
        let alarm = match (web.broker.memory_alarm_on(), web.broker.disk_alarm_on()) {
            (false, false) => None,
            (true, false) => Some("memory alarm"),
            (false, true) => Some("disk alarm (low on disk)"),
            (true, true) => Some("memory and disk alarms"),
        };
        let dead: Vec<&Value> = workers
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["alive"] == json!(false) && w["status"] != json!("stopping"))
            .collect();
        let failed = status["cases"]["FAILED"].as_u64().unwrap_or(0);
        let (health, why) = if let Some(alarm) = alarm {
            ("error", format!("{alarm}: publishers are blocked"))
        } else if !dead.is_empty() {
            (
                "warning",
                format!("{} worker(s) stopped sending heartbeats", dead.len()),
            )
        } else if failed > 0 {
            ("warning", format!("{failed} failed case(s)"))
        } else {
            ("healthy", "all workers alive".to_string())
        };
        Ok(json!({
            "health": health, "health_detail": why, "status": status,
            "throughput": throughput, "queues": queues, "gpus": gpus, "workers": workers,
            "connections": web.broker.connections.load(std::sync::atomic::Ordering::Relaxed),
            "connection_list": connection_list,
            "memory_alarm": alarm, "now": now_ms(),
        }))
    }

    /// What a fresh stream starts from.
    pub async fn snapshot(&self, web: &Arc<Web>) -> Result<Value, String> {
        let overview = self.overview(web).await?;
        let cases = call(web, Method::ListCases, json!({"limit": 1000})).await?;
        Ok(json!({ "overview": overview, "cases": cases }))
    }
}

struct Stream_ {
    web: Arc<Web>,
    rx: broadcast::Receiver<Arc<Msg>>,
    closed: watch::Receiver<bool>,
    first: bool,
}

fn sse(event: &str, data: &str) -> SseEvent {
    SseEvent::default().event(event).data(data)
}

async fn snapshot_event(web: &Arc<Web>) -> SseEvent {
    match web.hub.snapshot(web).await {
        Ok(s) => sse("snapshot", &s.to_string()).retry(Duration::from_millis(1500)),
        Err(e) => sse("problem", &json!({ "error": e }).to_string()),
    }
}

/// `GET /ui/events`: the live stream.
pub async fn events(
    State(web): State<Arc<Web>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let state = Stream_ {
        rx: web.hub.subscribe(),
        closed: web.hub.closed.subscribe(),
        web,
        first: true,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.first {
            s.first = false;
            let e = snapshot_event(&s.web).await;
            return Some((Ok(e), s));
        }
        if *s.closed.borrow() {
            return None;
        }
        tokio::select! {
            r = s.rx.recv() => match r {
                Ok(m) => {
                    let e = sse(m.event, &m.data);
                    Some((Ok(e), s))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let e = snapshot_event(&s.web).await;
                    Some((Ok(e), s))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = s.closed.changed() => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}
