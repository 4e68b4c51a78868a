/*
 * test_optim_clip.c -- gradient norms and clipping against a plain
 * double-precision reference loop written here, in both dtypes and at sizes
 * that exercise the vector body, the tail and both together.
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

#define NORM_TOL 1e-12

static const size_t sizes[] = {1, 7, 37, 1000003};
#define N_SIZES (sizeof sizes / sizeof sizes[0])
static const double norm_types[] = {1.0, 2.0, INFINITY};

/* xorshift64*: reproducible values spread over several binades. */
static uint64_t rng_state;

static double next_value(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1DULL;
    double u = (double)(r >> 11) * 0x1p-53 * 2 - 1;  /* [-1, 1) */
    return ldexp(u, (int)((r >> 3) & 7) - 4);        /* times 2^-4 .. 2^3 */
}

static size_t width(optim_dtype dt)
{
    return dt == OPTIM_F32 ? sizeof(float) : sizeof(double);
}

/* Returns a new vector of n elements of dt; caller frees. */
static void *random_vec(optim_dtype dt, size_t n, uint64_t seed)
{
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;
    void *v = malloc(n * width(dt));
    assert_non_null(v);
    for (size_t i = 0; i < n; i++) {
        if (dt == OPTIM_F32)
            ((float *)v)[i] = (float)next_value();
        else
            ((double *)v)[i] = next_value();
    }
    return v;
}

static double elem(optim_dtype dt, const void *v, size_t i)
{
    return dt == OPTIM_F32 ? (double)((const float *)v)[i] : ((const double *)v)[i];
}

static void set_elem(optim_dtype dt, void *v, size_t i, double x)
{
    if (dt == OPTIM_F32)
        ((float *)v)[i] = (float)x;
    else
        ((double *)v)[i] = x;
}

/* The reference: one accumulator, element after element. */
static double ref_norm(optim_dtype dt, const void *v, size_t n, double p)
{
    double acc = 0;
    for (size_t i = 0; i < n; i++) {
        double a = fabs(elem(dt, v, i));
        if (p == 1.0)
            acc += a;
        else if (p == 2.0)
            acc += a * a;
        else if (a > acc)
            acc = a;
    }
    return p == 2.0 ? sqrt(acc) : acc;
}

static void check_close(double got, double want, const char *what)
{
    if (!(fabs(got - want) <= NORM_TOL * fabs(want)))
        fail_msg("%s: %.17g, reference %.17g (rel %.3g)", what, got, want,
                 fabs(got - want) / fabs(want));
}

/* ---------------------------------------------------------------- norms */

static void test_norms_match_reference(void **state)
{
    (void)state;
    for (int d = 0; d < 2; d++) {
        optim_dtype dt = (optim_dtype)d;
        for (size_t s = 0; s < N_SIZES; s++) {
            void *g = random_vec(dt, sizes[s], 11 + s);
            for (int k = 0; k < 3; k++) {
                char what[96];
                snprintf(what, sizeof what, "%s n=%zu p=%g", d ? "f64" : "f32", sizes[s],
                         norm_types[k]);
                double got = optim_grad_norm(dt, g, sizes[s], norm_types[k]);
                check_close(got, ref_norm(dt, g, sizes[s], norm_types[k]), what);
            }
            free(g);
        }
    }
}

/* Small cases whose norms are exact. */
static void test_norms_exact(void **state)
{
    (void)state;
    const float f[] = {3, -4};
    const double d[] = {-1, 2, -2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4};
    assert_true(optim_grad_norm(OPTIM_F32, f, 2, 2.0) == 5.0);
    assert_true(optim_grad_norm(OPTIM_F32, f, 2, 1.0) == 7.0);
    assert_true(optim_grad_norm(OPTIM_F32, f, 2, INFINITY) == 4.0);
    assert_true(optim_grad_norm(OPTIM_F64, d, 20, 2.0) == 5.0);
    assert_true(optim_grad_norm(OPTIM_F64, d, 20, 1.0) == 9.0);
    assert_true(optim_grad_norm(OPTIM_F64, d, 20, INFINITY) == 4.0);
    assert_true(optim_grad_norm(OPTIM_F64, d, 0, 2.0) == 0.0);
    assert_true(optim_grad_norm(OPTIM_F32, f, 0, INFINITY) == 0.0);
    /* Accumulated in double: float32 elements whose squares overflow
     * float still have a finite norm. */
    const float big[] = {1e20f, -1e20f};
    double want = sqrt(2.0 * (double)1e20f * (double)1e20f);
    assert_true(fabs(optim_grad_norm(OPTIM_F32, big, 2, 2.0) - want) <= 1e-15 * want);
    /* Anything but 1, 2, inf is refused by validation and reads as NaN. */
    assert_true(isnan(optim_grad_norm(OPTIM_F64, d, 20, 3.0)));
}

/* NaN anywhere (a full block or the tail) gives NaN; Inf gives Inf unless
 * there is also a NaN. */
static void test_nonfinite_norms(void **state)
{
    (void)state;
    const size_t n = 37;
    const size_t where[] = {0, 5, 15, 16, 31, 32, 36};
    for (int d = 0; d < 2; d++) {
        optim_dtype dt = (optim_dtype)d;
        for (size_t w = 0; w < sizeof where / sizeof where[0]; w++) {
            for (int k = 0; k < 3; k++) {
                double p = norm_types[k];
                void *g = random_vec(dt, n, 3);
                set_elem(dt, g, where[w], NAN);
                assert_true(isnan(optim_grad_norm(dt, g, n, p)));
                set_elem(dt, g, where[w], -INFINITY);
                double r = optim_grad_norm(dt, g, n, p);
                assert_true(isinf(r) && r > 0);
                set_elem(dt, g, (where[w] + 1) % n, NAN);
                assert_true(isnan(optim_grad_norm(dt, g, n, p)));
                free(g);
            }
        }
    }
}

/* ------------------------------------------------------------- clipping */

static void test_norm_clip(void **state)
{
    (void)state;
    for (int d = 0; d < 2; d++) {
        optim_dtype dt = (optim_dtype)d;
        for (size_t s = 0; s < N_SIZES; s++) {
            size_t n = sizes[s];
            for (int k = 0; k < 3; k++) {
                void *orig = random_vec(dt, n, 101 + s);
                void *g = malloc(n * width(dt));
                assert_non_null(g);
                memcpy(g, orig, n * width(dt));
                double norm = ref_norm(dt, orig, n, norm_types[k]);

                optim_clip c;
                optim_clip_default(OPTIM_CLIP_NORM, &c);
                c.norm_type = norm_types[k];
                c.max_norm = norm / 3;
                double before = optim_clip_apply(&c, dt, g, n);
                check_close(before, norm, "clip_apply's norm");
                assert_true(before == optim_grad_norm(dt, orig, n, norm_types[k]));

                double coef = c.max_norm / (before + 1e-6);
                assert_true(coef < 1);
                for (size_t i = 0; i < n; i++) {
                    bool same = dt == OPTIM_F32
                                    ? ((float *)g)[i] == ((float *)orig)[i] * (float)coef
                                    : ((double *)g)[i] == ((double *)orig)[i] * coef;
                    if (!same)
                        fail_msg("%s n=%zu p=%g: element %zu is %.17g, want g*coef",
                                 d ? "f64" : "f32", n, norm_types[k], i, elem(dt, g, i));
                }
                /* ... so that the clipped gradient is at max_norm. */
                double after = ref_norm(dt, g, n, norm_types[k]);
                assert_true(fabs(after - c.max_norm) <= 1e-5 * c.max_norm);

                /* Under the limit: untouched, bit for bit. */
                memcpy(g, orig, n * width(dt));
                c.max_norm = norm * 1.001 + 1e-5;
                before = optim_clip_apply(&c, dt, g, n);
                check_close(before, norm, "clip_apply's norm");
                assert_memory_equal(g, orig, n * width(dt));
                free(g);
                free(orig);
            }
        }
    }
}

static void test_norm_clip_nonfinite(void **state)
{
    (void)state;
    for (int d = 0; d < 2; d++) {
        optim_dtype dt = (optim_dtype)d;
        const size_t n = 37;
        void *orig = random_vec(dt, n, 7);
        void *g = malloc(n * width(dt));
        assert_non_null(g);
        optim_clip c;
        optim_clip_default(OPTIM_CLIP_NORM, &c);
        c.max_norm = 1e-3;
        /* NaN: reported, and the gradient is left as it is. */
        set_elem(dt, orig, 20, NAN);
        memcpy(g, orig, n * width(dt));
        assert_true(isnan(optim_clip_apply(&c, dt, g, n)));
        assert_memory_equal(g, orig, n * width(dt));
        /* Inf: reported; the coefficient is 0, as in torch. */
        set_elem(dt, orig, 20, INFINITY);
        memcpy(g, orig, n * width(dt));
        double r = optim_clip_apply(&c, dt, g, n);
        assert_true(isinf(r) && r > 0);
        for (size_t i = 0; i < n; i++)
            if (i != 20)
                assert_true(elem(dt, g, i) == 0);
        free(g);
        free(orig);
    }
}

static void test_value_clip(void **state)
{
    (void)state;
    for (int d = 0; d < 2; d++) {
        optim_dtype dt = (optim_dtype)d;
        for (size_t s = 0; s < N_SIZES; s++) {
            size_t n = sizes[s];
            void *orig = random_vec(dt, n, 202 + s);
            if (n > 3) {
                set_elem(dt, orig, 1, NAN);
                set_elem(dt, orig, 2, INFINITY);
                set_elem(dt, orig, 3, -INFINITY);
            }
            void *g = malloc(n * width(dt));
            assert_non_null(g);
            memcpy(g, orig, n * width(dt));
            optim_clip c;
            optim_clip_default(OPTIM_CLIP_VALUE, &c);
            c.max_value = 0.3;
            double r = optim_clip_apply(&c, dt, g, n);
            /* The 2-norm before clipping. */
            if (n > 3)
                assert_true(isnan(r));
            else
                check_close(r, ref_norm(dt, orig, n, 2.0), "value clip's norm");
            double hi = dt == OPTIM_F32 ? (double)(float)0.3 : 0.3;
            for (size_t i = 0; i < n; i++) {
                double o = elem(dt, orig, i), x = elem(dt, g, i);
                if (isnan(o))
                    assert_true(isnan(x));
                else if (o > hi)
                    assert_true(x == hi);
                else if (o < -hi)
                    assert_true(x == -hi);
                else
                    assert_true(x == o);
            }
            free(g);
            free(orig);
        }
    }
}

static void test_no_clip(void **state)
{
    (void)state;
    for (int d = 0; d < 2; d++) {
        optim_dtype dt = (optim_dtype)d;
        void *orig = random_vec(dt, 37, 9);
        void *g = malloc(37 * width(dt));
        assert_non_null(g);
        memcpy(g, orig, 37 * width(dt));
        optim_clip c;
        optim_clip_default(OPTIM_CLIP_NONE, &c);
        assert_int_equal(optim_clip_validate(&c, NULL), OPTIM_OK);
        check_close(optim_clip_apply(&c, dt, g, 37), ref_norm(dt, orig, 37, 2.0), "none");
        assert_memory_equal(g, orig, 37 * width(dt));
        free(g);
        free(orig);
    }
}

/* ------------------------------------------------- tables and validation */

static void test_tables(void **state)
{
    (void)state;
    const optim_clip_info *nrm = optim_clip_find("norm");
    const optim_clip_info *val = optim_clip_find("value");
    assert_non_null(nrm);
    assert_non_null(val);
    assert_null(optim_clip_find("none"));
    assert_null(optim_clip_find("grad_norm"));
    assert_null(optim_clip_find(NULL));
    assert_int_equal(nrm->kind, OPTIM_CLIP_NORM);
    assert_int_equal(val->kind, OPTIM_CLIP_VALUE);
    assert_ptr_equal(optim_clip_info_of(OPTIM_CLIP_NORM), nrm);
    assert_ptr_equal(optim_clip_info_of(OPTIM_CLIP_VALUE), val);
    assert_null(optim_clip_info_of(OPTIM_CLIP_NONE));
    const optim_clip_info *infos[] = {nrm, val};
    for (int i = 0; i < 2; i++) {
        assert_true(infos[i]->doc && strlen(infos[i]->doc) > 10);
        for (size_t j = 0; j < infos[i]->n_hps; j++) {
            const optim_hp_spec *s = &infos[i]->hps[j];
            assert_true(s->doc && strlen(s->doc) > 5);
            assert_true(s->offset + sizeof(double) <= sizeof(optim_clip));
        }
    }
    assert_int_equal(nrm->n_hps, 2);
    assert_string_equal(nrm->hps[0].name, "max_norm");
    assert_true(nrm->hps[0].required);
    assert_int_equal(nrm->hps[0].offset, offsetof(optim_clip, max_norm));
    assert_string_equal(nrm->hps[1].name, "norm_type");
    assert_int_equal(nrm->hps[1].type, OPTIM_HP_NUM_INF);
    assert_false(nrm->hps[1].required);
    assert_true(nrm->hps[1].def[0] == 2.0);
    assert_int_equal(val->n_hps, 1);
    assert_string_equal(val->hps[0].name, "max_value");
    assert_true(val->hps[0].required);

    optim_clip c;
    optim_clip_default(OPTIM_CLIP_NORM, &c);
    assert_int_equal(c.kind, OPTIM_CLIP_NORM);
    assert_true(c.norm_type == 2.0 && c.max_norm == 0);
}

static void test_validation(void **state)
{
    (void)state;
    static const struct {
        optim_clip_kind kind;
        double max_norm, norm_type, max_value;
        const char *field; /* NULL: valid */
    } cases[] = {
        {OPTIM_CLIP_NORM, 1.0, 2.0, 0, NULL},
        {OPTIM_CLIP_NORM, 1e-3, 1.0, 0, NULL},
        {OPTIM_CLIP_NORM, 5.0, INFINITY, 0, NULL},
        {OPTIM_CLIP_NORM, 0, 2.0, 0, "max_norm"}, /* absent */
        {OPTIM_CLIP_NORM, -1, 2.0, 0, "max_norm"},
        {OPTIM_CLIP_NORM, NAN, 2.0, 0, "max_norm"},
        {OPTIM_CLIP_NORM, INFINITY, 2.0, 0, "max_norm"},
        {OPTIM_CLIP_NORM, 1.0, 3.0, 0, "norm_type"},
        {OPTIM_CLIP_NORM, 1.0, 0.0, 0, "norm_type"},
        {OPTIM_CLIP_NORM, 1.0, -INFINITY, 0, "norm_type"},
        {OPTIM_CLIP_NORM, 1.0, NAN, 0, "norm_type"},
        {OPTIM_CLIP_VALUE, 0, 2.0, 0.5, NULL},
        {OPTIM_CLIP_VALUE, 0, 2.0, 0, "max_value"},
        {OPTIM_CLIP_VALUE, 0, 2.0, -0.5, "max_value"},
        {OPTIM_CLIP_VALUE, 0, 2.0, NAN, "max_value"},
        {OPTIM_CLIP_VALUE, 0, 2.0, INFINITY, "max_value"},
        {(optim_clip_kind)7, 0, 2.0, 0, "type"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        optim_clip c = {cases[i].kind, cases[i].max_norm, cases[i].norm_type,
                        cases[i].max_value};
        optim_error e;
        memset(&e, 0, sizeof e);
        int rc = optim_clip_validate(&c, &e);
        if (!cases[i].field) {
            if (rc != OPTIM_OK)
                fail_msg("case %zu refused: %s %s", i, e.field, e.msg);
            continue;
        }
        if (rc != OPTIM_EINVAL)
            fail_msg("case %zu accepted, want an error on %s", i, cases[i].field);
        if (strcmp(e.field, cases[i].field) != 0)
            fail_msg("case %zu: field \"%s\", want \"%s\"", i, e.field, cases[i].field);
        assert_true(strlen(e.msg) > 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_norms_match_reference),
        cmocka_unit_test(test_norms_exact),
        cmocka_unit_test(test_nonfinite_norms),
        cmocka_unit_test(test_norm_clip),
        cmocka_unit_test(test_norm_clip_nonfinite),
        cmocka_unit_test(test_value_clip),
        cmocka_unit_test(test_no_clip),
        cmocka_unit_test(test_tables),
        cmocka_unit_test(test_validation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
