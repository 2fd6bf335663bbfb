// The chat page: multi-turn conversation, streamed replies, system prompt, temperature, stop button.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];          // [{role, content}] of finished turns (user and assistant)
let controller = null;     // AbortController of the reply being streamed

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("input").disabled = busy;
}

async function send(text) {
  const model = chatstack.model || await chatstack.loadModel();
  history.push({ role: "user", content: text });
  bubble("user", text);
  const div = bubble("assistant", "");
  const body = div.querySelector(".content");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  controller = new AbortController();
  setBusy(true);
  let reply = "", reason = null;
  const t0 = performance.now();
  try {
    await chatstack.postSSE("/v1/chat/completions", {
      model, messages, stream: true,
      temperature: parseFloat($("temperature").value),
      max_tokens: parseInt($("max-tokens").value, 10) || undefined,
    }, controller.signal, (chunk) => {
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          body.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    });
  } catch (e) {
    if (e.name === "AbortError") {
      reason = "stopped";
    } else {
      div.classList.add("error");
      body.textContent = reply + (reply ? "\n" : "") + "Error: " + e.message;
      reason = "error";
    }
  } finally {
    controller = null;
    setBusy(false);
    $("input").focus();
  }
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${reason || "done"} · ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  div.append(meta);
  div.dataset.finish = reason || "done";
  if (reason === "error") history.pop();                 // the failed turn is not part of the conversation
  else history.push({ role: "assistant", content: reply });
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });   // the server cancels the row
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

chatstack.initKey();
chatstack.loadModel();
