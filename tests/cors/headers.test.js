// CORS over real HTTP (node --test): the preflight answer of every path,
// the headers of successes, problems, streamed answers, the event stream
// and parked answers, for a listed origin, another origin, no origin,
// "*" and no --cors-origin at all; the flag's checks at start.
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { startOptd, runOptd, request, corsHeaders, list, readSpec } = require('./support.js');

const KEY = 'cors-k3y';
const PAGE = 'http://page.example:8000';
const OTHER = 'https://other.example';
const AUTH = { Authorization: 'Bearer ' + KEY };
const SPEC = readSpec();
// Headers every client may send besides the documented parameters.
const READ = ['Authorization', 'Content-Type', 'Accept', 'X-Request-Id', ...SPEC.requestHeaders];
// Response headers clients read besides the documented ones.
const EXPOSED = ['X-Request-Id', 'Retry-After', ...SPEC.responseHeaders];
// A page sees these response headers without being told (Fetch: CORS-safelisted).
const SAFELISTED = new Set(['cache-control', 'content-language', 'content-length', 'content-type', 'expires',
  'last-modified', 'pragma']);

let listed; // --cors-origin "PAGE,https://b.example" --api-key KEY
let star; // --cors-origin "*"
let none; // no --cors-origin

before(async () => {
  [listed, star, none] = await Promise.all([
    startOptd(['--cors-origin', `${PAGE}, https://B.example`, '--api-key', KEY]),
    startOptd(['--cors-origin', '*']),
    startOptd([]),
  ]);
  for (const d of [listed, star, none]) {
    const r = await request(d.url, 'PUT', '/v1/sessions/c1', { ...AUTH, 'Content-Type': 'application/json' },
      JSON.stringify({ optimizer: { type: 'sgd', lr: 0.5 }, params: [1, 2, 3] }));
    assert.equal(r.status, 201, r.body.toString());
  }
});

after(async () => {
  for (const d of [listed, star, none]) if (d) assert.equal(await d.stop(), 0, 'optd exited badly: ' + d.stderr());
});

function preflight(d, method, p, origin = PAGE, reqHeaders) {
  const h = { Origin: origin, 'Access-Control-Request-Method': method };
  if (reqHeaders) h['Access-Control-Request-Headers'] = reqHeaders;
  return request(d.url, 'OPTIONS', p, h);
}

/** The headers an answer to an allowed origin must carry. */
function assertAllowed(r, what, origin = PAGE) {
  assert.equal(r.headers['access-control-allow-origin'], origin, what + ': Allow-Origin');
  assert.ok(list(r.headers.vary).has('origin'), what + ': Vary ' + r.headers.vary);
  const exposed = list(r.headers['access-control-expose-headers']);
  for (const h of EXPOSED) assert.ok(exposed.has(h.toLowerCase()), what + ': ' + h + ' not exposed');
  // Every header the answer has is one a page can read.
  for (const h of Object.keys(r.headers)) {
    if (SAFELISTED.has(h) || h.startsWith('access-control-') || ['vary', 'date', 'connection', 'x-content-type-options',
      'content-security-policy', 'x-accel-buffering', 'transfer-encoding'].includes(h)) continue;
    assert.ok(exposed.has(h), what + ': answers ' + h + ' without exposing it');
  }
  assert.equal(r.headers['access-control-allow-credentials'], undefined, what + ': credentials');
}

function assertNoCors(r, what) {
  assert.deepEqual(corsHeaders(r), [], what + ': ' + JSON.stringify(r.headers));
}

function problem(r, status, what) {
  assert.equal(r.status, status, what + ': ' + r.body.toString());
  assert.match(r.headers['content-type'], /^application\/problem\+json/, what);
  const doc = JSON.parse(r.body.toString());
  assert.equal(doc.status, status, what);
  return doc;
}

test('a preflight from a listed origin, without the key: 204 naming the origin, the path\'s methods, every header optd reads', async () => {
  let n = 0;
  for (const [p, methods] of Object.entries(SPEC.paths)) {
    const path = p.replace('{name}', 'c1');
    const want = new Set(methods.map((m) => m.toLowerCase()));
    if (want.has('get')) want.add('head');
    for (const m of [...methods, ...(methods.includes('GET') ? ['HEAD'] : [])]) {
      const r = await preflight(listed, m, path, PAGE, 'content-type,idempotency-key,authorization');
      const what = `preflight ${m} ${path}`;
      assert.equal(r.status, 204, what + ': ' + r.body.toString());
      assert.equal(r.body.length, 0, what);
      assert.equal(r.headers['access-control-allow-origin'], PAGE, what);
      assert.ok(list(r.headers.vary).has('origin'), what);
      assert.deepEqual(list(r.headers['access-control-allow-methods']), want, what);
      const allowed = list(r.headers['access-control-allow-headers']);
      for (const h of READ) assert.ok(allowed.has(h.toLowerCase()), what + ': ' + h + ' not allowed');
      assert.ok(Number(r.headers['access-control-max-age']) > 0, what + ': Max-Age');
      assert.equal(r.headers['access-control-allow-credentials'], undefined, what);
      n++;
    }
  }
  assert.ok(n >= 20, n + ' preflights');
  // The second listed origin was given in capitals: browsers send it in
  // lower case, and it matches.
  const r = await preflight(listed, 'PUT', '/v1/sessions/c1', 'https://b.example');
  assert.equal(r.status, 204);
  assert.equal(r.headers['access-control-allow-origin'], 'https://b.example');
  // A name that is not valid still has its route's methods (the request
  // itself is answered 400, readable by the page).
  const bad = await preflight(listed, 'POST', '/v1/sessions/a%20b/step');
  assert.equal(bad.status, 204);
});

test('a preflight from an origin not listed, for a method the path lacks, or on an unknown path: no CORS headers', async () => {
  for (const origin of [OTHER, 'http://page.example', 'http://page.example:8001', 'https://page.example:8000', 'null',
    PAGE + '/']) {
    const r = await preflight(listed, 'POST', '/v1/sessions/c1/step', origin);
    const doc = problem(r, 403, origin);
    assert.equal(doc.field, 'Origin');
    assertNoCors(r, origin);
    assert.ok(list(r.headers.vary).has('origin'));
  }
  for (const [m, p] of [['GET', '/v1/sessions/c1/step'], ['POST', '/v1/sessions/c1'], ['DELETE', '/healthz'],
    ['put', '/v1/sessions/c1']]) {
    const r = await preflight(listed, m, p);
    const doc = problem(r, 403, m + ' ' + p);
    assert.equal(doc.field, 'Access-Control-Request-Method');
    assertNoCors(r, m + ' ' + p);
  }
  const r = await preflight(listed, 'GET', '/v1/nowhere');
  problem(r, 404, 'unknown path');
  assertNoCors(r, 'unknown path');
  // Nothing was changed by any of it.
  const s = await request(listed.url, 'GET', '/v1/sessions/c1', AUTH);
  assert.equal(JSON.parse(s.body).step, 0);
});

test('plain OPTIONS: 204 with Allow and no key needed; with a listed Origin it names it', async () => {
  for (const [p, methods] of Object.entries(SPEC.paths)) {
    const path = p.replace('{name}', 'c1');
    const want = new Set([...methods, 'OPTIONS', ...(methods.includes('GET') ? ['HEAD'] : [])].map((m) => m.toLowerCase()));
    const r = await request(listed.url, 'OPTIONS', path);
    assert.equal(r.status, 204, path);
    assert.deepEqual(list(r.headers.allow), want, path);
    assertNoCors(r, path);
  }
  const r = await request(listed.url, 'OPTIONS', '/v1/sessions/c1', { Origin: PAGE });
  assert.equal(r.status, 204);
  assertAllowed(r, 'plain OPTIONS');
  assert.equal(r.headers['access-control-allow-methods'], undefined);
  problem(await request(listed.url, 'OPTIONS', '/nowhere'), 404, 'OPTIONS unknown');
});

test('successes to a listed origin expose every header clients read: JSON, binary, streamed, the event stream', async () => {
  const o = { ...AUTH, Origin: PAGE };
  let r = await request(listed.url, 'PUT', '/v1/sessions/c2', { ...o, 'Content-Type': 'application/json' },
    JSON.stringify({ optimizer: { type: 'adam', lr: 0.1 }, params: [1, 2] }));
  assert.equal(r.status, 201);
  assert.equal(r.headers.location, '/v1/sessions/c2');
  assertAllowed(r, 'create');
  r = await request(listed.url, 'POST', '/v1/sessions/c2/step', { ...o, 'Content-Type': 'application/json',
    'Idempotency-Key': 'k1', 'Optd-Worker': 'w1' }, JSON.stringify({ grad: [0.5, -0.5] }));
  assert.equal(r.status, 200, r.body.toString());
  assertAllowed(r, 'JSON step');
  const g = Buffer.alloc(8);
  g.writeFloatLE(0.25, 0);
  g.writeFloatLE(0.25, 4);
  r = await request(listed.url, 'POST', '/v1/sessions/c2/step', { ...o, 'Content-Type': 'application/octet-stream',
    Accept: 'application/octet-stream', 'Optd-Loss': '1.5' }, g);
  assert.equal(r.status, 200, r.body.toString());
  assert.equal(r.headers['optd-step'], '2');
  assert.ok(r.headers['optd-params-crc32']);
  assertAllowed(r, 'binary step');
  // A replay says so in a header the page must see.
  r = await request(listed.url, 'POST', '/v1/sessions/c2/step', { ...o, 'Content-Type': 'application/json',
    'Idempotency-Key': 'k1', 'Optd-Worker': 'w1' }, JSON.stringify({ grad: [0.5, -0.5] }));
  assert.equal(r.headers['optd-replayed'], 'true');
  assertAllowed(r, 'replayed step');
  // A body of 4 MiB or more is streamed (produced while it is sent).
  r = await request(listed.url, 'PUT', '/v1/sessions/big', { ...o, 'Content-Type': 'application/json' },
    JSON.stringify({ optimizer: { type: 'sgd', lr: 0.1 }, size: 1 << 20, init: { type: 'zeros' } }));
  assert.equal(r.status, 201, r.body.toString());
  r = await request(listed.url, 'GET', '/v1/sessions/big/params', { ...o, Accept: 'application/octet-stream' });
  assert.equal(r.status, 200);
  assert.equal(r.body.length, 4 << 20);
  assertAllowed(r, 'streamed params');
  r = await request(listed.url, 'GET', '/v1/sessions/c2/events?after=0&live=false', o);
  assert.equal(r.status, 200);
  assert.match(r.headers['content-type'], /text\/event-stream/);
  assert.match(r.body.toString(), /event: step/);
  assertAllowed(r, 'event stream');
  for (const p of ['/v1/sessions', '/v1/optimizers', '/healthz', '/v1/sessions/c2/history', '/v1/sessions/c2/state',
    '/metrics', '/']) {
    r = await request(listed.url, 'GET', p, { ...o, Accept: '*/*' });
    assert.equal(r.status, 200, p + ' ' + r.body.toString().slice(0, 200));
    assertAllowed(r, 'GET ' + p);
  }
});

test('problems to a listed origin carry the same headers: 400, 401, 404, 405, 406, 409, 413, 415, 422', async () => {
  const o = { Origin: PAGE };
  const cases = [
    [400, 'PUT', '/v1/sessions/a%21', AUTH, '{}'],
    [401, 'GET', '/v1/sessions/c1', {}],
    [401, 'GET', '/v1/sessions/c1', { Authorization: 'Bearer wrong' }],
    [404, 'GET', '/v1/sessions/nobody', AUTH],
    [404, 'GET', '/v1/nowhere', AUTH],
    [405, 'POST', '/healthz', AUTH, '{}'],
    [406, 'GET', '/v1/sessions/c1', { ...AUTH, Accept: 'text/html' }],
    [409, 'PUT', '/v1/sessions/c1', { ...AUTH, 'Content-Type': 'application/json' },
      JSON.stringify({ optimizer: { type: 'adam' }, params: [1, 2, 3] })],
    [413, 'POST', '/v1/sessions/c1/step', { ...AUTH, 'Content-Type': 'application/json' }, 'x'.repeat(70 * 1024)],
    [415, 'PATCH', '/v1/sessions/c1', { ...AUTH, 'Content-Type': 'text/plain' }, '{}'],
    [422, 'POST', '/v1/sessions/c1/step', { ...AUTH, 'Content-Type': 'application/json' }, '{"grad":[1]}'],
  ];
  for (const [status, m, p, h, body] of cases) {
    const r = await request(listed.url, m, p, { ...o, ...h }, body);
    problem(r, status, `${m} ${p}`);
    assertAllowed(r, `${status} ${m} ${p}`);
    if (status === 401) assert.ok(r.headers['www-authenticate']);
    if (status === 405) assert.ok(r.headers.allow);
  }
  const s = await request(listed.url, 'GET', '/v1/sessions/c1', AUTH);
  assert.equal(JSON.parse(s.body).step, 0, 'the problems changed nothing');
});

test('an answer parked in a synchronous round carries them when its round closes', async () => {
  const o = { ...AUTH, Origin: PAGE, 'Content-Type': 'application/json' };
  let r = await request(listed.url, 'PUT', '/v1/sessions/round', o, JSON.stringify({
    optimizer: { type: 'sgd', lr: 1 }, params: [0, 0], mode: { type: 'sync', workers: 2, timeout_ms: 30000 } }));
  assert.equal(r.status, 201, r.body.toString());
  const first = request(listed.url, 'POST', '/v1/sessions/round/step', { ...o, 'Optd-Worker': 'a' }, '{"grad":[1,1]}');
  await new Promise((res) => setTimeout(res, 200));
  r = await request(listed.url, 'POST', '/v1/sessions/round/step', { ...o, 'Optd-Worker': 'b' }, '{"grad":[3,3]}');
  const a = await first;
  for (const [x, what] of [[a, 'parked'], [r, 'closing']]) {
    assert.equal(x.status, 200, what + ': ' + x.body.toString());
    assert.deepEqual(JSON.parse(x.body).params, [-2, -2]);
    assert.equal(x.headers['optd-round-size'], '2');
    assertAllowed(x, what);
  }
});

test('another origin, or none: answered as before, without Access-Control-* headers, with Vary: Origin', async () => {
  for (const h of [{ Origin: OTHER }, {}, { Origin: 'null' }]) {
    const r = await request(listed.url, 'GET', '/v1/sessions/c1', { ...AUTH, ...h });
    assert.equal(r.status, 200);
    assertNoCors(r, JSON.stringify(h));
    assert.ok(list(r.headers.vary).has('origin'));
    const e = await request(listed.url, 'GET', '/v1/sessions/nobody', { ...AUTH, ...h });
    problem(e, 404, 'other origin 404');
    assertNoCors(e, 'other origin 404');
  }
});

test('--cors-origin "*": every origin gets "*", never credentials', async () => {
  for (const origin of [PAGE, OTHER, 'http://127.0.0.1:9']) {
    let r = await preflight(star, 'POST', '/v1/sessions/c1/step', origin, 'content-type');
    assert.equal(r.status, 204);
    assert.equal(r.headers['access-control-allow-origin'], '*');
    assert.equal(r.headers['access-control-allow-methods'], 'POST');
    assert.equal(r.headers['access-control-allow-credentials'], undefined);
    r = await request(star.url, 'POST', '/v1/sessions/c1/step', { Origin: origin, 'Content-Type': 'application/json' },
      '{"grad":[0,0,0]}');
    assert.equal(r.status, 200);
    assertAllowed(r, '* step', '*');
    r = await request(star.url, 'GET', '/v1/sessions/x/params', { Origin: origin });
    problem(r, 404, '* 404');
    assertAllowed(r, '* 404', '*');
  }
  // Without an Origin: not a CORS request, no CORS headers.
  const r = await request(star.url, 'GET', '/healthz');
  assertNoCors(r, 'no origin');
  const p = await preflight(star, 'GET', '/v1/sessions/c1/step');
  problem(p, 403, '* wrong method');
  assertNoCors(p, '* wrong method');
});

test('without --cors-origin: no CORS header on any answer, every preflight refused', async () => {
  const p = await preflight(none, 'PUT', '/v1/sessions/x', PAGE, 'content-type');
  const doc = problem(p, 403, 'no flag preflight');
  assert.match(doc.detail, /--cors-origin/);
  assertNoCors(p, 'no flag preflight');
  assert.equal(p.headers.vary, undefined);
  for (const [m, path, body] of [['GET', '/v1/sessions/c1'], ['GET', '/v1/sessions/nobody'],
    ['POST', '/v1/sessions/c1/step', '{"grad":[1,1,1]}'], ['GET', '/v1/sessions/c1/events?live=false'],
    ['OPTIONS', '/v1/sessions/c1']]) {
    const r = await request(none.url, m, path, { Origin: PAGE, 'Content-Type': 'application/json' }, body);
    assert.ok(r.status < 500, m + ' ' + path);
    assertNoCors(r, m + ' ' + path);
    assert.equal(r.headers.vary, undefined, m + ' ' + path);
  }
  const s = await request(none.url, 'GET', '/v1/sessions/x');
  assert.equal(s.status, 404, 'the refused preflight created nothing');
});

test('OPTD_CORS_ORIGIN is the flag\'s twin; a list that is not one of origins stops optd at start', async () => {
  const d = await startOptd([], { OPTD_CORS_ORIGIN: OTHER });
  try {
    let r = await preflight(d, 'GET', '/v1/sessions', OTHER);
    assert.equal(r.status, 204);
    assert.equal(r.headers['access-control-allow-origin'], OTHER);
    r = await preflight(d, 'GET', '/v1/sessions', PAGE);
    assert.equal(r.status, 403);
  } finally {
    assert.equal(await d.stop(), 0);
  }
  // The flag wins over the variable.
  const d2 = await startOptd(['--cors-origin', PAGE], { OPTD_CORS_ORIGIN: OTHER });
  try {
    assert.equal((await preflight(d2, 'GET', '/v1/sessions', PAGE)).status, 204);
    assert.equal((await preflight(d2, 'GET', '/v1/sessions', OTHER)).status, 403);
  } finally {
    assert.equal(await d2.stop(), 0);
  }
  const bad = [
    ['http://a.example/', /no path/],
    ['http://a.example/app', /no path/],
    ['a.example', /scheme:\/\/host/],
    ['http://', /needs a host/],
    ['http://a.example:0', /port/],
    ['http://a.example:65536', /port/],
    ['null', /null/],
    ['*,http://a.example', /list no others/],
    ['http://a.example,,http://b.example', /empty entry/],
    ['http://a.example,', /empty entry/],
    ['http://[::1', /IPv6/],
    ['https://*.example', /no wildcards/],
  ];
  for (const [v, re] of bad) {
    let r = await runOptd(['--cors-origin', v, '--port', '0', '--db', '/nonexistent/never/optd.db']);
    assert.equal(r.code, 2, v + ': ' + r.stderr);
    assert.match(r.stderr, re, v);
    r = await runOptd(['--port', '0', '--db', '/nonexistent/never/optd.db'], { OPTD_CORS_ORIGIN: v });
    assert.equal(r.code, 2, 'env ' + v + ': ' + r.stderr);
  }
});
