// The dashboard, /: nodes (a fleet summary, a searchable table of at most NODES_SHOWN rows,
// a CPU chart of the first CHART_NODES of them) and sessions, polled every 2 s.
// The page rides on the login cookie; every API call also carries the login's CSRF token
// (login.js) and a state change sends a JSON body. The DOM is built with textContent only
// (no innerHTML from data) and there are no inline handlers, for CSP.
"use strict";

(() => {
  const POLL_MS = 2000;
  const NODES_SHOWN = 200;  // a fleet of 10,000 is summarised and searched, never tabled
  const CHART_NODES = 24;
  const WINDOW_S = 300; // the chart shows the last 5 minutes
  const GAP_S = 10;     // a longer pause between two samples breaks the line
  const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f778ba", "#a371f7", "#ff7b72",
                  "#39c5cf", "#e3b341", "#8b949e", "#56d364", "#79c0ff", "#ffa657"];

  const $ = (id) => document.getElementById(id);
  const nodesBody = document.querySelector("#nodes tbody");
  const sessionsBody = document.querySelector("#sessions tbody");
  const canvas = $("cpu-chart");
  const stateFilter = $("f-state");
  const textFilter = $("f-text");

  const history = new Map(); // node name -> [[unix seconds, cpu %], ...]
  const colors = new Map();  // node name -> color, stable while the page is open
  let nodes = [];
  let fleet = null;     // GET /api/v1/fleet
  let nodesMatched = 0; // nodes matching the search, of which `nodes` holds the first page
  let sessions = [];
  let timer = null;
  let generation = 0; // only the latest refresh() applies its results and re-arms the timer
  let loggedOut = false;

  // ---- helpers -------------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function td(content, className = "") {
    return el("td", { className }, content);
  }

  function badge(state) {
    return el("span", { className: `badge s-${state}` }, state);
  }

  function duration(seconds) {
    if (!(seconds >= 0)) return "";
    const s = Math.floor(seconds);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function ago(ts) {
    return ts ? `${duration(Date.now() / 1000 - ts)} ago` : "";
  }

  function meter(percent) {
    const p = Math.max(0, Math.min(100, Number(percent) || 0));
    const fill = el("span", { className: `fill${p >= 90 ? " crit" : p >= 70 ? " hi" : ""}` });
    fill.style.width = `${p}%`;
    return el("span", { className: "meter" }, el("span", { className: "bar" }, fill), `${p.toFixed(0)}%`);
  }

  function colorOf(name) {
    if (!colors.has(name)) colors.set(name, COLORS[colors.size % COLORS.length]);
    return colors.get(name);
  }

  function showError(text) {
    $("error").textContent = text || "";
    $("error").hidden = !text;
  }

  async function getJSON(url, options = {}) {
    const withBody = options.method !== undefined && options.method !== "GET";
    const resp = await fetch(url, {
      credentials: "same-origin",
      ...options,
      headers: window.shoalLogin.headers(options.headers, withBody),
      body: withBody ? (options.body ?? "{}") : undefined,
    });
    if (!resp.ok) {
      let message = resp.statusText;
      try {
        const body = await resp.json();
        message = body.message || body.error || message;
      } catch { /* not JSON */ }
      const err = new Error(`${resp.status} ${message}`);
      err.status = resp.status;
      throw err;
    }
    return resp.status === 204 ? null : resp.json();
  }

  // ---- nodes ---------------------------------------------------------------------------

  function nodesQuery() {
    // Text with brackets or commas is a node set (web[1-8],db2); other text is searched.
    const text = $("n-text").value.trim();
    const params = { limit: String(NODES_SHOWN) };
    if ($("n-state").value) params.state = $("n-state").value;
    if (text) params[/[[\],]/.test(text) ? "nodes" : "q"] = text;
    return new URLSearchParams(params);
  }

  async function getNodes() {
    const resp = await fetch(`/api/v1/nodes?${nodesQuery()}`,
                             { credentials: "same-origin", headers: window.shoalLogin.headers() });
    if (resp.status === 400) { // a node set still being typed: show nothing yet
      const body = await resp.json().catch(() => ({}));
      return { list: [], total: 0, problem: body.message || "bad search" };
    }
    if (!resp.ok) {
      const err = new Error(`${resp.status} ${resp.statusText}`);
      err.status = resp.status;
      throw err;
    }
    return { list: await resp.json(), total: Number(resp.headers.get("X-Total-Count")) || 0 };
  }

  function renderFleet() {
    const f = fleet;
    $("node-count").textContent = f ? `(${f.nodes.toLocaleString()})` : "";
    if (!f) return;
    const st = f.states || {};
    const parts = [
      `${(st.ready || 0).toLocaleString()} ready`,
      `${(st.draining || 0).toLocaleString()} draining`,
      `${(st.down || 0).toLocaleString()} down`,
      `${f.sessions.toLocaleString()} / ${f.capacity.toLocaleString()} sessions`,
      `${f.agents.toLocaleString()} agent processes on ${f.hosts.toLocaleString()} hosts`,
      `versions ${Object.entries(f.versions || {}).map(([v, c]) => `${v} (${c})`).join(", ")}`,
    ];
    $("fleet-summary").replaceChildren(
      ...parts.map((text, i) => el("span", { className: i < 3 ? `count s-${["ready", "draining", "down"][i]}` : "count" }, text)));
  }

  function renderNodes(problem) {
    renderFleet();
    const more = $("node-more");
    more.hidden = nodesMatched <= nodes.length && !problem;
    more.textContent = problem || `showing ${nodes.length} of ${nodesMatched.toLocaleString()} matching nodes: search to narrow it down`;
    const rows = nodes.map((n) => {
      const load = n.load || {};
      const labels = Object.entries(n.labels || {}).map(([k, v]) => el("span", { className: "label" }, `${k}=${v}`));
      const swatch = el("span", { className: "swatch" });
      swatch.style.background = colorOf(n.name);
      const name = el("td", { className: "mono" }, swatch, n.name);
      name.title = n.hostname || "";
      return el("tr", {},
        name,
        td(badge(n.state)),
        td(n.capacity ? `${n.sessions} / ${n.capacity}` : String(n.sessions ?? ""), "num"),
        td((load.load1 ?? 0).toFixed(2), "num"),
        td(meter(load.cpu_percent)),
        td(meter(load.mem_percent)),
        td(n.address || "", "mono wide"),
        td(n.version || "", "wide"),
        el("td", { className: "wide" }, ...labels),
        td(ago(n.last_seen), "muted"));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { className: "empty", colSpan: 10 },
                                fleet && fleet.nodes ? "no node matches the search" : "no nodes")));
    }
    nodesBody.replaceChildren(...rows);
  }

  function recordCpu(now) {
    for (const n of nodes.slice(0, CHART_NODES)) {
      if (n.state === "down") continue;
      if (!history.has(n.name)) history.set(n.name, []);
      history.get(n.name).push([now, Number(n.load?.cpu_percent) || 0]);
    }
    for (const [name, points] of history) {
      while (points.length && points[0][0] < now - WINDOW_S) points.shift();
      if (!points.length) history.delete(name);
    }
  }

  function drawChart() {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const left = 34, right = 6, top = 6, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    const now = Date.now() / 1000;
    const x = (t) => left + ((t - (now - WINDOW_S)) / WINDOW_S) * pw;
    const y = (v) => top + (1 - Math.max(0, Math.min(100, v)) / 100) * ph;

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#8b949e";
    ctx.strokeStyle = "#30363d";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of [0, 25, 50, 75, 100]) {
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, yy);
      ctx.lineTo(w - right, yy);
      ctx.stroke();
      ctx.fillText(`${v}%`, left - 4, yy);
    }
    ctx.textBaseline = "top";
    for (const m of [5, 4, 3, 2, 1, 0]) {
      ctx.textAlign = m === 5 ? "left" : m === 0 ? "right" : "center";
      ctx.fillText(m ? `-${m}m` : "now", x(now - m * 60), h - bottom + 4);
    }

    ctx.lineWidth = 1.5;
    ctx.lineJoin = "round";
    for (const [name, points] of history) {
      ctx.strokeStyle = colorOf(name);
      ctx.beginPath();
      let prev = null;
      for (const [t, v] of points) {
        if (prev === null || t - prev > GAP_S) ctx.moveTo(x(t), y(v));
        else ctx.lineTo(x(t), y(v));
        prev = t;
      }
      ctx.stroke();
      if (points.length === 1) { // a lone sample: draw a dot
        ctx.fillStyle = colorOf(name);
        ctx.fillRect(x(points[0][0]) - 1.5, y(points[0][1]) - 1.5, 3, 3);
      }
    }

    const legend = [...history.keys()].sort().map((name) => {
      const item = el("li", {}, name);
      item.style.setProperty("--swatch", colorOf(name));
      return item;
    });
    $("legend").replaceChildren(...legend);
  }

  // ---- sessions ------------------------------------------------------------------------

  function exitText(s) {
    const parts = [];
    if (s.exit_code !== null && s.exit_code !== undefined) parts.push(`code ${s.exit_code}`);
    if (s.signal) parts.push(`signal ${s.signal}`);
    if (s.reason) parts.push(s.reason);
    return parts.join(", ");
  }

  function renderSessions() {
    const needle = textFilter.value.trim().toLowerCase();
    const shown = sessions.filter((s) => !needle ||
      [s.name, s.node, s.id].some((v) => (v || "").toLowerCase().includes(needle)));
    $("session-count").textContent = sessions.length
      ? `(${shown.length}${shown.length !== sessions.length ? ` of ${sessions.length}` : ""})` : "";
    const now = Date.now() / 1000;
    const rows = shown.map((s) => {
      const actions = el("span", { className: "actions" });
      if (s.state === "running") {
        actions.append(
          el("a", { href: `/t/${encodeURIComponent(s.id)}`, target: "_blank", rel: "noopener",
                    className: "open-terminal" },
             "open terminal"),
          el("button", { type: "button", className: "kill", dataset: { kill: s.id, name: s.name || s.id } },
             "kill"));
      }
      const runtime = s.started ? duration((s.ended || now) - s.started) : "";
      const idCell = td(String(s.id).slice(0, 12), "mono");
      idCell.title = s.id;
      return el("tr", {},
        idCell,
        td(s.name || ""),
        td(badge(s.state)),
        td(s.node || "", "mono"),
        td(s.pid ?? "", "num wide"),
        td(s.user || "", "wide"),
        td(ago(s.started || s.created), "muted"),
        td(runtime, "num"),
        td(exitText(s)),
        td(s.restarts || 0, "num wide"),
        td((s.ports || []).join(", "), "mono wide"),
        td(actions));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { className: "empty", colSpan: 12 },
                                sessions.length ? "no session matches the filter" : "no sessions")));
    }
    sessionsBody.replaceChildren(...rows);
  }

  // ---- polling -------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(timer);
    if (loggedOut) return;
    const mine = ++generation;
    const query = stateFilter.value ? `?${new URLSearchParams({ state: stateFilter.value })}` : "";
    try {
      const [n, f, s] = await Promise.all([getNodes(), getJSON("/api/v1/fleet"),
                                           getJSON(`/api/v1/sessions${query}`)]);
      if (mine !== generation) return;
      nodes = n.list; // natural order, from the controller
      nodesMatched = n.total;
      fleet = f;
      sessions = [...s].sort((a, b) => (b.created || 0) - (a.created || 0));
      recordCpu(Date.now() / 1000);
      renderNodes(n.problem);
      renderSessions();
      showError("");
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (mine !== generation) return;
      showError(err.status === 401 || err.status === 403
        ? "not signed in: open the login URL that `shoal up` printed (it has ?token=…)"
        : `cannot reach the controller: ${err.message}`);
    }
    drawChart();
    if (!document.hidden) timer = setTimeout(refresh, POLL_MS);
  }

  async function loadTerminalInfo() {
    try {
      const info = await getJSON("/api/v1/terminal/info");
      if (info && info.warning) {
        $("warning").textContent = `Terminals: ${info.warning}`;
        $("warning").hidden = false;
      }
    } catch { /* older controller: no warning to show */ }
  }

  sessionsBody.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-kill]");
    if (!button) return;
    const { kill: id, name } = button.dataset;
    if (!confirm(`Kill session ${name}${name !== id ? ` (${id})` : ""}?`)) return;
    button.disabled = true;
    try {
      await getJSON(`/api/v1/sessions/${encodeURIComponent(id)}/kill`, { method: "POST" });
      showError("");
    } catch (err) {
      showError(`kill ${id} failed: ${err.message}`);
    }
    refresh();
  });
  $("logout").addEventListener("click", async () => {
    loggedOut = true;
    generation++; // a refresh in flight neither applies nor re-arms
    clearTimeout(timer);
    await window.shoalLogin.logout();
    showError("logged out: open the login URL that `shoal up` printed to sign in again");
  });
  stateFilter.addEventListener("change", refresh);
  let nodeSearch = null;
  $("n-state").addEventListener("change", refresh);
  $("n-text").addEventListener("input", () => { clearTimeout(nodeSearch); nodeSearch = setTimeout(refresh, 250); });
  $("node-filters").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
  textFilter.addEventListener("input", renderSessions);
  $("filters").addEventListener("submit", (ev) => ev.preventDefault());
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  window.addEventListener("resize", drawChart);

  window.shoalDashboard = {
    refresh,
    nodes: () => nodes,
    fleet: () => fleet,
    sessions: () => sessions,
    history: () => history,
  };

  // Who is logged in, and what their scopes do not allow is hidden (the API refuses it
  // anyway: this only spares a click that would fail).
  async function loadWhoami() {
    try {
      const me = await getJSON("/api/v1/whoami");
      $("who").textContent = `${me.user} (${me.scopes.join(" ")})`;
      const holds = (scope) => me.scopes.some((s) => s === "admin" || s.split(":")[0] === scope);
      document.body.classList.toggle("no-sessions", !holds("sessions"));
      document.body.classList.toggle("no-terminals", !holds("terminals"));
    } catch { /* the refresh shows the error */ }
  }

  loadWhoami();
  loadTerminalInfo();
  refresh();
})();
