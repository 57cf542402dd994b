"""The only package that talks to NATS: connections, buckets with compare-and-set, watches
and mirrors, the output log, the session store and the embedded nats-server.

NATS errors are translated into ``shoal.errors`` here; nothing outside this package (and the
controller's NATS API server, agent and controller connections built from it) names nats-py's
error types.
"""
