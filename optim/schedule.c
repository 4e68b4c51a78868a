/*
 * schedule.c -- learning-rate schedules: torch.optim.lr_scheduler 1.13's
 * closed forms evaluated at t = updates already applied, their
 * hyperparameter tables and validation, the optional linear warmup, and
 * reduce_on_plateau's running state.
 *
 * Each formula is written in the same order of operations as torch's Python
 * (_get_closed_form_lr where torch has one, get_lr otherwise), so that with
 * the same libm the values agree to the last bit with a scheduler evaluated
 * in closed form.  docs/schedules.md describes every schedule.
 */
#include "optim/optim.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define F(field) offsetof(optim_schedule, field)
#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* Every table ends with the warmup pair. */
#define WARMUP_SPECS                                                                       \
    {"warmup_steps", OPTIM_HP_INT, F(warmup_steps), 0, {0, 0}, false, NULL,                \
     "linear warmup over this many steps before the schedule starts (0: none)"},           \
    {"warmup_start_factor", OPTIM_HP_NUM, F(warmup_start_factor), 0, {0, 0}, false, NULL, \
     "warmup starts at this fraction of the schedule's first lr, in [0, 1]"}

static const char *const anneal_choices[] = {"cos", "linear", NULL};
static const char *const mode_choices[] = {"min", "max", NULL};
static const char *const threshold_mode_choices[] = {"rel", "abs", NULL};

static const optim_hp_spec none_specs[] = {WARMUP_SPECS};

static const optim_hp_spec constant_specs[] = {
    {"factor", OPTIM_HP_NUM, F(factor), 0, {1.0 / 3, 0}, false, NULL,
     "lr is base_lr * factor until total_iters steps, then base_lr; in [0, 1]"},
    {"total_iters", OPTIM_HP_INT, F(total_iters), 0, {5, 0}, false, NULL,
     "steps at the reduced lr (>= 1)"},
    WARMUP_SPECS,
};

static const optim_hp_spec step_specs[] = {
    {"step_size", OPTIM_HP_INT, F(step_size), 0, {0, 0}, true, NULL,
     "multiply the lr by gamma every step_size steps (>= 1)"},
    {"gamma", OPTIM_HP_NUM, F(gamma), 0, {0.1, 0}, false, NULL, "decay factor (> 0)"},
    WARMUP_SPECS,
};

static const optim_hp_spec multistep_specs[] = {
    {"milestones", OPTIM_HP_INT_LIST, F(milestones), F(n_milestones), {0, 0}, true, NULL,
     "strictly increasing steps at which the lr is multiplied by gamma"},
    {"gamma", OPTIM_HP_NUM, F(gamma), 0, {0.1, 0}, false, NULL, "decay factor (> 0)"},
    WARMUP_SPECS,
};

static const optim_hp_spec exponential_specs[] = {
    {"gamma", OPTIM_HP_NUM, F(gamma), 0, {0, 0}, true, NULL,
     "lr = base_lr * gamma^t (> 0)"},
    WARMUP_SPECS,
};

static const optim_hp_spec cosine_specs[] = {
    {"T_max", OPTIM_HP_INT, F(T_max), 0, {0, 0}, true, NULL,
     "steps from base_lr down to eta_min (>= 1); the cosine continues past it"},
    {"eta_min", OPTIM_HP_NUM, F(eta_min), 0, {0, 0}, false, NULL, "lowest lr (>= 0)"},
    WARMUP_SPECS,
};

static const optim_hp_spec warm_restarts_specs[] = {
    {"T_0", OPTIM_HP_INT, F(T_0), 0, {0, 0}, true, NULL,
     "steps until the first restart (>= 1)"},
    {"T_mult", OPTIM_HP_INT, F(T_mult), 0, {1, 0}, false, NULL,
     "each period is T_mult times the previous one (>= 1)"},
    {"eta_min", OPTIM_HP_NUM, F(eta_min), 0, {0, 0}, false, NULL, "lowest lr (>= 0)"},
    WARMUP_SPECS,
};

static const optim_hp_spec linear_specs[] = {
    {"start_factor", OPTIM_HP_NUM, F(start_factor), 0, {1.0 / 3, 0}, false, NULL,
     "factor of base_lr at step 0, in (0, 1]"},
    {"end_factor", OPTIM_HP_NUM, F(end_factor), 0, {1.0, 0}, false, NULL,
     "factor of base_lr from total_iters on, in [0, 1]"},
    {"total_iters", OPTIM_HP_INT, F(total_iters), 0, {5, 0}, false, NULL,
     "steps from start_factor to end_factor (>= 1)"},
    WARMUP_SPECS,
};

static const optim_hp_spec polynomial_specs[] = {
    {"total_iters", OPTIM_HP_INT, F(total_iters), 0, {5, 0}, false, NULL,
     "steps until the lr reaches 0 (>= 1)"},
    {"power", OPTIM_HP_NUM, F(power), 0, {1.0, 0}, false, NULL,
     "lr = base_lr * (1 - t/total_iters)^power (power >= 0)"},
    WARMUP_SPECS,
};

static const optim_hp_spec one_cycle_specs[] = {
    {"max_lr", OPTIM_HP_NUM, F(max_lr), 0, {0, 0}, true, NULL,
     "peak lr; the cycle starts at max_lr / div_factor and ignores the optimizer's lr"},
    {"total_steps", OPTIM_HP_INT, F(total_steps), 0, {0, 0}, true, NULL,
     "steps in the cycle (>= 1); the final lr is held after it"},
    {"pct_start", OPTIM_HP_NUM, F(pct_start), 0, {0.3, 0}, false, NULL,
     "fraction of the cycle spent raising the lr, in [0, 1]"},
    {"anneal_strategy", OPTIM_HP_ENUM, F(anneal_strategy), 0, {OPTIM_ANNEAL_COS, 0}, false,
     anneal_choices, "\"cos\" or \"linear\" annealing between the phases' ends"},
    {"div_factor", OPTIM_HP_NUM, F(div_factor), 0, {25.0, 0}, false, NULL,
     "initial lr = max_lr / div_factor (> 0)"},
    {"final_div_factor", OPTIM_HP_NUM, F(final_div_factor), 0, {1e4, 0}, false, NULL,
     "final lr = initial lr / final_div_factor (> 0)"},
    {"three_phase", OPTIM_HP_BOOL, F(three_phase), 0, {0, 0}, false, NULL,
     "back down to the initial lr symmetrically, then annihilate (the paper's form)"},
    {"cycle_momentum", OPTIM_HP_BOOL, F(cycle_momentum), 0, {1, 0}, false, NULL,
     "cycle momentum (or betas[0]) inversely to the lr"},
    {"base_momentum", OPTIM_HP_NUM, F(base_momentum), 0, {0.85, 0}, false, NULL,
     "momentum at the lr's peak, in [0, 1]"},
    {"max_momentum", OPTIM_HP_NUM, F(max_momentum), 0, {0.95, 0}, false, NULL,
     "momentum at the cycle's start and end, in [0, 1]"},
    WARMUP_SPECS,
};

static const optim_hp_spec plateau_specs[] = {
    {"mode", OPTIM_HP_ENUM, F(mode), 0, {OPTIM_PLATEAU_MIN, 0}, false, mode_choices,
     "\"min\": the reported loss should fall; \"max\": it should rise"},
    {"factor", OPTIM_HP_NUM, F(factor), 0, {0.1, 0}, false, NULL,
     "new lr = lr * factor, in [0, 1)"},
    {"patience", OPTIM_HP_INT, F(patience), 0, {10, 0}, false, NULL,
     "reports without improvement tolerated before reducing"},
    {"threshold", OPTIM_HP_NUM, F(threshold), 0, {1e-4, 0}, false, NULL,
     "how much better than the best counts as an improvement (>= 0)"},
    {"threshold_mode", OPTIM_HP_ENUM, F(threshold_mode), 0, {OPTIM_THRESHOLD_REL, 0}, false,
     threshold_mode_choices, "\"rel\": best * (1 -/+ threshold); \"abs\": best -/+ threshold"},
    {"cooldown", OPTIM_HP_INT, F(cooldown), 0, {0, 0}, false, NULL,
     "reports ignored after a reduction"},
    {"min_lr", OPTIM_HP_NUM, F(min_lr), 0, {0, 0}, false, NULL, "lower bound on the lr (>= 0)"},
    {"eps", OPTIM_HP_NUM, F(plateau_eps), 0, {1e-8, 0}, false, NULL,
     "a reduction smaller than eps is skipped (>= 0)"},
    WARMUP_SPECS,
};

#define SCHED(name, kind, specs, doc) {name, kind, specs, N_OF(specs), doc}

/* Indexed by optim_sched_kind. */
static const optim_sched_info sched_infos[OPTIM_SCHED_KIND_COUNT] = {
    SCHED("none", OPTIM_SCHED_NONE, none_specs, "the lr stays the optimizer's lr"),
    SCHED("constant", OPTIM_SCHED_CONSTANT, constant_specs,
          "ConstantLR: base_lr * factor for total_iters steps, then base_lr"),
    SCHED("step", OPTIM_SCHED_STEP, step_specs,
          "StepLR: base_lr * gamma^floor(t / step_size)"),
    SCHED("multistep", OPTIM_SCHED_MULTISTEP, multistep_specs,
          "MultiStepLR: base_lr * gamma^(milestones reached)"),
    SCHED("exponential", OPTIM_SCHED_EXPONENTIAL, exponential_specs,
          "ExponentialLR: base_lr * gamma^t"),
    SCHED("cosine", OPTIM_SCHED_COSINE, cosine_specs,
          "CosineAnnealingLR: eta_min + (base_lr - eta_min)(1 + cos(pi t / T_max)) / 2"),
    SCHED("cosine_warm_restarts", OPTIM_SCHED_COSINE_WARM_RESTARTS, warm_restarts_specs,
          "CosineAnnealingWarmRestarts: cosine over periods T_0, T_0 T_mult, ..."),
    SCHED("linear", OPTIM_SCHED_LINEAR, linear_specs,
          "LinearLR: factor from start_factor to end_factor over total_iters steps"),
    SCHED("polynomial", OPTIM_SCHED_POLYNOMIAL, polynomial_specs,
          "PolynomialLR: base_lr * (1 - min(t, total_iters) / total_iters)^power"),
    SCHED("one_cycle", OPTIM_SCHED_ONE_CYCLE, one_cycle_specs,
          "OneCycleLR: up to max_lr and down far below, momentum cycled inversely"),
    SCHED("reduce_on_plateau", OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_specs,
          "ReduceLROnPlateau: lr * factor when the reported loss stops improving"),
};

const optim_sched_info *optim_sched_find(const char *name)
{
    if (!name)
        return NULL;
    for (size_t i = 0; i < N_OF(sched_infos); i++)
        if (strcmp(sched_infos[i].name, name) == 0)
            return &sched_infos[i];
    return NULL;
}

const optim_sched_info *optim_sched_info_of(optim_sched_kind kind)
{
    if ((int)kind < 0 || kind >= OPTIM_SCHED_KIND_COUNT)
        return NULL;
    return &sched_infos[kind];
}

void optim_sched_default(optim_sched_kind kind, optim_schedule *out)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    const optim_sched_info *info = optim_sched_info_of(kind);
    if (!info)
        return;
    optim_specs_default(info->hps, info->n_hps, out);
}

/* ------------------------------------------------------------ validation */

/* Names the field and says what is wrong with it; returns OPTIM_EINVAL. */
__attribute__((format(printf, 3, 4))) static int fail(optim_error *err, const char *field, const char *fmt, ...)
{
    if (err) {
        snprintf(err->field, sizeof err->field, "%s", field);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return OPTIM_EINVAL;
}

/* What every field of a given type must satisfy, whatever the schedule. */
static int check_spec(const optim_hp_spec *s, const optim_schedule *sc, optim_error *err)
{
    const char *b = (const char *)sc;
    switch (s->type) {
    case OPTIM_HP_NUM:
    case OPTIM_HP_NUM_INF:
        if (!isfinite(*(const double *)(b + s->offset)))
            return fail(err, s->name, "must be a finite number");
        return OPTIM_OK;
    case OPTIM_HP_PAIR:
        for (int k = 0; k < 2; k++)
            if (!isfinite(((const double *)(b + s->offset))[k]))
                return fail(err, s->name, "must be finite numbers");
        return OPTIM_OK;
    case OPTIM_HP_INT:
        if (*(const int64_t *)(b + s->offset) < 0)
            return fail(err, s->name, "must be >= 0");
        return OPTIM_OK;
    case OPTIM_HP_BOOL:
        return OPTIM_OK;
    case OPTIM_HP_ENUM: {
        int v = *(const int *)(b + s->offset);
        int n = 0;
        while (s->choices[n])
            n++;
        if (v < 0 || v >= n)
            return fail(err, s->name, "is not one of the allowed choices");
        return OPTIM_OK;
    }
    case OPTIM_HP_INT_LIST: {
        size_t n = *(const size_t *)(b + s->count_offset);
        const int64_t *v = (const int64_t *)(b + s->offset);
        if (n > OPTIM_MAX_LIST)
            return fail(err, s->name, "has more than %d entries", OPTIM_MAX_LIST);
        for (size_t i = 0; i < n; i++) {
            if (v[i] < 0)
                return fail(err, s->name, "must be >= 0 (entry %zu is %lld)", i,
                            (long long)v[i]);
            if (i > 0 && v[i] <= v[i - 1])
                return fail(err, s->name, "must be strictly increasing (entry %zu is %lld)", i,
                            (long long)v[i]);
        }
        return OPTIM_OK;
    }
    }
    return fail(err, s->name, "has an unknown type");
}

/* Fields whose default is 0 and that must be >= 1 read 0 when absent, so
 * their message covers both. */
static int need_positive_int(int64_t v, const char *field, optim_error *err)
{
    if (v < 1)
        return fail(err, field, "is required and must be >= 1");
    return OPTIM_OK;
}

static int need_in(double v, double lo, bool lo_open, double hi, bool hi_open,
                   const char *field, optim_error *err)
{
    if ((lo_open ? v <= lo : v < lo) || (hi_open ? v >= hi : v > hi))
        return fail(err, field, "must be in %c%g, %g%c", lo_open ? '(' : '[', lo, hi,
                    hi_open ? ')' : ']');
    return OPTIM_OK;
}

#define TRY(x)                                                                             \
    do {                                                                                   \
        int rc_ = (x);                                                                     \
        if (rc_ != OPTIM_OK)                                                               \
            return rc_;                                                                    \
    } while (0)

static int check_one_cycle(const optim_schedule *s, optim_error *err)
{
    if (s->max_lr <= 0)
        return fail(err, "max_lr", "is required and must be > 0");
    TRY(need_positive_int(s->total_steps, "total_steps", err));
    TRY(need_in(s->pct_start, 0, false, 1, false, "pct_start", err));
    if (s->div_factor <= 0)
        return fail(err, "div_factor", "must be > 0");
    if (s->final_div_factor <= 0)
        return fail(err, "final_div_factor", "must be > 0");
    /* torch's first phase then spans 0 steps and its get_lr divides 0 by 0
     * at step 0 (ZeroDivisionError when the scheduler is built). */
    if (s->pct_start * (double)s->total_steps - 1 == 0)
        return fail(err, "pct_start",
                    "pct_start * total_steps must not be exactly 1 (the warm-up phase "
                    "would be empty; torch divides by zero there)");
    if (s->cycle_momentum) {
        TRY(need_in(s->base_momentum, 0, false, 1, false, "base_momentum", err));
        TRY(need_in(s->max_momentum, 0, false, 1, false, "max_momentum", err));
    }
    return OPTIM_OK;
}

int optim_sched_validate(const optim_schedule *s, optim_error *err)
{
    const optim_sched_info *info = optim_sched_info_of(s->kind);
    if (!info)
        return fail(err, "type", "unknown schedule kind");
    for (size_t i = 0; i < info->n_hps; i++)
        TRY(check_spec(&info->hps[i], s, err));
    TRY(need_in(s->warmup_start_factor, 0, false, 1, false, "warmup_start_factor", err));

    switch (s->kind) {
    case OPTIM_SCHED_NONE:
        return OPTIM_OK;
    case OPTIM_SCHED_CONSTANT:
        TRY(need_in(s->factor, 0, false, 1, false, "factor", err));
        /* At 0 torch's stepped ConstantLR keeps base_lr * factor for ever
         * while its closed form gives base_lr: refuse the ambiguity. */
        return need_positive_int(s->total_iters, "total_iters", err);
    case OPTIM_SCHED_STEP:
        TRY(need_positive_int(s->step_size, "step_size", err));
        if (s->gamma <= 0)
            return fail(err, "gamma", "must be > 0");
        return OPTIM_OK;
    case OPTIM_SCHED_MULTISTEP:
        if (s->n_milestones == 0)
            return fail(err, "milestones", "is required (a non-empty list of steps)");
        if (s->gamma <= 0)
            return fail(err, "gamma", "must be > 0");
        return OPTIM_OK;
    case OPTIM_SCHED_EXPONENTIAL:
        if (s->gamma <= 0)
            return fail(err, "gamma", "is required and must be > 0");
        return OPTIM_OK;
    case OPTIM_SCHED_COSINE:
        TRY(need_positive_int(s->T_max, "T_max", err));
        if (s->eta_min < 0)
            return fail(err, "eta_min", "must be >= 0");
        return OPTIM_OK;
    case OPTIM_SCHED_COSINE_WARM_RESTARTS:
        TRY(need_positive_int(s->T_0, "T_0", err));
        if (s->T_mult < 1)
            return fail(err, "T_mult", "must be >= 1");
        if (s->eta_min < 0)
            return fail(err, "eta_min", "must be >= 0");
        return OPTIM_OK;
    case OPTIM_SCHED_LINEAR:
        TRY(need_in(s->start_factor, 0, true, 1, false, "start_factor", err));
        TRY(need_in(s->end_factor, 0, false, 1, false, "end_factor", err));
        return need_positive_int(s->total_iters, "total_iters", err);
    case OPTIM_SCHED_POLYNOMIAL:
        TRY(need_positive_int(s->total_iters, "total_iters", err));
        if (s->power < 0)
            return fail(err, "power", "must be >= 0");
        return OPTIM_OK;
    case OPTIM_SCHED_ONE_CYCLE:
        return check_one_cycle(s, err);
    case OPTIM_SCHED_REDUCE_ON_PLATEAU:
        TRY(need_in(s->factor, 0, false, 1, true, "factor", err));
        if (s->threshold < 0)
            return fail(err, "threshold", "must be >= 0");
        if (s->min_lr < 0)
            return fail(err, "min_lr", "must be >= 0");
        if (s->plateau_eps < 0)
            return fail(err, "eps", "must be >= 0");
        return OPTIM_OK;
    case OPTIM_SCHED_KIND_COUNT:
        break;
    }
    return fail(err, "type", "unknown schedule kind");
}

/* --------------------------------------------------------- closed forms
 *
 * Each function mirrors one torch expression; the comment quotes it.
 * t is last_epoch.
 */

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* base_lr * (factor + (last_epoch >= total_iters) * (1 - factor)) */
static double constant_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    double on = t >= (uint64_t)s->total_iters ? 1.0 - s->factor : 0.0;
    return base_lr * (s->factor + on);
}

/* base_lr * gamma ** (last_epoch // step_size) */
static double step_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    return base_lr * pow(s->gamma, (double)(t / (uint64_t)s->step_size));
}

/* base_lr * gamma ** bisect_right(milestones, last_epoch) */
static double multistep_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    size_t passed = 0;
    while (passed < s->n_milestones && (uint64_t)s->milestones[passed] <= t)
        passed++;
    return base_lr * pow(s->gamma, (double)passed);
}

/* base_lr * gamma ** last_epoch */
static double exponential_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    return base_lr * pow(s->gamma, (double)t);
}

/* eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T)) / 2 */
static double cosine_at(double eta_min, double base_lr, double t_cur, double period)
{
    return eta_min + (base_lr - eta_min) * (1 + cos(M_PI * t_cur / period)) / 2;
}

/* torch steps T_cur one epoch at a time: T_cur += 1; when T_cur reaches
 * T_i it wraps to T_cur - T_i and T_i *= T_mult.  The loop runs once per
 * restart, so O(log t) for T_mult >= 2. */
static double warm_restarts_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    uint64_t period = (uint64_t)s->T_0, mult = (uint64_t)s->T_mult;
    uint64_t t_cur = t;
    if (mult == 1) {
        t_cur = t % period;
    } else {
        while (t_cur >= period) {
            t_cur -= period;
            period = period > UINT64_MAX / mult ? UINT64_MAX : period * mult;
        }
    }
    return cosine_at(s->eta_min, base_lr, (double)t_cur, (double)period);
}

/* base_lr * (start_factor + (end_factor - start_factor)
 *            * min(total_iters, last_epoch) / total_iters) */
static double linear_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    double m = (double)min_u64((uint64_t)s->total_iters, t);
    return base_lr *
           (s->start_factor + (s->end_factor - s->start_factor) * m / (double)s->total_iters);
}

/* base_lr * (1.0 - min(total_iters, last_epoch) / total_iters) ** power */
static double polynomial_lr(const optim_schedule *s, double base_lr, uint64_t t)
{
    double m = (double)min_u64((uint64_t)s->total_iters, t);
    return base_lr * pow(1.0 - m / (double)s->total_iters, s->power);
}

/* OneCycleLR._annealing_cos / _annealing_linear */
static double anneal(int strategy, double start, double end, double pct)
{
    if (strategy == OPTIM_ANNEAL_LINEAR)
        return (end - start) * pct + start;
    double cos_out = cos(M_PI * pct) + 1;
    return end + (start - end) / 2.0 * cos_out;
}

/* OneCycleLR.get_lr.  torch raises once last_epoch passes total_steps and
 * at last_epoch == total_steps extrapolates past the cycle's end (with
 * linear annealing, to a negative lr); optd holds the end of the cycle,
 * step total_steps - 1, from there on. */
static void one_cycle_at(const optim_schedule *s, uint64_t t, optim_sched_value *out)
{
    double total = (double)s->total_steps;
    double step_num = (double)min_u64(t, (uint64_t)s->total_steps - 1);
    double initial_lr = s->max_lr / s->div_factor;
    double min_lr = initial_lr / s->final_div_factor;

    struct {
        double end_step, start_lr, end_lr, start_m, end_m;
    } ph[3];
    int n;
    ph[0].end_step = s->pct_start * total - 1;
    ph[0].start_lr = initial_lr;
    ph[0].end_lr = s->max_lr;
    ph[0].start_m = s->max_momentum;
    ph[0].end_m = s->base_momentum;
    if (s->three_phase) {
        ph[1].end_step = 2 * s->pct_start * total - 2;
        ph[1].start_lr = s->max_lr;
        ph[1].end_lr = initial_lr;
        ph[1].start_m = s->base_momentum;
        ph[1].end_m = s->max_momentum;
        ph[2].end_step = total - 1;
        ph[2].start_lr = initial_lr;
        ph[2].end_lr = min_lr;
        ph[2].start_m = s->max_momentum;
        ph[2].end_m = s->max_momentum;
        n = 3;
    } else {
        ph[1].end_step = total - 1;
        ph[1].start_lr = s->max_lr;
        ph[1].end_lr = min_lr;
        ph[1].start_m = s->base_momentum;
        ph[1].end_m = s->max_momentum;
        n = 2;
    }

    double start_step = 0;
    int i = 0;
    while (!(step_num <= ph[i].end_step || i == n - 1)) {
        start_step = ph[i].end_step;
        i++;
    }
    double pct = (step_num - start_step) / (ph[i].end_step - start_step);
    out->lr = anneal(s->anneal_strategy, ph[i].start_lr, ph[i].end_lr, pct);
    if (s->cycle_momentum) {
        out->has_momentum = true;
        out->momentum = anneal(s->anneal_strategy, ph[i].start_m, ph[i].end_m, pct);
    }
}

/* The schedule proper, without warmup. */
static void sched_at(const optim_schedule *s, const optim_plateau *ps, double base_lr,
                     uint64_t t, optim_sched_value *out)
{
    out->has_momentum = false;
    out->momentum = 0;
    switch (s->kind) {
    case OPTIM_SCHED_CONSTANT:
        out->lr = constant_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_STEP:
        out->lr = step_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_MULTISTEP:
        out->lr = multistep_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_EXPONENTIAL:
        out->lr = exponential_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_COSINE:
        out->lr = cosine_at(s->eta_min, base_lr, (double)t, (double)s->T_max);
        return;
    case OPTIM_SCHED_COSINE_WARM_RESTARTS:
        out->lr = warm_restarts_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_LINEAR:
        out->lr = linear_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_POLYNOMIAL:
        out->lr = polynomial_lr(s, base_lr, t);
        return;
    case OPTIM_SCHED_ONE_CYCLE:
        one_cycle_at(s, t, out);
        return;
    case OPTIM_SCHED_REDUCE_ON_PLATEAU:
        /* Without its state the plateau has not reduced anything yet. */
        out->lr = ps ? ps->lr : base_lr;
        return;
    case OPTIM_SCHED_NONE:
    case OPTIM_SCHED_KIND_COUNT:
        break;
    }
    out->lr = base_lr;
}

void optim_sched_eval(const optim_schedule *s, const optim_plateau *ps, double base_lr,
                      uint64_t t, optim_sched_value *out)
{
    uint64_t warm = s->warmup_steps > 0 ? (uint64_t)s->warmup_steps : 0;
    if (t >= warm) {
        sched_at(s, ps, base_lr, t - warm, out);
        return;
    }
    /* Like torch's LinearLR(start_factor=warmup_start_factor,
     * end_factor=1, total_iters=warmup_steps) applied on top of the
     * schedule frozen at its first value (momentum included). */
    sched_at(s, ps, base_lr, 0, out);
    double f = s->warmup_start_factor +
               (1 - s->warmup_start_factor) * (double)t / (double)warm;
    out->lr = out->lr * f;
}

/* ------------------------------------------------------- reduce on plateau */

void optim_plateau_init(const optim_schedule *s, double base_lr, optim_plateau *ps)
{
    ps->lr = base_lr;
    ps->best = s->mode == OPTIM_PLATEAU_MAX ? -INFINITY : INFINITY;
    ps->num_bad_epochs = 0;
    ps->cooldown_counter = 0;
    ps->last_epoch = 0;
}

/* ReduceLROnPlateau.is_better.  A NaN loss is never better. */
static bool plateau_is_better(const optim_schedule *s, double a, double best)
{
    bool rel = s->threshold_mode == OPTIM_THRESHOLD_REL;
    if (s->mode == OPTIM_PLATEAU_MIN)
        return rel ? a < best * (1. - s->threshold) : a < best - s->threshold;
    return rel ? a > best * (s->threshold + 1.) : a > best + s->threshold;
}

/* ReduceLROnPlateau.step(metrics) and _reduce_lr, in torch's order. */
void optim_plateau_observe(const optim_schedule *s, optim_plateau *ps, double loss)
{
    ps->last_epoch++;
    if (plateau_is_better(s, loss, ps->best)) {
        ps->best = loss;
        ps->num_bad_epochs = 0;
    } else {
        ps->num_bad_epochs++;
    }
    if (ps->cooldown_counter > 0) {
        ps->cooldown_counter--;
        ps->num_bad_epochs = 0; /* bad epochs in cooldown are ignored */
    }
    if (ps->num_bad_epochs > s->patience) {
        double old_lr = ps->lr;
        double reduced = old_lr * s->factor;
        /* Python's max(reduced, min_lr) keeps the first on ties. */
        double new_lr = s->min_lr > reduced ? s->min_lr : reduced;
        if (old_lr - new_lr > s->plateau_eps)
            ps->lr = new_lr;
        ps->cooldown_counter = s->cooldown;
        ps->num_bad_epochs = 0;
    }
}
