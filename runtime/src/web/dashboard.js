// The dashboard: polls /dashboard.json (the counters /metrics exposes, read when asked)
// and shows them. Counters are totals since the server started; rates are the change
// between two snapshots divided by the change of the server's own `uptime_seconds`, so
// a slow poll never inflates them. Plain DOM, nothing loaded from elsewhere; text is
// only ever set with textContent.
'use strict';

const $ = (id) => document.getElementById(id);

/** How often the numbers are read. Each poll starts after the previous one ended. */
const POLL_MS = 1000;

/** The previous snapshot, for rates. */
let previous = null;

async function poll() {
  try {
    const response = await fetch('/dashboard.json', { cache: 'no-store' });
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}`);
    }
    const snapshot = await response.json();
    render(snapshot, previous);
    previous = snapshot;
    setStatus('ok', `updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setStatus('error', `cannot read /dashboard.json: ${err.message}`);
  }
  setTimeout(poll, POLL_MS);
}

/** Change per second of `pick(x)` between two snapshots; null without an earlier one. */
function rate(now, before, pick) {
  if (!before) {
    return null;
  }
  const seconds = now.uptime_seconds - before.uptime_seconds;
  const delta = pick(now) - pick(before);
  // A reload never lowers a counter (they belong to the name), but a restart does.
  return seconds > 0 && delta >= 0 ? delta / seconds : null;
}

function sum(addons, field) {
  return addons.reduce((total, addon) => total + addon[field], 0);
}

/** The row of addon `name` in snapshot `s`, if it is listed there. */
function addonIn(s, name) {
  return s && s.addons.find((addon) => addon.name === name);
}

function render(now, before) {
  const addons = now.addons;
  $('total-open').textContent = sum(addons, 'open_connections');
  $('total-hibernated').textContent = sum(addons, 'hibernated_connections');
  $('instances').textContent = `${sum(addons, 'live_instances')} / ${now.instance_slots}`;
  $('total-in-rate').textContent = showRate(rate(now, before, (s) => sum(s.addons, 'messages_in_total')));
  $('total-out-rate').textContent = showRate(rate(now, before, (s) => sum(s.addons, 'messages_out_total')));
  $('uptime').textContent = showDuration(now.uptime_seconds);

  const rows = addons.map((addon) => {
    const earlier = addonIn(before, addon.name);
    const since = earlier ? { ...before, addons: [earlier] } : null;
    const one = (field) => (s) => s.addons[0][field];
    const row = tableRow([
      ['name', addon.mounted ? addon.name : `${addon.name} (removed; draining)`],
      ['version', addon.version ?? '–'],
      ['open_connections', addon.open_connections],
      ['live_instances', addon.live_instances],
      ['hibernated_connections', addon.hibernated_connections],
      ['messages_in_rate', showRate(rate({ ...now, addons: [addon] }, since, one('messages_in_total')))],
      ['messages_out_rate', showRate(rate({ ...now, addons: [addon] }, since, one('messages_out_total')))],
      ['connections_total', addon.connections_total],
      ['messages_in_total', addon.messages_in_total],
      ['messages_out_total', addon.messages_out_total],
      ['failures', showFailures(addon.failures)],
    ]);
    row.dataset.addon = addon.name;
    return row;
  });
  if (rows.length === 0) {
    rows.push(placeholder('no addons mounted', 11));
  }
  $('addons').replaceChildren(...rows);

  // Only the kinds that happened; every kind is in the JSON (and in /metrics).
  const failures = Object.entries(now.failures).filter(([, count]) => count > 0);
  const failureRows = failures.map(([kind, count]) => {
    const row = tableRow([['kind', kind], ['count', count]]);
    row.dataset.kind = kind;
    return row;
  });
  if (failureRows.length === 0) {
    failureRows.push(placeholder('none yet', 2));
  }
  $('failures').replaceChildren(...failureRows);
}

/** A table row of [field, value] cells; numbers are right-aligned. */
function tableRow(cells) {
  const row = document.createElement('tr');
  for (const [field, value] of cells) {
    const cell = document.createElement('td');
    cell.dataset.field = field;
    cell.textContent = String(value);
    if (typeof value === 'number' || /_rate$/.test(field)) {
      cell.className = 'num';
    }
    row.append(cell);
  }
  return row;
}

/** A row with one cell across the table, for an empty list. */
function placeholder(text, columns) {
  const row = tableRow([['note', text]]);
  row.firstElementChild.colSpan = columns;
  return row;
}

function showFailures(failures) {
  const happened = Object.entries(failures).filter(([, count]) => count > 0);
  return happened.length === 0 ? '–' : happened.map(([kind, count]) => `${kind} ${count}`).join(', ');
}

function showRate(value) {
  if (value === null) {
    return '–';
  }
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function showDuration(seconds) {
  const s = Math.floor(seconds);
  const [d, h, m] = [Math.floor(s / 86400), Math.floor((s % 86400) / 3600), Math.floor((s % 3600) / 60)];
  return d > 0 ? `${d}d ${h}h` : h > 0 ? `${h}h ${m}m` : m > 0 ? `${m}m ${s % 60}s` : `${s}s`;
}

function setStatus(stateName, text) {
  const status = $('status');
  status.dataset.state = stateName;
  status.textContent = text;
}

poll();
