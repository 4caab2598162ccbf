// The live page: todos through the public API (same origin), each write's read-side lag, and the
// pipeline's health from GET /ui/api/pipeline every second. Plain script, no build step, no library.
//
// Page contract (tests and users rely on it): the form's input is named "title" and Enter creates;
// every todo element carries data-todo-id="<id>"; a todo written from this page holds its measured
// lag in an element with data-lag-ms="<ms>"; the first page lists what GET /todo lists first.
"use strict";

const POLL_MS = 1000;
const POLL_TIMEOUT_MS = 3000;
const READ_BACK_TRIES = 4; // each try waits up to ~2 s server-side (MIN_VERSION_WAIT_SECONDS)
const WRITE_LOG_SIZE = 12;
const STATUS_WORDS = { CREATED: "created", IN_PROGRESS: "in progress", FINISHED: "finished", CANCELED: "canceled" };

const state = {
  status: "", // the list's filter
  cursors: [null], // the cursor of every page visited, the current one last
  nextCursor: null,
  items: [], // the current page, as GET /todo answered it
  loaded: false,
  written: new Map(), // id -> the newest todo this page wrote or read back
  deleted: new Map(), // id -> the version its deletion produced
  lags: new Map(), // id -> {state: "measuring" | "done" | "error", version, ms, message}
  editing: null, // id of the todo whose edit form is open
  loads: 0, // GET /todo requests sent; only the latest one's answer is shown
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// --- the API ---------------------------------------------------------------------------------------

async function api(method, path, body, headers = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    return { status: 0, answeredAt: performance.now(), body: null, headers: new Headers(), network: String(error) };
  }
  const answeredAt = performance.now(); // "the command's answer": its status line and headers are in
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  return { status: response.status, answeredAt, body: data, headers: response.headers };
}

function problem(answer) {
  if (answer.status === 0) return "the gateway is unreachable";
  const error = answer.body && answer.body.error;
  if (!error) return `HTTP ${answer.status}`;
  const details = (error.details || []).map((d) => (d.field ? `${d.field}: ${d.message}` : d.message));
  return [error.message, ...details].join("; ");
}

const ifMatch = (version) => ({ "If-Match": `"${version}"` });

// --- messages and the write log -----------------------------------------------------------------

function say(text, kind = "info") {
  const box = $("#messages");
  box.replaceChildren(el("p", { class: `message ${kind}`, text }));
}

function logWrite(what, version) {
  const entry = el("li", { class: "pending" }, el("span", { class: "what", text: what }), " ",
    el("span", { class: "outcome", text: `reading back v${version}…` }));
  const log = $("#write-log");
  log.prepend(entry);
  while (log.children.length > WRITE_LOG_SIZE) log.lastElementChild.remove();
  return (outcome, ms) => {
    entry.className = ms === undefined ? "error" : "done";
    const span = $(".outcome", entry);
    span.textContent = outcome;
    if (ms !== undefined) span.dataset.writeLagMs = String(ms);
  };
}

// --- the list ------------------------------------------------------------------------------------

async function loadPage() {
  const cursor = state.cursors[state.cursors.length - 1];
  const query = new URLSearchParams();
  if (state.status) query.set("status", state.status);
  if (cursor) query.set("cursor", cursor);
  const load = ++state.loads;
  $("#todo-list").setAttribute("aria-busy", "true");
  const answer = await api("GET", `/todo${query.toString() ? `?${query}` : ""}`);
  if (load !== state.loads) return; // a later load (another page, another filter) is on its way
  $("#todo-list").setAttribute("aria-busy", "false");
  if (answer.status !== 200) {
    $("#list-state").textContent = `Could not load the todos: ${problem(answer)}.`;
    $("#list-state").classList.add("error");
    return;
  }
  state.items = answer.body.items;
  state.nextCursor = answer.body.next_cursor;
  state.loaded = true;
  $("#list-state").classList.remove("error");
  render();
}

function newest(todo) {
  // Read your writes: a page read before the projection caught up still shows what this page wrote.
  const mine = state.written.get(todo.id);
  return mine && mine.version > todo.version ? mine : todo;
}

function isDeleted(todo) {
  const gone = state.deleted.get(todo.id);
  return gone !== undefined && gone > todo.version;
}

function render() {
  const onPage = new Set(state.items.map((t) => t.id));
  const pageTodos = state.items.map(newest).filter((t) => !isDeleted(t));
  const elsewhere = [...state.written.values()].filter((t) => !onPage.has(t.id) && !isDeleted(t)).reverse();
  fill($("#todo-list"), pageTodos);
  fill($("#written-list"), elsewhere);
  $("#written").hidden = elsewhere.length === 0;
  const filter = state.status ? ` ${STATUS_WORDS[state.status]}` : "";
  let empty = state.cursors.length > 1 ? `No more${filter} todos.` : `No${filter} todos yet.`;
  if (!state.loaded) empty = "Loading…";
  $("#list-state").textContent = state.items.length ? "" : empty;
  $("#page-number").textContent = `page ${state.cursors.length}`;
  $("#prev-page").disabled = state.cursors.length <= 1;
  $("#first-page").disabled = state.cursors.length <= 1;
  $("#next-page").disabled = !state.nextCursor;
}

function fill(list, todos) {
  // An open edit form survives a re-render: its element is kept as it is.
  const kept = new Map();
  for (const node of list.children) {
    if (Number(node.dataset.todoId) === state.editing) kept.set(state.editing, node);
  }
  list.replaceChildren(...todos.map((todo) => kept.get(todo.id) || todoElement(todo)));
}

function lagElement(todo) {
  const lag = state.lags.get(todo.id);
  if (!lag) return null;
  if (lag.state === "measuring") return el("span", { class: "lag measuring", text: `reading back v${lag.version}…` });
  if (lag.state === "error") return el("span", { class: "lag error", text: lag.message });
  return el("span", {
    class: "lag",
    "data-lag-ms": lag.ms,
    title: `from the answer to this page's write until get_todos held version ${lag.version}`,
    text: `read side +${fmt.ms(lag.ms)}`,
  });
}

function todoElement(todo) {
  const finished = todo.status === "FINISHED";
  const item = el("li", { class: `todo status-${todo.status.toLowerCase()}`, "data-todo-id": todo.id, "data-version": todo.version });
  const body = el("div", { class: "todo-body" },
    el("span", { class: "title", text: todo.title }),
    todo.description ? el("span", { class: "description", text: todo.description }) : null);
  const meta = el("div", { class: "todo-meta" },
    el("span", { class: "badge", text: STATUS_WORDS[todo.status] || todo.status }),
    el("span", { class: "version", title: `updated ${todo.updated_at}`, text: `#${todo.id} v${todo.version}` }),
    lagElement(todo));
  const edit = el("button", { type: "button", class: "secondary", "aria-label": `Edit “${todo.title}”`, text: "Edit" });
  const complete = el("button", { type: "button", class: "secondary", disabled: finished,
    "aria-label": `Complete “${todo.title}”`, text: finished ? "Done" : "Complete" });
  const del = el("button", { type: "button", class: "danger", "aria-label": `Delete “${todo.title}”`, text: "Delete" });
  edit.addEventListener("click", () => openEditor(item, todo));
  complete.addEventListener("click", busy(complete, () => update(todo, { status: "FINISHED" }, "completed")));
  del.addEventListener("click", busy(del, () => remove(todo)));
  item.append(body, meta, el("div", { class: "todo-actions" }, edit, complete, del));
  return item;
}

function openEditor(item, todo) {
  state.editing = todo.id;
  const titleId = `edit-title-${todo.id}`;
  const descriptionId = `edit-description-${todo.id}`;
  const close = () => {
    state.editing = null;
    render();
    const again = document.querySelector(`[data-todo-id="${todo.id}"] button`);
    if (again) again.focus();
  };
  const save = el("button", { type: "submit", text: "Save" });
  const form = el("form", { class: "edit-form", "aria-label": `Edit todo #${todo.id}` },
    el("div", { class: "field" }, el("label", { for: titleId, text: "Title" }),
      el("input", { id: titleId, name: "edit-title", type: "text", required: true, maxlength: 255 })),
    el("div", { class: "field" }, el("label", { for: descriptionId, text: "Description" }),
      el("textarea", { id: descriptionId, name: "edit-description", rows: 2, maxlength: 2000 })),
    el("div", { class: "todo-actions" },
      save,
      el("button", { type: "button", class: "secondary", text: "Cancel", onclick: close })));
  $("input", form).value = todo.title;
  $("textarea", form).value = todo.description;
  form.addEventListener("keydown", (event) => {
    if (event.key === "Escape") close();
  });
  const submit = busy(save, async () => {
    const changes = {};
    const title = $("input", form).value;
    const description = $("textarea", form).value;
    if (title !== todo.title) changes.title = title;
    if (description !== todo.description) changes.description = description;
    if (Object.keys(changes).length === 0) return close();
    state.editing = null;
    await update(todo, changes, "edited");
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  item.replaceChildren(form);
  $("input", form).focus();
}

// --- writes --------------------------------------------------------------------------------------

async function create(form) {
  const title = form.elements.title.value;
  const description = form.elements.description.value;
  const answer = await api("POST", "/todo", description ? { title, description } : { title });
  if (answer.status !== 201) {
    say(`Not created: ${problem(answer)}.`, "error");
    return;
  }
  form.reset();
  const todo = answer.body;
  say(`Created #${todo.id}.`);
  remember(todo);
  measure(todo.id, todo.version, answer.answeredAt, `created #${todo.id}`);
}

async function update(shown, changes, what) {
  const answer = await api("PATCH", `/todo/${shown.id}`, changes, ifMatch(shown.version));
  if (answer.status === 200) {
    const todo = answer.body;
    if (todo.version === shown.version) {
      say(`#${todo.id} unchanged: nothing to write.`);
      render();
      return;
    }
    say(`${what[0].toUpperCase()}${what.slice(1)} #${todo.id}.`);
    remember(todo);
    measure(todo.id, todo.version, answer.answeredAt, `${what} #${todo.id}`);
  } else {
    await refused(shown, answer, what);
  }
}

async function remove(shown) {
  const answer = await api("DELETE", `/todo/${shown.id}`, undefined, ifMatch(shown.version));
  if (answer.status !== 200) {
    await refused(shown, answer, "deleted");
    return;
  }
  const deletion = answer.body.version + 1; // the answer is the todo as it was; its deletion is one more
  state.deleted.set(shown.id, deletion);
  state.lags.delete(shown.id);
  say(`Deleted #${shown.id}.`);
  render();
  measure(shown.id, deletion, answer.answeredAt, `deleted #${shown.id}`, true);
}

async function refused(shown, answer, what) {
  if (answer.status === 412) {
    say(`#${shown.id} changed elsewhere; reloaded. Nothing was ${what}: check it and try again.`, "warning");
    await reread(shown);
  } else if (answer.status === 404) {
    say(`#${shown.id} was deleted elsewhere.`, "warning");
    state.deleted.set(shown.id, Number.MAX_SAFE_INTEGER);
    render();
  } else {
    say(`Not ${what}: ${problem(answer)}.`, "error");
    render();
  }
}

async function reread(shown) {
  // The write side is past the shown version: wait for the read side to be too, then show it.
  let answer = await api("GET", `/todo/${shown.id}?min_version=${shown.version + 1}`);
  if (answer.status === 503) answer = await api("GET", `/todo/${shown.id}`);
  if (answer.status === 200) {
    const todo = answer.body;
    state.items = state.items.map((t) => (t.id === todo.id ? todo : t));
    if (state.written.has(todo.id)) remember(todo);
    state.lags.delete(shown.id); // the lag shown was of a version that is not current any more
  } else if (answer.status === 404) {
    state.deleted.set(shown.id, Number.MAX_SAFE_INTEGER);
  } else {
    say(`#${shown.id} changed elsewhere, and reading it again failed: ${problem(answer)}.`, "error");
  }
  await loadPage();
}

function remember(todo) {
  const known = state.written.get(todo.id);
  if (!known || known.version <= todo.version) state.written.set(todo.id, todo);
}

function measure(...args) {
  // Not awaited: the next write need not wait for this one's read-back.
  readBack(...args).catch((error) => say(`Measuring the read-side lag failed: ${error}.`, "error"));
}

async function readBack(id, version, answeredAt, what, gone = false) {
  // The write's read-side lag: until get_todos holds `version` (for a deletion: answers 404).
  const done = logWrite(what, version);
  if (!gone) {
    state.lags.set(id, { state: "measuring", version });
    render();
  }
  let last = null;
  for (let attempt = 1; attempt <= READ_BACK_TRIES; attempt++) {
    const answer = await api("GET", `/todo/${id}?min_version=${version}`);
    last = answer;
    const held = gone ? answer.status === 404 : answer.status === 200;
    if (held) {
      const ms = Math.max(0, Math.round(answer.answeredAt - answeredAt));
      done(`read side +${fmt.ms(ms)}`, ms);
      if (!gone) {
        state.lags.set(id, { state: "done", version, ms });
        remember(answer.body);
      }
      await loadPage();
      return;
    }
    const notYet = answer.status === 503 && answer.body && answer.body.error && answer.body.error.code === "not_yet_consistent";
    if (!notYet) break;
  }
  const message = last && last.status === 503
    ? `read side not at v${version} after ${READ_BACK_TRIES} tries: ${problem(last)}`
    : `reading v${version} back failed: ${problem(last)}`;
  done(message);
  if (!gone) state.lags.set(id, { state: "error", version, message });
  render();
}

// --- the pipeline panel -----------------------------------------------------------------------------

const fmt = {
  count: (v) => (v === null || v === undefined ? "—" : Number(v).toLocaleString("en")),
  ms: (v) => (v === null || v === undefined ? "—" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`),
  seconds: (v) => (v === null || v === undefined ? "—" : `${v.toFixed(1)} s`),
  ratio: (v) => (v === null || v === undefined ? "—" : `${(v * 100).toFixed(1)} %`),
  rate: (v) => (v === null || v === undefined ? "—" : `${v.toFixed(1)}/s`),
};

function metric(name, value, format) {
  const node = document.querySelector(`[data-metric="${name}"]`);
  const text = format(value);
  if (node.textContent !== text) node.textContent = text;
  node.dataset.value = value === null || value === undefined ? "" : String(value);
}

function renderPipeline(doc) {
  const stale = doc.errors.length ? `; ${doc.errors.length} component(s) not answering` : "";
  $("#pipeline-state").textContent =
    `Scraped at ${new Date(doc.scraped_at).toLocaleTimeString("en-GB")} in ${Math.round(doc.scrape_ms)} ms${stale}.`;
  $("#pipeline").classList.remove("stale");
  renderErrors(doc.errors);

  metric("outbox-pending", doc.outbox.pending_rows, fmt.count);
  metric("outbox-oldest", doc.outbox.oldest_pending_age_seconds, fmt.seconds);
  metric("outbox-rate", doc.outbox.published_per_second, fmt.rate);

  const partitions = doc.consumer.partitions;
  const box = $("#partitions");
  box.dataset.value = doc.consumer.lag_total === null ? "" : String(doc.consumer.lag_total);
  box.replaceChildren(...(partitions === null
    ? [el("dt", { text: "partitions" }), el("dd", { text: "—" })]
    : partitions.flatMap((p) => [el("dt", { text: `partition ${p.partition}` }),
      el("dd", { "data-partition": p.partition, text: fmt.count(p.lag) })])));
  metric("consumer-retries", doc.consumer.retries_60s, fmt.count);

  const lag = doc.projection.lag_ms_60s;
  metric("lag-p50", lag.p50, fmt.ms);
  metric("lag-p90", lag.p90, fmt.ms);
  metric("lag-p99", lag.p99, fmt.ms);
  metric("lag-count", doc.components.project_event === "up" ? lag.count : null, fmt.count);
  for (const outcome of ["applied", "skipped", "rejected", "failed"]) {
    metric(`events-${outcome}`, doc.projection.events[outcome], fmt.count);
  }
  const item = doc.cache.item;
  metric("cache-hit-ratio", item.hit_ratio, fmt.ratio);
  metric("cache-hit-ratio-60s", item.hit_ratio_60s, fmt.ratio);
  metric("cache-counts", item.hit === null ? null : `${item.hit} / ${item.miss} / ${item.bypass}`, (v) => v ?? "—");
  metric("dead-letters", doc.dead_letters.stored_total, fmt.count);
  metric("dead-letters-60s", doc.dead_letters.stored_60s, fmt.count);
  const reconcile = doc.reconcile;
  metric("reconcile-last-pass", reconcile.last_pass_age_seconds, (v) => (v === null || v === undefined ? "—" : `${fmt.seconds(v)} ago`));
  metric("reconcile-passes", reconcile.passes_total, fmt.count);
  for (const kind of ["missing", "different", "extra"]) {
    metric(`reconcile-drift-${kind}`, reconcile.drift[kind], fmt.count);
  }
  metric("reconcile-repaired", reconcile.repaired_total, fmt.count);

  renderComponents(doc);
  renderChart(doc.projection, Date.parse(doc.scraped_at) / 1000);
}

function renderErrors(errors) {
  const list = $("#pipeline-errors");
  const now = errors.map((e) => e.message).join("\n");
  if (list.dataset.shown === now) return; // unchanged: no churn for screen readers
  list.dataset.shown = now;
  list.replaceChildren(...errors.map((e) => el("li", { "data-component": e.component, title: e.detail, text: e.message })));
}

function renderComponents(doc) {
  const rows = Object.entries(doc.components).map(([name, up]) => {
    const requests = doc.requests[name];
    return el("tr", { class: up === "up" ? "up" : "down" },
      el("th", { scope: "row", text: name }),
      el("td", { text: up }),
      el("td", { text: requests ? fmt.rate(requests.per_second) : "—" }),
      el("td", { text: requests ? fmt.rate(requests.server_errors_per_second) : "—" }));
  });
  $("#components").replaceChildren(...rows);
}

function pipelineUnreachable(text) {
  $("#pipeline").classList.add("stale");
  $("#pipeline-state").textContent = `Pipeline status unavailable: ${text}. Showing the last figures.`;
}

let pollTimer = 0;
let polling = false;

function schedulePoll(delay) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollPipeline, delay);
}

async function pollPipeline() {
  if (polling) return;
  polling = true;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), POLL_TIMEOUT_MS);
  try {
    const response = await fetch("/ui/api/pipeline", { signal: abort.signal, cache: "no-store" });
    const doc = await response.json();
    if (!response.ok) pipelineUnreachable(problem({ status: response.status, body: doc }));
    else renderPipeline(doc);
  } catch (error) {
    pipelineUnreachable(error.name === "AbortError" ? "the gateway did not answer in time" : "the gateway is unreachable");
  } finally {
    clearTimeout(timer);
    polling = false;
    if (!document.hidden) schedulePoll(POLL_MS);
  }
}

// --- the chart: projection lag over the last minutes (inline SVG, log scale) -------------------------

const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 600, height: 180, left: 52, right: 10, top: 10, bottom: 24 };

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderChart(projection, now) {
  const span = projection.series_seconds;
  const step = projection.series_bin_seconds;
  const points = projection.lag_series;
  const top = Math.max(100, ...points.map((p) => p.p99_ms || 0));
  const decades = Math.max(2, Math.ceil(Math.log10(top)));
  const plotW = CHART.width - CHART.left - CHART.right;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  const right = CHART.left + plotW;
  const x = (t) => Math.min(right, CHART.left + ((Math.min(now, t + step / 2) - (now - span)) / span) * plotW);
  const y = (ms) => CHART.top + plotH - (Math.log10(Math.max(1, ms)) / decades) * plotH;
  const nodes = [];
  for (let d = 0; d <= decades; d++) {
    const ms = 10 ** d;
    nodes.push(svg("line", { class: "grid", x1: CHART.left, x2: CHART.width - CHART.right, y1: y(ms), y2: y(ms) }));
    nodes.push(svg("text", { class: "axis", x: CHART.left - 6, y: y(ms) + 4, "text-anchor": "end" },
      ms >= 1000 ? `${ms / 1000} s` : `${ms} ms`));
  }
  for (const [ago, label] of [[span, `-${span / 60} min`], [span / 2, `-${span / 120} min`], [0, "now"]]) {
    nodes.push(svg("text", { class: "axis", x: CHART.left + ((span - ago) / span) * plotW, y: CHART.height - 6,
      "text-anchor": ago === span ? "start" : ago === 0 ? "end" : "middle" }, label));
  }
  for (const [key, cls] of [["p99_ms", "p99"], ["p50_ms", "p50"]]) {
    let d = "";
    let previous = null;
    for (const p of points) {
      if (p[key] === null) continue;
      d += `${previous !== null && p.t - previous === step ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`;
      previous = p.t;
    }
    if (d) nodes.push(svg("path", { class: `series ${cls}`, d }));
    for (const p of points) {
      if (p[key] === null) continue;
      const dot = svg("circle", { class: `dot ${cls}`, cx: x(p.t).toFixed(1), cy: y(p[key]).toFixed(1), r: 2.5 });
      dot.append(svg("title", {}, `${new Date(p.t * 1000).toLocaleTimeString("en-GB")}: ${p.count} events, ` +
        `p50 ${fmt.ms(p.p50_ms)}, p99 ${fmt.ms(p.p99_ms)}`));
      nodes.push(dot);
    }
  }
  if (!points.length) {
    nodes.push(svg("text", { class: "empty", x: CHART.left + plotW / 2, y: CHART.top + plotH / 2, "text-anchor": "middle" },
      "no events projected in the last 5 minutes"));
  }
  $("#lag-chart").replaceChildren(...nodes);
  const worst = points.reduce((m, p) => Math.max(m, p.p99_ms || 0), 0);
  $("#chart-summary").textContent = points.length
    ? `${points.reduce((n, p) => n + p.count, 0)} events in the last ${span / 60} minutes; worst p99 ${fmt.ms(worst)}.`
    : "No events in the last 5 minutes.";
}

// --- wiring ----------------------------------------------------------------------------------------

function busy(button, work) {
  // One write at a time per control; the button says so while it runs.
  return async (...args) => {
    if (button.disabled) return;
    button.disabled = true;
    try {
      await work(...args);
    } finally {
      button.disabled = false;
    }
  };
}

function start() {
  const form = $("#create-form");
  const submit = busy($("button[type=submit]", form), () => create(form));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("#status-filter").addEventListener("change", (event) => {
    state.status = event.target.value;
    state.cursors = [null];
    loadPage();
  });
  $("#reload").addEventListener("click", () => loadPage());
  $("#next-page").addEventListener("click", () => {
    if (!state.nextCursor) return;
    state.cursors.push(state.nextCursor);
    loadPage();
  });
  $("#prev-page").addEventListener("click", () => {
    if (state.cursors.length > 1) state.cursors.pop();
    loadPage();
  });
  $("#first-page").addEventListener("click", () => {
    state.cursors = [null];
    loadPage();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(pollTimer); // nobody looks: no scrapes
    else schedulePoll(0);
  });
  loadPage();
  pollPipeline();
}

start();
