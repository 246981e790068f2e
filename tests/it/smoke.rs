//! A first round trip with each Rust client library.

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;

use crate::support::{amqprs_publish_and_consume, publish_confirmed, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_round_trip_with_confirm() {
    let server = TestServer::start().await;
    let conn = server.lapin().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "hello".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let confirm = publish_confirmed(&ch, "", "hello", b"hi there")
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let mut consumer = ch
        .basic_consume(
            "hello".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = consumer.next().await.unwrap().unwrap();
    assert_eq!(delivery.data, b"hi there");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_round_trip() {
    let server = TestServer::start().await;
    let conn = server.amqprs().await;
    let ch = conn.open_channel(None).await.unwrap();
    let mut rx = amqprs_publish_and_consume(&ch, "amqprs-q", b"payload").await;
    let msg = rx.recv().await.unwrap();
    assert_eq!(msg.content.unwrap(), b"payload");
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    server.stop().await;
}
