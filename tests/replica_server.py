"""A service replica for tests and bench/proxy: HTTP on $PORT, answering with its name.

    GET /            -> "<name>\n"   (name: $REPLICA_NAME, else $SHOAL_SESSION_ID)
    GET /health      -> "ok\n"
    GET /slow?ms=N   -> headers and "<name>\n" at once, then "done\n" after N ms (chunked)
    GET /delay?ms=N  -> from now on, every answer (the health check too) waits N ms first
    GET /ws          -> a WebSocket echo (text frames, prefixed with the name)

Threaded, HTTP/1.1 with keep-alive, standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

NAME = os.environ.get("REPLICA_NAME") or os.environ.get("SHOAL_SESSION_ID", "replica")
DELAY = [0.0]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        self._send(f"{NAME} got {len(data)}\n".encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        ms = float(query.get("ms", ["0"])[0])
        if url.path == "/delay":
            DELAY[0] = ms / 1000
            self._send(b"ok\n")
            return
        if DELAY[0]:
            time.sleep(DELAY[0])
        if url.path == "/health":
            self._send(b"ok\n")
        elif url.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(f"{NAME}\n".encode())
            time.sleep(ms / 1000)
            self._chunk(b"done\n")
            self._chunk(b"")
        elif url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
        else:
            self._send(f"{NAME}\n".encode())

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _websocket(self) -> None:
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, size = head[0] & 0x0F, head[1] & 0x7F
            if size == 126:
                size = struct.unpack("!H", self.rfile.read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(size)))
            if opcode == 8:  # close
                self.wfile.write(b"\x88\x02\x03\xe8")
                self.wfile.flush()
                return
            if opcode == 1:
                reply = f"{NAME}: {data.decode()}".encode()
                self.wfile.write(bytes([0x81, len(reply)]) + reply if len(reply) < 126 else
                                 bytes([0x81, 126]) + struct.pack("!H", len(reply)) + reply)
                self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
    Server(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
