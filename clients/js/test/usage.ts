// A typed use of every part of the client: test/install.test.js compiles it
// with `tsc --noEmit --strict` against optd.d.ts from the installed package.
import Default, {
  Client,
  DEFAULTS,
  HEADERS,
  NAME_PATTERN,
  OptdError,
  Session,
  decodeVector,
  encodeVector,
  errorKind,
  newIdempotencyKey,
  toTypedArray,
  type ErrorKind,
  type Params,
  type SessionDoc,
  type StepResult,
} from 'optd-client';
import { WIRES, narrowVector, widenVector, type Wire } from 'optd-client';

export async function train(url: string): Promise<number | null> {
  const c: Client = new Default(url, { apiKey: 'k', retries: DEFAULTS.retries, binaryThreshold: 16 });
  const s: Session = await c.createSession('mlp', {
    optimizer: { type: 'adam', lr: 1e-3, betas: [0.9, 0.999] },
    size: 4,
    init: { type: 'normal', std: 0.1, seed: 1 },
    schedule: { type: 'cosine', T_max: 100 },
    clip: null,
    dtype: 'float32',
  });
  const same: Session = await c.createSession('mlp2', { optimizer: 'sgd', params: new Float64Array([1, 2]) });
  const created: boolean | undefined = same.created;
  let p: Params = await s.params();
  const r: StepResult = await s.stepResult(p, { loss: 0.5, idempotencyKey: await newIdempotencyKey() });
  const next: Params | null = await s.step([0.1, 0.2, 0.3, 0.4], { json: true, baseStep: r.step });
  if (next) p = next;
  const doc: SessionDoc = await s.update({ optimizer: { lr: 1e-4 }, metadata: { note: 'lower' } });
  const steps = await s.history({ limit: 10 });
  for await (const summary of c.sessions({ pageSize: 10 })) console.log(summary.name, summary.step);
  const bytes: Uint8Array = encodeVector(p, 'float32');
  const back: Params = decodeVector(bytes, doc.dtype);
  const t: Params = toTypedArray([1, 2], 'float64');
  try {
    await c.session('gone').info();
  } catch (e) {
    if (e instanceof OptdError) {
      const k: ErrorKind = e.kind;
      console.log(e.status, e.field, k === errorKind(e.status, e.field), HEADERS.step, NAME_PATTERN);
    }
  }
  await s.setParams(back);
  const w: Wire = WIRES[0];
  const half: Params = await new Client(url, { wire: 'float16' }).session('mlp').params({ wire: w });
  await s.step(widenVector(narrowVector(half, 'bfloat16'), 'bfloat16', 'float32'), { wire: null });
  await s.delete();
  console.log(created, steps.length, t.length, (await c.health()).status);
  return s.lastStep;
}
