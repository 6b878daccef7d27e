// llmlb dashboard: a single page over the router's JSON API. No framework, no build step.
// The admin key lives in sessionStorage (this tab only) and travels only as a bearer token.
// Everything a node or the hub reported is put on the page as text, never as markup.

const KEY_STORAGE = "llmlb.adminKey";
const POLL_MS = 1000;
const VIEWS = ["fleet", "models", "traffic", "keys", "usage"];

const $ = (id) => document.getElementById(id);

// -- DOM helpers --------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// Keyed list update: existing elements are updated in place, so focus and selection survive
// the once-a-second refresh.
function syncList(container, items, keyOf, create, update) {
  const existing = new Map();
  for (const child of container.children) existing.set(child.dataset.key, child);
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    let node = existing.get(key);
    if (node) existing.delete(key);
    else {
      node = create(item);
      node.dataset.key = key;
    }
    update(node, item);
    const wanted = previous ? previous.nextSibling : container.firstChild;
    if (node !== wanted) container.insertBefore(node, wanted);
    previous = node;
  }
  for (const stale of existing.values()) stale.remove();
}

// -- formatting ---------------------------------------------------------------------------

function formatBytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function formatMs(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

function formatRate(perSecond) {
  if (perSecond === 0) return "0";
  return perSecond < 10 ? perSecond.toFixed(2) : perSecond.toFixed(1);
}

function ageOf(iso) {
  const then = Date.parse(iso);
  return Number.isNaN(then) ? null : Math.max(0, (Date.now() - then) / 1000);
}

function modelPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

// -- API ----------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }

  describe() {
    return this.code ? `${this.message} (${this.code})` : this.message;
  }
}

// A failed call's message: the API's error and code, or the exception's own text.
function failureText(error) {
  return error instanceof ApiFailure ? error.describe() : String(error);
}

// A form's result line showing a failed call.
function showFailure(node, error) {
  setText(node, failureText(error));
  node.className = "result error";
}

const session = {
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  },
};

async function request(method, path, body, key = session.key) {
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiFailure(0, "cannot reach the router", "network_error");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    throw new ApiFailure(response.status, error.message || `HTTP ${response.status}`, error.code);
  }
  return data;
}

// A signed-in call: a rejected key signs the tab out.
async function api(method, path, body) {
  try {
    return await request(method, path, body);
  } catch (error) {
    if (error instanceof ApiFailure && (error.status === 401 || error.status === 403)) {
      signOut(`Signed out: ${error.describe()}`);
    }
    throw error;
  }
}

// -- sign-in ------------------------------------------------------------------------------

function showSignedIn(signedIn) {
  $("signin").hidden = signedIn;
  $("nav").hidden = !signedIn;
  $("session").hidden = !signedIn;
  if (!signedIn) for (const view of VIEWS) $(`view-${view}`).hidden = true;
}

function signOut(message = "") {
  session.key = null;
  stopPolling();
  showSignedIn(false);
  $("signin-error").textContent = message;
  $("admin-key").value = "";
  $("admin-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("admin-key");
  const key = input.value.trim();
  const error = $("signin-error");
  if (!key) {
    error.textContent = "Enter an admin key.";
    input.focus();
    return;
  }
  error.textContent = "";
  const button = event.submitter || $("signin-form").querySelector("button");
  button.disabled = true;
  try {
    await request("GET", "v0/nodes", undefined, key); // admin scope, or 401/403
    session.key = key;
    input.value = "";
    showSignedIn(true);
    route(true);
  } catch (failure) {
    error.textContent =
      failure instanceof ApiFailure ? `Sign-in failed: ${failure.describe()}` : String(failure);
    input.select();
  } finally {
    button.disabled = false;
  }
}

// -- views and polling --------------------------------------------------------------------

let current = null;
let timer = null;
let polling = 0; // generation: a view switch abandons the previous loop

function currentView() {
  const name = location.hash.replace(/^#/, "");
  return VIEWS.includes(name) ? name : "fleet";
}

function route(focus = true) {
  if (!session.key) return;
  const view = currentView();
  current = view;
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  for (const link of $("nav").querySelectorAll("a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${view[0].toUpperCase()}${view.slice(1)} · llmlb`;
  if (focus) $(`${view}-title`).focus();
  startPolling();
}

function stopPolling() {
  polling += 1;
  clearTimeout(timer);
  timer = null;
}

function startPolling() {
  stopPolling();
  const generation = polling;
  const loop = async () => {
    if (generation !== polling || !session.key) return;
    if (!document.hidden) await refresh(current);
    if (generation === polling) timer = setTimeout(loop, POLL_MS);
  };
  loop();
}

async function refresh(view) {
  try {
    await RENDER[view]();
    setText($("live"), `Live · ${new Date().toLocaleTimeString()}`);
    $("live").classList.remove("stale");
  } catch (error) {
    if (!session.key) return;
    setText($("live"), error instanceof ApiFailure ? `Not updating: ${error.describe()}` : String(error));
    $("live").classList.add("stale");
  }
}

// -- fleet --------------------------------------------------------------------------------

function nodeStatus(node, balancer) {
  if (node.status !== "online") return "offline";
  const state = balancer[node.node_id];
  return state && state.cooled_down ? "cooled down" : "online";
}

function badge(text, kind) {
  return el("span", { class: `badge ${kind}`, text });
}

function field(list, label) {
  const value = el("dd");
  list.append(el("dt", { text: label }), value);
  return value;
}

// A pending node (never approved) gets no client traffic and no peer token until an admin
// approves it here, or with `llmlb nodes approve ID`.
function createNodeCard() {
  const card = el("article", { class: "card node" });
  const title = el("h3");
  const status = el("span", { class: "badge" });
  const approval = el("span", { class: "badge pending", text: "pending approval", hidden: true });
  card.append(el("header", {}, title, el("span", { class: "badges" }, approval, status)));
  const facts = el("dl", { class: "facts" });
  card.append(facts);
  const models = el("ul", { class: "chips", "aria-label": "Models on this node" });
  card.append(models);
  const note = el("p", { class: "result", role: "status", "aria-live": "polite" });
  const approve = el("button", { type: "button", class: "approve", text: "Approve" });
  approve.addEventListener("click", async () => {
    approve.disabled = true;
    try {
      const answer = await api("POST", `v0/nodes/${encodeURIComponent(card.dataset.node)}/approve`);
      setText(note, `Approved ${answer.node_id}: it now serves clients.`);
      note.className = "result ok";
      await renderFleet();
    } catch (error) {
      showFailure(note, error);
    } finally {
      approve.disabled = false;
    }
  });
  const actions = el("div", { class: "card-actions", hidden: true }, approve);
  card.append(actions, note);
  card.parts = {
    title,
    status,
    approval,
    approve,
    actions,
    url: field(facts, "URL"),
    gpu: field(facts, "GPU"),
    runtimes: field(facts, "Runtimes"),
    slots: field(facts, "Slots"),
    active: field(facts, "Active requests"),
    seen: field(facts, "Last heartbeat"),
    count: field(facts, "Models"),
    models,
  };
  return card;
}

function updateNodeCard(card, { node, balancer }) {
  const parts = card.parts;
  card.dataset.node = node.node_id;
  const status = nodeStatus(node, balancer);
  card.dataset.status = status;
  setText(parts.title, node.node_id);
  setText(parts.status, status);
  parts.status.className = `badge ${status.replace(" ", "-")}`;
  const pending = node.approval === "pending";
  card.dataset.approval = node.approval || "approved";
  parts.approval.hidden = !pending;
  parts.actions.hidden = !pending;
  parts.approve.setAttribute("aria-label", `Approve ${node.node_id}`);
  setText(parts.url, node.url);
  const gpu = node.gpu || {};
  const extra = Object.entries(gpu)
    .filter(([name]) => name !== "backend")
    .map(([name, value]) => `${name}: ${typeof value === "object" ? JSON.stringify(value) : value}`);
  setText(parts.gpu, [gpu.backend || "unknown", ...extra].join(" · "));
  setText(parts.runtimes, (node.runtimes || []).join(", ") || "none reported");
  setText(parts.slots, String(node.slots));
  const inflight = balancer[node.node_id] ? balancer[node.node_id].outstanding : null;
  setText(
    parts.active,
    inflight === null ? String(node.active_requests) : `${node.active_requests} (router: ${inflight} in flight)`,
  );
  const age = ageOf(node.last_seen);
  setText(parts.seen, age === null ? "never" : `${formatDuration(age)} ago`);
  const models = node.models || [];
  const ready = models.filter((model) => model.state === "ready").length;
  setText(parts.count, models.length ? `${ready} ready of ${models.length}` : "none");
  syncList(
    parts.models,
    models,
    (model) => model.id,
    () => el("li", { class: "chip" }),
    (chip, model) => {
      setText(chip, `${model.id} · ${model.state}`);
      chip.className = `chip ${model.state}`;
      chip.title = model.error || "";
    },
  );
}

async function renderFleet() {
  const [{ nodes }, traffic] = await Promise.all([api("GET", "v0/nodes"), api("GET", "v0/traffic")]);
  const balancer = traffic.balancer || {};
  const online = nodes.filter((node) => node.status === "online").length;
  const pending = nodes.filter((node) => node.approval === "pending").length;
  setText(
    $("fleet-summary"),
    `${online} of ${nodes.length} node${nodes.length === 1 ? "" : "s"} online` +
      (pending ? ` · ${pending} pending approval` : ""),
  );
  $("fleet-empty").hidden = nodes.length > 0;
  syncList(
    $("fleet-nodes"),
    nodes.map((node) => ({ node, balancer })),
    (item) => item.node.node_id,
    createNodeCard,
    updateNodeCard,
  );
}

// -- models -------------------------------------------------------------------------------

// Download rate per (node, model), from the progress each heartbeat reports.
const rates = new Map();

function downloadRate(nodeId, model, seenAt) {
  const key = `${nodeId}\n${model.id}`;
  const bytes = model.progress ? model.progress.bytes : null;
  if (bytes === null || bytes === undefined || model.state !== "downloading") {
    rates.delete(key);
    return null;
  }
  const at = Date.parse(seenAt) / 1000;
  const last = rates.get(key);
  if (!last || bytes < last.bytes) {
    rates.set(key, { bytes, at, rate: null });
    return null;
  }
  if (bytes > last.bytes && at > last.at) {
    const sample = (bytes - last.bytes) / (at - last.at);
    const rate = last.rate === null ? sample : 0.5 * last.rate + 0.5 * sample;
    rates.set(key, { bytes, at, rate });
    return rate;
  }
  return last.rate;
}

function confirmButton(label, confirmLabel, action) {
  const button = el("button", { type: "button", class: "danger", text: label });
  let armed = null;
  button.addEventListener("click", async () => {
    if (!armed) {
      button.textContent = confirmLabel;
      button.classList.add("armed");
      armed = setTimeout(() => {
        armed = null;
        button.textContent = label;
        button.classList.remove("armed");
      }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
      button.textContent = label;
      button.classList.remove("armed");
    }
  });
  return button;
}

function createModelCard(item) {
  const card = el("article", { class: "card model" });
  const title = el("h3");
  const message = el("p", { class: "result", role: "status", "aria-live": "polite" });
  const remove = confirmButton("Delete", "Confirm delete", async () => {
    try {
      await api("DELETE", `v1/models/${modelPath(item.model.id)}`);
      setText($("reg-result"), `Deleted ${item.model.id}.`);
      $("reg-result").className = "result ok";
      await renderModels();
    } catch (error) {
      showFailure(message, error);
    }
  });
  card.append(el("header", {}, title, remove));
  const facts = el("dl", { class: "facts" });
  card.append(facts);
  const nodes = el("ul", { class: "placements", "aria-label": "State on each node" });
  card.append(nodes, message);
  card.parts = {
    title,
    message,
    repo: field(facts, "Repo"),
    revision: field(facts, "Revision"),
    format: field(facts, "Format"),
    size: field(facts, "Size"),
    file: field(facts, "File"),
    fleet: field(facts, "Fleet"),
    nodes,
  };
  return card;
}

function createPlacement(item) {
  const row = el("li", { class: "placement" });
  const name = el("span", { class: "who" });
  const state = el("span", { class: "badge" });
  const bar = el("progress", { max: "1" });
  const detail = el("span", { class: "detail" });
  const note = el("span", { class: "note", role: "status" });
  const retry = el("button", { type: "button", class: "quiet", text: "Retry now" });
  retry.addEventListener("click", async () => {
    retry.disabled = true;
    try {
      const answer = await api("POST", `v0/models/${modelPath(item.model.id)}/retry`);
      const count = answer.nodes.length;
      setText(note, `Retry requested: ${count} node${count === 1 ? "" : "s"} notified.`);
    } catch (error) {
      setText(note, failureText(error));
    } finally {
      retry.disabled = false;
    }
  });
  row.append(el("div", { class: "placement-head" }, name, state), bar, detail, note, retry);
  row.parts = { name, state, bar, detail, note, retry };
  return row;
}

function updatePlacement(row, { node, report, model }) {
  const parts = row.parts;
  row.dataset.node = node.node_id;
  const offline = node.status !== "online";
  const state = report ? report.state : "pending";
  row.dataset.state = state;
  setText(parts.name, offline ? `${node.node_id} (offline)` : node.node_id);
  setText(parts.state, state);
  parts.state.className = `badge ${state}`;
  parts.retry.hidden = state !== "failed";
  if (state !== "failed") setText(parts.note, "");
  const progress = report && report.progress;
  const total = (progress && progress.total) || model.size_bytes || null;
  const bytes = progress ? progress.bytes : null;
  parts.bar.hidden = state !== "downloading" && state !== "ready";
  if (state === "ready") {
    parts.bar.value = 1;
  } else if (bytes !== null && bytes !== undefined && total) {
    parts.bar.value = Math.min(1, bytes / total);
  } else {
    parts.bar.removeAttribute("value"); // indeterminate
  }
  parts.bar.setAttribute("aria-label", `${model.id} on ${node.node_id}`);
  let text = "";
  if (state === "downloading") {
    const rate = downloadRate(node.node_id, report, node.last_seen);
    text = `${formatBytes(bytes || 0)} of ${formatBytes(total)}`;
    if (total && bytes !== null && bytes !== undefined) text += ` (${Math.floor((100 * bytes) / total)} %)`;
    if (rate) {
      text += ` · ${formatBytes(rate)}/s`;
      if (total) text += ` · ETA ${formatDuration((total - bytes) / rate)}`;
    }
  } else if (state === "failed") {
    text = report.error || "failed";
    if (report.attempts) text += ` · attempt ${report.attempts}`;
    if (report.retry_at) text += ` · next try in ${formatDuration(report.retry_at - Date.now() / 1000)}`;
  } else if (state === "ready") {
    text = report.servable === false ? "on disk, not servable by this node" : "ready to serve";
  } else if (state === "loading") {
    text = "loading";
  } else {
    text = offline ? "node offline" : "waiting for the node to report it";
  }
  setText(parts.detail, text);
}

function updateModelCard(card, item) {
  const { model, nodes } = item;
  const parts = card.parts;
  card.dataset.model = model.id;
  setText(parts.title, model.id);
  setText(parts.repo, model.repo);
  setText(parts.revision, model.revision ? model.revision.slice(0, 12) : "?");
  parts.revision.title = model.revision || "";
  setText(parts.format, [model.format, model.quantization].filter(Boolean).join(" · ") || "?");
  setText(parts.size, formatBytes(model.size_bytes));
  setText(parts.file, model.filename || "all files");
  const placements = nodes.map((node) => ({
    node,
    model,
    report: (node.models || []).find((entry) => entry.id === model.id),
  }));
  syncList(parts.nodes, placements, (p) => p.node.node_id, createPlacement, updatePlacement);
  const ready = placements.filter((p) => p.report && p.report.state === "ready").length;
  card.dataset.ready = String(ready);
  setText(parts.fleet, fleetProgress(placements, model, ready));
}

// The model across the fleet: nodes ready, the share of all their bytes on disk (pieces
// trade between downloading nodes), and how much of it came from peers rather than the hub.
function fleetProgress(placements, model, ready) {
  const online = placements.filter((p) => p.node.status === "online");
  let done = 0;
  let total = 0;
  let hub = 0;
  let peers = 0;
  for (const { report } of online) {
    const size = (report && report.progress && report.progress.total) || model.size_bytes || 0;
    total += size;
    if (report && report.state === "ready") done += size;
    else if (report && report.progress) done += Math.min(size, report.progress.bytes || 0);
    hub += (report && report.bytes_from_hub) || 0;
    peers += (report && report.bytes_from_peers) || 0;
  }
  let text = `${ready} of ${online.length} node${online.length === 1 ? "" : "s"} ready`;
  if (total) text += ` · ${Math.floor((100 * done) / total)} % of the fleet's copies on disk`;
  if (hub + peers) text += ` · ${Math.round((100 * peers) / (hub + peers))} % from peers`;
  return text;
}

async function renderModels() {
  const [{ models }, { nodes }] = await Promise.all([api("GET", "v0/models"), api("GET", "v0/nodes")]);
  setText($("models-summary"), `${models.length} registered`);
  $("models-empty").hidden = models.length > 0;
  syncList(
    $("models-list"),
    models.map((model) => ({ model, nodes })),
    (item) => item.model.id,
    createModelCard,
    updateModelCard,
  );
}

async function registerModel(event) {
  event.preventDefault();
  const result = $("reg-result");
  const repo = $("reg-repo").value.trim();
  if (!repo) {
    setText(result, "Enter a hub repo, e.g. org/name.");
    result.className = "result error";
    $("reg-repo").focus();
    return;
  }
  const body = { repo };
  for (const [name, id] of [["filename", "reg-filename"], ["revision", "reg-revision"], ["id", "reg-id"]]) {
    const value = $(id).value.trim();
    if (value) body[name] = value;
  }
  const button = $("reg-submit");
  button.disabled = true;
  setText(result, `Registering ${repo}…`);
  result.className = "result";
  try {
    const model = await api("POST", "v1/models/register", body);
    setText(result, `Registered ${model.id}: nodes are fetching it.`);
    result.className = "result ok";
    $("register-form").reset();
    await renderModels();
  } catch (error) {
    showFailure(result, error);
  } finally {
    button.disabled = false;
  }
}

// -- traffic ------------------------------------------------------------------------------

const CHART_W = 300;
const CHART_H = 64;

// A small line chart of one or two series (nulls break the line).
function drawChart(chart, series, { unit = "", format = String } = {}) {
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const max = Math.max(0, ...values);
  const top = max > 0 ? max * 1.15 : 1;
  const length = Math.max(...series.map((s) => s.values.length), 0);
  const plot = chart.querySelector("svg");
  plot.replaceChildren();
  plot.append(svg("line", { x1: 0, y1: CHART_H - 0.5, x2: CHART_W, y2: CHART_H - 0.5, class: "axis" }));
  let points = 0;
  series.forEach((s, index) => {
    let run = [];
    const flush = () => {
      if (run.length === 1) {
        const [x, y] = run[0].split(",");
        plot.append(svg("circle", { cx: x, cy: y, r: 2, class: `dot s${index}` }));
      } else if (run.length > 1) {
        plot.append(svg("polyline", { points: run.join(" "), class: `line s${index}` }));
      }
      run = [];
    };
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) {
        flush();
        return;
      }
      const x = length > 1 ? (i / (length - 1)) * CHART_W : CHART_W / 2;
      const y = CHART_H - (v / top) * (CHART_H - 4) - 1;
      run.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      points += 1;
    });
    flush();
  });
  const latest = series.map((s) => {
    const last = [...s.values].reverse().find((v) => v !== null && v !== undefined);
    return last === undefined ? null : last;
  });
  chart.dataset.points = String(points);
  chart.dataset.max = String(max);
  const legend = series
    .map((s, i) => `${s.label ? `${s.label} ` : ""}${latest[i] === null ? "–" : format(latest[i])}${unit}`)
    .join(" · ");
  setText(chart.querySelector(".latest"), legend);
  setText(chart.querySelector(".peak"), max > 0 ? `peak ${format(max)}${unit}` : "");
  plot.setAttribute("aria-label", `${chart.dataset.title}: now ${legend}, peak ${format(max)}${unit}`);
}

function createChart(title, kind) {
  const plot = svg("svg", {
    viewBox: `0 0 ${CHART_W} ${CHART_H}`,
    preserveAspectRatio: "none",
    role: "img",
    class: "plot",
  });
  const chart = el(
    "figure",
    { class: "chart", "data-chart": kind, "data-title": title },
    el("figcaption", {}, el("span", { class: "title", text: title }), el("span", { class: "latest" })),
    plot,
    el("span", { class: "peak" }),
  );
  return chart;
}

function chartsFor(series, interval) {
  const rate = (values) => values.map((v) => v / interval);
  return [
    ["Requests/s", "rps", [{ values: rate(series.requests) }], { format: formatRate }],
    ["Errors/s", "errors", [{ values: rate(series.errors) }], { format: formatRate }],
    [
      "Time to first byte",
      "ttfb",
      [
        { label: "p50", values: series.ttfb_p50_s },
        { label: "p95", values: series.ttfb_p95_s },
      ],
      { format: formatMs },
    ],
  ];
}

function fillCharts(container, series, interval) {
  const specs = chartsFor(series, interval);
  if (container.children.length !== specs.length) {
    container.replaceChildren(...specs.map(([title, kind]) => createChart(title, kind)));
  }
  specs.forEach(([, , data, options], i) => drawChart(container.children[i], data, options));
}

function createTrafficRow() {
  const row = el("article", { class: "row" });
  const title = el("h4");
  const charts = el("div", { class: "charts compact" });
  row.append(title, charts);
  row.parts = { title, charts };
  return row;
}

function trafficRows(container, empty, groups, interval) {
  const entries = Object.entries(groups);
  empty.hidden = entries.length > 0;
  syncList(
    container,
    entries,
    ([name]) => name,
    createTrafficRow,
    (row, [name, series]) => {
      row.dataset.name = name;
      setText(row.parts.title, name);
      fillCharts(row.parts.charts, series, interval);
    },
  );
}

async function renderTraffic() {
  const traffic = await api("GET", "v0/traffic");
  const interval = traffic.interval_s;
  const minutes = Math.round((traffic.t.length * interval) / 60);
  setText(
    $("traffic-summary"),
    `Last ${minutes < 1 ? "minute" : `${minutes} min`} in ${interval} s steps (window ${Math.round(traffic.window_s / 60)} min)`,
  );
  fillCharts($("traffic-total"), traffic.total, interval);
  trafficRows($("traffic-models"), $("traffic-models-empty"), traffic.models, interval);
  trafficRows($("traffic-nodes"), $("traffic-nodes-empty"), traffic.nodes, interval);
  routingTables(traffic.routing || {});
}

const REASONS = ["prefix", "load", "affinity", "fallback"];

function tableRows(table, rows) {
  const body = table.querySelector("tbody");
  const text = Number(table.dataset.textColumns || 1);
  table.hidden = rows.length === 0;
  syncList(
    body,
    rows,
    (row) => row[0],
    () => el("tr"),
    (tr, [, cells]) => {
      if (tr.children.length !== cells.length) {
        tr.replaceChildren(
          ...cells.map((_, i) =>
            el(i === 0 ? "th" : "td", { scope: i === 0 ? "row" : null, class: i < text ? "text" : null }),
          ),
        );
      }
      cells.forEach((text, i) => setText(tr.children[i], text));
    },
  );
}

// Prefix-aware routing over the window: decisions by reason per model, and per node the share
// of prompt characters the router's index predicted were already in the node's cache, beside
// the share of prompt tokens the node reported it took from its cache.
function routingTables(routing) {
  const models = Object.entries(routing.models || {}).sort(([a], [b]) => a.localeCompare(b));
  tableRows(
    $("traffic-routing"),
    models.map(([model, reasons]) => [model, [model, ...REASONS.map((r) => String(reasons[r] || 0))]]),
  );
  const index = routing.index || {};
  const cache = [];
  for (const [node, perModel] of Object.entries(routing.nodes || {}).sort(([a], [b]) => a.localeCompare(b))) {
    for (const [model, chars] of Object.entries(perModel).sort(([a], [b]) => a.localeCompare(b))) {
      const share = chars.prompt_chars > 0 ? chars.predicted_cached_chars / chars.prompt_chars : 0;
      const reported = chars.reported_prompt_tokens > 0
        ? `${Math.round((chars.reported_cached_tokens / chars.reported_prompt_tokens) * 100)} %`
        : "–";
      const keys = index[node] ? String(index[node].keys) : "0";
      cache.push([
        `${node} ${model}`,
        [node, model, String(chars.prompt_chars), `${Math.round(share * 100)} %`, reported, keys],
      ]);
    }
  }
  tableRows($("traffic-cache"), cache);
  $("traffic-routing-empty").hidden = models.length > 0 || cache.length > 0;
}

// -- keys ---------------------------------------------------------------------------------

let keysFetched = 0;

function createKeyCard(key) {
  const card = el("article", { class: "card key" });
  const title = el("h3");
  const scope = el("span", { class: "badge" });
  const message = el("p", { class: "result error", role: "status" });
  const revoke = confirmButton("Revoke", "Confirm revoke", async () => {
    try {
      await api("DELETE", `v0/keys/${encodeURIComponent(key.id)}`);
      setText($("key-result"), `Revoked ${key.name || key.prefix}.`);
      $("key-result").className = "result ok";
      await renderKeys(true);
    } catch (error) {
      setText(message, failureText(error));
    }
  });
  card.append(el("header", {}, title, scope));
  const facts = el("dl", { class: "facts" });
  card.append(facts);
  card.parts = {
    title,
    scope,
    prefix: field(facts, "Key"),
    id: field(facts, "Id"),
    created: field(facts, "Created"),
    limits: field(facts, "Limits"),
  };
  card.append(el("div", { class: "card-actions" }, revoke), message);
  return card;
}

function updateKeyCard(card, key) {
  const parts = card.parts;
  card.dataset.keyId = key.id;
  setText(parts.title, key.name || "unnamed");
  setText(parts.scope, key.scope);
  parts.scope.className = `badge scope-${key.scope}`;
  setText(parts.prefix, key.prefix);
  setText(parts.id, key.id);
  setText(parts.created, new Date(key.created_at).toLocaleString());
  setText(parts.limits, describeLimits(key) || "none");
}

const KEY_FIELDS = new Set(["id", "name", "scope", "prefix", "created_at"]);

// "rpm 60, tpm 10000, budget 1000000/month, models org/*": a key's limits in one line.
function describeLimits(key) {
  const parts = [];
  for (const [name, value] of Object.entries(key)) {
    if (KEY_FIELDS.has(name) || name === "budget_period") continue;
    if (name === "budget_tokens") parts.push(`budget ${value}/${key.budget_period}`);
    else if (name === "models") parts.push(`models ${value.join(" ")}`);
    else if (name === "expires_at") parts.push(`expires ${new Date(value).toLocaleString()}`);
    else parts.push(`${name.replace("_", " ")} ${value}`);
  }
  return parts.join(", ");
}

// -- usage --------------------------------------------------------------------------------

let usageFetched = 0;

function utcStart(period) {
  const now = new Date();
  const day = period === "day" ? now.getUTCDate() : 1;
  return Math.floor(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), day) / 1000);
}

// Tokens per hour of the busiest keys (a chart), the top keys with their budgets left, the
// top models: the last 24 hours, from GET /v0/usage.
async function renderUsage(force = false) {
  if (!force && Date.now() - usageFetched < 10000) return; // written once a second: enough
  const day = utcStart("day");
  const month = utcStart("month");
  const [hourly, byKey, byModel, today, thisMonth, { keys }] = await Promise.all([
    api("GET", "v0/usage?group_by=key,hour"),
    api("GET", "v0/usage?group_by=key"),
    api("GET", "v0/usage?group_by=model"),
    api("GET", `v0/usage?group_by=key&from=${day}`),
    api("GET", `v0/usage?group_by=key&from=${month}`),
    api("GET", "v0/keys"),
  ]);
  usageFetched = Date.now();
  const names = new Map(keys.map((k) => [k.id, k]));
  const spent = { day: new Map(), month: new Map() };
  for (const row of today.usage) spent.day.set(row.key, row.total_tokens);
  for (const row of thisMonth.usage) spent.month.set(row.key, row.total_tokens);
  const top = [...byKey.usage].sort((a, b) => b.total_tokens - a.total_tokens);
  $("usage-empty").hidden = top.length > 0;
  const total = top.reduce((sum, row) => sum + row.total_tokens, 0);
  setText($("usage-summary"), `${total} tokens, ${top.length} key${top.length === 1 ? "" : "s"}, last 24 hours`);
  // One chart: tokens per hour of the five busiest keys.
  const hours = [...new Set(hourly.usage.map((row) => row.hour))].sort();
  const series = top.slice(0, 5).map((row) => {
    const byHour = new Map(hourly.usage.filter((r) => r.key === row.key).map((r) => [r.hour, r.total_tokens]));
    return { label: names.get(row.key)?.name || row.key, values: hours.map((h) => byHour.get(h) ?? 0) };
  });
  const chart = $("usage-chart");
  if (chart.children.length !== 1) chart.replaceChildren(createChart("Tokens per hour, busiest keys", "usage"));
  drawChart(chart.children[0], series, { format: String });
  tableRows(
    $("usage-keys"),
    top.map((row) => {
      const key = names.get(row.key);
      let left = "no budget";
      if (key && key.budget_tokens) {
        const used = spent[key.budget_period].get(row.key) || 0;
        left = `${Math.max(0, key.budget_tokens - used)} of ${key.budget_tokens}/${key.budget_period}`;
      }
      return [row.key, [key?.name || "(revoked)", row.key, String(row.requests), String(row.total_tokens), String(row.errors), left]];
    }),
  );
  tableRows(
    $("usage-models"),
    [...byModel.usage]
      .sort((a, b) => b.total_tokens - a.total_tokens)
      .map((row) => [row.model, [row.model, String(row.requests), String(row.prompt_tokens), String(row.cached_tokens), String(row.completion_tokens)]]),
  );
}

async function renderKeys(force = false) {
  // Keys change only through this page or the CLI: every 5 s is live enough.
  if (!force && Date.now() - keysFetched < 5000) return;
  const { keys } = await api("GET", "v0/keys");
  keysFetched = Date.now();
  setText($("keys-summary"), `${keys.length} key${keys.length === 1 ? "" : "s"}`);
  $("keys-empty").hidden = keys.length > 0;
  syncList($("keys-list"), keys, (key) => key.id, createKeyCard, updateKeyCard);
}

async function createKey(event) {
  event.preventDefault();
  const result = $("key-result");
  const body = { scope: $("key-scope").value };
  const name = $("key-name").value.trim();
  if (name) body.name = name;
  const button = $("key-submit");
  button.disabled = true;
  try {
    const created = await api("POST", "v0/keys", body);
    $("new-key-value").value = created.key;
    $("new-key").hidden = false;
    setText($("copy-result"), "");
    setText(result, `Created ${created.scope} key ${created.name || created.prefix}.`);
    result.className = "result ok";
    $("key-form").reset();
    $("new-key-value").focus();
    $("new-key-value").select();
    await renderKeys(true);
  } catch (error) {
    showFailure(result, error);
  } finally {
    button.disabled = false;
  }
}

async function copyKey() {
  const input = $("new-key-value");
  const result = $("copy-result");
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(input.value);
    } else {
      input.select();
      if (!document.execCommand("copy")) throw new Error("copy refused");
    }
    setText(result, "Copied.");
  } catch {
    input.select();
    setText(result, "Select the key and copy it by hand (Ctrl+C).");
  }
}

function dismissKey() {
  $("new-key-value").value = "";
  $("new-key").hidden = true;
  setText($("copy-result"), "");
  $("key-name").focus();
}

// -- start --------------------------------------------------------------------------------

const RENDER = {
  fleet: renderFleet,
  models: renderModels,
  traffic: renderTraffic,
  keys: renderKeys,
  usage: renderUsage,
};

function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("register-form").addEventListener("submit", registerModel);
  $("key-form").addEventListener("submit", createKey);
  $("copy-key").addEventListener("click", copyKey);
  $("dismiss-key").addEventListener("click", dismissKey);
  window.addEventListener("hashchange", () => route(true));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && session.key) startPolling();
  });
  if (session.key) {
    showSignedIn(true);
    route(false);
  } else {
    showSignedIn(false);
    $("admin-key").focus();
  }
}

start();
