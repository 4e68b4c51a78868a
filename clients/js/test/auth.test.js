// A daemon started with --api-key: the client sends Authorization: Bearer.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Client, OptdError } from '../optd.js';
import { startDaemon } from './daemon.js';

const KEY = 'k3y-for-the-js-suite';
let d;
before(async () => {
  d = await startDaemon({ args: ['--api-key', KEY] });
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

function is401(e) {
  assert.ok(e instanceof OptdError, String(e));
  assert.equal(e.status, 401);
  assert.equal(e.type, 'urn:optd:problem:unauthorized');
  assert.equal(e.title, 'Unauthorized');
  assert.match(e.detail, /API key/);
  return true;
}

test('401 without a key or with a wrong one, and no retries', async () => {
  let calls = 0;
  const counted = (url, init) => {
    calls++;
    return fetch(url, init);
  };
  const cfg = { optimizer: { type: 'sgd', lr: 1 }, params: [1] };
  await assert.rejects(new Client(d.url, { fetch: counted }).createSession('auth', cfg), is401);
  assert.equal(calls, 1);
  await assert.rejects(new Client(d.url, { apiKey: KEY + 'x' }).createSession('auth', cfg), is401);
  await assert.rejects(new Client(d.url, { apiKey: KEY.slice(0, -1) }).optimizers(), is401);
  await assert.rejects(new Client(d.url).session('auth').step([1]), is401);
  await assert.rejects((async () => { for await (const s of new Client(d.url).sessions()) void s; })(), is401);
});

test('the right key opens every route; /healthz needs none', async () => {
  assert.equal((await new Client(d.url).health()).status, 'ok');
  const c = new Client(d.url, { apiKey: KEY });
  const s = await c.createSession('auth-ok', { optimizer: { type: 'sgd', lr: 1 }, params: [1, 2] });
  assert.deepEqual(Array.from(await s.step([1, 1])), [0, 1]);
  assert.deepEqual(Array.from(await s.step(new Float32Array(2).fill(1), { json: false })), [-1, 0]);
  assert.deepEqual(Array.from(await s.params({ json: false })), [-1, 0]);
  await s.setParams([5, 5]);
  await s.update({ metadata: { ok: true } });
  assert.equal((await s.history()).length, 2);
  const names = [];
  for await (const x of c.sessions()) names.push(x.name);
  assert.deepEqual(names, ['auth-ok']);
  assert.ok((await c.optimizers()).optimizers.length > 0);
  await s.delete();
  // A handle made before the key was known still fails cleanly.
  await assert.rejects(new Client(d.url).session('auth-ok').info(), is401);
});
