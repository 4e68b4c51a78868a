// Every method of Client and Session against a real daemon.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, OptdError, Session } from '../optd.js';
import { startDaemon } from './daemon.js';

let d;
let c;
before(async () => {
  d = await startDaemon();
  c = new Client(d.url);
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

// The daemon computes float32 updates in float32: mirror that.
const f = Math.fround;

describe('client', () => {
  test('health and optimizers', async () => {
    assert.equal((await c.health()).status, 'ok');
    const cat = await c.optimizers();
    const types = cat.optimizers.map((o) => o.type);
    for (const t of ['sgd', 'adam', 'adamw', 'adagrad', 'rmsprop']) assert.ok(types.includes(t), t);
    const sgd = cat.optimizers.find((o) => o.type === 'sgd');
    assert.ok(sgd.hyperparameters.some((h) => h.name === 'momentum' && h.default === 0));
  });

  test('fetch is called as a plain function (a browser\'s throws when called as a method)', async () => {
    // A browser's fetch refuses any receiver but the window ("Illegal
    // invocation"); in a module a plain call has none.
    const strictFetch = function (url, init) {
      if (this !== undefined && this !== globalThis) throw new TypeError('Illegal invocation');
      return fetch(url, init);
    };
    const b = new Client(d.url, { fetch: strictFetch, retries: 0 });
    assert.equal((await b.health()).status, 'ok');
    const s = await b.createSession('plain-fetch', { optimizer: { type: 'sgd', lr: 1 }, params: [1] });
    assert.deepEqual(Array.from(await s.step([0.5])), [0.5]);
  });

  test('createSession creates (201), then verifies (200)', async () => {
    const cfg = { optimizer: { type: 'sgd', lr: 0.5 }, params: [1, 2, 3] };
    const s = await c.createSession('create-verify', cfg);
    assert.ok(s instanceof Session);
    assert.equal(s.created, true);
    assert.equal(s.dtype, 'float32');
    assert.equal(s.size, 3);
    const again = await c.createSession('create-verify', cfg);
    assert.equal(again.created, false);
    await assert.rejects(
      c.createSession('create-verify', { ...cfg, optimizer: { type: 'sgd', lr: 0.25 } }),
      (e) => e instanceof OptdError && e.status === 409,
    );
  });

  test('createSession passes every option through', async () => {
    const s = await c.createSession('all-options', {
      optimizer: { type: 'adamw', lr: 1e-3, weight_decay: 0.05 },
      size: 10,
      init: { type: 'uniform', low: -1, high: 1, seed: 7 },
      dtype: 'float64',
      schedule: { type: 'cosine', T_max: 100 },
      clip: { type: 'norm', max_norm: 1, norm_type: 2 },
      mode: { type: 'async', max_staleness: 4, stale_policy: 'damp', accumulate: 1 },
      nonfinite: 'skip',
      metadata: { owner: 'js', run: 3 },
    });
    assert.equal(s.created, true);
    const i = await s.info();
    assert.equal(i.name, 'all-options');
    assert.equal(i.dtype, 'float64');
    assert.equal(i.size, 10);
    assert.equal(i.step, 0);
    assert.equal(i.optimizer.type, 'adamw');
    assert.equal(i.optimizer.weight_decay, 0.05);
    assert.equal(i.optimizer.betas.length, 2, 'defaults are filled in');
    assert.equal(i.schedule.type, 'cosine');
    assert.equal(i.clip.max_norm, 1);
    assert.equal(i.mode.max_staleness, 4);
    assert.equal(i.mode.stale_policy, 'damp');
    assert.equal(i.nonfinite, 'skip');
    assert.deepEqual(i.metadata, { owner: 'js', run: 3 });
    const p = await s.params();
    assert.ok(p instanceof Float64Array);
    assert.equal(p.length, 10);
    assert.ok(p.every((x) => x >= -1 && x <= 1));
    assert.ok(new Set(p).size > 1, 'uniform init is not constant');
  });

  test('an optimizer may be named by its type alone', async () => {
    const s = await c.createSession('by-type', { optimizer: 'adam', size: 4, init: { type: 'zeros' } });
    assert.equal((await s.info()).optimizer.type, 'adam');
  });

  test('a typed array gives the dtype', async () => {
    const s = await c.createSession('dtype-from-array', {
      optimizer: { type: 'sgd', lr: 0.1 },
      params: new Float64Array([0.1, 0.2]),
    });
    assert.equal(s.dtype, 'float64');
    assert.deepEqual(Array.from(await s.params()), [0.1, 0.2]);
  });

  test('step, lastStep, lastLr and params', async () => {
    const s = await c.createSession('steps', { optimizer: { type: 'sgd', lr: 0.5 }, params: [1, 2, 3] });
    assert.equal(s.lastStep, null);
    const p = await s.step([1, 1, 1], { loss: 2.5 });
    assert.ok(p instanceof Float32Array);
    assert.deepEqual(Array.from(p), [0.5, 1.5, 2.5]);
    assert.equal(s.lastStep, 1);
    assert.equal(s.lastLr, 0.5);
    const p2 = await s.step(new Float32Array([0.5, 0.5, 0.5]));
    assert.deepEqual(Array.from(p2), [0.25, 1.25, 2.25]);
    assert.equal(s.lastStep, 2);
    assert.deepEqual(Array.from(await s.params()), [0.25, 1.25, 2.25]);
    assert.deepEqual(Array.from(await s.params({ json: false })), [0.25, 1.25, 2.25]);
    const i = await s.info();
    assert.equal(i.step, 2);
    assert.equal(i.counters.applied, 2);
    assert.equal(i.state.last_loss, 2.5);
  });

  test('step with params: false answers null but still steps', async () => {
    const s = await c.createSession('no-params', { optimizer: { type: 'sgd', lr: 1 }, params: [0, 0] });
    assert.equal(await s.step([1, 2], { params: false }), null);
    assert.equal(await s.step([1, 2], { params: false, json: false }), null);
    assert.equal(s.lastStep, 2);
    assert.equal(s.lastLr, 1);
    assert.deepEqual(Array.from(await s.params()), [-2, -4]);
  });

  test('a handle from session(name) learns dtype and size itself', async () => {
    await c.createSession('handle', { optimizer: { type: 'sgd', lr: 0.25 }, params: [4, 8], dtype: 'float64' });
    const s = c.session('handle');
    assert.equal(s.dtype, null);
    const p = await s.step([1, 1]);
    assert.ok(p instanceof Float64Array);
    assert.deepEqual(Array.from(p), [3.75, 7.75]);
    assert.equal(s.dtype, 'float64');
    assert.equal(s.size, 2);
  });

  test('stepResult carries loss, worker and baseStep to the daemon (JSON and binary)', async () => {
    const s = await c.createSession('meta', { optimizer: { type: 'sgd', lr: 0.1 }, size: 300, init: { type: 'zeros' } });
    const g = new Float32Array(300).fill(1);
    const r1 = await s.stepResult(g, { loss: 3, worker: 'w-json', baseStep: 0, json: true });
    assert.equal(r1.status, 200);
    assert.equal(r1.step, 1);
    assert.equal(r1.lr, 0.1);
    assert.equal(r1.replayed, false);
    assert.equal(r1.pending, 0);
    assert.equal(r1.params[0], f(-0.1));
    const r2 = await s.stepResult(g, { loss: 2, worker: 'w-bin', baseStep: 1, json: false });
    assert.equal(r2.step, 2);
    assert.equal(r2.lr, 0.1);
    assert.equal(r2.params[299], f(f(-0.1) - f(0.1)));
    const h = await s.history();
    assert.deepEqual(
      h.map((x) => [x.step, x.loss, x.worker]),
      [
        [1, 3, 'w-json'],
        [2, 2, 'w-bin'],
      ],
    );
  });

  test('setParams overwrites the params, JSON and binary', async () => {
    const s = await c.createSession('set', { optimizer: { type: 'sgd', lr: 1 }, params: [0, 0, 0] });
    await s.step([1, 1, 1]);
    assert.equal(await s.setParams([7, 8, 9]), 1, 'answers the step, which does not move');
    assert.deepEqual(Array.from(await s.params()), [7, 8, 9]);
    await s.setParams(new Float32Array([-1, -2, -3]), { json: false });
    assert.deepEqual(Array.from(await s.params({ json: true })), [-1, -2, -3]);
    assert.deepEqual(Array.from(await s.step([1, 1, 1])), [-2, -3, -4]);
    assert.equal(s.lastStep, 2);
  });

  test('update changes hyperparameters, clip and metadata mid-run', async () => {
    const s = await c.createSession('patch', { optimizer: { type: 'sgd', lr: 1 }, params: [0, 0], metadata: { v: 1 } });
    await s.step([1, 1]);
    const doc = await s.update({ optimizer: { lr: 0.5 }, metadata: { v: 2 }, clip: { type: 'value', max_value: 0.25 } });
    assert.equal(doc.optimizer.lr, 0.5);
    assert.equal(doc.lr, 0.5);
    assert.deepEqual(doc.metadata, { v: 2 });
    assert.deepEqual(Array.from(await s.step([1, -1])), [-1.125, -0.875]);
    assert.equal(s.lastLr, 0.5);
  });

  test('history pages through the step log', async () => {
    const s = await c.createSession('hist', { optimizer: { type: 'sgd', lr: 0.01 }, params: [0] });
    for (let i = 1; i <= 7; i++) await s.step([i], { loss: 10 * i, params: false });
    const all = await s.history({ pageSize: 3 });
    assert.deepEqual(
      all.map((x) => x.step),
      [1, 2, 3, 4, 5, 6, 7],
    );
    assert.deepEqual(
      all.map((x) => x.loss),
      [10, 20, 30, 40, 50, 60, 70],
    );
    for (const x of all) {
      assert.equal(x.lr, 0.01);
      assert.ok(Math.abs(x.grad_norm - x.step) < 1e-6);
      assert.match(x.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    }
    assert.deepEqual(
      (await s.history({ after: 4, pageSize: 2 })).map((x) => x.step),
      [5, 6, 7],
    );
    assert.deepEqual(
      (await s.history({ after: 1, limit: 4, pageSize: 3 })).map((x) => x.step),
      [2, 3, 4, 5],
    );
  });

  test('sessions() walks every page', async () => {
    const names = ['pg-a', 'pg-b', 'pg-c', 'pg-d', 'pg-e'];
    for (const n of names) await c.createSession(n, { optimizer: 'adam', size: 2, init: { type: 'zeros' } });
    const seen = [];
    for await (const s of c.sessions({ pageSize: 2 })) seen.push(s);
    const pg = seen.filter((s) => s.name.startsWith('pg-'));
    assert.deepEqual(
      pg.map((s) => s.name),
      names,
    );
    assert.equal(pg[0].optimizer, 'adam');
    assert.equal(pg[0].size, 2);
    assert.equal(pg[0].dtype, 'float32');
    const sorted = seen.map((s) => s.name);
    assert.deepEqual(sorted, [...sorted].sort(), 'in name order');
    const rest = [];
    for await (const s of c.sessions({ after: 'pg-c', pageSize: 1 })) rest.push(s.name);
    assert.deepEqual(
      rest.filter((n) => n.startsWith('pg-')),
      ['pg-d', 'pg-e'],
    );
  });

  test('delete removes the session', async () => {
    const s = await c.createSession('doomed', { optimizer: 'adam', size: 1, init: { type: 'zeros' } });
    await s.delete();
    await assert.rejects(s.info(), (e) => e instanceof OptdError && e.status === 404);
    for await (const x of c.sessions()) assert.notEqual(x.name, 'doomed');
    // The name is free again, for any config.
    const s2 = await c.createSession('doomed', { optimizer: { type: 'sgd', lr: 1 }, params: [1] });
    assert.equal(s2.created, true);
  });

  test('nonfinite gradients are sent binary, so "skip" can skip them', async () => {
    const s = await c.createSession('skip', { optimizer: { type: 'sgd', lr: 1 }, params: [1, 2], nonfinite: 'skip' });
    const r = await s.stepResult([NaN, 1]);
    assert.equal(r.status, 200);
    assert.equal(r.skipped, true);
    assert.equal(r.lr, null);
    assert.equal(s.lastLr, null);
    assert.deepEqual(Array.from(r.params), [1, 2]);
    const i = await s.info();
    assert.equal(i.counters.skipped_nonfinite, 1);
    assert.equal(i.step, 0);
  });

  test('a schedule sets the lr each step uses', async () => {
    const s = await c.createSession('sched', {
      optimizer: { type: 'sgd', lr: 1 },
      params: [0],
      dtype: 'float64',
      schedule: { type: 'cosine', T_max: 4 },
    });
    const lrs = [];
    for (let t = 0; t < 4; t++) {
      const want = (await s.info()).lr;
      await s.step([1], { params: false });
      assert.equal(s.lastLr, want, 'info().lr is the next update\'s lr');
      lrs.push(s.lastLr);
    }
    for (let t = 0; t < 4; t++) assert.ok(Math.abs(lrs[t] - 0.5 * (1 + Math.cos((Math.PI * t) / 4))) < 1e-15);
  });
});
