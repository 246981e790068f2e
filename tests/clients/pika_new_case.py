"""Publishes a seed-format new_case_found to conductor_queue, as a lab script would.

Usage: pika_new_case.py AMQP_URL CASE_ID CASE_PATH
"""
import json
import sys

import pika

url, case_id, case_path = sys.argv[1:4]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()
body = json.dumps({"command": "new_case_found", "payload": {"case_id": case_id, "case_path": case_path}})
channel.basic_publish(
    exchange="",
    routing_key="conductor_queue",
    body=body,
    properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
    mandatory=True,
)
connection.close()
print("published new_case_found", case_id)
