/*
 * clip.c -- gradient clipping: the "norm" and "value" kinds, their
 * hyperparameter tables, and the gradient norms they (and the API's
 * reporting) rely on.
 *
 * The norms themselves are optim/vec.c's blocked reductions (the same bit
 * for bit on every CPU, in every clone and on any number of threads).
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

double optim_grad_norm(optim_dtype dt, const void *g, size_t n, double norm_type)
{
    double norm;
    bool finite;
    /* optim_clip_validate refuses every other norm; an unvalidated one
     * reads as a non-finite norm rather than as a plausible number. */
    optim_vec_stats(dt, g, n, norm_type, &norm, &finite);
    return norm;
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
