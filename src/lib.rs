//! mqic: the MQI Communicator in one binary.
//!
//! Module map, in reading order:
//! - [`cli`]: the command line (`mqic serve`, `mqic demo`, `mqic worker`, `mqic config`, ...).
//! - [`config`]: the typed TOML configuration; defaults live in `assets/mqic.toml`.
//! - [`app`]: start-up as a script of steps, the ready lines, and shutdown with a drain.
//! - [`amqp`]: the embedded AMQP 0-9-1 broker (codec, connections, channels, exchanges,
//!   queues, `broker.redb` durability in `amqp::store`) and its in-process API.
//! - [`memory`]: the memory high watermark that blocks publishers.
//! - [`disk`]: the disk free limit on the data dir that blocks publishers.
//! - [`protocol`]: the message contract: envelope, commands, RPC, events, topology.
//! - [`bus`]: the `Bus` the workflow talks through (embedded broker or a remote one).
//! - [`store`]: `mqic.redb`: cases, history, GPU leases, the outbox, events, archives.
//! - [`conductor`]: the case state machine and its driver.
//! - [`workers`]: scanner, executor, transfer, archiver, curator (GPU monitoring).
//! - [`hpc`]: where steps run: this machine (`local`), or a GPU server over SSH (`ssh`: one
//!   session per host; `remote`: detached steps there). SFTP transfers: `workers::transfer::sftp`.
//! - [`gpu`]: GPU monitoring (NVML, `nvidia-smi` by column header) and the lease rule that
//!   keeps missing, failed, full or occupied GPUs from being leased.
//! - [`logbus`]: log lines on the `mqic.logs` exchange, by severity.
//! - [`pipeline`]: wiring: store, recovery, bus, and every worker task.
//! - [`demo`]: synthetic cases, MOQUI and interpreter stand-ins, the demo's progress view.
//! - [`mgmt`]: the RabbitMQ-compatible management HTTP API (port 15672) and Prometheus
//!   `/metrics` (port 15692).
//! - [`web`]: the dashboard (axum, assets in the binary): JSON API, live updates by SSE,
//!   login and CSRF checks.

pub mod amqp;
pub mod app;
pub mod bus;
pub mod cli;
pub mod conductor;
pub mod config;
pub mod demo;
pub mod disk;
pub mod gpu;
pub mod hpc;
pub mod logbus;
pub mod memory;
pub mod mgmt;
pub mod pipeline;
pub mod protocol;
pub mod store;
pub mod web;
pub mod workers;
