/*
 * test_optim_validate.c -- the optimizer registry and hyperparameter
 * validation: names, spec tables and defaults against torch.optim 1.13's
 * signatures (written out here from torch's documentation, not read from
 * the library's tables), and every rejection the numerical contract lists,
 * with the field it must name.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "optim/optim.h"

/* ------------------------------------------------- torch 1.13 defaults */

typedef enum { TV_NUM, TV_PAIR, TV_BOOL, TV_FORM } tv_type;

typedef struct {
    const char *name;
    tv_type type;
    size_t off;
    double def[2];
    bool required;
} tv_field;

#define TV_END {NULL, TV_NUM, 0, {0, 0}, false}
#define NUM(f, v) {#f, TV_NUM, offsetof(optim_hparams, f), {v, 0}, false}
#define PAIR(f, a, b) {#f, TV_PAIR, offsetof(optim_hparams, f), {a, b}, false}
#define FLAG(f) {#f, TV_BOOL, offsetof(optim_hparams, f), {0, 0}, false}

/* Each optimizer's keyword arguments in torch 1.13 (foreach, capturable,
 * differentiable and fused are execution switches, not hyperparameters),
 * plus optd's SGD momentum_form ("torch") and bias_correction (false), and
 * lion. */
static const tv_field tv_sgd[] = {
    {"lr", TV_NUM, offsetof(optim_hparams, lr), {0, 0}, true}, /* torch: required */
    NUM(momentum, 0), NUM(dampening, 0), NUM(weight_decay, 0), FLAG(nesterov),
    FLAG(maximize),
    {"momentum_form", TV_FORM, offsetof(optim_hparams, momentum_form), {OPTIM_MOMENTUM_TORCH, 0}, false},
    FLAG(bias_correction), TV_END};
static const tv_field tv_adagrad[] = {
    NUM(lr, 1e-2), NUM(lr_decay, 0), NUM(weight_decay, 0), NUM(initial_accumulator_value, 0),
    NUM(eps, 1e-10), FLAG(maximize), TV_END};
static const tv_field tv_rmsprop[] = {
    NUM(lr, 1e-2), NUM(alpha, 0.99), NUM(eps, 1e-8), NUM(weight_decay, 0), NUM(momentum, 0),
    FLAG(centered), FLAG(maximize), TV_END};
static const tv_field tv_adam[] = {
    NUM(lr, 1e-3), PAIR(betas, 0.9, 0.999), NUM(eps, 1e-8), NUM(weight_decay, 0),
    FLAG(amsgrad), FLAG(maximize), TV_END};
static const tv_field tv_adamw[] = {
    NUM(lr, 1e-3), PAIR(betas, 0.9, 0.999), NUM(eps, 1e-8), NUM(weight_decay, 1e-2),
    FLAG(amsgrad), FLAG(maximize), TV_END};
static const tv_field tv_adamax[] = {
    NUM(lr, 2e-3), PAIR(betas, 0.9, 0.999), NUM(eps, 1e-8), NUM(weight_decay, 0),
    FLAG(maximize), TV_END};
static const tv_field tv_adadelta[] = {
    NUM(lr, 1.0), NUM(rho, 0.9), NUM(eps, 1e-6), NUM(weight_decay, 0), FLAG(maximize), TV_END};
static const tv_field tv_nadam[] = {
    NUM(lr, 2e-3), PAIR(betas, 0.9, 0.999), NUM(eps, 1e-8), NUM(weight_decay, 0),
    NUM(momentum_decay, 4e-3), TV_END};
static const tv_field tv_radam[] = {
    NUM(lr, 1e-3), PAIR(betas, 0.9, 0.999), NUM(eps, 1e-8), NUM(weight_decay, 0), TV_END};
static const tv_field tv_asgd[] = {
    NUM(lr, 1e-2), NUM(lambd, 1e-4), NUM(alpha, 0.75), NUM(t0, 1e6), NUM(weight_decay, 0),
    FLAG(maximize), TV_END};
static const tv_field tv_rprop[] = {
    NUM(lr, 1e-2), PAIR(etas, 0.5, 1.2), PAIR(step_sizes, 1e-6, 50), FLAG(maximize), TV_END};
static const tv_field tv_lion[] = {
    NUM(lr, 1e-4), PAIR(betas, 0.9, 0.99), NUM(weight_decay, 0), TV_END};

static const struct {
    const char *name;
    optim_kind kind;
    const tv_field *fields;
} tv_kinds[] = {
    {"sgd", OPTIM_SGD, tv_sgd},           {"adagrad", OPTIM_ADAGRAD, tv_adagrad},
    {"rmsprop", OPTIM_RMSPROP, tv_rmsprop}, {"adam", OPTIM_ADAM, tv_adam},
    {"adamw", OPTIM_ADAMW, tv_adamw},     {"adamax", OPTIM_ADAMAX, tv_adamax},
    {"adadelta", OPTIM_ADADELTA, tv_adadelta}, {"nadam", OPTIM_NADAM, tv_nadam},
    {"radam", OPTIM_RADAM, tv_radam},     {"asgd", OPTIM_ASGD, tv_asgd},
    {"rprop", OPTIM_RPROP, tv_rprop},     {"lion", OPTIM_LION, tv_lion},
};
#define N_KINDS (sizeof tv_kinds / sizeof tv_kinds[0])

static const tv_field *tv_field_named(const tv_field *fs, const char *name)
{
    for (; fs->name; fs++)
        if (strcmp(fs->name, name) == 0)
            return fs;
    return NULL;
}

static double *tv_num(optim_hparams *hp, const tv_field *f)
{
    return (double *)((char *)hp + f->off);
}

/* Defaults of kind, with a valid lr where torch requires one. */
static void tv_defaults(optim_kind kind, optim_hparams *hp)
{
    optim_hparams_default(kind, hp);
    if (kind == OPTIM_SGD)
        hp->lr = 0.1;
}

/* ------------------------------------------------------------ registry */

static void test_names_and_kinds(void **state)
{
    (void)state;
    assert_int_equal(N_KINDS, OPTIM_KIND_COUNT);
    for (size_t k = 0; k < N_KINDS; k++) {
        const optim_info *info = optim_find(tv_kinds[k].name);
        if (!info)
            fail_msg("optim_find(\"%s\") is NULL", tv_kinds[k].name);
        assert_string_equal(info->name, tv_kinds[k].name);
        assert_int_equal(info->kind, tv_kinds[k].kind);
        assert_ptr_equal(optim_info_of(tv_kinds[k].kind), info);
        assert_non_null(info->doc);
        assert_true(info->doc[0] != '\0');
    }
}

static void test_unknown_names(void **state)
{
    (void)state;
    static const char *const unknown[] = {
        "", "lbfgs", "sparse_adam", "sparseadam", "ada", "adam ", " adam", "adamw2",
        "sg", "sgdx", "rms", "adam\n", "lions", "nadamw", "optim", "momentum",
    };
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++)
        if (optim_find(unknown[i]) != NULL)
            fail_msg("optim_find(\"%s\") should be NULL", unknown[i]);
}

/* Reports every problem of a table before failing. */
#define TV_PROBLEM(...) (problems++, print_error(__VA_ARGS__), print_error("\n"))

/* Every spec entry is one of torch's arguments with torch's default and a
 * doc; every torch argument has a spec entry pointing at its field. */
static void test_specs_match_torch(void **state)
{
    (void)state;
    unsigned problems = 0;
    for (size_t k = 0; k < N_KINDS; k++) {
        const optim_info *info = optim_find(tv_kinds[k].name);
        assert_non_null(info);
        assert_non_null(info->hps);
        const char *kn = tv_kinds[k].name;
        for (size_t i = 0; i < info->n_hps; i++) {
            const optim_hp_spec *sp = &info->hps[i];
            assert_non_null(sp->name);
            const tv_field *f = tv_field_named(tv_kinds[k].fields, sp->name);
            if (!f) {
                TV_PROBLEM("%s: spec has %s, which torch 1.13's %s does not take", kn, sp->name, kn);
                continue;
            }
            if (!sp->doc || !sp->doc[0])
                TV_PROBLEM("%s.%s: no doc", kn, sp->name);
            if (sp->offset != f->off)
                TV_PROBLEM("%s.%s: offset %zu, the field is at %zu", kn, sp->name, sp->offset, f->off);
            if (sp->required != f->required)
                TV_PROBLEM("%s.%s: required = %d (default %.17g), torch: %s", kn, sp->name,
                           sp->required, sp->def[0], f->required ? "required" : "has a default");
            for (size_t j = 0; j < i; j++)
                if (strcmp(info->hps[j].name, sp->name) == 0)
                    TV_PROBLEM("%s.%s listed twice", kn, sp->name);
            switch (f->type) {
            case TV_NUM:
                if (sp->type != OPTIM_HP_NUM && sp->type != OPTIM_HP_NUM_INF)
                    TV_PROBLEM("%s.%s: not a number spec (type %d)", kn, sp->name, (int)sp->type);
                if (!f->required && sp->def[0] != f->def[0])
                    TV_PROBLEM("%s.%s: default %.17g, torch %.17g", kn, sp->name, sp->def[0], f->def[0]);
                break;
            case TV_PAIR:
                if (sp->type != OPTIM_HP_PAIR)
                    TV_PROBLEM("%s.%s: not a pair spec (type %d)", kn, sp->name, (int)sp->type);
                if (sp->def[0] != f->def[0] || sp->def[1] != f->def[1])
                    TV_PROBLEM("%s.%s: default (%.17g, %.17g), torch (%.17g, %.17g)", kn, sp->name,
                             sp->def[0], sp->def[1], f->def[0], f->def[1]);
                break;
            case TV_BOOL:
                if (sp->type != OPTIM_HP_BOOL)
                    TV_PROBLEM("%s.%s: not a bool spec (type %d)", kn, sp->name, (int)sp->type);
                if (sp->def[0] != 0)
                    TV_PROBLEM("%s.%s: default true, torch false", kn, sp->name);
                break;
            case TV_FORM:
                if (sp->type != OPTIM_HP_ENUM || !sp->choices) {
                    TV_PROBLEM("%s.%s: not an enum spec", kn, sp->name);
                    break;
                }
                assert_string_equal(sp->choices[OPTIM_MOMENTUM_TORCH], "torch");
                assert_string_equal(sp->choices[OPTIM_MOMENTUM_CLASSIC], "classic");
                assert_null(sp->choices[2]);
                assert_true(sp->def[0] == OPTIM_MOMENTUM_TORCH);
                break;
            }
        }
        for (const tv_field *f = tv_kinds[k].fields; f->name; f++) {
            bool found = false;
            for (size_t i = 0; i < info->n_hps; i++)
                found |= strcmp(info->hps[i].name, f->name) == 0;
            if (!found)
                TV_PROBLEM("%s: no spec for torch's %s", kn, f->name);
        }
    }
    if (problems)
        fail_msg("%u spec problems", problems);
}

/* optim_hparams_default fills torch's defaults into the struct. */
static void test_defaults_are_torch(void **state)
{
    (void)state;
    for (size_t k = 0; k < N_KINDS; k++) {
        optim_hparams hp;
        optim_hparams_default(tv_kinds[k].kind, &hp);
        assert_int_equal(hp.kind, tv_kinds[k].kind);
        for (const tv_field *f = tv_kinds[k].fields; f->name; f++) {
            const char *base = (const char *)&hp;
            switch (f->type) {
            case TV_NUM:
                if (!f->required && *(const double *)(base + f->off) != f->def[0])
                    fail_msg("%s.%s = %.17g, torch %.17g", tv_kinds[k].name, f->name,
                             *(const double *)(base + f->off), f->def[0]);
                break;
            case TV_PAIR: {
                const double *p = (const double *)(base + f->off);
                if (p[0] != f->def[0] || p[1] != f->def[1])
                    fail_msg("%s.%s = (%.17g, %.17g)", tv_kinds[k].name, f->name, p[0], p[1]);
                break;
            }
            case TV_BOOL:
                if (*(const bool *)(base + f->off))
                    fail_msg("%s.%s defaults to true", tv_kinds[k].name, f->name);
                break;
            case TV_FORM:
                assert_int_equal(*(const int *)(base + f->off), OPTIM_MOMENTUM_TORCH);
                break;
            }
        }
        optim_error err;
        memset(&err, 0, sizeof err);
        tv_defaults(tv_kinds[k].kind, &hp);
        if (optim_hparams_validate(&hp, &err) != OPTIM_OK)
            fail_msg("%s defaults rejected: %s: %s", tv_kinds[k].name, err.field, err.msg);
    }
}

/* ---------------------------------------------------------- validation */

typedef void (*tv_mutate)(optim_hparams *hp);

static void tv_expect(optim_kind kind, const char *what, const optim_hparams *hp,
                      const char *field)
{
    optim_error err;
    memset(&err, 0, sizeof err);
    int rc = optim_hparams_validate(hp, &err);
    const char *kn = optim_info_of(kind)->name;
    if (!field) {
        if (rc != OPTIM_OK)
            fail_msg("%s %s: rejected (%s: %s), should be accepted", kn, what, err.field, err.msg);
        return;
    }
    if (rc != OPTIM_EINVAL)
        fail_msg("%s %s: returned %d, want OPTIM_EINVAL", kn, what, rc);
    if (strcmp(err.field, field) != 0)
        fail_msg("%s %s: field \"%s\", want \"%s\" (%s)", kn, what, err.field, field, err.msg);
    if (!err.msg[0])
        fail_msg("%s %s: no message", kn, what);
}

/* One number field of kind set to v: rejected naming field, or accepted. */
static void tv_num_case(optim_kind kind, const char *name, int idx, double v, const char *want)
{
    optim_hparams hp;
    tv_defaults(kind, &hp);
    const tv_field *f = NULL;
    for (size_t k = 0; k < N_KINDS; k++)
        if (tv_kinds[k].kind == kind)
            f = tv_field_named(tv_kinds[k].fields, name);
    assert_non_null(f);
    tv_num(&hp, f)[idx] = v;
    char what[96];
    snprintf(what, sizeof what, "%s[%d] = %g", name, idx, v);
    tv_expect(kind, what, &hp, want);
}

static bool tv_has(optim_kind kind, const char *name)
{
    for (size_t k = 0; k < N_KINDS; k++)
        if (tv_kinds[k].kind == kind)
            return tv_field_named(tv_kinds[k].fields, name) != NULL;
    return false;
}

static void test_ranges(void **state)
{
    (void)state;
    for (size_t k = 0; k < N_KINDS; k++) {
        optim_kind kind = tv_kinds[k].kind;
        tv_num_case(kind, "lr", 0, -1e-3, "lr");
        tv_num_case(kind, "lr", 0, 0.0, NULL);
        if (tv_has(kind, "eps")) {
            tv_num_case(kind, "eps", 0, 0.0, "eps");
            tv_num_case(kind, "eps", 0, -1e-8, "eps");
            tv_num_case(kind, "eps", 0, 1e-300, NULL);
        }
        if (tv_has(kind, "weight_decay")) {
            tv_num_case(kind, "weight_decay", 0, -1e-4, "weight_decay");
            tv_num_case(kind, "weight_decay", 0, 0.0, NULL);
        }
        if (tv_has(kind, "momentum")) {
            tv_num_case(kind, "momentum", 0, -0.1, "momentum");
            tv_num_case(kind, "momentum", 0, 0.0, NULL);
            tv_num_case(kind, "momentum", 0, 0.99, NULL);
        }
        if (tv_has(kind, "betas")) {
            for (int i = 0; i < 2; i++) {
                tv_num_case(kind, "betas", i, -1e-9, "betas");
                tv_num_case(kind, "betas", i, 1.0, "betas");
                tv_num_case(kind, "betas", i, 1.5, "betas");
                tv_num_case(kind, "betas", i, 0.0, NULL);
                tv_num_case(kind, "betas", i, 0.999999, NULL);
            }
        }
    }
    tv_num_case(OPTIM_RMSPROP, "alpha", 0, -0.01, "alpha");
    tv_num_case(OPTIM_RMSPROP, "alpha", 0, 0.0, NULL);
    tv_num_case(OPTIM_ADADELTA, "rho", 0, -0.01, "rho");
    tv_num_case(OPTIM_ADADELTA, "rho", 0, 1.01, "rho");
    tv_num_case(OPTIM_ADADELTA, "rho", 0, 0.0, NULL);
    tv_num_case(OPTIM_ADADELTA, "rho", 0, 1.0, NULL);
    tv_num_case(OPTIM_ADAGRAD, "lr_decay", 0, -1e-6, "lr_decay");
    tv_num_case(OPTIM_ADAGRAD, "lr_decay", 0, 0.5, NULL);
    tv_num_case(OPTIM_ADAGRAD, "initial_accumulator_value", 0, -0.1, "initial_accumulator_value");
    tv_num_case(OPTIM_ADAGRAD, "initial_accumulator_value", 0, 0.1, NULL);
    tv_num_case(OPTIM_NADAM, "momentum_decay", 0, -4e-3, "momentum_decay");
    tv_num_case(OPTIM_NADAM, "momentum_decay", 0, 0.0, NULL);
    tv_num_case(OPTIM_ASGD, "lambd", 0, -1e-4, "lambd");
    tv_num_case(OPTIM_ASGD, "lambd", 0, 0.0, NULL);
    tv_num_case(OPTIM_ASGD, "alpha", 0, -0.75, "alpha");
    tv_num_case(OPTIM_ASGD, "alpha", 0, 0.0, NULL);
    tv_num_case(OPTIM_ASGD, "t0", 0, 0.0, NULL);
    /* rprop: 0 < etaminus < 1 < etaplus; 0 <= min <= max. */
    tv_num_case(OPTIM_RPROP, "etas", 0, 0.0, "etas");
    tv_num_case(OPTIM_RPROP, "etas", 0, -0.5, "etas");
    tv_num_case(OPTIM_RPROP, "etas", 0, 1.0, "etas");
    tv_num_case(OPTIM_RPROP, "etas", 0, 1.1, "etas");
    tv_num_case(OPTIM_RPROP, "etas", 1, 1.0, "etas");
    tv_num_case(OPTIM_RPROP, "etas", 1, 0.9, "etas");
    tv_num_case(OPTIM_RPROP, "etas", 0, 0.999, NULL);
    tv_num_case(OPTIM_RPROP, "etas", 1, 1.001, NULL);
    tv_num_case(OPTIM_RPROP, "step_sizes", 0, -1e-6, "step_sizes");
    tv_num_case(OPTIM_RPROP, "step_sizes", 0, 51.0, "step_sizes");
    tv_num_case(OPTIM_RPROP, "step_sizes", 1, -1.0, "step_sizes");
    tv_num_case(OPTIM_RPROP, "step_sizes", 0, 0.0, NULL);
    tv_num_case(OPTIM_RPROP, "step_sizes", 0, 50.0, NULL);
}

static void test_sgd_combinations(void **state)
{
    (void)state;
    optim_hparams hp;
    tv_defaults(OPTIM_SGD, &hp);
    hp.nesterov = true;
    tv_expect(OPTIM_SGD, "nesterov without momentum", &hp, "nesterov");
    hp.momentum = 0.9;
    tv_expect(OPTIM_SGD, "nesterov with momentum", &hp, NULL);
    hp.dampening = 0.1;
    tv_expect(OPTIM_SGD, "nesterov with dampening", &hp, "nesterov");
    hp.dampening = 0;
    hp.bias_correction = true;
    tv_expect(OPTIM_SGD, "nesterov with bias_correction", &hp, "bias_correction");
    hp.momentum_form = OPTIM_MOMENTUM_CLASSIC;
    tv_expect(OPTIM_SGD, "classic nesterov with bias_correction", &hp, "bias_correction");
    hp.nesterov = false;
    tv_expect(OPTIM_SGD, "classic bias_correction", &hp, NULL);
    hp.dampening = 0.5;
    tv_expect(OPTIM_SGD, "classic bias_correction with dampening", &hp, NULL);
    hp.momentum = 0;
    tv_expect(OPTIM_SGD, "bias_correction without momentum (ignored)", &hp, NULL);
    hp.nesterov = true;
    hp.dampening = 0;
    hp.bias_correction = false;
    hp.momentum_form = OPTIM_MOMENTUM_TORCH;
    tv_expect(OPTIM_SGD, "nesterov, momentum 0", &hp, "nesterov");
}

/* Non-finite values are rejected in every number a kind reads, naming it. */
static void test_non_finite(void **state)
{
    (void)state;
    const double bad[] = {NAN, INFINITY, -INFINITY};
    for (size_t k = 0; k < N_KINDS; k++) {
        const optim_info *info = optim_info_of(tv_kinds[k].kind);
        for (const tv_field *f = tv_kinds[k].fields; f->name; f++) {
            if (f->type != TV_NUM && f->type != TV_PAIR)
                continue;
            bool inf_ok = false; /* a spec that accepts "inf" */
            for (size_t i = 0; i < info->n_hps; i++)
                if (strcmp(info->hps[i].name, f->name) == 0)
                    inf_ok = info->hps[i].type == OPTIM_HP_NUM_INF;
            for (int idx = 0; idx < (f->type == TV_PAIR ? 2 : 1); idx++)
                for (size_t b = 0; b < 3; b++) {
                    if (inf_ok && b == 1)
                        continue;
                    tv_num_case(tv_kinds[k].kind, f->name, idx, bad[b], f->name);
                }
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_and_kinds),
        cmocka_unit_test(test_unknown_names),
        cmocka_unit_test(test_specs_match_torch),
        cmocka_unit_test(test_defaults_are_torch),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_sgd_combinations),
        cmocka_unit_test(test_non_finite),
    };
    return cmocka_run_group_tests_name("optim_validate", tests, NULL, NULL);
}
