/*
 * clip.c -- gradient clipping: the "norm" and "value" kinds, their
 * hyperparameter tables, and the gradient norms they (and the API's
 * reporting) rely on.
 *
 * Norms are accumulated in double whatever the dtype, in CLIP_LANES
 * independent partial sums combined in a fixed order at the end: the lanes
 * let the compiler vectorise the loop without reassociating anything, so the
 * result is the same bit for bit on every CPU and in every clone below.
 */
#include "optim/optim.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* One binary picks its widest loop at load time; -march=native is never
 * used for shipped builds.  Not under ThreadSanitizer (its instrumented
 * ifunc resolvers crash at load). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_THREAD__)
#define CLIP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLIP_CLONES
#endif

/* 16 doubles: two AVX-512 or four AVX2 registers of independent sums, enough
 * to hide the adder's latency so that the loop runs at memory speed. */
#define CLIP_LANES 16

/* torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing. */
#define CLIP_NORM_EPS 1e-6

/* ------------------------------------------------------------ tables */

static const optim_hp_spec norm_specs[] = {
    {"max_norm", OPTIM_HP_NUM, offsetof(optim_clip, max_norm), 0, {0, 0}, true, NULL,
     "largest allowed norm of the whole gradient (> 0)"},
    {"norm_type", OPTIM_HP_NUM_INF, offsetof(optim_clip, norm_type), 0, {2, 0}, false, NULL,
     "1, 2 or \"inf\": which norm is measured"},
};

static const optim_hp_spec value_specs[] = {
    {"max_value", OPTIM_HP_NUM, offsetof(optim_clip, max_value), 0, {0, 0}, true, NULL,
     "every element is clamped to [-max_value, max_value] (> 0)"},
};

#define N_SPECS(a) (sizeof(a) / sizeof((a)[0]))

static const optim_clip_info clip_infos[] = {
    {"norm", OPTIM_CLIP_NORM, norm_specs, N_SPECS(norm_specs),
     "scale the gradient by max_norm / (norm + 1e-6) when that is below 1 "
     "(torch.nn.utils.clip_grad_norm_)"},
    {"value", OPTIM_CLIP_VALUE, value_specs, N_SPECS(value_specs),
     "clamp every element to [-max_value, max_value] (torch.nn.utils.clip_grad_value_)"},
};

const optim_clip_info *optim_clip_find(const char *name)
{
    if (!name)
        return NULL;
    for (size_t i = 0; i < N_SPECS(clip_infos); i++)
        if (strcmp(clip_infos[i].name, name) == 0)
            return &clip_infos[i];
    return NULL;
}

/* OPTIM_CLIP_NONE has no entry: "no clipping" is the absence of a clip. */
const optim_clip_info *optim_clip_info_of(optim_clip_kind kind)
{
    for (size_t i = 0; i < N_SPECS(clip_infos); i++)
        if (clip_infos[i].kind == kind)
            return &clip_infos[i];
    return NULL;
}

void optim_clip_default(optim_clip_kind kind, optim_clip *out)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    /* norm_type's default holds for every kind so that a clip switched to
     * "norm" later never carries a norm_type of 0. */
    out->norm_type = 2.0;
    const optim_clip_info *info = optim_clip_info_of(kind);
    if (!info)
        return;
    optim_specs_default(info->hps, info->n_hps, out);
}

static int clip_fail(optim_error *err, const char *field, const char *msg)
{
    if (err) {
        snprintf(err->field, sizeof err->field, "%s", field);
        snprintf(err->msg, sizeof err->msg, "%s", msg);
    }
    return OPTIM_EINVAL;
}

int optim_clip_validate(const optim_clip *c, optim_error *err)
{
    switch (c->kind) {
    case OPTIM_CLIP_NONE:
        return OPTIM_OK;
    case OPTIM_CLIP_NORM:
        /* max_norm 0 is also what an absent max_norm looks like. */
        if (!isfinite(c->max_norm))
            return clip_fail(err, "max_norm", "must be a finite number");
        if (c->max_norm <= 0)
            return clip_fail(err, "max_norm", "is required and must be > 0");
        if (!(c->norm_type == 1.0 || c->norm_type == 2.0 ||
              (isinf(c->norm_type) && c->norm_type > 0)))
            return clip_fail(err, "norm_type", "must be 1, 2 or \"inf\"");
        return OPTIM_OK;
    case OPTIM_CLIP_VALUE:
        if (!isfinite(c->max_value))
            return clip_fail(err, "max_value", "must be a finite number");
        if (c->max_value <= 0)
            return clip_fail(err, "max_value", "is required and must be > 0");
        return OPTIM_OK;
    }
    return clip_fail(err, "type", "unknown clip kind");
}

/* ------------------------------------------------------------- norms
 *
 * One loop per (dtype, norm): sum of squares, sum of magnitudes, largest
 * magnitude.  The inner k loop has a constant trip count and its lanes
 * never mix, so the vectoriser maps them onto vector registers without
 * changing any rounding; the tail (< CLIP_LANES elements) goes into the
 * first lanes.
 */

/* Sums the lanes in a fixed tree order. */
static double lanes_sum(const double *acc)
{
    double s[CLIP_LANES];
    memcpy(s, acc, sizeof s);
    for (int w = CLIP_LANES / 2; w >= 1; w /= 2)
        for (int k = 0; k < w; k++)
            s[k] = s[k] + s[k + w];
    return s[0];
}

static double lanes_max(const double *acc)
{
    double m = acc[0];
    for (int k = 1; k < CLIP_LANES; k++)
        m = acc[k] > m ? acc[k] : m;
    return m;
}

/* The max-magnitude loop takes `a > m ? a : m`, one vector max, which passes
 * over NaN.  Alongside it sums a - a: 0 for a finite element, NaN for NaN or
 * Inf.  Only when that sum is NaN does a second, scalar pass decide between
 * NaN (some element is NaN: torch's max propagates it) and Inf. */
#define DEFINE_NORM_LOOPS(T, SUFFIX)                                                    \
    CLIP_CLONES static double sumsq_##SUFFIX(const T *restrict g, size_t n)            \
    {                                                                                   \
        double acc[CLIP_LANES] = {0};                                                   \
        size_t i = 0;                                                                   \
        for (; i + CLIP_LANES <= n; i += CLIP_LANES) {                                  \
            for (int k = 0; k < CLIP_LANES; k++) {                                      \
                double x = (double)g[i + k];                                            \
                acc[k] = acc[k] + x * x;                                                \
            }                                                                           \
        }                                                                               \
        for (int k = 0; i < n; i++, k++) {                                              \
            double x = (double)g[i];                                                    \
            acc[k] = acc[k] + x * x;                                                    \
        }                                                                               \
        return lanes_sum(acc);                                                          \
    }                                                                                   \
    CLIP_CLONES static double sumabs_##SUFFIX(const T *restrict g, size_t n)           \
    {                                                                                   \
        double acc[CLIP_LANES] = {0};                                                   \
        size_t i = 0;                                                                   \
        for (; i + CLIP_LANES <= n; i += CLIP_LANES) {                                  \
            for (int k = 0; k < CLIP_LANES; k++)                                        \
                acc[k] = acc[k] + fabs((double)g[i + k]);                               \
        }                                                                               \
        for (int k = 0; i < n; i++, k++)                                                \
            acc[k] = acc[k] + fabs((double)g[i]);                                       \
        return lanes_sum(acc);                                                          \
    }                                                                                   \
    static double nan_or_##SUFFIX(double m, const T *g, size_t n)                      \
    {                                                                                   \
        for (size_t i = 0; i < n; i++)                                                  \
            if (isnan(g[i]))                                                            \
                return NAN;                                                             \
        return m;                                                                       \
    }                                                                                   \
    CLIP_CLONES static double maxabs_##SUFFIX(const T *restrict g, size_t n)           \
    {                                                                                   \
        double acc[CLIP_LANES] = {0}, bad[CLIP_LANES] = {0};                            \
        size_t i = 0;                                                                   \
        for (; i + CLIP_LANES <= n; i += CLIP_LANES) {                                  \
            for (int k = 0; k < CLIP_LANES; k++) {                                      \
                double a = fabs((double)g[i + k]);                                      \
                acc[k] = a > acc[k] ? a : acc[k];                                       \
                bad[k] = bad[k] + (a - a);                                              \
            }                                                                           \
        }                                                                               \
        for (int k = 0; i < n; i++, k++) {                                              \
            double a = fabs((double)g[i]);                                              \
            acc[k] = a > acc[k] ? a : acc[k];                                           \
            bad[k] = bad[k] + (a - a);                                                  \
        }                                                                               \
        double m = lanes_max(acc);                                                      \
        return lanes_sum(bad) == 0 ? m : nan_or_##SUFFIX(m, g, n);                     \
    }

DEFINE_NORM_LOOPS(float, f32)
DEFINE_NORM_LOOPS(double, f64)

double optim_grad_norm(optim_dtype dt, const void *g, size_t n, double norm_type)
{
    bool f32 = dt == OPTIM_F32;
    if (norm_type == 2.0)
        return sqrt(f32 ? sumsq_f32(g, n) : sumsq_f64(g, n));
    if (norm_type == 1.0)
        return f32 ? sumabs_f32(g, n) : sumabs_f64(g, n);
    if (isinf(norm_type) && norm_type > 0)
        return f32 ? maxabs_f32(g, n) : maxabs_f64(g, n);
    /* optim_clip_validate refuses every other norm; an unvalidated one
     * reads as a non-finite norm rather than as a plausible number. */
    return NAN;
}

/* ---------------------------------------------------------- clipping */

CLIP_CLONES static void scale_f32(float *restrict g, size_t n, float c)
{
    for (size_t i = 0; i < n; i++)
        g[i] = g[i] * c;
}

CLIP_CLONES static void scale_f64(double *restrict g, size_t n, double c)
{
    for (size_t i = 0; i < n; i++)
        g[i] = g[i] * c;
}

/* The comparisons are written so that NaN fails both and stays NaN. */
CLIP_CLONES static void clamp_f32(float *restrict g, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++) {
        float x = g[i];
        x = x < lo ? lo : x;
        g[i] = x > hi ? hi : x;
    }
}

CLIP_CLONES static void clamp_f64(double *restrict g, size_t n, double lo, double hi)
{
    for (size_t i = 0; i < n; i++) {
        double x = g[i];
        x = x < lo ? lo : x;
        g[i] = x > hi ? hi : x;
    }
}

double optim_clip_apply(const optim_clip *c, optim_dtype dt, void *g, size_t n)
{
    bool f32 = dt == OPTIM_F32;
    if (c->kind != OPTIM_CLIP_NORM) {
        double norm = optim_grad_norm(dt, g, n, 2.0);
        if (c->kind == OPTIM_CLIP_VALUE) {
            if (f32)
                clamp_f32(g, n, (float)-c->max_value, (float)c->max_value);
            else
                clamp_f64(g, n, -c->max_value, c->max_value);
        }
        return norm;
    }
    double norm = optim_grad_norm(dt, g, n, c->norm_type);
    double coef = c->max_norm / (norm + CLIP_NORM_EPS);
    /* A NaN norm gives a NaN coef, which fails the test: a non-finite
     * gradient is reported through the norm, never smeared over g. */
    if (coef < 1.0) {
        if (f32)
            scale_f32(g, n, (float)coef);
        else
            scale_f64(g, n, coef);
    }
    return norm;
}
