//! Message rates, as the management API shows them (`*_details: {rate}`): the counters are
//! sampled every [`INTERVAL`] and each rate is the change over the last interval, per second.
//! Before the first two samples every rate is 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::Mgmt;
use crate::amqp::stats::QueueCounters;

pub const INTERVAL: Duration = Duration::from_secs(5);

/// One sample of a queue (or a vhost, or the whole broker).
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    pub counters: QueueCounters,
    pub ready: u64,
    pub unacked: u64,
}

/// Per-second rates of the counters and depths.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RateSet {
    pub publish: f64,
    pub deliver: f64,
    pub deliver_no_ack: f64,
    pub get: f64,
    pub get_no_ack: f64,
    pub deliver_get: f64,
    pub ack: f64,
    pub redeliver: f64,
    pub messages: f64,
    pub messages_ready: f64,
    pub messages_unacknowledged: f64,
}

impl RateSet {
    fn between(old: &Sample, new: &Sample, secs: f64) -> RateSet {
        let d = |a: u64, b: u64| (b as f64 - a as f64) / secs;
        let (o, n) = (&old.counters, &new.counters);
        RateSet {
            publish: d(o.published, n.published),
            deliver: d(o.delivered_ack, n.delivered_ack),
            deliver_no_ack: d(o.delivered_no_ack, n.delivered_no_ack),
            get: d(o.get_ack, n.get_ack),
            get_no_ack: d(o.get_no_ack, n.get_no_ack),
            deliver_get: d(o.delivered_total(), n.delivered_total()),
            ack: d(o.acked, n.acked),
            redeliver: d(o.redelivered, n.redelivered),
            messages: d(old.ready + old.unacked, new.ready + new.unacked),
            messages_ready: d(old.ready, new.ready),
            messages_unacknowledged: d(old.unacked, new.unacked),
        }
    }
}

/// Object keys: `("", "")` for the broker, `(vhost, "")` for a vhost, `(vhost, queue)`.
type Key = (String, String);

#[derive(Debug, Default)]
struct State {
    last: Option<(Instant, HashMap<Key, Sample>)>,
    rates: HashMap<Key, RateSet>,
    /// Connection bytes: id -> (recv, send) and their rates.
    last_octets: HashMap<u64, (u64, u64)>,
    octet_rates: HashMap<u64, (f64, f64)>,
}

/// The latest rates.
#[derive(Debug, Default)]
pub struct Rates {
    state: Mutex<State>,
}

impl Rates {
    pub fn queue(&self, vhost: &str, queue: &str) -> RateSet {
        self.get(vhost, queue)
    }

    pub fn vhost(&self, vhost: &str) -> RateSet {
        self.get(vhost, "")
    }

    pub fn broker(&self) -> RateSet {
        self.get("", "")
    }

    /// (recv, send) bytes per second of a connection.
    pub fn octets(&self, connection: u64) -> (f64, f64) {
        self.state
            .lock()
            .octet_rates
            .get(&connection)
            .copied()
            .unwrap_or_default()
    }

    fn get(&self, vhost: &str, queue: &str) -> RateSet {
        self.state
            .lock()
            .rates
            .get(&(vhost.to_string(), queue.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// Takes one sample of every queue, vhost and the broker, and updates the rates.
    pub fn sample(&self, m: &Mgmt) {
        let now = Instant::now();
        let mut samples: HashMap<Key, Sample> = HashMap::new();
        let mut broker = Sample::default();
        for vhost in m.broker.vhosts() {
            let (queues, totals) = vhost.queues_and_totals();
            let mut vs = Sample {
                counters: totals,
                ..Sample::default()
            };
            for q in queues {
                let (ready, unacked, _) = q.stats();
                let s = Sample {
                    counters: q.counters(),
                    ready: ready as u64,
                    unacked: unacked as u64,
                };
                vs.ready += s.ready;
                vs.unacked += s.unacked;
                samples.insert((vhost.name.clone(), q.name().to_string()), s);
            }
            broker.counters += vs.counters;
            broker.ready += vs.ready;
            broker.unacked += vs.unacked;
            samples.insert((vhost.name.clone(), String::new()), vs);
        }
        samples.insert((String::new(), String::new()), broker);
        let octets: HashMap<u64, (u64, u64)> = m
            .broker
            .stats
            .connections()
            .iter()
            .map(|c| {
                use std::sync::atomic::Ordering::Relaxed;
                (c.id, (c.recv_oct.load(Relaxed), c.send_oct.load(Relaxed)))
            })
            .collect();
        let mut st = self.state.lock();
        if let Some((then, old)) = &st.last {
            let secs = now.duration_since(*then).as_secs_f64().max(0.001);
            st.rates = samples
                .iter()
                .filter_map(|(k, s)| {
                    old.get(k)
                        .map(|o| (k.clone(), RateSet::between(o, s, secs)))
                })
                .collect();
            st.octet_rates = octets
                .iter()
                .filter_map(|(id, (r, s))| {
                    st.last_octets.get(id).map(|(or, os)| {
                        (
                            *id,
                            (
                                r.saturating_sub(*or) as f64 / secs,
                                s.saturating_sub(*os) as f64 / secs,
                            ),
                        )
                    })
                })
                .collect();
        }
        st.last = Some((now, samples));
        st.last_octets = octets;
    }
}

/// Samples every [`INTERVAL`] until shutdown.
pub async fn run(m: Arc<Mgmt>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => m.rates.sample(&m),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
