"""The nats-py types the rest of shoal names in annotations (a connection, a bucket, a
message, a subscription), so that only this package imports nats."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

__all__ = ["JetStreamContext", "KeyValue", "Msg", "NatsClient", "Subscription"]
