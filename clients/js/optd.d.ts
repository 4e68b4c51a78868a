// Type declarations of optd.js, the JavaScript client of the optd daemon.
// test.sh checks them with `tsc --noEmit --strict` against test/usage.ts.

export type DType = 'float32' | 'float64';
export type Vector = Float32Array | Float64Array | ArrayLike<number>;
export type Params = Float32Array | Float64Array;

/** Hyperparameters by torch.optim's names, plus `type`. */
export interface Typed {
  type: string;
  [hyperparameter: string]: unknown;
}

export interface ClientOptions {
  /** Sent as `Authorization: Bearer KEY`. */
  apiKey?: string | null;
  /** Retries after the first attempt (network errors, timeouts, 503). Default 4. */
  retries?: number;
  /** Per attempt; default 60000. */
  timeoutMs?: number;
  /** First retry delay, doubling per retry; default 50. */
  backoffMs?: number;
  /** Largest retry delay; default 2000. */
  maxBackoffMs?: number;
  /** Vectors of more elements travel as binary bodies; default 256. */
  binaryThreshold?: number;
  /** A fetch to use instead of the global one. */
  fetch?: typeof globalThis.fetch;
  /** Check answers' params against Optd-Params-Crc32; default true. */
  verifyParams?: boolean;
  /** Send gradients and receive params in 16 bits (always binary); default null: the session's dtype. */
  wire?: Wire | null;
  /** Node, https:// URLs: a PEM bundle the daemon's certificate must verify against (default: Node's CAs). */
  caFile?: string;
  /** Node: a PEM client certificate for a daemon started with --tls-client-ca (with keyFile). */
  certFile?: string;
  /** Node: the PEM private key of certFile. */
  keyFile?: string;
}

/** A fetch over node:https that verifies against caFile and presents certFile/keyFile (Node only). */
export function tlsFetch(files?: { caFile?: string; certFile?: string; keyFile?: string }): typeof globalThis.fetch;

/** A 16-bit wire form. */
export type Wire = 'bfloat16' | 'float16';

/** A token as the daemon lists it (never its secret). */
export interface TokenDoc {
  id: string;
  scopes: Array<'read' | 'step' | 'admin'>;
  prefix: string;
  label?: string;
  created_at: string;
  expires_at?: string;
  revoked_at?: string;
  quotas: { max_sessions?: number; max_params?: number; steps_per_second?: number; burst?: number };
}

export interface CreateOptions {
  /** `{type: 'adam', lr: 1e-3, ...}` or just the type name. */
  optimizer: string | Typed;
  params?: Vector;
  size?: number;
  init?: Typed;
  dtype?: DType;
  schedule?: Typed | null;
  clip?: Typed | null;
  mode?: Typed;
  nonfinite?: 'error' | 'skip';
  metadata?: Record<string, unknown> | null;
  retain?: { every_steps: number; keep: number } | null;
  /** The layout: ordered tensors; the vector is their concatenation. */
  tensors?: { name: string; shape: number[] }[];
  /** torch's param groups: tensor names plus hyperparameter overrides. */
  groups?: ({ tensors: string[] } & Record<string, unknown>)[];
}

/** What one step may carry per group (a scheduler's current values). */
export interface GroupStep {
  lr?: number;
  momentum?: number;
  /** betas[0] (OneCycleLR cycles it) */
  beta1?: number;
}

export interface UpdateChanges {
  /** Hyperparameters to change, e.g. `{lr: 1e-4}`. */
  optimizer?: Record<string, unknown>;
  /** One object per group, in group order: what to change in it ({} = nothing). */
  groups?: Record<string, unknown>[];
  schedule?: Typed | null;
  clip?: Typed | null;
  mode?: Typed;
  metadata?: Record<string, unknown> | null;
}

export interface StepOptions {
  loss?: number | null;
  baseStep?: number | null;
  worker?: string | null;
  /** false: the answer carries no params (the call resolves to null). */
  params?: boolean;
  /** true: JSON both ways; false: binary; default: by binaryThreshold. */
  json?: boolean;
  idempotencyKey?: string;
  /** This call's 16-bit form; null: the session's dtype; default: the client's. */
  wire?: Wire | null;
  /** Tensors without a gradient (indices or names); grad holds only the others. */
  absent?: (number | string)[];
  /** One entry per group: its lr / momentum / beta1 from this step on. */
  groups?: GroupStep[];
}

export interface StepResult {
  /** 200 applied (or replayed, or skipped); 202 accumulated, not yet applied. */
  status: number;
  step: number | null;
  lr: number | null;
  params: Params | null;
  pending: number;
  replayed: boolean;
  skipped: boolean;
}

/** The session document (GET /v1/sessions/{name}); see api/openapi.yaml. */
export interface SessionDoc {
  name: string;
  step: number;
  lr: number;
  dtype: DType;
  size: number;
  optimizer: Typed;
  schedule: Typed | null;
  clip: Typed | null;
  mode: Typed;
  nonfinite: 'error' | 'skip';
  metadata: Record<string, unknown> | null;
  created_at: string;
  updated_at: string;
  [member: string]: unknown;
}

export interface SessionSummary {
  name: string;
  step: number;
  optimizer: string;
  dtype: DType;
  size: number;
  created_at: string;
  updated_at: string;
}

export interface HistoryStep {
  step: number;
  time: string;
  lr: number;
  loss: number | null;
  grad_norm: number;
  update_norm: number;
  worker?: string;
}

export type ErrorKind =
  | 'invalid_request'
  | 'unauthorized'
  | 'not_found'
  | 'conflict'
  | 'stale_gradient'
  | 'unprocessable'
  | 'unavailable'
  | 'round_timeout'
  | 'server_error'
  | 'connection_failed'
  | 'digest_mismatch';

export const DEFAULTS: Readonly<{
  retries: number;
  backoffMs: number;
  maxBackoffMs: number;
  retryAfterMaxS: number;
  binaryThreshold: number;
}>;
export const NAME_PATTERN: string;
export const HEADERS: Readonly<{
  idempotencyKey: string;
  loss: string;
  baseStep: string;
  worker: string;
  dtype: string;
  step: string;
  lr: string;
  pending: string;
  replayed: string;
  skipped: string;
  paramsCrc32: string;
}>;

export function errorKind(status: number, field?: string | null): ErrorKind;
export function toTypedArray(v: Vector, dtype: DType): Params;
export function encodeVector(v: Vector, dtype: DType, hostLittleEndian?: boolean): Uint8Array;
export function decodeVector(buf: ArrayBuffer | ArrayBufferView, dtype: DType, hostLittleEndian?: boolean): Params;
export function newIdempotencyKey(): Promise<string>;
/** zlib's CRC-32 of bytes, as 8 lowercase hex digits. */
export function crc32Hex(bytes: Uint8Array): string;
export const WIRES: readonly Wire[];
export const PARAMS_DTYPE_HEADER: string;
export function f32ToBf16(bits: number): number;
export function bf16ToF32(bits: number): number;
export function f32ToF16(bits: number): number;
export function f16ToF32(bits: number): number;
export function narrowVector(v: Vector, wire: Wire): Uint8Array;
export function widenVector(buf: ArrayBuffer | ArrayBufferView, wire: Wire, dtype: DType): Params;

export class OptdError extends Error {
  constructor(o?: {
    status?: number;
    type?: string | null;
    title?: string | null;
    detail?: string | null;
    field?: string | null;
    step?: number | null;
    cause?: unknown;
  });
  /** HTTP status; 0 when no answer came. */
  readonly status: number;
  readonly type: string | null;
  readonly title: string | null;
  readonly detail: string | null;
  readonly field: string | null;
  readonly step: number | null;
  readonly kind: ErrorKind;
}

export interface Checkpoint {
  step: number;
  time: string;
  label: string | null;
  kind: 'auto' | 'anchor' | 'periodic' | 'label';
  bytes?: number;
}

/** An answer's params do not match its Optd-Params-Crc32. */
export class ParamsDigestMismatch extends OptdError {
  constructor(o: { status: number; expected: string; actual: string });
  readonly expected: string;
  readonly actual: string;
}

export class Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  retries: number;
  timeoutMs: number;
  backoffMs: number;
  maxBackoffMs: number;
  binaryThreshold: number;
  verifyParams: boolean;
  wire: Wire | null;
  createSession(name: string, options: CreateOptions): Promise<Session>;
  fork(name: string, from: string, options?: { step?: number; replay?: boolean } & UpdateChanges): Promise<Session>;
  importSession(name: string, data: Uint8Array | ArrayBuffer): Promise<Session>;
  session(name: string): Session;
  sessions(options?: { pageSize?: number; after?: string | null }): AsyncGenerator<SessionSummary, void, undefined>;
  optimizers(): Promise<Record<string, unknown>>;
  createToken(
    scopes: Array<'read' | 'step' | 'admin'>,
    opts?: {
      prefix?: string;
      label?: string;
      expiresIn?: number;
      expiresAt?: string;
      quotas?: { max_sessions?: number; max_params?: number; steps_per_second?: number; burst?: number };
    },
  ): Promise<TokenDoc & { token: string }>;
  listTokens(): Promise<TokenDoc[]>;
  getToken(id: string): Promise<TokenDoc & { usage: { sessions: number; params: number } }>;
  revokeToken(id: string): Promise<void>;
  health(): Promise<{ status: string; [member: string]: unknown }>;
}

export class Session {
  constructor(client: Client, name: string, doc?: SessionDoc | null);
  readonly client: Client;
  readonly name: string;
  /** true when createSession made it, false when it existed. */
  created: boolean | undefined;
  lastStep: number | null;
  lastLr: number | null;
  readonly dtype: DType | null;
  readonly size: number | null;
  /** The layout and the groups, from the last session document seen. */
  tensors?: { name: string; shape: number[]; offset: number; size: number }[];
  groups?: { tensors: string[]; optimizer: Record<string, unknown>; lr: number }[];
  info(): Promise<SessionDoc>;
  step(grad: Vector, options?: StepOptions): Promise<Params | null>;
  stepResult(grad: Vector, options?: StepOptions): Promise<StepResult>;
  params(options?: { json?: boolean; wire?: Wire | null }): Promise<Params>;
  setParams(v: Vector, options?: { json?: boolean; wire?: Wire | null }): Promise<number | null>;
  update(changes: UpdateChanges): Promise<SessionDoc>;
  history(options?: { after?: number; limit?: number; pageSize?: number }): Promise<HistoryStep[]>;
  checkpoint(label: string): Promise<Checkpoint>;
  checkpoints(): Promise<{ checkpoints: Checkpoint[]; oldest_step?: number; step: number }>;
  rollback(target: { step?: number; label?: string }): Promise<SessionDoc>;
  export(options?: { log?: boolean }): Promise<Uint8Array>;
  delete(): Promise<void>;
}

export default Client;
