/*
 * kernels_body.h -- the elementwise update loops, written once and compiled
 * once per dtype: kernels.c includes this file twice, with T = float /
 * double, SQRT, FABS and FN(name) (which appends the dtype suffix) defined.
 * Not a header to include anywhere else.
 *
 * Every element function has the same signature so that one macro (INST)
 * can stamp out a loop per flag combination.  The flag word f is a constant
 * in each instance: GCC folds the tests away and vectorises a branch-free
 * body.  Each tensor operation of torch's rule is one rounded operation here
 * (the build's -std=c11 forbids FMA contraction), so results do not depend
 * on the vector width or on where a range starts.
 *
 * c[] holds the plan's coefficients converted to T; c[C_GS] is -1 or +1
 * (maximize; multiplying by +-1 is exact) and c[C_WD] the L2 weight decay.
 */

#define ELEM_ARGS                                                         \
    const T *restrict c, T *restrict p, const T *restrict g,              \
    T *restrict b0, T *restrict b1, T *restrict b2, size_t i, const unsigned f

/* The gradient as torch's rules see it: negated for maximize, then
 * grad.add(param, alpha=weight_decay) when the flag is set. */
static inline ALWAYS_INLINE T FN(grad_in)(const T *restrict c, const T *restrict p,
                                          const T *restrict g, size_t i, unsigned wd)
{
    T gi = g[i] * c[C_GS];
    if (wd)
        gi = gi + c[C_WD] * p[i];
    return gi;
}

/* The helpers below evaluate every comparison unconditionally (| rather
 * than ||, no nested ?:): under the default -ftrapping-math GCC will not
 * speculate a comparison that only runs on one branch, and the loop would
 * stay scalar. */

/* torch.maximum / torch.amax: NaN in either operand gives NaN. */
static inline ALWAYS_INLINE T FN(nanmax)(T a, T b)
{
    const int keep_a = (a != a) | (a > b);
    return keep_a ? a : b;
}

/* torch.sign: -1, 0 or 1; 0 for NaN.  (An int difference converted once
 * vectorises; a float select between constants does not.) */
static inline ALWAYS_INLINE T FN(sign)(T x)
{
    return (T)((x > 0) - (x < 0));
}

/* x where keep, else +0, by masking the bits.  A float select here would
 * let GCC sink the multiplication that produced x into one branch, where
 * -ftrapping-math forbids if-converting it back. */
static inline ALWAYS_INLINE T FN(keep_if)(T x, int keep)
{
    UINT bits;
    memcpy(&bits, &x, sizeof bits);
    bits &= (UINT)0 - (UINT)keep;
    memcpy(&x, &bits, sizeof bits);
    return x;
}

/* ---------------------------------------------------------------- sgd */

static inline ALWAYS_INLINE void FN(sgd_plain_elem)(ELEM_ARGS)
{
    (void)b0, (void)b1, (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    p[i] = p[i] + c[SGD_STEP] * gi;
}

/* torch form: SGD_STEP = -lr, SGD_GAIN = 1 - dampening;
 * classic form: SGD_STEP = lr, SGD_GAIN = (1 - dampening) * lr. */
static inline ALWAYS_INLINE void FN(sgd_mom_elem)(ELEM_ARGS)
{
    (void)b1, (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T m = c[SGD_M];
    T v;
    if (f & F_SGD_FIRST)
        v = (f & F_SGD_CLASSIC) ? c[SGD_STEP] * gi : gi;
    else
        v = b0[i] * m + c[SGD_GAIN] * gi;
    b0[i] = v;
    T pi = p[i];
    if (f & F_SGD_CLASSIC) {
        if (f & F_SGD_NESTEROV)
            pi = pi - (c[SGD_STEP] * gi + m * v);
        else if (f & F_SGD_BC)
            pi = pi - v / c[SGD_BC];
        else
            pi = pi - v;
    } else {
        T d;
        if (f & F_SGD_NESTEROV)
            d = gi + m * v;
        else if (f & F_SGD_BC)
            d = v / c[SGD_BC];
        else
            d = v;
        pi = pi + c[SGD_STEP] * d;
    }
    p[i] = pi;
}

/* ------------------------------------------------------------ adagrad */

static inline ALWAYS_INLINE void FN(adagrad_elem)(ELEM_ARGS)
{
    (void)b1, (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T s = b0[i] + gi * gi;
    b0[i] = s;
    const T std = SQRT(s) + c[ADAGRAD_EPS];
    p[i] = p[i] + (c[ADAGRAD_NCLR] * gi) / std;
}

/* ------------------------------------------------------------ rmsprop */

static inline ALWAYS_INLINE void FN(rmsprop_elem)(ELEM_ARGS)
{
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T a = c[RMS_ALPHA], oma = c[RMS_OMA];
    const T sq = b0[i] * a + (oma * gi) * gi;
    b0[i] = sq;
    T avg;
    if (f & F_RMS_CENTERED) {
        const T ga = b2[i] * a + oma * gi;
        b2[i] = ga;
        avg = SQRT(sq + (-ga) * ga);
    } else {
        avg = SQRT(sq);
    }
    avg = avg + c[RMS_EPS];
    if (f & F_RMS_MOMENTUM) {
        const T buf = b1[i] * c[RMS_M] + gi / avg;
        b1[i] = buf;
        p[i] = p[i] + c[RMS_NLR] * buf;
    } else {
        p[i] = p[i] + (c[RMS_NLR] * gi) / avg;
    }
}

/* ------------------------------------------------------- adam, adamw */

static inline ALWAYS_INLINE void FN(adam_elem)(ELEM_ARGS)
{
    T pi = p[i];
    T gi;
    if (f & F_ADAM_DECOUPLED) {
        gi = g[i] * c[C_GS];
        if (f & F_WD)
            pi = pi * c[ADAM_DECAY];
    } else {
        gi = FN(grad_in)(c, p, g, i, f & F_WD);
    }
    const T m = b0[i] * c[ADAM_B1] + c[ADAM_OMB1] * gi;
    const T v = b1[i] * c[ADAM_B2] + (c[ADAM_OMB2] * gi) * gi;
    b0[i] = m;
    b1[i] = v;
    T den;
    if (f & F_ADAM_AMSGRAD) {
        const T mx = FN(nanmax)(b2[i], v);
        b2[i] = mx;
        den = SQRT(mx) / c[ADAM_BC2S] + c[ADAM_EPS];
    } else {
        den = SQRT(v) / c[ADAM_BC2S] + c[ADAM_EPS];
    }
    p[i] = pi + (c[ADAM_NSS] * m) / den;
}

/* ------------------------------------------------------------- adamax */

static inline ALWAYS_INLINE void FN(adamax_elem)(ELEM_ARGS)
{
    (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T m = b0[i] * c[ADAMAX_B1] + c[ADAMAX_OMB1] * gi;
    const T e = FN(nanmax)(b1[i] * c[ADAMAX_B2], FABS(gi) + c[ADAMAX_EPS]);
    b0[i] = m;
    b1[i] = e;
    p[i] = p[i] + (c[ADAMAX_NCLR] * m) / e;
}

/* ----------------------------------------------------------- adadelta */

static inline ALWAYS_INLINE void FN(adadelta_elem)(ELEM_ARGS)
{
    (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T rho = c[ADADELTA_RHO], omr = c[ADADELTA_OMR], eps = c[ADADELTA_EPS];
    const T sq = b0[i] * rho + (omr * gi) * gi;
    const T std = SQRT(sq + eps);
    const T acc = b1[i];
    const T delta = (SQRT(acc + eps) / std) * gi;
    b0[i] = sq;
    b1[i] = acc * rho + (omr * delta) * delta;
    p[i] = p[i] + c[ADADELTA_NLR] * delta;
}

/* -------------------------------------------------------------- nadam */

static inline ALWAYS_INLINE void FN(nadam_elem)(ELEM_ARGS)
{
    (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T m = b0[i] * c[NADAM_B1] + c[NADAM_OMB1] * gi;
    const T v = b1[i] * c[NADAM_B2] + (c[NADAM_OMB2] * gi) * gi;
    b0[i] = m;
    b1[i] = v;
    const T den = SQRT(v / c[NADAM_BC2]) + c[NADAM_EPS];
    T pi = p[i] + (c[NADAM_CG] * gi) / den;
    p[i] = pi + (c[NADAM_CM] * m) / den;
}

/* -------------------------------------------------------------- radam */

static inline ALWAYS_INLINE void FN(radam_elem)(ELEM_ARGS)
{
    (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    const T m = b0[i] * c[RADAM_B1] + c[RADAM_OMB1] * gi;
    const T v = b1[i] * c[RADAM_B2] + (c[RADAM_OMB2] * gi) * gi;
    b0[i] = m;
    b1[i] = v;
    const T mhat = m / c[RADAM_BC1];
    if (f & F_RADAM_RECT) {
        /* Python's float / tensor is tensor.reciprocal() * float. */
        const T alr = ((T)1 / (SQRT(v) + c[RADAM_EPS])) * c[RADAM_SBC2];
        p[i] = p[i] - ((mhat * c[RADAM_LR]) * alr) * c[RADAM_RECT];
    } else {
        p[i] = p[i] - mhat * c[RADAM_LR];
    }
}

/* --------------------------------------------------------------- asgd */

static inline ALWAYS_INLINE void FN(asgd_elem)(ELEM_ARGS)
{
    (void)b1, (void)b2;
    const T gi = FN(grad_in)(c, p, g, i, f & F_WD);
    T pi = p[i] * c[ASGD_DECAY];
    pi = pi + c[ASGD_NETA] * gi;
    p[i] = pi;
    if (f & F_ASGD_MU1)
        b0[i] = pi;
    else
        b0[i] = b0[i] + (pi - b0[i]) * c[ASGD_MU];
}

/* -------------------------------------------------------------- rprop */

/* torch writes etaplus, etaminus, then 1 into a sign tensor of dtype T in
 * three masked assignments and zeroes the gradient where the result equals
 * (T)etaminus; the selects below give the same values. */
static inline ALWAYS_INLINE void FN(rprop_elem)(ELEM_ARGS)
{
    (void)b2, (void)f;
    /* Loaded unconditionally: a coefficient read on one branch only
     * becomes a masked load the vectoriser rejects. */
    const T etaminus = c[RPROP_ETAMINUS], etaplus = c[RPROP_ETAPLUS];
    const T lo = c[RPROP_MIN], hi = c[RPROP_MAX];
    const T gi = g[i] * c[C_GS];
    const T prod = gi * b0[i];
    const int pos = prod > 0, neg = prod < 0;
    T fac = pos ? etaplus : (T)0;
    fac = neg ? etaminus : fac;
    fac = fac == 0 ? (T)1 : fac;
    T ss = b1[i] * fac;
    ss = ss < lo ? lo : ss;
    ss = ss > hi ? hi : ss;
    b1[i] = ss;
    const T gz = FN(keep_if)(gi, fac != etaminus);
    b0[i] = gz;
    p[i] = p[i] + (-FN(sign)(gz)) * ss;
}

/* --------------------------------------------------------------- lion */

static inline ALWAYS_INLINE void FN(lion_elem)(ELEM_ARGS)
{
    (void)b1, (void)b2;
    const T gi = g[i];
    const T m = b0[i];
    const T d = c[LION_B1] * m + c[LION_OMB1] * gi;
    T pi = p[i];
    if (f & F_WD)
        pi = pi * c[LION_DECAY];
    p[i] = pi + c[LION_NLR] * FN(sign)(d);
    b0[i] = c[LION_B2] * m + c[LION_OMB2] * gi;
}

/* ------------------------------------------------------------- instances */

/* One loop per (kind, flag word).  The main loop runs over a multiple of
 * LOOP_BLOCK elements: with the trip count's low bits known to be zero,
 * GCC's -O2 cost model vectorises it without an epilogue; the scalar tail
 * does the rest with the same operations. */
#define INST(kind, fl)                                                         \
    HOT static void FN(kind##_##fl)(const T *restrict c, T *restrict p,        \
                                    const T *restrict g, T *restrict b0,       \
                                    T *restrict b1, T *restrict b2, size_t n)  \
    {                                                                          \
        const size_t nb = n & ~(size_t)(LOOP_BLOCK - 1);                       \
        for (size_t i = 0; i < nb; i++)                                        \
            FN(kind##_elem)(c, p, g, b0, b1, b2, i, fl);                       \
        for (size_t i = nb; i < n; i++)                                        \
            FN(kind##_elem)(c, p, g, b0, b1, b2, i, fl);                       \
    }

INST2(sgd_plain)
INST32(sgd_mom)
INST2(adagrad)
INST8(rmsprop)
INST8(adam)
INST2(adamax)
INST2(adadelta)
INST2(nadam)
INST4(radam)
INST4(asgd)
INST1(rprop)
INST2(lion)

typedef void (*FN(loop_fn))(const T *restrict, T *restrict, const T *restrict,
                            T *restrict, T *restrict, T *restrict, size_t);

/* Indexed by kind, then by the flag word plan_make chose. */
static const FN(loop_fn) FN(sgd_plain_loops)[] = { TAB2(sgd_plain) };
static const FN(loop_fn) FN(sgd_mom_loops)[] = { TAB32(sgd_mom) };
static const FN(loop_fn) FN(adagrad_loops)[] = { TAB2(adagrad) };
static const FN(loop_fn) FN(rmsprop_loops)[] = { TAB8(rmsprop) };
static const FN(loop_fn) FN(adam_loops)[] = { TAB8(adam) };
static const FN(loop_fn) FN(adamax_loops)[] = { TAB2(adamax) };
static const FN(loop_fn) FN(adadelta_loops)[] = { TAB2(adadelta) };
static const FN(loop_fn) FN(nadam_loops)[] = { TAB2(nadam) };
static const FN(loop_fn) FN(radam_loops)[] = { TAB4(radam) };
static const FN(loop_fn) FN(asgd_loops)[] = { TAB4(asgd) };
static const FN(loop_fn) FN(rprop_loops)[] = { TAB1(rprop) };
static const FN(loop_fn) FN(lion_loops)[] = { TAB2(lion) };

static FN(loop_fn) FN(loop_of)(optim_kind kind, unsigned fl)
{
    switch (kind) {
    case OPTIM_SGD:
        return fl & F_SGD_MOMENTUM ? FN(sgd_mom_loops)[fl & 31u] : FN(sgd_plain_loops)[fl & 1u];
    case OPTIM_ADAGRAD: return FN(adagrad_loops)[fl & 1u];
    case OPTIM_RMSPROP: return FN(rmsprop_loops)[fl & 7u];
    case OPTIM_ADAM:
    case OPTIM_ADAMW: return FN(adam_loops)[fl & 7u];
    case OPTIM_ADAMAX: return FN(adamax_loops)[fl & 1u];
    case OPTIM_ADADELTA: return FN(adadelta_loops)[fl & 1u];
    case OPTIM_NADAM: return FN(nadam_loops)[fl & 1u];
    case OPTIM_RADAM: return FN(radam_loops)[fl & 3u];
    case OPTIM_ASGD: return FN(asgd_loops)[fl & 3u];
    case OPTIM_RPROP: return FN(rprop_loops)[0];
    case OPTIM_LION: return FN(lion_loops)[fl & 1u];
    case OPTIM_KIND_COUNT: break;
    }
    return NULL;
}

static void FN(run)(const optim_plan *plan, const optim_state *st, void *params,
                    const void *grad, size_t begin, size_t end)
{
    T c[OPTIM_PLAN_COEFFS];
    for (unsigned k = 0; k < OPTIM_PLAN_COEFFS; k++)
        c[k] = (T)plan->c[k];
    const FN(loop_fn) loop = FN(loop_of)(plan->hp.kind, (unsigned)plan->c[C_FLAGS]);
    if (loop == NULL || end <= begin)
        return;
    T *b[OPTIM_MAX_BUFFERS];
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        b[s] = st->buf[s] != NULL ? (T *)st->buf[s] + begin : NULL;
    loop(c, (T *)params + begin, (const T *)grad + begin, b[0], b[1], b[2], end - begin);
}
