// mqic dashboard: one page, hash routes, live updates by server-sent events.
// Rows are keyed by id and updated in place (only the text that changed is touched), so
// nothing flickers and rows keep their place. The "reconnecting" banner appears only when
// the event stream has been down for BANNER_AFTER_MS, never on a blip.
"use strict";

const BANNER_AFTER_MS = 5000;
const STATUSES = ["NEW", "QUEUED", "PENDING_RESOURCE", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"];
const FINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

const $ = (id) => document.getElementById(id);
const state = {
  session: null,
  cases: new Map(),      // case_id -> summary
  caseRows: new Map(),   // case_id -> <tr>
  order: [],             // case ids, in their table order
  overview: null,
  route: "overview",
  caseId: null,
  es: null,
  logEs: null,
  errorSince: null,
  detailTimer: null,
  gpuFetchAt: 0,
};

// ---------- small DOM helpers ----------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function setText(e, v) { v = v == null ? "" : String(v); if (e.textContent !== v) e.textContent = v; }
function setClass(e, v) { if (e.className !== v) e.className = v; }
function setWidth(e, frac) {
  const w = (Math.max(0, Math.min(1, frac || 0)) * 100).toFixed(1) + "%";
  if (e.style.width !== w) e.style.width = w;
}
function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function fmtTime(v) {
  if (v == null || v === "") return "";
  const d = typeof v === "number" ? new Date(v) : new Date(v);
  if (isNaN(d)) return String(v);
  return d.toLocaleTimeString([], { hour12: false }) + (sameDay(d) ? "" : " " + d.toLocaleDateString());
}
function fmtBytes(n) {
  if (n < 1024) return (Number.isInteger(n) ? n : n.toFixed(1)) + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(n < 10 ? 1 : 0) + " " + units[i];
}
function sameDay(d) { const n = new Date(); return d.toDateString() === n.toDateString(); }
function fmtDur(ms) {
  if (ms == null || ms < 0) return "";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = Math.floor(s / 60), r = Math.round(s % 60);
  if (m < 60) return m + " min " + r + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}
function toast(msg, bad) {
  const t = $("toast");
  setText(t, msg);
  t.className = "toast" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.add("hidden"), 6000);
}

// ---------- API ----------
async function api(path, opts) {
  const o = Object.assign({ credentials: "same-origin", headers: {} }, opts || {});
  if (o.method && o.method !== "GET") {
    o.headers["X-CSRF-Token"] = state.session ? state.session.csrf : "";
    if (o.body !== undefined) o.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, o);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (r.status === 401 && path !== "/ui/api/login") showLogin();
  return { ok: r.ok, status: r.status, body };
}

async function start() {
  const r = await api("/ui/api/session");
  if (!r.ok) { if (r.status !== 401) toast("cannot reach mqic (" + r.status + ")", true); return; }
  gotSession(r.body);
}

function gotSession(s) {
  state.session = s;
  setText($("who"), s.user ? s.user : "");
  $("logout").classList.toggle("hidden", !s.user);
  if (state.route === "login") location.hash = "#/overview";
  route();
  connect();
}

function showLogin() {
  if (state.es) { state.es.close(); state.es = null; }
  stopLog();
  state.session = null;
  state.route = "login";
  showPage("login");
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setText($("login-error"), "");
  const r = await api("/ui/api/login", {
    method: "POST",
    body: JSON.stringify({ user: $("login-user").value, password: $("login-password").value }),
  });
  if (!r.ok) { setText($("login-error"), (r.body && r.body.error) || "login refused"); return; }
  $("login-password").value = "";
  gotSession(r.body);
});
$("logout").addEventListener("click", async () => {
  await api("/ui/api/logout", { method: "POST" });
  showLogin();
});

// ---------- the live stream ----------
function connect() {
  if (state.es) state.es.close();
  const es = new EventSource("/ui/events");
  state.es = es;
  es.onopen = healthy;
  es.addEventListener("snapshot", (e) => { healthy(); const d = JSON.parse(e.data); applySnapshot(d); });
  es.addEventListener("cases", (e) => { healthy(); applyCases(JSON.parse(e.data).rows); });
  es.addEventListener("overview", (e) => { healthy(); applyOverview(JSON.parse(e.data)); });
  es.addEventListener("activity", (e) => { healthy(); applyActivity(JSON.parse(e.data).events); });
  es.onerror = () => {
    if (state.errorSince === null) state.errorSince = Date.now();
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (e.g. a 401 or a server restart): check the session, then retry.
      setTimeout(async () => {
        if (state.es !== es) return;
        const r = await api("/ui/api/session").catch(() => null);
        if (r && r.ok) { state.session = r.body; connect(); }
        else if (!r || r.status !== 401) setTimeout(() => state.es === es && connect(), 2000);
      }, 1500);
    }
  };
}
function healthy() {
  state.errorSince = null;
  $("banner").classList.add("hidden");
}
setInterval(() => {
  const down = state.errorSince !== null && Date.now() - state.errorSince > BANNER_AFTER_MS;
  $("banner").classList.toggle("hidden", !down);
}, 1000);

function applySnapshot(d) {
  applyOverview(d.overview);
  const rows = (d.cases || []).slice().sort((a, b) => (a.created < b.created ? 1 : a.created > b.created ? -1 : 0));
  const seen = new Set(rows.map((r) => r.case_id));
  for (const id of Array.from(state.cases.keys())) if (!seen.has(id)) removeCase(id);
  // Known rows keep their place; new ones are added in snapshot order.
  for (const r of rows.slice().reverse()) upsertCase(r);
  if (state.route === "case" && state.caseId) refreshDetailSoon();
}

// ---------- cases ----------
function applyCases(rows) {
  for (const r of rows || []) {
    if (r.removed) removeCase(r.case_id); else upsertCase(r);
    if (state.route === "case" && r.case_id === state.caseId) refreshDetailSoon();
  }
  updateCaseCount();
}

function upsertCase(c) {
  state.cases.set(c.case_id, c);
  let tr = state.caseRows.get(c.case_id);
  if (!tr) {
    tr = el("tr", { class: "click", "data-case": c.case_id },
      el("td", { class: "c-id" }), el("td", {}, el("span", { class: "pill" })), el("td", { class: "c-wf" }),
      el("td", { class: "c-step" }),
      el("td", {}, el("div", { class: "progress-cell" }, el("div", { class: "bar" }, el("div", { class: "fill" })), el("span", { class: "pct" }))),
      el("td", { class: "c-upd" }));
    tr.addEventListener("click", () => { location.hash = "#/case/" + encodeURIComponent(c.case_id); });
    state.caseRows.set(c.case_id, tr);
    // New cases go on top: they are the newest.
    $("cases-body").prepend(tr);
    state.order.unshift(c.case_id);
  }
  const td = tr.children;
  setText(td[0], c.case_id);
  const pill = td[1].firstChild;
  setText(pill, c.status);
  setClass(pill, "pill " + c.status);
  setText(td[2], c.workflow);
  let step = c.step ? c.step + (c.attempt > 1 ? " (attempt " + c.attempt + ")" : "") : "";
  if (!step && c.failure) step = (c.failure.step || c.failure.phase) + ": " + c.failure.code;
  setText(td[3], step);
  const fill = td[4].querySelector(".fill");
  setWidth(fill, c.progress);
  setClass(fill, "fill " + c.status);
  setText(td[4].querySelector(".pct"), Math.round((c.progress || 0) * 100) + "%");
  setText(td[5], fmtTime(c.updated));
  filterRow(tr, c);
}

function removeCase(id) {
  const tr = state.caseRows.get(id);
  if (tr) tr.remove();
  state.caseRows.delete(id);
  state.cases.delete(id);
  state.order = state.order.filter((x) => x !== id);
}

function filterRow(tr, c) {
  const status = $("case-status").value;
  const q = $("case-search").value.trim().toLowerCase();
  const show = (!status || c.status === status) && (!q || JSON.stringify(c).toLowerCase().includes(q));
  if (tr.hidden === show) tr.hidden = !show;
}
function refilter() {
  for (const [id, tr] of state.caseRows) filterRow(tr, state.cases.get(id));
  updateCaseCount();
}
function updateCaseCount() {
  let shown = 0;
  for (const tr of state.caseRows.values()) if (!tr.hidden) shown++;
  setText($("case-count"), shown + " of " + state.cases.size + " cases");
  $("cases-empty").classList.toggle("hidden", state.cases.size > 0);
}
for (const s of STATUSES) $("case-status").append(el("option", { value: s, text: s }));
$("case-search").addEventListener("input", refilter);
$("case-status").addEventListener("change", refilter);

// ---------- overview ----------
function applyOverview(o) {
  if (!o) return;
  state.overview = o;
  const st = o.status || {};
  const by = st.cases || {};
  const h = $("health");
  setText(h, o.health);
  setClass(h, "pill " + o.health);
  h.title = o.health_detail || "";
  setText($("ov-health"), o.health);
  setText($("ov-health-detail"), o.health_detail);
  setText($("ov-total"), st.total_cases || 0);
  setText($("ov-archived"), (st.archived_cases || 0) + " archived");
  setText($("ov-running"), by.PROCESSING || 0);
  setText($("ov-waiting"), (by.QUEUED || 0) + " queued, " + (by.PENDING_RESOURCE || 0) + " waiting for a GPU");
  setText($("ov-failed"), by.FAILED || 0);
  setText($("ov-gpus"), st.gpus_leased || 0);
  setText($("ov-gpus-total"), "of " + (st.gpus || 0) + " usable");
  setText($("ov-workers"), st.workers_alive || 0);
  setText($("ov-conns"), o.connections + " AMQP connection(s)" + (o.memory_alarm ? ", memory alarm" : ""));
  statusBar(by, st.total_cases || 0);
  throughputChart(o.throughput || []);
  keyedRows($("ov-queues"), (o.queues && o.queues.queues) || [], (q) => q.vhost + "/" + q.name,
    (q) => [q.name, q.ready, q.unacked, q.consumers], [0, 1, 1, 1]);
  renderQueues(o.queues || { queues: [] });
  renderConnections(o.connection_list || {});
  renderWorkers(o.workers || []);
  renderGpus(o.gpus || []);
}

function statusBar(by, total) {
  const bar = $("ov-status-bar"), legend = $("ov-status-legend");
  if (!bar.children.length) {
    for (const s of STATUSES) {
      bar.append(el("div", { class: s, title: s }));
      legend.append(el("li", {}, el("span", { class: "sw " + s }), el("span", { class: "n" })));
    }
  }
  STATUSES.forEach((s, i) => {
    setWidth(bar.children[i], total ? (by[s] || 0) / total : 0);
    setText(legend.children[i].lastChild, s + " " + (by[s] || 0));
  });
}

function throughputChart(buckets) {
  const box = $("ov-throughput");
  const W = 600, H = 140, pad = 22;
  const max = Math.max(1, ...buckets.map((b) => b.completed + b.failed));
  const key = JSON.stringify(buckets.map((b) => [b.completed, b.failed]));
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "throughput" });
  const bw = (W - pad) / Math.max(1, buckets.length);
  buckets.forEach((b, i) => {
    const x = pad + i * bw;
    const hc = ((H - pad) * b.completed) / max, hf = ((H - pad) * b.failed) / max;
    if (b.completed) s.append(svg("rect", { x, y: H - pad - hc, width: Math.max(1, bw - 1), height: hc, fill: "#1f9d55" }));
    if (b.failed) s.append(svg("rect", { x, y: H - pad - hc - hf, width: Math.max(1, bw - 1), height: hf, fill: "#d64545" }));
  });
  s.append(svg("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#dde1e6" }));
  const t = (x, y, txt, anchor) => { const e = svg("text", { x, y, "text-anchor": anchor || "start" }); e.textContent = txt; s.append(e); };
  t(2, 10, String(max));
  t(2, H - pad, "0");
  if (buckets.length) {
    t(pad, H - 6, fmtTime(buckets[0].minute));
    t(W - 2, H - 6, "now", "end");
  }
  box.replaceChildren(s);
}

function applyActivity(events) {
  const ul = $("ov-activity");
  for (const { seq, event: e } of events || []) {
    if (ul.querySelector(`[data-seq="${seq}"]`)) continue;
    const li = el("li", { "data-seq": String(seq) });
    li.append(el("span", { class: "muted", text: fmtTime(e.timestamp) + " " }));
    const a = el("a", { href: "#/case/" + encodeURIComponent(e.case_id), text: e.case_id });
    li.append(a, " " + e.subject + " " + e.event + (e.step ? " (" + e.step + ")" : "") + (e.detail ? ": " + e.detail : ""));
    ul.prepend(li);
  }
  while (ul.children.length > 100) ul.lastChild.remove();
}

// Rows keyed by `key`, cells from `cells`; `num` marks numeric columns.
function keyedRows(tbody, items, key, cells, num, onClick) {
  const seen = new Set();
  for (const it of items) {
    const k = key(it);
    seen.add(k);
    let tr = tbody.querySelector(`tr[data-key="${CSS.escape(k)}"]`);
    const vals = cells(it);
    if (!tr) {
      tr = el("tr", { "data-key": k });
      vals.forEach((_, i) => tr.append(el("td", { class: num && num[i] ? "num" : "" })));
      if (onClick) { tr.className = "click"; tr.addEventListener("click", () => onClick(it, tr)); }
      tbody.append(tr);
    }
    vals.forEach((v, i) => {
      const td = tr.children[i];
      if (v instanceof Node) { if (!td.firstChild || !td.firstChild.isEqualNode(v)) td.replaceChildren(v); }
      else setText(td, v);
    });
  }
  for (const tr of Array.from(tbody.children)) if (!seen.has(tr.dataset.key)) tr.remove();
}

// ---------- queues, workers, GPUs ----------
function renderQueues(q) {
  setText($("q-summary"), q.queues.length + " queues" + (q.exclusive_hidden ? " (" + q.exclusive_hidden + " exclusive reply queues not shown)" : "") +
    "; " + ((state.overview && state.overview.connections) || 0) + " AMQP connections open");
  keyedRows($("queues-body"), q.queues, (x) => x.vhost + "/" + x.name,
    (x) => [x.name, x.ready, x.unacked, x.messages, x.consumers, x.publish_rate.toFixed(1), x.deliver_rate.toFixed(1), x.ack_rate.toFixed(1), x.bytes], [0, 1, 1, 1, 1, 1, 1, 1, 1]);
}

function renderConnections(d) {
  const conns = d.connections || [], chans = d.channels || [];
  const net = conns.filter((c) => c.type === "network").length;
  setText($("conn-summary"), conns.length + " connections (" + net + " network, " + (conns.length - net) + " mqic's own in-process), " + chans.length + " channels");
  keyedRows($("connections-body"), conns, (c) => String(c.id), (c) => [
    c.name, c.client || "", c.type, c.user, c.vhost, c.channels, c.consumers, c.state,
    fmtBytes(c.recv_rate) + "/s", fmtBytes(c.send_rate) + "/s", fmtBytes(c.recv_oct), fmtBytes(c.send_oct), fmtTime(c.connected_at),
  ], [0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0]);
  keyedRows($("channels-body"), chans, (ch) => ch.connection_id + "/" + ch.number, (ch) => [
    ch.connection + " (" + ch.number + ")", ch.user, ch.vhost, ch.consumers, ch.unacked, ch.prefetch,
  ], [0, 0, 0, 1, 1, 1]);
}

function renderWorkers(ws) {
  keyedRows($("workers-body"), ws, (w) => w.name, (w) => {
    const alive = el("span", { class: "pill " + (w.alive ? "healthy" : "error"), text: w.alive ? "alive" : "silent" });
    return [w.name, w.role, w.hostname, w.pid, w.status, fmtTime(w.last_seen), alive];
  }, [0, 0, 0, 1, 0, 0, 0]);
}

function renderGpus(gs) {
  $("gpus-empty").classList.toggle("hidden", gs.length > 0);
  keyedRows($("gpus-body"), gs, (g) => g.gpu, (g) => {
    const held = g.leased_by
      ? el("a", { href: "#/case/" + encodeURIComponent(g.leased_by.case_id), text: g.leased_by.case_id + " · " + g.leased_by.step })
      : "free";
    return [g.gpu, g.name || "", g.usable ? "yes" : "no", held, g.leased_by ? fmtTime(g.leased_by.since) : ""];
  });
  if (state.route === "gpus" && Date.now() - state.gpuFetchAt > 5000) loadGpuPlots();
}

async function loadGpuPlots() {
  state.gpuFetchAt = Date.now();
  const r = await api("/ui/api/gpus");
  if (!r.ok) return;
  const box = $("gpu-plots");
  const history = r.body.history || {};
  const keys = Object.keys(history).sort();
  for (const k of keys) {
    const samples = history[k];
    const fields = new Set();
    for (const s of samples) for (const f of Object.keys(s)) if (f !== "t") fields.add(f);
    // Utilization, memory and temperature when the GPU monitor reports them; leases always.
    const order = ["utilization", "utilization_percent", "memory_used", "memory_used_mib", "temperature", "temperature_c", "leased"];
    const shown = order.filter((f) => fields.has(f)).concat([...fields].filter((f) => !order.includes(f)));
    let panel = box.querySelector(`[data-gpu="${CSS.escape(k)}"]`);
    if (!panel) {
      panel = el("div", { class: "panel", "data-gpu": k }, el("h3", { text: "GPU " + k }), el("div", { class: "chart" }));
      box.append(panel);
    }
    panel.lastChild.replaceChildren(...shown.map((f) => linePlot(samples, f)));
  }
}

function linePlot(samples, field) {
  const W = 600, H = 90, pad = 24;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": field });
  const pts = samples.filter((p) => typeof p[field] === "number");
  const label = svg("text", { x: 2, y: 10 });
  label.textContent = field === "leased" ? "leased (1 = held by a case)" : field;
  s.append(label);
  if (pts.length < 1) return s;
  const t0 = pts[0].t, t1 = Math.max(pts[pts.length - 1].t, t0 + 1);
  const max = Math.max(field === "leased" ? 1 : 0, ...pts.map((p) => p[field]));
  const xy = (p) => [pad + ((W - pad) * (p.t - t0)) / (t1 - t0), H - 14 - ((H - 28) * p[field]) / (max || 1)];
  const d = pts.map((p, i) => { const [x, y] = xy(p); return (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1); }).join(" ");
  s.append(svg("path", { d, fill: "none", stroke: "#2b6cb0", "stroke-width": 1.5 }));
  const m = svg("text", { x: W - 2, y: 10, "text-anchor": "end" });
  m.textContent = "max " + max + " · last " + pts[pts.length - 1][field];
  s.append(m);
  const a = svg("text", { x: pad, y: H - 2 }); a.textContent = fmtTime(t0); s.append(a);
  const b = svg("text", { x: W - 2, y: H - 2, "text-anchor": "end" }); b.textContent = fmtTime(t1); s.append(b);
  return s;
}

// ---------- case detail ----------
function refreshDetailSoon() {
  clearTimeout(state.detailTimer);
  state.detailTimer = setTimeout(loadDetail, 150);
}

async function loadDetail() {
  const id = state.caseId;
  if (!id) return;
  const r = await api("/ui/api/cases/" + encodeURIComponent(id));
  if (id !== state.caseId) return;
  if (!r.ok) { setText($("cd-id"), id); setText($("cd-status"), (r.body && r.body.error) || "error"); return; }
  renderDetail(r.body);
}

function renderDetail(d) {
  state.detail = d;
  const c = d.case;
  setText($("cd-id"), c.case_id + (d.archived ? " (archived)" : ""));
  const pill = $("cd-status");
  setText(pill, c.status);
  setClass(pill, "pill " + c.status);
  setWidth($("cd-bar"), c.progress);
  setClass($("cd-bar"), "fill " + c.status);
  $("cd-retry").disabled = d.archived || !(c.status === "FAILED" || c.status === "CANCELLED");
  $("cd-cancel").disabled = d.archived || FINAL.has(c.status);
  const facts = [
    ["Workflow", c.workflow],
    ["Progress", Math.round((c.progress || 0) * 100) + "%"],
    ["Step", c.step ? c.step.name + " (attempt " + c.step.attempt + (c.step.gpu ? ", GPU " + c.step.gpu.host + ":" + c.step.gpu.index : "") + ")" : "—"],
    ["Case folder", c.case_path],
    ["Created", fmtTime(c.created_ms)],
    ["Updated", fmtTime(c.updated_ms)],
    ["Manual retries", c.manual_retries || 0],
  ];
  const moved = (c.done || []).filter((s) => s.bytes != null);
  if (moved.length) facts.push(["Transferred", moved.map((s) => s.name + " " + fmtBytes(s.bytes)).join(", ")]);
  fillFacts($("cd-facts"), facts);
  const f = c.failure;
  $("cd-failure").classList.toggle("hidden", !f || c.status === "COMPLETED");
  if (f) {
    fillFacts($("cd-failure-facts"), [
      ["Category", f.category], ["Phase", f.phase], ["Code", f.code], ["Step", (f.step || "") + (f.attempt ? " attempt " + f.attempt : "")],
      ["Detail", f.detail], ["Error type", f.error_type || ""],
    ]);
    setText($("cd-failure-tail"), f.output_tail || "");
    $("cd-failure-tail").classList.toggle("hidden", !f.output_tail);
  }
  stepsChart(c);
  historyList(d.history || []);
}

function fillFacts(dl, facts) {
  const key = JSON.stringify(facts);
  if (dl.dataset.key === key) return;
  dl.dataset.key = key;
  dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v == null ? "" : v) })]));
}

function stepsChart(c) {
  const box = $("cd-steps");
  const bars = (c.done || []).map((s) => ({ name: s.name, a: s.started_ms, b: s.finished_ms, attempts: s.attempts, done: true, bytes: s.bytes }));
  if (c.step) bars.push({ name: c.step.name, a: c.step.started_ms || c.step.dispatched_ms, b: null, attempts: c.step.attempt, done: false });
  const key = JSON.stringify(bars) + (c.step ? Math.floor(Date.now() / 1000) : "");
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  if (!bars.length) { box.replaceChildren(el("p", { class: "muted", text: "No step has started yet." })); return; }
  const now = Date.now();
  const t0 = Math.min(...bars.map((b) => b.a)), t1 = Math.max(now > t0 ? Math.min(now, Math.max(...bars.map((b) => b.b || now))) : t0 + 1, t0 + 1);
  const W = 600, row = 22, lw = 110, H = bars.length * row + 8;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "step durations" });
  bars.forEach((b, i) => {
    const end = b.b || now;
    const x = lw + ((W - lw - 90) * (b.a - t0)) / (t1 - t0);
    const w = Math.max(2, ((W - lw - 90) * (end - b.a)) / (t1 - t0));
    const y = 4 + i * row;
    const name = svg("text", { x: 2, y: y + 13 }); name.textContent = b.name + (b.attempts > 1 ? " ×" + b.attempts : ""); s.append(name);
    s.append(svg("rect", { x, y: y + 3, width: w, height: row - 8, rx: 3, fill: b.done ? "#1f9d55" : "#2b6cb0" }));
    const dur = svg("text", { x: Math.min(x + w + 4, W - 88), y: y + 13 }); dur.textContent = fmtDur(end - b.a) + (b.done ? "" : " …") + (b.bytes != null ? ", " + fmtBytes(b.bytes) : ""); s.append(dur);
  });
  box.replaceChildren(s);
}

function historyList(rows) {
  const ol = $("cd-history");
  const key = JSON.stringify(rows);
  if (ol.dataset.key === key) return;
  ol.dataset.key = key;
  ol.replaceChildren(...rows.map((h, i) => {
    const next = rows[i + 1];
    const li = el("li", { class: "to-" + h.to });
    li.append(el("div", { class: "when", text: fmtTime(h.at_ms) }));
    li.append(el("span", { class: "pill " + h.to, text: h.to }), " ");
    if (h.step) li.append(el("b", { text: h.step + (h.attempt ? " #" + h.attempt : "") }), " ");
    li.append(h.reason || "");
    if (next) li.append(el("span", { class: "dur", text: "(" + fmtDur(next.at_ms - h.at_ms) + ")" }));
    return li;
  }));
  ol.scrollTop = ol.scrollHeight;
}

function startLog(id) {
  stopLog();
  const pre = $("cd-log");
  pre.textContent = "";
  setText($("cd-log-title"), "");
  const es = new EventSource("/ui/events/log/" + encodeURIComponent(id));
  state.logEs = es;
  const append = (text, replace) => {
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (replace) pre.textContent = text; else pre.append(text);
    if (pre.textContent.length > 400000) pre.textContent = pre.textContent.slice(-300000);
    if (atEnd || replace) pre.scrollTop = pre.scrollHeight;
  };
  const title = (a, local) => {
    if (!a) return "";
    return "· " + a.step + " attempt " + a.attempt + (a.running ? " (running, live)" : "") + (local === false ? " · log not on this machine" : "");
  };
  es.addEventListener("attempt", (e) => { const d = JSON.parse(e.data); setText($("cd-log-title"), title(d.attempt, d.local)); append(d.text || "", true); });
  es.addEventListener("state", (e) => { const d = JSON.parse(e.data); setText($("cd-log-title"), title(d.attempt)); });
  es.addEventListener("append", (e) => append(JSON.parse(e.data).text, false));
  es.addEventListener("problem", (e) => setText($("cd-log-title"), JSON.parse(e.data).error));
}
function stopLog() { if (state.logEs) { state.logEs.close(); state.logEs = null; } }

async function caseAction(what) {
  const id = state.caseId;
  const btn = $(what === "retry" ? "cd-retry" : "cd-cancel");
  if (what === "cancel" && !confirm("Cancel case " + id + "? A running step is killed.")) return;
  btn.disabled = true;
  const r = await api("/ui/api/cases/" + encodeURIComponent(id) + "/" + what, { method: "POST" });
  if (r.ok) toast(what === "retry" ? "Retry accepted: " + id + " is " + r.body.status : "Cancelled: " + id + " is " + r.body.status);
  else toast((what === "retry" ? "Retry" : "Cancel") + " refused: " + ((r.body && r.body.error) || r.status), true);
  refreshDetailSoon();
}
$("cd-retry").addEventListener("click", () => caseAction("retry"));
$("cd-cancel").addEventListener("click", () => caseAction("cancel"));

// ---------- routing ----------
function showPage(name) {
  for (const p of document.querySelectorAll(".page")) p.classList.toggle("hidden", p.id !== "page-" + name);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.route === name || (name === "case" && a.dataset.route === "cases"));
}

function route() {
  if (!state.session) return;
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const name = parts[0] || "overview";
  const known = ["overview", "cases", "case", "gpus", "queues", "connections", "workers"];
  state.route = known.includes(name) ? name : "overview";
  const caseId = state.route === "case" ? decodeURIComponent(parts.slice(1).join("/")) : null;
  if (caseId !== state.caseId) {
    state.caseId = caseId;
    stopLog();
    state.detail = null;
    if (caseId) {
      for (const id of ["cd-facts", "cd-failure-facts", "cd-steps", "cd-history"]) { $(id).replaceChildren(); delete $(id).dataset.key; }
      setText($("cd-id"), caseId);
      loadDetail();
      startLog(caseId);
    }
  }
  if (state.route === "gpus") loadGpuPlots();
  showPage(state.route);
  updateCaseCount();
}
window.addEventListener("hashchange", route);
// The steps chart shows a running step's duration growing (redrawn from what we have).
setInterval(() => {
  if (state.route === "case" && state.detail && state.detail.case.step) stepsChart(state.detail.case);
}, 1000);

start();
