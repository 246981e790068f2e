//! The conductor: a pure state machine ([`machine`]) over the workflows ([`plan`]), and the
//! [`driver`] that feeds it messages and ticks, keeps every decision in one store
//! transaction with its history rows, GPU leases and outbox messages, and answers the RPC.
//! The [`relay`] publishes the outbox with confirms.

pub mod driver;
pub mod machine;
pub mod plan;
pub mod relay;
pub mod rpc;
pub mod template;
