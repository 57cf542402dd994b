"""The command line's WebSocket framing, without a socket."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from shoal.client.websocket import OP_BINARY, OP_CONT, OP_PING, OP_TEXT, FrameParser, encode_frame


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """What a server sends: unmasked."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


@given(st.binary(max_size=70000), st.integers(1, 5000))
def test_masked_frames_parse_back_in_any_chunking(payload: bytes, step: int) -> None:
    wire = encode_frame(OP_BINARY, payload, mask=b"\x01\x02\x03\x04")
    assert wire[1] & 0x80, "client frames are masked"
    parser = FrameParser()
    got = []
    for i in range(0, len(wire), step):
        got += parser.feed(wire[i:i + step])
    assert got == [(OP_BINARY, payload)]


def test_fragments_and_control_frames_between_them() -> None:
    wire = (server_frame(OP_TEXT, b"hel", fin=False) + server_frame(OP_PING, b"p")
            + server_frame(OP_CONT, b"lo", fin=False) + server_frame(OP_CONT, b"!"))
    assert FrameParser().feed(wire) == [(OP_PING, b"p"), (OP_TEXT, b"hello!")]


def test_extended_lengths() -> None:
    for n in (125, 126, 65535, 65536, 200000):
        assert FrameParser().feed(server_frame(OP_BINARY, b"x" * n)) == [(OP_BINARY, b"x" * n)]
