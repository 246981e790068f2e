//! Integration tests: mqic driven by real clients (lapin, amqprs, pika, amqp-tools, amqplib)
//! over TCP on port 0. One module per area; `support` starts servers and checks programs.

mod process;
mod support;
mod workflow;

mod basic;
mod cli;
mod crash;
mod durability;
mod extensions;
mod external;
mod gpu;
mod handshake;
mod mgmt;
mod packaging;
mod pipeline;
mod smoke;
mod ssh;
mod sshd;
mod topology;
mod web;
