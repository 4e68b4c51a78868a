/*
 * test_optim_kernels_smoke.c -- structural checks of the optimizer kernels:
 * a step split into ranges equals one run bit for bit, validation names the
 * offending field, buffers and scalars start where torch starts them, and
 * the spec tables are complete.  (The reference vectors are checked by
 * test_optim_kernels.c.)
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "optim/optim.h"

/* A deterministic input in [-1, 1), zero one time in eight, with a spread
 * of magnitudes. */
static double input(uint64_t seed, uint64_t i)
{
    uint64_t z = (seed * 0x9E3779B97F4A7C15u) ^ (i + 0x632BE59BD9B4E019u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    z ^= z >> 31;
    if ((z & 7) == 0)
        return 0.0;
    double u = (double)(z >> 11) * 0x1p-53 * 2.0 - 1.0;
    return u / (double)(1u << ((z >> 3) & 7));
}

static void fill(optim_dtype dt, void *v, size_t n, uint64_t seed, double scale)
{
    for (size_t i = 0; i < n; i++) {
        double x = scale * input(seed, i);
        if (dt == OPTIM_F32)
            ((float *)v)[i] = (float)x;
        else
            ((double *)v)[i] = x;
    }
}

/* One session: params, grad and the buffers the hyperparameters need. */
typedef struct {
    optim_dtype dt;
    size_t n;
    void *params;
    void *grad;
    optim_state st;
} session;

static void session_open(session *s, const optim_hparams *hp, optim_dtype dt, size_t n)
{
    size_t es = optim_dtype_size(dt);
    memset(s, 0, sizeof *s);
    s->dt = dt;
    s->n = n;
    s->params = malloc(n * es);
    s->grad = malloc(n * es);
    assert_non_null(s->params);
    assert_non_null(s->grad);
    fill(dt, s->params, n, 1, 1.0);
    optim_state_init(hp, &s->st);
    unsigned need = optim_buffers_needed(hp);
    for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++) {
        if (need & (1u << b)) {
            s->st.buf[b] = malloc(n * es);
            assert_non_null(s->st.buf[b]);
            optim_buffer_init(hp, b, dt, s->st.buf[b], n);
        }
    }
}

static void session_close(session *s)
{
    free(s->params);
    free(s->grad);
    for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++)
        free(s->st.buf[b]);
}

static void assert_same_session(const session *a, const session *b)
{
    size_t bytes = a->n * optim_dtype_size(a->dt);
    assert_int_equal(a->st.step, b->st.step);
    assert_memory_equal(a->st.scalars, b->st.scalars, sizeof a->st.scalars);
    assert_memory_equal(a->params, b->params, bytes);
    for (unsigned k = 0; k < OPTIM_MAX_BUFFERS; k++) {
        assert_true((a->st.buf[k] == NULL) == (b->st.buf[k] == NULL));
        if (a->st.buf[k] != NULL)
            assert_memory_equal(a->st.buf[k], b->st.buf[k], bytes);
    }
}

/* Flag combinations worth running per kind (after the defaults). */
static void configure(optim_hparams *hp, int variant)
{
    switch (hp->kind) {
    case OPTIM_SGD:
        hp->momentum = 0.9;
        hp->weight_decay = variant & 1 ? 1e-2 : 0;
        hp->maximize = variant & 2;
        hp->momentum_form = variant & 4 ? OPTIM_MOMENTUM_CLASSIC : OPTIM_MOMENTUM_TORCH;
        hp->bias_correction = variant & 8;
        hp->nesterov = !hp->bias_correction && (variant & 16);
        break;
    case OPTIM_RMSPROP:
        hp->centered = variant & 1;
        hp->momentum = variant & 2 ? 0.8 : 0;
        hp->weight_decay = variant & 4 ? 1e-2 : 0;
        break;
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
        hp->amsgrad = variant & 1;
        hp->maximize = variant & 2;
        hp->weight_decay = variant & 4 ? 1e-2 : 0;
        break;
    case OPTIM_ASGD:
        hp->t0 = 3;
        hp->weight_decay = variant & 1 ? 1e-2 : 0;
        break;
    case OPTIM_RADAM:
        /* rho_inf = 19: the first steps unrectified, then rectified. */
        hp->betas[1] = 0.9;
        hp->weight_decay = variant & 1 ? 1e-2 : 0;
        break;
    case OPTIM_LION:
    default:
        hp->weight_decay = variant & 1 ? 1e-2 : 0;
        if (hp->kind != OPTIM_NADAM && hp->kind != OPTIM_LION)
            hp->maximize = variant & 2;
        break;
    }
}

/* Several steps applied whole and applied as ranges of awkward lengths,
 * each range in its own optim_plan_run call: the results must be equal bit
 * for bit (every rule is elementwise and rounds the same in the SIMD body
 * and the scalar tail). */
static void test_split_equals_whole(void **unused)
{
    (void)unused;
    const size_t n = 1037;
    const size_t cuts[] = { 0, 1, 3, 18, 19, 64, 65, 500, 511, 1000, 1036, 1037 };
    for (int kind = 0; kind < OPTIM_KIND_COUNT; kind++) {
        for (int variant = 0; variant < 32; variant++) {
            for (int d = 0; d < 2; d++) {
                optim_dtype dt = d ? OPTIM_F64 : OPTIM_F32;
                optim_hparams hp;
                optim_hparams_default((optim_kind)kind, &hp);
                configure(&hp, variant);
                assert_int_equal(optim_hparams_validate(&hp, NULL), OPTIM_OK);
                session whole, split;
                session_open(&whole, &hp, dt, n);
                session_open(&split, &hp, dt, n);
                for (uint64_t t = 1; t <= 8; t++) {
                    fill(dt, whole.grad, n, 100 + t, 0.5);
                    fill(dt, split.grad, n, 100 + t, 0.5);
                    optim_step(&hp, &whole.st, dt, whole.params, whole.grad, n);
                    optim_plan plan;
                    optim_plan_make(&hp, &split.st, &plan);
                    assert_int_equal(plan.t, t);
                    for (size_t c = 0; c + 1 < sizeof cuts / sizeof cuts[0]; c++)
                        optim_plan_run(&plan, &split.st, dt, split.params, split.grad,
                                       cuts[c], cuts[c + 1]);
                    optim_plan_commit(&plan, &split.st);
                }
                assert_int_equal(whole.st.step, 8);
                assert_same_session(&whole, &split);
                session_close(&whole);
                session_close(&split);
            }
        }
    }
}

/* One update checked by hand with exactly representable numbers. */
static void test_sgd_by_hand(void **unused)
{
    (void)unused;
    optim_hparams hp;
    optim_hparams_default(OPTIM_SGD, &hp);
    hp.lr = 0.5;
    hp.momentum = 0.5;
    optim_state st;
    memset(&st, 0, sizeof st);
    optim_state_init(&hp, &st);
    float buf[2];
    optim_buffer_init(&hp, 0, OPTIM_F32, buf, 2);
    st.buf[0] = buf;
    float p[2] = { 1.0f, -2.0f };
    const float g[2] = { 2.0f, 0.5f };
    /* First update: buf = g, p -= lr * buf. */
    optim_step(&hp, &st, OPTIM_F32, p, g, 2);
    assert_true(p[0] == 0.0f && p[1] == -2.25f);
    assert_true(buf[0] == 2.0f && buf[1] == 0.5f);
    assert_true(st.scalars[0] == 1.0);
    /* Second: buf = 0.5 * buf + g. */
    optim_step(&hp, &st, OPTIM_F32, p, g, 2);
    assert_true(buf[0] == 3.0f && buf[1] == 0.75f);
    assert_true(p[0] == -1.5f && p[1] == -2.625f);
    assert_int_equal(st.step, 2);
}

typedef struct {
    optim_kind kind;
    void (*mutate)(optim_hparams *);
    const char *field;
} bad_case;

static void lr_neg(optim_hparams *h) { h->lr = -1e-3; }
static void lr_nan(optim_hparams *h) { h->lr = NAN; }
static void eps_zero(optim_hparams *h) { h->eps = 0; }
static void beta1_one(optim_hparams *h) { h->betas[0] = 1.0; }
static void beta2_neg(optim_hparams *h) { h->betas[1] = -0.1; }
static void beta_inf(optim_hparams *h) { h->betas[1] = INFINITY; }
static void wd_neg(optim_hparams *h) { h->weight_decay = -1; }
static void momentum_neg(optim_hparams *h) { h->momentum = -0.5; }
static void nesterov_no_momentum(optim_hparams *h) { h->nesterov = true; }
static void nesterov_dampening(optim_hparams *h)
{
    h->nesterov = true;
    h->momentum = 0.9;
    h->dampening = 0.1;
}
static void nesterov_bias(optim_hparams *h)
{
    h->nesterov = true;
    h->momentum = 0.9;
    h->bias_correction = true;
}
static void form_bad(optim_hparams *h) { h->momentum_form = 7; }
static void dampening_inf(optim_hparams *h) { h->dampening = -INFINITY; }
static void alpha_neg(optim_hparams *h) { h->alpha = -0.1; }
static void rho_big(optim_hparams *h) { h->rho = 1.5; }
static void lr_decay_neg(optim_hparams *h) { h->lr_decay = -1; }
static void init_acc_neg(optim_hparams *h) { h->initial_accumulator_value = -1; }
static void etas_swapped(optim_hparams *h)
{
    h->etas[0] = 1.2;
    h->etas[1] = 0.5;
}
static void etaminus_zero(optim_hparams *h) { h->etas[0] = 0; }
static void step_sizes_swapped(optim_hparams *h)
{
    h->step_sizes[0] = 1;
    h->step_sizes[1] = 0.5;
}
static void momentum_decay_neg(optim_hparams *h) { h->momentum_decay = -1; }
static void lambd_neg(optim_hparams *h) { h->lambd = -1; }
static void t0_nan(optim_hparams *h) { h->t0 = NAN; }

static void test_validation_names_field(void **unused)
{
    (void)unused;
    static const bad_case cases[] = {
        { OPTIM_SGD, lr_neg, "lr" },
        { OPTIM_ADAM, lr_nan, "lr" },
        { OPTIM_ADAM, eps_zero, "eps" },
        { OPTIM_ADAGRAD, eps_zero, "eps" },
        { OPTIM_ADAM, beta1_one, "betas" },
        { OPTIM_RADAM, beta2_neg, "betas" },
        { OPTIM_NADAM, beta_inf, "betas" },
        { OPTIM_LION, beta1_one, "betas" },
        { OPTIM_ADAMW, wd_neg, "weight_decay" },
        { OPTIM_SGD, momentum_neg, "momentum" },
        { OPTIM_RMSPROP, momentum_neg, "momentum" },
        { OPTIM_SGD, nesterov_no_momentum, "nesterov" },
        { OPTIM_SGD, nesterov_dampening, "nesterov" },
        { OPTIM_SGD, nesterov_bias, "bias_correction" },
        { OPTIM_SGD, form_bad, "momentum_form" },
        { OPTIM_SGD, dampening_inf, "dampening" },
        { OPTIM_RMSPROP, alpha_neg, "alpha" },
        { OPTIM_ASGD, alpha_neg, "alpha" },
        { OPTIM_ADADELTA, rho_big, "rho" },
        { OPTIM_ADAGRAD, lr_decay_neg, "lr_decay" },
        { OPTIM_ADAGRAD, init_acc_neg, "initial_accumulator_value" },
        { OPTIM_RPROP, etas_swapped, "etas" },
        { OPTIM_RPROP, etaminus_zero, "etas" },
        { OPTIM_RPROP, step_sizes_swapped, "step_sizes" },
        { OPTIM_NADAM, momentum_decay_neg, "momentum_decay" },
        { OPTIM_ASGD, lambd_neg, "lambd" },
        { OPTIM_ASGD, t0_nan, "t0" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        optim_hparams hp;
        optim_hparams_default(cases[i].kind, &hp);
        optim_error err;
        memset(&err, 0, sizeof err);
        assert_int_equal(optim_hparams_validate(&hp, &err), OPTIM_OK);
        cases[i].mutate(&hp);
        assert_int_equal(optim_hparams_validate(&hp, &err), OPTIM_EINVAL);
        assert_string_equal(err.field, cases[i].field);
        assert_true(err.msg[0] != '\0');
        /* err is optional. */
        assert_int_equal(optim_hparams_validate(&hp, NULL), OPTIM_EINVAL);
    }
    /* A field the kind does not have is not looked at. */
    optim_hparams hp;
    optim_hparams_default(OPTIM_RPROP, &hp);
    hp.eps = NAN;
    hp.weight_decay = -1;
    assert_int_equal(optim_hparams_validate(&hp, NULL), OPTIM_OK);
}

static void test_tables(void **unused)
{
    (void)unused;
    for (int k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *info = optim_info_of((optim_kind)k);
        assert_non_null(info);
        assert_int_equal(info->kind, k);
        assert_ptr_equal(optim_find(info->name), info);
        assert_non_null(info->doc);
        assert_true(info->n_hps > 0);
        assert_string_equal(info->hps[0].name, "lr");
        for (size_t i = 0; i < info->n_hps; i++) {
            assert_non_null(info->hps[i].doc);
            /* Only sgd's lr has no default in torch. */
            assert_int_equal(info->hps[i].required, k == OPTIM_SGD && i == 0);
            for (size_t j = 0; j < i; j++)
                assert_string_not_equal(info->hps[i].name, info->hps[j].name);
        }
        optim_hparams hp;
        optim_hparams_default((optim_kind)k, &hp);
        assert_int_equal(optim_hparams_validate(&hp, NULL), OPTIM_OK);
        assert_null(optim_buffer_name((optim_kind)k, OPTIM_MAX_BUFFERS));
    }
    assert_null(optim_find("adamx"));
    assert_null(optim_find(NULL));
    assert_null(optim_info_of(OPTIM_KIND_COUNT));

    optim_hparams hp;
    optim_hparams_default(OPTIM_SGD, &hp);
    assert_true(hp.lr == 0.01 && hp.momentum == 0 && !hp.nesterov);
    assert_int_equal(hp.momentum_form, OPTIM_MOMENTUM_TORCH);
    optim_hparams_default(OPTIM_ADAMW, &hp);
    assert_true(hp.weight_decay == 1e-2 && hp.betas[0] == 0.9 && hp.betas[1] == 0.999);
    optim_hparams_default(OPTIM_ADAM, &hp);
    assert_true(hp.weight_decay == 0 && hp.eps == 1e-8 && hp.lr == 1e-3);
    optim_hparams_default(OPTIM_LION, &hp);
    assert_true(hp.lr == 1e-4 && hp.betas[1] == 0.99);
    optim_hparams_default(OPTIM_RPROP, &hp);
    assert_true(hp.etas[0] == 0.5 && hp.etas[1] == 1.2 && hp.step_sizes[1] == 50);
    optim_hparams_default(OPTIM_ASGD, &hp);
    assert_true(hp.t0 == 1e6 && hp.lambd == 1e-4 && hp.alpha == 0.75);
    optim_hparams_default(OPTIM_ADAGRAD, &hp);
    assert_true(hp.eps == 1e-10);

    optim_dtype dt;
    assert_int_equal(optim_dtype_parse("float64", &dt), OPTIM_OK);
    assert_int_equal(dt, OPTIM_F64);
    assert_string_equal(optim_dtype_name(dt), "float64");
    assert_int_equal(optim_dtype_parse("float32", &dt), OPTIM_OK);
    assert_int_equal(optim_dtype_size(dt), 4);
    assert_int_equal(optim_dtype_parse("float16", &dt), OPTIM_EINVAL);
}

static void test_state_start(void **unused)
{
    (void)unused;
    optim_hparams hp;
    optim_state st;

    optim_hparams_default(OPTIM_ADAGRAD, &hp);
    hp.initial_accumulator_value = 0.1;
    float f[5];
    optim_buffer_init(&hp, 0, OPTIM_F32, f, 5);
    for (int i = 0; i < 5; i++)
        assert_true(f[i] == 0.1f);

    optim_hparams_default(OPTIM_RPROP, &hp);
    hp.lr = 0.3;
    double d[5];
    optim_buffer_init(&hp, 1, OPTIM_F64, d, 5);
    for (int i = 0; i < 5; i++)
        assert_true(d[i] == 0.3);
    optim_buffer_init(&hp, 0, OPTIM_F64, d, 5);
    for (int i = 0; i < 5; i++)
        assert_true(d[i] == 0);
    assert_string_equal(optim_buffer_name(OPTIM_RPROP, 1), "step_size");

    optim_hparams_default(OPTIM_ASGD, &hp);
    hp.lr = 0.1;
    optim_state_init(&hp, &st);
    assert_string_equal(optim_scalar_name(OPTIM_ASGD, 0), "eta");
    assert_string_equal(optim_scalar_name(OPTIM_ASGD, 1), "mu");
    assert_null(optim_scalar_name(OPTIM_ASGD, 2));
    assert_true(st.scalars[0] == (double)0.1f && st.scalars[1] == 1.0 && st.step == 0);

    optim_hparams_default(OPTIM_NADAM, &hp);
    optim_state_init(&hp, &st);
    assert_string_equal(optim_scalar_name(OPTIM_NADAM, 0), "mu_product");
    assert_true(st.scalars[0] == 1.0);

    optim_hparams_default(OPTIM_SGD, &hp);
    assert_int_equal(optim_buffers_needed(&hp), 0);
    hp.momentum = 0.9;
    assert_int_equal(optim_buffers_needed(&hp), 1);
    assert_string_equal(optim_scalar_name(OPTIM_SGD, 0), "momentum_buffer_initialized");

    optim_hparams_default(OPTIM_RMSPROP, &hp);
    assert_int_equal(optim_buffers_needed(&hp), 1);
    hp.centered = true;
    assert_int_equal(optim_buffers_needed(&hp), 5);
    hp.momentum = 0.5;
    assert_int_equal(optim_buffers_needed(&hp), 7);
    assert_string_equal(optim_buffer_name(OPTIM_RMSPROP, 2), "grad_avg");

    optim_hparams_default(OPTIM_ADAM, &hp);
    assert_int_equal(optim_buffers_needed(&hp), 3);
    assert_int_equal(optim_bytes_per_param(&hp, OPTIM_F32), 28);
    hp.amsgrad = true;
    assert_int_equal(optim_buffers_needed(&hp), 7);
    assert_string_equal(optim_buffer_name(OPTIM_ADAM, 2), "max_exp_avg_sq");
    assert_int_equal(optim_bytes_per_param(&hp, OPTIM_F64), 72);
}

/* Momentum switched on mid-run starts with torch's first-update rule
 * (buf = g) on the freshly allocated buffer. */
static void test_momentum_switched_on(void **unused)
{
    (void)unused;
    optim_hparams hp;
    optim_hparams_default(OPTIM_SGD, &hp);
    hp.lr = 0.25;
    optim_state st;
    memset(&st, 0, sizeof st);
    optim_state_init(&hp, &st);
    double p[1] = { 1.0 }, g[1] = { 1.0 };
    optim_step(&hp, &st, OPTIM_F64, p, g, 1);
    assert_true(p[0] == 0.75 && st.scalars[0] == 0);
    hp.momentum = 0.5;
    double buf[1] = { 123.0 }; /* whatever the slot held: overwritten */
    st.buf[0] = buf;
    optim_step(&hp, &st, OPTIM_F64, p, g, 1);
    assert_true(buf[0] == 1.0 && p[0] == 0.5 && st.scalars[0] == 1.0);
    optim_step(&hp, &st, OPTIM_F64, p, g, 1);
    assert_true(buf[0] == 1.5 && p[0] == 0.125);
    assert_int_equal(st.step, 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_equals_whole),
        cmocka_unit_test(test_sgd_by_hand),
        cmocka_unit_test(test_validation_names_field),
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_state_start),
        cmocka_unit_test(test_momentum_switched_on),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
