//! Integration tests: mqic driven by real clients (lapin, amqprs, pika, amqp-tools, amqplib)
//! over TCP on port 0. One module per area; `support` starts servers and checks programs.

mod support;

mod smoke;
