// The catalog browser: reads the JSON API and keeps every view's state in the URL.
//
//   /                                          projects
//   /?project=P&where=W&order_by=O&offset=N    runs of a project, searched, sorted, paged
//   /?project=P&run=U&file=F                   one run, with a file previewed (a .jsonl charted)
//   /?project=P&compare=U1,U2&file=F&y=K       one .jsonl log of several runs, overlaid
"use strict";

const PAGE = 100;
const PREVIEW_BYTES = 256 * 1024;
const LOG_BYTES = 8 * 1024 * 1024;
const MAX_POINTS = 2000;
const COLORS = ["#0b62c4", "#d1495b", "#2e933c", "#edae49", "#6f42c1", "#00798c", "#e07a5f", "#3d405b"];
const SVG = "http://www.w3.org/2000/svg";
// Keys that count progress: the default x axis when a log has one.
const X_KEYS = ["step", "global_step", "iteration", "iter", "epoch", "batch", "time"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children.flat(Infinity)) if (child) node.append(child instanceof Node ? child : String(child));
  return node;
}

class AuthError extends Error {}

async function api(path, options) {
  const response = await fetch("/api/v1" + path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (response.status === 401) throw new AuthError("This catalog needs a token.");
  if (!response.ok && response.status !== 206) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

async function apiJSON(path) {
  return (await api(path)).json();
}

function fileURL(project, uuid, path) {
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  return `/api/v1/projects/${encodeURIComponent(project)}/runs/${uuid}/files/${encoded}`;
}

async function readFile(project, uuid, path, bytes) {
  const response = await fetch(fileURL(project, uuid, path), {
    credentials: "same-origin",
    headers: { Range: `bytes=0-${bytes - 1}` },
  });
  if (response.status === 401) throw new AuthError("This catalog needs a token.");
  if (!response.ok) throw new Error((await response.json()).detail);
  const text = await response.text();
  const range = response.headers.get("content-range");
  const total = range ? Number(range.split("/")[1]) : text.length;
  return { text, truncated: response.status === 206 && total > bytes, total };
}

function state() {
  return new URLSearchParams(location.search);
}

function link(params, label, attrs) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(key, value);
  }
  const href = "/" + (query.toString() ? "?" + query : "");
  return el("a", Object.assign({ href, onclick: (event) => navigate(event, href) }, attrs || {}), label);
}

function navigate(event, href) {
  if (event && (event.metaKey || event.ctrlKey || event.shiftKey || event.button === 1)) return;
  if (event) event.preventDefault();
  history.pushState(null, "", href);
  render();
}

function go(params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(key, value);
  }
  navigate(null, "/" + (query.toString() ? "?" + query : ""));
}

function flatten(value, prefix, out) {
  for (const [key, item] of Object.entries(value || {})) {
    if (item && typeof item === "object" && !Array.isArray(item)) flatten(item, prefix + key + ".", out);
    else out[prefix + key] = item;
  }
  return out;
}

function show(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function when(text) {
  return text ? text.replace("T", " ").slice(0, 19) : "";
}

function setMain(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children);
}

function crumbs(...items) {
  document.getElementById("crumbs").replaceChildren(...items.flatMap((item, i) => (i ? [" / ", item] : [item])));
}

// Views.

async function projectsView() {
  crumbs();
  document.title = "machinable catalog";
  const { projects } = await apiJSON("/projects");
  if (projects.length === 1) {
    history.replaceState(null, "", "/?project=" + encodeURIComponent(projects[0].name));
    return runsView(state());
  }
  setMain(
    el("h1", { text: "Projects" }),
    projects.length
      ? el("table", { id: "projects" },
          el("thead", {}, el("tr", {}, el("th", { text: "project" }), el("th", { text: "runs" }))),
          el("tbody", {}, projects.map((p) => el("tr", {}, el("td", {}, link({ project: p.name }, p.name)), el("td", { text: p.runs.toLocaleString() })))))
      : el("p", { class: "muted", text: "No projects are served here." }),
  );
}

async function runsView(params) {
  const project = params.get("project");
  const where = params.get("where") || "";
  const orderBy = params.get("order_by") || "";
  const offset = Math.max(0, Number(params.get("offset")) || 0);
  const selected = new Set((params.get("selected") || "").split(",").filter(Boolean));
  crumbs(link({ project }, project));
  document.title = `${project} · machinable`;
  // The rows first; the total (a pass over every match) follows in its own request.
  const query = new URLSearchParams({ limit: PAGE, offset, count: "false" });
  const counting = new URLSearchParams({ limit: 0 });
  if (where) { query.set("where", where); counting.set("where", where); }
  if (orderBy) query.set("order_by", orderBy);

  const input = el("input", { type: "text", name: "where", value: where, placeholder: "config.lr > 0.1 and status = 'finished'", "aria-label": "where" });
  const form = el("form", { class: "search", onsubmit: (event) => {
    event.preventDefault();
    go({ project, where: input.value.trim(), order_by: orderBy });
  } }, input, el("button", { type: "submit", text: "Search" }));

  let page;
  try {
    page = await apiJSON(`/projects/${encodeURIComponent(project)}/runs?${query}`);
  } catch (error) {
    if (error instanceof AuthError) throw error;
    setMain(el("h1", { text: project }), form, el("p", { class: "error", id: "search-error", text: error.message }));
    return;
  }

  const keys = [];
  const flat = page.runs.map((run) => flatten(run.config, "config.", {}));
  for (const row of flat) for (const key of Object.keys(row)) if (!keys.includes(key) && keys.length < 10) keys.push(key);
  const column = (field, label) => {
    const ascending = orderBy === field || orderBy === field + " asc";
    const descending = orderBy === "-" + field || orderBy === field + " desc";
    const next = ascending ? field + " desc" : field;
    const arrow = ascending ? " ▲" : descending ? " ▼" : "";
    return el("th", {}, link({ project, where, order_by: next }, label + arrow, { class: ascending || descending ? "sorted" : null, "data-field": field }));
  };
  const compare = el("button", { type: "button", id: "compare", disabled: selected.size < 1, text: `Compare logs (${selected.size})`,
    onclick: () => go({ project, compare: [...selected].join(",") }) });
  const toggle = (uuid, box) => {
    if (box.checked) selected.add(uuid); else selected.delete(uuid);
    const next = state();
    if (selected.size) next.set("selected", [...selected].join(",")); else next.delete("selected");
    history.replaceState(null, "", "/?" + next);
    compare.disabled = selected.size < 1;
    compare.textContent = `Compare logs (${selected.size})`;
  };
  const rows = page.runs.map((run, i) => {
    const box = el("input", { type: "checkbox", "aria-label": "select " + run.uuid, checked: selected.has(run.uuid) });
    box.addEventListener("change", () => toggle(run.uuid, box));
    return el("tr", { "data-uuid": run.uuid },
      el("td", {}, box),
      el("td", { class: "mono" }, link({ project, run: run.uuid }, run.uuid.slice(0, 12), { title: run.uuid })),
      el("td", { text: run.module }),
      el("td", { class: "status-" + run.status, text: run.status }),
      el("td", { text: when(run.created_at) }),
      keys.map((key) => el("td", { class: "mono", text: show(flat[i][key]) })));
  });
  const last = offset + page.runs.length;
  const shown = page.runs.length ? `${(offset + 1).toLocaleString()}–${last.toLocaleString()}` : "";
  const range = el("span", { id: "range", text: page.runs.length ? shown + " of …" : offset ? "no more runs" : "no runs match" });
  const pager = el("div", { class: "pager" },
    offset > 0 ? link({ project, where, order_by: orderBy, offset: Math.max(0, offset - PAGE) || null }, "« previous", { id: "previous" }) : el("span", { class: "muted", text: "« previous" }),
    range,
    page.next ? link({ project, where, order_by: orderBy, offset: offset + PAGE }, "next »", { id: "next" }) : el("span", { class: "muted", text: "next »" }),
    compare);
  if (page.runs.length) {
    apiJSON(`/projects/${encodeURIComponent(project)}/runs?${counting}`)
      .then((answer) => { range.textContent = `${shown} of ${answer.count.toLocaleString()}`; })
      .catch(() => { range.textContent = shown; });
  }
  setMain(
    el("h1", { text: project }),
    form,
    pager,
    el("table", { id: "runs" },
      el("thead", {}, el("tr", {}, el("th", {}), column("uuid", "uuid"), column("module", "module"), column("status", "status"), column("created_at", "created"), keys.map((key) => column(key, key.slice(7))))),
      el("tbody", {}, rows)),
  );
}

async function runView(params) {
  const project = params.get("project");
  const uuid = params.get("run");
  const file = params.get("file");
  crumbs(link({ project }, project), link({ project, run: uuid }, uuid.slice(0, 12)));
  document.title = `${uuid.slice(0, 12)} · ${project} · machinable`;
  const run = await apiJSON(`/projects/${encodeURIComponent(project)}/runs/${uuid}`);
  let files = [];
  let filesNote = null;
  try {
    files = (await apiJSON(`/projects/${encodeURIComponent(project)}/runs/${uuid}/files`)).files;
  } catch (error) {
    if (error instanceof AuthError) throw error;
    filesNote = el("p", { class: "muted", text: error.message });
  }
  const facts = el("dl", {},
    ["uuid", "module", "status", "created_at", "started_at", "finished_at", "digest"].map((key) => [
      el("dt", { text: key }), el("dd", { class: key === "status" ? "status-" + run.status : null, text: key.endsWith("_at") ? when(run[key]) : show(run[key]) || "—" }),
    ]));
  const copies = el("table", { id: "copies" },
    el("thead", {}, el("tr", {}, ["copy", "state", "where", "verified"].map((h) => el("th", { text: h })))),
    el("tbody", {}, run.copies.map((copy) => el("tr", {}, el("td", { text: copy.store }), el("td", { text: copy.state }), el("td", { class: "mono", text: copy.url }), el("td", { text: when(copy.verified_at) || "—" })))));
  const list = el("ul", { class: "files", id: "files" }, files.map((item) =>
    el("li", { class: item.path === file ? "current" : null }, link({ project, run: uuid, file: item.path }, item.path), " ", el("span", { class: "muted", text: size(item.size) }))));
  const preview = el("section", { id: "preview" });
  setMain(
    el("h1", { class: "mono", text: uuid }),
    el("div", { class: "grid" },
      el("div", {}, el("h2", { text: "Run" }), facts, el("h2", { text: "Files" }), filesNote || list),
      el("div", {}, el("h2", { text: "Config" }), el("pre", { id: "config", text: JSON.stringify(run.config, null, 2) }),
        Object.keys(run.predicate || {}).length ? [el("h2", { text: "Predicate" }), el("pre", { text: JSON.stringify(run.predicate, null, 2) })] : null,
        el("h2", { text: "Copies" }), copies, preview)),
  );
  const chosen = file || (files.find((item) => item.path.endsWith(".jsonl")) || {}).path;
  if (chosen) await previewFile(preview, project, uuid, chosen, params);
}

function size(bytes) {
  if (bytes < 1024) return bytes + " B";
  if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
  return (bytes / 1024 / 1024).toFixed(1) + " MiB";
}

async function previewFile(target, project, uuid, path, params) {
  const lower = path.toLowerCase();
  const heading = el("h2", {}, path, " ", el("a", { href: fileURL(project, uuid, path), class: "muted", text: "download" }));
  if (/\.(png|jpe?g|gif|webp|svg)$/.test(lower)) {
    target.replaceChildren(heading, el("img", { class: "preview", src: fileURL(project, uuid, path), alt: path }));
    return;
  }
  if (lower.endsWith(".jsonl")) {
    const series = await loadSeries(project, [uuid], path);
    target.replaceChildren(heading, chartBlock(series, params, { project, run: uuid, file: path }));
    return;
  }
  const { text, truncated, total } = await readFile(project, uuid, path, PREVIEW_BYTES);
  let shown = text;
  if (lower.endsWith(".json") && !truncated) {
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* show as text */ }
  }
  if (/[\u0000-\u0008\u000e-\u001f]/.test(shown.slice(0, 4096))) {
    target.replaceChildren(heading, el("p", { class: "muted", text: `binary file, ${size(total)}` }));
    return;
  }
  target.replaceChildren(heading, el("pre", { id: "file-text", text: shown }),
    truncated ? el("p", { class: "muted", text: `first ${size(PREVIEW_BYTES)} of ${size(total)}` }) : null);
}

// Charts of .jsonl logs.

async function loadSeries(project, uuids, path) {
  return Promise.all(uuids.map(async (uuid) => {
    try {
      const { text, truncated } = await readFile(project, uuid, path, LOG_BYTES);
      const lines = text.split("\n");
      if (truncated) lines.pop();
      const rows = [];
      for (const line of lines) {
        if (!line.trim()) continue;
        try {
          const row = JSON.parse(line);
          if (row && typeof row === "object" && !Array.isArray(row)) rows.push(flatten(row, "", {}));
        } catch (_) { /* a line that is not JSON is skipped */ }
      }
      return { uuid, rows, truncated };
    } catch (error) {
      if (error instanceof AuthError) throw error;
      return { uuid, rows: [], error: error.message };
    }
  }));
}

function numericKeys(series) {
  const keys = [];
  for (const { rows } of series) {
    for (const row of rows.slice(0, 200)) {
      for (const [key, value] of Object.entries(row)) {
        if (typeof value === "number" && Number.isFinite(value) && !keys.includes(key)) keys.push(key);
      }
    }
  }
  return keys;
}

function chartBlock(series, params, base) {
  const keys = numericKeys(series);
  if (!keys.length) return el("p", { class: "muted", id: "chart-empty", text: "This log has no numeric values to chart." });
  const counter = X_KEYS.find((key) => keys.includes(key)) || "";
  const xKey = params.has("x") && (params.get("x") === "" || keys.includes(params.get("x"))) ? params.get("x") : counter;
  const yChoices = keys.filter((key) => key !== xKey);
  const yKey = params.get("y") && yChoices.includes(params.get("y")) ? params.get("y") : yChoices[0] || keys[0];
  const pick = (name, value, choices, blank) => {
    const select = el("select", { name, "aria-label": name },
      blank ? el("option", { value: "", text: blank }) : null,
      choices.map((key) => el("option", { value: key, selected: key === value, text: key })));
    select.addEventListener("change", () => go(Object.assign({}, base, { x: xKey, y: yKey, [name]: select.value })));
    return select;
  };
  const controls = el("div", { class: "controls" },
    el("label", {}, "y ", pick("y", yKey, yChoices.length ? yChoices : keys)),
    el("label", {}, "x ", pick("x", xKey, keys, "row number")));
  const notes = series.filter((s) => s.error || s.truncated).map((s) =>
    el("p", { class: "muted", text: `${s.uuid.slice(0, 12)}: ${s.error || "only the first 8 MiB are charted"}` }));
  return el("div", { id: "chart-block" }, controls, chart(series, xKey, yKey), legend(series), notes);
}

function legend(series) {
  return el("div", { class: "legend" }, series.map((s, i) => {
    const swatch = svg("svg", { width: 12, height: 12, class: "swatch" }, svg("rect", { width: 12, height: 12, fill: COLORS[i % COLORS.length] }));
    return el("span", { class: "mono", title: s.uuid }, swatch, s.label || s.uuid.slice(0, 12));
  }));
}

// Name each run in a legend by the config values that differ between the runs shown.
function labelByDifferences(series, details) {
  const flat = details.map((run) => (run ? flatten(run.config, "", {}) : {}));
  const keys = [...new Set(flat.flatMap((row) => Object.keys(row)))].filter((key) =>
    new Set(flat.map((row) => JSON.stringify(row[key]))).size > 1);
  series.forEach((s, i) => {
    const parts = keys.slice(0, 4).map((key) => `${key}=${show(flat[i][key])}`);
    s.label = parts.length ? `${s.uuid.slice(0, 8)} ${parts.join(" ")}` : s.uuid.slice(0, 12);
  });
}

function ticks(low, high, count) {
  if (low === high) return [low];
  const step = (high - low) / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(step)));
  const nice = [1, 2, 5, 10].map((m) => m * magnitude).find((m) => m >= step) || step;
  const out = [];
  for (let v = Math.ceil(low / nice) * nice; v <= high + nice * 1e-9; v += nice) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(value) {
  const abs = Math.abs(value);
  return abs !== 0 && (abs >= 1e5 || abs < 1e-3) ? value.toExponential(1) : String(Number(value.toPrecision(4)));
}

function chart(series, xKey, yKey) {
  const width = 760, height = 360, left = 64, right = 16, top = 16, bottom = 40;
  const lines = series.map((s) => {
    const points = [];
    s.rows.forEach((row, i) => {
      const x = xKey ? row[xKey] : i;
      const y = row[yKey];
      if (typeof x === "number" && typeof y === "number" && Number.isFinite(x) && Number.isFinite(y)) points.push([x, y]);
    });
    return points;
  });
  const all = lines.flat();
  const node = svg("svg", { class: "chart", id: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": `${yKey} by ${xKey || "row"}` });
  if (!all.length) {
    node.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no numeric points"));
    return node;
  }
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of all) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const axes = svg("g", { class: "axes" });
  for (const t of ticks(y0, y1, 5)) {
    axes.append(svg("line", { x1: left, x2: width - right, y1: sy(t), y2: sy(t), stroke: "#eef1f4" }));
    axes.append(svg("text", { x: left - 6, y: sy(t) + 4, "text-anchor": "end" }, label(t)));
  }
  for (const t of ticks(x0, x1, 6)) {
    axes.append(svg("text", { x: sx(t), y: height - bottom + 16, "text-anchor": "middle" }, label(t)));
  }
  axes.append(svg("line", { x1: left, x2: left, y1: top, y2: height - bottom, stroke: "#8b949e" }));
  axes.append(svg("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, stroke: "#8b949e" }));
  axes.append(svg("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }, xKey || "row number"));
  axes.append(svg("text", { x: 12, y: (top + height - bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(top + height - bottom) / 2})` }, yKey));
  node.append(axes);
  lines.forEach((points, i) => {
    const color = COLORS[i % COLORS.length];
    const every = Math.max(1, Math.ceil(points.length / MAX_POINTS));
    const kept = points.filter((_, j) => j % every === 0 || j === points.length - 1);
    const group = svg("g", { class: "series", "data-uuid": series[i].uuid });
    group.append(svg("polyline", { points: kept.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "), fill: "none", stroke: color, "stroke-width": 1.5 }));
    for (const [x, y] of kept) {
      const dot = svg("circle", { class: "point", cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.2, fill: color, "data-x": x, "data-y": y });
      dot.append(svg("title", {}, `${series[i].uuid.slice(0, 12)}  ${xKey || "row"}=${x}  ${yKey}=${y}`));
      group.append(dot);
    }
    node.append(group);
  });
  return node;
}

async function compareView(params) {
  const project = params.get("project");
  const uuids = (params.get("compare") || "").split(",").filter(Boolean).slice(0, COLORS.length * 4);
  crumbs(link({ project }, project), el("span", { text: "compare" }));
  document.title = `compare · ${project} · machinable`;
  const { files } = await apiJSON(`/projects/${encodeURIComponent(project)}/runs/${uuids[0]}/files`);
  const logs = files.map((item) => item.path).filter((path) => path.endsWith(".jsonl"));
  const file = params.get("file") && logs.includes(params.get("file")) ? params.get("file") : logs[0];
  const heading = el("h1", { text: `Compare ${uuids.length} run(s)` });
  const runs = el("p", {}, uuids.map((uuid) => [link({ project, run: uuid }, uuid.slice(0, 12), { class: "mono" }), " "]));
  if (!file) {
    setMain(heading, runs, el("p", { class: "muted", text: "The first run has no .jsonl log to compare." }));
    return;
  }
  const select = el("select", { name: "file", "aria-label": "log" }, logs.map((path) => el("option", { value: path, selected: path === file, text: path })));
  select.addEventListener("change", () => go({ project, compare: uuids.join(","), file: select.value }));
  const [series, details] = await Promise.all([
    loadSeries(project, uuids, file),
    Promise.all(uuids.map((uuid) => apiJSON(`/projects/${encodeURIComponent(project)}/runs/${uuid}`).catch(() => null))),
  ]);
  labelByDifferences(series, details);
  setMain(heading, runs, el("div", { class: "controls" }, el("label", {}, "log ", select)),
    chartBlock(series, params, { project, compare: uuids.join(","), file }));
}

function signIn(message) {
  crumbs();
  const next = location.pathname + location.search;
  setMain(el("p", { id: "auth", text: message + " " }, el("a", { href: "/login?next=" + encodeURIComponent(next), text: "Sign in" })));
}

async function render() {
  const params = state();
  try {
    if (!params.get("project")) await projectsView();
    else if (params.get("run")) await runView(params);
    else if (params.get("compare")) await compareView(params);
    else await runsView(params);
  } catch (error) {
    if (error instanceof AuthError) signIn(error.message);
    else setMain(el("p", { class: "error", id: "error", text: error.message }));
  }
  document.body.dataset.ready = "1";
}

window.addEventListener("popstate", render);
document.addEventListener("DOMContentLoaded", render);
