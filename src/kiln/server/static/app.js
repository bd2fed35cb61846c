// Kiln's dashboard: one page over /api/v1, with the token its user signed in with.
// Routes live in the address's fragment (#/runs, #/run/ID, ...). Every value from the
// record is set as text (textContent), never as markup.
"use strict";

const ROW = 28; // px, one row of the runs table (matches --row in app.css)
const PAGE = 100; // runs fetched at a time as the table scrolls
const COLORS = ["#1d4ed8", "#c2410c", "#15803d", "#7c3aed", "#b91c1c", "#0e7490", "#a16207",
  "#be185d", "#4d7c0f", "#334155"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "timed_out", "preempted"];
const RUN_FIELDS = ["created", "started", "ended", "name", "status", "app"];
const ROLES = ["viewer", "member", "approver", "admin"];

// ---------------------------------------------------------------- small helpers

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, String(v));
  }
  for (const kid of kids.flat()) if (kid) el.append(kid);
  return el;
}

const main = () => document.getElementById("main");
const short = (id) => (id || "").slice(0, 8);
const link = (href, text, attrs) => h("a", { href, ...attrs }, text);
const runLink = (id, text) => link(`#/run/${id}`, text || short(id), { "data-run": id });

function num(v) {
  if (v === null || v === undefined) return NaN;
  if (v === "NaN") return NaN;
  if (v === "Infinity") return Infinity;
  if (v === "-Infinity") return -Infinity;
  return typeof v === "number" ? v : NaN;
}

const CLIP = 500; // characters of one value shown in a cell
const CONTROLS = /[\u200e\u200f\u202a-\u202e\u2066-\u2069]/g; // they reorder text

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) || !Number.isFinite(v) ? String(v) : String(+v.toPrecision(5));
  const text = typeof v === "object" ? JSON.stringify(v) : String(v);
  const shown = text.replace(CONTROLS, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
  return shown.length > CLIP ? `${shown.slice(0, CLIP)}… (${text.length.toLocaleString()} characters)` : shown;
}

function when(t) {
  if (!t) return "";
  const d = new Date(t * 1000);
  return d.toISOString().replace("T", " ").slice(0, 19);
}

function dur(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

const statusTag = (s) => h("span", { class: `status ${s}`, "data-status": s }, s);
const errorBox = (e) => h("div", { class: "error-box", role: "alert" }, e.message || String(e));

function kv(pairs) {
  return h("div", { class: "kv" },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
      .map(([k, v]) => [h("div", {}, k), h("div", {}, v instanceof Node ? v : fmt(v))]));
}

function table(headers, rows, attrs) {
  return h("table", { class: "grid", ...attrs },
    h("thead", {}, h("tr", {}, headers.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c instanceof Node ? c : fmt(c)))))));
}

function hashQuery() {
  const at = location.hash.indexOf("?");
  return new URLSearchParams(at < 0 ? "" : location.hash.slice(at + 1));
}

function setHashQuery(path, params) {
  // a page's state is written only while the address is still that page's: a page
  // that finishes loading after the user moved on must not pull the address back
  if ((location.hash || "#/runs").split("?")[0] !== path) return;
  const q = params.toString();
  history.replaceState(null, "", `${path}${q ? "?" + q : ""}`);
}

// ---------------------------------------------------------------- the API

class Halt extends Error {}

const session = {
  get token() { return sessionStorage.getItem("kiln.token"); },
  set token(v) { if (v) sessionStorage.setItem("kiln.token", v); else sessionStorage.removeItem("kiln.token"); },
  me: null,
};

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(`/api/v1${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (r.status === 401) {
    session.token = null;
    loginPage(data && data.detail);
    throw new Halt();
  }
  if (!r.ok) {
    const detail = data && (data.detail || data.title);
    const err = new Error(`${r.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

const get = (path) => api("GET", path);
const post = (path, body) => api("POST", path, body ?? {});

async function blob(sha, what) {
  // a blob's bytes, with the token (a plain link could not send it)
  const r = await fetch(`/api/v1/blobs/${sha}`, { headers: { Authorization: `Bearer ${session.token}` } });
  if (!r.ok) throw new Error(`${r.status}: ${what} could not be read`);
  return r;
}

const blobText = async (sha) => (await blob(sha, `the blob ${sha.slice(0, 12)}`)).text();

async function download(sha, name) {
  const url = URL.createObjectURL(await (await blob(sha, name)).blob());
  const a = h("a", { href: url, download: name.split("/").pop() || sha });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

const may = (role) => session.me && ROLES.indexOf(session.me.role) >= ROLES.indexOf(role);

// ---------------------------------------------------------------- sign in and routing

function loginPage(reason) {
  document.getElementById("who").textContent = "";
  const input = h("input", { type: "password", id: "token", placeholder: "kiln_...", autocomplete: "off" });
  const form = h("form", { class: "login", onsubmit: (e) => {
    e.preventDefault();
    session.token = input.value.trim();
    start();
  } },
  h("h1", {}, "Sign in to Kiln"),
  h("p", { class: "muted" }, "Paste a token (`kiln tokens create`, or the one `kiln login` stored). It is kept in this tab only."),
  reason ? h("div", { class: "error-box" }, reason) : null,
  input, h("button", { class: "primary", type: "submit" }, "Sign in"));
  main().replaceChildren(form);
  input.focus();
}

const ROUTES = [
  [/^#\/runs$/, runsPage, "runs"],
  [/^#\/run\/([0-9a-f]{4,32})$/, runPage, "runs"],
  [/^#\/compare$/, comparePage, "compare"],
  [/^#\/sweep\/([0-9a-f]{4,32})$/, sweepPage, "runs"],
  [/^#\/lineage\/([A-Za-z0-9._:@-]{1,200})$/, lineagePage, "runs"],
  [/^#\/models$/, modelsPage, "models"],
  [/^#\/model\/([A-Za-z0-9._-]{1,200})$/, modelPage, "models"],
  [/^#\/endpoints$/, endpointsPage, "endpoints"],
  [/^#\/traces$/, tracesPage, "traces"],
  [/^#\/trace\/([0-9a-fA-F-]{8,60})$/, tracePage, "traces"],
  [/^#\/audit$/, auditPage, "audit"],
  [/^#\/queues$/, queuesPage, "queues"],
  [/^#\/approvals$/, approvalsPage, "approvals"],
];

let renderId = 0;

async function route() {
  const path = (location.hash || "#/runs").split("?")[0];
  const found = ROUTES.find(([re]) => re.test(path));
  if (!found) { location.hash = "#/runs"; return; }
  const [re, page, nav] = found;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("on", a.dataset.nav === nav));
  const mine = ++renderId;
  const root = h("div", { "data-page": nav });
  main().replaceChildren(root);
  try {
    await page(root, ...path.match(re).slice(1).map(decodeURIComponent), () => mine === renderId);
  } catch (e) {
    if (!(e instanceof Halt) && mine === renderId) root.append(errorBox(e));
  }
}

async function start() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("code")) { // `kiln ui` opens the page with a one-time code
    history.replaceState(null, "", "#/runs");
    try {
      session.token = (await post("/handoff", { code: fragment.get("code") })).token;
    } catch (e) { if (!(e instanceof Halt)) loginPage(e.message); return; }
  }
  if (fragment.get("token")) { // a token in the address: keep it in this tab, hide it
    session.token = fragment.get("token");
    history.replaceState(null, "", "#/runs");
  }
  if (!session.token) { loginPage(); return; }
  try {
    session.me = await get("/whoami");
  } catch (e) {
    if (!(e instanceof Halt)) main().replaceChildren(errorBox(e));
    return;
  }
  const who = document.getElementById("who");
  who.replaceChildren(`${session.me.name || "local"} · ${session.me.role} · project ${session.me.project} `,
    h("a", { href: "#", onclick: (e) => { e.preventDefault(); session.token = null; loginPage(); } }, "sign out"));
  who.dataset.role = session.me.role;
  route();
}

window.addEventListener("hashchange", () => { if (session.token) route(); });
window.addEventListener("DOMContentLoaded", start);

// ---------------------------------------------------------------- runs: the filter

function parseFilter(text, known) {
  // "status:failed lr=0.01 accuracy>0.9 tags.team=risk words" -> a query of runs:search
  const q = { params: {}, tags: {}, metrics: [], status: [] };
  const words = [];
  for (const token of text.match(/"[^"]*"|\S+/g) || []) {
    const m = token.match(/^([A-Za-z_][\w./-]*)(<=|>=|!=|<|>|=|:)(.+)$/);
    if (!m) { words.push(token.replace(/^"|"$/g, "")); continue; }
    let [, key, op, raw] = m;
    raw = raw.replace(/^"|"$/g, "");
    if (op === ":") {
      if (key === "status") {
        for (const s of raw.split(",")) {
          if (!STATUSES.includes(s)) throw new Error(`status: "${s}" is not a status; use one of ${STATUSES.join(", ")}`);
          q.status.push(s);
        }
      } else if (key === "app") q.app = raw;
      else if (key === "parent" || key === "sweep") q.parent_id = raw;
      else throw new Error(`${key}: is not a filter; use status:, app:, sweep: or KEY=VALUE, METRIC>NUMBER`);
      continue;
    }
    let part = key.startsWith("params.") ? "params" : key.startsWith("tags.") ? "tags"
      : key.startsWith("metrics.") ? "metrics" : null;
    if (part) key = key.slice(part.length + 1);
    else if (op !== "=") part = "metrics";
    else part = known.params.includes(key) ? "params" : known.tags.includes(key) ? "tags"
      : known.metrics.includes(key) ? "metrics" : "params";
    if (part === "metrics") {
      const value = Number(raw);
      if (raw === "" || !Number.isFinite(value)) throw new Error(`metrics.${key}: compares with "${raw}"; give a number`);
      q.metrics.push({ key, op, value });
    } else if (op !== "=") {
      throw new Error(`${part}.${key}: only = compares ${part}; use ${key}=VALUE`);
    } else if (part === "tags") q.tags[key] = raw;
    else q.params[key] = /^(true|false|-?\d+(\.\d+)?(e-?\d+)?)$/i.test(raw) ? JSON.parse(raw.toLowerCase()) : raw;
  }
  if (words.length) q.text = words.join(" ");
  return q;
}

// ---------------------------------------------------------------- runs: columns

function columnsFor(chosen) {
  const cols = [
    { id: "select", label: "", width: "32px", cell: (r, t) => h("input", { type: "checkbox", "aria-label": "select", checked: t.selected.has(r.run.id),
      onchange: (e) => t.toggle(r.run.id, e.target.checked) }) },
    { id: "id", label: "id", width: "90px", cell: (r) => (r.run.tags.kind === "sweep"
      ? link(`#/sweep/${r.run.id}`, `${short(r.run.id)} ⋯`, { title: "a sweep: its runs" }) : runLink(r.run.id)) },
    { id: "name", label: "name", sort: "name", width: "minmax(120px, 1.5fr)", cell: (r) => r.run.name || "" },
    { id: "status", label: "status", sort: "status", width: "100px", cell: (r) => statusTag(r.run.status) },
    { id: "app", label: "app", sort: "app", width: "minmax(80px, 1fr)", cell: (r) => r.run.app },
    { id: "created", label: "created", sort: "created", width: "165px", cell: (r) => when(r.run.created_at) },
    { id: "duration", label: "duration", width: "80px", num: true,
      cell: (r) => dur(r.run.ended_at && r.run.started_at ? r.run.ended_at - r.run.started_at : null) },
  ];
  for (const c of chosen) {
    const [part, ...rest] = c.split(".");
    const key = rest.join(".");
    if (part === "params") cols.push({ id: c, label: key, num: true, width: "minmax(70px, 1fr)", cell: (r) => fmt(r.run.params[key]) });
    else if (part === "tags") cols.push({ id: c, label: key, width: "minmax(70px, 1fr)", cell: (r) => fmt(r.run.tags[key]) });
    else if (part === "metrics") cols.push({ id: c, label: key, sort: c, num: true, width: "minmax(80px, 1fr)", cell: (r) => (key in r.summary ? fmt(num(r.summary[key])) : "") });
  }
  return cols;
}

// ---------------------------------------------------------------- runs: the table

class RunsTable {
  // Server-side sorted and filtered, fetched a page at a time as it scrolls; only the
  // rows in view exist in the page.
  constructor(query, columns, selected, onChange) {
    this.query = query;
    this.columns = columns;
    this.selected = selected;
    this.onChange = onChange;
    this.pages = new Map();
    this.total = 0;
    const grid = columns.map((c) => c.width).join(" ");
    this.head = h("div", { class: "vt-head", style: `grid-template-columns: ${grid}` },
      columns.map((c) => {
        const sorted = query.order_by.replace(/^-/, "");
        const on = c.sort && (sorted === c.sort || `metrics.${sorted}` === c.sort);
        const cls = [c.num ? "num" : "", on ? (query.order_by.startsWith("-") ? "desc" : "asc") : ""].join(" ");
        return h("div", { class: cls, "data-sort": c.sort, title: c.id, role: "columnheader",
          onclick: c.sort ? () => this.sortBy(c.sort) : null }, c.label);
      }));
    this.spacer = h("div", { style: "height: 0px" });
    this.body = h("div", { class: "vt-body", role: "grid", onscroll: () => this.draw() }, this.spacer);
    this.grid = grid;
    this.el = h("div", { class: "vt" }, this.head, this.body);
  }

  sortBy(key) {
    const now = this.query.order_by;
    const desc = now === `-${key}` ? false : now === key ? true : !RUN_FIELDS.includes(key) || key === "created";
    this.onChange({ order_by: `${desc ? "-" : ""}${key}` });
  }

  toggle(id, on) {
    if (on) this.selected.add(id); else this.selected.delete(id);
    this.onChange({ selected: true });
  }

  async page(n) {
    if (!this.pages.has(n)) {
      this.pages.set(n, post("/runs:search", { ...this.query, limit: PAGE, offset: n * PAGE, total: n === 0 })
        .then((found) => {
          if (found.total !== null && found.total !== undefined) this.setTotal(found.total);
          return found.runs;
        }));
    }
    return this.pages.get(n);
  }

  setTotal(total) {
    this.total = total;
    this.spacer.style.height = `${total * ROW}px`;
  }

  async load() {
    await this.page(0);
    this.draw();
    return this.total;
  }

  async draw() {
    const first = Math.floor(this.body.scrollTop / ROW);
    const last = Math.min(this.total, first + Math.ceil((this.body.clientHeight || 600) / ROW) + 2);
    const wanted = [];
    for (let p = Math.floor(first / PAGE); p <= Math.floor(Math.max(first, last - 1) / PAGE); p++) wanted.push(p);
    const pages = await Promise.all(wanted.map((p) => this.page(p)));
    if (Math.floor(this.body.scrollTop / ROW) !== first) return; // scrolled on: a newer draw follows
    const rows = [];
    for (let i = first; i < last; i++) {
      const rec = pages[Math.floor(i / PAGE) - wanted[0]][i % PAGE];
      if (!rec) continue;
      rows.push(h("div", { class: "vt-row", role: "row", "data-id": rec.run.id, style: `top: ${i * ROW}px; grid-template-columns: ${this.grid}` },
        this.columns.map((c) => h("div", { class: c.num ? "num" : "", "data-col": c.id }, c.cell(rec, this)))));
    }
    this.spacer.replaceChildren(...rows);
  }
}

async function runsPage(root, alive) {
  const params = hashQuery();
  const state = {
    filter: params.get("q") || "",
    order_by: params.get("sort") || "-created",
    cols: params.get("cols") ? params.get("cols").split(",").filter(Boolean) : null,
    group: params.get("group") || "",
  };
  const selected = new Set((params.get("sel") || "").split(",").filter(Boolean));
  const known = await post("/runs:columns", {});
  if (!alive()) return;
  if (!state.cols) {
    state.cols = [...known.params.slice(0, 3).map((p) => `params.${p}`),
      ...known.metrics.filter((m) => !m.startsWith("sys/")).slice(0, 4).map((m) => `metrics.${m}`)];
  }
  const save = () => {
    const p = new URLSearchParams();
    if (state.filter) p.set("q", state.filter);
    if (state.order_by !== "-created") p.set("sort", state.order_by);
    p.set("cols", state.cols.join(","));
    if (state.group) p.set("group", state.group);
    if (selected.size) p.set("sel", [...selected].join(","));
    setHashQuery("#/runs", p);
  };
  const filter = h("input", { class: "wide", id: "filter", value: state.filter, spellcheck: "false",
    placeholder: "filter: status:failed lr=0.01 accuracy>0.9 tags.team=risk sweep:ID text",
    onkeydown: (e) => { if (e.key === "Enter") { state.filter = filter.value.trim(); refresh(); } } });
  const count = h("span", { class: "muted", id: "count" });
  const compare = h("button", { id: "compare", onclick: () => { location.hash = `#/compare?runs=${[...selected].join(",")}`; } });
  const groupSel = h("select", { id: "group", onchange: () => { state.group = groupSel.value; refresh(); } },
    h("option", { value: "" }, "no grouping"),
    known.params.map((p) => h("option", { value: `params.${p}`, selected: state.group === `params.${p}` }, `group by ${p}`)),
    known.tags.map((t) => h("option", { value: `tags.${t}`, selected: state.group === `tags.${t}` }, `group by tag ${t}`)));
  const menu = h("div", { class: "menu", hidden: true },
    [["params", known.params], ["tags", known.tags], ["metrics", known.metrics]].map(([part, names]) => [
      h("strong", {}, part),
      names.map((n) => h("label", {}, h("input", { type: "checkbox", "data-col": `${part}.${n}`, checked: state.cols.includes(`${part}.${n}`),
        onchange: (e) => {
          const id = `${part}.${n}`;
          state.cols = e.target.checked ? [...state.cols, id] : state.cols.filter((c) => c !== id);
          refresh();
        } }), ` ${n}`))]));
  const cols = h("span", { class: "cols" }, h("button", { id: "columns", onclick: () => { menu.hidden = !menu.hidden; } }, "Columns"), menu);
  const message = h("div");
  const holder = h("div");
  root.append(h("div", { class: "bar" }, filter, groupSel, cols, compare, count), message, holder);

  const updateCompare = () => {
    compare.textContent = `Compare ${selected.size}`;
    compare.disabled = selected.size < 1;
  };
  updateCompare();

  async function refresh() {
    save();
    message.replaceChildren();
    count.textContent = "";
    let query;
    try {
      query = { ...parseFilter(state.filter, known), order_by: state.order_by };
    } catch (e) {
      message.replaceChildren(errorBox(e));
      return;
    }
    try {
      if (state.group) {
        holder.replaceChildren(await groupsTable(query, state, known, (value) => {
          const key = state.group.startsWith("tags.") ? state.group : state.group.slice("params.".length);
          state.filter = `${state.filter} ${key}=${typeof value === "string" ? `"${value}"` : JSON.stringify(value)}`.trim();
          filter.value = state.filter;
          state.group = "";
          groupSel.value = "";
          refresh();
        }));
        count.textContent = "";
        return;
      }
      const t = new RunsTable(query, columnsFor(state.cols), selected, (change) => {
        if (change.order_by) { state.order_by = change.order_by; refresh(); }
        if (change.selected) { updateCompare(); save(); }
      });
      holder.replaceChildren(t.el);
      const total = await t.load();
      count.textContent = `${total.toLocaleString()} runs`;
      holder.dataset.ready = "1";
    } catch (e) {
      if (!(e instanceof Halt)) message.replaceChildren(errorBox(e));
    }
  }
  await refresh();
}

async function groupsTable(query, state, known, pick) {
  const keys = state.cols.filter((c) => c.startsWith("metrics.")).map((c) => c.slice(8));
  const { order_by, ...filterOnly } = query;
  const found = await post("/runs:groups", { query: { ...filterOnly, limit: null }, by: state.group, metrics: keys });
  const head = [state.group, "runs", ...keys.flatMap((k) => [`${k} mean`, `${k} median`, `${k} min–max`])];
  if (!found.groups.length) return h("p", { class: "muted", id: "groups" }, "No run matches.");
  const shown = table(head, found.groups.map((g) => [
    g.value === null ? h("span", { class: "muted" }, "(not set)")
      : link("#", fmt(g.value), { onclick: (e) => { e.preventDefault(); pick(g.value); } }), g.runs,
    ...keys.flatMap((k) => {
      const s = g.metrics[k];
      return s ? [fmt(s.mean), fmt(s.median), `${fmt(s.min)} – ${fmt(s.max)}`] : ["", "", ""];
    })]), { id: "groups" });
  return h("div", { class: "scroll" }, h("p", { class: "muted" }, `${found.groups.length} groups of ${found.groups.reduce((n, g) => n + g.runs, 0).toLocaleString()} runs`), shown);
}

// ---------------------------------------------------------------- charts

function chartWidth() {
  const room = main().clientWidth - 32 || 960; // as many 460 px cards as fit in a row
  const across = Math.max(1, Math.floor((room + 12) / 472));
  return Math.max(300, Math.floor((room - 12 * (across - 1)) / across) - 20);
}

function pointsFor(series, width) {
  // two points (a bucket's lowest and highest) per pixel; with many series, fewer, so
  // that a chart draws about 120,000 points at most (overlapping lines hide the rest)
  return Math.max(200, Math.min(2 * width, Math.floor(120000 / series)));
}

function lineChart(title, series, { onZoom, height = 220, width } = {}) {
  // series: [{label, points: [[step, value], ...]}] each with its own steps (uPlot's mode 2)
  const box = h("div", { class: "card chart", "data-chart": title }, h("h3", {}, title));
  const w = width || chartWidth();
  const data = [null, ...series.map((s) => [s.points.map((p) => p[0]), s.points.map((p) => num(p[1]))])];
  const opts = {
    mode: 2, width: w, height,
    scales: { x: { time: false } },
    legend: { show: series.length <= 10, live: false },
    cursor: { drag: { x: true, y: false, setScale: false } },
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: series.length > 10 ? 1 : 2, // whole pixels: fractions draw 20x slower
      paths: uPlot.paths.linear(), points: { show: s.points.length < 50 }, facets: [{ scale: "x", auto: true }, { scale: "y", auto: true }] }))],
    axes: [{}, { size: 60 }],
    hooks: onZoom ? { setSelect: [(u) => {
      if (u.select.width < 4) return;
      const lo = Math.floor(u.posToVal(u.select.left, "x"));
      const hi = Math.ceil(u.posToVal(u.select.left + u.select.width, "x"));
      u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
      onZoom(lo, hi);
    }] } : {},
  };
  const t0 = performance.now();
  const plot = new uPlot(opts, data, box);
  box.dataset.drawMs = String(performance.now() - t0);
  box.plot = plot;
  if (onZoom) box.addEventListener("dblclick", () => onZoom(null, null));
  return box;
}

async function seriesChart(runs, key, labels) {
  // One metric of several runs; drag to zoom (exact points once few enough), double-click to reset.
  const holder = h("div", { "data-series": key });
  const draw = async (lo, hi) => {
    const points = pointsFor(runs.length, chartWidth());
    const found = await post("/runs:series", { runs, keys: [key], points, min_step: lo, max_step: hi });
    const series = found.series.filter((s) => s.points.length).map((s) => ({ label: labels[s.run] || short(s.run), points: s.points }));
    holder.hidden = !series.length;
    if (!series.length) { holder.replaceChildren(); return; }
    const zoomed = lo !== null && lo !== undefined;
    const exact = found.series.every((s) => s.points.length === s.total);
    const title = `${key}${zoomed ? ` (steps ${lo}–${hi}${exact ? ", every point" : ""})` : ""}`;
    holder.replaceChildren(lineChart(title, series, { onZoom: draw }));
  };
  await draw(null, null);
  return holder;
}

// ---------------------------------------------------------------- one run

async function runPage(root, id, alive) {
  const rec = await get(`/runs/${id}`);
  if (!alive()) return;
  const r = rec.run;
  const tabs = ["overview", "metrics", "system", "logs", "code", "environment", "artifacts", "lineage", "reproductions", "audit"];
  const tab = hashQuery().get("tab") || "overview";
  root.append(
    h("h1", {}, r.name || short(r.id), " ", statusTag(r.status)),
    h("div", { class: "muted" }, `${r.app} · ${r.function || "inline"} · ${r.id}`),
    h("div", { class: "tabs" }, tabs.map((t) => link(`#/run/${r.id}?tab=${t}`, t, { class: t === tab ? "on" : "", "data-tab": t }))));
  const body = h("div", { "data-tab-body": tab });
  root.append(body);
  const metricKeys = Object.keys(rec.summary).filter((k) => !k.startsWith("sys/")).sort();
  const sysKeys = Object.keys(rec.summary).filter((k) => k.startsWith("sys/")).sort();
  const label = { [r.id]: r.name || short(r.id) };
  const views = {
    overview: async () => {
      const isData = (v) => v && typeof v === "object" && !Array.isArray(v) && typeof v.sha256 === "string" && ("dataset" in v || "artifact" in v);
      const inputs = Object.entries(r.params).filter(([, v]) => isData(v));
      body.append(h("div", { class: "cards" },
        h("div", { class: "card" }, h("h3", {}, "Run"), kv([
          ["status", statusTag(r.status)], ["actor", r.actor], ["host", r.host], ["engine", r.engine],
          ["attempt", r.attempt], ["created", when(r.created_at)], ["started", when(r.started_at)],
          ["ended", when(r.ended_at)], ["duration", dur(r.ended_at && r.started_at ? r.ended_at - r.started_at : null)],
          ["sweep", r.parent_id ? link(`#/sweep/${r.parent_id}`, short(r.parent_id)) : null],
          ["result", r.result === null ? null : fmt(r.result)],
          ["trace", r.trace_id],
        ])),
        h("div", { class: "card" }, h("h3", {}, "Params"), table(["param", "value"], Object.entries(r.params).filter(([, v]) => !isData(v)), { id: "params" })),
        h("div", { class: "card" }, h("h3", {}, "Summary"), table(["metric", "value"], metricKeys.map((k) => [k, fmt(num(rec.summary[k]))]), { id: "summary" })),
        h("div", { class: "card" }, h("h3", {}, "Datasets"), inputs.length ? table(["param", "artifact", "sha256"],
          inputs.map(([k, v]) => [k, v.dataset ?? v.artifact, link(`#/lineage/${v.sha256}`, v.sha256.slice(0, 16), { title: "its lineage" })]))
          : h("p", { class: "muted" }, "none")),
        h("div", { class: "card" }, h("h3", {}, "Tags"), Object.keys(r.tags).length ? table(["tag", "value"], Object.entries(r.tags)) : h("p", { class: "muted" }, "none"))));
      if (r.error) body.append(h("h2", {}, "Error"), h("pre", { class: "error-box" }, r.error));
    },
    metrics: async () => {
      if (!metricKeys.length) { body.append(h("p", { class: "muted" }, "This run logged no metrics.")); return; }
      const cards = h("div", { class: "cards" });
      const more = metricKeys.length > 24 ? ` Showing 24 of ${metricKeys.length} metrics; compare the run to chart the others.` : "";
      body.append(h("p", { class: "muted" }, `Drag across a chart to zoom in (exact points once few enough); double-click to zoom out.${more}`), cards);
      for (const k of metricKeys.slice(0, 24)) cards.append(await seriesChart([r.id], k, label));
    },
    system: async () => {
      const fit = await get(`/runs/${r.id}/fit`);
      const u = r.usage || {};
      body.append(h("div", { class: "cards" },
        h("div", { class: "card", id: "fit" }, h("h3", {}, "Right-sizing"), kv([
          ["wall", dur(fit.wall_s)], ["CPU asked", fit.cpu_requested], ["CPU used (mean)", fit.cpu_used === null ? null : fit.cpu_used.toFixed(2)],
          ["CPU efficiency", fit.cpu_efficiency === null ? null : `${(fit.cpu_efficiency * 100).toFixed(0)}%`],
          ["memory asked", bytes(fit.memory_requested_bytes)], ["memory peak", bytes(fit.memory_peak_bytes)],
          ["GPU asked", fit.gpu_requested], ["GPU utilization", fit.gpu_utilization === null ? null : `${fit.gpu_utilization.toFixed(0)}%`],
          ["GPU memory peak", bytes(fit.gpu_memory_peak_bytes)], ["swap in+out", bytes(fit.swap_bytes)], ["major faults", fit.major_faults],
        ]), fit.advice.length ? h("ul", { class: "advice" }, fit.advice.map((a) => h("li", {}, a))) : h("p", { class: "muted" }, "No advice: it asked for about what it used.")),
        h("div", { class: "card" }, h("h3", {}, "Usage"), kv([
          ["CPU time", dur(u.cpu_s)], ["cores (mean)", u.cpu_cores_mean], ["peak RSS", bytes(u.peak_rss_bytes)],
          ["peak RSS (tree)", bytes(u.peak_rss_tree_bytes)], ["disk read", bytes(u.disk_read_bytes)], ["disk written", bytes(u.disk_write_bytes)],
          ["samples", u.sys_samples]]))));
      const cards = h("div", { class: "cards" });
      body.append(cards);
      for (const k of sysKeys.slice(0, 24)) cards.append(await seriesChart([r.id], k, label));
    },
    logs: async () => { body.append(await logView(r)); },
    code: async () => {
      const c = r.code || {};
      body.append(kv([["commit", c.commit], ["branch", c.branch], ["uncommitted changes", c.dirty ? "yes" : "no"], ["module", c.module_path], ["source sha256", c.source_sha256]]));
      if (c.patch_sha256) body.append(h("h2", {}, "Uncommitted diff"), diffView(await blobText(c.patch_sha256)));
      else if (c.source_blob && !c.commit) body.append(h("h2", {}, "Source"), h("pre", {}, await blobText(c.source_blob)));
    },
    environment: async () => {
      const e = r.environment || {};
      body.append(kv([["python", e.python], ["implementation", e.implementation], ["platform", e.platform], ["packages", e.package_count],
        ["env", e.env_id], ["lock sha256", e.lock_sha256], ["resources", JSON.stringify(r.resources || {})]]));
      if (e.lock_sha256) body.append(h("h2", {}, "Lock"), h("pre", { id: "lock" }, await blobText(e.lock_sha256)));
      else if (e.packages_sha256) body.append(h("h2", {}, "Packages"), h("pre", { id: "lock" }, await blobText(e.packages_sha256)));
    },
    artifacts: async () => {
      body.append(table(["name", "direction", "kind", "size", "sha256", ""], rec.artifacts.map((a) => [a.name, a.direction, a.kind, bytes(a.size),
        link(`#/lineage/${a.sha256}`, a.sha256.slice(0, 16), { title: "its lineage" }),
        h("button", { onclick: () => download(a.sha256, a.name).catch((e) => body.append(errorBox(e))) }, "download")]), { id: "artifacts" }));
    },
    lineage: async () => { body.append(await lineageGraph(r.id)); },
    reproductions: async () => {
      const found = await post("/runs:search", { tags: { reproduced_from: r.id }, limit: 100 });
      body.append(found.runs.length ? table(["run", "status", "verdict", "created"], found.runs.map((x) => [runLink(x.run.id), statusTag(x.run.status),
        x.run.tags.reproduce_verdict || "", when(x.run.created_at)]), { id: "reproductions" })
        : h("p", { class: "muted" }, `Not reproduced yet: kiln reproduce ${short(r.id)}`));
    },
    audit: async () => { body.append(await eventsTable({ target: r.id })); },
  };
  await (views[tab] || views.overview)();
}

function diffView(text) {
  const pre = h("pre", { class: "diff", id: "diff" });
  for (const line of text.split("\n")) {
    const cls = line.startsWith("diff ") || line.startsWith("+++") || line.startsWith("---") ? "file"
      : line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "";
    pre.append(h("span", { class: cls }, line), "\n");
  }
  return pre;
}

async function logView(r) {
  // What the run printed, oldest first; while it runs, what it prints next appears.
  const pre = h("pre", { class: "logs", id: "logs" });
  const note = h("p", { class: "muted", "data-live": "" });
  let after = 0;
  const pull = async () => {
    for (;;) {
      const found = await get(`/runs/${r.id}/logs?after=${after}&limit=1000`);
      for (const c of found.logs) {
        pre.append(h("span", { class: c.stream }, c.text));
        after = c.id;
      }
      if (found.logs.length < 1000) break;
    }
  };
  await pull();
  const live = ["queued", "running"].includes(r.status);
  if (!pre.childNodes.length) note.textContent = live ? "Nothing printed yet." : "It printed nothing.";
  if (live) {
    note.textContent = "Live: new output appears as the run prints it.";
    const timer = setInterval(async () => {
      if (!document.body.contains(pre)) { clearInterval(timer); return; }
      try {
        await pull();
        const now = await get(`/runs/${r.id}`);
        if (!["queued", "running"].includes(now.run.status)) { clearInterval(timer); note.textContent = `The run ended: ${now.run.status}.`; }
      } catch { clearInterval(timer); }
    }, 1500);
  }
  return h("div", {}, note, pre);
}

// ---------------------------------------------------------------- compare and sweeps

async function comparePage(root, alive) {
  const ids = (hashQuery().get("runs") || "").split(",").filter(Boolean).slice(0, 100);
  if (!ids.length) {
    root.append(h("p", { class: "muted" }, "Select runs in the ", link("#/runs", "runs table"), " and press Compare."));
    return;
  }
  const records = await Promise.all(ids.map((id) => get(`/runs/${id}`)));
  if (!alive()) return;
  root.append(h("h1", {}, `Compare ${records.length} runs`));
  await comparison(root, records);
}

async function sweepPage(root, id, alive) {
  const sweep = await get(`/runs/${id}`);
  const found = await post("/runs:search", { parent_id: sweep.run.id, limit: 1000, order_by: "created" });
  if (!alive()) return;
  root.append(h("h1", {}, `Sweep ${sweep.run.name || short(sweep.run.id)} `, statusTag(sweep.run.status)),
    h("p", { class: "muted" }, `${found.runs.length} runs · `, runLink(sweep.run.id, "the sweep's own run")));
  if (!found.runs.length) { root.append(h("p", { class: "muted" }, "No runs yet.")); return; }
  await comparison(root, found.runs, { sweep: sweep.run });
}

function metricNames(records) {
  const keys = new Set();
  for (const r of records) for (const k of Object.keys(r.summary)) if (!k.startsWith("sys/")) keys.add(k);
  return [...keys].sort();
}

async function comparison(root, records, { sweep } = {}) {
  const metrics = metricNames(records);
  const params = [...new Set(records.flatMap((r) => Object.keys(r.run.params)))].sort()
    .filter((p) => records.some((r) => typeof r.run.params[p] !== "object" || r.run.params[p] === null));
  const labels = Object.fromEntries(records.map((r) => [r.run.id, r.run.name || short(r.run.id)]));
  // the best run by a metric (the sweep's objective where it names one; else a guess)
  const guess = metrics.find((m) => /^val/i.test(m)) || metrics.find((m) => /acc|score|f1|auc/i.test(m))
    || metrics.find((m) => /loss|error/i.test(m)) || metrics[0];
  const objective = (sweep && sweep.tags && sweep.tags.objective) || guess;
  if (objective) {
    const by = h("select", { id: "best-by", onchange: () => best() }, metrics.map((m) => h("option", { value: m, selected: m === objective }, m)));
    const goal = h("select", { id: "best-goal", onchange: () => best() }, h("option", { value: "max" }, "highest"), h("option", { value: "min", selected: /loss|error|latency/i.test(objective) }, "lowest"));
    const out = h("span", { id: "best" });
    const best = () => {
      const key = by.value;
      const sign = goal.value === "min" ? 1 : -1;
      const scored = records.filter((r) => Number.isFinite(num(r.summary[key])))
        .sort((a, b) => sign * (num(a.summary[key]) - num(b.summary[key])));
      out.replaceChildren(...(scored.length ? [runLink(scored[0].run.id, labels[scored[0].run.id]), ` = ${fmt(num(scored[0].summary[key]))}`] : ["no run holds it"]));
    };
    best();
    root.append(h("p", { class: "bar" }, "Best by", by, goal, ":", out));
  }
  // params and metrics side by side
  const differs = (vals) => new Set(vals.map((v) => JSON.stringify(v))).size > 1;
  const rows = [
    ...params.map((p) => ["param", p, records.map((r) => r.run.params[p])]),
    ...metrics.map((m) => ["metric", m, records.map((r) => num(r.summary[m]))]),
  ];
  if (records.length <= 30) {
    const onlyDiff = h("input", { type: "checkbox", id: "only-diff", onchange: () => {
      diffTable.querySelectorAll("tbody tr").forEach((tr) => { tr.hidden = onlyDiff.checked && !tr.classList.contains("differs"); });
    } });
    const diffTable = h("table", { class: "grid", id: "diff-table" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), records.map((r) => h("th", {}, runLink(r.run.id, labels[r.run.id]))))),
      h("tbody", {}, rows.map(([kind, name, vals]) => h("tr", { class: differs(vals) ? "differs" : "" },
        h("td", {}, h("span", { class: "muted" }, `${kind} `), name), vals.map((v) => h("td", { class: "num" }, fmt(v)))))));
    root.append(h("h2", {}, "Params and metrics"), h("label", {}, onlyDiff, " only what differs"), diffTable);
  }
  // parallel coordinates and the Pareto front
  const axes = [...params.filter((p) => differs(records.map((r) => r.run.params[p]))).map((p) => ({ name: p, get: (r) => r.run.params[p] })),
    ...metrics.map((m) => ({ name: m, get: (r) => num(r.summary[m]) }))];
  if (axes.length >= 2) root.append(h("h2", {}, "Parallel coordinates"), parallel(records.slice(0, 1000), axes, objective));
  if (metrics.length >= 2) root.append(h("h2", {}, "Pareto front"), pareto(records, metrics, labels, objective));
  // overlaid charts of each metric
  const shown = records.slice(0, 100).map((r) => r.run.id);
  const cards = h("div", { class: "cards", id: "overlaid" });
  root.append(h("h2", {}, `Metrics over steps${records.length > 100 ? " (the first 100 runs)" : ""}`), cards);
  for (const m of metrics.slice(0, 12)) cards.append(await seriesChart(shown, m, labels));
}

function parallel(records, axes, colorBy) {
  // One polyline per run across an axis per param or metric; colored by the objective.
  const width = Math.max(600, Math.min(1400, axes.length * 140)), height = 320, pad = 40;
  const canvas = h("canvas", { class: "pc", id: "parallel", width, height });
  const ctx = canvas.getContext("2d");
  const xs = axes.map((_, i) => pad + (i * (width - 2 * pad)) / Math.max(1, axes.length - 1));
  const scales = axes.map((a) => {
    const vals = records.map((r) => a.get(r));
    const nums = vals.filter((v) => typeof v === "number" && Number.isFinite(v));
    if (nums.length === vals.filter((v) => v !== undefined && v !== null).length && nums.length) {
      const lo = Math.min(...nums), hi = Math.max(...nums);
      return { pos: (v) => (typeof v === "number" && Number.isFinite(v) ? (hi === lo ? 0.5 : (v - lo) / (hi - lo)) : null), lo: fmt(lo), hi: fmt(hi) };
    }
    const cats = [...new Set(vals.map((v) => JSON.stringify(v)))].sort();
    const pos = (v) => (cats.length === 1 ? 0.5 : cats.indexOf(JSON.stringify(v)) / (cats.length - 1));
    const names = cats.map((c) => { const v = JSON.parse(c); return typeof v === "string" ? v : c; });
    return { pos, cats: cats.length <= 12 ? names.map((n, i) => [n, pos(JSON.parse(cats[i]))]) : null,
      lo: names[0], hi: names[names.length - 1] };
  });
  const colorAxis = axes.findIndex((a) => a.name === colorBy);
  ctx.globalAlpha = records.length > 200 ? 0.25 : 0.6;
  for (const r of records) {
    const c = colorAxis >= 0 ? scales[colorAxis].pos(axes[colorAxis].get(r)) : 0.5;
    ctx.strokeStyle = c === null ? "#999" : `hsl(${220 - 200 * c}, 70%, 45%)`;
    ctx.beginPath();
    axes.forEach((a, i) => {
      const p = scales[i].pos(a.get(r));
      const y = p === null ? height - 8 : height - pad - p * (height - 2 * pad);
      if (i === 0) ctx.moveTo(xs[i], y); else ctx.lineTo(xs[i], y);
    });
    ctx.stroke();
  }
  ctx.globalAlpha = 1;
  ctx.fillStyle = "#1d2330";
  ctx.font = "11px system-ui";
  ctx.textAlign = "center";
  axes.forEach((a, i) => {
    ctx.strokeStyle = "#64748b";
    ctx.beginPath(); ctx.moveTo(xs[i], pad); ctx.lineTo(xs[i], height - pad); ctx.stroke();
    ctx.fillText(a.name.slice(0, 20), xs[i], 14);
    if (scales[i].cats) {
      ctx.textAlign = "left";
      for (const [name, p] of scales[i].cats) ctx.fillText(name.slice(0, 16), xs[i] + 4, height - pad - p * (height - 2 * pad) + 4);
      ctx.textAlign = "center";
    } else {
      ctx.fillText(String(scales[i].hi).slice(0, 14), xs[i], pad - 6);
      ctx.fillText(String(scales[i].lo).slice(0, 14), xs[i], height - pad + 14);
    }
  });
  canvas.dataset.lines = String(records.length);
  return canvas;
}

function paretoFront(points, maxX, maxY) {
  // points: [{x, y, id}] -> those no other point beats on both (larger or smaller as asked)
  const sx = maxX ? -1 : 1, sy = maxY ? -1 : 1;
  const sorted = [...points].sort((a, b) => sx * (a.x - b.x) || sy * (a.y - b.y));
  const front = [];
  let best = Infinity;
  for (const p of sorted) if (sy * p.y < best) { front.push(p); best = sy * p.y; }
  return front;
}

function pareto(records, metrics, labels, first) {
  const box = h("div", { id: "pareto" });
  const varied = metrics.filter((m) => new Set(records.map((r) => String(r.summary[m]))).size > 1);
  const yDefault = first || varied[0] || metrics[0];
  const xDefault = varied.find((m) => m !== yDefault) || metrics.find((m) => m !== yDefault);
  const pick = (id, value) => h("select", { id, onchange: () => draw() }, metrics.map((m) => h("option", { value: m, selected: m === value }, m)));
  const x = pick("pareto-x", xDefault), y = pick("pareto-y", yDefault);
  const dir = (id, m) => h("select", { id, onchange: () => draw() }, h("option", { value: "max" }, "higher is better"),
    h("option", { value: "min", selected: /loss|error|latency|cost/i.test(m) }, "lower is better"));
  const dx = dir("pareto-dx", xDefault), dy = dir("pareto-dy", yDefault);
  const out = h("div");
  box.append(h("div", { class: "bar" }, "x", x, dx, "y", y, dy), out);
  function draw() {
    const pts = records.map((r) => ({ x: num(r.summary[x.value]), y: num(r.summary[y.value]), id: r.run.id }))
      .filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
    const front = paretoFront(pts, dx.value === "max", dy.value === "max");
    out.replaceChildren(h("div", { class: "card" }, h("h3", {}, `${y.value} against ${x.value}: ${front.length} of ${pts.length} runs on the front`),
      scatter(pts, front, x.value, y.value)),
    table(["run", x.value, y.value], front.map((p) => [runLink(p.id, labels[p.id]), p.x, p.y]), { id: "front" }));
  }
  draw();
  return box;
}

function scatter(points, front, xName, yName) {
  // every run as a dot, the front as a line through its runs
  const W = 600, H = 280, L = 60, B = 30, T = 10, R = 10;
  const canvas = h("canvas", { width: W, height: H, id: "scatter" });
  const ctx = canvas.getContext("2d");
  const span = (vals) => { const lo = Math.min(...vals), hi = Math.max(...vals); return hi > lo ? [lo, hi] : [lo - 1, hi + 1]; };
  const [x0, x1] = span(points.map((p) => p.x)), [y0, y1] = span(points.map((p) => p.y));
  const px = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R), py = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - B - T);
  ctx.strokeStyle = "#cbd5e1"; ctx.strokeRect(L, T, W - L - R, H - B - T);
  ctx.fillStyle = "#475569"; ctx.font = "11px system-ui";
  ctx.textAlign = "center"; ctx.fillText(`${xName}: ${fmt(x0)} … ${fmt(x1)}`, (L + W) / 2, H - 8);
  ctx.save(); ctx.translate(14, (H - B) / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(`${yName}: ${fmt(y0)} … ${fmt(y1)}`, 0, 0); ctx.restore();
  ctx.fillStyle = "#94a3b8";
  for (const p of points) { ctx.beginPath(); ctx.arc(px(p.x), py(p.y), 3, 0, 7); ctx.fill(); }
  ctx.strokeStyle = ctx.fillStyle = "#c2410c"; ctx.lineWidth = 2; ctx.beginPath();
  front.forEach((p, i) => (i ? ctx.lineTo(px(p.x), py(p.y)) : ctx.moveTo(px(p.x), py(p.y))));
  ctx.stroke();
  for (const p of front) { ctx.beginPath(); ctx.arc(px(p.x), py(p.y), 4.5, 0, 7); ctx.fill(); }
  canvas.dataset.front = String(front.length);
  return canvas;
}

// ---------------------------------------------------------------- lineage

async function lineageGraph(ref) {
  const g = await get(`/lineage/${encodeURIComponent(ref)}?depth=20`);
  const ids = [...Object.keys(g.runs), ...Object.keys(g.artifacts)];
  if (ids.length <= 1 && !g.edges.length) return h("p", { class: "muted" }, "Nothing flows into or out of it.");
  // layers: the longest path from a source, so every edge points rightwards
  const layer = Object.fromEntries(ids.map((i) => [i, 0]));
  for (let pass = 0; pass < ids.length; pass++) {
    let moved = false;
    for (const e of g.edges) if (layer[e.to] <= layer[e.from]) { layer[e.to] = layer[e.from] + 1; moved = true; }
    if (!moved) break;
  }
  const columns = [];
  for (const i of ids) (columns[layer[i]] ||= []).push(i);
  // order within a column by the mean row of what points in (one pass of barycenters)
  const row = {};
  columns.forEach((col, c) => {
    if (c > 0) {
      const at = (i) => { const ins = g.edges.filter((e) => e.to === i).map((e) => row[e.from]).filter((v) => v !== undefined); return ins.length ? ins.reduce((a, b) => a + b) / ins.length : 0; };
      col.sort((a, b) => at(a) - at(b));
    }
    col.forEach((i, r) => { row[i] = r; });
  });
  const W = 190, H = 34, GX = 70, GY = 18;
  const tall = Math.max(...columns.map((c) => c.length));
  const pos = {};
  columns.forEach((col, c) => col.forEach((i, r) => { pos[i] = { x: 10 + c * (W + GX), y: 10 + r * (H + GY) + ((tall - col.length) * (H + GY)) / 2 }; }));
  const label = (i) => {
    if (g.runs[i]) { const r = g.runs[i]; return `${r.name || r.app || "run"} ${short(i)}`; }
    const a = g.artifacts[i] || {};
    return `${a.name || "artifact"} ${i.slice(0, 8)}`;
  };
  const graph = svg("svg", { class: "graph", id: "lineage", width: 20 + columns.length * (W + GX), height: 20 + tall * (H + GY) },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" }, svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#94a3b8" }))),
    g.edges.map((e) => {
      const a = pos[e.from], b = pos[e.to];
      if (!a || !b) return null;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      return svg("path", { class: "edge", d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}` }, svg("title", { text: e.kind }));
    }),
    ids.map((i) => {
      const p = pos[i];
      const node = svg("g", { class: `node ${g.runs[i] ? "run" : "artifact"}${i === g.root ? " root" : ""}`, transform: `translate(${p.x},${p.y})`, "data-node": i },
        svg("rect", { width: W, height: H }), svg("text", { x: 8, y: 21, text: label(i).slice(0, 30) }));
      if (g.runs[i]) { node.style.cursor = "pointer"; node.addEventListener("click", () => { location.hash = `#/run/${i}`; }); }
      return node;
    }));
  return h("div", { style: "overflow:auto" }, graph);
}

async function lineagePage(root, ref) {
  root.append(h("h1", {}, `Lineage of ${ref}`), await lineageGraph(ref));
}

// ---------------------------------------------------------------- models

async function modelsPage(root, alive) {
  const [names, pending] = await Promise.all([get("/models"), get("/promotion-requests?status=pending")]);
  if (!alive()) return;
  root.append(h("h1", {}, "Models"),
    names.items.length ? h("ul", { id: "models" }, names.items.map((n) => h("li", {}, link(`#/model/${encodeURIComponent(n)}`, n))))
      : h("p", { class: "muted" }, "No model registered yet (kiln models register)."),
    h("h2", {}, "Pending promotion requests"), requestsTable(pending.requests, () => route()));
}

function requestsTable(requests, after) {
  if (!requests.length) return h("p", { class: "muted", id: "requests" }, "None.");
  return table(["request", "model", "alias", "version", "by", "reason", "approvals", ""], requests.map((q) => [
    q.id, q.name, q.alias, q.version, q.requested_by, q.reason || "", `${q.approvals.length}/${q.needed}`,
    may("approver") ? h("span", {},
      h("button", { class: "primary", "data-approve": q.id, onclick: (e) => act(e.target, () => post(`/promotion-requests/${q.id}/approve`), after) }, "Approve"), " ",
      h("button", { class: "danger", "data-reject": q.id, onclick: (e) => {
        const reason = prompt("Why reject it?");
        if (reason) act(e.target, () => post(`/promotion-requests/${q.id}/reject`, { reason }), after);
      } }, "Reject")) : "",
  ]), { id: "requests" });
}

async function act(button, call, after) {
  button.disabled = true;
  try {
    await call();
    after();
  } catch (e) {
    if (e instanceof Halt) return;
    button.disabled = false;
    button.parentElement.append(errorBox(e));
  }
}

async function modelPage(root, name, alive) {
  const q = encodeURIComponent(name);
  const [versions, aliases, history, pending] = await Promise.all([get(`/models/${q}/versions`), get(`/models/${q}/aliases`),
    get(`/models/${q}/history`), get("/promotion-requests?status=pending")]);
  if (!alive()) return;
  const policies = await Promise.all(Object.keys(aliases).map((a) => get(`/models/${q}/policies/${a}`).then((p) => [a, p.policy])));
  root.append(h("h1", {}, `Model ${name}`),
    h("h2", {}, "Aliases"), table(["alias", "version", "policy", ""], Object.entries(aliases).map(([a, v]) => [
      a, v, fmt(Object.fromEntries(policies)[a]) || "none",
      may("admin") ? h("button", { "data-rollback": a, onclick: (e) => {
        const reason = prompt(`Roll ${name}@${a} back to the version before ${v}? Reason:`);
        if (reason) act(e.target, () => post(`/models/${q}/rollback`, { alias: a, reason }), () => route());
      } }, "Roll back") : "",
    ]), { id: "aliases" }),
    h("h2", {}, "Pending requests"), requestsTable(pending.requests.filter((r) => r.name === name), () => route()),
    h("h2", {}, "Versions"), table(["version", "run", "artifact", "metrics", "registered by", "at"], versions.versions.map((v) => [
      v.version, runLink(v.run_id), link(`#/lineage/${v.artifact_sha256}`, v.artifact, { title: "its lineage" }), fmt(v.metrics),
      v.created_by, when(v.created_at)]), { id: "versions" }),
    h("h2", {}, "Alias history"), table(["alias", "from", "to", "by", "reason", "at"], history.moves.map((m) => [
      m.alias, m.from_version ?? "new", m.to_version, m.actor, m.reason || "", when(m.at)]), { id: "history" }));
}

// ---------------------------------------------------------------- shared hardware

const amounts = (a) => Object.entries(a || {}).filter(([, v]) => v).map(([k, v]) => `${fmt(v)} ${k === "memory" ? "GiB" : k}`).join(", ") || "–";

function waitReason(w) {
  const r = w.reason;
  if (!r) return w.cause || "";
  if (r.resource) {
    const held = (r.held_by || []).slice(0, 3).map((x) => `${x.id ? `${x.project}/${short(x.id)}` : `a run of ${x.project}`} (${fmt(x.amount)})`).join(", ");
    return `needs ${fmt(r.missing)} more ${r.resource} in queue ${r.project}` + (held ? `; held by ${held}` : "");
  }
  return r.behind && r.behind.length ? `behind ${r.behind.length} of its queue` : (w.cause || "");
}

async function queuesPage(root, alive) {
  const [pools, queues, budgets, work] = await Promise.all([get("/pools"), get("/queues"), get("/budgets"), get("/workloads")]);
  if (!alive()) return;
  root.append(h("h1", {}, "Queues"));
  if (!pools.items.length) {
    root.append(h("p", { class: "muted" }, "No pools on this server: an admin adds one with kiln pools set NAME --cpu N --gpu N."));
    return;
  }
  root.append(h("h2", {}, "Pools"), table(["pool", "capacity", "in use", "queues", "pending", "GPU type"],
    pools.items.map((p) => [p.name, amounts(p.capacity), amounts(p.in_use), p.queues.join(", "), p.pending, p.gpu_type || ""]), { id: "pools" }));
  root.append(h("h2", {}, "This project's queues"), queues.items.length
    ? table(["pool", "nominal", "in use", "cohort", "may borrow", "lends at most", "weight", "strategy", "admitted", "pending"],
      queues.items.map((q) => [q.pool, amounts(q.nominal), amounts(q.in_use), q.cohort || "", Object.keys(q.borrowing_limit).length ? amounts(q.borrowing_limit) : "what its cohort lends",
        Object.keys(q.lending_limit).length ? amounts(q.lending_limit) : "all", fmt(q.weight), q.strategy + (q.fair_sharing ? ", fair sharing" : ""), q.admitted, q.pending]), { id: "queues" })
    : h("p", { class: "muted" }, "None: a project admin sets one with kiln queues set POOL --cpu N."));
  root.append(h("h2", {}, "Budgets"), budgets.items.length
    ? table(["whose", "budget", "spent", "left"], budgets.items.map((b) => [b.principal || "the project",
      `$${fmt(b.amount)}${b.period === "total" ? "" : ` per ${b.period}`}`, `$${fmt(b.spent)}`, `$${fmt(b.left)}`]), { id: "budgets" })
    : h("p", { class: "muted" }, "None."));
  root.append(h("h2", {}, "Admitted and waiting"), work.items.length
    ? table(["run", "pool", "state", "asks", "priority", "since", "why"], work.items.map((w) => [runLink(w.id), w.pool, w.state,
      amounts(w.requests), w.priority + (w.agent ? " (agent)" : ""), when(w.admitted_at || w.submitted_at), waitReason(w)]), { id: "workloads" })
    : h("p", { class: "muted" }, "Nothing admitted or waiting."));
}

// ---------------------------------------------------------------- approvals

async function approvalsPage(root, alive) {
  const [pending, decided] = await Promise.all([get("/approvals?status=pending"), get("/approvals?status=all")]);
  if (!alive()) return;
  const person = session.me && session.me.kind === "user";
  root.append(h("h1", {}, "Approvals"),
    h("p", { class: "muted" }, "An agent's promotion, rollback, traffic change or removal waits here. Each approval is bound to the exact arguments below and works once, within the hour."),
    h("h2", {}, "Waiting"), pending.approvals.length
      ? table(["id", "agent", "sponsor", "operation", "arguments", "would change", "asked", ""], pending.approvals.map((a) => [
        a.id, a.principal, a.sponsor || "", a.operation, h("pre", { class: "args" }, JSON.stringify(a.args, null, 2)),
        h("pre", { class: "args" }, a.preview ? JSON.stringify(a.preview, null, 2) : ""), when(a.created_at),
        person && may("approver") ? h("span", {},
          h("button", { class: "primary", "data-approve": a.id, onclick: (e) => act(e.target, () => post(`/approvals/${a.id}/approve`), () => route()) }, "Approve"), " ",
          h("button", { class: "danger", "data-reject": a.id, onclick: (e) => {
            const reason = prompt("Why reject it?");
            if (reason) act(e.target, () => post(`/approvals/${a.id}/reject`, { reason }), () => route());
          } }, "Reject")) : "",
      ]), { id: "approvals" })
      : h("p", { class: "muted", id: "approvals" }, "Nothing waits for a decision."),
    h("h2", {}, "Decided"), decidedTable(decided.approvals.filter((a) => a.status !== "pending").slice(0, 100)));
}

function decidedTable(rows) {
  if (!rows.length) return h("p", { class: "muted", id: "decided" }, "None yet.");
  return table(["id", "agent", "operation", "status", "by", "reason", "when"],
    rows.map((a) => [a.id, a.principal, a.operation, a.status, a.decided_by || "", a.reason || "", when(a.decided_at || a.created_at)]), { id: "decided" });
}

// ---------------------------------------------------------------- endpoints and traces

async function endpointsPage(root, alive) {
  const [eps, spans] = await Promise.all([get("/endpoints"), get("/spans?limit=2000")]);
  const servers = { servers: (await Promise.all(eps.endpoints.map((e) => get(`/servers?endpoint=${encodeURIComponent(e.name)}`)))).flatMap((s) => s.servers) };
  if (!alive()) return;
  root.append(h("h1", {}, "Endpoints"));
  if (!eps.endpoints.length) { root.append(h("p", { class: "muted" }, "No endpoint has been served yet (kiln serve).")); return; }
  for (const e of eps.endpoints) {
    const mine = servers.servers.filter((s) => s.endpoint === e.name);
    const lat = spans.spans.filter((s) => s.endpoint === e.name).map((s) => s.duration_ns / 1e6).sort((a, b) => a - b);
    const q = (p) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(2) : "");
    root.append(h("div", { class: "card", "data-endpoint": e.name }, h("h3", {}, e.name),
      kv([["model", e.model], ["app", e.app], ["traffic", e.traffic ? Object.entries(e.traffic).map(([v, w]) => `${v}: ${(w * 100).toFixed(0)}%`).join(", ") : `all to ${e.model}`],
        ["replicas", `${e.spec.min_replicas ?? ""}–${e.spec.max_replicas ?? ""}`], ["latency of recent traces", lat.length ? `p50 ${q(0.5)} ms · p99 ${q(0.99)} ms over the last ${lat.length} answers` : ""],
        ["traces", link(`#/traces?endpoint=${encodeURIComponent(e.name)}`, "see traces")]]),
      table(["server", "status", "replicas", "requests", "errors", "p50 ms (since start)", "p99 ms", "cost per 1,000 requests", "since"], mine.map((s) => {
        const st = s.stats || {};
        const cost = st.cost_per_1k_requests;
        return [s.url || s.id.slice(0, 8), s.status, st.replicas ?? "", st.requests ?? "", st.errors ?? "",
          st.latency_ms ? st.latency_ms.p50.toFixed(2) : "", st.latency_ms ? st.latency_ms.p99.toFixed(2) : "",
          cost === undefined || cost === null ? "no price table (KILN_PRICES)" : typeof cost === "object" ? fmt(cost.total ?? cost) : `$${fmt(cost)}`, when(s.started_at)];
      }))));
  }
}

async function tracesPage(root, alive) {
  const p = hashQuery();
  const endpoint = h("input", { id: "f-endpoint", placeholder: "endpoint", value: p.get("endpoint") || "" });
  const run = h("input", { id: "f-run", placeholder: "run id", value: p.get("run") || "" });
  const errors = h("input", { type: "checkbox", id: "f-errors", checked: p.get("errors") === "1" });
  const out = h("div");
  const apply = async () => {
    const qp = new URLSearchParams();
    if (endpoint.value) qp.set("endpoint", endpoint.value);
    if (run.value) qp.set("run", run.value);
    if (errors.checked) qp.set("errors", "1");
    setHashQuery("#/traces", qp);
    const api_q = new URLSearchParams({ limit: "200" });
    if (endpoint.value) api_q.set("endpoint", endpoint.value);
    if (run.value) api_q.set("run_id", run.value);
    if (errors.checked) api_q.set("errors_only", "true");
    const found = await get(`/spans?${api_q}`);
    if (!alive()) return;
    out.replaceChildren(table(["trace", "span", "endpoint", "model", "status", "latency", "at"], found.spans.map((s) => [
      link(`#/trace/${s.trace_id}-${s.span_id}`, s.trace_id.slice(0, 16), { "data-trace": s.trace_id }), s.name, s.endpoint || "",
      s.model_name ? `${s.model_name}:${s.model_version}` : "", statusTag(s.status === "error" ? "error" : "ok"),
      `${(s.duration_ns / 1e6).toFixed(2)} ms`, when(s.start_ns / 1e9)]), { id: "traces" }));
  };
  root.append(h("h1", {}, "Traces"), h("form", { class: "bar", onsubmit: (e) => { e.preventDefault(); apply().catch((x) => out.replaceChildren(errorBox(x))); } },
    endpoint, run, h("label", {}, errors, " errors only"), h("button", { type: "submit" }, "Filter")), out);
  await apply();
}

async function tracePage(root, ref, alive) {
  const w = await get(`/traces/${encodeURIComponent(ref)}/why`);
  if (!alive()) return;
  root.append(h("h1", {}, `Why: trace ${w.trace_id.slice(0, 16)}`), h("div", { id: "why" },
    h("div", { class: "card" }, h("h3", {}, "Answer"), kv([["endpoint", w.endpoint], ["status", statusTag(w.status === "error" ? "error" : "ok")],
      ["at", when(w.at_ns / 1e9)], ["latency", `${w.latency_ms.toFixed(2)} ms`], ["error", w.error], ["CPU seconds", w.cpu_seconds]])),
    h("h2", {}, "Input"), h("pre", { id: "why-input", class: "wrap" }, fmt(w.input)),
    h("h2", {}, "Output"), h("pre", { id: "why-output", class: "wrap" }, fmt(w.output)),
    w.model ? [
      h("h2", {}, "Model version"), kv([["version", link(`#/model/${encodeURIComponent(w.model.ref.split(":")[0])}`, w.model.ref)], ["routed by", w.routed_by],
        ["artifact", `${w.model.artifact} (sha256 ${w.model.artifact_sha256.slice(0, 16)})`], ["registered", `${w.model.registered_by} · ${when(w.model.registered_at)}`]]),
      h("h2", {}, "Promotions"), w.promotions.length ? table(["alias", "from", "by", "at", "reason", "policy"], w.promotions.map((p) => [
        `@${p.alias}`, p.from_version ?? "new", p.by, when(p.at), p.reason || "", p.policy ? JSON.stringify(p.policy) : "none"]), { id: "why-promotions" })
        : h("p", { class: "muted" }, "Served without a promotion."),
      h("h2", {}, "Run"), kv([["run", runLink(w.run.id, `${w.run.app} ${short(w.run.id)}`)], ["function", w.run.function], ["status", w.run.status],
        ["by", w.run.actor], ["params", JSON.stringify(w.run.params)], ["metrics", JSON.stringify(w.run.metrics)]]),
      h("h2", {}, "Code"), kv([["commit", w.run.code.commit], ["branch", w.run.code.branch], ["uncommitted diff", w.run.code.patch_sha256 ? w.run.code.patch_sha256.slice(0, 16) : "none"]]),
      h("h2", {}, "Data"), w.run.inputs.length ? table(["input", "kind", "sha256", "size"], w.run.inputs.map((i) => [i.name, i.kind, i.sha256.slice(0, 16), bytes(i.size)])) : h("p", { class: "muted" }, "No recorded inputs."),
      h("h2", {}, "Environment"), kv(Object.entries(w.run.environment || {}).map(([k, v]) => [k, v])),
    ] : h("p", { class: "muted" }, "This trace names no model version.")));
}

// ---------------------------------------------------------------- audit

async function eventsTable(filters) {
  const q = new URLSearchParams({ limit: "200" });
  for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
  const found = await get(`/audit/events?${q}`);
  return table(["#", "at", "actor", "action", "target", "payload"], found.events.map((e) => [
    e.seq, when(e.time), e.actor, e.action, e.target, h("code", {}, fmt(e.payload).slice(0, 300))]), { id: "events" });
}

async function auditPage(root, alive) {
  const p = hashQuery();
  const inputs = Object.fromEntries(["actor", "action", "target"].map((k) => [k, h("input", { id: `f-${k}`, placeholder: k, value: p.get(k) || "" })]));
  const out = h("div");
  const verdict = h("div", { id: "verdict" });
  const verify = h("button", { id: "verify", onclick: async () => {
    verify.disabled = true;
    verdict.replaceChildren(h("p", { class: "muted" }, "Checking the chain, every seal and every blob…"));
    try {
      const v = await post("/audit/verify");
      verdict.replaceChildren(!v.problems.length ? h("div", { class: "ok-box", "data-verdict": "ok" }, `Verified: the chain, every seal and every blob hold (newest event ${head.seq}).`)
        : h("div", { class: "error-box", "data-verdict": "broken" }, `${v.problems.length} problem(s):`,
          h("ul", {}, v.problems.map((x) => h("li", {}, `${x.seq === null ? "" : `event ${x.seq}: `}${x.message}`)))));
    } catch (e) { if (!(e instanceof Halt)) verdict.replaceChildren(errorBox(e)); }
    verify.disabled = false;
  } }, "Verify the chain");
  const apply = async () => {
    const qp = new URLSearchParams();
    for (const [k, el] of Object.entries(inputs)) if (el.value) qp.set(k, el.value);
    setHashQuery("#/audit", qp);
    const table = await eventsTable(Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])));
    if (alive()) out.replaceChildren(table);
  };
  const head = await get("/audit/head");
  root.append(h("h1", {}, "Audit log"), h("p", { class: "muted" }, `Newest event ${head.seq}, hash ${(head.hash || "").slice(0, 16)}`), h("div", { class: "bar" }, verify), verdict,
    h("form", { class: "bar", onsubmit: (e) => { e.preventDefault(); apply().catch((x) => out.replaceChildren(errorBox(x))); } },
      Object.values(inputs), h("button", { type: "submit" }, "Filter")), out);
  await apply();
}
