// optd dashboard: the sessions table, and for the selected session live
// charts (history from /history, then the event stream), its workers'
// staleness, its synchronous round and its config.
//
// Behind --api-key the key typed into the page is kept in localStorage and
// sent as "Authorization: Bearer KEY" on every call.  The event stream is
// read with fetch() (a ReadableStream), not EventSource, because
// EventSource cannot send that header; it reconnects with Last-Event-ID.
'use strict';
(function () {
  const TOKEN_KEY = 'optd.token';
  const HISTORY_STEPS = 2000;     // steps read back when a session is chosen
  const MAX_POINTS = 20000;       // points a chart keeps
  const REFRESH_MS = 2000;
  const SERIES = [
    ['loss', 'loss', '#d9480f'],
    ['lr', 'learning rate', '#1864ab'],
    ['grad_norm', 'gradient norm', '#2b8a3e'],
    ['update_norm', 'update norm', '#862e9c'],
  ];

  let token = localStorage.getItem(TOKEN_KEY) || '';
  let selected = null;
  let follow = null;              // AbortController of the stream
  let charts = {};
  let workers = new Map();        // worker -> {last, n}
  let step = 0;
  let dirty = false;

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function fmt(x) {
    if (x === null || x === undefined) return '–';
    if (typeof x !== 'number') return String(x);
    if (x === 0) return '0';
    const a = Math.abs(x);
    return a >= 1e4 || a < 1e-3 ? x.toExponential(3) : x.toPrecision(4);
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token) h.Authorization = 'Bearer ' + token;
    return h;
  }

  async function api(path) {
    const r = await fetch(path, { headers: headers({ Accept: 'application/json' }), cache: 'no-store' });
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
      const err = new Error(r.status + ': ' + detail);
      err.status = r.status;
      throw err;
    }
    return r.json();
  }

  function showError(msg) {
    const e = $('error');
    e.hidden = !msg;
    e.textContent = msg || '';
  }

  // ------------------------------------------------------------ sessions

  async function refreshSessions() {
    let list;
    try {
      list = (await api('/v1/sessions?limit=100')).sessions;
      showError('');
    } catch (e) {
      showError(e.status === 401 ? 'This daemon needs its API key: enter it above.' : 'Sessions: ' + e.message);
      return;
    }
    const rows = await Promise.all(list.map(async (s) => {
      try {
        const doc = await api('/v1/sessions/' + enc(s.name));
        let ws = '–';
        if (doc.mode && doc.mode.type === 'sync') {
          ws = doc.mode.workers + ' per round';
        } else {
          const h = await api('/v1/sessions/' + enc(s.name) + '/history?limit=50&after=' + Math.max(0, doc.step - 50));
          const names = new Set(h.steps.map((r) => r.worker).filter(Boolean));
          ws = names.size ? String(names.size) : '–';
        }
        return { s, doc, ws };
      } catch (e) {
        return { s, doc: null, ws: '–' };
      }
    }));
    const body = $('sessions').tBodies[0];
    body.textContent = '';
    for (const { s, doc, ws } of rows) {
      const tr = document.createElement('tr');
      tr.dataset.name = s.name;
      if (s.name === selected) tr.className = 'selected';
      const cells = [
        s.name,
        s.optimizer || '–',
        doc ? doc.step : s.step,
        doc ? fmt(doc.state ? doc.state.last_lr : doc.lr) : '–',
        doc && doc.state ? fmt(doc.state.last_loss) : '–',
        ws,
        doc && doc.mode ? doc.mode.type : '–',
        s.updated_at,
      ];
      for (const c of cells) {
        const td = document.createElement('td');
        td.textContent = String(c);
        tr.appendChild(td);
      }
      tr.addEventListener('click', () => { location.hash = '#' + enc(s.name); });
      body.appendChild(tr);
    }
    if (!selected && rows.length && !location.hash) location.hash = '#' + enc(rows[0].s.name);
    if (selected) {
      const mine = rows.find((r) => r.s.name === selected);
      if (mine && mine.doc) showDoc(mine.doc);
    }
  }

  // -------------------------------------------------------------- detail

  function makeCharts() {
    for (const [key, label, color] of SERIES) {
      const el = $('chart-' + key);
      el.textContent = '';
      el.dataset.points = '0';
      const data = [[], []];
      const u = new uPlot({
        title: label,
        width: Math.max(400, el.clientWidth - 20),
        height: 220,
        scales: { x: { time: false } },
        axes: [{ label: 'step' }, {}],
        series: [{ label: 'step' }, { label, stroke: color, width: 1.5, points: { show: false } }],
        legend: { live: true },
      }, data, el);
      charts[key] = { u, data, el };
    }
  }

  function addPoint(ev) {
    for (const [key] of SERIES) {
      const c = charts[key];
      const y = ev[key];
      const xs = c.data[0];
      if (xs.length && ev.step <= xs[xs.length - 1]) continue;
      if (key === 'loss' && (y === null || y === undefined)) continue;
      xs.push(ev.step);
      c.data[1].push(y === null ? null : y);
      if (xs.length > MAX_POINTS) { xs.shift(); c.data[1].shift(); }
    }
    if (ev.worker) {
      const w = workers.get(ev.worker) || { last: 0, n: 0 };
      w.last = Math.max(w.last, ev.step);
      w.n += 1;
      workers.set(ev.worker, w);
    }
    step = Math.max(step, ev.step);
    dirty = true;
  }

  function redraw() {
    if (dirty) {
      dirty = false;
      for (const [key] of SERIES) {
        const c = charts[key];
        if (!c) continue;
        c.u.setData(c.data);
        c.el.dataset.points = String(c.data[0].length);
      }
      const body = $('workers').tBodies[0];
      body.textContent = '';
      for (const [name, w] of [...workers.entries()].sort()) {
        const tr = document.createElement('tr');
        const stale = step - w.last;
        for (const c of [name, w.last, stale, w.n]) {
          const td = document.createElement('td');
          td.textContent = String(c);
          tr.appendChild(td);
        }
        if (stale > 10) tr.children[2].className = 'stale';
        body.appendChild(tr);
      }
    }
    requestAnimationFrame(redraw);
  }

  function showDoc(doc) {
    const cfg = {};
    for (const k of ['dtype', 'size', 'optimizer', 'schedule', 'clip', 'mode', 'nonfinite', 'metadata', 'groups']) {
      if (doc[k] !== undefined) cfg[k] = doc[k];
    }
    $('config').textContent = JSON.stringify(cfg, null, 2);
    if (doc.round) showRound(doc.round);
    else $('round').textContent = doc.mode ? 'none (mode ' + doc.mode.type + ')' : '–';
  }

  // A round from the session document or from a "round" event.
  function showRound(r) {
    const who = r.workers && r.workers.length ? ' (from ' + r.workers.join(', ') + ')' : '';
    const state = r.state && r.state !== 'open' ? ' — ' + r.state.replace('_', ' ') : '';
    $('round').textContent = 'step ' + r.step + ': ' + r.received + ' received, ' + r.awaiting + ' awaited' + who + state;
  }

  function parseEvent(block) {
    const ev = { id: null, event: 'message', data: '' };
    let any = false;
    for (const line of block.split('\n')) {
      if (!line || line[0] === ':') continue;
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
      if (field === 'id') ev.id = value;
      else if (field === 'event') ev.event = value;
      else if (field === 'data') { ev.data += (ev.data ? '\n' : '') + value; any = true; }
    }
    return any ? ev : null;
  }

  async function stream(name, lastId, ctl) {
    let last = lastId;
    while (!ctl.signal.aborted) {
      try {
        const h = headers({ Accept: 'text/event-stream' });
        if (last !== null) h['Last-Event-ID'] = String(last);
        const r = await fetch('/v1/sessions/' + enc(name) + '/events', { headers: h, signal: ctl.signal, cache: 'no-store' });
        if (!r.ok) throw new Error('HTTP ' + r.status);
        $('live').textContent = '● live';
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const ev = parseEvent(buf.slice(0, i));
            buf = buf.slice(i + 2);
            if (!ev) continue;
            if (ev.id !== null) last = ev.id;
            const d = JSON.parse(ev.data);
            if (ev.event === 'step') addPoint(d);
            else if (ev.event === 'config') showDoc(Object.assign({}, d.config, { step: d.step }));
            else if (ev.event === 'round') showRound(d);
          }
        }
        $('live').textContent = 'reconnecting…';
      } catch (e) {
        if (ctl.signal.aborted) return;
        $('live').textContent = 'reconnecting (' + e.message + ')…';
      }
      await sleep(REFRESH_MS);
    }
  }

  async function select(name) {
    if (follow) follow.abort();
    follow = null;
    selected = name;
    workers = new Map();
    step = 0;
    for (const tr of $('sessions').tBodies[0].rows) tr.className = tr.dataset.name === name ? 'selected' : '';
    if (!name) { $('detail').hidden = true; return; }
    $('detail').hidden = false;
    $('detail-name').textContent = name;
    $('live').textContent = '';
    makeCharts();
    const ctl = new AbortController();
    follow = ctl;
    let last = null;
    try {
      const doc = await api('/v1/sessions/' + enc(name));
      showDoc(doc);
      let after = Math.max(0, doc.step - HISTORY_STEPS);
      last = after;
      while (after !== null && !ctl.signal.aborted) {
        const h = await api('/v1/sessions/' + enc(name) + '/history?limit=1000&after=' + after);
        for (const row of h.steps) { addPoint(row); last = row.step; }
        after = h.next;
      }
    } catch (e) {
      showError('Session ' + name + ': ' + e.message);
      return;
    }
    if (!ctl.signal.aborted) stream(name, last, ctl);
  }

  function fromHash() {
    const name = location.hash.length > 1 ? decodeURIComponent(location.hash.slice(1)) : null;
    if (name !== selected) select(name);
  }

  async function health() {
    try {
      const r = await fetch('/healthz', { cache: 'no-store' });
      $('health').textContent = r.ok ? 'healthy' : 'unhealthy (' + r.status + ')';
    } catch (e) {
      $('health').textContent = 'unreachable';
    }
  }

  $('token').value = token;
  $('auth').addEventListener('submit', (e) => {
    e.preventDefault();
    token = $('token').value.trim();
    if (token) localStorage.setItem(TOKEN_KEY, token); else localStorage.removeItem(TOKEN_KEY);
    const name = selected;
    selected = null;
    refreshSessions().then(() => select(name || (location.hash ? decodeURIComponent(location.hash.slice(1)) : null)));
  });
  window.addEventListener('hashchange', fromHash);
  requestAnimationFrame(redraw);
  health();
  refreshSessions().then(fromHash);
  setInterval(() => { health(); refreshSessions(); }, REFRESH_MS);
})();
