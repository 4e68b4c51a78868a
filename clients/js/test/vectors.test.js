// Vectors cross the wire bit-exactly, as JSON and as binary, and both paths
// give the same optimizer results.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, decodeVector, encodeVector, toTypedArray } from '../optd.js';
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

/** A deterministic generator (xorshift32) so failures reproduce. */
function rng(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Finite values from random bit patterns plus the awkward ones. */
function awkward(dtype, n, seed) {
  const next = rng(seed);
  if (dtype === 'float32') {
    const special = [0, -0, 1, -1, 0.1, 1 / 3, 1e-45, -1e-45, 1.1754942e-38, 1.17549435e-38, 3.4028234e38, -3.4028234e38, 16777217, Math.PI];
    const bits = new Uint32Array(n);
    const out = new Float32Array(bits.buffer);
    for (let i = 0; i < n; i++) {
      if (i < special.length) out[i] = special[i];
      else {
        do bits[i] = next();
        while (!Number.isFinite(out[i]));
      }
    }
    return out;
  }
  const special = [0, -0, 1, -1, 0.1, 1 / 3, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1.7976931348623157e308, -1.7976931348623157e308, 9007199254740993, Math.PI];
  const bits = new Uint32Array(2 * n);
  const out = new Float64Array(bits.buffer);
  for (let i = 0; i < n; i++) {
    if (i < special.length) out[i] = special[i];
    else {
      do {
        bits[2 * i] = next();
        bits[2 * i + 1] = next();
      } while (!Number.isFinite(out[i]));
    }
  }
  return out;
}

function assertBitEqual(got, want, what) {
  assert.equal(got.constructor, want.constructor, `${what}: type`);
  assert.equal(got.length, want.length, `${what}: length`);
  const g = new Uint8Array(got.buffer, got.byteOffset, got.byteLength);
  const w = new Uint8Array(want.buffer, want.byteOffset, want.byteLength);
  for (let i = 0; i < w.length; i++) {
    if (g[i] !== w[i]) {
      const k = Math.floor(i / want.BYTES_PER_ELEMENT);
      assert.fail(`${what}: element ${k} is ${got[k]}, want ${want[k]}`);
    }
  }
}

describe('vectors', () => {
  for (const dtype of ['float32', 'float64']) {
    test(`${dtype} params round-trip bit-exactly through JSON and binary`, async () => {
      const v = awkward(dtype, 500, dtype === 'float32' ? 11 : 12);
      // Created through JSON (the only way a create carries params).
      const s = await c.createSession(`rt-${dtype}`, { optimizer: { type: 'sgd', lr: 0.1 }, params: v, dtype });
      assertBitEqual(await s.params({ json: true }), v, 'create, read JSON');
      assertBitEqual(await s.params({ json: false }), v, 'create, read binary');
      const w = awkward(dtype, 500, 99);
      await s.setParams(w, { json: false });
      assertBitEqual(await s.params({ json: true }), w, 'set binary, read JSON');
      assertBitEqual(await s.params({ json: false }), w, 'set binary, read binary');
      const u = awkward(dtype, 500, 1234);
      await s.setParams(u, { json: true });
      assertBitEqual(await s.params({ json: true }), u, 'set JSON, read JSON');
      assertBitEqual(await s.params({ json: false }), u, 'set JSON, read binary');
    });

    test(`${dtype} steps: JSON and binary paths agree bit for bit`, async () => {
      const n = 64;
      const init = { type: 'normal', mean: 0, std: 1, seed: 5 };
      const cfg = { optimizer: { type: 'adam', lr: 0.01, weight_decay: 0.01 }, size: n, init, dtype };
      const sj = await c.createSession(`agree-json-${dtype}`, cfg);
      const sb = await c.createSession(`agree-bin-${dtype}`, cfg);
      assertBitEqual(await sj.params(), await sb.params(), 'same init');
      const next = rng(3);
      for (let t = 1; t <= 20; t++) {
        const g = new Float64Array(n).map(() => next() / 2 ** 31 - 1);
        const rj = await sj.stepResult(g, { json: true, loss: t });
        const rb = await sb.stepResult(g, { json: false, loss: t });
        assert.equal(rj.step, t);
        assert.equal(rb.step, t);
        assert.equal(rj.lr, rb.lr);
        assertBitEqual(rj.params, rb.params, `step ${t}`);
        assert.ok(rj.params instanceof (dtype === 'float32' ? Float32Array : Float64Array));
      }
      assertBitEqual(await sj.params({ json: false }), await sb.params({ json: true }), 'final');
    });
  }

  test('the client picks JSON for small vectors and binary for large ones', async () => {
    const seen = [];
    const spy = new Client(d.url, {
      binaryThreshold: 8,
      fetch: (url, init) => {
        seen.push(`${init.method} ${new URL(url).pathname} ${init.headers['Content-Type'] ?? '-'} ${init.headers.Accept}`);
        return fetch(url, init);
      },
    });
    const small = await spy.createSession('pick-small', { optimizer: 'adam', size: 8, init: { type: 'zeros' } });
    const large = await spy.createSession('pick-large', { optimizer: 'adam', size: 9, init: { type: 'zeros' } });
    seen.length = 0;
    await small.step(new Float32Array(8).fill(1));
    await large.step(new Float32Array(9).fill(1));
    await small.params();
    await large.params();
    await small.setParams(new Float32Array(8));
    await large.setParams(new Float32Array(9));
    assert.deepEqual(seen, [
      'POST /v1/sessions/pick-small/step application/json application/json',
      'POST /v1/sessions/pick-large/step application/octet-stream application/octet-stream',
      'GET /v1/sessions/pick-small/params - application/json',
      'GET /v1/sessions/pick-large/params - application/octet-stream',
      'PUT /v1/sessions/pick-small/params application/json application/json',
      'PUT /v1/sessions/pick-large/params application/octet-stream application/json',
    ]);
  });

  test('the DataView codec (big-endian hosts) writes the same bytes', () => {
    for (const dtype of ['float32', 'float64']) {
      const v = awkward(dtype, 300, 77);
      const fast = encodeVector(v, dtype, true);
      const slow = encodeVector(v, dtype, false);
      assert.deepEqual(slow, fast, `${dtype} encode`);
      assertBitEqual(decodeVector(slow, dtype, false), v, `${dtype} decode`);
      // Bytes at an offset that no Float64Array view may start at.
      const shifted = new Uint8Array(fast.length + 3);
      shifted.set(fast, 3);
      assertBitEqual(decodeVector(shifted.subarray(3), dtype, true), v, `${dtype} unaligned`);
      assertBitEqual(decodeVector(shifted.subarray(3), dtype, false), v, `${dtype} unaligned DataView`);
    }
    // Little-endian on the wire: 1.0f is 00 00 80 3f.
    assert.deepEqual(Array.from(encodeVector([1], 'float32', false)), [0, 0, 0x80, 0x3f]);
    assert.deepEqual(Array.from(encodeVector([1], 'float64', false)), [0, 0, 0, 0, 0, 0, 0xf0, 0x3f]);
    assert.throws(() => decodeVector(new Uint8Array(6), 'float32'), RangeError);
  });

  test('plain arrays convert; JSON null reads as NaN', () => {
    assert.deepEqual(Array.from(toTypedArray([1, null, 0.1], 'float64')), [1, NaN, 0.1]);
    const f = toTypedArray([0.1], 'float32');
    assert.ok(f instanceof Float32Array);
    assert.equal(f[0], Math.fround(0.1));
    const same = new Float32Array(2);
    assert.equal(toTypedArray(same, 'float32'), same, 'no copy when the type fits');
    assert.throws(() => toTypedArray(3, 'float32'), TypeError);
    assert.throws(() => toTypedArray([1], 'float16'), TypeError);
  });
});
