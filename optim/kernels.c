/*
 * kernels.c -- one optimizer step in three phases: plan (every per-step
 * scalar, in double, exactly as torch 1.13's Python code computes it), run
 * (elementwise loops over [begin, end), see kernels_body.h) and commit
 * (step counter and scalar state).  Nothing here allocates or does I/O.
 */
#include "optim/optim.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------- plan layout
 *
 * plan->c[] holds coefficients in double; run converts each to the dtype
 * once (round to nearest), which is where torch converts a Python float
 * that meets a tensor.  c[C_FLAGS] selects the loop variant.
 */
enum {
    C_GS = 0,      /* -1 for maximize, else +1                               */
    C_WD = 1,      /* L2 weight decay added to the gradient                  */
    C_FLAGS = OPTIM_PLAN_COEFFS - 1
};

enum { SGD_M = 2, SGD_GAIN, SGD_STEP, SGD_BC };
enum { ADAGRAD_NCLR = 2, ADAGRAD_EPS };
enum { RMS_ALPHA = 2, RMS_OMA, RMS_EPS, RMS_M, RMS_NLR };
enum { ADAM_B1 = 2, ADAM_OMB1, ADAM_B2, ADAM_OMB2, ADAM_BC2S, ADAM_EPS, ADAM_NSS, ADAM_DECAY };
enum { ADAMAX_B1 = 2, ADAMAX_OMB1, ADAMAX_B2, ADAMAX_EPS, ADAMAX_NCLR };
enum { ADADELTA_RHO = 2, ADADELTA_OMR, ADADELTA_EPS, ADADELTA_NLR };
enum { NADAM_B1 = 2, NADAM_OMB1, NADAM_B2, NADAM_OMB2, NADAM_BC2, NADAM_EPS, NADAM_CG, NADAM_CM };
enum { RADAM_B1 = 2, RADAM_OMB1, RADAM_B2, RADAM_OMB2, RADAM_BC1, RADAM_LR, RADAM_SBC2,
       RADAM_EPS, RADAM_RECT };
enum { ASGD_DECAY = 2, ASGD_NETA, ASGD_MU };
enum { RPROP_ETAMINUS = 2, RPROP_ETAPLUS, RPROP_MIN, RPROP_MAX };
enum { LION_B1 = 2, LION_OMB1, LION_B2, LION_OMB2, LION_DECAY, LION_NLR };

/* Flag words: bit 0 is always "weight decay on" (L2, or decoupled for adamw
 * and lion).  F_SGD_MOMENTUM only picks the table. */
enum {
    F_WD = 1u,
    F_SGD_FIRST = 2u, F_SGD_NESTEROV = 4u, F_SGD_CLASSIC = 8u, F_SGD_BC = 16u,
    F_SGD_MOMENTUM = 32u,
    F_RMS_CENTERED = 2u, F_RMS_MOMENTUM = 4u,
    F_ADAM_AMSGRAD = 2u, F_ADAM_DECOUPLED = 4u,
    F_RADAM_RECT = 2u,
    F_ASGD_MU1 = 2u
};

/* ------------------------------------------------------------------ plan */

/* torch's 0-dim state tensors (NAdam's mu_product, ASGD's eta and mu) have
 * the default dtype, float32: each value they take is rounded to float. */
static double as_f32(double x)
{
    return (double)(float)x;
}

static unsigned plan_sgd(const optim_hparams *hp, const optim_state *st, optim_plan *pl)
{
    double *c = pl->c;
    const double m = hp->momentum, lr = hp->lr;
    const bool classic = hp->momentum_form == OPTIM_MOMENTUM_CLASSIC;
    unsigned fl = hp->weight_decay != 0 ? F_WD : 0;
    if (m == 0) {
        c[SGD_STEP] = -lr;
        return fl;
    }
    /* The first-update rule follows torch's lazily created buffer, so it is
     * kept in a scalar rather than derived from step. */
    pl->next_scalars[0] = 1.0;
    fl |= F_SGD_MOMENTUM;
    c[SGD_M] = m;
    c[SGD_GAIN] = classic ? (1 - hp->dampening) * lr : 1 - hp->dampening;
    c[SGD_STEP] = classic ? lr : -lr;
    if (classic)
        fl |= F_SGD_CLASSIC;
    if (hp->nesterov)
        fl |= F_SGD_NESTEROV;
    if (hp->bias_correction) {
        fl |= F_SGD_BC;
        c[SGD_BC] = 1 - pow(m, (double)pl->t);
    } else if (st->scalars[0] == 0) {
        fl |= F_SGD_FIRST;
    }
    return fl;
}

static unsigned plan_adam(const optim_hparams *hp, double t, double *c)
{
    const double b1 = hp->betas[0], b2 = hp->betas[1];
    const double bias_correction1 = 1 - pow(b1, t);
    const double bias_correction2 = 1 - pow(b2, t);
    const double step_size = hp->lr / bias_correction1;
    c[ADAM_B1] = b1;
    c[ADAM_OMB1] = 1 - b1;
    c[ADAM_B2] = b2;
    c[ADAM_OMB2] = 1 - b2;
    c[ADAM_BC2S] = sqrt(bias_correction2);
    c[ADAM_EPS] = hp->eps;
    c[ADAM_NSS] = -step_size;
    c[ADAM_DECAY] = 1 - hp->lr * hp->weight_decay;
    unsigned fl = hp->weight_decay != 0 ? F_WD : 0;
    if (hp->amsgrad)
        fl |= F_ADAM_AMSGRAD;
    if (hp->kind == OPTIM_ADAMW)
        fl |= F_ADAM_DECOUPLED;
    return fl;
}

static unsigned plan_nadam(const optim_hparams *hp, const optim_state *st, optim_plan *pl)
{
    double *c = pl->c;
    const double t = (double)pl->t;
    const double b1 = hp->betas[0], b2 = hp->betas[1];
    const double lr = hp->lr, md = hp->momentum_decay;
    const double bias_correction2 = 1 - pow(b2, t);
    const double mu = b1 * (1. - 0.5 * pow(0.96, t * md));
    const double mu_next = b1 * (1. - 0.5 * pow(0.96, (t + 1) * md));
    /* torch 1.13: mu_product *= mu; mu_product_next = mu_product * mu *
     * mu_next (mu enters twice; kept as torch has it), in float32. */
    const double mu_product = as_f32(as_f32(st->scalars[0]) * as_f32(mu));
    const double mu_product_next = as_f32(as_f32(mu_product * as_f32(mu)) * as_f32(mu_next));
    pl->next_scalars[0] = mu_product;
    c[NADAM_B1] = b1;
    c[NADAM_OMB1] = 1 - b1;
    c[NADAM_B2] = b2;
    c[NADAM_OMB2] = 1 - b2;
    c[NADAM_BC2] = bias_correction2;
    c[NADAM_EPS] = hp->eps;
    c[NADAM_CG] = -lr * (1. - mu) / (1. - mu_product);
    c[NADAM_CM] = -lr * mu_next / (1. - mu_product_next);
    return hp->weight_decay != 0 ? F_WD : 0;
}

static unsigned plan_radam(const optim_hparams *hp, double t, double *c)
{
    const double b1 = hp->betas[0], b2 = hp->betas[1];
    const double bias_correction1 = 1 - pow(b1, t);
    const double bias_correction2 = 1 - pow(b2, t);
    const double rho_inf = 2 / (1 - b2) - 1;
    const double rho_t = rho_inf - 2 * t * pow(b2, t) / bias_correction2;
    c[RADAM_B1] = b1;
    c[RADAM_OMB1] = 1 - b1;
    c[RADAM_B2] = b2;
    c[RADAM_OMB2] = 1 - b2;
    c[RADAM_BC1] = bias_correction1;
    c[RADAM_LR] = hp->lr;
    c[RADAM_EPS] = hp->eps;
    unsigned fl = hp->weight_decay != 0 ? F_WD : 0;
    if (rho_t > 5.) {
        c[RADAM_RECT] = sqrt((rho_t - 4) * (rho_t - 2) * rho_inf /
                             ((rho_inf - 4) * (rho_inf - 2) * rho_t));
        c[RADAM_SBC2] = sqrt(bias_correction2);
        fl |= F_RADAM_RECT;
    }
    return fl;
}

static unsigned plan_asgd(const optim_hparams *hp, const optim_state *st, optim_plan *pl)
{
    double *c = pl->c;
    const double t = (double)pl->t;
    const double lr = hp->lr, lambd = hp->lambd;
    const double eta = st->scalars[0], mu = st->scalars[1];
    c[ASGD_DECAY] = 1 - lambd * eta;
    c[ASGD_NETA] = -eta;
    c[ASGD_MU] = mu;
    pl->next_scalars[0] = as_f32(lr / pow(1 + lambd * lr * t, hp->alpha));
    /* Python's max(1, x) keeps the int 1 unless x > 1. */
    const double since = t - hp->t0;
    pl->next_scalars[1] = as_f32(1 / (since > 1 ? since : 1.0));
    unsigned fl = hp->weight_decay != 0 ? F_WD : 0;
    if (mu == 1)
        fl |= F_ASGD_MU1;
    return fl;
}

void optim_plan_make(const optim_hparams *hp, const optim_state *st, optim_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    plan->hp = *hp;
    plan->t = st->step + 1;
    memcpy(plan->next_scalars, st->scalars, sizeof plan->next_scalars);

    double *c = plan->c;
    const double t = (double)plan->t;
    const double lr = hp->lr, wd = hp->weight_decay;
    /* Only kinds whose table has maximize read it. */
    bool has_maximize = hp->kind != OPTIM_NADAM && hp->kind != OPTIM_RADAM &&
                        hp->kind != OPTIM_LION;
    c[C_GS] = has_maximize && hp->maximize ? -1.0 : 1.0;
    c[C_WD] = wd;

    unsigned fl = 0;
    switch (hp->kind) {
    case OPTIM_SGD:
        fl = plan_sgd(hp, st, plan);
        break;
    case OPTIM_ADAGRAD:
        c[ADAGRAD_NCLR] = -(lr / (1 + (t - 1) * hp->lr_decay));
        c[ADAGRAD_EPS] = hp->eps;
        fl = wd != 0 ? F_WD : 0;
        break;
    case OPTIM_RMSPROP:
        c[RMS_ALPHA] = hp->alpha;
        c[RMS_OMA] = 1 - hp->alpha;
        c[RMS_EPS] = hp->eps;
        c[RMS_M] = hp->momentum;
        c[RMS_NLR] = -lr;
        fl = (wd != 0 ? F_WD : 0) | (hp->centered ? F_RMS_CENTERED : 0) |
             (hp->momentum > 0 ? F_RMS_MOMENTUM : 0);
        break;
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
        fl = plan_adam(hp, t, c);
        break;
    case OPTIM_ADAMAX:
        c[ADAMAX_B1] = hp->betas[0];
        c[ADAMAX_OMB1] = 1 - hp->betas[0];
        c[ADAMAX_B2] = hp->betas[1];
        c[ADAMAX_EPS] = hp->eps;
        c[ADAMAX_NCLR] = -(lr / (1 - pow(hp->betas[0], t)));
        fl = wd != 0 ? F_WD : 0;
        break;
    case OPTIM_ADADELTA:
        c[ADADELTA_RHO] = hp->rho;
        c[ADADELTA_OMR] = 1 - hp->rho;
        c[ADADELTA_EPS] = hp->eps;
        c[ADADELTA_NLR] = -lr;
        fl = wd != 0 ? F_WD : 0;
        break;
    case OPTIM_NADAM:
        fl = plan_nadam(hp, st, plan);
        break;
    case OPTIM_RADAM:
        fl = plan_radam(hp, t, c);
        break;
    case OPTIM_ASGD:
        fl = plan_asgd(hp, st, plan);
        break;
    case OPTIM_RPROP:
        /* Rprop has no weight decay in torch 1.13. */
        c[C_WD] = 0;
        c[RPROP_ETAMINUS] = hp->etas[0];
        c[RPROP_ETAPLUS] = hp->etas[1];
        c[RPROP_MIN] = hp->step_sizes[0];
        c[RPROP_MAX] = hp->step_sizes[1];
        break;
    case OPTIM_LION:
        c[LION_B1] = hp->betas[0];
        c[LION_OMB1] = 1 - hp->betas[0];
        c[LION_B2] = hp->betas[1];
        c[LION_OMB2] = 1 - hp->betas[1];
        c[LION_DECAY] = 1 - lr * wd;
        c[LION_NLR] = -lr;
        fl = wd != 0 ? F_WD : 0;
        break;
    case OPTIM_KIND_COUNT:
        break;
    }
    c[C_FLAGS] = (double)fl;
}

void optim_plan_commit(const optim_plan *plan, optim_state *st)
{
    st->step = plan->t;
    memcpy(st->scalars, plan->next_scalars, sizeof st->scalars);
}

/* ------------------------------------------------------------------- run */

#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

/* One binary for any x86-64: the loader picks the widest clone the CPU has.
 * Not under ThreadSanitizer: its instrumented ifunc resolvers run before
 * its runtime is up and crash at load. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_THREAD__)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

/* Elements per vectorised block: a multiple of every vector width in use
 * (16 floats in a 512-bit register). */
#define LOOP_BLOCK 16

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)

#define INST1(k) INST(k, 0)
#define INST2(k) INST(k, 0) INST(k, 1)
#define INST4(k) INST2(k) INST(k, 2) INST(k, 3)
#define INST8(k) INST4(k) INST(k, 4) INST(k, 5) INST(k, 6) INST(k, 7)
#define INST16(k) INST8(k) INST(k, 8) INST(k, 9) INST(k, 10) INST(k, 11) \
    INST(k, 12) INST(k, 13) INST(k, 14) INST(k, 15)
#define INST32(k) INST16(k) INST(k, 16) INST(k, 17) INST(k, 18) INST(k, 19) \
    INST(k, 20) INST(k, 21) INST(k, 22) INST(k, 23) INST(k, 24) INST(k, 25) \
    INST(k, 26) INST(k, 27) INST(k, 28) INST(k, 29) INST(k, 30) INST(k, 31)

#define TAB1(k) FN(k##_0)
#define TAB2(k) FN(k##_0), FN(k##_1)
#define TAB4(k) TAB2(k), FN(k##_2), FN(k##_3)
#define TAB8(k) TAB4(k), FN(k##_4), FN(k##_5), FN(k##_6), FN(k##_7)
#define TAB16(k) TAB8(k), FN(k##_8), FN(k##_9), FN(k##_10), FN(k##_11), \
    FN(k##_12), FN(k##_13), FN(k##_14), FN(k##_15)
#define TAB32(k) TAB16(k), FN(k##_16), FN(k##_17), FN(k##_18), FN(k##_19), \
    FN(k##_20), FN(k##_21), FN(k##_22), FN(k##_23), FN(k##_24), FN(k##_25), \
    FN(k##_26), FN(k##_27), FN(k##_28), FN(k##_29), FN(k##_30), FN(k##_31)

#define T float
#define SUFFIX f32
#define SQRT sqrtf
#define UINT uint32_t
#define FABS fabsf
#include "optim/kernels_body.h"
#undef T
#undef SUFFIX
#undef SQRT
#undef UINT
#undef FABS

#define T double
#define SUFFIX f64
#define SQRT sqrt
#define UINT uint64_t
#define FABS fabs
#include "optim/kernels_body.h"
#undef T
#undef SUFFIX
#undef SQRT
#undef UINT
#undef FABS

void optim_plan_run(const optim_plan *plan, const optim_state *st, optim_dtype dt,
                    void *params, const void *grad, size_t begin, size_t end)
{
    if (dt == OPTIM_F64)
        run_f64(plan, st, params, grad, begin, end);
    else
        run_f32(plan, st, params, grad, begin, end);
}

void optim_step(const optim_hparams *hp, optim_state *st, optim_dtype dt,
                void *params, const void *grad, size_t n)
{
    optim_plan plan;
    optim_plan_make(hp, st, &plan);
    optim_plan_run(&plan, st, dt, params, grad, 0, n);
    optim_plan_commit(&plan, st);
}
