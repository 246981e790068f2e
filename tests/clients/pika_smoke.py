#!/usr/bin/env python3
"""A lab's pika script, run against mqic: declare, bind, publish with confirms and
properties, consume with manual ack, basic.get, mandatory returns. Exits 0 and prints
"pika smoke ok" when every step behaved as it does against RabbitMQ."""

import sys

import pika


def main(url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.exchange_declare("lab.events", exchange_type="topic", durable=True)
    q = ch.queue_declare("", exclusive=True).method.queue
    assert q.startswith("amq.gen-"), q
    ch.queue_bind(q, "lab.events", routing_key="case.#")
    ch.queue_declare("lab_work_queue", durable=True)

    props = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        correlation_id="c-1",
        headers={"retry_count": 0, "nested": {"list": [1, "two", True]}},
    )
    ch.basic_publish("", "lab_work_queue", b'{"command":"new_case_found"}', props)
    ch.basic_publish("lab.events", "case.new.c1", b"event", mandatory=True)
    try:
        ch.basic_publish("lab.events", "nobody.listens", b"lost", mandatory=True)
        raise AssertionError("unroutable mandatory publish was not returned")
    except pika.exceptions.UnroutableError:
        pass

    method, got_props, body = ch.basic_get("lab_work_queue", auto_ack=False)
    assert body == b'{"command":"new_case_found"}', body
    assert got_props.correlation_id == "c-1"
    assert got_props.headers["nested"]["list"][1] == b"two" or got_props.headers["nested"]["list"][1] == "two"
    assert method.message_count == 0
    ch.basic_ack(method.delivery_tag)

    received = []
    for m, _p, b in ch.consume(q, inactivity_timeout=5):
        assert m is not None, "no delivery within 5 s"
        received.append(b)
        ch.basic_ack(m.delivery_tag)
        break
    ch.cancel()
    assert received == [b"event"], received

    ch.queue_delete("lab_work_queue")
    conn.close()
    print("pika smoke ok")


if __name__ == "__main__":
    main(sys.argv[1])
