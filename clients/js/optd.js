// optd.js -- JavaScript client for the optd daemon (Node >= 18 and browsers).
//
// One ESM module, no dependencies: the platform's fetch for HTTP, typed arrays
// for vectors.  See README.md for the API; the wire contract is the daemon's
// v1 API (PUT/GET/PATCH/DELETE /v1/sessions/{name}, POST .../step, ...).

const JSON_TYPE = 'application/json';
const BINARY_TYPE = 'application/octet-stream';

/**
 * The constants every optd client shares (api/client_constants.json in the
 * optd repository; test/constants.test.js checks them against it).
 */
export const DEFAULTS = Object.freeze({
  retries: 4, // after the first attempt
  backoffMs: 50, // first retry wait; doubles per retry
  maxBackoffMs: 2000,
  retryAfterMaxS: 30, // the longest Retry-After honoured
  binaryThreshold: 256, // vectors of more elements travel as binary
});
export const NAME_PATTERN = '^[A-Za-z0-9._-]{1,128}$';
/** Header names, by what they carry. */
export const HEADERS = Object.freeze({
  idempotencyKey: 'Idempotency-Key',
  loss: 'Optd-Loss',
  baseStep: 'Optd-Base-Step',
  worker: 'Optd-Worker',
  dtype: 'Optd-Dtype',
  step: 'Optd-Step',
  lr: 'Optd-Lr',
  pending: 'Optd-Pending',
  replayed: 'Optd-Replayed',
  skipped: 'Optd-Skipped',
  paramsCrc32: 'Optd-Params-Crc32',
});
const NAME_RE = new RegExp(NAME_PATTERN);
const LIST_PAGE_MAX = 1000;

// The daemon's binary bodies are little-endian.  On a little-endian host a
// typed array's bytes are already the wire format; elsewhere every element
// goes through a DataView.
const HOST_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const DTYPES = {
  __proto__: null,
  float32: { Array: Float32Array, bytes: 4 },
  float64: { Array: Float64Array, bytes: 8 },
};

function dtypeInfo(dtype) {
  const d = DTYPES[dtype];
  if (!d) throw new TypeError(`unknown dtype ${JSON.stringify(dtype)} (float32 or float64)`);
  return d;
}

/** The dtype a typed array stands for, or undefined for anything else. */
function dtypeOf(v) {
  if (v instanceof Float64Array) return 'float64';
  if (v instanceof Float32Array) return 'float32';
  return undefined;
}

/**
 * A vector as a typed array of `dtype`: the same object when it already is
 * one, otherwise a converted copy (float64 -> float32 rounds as the daemon's
 * JSON decoder would).  `null` elements become NaN.
 */
export function toTypedArray(v, dtype) {
  const { Array: T } = dtypeInfo(dtype);
  if (v instanceof T) return v;
  if (v == null || typeof v.length !== 'number') {
    throw new TypeError('a vector must be a Float32Array, a Float64Array or an array of numbers');
  }
  const out = new T(v.length);
  for (let i = 0; i < v.length; i++) {
    const x = v[i];
    // JSON has no NaN: the daemon prints non-finite values as null.
    out[i] = x === null ? NaN : x;
  }
  return out;
}

/**
 * Little-endian bytes of a vector in `dtype`.  `hostLittleEndian` is for
 * tests of the DataView path; callers leave it alone.
 */
export function encodeVector(v, dtype, hostLittleEndian = HOST_LITTLE_ENDIAN) {
  const { bytes } = dtypeInfo(dtype);
  const t = toTypedArray(v, dtype);
  if (hostLittleEndian) return new Uint8Array(t.buffer, t.byteOffset, t.byteLength);
  const out = new Uint8Array(t.length * bytes);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < t.length; i++) {
    if (bytes === 4) dv.setFloat32(i * 4, t[i], true);
    else dv.setFloat64(i * 8, t[i], true);
  }
  return out;
}

/** A typed array of `dtype` from little-endian bytes (ArrayBuffer or view). */
export function decodeVector(buf, dtype, hostLittleEndian = HOST_LITTLE_ENDIAN) {
  const { Array: T, bytes } = dtypeInfo(dtype);
  const u8 = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
  if (u8.byteLength % bytes !== 0) {
    throw new RangeError(`binary body of ${u8.byteLength} bytes is not a whole number of ${dtype}`);
  }
  const n = u8.byteLength / bytes;
  if (hostLittleEndian) {
    // A view needs an aligned offset; copy when the bytes sit elsewhere.
    if (u8.byteOffset % bytes === 0) return new T(u8.buffer, u8.byteOffset, n);
    return new T(u8.slice().buffer);
  }
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  const out = new T(n);
  for (let i = 0; i < n; i++) out[i] = bytes === 4 ? dv.getFloat32(i * 4, true) : dv.getFloat64(i * 8, true);
  return out;
}

// ------------------------------------------------------ 16-bit wire forms
//
// bfloat16 is the top half of a float32; float16 is IEEE binary16.  The
// rounding is the daemon's (optim/vec.c): a value is first rounded to float32
// (as Math.fround does), then to 16 bits, to nearest with ties to even.  NaN
// stays a quiet NaN (sign and top payload bits kept), values beyond float16's
// range become Inf, subnormals are kept.  Widening is exact.

/** The 16-bit wire forms a client may ask for. */
export const WIRES = Object.freeze(['bfloat16', 'float16']);
/** The request header naming the form of a binary answer's params. */
export const PARAMS_DTYPE_HEADER = 'Optd-Params-Dtype';

function checkWire(wire) {
  if (wire !== null && !WIRES.includes(wire)) {
    throw new TypeError(`wire must be null, "bfloat16" or "float16", not ${JSON.stringify(wire)}`);
  }
  return wire;
}

/** float32 bits -> bfloat16 bits, rounded to nearest even. */
export function f32ToBf16(u) {
  u >>>= 0;
  if ((u & 0x7fffffff) >>> 0 > 0x7f800000) return ((u >>> 16) | 0x0040) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** bfloat16 bits -> float32 bits (exact). */
export function bf16ToF32(h) {
  return ((h & 0xffff) << 16) >>> 0;
}

/** float32 bits -> float16 bits, rounded to nearest even. */
export function f32ToF16(u) {
  u >>>= 0;
  const sign = (u >>> 16) & 0x8000;
  const a = u & 0x7fffffff;
  if (a > 0x7f800000) return sign | 0x7e00 | ((a >>> 13) & 0x3ff);
  if (a >= 0x477ff000) return sign | 0x7c00; // rounds to 65520 or more: Inf
  if (a < 0x38800000) {
    // Below 2^-14: a subnormal float16 (or zero); value * 2^24 = sig >> shift.
    const e = a >>> 23;
    if (e < 102) return sign; // below 2^-25, or a float32 subnormal
    const sig = (a & 0x7fffff) | 0x800000;
    const shift = 126 - e;
    let q = sig >>> shift;
    const r = sig & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (r > half || (r === half && (q & 1))) q += 1;
    return sign | q;
  }
  let h = (((a >>> 23) - 112) << 10) | ((a >>> 13) & 0x3ff);
  const rem = a & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h += 1; // a carry into the exponent is right
  return sign | h;
}

/** float16 bits -> float32 bits (exact). */
export function f16ToF32(h) {
  const sign = (h & 0x8000) << 16;
  const e = (h >>> 10) & 0x1f;
  let m = h & 0x3ff;
  if (e === 0) {
    if (m === 0) return sign >>> 0;
    let ex = 113; // normalise the subnormal
    while (!(m & 0x400)) {
      m <<= 1;
      ex -= 1;
    }
    return (sign | (ex << 23) | ((m & 0x3ff) << 13)) >>> 0;
  }
  if (e === 31) return (sign | 0x7f800000 | (m << 13)) >>> 0;
  return (sign | ((e + 112) << 23) | (m << 13)) >>> 0;
}

/**
 * A vector (typed array or array of numbers) as the little-endian bytes of
 * `wire` ("bfloat16" or "float16").
 */
export function narrowVector(v, wire) {
  const narrow = checkWire(wire) === 'bfloat16' ? f32ToBf16 : f32ToF16;
  const f = v instanceof Float32Array ? v : toTypedArray(v, 'float32');
  const u = new Uint32Array(f.buffer, f.byteOffset, f.length);
  const out = new Uint8Array(f.length * 2);
  for (let i = 0; i < f.length; i++) {
    const h = narrow(u[i]);
    out[2 * i] = h & 0xff;
    out[2 * i + 1] = h >>> 8;
  }
  return out;
}

/** A typed array of `dtype` from the little-endian bytes of `wire`. */
export function widenVector(buf, wire, dtype) {
  const widen = checkWire(wire) === 'bfloat16' ? bf16ToF32 : f16ToF32;
  const { Array: T } = dtypeInfo(dtype);
  const u8 = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
  if (u8.byteLength % 2 !== 0) {
    throw new RangeError(`binary body of ${u8.byteLength} bytes is not a whole number of ${wire}`);
  }
  const n = u8.byteLength / 2;
  const u = new Uint32Array(n);
  for (let i = 0; i < n; i++) u[i] = widen(u8[2 * i] | (u8[2 * i + 1] << 8));
  const f = new Float32Array(u.buffer);
  return T === Float32Array ? f : new T(f);
}

function allFinite(t) {
  for (let i = 0; i < t.length; i++) if (!Number.isFinite(t[i])) return false;
  return true;
}

/**
 * A vector as JSON text.  JSON.stringify would print -0 as 0; String() keeps
 * the shortest text that reads back as the same double, and a float32 value
 * is a double exactly, so every element round-trips bit for bit.
 */
function vectorJson(t) {
  const parts = new Array(t.length);
  for (let i = 0; i < t.length; i++) {
    const x = t[i];
    // JSON has no NaN or Inf: null makes the daemon name the element.
    parts[i] = Object.is(x, -0) ? '-0' : Number.isFinite(x) ? String(x) : 'null';
  }
  return `[${parts.join(',')}]`;
}

/** JSON text of `rest` (an object) with a leading vector member `key`. */
function jsonWithVector(key, vec, rest = {}) {
  const r = JSON.stringify(rest);
  return `{${JSON.stringify(key)}:${vectorJson(vec)}${r === '{}' ? '' : ',' + r.slice(1, -1)}}`;
}

let nodeCrypto;

/** 128 random bits for an Idempotency-Key (a UUID where the platform has it). */
export async function newIdempotencyKey() {
  let c = globalThis.crypto;
  if (!c?.getRandomValues) {
    // Node 18 has Web Crypto only as node:crypto's webcrypto.  The specifier
    // sits in a variable so browser bundlers do not try to resolve it.
    const spec = 'node:crypto';
    nodeCrypto ??= (await import(spec)).webcrypto;
    c = nodeCrypto;
  }
  if (c.randomUUID) return c.randomUUID();
  const b = c.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/**
 * Every failure: an answer of the daemon (problem+json: status, type, title,
 * detail, field, step) or no answer at all (status 0, the cause in `cause`).
 */
/**
 * The family of an answer's status, in the words every optd client uses:
 * 'invalid_request', 'unauthorized', 'not_found', 'conflict',
 * 'stale_gradient' (409 on base_step), 'unprocessable', 'unavailable',
 * 'round_timeout', 'server_error'; 'connection_failed' when no answer came.
 */
export function errorKind(status, field = null) {
  switch (status) {
    case 0: return 'connection_failed';
    case 401: return 'unauthorized';
    case 404: return 'not_found';
    case 409: return field === 'base_step' ? 'stale_gradient' : 'conflict';
    case 422: return 'unprocessable';
    case 503: return 'unavailable';
    case 504: return 'round_timeout';
    default: return status >= 500 ? 'server_error' : 'invalid_request';
  }
}

export class OptdError extends Error {
  constructor({ status = 0, type = null, title = null, detail = null, field = null, step = null, cause } = {}) {
    const msg = status
      ? `optd ${status}${title ? ' ' + title : ''}${detail ? ': ' + detail : ''}${field ? ` [${field}]` : ''}`
      : `optd unreachable: ${detail ?? 'no answer'}`;
    super(msg, cause === undefined ? undefined : { cause });
    this.name = 'OptdError';
    this.status = status;
    this.type = type;
    this.title = title;
    this.detail = detail;
    this.field = field;
    this.step = step;
    this.kind = errorKind(status, field);
  }
}

/**
 * The params in an answer are not the ones the daemon sent: their CRC-32
 * (`actual`) differs from the answer's Optd-Params-Crc32 (`expected`), both
 * as 8 hex digits.  `status` is the answer's status; `kind` is
 * 'digest_mismatch'.
 */
export class ParamsDigestMismatch extends OptdError {
  constructor({ status, expected, actual }) {
    super({
      status,
      title: 'params digest mismatch',
      detail: `the params received have CRC-32 ${actual}, the daemon sent ${expected}`,
    });
    this.name = 'ParamsDigestMismatch';
    this.kind = 'digest_mismatch';
    this.expected = expected;
    this.actual = actual;
  }
}

let crcTable = null;
/** zlib's CRC-32 of a byte array, as 8 lowercase hex digits. */
export function crc32Hex(bytes) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ((c ^ 0xffffffff) >>> 0).toString(16).padStart(8, '0');
}

async function errorFromResponse(res) {
  const text = await res.text().catch(() => '');
  let p = null;
  if (/json/i.test(res.headers.get('content-type') ?? '')) {
    try {
      p = JSON.parse(text);
    } catch {
      p = null;
    }
  }
  if (p && typeof p === 'object') {
    return new OptdError({
      status: res.status,
      type: p.type ?? null,
      title: p.title ?? res.statusText ?? null,
      detail: p.detail ?? null,
      field: p.field ?? null,
      step: p.step ?? null,
    });
  }
  return new OptdError({ status: res.status, title: res.statusText || null, detail: text || null });
}

/** A page size the daemon accepts: 1..1000. */
function pageClamp(n) {
  return Number.isFinite(n) ? Math.min(Math.max(1, Math.floor(n)), LIST_PAGE_MAX) : LIST_PAGE_MAX;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function checkName(name) {
  // "." and ".." are valid names to the daemon, but every URL parser folds
  // them away as dot segments: such a session cannot be addressed over HTTP.
  if (typeof name !== 'string' || !NAME_RE.test(name) || name === '.' || name === '..') {
    throw new TypeError(
      `invalid session name ${JSON.stringify(name)}: use 1-128 characters of A-Z a-z 0-9 . _ - (not "." or "..")`,
    );
  }
  return name;
}

/** Node's TLS verification failures: no retry will make them pass. */
const TLS_VERIFY_CODES = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID',
  'CERT_SIGNATURE_FAILURE', 'CERT_UNTRUSTED', 'CERT_REJECTED', 'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/**
 * A fetch over node:https for https:// URLs in Node: the daemon's
 * certificate must verify against the PEM bundle `caFile` (undefined: Node's
 * CAs), and `certFile`/`keyFile` (PEM) are presented to a daemon that
 * requires client certificates.  The files are read on the first request;
 * one keep-alive agent carries every request.  (The global fetch takes no
 * such options in Node; a browser uses its own TLS and certificates.)
 */
export function tlsFetch({ caFile, certFile, keyFile } = {}) {
  let ready = null;
  const setup = async () => {
    const [https, fs, stream] = await Promise.all([import('node:https'), import('node:fs/promises'), import('node:stream')]);
    const read = (p) => (p == null ? undefined : fs.readFile(p));
    const [ca, cert, key] = await Promise.all([read(caFile), read(certFile), read(keyFile)]);
    return { https, stream, agent: new https.Agent({ keepAlive: true, ca, cert, key }) };
  };
  return async (url, init = {}) => {
    ready ??= setup().catch((e) => {
      ready = null; // a file that could not be read is read again next time
      throw new TypeError(`cannot read the TLS files: ${e.message}`, { cause: e });
    });
    const { https, stream, agent } = await ready;
    const signal = init.signal;
    return new Promise((resolve, reject) => {
      const req = https.request(url, { method: init.method ?? 'GET', headers: init.headers, agent, signal }, (res) => {
        const headers = new Headers();
        for (const [k, v] of Object.entries(res.headers)) {
          if (Array.isArray(v)) v.forEach((x) => headers.append(k, x));
          else if (v !== undefined) headers.set(k, v);
        }
        const noBody = [204, 205, 304].includes(res.statusCode) || init.method === 'HEAD';
        if (noBody) res.resume();
        resolve(new Response(noBody ? null : stream.Readable.toWeb(res), {
          status: res.statusCode,
          statusText: res.statusMessage,
          headers,
        }));
      });
      req.on('error', (e) => {
        if (signal?.aborted) return reject(signal.reason);
        const err = new TypeError('fetch failed', { cause: e });
        err.tlsVerify = TLS_VERIFY_CODES.has(e.code);
        reject(err);
      });
      const b = init.body;
      if (b == null || typeof b === 'string') req.end(b);
      else if (b instanceof ArrayBuffer) req.end(new Uint8Array(b));
      else if (ArrayBuffer.isView(b)) req.end(new Uint8Array(b.buffer, b.byteOffset, b.byteLength));
      else reject(new TypeError('tlsFetch: unsupported body type'));
    });
  };
}

export class Client {
  /**
   * @param {string} url  the daemon's base URL, e.g. "http://127.0.0.1:8080"
   * @param {object} [o]
   * @param {string} [o.apiKey]        sent as Authorization: Bearer KEY
   * @param {number} [o.retries=4]     retries after the first attempt for
   *        network errors, timeouts and 503 answers
   * @param {number} [o.timeoutMs=60000] per attempt
   * @param {number} [o.backoffMs=50]  first retry delay; doubles per retry
   * @param {number} [o.maxBackoffMs=2000] largest retry delay
   * @param {number} [o.binaryThreshold=256] vectors of more elements go as
   *        binary bodies; smaller ones as JSON
   * @param {Function} [o.fetch]       a fetch to use instead of the global one
   * @param {boolean} [o.verifyParams=true] check the params of every answer
   *        against its Optd-Params-Crc32 (CRC-32 of the params in the
   *        session's dtype); a mismatch throws ParamsDigestMismatch
   * @param {string|null} [o.wire=null] "bfloat16" or "float16": gradients
   *        are sent and params received in that 16-bit form (always binary);
   *        null: the session's dtype.  Each call may override it.
   * @param {string} [o.caFile]        Node, https:// URLs: a PEM bundle the
   *        daemon's certificate must verify against (default: Node's CAs)
   * @param {string} [o.certFile]      Node: a PEM client certificate for a
   *        daemon started with --tls-client-ca (with o.keyFile)
   * @param {string} [o.keyFile]       Node: the PEM key of o.certFile
   */
  constructor(url, o = {}) {
    if (typeof url !== 'string' || !/^https?:\/\//i.test(url)) {
      throw new TypeError('url must be an http(s) URL, e.g. "http://127.0.0.1:8080"');
    }
    this.url = url.replace(/\/+$/, '');
    this.apiKey = o.apiKey ?? null;
    this.retries = o.retries ?? DEFAULTS.retries;
    this.timeoutMs = o.timeoutMs ?? 60000;
    this.backoffMs = o.backoffMs ?? DEFAULTS.backoffMs;
    this.maxBackoffMs = o.maxBackoffMs ?? DEFAULTS.maxBackoffMs;
    this.binaryThreshold = o.binaryThreshold ?? DEFAULTS.binaryThreshold;
    this.verifyParams = o.verifyParams ?? true;
    this.wire = checkWire(o.wire ?? null);
    const f = o.fetch ?? globalThis.fetch;
    // Called as a plain function: a browser's fetch throws "Illegal
    // invocation" when called as a method of another object.
    this._fetch = typeof f === 'function' ? (u, init) => f(u, init) : f;
    if (o.caFile != null || o.certFile != null || o.keyFile != null) {
      if ((o.certFile == null) !== (o.keyFile == null)) throw new TypeError('certFile and keyFile go together');
      if (!/^https:/i.test(url)) throw new TypeError('caFile, certFile and keyFile need an https:// URL');
      if (o.fetch) throw new TypeError('pass fetch or caFile/certFile/keyFile, not both');
      this._fetch = tlsFetch({ caFile: o.caFile, certFile: o.certFile, keyFile: o.keyFile });
    }
    if (typeof this._fetch !== 'function') throw new TypeError('no fetch on this platform: pass options.fetch');
  }

  /**
   * One call with retries.  `handle(res)` reads a successful answer; it runs
   * inside the attempt so that a connection lost mid-body is retried too.
   * `ok` lists the statuses that are answers, not errors.  Every call here is
   * safe to repeat: PUT and PATCH set state, steps carry an Idempotency-Key.
   */
  async _request(method, path, { headers = {}, body, ok = [200], handle, onRetry404 } = {}) {
    const h = { ...headers };
    if (this.apiKey) h.Authorization = `Bearer ${this.apiKey}`;
    let lastError;
    for (let attempt = 0; ; attempt++) {
      let res;
      let retryAfterMs = 0;
      try {
        res = await this._fetch(this.url + path, {
          method,
          headers: h,
          body,
          signal: AbortSignal.timeout(this.timeoutMs),
        });
        if (ok.includes(res.status)) return await handle(res);
        if (res.status === 404 && attempt > 0 && onRetry404) {
          // An earlier attempt may have done the work before its answer was
          // lost (a DELETE): the 404 is then its success.
          await res.body?.cancel();
          return onRetry404();
        }
        const err = await errorFromResponse(res);
        const ra = Number(res.headers.get('retry-after'));
        // A 429 is waited out only when it names a short wait (a token's
        // step rate); a session quota (a longer Retry-After) is thrown.
        const shortWait = Number.isFinite(ra) && ra > 0 && ra <= DEFAULTS.retryAfterMaxS;
        if (res.status !== 503 && !(res.status === 429 && shortWait)) throw err;
        lastError = err;
        if (Number.isFinite(ra) && ra > 0) retryAfterMs = ra * 1000;
      } catch (e) {
        if (e instanceof OptdError) throw e;
        if (e instanceof SyntaxError || e instanceof RangeError) {
          // A malformed answer will not heal on a retry.
          throw new OptdError({ status: res?.status ?? 0, detail: `bad answer: ${e.message}`, cause: e });
        }
        // fetch rejects with TypeError on network failure and with
        // TimeoutError/AbortError when the attempt's signal fires.
        const what = e?.name === 'TimeoutError' ? `timed out after ${this.timeoutMs} ms` : e?.cause?.message ?? e?.message;
        lastError = new OptdError({ status: 0, detail: `${method} ${path}: ${what}`, cause: e });
        if (e?.tlsVerify) throw lastError; // the certificate will not verify next time either
      }
      if (attempt >= this.retries) throw lastError;
      // Exponential backoff with "equal jitter": half the cap is waited for
      // sure, the other half at random, so retrying clients spread out.
      const cap = Math.min(this.maxBackoffMs, this.backoffMs * 2 ** attempt);
      const delay = Math.max(cap / 2 + Math.random() * (cap / 2), Math.min(retryAfterMs, DEFAULTS.retryAfterMaxS * 1000));
      await sleep(delay);
    }
  }

  async _json(method, path, body, ok = [200]) {
    return this._request(method, path, {
      headers: body === undefined ? { Accept: JSON_TYPE } : { Accept: JSON_TYPE, 'Content-Type': JSON_TYPE },
      body: body === undefined || typeof body === 'string' ? body : JSON.stringify(body),
      ok,
      handle: async (res) => ({ status: res.status, doc: res.status === 204 ? null : await res.json(), res }),
    });
  }

  /**
   * Creates a session, or verifies that one of the same config exists.
   * Resolves to a Session whose `created` is true (201) or false (200); a
   * session of a different config throws OptdError 409.
   *
   * Nested objects (optimizer, init, schedule, clip, mode) use the daemon's
   * names, which are torch.optim's: {type: 'adam', lr: 1e-3, weight_decay: 0}.
   * `optimizer` may also be just the type name.
   */
  async createSession(name, opts = {}) {
    checkName(name);
    const { optimizer, params, size, init, dtype, schedule, clip, mode, nonfinite, metadata, retain, tensors, groups } = opts;
    const body = {};
    let vec = null;
    if (optimizer !== undefined) body.optimizer = typeof optimizer === 'string' ? { type: optimizer } : optimizer;
    // A typed array says its dtype; an explicit dtype wins.
    const dt = dtype ?? dtypeOf(params);
    // Untyped params (or a dtype unknown here, which the daemon will name in
    // its 400) go as float64 text: the daemon rounds to the session dtype.
    if (params !== undefined) vec = toTypedArray(params, dt in DTYPES ? dt : 'float64');
    if (size !== undefined) body.size = size;
    if (init !== undefined) body.init = init;
    if (dt !== undefined) body.dtype = dt;
    if (schedule !== undefined) body.schedule = schedule;
    if (clip !== undefined) body.clip = clip;
    if (mode !== undefined) body.mode = mode;
    if (nonfinite !== undefined) body.nonfinite = nonfinite;
    if (metadata !== undefined) body.metadata = metadata;
    if (retain !== undefined) body.retain = retain;
    // The layout: ordered {name, shape} (the vector is their concatenation;
    // size may then be left out) and torch's param groups, each listing its
    // tensors by name and overriding any hyperparameter.
    if (tensors !== undefined) body.tensors = tensors.map((t) => ({ name: t.name, shape: [...t.shape] }));
    if (groups !== undefined) body.groups = groups;
    const { status, doc } = await this._json('PUT', `/v1/sessions/${name}`, vec ? jsonWithVector('params', vec, body) : body, [
      200, 201,
    ]);
    const s = new Session(this, name, doc);
    s.created = status === 201;
    return s;
  }

  /**
   * Creates session `name` from session `from` as it was after `step`
   * (default: its current step), sharing nothing with it.  `changes` are
   * what PATCH takes ({optimizer: {lr}}, schedule, retain, ...); `replay:
   * true` re-applies `from`'s logged gradients after `step` under the new
   * config (a counterfactual run).  Resolves to the new Session.
   */
  async fork(name, from, { step, replay = false, ...changes } = {}) {
    checkName(name);
    const body = { ...changes, fork: { from: checkName(from) } };
    if (step !== undefined) body.fork.step = step;
    if (replay) body.replay = true;
    const { doc } = await this._json('PUT', `/v1/sessions/${name}`, body, [201]);
    const s = new Session(this, name, doc);
    s.created = true;
    return s;
  }

  /** Creates session `name` from an export file (Session.export). */
  async importSession(name, data) {
    checkName(name);
    const doc = await this._request('PUT', `/v1/sessions/${name}/export`, {
      headers: { Accept: JSON_TYPE, 'Content-Type': BINARY_TYPE },
      body: data,
      ok: [201],
      handle: async (res) => res.json(),
    });
    const s = new Session(this, name, doc);
    s.created = true;
    return s;
  }

  /** A handle on an existing session (no request is made). */
  session(name) {
    return new Session(this, checkName(name));
  }

  /**
   * Every session, in name order: an async iterator that fetches the pages
   * (`pageSize` sessions each, at most 1000) as it goes.  Each item is a
   * summary {name, step, optimizer, dtype, size, created_at, updated_at}.
   * `after` starts after that name.
   */
  async *sessions({ pageSize = 100, after = null } = {}) {
    const limit = pageClamp(pageSize);
    let cursor = after;
    for (;;) {
      const q = `?limit=${limit}${cursor ? `&after=${encodeURIComponent(cursor)}` : ''}`;
      const { doc } = await this._json('GET', `/v1/sessions${q}`);
      for (const s of doc.sessions) yield s;
      if (!doc.next) return;
      cursor = doc.next;
    }
  }

  /** The catalogue of optimizers, schedules, clips and modes with defaults. */
  async optimizers() {
    return (await this._json('GET', '/v1/optimizers')).doc;
  }

  /** GET /healthz: {status: "ok", ...}. */
  async health() {
    return (await this._json('GET', '/healthz')).doc;
  }

  /**
   * POST /v1/tokens (the admin key only): mints a token.  `scopes`: any of
   * 'read', 'step', 'admin' (each holds the ones before it); `prefix`: the
   * session-name prefix it is bound to ('' = every name); `expiresIn`
   * seconds or `expiresAt` (RFC 3339 UTC); `quotas`: {max_sessions,
   * max_params, steps_per_second, burst}.  Resolves to the token's
   * document; its secret, `token`, is shown this once.
   */
  async createToken(scopes, { prefix = '', label, expiresIn, expiresAt, quotas } = {}) {
    const body = { scopes: [...scopes], prefix };
    if (label !== undefined) body.label = label;
    if (expiresIn !== undefined) body.expires_in = expiresIn;
    if (expiresAt !== undefined) body.expires_at = expiresAt;
    if (quotas !== undefined) body.quotas = quotas;
    return (await this._json('POST', '/v1/tokens', body, [201])).doc;
  }

  /** GET /v1/tokens (the admin key only): every token, never a secret. */
  async listTokens() {
    return (await this._json('GET', '/v1/tokens')).doc.tokens;
  }

  /** GET /v1/tokens/{id} (the admin key only): the token and its usage. */
  async getToken(id) {
    return (await this._json('GET', `/v1/tokens/${checkName(id)}`)).doc;
  }

  /** DELETE /v1/tokens/{id} (the admin key only): revokes the token. */
  async revokeToken(id) {
    await this._json('DELETE', `/v1/tokens/${checkName(id)}`, undefined, [204]);
  }
}

/** Headers of a step (JSON or binary): the absent tensors, and per group (in
 * group order, comma-separated) the client-driven hyperparameters. */
const STEP_HEADERS = {
  absent: 'Optd-Absent',
  lr: 'Optd-Group-Lr',
  momentum: 'Optd-Group-Momentum',
  beta1: 'Optd-Group-Beta1',
};
const GROUP_STEP_KEYS = ['lr', 'momentum', 'beta1'];

function checkAbsent(absent) {
  if (!Array.isArray(absent)) throw new TypeError('absent must be an array of tensor indices or names');
  for (const a of absent) {
    const ok = typeof a === 'string' ? a.length > 0 : Number.isInteger(a) && a >= 0;
    if (!ok) throw new TypeError(`absent lists tensor indices or names, not ${JSON.stringify(a)}`);
  }
  return absent;
}

/** "0-57,60" from tensor indices. */
export function indexRanges(indices) {
  const v = [...new Set(indices)].sort((a, b) => a - b);
  const out = [];
  for (const i of v) {
    const last = out[out.length - 1];
    if (last && last[1] === i - 1) last[1] = i;
    else out.push([i, i]);
  }
  return out.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(',');
}

/** One object per group, each with the same keys among lr, momentum, beta1. */
function checkStepGroups(groups) {
  if (!Array.isArray(groups)) throw new TypeError('groups must be an array with one object per group');
  const keys = Object.keys(groups[0] || {}).sort().join();
  groups.forEach((g, i) => {
    for (const [k, v] of Object.entries(g)) {
      if (!GROUP_STEP_KEYS.includes(k)) throw new TypeError(`groups[${i}]: a step carries only lr, momentum, beta1, not ${k}`);
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`groups[${i}].${k} must be a finite number`);
    }
    if (Object.keys(g).sort().join() !== keys) throw new TypeError('every group of a step must carry the same hyperparameters');
  });
  return groups;
}

/** 17 significant digits: every double reads back exactly. */
function exact(x) {
  return x.toPrecision(17);
}

function groupHeaders(groups) {
  checkStepGroups(groups);
  const h = {};
  for (const k of Object.keys(groups[0])) h[STEP_HEADERS[k]] = groups.map((g) => exact(g[k])).join(',');
  return h;
}

export class Session {
  constructor(client, name, doc = null) {
    this.client = client;
    this.name = name;
    this.path = `/v1/sessions/${name}`;
    /** true when createSession made it, false when it existed. */
    this.created = undefined;
    /** The step count the daemon reported in the last step/params call. */
    this.lastStep = null;
    /** The lr used by the update of the last step call; null when that call
     * applied no update (202 pending accumulation, skipped non-finite). */
    this.lastLr = null;
    this._dtype = null;
    this._size = null;
    if (doc) this._remember(doc);
  }

  get dtype() {
    return this._dtype;
  }

  get size() {
    return this._size;
  }

  _remember(doc) {
    this._dtype = doc.dtype;
    this._size = doc.size;
    /** The layout [{name, shape, offset, size}] and the param groups, from
     * the last session document seen. */
    if (doc.tensors) this.tensors = doc.tensors;
    if (doc.groups) this.groups = doc.groups;
  }

  /** Absent tensors as indices (the binary form carries indices only). */
  async _indices(absent) {
    checkAbsent(absent);
    if (absent.some((a) => typeof a === 'string') && !this.tensors) await this.info();
    return absent.map((a) => {
      if (typeof a === 'number') return a;
      const i = (this.tensors || []).findIndex((t) => t.name === a);
      if (i < 0) throw new RangeError(`session ${this.name} has no tensor named ${JSON.stringify(a)}`);
      return i;
    });
  }

  /** dtype and size are needed to encode and decode binary vectors. */
  async _meta() {
    if (this._dtype === null) await this.info();
    return { dtype: this._dtype, size: this._size };
  }

  /** The 16-bit form of one call: its own `wire` when given, else the client's. */
  _wire(wire, json) {
    const w = checkWire(wire === undefined ? this.client.wire : wire);
    if (w !== null && json === true) throw new RangeError(`${w} travels only as a binary body; leave json out`);
    return w;
  }

  _binary(n, json) {
    if (json === true) return false;
    if (json === false) return true;
    return n > this.client.binaryThreshold;
  }

  /** The session document: config with defaults, step, lr, state, counters. */
  async info() {
    const { doc } = await this.client._json('GET', this.path);
    this._remember(doc);
    return doc;
  }

  /**
   * One optimizer step.  Resolves to the new params (a typed array of the
   * session's dtype), or null with `params: false`.  Options: loss,
   * baseStep (staleness bound), worker, params (default true), json (true:
   * JSON body and answer; false: binary; default: binary above the client's
   * binaryThreshold), idempotencyKey (default: a fresh one, reused by this
   * call's retries), wire ("bfloat16" / "float16": the gradient is sent and
   * the params received in 16 bits; null: the session's dtype; default the
   * client's).  `lastStep` and `lastLr` are updated; `stepResult` gives
   * the full answer.
   */
  async step(grad, opts = {}) {
    return (await this.stepResult(grad, opts)).params;
  }

  /**
   * Like step, but resolves to {status, step, lr, params, pending, replayed,
   * skipped}: status 200 (applied, replayed or skipped) or 202 (accumulated,
   * `pending` gradients waiting for the update).
   */
  async stepResult(grad, { loss, baseStep, worker, params = true, json, idempotencyKey, wire, absent, groups } = {}) {
    const w = this._wire(wire, json);
    const { dtype } = await this._meta();
    const g = toTypedArray(grad, dtype);
    const finite = allFinite(g);
    let binary = w !== null || this._binary(g.length, json);
    if (!finite) {
      // JSON cannot carry NaN or Inf; the daemon must see them to refuse or
      // skip them as the session's nonfinite policy says.
      if (json === true) throw new RangeError('grad contains NaN or Inf, which JSON cannot carry: send it binary');
      binary = true;
    }
    const key = idempotencyKey ?? (await newIdempotencyKey());
    const headers = { [HEADERS.idempotencyKey]: key };
    // Absent tensors and group values travel in headers, whichever the body.
    if (absent && absent.length) headers[STEP_HEADERS.absent] = indexRanges(await this._indices(absent));
    if (groups && groups.length) Object.assign(headers, groupHeaders(groups));
    let body;
    if (binary) {
      headers['Content-Type'] = BINARY_TYPE;
      headers.Accept = BINARY_TYPE;
      headers[HEADERS.dtype] = w ?? dtype;
      if (w !== null) headers[PARAMS_DTYPE_HEADER] = w;
      if (loss !== undefined && loss !== null) headers[HEADERS.loss] = String(loss);
      if (baseStep !== undefined && baseStep !== null) headers[HEADERS.baseStep] = String(baseStep);
      if (worker !== undefined && worker !== null) headers[HEADERS.worker] = String(worker);
      body = w === null ? encodeVector(g, dtype) : narrowVector(g, w);
    } else {
      headers['Content-Type'] = JSON_TYPE;
      headers.Accept = JSON_TYPE;
      const b = {};
      if (loss !== undefined && loss !== null) b.loss = loss;
      if (baseStep !== undefined && baseStep !== null) b.base_step = baseStep;
      if (worker !== undefined && worker !== null) b.worker = worker;
      body = jsonWithVector('grad', g, b);
    }
    const q = params ? '' : '?params=false';
    const r = await this.client._request('POST', `${this.path}/step${q}`, {
      headers,
      body,
      ok: [200, 202],
      handle: (res) => this._readParams(res, dtype, params),
    });
    const h = r.headers;
    const out = {
      status: r.status,
      step: r.step,
      lr: r.status === 200 && h.get(HEADERS.skipped) !== 'true' ? r.lr : null,
      params: r.params,
      pending: r.status === 202 ? Number(h.get(HEADERS.pending)) : 0,
      replayed: h.get(HEADERS.replayed) === 'true',
      skipped: h.get(HEADERS.skipped) === 'true',
    };
    this.lastStep = out.step;
    this.lastLr = out.lr;
    return out;
  }

  /** Reads a params answer, JSON or binary, into {status, step, lr, params, headers}. */
  async _readParams(res, dtype, wantParams = true) {
    const ct = res.headers.get('content-type') ?? '';
    const hs = res.headers.get(HEADERS.step);
    const hl = res.headers.get(HEADERS.lr);
    let step = hs === null ? null : Number(hs);
    let lr = hl === null ? null : Number(hl);
    let params = null;
    let raw = null;
    let half = false; // a 16-bit answer rounds the params: the digest is not checked
    if (ct.startsWith(BINARY_TYPE)) {
      const buf = await res.arrayBuffer();
      if (wantParams) {
        // Optd-Dtype names the form the params came in.
        const form = res.headers.get(HEADERS.dtype);
        if (WIRES.includes(form)) {
          params = widenVector(buf, form, dtype);
          half = true;
        } else {
          raw = new Uint8Array(buf);
          params = decodeVector(buf, dtype);
        }
        if (this._size !== null && params.length !== this._size) {
          throw new RangeError(`answer has ${params.length} params; the session has ${this._size}`);
        }
      }
    } else {
      const doc = await res.json();
      // The body's step is the one a replay answers; prefer it.
      if (typeof doc.step === 'number') step = doc.step;
      if (typeof doc.lr === 'number') lr = doc.lr;
      if (wantParams && doc.params) params = toTypedArray(doc.params, dtype);
    }
    const expected = res.headers.get(HEADERS.paramsCrc32);
    if (params && !half && expected !== null && this.client.verifyParams) {
      const actual = crc32Hex(raw ?? encodeVector(params, dtype));
      if (actual !== expected.toLowerCase()) {
        throw new ParamsDigestMismatch({ status: res.status, expected, actual });
      }
    }
    return { status: res.status, step, lr, params, headers: res.headers };
  }

  /**
   * The current params as a typed array of the session's dtype; `wire` as
   * for step (received in 16 bits, widened).
   */
  async params({ json, wire } = {}) {
    const w = this._wire(wire, json);
    const { dtype, size } = await this._meta();
    const binary = w !== null || this._binary(size, json);
    const headers = { Accept: binary ? BINARY_TYPE : JSON_TYPE };
    if (w !== null) headers[PARAMS_DTYPE_HEADER] = w;
    const r = await this.client._request('GET', `${this.path}/params`, {
      headers,
      handle: (res) => this._readParams(res, dtype),
    });
    this.lastStep = r.step;
    return r.params;
  }

  /**
   * Overwrites the params (the optimizer state stays).  Resolves to the step.
   * `wire` as for step (sent in 16 bits).
   */
  async setParams(v, { json, wire } = {}) {
    const w = this._wire(wire, json);
    const { dtype } = await this._meta();
    const t = toTypedArray(v, dtype);
    const binary = w !== null || this._binary(t.length, json) || !allFinite(t);
    const r = await this.client._request('PUT', `${this.path}/params`, {
      headers: binary
        ? { 'Content-Type': BINARY_TYPE, Accept: JSON_TYPE, [HEADERS.dtype]: w ?? dtype }
        : { 'Content-Type': JSON_TYPE, Accept: JSON_TYPE },
      body: w !== null ? narrowVector(t, w) : binary ? encodeVector(t, dtype) : jsonWithVector('params', t),
      handle: (res) => this._readParams(res, dtype, false),
    });
    this.lastStep = r.step;
    return r.step;
  }

  /**
   * PATCH: changes some of optimizer (hyperparameters, e.g. {lr: 1e-4}),
   * schedule, clip, mode, metadata.  Resolves to the new session document.
   */
  async update(changes) {
    const { doc } = await this.client._json('PATCH', this.path, changes);
    this._remember(doc);
    return doc;
  }

  /**
   * The step log's metrics {step, time, lr, loss, grad_norm, update_norm,
   * worker?}, oldest first: every step after `after` (default 0), at most
   * `limit` of them, fetched `pageSize` (at most 1000) at a time.
   */
  async history({ after = 0, limit = Infinity, pageSize = LIST_PAGE_MAX } = {}) {
    const page = pageClamp(pageSize);
    const out = [];
    let cursor = after;
    while (out.length < limit) {
      const n = Math.min(page, limit - out.length);
      const { doc } = await this.client._json('GET', `${this.path}/history?after=${cursor}&limit=${n}`);
      out.push(...doc.steps);
      if (doc.next === null || doc.next === undefined || doc.steps.length === 0) break;
      cursor = doc.next;
    }
    return out;
  }

  /** Keeps the current state as a checkpoint labelled `label`. */
  async checkpoint(label) {
    const { doc } = await this.client._json('POST', `${this.path}/checkpoints`, { label }, [201]);
    return doc;
  }

  /** {checkpoints: [{step, time, label, kind, bytes}], oldest_step, step}. */
  async checkpoints() {
    const { doc } = await this.client._json('GET', `${this.path}/checkpoints`);
    return doc;
  }

  /**
   * Returns the session to what it was after `step` (or at the checkpoint
   * `label`): later steps, checkpoints and idempotency keys are gone.
   * Resolves to the session document.
   */
  async rollback({ step, label } = {}) {
    if ((step === undefined) === (label === undefined)) throw new TypeError('give step or label');
    const { doc } = await this.client._json('POST', `${this.path}/rollback`, step !== undefined ? { step } : { label });
    this.lastStep = doc.step;
    return doc;
  }

  /** The whole session as one file (with `log: true`, its log too). */
  async export({ log = false } = {}) {
    return this.client._request('GET', `${this.path}/export?log=${log ? 'true' : 'false'}`, {
      headers: { Accept: BINARY_TYPE },
      handle: async (res) => new Uint8Array(await res.arrayBuffer()),
    });
  }

  /** Deletes the session and its state. */
  async delete() {
    await this.client._request('DELETE', this.path, {
      ok: [200, 204],
      handle: async (res) => {
        await res.body?.cancel();
      },
      onRetry404: () => undefined,
    });
  }
}

export default Client;
