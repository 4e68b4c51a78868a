// The client as a user installs it: `npm pack` of this folder, the tarball
// installed into an empty project in a temp dir with the README's lines, the
// README's example run from that project against a real daemon, and the
// TypeScript declarations checked by `tsc --noEmit --strict` (typescript
// from the npm registry, cached in $TMPDIR/optd-npm-<uid>) against
// test/usage.ts -- and shown to catch a wrong use.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, userInfo } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { startDaemon } from './daemon.js';

const here = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const readme = readFileSync(join(here, 'README.md'), 'utf8');
const work = mkdtempSync(join(tmpdir(), 'optd-js-install-'));
const cache = join(tmpdir(), `optd-npm-${userInfo().uid}`);
const npmEnv = {
  ...process.env,
  npm_config_cache: join(cache, 'npm-cache'),
  npm_config_update_notifier: 'false',
  npm_config_audit: 'false',
  npm_config_fund: 'false',
};

function block(marker, lang) {
  const start = marker ? readme.indexOf(marker) : 0;
  assert.ok(start >= 0, `README has ${marker}`);
  const m = new RegExp('^```' + lang + '\\n([\\s\\S]*?)^```$', 'm').exec(readme.slice(start));
  assert.ok(m, `README has a ${lang} block after ${marker}`);
  return m[1];
}

function run(cmd, args, opts = {}) {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: npmEnv, ...opts });
  } catch (e) {
    throw new Error(`${cmd} ${args.join(' ')}: ${e.stdout ?? ''}${e.stderr ?? ''}`);
  }
}

let d;
before(async () => {
  d = await startDaemon();
  // The README's install lines, as written but for the checkout's path.
  const lines = block('<!-- install:', 'sh')
    .replaceAll('/path/to/optd/clients/js', here)
    .trim()
    .split('\n');
  mkdirSync(join(work, 'app'));
  writeFileSync(join(work, 'app', 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  for (const line of lines) run('sh', ['-e', '-c', line], { cwd: join(work, 'app') });
});
after(async () => {
  assert.equal(await d.stop(), 0, 'the daemon stops cleanly');
  rmSync(work, { recursive: true, force: true });
});

test('npm pack ships the module, its declarations and README', () => {
  const pkg = join(work, 'app', 'node_modules', 'optd-client');
  assert.deepEqual(readdirSync(pkg).sort(), ['README.md', 'optd.d.ts', 'optd.js', 'package.json']);
  assert.ok(existsSync(join(work, 'app', 'optd-client-0.1.0.tgz')));
});

test("the README's example runs from the installed package", () => {
  writeFileSync(join(work, 'app', 'example.mjs'), block('', 'js'));
  const out = run('node', ['example.mjs'], { cwd: join(work, 'app'), env: { ...npmEnv, OPTD_URL: d.url } });
  assert.equal(out.trim(), '100 0.001');
});

test('optd.d.ts: tsc --noEmit --strict accepts the usage example and refuses a wrong one', () => {
  const tsc = join(cache, 'node_modules', 'typescript', 'bin', 'tsc');
  if (!existsSync(tsc)) {
    mkdirSync(cache, { recursive: true });
    run('npm', ['install', '--prefix', cache, '--no-audit', '--no-fund', '--no-save', 'typescript@5'], { cwd: cache });
  }
  const app = join(work, 'app');
  copyFileSync(join(here, 'test', 'usage.ts'), join(app, 'usage.ts'));
  const flags = ['--noEmit', '--strict', '--target', 'es2022', '--module', 'nodenext', '--moduleResolution', 'nodenext',
    '--lib', 'es2022,dom,dom.iterable'];
  run('node', [tsc, ...flags, 'usage.ts'], { cwd: app });
  writeFileSync(join(app, 'wrong.ts'),
    "import { Client } from 'optd-client';\n" +
    "const s = new Client('http://x').session('a');\n" +
    "export const p: Promise<Float32Array | Float64Array | null> = s.step('not a vector', { loss: 'high' });\n");
  assert.throws(() => run('node', [tsc, ...flags, 'wrong.ts'], { cwd: app }), /TS2345|TS2322/);
});
