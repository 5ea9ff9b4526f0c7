// The Messina dashboard: fleet, device, alerts and ingest pages over the HTTP API.
// Every value shown comes from the API and may be attacker-controlled (device ids, messages),
// so the DOM is built with createElement and text nodes only, never from HTML strings.
'use strict';

// ---------------------------------------------------------------- format helpers

const numberFormats = new Map();

function fmtNumber(value, digits = 0) {
  if (value == null || Number.isNaN(value)) return '—';
  if (!numberFormats.has(digits)) {
    numberFormats.set(digits, new Intl.NumberFormat(undefined, { maximumFractionDigits: digits }));
  }
  return numberFormats.get(digits).format(value);
}

function fmtBytes(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${fmtNumber(value, unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function toMs(time) {
  return typeof time === 'number' ? time : Date.parse(time);
}

function fmtTime(time) {
  return time == null ? '—' : new Date(toMs(time)).toLocaleString();
}

function fmtRelative(time, now = Date.now()) {
  if (time == null) return 'never';
  const seconds = Math.round((now - toMs(time)) / 1000);
  const abs = Math.abs(seconds);
  let text;
  if (abs < 60) text = `${abs} s`;
  else if (abs < 3600) text = `${Math.floor(abs / 60)} min`;
  else if (abs < 86400) text = `${Math.floor(abs / 3600)} h`;
  else text = `${Math.floor(abs / 86400)} d`;
  return seconds >= 0 ? `${text} ago` : `in ${text}`;
}

function fmtValue(value) {
  if (typeof value === 'number') return fmtNumber(value, 2);
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  return value == null ? '—' : String(value);
}

function fmtRate(perSecond) {
  return `${fmtNumber(perSecond, 1)} /s`;
}

// ---------------------------------------------------------------- DOM helpers

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (typeof value === 'function') node.addEventListener(name.replace(/^on/, ''), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  node.append(...children.flat(Infinity).filter((c) => c != null && c !== false).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svgEl(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function $(selector) {
  return document.querySelector(selector);
}

function timeAgo(time) {
  if (time == null) return el('span', { class: 'muted' }, 'never');
  return el('time', { datetime: new Date(toMs(time)).toISOString(), title: fmtTime(time) }, fmtRelative(time));
}

function deviceHref(id) {
  return `#/devices/${encodeURIComponent(id)}`;
}

function deviceLink(id) {
  return el('a', { href: deviceHref(id), class: 'device-link' }, id);
}

function connectionPill(connection) {
  const connected = Boolean(connection && connection.connected);
  const title = connection && connection.changed_at
    ? `since ${fmtTime(connection.changed_at)}${connection.node ? ` on ${connection.node}` : ''}`
    : 'never connected';
  return el('span', { class: `pill ${connected ? 'good' : 'off'}`, title }, connected ? 'connected' : 'not connected');
}

function section(title, ...children) {
  return el('section', { class: 'card' }, el('h2', {}, title), ...children);
}

function safeUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? parsed.href : null;
  } catch {
    return null;
  }
}

function showError(text) {
  $('#error-text').textContent = text;
  $('#error').hidden = false;
}

function hideError() {
  $('#error').hidden = true;
}

// ---------------------------------------------------------------- api + auth

const KEY_STORAGE = 'messina.api_key';
const PAGE_SIZE = 50;

class ApiError extends Error {
  constructor(status, title, detail) {
    super(detail);
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

function authHeaders(headers) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function problemOf(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    // Not problem+json (a proxy's page, say): the status line is all there is.
  }
  const title = problem.title || response.statusText;
  return new ApiError(response.status, title, problem.detail || `${response.status} ${title}`);
}

async function api(path, { method = 'GET', body, signal } = {}) {
  const init = { method, signal, headers: authHeaders({ Accept: 'application/json' }) };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(`/v1${path}`, init);
  if (!response.ok) throw await problemOf(response);
  return response.json();
}

// The answer of `request`, or null when it fails with one of `statuses` (an expected absence).
async function optional(request, statuses) {
  try {
    return await request;
  } catch (error) {
    if (error instanceof ApiError && statuses.includes(error.status)) return null;
    throw error;
  }
}

function report(error) {
  if (error.name === 'AbortError') return;
  if (error instanceof ApiError && error.status === 401) {
    signOut(error.detail);
    return;
  }
  showError(error instanceof ApiError ? error.detail : `Request failed: ${error.message}`);
}

const app = { signedIn: false, page: null, stopAlerts: null };

async function start() {
  hideError();
  try {
    await api('/devices?limit=1');
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      const rejectedKey = sessionStorage.getItem(KEY_STORAGE) !== null;
      signOut(rejectedKey ? error.detail : '');
    } else {
      report(error);
    }
    return;
  }
  enterApp();
}

function enterApp() {
  app.signedIn = true;
  $('#login').hidden = true;
  $('#nav').hidden = false;
  $('#sign-out').hidden = sessionStorage.getItem(KEY_STORAGE) === null;
  app.stopAlerts = keepStream('alerts', '/alerts/stream', { snapshot: onAlertSnapshot, alert: onAlertTransition });
  route();
}

function signOut(problem) {
  sessionStorage.removeItem(KEY_STORAGE);
  app.signedIn = false;
  leavePage();
  setIngestStream(false);
  if (app.stopAlerts) app.stopAlerts();
  app.stopAlerts = null;
  alertStore.byId.clear();
  updateAlertBadge();
  hideError();
  $('#nav').hidden = true;
  $('#sign-out').hidden = true;
  $('#app').replaceChildren();
  $('#login-problem').textContent = problem;
  $('#login-problem').hidden = !problem;
  $('#login').hidden = false;
  $('#api-key').focus();
}

function onLogin(event) {
  event.preventDefault();
  const input = $('#api-key');
  sessionStorage.setItem(KEY_STORAGE, input.value.trim());
  input.value = '';
  start();
}

// ---------------------------------------------------------------- sse reader

// A parser of text/event-stream: feed it chunks of text, it calls onEvent(name, data) per event.
function sseParser(onEvent) {
  let buffer = '';
  let name = '';
  let data = [];
  function line(text) {
    if (text === '') {
      if (data.length) onEvent(name || 'message', data.join('\n'));
      name = '';
      data = [];
      return;
    }
    if (text.startsWith(':')) return;
    const colon = text.indexOf(':');
    const field = colon < 0 ? text : text.slice(0, colon);
    const value = colon < 0 ? '' : text.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  return (chunk) => {
    buffer += chunk;
    // A chunk ending in \r may be the first half of \r\n: wait for the next one to tell.
    const held = buffer.endsWith('\r') ? '\r' : '';
    const lines = buffer.slice(0, buffer.length - held.length).split(/\r\n|\r|\n/);
    buffer = lines.pop() + held;
    lines.forEach(line);
  };
}

async function readStream(path, onEvent, signal, onOpen) {
  const response = await fetch(`/v1${path}`, {
    headers: authHeaders({ Accept: 'text/event-stream' }),
    signal,
    cache: 'no-store',
  });
  if (!response.ok) throw await problemOf(response);
  onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const push = sseParser(onEvent);
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    push(value);
  }
}

const streamStates = new Map();

function setStreamState(name, state) {
  if (state) streamStates.set(name, state);
  else streamStates.delete(name);
  const states = [...streamStates.values()];
  const status = $('#stream-status');
  const reconnecting = states.includes('reconnecting');
  status.textContent = reconnecting ? 'reconnecting…' : states.includes('live') ? 'live' : '';
  status.className = `stream-status ${reconnecting ? 'warn' : 'live'}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Reads `path` until stopped, reconnecting 2 s after a drop; `handlers` maps event names to
// functions of the parsed JSON data. Returns the function that stops it.
function keepStream(name, path, handlers) {
  const controller = new AbortController();
  const { signal } = controller;
  function dispatch(event, data) {
    if (!handlers[event]) return;
    try {
      handlers[event](JSON.parse(data));
    } catch (error) {
      report(error);
    }
  }
  (async () => {
    setStreamState(name, 'connecting');
    while (!signal.aborted) {
      try {
        await readStream(path, dispatch, signal, () => setStreamState(name, 'live'));
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError) {
          report(error);
          // No key, or the feature is off on this server: retrying cannot help.
          if (error.status === 401 || error.status === 404) return;
        }
      }
      if (signal.aborted) return;
      setStreamState(name, 'reconnecting');
      await sleep(2000);
    }
  })();
  return () => {
    controller.abort();
    setStreamState(name, null);
  };
}

// ---------------------------------------------------------------- live data

const STATE_RANK = { raised: 0, acknowledged: 1, cleared: 2 };
const alertStore = { byId: new Map(), listeners: new Set() };

// Keeps the later of two versions of an alert: its state only moves forward.
function mergeAlert(alert) {
  const known = alertStore.byId.get(alert.id);
  if (known && STATE_RANK[known.state] > STATE_RANK[alert.state]) return known;
  alertStore.byId.set(alert.id, alert);
  return alert;
}

function publishAlerts(changed) {
  alertStore.listeners.forEach((listener) => listener(changed));
  updateAlertBadge();
}

function activeAlertCount() {
  return [...alertStore.byId.values()].filter((a) => a.state !== 'cleared').length;
}

function updateAlertBadge() {
  const count = activeAlertCount();
  const badge = $('#alert-badge');
  badge.textContent = fmtNumber(count);
  badge.classList.toggle('hot', count > 0);
}

function onAlertSnapshot({ items }) {
  const active = new Set(items.map((a) => a.id));
  // Active before but not now: its clear was among the transitions this watcher missed.
  const missed = [...alertStore.byId.values()].filter((a) => a.state !== 'cleared' && !active.has(a.id));
  publishAlerts(items.map(mergeAlert));
  missed.forEach((a) => {
    api(`/alerts/${encodeURIComponent(a.id)}`).then((fresh) => publishAlerts([mergeAlert(fresh)])).catch(report);
  });
}

function onAlertTransition(alert) {
  publishAlerts([mergeAlert(alert)]);
}

const MAX_SAMPLES = 300;
const ingest = { samples: [], listeners: new Set(), stop: null };

function onRates(rates) {
  ingest.samples.push(rates);
  if (ingest.samples.length > MAX_SAMPLES) ingest.samples.shift();
  ingest.listeners.forEach((listener) => listener(rates));
}

function setIngestStream(on) {
  if (on && !ingest.stop) ingest.stop = keepStream('ingest', '/ingest/stream', { rates: onRates });
  if (!on && ingest.stop) {
    ingest.stop();
    ingest.stop = null;
  }
}

// Registry names seen so far (label searches, device pages), shown next to device ids.
const registryNames = new Map();

function rememberRegistered(device) {
  if (device.name) registryNames.set(device.id, device.name);
}

// ---------------------------------------------------------------- router

const ROUTES = [
  { pattern: /^#\/?$/, page: fleetPage, nav: '#/', ingest: true },
  { pattern: /^#\/devices\/(.+)$/, page: devicePage, nav: '#/' },
  { pattern: /^#\/alerts$/, page: alertsPage, nav: '#/alerts' },
  { pattern: /^#\/ingest$/, page: ingestPage, nav: '#/ingest', ingest: true },
];

function pageContext() {
  const controller = new AbortController();
  const cleanups = [() => controller.abort()];
  return {
    cleanups,
    api: (path, options) => api(path, { ...options, signal: controller.signal }),
    every(ms, fn) {
      const timer = setInterval(fn, ms);
      cleanups.push(() => clearInterval(timer));
    },
    listen(set, listener) {
      set.add(listener);
      cleanups.push(() => set.delete(listener));
    },
  };
}

function leavePage() {
  if (app.page) app.page.cleanups.forEach((cleanup) => cleanup());
  app.page = null;
}

function route() {
  if (!app.signedIn) return;
  leavePage();
  const hash = location.hash || '#/';
  const found = ROUTES.map((r) => [r, r.pattern.exec(hash)]).find(([, match]) => match);
  if (!found) {
    location.replace('#/');
    return;
  }
  const [target, match] = found;
  document.querySelectorAll('#nav a').forEach((a) => {
    if (a.getAttribute('href') === target.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  });
  setIngestStream(Boolean(target.ingest));
  app.page = pageContext();
  const main = $('#app');
  main.replaceChildren();
  try {
    target.page(main, app.page, ...match.slice(1).map(decodeURIComponent));
  } catch (error) {
    report(error);
  }
}

// ---------------------------------------------------------------- pages: fleet

const COUNT_CARDS = [
  ['total', 'Devices'],
  ['connected', 'Connected'],
  ['not_connected', 'Not connected'],
  ['low_battery', 'Low battery'],
  ['active_alerts', 'Active alerts'],
];

const FLEET_COLUMNS = [
  { key: 'device', label: 'Device', value: (s) => s.device_id },
  { key: 'connection', label: 'Connection', value: (s) => Number(Boolean(s.connection && s.connection.connected)) },
  { key: 'battery', label: 'Battery', value: (s) => s.battery },
  { key: 'rssi', label: 'Signal', value: (s) => s.rssi },
  { key: 'online', label: 'Online', value: (s) => (s.online == null ? null : Number(s.online)) },
  { key: 'last_seen', label: 'Last seen', value: (s) => (s.last_seen == null ? null : toMs(s.last_seen)) },
];

// Orders by `column`, values missing last in either direction.
function compareBy(column, direction) {
  return (a, b) => {
    const x = column.value(a);
    const y = column.value(b);
    if (x == null) return y == null ? 0 : 1;
    if (y == null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * direction;
  };
}

function countCards() {
  const values = {};
  const node = el('div', { id: 'fleet-counts', class: 'counts' }, COUNT_CARDS.map(([key, label]) => {
    values[key] = el('span', { class: 'count-value' }, '—');
    return el('div', { class: `card count count-${key}`, 'data-count': key }, values[key], el('span', { class: 'count-label' }, label));
  }));
  return { node, set: (key, value) => { values[key].textContent = fmtNumber(value); } };
}

function ratesView() {
  const cells = {};
  const items = [['received', 'Received'], ['stored', 'Stored'], ['rejected', 'Rejected'], ['log_lag', 'Log lag']];
  const node = el('div', { class: 'rates' }, items.map(([key, label]) => {
    cells[key] = el('span', { class: 'rate-value', 'data-rate': key }, '—');
    return el('div', { class: `rate rate-${key}` }, el('span', { class: 'rate-label' }, label), cells[key]);
  }));
  function update(r) {
    cells.received.textContent = fmtRate(r.received_per_s);
    cells.stored.textContent = fmtRate(r.stored_per_s);
    cells.rejected.textContent = fmtRate(r.rejected_per_s);
    cells.log_lag.textContent = fmtBytes(r.log_lag_bytes);
  }
  const last = ingest.samples[ingest.samples.length - 1];
  if (last) update(last);
  return { node, update };
}

function batteryCell(battery, lowPercent) {
  if (battery == null) return el('span', { class: 'muted' }, '—');
  const fill = el('span', { class: 'fill' });
  // CSSOM writes are allowed by the page's style-src policy; style attributes are not.
  fill.style.width = `${Math.max(0, Math.min(100, battery))}%`;
  return el('span', { class: `battery${battery < lowPercent ? ' low' : ''}` },
    el('span', { class: 'bar' }, fill), `${fmtNumber(battery, 0)}%`);
}

function fleetRow(state, lowPercent) {
  const id = state.device_id;
  const name = registryNames.get(id);
  return el('tr', { 'data-device': id, onclick: () => { location.hash = deviceHref(id); } },
    el('td', {}, deviceLink(id), name && el('span', { class: 'muted name' }, name)),
    el('td', {}, connectionPill(state.connection)),
    el('td', {}, batteryCell(state.battery, lowPercent)),
    el('td', { class: 'num' }, state.rssi == null ? '—' : `${state.rssi} dBm`),
    el('td', {}, fmtValue(state.online)),
    el('td', {}, timeAgo(state.last_seen)));
}

// A device registered but without telemetry yet: a row with nothing to show but its id.
function unreportedState(id) {
  return { device_id: id, connection: null, online: null, last_seen: null, metrics: {} };
}

function fleetPage(main, ctx) {
  document.title = 'Fleet · Messina';
  const view = { cursor: null, previous: [], next: null, items: [], lowPercent: 20, results: null, query: '', sort: FLEET_COLUMNS[0], direction: 1 };
  const counts = countCards();
  const rates = ratesView();
  ctx.listen(ingest.listeners, rates.update);
  const showActive = () => counts.set('active_alerts', activeAlertCount());
  ctx.listen(alertStore.listeners, showActive);
  showActive();

  const search = el('input', { id: 'search', type: 'search', placeholder: 'Search by device id or label', 'aria-label': 'Search devices' });
  const form = el('form', { class: 'search', onsubmit: (e) => { e.preventDefault(); runSearch(search.value.trim()).catch(report); } },
    search, el('button', { type: 'submit' }, 'Search'));
  search.addEventListener('input', () => { if (search.value === '') clearSearch(); });
  const message = el('p', { class: 'muted message', hidden: true });
  const headRow = el('tr');
  const body = el('tbody');
  const table = el('table', { id: 'fleet-table', class: 'grid' },
    el('caption', {}, 'Click a header to sort: sorted within this page, the server pages by device id.'),
    el('thead', {}, headRow), body);
  const prev = el('button', { id: 'prev-page', type: 'button', onclick: () => turnPage(-1) }, '← Previous');
  const next = el('button', { id: 'next-page', type: 'button', onclick: () => turnPage(1) }, 'Next →');
  const pageLabel = el('span', { class: 'muted' });
  const pager = el('div', { class: 'pager' }, prev, pageLabel, next);

  main.append(el('h1', {}, 'Fleet'), counts.node,
    el('div', { class: 'card strip' }, el('span', { class: 'strip-title' }, 'Ingest now'), rates.node),
    el('div', { class: 'card' }, form, message, table, pager));

  function renderHead() {
    headRow.replaceChildren(...FLEET_COLUMNS.map((column) => {
      const sorted = column === view.sort;
      const arrow = sorted ? (view.direction > 0 ? ' ▲' : ' ▼') : '';
      return el('th', { 'aria-sort': sorted ? (view.direction > 0 ? 'ascending' : 'descending') : 'none' },
        el('button', { type: 'button', class: 'sort', title: 'Sort the rows of this page', onclick: () => sortBy(column) }, column.label, arrow));
    }));
  }

  function renderBody() {
    const rows = (view.results || view.items).slice().sort(compareBy(view.sort, view.direction));
    body.replaceChildren(...rows.map((s) => fleetRow(s, view.lowPercent)));
    const searching = view.results !== null;
    message.hidden = !(searching && rows.length === 0);
    message.textContent = `no device matches “${view.query}”`;
    pager.hidden = searching;
    prev.disabled = view.previous.length === 0;
    next.disabled = !view.next;
    pageLabel.textContent = `page ${view.previous.length + 1}`;
  }

  function sortBy(column) {
    view.direction = column === view.sort ? -view.direction : 1;
    view.sort = column;
    renderHead();
    renderBody();
  }

  async function loadPage() {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    if (view.cursor) query.set('cursor', view.cursor);
    const fleet = await ctx.api(`/devices?${query}`);
    view.items = fleet.items;
    view.next = fleet.next_cursor;
    view.lowPercent = fleet.low_battery_percent;
    ['total', 'connected', 'not_connected', 'low_battery'].forEach((key) => counts.set(key, fleet[key]));
    renderBody();
  }

  function turnPage(step) {
    if (step > 0) {
      view.previous.push(view.cursor);
      view.cursor = view.next;
    } else {
      view.cursor = view.previous.pop();
    }
    loadPage().catch(report);
  }

  async function findDevices(text) {
    const found = new Map();
    const exact = await optional(ctx.api(`/devices/${encodeURIComponent(text)}`), [400, 404]);
    if (exact) found.set(exact.device_id, exact);
    const labelQuery = new URLSearchParams({ label: text, limit: PAGE_SIZE });
    const registered = await optional(ctx.api(`/registry/devices?${labelQuery}`), [400, 401, 403, 404]);
    const labelled = registered ? registered.items : [];
    labelled.forEach(rememberRegistered);
    const states = await Promise.all(labelled.filter((d) => !found.has(d.id)).slice(0, PAGE_SIZE).map((d) =>
      optional(ctx.api(`/devices/${encodeURIComponent(d.id)}`), [404]).then((s) => s || unreportedState(d.id))));
    states.forEach((s) => found.set(s.device_id, s));
    if (found.size) return [...found.values()];
    const needle = text.toLowerCase();
    return view.items.filter((s) => s.device_id.toLowerCase().includes(needle)
      || (registryNames.get(s.device_id) || '').toLowerCase().includes(needle));
  }

  async function runSearch(text) {
    if (!text) {
      clearSearch();
      return;
    }
    const results = await findDevices(text);
    view.query = text;
    view.results = results;
    renderBody();
  }

  function clearSearch() {
    view.query = '';
    view.results = null;
    renderBody();
  }

  async function refresh() {
    await loadPage();
    if (view.query) await runSearch(view.query);
  }

  renderHead();
  refresh().catch(report);
  ctx.every(10000, () => refresh().catch(report));
}

// ---------------------------------------------------------------- pages: device

const RANGES = {
  '1h': { ms: 3600e3, bucket: '1m', label: 'Last hour' },
  '24h': { ms: 86400e3, bucket: '15m', label: 'Last 24 hours' },
  '7d': { ms: 7 * 86400e3, bucket: '1h', label: 'Last 7 days' },
  '30d': { ms: 30 * 86400e3, bucket: '6h', label: 'Last 30 days' },
};
const BUCKET_MS = { '1m': 60e3, '15m': 900e3, '1h': 3600e3, '6h': 21600e3 };
const UNITS = { battery: '%', rssi: 'dBm' };

function stateTable(state) {
  const rows = [
    ['battery', 'Battery', state.battery == null ? null : `${fmtNumber(state.battery, 1)}%`],
    ['rssi', 'Signal', state.rssi == null ? null : `${state.rssi} dBm`],
    ['online', 'Online', state.online == null ? null : fmtValue(state.online)],
    ...Object.entries(state.metrics).map(([name, value]) => [`metrics.${name}`, name, fmtValue(value)]),
  ];
  return el('table', { class: 'grid compact' },
    el('thead', {}, el('tr', {}, el('th', {}, 'Value'), el('th', {}, 'Latest'), el('th', {}, 'Updated'))),
    el('tbody', {}, rows.map(([key, label, value]) => el('tr', {},
      el('td', {}, label), el('td', { class: 'num' }, value == null ? '—' : value),
      el('td', {}, state.updated[key] ? timeAgo(state.updated[key]) : '—')))));
}

function syncResult(attrs) {
  const errors = Number(attrs.errors || 0);
  const parts = [errors > 0 ? `${fmtNumber(errors)} error${errors === 1 ? '' : 's'}` : 'ok'];
  if (attrs.files_synced != null) parts.push(`${fmtNumber(Number(attrs.files_synced))} files`);
  if (attrs.speed_mbps != null) parts.push(`${fmtNumber(Number(attrs.speed_mbps), 1)} Mbit/s`);
  return el('span', { class: `sync ${errors > 0 ? 'bad' : 'good'}` }, parts.join(' · '));
}

function eventItem(event) {
  const isSync = event.kind === 'sync';
  const failed = isSync && Number(event.attrs.errors || 0) > 0;
  const marker = isSync ? (failed ? 'bad' : 'good') : 'plain';
  return el('li', { class: `event ${marker}` },
    el('span', { class: 'marker', 'aria-hidden': 'true' }),
    el('div', { class: 'event-head' }, el('span', { class: 'kind' }, event.kind), isSync && syncResult(event.attrs),
      el('span', { class: 'muted when' }, timeAgo(event.ts))),
    el('div', { class: 'attrs' }, Object.entries(event.attrs).map(([name, value]) =>
      el('span', { class: 'attr' }, `${name}=${fmtValue(value)}`))));
}

function uploadPreview(upload) {
  const url = upload.download_url && safeUrl(upload.download_url);
  if (!url) return el('span', { class: 'muted' }, upload.state === 'completed' ? 'no download link' : '—');
  if (upload.content_type.startsWith('image/')) return el('img', { class: 'thumb', loading: 'lazy', src: url, alt: `${upload.kind} upload` });
  if (upload.content_type.startsWith('audio/')) return el('audio', { controls: true, preload: 'none', src: url });
  return el('a', { href: url, download: '', rel: 'noreferrer' }, 'Download');
}

function uploadItem(upload) {
  return el('li', { class: 'upload' }, uploadPreview(upload),
    el('div', { class: 'upload-meta' },
      el('strong', {}, upload.kind), ` ${upload.content_type} · ${fmtBytes(upload.size)}`,
      el('div', {}, el('span', { class: `pill state-${upload.state}` }, upload.state), ' ', timeAgo(upload.created_at)),
      upload.error && el('div', { class: 'problem' }, upload.error)));
}

function deadLetterTable(items) {
  if (!items.length) return el('p', { class: 'muted' }, 'No dead letters.');
  return el('table', { class: 'grid compact' },
    el('thead', {}, el('tr', {}, el('th', {}, 'Received'), el('th', {}, 'Topic'), el('th', {}, 'Reason'), el('th', {}, 'Size'))),
    el('tbody', {}, items.map((d) => el('tr', {},
      el('td', {}, timeAgo(d.received_at)), el('td', { class: 'mono' }, d.topic),
      el('td', {}, d.reason), el('td', { class: 'num' }, fmtBytes(d.payload_size))))));
}

function devicePage(main, ctx, id) {
  document.title = `${id} · Messina`;
  const enc = encodeURIComponent(id);
  const header = el('div', { class: 'device-head' }, el('h1', {}, id));
  const stateBox = el('div', { id: 'device-state' }, el('p', { class: 'muted' }, 'Loading…'));
  const range = el('select', { id: 'range', 'aria-label': 'Time range' },
    Object.entries(RANGES).map(([value, r]) => el('option', { value, selected: value === '24h' }, r.label)));
  const charts = el('div', { id: 'charts', class: 'charts' });
  const events = el('ol', { id: 'events', class: 'timeline' });
  const uploads = el('ul', { id: 'uploads', class: 'uploads' });
  const deadLetters = el('div', { id: 'dead-letters' });
  const alerts = el('ul', { id: 'device-alerts', class: 'alert-list', 'data-empty': 'No alerts for this device.' });
  main.append(header,
    el('div', { class: 'device-grid' },
      section('Latest state', stateBox),
      section('Alerts', alerts)),
    el('section', { class: 'card' }, el('div', { class: 'section-head' }, el('h2', {}, 'Telemetry'), range), charts),
    el('div', { class: 'device-grid' },
      section('Events', events),
      el('div', {}, section('Uploads', uploads), section('Dead letters', deadLetters))));

  const showAlert = alertListView(alerts);
  ctx.listen(alertStore.listeners, (changed) => changed.filter((a) => a.device_id === id).forEach(showAlert));

  let chartList = [];
  let generation = 0;

  async function loadCharts() {
    const mine = ++generation;
    const { ms, bucket } = RANGES[range.value];
    // Whole buckets (the range ends at the end of the current one): the server then answers
    // from its rollups alone, where a bucket cut by the range is computed from raw readings.
    const end = Math.ceil(Date.now() / BUCKET_MS[bucket]) * BUCKET_MS[bucket];
    const until = new Date(end);
    const since = new Date(end - ms);
    await Promise.all(chartList.map(async (svg) => {
      svg.setAttribute('data-loaded', 'false');
      const metric = svg.getAttribute('data-metric');
      const query = new URLSearchParams({ metric, bucket, since: since.toISOString(), until: until.toISOString() });
      const answer = await ctx.api(`/devices/${enc}/telemetry/aggregate?${query}`);
      if (mine !== generation) return;
      drawAggregate(svg, answer.buckets, { metric, unit: UNITS[metric], from: since.getTime(), to: until.getTime(), step: BUCKET_MS[bucket] });
      svg.setAttribute('data-bucket', bucket);
      svg.setAttribute('data-since', since.toISOString());
      svg.setAttribute('data-until', until.toISOString());
      svg.setAttribute('data-buckets', answer.buckets.length);
      svg.setAttribute('data-loaded', 'true');
    }));
  }

  async function loadState() {
    const state = await optional(ctx.api(`/devices/${enc}`), [404]);
    const metrics = state ? Object.keys(state.metrics).filter((name) => typeof state.metrics[name] === 'number') : [];
    if (state) {
      header.append(el('div', { class: 'head-facts' }, connectionPill(state.connection), ' last seen ', timeAgo(state.last_seen)));
      stateBox.replaceChildren(stateTable(state));
    } else {
      stateBox.replaceChildren(el('p', { class: 'muted' }, 'No telemetry from this device yet.'));
    }
    chartList = ['battery', 'rssi', ...metrics].map((metric) => svgEl('svg', {
      class: 'chart', 'data-metric': metric, 'data-loaded': 'false', viewBox: `0 0 ${CHART.width} ${CHART.height}`, role: 'img',
    }));
    charts.replaceChildren(...chartList.map((svg) => el('figure', { class: 'chart-box' }, svg)));
    await loadCharts();
  }

  async function loadRegistry() {
    const registered = await optional(ctx.api(`/registry/devices/${enc}`), [401, 403, 404]);
    if (!registered) return;
    rememberRegistered(registered);
    header.querySelector('h1').after(el('div', { class: 'registry' },
      registered.name && el('span', { class: 'name' }, registered.name),
      [...registered.labels].map((label) => el('span', { class: 'label' }, label))));
  }

  async function loadEvents() {
    const page = await ctx.api(`/devices/${enc}/events?limit=50`);
    if (!page.items.length) events.append(el('li', { class: 'muted' }, 'No events.'));
    events.append(...page.items.map(eventItem));
  }

  async function loadUploads() {
    const page = await ctx.api(`/devices/${enc}/uploads?limit=20`);
    // Listings leave the download URL out; only one upload's answer signs one.
    const detailed = await Promise.all(page.items.map((u) => (u.state === 'completed' && !u.download_url
      ? ctx.api(`/uploads/${encodeURIComponent(u.upload_id)}`)
      : u)));
    uploads.replaceChildren(...(detailed.length ? detailed.map(uploadItem) : [el('li', { class: 'muted' }, 'No uploads.')]));
  }

  async function loadDeadLetters() {
    const page = await ctx.api(`/dead-letters?${new URLSearchParams({ device: id, limit: 20 })}`);
    deadLetters.replaceChildren(deadLetterTable(page.items));
  }

  async function loadAlerts() {
    const page = await ctx.api(`/alerts?${new URLSearchParams({ device: id, state: 'all', limit: 20 })}`);
    page.items.forEach(showAlert);
  }

  range.addEventListener('change', () => loadCharts().catch(report));
  [loadState, loadRegistry, loadEvents, loadUploads, loadDeadLetters, loadAlerts].forEach((load) => load().catch(report));
}

// ---------------------------------------------------------------- pages: alerts

const SEVERITIES = ['info', 'warning', 'critical'];

async function acknowledge(alert, button) {
  button.disabled = true;
  button.textContent = 'Acknowledging…';
  try {
    const answer = await api(`/alerts/${encodeURIComponent(alert.id)}/ack`, { method: 'POST', body: { by: 'dashboard' } });
    publishAlerts([mergeAlert(answer)]);
  } catch (error) {
    button.disabled = false;
    button.textContent = 'Acknowledge';
    report(error);
  }
}

function alertRow(alert) {
  const severity = SEVERITIES.includes(alert.severity) ? alert.severity : 'info';
  const facts = [];
  if (alert.value != null) facts.push(`value ${fmtValue(alert.value)}`);
  if (alert.threshold != null) facts.push(`threshold ${fmtValue(alert.threshold)}`);
  const ack = alert.state === 'raised'
    && el('button', { type: 'button', class: 'ack', onclick: (e) => acknowledge(alert, e.currentTarget) }, 'Acknowledge');
  return el('li', {
    class: `alert severity-${severity}`,
    'data-alert-id': alert.id, 'data-state': alert.state, 'data-device': alert.device_id, 'data-rule': alert.rule,
  },
  el('div', { class: 'alert-main' },
    el('span', { class: `severity ${severity}` }, alert.severity),
    el('strong', { class: 'rule' }, alert.rule), deviceLink(alert.device_id),
    el('span', { class: `pill state-${alert.state}` }, alert.state),
    el('span', { class: 'message' }, alert.message)),
  el('div', { class: 'alert-meta muted' },
    facts.length > 0 && el('span', {}, facts.join(' · ')),
    el('span', {}, 'raised ', timeAgo(alert.raised_at)),
    alert.acked_at && el('span', {}, `acknowledged by ${alert.acked_by || '?'} `, timeAgo(alert.acked_at)),
    alert.cleared_at && el('span', {}, 'cleared ', timeAgo(alert.cleared_at))),
  ack);
}

// Shows alerts in `list`, newest raised first, one row per alert id replaced when it changes.
function alertListView(list) {
  const rows = new Map();
  return (alert) => {
    const known = rows.get(alert.id);
    if (known && STATE_RANK[known.alert.state] > STATE_RANK[alert.state]) return;
    if (known && JSON.stringify(known.alert) === JSON.stringify(alert)) return;
    const li = alertRow(alert);
    rows.set(alert.id, { li, alert });
    if (known) {
      known.li.replaceWith(li);
      return;
    }
    const raised = toMs(alert.raised_at);
    const later = [...list.children].find((child) => toMs(rows.get(child.dataset.alertId).alert.raised_at) < raised);
    list.insertBefore(li, later || null);
  };
}

function alertsPage(main, ctx) {
  document.title = 'Alerts · Messina';
  const list = el('ul', { id: 'alerts-list', class: 'alert-list', 'data-filter': 'all', 'data-empty': 'No active alerts; new ones appear here as they are raised.' });
  const filter = el('select', { id: 'alert-filter', 'aria-label': 'Show alerts in state' },
    ['all', 'raised', 'acknowledged', 'cleared'].map((state) => el('option', { value: state }, state)));
  filter.addEventListener('change', () => list.setAttribute('data-filter', filter.value));
  main.append(
    el('div', { class: 'section-head' }, el('h1', {}, 'Alerts'), filter),
    el('p', { class: 'muted' }, 'Active alerts and every transition since this page was opened, live.'),
    el('div', { class: 'card' }, list));
  const show = alertListView(list);
  alertStore.byId.forEach(show);
  ctx.listen(alertStore.listeners, (changed) => changed.forEach(show));
}

// ---------------------------------------------------------------- pages: ingest

function ingestPage(main, ctx) {
  document.title = 'Ingest · Messina';
  const rates = ratesView();
  const totals = el('p', { class: 'muted totals' });
  const chart = svgEl('svg', { class: 'chart wide', viewBox: `0 0 ${CHART.width * 2} ${CHART.height}`, role: 'img' });
  main.append(el('h1', {}, 'Ingest'),
    el('div', { class: 'card big-rates' }, rates.node, totals),
    el('section', { class: 'card' }, el('h2', {}, 'Last 5 minutes, per second'), chart));
  function update(r) {
    rates.update(r);
    totals.textContent = `Since start: ${fmtNumber(r.received_total)} received · ${fmtNumber(r.stored_total)} stored · ${fmtNumber(r.rejected_total)} rejected`;
    drawRates(chart, ingest.samples);
  }
  ctx.listen(ingest.listeners, update);
  const last = ingest.samples[ingest.samples.length - 1];
  if (last) update(last);
  else drawRates(chart, []);
}

// ---------------------------------------------------------------- charts

const CHART = { width: 560, height: 220, left: 56, right: 16, top: 30, bottom: 28 };
const TIME_STEPS = [60e3, 300e3, 600e3, 900e3, 1800e3, 3600e3, 7200e3, 10800e3, 21600e3, 43200e3, 86400e3, 172800e3, 604800e3];

function linear([d0, d1], [r0, r1]) {
  const span = d1 - d0 || 1;
  return Object.assign((v) => r0 + ((v - d0) / span) * (r1 - r0), { range: [r0, r1] });
}

function niceStep(rough) {
  const power = 10 ** Math.floor(Math.log10(rough));
  const fraction = rough / power;
  return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * power;
}

// Round ticks covering [lo, hi], about `count` of them.
function niceTicks(lo, hi, count) {
  if (lo === hi) {
    const pad = Math.abs(lo) * 0.1 || 1;
    return niceTicks(lo - pad, hi + pad, count);
  }
  const step = niceStep((hi - lo) / count);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= Math.ceil(hi / step) * step + step / 2; v += step) {
    ticks.push(Number(v.toFixed(10)));
  }
  return ticks;
}

// Times in [from, to] on round local boundaries, about `count` of them.
function timeTicks(from, to, count) {
  const step = TIME_STEPS.find((s) => s >= (to - from) / count) || TIME_STEPS[TIME_STEPS.length - 1];
  const offset = new Date(from).getTimezoneOffset() * 60e3;
  const ticks = [];
  for (let t = Math.ceil((from - offset) / step) * step + offset; t <= to; t += step) ticks.push(t);
  return { ticks, step };
}

function fmtTick(time, step) {
  const date = new Date(time);
  return step >= 86400e3
    ? date.toLocaleDateString(undefined, { month: 'short', day: 'numeric' })
    : date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
}

function drawAxes(svg, x, y, xTicks, yTicks, fmtX, fmtY) {
  const [left, right] = x.range;
  const [bottom, top] = y.range;
  svg.append(svgEl('g', { class: 'axes' },
    yTicks.map((v) => [
      svgEl('line', { class: 'grid', x1: left, x2: right, y1: y(v), y2: y(v) }),
      svgEl('text', { class: 'tick', x: left - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmtY(v)),
    ]),
    xTicks.map((t) => [
      svgEl('line', { class: 'tick-mark', x1: x(t), x2: x(t), y1: bottom, y2: bottom + 4 }),
      svgEl('text', { class: 'tick', x: x(t), y: bottom + 17, 'text-anchor': 'middle' }, fmtX(t)),
    ]),
    svgEl('line', { class: 'axis', x1: left, x2: right, y1: bottom, y2: bottom }),
    svgEl('line', { class: 'axis', x1: left, x2: left, y1: bottom, y2: top })));
}

function chartTitle(svg, text) {
  svg.append(svgEl('text', { class: 'chart-title', x: CHART.left, y: 18 }, text));
}

// Runs of buckets without a gap of more than one empty bucket, so lines do not bridge outages.
function runs(buckets, step) {
  const result = [];
  buckets.forEach((b, i) => {
    if (i === 0 || b.start_ms - buckets[i - 1].start_ms > 2 * step) result.push([]);
    result[result.length - 1].push(b);
  });
  return result;
}

function points(items, x, y) {
  return items.map(([a, b]) => `${x(a).toFixed(1)},${y(b).toFixed(1)}`).join(' ');
}

function drawAggregate(svg, buckets, { metric, unit, from, to, step }) {
  svg.replaceChildren();
  chartTitle(svg, unit ? `${metric} (${unit})` : metric);
  const width = Number(svg.viewBox.baseVal.width);
  if (!buckets.length) {
    svg.append(svgEl('text', { class: 'empty', x: width / 2, y: CHART.height / 2, 'text-anchor': 'middle' }, 'no readings in this range'));
    return;
  }
  const yTicks = niceTicks(Math.min(...buckets.map((b) => b.min)), Math.max(...buckets.map((b) => b.max)), 4);
  const x = linear([from, to], [CHART.left, width - CHART.right]);
  const y = linear([yTicks[0], yTicks[yTicks.length - 1]], [CHART.height - CHART.bottom, CHART.top]);
  const time = timeTicks(from, to, 5);
  drawAxes(svg, x, y, time.ticks, yTicks, (t) => fmtTick(t, time.step), (v) => fmtNumber(v, 2));
  for (const run of runs(buckets, step)) {
    const upper = run.map((b) => [b.start_ms, b.max]);
    const lower = run.map((b) => [b.start_ms, b.min]).reverse();
    svg.append(svgEl('polygon', { class: 'band', points: points([...upper, ...lower], x, y) }),
      svgEl('polyline', { class: 'line', points: points(run.map((b) => [b.start_ms, b.avg]), x, y) }));
  }
  svg.append(...buckets.map((b) => svgEl('circle', { class: 'point', cx: x(b.start_ms), cy: y(b.avg), r: 2.5 },
    svgEl('title', {}, `${fmtTime(b.start_ms)}\navg ${fmtNumber(b.avg, 2)} · min ${fmtNumber(b.min, 2)} · max ${fmtNumber(b.max, 2)} · ${fmtNumber(b.count)} readings`))));
}

const RATE_SERIES = [['received_per_s', 'received'], ['stored_per_s', 'stored'], ['rejected_per_s', 'rejected']];

function drawRates(svg, samples) {
  svg.replaceChildren();
  const width = Number(svg.viewBox.baseVal.width);
  const to = samples.length ? toMs(samples[samples.length - 1].at) : Date.now();
  const from = to - MAX_SAMPLES * 1000;
  const peak = Math.max(1, ...samples.flatMap((s) => RATE_SERIES.map(([field]) => s[field])));
  const yTicks = niceTicks(0, peak, 4);
  const x = linear([from, to], [CHART.left, width - CHART.right]);
  const y = linear([0, yTicks[yTicks.length - 1]], [CHART.height - CHART.bottom, CHART.top]);
  const time = timeTicks(from, to, 5);
  drawAxes(svg, x, y, time.ticks, yTicks, (t) => fmtTick(t, time.step), (v) => fmtNumber(v));
  RATE_SERIES.forEach(([field, name], i) => {
    svg.append(svgEl('polyline', { class: `line ${name}`, points: points(samples.map((s) => [toMs(s.at), s[field]]), x, y) }),
      svgEl('text', { class: `legend ${name}`, x: width - CHART.right - (RATE_SERIES.length - i) * 90, y: 18 }, `— ${name}`));
  });
  if (!samples.length) {
    svg.append(svgEl('text', { class: 'empty', x: width / 2, y: CHART.height / 2, 'text-anchor': 'middle' }, 'waiting for the first rates…'));
  }
}

// ---------------------------------------------------------------- start-up

document.addEventListener('DOMContentLoaded', () => {
  $('#login').addEventListener('submit', onLogin);
  $('#sign-out').addEventListener('click', (event) => {
    event.preventDefault();
    signOut('');
  });
  $('#error-close').addEventListener('click', hideError);
  window.addEventListener('hashchange', route);
  start();
});
