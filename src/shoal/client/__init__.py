"""The client of the HTTP API: the asyncio ``aio.Client``, its blocking ``sync.SyncClient``
twin, the WebSocket frames for terminals and runs, and TLS verification with a pinned CA.

The public names are re-exported from ``shoal`` itself (docs/python-client.md).
"""
