// Shared by the chat and rank pages: API key storage, the model id, JSON and SSE requests.
"use strict";

const chatstack = (() => {
  const keyInput = () => document.getElementById("api-key");

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = (keyInput() && keyInput().value.trim()) || "";
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function initKey() {
    const el = keyInput();
    if (!el) return;
    el.value = localStorage.getItem("chatstack.apiKey") || "";
    el.addEventListener("change", () => { localStorage.setItem("chatstack.apiKey", el.value.trim()); loadModel(); });
  }

  let model = null;
  async function loadModel() {
    const label = document.getElementById("model");
    try {
      const data = await getJSON("/v1/models");
      model = data.data[0].id;
      if (label) label.textContent = "model: " + model;
    } catch (e) {
      if (label) label.textContent = e.message;
    }
    return model;
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error) return `${resp.status}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  async function getJSON(url) {
    const resp = await fetch(url, { headers: headers() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    return resp.json();
  }

  async function postJSON(url, body, signal) {
    const resp = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    return resp.json();
  }

  // POST and read a text/event-stream: calls onEvent(parsed JSON) per "data:" line until [DONE].
  async function postSSE(url, body, signal, onEvent) {
    const resp = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          onEvent(obj);
        }
      }
    }
  }

  return { initKey, loadModel, getJSON, postJSON, postSSE, get model() { return model; } };
})();
