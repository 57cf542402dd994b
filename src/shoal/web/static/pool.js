// /terminal: ask for a terminal with a POST (a crawler following links never gets one),
// go to it when ready, or wait in line and ask again when the server says to.
"use strict";

(() => {
  const message = document.getElementById("message");
  const position = document.getElementById("position");
  const place = document.getElementById("place");
  let ticket = "";

  function show(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "";
  }

  async function ask() {
    let resp;
    try {
      resp = await fetch("/terminal", {
        method: "POST",
        headers: window.shoalLogin.headers({}, true), // the CSRF token counts when private
        body: JSON.stringify({ ticket }),
        credentials: "same-origin",
      });
    } catch (err) {
      show("The server cannot be reached; trying again…", true);
      setTimeout(ask, 3000);
      return;
    }
    const body = await resp.json().catch(() => ({}));
    if (body.state === "ready" || body.state === "parked") {
      location.assign(body.url);
      return;
    }
    if (body.state === "waiting") {
      ticket = body.ticket;
      show("Every terminal is taken right now.");
      place.textContent = body.position;
      position.hidden = false;
      setTimeout(ask, (body.retry_after || 2) * 1000);
      return;
    }
    if (body.state === "limited") {
      show(body.message, true);
      setTimeout(ask, (body.retry_after || 20) * 1000);
      return;
    }
    show(body.error || `Unexpected answer (HTTP ${resp.status}).`, true);
  }

  window.shoalPool = { ticket: () => ticket };
  ask();
})();
