// The operator page: health, metrics, services, models, backups and API keys, read from
// and changed through the admin API with the signed-in admin key. Refreshes every 5 s.
"use strict";

(() => {
  const A = window.Appliance;
  const { el } = A;
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function notice(text) {
    const box = $("notice");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function failed(failure) {
    if (failure instanceof A.ApiFailure && (failure.status === 401 || failure.status === 403)) {
      signOutWith(
        failure.status === 403
          ? "This page needs an admin key: the key you signed in with has scope user. " +
            "Sign in with an admin key (the chat page works with any key)."
          : A.describe(failure),
      );
      return;
    }
    notice(A.describe(failure));
  }

  function signOutWith(message) {
    if (timer) clearInterval(timer);
    timer = null;
    A.show(false);
    $("sign-in-error").textContent = message;
  }

  function when(value) {
    if (value === null || value === undefined) return "never";
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    return date.toLocaleString();
  }

  function stateCell(ok, text) {
    return el("td", { class: ok ? "state-ok" : "state-bad" }, text);
  }

  function row(...cells) {
    return el("tr", {}, ...cells.map((cell) => (cell instanceof Node ? cell : el("td", {}, cell))));
  }

  function number(text) {
    return el("td", { class: "number" }, String(text));
  }

  // ---- health -------------------------------------------------------------------------
  async function readiness() {
    const response = await fetch("/api/v1/health/ready", {
      headers: { Authorization: `Bearer ${A.getKey()}` },
    });
    const body = await response.json();
    const ready = body.status === "ready";
    const badge = $("ready-state");
    badge.textContent = ready ? "ready" : "NOT READY";
    badge.className = ready ? "state-ok" : "state-bad";
    $("checks").replaceChildren(
      ...(body.checks || []).map((check) =>
        row(check.name, stateCell(check.state === "ok", check.state), check.detail),
      ),
    );
  }

  function figure(label, value) {
    return el("div", { class: "figure" }, el("div", { class: "label" }, label),
      el("div", { class: "value" }, value));
  }

  async function metrics() {
    const body = await A.getJson("/api/v1/health/metrics");
    const system = body.system || {};
    const llm = body.llm || {};
    const ttft = llm.time_to_first_token_seconds || {};
    $("figures").replaceChildren(
      figure("CPU", `${Math.round(system.cpu_percent || 0)} %`),
      figure("Memory", `${Math.round(system.memory_percent || 0)} %`),
      figure("Disk free", A.bytes(system.disk_free_bytes)),
      figure("Tokens/s (last)", (llm.last_tokens_per_second || 0).toFixed(1)),
      figure("Running", `${llm.running ?? 0} / ${llm.parallel ?? "-"}`),
      figure("Queue", `${llm.queue_depth ?? 0} / ${llm.max_queue ?? "-"}`),
      figure("First token p50", ttft.p50 ? `${Math.round(ttft.p50 * 1000)} ms` : "-"),
      figure("Loaded model", llm.loaded_model || "none"),
    );
    const processes = Object.entries(body.processes || {});
    $("processes").replaceChildren(
      ...processes.map(([name, proc]) =>
        row(
          name,
          number(proc ? A.bytes(proc.rss_bytes) : "not running"),
          number(proc ? `${Math.round(proc.cpu_percent)} %` : "-"),
        ),
      ),
    );
  }

  async function services() {
    const body = await A.getJson("/api/v1/health/services");
    $("service-rows").replaceChildren(
      ...body.services.map((service) =>
        row(
          service.name,
          service.state,
          stateCell(service.healthy, service.healthy ? "yes" : "no"),
          number(service.pid ?? "-"),
          number(service.restarts),
          service.last_error || "-",
        ),
      ),
    );
  }

  async function models() {
    const body = await A.getJson("/api/v1/models");
    $("model-rows").replaceChildren(
      ...body.models.map((model) =>
        row(
          model.name + (model.name === body.default ? " (default)" : ""),
          stateCell(model.state === "ok", model.reason ? `${model.state}: ${model.reason}` : model.state),
          model.loaded ? "yes" : "no",
          number(A.bytes(model.size)),
          model.architecture || "-",
          el("td", { title: model.sha256 || "" }, model.sha256 ? model.sha256.slice(0, 12) : "not yet"),
        ),
      ),
    );
  }

  // ---- backups ------------------------------------------------------------------------
  async function backups() {
    const body = await A.getJson("/api/v1/admin/backups");
    $("backup-rows").replaceChildren(
      ...body.backups.map((backup) =>
        row(
          backup.name,
          number(A.bytes(backup.size)),
          when(backup.created),
          backup.verified_at ? stateCell(true, when(backup.verified_at)) : "not verified",
          el(
            "td",
            {},
            backup.sealed
              ? "sealed: verify with appliance backup verify"
              : el("button", { type: "button", onclick: () => verify(backup.name) }, "Verify"),
          ),
        ),
      ),
    );
    const status = body.status || {};
    const failing = status.last_failure && (!status.last_success || status.last_failure > status.last_success);
    $("backup-health").textContent = failing
      ? `The last backup failed (${when(status.last_failure)}): ${status.last_error || "unknown"}`
      : "";
  }

  async function verify(name) {
    notice("");
    $("backup-status").textContent = `Verifying ${name}…`;
    try {
      await A.request("/api/v1/admin/backups/verify", { method: "POST", body: { archive: name } });
      await backups();
      $("backup-status").textContent = `${name} is good.`;
    } catch (failure) {
      $("backup-status").textContent = "";
      failed(failure);
    }
  }

  async function backUpNow() {
    notice("");
    const button = $("backup-now");
    button.disabled = true;
    $("backup-status").textContent = "Backing up…";
    try {
      const response = await A.request("/api/v1/admin/backups", { method: "POST", body: {} });
      const made = await response.json();
      await backups();
      $("backup-status").textContent = `Made ${made.name} (${A.bytes(made.size)}).`;
    } catch (failure) {
      $("backup-status").textContent = "";
      failed(failure);
    } finally {
      button.disabled = false;
    }
  }

  // ---- API keys -----------------------------------------------------------------------
  function usageText(usage, period) {
    const used = usage[period];
    const limit = period === "day" ? usage.tokens_per_day : usage.tokens_per_month;
    return limit ? `${used} / ${limit}` : `${used}`;
  }

  async function keys() {
    const body = await A.getJson("/api/v1/admin/keys");
    $("key-rows").replaceChildren(
      ...body.keys.map(({ key, usage }) =>
        row(
          key.name,
          key.scope,
          when(key.created),
          when(key.last_used),
          number(usageText(usage.local, "day")),
          number(usageText(usage.local, "month")),
          el(
            "td",
            {},
            el(
              "button",
              {
                type: "button",
                "data-key": key.name,
                "aria-label": `Revoke key ${key.name}`,
                onclick: () => revoke(key.name),
              },
              "Revoke",
            ),
          ),
        ),
      ),
    );
  }

  async function revoke(name) {
    if (!window.confirm(`Revoke the key "${name}"? Programs using it are refused from now on.`)) {
      return;
    }
    notice("");
    try {
      await A.request(`/api/v1/admin/keys/${encodeURIComponent(name)}`, { method: "DELETE" });
      await keys();
    } catch (failure) {
      failed(failure);
    }
  }

  async function createKey(event) {
    event.preventDefault();
    notice("");
    const body = { name: $("key-name").value.trim(), scope: $("key-scope").value };
    for (const [id, field] of [["key-day", "tokens_per_day"], ["key-month", "tokens_per_month"]]) {
      if ($(id).value !== "") body[field] = parseInt($(id).value, 10);
    }
    try {
      const response = await A.request("/api/v1/admin/keys", { method: "POST", body });
      const made = await response.json();
      const shown = $("new-key");
      shown.replaceChildren(
        el("p", {}, `New ${made.key.scope} key "${made.key.name}". It is shown only now: copy it ` +
          "to where its user keeps secrets."),
        el("code", { id: "new-key-token" }, made.token),
      );
      shown.hidden = false;
      $("key-form").reset();
      await keys();
    } catch (failure) {
      failed(failure);
    }
  }

  // ---- page ---------------------------------------------------------------------------
  async function refresh() {
    try {
      await Promise.all([readiness(), metrics(), services(), models(), backups(), keys()]);
    } catch (failure) {
      failed(failure);
    }
    document.body.dataset.ready = "true";
  }

  async function enter() {
    A.show(true);
    notice("");
    await refresh();
    if (!timer && A.getKey()) {
      timer = setInterval(async () => {
        try {
          await Promise.all([readiness(), metrics(), services()]);
        } catch (failure) {
          failed(failure);
        }
      }, REFRESH_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("backup-now").addEventListener("click", backUpNow);
    $("key-form").addEventListener("submit", createKey);
    // Any key signs in; an admin key is what this page then needs.
    A.setUpSignIn(() => A.getJson("/api/v1/usage"), enter);
    if (A.getKey()) enter();
    else {
      A.show(false);
      document.body.dataset.ready = "true";
    }
  });
})();
