// Shared by the CORS suites: a real optd on 127.0.0.1 (--port 0, a fresh
// temp --db, stopped by PID) and one HTTP request on a fresh connection
// with any headers (Origin included, which fetch would not let us set).
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const OPTD_BIN = process.env.OPTD_BIN || path.resolve(__dirname, '../../build/optd');
const REPO = path.resolve(__dirname, '../..');

/** Resolves to {url, dir, proc, stderr(), stop()} once optd listens. */
async function startOptd(args = [], env = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'optd-cors-'));
  const proc = spawn(OPTD_BIN, ['--bind', '127.0.0.1', '--port', '0', '--db', path.join(dir, 'optd.db'),
    '--log-level', 'warn', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let err = '';
  proc.stderr.on('data', (d) => { err += d; });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => reject(new Error('optd did not start: ' + err)), 10000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /optd listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(out);
      if (m) { clearTimeout(t); resolve(m[1]); }
    });
    proc.once('exit', (code) => { clearTimeout(t); reject(new Error('optd exited ' + code + ': ' + err)); });
  });
  return {
    url,
    dir,
    proc,
    stderr: () => err,
    async stop() {
      const code = await new Promise((r) => { proc.once('exit', (c) => r(c)); process.kill(proc.pid, 'SIGTERM'); });
      fs.rmSync(dir, { recursive: true, force: true });
      return code;
    },
  };
}

/** Runs optd with args to its exit: {code, stderr}. */
function runOptd(args, env = {}) {
  return new Promise((resolve) => {
    const p = spawn(OPTD_BIN, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
    let err = '';
    p.stderr.on('data', (d) => { err += d; });
    p.once('exit', (code) => resolve({ code, stderr: err }));
  });
}

/** One request: {status, headers (lower-case names), body (Buffer)}.
 * body is a string, a Buffer or undefined. */
function request(base, method, p, headers = {}, body) {
  return new Promise((resolve, reject) => {
    const u = new URL(p, base);
    const h = { Connection: 'close', ...headers };
    if (body !== undefined) h['Content-Length'] = Buffer.byteLength(body);
    const req = http.request({ host: u.hostname, port: u.port, method, path: u.pathname + u.search, headers: h },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      });
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

/** The response's Access-Control-* header names. */
function corsHeaders(r) {
  return Object.keys(r.headers).filter((k) => k.startsWith('access-control-'));
}

/** A comma-separated header as a set of lower-case names. */
function list(v) {
  return new Set((v || '').split(',').map((s) => s.trim().toLowerCase()).filter(Boolean));
}

/** api/openapi.yaml, read line by line (its layout rules allow that):
 * {paths: {path: [METHOD...]}, requestHeaders: [...], responseHeaders: [...]}. */
function readSpec() {
  const text = fs.readFileSync(path.join(REPO, 'api/openapi.yaml'), 'utf8');
  const paths = {};
  let inPaths = false;
  let cur = null;
  for (const line of text.split('\n')) {
    if (/^paths:/.test(line)) { inPaths = true; continue; }
    if (/^\S/.test(line)) inPaths = false;
    if (!inPaths) continue;
    let m = /^ {2}(\/\S*):\s*$/.exec(line);
    if (m) { cur = m[1]; paths[cur] = []; continue; }
    m = /^ {4}(get|put|post|patch|delete):\s*$/.exec(line);
    if (m && cur) paths[cur].push(m[1].toUpperCase());
  }
  const requestHeaders = [...text.matchAll(/name: ([A-Za-z0-9-]+)\n\s+in: header/g)].map((m) => m[1]);
  // Response headers: the keys of every "headers:" map.
  const responseHeaders = new Set();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^( +)headers:\s*$/.exec(lines[i]);
    // (components/headers, at indent 2, names definitions, not headers.)
    if (!m || m[1].length <= 2) continue;
    const indent = m[1].length + 2;
    for (let j = i + 1; j < lines.length; j++) {
      const k = /^( *)(\S.*)$/.exec(lines[j]);
      if (!k) continue;
      if (k[1].length < indent) break;
      const key = /^([A-Za-z][A-Za-z0-9-]*):\s*$/.exec(k[2]);
      if (k[1].length === indent && key) responseHeaders.add(key[1]);
    }
  }
  return { paths, requestHeaders, responseHeaders: [...responseHeaders] };
}

module.exports = { OPTD_BIN, REPO, startOptd, runOptd, request, corsHeaders, list, readSpec };
