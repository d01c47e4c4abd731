"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const chunks = {}, waiting = {};
const seen = {loaded: 0, failed: 0, errors: [], failedSrc: []};
const state = {filter: "all", minConf: null, sort: "conf-desc", page: 0, size: DATA.pageSize};
window.onerror = (message) => { seen.errors.push(String(message)); showStatus(); };
window.addEventListener("unhandledrejection", (e) => { seen.errors.push(String(e.reason)); showStatus(); });
const consoleError = console.error.bind(console);
console.error = (...args) => { seen.errors.push(args.join(" ")); showStatus(); consoleError(...args); };
document.addEventListener("load", (e) => { if (e.target.tagName === "IMG") { seen.loaded++; showStatus(); } }, true);
document.addEventListener("error", (e) => {
  if (e.target.tagName === "IMG") { seen.failed++; seen.failedSrc.push(e.target.getAttribute("src")); showStatus(); }
  else if (e.target.tagName === "SCRIPT") { seen.errors.push("cannot load " + e.target.getAttribute("src")); showStatus(); }
}, true);

function showStatus() {
  const s = document.getElementById("status");
  s.dataset.loaded = seen.loaded; s.dataset.failed = seen.failed; s.dataset.errors = seen.errors.length;
  s.textContent = "images: " + seen.loaded + " loaded, " + seen.failed + " failed" +
    (seen.failedSrc.length ? " (" + seen.failedSrc.slice(0, 5).join(", ") + ")" : "") +
    "; script errors: " + seen.errors.length + (seen.errors.length ? " (" + seen.errors.slice(0, 3).join("; ") + ")" : "");
}

window.reportChunk = (number, rows) => { chunks[number] = rows; (waiting[number] || []).forEach((f) => f()); };
function loadChunk(number) {
  if (chunks[number]) return Promise.resolve();
  return new Promise((resolve) => {
    if (!waiting[number]) {
      waiting[number] = [];
      const tag = document.createElement("script");
      tag.src = "details/chunk-" + number + ".js";
      document.head.appendChild(tag);
    }
    waiting[number].push(resolve);
  });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}
function fmt(x, digits) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits); }
// P(right) as a percentage (never a rounded 100% or 0%) when the run is calibrated, else the score.
const CONF_WORD = DATA.calibrated === false ? "score" : "confidence";
function confText(x) {
  if (x === null || x === undefined) return CONF_WORD + " -";
  if (!DATA.calibrated) return CONF_WORD + " " + fmt(x, 3);
  return CONF_WORD + " " + (x >= 0.9995 ? ">99.9%" : x < 0.0005 ? "<0.1%" : (100 * x).toFixed(1) + "%");
}
for (const node of document.querySelectorAll(".conf-word")) node.textContent = node.textContent.replace("confidence", CONF_WORD);
function picture(src, alt) {
  return src ? el("img", {class: "thumb", src: src, loading: "lazy", alt: alt}) : el("div", {class: "noimg"}, "no image");
}

function selected() {
  const order = DATA.queries.map((q, i) => i).filter((i) => {
    const [, pred, conf, ok] = DATA.queries[i];
    if (["right", "wrong", "nonlandmark"].includes(state.filter) && ok !== state.filter) return false;
    if (state.filter === "landmark" && !pred) return false;
    if (state.filter === "none" && pred) return false;
    return state.minConf === null || (conf !== null && conf >= state.minConf);
  });
  const conf = (i) => DATA.queries[i][2] === null ? -Infinity : DATA.queries[i][2];
  const keys = {
    "conf-desc": (a, b) => conf(b) - conf(a), "conf-asc": (a, b) => conf(a) - conf(b),
    "inl-asc": (a, b) => DATA.queries[a][4] - DATA.queries[b][4],
    "id": (a, b) => (DATA.queries[a][0] < DATA.queries[b][0] ? -1 : 1),
  };
  return order.sort((a, b) => keys[state.sort](a, b) || a - b);
}

function queryCard(i, detail) {
  const [id, pred, confidence, ok, inliers] = DATA.queries[i];
  const [thumb, truth] = detail;
  const verdict = ok ? el("span", {class: "badge " + ok}, ok === "nonlandmark" ? "non-landmark" : ok) : "";
  return el("div", {class: "card q " + ok},
    picture(thumb, "query " + id), el("div", {class: "mono"}, id),
    el("div", {}, "truth: " + (truth === null ? "unknown" : truth.length ? truth.join(" ") : "non-landmark")),
    el("div", {}, "predicted: " + (pred || "none") + " ", verdict),
    el("div", {class: "num"}, confText(confidence) + ", inliers " + (inliers < 0 ? "-" : inliers)));
}

function candidateCard(c) {
  const image = picture(c.thumb, "candidate " + c.id);
  const linked = c.picture ? el("a", {href: c.picture, target: "_blank", title: "match picture"}, image) : image;
  const mark = c.ok ? el("span", {class: "badge " + c.ok}, c.ok === "right" ? "same landmark" : "other") : "";
  return el("div", {class: "card " + c.ok}, linked,
    el("div", {}, "#" + c.rank + " landmark " + (c.label || "?") + " ", mark),
    el("div", {class: "num"}, "global " + fmt(c.global, 3) + " | inliers " + (c.inliers < 0 ? "-" : c.inliers)),
    el("div", {class: "num"}, "score " + fmt(c.score, 3) + (c.picture ? " | " : ""),
       c.picture ? el("a", {href: c.picture, target: "_blank"}, "matches") : ""));
}

async function render() {
  const order = selected();
  const pages = Math.max(1, Math.ceil(order.length / state.size));
  state.page = Math.min(state.page, pages - 1);
  const shown = order.slice(state.page * state.size, (state.page + 1) * state.size);
  await Promise.all([...new Set(shown.map((i) => Math.floor(i / DATA.chunk)))].map(loadChunk));
  const rows = document.getElementById("rows");
  rows.replaceChildren(...shown.map((i) => {
    const detail = chunks[Math.floor(i / DATA.chunk)][i % DATA.chunk];
    return el("div", {class: "query"}, queryCard(i, detail), ...detail[2].map(candidateCard));
  }));
  document.getElementById("pageinfo").textContent = " page " + (state.page + 1) + " / " + pages + " (" +
    order.length + " of " + DATA.queries.length + " queries) ";
  document.getElementById("status").dataset.ready = "1";
  document.getElementById("status").dataset.rows = shown.length;
  showStatus();
}

function bind(id, event, update) {
  document.getElementById(id).addEventListener(event, (e) => { update(e.target.value); render(); });
}
bind("filter", "change", (v) => { state.filter = v; state.page = 0; });
bind("sort", "change", (v) => { state.sort = v; state.page = 0; });
bind("size", "change", (v) => { state.size = Number(v); state.page = 0; });
bind("minconf", "input", (v) => { state.minConf = v === "" ? null : Number(v); state.page = 0; });
bind("prev", "click", () => { state.page = Math.max(0, state.page - 1); });
bind("next", "click", () => { state.page += 1; });
function fromHash() {  // e.g. index.html#filter=wrong&sort=conf-asc&minconf=0.5&page=2
  const hash = new URLSearchParams(location.hash.slice(1));
  for (const [key, id] of [["filter", "filter"], ["sort", "sort"], ["minconf", "minconf"]]) {
    if (hash.has(key)) document.getElementById(id).value = hash.get(key);
  }
  state.filter = document.getElementById("filter").value;
  state.sort = document.getElementById("sort").value;
  const min = document.getElementById("minconf").value;
  state.minConf = min === "" ? null : Number(min);
  state.page = Math.max(0, Number(hash.get("page") || 1) - 1);
}
document.getElementById("size").value = String(state.size);
fromHash();
render();
