/*
 * optimizers.c -- what optd knows about each optimizer besides its update
 * loop: the hyperparameter tables (torch 1.13's names and defaults), their
 * validation, the names and initial values of the state, and the dtype
 * helpers.  The update itself lives in kernels.c.
 */
#include "optim/optim.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------------ dtype */

size_t optim_dtype_size(optim_dtype dt)
{
    return dt == OPTIM_F64 ? sizeof(double) : sizeof(float);
}

const char *optim_dtype_name(optim_dtype dt)
{
    return dt == OPTIM_F64 ? "float64" : "float32";
}

int optim_dtype_parse(const char *name, optim_dtype *out)
{
    if (name == NULL)
        return OPTIM_EINVAL;
    if (strcmp(name, "float32") == 0) {
        *out = OPTIM_F32;
        return OPTIM_OK;
    }
    if (strcmp(name, "float64") == 0) {
        *out = OPTIM_F64;
        return OPTIM_OK;
    }
    return OPTIM_EINVAL;
}

/* ------------------------------------------------- hyperparameter tables */

#define HP_AT(f) offsetof(optim_hparams, f)

#define HP_NUM(nm, f, d, doc) \
    { nm, OPTIM_HP_NUM, HP_AT(f), 0, { d, 0 }, false, NULL, doc }
#define HP_BOOL(nm, f, d, doc) \
    { nm, OPTIM_HP_BOOL, HP_AT(f), 0, { d, 0 }, false, NULL, doc }
#define HP_PAIR(nm, f, d0, d1, doc) \
    { nm, OPTIM_HP_PAIR, HP_AT(f), 0, { d0, d1 }, false, NULL, doc }
#define HP_ENUM(nm, f, ch, d, doc) \
    { nm, OPTIM_HP_ENUM, HP_AT(f), 0, { d, 0 }, false, ch, doc }

/* The entries several optimizers share, so their wording stays the same. */
#define HP_LR(d) HP_NUM("lr", lr, d, "learning rate (a schedule scales it per step)")
#define HP_WD(d) HP_NUM("weight_decay", weight_decay, d, \
                        "L2 penalty: weight_decay * param is added to the gradient")
#define HP_EPS(d) HP_NUM("eps", eps, d, "term added to the denominator for numerical stability")
#define HP_BETAS(b1, b2) HP_PAIR("betas", betas, b1, b2, \
                                 "coefficients of the running averages of the gradient and its square")
#define HP_MAXIMIZE HP_BOOL("maximize", maximize, 0, \
                            "maximize the objective: the gradient's sign is flipped")

static const char *const momentum_forms[] = { "torch", "classic", NULL };

static const optim_hp_spec sgd_hps[] = {
    /* Required as in torch (a request must give it); def[0] is what
     * optim_hparams_default() fills in so the struct is always usable. */
    { "lr", OPTIM_HP_NUM, HP_AT(lr), 0, { 0.01, 0 }, true, NULL,
      "learning rate (required, as in torch; a schedule scales it per step)" },
    HP_NUM("momentum", momentum, 0, "momentum factor (0: plain SGD, no buffer)"),
    HP_NUM("dampening", dampening, 0, "dampening for momentum: the gradient enters with 1 - dampening"),
    HP_WD(0),
    HP_BOOL("nesterov", nesterov, 0, "Nesterov momentum (needs momentum > 0 and dampening 0)"),
    HP_MAXIMIZE,
    HP_ENUM("momentum_form", momentum_form, momentum_forms, OPTIM_MOMENTUM_TORCH,
            "torch: buf = m*buf + (1-d)*g, p -= lr*buf; classic: v = m*v + (1-d)*lr*g, p -= v"),
    HP_BOOL("bias_correction", bias_correction, 0,
            "divide the momentum buffer by 1 - momentum^t (buffer starts at zero)"),
};

static const optim_hp_spec adagrad_hps[] = {
    HP_LR(1e-2),
    HP_NUM("lr_decay", lr_decay, 0, "learning rate decay: lr / (1 + (t - 1) * lr_decay)"),
    HP_WD(0),
    HP_NUM("initial_accumulator_value", initial_accumulator_value, 0,
           "starting value of the sum of squared gradients"),
    HP_EPS(1e-10),
    HP_MAXIMIZE,
};

static const optim_hp_spec rmsprop_hps[] = {
    HP_LR(1e-2),
    HP_NUM("alpha", alpha, 0.99, "smoothing constant of the squared-gradient average"),
    HP_EPS(1e-8),
    HP_WD(0),
    HP_NUM("momentum", momentum, 0, "momentum factor (0: no momentum buffer)"),
    HP_BOOL("centered", centered, 0, "normalize by the estimated variance of the gradient"),
    HP_MAXIMIZE,
};

static const optim_hp_spec adam_hps[] = {
    HP_LR(1e-3),
    HP_BETAS(0.9, 0.999),
    HP_EPS(1e-8),
    HP_WD(0),
    HP_BOOL("amsgrad", amsgrad, 0, "use the maximum of past squared-gradient averages (AMSGrad)"),
    HP_MAXIMIZE,
};

static const optim_hp_spec adamw_hps[] = {
    HP_LR(1e-3),
    HP_BETAS(0.9, 0.999),
    HP_EPS(1e-8),
    HP_NUM("weight_decay", weight_decay, 1e-2,
           "decoupled weight decay: param *= 1 - lr * weight_decay"),
    HP_BOOL("amsgrad", amsgrad, 0, "use the maximum of past squared-gradient averages (AMSGrad)"),
    HP_MAXIMIZE,
};

static const optim_hp_spec adamax_hps[] = {
    HP_LR(2e-3),
    HP_BETAS(0.9, 0.999),
    HP_EPS(1e-8),
    HP_WD(0),
    HP_MAXIMIZE,
};

static const optim_hp_spec adadelta_hps[] = {
    HP_LR(1.0),
    HP_NUM("rho", rho, 0.9, "coefficient of the running averages of squared gradients and updates"),
    HP_EPS(1e-6),
    HP_WD(0),
    HP_MAXIMIZE,
};

static const optim_hp_spec nadam_hps[] = {
    HP_LR(2e-3),
    HP_BETAS(0.9, 0.999),
    HP_EPS(1e-8),
    HP_WD(0),
    HP_NUM("momentum_decay", momentum_decay, 4e-3, "momentum decay psi of the mu schedule"),
};

static const optim_hp_spec radam_hps[] = {
    HP_LR(1e-3),
    HP_BETAS(0.9, 0.999),
    HP_EPS(1e-8),
    HP_WD(0),
};

static const optim_hp_spec asgd_hps[] = {
    HP_LR(1e-2),
    HP_NUM("lambd", lambd, 1e-4, "decay term"),
    HP_NUM("alpha", alpha, 0.75, "power of the eta update"),
    HP_NUM("t0", t0, 1e6, "step at which averaging starts"),
    HP_WD(0),
    HP_MAXIMIZE,
};

static const optim_hp_spec rprop_hps[] = {
    HP_LR(1e-2),
    HP_PAIR("etas", etas, 0.5, 1.2,
            "(etaminus, etaplus): step size factors on a sign change / no sign change"),
    HP_PAIR("step_sizes", step_sizes, 1e-6, 50, "(min, max) allowed step sizes"),
    HP_MAXIMIZE,
};

static const optim_hp_spec lion_hps[] = {
    HP_NUM("lr", lr, 1e-4, "learning rate (a schedule scales it per step)"),
    HP_PAIR("betas", betas, 0.9, 0.99,
            "interpolation factor of the update direction, decay of the momentum"),
    HP_NUM("weight_decay", weight_decay, 0,
           "decoupled weight decay: param *= 1 - lr * weight_decay"),
};

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static const optim_info infos[OPTIM_KIND_COUNT] = {
    { "sgd", OPTIM_SGD, sgd_hps, N_OF(sgd_hps),
      "stochastic gradient descent with optional (Nesterov) momentum" },
    { "adagrad", OPTIM_ADAGRAD, adagrad_hps, N_OF(adagrad_hps),
      "Adagrad: per-coordinate lr scaled by the root of the summed squared gradients" },
    { "rmsprop", OPTIM_RMSPROP, rmsprop_hps, N_OF(rmsprop_hps),
      "RMSprop: lr scaled by a running root-mean-square of the gradient" },
    { "adam", OPTIM_ADAM, adam_hps, N_OF(adam_hps),
      "Adam with L2 weight decay and optional AMSGrad" },
    { "adamw", OPTIM_ADAMW, adamw_hps, N_OF(adamw_hps),
      "AdamW: Adam with decoupled weight decay" },
    { "adamax", OPTIM_ADAMAX, adamax_hps, N_OF(adamax_hps),
      "Adamax: Adam with the infinity norm" },
    { "adadelta", OPTIM_ADADELTA, adadelta_hps, N_OF(adadelta_hps),
      "Adadelta: step sizes from running averages of squared gradients and updates" },
    { "nadam", OPTIM_NADAM, nadam_hps, N_OF(nadam_hps),
      "NAdam: Adam with Nesterov momentum and a momentum-decay schedule" },
    { "radam", OPTIM_RADAM, radam_hps, N_OF(radam_hps),
      "RAdam: Adam with variance rectification" },
    { "asgd", OPTIM_ASGD, asgd_hps, N_OF(asgd_hps),
      "averaged stochastic gradient descent" },
    { "rprop", OPTIM_RPROP, rprop_hps, N_OF(rprop_hps),
      "Rprop: sign-based steps with per-coordinate adaptive step sizes" },
    { "lion", OPTIM_LION, lion_hps, N_OF(lion_hps),
      "Lion: sign of an interpolated momentum, decoupled weight decay" },
};

const optim_info *optim_find(const char *name)
{
    if (name == NULL)
        return NULL;
    for (size_t i = 0; i < N_OF(infos); i++)
        if (strcmp(infos[i].name, name) == 0)
            return &infos[i];
    return NULL;
}

const optim_info *optim_info_of(optim_kind kind)
{
    if ((unsigned)kind >= OPTIM_KIND_COUNT)
        return NULL;
    return &infos[kind];
}

/* Defaults come from the spec tables so that a default is written once. */
void optim_hparams_default(optim_kind kind, optim_hparams *out)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    const optim_info *info = optim_info_of(kind);
    if (info == NULL)
        return;
    optim_specs_default(info->hps, info->n_hps, out);
}

/* ------------------------------------------------------------ validation */

/* Fills err (when given) and returns OPTIM_EINVAL. */
static int reject(optim_error *err, const char *field, const char *fmt, ...)
{
    if (err != NULL) {
        snprintf(err->field, sizeof err->field, "%s", field);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return OPTIM_EINVAL;
}

/* Every number the kind reads must be finite, whatever its range rule. */
static int check_finite(const optim_info *info, const optim_hparams *hp, optim_error *err)
{
    for (size_t i = 0; i < info->n_hps; i++) {
        const optim_hp_spec *s = &info->hps[i];
        const char *at = (const char *)hp + s->offset;
        double v[2];
        size_t nv;
        if (s->type == OPTIM_HP_NUM || s->type == OPTIM_HP_NUM_INF)
            nv = 1;
        else if (s->type == OPTIM_HP_PAIR)
            nv = 2;
        else
            continue;
        memcpy(v, at, nv * sizeof(double));
        for (size_t k = 0; k < nv; k++) {
            bool inf_ok = s->type == OPTIM_HP_NUM_INF && isinf(v[k]) && v[k] > 0;
            if (!isfinite(v[k]) && !inf_ok)
                return reject(err, s->name, "%s must be a finite number", s->name);
        }
    }
    return OPTIM_OK;
}

static int check_betas(const optim_hparams *hp, optim_error *err)
{
    for (int k = 0; k < 2; k++)
        if (!(hp->betas[k] >= 0 && hp->betas[k] < 1))
            return reject(err, "betas", "betas[%d] = %g is outside [0, 1)", k, hp->betas[k]);
    return OPTIM_OK;
}

static int check_nonneg(double v, const char *field, optim_error *err)
{
    if (v < 0)
        return reject(err, field, "%s = %g must be >= 0", field, v);
    return OPTIM_OK;
}

static int check_eps(const optim_hparams *hp, optim_error *err)
{
    if (!(hp->eps > 0))
        return reject(err, "eps", "eps = %g must be > 0", hp->eps);
    return OPTIM_OK;
}

static int check_sgd(const optim_hparams *hp, optim_error *err)
{
    int rc;
    if ((rc = check_nonneg(hp->momentum, "momentum", err)) != 0)
        return rc;
    if (hp->nesterov && (hp->momentum <= 0 || hp->dampening != 0))
        return reject(err, "nesterov",
                      "Nesterov momentum requires a momentum > 0 and zero dampening");
    if (hp->momentum_form != OPTIM_MOMENTUM_TORCH && hp->momentum_form != OPTIM_MOMENTUM_CLASSIC)
        return reject(err, "momentum_form", "momentum_form must be \"torch\" or \"classic\"");
    if (hp->bias_correction && hp->nesterov)
        return reject(err, "bias_correction", "bias_correction cannot be combined with nesterov");
    return OPTIM_OK;
}

static int check_rprop(const optim_hparams *hp, optim_error *err)
{
    if (!(0 < hp->etas[0] && hp->etas[0] < 1 && 1 < hp->etas[1]))
        return reject(err, "etas", "etas = (%g, %g) must satisfy 0 < etaminus < 1 < etaplus",
                      hp->etas[0], hp->etas[1]);
    if (!(0 <= hp->step_sizes[0] && hp->step_sizes[0] <= hp->step_sizes[1]))
        return reject(err, "step_sizes", "step_sizes = (%g, %g) must satisfy 0 <= min <= max",
                      hp->step_sizes[0], hp->step_sizes[1]);
    return OPTIM_OK;
}

/* Rules in the order of the kind's table, cross-field rules last. */
int optim_hparams_validate(const optim_hparams *hp, optim_error *err)
{
    const optim_info *info = optim_info_of(hp->kind);
    if (info == NULL)
        return reject(err, "optimizer", "unknown optimizer kind %d", (int)hp->kind);
    int rc = check_finite(info, hp, err);
    if (rc != 0)
        return rc;
    if ((rc = check_nonneg(hp->lr, "lr", err)) != 0)
        return rc;

    switch (hp->kind) {
    case OPTIM_SGD:
        if ((rc = check_nonneg(hp->weight_decay, "weight_decay", err)) != 0)
            return rc;
        return check_sgd(hp, err);
    case OPTIM_ADAGRAD:
        if ((rc = check_nonneg(hp->lr_decay, "lr_decay", err)) != 0 ||
            (rc = check_nonneg(hp->weight_decay, "weight_decay", err)) != 0 ||
            (rc = check_nonneg(hp->initial_accumulator_value, "initial_accumulator_value", err)) != 0)
            return rc;
        return check_eps(hp, err);
    case OPTIM_RMSPROP:
        if ((rc = check_nonneg(hp->alpha, "alpha", err)) != 0 ||
            (rc = check_eps(hp, err)) != 0 ||
            (rc = check_nonneg(hp->weight_decay, "weight_decay", err)) != 0)
            return rc;
        return check_nonneg(hp->momentum, "momentum", err);
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
    case OPTIM_ADAMAX:
    case OPTIM_NADAM:
    case OPTIM_RADAM:
        if ((rc = check_betas(hp, err)) != 0 ||
            (rc = check_eps(hp, err)) != 0 ||
            (rc = check_nonneg(hp->weight_decay, "weight_decay", err)) != 0)
            return rc;
        if (hp->kind == OPTIM_NADAM)
            return check_nonneg(hp->momentum_decay, "momentum_decay", err);
        return OPTIM_OK;
    case OPTIM_ADADELTA:
        if (!(hp->rho >= 0 && hp->rho <= 1))
            return reject(err, "rho", "rho = %g is outside [0, 1]", hp->rho);
        if ((rc = check_eps(hp, err)) != 0)
            return rc;
        return check_nonneg(hp->weight_decay, "weight_decay", err);
    case OPTIM_ASGD:
        if ((rc = check_nonneg(hp->lambd, "lambd", err)) != 0 ||
            (rc = check_nonneg(hp->alpha, "alpha", err)) != 0)
            return rc;
        return check_nonneg(hp->weight_decay, "weight_decay", err);
    case OPTIM_RPROP:
        return check_rprop(hp, err);
    case OPTIM_LION:
        if ((rc = check_betas(hp, err)) != 0)
            return rc;
        return check_nonneg(hp->weight_decay, "weight_decay", err);
    case OPTIM_KIND_COUNT:
        break;
    }
    return OPTIM_OK;
}

/* ----------------------------------------------------------------- state */

static const char *const buffer_names[OPTIM_KIND_COUNT][OPTIM_MAX_BUFFERS] = {
    [OPTIM_SGD] = { "momentum_buffer" },
    [OPTIM_ADAGRAD] = { "sum" },
    [OPTIM_RMSPROP] = { "square_avg", "momentum_buffer", "grad_avg" },
    [OPTIM_ADAM] = { "exp_avg", "exp_avg_sq", "max_exp_avg_sq" },
    [OPTIM_ADAMW] = { "exp_avg", "exp_avg_sq", "max_exp_avg_sq" },
    [OPTIM_ADAMAX] = { "exp_avg", "exp_inf" },
    [OPTIM_ADADELTA] = { "square_avg", "acc_delta" },
    [OPTIM_NADAM] = { "exp_avg", "exp_avg_sq" },
    [OPTIM_RADAM] = { "exp_avg", "exp_avg_sq" },
    [OPTIM_ASGD] = { "ax" },
    [OPTIM_RPROP] = { "prev", "step_size" },
    [OPTIM_LION] = { "exp_avg" },
};

static const char *const scalar_names[OPTIM_KIND_COUNT][OPTIM_MAX_SCALARS] = {
    [OPTIM_SGD] = { "momentum_buffer_initialized" },
    [OPTIM_NADAM] = { "mu_product" },
    [OPTIM_ASGD] = { "eta", "mu" },
};

const char *optim_buffer_name(optim_kind kind, unsigned slot)
{
    if ((unsigned)kind >= OPTIM_KIND_COUNT || slot >= OPTIM_MAX_BUFFERS)
        return NULL;
    return buffer_names[kind][slot];
}

const char *optim_scalar_name(optim_kind kind, unsigned i)
{
    if ((unsigned)kind >= OPTIM_KIND_COUNT || i >= OPTIM_MAX_SCALARS)
        return NULL;
    return scalar_names[kind][i];
}

unsigned optim_buffers_needed(const optim_hparams *hp)
{
    switch (hp->kind) {
    case OPTIM_SGD:
        return hp->momentum != 0 ? 1u : 0u;
    case OPTIM_RMSPROP:
        return 1u | (hp->momentum > 0 ? 2u : 0u) | (hp->centered ? 4u : 0u);
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
        return 3u | (hp->amsgrad ? 4u : 0u);
    case OPTIM_ADAGRAD:
    case OPTIM_ASGD:
    case OPTIM_LION:
        return 1u;
    case OPTIM_ADAMAX:
    case OPTIM_ADADELTA:
    case OPTIM_NADAM:
    case OPTIM_RADAM:
    case OPTIM_RPROP:
        return 3u;
    case OPTIM_KIND_COUNT:
        break;
    }
    return 0;
}

/* Adagrad's sum starts at initial_accumulator_value and Rprop's step_size at
 * lr (both rounded to the dtype, as torch's full_like/fill_ do); every other
 * buffer starts at zero. */
void optim_buffer_init(const optim_hparams *hp, unsigned slot, optim_dtype dt,
                       void *buf, size_t n)
{
    double v = 0;
    if (hp->kind == OPTIM_ADAGRAD && slot == 0)
        v = hp->initial_accumulator_value;
    else if (hp->kind == OPTIM_RPROP && slot == 1)
        v = hp->lr;
    if (dt == OPTIM_F64) {
        double *b = buf;
        for (size_t i = 0; i < n; i++)
            b[i] = v;
    } else {
        float *b = buf;
        const float f = (float)v;
        for (size_t i = 0; i < n; i++)
            b[i] = f;
    }
}

/* torch keeps NAdam's mu_product and ASGD's eta and mu in 0-dim tensors of
 * the default dtype (float32), so eta starts at lr rounded to float. */
void optim_state_init(const optim_hparams *hp, optim_state *st)
{
    st->step = 0;
    for (unsigned i = 0; i < OPTIM_MAX_SCALARS; i++)
        st->scalars[i] = 0;
    switch (hp->kind) {
    case OPTIM_NADAM:
        st->scalars[0] = 1.0;
        break;
    case OPTIM_ASGD:
        st->scalars[0] = (double)(float)hp->lr;
        st->scalars[1] = 1.0;
        break;
    default:
        break;
    }
}

/* params (read + write), grad (read) and every buffer in use (read + write). */
size_t optim_bytes_per_param(const optim_hparams *hp, optim_dtype dt)
{
    unsigned need = optim_buffers_needed(hp);
    size_t nbuf = 0;
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        nbuf += (need >> s) & 1u;
    return (3 + 2 * nbuf) * optim_dtype_size(dt);
}
