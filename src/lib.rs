//! mqic: the MQI Communicator in one binary.
//!
//! Module map, in reading order:
//! - [`cli`]: the command line (`mqic serve`, `mqic config`, `mqic version`).
//! - [`config`]: the typed TOML configuration; defaults live in `assets/mqic.toml`.
//! - [`app`]: start-up as a script of steps, the ready lines, and shutdown with a drain.
//! - [`amqp`]: the embedded AMQP 0-9-1 broker (codec, connections, channels, exchanges,
//!   queues) and its in-process API.
//! - [`memory`]: the memory high watermark that blocks publishers.
//!
//! The case pipeline (bus, protocol, store, conductor, workers), the SSH side and the web
//! dashboard arrive with their own issues; see `../shared/DESIGN.md` for the whole map.

pub mod amqp;
pub mod app;
pub mod cli;
pub mod config;
pub mod memory;
