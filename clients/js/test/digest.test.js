// Optd-Params-Crc32: every answer's params are checked against the daemon's
// digest; a mismatch throws ParamsDigestMismatch (verifyParams: false turns
// the check off).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { crc32 } from 'node:zlib';

import { Client, OptdError, ParamsDigestMismatch, crc32Hex } from '../optd.js';
import { startDaemon } from './daemon.js';

let d;
before(async () => {
  d = await startDaemon();
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

// The real daemon's answers, with the digest header replaced when `bad` is
// set: params that are not what the daemon sent, as far as a client can tell.
let bad = null;
async function tamperingFetch(url, init) {
  const res = await fetch(url, init);
  if (bad === null || !res.headers.has('optd-params-crc32')) return res;
  const headers = new Headers(res.headers);
  headers.set('Optd-Params-Crc32', bad);
  return new Response(await res.arrayBuffer(), { status: res.status, headers });
}

test('crc32Hex is zlib crc32', () => {
  for (const s of ['', 'a', 'optd', '123456789']) {
    const b = new TextEncoder().encode(s);
    assert.equal(crc32Hex(b), (crc32(b) >>> 0).toString(16).padStart(8, '0'), s);
  }
  assert.equal(crc32Hex(new TextEncoder().encode('123456789')), 'cbf43926');
});

test('params are verified in every form and dtype', async () => {
  const c = new Client(d.url, { fetch: tamperingFetch });
  for (const dtype of ['float32', 'float64']) {
    const s = await c.createSession(`digest-${dtype}`, {
      optimizer: { type: 'sgd', lr: 0.1 },
      params: [0.5, -1.25, 3, 1e-3],
      dtype,
    });
    for (const json of [true, false]) {
      assert.equal((await s.step([0.1, 0.2, -0.3, 4], { json })).length, 4);
      assert.equal((await s.params({ json })).length, 4);
    }
    // the header is the CRC-32 of the binary params
    const res = await fetch(`${d.url}/v1/sessions/digest-${dtype}/params`, {
      headers: { Accept: 'application/octet-stream' },
    });
    const body = new Uint8Array(await res.arrayBuffer());
    assert.equal(res.headers.get('optd-params-crc32'), crc32Hex(body));
  }
});

test('a mismatch throws ParamsDigestMismatch', async () => {
  const c = new Client(d.url, { fetch: tamperingFetch, retries: 0 });
  const s = await c.createSession('digest-bad', { optimizer: { type: 'sgd', lr: 0.1 }, params: [1, 2] });
  bad = '0badf00d';
  try {
    for (const json of [true, false]) {
      for (const call of [() => s.params({ json }), () => s.step([0.5, 0.5], { json })]) {
        await assert.rejects(call, (e) => {
          assert.ok(e instanceof ParamsDigestMismatch);
          assert.ok(e instanceof OptdError);
          assert.equal(e.kind, 'digest_mismatch');
          assert.equal(e.expected, '0badf00d');
          return true;
        });
      }
    }
    const off = new Client(d.url, { fetch: tamperingFetch, verifyParams: false });
    assert.equal((await off.session('digest-bad').params()).length, 2);
  } finally {
    bad = null;
  }
  assert.equal((await s.params()).length, 2);
});
