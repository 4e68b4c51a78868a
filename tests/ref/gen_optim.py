#!/usr/bin/python3
"""Reference vectors for optd's optimizer kernels.

Writes tests/fixtures/optim/<optimizer>.txt, read by tests/test_optim_kernels.c.
Run by a developer from the repository root when the rules or the case list
change:

    /usr/bin/python3 tests/ref/gen_optim.py

Needs NumPy only (never PyTorch).  Every rule below is a transcription of
torch.optim 1.13.1's `_single_tensor_<name>` function (plus lion and SGD's
classic / bias-corrected momentum from optd's semantics), one NumPy operation
per torch tensor operation so that each is rounded in the vector's dtype T:
Python-float scalars are computed in double exactly as torch's code writes
them and converted with T(...) where they meet a tensor.  NumPy's float32
arithmetic, division and sqrt are correctly rounded, and nothing here lets
NumPy promote to float64 (`_vec` checks the dtype after every update).

Where torch keeps a scalar in a 0-dim tensor it is float32 (torch.tensor()
of a Python float uses the default dtype) whatever the parameters' dtype:
NAdam's mu_product and ASGD's eta and mu.  The reference rounds those to
float32 exactly where torch does.

Real torch agrees with these vectors bit for bit when its element-wise
kernels run without FMA (ATEN_CPU_CAPABILITY=default); its AVX2 build fuses
the multiply-add of add(..., alpha=) and differs by a few ulps, which is why
the rules are written out here rather than replayed through torch.

Inputs are index-addressable (tests/support/gen.c computes the same values):
value(seed, stream, i) is a splitmix64 hash of (seed, stream, i) mapped to a
double in [-1, 1) spread over eight binades, exactly 0 one time in sixteen;
stream 0 gives the initial parameters, stream t the gradient of update t.
Since every rule is elementwise, a 1000003-element case is computed only at
its sampled indices.

Fixture format, one record per line ('#' starts a comment):
    case <name>                    starts a case
    kind <optimizer>               sgd, adam, ... (torch's names)
    dtype float32|float64
    n <elements>                   (these six on lines of their own)
    steps <updates>
    seed <u64>
    pscale <a>                     params = T(pscale*value(seed,0,i))
    gscale <a>                     grad_t = T(gscale*value(seed,t,i))
    hp <field> <value>...          hyperparameter before the first update
    set <t> <field> <value>...     changed before update t (schedule, PATCH);
                                   the state (optim_state_init, and
                                   optim_buffer_init of every slot needed)
                                   is created after the sets of update 1,
                                   a slot a set turns on after that set
    check <t>                      state after update t:
    step <u64>                       optim_state.step
    scalar <name> <a>                a state scalar by optim_scalar_name
    vec <vector>                     params or a buffer (optim_buffer_name),
    <index> <a>                        then one line per sampled element
    end
Numbers marked <a> are C99 hex floats (exact).  Booleans are 0/1,
momentum_form is torch|classic.
"""

import math
import os
import sys
import zlib

import numpy as np

M64 = (1 << 64) - 1
F32 = np.float32


# ------------------------------------------------------------------ inputs

def splitmix64(x):
    """splitmix64's output function of x + golden gamma (Python int)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def splitmix64_np(x):
    """The same on a uint64 array (NumPy array arithmetic wraps mod 2^64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_key(seed, stream):
    return splitmix64(splitmix64(seed) ^ stream)


def values(seed, stream, idx):
    """Doubles in [-1, 1) for the indices idx (uint64 array)."""
    h = splitmix64_np(np.uint64(stream_key(seed, stream)) ^ idx)
    zero = (h & np.uint64(15)) == 0
    e = ((h >> np.uint64(4)) & np.uint64(7)).astype(np.int64)
    # (h >> 11) < 2^53 converts exactly; scaling by 2^-52 and 2^-e is exact.
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0
    v = u * np.ldexp(1.0, -e)
    v[zero] = 0.0
    return v


def sample_indices(n):
    """Every index of a small vector; for a large one the first 16, the
    last 40 (every vector-loop tail) and 64 spread over the middle."""
    if n <= 64:
        return np.arange(n, dtype=np.uint64)
    s = set(range(16)) | set(range(n - 40, n))
    for j in range(64):
        s.add(16 + splitmix64(0x5EED0000 + j) % (n - 56))
    return np.array(sorted(s), dtype=np.uint64)


# ------------------------------------------------------------------ rules
#
# st: {'step': int, 'buf': {name: array or None}, 'sc': {name: float}}.
# Each rule returns the new params; buffers are replaced in st['buf'].

def _vec(T, *arrays):
    for a in arrays:
        assert a.dtype == T, (a.dtype, T)
        assert np.all(np.isfinite(a)), "reference produced a non-finite value"


def _grad(hp, grad, p, T):
    """torch: grad = grad if not maximize else -grad; then weight decay."""
    g = -grad if hp.get('maximize', False) else grad
    if hp['weight_decay'] != 0:
        g = g + T(hp['weight_decay']) * p
    return g


def rule_sgd(hp, st, p, grad, T):
    t = st['step'] + 1
    g = _grad(hp, grad, p, T)
    m, d, lr = hp['momentum'], hp['dampening'], hp['lr']
    if m == 0:
        return p + T(-lr) * g
    torch_form = hp['momentum_form'] == 'torch'
    buf = st['buf'].get('momentum_buffer')
    if hp['bias_correction']:
        if buf is None:
            buf = np.zeros_like(p)
        if torch_form:
            buf = T(m) * buf + T(1 - d) * g
        else:
            buf = T(m) * buf + T((1 - d) * lr) * g
        st['buf']['momentum_buffer'] = buf
        vhat = buf / T(1 - math.pow(m, t))
        return p + T(-lr) * vhat if torch_form else p - vhat
    if not st['sc']['momentum_buffer_initialized']:
        buf = g.copy() if torch_form else T(lr) * g
        st['sc']['momentum_buffer_initialized'] = 1.0
    elif torch_form:
        buf = T(m) * buf + T(1 - d) * g
    else:
        buf = T(m) * buf + T((1 - d) * lr) * g
    st['buf']['momentum_buffer'] = buf
    if torch_form:
        upd = g + T(m) * buf if hp['nesterov'] else buf
        return p + T(-lr) * upd
    if hp['nesterov']:
        return p - (T(lr) * g + T(m) * buf)
    return p - buf


def rule_adagrad(hp, st, p, grad, T):
    step = float(st['step'] + 1)
    g = _grad(hp, grad, p, T)
    clr = hp['lr'] / (1 + (step - 1) * hp['lr_decay'])
    s = st['buf']['sum'] + (T(1) * g) * g
    st['buf']['sum'] = s
    std = np.sqrt(s) + T(hp['eps'])
    return p + (T(-clr) * g) / std


def rule_rmsprop(hp, st, p, grad, T):
    g = _grad(hp, grad, p, T)
    a = hp['alpha']
    sq = T(a) * st['buf']['square_avg']
    sq = sq + (T(1 - a) * g) * g
    st['buf']['square_avg'] = sq
    if hp['centered']:
        ga = T(a) * st['buf']['grad_avg']
        ga = ga + T(1 - a) * g
        st['buf']['grad_avg'] = ga
        avg = np.sqrt(sq + (T(-1) * ga) * ga)
    else:
        avg = np.sqrt(sq)
    avg = avg + T(hp['eps'])
    if hp['momentum'] > 0:
        buf = T(hp['momentum']) * st['buf']['momentum_buffer']
        buf = buf + (T(1) * g) / avg
        st['buf']['momentum_buffer'] = buf
        return p + T(-hp['lr']) * buf
    return p + (T(-hp['lr']) * g) / avg


def _adam_core(hp, st, p, g, T):
    step = float(st['step'] + 1)
    b1, b2 = hp['betas']
    m = T(b1) * st['buf']['exp_avg']
    m = m + T(1 - b1) * g
    v = T(b2) * st['buf']['exp_avg_sq']
    v = v + (T(1 - b2) * g) * g
    st['buf']['exp_avg'], st['buf']['exp_avg_sq'] = m, v
    bias_correction1 = 1 - b1 ** step
    bias_correction2 = 1 - b2 ** step
    step_size = hp['lr'] / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    if hp['amsgrad']:
        vmax = np.maximum(st['buf']['max_exp_avg_sq'], v)
        st['buf']['max_exp_avg_sq'] = vmax
        denom = np.sqrt(vmax) / T(bias_correction2_sqrt) + T(hp['eps'])
    else:
        denom = np.sqrt(v) / T(bias_correction2_sqrt) + T(hp['eps'])
    return p + (T(-step_size) * m) / denom


def rule_adam(hp, st, p, grad, T):
    return _adam_core(hp, st, p, _grad(hp, grad, p, T), T)


def rule_adamw(hp, st, p, grad, T):
    g = -grad if hp['maximize'] else grad
    p = p * T(1 - hp['lr'] * hp['weight_decay'])
    return _adam_core(hp, st, p, g, T)


def rule_adamax(hp, st, p, grad, T):
    step = float(st['step'] + 1)
    g = _grad(hp, grad, p, T)
    b1, b2 = hp['betas']
    m = T(b1) * st['buf']['exp_avg']
    m = m + T(1 - b1) * g
    ei = np.maximum(T(b2) * st['buf']['exp_inf'], np.abs(g) + T(hp['eps']))
    st['buf']['exp_avg'], st['buf']['exp_inf'] = m, ei
    clr = hp['lr'] / (1 - b1 ** step)
    return p + (T(-clr) * m) / ei


def rule_adadelta(hp, st, p, grad, T):
    g = _grad(hp, grad, p, T)
    rho, eps = hp['rho'], hp['eps']
    sq = T(rho) * st['buf']['square_avg']
    sq = sq + (T(1 - rho) * g) * g
    std = np.sqrt(sq + T(eps))
    delta = (np.sqrt(st['buf']['acc_delta'] + T(eps)) / std) * g
    acc = T(rho) * st['buf']['acc_delta']
    acc = acc + (T(1 - rho) * delta) * delta
    st['buf']['square_avg'], st['buf']['acc_delta'] = sq, acc
    return p + T(-hp['lr']) * delta


def rule_nadam(hp, st, p, grad, T):
    step = float(st['step'] + 1)
    b1, b2 = hp['betas']
    lr, md = hp['lr'], hp['momentum_decay']
    bias_correction2 = 1 - b2 ** step
    g = _grad(hp, grad, p, T)
    mu = b1 * (1. - 0.5 * (0.96 ** (step * md)))
    mu_next = b1 * (1. - 0.5 * (0.96 ** ((step + 1) * md)))
    # mu_product is torch.tensor(1.): float32, multiplied in float32.
    mp = F32(st['sc']['mu_product']) * F32(mu)
    mp_next = (mp * F32(mu)) * F32(mu_next)
    assert mp.dtype == F32 and mp_next.dtype == F32
    st['sc']['mu_product'] = float(mp)
    m = T(b1) * st['buf']['exp_avg']
    m = m + T(1 - b1) * g
    v = T(b2) * st['buf']['exp_avg_sq']
    v = v + (T(1 - b2) * g) * g
    st['buf']['exp_avg'], st['buf']['exp_avg_sq'] = m, v
    denom = np.sqrt(v / T(bias_correction2)) + T(hp['eps'])
    p = p + (T(-lr * (1. - mu) / (1. - float(mp))) * g) / denom
    return p + (T(-lr * mu_next / (1. - float(mp_next))) * m) / denom


def rule_radam(hp, st, p, grad, T):
    step = float(st['step'] + 1)
    b1, b2 = hp['betas']
    lr, eps = hp['lr'], hp['eps']
    bias_correction1 = 1 - b1 ** step
    bias_correction2 = 1 - b2 ** step
    g = _grad(hp, grad, p, T)
    m = T(b1) * st['buf']['exp_avg']
    m = m + T(1 - b1) * g
    v = T(b2) * st['buf']['exp_avg_sq']
    v = v + (T(1 - b2) * g) * g
    st['buf']['exp_avg'], st['buf']['exp_avg_sq'] = m, v
    bias_corrected_exp_avg = m / T(bias_correction1)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * step * (b2 ** step) / bias_correction2
    st['rectified'] = rho_t > 5.
    if rho_t > 5.:
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf /
                         ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        # Python float / tensor is tensor.reciprocal() * float in torch.
        adaptive_lr = (T(1) / (np.sqrt(v) + T(eps))) * T(math.sqrt(bias_correction2))
        upd = ((bias_corrected_exp_avg * T(lr)) * adaptive_lr) * T(rect)
        return p + T(-1.0) * upd
    return p + T(-1.0) * (bias_corrected_exp_avg * T(lr))


def rule_asgd(hp, st, p, grad, T):
    step = float(st['step'] + 1)
    lr, lambd, alpha, t0 = hp['lr'], hp['lambd'], hp['alpha'], hp['t0']
    g = _grad(hp, grad, p, T)
    eta, mu = st['sc']['eta'], st['sc']['mu']
    p = p * T(1 - lambd * eta)
    p = p + T(-eta) * g
    if mu != 1:
        st['buf']['ax'] = st['buf']['ax'] + (p - st['buf']['ax']) * T(mu)
    else:
        st['buf']['ax'] = p.copy()
    # eta and mu are float32 tensors in torch: torch.tensor(python float).
    st['sc']['eta'] = float(F32(lr / math.pow((1 + lambd * lr * step), alpha)))
    st['sc']['mu'] = float(F32(1 / max(1, step - t0)))
    return p


def rule_rprop(hp, st, p, grad, T):
    g = -grad if hp['maximize'] else grad
    etaminus, etaplus = hp['etas']
    smin, smax = hp['step_sizes']
    sign = np.sign(g * st['buf']['prev'])
    fac = np.where(sign > 0, T(etaplus), np.where(sign < 0, T(etaminus), T(1)))
    ss = np.minimum(np.maximum(st['buf']['step_size'] * fac, T(smin)), T(smax))
    g = np.where(fac == T(etaminus), T(0), g)
    st['buf']['step_size'], st['buf']['prev'] = ss, g
    return p + (T(-1) * np.sign(g)) * ss


def rule_lion(hp, st, p, grad, T):
    b1, b2 = hp['betas']
    lr, wd = hp['lr'], hp['weight_decay']
    m = st['buf']['exp_avg']
    c = T(b1) * m + T(1 - b1) * grad
    if wd != 0:
        p = p * T(1 - lr * wd)
    p = p + T(-lr) * np.sign(c)
    st['buf']['exp_avg'] = T(b2) * m + T(1 - b2) * grad
    return p


RULES = {
    'sgd': rule_sgd, 'adagrad': rule_adagrad, 'rmsprop': rule_rmsprop,
    'adam': rule_adam, 'adamw': rule_adamw, 'adamax': rule_adamax,
    'adadelta': rule_adadelta, 'nadam': rule_nadam, 'radam': rule_radam,
    'asgd': rule_asgd, 'rprop': rule_rprop, 'lion': rule_lion,
}

# torch 1.13's defaults (sgd's lr is required there; every case sets it).
DEFAULTS = {
    'sgd': dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0,
                nesterov=False, maximize=False, momentum_form='torch',
                bias_correction=False),
    'adagrad': dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                    initial_accumulator_value=0.0, eps=1e-10, maximize=False),
    'rmsprop': dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                    momentum=0.0, centered=False, maximize=False),
    'adam': dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False),
    'adamw': dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                  amsgrad=False, maximize=False),
    'adamax': dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   maximize=False),
    'adadelta': dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0,
                     maximize=False),
    'nadam': dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  momentum_decay=4e-3),
    'radam': dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    'asgd': dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                 maximize=False),
    'rprop': dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0),
                  maximize=False),
    'lion': dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
}


def buffers_of(kind, hp):
    """The state tensors torch keeps, in optd's slot order, with initial
    values (None: created lazily by the first update that uses it)."""
    def g(k):
        return hp.get(k)
    if kind == 'sgd':
        b = [('momentum_buffer', None if g('momentum') != 0 else 'off')]
    elif kind == 'adagrad':
        b = [('sum', g('initial_accumulator_value'))]
    elif kind == 'rmsprop':
        b = [('square_avg', 0.0),
             ('momentum_buffer', 0.0 if g('momentum') > 0 else 'off'),
             ('grad_avg', 0.0 if g('centered') else 'off')]
    elif kind in ('adam', 'adamw'):
        b = [('exp_avg', 0.0), ('exp_avg_sq', 0.0),
             ('max_exp_avg_sq', 0.0 if g('amsgrad') else 'off')]
    else:
        b = {
            'adamax': [('exp_avg', 0.0), ('exp_inf', 0.0)],
            'adadelta': [('square_avg', 0.0), ('acc_delta', 0.0)],
            'nadam': [('exp_avg', 0.0), ('exp_avg_sq', 0.0)],
            'radam': [('exp_avg', 0.0), ('exp_avg_sq', 0.0)],
            'asgd': [('ax', 0.0)],
            'rprop': [('prev', 0.0), ('step_size', g('lr'))],
            'lion': [('exp_avg', 0.0)],
        }[kind]
    return [(name, init) for name, init in b if init != 'off']


def scalars_init(kind, hp):
    if kind == 'sgd':
        return {'momentum_buffer_initialized': 0.0}
    if kind == 'nadam':
        return {'mu_product': 1.0}
    if kind == 'asgd':
        return {'eta': float(F32(hp['lr'])), 'mu': 1.0}
    return {}


def scalars_checked(kind, hp):
    """Scalars whose value the contract pins down for this configuration
    (whether bias-corrected SGD marks its buffer initialised is not)."""
    if kind == 'sgd' and hp['bias_correction'] and hp['momentum'] != 0:
        return []
    return list(scalars_init(kind, hp))


# ------------------------------------------------------------------ cases

class Case:
    def __init__(self, name, kind, dtype, n, steps, hp, sets=None,
                 checks=None, full_checks=None, pscale=1.0, gscale=0.5):
        self.name, self.kind, self.dtype, self.n = name, kind, dtype, n
        self.steps = steps
        self.hp = dict(DEFAULTS[kind])
        self.hp.update(hp)
        self.sets = sets or {}          # t -> {field: value}
        self.seed = zlib.crc32(name.encode())
        self.pscale, self.gscale = pscale, gscale
        if checks is None:
            checks = [1, 2, 3, steps]
        self.checks = sorted(set(c for c in checks if 1 <= c <= steps))
        # Buffers are compared at update 3 and at the end (and where a case
        # asks); the other checks compare params and scalars only.
        self.full_checks = set(full_checks or []) | {3, steps}


def hexf(x):
    """C99 hex float, trailing zero digits dropped (strtod reads it back)."""
    s = float(x).hex()
    mant, exp = s.split('p')
    if '.' in mant:
        mant = mant.rstrip('0').rstrip('.')
    return mant + 'p' + exp


def fmt_value(field, v):
    if field == 'momentum_form':
        return v
    if isinstance(v, bool):
        return '1' if v else '0'
    if isinstance(v, (tuple, list)):
        return ' '.join(hexf(x) for x in v)
    return hexf(v)


def comment_value(v):
    if isinstance(v, (tuple, list)):
        return '(' + ', '.join(repr(float(x)) for x in v) + ')'
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    return repr(float(v))


def run_case(case, out):
    T = np.float32 if case.dtype == 'float32' else np.float64
    idx = sample_indices(case.n)
    hp = dict(case.hp)
    p = (values(case.seed, 0, idx) * case.pscale).astype(T)
    st = {'step': 0, 'buf': {}, 'sc': None}

    def ensure_buffers():
        for name, init in buffers_of(case.kind, hp):
            if name not in st['buf']:
                st['buf'][name] = None if init is None else np.full(len(idx), T(init), dtype=T)

    w = out.append
    w('case %s' % case.name)
    w('kind %s' % case.kind)
    w('dtype %s' % case.dtype)
    w('n %d' % case.n)
    w('steps %d' % case.steps)
    w('seed %d' % case.seed)
    w('pscale %s' % hexf(case.pscale))
    w('gscale %s' % hexf(case.gscale))
    for field in sorted(hp):
        w('hp %s %s  # %s' % (field, fmt_value(field, hp[field]), comment_value(hp[field])))
    rect = set()
    for t in range(1, case.steps + 1):
        for field, v in sorted(case.sets.get(t, {}).items()):
            hp[field] = v
            w('set %d %s %s  # %s' % (t, field, fmt_value(field, v), comment_value(v)))
        if st['sc'] is None:
            # torch creates the state inside the first step(), from the
            # hyperparameters of that step (rprop's step_size and asgd's eta
            # start at the lr the schedule gives update 1).
            st['sc'] = scalars_init(case.kind, hp)
        ensure_buffers()
        g = (values(case.seed, t, idx) * case.gscale).astype(T)
        p = RULES[case.kind](hp, st, p, g, T)
        st['step'] = t
        _vec(T, p, *[b for b in st['buf'].values() if b is not None])
        if st.get('rectified') is not None:
            rect.add(st['rectified'])
        if t in case.checks:
            w('check %d' % t)
            w('step %d' % t)
            for name in scalars_checked(case.kind, hp):
                w('scalar %s %s' % (name, hexf(st['sc'][name])))
            vecs = [('params', p)]
            if t in case.full_checks:
                vecs += [(k, b) for k, b in st['buf'].items() if b is not None]
            for name, vec in vecs:
                w('vec %s' % name)
                for i, x in zip(idx, vec):
                    w('%d %s' % (i, hexf(x)))
    w('end')
    w('')
    return rect


# ------------------------------------------------------------------ case list

SMALL_STEPS = 120
BIG_N = 1000003
BIG_STEPS = 101

# Flag variants of every optimizer (each run at n = 37 in both dtypes).
CONFIGS = {
    'sgd': {
        'plain': {},
        'wd_maximize': dict(weight_decay=1e-2, maximize=True),
        'momentum': dict(momentum=0.9),
        'momentum_dampening_wd': dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
        'nesterov_wd': dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        'nesterov_maximize': dict(momentum=0.5, nesterov=True, maximize=True),
        'classic': dict(momentum=0.9, momentum_form='classic'),
        'classic_dampening_maximize': dict(momentum=0.8, dampening=0.3,
                                           momentum_form='classic', maximize=True),
        'classic_nesterov_wd': dict(momentum=0.9, nesterov=True,
                                    momentum_form='classic', weight_decay=1e-2),
        'bias_correction': dict(momentum=0.9, dampening=0.1, bias_correction=True),
        'bias_correction_classic': dict(momentum=0.9, bias_correction=True,
                                        momentum_form='classic', weight_decay=1e-3),
        'bias_correction_off': dict(momentum=0.0, bias_correction=True,
                                    momentum_form='classic'),
    },
    'adagrad': {
        'plain': {},
        'lr_decay': dict(lr_decay=0.05),
        'initial_accumulator': dict(initial_accumulator_value=0.1),
        'wd_maximize': dict(weight_decay=1e-2, maximize=True),
        'all': dict(lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.3,
                    weight_decay=1e-3, eps=1e-6, maximize=True),
    },
    'rmsprop': {
        'plain': {},
        'centered': dict(centered=True),
        'momentum': dict(momentum=0.9),
        'centered_momentum': dict(centered=True, momentum=0.5, alpha=0.9),
        'wd_maximize': dict(weight_decay=1e-2, maximize=True),
        'all': dict(lr=1e-3, alpha=0.95, eps=1e-6, centered=True, momentum=0.8,
                    weight_decay=1e-3, maximize=True),
    },
    'adam': {
        'plain': {},
        'amsgrad': dict(amsgrad=True),
        'wd': dict(weight_decay=1e-2),
        'maximize': dict(maximize=True),
        'betas': dict(betas=(0.5, 0.9), eps=1e-6, lr=1e-2),
        'all': dict(amsgrad=True, weight_decay=1e-2, maximize=True, betas=(0.8, 0.99)),
    },
    'adamw': {
        'plain': {},
        'amsgrad': dict(amsgrad=True),
        'no_wd': dict(weight_decay=0.0),
        'maximize': dict(maximize=True, weight_decay=0.1),
        'all': dict(amsgrad=True, weight_decay=0.05, maximize=True,
                    betas=(0.85, 0.995), lr=3e-3),
    },
    'adamax': {
        'plain': {},
        'wd': dict(weight_decay=1e-2),
        'maximize': dict(maximize=True),
        'all': dict(weight_decay=1e-2, maximize=True, betas=(0.8, 0.99), eps=1e-4),
    },
    'adadelta': {
        'plain': {},
        'wd': dict(weight_decay=1e-2),
        'maximize': dict(maximize=True),
        'rho': dict(rho=0.5, eps=1e-4, lr=0.5),
        'all': dict(rho=0.95, weight_decay=1e-2, maximize=True, lr=2.0),
    },
    'nadam': {
        'plain': {},
        'wd': dict(weight_decay=1e-2),
        'momentum_decay': dict(momentum_decay=0.05, betas=(0.8, 0.99)),
        'all': dict(weight_decay=1e-2, momentum_decay=1e-2, eps=1e-6, lr=1e-2),
    },
    'radam': {
        'plain': {},
        'wd': dict(weight_decay=1e-2),
        # rho_inf = 19: rectified from step 6 on, approaching rho_inf fast.
        'beta2_0_9': dict(betas=(0.8, 0.9), lr=1e-2),
        # rho_inf = 3: rho_t never exceeds 5, never rectified.
        'never_rectified': dict(betas=(0.9, 0.5)),
    },
    'asgd': {
        'plain': dict(t0=20.0),
        'lambd_alpha': dict(t0=10.0, lambd=0.05, alpha=0.5, lr=0.05),
        'wd_maximize': dict(t0=30.0, weight_decay=1e-2, maximize=True),
        'default_t0': {},
        't0_zero': dict(t0=0.0, lambd=1e-3),
    },
    'rprop': {
        'plain': {},
        'etas': dict(etas=(0.3, 1.5)),
        'step_sizes': dict(step_sizes=(1e-3, 0.05), lr=0.02),
        'maximize': dict(maximize=True),
        'all': dict(etas=(0.25, 1.9), step_sizes=(5e-3, 0.2), lr=0.1, maximize=True),
    },
    'lion': {
        'plain': {},
        'wd': dict(weight_decay=0.1, lr=1e-3),
        'betas': dict(betas=(0.5, 0.9), lr=3e-3),
    },
}

# The configuration run at every size (1, 7 and 1000003).
RICH = {
    'sgd': ['momentum_dampening_wd', 'classic_dampening_maximize', 'bias_correction'],
    'adagrad': ['all'], 'rmsprop': ['all'], 'adam': ['all'], 'adamw': ['all'],
    'adamax': ['all'], 'adadelta': ['all'], 'nadam': ['all'], 'radam': ['wd'],
    'asgd': ['t0_zero'], 'rprop': ['all'], 'lion': ['wd'],
}


def lr_schedule(lr0, steps):
    """A warmup from 0 then a cosine decay with a few jumps: the lr changes
    at every update, as a scheduler drives hp->lr."""
    out = {}
    warm = 10
    for t in range(1, steps + 1):
        if t <= warm:
            f = (t - 1) / warm
        else:
            f = 0.5 * (1 + math.cos(math.pi * (t - warm) / (steps - warm)))
            if t % 17 == 0:
                f *= 3.0
        out[t] = {'lr': lr0 * f}
    return out


def build_cases():
    cases = {k: [] for k in CONFIGS}
    for kind, configs in CONFIGS.items():
        for cname, hp in configs.items():
            for dt in ('float32', 'float64'):
                cases[kind].append(Case('%s_%s_%s_n37' % (kind, cname, 'f' + dt[-2:]),
                                        kind, dt, 37, SMALL_STEPS, hp))
        for cname in RICH[kind]:
            hp = configs[cname]
            for dt in ('float32', 'float64'):
                for n in (1, 7):
                    cases[kind].append(Case('%s_%s_%s_n%d' % (kind, cname, 'f' + dt[-2:], n),
                                            kind, dt, n, SMALL_STEPS, hp))
        # lr driven by a schedule, every update a different lr.
        sched_cfgs = {
            'sgd': ['momentum', 'nesterov_wd', 'classic', 'classic_nesterov_wd',
                    'bias_correction', 'bias_correction_classic', 'plain'],
        }.get(kind, [RICH[kind][0]])
        for cname in sched_cfgs:
            hp = configs[cname]
            lr0 = dict(DEFAULTS[kind], **hp)['lr']
            for dt in ('float32', 'float64'):
                cases[kind].append(Case('%s_%s_lr_schedule_%s_n37' % (kind, cname, 'f' + dt[-2:]),
                                        kind, dt, 37, SMALL_STEPS, hp,
                                        sets=lr_schedule(lr0, SMALL_STEPS),
                                        checks=[1, 2, 3, 11, 12, SMALL_STEPS]))
    # PATCH: momentum switched on before update 50 (fresh buffer, torch's
    # lazy first-update rule), and momentum cycled every update (one-cycle).
    for form in ('torch', 'classic'):
        for dt in ('float32', 'float64'):
            cases['sgd'].append(Case('sgd_patch_momentum_%s_%s_n37' % (form, 'f' + dt[-2:]),
                                     'sgd', dt, 37, SMALL_STEPS,
                                     dict(momentum_form=form, weight_decay=1e-3),
                                     sets={50: {'momentum': 0.9}},
                                     checks=[1, 49, 50, 51, SMALL_STEPS],
                                     full_checks=[49, 50, 51]))
    cyc = {t: {'momentum': 0.85 + 0.1 * abs(math.sin(t / 9.0)), 'lr': 0.01 + 0.001 * (t % 5)}
           for t in range(1, SMALL_STEPS + 1)}
    for form in ('torch', 'classic'):
        for dt in ('float32', 'float64'):
            cases['sgd'].append(Case('sgd_cycled_momentum_%s_%s_n37' % (form, 'f' + dt[-2:]),
                                     'sgd', dt, 37, SMALL_STEPS,
                                     dict(momentum=0.9, momentum_form=form), sets=cyc))
    b1cyc = {t: {'betas': (0.85 + 0.1 * abs(math.sin(t / 9.0)), 0.999)}
             for t in range(1, SMALL_STEPS + 1)}
    for kind in ('adam', 'adamw'):
        for dt in ('float32', 'float64'):
            cases[kind].append(Case('%s_cycled_beta1_%s_n37' % (kind, 'f' + dt[-2:]),
                                    kind, dt, 37, SMALL_STEPS, {}, sets=b1cyc))
    # The full-length vector: every SIMD body and tail of the kernels.  The
    # check at update 3 is the one a valgrind run stops at.
    for kind in CONFIGS:
        for cname in RICH[kind]:
            for dt in ('float32', 'float64'):
                cases[kind].append(Case('%s_%s_%s_n%d' % (kind, cname, 'f' + dt[-2:], BIG_N),
                                        kind, dt, BIG_N, BIG_STEPS, CONFIGS[kind][cname],
                                        checks=[1, 3, BIG_STEPS]))
    return cases


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
    outdir = os.path.join(root, 'tests', 'fixtures', 'optim')
    os.makedirs(outdir, exist_ok=True)
    total = 0
    for kind, cases in build_cases().items():
        out = ['# optd optimizer reference vectors for %s (%d cases).' % (kind, len(cases)),
               '# Generated by tests/ref/gen_optim.py from torch.optim 1.13.1\'s rules;',
               '# do not edit.  Format: see the generator\'s docstring.', '']
        for c in cases:
            rect = run_case(c, out)
            if kind == 'radam':
                # Keep the rectification coverage honest.
                want = {False} if 'never_rectified' in c.name else {False, True}
                assert rect == want, (c.name, rect)
        with open(os.path.join(outdir, kind + '.txt'), 'w') as f:
            f.write('\n'.join(out))
        total += len(cases)
        print('%-9s %3d cases' % (kind, len(cases)))
    print('total     %3d cases' % total)
    return 0


if __name__ == '__main__':
    sys.exit(main())
