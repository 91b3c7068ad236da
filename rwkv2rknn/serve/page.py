"""The chat page served at `/`: plain HTML and JavaScript, no build step, no outside resources.

It keeps the conversation in the browser and sends the whole of it with every turn (as any OpenAI client does);
the server's state cache makes a follow-up turn compute only the new message. Replies stream in through fetch()
reading the server-sent events. The status line shows each turn's prompt tokens, cached and computed.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rwkv2rknn chat</title>
<style>
  [hidden] { display: none !important; }
  :root { font-family: system-ui, sans-serif; color: #1d232a; background: #f4f5f7; }
  body { margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { padding: 8px 16px; background: #20303f; color: #fff; display: flex; gap: 16px; align-items: center;
           flex-wrap: wrap; font-size: 14px; }
  header b { font-size: 16px; }
  header label { display: flex; gap: 4px; align-items: center; }
  header input { width: 64px; }
  #key { width: 140px; }
  #log { flex: 1; overflow-y: auto; padding: 16px; display: flex; flex-direction: column; gap: 10px; }
  .msg { max-width: 80%; padding: 8px 12px; border-radius: 10px; white-space: pre-wrap; word-break: break-word;
         font-family: ui-monospace, monospace; font-size: 14px; line-height: 1.35; }
  .user { align-self: flex-end; background: #2f6fdb; color: #fff; }
  .assistant { align-self: flex-start; background: #fff; border: 1px solid #d6dae0; min-height: 1.3em; }
  .error { align-self: center; color: #a4161a; }
  footer { display: flex; gap: 8px; padding: 12px 16px; background: #fff; border-top: 1px solid #d6dae0; }
  #input { flex: 1; resize: none; height: 3.2em; font: inherit; padding: 6px; }
  button { padding: 0 16px; font: inherit; }
  #status { padding: 4px 16px; font-size: 12px; color: #4d5560; background: #fff; min-height: 1.2em; }
</style>
</head>
<body>
<header>
  <b>rwkv2rknn</b><span id="model">(loading)</span>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="1"></label>
  <label>top_p <input id="top_p" type="number" min="0" max="1" step="0.05" value="0.3"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" value="200"></label>
  <label id="keybox" hidden>API key <input id="key" type="password" autocomplete="off"></label>
  <button id="new" type="button">New chat</button>
</header>
<div id="log" aria-live="polite"></div>
<div id="status" data-state="idle"></div>
<footer>
  <textarea id="input" placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea>
  <button id="send" type="button">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</footer>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, history = [], controller = null;
$("key").value = localStorage.getItem("rwkv2rknn-key") || "";

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
function status(text, state) { $("status").textContent = text; $("status").dataset.state = state; }
function add(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}
async function loadModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (r.status === 401) { $("keybox").hidden = false; status("this server needs an API key", "auth"); return; }
  const j = await r.json();
  model = j.data[0].id;
  $("model").textContent = model;
  status("ready", "idle");
}
async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  if (!model) { await loadModel(); if (!model) return; }
  localStorage.setItem("rwkv2rknn-key", $("key").value.trim());
  $("input").value = "";
  add("user", text);
  history.push({role: "user", content: text});
  const bubble = add("assistant", "");
  bubble.dataset.chunks = "0";
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  status("generating...", "busy");
  let content = "", usage = null, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model, messages: history, stream: true, stream_options: {include_usage: true},
                            temperature: +$("temperature").value, top_p: +$("top_p").value,
                            max_tokens: +$("max_tokens").value})});
    if (!r.ok) {
      const j = await r.json().catch(() => null);
      throw new Error((j && j.error && j.error.message) || ("HTTP " + r.status));
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.usage) usage = j.usage;
          for (const c of j.choices || []) {
            if (c.delta && c.delta.content) {
              content += c.delta.content;
              bubble.textContent = content;
              bubble.dataset.chunks = String(+bubble.dataset.chunks + 1);
              $("log").scrollTop = $("log").scrollHeight;
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    history.push({role: "assistant", content});
    let line = "done (" + finish + ")";
    if (usage) {
      const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
      line += " - prompt " + usage.prompt_tokens + " tokens: " + cached + " cached, " +
              (usage.prompt_tokens - cached) + " computed; " + usage.completion_tokens + " generated";
    }
    status(line, "done");
  } catch (e) {
    if (e.name === "AbortError") { history.push({role: "assistant", content}); status("stopped", "done"); }
    else { history.pop(); add("error", String(e.message || e)); status("error", "error"); }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}
$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("new").addEventListener("click", () => { history = []; $("log").textContent = ""; status("new chat", "idle"); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
loadModel().catch((e) => status("cannot reach the server: " + e, "error"));
</script>
</body>
</html>
"""
