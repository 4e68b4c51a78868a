// Checkpoints, rollback, fork (and replay), export and import against a
// real daemon.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, OptdError } from '../optd.js';
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

const grad = (i) => Float32Array.from({ length: 8 }, (_, j) => Math.sin(i * 1.3 + j * 0.7));
const same = (a, b) => assert.deepEqual(new Uint8Array(a.buffer), new Uint8Array(b.buffer));

describe('time travel', () => {
  test('rollback, labels, fork with replay, export and import', async () => {
    const s = await c.createSession('js-tv', {
      optimizer: { type: 'adam', lr: 0.01 },
      size: 8,
      init: { type: 'normal', seed: 2 },
      retain: { every_steps: 3, keep: 3 },
    });
    const at = {};
    for (let i = 0; i < 10; i++) {
      await s.step(grad(i), { params: false });
      at[i + 1] = await s.params();
      if (i === 4) assert.equal((await s.checkpoint('five')).step, 5);
    }
    const kinds = (await s.checkpoints()).checkpoints.map((k) => k.kind);
    assert.ok(kinds.includes('label') && kinds.includes('periodic'));
    const f = await c.fork('js-tv-f', 'js-tv', { step: 6, replay: true });
    same(await f.params(), at[10]);
    const g = await c.fork('js-tv-g', 'js-tv', { step: 6, replay: true, optimizer: { lr: 0.001 } });
    assert.notDeepEqual(new Uint8Array((await g.params()).buffer), new Uint8Array(at[10].buffer));
    const file = await s.export({ log: true });
    assert.ok(file instanceof Uint8Array && file.length > 0);
    const t = await c.importSession('js-tv-i', file);
    same(await t.params(), at[10]);
    assert.equal((await s.rollback({ step: 7 })).step, 7);
    same(await s.params(), at[7]);
    assert.equal((await s.rollback({ label: 'five' })).step, 5);
    same(await s.params(), at[5]);
    await assert.rejects(s.rollback({ step: 0 }), (e) => e instanceof OptdError && e.status === 409);
    await assert.rejects(c.fork('js-tv-x', 'no-such'), (e) => e instanceof OptdError && e.status === 404);
    await assert.rejects(s.rollback({}), TypeError);
  });
});
