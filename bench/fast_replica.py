"""A minimal, fast HTTP/1.1 replica for bench/proxy: answers every GET with its name.

asyncio protocol, keep-alive, no bodies: fast enough that the replicas are not what a
proxy benchmark measures. Port from argv[1] or $PORT; name from $SHOAL_SESSION_ID.
"""

from __future__ import annotations

import asyncio
import os
import sys

NAME = (os.environ.get("REPLICA_NAME") or os.environ.get("SHOAL_SESSION_ID", "replica")).encode()
BODY = NAME + b"\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


class Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            close = b"connection: close" in head.lower()
            self.transport.write(CLOSE if close else RESPONSE)
            if close:
                self.transport.close()
                return


async def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
    server = await asyncio.get_running_loop().create_server(Http, "0.0.0.0", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
