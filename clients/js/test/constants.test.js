// The JavaScript client's constants against api/client_constants.json, the
// one set every optd client shares.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { Client, DEFAULTS, HEADERS, NAME_PATTERN, OptdError, errorKind } from '../optd.js';

const want = JSON.parse(readFileSync(new URL('../../../api/client_constants.json', import.meta.url), 'utf8'));

test('retry policy and binary threshold', () => {
  const c = new Client('http://127.0.0.1:1');
  assert.equal(c.retries, want.retries);
  assert.equal(c.backoffMs, want.backoff_initial_ms);
  assert.equal(c.maxBackoffMs, want.backoff_max_ms);
  assert.equal(c.binaryThreshold, want.binary_threshold);
  assert.equal(DEFAULTS.retryAfterMaxS, want.retry_after_max_s);
});

test('name pattern', () => {
  assert.equal(NAME_PATTERN, want.name_pattern);
  const c = new Client('http://127.0.0.1:1');
  for (const n of ['a', 'run-1.v2_x', 'x'.repeat(128)]) c.session(n);
  for (const n of ['', 'x'.repeat(129), 'a b', 'a/b']) assert.throws(() => c.session(n), `${n} refused`);
});

test('header names', () => {
  const camel = (k) => k.replace(/_([a-z])/g, (_, ch) => ch.toUpperCase());
  const mine = Object.fromEntries(Object.entries(want.headers).map(([k, v]) => [camel(k), v]));
  assert.deepEqual({ ...HEADERS }, mine);
});

test('problem kinds', () => {
  for (const p of want.problems) {
    assert.equal(errorKind(p.status, p.field ?? null), p.kind, JSON.stringify(p));
    const e = new OptdError({ status: p.status, type: p.type, field: p.field ?? null });
    assert.equal(e.kind, p.kind);
  }
  assert.equal(new OptdError({ detail: 'no answer' }).kind, 'connection_failed');
});
