// Typed errors from the daemon's problem+json answers, idempotent steps,
// accumulation (202), and retries through a fault-injecting proxy.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { Client, OptdError } from '../optd.js';
import { SLOW, startDaemon } from './daemon.js';
import { startProxy } from './proxy.js';

let d;
let c;
before(async () => {
  d = await startDaemon();
  c = new Client(d.url);
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

/** assert.rejects with an OptdError of these fields. */
async function rejectsWith(promise, fields) {
  let err;
  try {
    await promise;
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof OptdError, `want OptdError, got ${err}`);
  for (const [k, v] of Object.entries(fields)) assert.equal(err[k], v, `${k} of ${err.message}`);
  assert.equal(typeof err.title, 'string');
  assert.equal(typeof err.detail, 'string');
  return err;
}

/** A fetch that counts the attempts a client makes. */
function counting() {
  const calls = [];
  return {
    calls,
    fetch: (url, init) => {
      calls.push(`${init.method} ${new URL(url).pathname} ${init.headers['Idempotency-Key'] ?? ''}`);
      return fetch(url, init);
    },
  };
}

const FAST = { backoffMs: 5, maxBackoffMs: 20 };

describe('errors', () => {
  test('404: no such session', async () => {
    await rejectsWith(c.session('missing').info(), {
      status: 404,
      type: 'urn:optd:problem:not-found',
      field: 'name',
      step: null,
    });
    await rejectsWith(c.session('missing').step([1]), { status: 404, field: 'name' });
    await rejectsWith(c.session('missing').delete(), { status: 404 });
  });

  test('409: a different config under the same name', async () => {
    await c.createSession('conflict', { optimizer: { type: 'adam', lr: 1e-3 }, size: 4, init: { type: 'zeros' } });
    const e = await rejectsWith(
      c.createSession('conflict', { optimizer: { type: 'adam', lr: 1e-2 }, size: 4, init: { type: 'zeros' } }),
      { status: 409, type: 'urn:optd:problem:conflict', field: null },
    );
    assert.match(e.message, /^optd 409 Conflict: /);
  });

  test('422: a gradient or params of the wrong length, JSON and binary', async () => {
    const s = await c.createSession('length', { optimizer: { type: 'sgd', lr: 1 }, params: [1, 2, 3] });
    await rejectsWith(s.step([1, 2], { json: true }), { status: 422, type: 'urn:optd:problem:unprocessable', field: 'grad' });
    await rejectsWith(s.step([1, 2, 3, 4], { json: false }), { status: 422, field: 'grad' });
    await rejectsWith(s.setParams([1, 2], { json: true }), { status: 422, field: 'params' });
    await rejectsWith(s.setParams([1, 2], { json: false }), { status: 422, field: 'params' });
    assert.equal((await s.info()).step, 0, 'nothing was applied');
  });

  test('422: NaN in a gradient when nonfinite is "error"', async () => {
    const s = await c.createSession('nan', { optimizer: { type: 'sgd', lr: 1 }, params: [1, 2] });
    await rejectsWith(s.step([1, Infinity]), { status: 422, field: 'grad' });
    await assert.rejects(s.step([NaN, 1], { json: true }), RangeError, 'JSON cannot carry NaN');
    assert.equal((await s.info()).counters.applied, 0);
  });

  test('400: unknown optimizer, bad hyperparameter, bad option', async () => {
    await rejectsWith(c.createSession('bad', { optimizer: { type: 'adamax2' }, size: 2 }), {
      status: 400,
      type: 'urn:optd:problem:bad-request',
      field: 'optimizer.type',
    });
    await rejectsWith(c.createSession('bad', { optimizer: { type: 'adam', lr: -1 }, size: 2 }), {
      status: 400,
      field: 'optimizer.lr',
    });
    await rejectsWith(c.createSession('bad', { optimizer: 'adam', size: 2, dtype: 'float16' }), {
      status: 400,
      field: 'dtype',
    });
    const s = await c.createSession('patch-bad', { optimizer: { type: 'sgd', lr: 1 }, params: [0] });
    await rejectsWith(s.update({ optimizer: { momentum: -0.5 } }), { status: 400, field: 'optimizer.momentum' });
    await rejectsWith(s.step([1], { worker: '' }), { status: 400, field: 'worker' });
  });

  test('409: a stale gradient carries the session step', async () => {
    const s = await c.createSession('stale', {
      optimizer: { type: 'sgd', lr: 1 },
      params: [0],
      mode: { type: 'async', max_staleness: 1 },
    });
    for (let i = 0; i < 3; i++) await s.step([1], { baseStep: i });
    await rejectsWith(s.step([1], { baseStep: 1 }), { status: 409, field: 'base_step', step: 3 });
    await rejectsWith(s.step([1], { baseStep: 1, json: false }), { status: 409, step: 3 });
    await rejectsWith(s.step([1], { baseStep: 9 }), { status: 409, step: 3 });
    assert.equal((await s.info()).counters.rejected_stale, 2);
  });

  test('local checks: session names, URLs', () => {
    for (const bad of ['', '..', '.', 'a/b', 'a b', 'x'.repeat(129)]) assert.throws(() => c.session(bad), TypeError, bad);
    assert.throws(() => new Client('127.0.0.1:8080'), TypeError);
    assert.equal(new Client('http://h:1///').url, 'http://h:1');
  });

  for (const json of [true, false]) {
    test(`the same Idempotency-Key twice applies once (${json ? 'JSON' : 'binary'})`, async () => {
      const s = await c.createSession(`idem-${json}`, { optimizer: { type: 'sgd', lr: 1, momentum: 0.5 }, params: [10, 20] });
      const key = `key-${json}-1`;
      const a = await s.stepResult([1, 2], { idempotencyKey: key, json, loss: 1 });
      const b = await s.stepResult([1, 2], { idempotencyKey: key, json, loss: 1 });
      assert.equal(a.replayed, false);
      assert.equal(b.replayed, true);
      assert.equal(a.step, 1);
      assert.equal(b.step, 1);
      assert.equal(b.lr, 1);
      assert.deepEqual(Array.from(b.params), Array.from(a.params));
      assert.deepEqual(Array.from(a.params), [9, 18]);
      const i = await s.info();
      assert.equal(i.step, 1);
      assert.equal(i.counters.applied, 1);
      assert.equal((await s.history()).length, 1);
      // A new key is a new step.
      const n = await s.stepResult([1, 2], { json });
      assert.equal(n.step, 2);
      assert.deepEqual(Array.from(n.params), [7.5, 15]);
    });
  }

  test('every step sends a fresh key', async () => {
    const k = counting();
    const cc = new Client(d.url, { fetch: k.fetch });
    const s = await cc.createSession('keys', { optimizer: { type: 'sgd', lr: 1 }, params: [0] });
    await s.step([1]);
    await s.step([1], { json: false });
    const keys = k.calls.filter((x) => x.startsWith('POST')).map((x) => x.split(' ')[2]);
    assert.equal(keys.length, 2);
    assert.notEqual(keys[0], keys[1]);
    for (const key of keys) assert.match(key, /^[0-9a-f-]{32,36}$/);
  });

  test('accumulate: 202 until the K-th gradient, then the mean is applied', async () => {
    const s = await c.createSession('accum', {
      optimizer: { type: 'sgd', lr: 0.5 },
      params: [1, 1],
      dtype: 'float64',
      mode: { type: 'async', accumulate: 3 },
    });
    const r1 = await s.stepResult([1, 2], { json: true });
    assert.equal(r1.status, 202);
    assert.equal(r1.pending, 1);
    assert.equal(r1.step, 0);
    assert.equal(r1.lr, null);
    assert.deepEqual(Array.from(r1.params), [1, 1], 'params do not move yet');
    assert.equal(s.lastStep, 0);
    assert.equal(s.lastLr, null);
    const r2 = await s.stepResult([2, 4], { json: false });
    assert.equal(r2.status, 202);
    assert.equal(r2.pending, 2);
    assert.deepEqual(Array.from(r2.params), [1, 1]);
    assert.equal((await s.info()).state.pending_accumulation, 2);
    const p = await s.step([3, 6]);
    assert.deepEqual(Array.from(p), [0, -1], 'p - lr * mean(g)');
    assert.equal(s.lastStep, 1);
    assert.equal(s.lastLr, 0.5);
    assert.equal(await s.step([1, 1], { params: false }), null, 'a 202 without params');
    assert.equal(s.lastStep, 1);
  });

  test('a real 503 (the database write lock is held) is retried and applied once', async () => {
    const k = counting();
    const s = await new Client(d.url, { retries: 8, backoffMs: 50, maxBackoffMs: 500, fetch: k.fetch }).createSession('busy', {
      optimizer: { type: 'sgd', lr: 1 },
      params: [0, 0],
    });
    // Another SQLite connection takes the write lock: the daemon's commit
    // waits out its busy timeout, answers 503 and applies nothing.
    const lock = spawn('sqlite3', [join(d.dir, 'optd.db')], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lockExit = new Promise((res) => lock.once('exit', res));
    let out = '';
    lock.stdout.setEncoding('utf8');
    await new Promise((res, rej) => {
      lock.once('error', rej);
      lock.stdout.on('data', (x) => {
        out += x;
        if (out.includes('locked')) res();
      });
      lock.stdin.write("BEGIN IMMEDIATE;\nSELECT 'locked';\n");
    });
    const before503 = d.stderr().split('committing the step').length;
    const answer = s.stepResult([1, 1]);
    const deadline = Date.now() + 30000;
    while (d.stderr().split('committing the step').length === before503) {
      assert.ok(Date.now() < deadline, 'the daemon never answered 503');
      await new Promise((r) => setTimeout(r, 20));
    }
    lock.stdin.end('ROLLBACK;\n');
    assert.equal(await lockExit, 0);
    const r = await answer;
    assert.equal(r.step, 1);
    assert.equal(r.replayed, false, 'the 503 attempt left no record');
    const posts = k.calls.filter((x) => x.startsWith('POST'));
    assert.ok(posts.length >= 2, 'retried');
    assert.equal(new Set(posts).size, 1, 'with one key');
    assert.deepEqual(Array.from(r.params), [-1, -1]);
    const i = await s.info();
    assert.equal(i.step, 1);
    assert.equal(i.counters.applied, 1);
  });

  describe('retries', () => {
    let proxy;
    before(async () => {
      proxy = await startProxy(d.url);
    });
    after(async () => {
      assert.equal(proxy.pending(), 0, 'every fault met the request it was queued for');
      await proxy.close();
    });

    const client = (o = {}) => new Client(proxy.url, { ...FAST, ...o });

    test('a lost answer is retried with the same key and applied once', async () => {
      const k = counting();
      const s = await client({ fetch: k.fetch }).createSession('lost', { optimizer: { type: 'sgd', lr: 1 }, params: [5], dtype: 'float64' });
      k.calls.length = 0;
      proxy.inject('drop');
      const r = await s.stepResult([2], { loss: 1 });
      assert.equal(k.calls.length, 2, 'one retry');
      assert.equal(k.calls[0], k.calls[1], 'same request, same key');
      assert.equal(r.replayed, true, 'the daemon had applied the first attempt');
      assert.equal(r.step, 1);
      assert.deepEqual(Array.from(r.params), [3]);
      const i = await c.session('lost').info();
      assert.equal(i.step, 1);
      assert.equal(i.counters.applied, 1);
    });

    test('a lost binary answer too', async () => {
      const s = await client().createSession('lost-bin', { optimizer: { type: 'sgd', lr: 1 }, params: [5, 6] });
      proxy.inject('drop', 'drop');
      const r = await s.stepResult([1, 1], { json: false });
      assert.equal(r.replayed, true);
      assert.equal(r.step, 1);
      assert.deepEqual(Array.from(r.params), [4, 5]);
      assert.equal((await c.session('lost-bin').info()).counters.applied, 1);
    });

    test('503 and connection resets are retried', async () => {
      const k = counting();
      const s = await client({ fetch: k.fetch }).createSession('flaky', { optimizer: { type: 'sgd', lr: 1 }, params: [0] });
      k.calls.length = 0;
      proxy.inject('503', 'reset', '503');
      const r = await s.stepResult([1]);
      assert.equal(k.calls.length, 4);
      assert.equal(new Set(k.calls).size, 1, 'one key across the retries');
      assert.equal(r.replayed, false, 'no attempt reached the daemon before');
      assert.equal(r.step, 1);
      assert.equal((await c.session('flaky').info()).counters.applied, 1);
    });

    test('a hung attempt times out and is retried', async () => {
      // Long enough for a loaded machine to answer the attempt that is not hung.
      const timeoutMs = SLOW ? 5000 : 1000;
      const s = await client({ timeoutMs }).createSession('hang', { optimizer: { type: 'sgd', lr: 1 }, params: [0] });
      proxy.inject('hang');
      const t0 = Date.now();
      const p = await s.step([1]);
      assert.ok(Date.now() - t0 >= timeoutMs);
      assert.deepEqual(Array.from(p), [-1]);
    });

    test('retries are bounded: status 0 after retries + 1 attempts', async () => {
      const k = counting();
      const cc = client({ fetch: k.fetch, retries: 2 });
      proxy.inject('reset', 'reset', 'reset');
      await assert.rejects(cc.session('anything').info(), (e) => {
        assert.ok(e instanceof OptdError);
        assert.equal(e.status, 0);
        assert.equal(e.type, null);
        assert.match(e.detail, /GET \/v1\/sessions\/anything/);
        assert.ok(e.cause, 'the network error is kept');
        return true;
      });
      assert.equal(k.calls.length, 3);
      proxy.inject('503', '503');
      await rejectsWith(client({ retries: 1 }).health(), { status: 503, type: 'urn:optd:problem:unavailable' });
    });

    test('timeouts give up with status 0 when retries run out', async () => {
      proxy.inject('hang');
      await assert.rejects(client({ timeoutMs: 200, retries: 0 }).health(), (e) => e instanceof OptdError && e.status === 0 && /timed out after 200 ms/.test(e.detail));
    });

    test('4xx answers are not retried', async () => {
      const k = counting();
      await rejectsWith(client({ fetch: k.fetch }).session('nope').info(), { status: 404 });
      assert.equal(k.calls.length, 1);
    });

    test('a delete whose answer was lost still succeeds', async () => {
      const s = await client().createSession('del-lost', { optimizer: 'adam', size: 1, init: { type: 'zeros' } });
      proxy.inject('drop');
      await s.delete();
      await rejectsWith(c.session('del-lost').info(), { status: 404 });
    });
  });
});
