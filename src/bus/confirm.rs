//! Publisher-confirm bookkeeping shared by both buses: which publishes on one channel wait for
//! the broker's `basic.ack` / `basic.nack`, and which of them came back with `basic.return`.
//!
//! Confirms carry the channel's publish sequence number (1, 2, ... per channel), possibly
//! with `multiple`. Returns carry no sequence number; the broker sends a return before the
//! confirm of the same message, so a return marks the oldest waiting mandatory publish with
//! the same exchange, routing key and body, and that publish fails as unroutable when its
//! confirm arrives.

use std::collections::BTreeMap;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{BusError, BusResult, Outgoing};

/// One publish waiting for its confirm.
#[derive(Debug)]
struct Waiting {
    /// Resolves the caller's `publish` future.
    reply: oneshot::Sender<BusResult<()>>,
    /// Only mandatory publishes can come back with `basic.return`.
    mandatory: bool,
    /// Exchange, routing key and body identify the publish a return belongs to.
    exchange: String,
    routing_key: String,
    body: Bytes,
    /// Set by a `basic.return`: the confirm that follows reports it unroutable.
    returned: bool,
}

/// The publishes of one channel that await confirms. Dropping it fails them all as closed.
#[derive(Debug, Default)]
pub(crate) struct PendingConfirms {
    /// Sequence number of the last publish on this channel.
    last: u64,
    waiting: BTreeMap<u64, Waiting>,
    /// Set once the channel is gone: no confirm will ever come, so nothing may wait.
    closed: Option<BusError>,
}

impl PendingConfirms {
    /// Records the next publish and returns its sequence number. `None` when the channel is
    /// already gone; `reply` is then dropped, which its receiver sees as a closed channel.
    pub(crate) fn register(
        &mut self,
        message: &Outgoing,
        reply: oneshot::Sender<BusResult<()>>,
    ) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        self.last += 1;
        self.waiting.insert(
            self.last,
            Waiting {
                reply,
                mandatory: message.mandatory,
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                body: message.body.clone(),
                returned: false,
            },
        );
        Some(self.last)
    }

    /// Resolves a publish that never reached the broker (the send itself failed).
    pub(crate) fn abandon(&mut self, seq: u64, error: BusError) {
        if let Some(w) = self.waiting.remove(&seq) {
            let _ = w.reply.send(Err(error));
        }
    }

    /// A `basic.return`: marks the oldest matching mandatory publish not yet marked.
    pub(crate) fn returned(&mut self, exchange: &str, routing_key: &str, body: &[u8]) {
        let found = self.waiting.values_mut().find(|w| {
            w.mandatory
                && !w.returned
                && w.exchange == exchange
                && w.routing_key == routing_key
                && w.body[..] == *body
        });
        match found {
            Some(w) => w.returned = true,
            None => tracing::warn!(
                exchange,
                routing_key,
                "basic.return for no waiting publish; ignored"
            ),
        }
    }

    /// A `basic.ack` (`ack`) or `basic.nack` for `tag`, or for every publish up to it.
    pub(crate) fn confirmed(&mut self, tag: u64, multiple: bool, ack: bool) {
        let settled: Vec<Waiting> = if multiple {
            let rest = self.waiting.split_off(&(tag + 1));
            std::mem::replace(&mut self.waiting, rest)
                .into_values()
                .collect()
        } else {
            self.waiting.remove(&tag).into_iter().collect()
        };
        for w in settled {
            let outcome = match (ack, w.returned) {
                (false, _) => Err(BusError::Nacked),
                (true, true) => Err(BusError::Unroutable(destination(
                    &w.exchange,
                    &w.routing_key,
                ))),
                (true, false) => Ok(()),
            };
            let _ = w.reply.send(outcome);
        }
    }

    /// The channel is gone: every waiting publish fails with `error`, and so does any later
    /// [`PendingConfirms::register`].
    pub(crate) fn close(&mut self, error: BusError) {
        for (_, w) in std::mem::take(&mut self.waiting) {
            let _ = w.reply.send(Err(error.clone()));
        }
        self.closed.get_or_insert(error);
    }

    /// Whether the channel these confirms belong to is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_some()
    }
}

impl Drop for PendingConfirms {
    fn drop(&mut self) {
        self.close(BusError::Closed("publisher channel closed".into()));
    }
}

/// How a publish's destination appears in [`BusError::Unroutable`].
pub(crate) fn destination(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("queue '{routing_key}'")
    } else {
        format!("exchange '{exchange}' with routing key '{routing_key}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(rk: &str, body: &'static str, mandatory: bool) -> Outgoing {
        Outgoing {
            routing_key: rk.into(),
            body: Bytes::from_static(body.as_bytes()),
            mandatory,
            ..Outgoing::default()
        }
    }

    fn outcome(rx: &mut oneshot::Receiver<BusResult<()>>) -> Option<BusResult<()>> {
        rx.try_recv().ok()
    }

    fn register(
        p: &mut PendingConfirms,
        message: &Outgoing,
    ) -> Option<(u64, oneshot::Receiver<BusResult<()>>)> {
        let (tx, rx) = oneshot::channel();
        p.register(message, tx).map(|seq| (seq, rx))
    }

    #[test]
    fn multiple_acks_settle_everything_up_to_the_tag() {
        let mut p = PendingConfirms::default();
        let mut rx: Vec<_> = (0..4)
            .map(|_| register(&mut p, &outgoing("q", "x", false)).unwrap())
            .collect();
        assert_eq!(rx.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4]);
        p.confirmed(3, true, true);
        for (_, r) in &mut rx[..3] {
            assert_eq!(outcome(r), Some(Ok(())));
        }
        assert_eq!(outcome(&mut rx[3].1), None);
        p.confirmed(4, false, false);
        assert_eq!(outcome(&mut rx[3].1), Some(Err(BusError::Nacked)));
    }

    #[test]
    fn a_return_fails_the_matching_publish_only() {
        let mut p = PendingConfirms::default();
        let (_, mut routed) = register(&mut p, &outgoing("q", "a", true)).unwrap();
        let (_, mut lost) = register(&mut p, &outgoing("nowhere", "b", true)).unwrap();
        p.returned("", "nowhere", b"b");
        p.confirmed(2, true, true);
        assert_eq!(outcome(&mut routed), Some(Ok(())));
        assert_eq!(
            outcome(&mut lost),
            Some(Err(BusError::Unroutable("queue 'nowhere'".into())))
        );
    }

    #[test]
    fn closing_fails_waiting_and_later_publishes() {
        let mut p = PendingConfirms::default();
        let (seq, mut rx) = register(&mut p, &outgoing("q", "a", false)).unwrap();
        p.close(BusError::Refused("404".into()));
        assert_eq!(outcome(&mut rx), Some(Err(BusError::Refused("404".into()))));
        assert!(p.is_closed());
        assert!(register(&mut p, &outgoing("q", "a", false)).is_none());
        p.abandon(seq, BusError::Nacked);
    }
}
