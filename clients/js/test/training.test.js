// A small training loop: linear regression trained by the daemon's SGD with
// momentum, checked step by step against torch.optim.SGD's documented update
// computed here in float64.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Client } from '../optd.js';
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

/** Uniform [-1, 1) from a 32-bit LCG: deterministic data for every run. */
function uniform(seed) {
  let x = seed >>> 0;
  return () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return x / 2 ** 31 - 1;
  };
}

/** n samples of d features, y = X w* + 0.5 + noise. */
function dataset(n, dim, seed) {
  const u = uniform(seed);
  const wTrue = Array.from({ length: dim }, () => u());
  const X = Array.from({ length: n }, () => Float64Array.from({ length: dim }, () => u()));
  const y = X.map((x) => x.reduce((s, xi, j) => s + xi * wTrue[j], 0.5) + 0.01 * u());
  return { X, y, n, dim };
}

/** Mean squared error and its gradient; params = [w_0..w_{d-1}, bias]. */
function lossAndGrad({ X, y, n, dim }, p) {
  const g = new Float64Array(dim + 1);
  let loss = 0;
  for (let i = 0; i < n; i++) {
    let r = p[dim] - y[i];
    for (let j = 0; j < dim; j++) r += X[i][j] * p[j];
    loss += (r * r) / n;
    for (let j = 0; j < dim; j++) g[j] += (2 / n) * r * X[i][j];
    g[dim] += (2 / n) * r;
  }
  return { loss, grad: g };
}

/**
 * torch.optim.SGD, as its documentation states it:
 *   g = g + weight_decay * p
 *   b = g (first step), else b = momentum * b + (1 - dampening) * g
 *   g = nesterov ? g + momentum * b : b
 *   p = p - lr * g
 */
function torchSgd({ lr, momentum, dampening, weight_decay: wd, nesterov }) {
  let b = null;
  return (p, grad) => {
    const g = Float64Array.from(grad, (gi, i) => gi + wd * p[i]);
    if (b === null) b = Float64Array.from(g);
    else for (let i = 0; i < g.length; i++) b[i] = momentum * b[i] + (1 - dampening) * g[i];
    return Float64Array.from(p, (pi, i) => pi - lr * (nesterov ? g[i] + momentum * b[i] : b[i]));
  };
}

async function train(name, data, hp, steps = 100) {
  const p0 = new Float64Array(data.dim + 1);
  const s = await c.createSession(name, { optimizer: { type: 'sgd', ...hp }, params: p0 });
  assert.equal(s.dtype, 'float64');
  const ref = torchSgd({ dampening: 0, weight_decay: 0, nesterov: false, ...hp });
  let p = p0;
  let pRef = p0;
  let worst = 0;
  const losses = [];
  for (let t = 1; t <= steps; t++) {
    const { loss, grad } = lossAndGrad(data, p);
    losses.push(loss);
    p = await s.step(grad, { loss });
    assert.ok(p instanceof Float64Array);
    assert.equal(s.lastStep, t);
    assert.equal(s.lastLr, hp.lr);
    // The reference follows its own trajectory, fed by its own gradients.
    pRef = ref(pRef, lossAndGrad(data, pRef).grad);
    for (let i = 0; i < p.length; i++) worst = Math.max(worst, Math.abs(p[i] - pRef[i]));
  }
  assert.ok(worst <= 1e-12, `largest difference from the reference: ${worst}`);
  const final = lossAndGrad(data, p).loss;
  assert.ok(final < losses[0] / 20, `the loss fell from ${losses[0]} to ${final}`);
  const h = await s.history();
  assert.equal(h.length, steps);
  assert.deepEqual(
    h.map((x) => x.loss),
    losses,
  );
  assert.deepEqual(Array.from(await s.params()), Array.from(p), 'params() is the last step\'s answer');
  return { worst, final };
}

test('linear regression, SGD momentum + dampening + weight decay, 100 JSON steps', async () => {
  const data = dataset(64, 8, 42);
  await train('linreg-json', data, { lr: 0.05, momentum: 0.9, dampening: 0.1, weight_decay: 1e-3 });
});

test('linear regression, SGD Nesterov momentum, 100 binary steps', async () => {
  // 301 params: above the client's binary threshold.
  const data = dataset(64, 300, 7);
  await train('linreg-binary', data, { lr: 0.01, momentum: 0.9, nesterov: true, weight_decay: 1e-4 });
});
