//! Exchanges: named routing tables from a routing key (and headers) to queues and exchanges.

pub mod headers;
pub mod topic;

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use parking_lot::RwLock;

use super::reply::{AmqpError, AmqpResult};

/// The exchange types mqic implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    /// Parses the `type` of `exchange.declare`; an unknown type is a 406 (`check_type`).
    pub fn parse(name: &str) -> AmqpResult<ExchangeKind> {
        match name {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(AmqpError::precondition(format!(
                "unknown exchange type '{other}'"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Where a binding delivers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(n) | Destination::Exchange(n) => n,
        }
    }
}

/// One binding of an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// The declared shape of an exchange, compared on redeclare.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// An exchange and its bindings.
#[derive(Debug)]
pub struct Exchange {
    pub spec: ExchangeSpec,
    /// `alternate-exchange` argument: where unroutable messages go.
    pub alternate: Option<String>,
    bindings: RwLock<Bindings>,
}

#[derive(Debug, Default)]
struct Bindings {
    /// Every binding, in the order made (listing, equality checks, topic and headers routing).
    all: Vec<Binding>,
    /// Direct exchanges: routing key -> destinations, so routing is one hash lookup.
    by_key: HashMap<String, Vec<Destination>>,
}

impl Exchange {
    pub fn new(spec: ExchangeSpec) -> Exchange {
        let alternate = match spec.arguments.inner().get("alternate-exchange") {
            Some(amq_protocol::types::AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(amq_protocol::types::AMQPValue::ShortString(s)) => Some(s.to_string()),
            _ => None,
        };
        Exchange {
            spec,
            alternate,
            bindings: RwLock::new(Bindings::default()),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Adds a binding; binding twice is a no-op. Returns whether it was new.
    pub fn bind(&self, binding: Binding) -> AmqpResult<bool> {
        if self.spec.kind == ExchangeKind::Headers {
            headers::validate(&binding.arguments)?;
        }
        let mut b = self.bindings.write();
        if b.all.contains(&binding) {
            return Ok(false);
        }
        b.by_key
            .entry(binding.routing_key.clone())
            .or_default()
            .push(binding.destination.clone());
        b.all.push(binding);
        Ok(true)
    }

    /// Removes a binding; a missing one is fine (unbind is idempotent in RabbitMQ).
    pub fn unbind(&self, binding: &Binding) -> bool {
        let mut b = self.bindings.write();
        let Some(pos) = b.all.iter().position(|x| x == binding) else {
            return false;
        };
        b.all.remove(pos);
        if let Some(list) = b.by_key.get_mut(&binding.routing_key) {
            if let Some(i) = list.iter().position(|d| *d == binding.destination) {
                list.remove(i);
            }
            if list.is_empty() {
                b.by_key.remove(&binding.routing_key);
            }
        }
        true
    }

    /// Removes every binding to `destination` (when a queue or exchange is deleted).
    pub fn unbind_destination(&self, destination: &Destination) {
        let mut b = self.bindings.write();
        b.all.retain(|x| x.destination != *destination);
        b.by_key.retain(|_, list| {
            list.retain(|d| d != destination);
            !list.is_empty()
        });
    }

    pub fn has_bindings(&self) -> bool {
        !self.bindings.read().all.is_empty()
    }

    /// Every binding from this exchange, in the order made (management API).
    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings.read().all.clone()
    }

    /// Appends the destinations a message with this key and headers goes to.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        let b = self.bindings.read();
        match self.spec.kind {
            ExchangeKind::Direct => {
                if let Some(list) = b.by_key.get(routing_key) {
                    out.extend(list.iter().cloned());
                }
            }
            ExchangeKind::Fanout => out.extend(b.all.iter().map(|x| x.destination.clone())),
            ExchangeKind::Topic => out.extend(
                b.all
                    .iter()
                    .filter(|x| topic::matches(&x.routing_key, routing_key))
                    .map(|x| x.destination.clone()),
            ),
            ExchangeKind::Headers => out.extend(
                b.all
                    .iter()
                    .filter(|x| headers::matches(&x.arguments, headers))
                    .map(|x| x.destination.clone()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(kind: ExchangeKind) -> Exchange {
        Exchange::new(ExchangeSpec {
            name: "x".into(),
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        })
    }

    fn bind(x: &Exchange, q: &str, key: &str) {
        x.bind(Binding {
            destination: Destination::Queue(q.into()),
            routing_key: key.into(),
            arguments: FieldTable::default(),
        })
        .unwrap();
    }

    fn route(x: &Exchange, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        x.route(key, None, &mut out);
        let mut names: Vec<_> = out.iter().map(|d| d.name().to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn direct_routes_by_exact_key() {
        let x = exchange(ExchangeKind::Direct);
        bind(&x, "a", "k1");
        bind(&x, "b", "k1");
        bind(&x, "c", "k2");
        assert_eq!(route(&x, "k1"), ["a", "b"]);
        assert_eq!(route(&x, "k3"), Vec::<String>::new());
        x.unbind(&Binding {
            destination: Destination::Queue("a".into()),
            routing_key: "k1".into(),
            arguments: FieldTable::default(),
        });
        assert_eq!(route(&x, "k1"), ["b"]);
    }

    #[test]
    fn fanout_ignores_the_key_and_topic_matches_patterns() {
        let f = exchange(ExchangeKind::Fanout);
        bind(&f, "a", "");
        bind(&f, "b", "whatever");
        assert_eq!(route(&f, "anything"), ["a", "b"]);
        let t = exchange(ExchangeKind::Topic);
        bind(&t, "all_cases", "case.#");
        bind(&t, "new_only", "case.new.*");
        assert_eq!(route(&t, "case.new.c1"), ["all_cases", "new_only"]);
        assert_eq!(route(&t, "case.done.c1"), ["all_cases"]);
    }

    #[test]
    fn binding_twice_is_one_binding() {
        let x = exchange(ExchangeKind::Direct);
        bind(&x, "a", "k");
        bind(&x, "a", "k");
        assert_eq!(route(&x, "k"), ["a"]);
        x.unbind_destination(&Destination::Queue("a".into()));
        assert!(!x.has_bindings());
    }
}
