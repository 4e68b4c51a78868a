// clients/js/optd.js in headless Chromium, from a page of another origin
// (a static server on another 127.0.0.1 port serving tests/cors/page.html
// and the client), against daemons with and without --cors-origin.  The
// page creates two sessions (3 params: JSON bodies; 300: binary bodies
// whose step travels in exposed headers) and steps them once; the test
// checks what the page saw and what the daemon holds.  Run by
// tests/cors/browser.sh (which installs chrome-remote-interface from npm
// into a cache directory).
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const { REPO, startOptd, request } = require('./support.js');
const CDP = require(path.join(process.env.OPTD_NPM_DIR, 'node_modules', 'chrome-remote-interface'));

const KEY = 'br0wser-key';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let dir, pages, pageOrigin, chrome, client;

// The page's origin serves only these files.
const FILES = {
  '/page.html': [path.join(__dirname, 'page.html'), 'text/html; charset=utf-8'],
  '/optd.js': [path.join(REPO, 'clients/js/optd.js'), 'text/javascript; charset=utf-8'],
  '/classic.html': [path.join(__dirname, 'classic.html'), 'text/html; charset=utf-8'],
};

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

async function evaluate(expr) {
  const r = await client.Runtime.evaluate({ expression: expr, awaitPromise: true, returnByValue: true });
  if (r.exceptionDetails) throw new Error(expr + ': ' + JSON.stringify(r.exceptionDetails));
  return r.result.value;
}

/** Loads the page against daemon url; resolves to its optdResult. */
async function runPage(url, name, key) {
  const q = new URLSearchParams({ daemon: url, name });
  if (key) q.set('key', key);
  await client.Page.navigate({ url: `${pageOrigin}/page.html?${q}` });
  const end = Date.now() + 30000;
  while (Date.now() < end) {
    const v = await evaluate('window.optdResult && window.optdResult.done && JSON.stringify(window.optdResult)');
    if (v) return JSON.parse(v);
    await sleep(100);
  }
  throw new Error('the page did not finish: ' + (await evaluate('document.body.innerText')));
}

// SGD, lr 0.5, params 1..n, gradient (i % 4) / 4: every value is exact in float32.
function expected(n) {
  return Array.from({ length: n }, (_, i) => i + 1 - 0.5 * ((i % 4) / 4));
}

/** The page made both sessions and stepped them once; the daemon agrees. */
async function assertTrained(d, r, name, key) {
  assert.equal(r.ok, true, JSON.stringify(r));
  for (const [part, session, n] of [['json', name, 3], ['binary', name + '-bin', 300]]) {
    const p = r[part];
    assert.equal(p.created, true, part);
    assert.equal(p.step, 1, part + ': the step the page read');
    assert.equal(p.lastStep, 1, part);
    assert.equal(p.lr, 0.5, part + ': the lr the page read');
    assert.deepEqual(p.params, expected(n), part + ': params the step answered');
    assert.deepEqual(p.back, expected(n), part + ': params read back');
    const h = key ? { Authorization: 'Bearer ' + key } : {};
    const s = await request(d.url, 'GET', '/v1/sessions/' + session, h);
    assert.equal(s.status, 200, session);
    assert.equal(JSON.parse(s.body).step, 1, session + ': step in the daemon');
    const q = await request(d.url, 'GET', `/v1/sessions/${session}/params`, h);
    assert.deepEqual(JSON.parse(q.body).params, expected(n), session + ': params in the daemon');
  }
  assert.equal(r.visible['Optd-Step'], '1');
  assert.match(r.visible['Optd-Params-Crc32'], /^[0-9a-f]{8}$/);
  assert.equal(r.visible['Optd-Dtype'], 'float32');
  assert.match(r.visible['X-Request-Id'], /./);
}

/** The browser refused: a fetch TypeError, and nothing in the daemon. */
async function assertBlocked(d, r, name, key) {
  assert.equal(r.ok, false, JSON.stringify(r));
  assert.equal(r.error, 'OptdError');
  assert.equal(r.status, 0, 'no answer reached the page');
  assert.equal(r.kind, 'connection_failed');
  assert.equal(r.cause, 'TypeError', 'fetch rejected: ' + r.message);
  // Chromium's word for a request that CORS refused (no detail reaches
  // the page).
  assert.match(r.message, /Failed to fetch/);
  const h = key ? { Authorization: 'Bearer ' + key } : {};
  for (const s of [name, name + '-bin']) {
    const g = await request(d.url, 'GET', '/v1/sessions/' + s, h);
    assert.equal(g.status, 404, s + ' must not exist');
  }
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'optd-cors-browser-'));
  pages = http.createServer((req, res) => {
    const f = FILES[new URL(req.url, 'http://x').pathname];
    if (!f) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { 'Content-Type': f[1], 'Cache-Control': 'no-store' });
    res.end(fs.readFileSync(f[0]));
  });
  await new Promise((r) => pages.listen(0, '127.0.0.1', r));
  pageOrigin = 'http://127.0.0.1:' + pages.address().port;
  chrome = spawn('chromium', ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--user-data-dir=' + path.join(dir, 'chrome'), '--remote-debugging-address=127.0.0.1',
    '--remote-debugging-port=0', 'about:blank'], { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  const w = await waitLine(chrome, 'stderr', /DevTools listening on ws:\/\/127\.0\.0\.1:(\d+)\//, 30000);
  const targets = await CDP.List({ host: '127.0.0.1', port: Number(w[1]) });
  client = await CDP({ host: '127.0.0.1', port: Number(w[1]), target: targets.find((t) => t.type === 'page') });
  await client.Page.enable();
  await client.Runtime.enable();
});

after(async () => {
  if (client) await client.close().catch(() => {});
  if (chrome && chrome.exitCode === null && chrome.signalCode === null) {
    const gone = new Promise((r) => chrome.once('exit', r));
    process.kill(chrome.pid, 'SIGTERM');
    await gone;
  }
  // Chromium runs in a process group of its own (detached): its helper
  // processes (renderers, zygote, crash handler) may outlive the browser
  // and keep writing its profile.  Stop the whole group and wait until no
  // process of it is left, then remove the profile.
  if (chrome) {
    const alive = () => { try { process.kill(-chrome.pid, 0); return true; } catch { return false; } };
    for (let i = 0; i < 100 && alive(); i++) {
      try { process.kill(-chrome.pid, i < 20 ? 'SIGTERM' : 'SIGKILL'); } catch { /* gone */ }
      await sleep(100);
    }
    assert.equal(alive(), false, 'Chromium\'s processes are gone');
  }
  if (pages) await new Promise((r) => pages.close(r));
  fs.rmSync(dir, { recursive: true, force: true, maxRetries: 20, retryDelay: 100 });
});

test('with --cors-origin naming the page\'s origin, the page trains through the JS client', async () => {
  const d = await startOptd(['--cors-origin', `https://elsewhere.example,${pageOrigin}`]);
  try {
    const r = await runPage(d.url, 'listed');
    await assertTrained(d, r, 'listed');
    // A classic script loads the module with import() (clients/js/README.md).
    await client.Page.navigate({ url: `${pageOrigin}/classic.html` });
    let c;
    for (let i = 0; i < 100 && !(c && c.done); i++) {
      await sleep(100);
      c = await evaluate('window.optdClassic');
    }
    assert.deepEqual(c, { done: true, client: 'function', session: 'function' });
  } finally {
    assert.equal(await d.stop(), 0);
  }
});

test('without --cors-origin the browser blocks the page: a fetch TypeError, no session', async () => {
  const log = path.join(dir, 'none.log');
  const d = await startOptd(['--access-log', log]);
  try {
    const r = await runPage(d.url, 'none');
    await assertBlocked(d, r, 'none');
    // The browser asked (a preflight, refused) and sent nothing else.
    const lines = fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const fromPage = lines.filter((l) => !(l.method === 'GET' && l.status === 404));
    assert.ok(fromPage.some((l) => l.method === 'OPTIONS' && l.status === 403), JSON.stringify(lines));
    assert.ok(!fromPage.some((l) => l.method === 'PUT'), 'a PUT reached the daemon: ' + JSON.stringify(lines));
  } finally {
    assert.equal(await d.stop(), 0);
  }
});

test('with --cors-origin naming another origin the browser blocks the page', async () => {
  // localhost and 127.0.0.1 are different origins, as are other ports.
  const port = Number(new URL(pageOrigin).port);
  const d = await startOptd(['--cors-origin', `http://localhost:${port},http://127.0.0.1:${port + 1}`]);
  try {
    await assertBlocked(d, await runPage(d.url, 'other'), 'other');
  } finally {
    assert.equal(await d.stop(), 0);
  }
});

test('with --cors-origin "*" the page trains', async () => {
  const d = await startOptd(['--cors-origin', '*']);
  try {
    await assertTrained(d, await runPage(d.url, 'star'), 'star');
  } finally {
    assert.equal(await d.stop(), 0);
  }
});

test('with --api-key the page sends the Bearer key; the preflight passes without it; a wrong key reads as 401', async () => {
  const log = path.join(dir, 'key.log');
  const d = await startOptd(['--cors-origin', pageOrigin, '--api-key', KEY, '--access-log', log]);
  try {
    await assertTrained(d, await runPage(d.url, 'keyed', KEY), 'keyed', KEY);
    const lines = fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    // Preflights were answered 204 (before authentication), and no request
    // of the page was refused 401.
    assert.ok(lines.some((l) => l.method === 'OPTIONS' && l.status === 204), JSON.stringify(lines));
    assert.ok(!lines.some((l) => l.status === 401), JSON.stringify(lines));
    // The wrong key: the daemon's 401 problem reaches the page, readable.
    const r = await runPage(d.url, 'wrongkey', 'not-' + KEY);
    assert.equal(r.ok, false);
    assert.equal(r.error, 'OptdError');
    assert.equal(r.status, 401, JSON.stringify(r));
    assert.equal(r.kind, 'unauthorized');
    assert.match(r.message, /API key/);
    const g = await request(d.url, 'GET', '/v1/sessions/wrongkey', { Authorization: 'Bearer ' + KEY });
    assert.equal(g.status, 404);
    // And without any key: 401 too, not a blocked request.
    const n = await runPage(d.url, 'nokey');
    assert.equal(n.status, 401, JSON.stringify(n));
  } finally {
    assert.equal(await d.stop(), 0);
  }
});
