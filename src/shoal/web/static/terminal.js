// The terminal page, /t/<session id>: attaches xterm.js to a session over a WebSocket.
// Output arrives as binary frames, contiguous from the offset the server's hello names; we
// count bytes so that a reconnect resumes exactly where we stopped (no gap, no duplicate).
// A reload starts again from 0 and replays what the controller still keeps.
"use strict";

(() => {
  const TOKEN_KEY = "shoal.token";
  const FATAL = new Set([401, 403, 404]);
  const MIN_DELAY = 250;
  const MAX_DELAY = 5000;

  const session = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
  const statusEl = document.getElementById("status");
  const bannerEl = document.getElementById("banner");
  document.getElementById("title").textContent = session;
  document.title = `${session} · shoal`;

  // A ?token= in the URL is kept for this tab only and removed from the address bar.
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  // The link's redirect hands over the terminal's attach key in the fragment (#attach=...);
  // it stays in this origin's storage, so a server on another port of this host, which
  // receives the terminal's cookie, still cannot attach.
  const ATTACH_KEY = `shoal.attach.${session}`;
  const handed = /^#attach=([0-9a-f]{64})$/.exec(location.hash);
  if (handed) {
    try { localStorage.setItem(ATTACH_KEY, handed[1]); } catch { /* storage disabled */ }
    history.replaceState(null, "", location.pathname + location.search);
  }
  function attachKey() {
    if (handed) return handed[1];
    try { return localStorage.getItem(ATTACH_KEY) || ""; } catch { return ""; }
  }

  const term = new Terminal({
    cursorBlink: true,
    scrollback: 10000,
    fontSize: 14,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Cascadia Mono", Menlo, Consolas, monospace',
    theme: { background: "#0d1117", foreground: "#c9d1d9", cursor: "#c9d1d9",
             selectionBackground: "#264f78" },
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("term"));
  fit.fit();
  term.focus();

  let state = "connecting"; // connecting | connected | reconnecting | ended | error
  let offset = 0;           // offset of the next output byte we expect
  let skip = 0;             // bytes to drop if the server resends some we already have
  let ws = null;
  let delay = MIN_DELAY;
  const encoder = new TextEncoder();

  function setState(next, text) {
    state = next;
    statusEl.className = `status ${next}`;
    statusEl.textContent = text || next;
  }

  function showBanner(text, kind) {
    bannerEl.textContent = text;
    bannerEl.className = `banner ${kind}`;
    bannerEl.hidden = false;
    fit.fit();
  }

  function hideBanner() {
    if (!bannerEl.hidden) {
      bannerEl.hidden = true;
      fit.fit();
    }
  }

  function notice(text) {
    term.write(`\r\n\x1b[2m[${text}]\x1b[0m\r\n`);
  }

  function endText(msg) {
    const why = msg.reason ? ` (${msg.reason})` : "";
    switch (msg.state) {
      case "exited":
        if (msg.code !== null && msg.code !== undefined) return `session ended: exit code ${msg.code}${why}`;
        if (msg.signal) return `session ended: killed by signal ${msg.signal}${why}`;
        return `session ended${why}`;
      case "killed":
        return `session ended: killed${msg.signal ? ` by signal ${msg.signal}` : ""}${why}`;
      case "lost":
        return `session ended: node lost${msg.reason && msg.reason !== "node lost" ? why : ""}`;
      case "failed":
        return `session failed${msg.reason ? `: ${msg.reason}` : ""}`;
      default:
        return `session ended: ${msg.state}${why}`;
    }
  }

  function finish(next, text, ok) {
    setState(next);
    showBanner(text, ok ? "ok" : "bad");
    term.options.disableStdin = true;
    term.options.cursorBlink = false;
    if (ws) ws.close();
  }

  function send(data) {
    if (ws && ws.readyState === WebSocket.OPEN && state === "connected") ws.send(data);
  }

  function sendResize() {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ t: "resize", cols: term.cols, rows: term.rows }));
    }
  }

  function onControl(msg) {
    switch (msg.t) {
      case "hello":
        // The server names the offset of the first byte it will send; if it is behind us,
        // drop the overlap; if it is ahead, the gap was dropped (a "truncated" frame says so).
        skip = Math.max(0, offset - msg.offset);
        offset = Math.max(offset, msg.offset);
        delay = MIN_DELAY;
        hideBanner();
        setState("connected");
        break;
      case "truncated":
        notice(`output ${msg.from}–${msg.to} was dropped (${msg.to - msg.from} bytes over the output cap)`);
        if (msg.to > offset) {
          skip = 0;
          offset = msg.to;
        }
        break;
      case "exit":
        finish("ended", endText(msg), msg.state === "exited" && msg.code === 0);
        break;
      case "error":
        if (FATAL.has(msg.status)) {
          finish("error", `error ${msg.status}: ${msg.message}`, false);
        } else {
          showBanner(`error ${msg.status}: ${msg.message}`, "bad");
        }
        break;
      default:
        break; // unknown frames are ignored so the server can add new ones
    }
  }

  function onMessage(ev) {
    if (typeof ev.data === "string") {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      onControl(msg);
      return;
    }
    let bytes = new Uint8Array(ev.data);
    if (skip > 0) {
      const n = Math.min(skip, bytes.length);
      skip -= n;
      bytes = bytes.subarray(n);
    }
    if (bytes.length) {
      offset += bytes.length;
      term.write(bytes);
    }
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ from: String(offset) });
    if (token) query.set("token", token);
    const key = attachKey();
    if (key) query.set("attach", key);
    const csrf = window.shoalLogin.csrf(); // when this page rides on the operator's login
    if (csrf) query.set("csrf", csrf);
    const url = `${proto}//${location.host}/api/v1/sessions/${encodeURIComponent(session)}/attach?${query}`;
    const sock = new WebSocket(url);
    sock.binaryType = "arraybuffer";
    ws = sock;
    sock.onopen = sendResize;
    sock.onmessage = (ev) => { if (ws === sock) onMessage(ev); };
    sock.onclose = () => {
      if (ws !== sock || state === "ended" || state === "error") return;
      ws = null;
      setState("reconnecting", "reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, MAX_DELAY);
    };
  }

  term.onData((text) => send(encoder.encode(text)));
  term.onBinary((text) => send(Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff)));
  term.onResize(sendResize);

  // Ctrl+Shift+C copies the selection, Ctrl+Shift+V pastes (the browser's paste event, which
  // xterm handles); plain Ctrl+C / Ctrl+V go to the program as usual. Cmd+C/V work on macOS.
  term.attachCustomKeyEventHandler((ev) => {
    if (ev.type !== "keydown" || !ev.ctrlKey || !ev.shiftKey) return true;
    if (ev.code === "KeyC") {
      if (term.hasSelection() && navigator.clipboard) {
        navigator.clipboard.writeText(term.getSelection()).catch(() => {});
      }
      ev.preventDefault();
      return false;
    }
    return ev.code !== "KeyV";
  });

  let pending = false;
  new ResizeObserver(() => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fit.fit(); // fires term.onResize (and so a resize frame) only if cols/rows changed
    });
  }).observe(document.getElementById("term"));

  window.shoalTerm = {
    term,
    session,
    state: () => state,
    offset: () => offset,
  };

  connect();
})();
