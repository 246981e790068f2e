//! Integration tests: mqic driven by real clients (lapin, amqprs, pika, amqp-tools, amqplib)
//! over TCP on port 0. One module per area; `support` starts servers and checks programs.

mod process;
mod support;

mod basic;
mod cli;
mod external;
mod handshake;
mod smoke;
mod topology;
