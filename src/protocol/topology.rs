//! The one place the workflow's AMQP topology is declared: the five work queues and their
//! dead-letter queues, the RPC exchange and queue, and the event and log exchanges. Every
//! part (in-process or a remote `mqic worker`) declares exactly this, so a redeclare can
//! never disagree (the original declared different arguments in two places and got 406).

use super::events::{EVENTS_EXCHANGE, LOGS_EXCHANGE};
use super::rpc::{RPC_EXCHANGE, RPC_QUEUE};

pub const CONDUCTOR_QUEUE: &str = "conductor_queue";
pub const FILE_TRANSFER_QUEUE: &str = "file_transfer_queue";
pub const REMOTE_EXECUTOR_QUEUE: &str = "remote_executor_queue";
pub const SYSTEM_CURATOR_QUEUE: &str = "system_curator_queue";
pub const ARCHIVER_QUEUE: &str = "archiver_queue";

/// The five work queues of seed `000`.
pub const WORK_QUEUES: &[&str] = &[
    CONDUCTOR_QUEUE,
    FILE_TRANSFER_QUEUE,
    REMOTE_EXECUTOR_QUEUE,
    SYSTEM_CURATOR_QUEUE,
    ARCHIVER_QUEUE,
];

/// The topic exchange of control messages every executor hears (each binds its own
/// exclusive queue): `cancel.<host>` carries `cancel_step`, so the executor that runs the
/// attempt gets it whichever executor took the step.
pub const CONTROL_EXCHANGE: &str = "mqic.control";

/// The header that carries why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-mqic-reason";
/// The header with the short error kind (`not_json`, `unknown_command`, ...).
pub const DEAD_LETTER_KIND_HEADER: &str = "x-mqic-error";
/// The header naming the queue the message came from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "x-mqic-original-queue";

/// The dead-letter queue of a work queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: &'static str,
    pub kind: &'static str,
}

/// A queue to declare (durable, no arguments, so RabbitMQ and mqic accept the same thing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingSpec {
    pub queue: String,
    pub exchange: &'static str,
    pub routing_key: &'static str,
}

/// Everything the workflow declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchanges: Vec<ExchangeSpec>,
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<BindingSpec>,
}

/// The workflow topology.
pub fn topology() -> Topology {
    let mut queues = Vec::new();
    for q in WORK_QUEUES {
        queues.push(QueueSpec {
            name: q.to_string(),
        });
        queues.push(QueueSpec {
            name: dead_letter_queue(q),
        });
    }
    queues.push(QueueSpec {
        name: RPC_QUEUE.to_string(),
    });
    Topology {
        exchanges: vec![
            ExchangeSpec {
                name: EVENTS_EXCHANGE,
                kind: "topic",
            },
            ExchangeSpec {
                name: LOGS_EXCHANGE,
                kind: "topic",
            },
            ExchangeSpec {
                name: RPC_EXCHANGE,
                kind: "topic",
            },
            ExchangeSpec {
                name: CONTROL_EXCHANGE,
                kind: "topic",
            },
        ],
        queues,
        bindings: vec![BindingSpec {
            queue: RPC_QUEUE.to_string(),
            exchange: RPC_EXCHANGE,
            routing_key: "methods.#",
        }],
    }
}
