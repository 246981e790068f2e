//! The conductor: a pure state machine ([`machine`]) and the driver that feeds it messages,
//! keeps its state in the store and publishes what it decides through the outbox.

pub mod template;
