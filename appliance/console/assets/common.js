// Shared by both console pages: the key, API calls, error wording, small DOM helpers.
// Every text from the API is put into the page as text (textContent), never as HTML.
"use strict";

window.Appliance = (() => {
  const KEY_SLOT = "appliance.key";

  function getKey() {
    return sessionStorage.getItem(KEY_SLOT) || "";
  }

  function setKey(key) {
    sessionStorage.setItem(KEY_SLOT, key);
  }

  function clearKey() {
    sessionStorage.removeItem(KEY_SLOT);
  }

  // An API answer that was not a success, with what the person needs to know.
  class ApiFailure extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  async function failureOf(response) {
    let code = "";
    let message = "";
    try {
      const body = await response.json();
      code = (body.error && body.error.code) || "";
      message = (body.error && body.error.message) || "";
    } catch (_) {
      message = "";
    }
    const retry = parseInt(response.headers.get("Retry-After") || "", 10);
    return new ApiFailure(response.status, code, message, Number.isFinite(retry) ? retry : null);
  }

  // fetch with the key; resolves to the Response when it is a success, else throws
  // ApiFailure (status 0 when the box could not be reached).
  async function request(path, options = {}) {
    const headers = { Authorization: `Bearer ${getKey()}` };
    const init = { method: options.method || "GET", headers, signal: options.signal };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiFailure(0, "unreachable", "", null);
    }
    if (!response.ok) throw await failureOf(response);
    return response;
  }

  async function getJson(path) {
    return (await request(path)).json();
  }

  function waitText(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 90) return ` Try again in ${seconds} s.`;
    const minutes = Math.ceil(seconds / 60);
    if (minutes < 90) return ` Try again in ${minutes} min.`;
    return ` Try again in ${Math.ceil(minutes / 60)} h.`;
  }

  // One sentence a person can act on, for any failure.
  function describe(failure) {
    if (!(failure instanceof ApiFailure)) return `Something went wrong: ${failure.message}`;
    const said = failure.message ? ` (${failure.message})` : "";
    switch (failure.status) {
      case 0:
        return "The box did not answer. Check that it is on and reachable, then try again.";
      case 401:
        return "Your API key was refused. Sign in again with a valid key.";
      case 403:
        return `This key may not do that${said}.`;
      case 429:
        if (failure.code === "budget_exhausted") {
          return `This key has used its token budget${said}.${waitText(failure.retryAfter)}`;
        }
        if (failure.code === "too_many_streams") {
          return `This key has too many answers streaming at once${said}.` +
            `${waitText(failure.retryAfter)}`;
        }
        return `Too many requests${said}.${waitText(failure.retryAfter)}`;
      case 503:
        return `The assistant is busy or starting${said}.${waitText(failure.retryAfter)}`;
      case 507:
        return `The box's storage is full, so nothing new can be saved${said}. ` +
          "Ask its operator to free space.";
      default:
        if (failure.status >= 500) {
          return `The box had a problem (${failure.status})${said}. Try again; if it persists, ` +
            "tell its operator.";
        }
        return `The request was refused (${failure.status})${said}.`;
    }
  }

  // el("li", {class: "x", onclick: f}, "text", child) builds an element; strings become
  // text nodes, so nothing passed here is ever parsed as HTML.
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function age(epochSeconds) {
    const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
    if (seconds < 60) return "just now";
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function bytes(value) {
    if (value === null || value === undefined) return "-";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let amount = value;
    let unit = 0;
    while (amount >= 1024 && unit < units.length - 1) {
      amount /= 1024;
      unit += 1;
    }
    return `${amount.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
  }

  // The sign-in form shared by both pages: `check` calls the API with the new key and
  // throws ApiFailure when the key will not do.
  function setUpSignIn(check, onSignedIn) {
    const form = document.getElementById("sign-in-form");
    const input = document.getElementById("key");
    const error = document.getElementById("sign-in-error");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.textContent = "";
      const key = input.value.trim();
      if (!key) return;
      setKey(key);
      try {
        await check();
      } catch (failure) {
        clearKey();
        error.textContent = describe(failure);
        return;
      }
      input.value = "";
      onSignedIn();
    });
    document.getElementById("sign-out").addEventListener("click", () => {
      clearKey();
      window.location.reload();
    });
  }

  function show(signedIn) {
    document.getElementById("sign-in").hidden = signedIn;
    document.getElementById("app").hidden = !signedIn;
    document.getElementById("sign-out").hidden = !signedIn;
  }

  return {
    ApiFailure,
    age,
    bytes,
    clearKey,
    describe,
    el,
    getJson,
    getKey,
    request,
    setUpSignIn,
    show,
  };
})();
