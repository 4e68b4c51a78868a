// Starts a real optd for one test file: --port 0 and a fresh temp --db,
// stopped by PID.  OPTD_BIN names the binary (tests/run.sh sets it); an
// OPTD_VALGRIND_DAEMON prefix (tests/run.sh under OPTD_VALGRIND=1) runs it
// under valgrind, whose exit code then carries the leak verdict.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const OPTD_BIN = process.env.OPTD_BIN || join(repoRoot, 'build/optd');
const PREFIX = (process.env.OPTD_VALGRIND_DAEMON ?? '').split(/\s+/).filter(Boolean);
/** True under valgrind: timing-bound tests give the daemon more time. */
export const SLOW = PREFIX.length > 0;
const START_MS = SLOW ? 60000 : 10000;

/**
 * Resolves to {url, pid, dir, port, stop()} once the daemon has printed its
 * listening line.  `port` reuses a port (a restart); `dir` reuses a database.
 */
export async function startDaemon({ args = [], dir, port = 0 } = {}) {
  const own = !dir;
  dir ??= mkdtempSync(join(tmpdir(), 'optd-js-'));
  const argv = [...PREFIX, OPTD_BIN, '--port', String(port), '--db', join(dir, 'optd.db'), '--log-level', 'warn', ...args];
  const child = spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  const exited = new Promise((res) => child.once('exit', (code, signal) => res({ code, signal })));
  const url = await new Promise((res, rej) => {
    let out = '';
    const timer = setTimeout(() => rej(new Error(`optd did not start in ${START_MS} ms: ${stderr}`)), START_MS);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      out += d;
      const m = /optd listening on (https?:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        res(m[1]);
      }
    });
    child.once('error', (e) => {
      clearTimeout(timer);
      rej(e);
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      rej(new Error(`optd exited (${code ?? signal}) before listening: ${stderr}`));
    });
  });
  const pid = child.pid;
  let stopped = null;
  return {
    url,
    pid,
    dir,
    port: Number(new URL(url).port),
    stderr: () => stderr,
    /** SIGTERM by PID; resolves to the exit code (0 is a clean stop). */
    stop({ keepDir = false } = {}) {
      stopped ??= (async () => {
        process.kill(pid, 'SIGTERM');
        const { code, signal } = await exited;
        if (own && !keepDir) rmSync(dir, { recursive: true, force: true });
        return code ?? 128 + (signal === 'SIGKILL' ? 9 : 15);
      })();
      return stopped;
    },
  };
}
