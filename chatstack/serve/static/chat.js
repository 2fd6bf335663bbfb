// The chat page: multi-turn conversation, streamed replies, system prompt, temperature, stop button, and
// images (file picker or paste) sent as OpenAI image_url parts with data: URLs (a vision model reads them).
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];          // [{role, content}] of finished turns (user and assistant); content: string or parts
let controller = null;     // AbortController of the reply being streamed
let attached = [];         // data: URLs of the images waiting for the next message

function bubble(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label);
  for (const url of images) {
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = url;
    img.alt = "attached image";
    div.append(img);
  }
  div.append(body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("input").disabled = busy;
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attached.forEach((url, i) => {
    const wrap = document.createElement("span");
    wrap.className = "att";
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    const rm = document.createElement("button");
    rm.type = "button";
    rm.className = "secondary";
    rm.textContent = "×";
    rm.title = "remove";
    rm.addEventListener("click", () => { attached.splice(i, 1); showAttachments(); });
    wrap.append(img, rm);
    box.append(wrap);
  });
}

function attachFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => { attached.push(reader.result); showAttachments(); };
  reader.readAsDataURL(file);
}

async function send(text) {
  const model = chatstack.model || await chatstack.loadModel();
  const images = attached;
  attached = [];
  showAttachments();
  // images first, then the question: the order the vision model was trained on
  const content = images.length
    ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  history.push({ role: "user", content });
  bubble("user", text, images);
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
$("attach").addEventListener("click", () => $("image-file").click());
$("image-file").addEventListener("change", (ev) => {
  for (const f of ev.target.files) attachFile(f);
  ev.target.value = "";                                    // picking the same file again fires change again
});
$("input").addEventListener("paste", (ev) => {
  const files = [...(ev.clipboardData ? ev.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
  if (!files.length) return;                               // plain text pastes as usual
  ev.preventDefault();
  files.forEach(attachFile);
});
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  attached = [];
  showAttachments();
  $("messages").replaceChildren();
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

chatstack.initKey();
chatstack.loadModel();
