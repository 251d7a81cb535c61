// The chat page: conversations of the signed-in key, streamed answers with a stop button.
// It uses only the chat API (/api/v1/chat/send, /api/v1/conversations) and /v1/models.
"use strict";

(() => {
  const A = window.Appliance;
  const { el } = A;
  const MODEL_SLOT = "appliance.model";
  // A stream's `error` event carries the error shape without a status: its type says it.
  const STATUS_OF_TYPE = {
    authentication_error: 401,
    permission_error: 403,
    rate_limit_error: 429,
    service_unavailable: 503,
    insufficient_storage: 507,
  };
  const state = { conversationId: null, streaming: null, renderQueued: null };
  const $ = (id) => document.getElementById(id);

  function notice(text) {
    const box = $("notice");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function failed(failure) {
    if (failure instanceof A.ApiFailure && failure.status === 401) {
      A.clearKey();
      A.show(false);
      $("sign-in-error").textContent = A.describe(failure);
      return;
    }
    notice(A.describe(failure));
  }

  // ---- models -------------------------------------------------------------------------
  async function loadModels() {
    const select = $("model");
    const body = await A.getJson("/v1/models");
    const chosen = sessionStorage.getItem(MODEL_SLOT) || "";
    const ids = body.data.map((model) => model.id);
    select.replaceChildren(
      el("option", { value: "" }, "default model"),
      ...ids.map((id) => el("option", { value: id, selected: id === chosen }, id)),
    );
  }

  // ---- conversation list --------------------------------------------------------------
  async function loadConversations() {
    const list = $("conversations");
    const body = await A.getJson("/api/v1/conversations?limit=100");
    list.replaceChildren(
      ...body.conversations.map((meta) => {
        const title = meta.title || "(untitled)";
        return el(
          "li",
          { class: meta.id === state.conversationId ? "current" : "", "data-id": meta.id },
          el(
            "button",
            { type: "button", class: "open", onclick: () => openConversation(meta.id) },
            el("span", { class: "title" }, title),
            el("span", { class: "age" }, A.age(meta.updated)),
          ),
          el(
            "button",
            {
              type: "button",
              class: "delete",
              title: "Delete this conversation",
              "aria-label": `Delete conversation ${title}`,
              onclick: () => deleteConversation(meta.id, title),
            },
            "✕",
          ),
        );
      }),
    );
    if (!body.conversations.length) {
      list.append(el("li", { class: "empty" }, "No conversations yet."));
    }
  }

  function markCurrent() {
    for (const item of $("conversations").querySelectorAll("li[data-id]")) {
      item.classList.toggle("current", item.dataset.id === state.conversationId);
    }
  }

  async function openConversation(id) {
    if (state.streaming) return;
    notice("");
    try {
      const body = await A.getJson(`/api/v1/conversations/${encodeURIComponent(id)}`);
      state.conversationId = id;
      $("messages").replaceChildren(
        ...body.messages.map((message) => messageNode(message.role, message.content)),
      );
      markCurrent();
      scrollDown();
      $("input").focus();
    } catch (failure) {
      failed(failure);
    }
  }

  async function deleteConversation(id, title) {
    if (state.streaming) return;
    if (!window.confirm(`Delete the conversation "${title}"? This cannot be undone.`)) return;
    try {
      await A.request(`/api/v1/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
      if (state.conversationId === id) newConversation();
      await loadConversations();
    } catch (failure) {
      failed(failure);
    }
  }

  function newConversation() {
    if (state.streaming) return;
    state.conversationId = null;
    $("messages").replaceChildren();
    notice("");
    markCurrent();
    $("input").focus();
  }

  // ---- messages -----------------------------------------------------------------------
  function messageNode(role, text) {
    const body = el("div", { class: "body" });
    if (role === "assistant") A.renderMarkdown(text, body);
    else body.textContent = text;
    return el("li", { class: `message ${role}` }, el("div", { class: "role" }, role), body);
  }

  function scrollDown() {
    const list = $("messages");
    list.scrollTop = list.scrollHeight;
  }

  function setStreaming(controller) {
    state.streaming = controller;
    $("send").hidden = Boolean(controller);
    $("stop").hidden = !controller;
    $("input").disabled = Boolean(controller);
  }

  // Server-sent events from a fetch body: yields {event, data} as they arrive.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  async function send(text) {
    performance.mark("appliance:send");
    notice("");
    const messages = $("messages");
    messages.append(messageNode("user", text));
    const answer = messageNode("assistant", "");
    answer.classList.add("pending");
    messages.append(answer);
    scrollDown();
    const body = answer.querySelector(".body");
    let received = "";
    let shown = false;
    const render = () => {
      state.renderQueued = null;
      A.renderMarkdown(received, body);
      scrollDown();
      if (!shown && received) {
        shown = true;
        // The next frame is when the first words are on screen (what the benchmark reads).
        requestAnimationFrame(() => performance.mark("appliance:first-token-shown"));
      }
    };
    const controller = new AbortController();
    setStreaming(controller);
    const payload = { message: text, stream: true };
    if (state.conversationId) payload.conversation_id = state.conversationId;
    if ($("model").value) payload.model = $("model").value;
    try {
      const response = await A.request("/api/v1/chat/send", {
        method: "POST",
        body: payload,
        signal: controller.signal,
      });
      for await (const { event, data } of events(response)) {
        if (event === "token") {
          received += data.text;
          // The first piece shows at once; later ones at most once a frame.
          if (received.length === data.text.length) render();
          else if (!state.renderQueued) state.renderQueued = requestAnimationFrame(render);
        } else if (event === "done") {
          state.conversationId = data.conversation_id;
          if (data.finish_reason === "length") {
            answer.append(el("p", { class: "note" }, "(the answer reached its length limit)"));
          }
        } else if (event === "error") {
          const error = data.error || {};
          const status = STATUS_OF_TYPE[error.type] || 500;
          throw new A.ApiFailure(status, error.code || "", error.message || "", null);
        }
      }
    } catch (failure) {
      if (failure.name === "AbortError") {
        answer.append(el("p", { class: "note" }, "(stopped)"));
      } else {
        answer.classList.add("failed");
        failed(failure);
      }
    } finally {
      if (state.renderQueued) cancelAnimationFrame(state.renderQueued);
      render();
      answer.classList.remove("pending");
      setStreaming(null);
      $("input").focus();
    }
    try {
      await loadConversations();
      markCurrent();
    } catch (failure) {
      failed(failure);
    }
  }

  function setUpComposer() {
    const input = $("input");
    const submit = () => {
      const text = input.value.trim();
      if (!text || state.streaming) return;
      input.value = "";
      send(text);
    };
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      submit();
    });
    input.addEventListener("keydown", (event) => {
      // Enter sends; Shift+Enter (and Enter while an input method composes) is a new line.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        submit();
      }
    });
    $("stop").addEventListener("click", () => {
      if (state.streaming) state.streaming.abort();
    });
    $("new-chat").addEventListener("click", newConversation);
    $("model").addEventListener("change", () => {
      sessionStorage.setItem(MODEL_SLOT, $("model").value);
    });
  }

  async function enter() {
    A.show(true);
    try {
      await Promise.all([loadModels(), loadConversations()]);
    } catch (failure) {
      failed(failure);
    }
    $("input").focus();
    document.body.dataset.ready = "true";
    performance.mark("appliance:interactive");
  }

  document.addEventListener("DOMContentLoaded", () => {
    setUpComposer();
    A.setUpSignIn(() => A.getJson("/v1/models"), enter);
    if (A.getKey()) enter();
    else {
      A.show(false);
      document.body.dataset.ready = "true";
    }
  });
})();
