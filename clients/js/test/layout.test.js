// Named tensors and param groups on create; absent tensors and per-group
// lrs on step (JSON and binary), against the real daemon.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Client, indexRanges, narrowVector, widenVector } from '../optd.js';
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

// w is 2x3, b is 3: the vector is w then b.
const W = [0.5, -1, 2, 0.25, 3, -0.75];
const B = [1, 2, 3];

async function create(name) {
  return c.createSession(name, {
    optimizer: { type: 'sgd', lr: 0.1 },
    dtype: 'float64',
    params: [...W, ...B],
    tensors: [
      { name: 'layer.w', shape: [2, 3] },
      { name: 'layer.b', shape: [3] },
    ],
    groups: [{ tensors: ['layer.w'] }, { tensors: ['layer.b'], lr: 0.5 }],
  });
}

test('indexRanges folds runs of indices', () => {
  assert.equal(indexRanges([60, 0, 1, 2, 57, 3]), '0-3,57,60');
  assert.equal(indexRanges([4]), '4');
});

test('create with tensors and groups: the layout and each group are in the document', async () => {
  const s = await create('js-layout');
  assert.equal(s.created, true);
  assert.equal(s.size, 9);
  const doc = await s.info();
  assert.deepEqual(
    doc.tensors.map((t) => [t.name, t.shape, t.offset, t.size]),
    [
      ['layer.w', [2, 3], 0, 6],
      ['layer.b', [3], 6, 3],
    ],
  );
  assert.deepEqual(
    doc.groups.map((g) => [g.tensors, g.optimizer.lr, g.lr]),
    [
      [['layer.w'], 0.1, 0.1],
      [['layer.b'], 0.5, 0.5],
    ],
  );
});

test('an absent tensor is left alone; grad carries the present ones only (JSON)', async () => {
  const s = await create('js-absent-json');
  const g = [0.5, -0.25, 1];
  const p = await s.step(g, { absent: ['layer.w'], json: true });
  assert.deepEqual([...p.slice(0, 6)], W);
  assert.deepEqual([...p.slice(6)], B.map((x, i) => x + -0.5 * g[i]));
  assert.equal(s.lastStep, 1);
});

test('binary step: absent by index, each group with its own lr', async () => {
  const s = await create('js-absent-binary');
  const g = [1, 2, 3, 4, 5, 6];
  const p = await s.step(g, { absent: [1], groups: [{ lr: 0.2 }, { lr: 0.3 }], json: false });
  assert.deepEqual([...p.slice(0, 6)], W.map((x, i) => x + -0.2 * g[i]));
  assert.deepEqual([...p.slice(6)], B);
  const doc = await s.info();
  assert.deepEqual(
    doc.groups.map((gr) => gr.lr),
    [0.2, 0.3],
  );
  // The lrs stay the groups' values from then on.
  const q = await s.step([...g, 1, 1, 1], { json: false });
  assert.deepEqual([...q.slice(6)], B.map((x) => x + -0.3 * 1));
});

test('a 16-bit step with absent tensors and group lrs answers every tensor in 16 bits', async () => {
  const s = await create('js-absent-wire');
  const g = [1, 2, 3, 4, 5, 6]; // exact in bfloat16
  const p = await s.step(g, { absent: [1], groups: [{ lr: 0.2 }, { lr: 0.3 }], wire: 'bfloat16' });
  assert.equal(p.length, 9);
  const full = await s.params({ wire: null, json: false });
  assert.deepEqual([...full.slice(0, 6)], W.map((x, i) => x + -0.2 * g[i]));
  assert.deepEqual([...full.slice(6)], B);
  assert.deepEqual([...p], [...widenVector(narrowVector(full, 'bfloat16'), 'bfloat16', 'float64')]);
  // float16, layer.w absent: group 1 keeps the lr 0.3 of the last step.
  const gb = [0.5, -0.25, 1];
  const q = await s.step(gb, { absent: ['layer.w'], wire: 'float16' });
  const full2 = await s.params({ wire: null, json: false });
  assert.deepEqual([...full2.slice(0, 6)], [...full.slice(0, 6)]);
  assert.deepEqual([...full2.slice(6)], B.map((x, i) => x + -0.3 * gb[i]));
  assert.deepEqual([...q], [...widenVector(narrowVector(full2, 'float16'), 'float16', 'float64')]);
  assert.equal(s.lastStep, 2);
});

test('bad absent or groups are refused before anything is sent', async () => {
  const s = await create('js-absent-bad');
  await assert.rejects(s.step([1, 2, 3], { absent: [-1] }), TypeError);
  await assert.rejects(s.step([1, 2, 3], { absent: ['nope'], json: false }), RangeError);
  await assert.rejects(s.step(new Array(9).fill(1), { groups: [{ lr: 0.1 }, { momentum: 0.9 }] }), TypeError);
  assert.equal((await s.info()).step, 0);
});
