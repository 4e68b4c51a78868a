// The 16-bit wire forms: the conversions on hand-computed bit patterns, and
// steps / params in bfloat16 and float16 against the real daemon.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  Client,
  OptdError,
  WIRES,
  bf16ToF32,
  f16ToF32,
  f32ToBf16,
  f32ToF16,
  narrowVector,
  widenVector,
} from '../optd.js';
import { startDaemon } from './daemon.js';

/** The float32 whose bits are u. */
function f32(u) {
  return new Float32Array(new Uint32Array([u]).buffer)[0];
}

function u16s(bytes) {
  const out = [];
  for (let i = 0; i < bytes.length; i += 2) out.push(bytes[i] | (bytes[i + 1] << 8));
  return out;
}

function bytesOf(t) {
  return Buffer.from(t.buffer, t.byteOffset, t.byteLength);
}

// [float32 bits, bfloat16 bits]
const BF16 = [
  [0x3f800000, 0x3f80], // 1.0
  [0x80000000, 0x8000], // -0.0
  [0x3f808000, 0x3f80], // tie, lower half even: down
  [0x3f818000, 0x3f82], // tie, lower half odd: up
  [0x3f808001, 0x3f81], // just past the tie
  [0x3f807fff, 0x3f80], // just below the tie
  [0xc0490fdb, 0xc049], // -pi
  [0x7f7fffff, 0x7f80], // largest float32: Inf
  [0xff800000, 0xff80], // -Inf
  [0x7fc00000, 0x7fc0], // quiet NaN
  [0x7f800001, 0x7fc0], // signalling NaN becomes quiet
  [0xff812345, 0xffc1], // sign and top payload bits kept
  [0x00008000, 0x0000], // tie at the bottom: to even
  [0x00018000, 0x0002], // tie to even upward
];

// [float32 bits, float16 bits]
const F16 = [
  [0x3f800000, 0x3c00], // 1.0
  [0xc0000000, 0xc000], // -2.0
  [0x3dcccccd, 0x2e66], // 0.1
  [0x3f801000, 0x3c00], // 1 + 2^-11: tie, even is down
  [0x3f803000, 0x3c02], // 1 + 3*2^-11: tie, even is up
  [0x3f801001, 0x3c01], // just past the tie
  [0x477fe000, 0x7bff], // 65504, the largest float16
  [0x477fefff, 0x7bff], // just below 65520
  [0x477ff000, 0x7c00], // 65520: Inf
  [0xc77ff000, 0xfc00], // -65520: -Inf
  [0x7f800000, 0x7c00], // Inf
  [0x38800000, 0x0400], // 2^-14, the smallest normal
  [0x387fe000, 0x0400], // 1023.5 * 2^-24: tie, even is up
  [0x387fc000, 0x03ff], // 1023 * 2^-24, the largest subnormal
  [0x33800000, 0x0001], // 2^-24, the smallest subnormal
  [0x33000000, 0x0000], // 2^-25: tie, even is 0
  [0x33000001, 0x0001], // just past 2^-25
  [0xb3000001, 0x8001],
  [0x33c00000, 0x0002], // 1.5 * 2^-24: tie, even is up
  [0x34200000, 0x0002], // 2.5 * 2^-24: tie, even is down
  [0x00000001, 0x0000], // float32 subnormal
  [0x7fc00000, 0x7e00], // quiet NaN
  [0x7f800001, 0x7e00], // signalling NaN becomes quiet
  [0xffc02000, 0xfe01], // sign and top payload bits kept
];

// [float16 bits, float32 bits]
const F16_UP = [
  [0x3c00, 0x3f800000], [0x0001, 0x33800000], [0x03ff, 0x387fc000], [0x0400, 0x38800000],
  [0x7bff, 0x477fe000], [0x7c00, 0x7f800000], [0xfe01, 0xffc02000], [0x3555, 0x3eaaa000],
  [0x8200, 0xb8000000],
];

describe('conversions', () => {
  test('bfloat16 narrowing, one value and vectors', () => {
    for (const [u, h] of BF16) assert.equal(f32ToBf16(u), h, `0x${u.toString(16)}`);
    const v = new Float32Array(new Uint32Array(BF16.map(([u]) => u)).buffer);
    assert.deepEqual(u16s(narrowVector(v, 'bfloat16')), BF16.map(([, h]) => h));
  });

  test('float16 narrowing, one value and vectors', () => {
    for (const [u, h] of F16) assert.equal(f32ToF16(u), h, `0x${u.toString(16)}`);
    const v = new Float32Array(new Uint32Array(F16.map(([u]) => u)).buffer);
    assert.deepEqual(u16s(narrowVector(v, 'float16')), F16.map(([, h]) => h));
  });

  test('widening is exact', () => {
    for (const [h, u] of F16_UP) assert.equal(f16ToF32(h), u, `0x${h.toString(16)}`);
    assert.equal(bf16ToF32(0xc049), 0xc0490000);
    assert.equal(widenVector(new Uint8Array([0x00, 0x3c, 0xff, 0x7b]), 'float16', 'float64')[1], 65504);
    // every pattern widens, and narrows back to itself (a signalling NaN
    // comes back quiet)
    for (const w of WIRES) {
      const [expMask, quiet] = w === 'bfloat16' ? [0x7f80, 0x40] : [0x7c00, 0x200];
      const all = new Uint8Array(65536 * 2);
      const want = [];
      for (let h = 0; h < 65536; h++) {
        all[2 * h] = h & 0xff;
        all[2 * h + 1] = h >>> 8;
        const nan = (h & expMask) === expMask && (h & (expMask ^ 0x7fff)) !== 0;
        want.push(nan ? h | quiet : h);
      }
      assert.deepEqual(u16s(narrowVector(widenVector(all, w, 'float32'), w)), want, w);
    }
  });

  test('float64 values round to float32 first', () => {
    // 1 + 2^-11 + 2^-40: float32 drops 2^-40 and leaves a tie, which goes to even.
    assert.deepEqual(u16s(narrowVector([1 + 2 ** -11 + 2 ** -40], 'float16')), [0x3c00]);
    assert.deepEqual(u16s(narrowVector(new Float64Array([1e300, -1e300]), 'bfloat16')), [0x7f80, 0xff80]);
    assert.throws(() => narrowVector([1], 'float8'), TypeError);
    assert.throws(() => new Client('http://127.0.0.1:1', { wire: 'int8' }), TypeError);
  });
});

describe('against the daemon', () => {
  let d;
  let c;
  let n = 0;
  before(async () => {
    d = await startDaemon();
    c = new Client(d.url);
  });
  after(async () => {
    assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
  });

  async function pair(dtype, size) {
    const init = Float64Array.from({ length: size }, (_, i) => Math.sin(i + 1) * 2);
    const opts = { optimizer: { type: 'adam', lr: 0.01 }, params: init, dtype };
    return [await c.createSession(`w16-${n++}`, opts), await c.createSession(`w32-${n++}`, opts)];
  }

  test('a 16-bit step is the step of the widened values; its answer is the narrowed params', async () => {
    for (const dtype of ['float32', 'float64']) {
      for (const w of WIRES) {
        const [a, b] = await pair(dtype, 300);
        for (let k = 1; k <= 3; k++) {
          const grad = Float64Array.from({ length: 300 }, (_, i) => Math.cos(i * k + 0.5) * 10 ** ((i % 12) - 8));
          const got = await a.step(grad, { wire: w });
          assert.equal(a.lastStep, k);
          await b.step(widenVector(narrowVector(grad, w), w, dtype), { json: false });
          const full = await a.params({ wire: null });
          assert.deepEqual(bytesOf(full), bytesOf(await b.params({ json: false })), `${dtype} ${w} ${k}`);
          assert.ok(got instanceof (dtype === 'float32' ? Float32Array : Float64Array));
          assert.deepEqual(bytesOf(got), bytesOf(widenVector(narrowVector(full, w), w, dtype)));
          assert.notDeepEqual(bytesOf(got), bytesOf(full));
        }
      }
    }
  });

  test('the client default, per-call overrides, setParams', async () => {
    const [a] = await pair('float32', 8);
    const wc = new Client(d.url, { wire: 'bfloat16' });
    const s = wc.session(a.name);
    const grad = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8];
    const got = await s.step(grad); // 8 values: binary anyway, in bfloat16
    const full = await s.params({ wire: null });
    assert.deepEqual(bytesOf(got), bytesOf(widenVector(narrowVector(full, 'bfloat16'), 'bfloat16', 'float32')));
    assert.deepEqual(bytesOf(await s.params()), bytesOf(got));
    const half = await s.params({ wire: 'float16' });
    assert.deepEqual(bytesOf(half), bytesOf(widenVector(narrowVector(full, 'float16'), 'float16', 'float32')));
    await assert.rejects(s.step(grad, { json: true }), RangeError);

    await s.setParams([1, 65519, 2 ** -24, -0.1, 1 + 2 ** -11, 0, 0, 0], { wire: 'float16' });
    const p = await s.params({ wire: null });
    assert.deepEqual(Array.from(p.slice(0, 5)), [1, 65504, 2 ** -24, -0.0999755859375, 1]);
    // 65520 narrows to Inf, which params may not hold: refused, nothing changed
    await assert.rejects(s.setParams(new Array(8).fill(65520), { wire: 'float16' }),
      (e) => e instanceof OptdError && e.status === 422);
    assert.deepEqual(bytesOf(await s.params({ wire: null })), bytesOf(p));
  });
});
