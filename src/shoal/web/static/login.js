// The browser's login, shared by every page: keeps the login's CSRF token and sends it.
// The login redirect hands the token over in the URL fragment (#csrf=..., which the browser
// never sends to any server); it is kept in localStorage, which belongs to this origin alone
// (scheme, host and port), so a page on another port of this host never sees it, even
// though it receives the cookie. The API refuses cookie requests without it.
"use strict";

(() => {
  const KEY = "shoal.csrf";
  const found = /^#csrf=([0-9a-f]{16,128})$/.exec(location.hash);
  if (found) {
    try { localStorage.setItem(KEY, found[1]); } catch { /* storage disabled */ }
    history.replaceState(null, "", location.pathname + location.search);
  }

  function csrf() {
    try { return localStorage.getItem(KEY) || ""; } catch { return ""; }
  }

  // Headers for a same-origin API call; a body is always JSON.
  function headers(extra = {}, withBody = false) {
    const h = { ...extra };
    const token = csrf();
    if (token) h["X-Shoal-CSRF"] = token;
    if (withBody) h["Content-Type"] = "application/json";
    return h;
  }

  async function logout() {
    try {
      await fetch("/api/v1/logout", {
        method: "POST", credentials: "same-origin", headers: headers({}, true), body: "{}",
      });
    } finally {
      try { localStorage.removeItem(KEY); } catch { /* storage disabled */ }
    }
  }

  window.shoalLogin = { csrf, headers, logout };
})();
