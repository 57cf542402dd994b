"""A service replica that shows what reached it: HTTP on $PORT, standard library only.

    GET /health      -> "ok\n"
    GET /page...     -> an HTML page whose script tries to read the shoal API (the attack of
                        a hostile replica), writing what it got into <pre id=out>
    anything else    -> JSON {"target": raw request target, "headers": [[name, value], ...]}
                        with two Set-Cookie headers (``app=1`` and a planted ``shoal_token``)
                        and a header the answer's ``Connection`` names (hop-by-hop)
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = b"""<!doctype html><meta charset=utf-8><title>replica</title><pre id=out></pre>
<script>
async function attempt(url) {
  try {
    const r = await fetch(url, {credentials: "include"});
    return url + " -> " + r.status + " " + (await r.text()).slice(0, 300);
  } catch (e) {
    return url + " -> blocked: " + e;
  }
}
(async () => {
  const api = new URLSearchParams(location.search).get("api") || "";
  const lines = [await attempt("/api/v1/nodes")];
  if (api) lines.push(await attempt(api + "/api/v1/nodes"));
  document.getElementById("out").textContent = lines.join("\\n");
  document.title = "done";
})();
</script>
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(b"ok\n", "text/plain")
        elif self.path.startswith("/page"):
            self._send(PAGE, "text/html")
        else:
            seen = {"target": self.path, "headers": [[k, v] for k, v in self.headers.items()]}
            self._send(json.dumps(seen).encode(), "application/json", extra=(
                ("Set-Cookie", "app=1; Path=/"), ("Set-Cookie", "shoal_token=planted; Path=/"),
                ("Connection", "X-Replica-Hop"), ("X-Replica-Hop", "secret")))

    def _send(self, body: bytes, kind: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True


def main() -> None:
    Server(("0.0.0.0", int(os.environ.get("PORT") or sys.argv[1])), Handler).serve_forever()


if __name__ == "__main__":
    main()
