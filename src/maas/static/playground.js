// maas-serve playground: tabs built from GET /v1/models; every call goes to this server only.
"use strict";

const TASKS = [
  // [tab id, title, template, task(s) a model must offer]
  ["image", "Image classification", "tpl-image", ["image-classification"]],
  ["embeddings", "Embeddings", "tpl-embeddings", ["embeddings"]],
  ["chat", "Chat", "tpl-chat", ["chat"]],
  ["completion", "Completion", "tpl-chat", ["completion"]],
  ["text2text", "Text2text", "tpl-text", ["text2text"]],
  ["textcls", "Text classification", "tpl-text", ["text-classification"]],
];

const state = { models: [], tab: null };
const $ = (sel, root = document) => root.querySelector(sel);
const base = new URL(".", window.location.href);  // works under a route prefix too
const endpoint = (path) => new URL(path, base).toString();

function apiKey() { return $("#api-key").value.trim(); }

function headers(extra = {}) {
  const h = { ...extra };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

// A readable message for a failed answer (401/413/503 and the rest), from the server's error body.
async function explain(resp) {
  let detail = "";
  try {
    const body = await resp.json();
    detail = (body.error && (body.error.message || body.error)) || JSON.stringify(body);
  } catch (e) { detail = resp.statusText; }
  if (resp.status === 401) {
    $("#key-box").hidden = false;
    return "This server needs an API key: enter it at the top right and try again. (" + detail + ")";
  }
  if (resp.status === 413) return "Too large for this server: " + detail;
  if (resp.status === 503) {
    const after = resp.headers.get("Retry-After");
    return "The model is busy or not ready" + (after ? ", retry in " + after + " s" : "") + ": " + detail;
  }
  return "Error " + resp.status + ": " + detail;
}

function shellQuote(s) { return "'" + String(s).replace(/'/g, "'\\''") + "'"; }
function pyStr(s) { return JSON.stringify(String(s)); }

function authCurl() { return apiKey() ? " -H " + shellQuote("Authorization: Bearer " + apiKey()) : ""; }
function pyKey() { return apiKey() ? pyStr(apiKey()) : '"none"'; }

function curlJson(path, body, stream) {
  return "curl -s" + (stream ? "N" : "") + " " + endpoint(path) + authCurl() +
    " -H 'Content-Type: application/json' -d " + shellQuote(JSON.stringify(body));
}

function pyRequests(path, body) {
  return ["import requests", "",
    "r = requests.post(" + pyStr(endpoint(path)) + ",",
    "                  headers=" + (apiKey() ? "{\"Authorization\": \"Bearer \" + " + pyStr(apiKey()) + "}" : "{}") + ",",
    "                  json=" + JSON.stringify(body) + ")",
    "print(r.json())"].join("\n");
}

function pyOpenAI(lines) {
  return ["from openai import OpenAI", "",
    "client = OpenAI(base_url=" + pyStr(endpoint("v1")) + ", api_key=" + pyKey() + ")", ...lines].join("\n");
}

async function copyText(text, button) {
  try { await navigator.clipboard.writeText(text); }
  catch (e) {  // not a secure context: the old way
    const ta = document.createElement("textarea");
    ta.value = text; document.body.appendChild(ta); ta.select(); document.execCommand("copy"); ta.remove();
  }
  const was = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = was; }, 1200);
}

function modelsFor(tasks) {
  const out = [];
  for (const m of state.models) {
    if (!tasks.some((t) => m.tasks.includes(t))) continue;
    out.push({ id: m.id, label: m.id + (m.demo_weights ? " (demo weights)" : "") + (m.ready ? "" : " (not ready)"), card: m });
    for (const v of m.versions || []) {
      if ((m.versions || []).length > 1) out.push({ id: v.id, label: "  " + v.id + " (pinned)", card: m });
    }
  }
  return out;
}

function isDemo(modelId) {
  const name = modelId.split("@")[0];
  const card = state.models.find((m) => m.id === name);
  if (!card) return false;
  const version = modelId.includes("@") && (card.versions || []).find((v) => v.id === modelId);
  return version ? version.demo_weights : card.demo_weights;
}

// The result area: meta line (latency, model/version, demo badge), content, copy buttons.
function resultBox(panel) {
  let box = $("#result", panel);
  if (!box) { box = document.createElement("div"); box.id = "result"; box.className = "result"; panel.appendChild(box); }
  box.innerHTML = "";
  return box;
}

function showMeta(box, info) {
  const meta = document.createElement("div");
  meta.className = "meta"; meta.dataset.testid = "meta";
  const parts = [];
  if (info.latency_ms !== undefined) parts.push("<span data-testid='latency'>" + info.latency_ms.toFixed(0) + " ms</span>");
  if (info.ttft_ms !== undefined) parts.push("<span>first token " + info.ttft_ms.toFixed(0) + " ms</span>");
  parts.push("<span>model <b data-testid='answered-model'>" + escapeHtml(info.model || "?") + "</b>" +
             (info.version ? " version <b data-testid='answered-version'>" + escapeHtml(info.version) + "</b>" : "") + "</span>");
  if (info.demo) parts.push("<span class='badge' data-testid='demo-badge'>demo weights: outputs are meaningless</span>");
  meta.innerHTML = parts.join("");
  box.prepend(meta);
}

function showCopies(box, curl, python) {
  const wrap = document.createElement("div");
  wrap.className = "copy";
  const b1 = document.createElement("button"); b1.textContent = "Copy as curl"; b1.dataset.testid = "copy-curl";
  const b2 = document.createElement("button"); b2.textContent = "Copy as Python"; b2.dataset.testid = "copy-python";
  b1.onclick = () => copyText(curl, b1); b2.onclick = () => copyText(python, b2);
  wrap.append(b1, b2);
  const details = document.createElement("details");
  details.innerHTML = "<summary>Show the call</summary>";
  const p1 = document.createElement("pre"); p1.dataset.testid = "curl"; p1.textContent = curl;
  const p2 = document.createElement("pre"); p2.dataset.testid = "python"; p2.textContent = python;
  details.append(p1, p2);
  box.append(wrap, details);
}

function showError(box, message) {
  const e = document.createElement("div"); e.className = "error"; e.dataset.testid = "error"; e.textContent = message;
  box.appendChild(e);
}

function escapeHtml(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

function bars(rows) {
  return rows.map((r) => "<div class='bar' data-testid='top-k-row'><span data-testid='label'>" + escapeHtml(r.label) +
    "</span><div class='track'><div class='fill' style='width:" + (100 * r.score).toFixed(1) + "%'></div></div><span>" +
    (100 * r.score).toFixed(1) + " %</span></div>").join("");
}

// One answer into the result box: the refusal as a sentence, or render(out, body) with the meta
// line and the copy buttons; the body is kept on the box (data-json) for whoever checks it.
async function show(box, resp, latency_ms, curl, python, render) {
  if (!resp.ok) { showError(box, await explain(resp)); showCopies(box, curl, python); return; }
  const body = await resp.json();
  const out = document.createElement("div"); out.dataset.testid = "output";
  render(out, body);
  box.appendChild(out);
  showMeta(box, { latency_ms, ...answered(resp, body), demo: body.demo_weights });
  showCopies(box, curl, python);
  box.dataset.json = JSON.stringify(body);
}

async function postJson(path, body) {
  const started = performance.now();
  const resp = await fetch(endpoint(path), { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
  return { resp, latency_ms: performance.now() - started };
}

function answered(resp, body) {
  return { model: body.model, version: resp.headers.get("X-Maas-Model-Version") || body.model_version };
}

// ------------------------------------------------------------------ the tabs

const RUN = {
  async image(panel) {
    const model = $("#model", panel).value;
    const topK = parseInt($("#top-k", panel).value || "5", 10);
    const file = state.file;
    const box = resultBox(panel);
    if (!file) { showError(box, "Choose or drop a photo first."); return; }
    const form = new FormData();
    form.append("model", model); form.append("top_k", String(topK)); form.append("file", file, file.name);
    const started = performance.now();
    const resp = await fetch(endpoint("v1/classifications/image"), { method: "POST", headers: headers(), body: form });
    const latency_ms = performance.now() - started;
    const curl = "curl -s " + endpoint("v1/classifications/image") + authCurl() + " -F model=" + shellQuote(model) +
      " -F top_k=" + topK + " -F " + shellQuote("file=@" + file.name);
    const python = ["import requests", "",
      "with open(" + pyStr(file.name) + ", \"rb\") as f:",
      "    r = requests.post(" + pyStr(endpoint("v1/classifications/image")) + ",",
      "                      headers=" + (apiKey() ? "{\"Authorization\": \"Bearer \" + " + pyStr(apiKey()) + "}" : "{}") + ",",
      "                      data={\"model\": " + pyStr(model) + ", \"top_k\": " + topK + "}, files={\"file\": f})",
      "print(r.json())"].join("\n");
    await show(box, resp, latency_ms, curl, python, (out, body) => { out.innerHTML = bars(body.data[0].top_k); });
  },

  async embeddings(panel) {
    const model = $("#model", panel).value;
    const input = [$("#text-a", panel).value, $("#text-b", panel).value];
    const box = resultBox(panel);
    const req = { model, input };
    const curl = curlJson("v1/embeddings", req);
    const python = pyOpenAI(["", "r = client.embeddings.create(model=" + pyStr(model) + ", input=" + JSON.stringify(input) + ")",
      "a, b = (d.embedding for d in r.data)",
      "print(sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5)"]);
    const { resp, latency_ms } = await postJson("v1/embeddings", req);
    await show(box, resp, latency_ms, curl, python, (out, body) => {
      const [a, b] = body.data.map((d) => d.embedding);
      let dot = 0, na = 0, nb = 0;
      for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
      out.innerHTML = "<div>cosine similarity</div><div class='cosine' data-testid='cosine'>" + (dot / Math.sqrt(na * nb)).toFixed(4) +
        "</div><div class='meta'>" + a.length + " dimensions, " + body.usage.prompt_tokens + " tokens</div>";
    });
  },

  async chat(panel, completion = false) {
    const model = $("#model", panel).value;
    const text = $("#prompt", panel).value;
    const maxTokens = parseInt($("#max-tokens", panel).value || "64", 10);
    const box = resultBox(panel);
    const path = completion ? "v1/completions" : "v1/chat/completions";
    const req = completion ? { model, prompt: text, max_tokens: maxTokens, stream: true }
                           : { model, messages: [{ role: "user", content: text }], max_tokens: maxTokens, stream: true };
    const temperature = $("#temperature", panel).value;
    if (temperature !== "") req.temperature = parseFloat(temperature);
    const pyTemp = temperature !== "" ? ", temperature=" + parseFloat(temperature) : "";
    const curl = curlJson(path, req, true);
    const python = completion
      ? pyOpenAI(["", "for chunk in client.completions.create(model=" + pyStr(model) + ", prompt=" + pyStr(text) +
                  ", max_tokens=" + maxTokens + pyTemp + ", stream=True):", "    print(chunk.choices[0].text if chunk.choices else \"\", end=\"\", flush=True)", "print()"])
      : pyOpenAI(["", "stream = client.chat.completions.create(", "    model=" + pyStr(model) + ",",
                  "    messages=[{\"role\": \"user\", \"content\": " + pyStr(text) + "}],",
                  "    max_tokens=" + maxTokens + pyTemp + ", stream=True)", "for chunk in stream:",
                  "    print((chunk.choices[0].delta.content or \"\") if chunk.choices else \"\", end=\"\", flush=True)", "print()"]);
    const started = performance.now();
    const resp = await fetch(endpoint(path), { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(req) });
    if (!resp.ok) { showError(box, await explain(resp)); showCopies(box, curl, python); return; }
    const answer = document.createElement("div"); answer.className = "answer"; answer.dataset.testid = "output";
    box.appendChild(answer);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", first = null, last = {}, chunks = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { showError(box, chunk.error.message || JSON.stringify(chunk.error)); continue; }
          last = chunk;
          for (const c of chunk.choices || []) {
            const piece = completion ? c.text : (c.delta && c.delta.content) || "";
            if (piece && first === null) first = performance.now() - started;
            answer.textContent += piece;
          }
          chunks += 1;
          answer.dataset.chunks = String(chunks);
        }
      }
    }
    answer.dataset.done = "true";
    showMeta(box, { latency_ms: performance.now() - started, ttft_ms: first === null ? undefined : first,
                    model: last.model, version: resp.headers.get("X-Maas-Model-Version") || last.model_version,
                    demo: last.demo_weights });
    showCopies(box, curl, python);
  },

  async completion(panel) { return RUN.chat(panel, true); },

  async text2text(panel) {
    const model = $("#model", panel).value;
    const req = { model, input: $("#prompt", panel).value };
    const box = resultBox(panel);
    const curl = curlJson("v1/text2text", req), python = pyRequests("v1/text2text", req);
    const { resp, latency_ms } = await postJson("v1/text2text", req);
    await show(box, resp, latency_ms, curl, python, (out, body) => {
      out.className = "answer"; out.textContent = body.data[0].text;
    });
  },

  async textcls(panel) {
    const model = $("#model", panel).value;
    const req = { model, input: $("#prompt", panel).value };
    const box = resultBox(panel);
    const curl = curlJson("v1/classifications/text", req), python = pyRequests("v1/classifications/text", req);
    const { resp, latency_ms } = await postJson("v1/classifications/text", req);
    await show(box, resp, latency_ms, curl, python, (out, body) => { out.innerHTML = bars(body.data[0].top_k); });
  },
};

function wireImage(panel) {
  const drop = $("#drop", panel), input = $("#file", panel), preview = $("#preview", panel);
  const take = (file) => {
    if (!file) return;
    state.file = file;
    preview.src = URL.createObjectURL(file); preview.hidden = false;
  };
  input.addEventListener("change", () => take(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); take(e.dataTransfer.files[0]); });
}

function openTab(id) {
  const [, title, tpl, tasks] = TASKS.find((t) => t[0] === id);
  state.tab = id; state.file = null;
  for (const b of document.querySelectorAll("#tabs button")) b.setAttribute("aria-selected", String(b.dataset.tab === id));
  const panel = $("#panel");
  panel.hidden = false;
  panel.innerHTML = "";
  panel.dataset.tab = id;
  panel.appendChild($("#" + tpl).content.cloneNode(true));
  const select = $("#model", panel);
  for (const m of modelsFor(tasks)) {
    const o = document.createElement("option"); o.value = m.id; o.textContent = m.label; select.appendChild(o);
  }
  // prefer a real model over demo weights
  const real = modelsFor(tasks).find((m) => !isDemo(m.id));
  if (real) select.value = real.id;
  if (id === "image") wireImage(panel);
  if (id === "textcls") $("#prompt", panel).value = "What a wonderful, heartfelt film.";
  if (id === "text2text") $("#prompt", panel).value = "translate English to German: The house is wonderful.";
  const run = $("#run", panel);
  run.onclick = async () => {
    run.disabled = true;
    try { await RUN[id](panel); }
    catch (e) { showError(resultBox(panel), "The request did not complete: " + e); }
    finally { run.disabled = false; }
  };
  document.title = title + " · maas-serve playground";
}

async function loadModels() {
  const status = $("#status");
  let resp;
  try { resp = await fetch(endpoint("v1/models"), { headers: headers() }); }
  catch (e) { status.textContent = "The server does not answer: " + e; return; }
  if (!resp.ok) { status.textContent = await explain(resp); return; }
  state.models = (await resp.json()).data;
  const tabs = $("#tabs");
  tabs.innerHTML = "";
  const present = TASKS.filter(([, , , tasks]) => state.models.some((m) => tasks.some((t) => m.tasks.includes(t))));
  for (const [id, title] of present) {
    const b = document.createElement("button");
    b.textContent = title; b.dataset.tab = id; b.dataset.testid = "tab-" + id; b.setAttribute("role", "tab");
    b.onclick = () => openTab(id);
    tabs.appendChild(b);
  }
  status.textContent = state.models.length + " models: " + state.models.map((m) => m.id + (m.ready ? "" : " (not ready)")).join(", ");
  if (state.tab && present.some(([id]) => id === state.tab)) {  // a reload (new API key) keeps the open tab
    for (const b of tabs.children) b.setAttribute("aria-selected", String(b.dataset.tab === state.tab));
  } else if (present.length) openTab(present[0][0]);
}

$("#api-key").addEventListener("change", loadModels);
loadModels();
