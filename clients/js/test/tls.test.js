// HTTPS: a daemon started with --tls-cert, --tls-key and --tls-client-ca
// (mutual TLS), certificates made for the run by
// tests/support/make_test_ca.sh; the client in Node with caFile, certFile
// and keyFile.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Client, OptdError, tlsFetch } from '../optd.js';
import { startDaemon } from './daemon.js';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const dir = mkdtempSync(join(tmpdir(), 'optd-js-tls-'));
const pem = (name) => join(dir, name);
let d;
before(async () => {
  execFileSync('sh', [join(repoRoot, 'tests/support/make_test_ca.sh'), dir]);
  d = await startDaemon({
    args: ['--tls-cert', pem('server.pem'), '--tls-key', pem('server.key'), '--tls-client-ca', pem('ca.pem')],
  });
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
  rmSync(dir, { recursive: true, force: true });
});

const good = () => ({ caFile: pem('ca.pem'), certFile: pem('client.pem'), keyFile: pem('client.key'), retries: 0 });

function noAnswer(e) {
  assert.ok(e instanceof OptdError, String(e));
  assert.equal(e.status, 0);
  return true;
}

test('the daemon listens on https://', () => {
  assert.match(d.url, /^https:\/\/127\.0\.0\.1:\d+$/);
});

test('verified server, client certificate: create, step, params', async () => {
  const c = new Client(d.url, good());
  const s = await c.createSession('tls-js', { optimizer: { type: 'sgd', lr: 0.5 }, params: [1, 2], dtype: 'float64' });
  assert.deepEqual(Array.from(await s.step([1, 1])), [0.5, 1.5]);
  assert.equal(s.lastStep, 1);
  assert.deepEqual(Array.from(await c.session('tls-js').params()), [0.5, 1.5]);
  // binary bodies go through the same transport
  const big = new Client(d.url, { ...good(), binaryThreshold: 0 });
  assert.deepEqual(Array.from(await big.session('tls-js').step([1, 1])), [0, 1]);
});

test('the wrong CA fails at once, without retries', async () => {
  let calls = 0;
  const c = new Client(d.url, { ...good(), caFile: pem('other-ca.pem'), retries: 3, backoffMs: 1 });
  const inner = c._fetch;
  c._fetch = (u, i) => {
    calls++;
    return inner(u, i);
  };
  await assert.rejects(c.health(), (e) => noAnswer(e) && /unable to verify/.test(e.detail) && e.cause.cause.code === 'UNABLE_TO_VERIFY_LEAF_SIGNATURE');
  assert.equal(calls, 1);
});

test("Node's own CAs do not know the test CA", async () => {
  const c = new Client(d.url, { certFile: pem('client.pem'), keyFile: pem('client.key'), retries: 0 });
  await assert.rejects(c.health(), noAnswer);
});

test('mutual TLS: no client certificate, or one of another CA, is refused', async () => {
  await assert.rejects(new Client(d.url, { caFile: pem('ca.pem'), retries: 0 }).health(), noAnswer);
  const other = { caFile: pem('ca.pem'), certFile: pem('other-client.pem'), keyFile: pem('other-client.key'), retries: 0 };
  await assert.rejects(new Client(d.url, other).health(), noAnswer);
  assert.equal((await new Client(d.url, good()).health()).status, 'ok');
});

test('tlsFetch is a fetch of its own', async () => {
  const f = tlsFetch({ caFile: pem('ca.pem'), certFile: pem('client.pem'), keyFile: pem('client.key') });
  const res = await f(`${d.url}/healthz`);
  assert.equal(res.status, 200);
  assert.equal((await res.json()).status, 'ok');
  assert.equal((await new Client(d.url, { fetch: f }).health()).status, 'ok');
});

test('bad TLS options are refused at once', async () => {
  assert.throws(() => new Client(d.url, { caFile: pem('ca.pem'), certFile: pem('client.pem') }), TypeError);
  assert.throws(() => new Client(d.url.replace('https', 'http'), { caFile: pem('ca.pem') }), TypeError);
  assert.throws(() => new Client(d.url, { caFile: pem('ca.pem'), fetch }), TypeError);
  await assert.rejects(new Client(d.url, { caFile: pem('absent.pem'), retries: 0 }).health(), (e) => noAnswer(e) && /absent\.pem/.test(e.detail));
});
