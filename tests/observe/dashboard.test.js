// The dashboard in headless Chromium against a live daemon (--api-key)
// running a small training: the page asks for the key, the sessions table
// fills, chart points come from the history and then arrive live from the
// event stream, the workers' table and the config show; screenshots are
// saved.  Run by tests/observe/dashboard.sh (which installs the npm
// package into a cache directory).
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const CDP = require(path.join(process.env.OPTD_NPM_DIR, 'node_modules', 'chrome-remote-interface'));

const KEY = 'dash-k3y';
const SHOTS = process.env.OPTD_SCREENSHOTS;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let dir, optd, base, chrome, client, training, trainingStop = false;

function waitLine(proc, stream, re, ms) {
  return new Promise((resolve, reject) => {
    let buf = '';
    const t = setTimeout(() => reject(new Error('timed out waiting for ' + re + ': ' + buf)), ms);
    proc[stream].on('data', (d) => {
      buf += d.toString();
      const m = buf.match(re);
      if (m) { clearTimeout(t); resolve(m); }
    });
    proc.on('exit', (code) => { clearTimeout(t); reject(new Error('exited ' + code + ': ' + buf)); });
  });
}

async function call(method, p, body, headers) {
  const r = await fetch(base + p, {
    method,
    headers: Object.assign({ Authorization: 'Bearer ' + KEY, 'Content-Type': 'application/json' }, headers || {}),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(method + ' ' + p + ': ' + r.status + ' ' + text);
  return JSON.parse(text);
}

// Rosenbrock's gradient at (x, y).
function rosenGrad([x, y]) {
  return [-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)];
}

async function train() {
  let p = [-1.5, 2];
  let k = 0;
  while (!trainingStop) {
    const loss = (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2;
    const r = await call('POST', '/v1/sessions/rosenbrock/step', { grad: rosenGrad(p), loss },
      { 'Optd-Worker': k % 3 === 0 ? 'w2' : 'w1' });
    p = r.params;
    k++;
    await sleep(40);
  }
}

async function evaluate(expr) {
  const r = await client.Runtime.evaluate({ expression: expr, awaitPromise: true, returnByValue: true });
  if (r.exceptionDetails) throw new Error(expr + ': ' + JSON.stringify(r.exceptionDetails));
  return r.result.value;
}

async function until(expr, ms, what) {
  const end = Date.now() + ms;
  let v;
  while (Date.now() < end) {
    v = await evaluate(expr);
    if (v) return v;
    await sleep(100);
  }
  throw new Error('timed out: ' + (what || expr) + ' (last: ' + JSON.stringify(v) + ')');
}

async function screenshot(name) {
  const { data } = await client.Page.captureScreenshot({ format: 'png', captureBeyondViewport: true });
  const buf = Buffer.from(data, 'base64');
  // A PNG, and not an empty page.
  assert.equal(buf.subarray(1, 4).toString(), 'PNG');
  assert.ok(buf.length > 10000, 'screenshot of ' + buf.length + ' bytes');
  fs.writeFileSync(path.join(SHOTS, name), buf);
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'optd-dash-'));
  optd = spawn(process.env.OPTD_BIN, ['--bind', '127.0.0.1', '--port', '0', '--db', path.join(dir, 'optd.db'),
    '--api-key', KEY], { stdio: ['ignore', 'pipe', 'pipe'] });
  const m = await waitLine(optd, 'stdout', /listening on (http:\/\/127\.0\.0\.1:\d+)/, 10000);
  base = m[1];
  await call('PUT', '/v1/sessions/rosenbrock', { optimizer: { type: 'adam', lr: 0.05 }, params: [-1.5, 2] });
  await call('PUT', '/v1/sessions/beale-sync', {
    optimizer: { type: 'sgd', lr: 0.01, momentum: 0.9 }, params: [1, 1],
    mode: { type: 'sync', workers: 2, timeout_ms: 60000 },
  });
  for (let i = 0; i < 30; i++) {
    const r = await call('POST', '/v1/sessions/rosenbrock/step', { grad: rosenGrad([-1.5 + i * 0.01, 2]), loss: 100 - i },
      { 'Optd-Worker': 'w1' });
    assert.equal(r.step, i + 1);
  }
  training = train();
  chrome = spawn('chromium', ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--user-data-dir=' + path.join(dir, 'chrome'), '--remote-debugging-address=127.0.0.1',
    '--remote-debugging-port=0', '--window-size=1400,1200', 'about:blank'], { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  const w = await waitLine(chrome, 'stderr', /DevTools listening on ws:\/\/127\.0\.0\.1:(\d+)\//, 30000);
  const targets = await CDP.List({ host: '127.0.0.1', port: Number(w[1]) });
  const page = targets.find((t) => t.type === 'page');
  client = await CDP({ host: '127.0.0.1', port: Number(w[1]), target: page });
  await client.Page.enable();
  await client.Runtime.enable();
  await client.Emulation.setDeviceMetricsOverride({ width: 1400, height: 1200, deviceScaleFactor: 1, mobile: false });
});

after(async () => {
  trainingStop = true;
  if (training) await training.catch(() => {});
  if (client) await client.close().catch(() => {});
  if (chrome && chrome.exitCode === null && chrome.signalCode === null) {
    const gone = new Promise((r) => chrome.once('exit', r));
    chrome.kill('SIGTERM');
    await gone;
  }
  // Chromium's helpers (its own process group: detached) may outlive the
  // browser and keep writing the profile: stop the group, wait it out.
  if (chrome) {
    const alive = () => { try { process.kill(-chrome.pid, 0); return true; } catch { return false; } };
    for (let i = 0; i < 100 && alive(); i++) {
      try { process.kill(-chrome.pid, i < 20 ? 'SIGTERM' : 'SIGKILL'); } catch { /* gone */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(alive(), false, 'Chromium\'s processes are gone');
  }
  if (optd) {
    const code = await new Promise((r) => { optd.once('exit', (c) => r(c)); optd.kill('SIGTERM'); });
    assert.equal(code, 0, 'optd exited ' + code);
  }
  fs.rmSync(dir, { recursive: true, force: true, maxRetries: 20, retryDelay: 100 });
});

test('without the key the page says it needs one', async () => {
  await client.Page.navigate({ url: base + '/' });
  await client.Page.loadEventFired();
  const msg = await until("!document.getElementById('error').hidden && document.getElementById('error').textContent", 10000);
  assert.match(msg, /API key/);
  assert.equal(await evaluate("document.querySelectorAll('#sessions tbody tr').length"), 0);
  await screenshot('dashboard-no-key.png');
});

test('with the key typed in, the sessions table lists both sessions', async () => {
  await evaluate(`(() => { const t = document.getElementById('token'); t.value = ${JSON.stringify(KEY)};
    document.getElementById('auth').requestSubmit(); return true; })()`);
  await until("document.querySelectorAll('#sessions tbody tr').length === 2", 10000, 'two rows');
  const rows = await evaluate(`[...document.querySelectorAll('#sessions tbody tr')].map((tr) =>
    [...tr.children].map((td) => td.textContent))`);
  const byName = Object.fromEntries(rows.map((r) => [r[0], r]));
  assert.deepEqual(Object.keys(byName).sort(), ['beale-sync', 'rosenbrock']);
  assert.equal(byName.rosenbrock[1], 'adam');
  assert.ok(Number(byName.rosenbrock[2]) >= 30, 'step ' + byName.rosenbrock[2]);
  assert.equal(byName.rosenbrock[3], '0.05000');
  assert.equal(byName['beale-sync'][1], 'sgd');
  assert.equal(byName['beale-sync'][5], '2 per round');
  assert.equal(byName['beale-sync'][6], 'sync');
  // The key stays in the browser.
  assert.equal(await evaluate("localStorage.getItem('optd.token')"), KEY);
});

test('chart points come from the history, then arrive live', async () => {
  await evaluate("location.hash = '#rosenbrock'; true");
  await until("document.getElementById('live').textContent.includes('live')", 10000, 'stream live');
  const first = Number(await until("Number(document.getElementById('chart-loss').dataset.points) >= 30 && document.getElementById('chart-loss').dataset.points", 10000));
  const before = (await call('GET', '/v1/sessions/rosenbrock')).step;
  // The training goes on: more points appear without a reload.
  const later = Number(await until(`Number(document.getElementById('chart-loss').dataset.points) >= ${first + 10} && document.getElementById('chart-loss').dataset.points`, 15000, 'live points'));
  assert.ok(later >= first + 10);
  for (const k of ['lr', 'grad_norm', 'update_norm']) {
    const n = Number(await evaluate(`document.getElementById('chart-${k}').dataset.points`));
    assert.ok(n >= later - 2, k + ': ' + n + ' points, loss has ' + later);
  }
  // The charts drew (uPlot's canvases are there), the last point is a
  // recent step.
  assert.equal(await evaluate("document.querySelectorAll('#charts canvas').length"), 4);
  const lastStep = await evaluate("Number(document.querySelector('#chart-loss').dataset.points)");
  assert.ok(lastStep > 0);
  const after = (await call('GET', '/v1/sessions/rosenbrock')).step;
  assert.ok(after > before);
  // Workers and their staleness, the config.
  const workers = await until(`(() => { const r = [...document.querySelectorAll('#workers tbody tr')].map((tr) => tr.children[0].textContent);
    return r.length === 2 && r; })()`, 10000, 'two workers');
  assert.deepEqual(workers, ['w1', 'w2']);
  const cfg = JSON.parse(await evaluate("document.getElementById('config').textContent"));
  assert.equal(cfg.optimizer.type, 'adam');
  assert.equal(cfg.optimizer.lr, 0.05);
  await screenshot('dashboard-rosenbrock.png');
});

test('a config change and a sync round show up', async () => {
  await call('PATCH', '/v1/sessions/rosenbrock', { optimizer: { lr: 0.02 } });
  await until("JSON.parse(document.getElementById('config').textContent).optimizer.lr === 0.02", 10000, 'config event');
  // One of two workers sends to the sync session: the round shows it.
  const pending = fetch(base + '/v1/sessions/beale-sync/step', {
    method: 'POST', headers: { Authorization: 'Bearer ' + KEY, 'Content-Type': 'application/json', 'Optd-Worker': 'a' },
    body: JSON.stringify({ grad: [0.5, 0.5] }),
  });
  await evaluate("location.hash = '#beale-sync'; true");
  const round = await until("document.getElementById('round').textContent.includes('1 received') && document.getElementById('round').textContent", 10000, 'round');
  assert.match(round, /1 awaited/);
  assert.match(round, /from a/);
  await screenshot('dashboard-sync-round.png');
  await call('POST', '/v1/sessions/beale-sync/step', { grad: [0.5, 0.5] }, { 'Optd-Worker': 'b' });
  const r = await pending;
  assert.equal(r.status, 200);
  await until("Number(document.getElementById('chart-lr').dataset.points) === 1", 10000, 'the round\'s step charted');
});
