//! Dead-lettering, as RabbitMQ 3.x does it: a message rejected without requeue, or dropped
//! or refused by a length limit, is republished to the queue's `x-dead-letter-exchange`
//! (with `x-dead-letter-routing-key` or its own routing key) carrying an `x-death` history:
//! one entry per (queue, reason), newest first, with `count`, `reason`, `queue`, `time`,
//! `exchange` and `routing-keys`, plus `x-first-death-*` (set once) and `x-last-death-*`.
//! A missing dead-letter exchange drops the message, and so does a cycle that involves no
//! rejection (the message would go round for ever).

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

use super::broker::VHost;
use amq_protocol::protocol::basic::AMQPProperties;

use super::message::{decode_properties, Message};
use super::queue::{Enqueued, Queue};

/// Why a message was dead-lettered (the `reason` in `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    /// `basic.reject` or `basic.nack` with requeue=false.
    Rejected,
    /// A length limit dropped or refused it.
    Maxlen,
    /// Its TTL (`x-message-ttl` or `expiration`) passed.
    Expired,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Maxlen => "maxlen",
            DeathReason::Expired => "expired",
        }
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn text_of(v: Option<&AMQPValue>) -> Option<String> {
    match v {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The headers after one more death in `queue`, or `None` when the message must be dropped
/// because it is going round a cycle with no rejection in it.
fn with_death(
    headers: &FieldTable,
    message: &Message,
    queue: &str,
    reason: DeathReason,
    now_secs: u64,
    original_expiration: Option<&str>,
) -> Option<FieldTable> {
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let entry_of = |v: &AMQPValue| match v {
        AMQPValue::FieldTable(t) => Some((
            text_of(t.inner().get("queue")).unwrap_or_default(),
            text_of(t.inner().get("reason")).unwrap_or_default(),
        )),
        _ => None,
    };
    if reason != DeathReason::Rejected {
        let seen_here = deaths.iter().filter_map(entry_of).any(|(q, _)| q == queue);
        let any_rejection = deaths
            .iter()
            .filter_map(entry_of)
            .any(|(_, r)| r == DeathReason::Rejected.as_str());
        if seen_here && !any_rejection {
            return None;
        }
    }
    let existing = deaths
        .iter()
        .position(|v| entry_of(v).is_some_and(|(q, r)| q == queue && r == reason.as_str()));
    let entry = match existing {
        Some(i) => {
            let AMQPValue::FieldTable(mut t) = deaths.remove(i) else {
                unreachable!("entry_of matched a table")
            };
            let count = match t.inner().get("count") {
                Some(AMQPValue::LongLongInt(n)) => *n,
                Some(AMQPValue::LongInt(n)) => (*n).into(),
                _ => 0,
            };
            t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            t.insert("time".into(), AMQPValue::Timestamp(now_secs));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), long(reason.as_str()));
            t.insert("queue".into(), long(queue));
            t.insert("time".into(), AMQPValue::Timestamp(now_secs));
            t.insert("exchange".into(), long(&message.exchange));
            t.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![long(&message.routing_key)])),
            );
            if let Some(e) = original_expiration {
                t.insert("original-expiration".into(), long(e));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    let mut out = headers.clone();
    out.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !out.inner().contains_key("x-first-death-reason") {
        out.insert("x-first-death-reason".into(), long(reason.as_str()));
        out.insert("x-first-death-queue".into(), long(queue));
        out.insert("x-first-death-exchange".into(), long(&message.exchange));
    }
    out.insert("x-last-death-reason".into(), long(reason.as_str()));
    out.insert("x-last-death-queue".into(), long(queue));
    out.insert("x-last-death-exchange".into(), long(&message.exchange));
    Some(out)
}

/// The same properties without `expiration`.
fn without_expiration(p: &AMQPProperties) -> AMQPProperties {
    let mut out = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

impl VHost {
    /// Deletes queues unused past their `x-expires`, and dead-letters (or drops) what
    /// expired at the head of every other queue. Called by the broker's sweeper, so TTLs act
    /// even on queues nobody reads.
    pub fn sweep_expired(&self) {
        let now = std::time::Instant::now();
        for queue in self.all_queues() {
            if queue.unused_expired(now) {
                // `x-expires`: an unused queue is deleted with its messages, which are not
                // dead-lettered (RabbitMQ drops them too). Exclusive ones as their owner.
                tracing::debug!(queue = queue.name(), vhost = %self.name, "queue expired (x-expires)");
                let owner = queue.owner.unwrap_or_default();
                let _ = self.delete_queue(queue.name(), owner, false, false);
                continue;
            }
            let expired = queue.take_expired();
            if !expired.is_empty() {
                self.dead_letter(&queue, expired, DeathReason::Expired);
            }
        }
    }

    /// Dead-letters `messages` that left `queue` for `reason`, if the queue has a
    /// dead-letter exchange; otherwise (or when it does not exist) they are dropped.
    pub fn dead_letter(&self, queue: &Queue, messages: Vec<Arc<Message>>, reason: DeathReason) {
        let Some(dlx) = queue.args.dead_letter_exchange.as_deref() else {
            return;
        };
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for message in messages {
            let Ok(props) = decode_properties(&message.properties) else {
                continue;
            };
            let headers = props.headers().clone().unwrap_or_default();
            // The per-message TTL does not follow the message: it is kept in x-death.
            let original_expiration = props.expiration().as_ref().map(|e| e.as_str().to_string());
            let Some(headers) = with_death(
                &headers,
                &message,
                queue.name(),
                reason,
                now_secs,
                original_expiration.as_deref(),
            ) else {
                tracing::debug!(
                    queue = queue.name(),
                    "dead-letter cycle without rejection; message dropped"
                );
                continue;
            };
            let routing_key = queue
                .args
                .dead_letter_routing_key
                .clone()
                .unwrap_or_else(|| message.routing_key.clone());
            let props = without_expiration(&props).with_headers(headers.clone());
            let dead = Arc::new(Message::from_properties(
                dlx.to_string(),
                routing_key.clone(),
                &props,
                message.body.clone(),
            ));
            let Ok(targets) = self.route(dlx, &routing_key, Some(&headers)) else {
                continue; // the dead-letter exchange does not exist: dropped, as RabbitMQ does
            };
            for target in targets {
                self.enqueue_dead(&target, dead.clone());
            }
        }
    }

    /// Enqueues a dead-lettered message, dead-lettering in turn what the target's own
    /// length limit drops or refuses.
    fn enqueue_dead(&self, target: &Arc<Queue>, message: Arc<Message>) {
        match target.publish(message.clone()) {
            Enqueued::Accepted { dropped } => {
                if !dropped.is_empty() {
                    self.dead_letter(target, dropped, DeathReason::Maxlen);
                }
            }
            Enqueued::Rejected { dead_letter: true } => {
                self.dead_letter(target, vec![message], DeathReason::Maxlen)
            }
            Enqueued::Rejected { .. } | Enqueued::Gone => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message() -> Message {
        Message::from_properties(
            "ex".into(),
            "rk".into(),
            &amq_protocol::protocol::basic::AMQPProperties::default(),
            Bytes::from_static(b"x"),
        )
    }

    fn deaths(h: &FieldTable) -> Vec<(String, String, i64)> {
        let Some(AMQPValue::FieldArray(a)) = h.inner().get("x-death") else {
            return Vec::new();
        };
        a.as_slice()
            .iter()
            .map(|v| {
                let AMQPValue::FieldTable(t) = v else {
                    panic!()
                };
                let AMQPValue::LongLongInt(n) = t.inner()["count"] else {
                    panic!()
                };
                (
                    text_of(t.inner().get("queue")).unwrap(),
                    text_of(t.inner().get("reason")).unwrap(),
                    n,
                )
            })
            .collect()
    }

    #[test]
    fn entries_are_per_queue_and_reason_newest_first_with_counts() {
        let m = message();
        let h = with_death(
            &FieldTable::default(),
            &m,
            "a",
            DeathReason::Rejected,
            1,
            None,
        )
        .unwrap();
        let h = with_death(&h, &m, "b", DeathReason::Maxlen, 2, None).unwrap();
        let h = with_death(&h, &m, "a", DeathReason::Rejected, 3, None).unwrap();
        assert_eq!(
            deaths(&h),
            [
                ("a".into(), "rejected".into(), 2),
                ("b".into(), "maxlen".into(), 1)
            ]
        );
        assert_eq!(text_of(h.inner().get("x-first-death-queue")).unwrap(), "a");
        assert_eq!(
            text_of(h.inner().get("x-first-death-reason")).unwrap(),
            "rejected"
        );
        assert_eq!(
            text_of(h.inner().get("x-last-death-reason")).unwrap(),
            "rejected"
        );
    }

    #[test]
    fn a_cycle_without_rejection_drops_the_message() {
        let m = message();
        let h = with_death(
            &FieldTable::default(),
            &m,
            "a",
            DeathReason::Maxlen,
            1,
            None,
        )
        .unwrap();
        assert!(with_death(&h, &m, "a", DeathReason::Maxlen, 2, None).is_none());
        let h = with_death(
            &FieldTable::default(),
            &m,
            "a",
            DeathReason::Rejected,
            1,
            None,
        )
        .unwrap();
        assert!(with_death(&h, &m, "a", DeathReason::Maxlen, 2, None).is_some());
    }
}
