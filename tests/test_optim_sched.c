/*
 * test_optim_sched.c -- learning-rate schedules against the reference
 * vectors in tests/fixtures/sched/ (written by tests/ref/gen_sched.py from
 * torch.optim.lr_scheduler 1.13's formulas), plus the tables, defaults,
 * validation, warmup and reduce_on_plateau state.
 *
 * Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "optim/optim.h"

#define FIXTURE_DIR "tests/fixtures/sched/"
#define REL_TOL 1e-12
#define N_LOSSES_MAX 4096

static bool close_rel(double got, double want)
{
    if (got == want)
        return true;
    return fabs(got - want) <= REL_TOL * fabs(want);
}

/* ------------------------------------------------------------ fixtures */

static const optim_hp_spec *spec_named(const optim_sched_info *info, const char *name)
{
    for (size_t i = 0; i < info->n_hps; i++)
        if (strcmp(info->hps[i].name, name) == 0)
            return &info->hps[i];
    return NULL;
}

/* Sets one hyperparameter through the spec table, as the API layer does. */
static void set_hp(const optim_sched_info *info, optim_schedule *s, const char *name,
                   const char *value, const char *file)
{
    const optim_hp_spec *sp = spec_named(info, name);
    if (!sp)
        fail_msg("%s: %s has no hyperparameter %s", file, info->name, name);
    char *b = (char *)s;
    switch (sp->type) {
    case OPTIM_HP_NUM:
    case OPTIM_HP_NUM_INF:
        *(double *)(b + sp->offset) = strtod(value, NULL);
        break;
    case OPTIM_HP_INT:
        *(int64_t *)(b + sp->offset) = strtoll(value, NULL, 10);
        break;
    case OPTIM_HP_BOOL:
        *(bool *)(b + sp->offset) = strcmp(value, "true") == 0;
        break;
    case OPTIM_HP_ENUM: {
        int i = 0;
        while (sp->choices[i] && strcmp(sp->choices[i], value) != 0)
            i++;
        if (!sp->choices[i])
            fail_msg("%s: %s is not a choice of %s", file, value, name);
        *(int *)(b + sp->offset) = i;
        break;
    }
    case OPTIM_HP_INT_LIST: {
        int64_t *out = (int64_t *)(b + sp->offset);
        size_t n = 0;
        const char *p = value;
        while (*p) {
            char *end;
            out[n++] = strtoll(p, &end, 10);
            p = *end == ',' ? end + 1 : end;
        }
        *(size_t *)(b + sp->count_offset) = n;
        break;
    }
    case OPTIM_HP_PAIR:
        fail_msg("%s: schedules have no pairs (%s)", file, name);
    }
}

typedef struct {
    int values;
    bool kinds_seen[OPTIM_SCHED_KIND_COUNT];
    bool momentum_seen;
} fixture_tally;

/* Checks every "lr" line of one fixture file. */
static void check_fixture(const char *file, fixture_tally *tally)
{
    char path[256];
    snprintf(path, sizeof path, FIXTURE_DIR "%s", file);
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("cannot open %s (run from the repository root)", path);

    static double losses[N_LOSSES_MAX];
    size_t n_losses = 0, next_loss = 0;
    optim_schedule s;
    const optim_sched_info *info = NULL;
    optim_plateau ps;
    double base_lr = NAN;
    bool started = false;
    uint64_t expect_t = 0;
    char line[512];

    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char key[32], a[256], b[256], c[256];
        int n = sscanf(line, "%31s %255s %255s %255s", key, a, b, c);
        if (n <= 0 || key[0] == '#')
            continue;
        if (strcmp(key, "type") == 0) {
            info = optim_sched_find(a);
            if (!info)
                fail_msg("%s: unknown schedule %s", file, a);
            optim_sched_default(info->kind, &s);
            tally->kinds_seen[info->kind] = true;
        } else if (strcmp(key, "hp") == 0) {
            assert_non_null(info);
            set_hp(info, &s, a, b, file);
        } else if (strcmp(key, "base_lr") == 0) {
            base_lr = strtod(a, NULL);
        } else if (strcmp(key, "loss") == 0) {
            assert_true(n_losses < N_LOSSES_MAX);
            losses[n_losses++] = strtod(a, NULL);
        } else if (strcmp(key, "lr") == 0) {
            assert_int_equal(n, 4);
            if (!started) {
                assert_non_null(info);
                optim_error e;
                if (optim_sched_validate(&s, &e) != OPTIM_OK)
                    fail_msg("%s: refused: %s %s", file, e.field, e.msg);
                optim_plateau_init(&s, base_lr, &ps);
                started = true;
            }
            uint64_t t = strtoull(a, NULL, 10);
            assert_true(t == expect_t);
            expect_t++;
            /* The update after t steps has seen t losses. */
            if (s.kind == OPTIM_SCHED_REDUCE_ON_PLATEAU) {
                while (next_loss < t) {
                    assert_true(next_loss < n_losses);
                    optim_plateau_observe(&s, &ps, losses[next_loss++]);
                }
                assert_int_equal(ps.last_epoch, (int64_t)t);
            }
            optim_sched_value v;
            memset(&v, 0xa5, sizeof v);
            optim_sched_eval(&s, s.kind == OPTIM_SCHED_REDUCE_ON_PLATEAU ? &ps : NULL, base_lr,
                             t, &v);
            double want = strtod(b, NULL);
            if (!close_rel(v.lr, want))
                fail_msg("%s: t=%llu lr %a, want %a", file, (unsigned long long)t, v.lr, want);
            if (strcmp(c, "-") == 0) {
                if (v.has_momentum)
                    fail_msg("%s: t=%llu has momentum, none expected", file,
                             (unsigned long long)t);
            } else {
                double want_m = strtod(c, NULL);
                if (!v.has_momentum || !close_rel(v.momentum, want_m))
                    fail_msg("%s: t=%llu momentum %a (has %d), want %a", file,
                             (unsigned long long)t, v.momentum, v.has_momentum, want_m);
                tally->momentum_seen = true;
            }
            tally->values++;
        } else {
            fail_msg("%s: unknown line %s", file, line);
        }
    }
    fclose(f);
    if (expect_t < 100)
        fail_msg("%s: only %llu values", file, (unsigned long long)expect_t);
}

static void test_fixtures(void **state)
{
    (void)state;
    FILE *idx = fopen(FIXTURE_DIR "INDEX", "r");
    if (!idx)
        fail_msg("cannot open " FIXTURE_DIR "INDEX (run from the repository root)");
    fixture_tally tally;
    memset(&tally, 0, sizeof tally);
    char name[128];
    int files = 0;
    while (fgets(name, sizeof name, idx)) {
        name[strcspn(name, "\n")] = 0;
        if (!name[0])
            continue;
        check_fixture(name, &tally);
        files++;
    }
    fclose(idx);
    assert_true(files >= 40);
    assert_true(tally.values >= 40 * 100);
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT; k++)
        if (!tally.kinds_seen[k])
            fail_msg("no fixture for %s", optim_sched_info_of((optim_sched_kind)k)->name);
    assert_true(tally.momentum_seen);
}

/* -------------------------------------------------------------- tables */

static void test_tables(void **state)
{
    (void)state;
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT; k++) {
        const optim_sched_info *info = optim_sched_info_of((optim_sched_kind)k);
        assert_non_null(info);
        assert_int_equal(info->kind, k);
        assert_ptr_equal(optim_sched_find(info->name), info);
        assert_non_null(info->doc);
        assert_true(strlen(info->doc) > 10);
        bool has_ws = false, has_wsf = false;
        for (size_t i = 0; i < info->n_hps; i++) {
            const optim_hp_spec *sp = &info->hps[i];
            assert_non_null(sp->name);
            assert_non_null(sp->doc);
            assert_true(strlen(sp->doc) > 5);
            assert_true(sp->offset < sizeof(optim_schedule));
            if (sp->type == OPTIM_HP_ENUM)
                assert_non_null(sp->choices);
            if (sp->type == OPTIM_HP_INT_LIST) {
                assert_int_equal(sp->offset, offsetof(optim_schedule, milestones));
                assert_int_equal(sp->count_offset, offsetof(optim_schedule, n_milestones));
            }
            /* Names are unique within a table. */
            for (size_t j = 0; j < i; j++)
                assert_string_not_equal(info->hps[j].name, sp->name);
            if (strcmp(sp->name, "warmup_steps") == 0) {
                has_ws = true;
                assert_int_equal(sp->type, OPTIM_HP_INT);
                assert_int_equal(sp->offset, offsetof(optim_schedule, warmup_steps));
            }
            if (strcmp(sp->name, "warmup_start_factor") == 0) {
                has_wsf = true;
                assert_int_equal(sp->offset, offsetof(optim_schedule, warmup_start_factor));
            }
        }
        assert_true(has_ws && has_wsf);
    }
    assert_null(optim_sched_info_of(OPTIM_SCHED_KIND_COUNT));
    assert_null(optim_sched_find("cosine_annealing"));
    assert_null(optim_sched_find(""));
    assert_null(optim_sched_find(NULL));
    assert_int_equal(optim_sched_find("none")->kind, OPTIM_SCHED_NONE);

    /* torch's eps is spelled "eps" in JSON and lands in plateau_eps. */
    const optim_hp_spec *eps = spec_named(optim_sched_info_of(OPTIM_SCHED_REDUCE_ON_PLATEAU), "eps");
    assert_non_null(eps);
    assert_int_equal(eps->offset, offsetof(optim_schedule, plateau_eps));
    const optim_hp_spec *ms = spec_named(optim_sched_info_of(OPTIM_SCHED_MULTISTEP), "milestones");
    assert_non_null(ms);
    assert_int_equal(ms->type, OPTIM_HP_INT_LIST);
    assert_true(ms->required);
}

/* The required fields, as torch has them (no default in its signature). */
static void test_required(void **state)
{
    (void)state;
    static const struct {
        optim_sched_kind kind;
        const char *fields[3];
    } req[] = {
        {OPTIM_SCHED_NONE, {NULL}},
        {OPTIM_SCHED_CONSTANT, {NULL}},
        {OPTIM_SCHED_STEP, {"step_size", NULL}},
        {OPTIM_SCHED_MULTISTEP, {"milestones", NULL}},
        {OPTIM_SCHED_EXPONENTIAL, {"gamma", NULL}},
        {OPTIM_SCHED_COSINE, {"T_max", NULL}},
        {OPTIM_SCHED_COSINE_WARM_RESTARTS, {"T_0", NULL}},
        {OPTIM_SCHED_LINEAR, {NULL}},
        {OPTIM_SCHED_POLYNOMIAL, {NULL}},
        {OPTIM_SCHED_ONE_CYCLE, {"max_lr", "total_steps", NULL}},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, {NULL}},
    };
    assert_int_equal(sizeof req / sizeof req[0], OPTIM_SCHED_KIND_COUNT);
    for (size_t r = 0; r < sizeof req / sizeof req[0]; r++) {
        const optim_sched_info *info = optim_sched_info_of(req[r].kind);
        size_t n_req = 0;
        for (size_t i = 0; i < info->n_hps; i++)
            if (info->hps[i].required)
                n_req++;
        size_t n_want = 0;
        while (req[r].fields[n_want])
            n_want++;
        assert_int_equal(n_req, n_want);
        for (size_t j = 0; j < n_want; j++) {
            const optim_hp_spec *sp = spec_named(info, req[r].fields[j]);
            assert_non_null(sp);
            assert_true(sp->required);
        }
        /* Defaults alone are valid exactly when nothing is required; the
         * error names the first required field. */
        optim_schedule s;
        optim_sched_default(req[r].kind, &s);
        optim_error e;
        memset(&e, 0, sizeof e);
        int rc = optim_sched_validate(&s, &e);
        if (n_want == 0) {
            assert_int_equal(rc, OPTIM_OK);
        } else {
            assert_int_equal(rc, OPTIM_EINVAL);
            assert_string_equal(e.field, req[r].fields[0]);
            assert_true(strlen(e.msg) > 0);
        }
    }
}

static void test_defaults_are_torch(void **state)
{
    (void)state;
    optim_schedule s;
    optim_sched_default(OPTIM_SCHED_CONSTANT, &s);
    assert_true(s.factor == 1.0 / 3 && s.total_iters == 5);
    optim_sched_default(OPTIM_SCHED_STEP, &s);
    assert_true(s.gamma == 0.1);
    optim_sched_default(OPTIM_SCHED_MULTISTEP, &s);
    assert_true(s.gamma == 0.1 && s.n_milestones == 0);
    optim_sched_default(OPTIM_SCHED_COSINE, &s);
    assert_true(s.eta_min == 0);
    optim_sched_default(OPTIM_SCHED_COSINE_WARM_RESTARTS, &s);
    assert_true(s.T_mult == 1 && s.eta_min == 0);
    optim_sched_default(OPTIM_SCHED_LINEAR, &s);
    assert_true(s.start_factor == 1.0 / 3 && s.end_factor == 1.0 && s.total_iters == 5);
    optim_sched_default(OPTIM_SCHED_POLYNOMIAL, &s);
    assert_true(s.total_iters == 5 && s.power == 1.0);
    optim_sched_default(OPTIM_SCHED_ONE_CYCLE, &s);
    assert_true(s.pct_start == 0.3 && s.anneal_strategy == OPTIM_ANNEAL_COS &&
                s.div_factor == 25.0 && s.final_div_factor == 1e4 && !s.three_phase &&
                s.cycle_momentum && s.base_momentum == 0.85 && s.max_momentum == 0.95);
    optim_sched_default(OPTIM_SCHED_REDUCE_ON_PLATEAU, &s);
    assert_true(s.mode == OPTIM_PLATEAU_MIN && s.factor == 0.1 && s.patience == 10 &&
                s.threshold == 1e-4 && s.threshold_mode == OPTIM_THRESHOLD_REL &&
                s.cooldown == 0 && s.min_lr == 0 && s.plateau_eps == 1e-8);
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT; k++) {
        optim_sched_default((optim_sched_kind)k, &s);
        assert_int_equal(s.kind, k);
        assert_true(s.warmup_steps == 0 && s.warmup_start_factor == 0.0);
    }
}

/* ---------------------------------------------------------- validation */

/* A valid schedule of each kind. */
static void valid_sched(optim_sched_kind kind, optim_schedule *s)
{
    optim_sched_default(kind, s);
    s->step_size = 10;
    s->milestones[0] = 5;
    s->milestones[1] = 9;
    s->n_milestones = 2;
    if (kind == OPTIM_SCHED_EXPONENTIAL)
        s->gamma = 0.9;
    s->T_max = 100;
    s->T_0 = 10;
    s->max_lr = 0.1;
    s->total_steps = 1000;
}

typedef void (*mutator)(optim_schedule *s);

#define BAD(fn, stmt)                                                                      \
    static void fn(optim_schedule *s)                                                      \
    {                                                                                      \
        stmt;                                                                              \
    }

BAD(nan_gamma, s->gamma = NAN)
BAD(inf_eta_min, s->eta_min = INFINITY)
BAD(neg_eta_min, s->eta_min = -1e-3)
BAD(zero_gamma, s->gamma = 0)
BAD(neg_gamma, s->gamma = -0.5)
BAD(zero_step_size, s->step_size = 0)
BAD(neg_step_size, s->step_size = -3)
BAD(constant_factor_big, s->factor = 1.5)
BAD(constant_factor_neg, s->factor = -0.1)
BAD(zero_total_iters, s->total_iters = 0)
BAD(neg_total_iters, s->total_iters = -1)
BAD(start_factor_zero, s->start_factor = 0)
BAD(start_factor_big, s->start_factor = 1.01)
BAD(end_factor_neg, s->end_factor = -0.01)
BAD(end_factor_big, s->end_factor = 1.2)
BAD(power_neg, s->power = -1)
BAD(power_nan, s->power = NAN)
BAD(no_milestones, s->n_milestones = 0)
BAD(milestones_equal, (s->milestones[1] = 5))
BAD(milestones_down, (s->milestones[0] = 20))
BAD(milestones_neg, (s->milestones[0] = -1))
BAD(milestones_overflow, s->n_milestones = OPTIM_MAX_LIST + 1)
BAD(t_max_zero, s->T_max = 0)
BAD(t0_zero, s->T_0 = 0)
BAD(t_mult_zero, s->T_mult = 0)
BAD(max_lr_zero, s->max_lr = 0)
BAD(max_lr_nan, s->max_lr = NAN)
BAD(total_steps_zero, s->total_steps = 0)
BAD(pct_start_big, s->pct_start = 1.5)
BAD(pct_start_neg, s->pct_start = -0.1)
BAD(pct_start_empty_phase, (s->pct_start = 0.1, s->total_steps = 10))
BAD(div_factor_zero, s->div_factor = 0)
BAD(final_div_factor_neg, s->final_div_factor = -1)
BAD(anneal_bad, s->anneal_strategy = 2)
BAD(base_momentum_big, s->base_momentum = 1.5)
BAD(max_momentum_neg, s->max_momentum = -0.1)
BAD(plateau_factor_one, s->factor = 1.0)
BAD(plateau_factor_neg, s->factor = -0.5)
BAD(plateau_mode_bad, s->mode = 5)
BAD(plateau_threshold_mode_bad, s->threshold_mode = -1)
BAD(plateau_threshold_neg, s->threshold = -1e-4)
BAD(plateau_patience_neg, s->patience = -1)
BAD(plateau_cooldown_neg, s->cooldown = -2)
BAD(plateau_min_lr_neg, s->min_lr = -1)
BAD(plateau_eps_neg, s->plateau_eps = -1e-8)
BAD(plateau_eps_nan, s->plateau_eps = NAN)
BAD(warmup_steps_neg, s->warmup_steps = -1)
BAD(warmup_factor_big, s->warmup_start_factor = 1.5)
BAD(warmup_factor_neg, s->warmup_start_factor = -0.5)
BAD(warmup_factor_nan, s->warmup_start_factor = NAN)
BAD(kind_bad, s->kind = OPTIM_SCHED_KIND_COUNT)

static void test_validation_names_field(void **state)
{
    (void)state;
    static const struct {
        optim_sched_kind kind;
        mutator fn;
        const char *field;
    } cases[] = {
        {OPTIM_SCHED_STEP, nan_gamma, "gamma"},
        {OPTIM_SCHED_STEP, zero_gamma, "gamma"},
        {OPTIM_SCHED_STEP, zero_step_size, "step_size"},
        {OPTIM_SCHED_STEP, neg_step_size, "step_size"},
        {OPTIM_SCHED_MULTISTEP, neg_gamma, "gamma"},
        {OPTIM_SCHED_MULTISTEP, no_milestones, "milestones"},
        {OPTIM_SCHED_MULTISTEP, milestones_equal, "milestones"},
        {OPTIM_SCHED_MULTISTEP, milestones_down, "milestones"},
        {OPTIM_SCHED_MULTISTEP, milestones_neg, "milestones"},
        {OPTIM_SCHED_MULTISTEP, milestones_overflow, "milestones"},
        {OPTIM_SCHED_EXPONENTIAL, zero_gamma, "gamma"},
        {OPTIM_SCHED_EXPONENTIAL, nan_gamma, "gamma"},
        {OPTIM_SCHED_CONSTANT, constant_factor_big, "factor"},
        {OPTIM_SCHED_CONSTANT, constant_factor_neg, "factor"},
        {OPTIM_SCHED_CONSTANT, zero_total_iters, "total_iters"},
        {OPTIM_SCHED_CONSTANT, neg_total_iters, "total_iters"},
        {OPTIM_SCHED_COSINE, t_max_zero, "T_max"},
        {OPTIM_SCHED_COSINE, inf_eta_min, "eta_min"},
        {OPTIM_SCHED_COSINE, neg_eta_min, "eta_min"},
        {OPTIM_SCHED_COSINE_WARM_RESTARTS, t0_zero, "T_0"},
        {OPTIM_SCHED_COSINE_WARM_RESTARTS, t_mult_zero, "T_mult"},
        {OPTIM_SCHED_COSINE_WARM_RESTARTS, neg_eta_min, "eta_min"},
        {OPTIM_SCHED_LINEAR, start_factor_zero, "start_factor"},
        {OPTIM_SCHED_LINEAR, start_factor_big, "start_factor"},
        {OPTIM_SCHED_LINEAR, end_factor_neg, "end_factor"},
        {OPTIM_SCHED_LINEAR, end_factor_big, "end_factor"},
        {OPTIM_SCHED_LINEAR, zero_total_iters, "total_iters"},
        {OPTIM_SCHED_POLYNOMIAL, zero_total_iters, "total_iters"},
        {OPTIM_SCHED_POLYNOMIAL, power_neg, "power"},
        {OPTIM_SCHED_POLYNOMIAL, power_nan, "power"},
        {OPTIM_SCHED_ONE_CYCLE, max_lr_zero, "max_lr"},
        {OPTIM_SCHED_ONE_CYCLE, max_lr_nan, "max_lr"},
        {OPTIM_SCHED_ONE_CYCLE, total_steps_zero, "total_steps"},
        {OPTIM_SCHED_ONE_CYCLE, pct_start_big, "pct_start"},
        {OPTIM_SCHED_ONE_CYCLE, pct_start_neg, "pct_start"},
        {OPTIM_SCHED_ONE_CYCLE, pct_start_empty_phase, "pct_start"},
        {OPTIM_SCHED_ONE_CYCLE, div_factor_zero, "div_factor"},
        {OPTIM_SCHED_ONE_CYCLE, final_div_factor_neg, "final_div_factor"},
        {OPTIM_SCHED_ONE_CYCLE, anneal_bad, "anneal_strategy"},
        {OPTIM_SCHED_ONE_CYCLE, base_momentum_big, "base_momentum"},
        {OPTIM_SCHED_ONE_CYCLE, max_momentum_neg, "max_momentum"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_factor_one, "factor"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_factor_neg, "factor"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_mode_bad, "mode"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_threshold_mode_bad, "threshold_mode"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_threshold_neg, "threshold"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_patience_neg, "patience"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_cooldown_neg, "cooldown"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_min_lr_neg, "min_lr"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_eps_neg, "eps"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, plateau_eps_nan, "eps"},
        {OPTIM_SCHED_NONE, warmup_steps_neg, "warmup_steps"},
        {OPTIM_SCHED_COSINE, warmup_steps_neg, "warmup_steps"},
        {OPTIM_SCHED_STEP, warmup_factor_big, "warmup_start_factor"},
        {OPTIM_SCHED_ONE_CYCLE, warmup_factor_neg, "warmup_start_factor"},
        {OPTIM_SCHED_REDUCE_ON_PLATEAU, warmup_factor_nan, "warmup_start_factor"},
        {OPTIM_SCHED_NONE, kind_bad, "type"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        optim_schedule s;
        optim_error e;
        valid_sched(cases[i].kind, &s);
        if (optim_sched_validate(&s, &e) != OPTIM_OK)
            fail_msg("case %zu: the valid base was refused: %s %s", i, e.field, e.msg);
        cases[i].fn(&s);
        memset(&e, 0, sizeof e);
        if (optim_sched_validate(&s, &e) != OPTIM_EINVAL)
            fail_msg("case %zu (%s): accepted", i, cases[i].field);
        if (strcmp(e.field, cases[i].field) != 0)
            fail_msg("case %zu: field \"%s\", want \"%s\" (%s)", i, e.field, cases[i].field,
                     e.msg);
        assert_true(strlen(e.msg) > 0);
    }
    /* Fields another kind uses are not this kind's business. */
    optim_schedule s;
    valid_sched(OPTIM_SCHED_COSINE, &s);
    s.gamma = NAN;
    s.step_size = -5;
    assert_int_equal(optim_sched_validate(&s, NULL), OPTIM_OK);
    /* Boundaries that are allowed. */
    valid_sched(OPTIM_SCHED_CONSTANT, &s);
    s.factor = 0;
    assert_int_equal(optim_sched_validate(&s, NULL), OPTIM_OK);
    s.factor = 1;
    assert_int_equal(optim_sched_validate(&s, NULL), OPTIM_OK);
    valid_sched(OPTIM_SCHED_ONE_CYCLE, &s);
    s.pct_start = 0;
    assert_int_equal(optim_sched_validate(&s, NULL), OPTIM_OK);
    s.pct_start = 1;
    s.warmup_start_factor = 1;
    s.warmup_steps = 100;
    assert_int_equal(optim_sched_validate(&s, NULL), OPTIM_OK);
    valid_sched(OPTIM_SCHED_MULTISTEP, &s);
    s.milestones[0] = 0;
    s.n_milestones = 1;
    assert_int_equal(optim_sched_validate(&s, NULL), OPTIM_OK);
}

/* ------------------------------------------------------------ behaviour */

static void eval_at(const optim_schedule *s, uint64_t t, optim_sched_value *v)
{
    optim_sched_eval(s, NULL, 0.1, t, v);
}

/* torch raises past total_steps (and extrapolates at it); optd holds the
 * end of the cycle. */
static void test_one_cycle_holds(void **state)
{
    (void)state;
    for (int anneal = 0; anneal < 2; anneal++) {
        for (int three = 0; three < 2; three++) {
            optim_schedule s;
            valid_sched(OPTIM_SCHED_ONE_CYCLE, &s);
            s.total_steps = 10;
            s.anneal_strategy = anneal;
            s.three_phase = three;
            optim_sched_value end, v;
            eval_at(&s, 9, &end);
            assert_true(end.has_momentum);
            assert_true(end.lr > 0);
            /* The cycle ends at initial_lr / final_div_factor (linear
             * annealing gets there to within max_lr's rounding). */
            assert_true(fabs(end.lr - 0.1 / 25 / 1e4) <= 1e-15 * 0.1);
            assert_true(end.momentum == 0.95);
            const uint64_t later[] = {10, 11, 1000, UINT64_MAX};
            for (size_t i = 0; i < 4; i++) {
                eval_at(&s, later[i], &v);
                assert_true(v.lr == end.lr);
                assert_true(v.momentum == end.momentum);
            }
            /* one_cycle ignores base_lr: it starts at max_lr / div_factor. */
            optim_sched_eval(&s, NULL, 123.0, 0, &v);
            assert_true(fabs(v.lr - 0.1 / 25) <= 1e-15 * (0.1 / 25));
            assert_true(v.momentum == 0.95);
        }
    }
    optim_schedule s;
    valid_sched(OPTIM_SCHED_ONE_CYCLE, &s);
    s.cycle_momentum = false;
    optim_sched_value v;
    eval_at(&s, 5, &v);
    assert_false(v.has_momentum);
}

/* Nothing overflows, divides by zero or loops for ever at huge t. */
static void test_huge_t(void **state)
{
    (void)state;
    const uint64_t ts[] = {(uint64_t)1 << 40, (uint64_t)1 << 62, UINT64_MAX - 1, UINT64_MAX};
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT; k++) {
        for (int mult = 1; mult <= 3; mult += 2) {
            optim_schedule s;
            valid_sched((optim_sched_kind)k, &s);
            s.T_mult = mult;
            s.warmup_steps = 1000;
            optim_plateau ps;
            optim_plateau_init(&s, 0.1, &ps);
            for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
                optim_sched_value v;
                optim_sched_eval(&s, &ps, 0.1, ts[i], &v);
                if (!isfinite(v.lr) || v.lr < 0)
                    fail_msg("%s at t=%llu: lr %g", optim_sched_info_of(s.kind)->name,
                             (unsigned long long)ts[i], v.lr);
            }
        }
    }
}

static void test_warmup(void **state)
{
    (void)state;
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT; k++) {
        optim_schedule s;
        valid_sched((optim_sched_kind)k, &s);
        optim_plateau ps;
        optim_plateau_init(&s, 0.2, &ps);
        ps.lr = 0.05; /* as if the plateau had reduced once */
        optim_sched_value v0, v;
        optim_sched_eval(&s, &ps, 0.2, 0, &v0);
        s.warmup_steps = 8;
        s.warmup_start_factor = 0.25;
        for (uint64_t t = 0; t < 8; t++) {
            optim_sched_eval(&s, &ps, 0.2, t, &v);
            double f = 0.25 + (1 - 0.25) * (double)t / 8.0;
            assert_true(v.lr == v0.lr * f);
            assert_true(v.has_momentum == v0.has_momentum);
            if (v.has_momentum)
                assert_true(v.momentum == v0.momentum);
        }
        /* At the end of warmup the schedule starts from its own t = 0. */
        for (uint64_t u = 0; u < 50; u++) {
            optim_sched_value w;
            s.warmup_steps = 0;
            optim_sched_eval(&s, &ps, 0.2, u, &w);
            s.warmup_steps = 8;
            optim_sched_eval(&s, &ps, 0.2, u + 8, &v);
            assert_true(v.lr == w.lr);
            assert_true(v.has_momentum == w.has_momentum && v.momentum == w.momentum);
        }
        /* The default start factor 0 makes the first update's lr 0. */
        s.warmup_start_factor = 0;
        optim_sched_eval(&s, &ps, 0.2, 0, &v);
        assert_true(v.lr == 0);
    }
}

static void test_plateau_state(void **state)
{
    (void)state;
    optim_schedule s;
    optim_sched_default(OPTIM_SCHED_REDUCE_ON_PLATEAU, &s);
    s.patience = 1;
    s.cooldown = 1;
    optim_plateau ps;
    optim_plateau_init(&s, 0.5, &ps);
    assert_true(ps.lr == 0.5 && isinf(ps.best) && ps.best > 0);
    assert_true(ps.num_bad_epochs == 0 && ps.cooldown_counter == 0 && ps.last_epoch == 0);

    optim_sched_value v;
    optim_sched_eval(&s, NULL, 0.5, 3, &v); /* no state: nothing reduced */
    assert_true(v.lr == 0.5 && !v.has_momentum);

    optim_plateau_observe(&s, &ps, 1.0); /* better than inf */
    assert_true(ps.best == 1.0 && ps.num_bad_epochs == 0);
    optim_plateau_observe(&s, &ps, NAN); /* never better */
    assert_true(ps.best == 1.0 && ps.num_bad_epochs == 1 && ps.lr == 0.5);
    optim_plateau_observe(&s, &ps, 1.0); /* not better by 1e-4: 2 > patience */
    assert_true(ps.lr == 0.5 * 0.1);
    assert_true(ps.num_bad_epochs == 0 && ps.cooldown_counter == 1);
    optim_plateau_observe(&s, &ps, 5.0); /* bad, but in cooldown */
    assert_true(ps.num_bad_epochs == 0 && ps.cooldown_counter == 0);
    optim_plateau_observe(&s, &ps, 0.99995); /* improved by less than 1e-4 */
    assert_true(ps.num_bad_epochs == 1 && ps.best == 1.0);
    optim_plateau_observe(&s, &ps, 0.5);
    assert_true(ps.num_bad_epochs == 0 && ps.best == 0.5);
    assert_int_equal(ps.last_epoch, 6);
    optim_sched_eval(&s, &ps, 0.5, 6, &v);
    assert_true(v.lr == ps.lr);

    /* max mode starts from -inf; min_lr bounds the reduction and eps skips
     * a reduction too small to matter. */
    s.mode = OPTIM_PLATEAU_MAX;
    s.patience = 0;
    s.cooldown = 0;
    s.min_lr = 0.3;
    optim_plateau_init(&s, 0.5, &ps);
    assert_true(isinf(ps.best) && ps.best < 0);
    optim_plateau_observe(&s, &ps, 1.0);
    optim_plateau_observe(&s, &ps, 1.0);
    assert_true(ps.lr == 0.3);
    s.min_lr = 0.3 - 1e-9;
    optim_plateau_observe(&s, &ps, 1.0);
    assert_true(ps.lr == 0.3);
}

/* Checks a few closed forms directly, independently of the fixtures. */
static void test_spot_values(void **state)
{
    (void)state;
    optim_schedule s;
    optim_sched_value v;
    valid_sched(OPTIM_SCHED_STEP, &s); /* step_size 10, gamma 0.1 */
    optim_sched_eval(&s, NULL, 1.0, 9, &v);
    assert_true(v.lr == 1.0);
    optim_sched_eval(&s, NULL, 1.0, 10, &v);
    assert_true(v.lr == 0.1);
    valid_sched(OPTIM_SCHED_MULTISTEP, &s); /* milestones 5, 9 */
    optim_sched_eval(&s, NULL, 1.0, 4, &v);
    assert_true(v.lr == 1.0);
    optim_sched_eval(&s, NULL, 1.0, 5, &v);
    assert_true(v.lr == 0.1);
    optim_sched_eval(&s, NULL, 1.0, 9, &v);
    assert_true(fabs(v.lr - 0.01) < 1e-17);
    valid_sched(OPTIM_SCHED_COSINE, &s); /* T_max 100 */
    optim_sched_eval(&s, NULL, 1.0, 50, &v);
    assert_true(fabs(v.lr - 0.5) < 1e-15);
    optim_sched_eval(&s, NULL, 1.0, 100, &v);
    assert_true(v.lr == 0);
    valid_sched(OPTIM_SCHED_COSINE_WARM_RESTARTS, &s); /* T_0 10 */
    s.T_mult = 2;
    optim_sched_value w;
    optim_sched_eval(&s, NULL, 1.0, 10, &v); /* first restart */
    assert_true(v.lr == 1.0);
    optim_sched_eval(&s, NULL, 1.0, 30, &v); /* second: 10 + 20 */
    assert_true(v.lr == 1.0);
    optim_sched_eval(&s, NULL, 1.0, 20, &w); /* half-way through period 20 */
    assert_true(fabs(w.lr - 0.5) < 1e-15);
    valid_sched(OPTIM_SCHED_NONE, &s);
    optim_sched_eval(&s, NULL, 0.3, 1000, &v);
    assert_true(v.lr == 0.3 && !v.has_momentum);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixtures),
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_required),
        cmocka_unit_test(test_defaults_are_torch),
        cmocka_unit_test(test_validation_names_field),
        cmocka_unit_test(test_one_cycle_holds),
        cmocka_unit_test(test_huge_t),
        cmocka_unit_test(test_warmup),
        cmocka_unit_test(test_plateau_state),
        cmocka_unit_test(test_spot_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
