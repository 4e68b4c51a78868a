// One cross-language worker on the JavaScript client (tests/test_cross_language.c).
//
//     node worker.mjs URL SESSION DTYPE SIZE NAME W T0 T1
//
// Sends g(t, i, w) = (((7t + 13i + 5w) mod 17) - 8) / 8 for t = T0 .. T1-1,
// each with base_step t and worker NAME, and prints one line per step:
// "t step hex" -- the step the answer reported and the new params as the hex
// of their little-endian bytes in DTYPE, so the test compares exact bits.
//
// The wire form rotates with (t + w) mod 3: the client's default, JSON,
// binary.  Any error: the message on stderr, exit 1.
import { Client } from '../../clients/js/optd.js';

function grad(t, size, w) {
  const g = new Array(size);
  // Every value is k/8 with |k| <= 8, exact in both dtypes; the operands
  // are non-negative, so % agrees with the other languages.
  for (let i = 0; i < size; i++) g[i] = (((7 * t + 13 * i + 5 * w) % 17) - 8) / 8.0;
  return g;
}

function paramsHex(p, dtype) {
  const width = dtype === 'float64' ? 8 : 4;
  const dv = new DataView(new ArrayBuffer(p.length * width));
  for (let i = 0; i < p.length; i++) {
    if (width === 8) dv.setFloat64(i * 8, p[i], true);
    else dv.setFloat32(i * 4, p[i], true);
  }
  return Buffer.from(dv.buffer).toString('hex');
}

async function main(argv) {
  if (argv.length !== 8) {
    process.stderr.write('usage: worker.mjs URL SESSION DTYPE SIZE NAME W T0 T1\n');
    return 2;
  }
  const [url, name, dtype, sizeS, worker, wS, t0S, t1S] = argv;
  const [size, w, t0, t1] = [sizeS, wS, t0S, t1S].map(Number);
  const client = new Client(url);
  const s = client.session(name);
  const doc = await s.info();
  if (doc.dtype !== dtype || doc.size !== size) {
    process.stderr.write(`session ${name} is ${doc.dtype}[${doc.size}], expected ${dtype}[${size}]\n`);
    return 1;
  }
  const forms = [undefined, true, false]; // default, JSON, binary
  for (let t = t0; t < t1; t++) {
    const r = await s.stepResult(grad(t, size, w), { baseStep: t, worker, json: forms[(t + w) % 3] });
    if (r.params.length !== size) throw new Error(`step t=${t}: ${r.params.length} params, expected ${size}`);
    process.stdout.write(`${t} ${r.step} ${paramsHex(r.params, dtype)}\n`);
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (rc) => { process.exitCode = rc; },
  (e) => {
    const extra = e && e.status !== undefined
      ? ` (status ${e.status}, ${e.type ?? ''}: ${e.detail ?? ''}${e.field ? `, field ${e.field}` : ''})` : '';
    process.stderr.write(`worker.mjs: ${e && e.stack ? e.stack : e}${extra}\n`);
    process.exitCode = 1;
  },
);
