// Token management against a daemon with an admin key: mint, list (never a
// secret), get, revoke; a token's scope and prefix (403), its quotas (429
// thrown at once) and step rate (429 with a short Retry-After, waited out).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { Client, OptdError } from '../optd.js';
import { startDaemon } from './daemon.js';

const KEY = 'admin-key-of-the-js-token-suite';
let d;
let admin;
before(async () => {
  d = await startDaemon({ args: ['--api-key', KEY] });
  admin = new Client(d.url, { apiKey: KEY, retries: 0 });
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

const SGD = { optimizer: { type: 'sgd', lr: 0.1 }, params: [1, 2] };

function problem(status, field) {
  return (e) => {
    assert.ok(e instanceof OptdError, String(e));
    assert.equal(e.status, status);
    if (field !== undefined) assert.equal(e.field, field);
    return true;
  };
}

test('mint, list, get and revoke; the secret is shown once', async () => {
  const t = await admin.createToken(['step'], { prefix: 'js-', label: 'js workers', expiresIn: 3600 });
  assert.match(t.token, /^optd_[0-9a-f]{16}_[0-9a-f]{64}$/);
  assert.deepEqual(t.scopes, ['read', 'step']);
  const listed = (await admin.listTokens()).find((x) => x.id === t.id);
  assert.ok(listed);
  assert.equal(listed.token, undefined);
  const got = await admin.getToken(t.id);
  assert.equal(got.label, 'js workers');
  assert.equal(got.token, undefined);
  assert.ok(!readFileSync(join(d.dir, 'optd.db')).includes(t.token.slice(22)));

  await admin.createSession('js-a', SGD);
  const worker = new Client(d.url, { apiKey: t.token, retries: 0 });
  assert.deepEqual(Array.from(await worker.session('js-a').step([1, 1])), [0.9, 1.9].map(Math.fround));
  await assert.rejects(worker.listTokens(), problem(403, 'scope'));
  await assert.rejects(worker.session('js-a').delete(), problem(403, 'scope'));
  await assert.rejects(worker.session('elsewhere').info(), problem(403, 'prefix'));
  await admin.revokeToken(t.id);
  await assert.rejects(worker.session('js-a').step([1, 1]), problem(401));
  assert.ok((await admin.getToken(t.id)).revoked_at);
  await assert.rejects(admin.revokeToken('0123456789abcdef'), problem(404));
});

test('a session quota is thrown at once; created_by names the token', async () => {
  const t = await admin.createToken(['admin'], { prefix: 'jq-', quotas: { max_sessions: 1 } });
  const c = new Client(d.url, { apiKey: t.token });
  const s = await c.createSession('jq-1', SGD);
  assert.equal((await s.info()).created_by, t.id);
  const t0 = Date.now();
  await assert.rejects(c.createSession('jq-2', SGD), problem(429, 'max_sessions'));
  assert.ok(Date.now() - t0 < 5000, 'not retried');
});

test('a step past the rate waits out a short Retry-After', async () => {
  const t = await admin.createToken(['step'], { prefix: 'jr-', quotas: { steps_per_second: 2, burst: 1 } });
  await admin.createSession('jr-a', SGD);
  const hasty = new Client(d.url, { apiKey: t.token, retries: 0 }).session('jr-a');
  await hasty.step([1, 1]);
  await assert.rejects(hasty.step([1, 1]), (e) => problem(429)(e) && e.field === null);
  const patient = new Client(d.url, { apiKey: t.token, retries: 2 }).session('jr-a');
  const t0 = Date.now();
  await patient.step([1, 1]);
  assert.ok(Date.now() - t0 >= 400, 'waited for the bucket');
  assert.equal((await admin.session('jr-a').info()).step, 2);
});
