"""Pure logic: node sets, targets, placement, balance, the session lifecycle, outcomes, tokens.

No I/O on the network and no clock of their own (time is passed in), so tests drive them
directly. Modules here may import ``shoal.wire``, ``shoal.errors`` and each other, never nats,
asyncio, sockets or aiohttp (tests/test_layout.py keeps it so).
"""
