"""A small blocking WebSocket client (RFC 6455), for the command line's run path.

``shoal run`` is a short-lived process whose start-up time counts: this client needs only the
standard library, where aiohttp and asyncio together cost a few hundred milliseconds to
import. It speaks what the controller needs: one connection, binary and text messages,
fragmentation, ping/pong and close. Frame parsing is pure (``FrameParser``), so tests drive
it without a socket.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from urllib.parse import urlsplit

from ..errors import AuthError, ConnectError, ProtocolError, error_for_status

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
MAX_MESSAGE = 64 << 20


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; clients must mask (``mask`` is for tests, else random)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + mask + _apply_mask(payload, mask)


def _apply_mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    # XOR as one big integer: fast for megabytes, unlike a per-byte loop.
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameParser:
    """Feed bytes in, get whole messages out as (opcode, payload)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return out
            fin, opcode, payload = frame
            if opcode >= OP_CLOSE:  # control frames may arrive between fragments
                out.append((opcode, payload))
                continue
            if opcode != OP_CONT:
                self._opcode = opcode
                self._parts = []
            self._parts.append(payload)
            if sum(len(p) for p in self._parts) > MAX_MESSAGE:
                raise ProtocolError("WebSocket message too large")
            if fin:
                out.append((self._opcode, b"".join(self._parts)))
                self._parts = []

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
        masked, n = bool(buf[1] & 0x80), buf[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n = struct.unpack_from("!H", buf, 2)[0]
            pos = 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n = struct.unpack_from("!Q", buf, 2)[0]
            pos = 10
        mask = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            mask = bytes(buf[pos:pos + 4])
            pos += 4
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos:pos + n])
        del buf[:pos + n]
        return fin, opcode, _apply_mask(payload, mask) if masked else payload


class WebSocket:
    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self.parser = FrameParser()
        self._pending = self.parser.feed(leftover) if leftover else []
        self.closed = False

    @classmethod
    def connect(cls, url: str, headers: dict[str, str], timeout: float = 10.0,
                ca: str = "") -> WebSocket:
        """``ca``: the CA to verify a wss:// controller against ("": the system's)."""
        parts = urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if secure else 80)
        try:
            sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectError(f"cannot reach the controller at {parts.scheme}://{parts.netloc}: "
                               f"{e.strerror or e}; is `shoal up` (or `shoal controller`) "
                               "running?") from e
        if secure:
            import ssl

            from .tlsverify import certificate_error, client_context

            try:
                sock = client_context(ca).wrap_socket(sock, server_hostname=host)
            except ssl.SSLError as e:
                sock.close()
                where = f"{parts.scheme}://{parts.netloc}"
                raise certificate_error(where, e) or ConnectError(
                    f"TLS with the controller at {where} failed: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"] + [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, leftover = _read_head(sock)
        status_line, _, rest = head.partition("\r\n")
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError) as e:
            raise ProtocolError(f"not an HTTP answer: {status_line!r}") from e
        if status != 101:
            body = _error_body(rest)
            if status == 401:
                raise AuthError(body or "the controller refused the token")
            raise error_for_status(status, body or f"HTTP {status}")
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if f"sec-websocket-accept: {accept.lower()}" not in rest.lower():
            raise ProtocolError("the controller's WebSocket handshake did not match")
        sock.settimeout(None)
        return cls(sock, leftover)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_binary(self, data: bytes) -> None:
        self.sock.sendall(encode_frame(OP_BINARY, data))

    def receive(self) -> tuple[int, bytes] | None:
        """The next data message (blocking); None once the connection is closed."""
        while True:
            while self._pending:
                opcode, payload = self._pending.pop(0)
                if opcode == OP_PING:
                    self.sock.sendall(encode_frame(OP_PONG, payload))
                elif opcode == OP_CLOSE:
                    self.close()
                    return None
                elif opcode in (OP_TEXT, OP_BINARY):
                    return opcode, payload
            if self.closed:
                return None
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return None
            self._pending = self.parser.feed(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000)))
        except OSError:
            pass
        self.sock.close()


def _read_head(sock: socket.socket) -> tuple[str, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectError("the controller closed the connection during the handshake")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ProtocolError("handshake answer too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        rest = rest[:4096]  # an error body follows
        return head.decode("latin-1") + "\r\n\r\n" + rest.decode("utf-8", "replace"), b""
    return head.decode("latin-1"), rest


def _error_body(rest: str) -> str:
    body = rest.partition("\r\n\r\n")[2]
    import json

    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])
    except ValueError:
        pass
    return body.strip()[:300]
