// nlpserve demo page: plain browser JavaScript, no build step, no external resources.
"use strict";

const TASK_TITLES = { qa: "QA", detect: "detector", pos: "POS tagger", polarity: "polarity" };

// ----------------------------------------------------------------------------- API calls
class ApiError extends Error {}

// The API key of a server with NLPSERVE_API_KEYS_FILE: asked for after a 401, kept in this
// tab's sessionStorage (gone with the tab), sent as Authorization: Bearer.
const KEY_STORE = "nlpserve-api-key";

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORE) || "";
  } catch (e) { // storage blocked: the key lives as long as the page
    return $("api-key").dataset.key || "";
  }
}

function storeKey(key) {
  try {
    sessionStorage.setItem(KEY_STORE, key);
  } catch (e) {
    $("api-key").dataset.key = key;
  }
}

// A 401: show the key form and say what to do (the refused key, if any, is not kept).
function keyRequired() {
  const refused = storedKey() !== "";
  if (refused) storeKey("");
  $("key-form").hidden = false;
  return refused
    ? "The API key was not accepted: enter another one in the API key field at the top, then try again."
    : "This server requires an API key: enter it in the API key field at the top, then try again.";
}

// POST/GET JSON; any failure becomes an ApiError whose message is meant for people.
async function api(path, body) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = body === undefined
    ? { method: "GET", headers }
    : { method: "POST", headers, body: JSON.stringify(body) };
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`Could not reach the server (${e.message}).`);
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (resp.status === 401) throw new ApiError(keyRequired());
  if (!resp.ok) {
    throw new ApiError(errorMessage(resp, data));
  }
  if (data === null) throw new ApiError(`The server sent an unreadable answer (HTTP ${resp.status}).`);
  return data;
}

function errorMessage(resp, data) {
  let msg = null;
  if (data && data.error && data.error.message) msg = data.error.message;
  else if (data && typeof data.detail === "string") msg = data.detail;
  else if (data && Array.isArray(data.detail)) msg = data.detail.map((d) => d.msg).join("; ");
  const what = {
    413: "The request is too large",
    422: "The input was not accepted",
    429: "The server is busy; try again in a moment",
    501: "This feature is not available on this server",
    503: "The service is not ready",
    504: "The server did not answer in time",
  }[resp.status] || `Request failed (HTTP ${resp.status})`;
  return msg ? `${what}: ${msg}` : `${what}.`;
}

// ----------------------------------------------------------------------------- helpers
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(panel, message) {
  const box = panel.querySelector(".error");
  box.textContent = message;
  box.hidden = !message;
}

// What a click produced, in words, for screen readers: the panel's polite status region
// (role=status, visually hidden; present from the start, so that a change is announced).
// `parts`: strings and nodes (a Chinese answer goes in a lang="zh" span).
function announce(panel, ...parts) {
  panel.querySelector("[data-announce]").replaceChildren(...parts);
}

// The API's character offsets count Unicode code points (Python's str); a JS string counts
// UTF-16 code units, so every character outside the BMP (an emoji, a rare CJK ideograph) is
// two units. Returns `units` with units[i] = the UTF-16 index of code point i, for
// i = 0 .. number of code points (the last entry is text.length).
function utf16Indices(text) {
  const units = [0];
  let at = 0;
  for (const ch of text) { // iterates code points (a lone surrogate counts as one, as in Python)
    at += ch.length;
    units.push(at);
  }
  return units;
}

// The UTF-16 index of code point `cp` (clamped to the text).
function unitAt(units, cp) {
  return units[Math.max(0, Math.min(cp, units.length - 1))];
}

function pct(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// A window's text (start/end count code points: `units` is utf16Indices(text)), its first
// 40 code points only (40 UTF-16 units would cut an emoji's surrogate pair in two).
function clip(text, units, w) {
  const end = Math.min(w.end, w.start + 40);
  const part = text.slice(unitAt(units, w.start), unitAt(units, end));
  return end < w.end ? `${part}…` : part;
}

// Runs one panel action with the button marked busy and any error shown in the panel. The
// button gets aria-disabled, not disabled: disabling the focused button would drop a keyboard
// or screen reader user's focus to the top of the page.
function wire(formId, action) {
  const form = $(formId);
  const panel = form.closest(".panel");
  // The browser's own validation (e.g. evaluations under the minimum) blocks the submission
  // before "submit": the last attempt's error must not stay next to the browser's bubble.
  form.addEventListener("invalid", () => showError(panel, ""), true);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = form.querySelector("button");
    if (button.getAttribute("aria-disabled") === "true") return; // the last click still runs
    button.setAttribute("aria-disabled", "true");
    showError(panel, "");
    announce(panel);
    // A new attempt replaces the last result: never show a stale answer next to an error.
    panel.querySelector(".result").hidden = true;
    try {
      await action(panel);
    } catch (e) {
      announce(panel); // the error box (role=alert) speaks for itself
      showError(panel, e instanceof ApiError ? e.message : `Something went wrong: ${e.message}`);
    } finally {
      button.removeAttribute("aria-disabled");
    }
  });
}

const TOP_TOKENS = 10; // rows of the "largest SHAP values" table

// What a positive / negative SHAP value pushes towards, per explained panel.
const EXPLAINED_WORDS = { detect: ["machine", "human"], polarity: ["positive", "negative"] };

// Each [data-explanation="<panel>"] becomes the template's SHAP block, its parts given the ids
// <panel>-explain-status, <panel>-tokens, <panel>-legend and <panel>-top.
function mountExplanations() {
  const template = $("explanation-template");
  for (const slot of document.querySelectorAll("[data-explanation]")) {
    const prefix = slot.dataset.explanation;
    const [posWord, negWord] = EXPLAINED_WORDS[prefix];
    const block = template.content.cloneNode(true);
    for (const part of block.querySelectorAll("[data-part]")) {
      const name = part.dataset.part;
      if (name === "pos-word") part.replaceWith(posWord);
      else if (name === "neg-word") part.replaceWith(negWord);
      else part.id = `${prefix}-${name}`;
    }
    slot.replaceWith(block);
  }
}
mountExplanations();

// "+0.1234" / "-0.1234": the sign in text, never only in colour.
function signed(v) {
  return (v >= 0 ? "+" : "") + v.toFixed(4);
}

// Tokens of `text` as spans coloured by SHAP value: rgb --pos for positive values (solid
// underline), --neg for negative (dotted underline), opacity 0.1 .. 0.6 growing with |value| /
// max |value| (at most 0.6: the text on the strongest token keeps a contrast of 5.4:1 or more
// with each of the four colours; at 0.85 it fell to 3.5:1, under WCAG's 4.5:1). Each span is
// focusable (one tab stop for the whole text, arrow keys move between tokens) and names its
// value for screen readers. Returns [{ text, value }] per token.
function renderShap(container, text, exp, posWord, negWord) {
  container.replaceChildren();
  const maxAbs = Math.max(1e-12, ...exp.values.map((v) => Math.abs(v)));
  const offsets = exp.offsets || null;
  const units = offsets ? utf16Indices(text) : null;
  const shown = [];
  let pos = 0;
  exp.tokens.forEach((tok, i) => {
    const v = exp.values[i];
    if (offsets) {
      const s = unitAt(units, offsets[i][0]);
      const e = unitAt(units, offsets[i][1]);
      if (s > pos) container.append(text.slice(pos, s)); // the text between tokens, as typed
      tok = text.slice(s, e);
      pos = e;
    } else if (i > 0) {
      container.append(" ");
    }
    const span = el("span", `tok ${v >= 0 ? "pos" : "neg"}`, tok);
    const alpha = (0.1 + 0.5 * Math.abs(v) / maxAbs).toFixed(3);
    const rgb = v >= 0 ? "var(--pos)" : "var(--neg)";
    span.style.backgroundColor = `rgba(${rgb}, ${alpha})`;
    const towards = v >= 0 ? posWord : negWord;
    const label = `SHAP ${signed(v)} (towards ${towards})`;
    span.title = label;
    span.dataset.label = label;
    span.dataset.value = String(v);
    span.tabIndex = i === 0 ? 0 : -1;
    span.setAttribute("role", "img"); // a named, focusable item; its name carries the value
    span.setAttribute("aria-roledescription", "token");
    span.setAttribute("aria-label", `${tok.trim() || JSON.stringify(tok)}: ${signed(v)}, towards ${towards}`);
    container.append(span);
    shown.push({ text: tok, value: v });
  });
  if (offsets && pos < text.length) {
    const rest = text.slice(pos);
    // A truncated text: the unexplained tail is shown faded.
    container.append(exp.truncated ? el("span", "muted", rest) : rest);
  }
  return shown;
}

// The hover/focus card (CSS ::after, text from data-label) starts at the token's left edge;
// near the right edge of a narrow screen it would stick out and widen the page. Shift it left
// to end inside the text's box (its width is measured on a hidden probe with the same style).
let cardProbe = null;
function placeCard(tok, container) {
  if (!cardProbe) {
    cardProbe = el("span", "tok-card-probe");
    cardProbe.setAttribute("aria-hidden", "true");
    document.body.append(cardProbe);
  }
  cardProbe.textContent = tok.dataset.label || "";
  const box = container.getBoundingClientRect();
  const width = Math.min(cardProbe.getBoundingClientRect().width, box.width);
  const left = tok.getBoundingClientRect().left;
  const shift = Math.max(box.left - left, Math.min(0, box.right - (left + width)));
  tok.style.setProperty("--card-shift", `${Math.round(shift)}px`);
  tok.style.setProperty("--card-max", `${Math.floor(box.width)}px`);
}

// A SHAP text's tokens: one tab stop (Tab enters at the last token visited), the arrow keys
// and Home/End move between tokens, Tab again leaves the text. Escape hides the value card
// (it covers the line above; WCAG 1.4.13) until another token is hovered or focused.
function wireTokens(container) {
  for (const type of ["mouseover", "focusin"]) {
    container.addEventListener(type, (ev) => {
      if (!ev.target.classList.contains("tok")) return;
      container.classList.remove("card-off");
      placeCard(ev.target, container);
    });
  }
  container.addEventListener("keydown", (ev) => {
    const toks = [...container.querySelectorAll(".tok")];
    const at = toks.indexOf(document.activeElement);
    if (at < 0) return;
    const to = {
      ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1,
      Home: 0, End: toks.length - 1,
    }[ev.key];
    if (to === undefined) return;
    ev.preventDefault();
    const next = toks[Math.max(0, Math.min(to, toks.length - 1))];
    toks[at].tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  });
}

// The tokens with the largest |SHAP value|, as a table (readable without hover or colour).
function renderTopTokens(details, shown, posWord, negWord) {
  const rows = shown
    .map((t, i) => ({ ...t, i }))
    .sort((a, b) => Math.abs(b.value) - Math.abs(a.value) || a.i - b.i)
    .slice(0, TOP_TOKENS);
  const body = details.querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = el("tr", r.value >= 0 ? "pos" : "neg");
    tr.append(
      el("td", "tok-text", r.text),
      el("td", "num", signed(r.value)),
      el("td", null, r.value >= 0 ? `▲ ${posWord}` : `▼ ${negWord}`),
    );
    body.append(tr);
  }
  details.querySelector("summary").textContent =
    `The ${rows.length} token${rows.length === 1 ? "" : "s"} with the largest SHAP values`;
  details.hidden = rows.length === 0;
}

function explainSummary(exp) {
  const parts = [
    `base value ${exp.base_value.toFixed(4)} + sum of token values = ${exp.output.toFixed(4)}`,
    `${exp.evals ?? "?"} model evaluations`,
  ];
  if (exp.seconds !== undefined) parts.push(`${exp.seconds.toFixed(2)} s`);
  if (exp.cached) parts.push("cached");
  if (exp.truncated) parts.push("text truncated to what the model reads");
  return parts.join(" · ");
}

// ----------------------------------------------------------------------------- panels
wire("qa-form", async (panel) => {
  const context = $("qa-context").value;
  const question = $("qa-question").value;
  const out = await api("/v1/qa", { question, context, top_k: 3 });
  const passage = $("qa-passage");
  passage.replaceChildren();
  if (out.answer && out.end > out.start) {
    const units = utf16Indices(context); // start/end count code points
    const start = unitAt(units, out.start);
    const end = unitAt(units, out.end);
    passage.append(context.slice(0, start));
    passage.append(el("mark", "answer", context.slice(start, end)));
    passage.append(context.slice(end));
  } else {
    passage.append(context);
  }
  $("qa-answer").textContent = out.answer || "(no answer found)";
  $("qa-score").textContent = `score ${out.score.toFixed(3)}`;
  // the runners-up: a close second says the model hesitated
  const others = (out.answers || []).slice(1);
  const runnersUp = $("qa-others");
  runnersUp.replaceChildren();
  if (others.length) {
    runnersUp.append("Next best: ");
    others.forEach((a, i) => {
      if (i) runnersUp.append(", ");
      const span = el("span", null, a.answer);
      span.lang = "zh";
      runnersUp.append(span, ` (${a.score.toFixed(3)})`);
    });
  }
  runnersUp.hidden = others.length === 0;
  $("qa-result").hidden = false;
  const answer = out.answer ? el("span", null, out.answer) : "no answer found";
  if (out.answer) answer.lang = "zh";
  announce(panel, "Answer: ", answer, `, score ${out.score.toFixed(3)}.`);
});

// Shows a classifier's label and probability; returns them in words, for announce().
function showProbability(prefix, label, prob) {
  const badge = $(`${prefix}-label`);
  badge.textContent = label;
  badge.className = `label-badge ${label}`;
  $(`${prefix}-prob`).textContent = pct(prob);
  $(`${prefix}-meter`).style.width = pct(prob);
  return `${label}, ${EXPLAINED_WORDS[prefix][0]} probability ${pct(prob)}.`;
}

// Computes and shows the SHAP block; returns a one-line summary in words, for announce().
async function explainInto(prefix, endpoint, text, maxEvals) {
  const [posWord, negWord] = EXPLAINED_WORDS[prefix];
  const status = $(`${prefix}-explain-status`);
  const tokens = $(`${prefix}-tokens`);
  tokens.replaceChildren();
  $(`${prefix}-legend`).hidden = true;
  $(`${prefix}-top`).hidden = true;
  status.textContent = "Computing the SHAP explanation…";
  const body = { text };
  if (maxEvals) body.max_evals = maxEvals;
  try {
    const exp = await api(endpoint, body);
    const shown = renderShap(tokens, text, exp, posWord, negWord);
    renderTopTokens($(`${prefix}-top`), shown, posWord, negWord);
    $(`${prefix}-legend`).hidden = false;
    status.textContent = explainSummary(exp);
    const top = shown.reduce((a, b) => (Math.abs(b.value) > Math.abs(a.value) ? b : a), shown[0]);
    if (!top) return "SHAP explanation: no tokens.";
    const towards = top.value >= 0 ? posWord : negWord;
    return `SHAP explanation of ${shown.length} tokens ready; the strongest, ` +
      `"${top.text.trim()}", ${signed(top.value)} towards ${towards}.`;
  } catch (e) {
    status.textContent = "";
    throw e;
  }
}

wire("detect-form", async (panel) => {
  const text = $("detect-text").value;
  const evals = parseInt($("detect-evals").value, 10);
  // the whole text, window by window: a long one's parts are judged each on its own
  const out = await api("/v1/detect", { text, windows: true });
  const said = showProbability("detect", out.label, out.machine_probability);
  const windows = out.windows || [];
  const parts = $("detect-windows");
  const units = utf16Indices(text);
  parts.textContent =
    windows.length > 1
      ? `Read whole, in ${windows.length} windows of the model's length: ` +
        windows
          .map((w, i) => {
            const judged = `${w.label} ${pct(w.machine_probability)}`;
            return `${i + 1}. “${clip(text, units, w)}” ${judged}`;
          })
          .join("; ") +
        ". The explanation below is of the first window."
      : "";
  parts.hidden = windows.length <= 1;
  $("detect-result").hidden = false;
  announce(panel, `${said} Computing the SHAP explanation…`);
  const explained = await explainInto("detect", "/v1/detect/explain", text, evals || undefined);
  announce(panel, `${said} ${explained}`);
});

wire("pos-form", async (panel) => {
  const out = await api("/v1/pos", { text: $("pos-text").value });
  const box = $("pos-tagged");
  box.replaceChildren();
  out.tokens.forEach((tok, i) => {
    const word = el("span", "word");
    word.append(el("span", "w", tok), el("span", "t", out.tags[i]));
    box.append(word);
  });
  $("pos-result").hidden = false;
  announce(panel, `${out.tokens.length} word${out.tokens.length === 1 ? "" : "s"} tagged.`);
});

wire("polarity-form", async (panel) => {
  const text = $("polarity-text").value;
  const evals = parseInt($("polarity-evals").value, 10);
  const out = await api("/v1/polarity", { text });
  const said = showProbability("polarity", out.label, out.positive_probability);
  $("polarity-result").hidden = false;
  announce(panel, `${said} Computing the SHAP explanation…`);
  const explained = await explainInto("polarity", "/v1/polarity/explain", text, evals || undefined);
  announce(panel, `${said} ${explained}`);
});

wireTokens($("detect-tokens"));
wireTokens($("polarity-tokens"));
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape") return;
  for (const tokens of document.querySelectorAll(".tokens")) tokens.classList.add("card-off");
});

// ----------------------------------------------------------------------------- models
async function loadModels() {
  const status = $("models-status");
  let models, data;
  try {
    data = await api("/v1/models");
    models = Array.isArray(data) ? data : data.models || [];
  } catch (e) {
    status.textContent = `Could not list the models: ${e.message}`;
    status.classList.add("error");
    return false;
  }
  // The server's own SHAP budget limit bounds the evaluations inputs (the HTML says 1000).
  const limit = data && data.explain && data.explain.max_evals_limit;
  if (limit) for (const id of ["detect-evals", "polarity-evals"]) $(id).max = String(limit);
  const byTask = {};
  for (const m of models) if (m.task && !byTask[m.task]) byTask[m.task] = m;
  for (const panel of document.querySelectorAll(".panel")) {
    const task = panel.dataset.task;
    const line = panel.querySelector("[data-model-line]");
    const m = byTask[task];
    if (m) {
      const where = m.provider ? ` on ${m.provider.replace("ExecutionProvider", "")}` : "";
      line.textContent = `${m.name} v${m.version}${where}`;
      panel.classList.remove("unavailable");
    } else {
      line.textContent = `The ${TASK_TITLES[task]} model is not loaded on this server.`;
      panel.classList.add("unavailable");
      // Every control, not just the button: out of the Tab order, and shown as disabled by
      // the browser (the form used to be faded to 45%, its labels then unreadable: 1.9:1).
      for (const control of panel.querySelector("form").elements) control.disabled = true;
    }
  }
  const names = models.map((m) => m.name).join(", ");
  status.textContent = models.length ? `Models loaded: ${names}.` : "No models are loaded.";
  return true;
}

$("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  storeKey(key);
  $("api-key").value = "";
  const status = $("models-status");
  status.classList.remove("error");
  status.textContent = "Loading the list of models…";
  if (await loadModels()) $("key-form").hidden = true;
});

loadModels();
