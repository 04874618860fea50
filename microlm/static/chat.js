"use strict";
// The microlm chat page. It talks only to the microlm web server that served it (api/...), which
// holds the model server's address and key. Model output is inserted with textContent, never as HTML.

const $ = (id) => document.getElementById(id);
const state = { config: null, turns: [], controller: null, maxTokensEdited: false };

function node(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// Server-sent events: blocks end with a blank line, each holds "data: <json>" (parse_sse in 19a_web).
function parseSSE(buffer) {
  const events = [];
  let i;
  while ((i = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, i);
    buffer = buffer.slice(i + 2);
    const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
    if (data.length) events.push(JSON.parse(data.join("\n")));
  }
  return [events, buffer];
}

function modelInfo(id) {
  return (state.config && state.config.models.find((m) => m.id === id)) || { id, max_model_len: null };
}

function num(id) {
  const v = Number($(id).value);
  if ($(id).value === "" || !Number.isFinite(v)) throw new Error(`${$(id).parentElement.firstChild.textContent.trim()}: not a number`);
  return v;
}

function readExtra() {
  const text = $("extra").value.trim();
  if (!text) return {};
  let v;
  try { v = JSON.parse(text); } catch (e) { throw new Error(`extra parameters: not JSON (${e.message})`); }
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error('extra parameters: expected a JSON object such as {"seed": 1}');
  return v;
}

function notice(text) {
  const n = node("div", "notice", text);
  $("log").append(n);
  n.scrollIntoView({ block: "end" });
}

// ---- context limit -------------------------------------------------------------------------
function showContext(ev) {
  const info = modelInfo($("model").value);
  const box = $("context");
  box.replaceChildren();
  const ctx = (ev && ev.max_model_len) || info.max_model_len;
  if (!ctx) { box.textContent = "context: unknown"; return; }
  const meter = node("meter");
  meter.min = 0; meter.max = ctx; meter.value = ev ? ev.prompt_tokens + (ev.completion_tokens ?? ev.max_tokens) : 0;
  meter.high = ctx * 0.9;
  box.append(meter);
  let text = `context ${ctx} tokens`;
  if (ev) {
    const reply = ev.completion_tokens !== undefined ? `reply ${ev.completion_tokens}` : `reply ≤ ${ev.max_tokens}`;
    text = `prompt ${ev.prompt_tokens} + ${reply} of ${ctx} tokens`;
    if (ev.dropped_turns) text += ` · ${ev.dropped_turns} earlier turn${ev.dropped_turns > 1 ? "s" : ""} no longer fit and ${ev.dropped_turns > 1 ? "were" : "was"} not sent`;
  }
  box.append(node("span", "", text));
  box.dataset.dropped = ev ? ev.dropped_turns : 0;
}

// ---- the conversation ----------------------------------------------------------------------
const included = (t) => (t.status === "done" || t.status === "stopped") && t.assistant.length > 0;

function messagesFor(turn) {
  const msgs = [];
  const system = $("system").value.trim();
  if (system) msgs.push({ role: "system", content: system });
  for (const t of turn.prior) msgs.push({ role: "user", content: t.user }, { role: "assistant", content: t.assistant });
  msgs.push({ role: "user", content: turn.user });
  return msgs;
}

function addTurn(turn) {
  const box = node("div", "turn");
  const user = node("div", "msg user");
  user.append(node("div", "text", turn.user));
  const msg = node("div", "msg assistant");
  msg.dataset.status = "streaming";
  msg.dataset.chunks = "0";
  const text = node("div", "text");
  const stats = node("div", "stats", `${turn.model} · waiting for the first token…`);
  msg.append(node("div", "who", turn.model), text, stats);
  box.append(user, msg);
  $("log").append(box);
  turn.el = { box, msg, text, stats };
  box.scrollIntoView({ block: "end" });
}

function setStatus(turn, status) {
  turn.status = status;
  turn.el.msg.dataset.status = status;
}

function onMeta(turn, ev) {
  turn.prior.forEach((t, k) => {
    t.outside = k < ev.dropped_turns;
    t.el.box.classList.toggle("outside", t.outside);
    t.el.box.title = t.outside ? "outside the context window: no longer sent to the model" : "";
  });
  turn.meta = ev;
  turn.el.msg.dataset.promptTokens = ev.prompt_tokens;
  turn.el.msg.dataset.messagesSent = ev.messages_sent;
  showContext(ev);
}

function onDelta(turn, text) {
  turn.assistant += text;
  turn.el.text.textContent = turn.assistant;
  turn.el.msg.dataset.chunks = String(Number(turn.el.msg.dataset.chunks) + 1);
  turn.el.stats.textContent = `${turn.model} · writing…`;
  turn.el.box.scrollIntoView({ block: "end" });
}

const REASONS = { stop: "finished", length: "cut at max tokens" };

function onDone(turn, ev) {
  setStatus(turn, "done");
  turn.el.msg.dataset.model = ev.model || turn.model;
  const usage = ev.usage || {};
  const parts = [ev.model || turn.model];
  if (ev.ttft_s != null) parts.push(`${ev.ttft_s.toFixed(2)} s to first token`);
  if (ev.tok_s != null) parts.push(`${ev.tok_s.toFixed(0)} tok/s`);
  if (usage.completion_tokens != null) parts.push(`${usage.completion_tokens} tokens`);
  parts.push(REASONS[ev.finish_reason] || ev.finish_reason || "");
  turn.el.stats.textContent = parts.filter(Boolean).join(" · ");
  if (ev.json) {
    const ok = ev.json.parsed && ev.json.schema_errors.length === 0;
    const badge = node("div", ok ? "json ok" : "json bad",
      ok ? `valid JSON for the ${ev.json.schema} schema`
         : ev.json.parsed ? `JSON, but not the ${ev.json.schema} schema: ${ev.json.schema_errors.join("; ")}` : "not valid JSON");
    turn.el.msg.append(badge);
  }
  if (turn.meta) showContext({ ...turn.meta, completion_tokens: usage.completion_tokens });
}

function onStopped(turn) {
  setStatus(turn, "stopped");
  turn.el.stats.textContent = `${turn.model} · stopped by you`;
}

function onError(turn, message) {
  setStatus(turn, "error");
  turn.el.msg.insertBefore(node("div", "error", message), turn.el.stats);
  turn.el.stats.textContent = `${turn.model} · failed: this turn is not part of the conversation`;
  turn.el.box.scrollIntoView({ block: "end" });
  checkHealth();
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.busy = busy ? "1" : "0";
}

async function send() {
  if (state.controller) return;
  const text = $("input").value;
  if (!text.trim()) return;
  let body;
  try {
    body = { model: $("model").value, temperature: num("temperature"), top_p: num("top_p"),
             max_tokens: Math.round(num("max_tokens")), json_schema: $("json").value || null, extra: readExtra() };
  } catch (e) { notice(e.message); return; }
  const turn = { user: text, assistant: "", status: "streaming", model: body.model, prior: state.turns.filter(included) };
  body.messages = messagesFor(turn);
  state.turns.push(turn);
  addTurn(turn);
  $("input").value = "";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let finished = false;
  try {
    const r = await fetch("api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let events;
      [events, buffer] = parseSSE(buffer + decoder.decode(value, { stream: true }));
      for (const ev of events) {
        if (ev.type === "meta") onMeta(turn, ev);
        else if (ev.type === "delta") onDelta(turn, ev.text);
        else if (ev.type === "done") { onDone(turn, ev); finished = true; }
        else if (ev.type === "error") throw new Error(ev.message);
      }
    }
    if (!finished) throw new Error("the reply ended before it was complete: the microlm web server closed the connection");
  } catch (e) {
    if (controller.signal.aborted) onStopped(turn);
    else onError(turn, e instanceof TypeError ? `lost the connection to the microlm web server (${e.message})` : e.message);
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.turns = [];
  $("log").replaceChildren();
  showContext(null);
  $("input").focus();
}

function onModelChange() {
  const info = modelInfo($("model").value);
  const box = $("max_tokens");
  if (info.max_model_len) {
    box.max = info.max_model_len - 1;
    if (!state.maxTokensEdited) box.value = Math.min(128, Math.floor(info.max_model_len / 2));
  }
  showContext(null);
}

async function checkHealth() {
  const h = $("health");
  try {
    const r = await fetch("api/health");
    const j = await r.json();
    h.textContent = j.ok ? "model server: ready" : "model server: not answering";
    h.dataset.ok = j.ok ? "1" : "0";
  } catch (_) {
    h.textContent = "microlm web server: not reachable";
    h.dataset.ok = "0";
  }
}

async function init() {
  setBusy(false);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new").addEventListener("click", newChat);
  $("model").addEventListener("change", onModelChange);
  $("max_tokens").addEventListener("input", () => { state.maxTokensEdited = true; });
  try {
    const r = await fetch("api/config");
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `HTTP ${r.status}`);
    state.config = await r.json();
  } catch (e) {
    notice(`could not load the page's configuration from the microlm web server: ${e.message}`);
    return;
  }
  const cfg = state.config;
  $("model").replaceChildren(...cfg.models.map((m) => {
    const o = node("option", "", m.parent ? `${m.id} (adapter on ${m.parent})` : m.id);
    o.value = m.id;
    return o;
  }));
  for (const kind of Object.keys(cfg.schemas)) {
    const o = node("option", "", kind);
    o.value = kind;
    $("json").append(o);
  }
  if (!cfg.json_mode) {
    $("json").disabled = true;
    $("json").title = "JSON answers need constrained decoding: the vLLM server";
  }
  onModelChange();
  checkHealth();
  setInterval(checkHealth, 5000);
  document.body.dataset.ready = "1";
  $("input").focus();
}

init();
