// The ranking page: sample K answers to a prompt, let a person order them, append the ranking to the
// server's rankings file as {"prompt": [messages], "responses": [best, ..., worst]}.
"use strict";

const $ = (id) => document.getElementById(id);
let promptMessages = null;   // the messages the shown answers were sampled for
let promptIndex = -1;        // position in the server's prompts file

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = "status" + (isError ? " error" : "");
}

function renumber() {
  [...$("answers").children].forEach((li, i) => { li.querySelector(".pos").textContent = (i + 1) + "."; });
}

function move(li, delta) {
  const list = $("answers");
  if (delta < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
  if (delta > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
  renumber();
}

function showAnswers(responses) {
  const list = $("answers");
  list.replaceChildren();
  responses.forEach((text, i) => {
    const li = document.createElement("li");
    li.draggable = true;
    li.dataset.original = i;
    const pos = document.createElement("span");
    pos.className = "pos";
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text === "" ? "(empty answer)" : text;
    body.dataset.text = text;
    const moves = document.createElement("span");
    moves.className = "moves";
    const up = document.createElement("button");
    up.className = "up secondary"; up.type = "button"; up.textContent = "▲"; up.title = "better";
    up.onclick = () => move(li, -1);
    const down = document.createElement("button");
    down.className = "down secondary"; down.type = "button"; down.textContent = "▼"; down.title = "worse";
    down.onclick = () => move(li, +1);
    moves.append(up, down);
    li.append(pos, body, moves);
    li.addEventListener("dragstart", () => li.classList.add("dragging"));
    li.addEventListener("dragend", () => { li.classList.remove("dragging"); renumber(); });
    list.append(li);
  });
  renumber();
  $("submit").disabled = $("skip").disabled = responses.length < 2;
}

$("answers").addEventListener("dragover", (ev) => {
  ev.preventDefault();
  const dragging = document.querySelector("#answers li.dragging");
  if (!dragging) return;
  const after = [...$("answers").children].find(
    (li) => li !== dragging && ev.clientY < li.getBoundingClientRect().top + li.offsetHeight / 2);
  $("answers").insertBefore(dragging, after || null);
});

async function sample() {
  const text = $("prompt").value.trim();
  if (!text) { status("type a prompt first", true); return; }
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: text });
  $("sample").disabled = true;
  status("sampling…");
  try {
    const out = await chatstack.postJSON("/rank/api/sample", {
      messages, k: parseInt($("k").value, 10) || 4, temperature: parseFloat($("temperature").value),
      max_tokens: parseInt($("max-tokens").value, 10) || 128,
    });
    promptMessages = out.prompt;
    showAnswers(out.responses);
    const dup = out.duplicates ? ` (${out.duplicates} duplicate${out.duplicates > 1 ? "s" : ""} dropped)` : "";
    status(out.responses.length < 2 ? `only ${out.responses.length} distinct answer${dup}: sample again`
                                    : `${out.responses.length} answers${dup}: order them, then save`);
  } catch (e) {
    status(e.message, true);
  } finally {
    $("sample").disabled = false;
  }
}

async function submit() {
  const responses = [...$("answers").children].map((li) => li.querySelector(".text").dataset.text);
  $("submit").disabled = true;
  try {
    const out = await chatstack.postJSON("/rank/api/submit", { prompt: promptMessages, responses });
    const saved = `saved: ${out.ranked} ranking(s) in ${out.rankings}`;
    status(saved);
    $("file-info").textContent = `${out.ranked} ranking(s) in ${out.rankings}`;
    $("answers").replaceChildren();
    $("skip").disabled = true;
    if (promptIndex >= 0) nextPrompt(saved + " · ");
  } catch (e) {
    status(e.message, true);
    $("submit").disabled = false;
  }
}

async function nextPrompt(prefix = "") {
  try {
    const out = await chatstack.getJSON(`/rank/api/prompt?index=${promptIndex + 1}`);
    promptIndex = out.index;
    const msgs = out.messages;
    const sys = msgs.find((m) => m.role === "system");
    $("system").value = sys ? sys.content : "";
    $("prompt").value = msgs.filter((m) => m.role !== "system").map((m) => m.content).join("\n\n");
    status(`${prefix}prompt ${out.index + 1} of ${out.total}`);
  } catch (e) {
    status(e.message, true);
  }
}

async function loadConfig() {
  try {
    const cfg = await chatstack.getJSON("/rank/api/config");
    $("file-info").textContent = cfg.rankings ? `${cfg.ranked} ranking(s) in ${cfg.rankings}`
                                              : "no rankings file: start the server with --rankings FILE";
    $("next-prompt").disabled = !cfg.prompts;
  } catch (e) {
    $("file-info").textContent = e.message;
  }
}

$("sample").addEventListener("click", sample);
$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", () => { $("answers").replaceChildren(); $("submit").disabled = $("skip").disabled = true; if (promptIndex >= 0) nextPrompt(); });
$("next-prompt").addEventListener("click", () => nextPrompt());
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

chatstack.initKey();
chatstack.loadModel();
loadConfig();
