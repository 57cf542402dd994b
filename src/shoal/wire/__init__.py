"""The wire contract: NATS subjects, bucket and stream names, and every message body.

Everything agents, controllers and clients say to each other is a msgspec Struct declared
here. Modules in this package import only the standard library, msgspec, ``shoal.errors`` and
each other (tests/test_layout.py keeps it so).
"""
