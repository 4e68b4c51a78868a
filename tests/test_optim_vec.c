/*
 * test_optim_vec.c -- optim/vec.c: the 16-bit wire conversions against
 * hand-computed bit patterns (ties to even, subnormals, overflow, NaN), and
 * the blocked reductions (finiteness found wherever it hides; the norm a
 * split over blocks gives equals the one-call norm bit for bit and a plain
 * double loop to rounding).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "optim/optim.h"

static float f32_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t narrow(optim_wire w, float x)
{
    uint16_t h;
    optim_vec_to_wire(OPTIM_F32, &x, w, &h, 1);
    return h;
}

static float widen(optim_wire w, uint16_t h)
{
    float x;
    optim_vec_from_wire(w, &h, OPTIM_F32, &x, 1);
    return x;
}

static void test_bfloat16(void **state)
{
    (void)state;
    static const struct {
        uint32_t in;
        uint16_t out;
    } cases[] = {
        {0x3f800000u, 0x3f80},      /* 1.0 */
        {0x3f808000u, 0x3f80},      /* halfway, even below */
        {0x3f818000u, 0x3f82},      /* halfway, odd below: up */
        {0x3f808001u, 0x3f81},      /* just above halfway */
        {0x3f807fffu, 0x3f80},      /* just below halfway */
        {0x80000000u, 0x8000},      /* -0 */
        {0x7f800000u, 0x7f80},      /* Inf */
        {0xff800000u, 0xff80},      /* -Inf */
        {0x7f7fffffu, 0x7f80},      /* FLT_MAX rounds to Inf */
        {0x00000001u, 0x0000},      /* smallest subnormal rounds to 0 */
        {0xc0490fdbu, 0xc049},      /* -pi */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t h = narrow(OPTIM_WIRE_BF16, f32_of(cases[i].in));
        if (h != cases[i].out)
            fail_msg("bf16(0x%08x) = 0x%04x, want 0x%04x", cases[i].in, h, cases[i].out);
    }
    /* NaN stays NaN (quiet), whatever its payload. */
    assert_true(isnan(widen(OPTIM_WIRE_BF16, narrow(OPTIM_WIRE_BF16, f32_of(0x7f800001u)))));
    /* Widening is exact: every bf16 pattern round-trips. */
    for (uint32_t h = 0; h < 0x10000; h++) {
        float x = widen(OPTIM_WIRE_BF16, (uint16_t)h);
        if (isnan(x))
            continue;
        assert_int_equal(narrow(OPTIM_WIRE_BF16, x), h);
    }
}

static void test_float16(void **state)
{
    (void)state;
    static const struct {
        float in;
        uint16_t out;
    } cases[] = {
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {65504.0f, 0x7bff},                 /* largest finite */
        {65519.99f, 0x7bff},
        {65520.0f, 0x7c00},                 /* halfway to 2^16: even is Inf */
        {1e10f, 0x7c00},
        {0x1p-14f, 0x0400},                 /* smallest normal */
        {0x1p-24f, 0x0001},                 /* smallest subnormal */
        {0x1p-25f, 0x0000},                 /* halfway to it: even is 0 */
        {0x1.8p-24f, 0x0002},               /* 1.5 ulp: halfway, even is 2 */
        {0x1.4p-24f, 0x0001},               /* 1.25 ulp */
        {0x1.ff8p-15f, 0x03ff},             /* largest subnormal */
        {0x1.ffcp-15f, 0x0400},             /* halfway above it: even is the smallest normal */
        {1.0f + 0x1p-11f, 0x3c00},          /* halfway, even below */
        {1.0f + 0x3p-11f, 0x3c02},          /* halfway, odd below: up */
        {0.1f, 0x2e66},
        {-0.0f, 0x8000},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t h = narrow(OPTIM_WIRE_F16, cases[i].in);
        if (h != cases[i].out)
            fail_msg("f16(%a) = 0x%04x, want 0x%04x", (double)cases[i].in, h, cases[i].out);
    }
    assert_true(isnan(widen(OPTIM_WIRE_F16, narrow(OPTIM_WIRE_F16, NAN))));
    assert_true(isinf(widen(OPTIM_WIRE_F16, 0x7c00)));
    assert_true(widen(OPTIM_WIRE_F16, 0x0001) == 0x1p-24f);
    assert_true(widen(OPTIM_WIRE_F16, 0x3555) == 0x1.554p-2f);
    for (uint32_t h = 0; h < 0x10000; h++) {
        float x = widen(OPTIM_WIRE_F16, (uint16_t)h);
        if (isnan(x))
            continue;
        assert_int_equal(narrow(OPTIM_WIRE_F16, x), h);
    }
}

static void test_wire_names(void **state)
{
    (void)state;
    optim_wire w;
    assert_int_equal(optim_wire_parse("bfloat16", &w), OPTIM_OK);
    assert_int_equal(w, OPTIM_WIRE_BF16);
    assert_int_equal(optim_wire_size(w), 2);
    assert_int_equal(optim_wire_parse("float64", &w), OPTIM_OK);
    assert_int_equal(optim_wire_size(w), 8);
    assert_int_equal(optim_wire_parse("half", &w), OPTIM_EINVAL);
    assert_string_equal(optim_wire_name(OPTIM_WIRE_F16), "float16");
}

/* The norm from block partials combined in order equals the one-call norm
 * bit for bit, and a plain double loop to rounding; one bad element in any
 * block makes the vector non-finite. */
static void test_blocked_norms(void **state)
{
    (void)state;
    const size_t n = 5 * OPTIM_VEC_BLOCK + 77;
    double *g = malloc(n * sizeof *g);
    assert_non_null(g);
    for (size_t i = 0; i < n; i++)
        g[i] = sin((double)i * 0.37) * (1.0 + (double)(i % 13));
    const double types[] = {1.0, 2.0, INFINITY};
    for (int t = 0; t < 3; t++) {
        size_t nb = optim_vec_blocks(n);
        assert_int_equal(nb, 6);
        optim_vec_partial parts[6];
        for (size_t b = 0; b < nb; b++) {
            size_t off = b * OPTIM_VEC_BLOCK;
            size_t len = n - off < OPTIM_VEC_BLOCK ? n - off : OPTIM_VEC_BLOCK;
            optim_vec_block_stats(OPTIM_F64, g + off, len, types[t], &parts[b]);
        }
        double split, whole, plain = 0;
        bool fin1, fin2;
        optim_vec_stats_combine(types[t], parts, nb, &split, &fin1);
        optim_vec_stats(OPTIM_F64, g, n, types[t], &whole, &fin2);
        assert_true(fin1 && fin2);
        assert_memory_equal(&split, &whole, sizeof split);
        for (size_t i = 0; i < n; i++) {
            double a = fabs(g[i]);
            if (types[t] == 1.0)
                plain += a;
            else if (types[t] == 2.0)
                plain += a * a;
            else
                plain = a > plain ? a : plain;
        }
        if (types[t] == 2.0)
            plain = sqrt(plain);
        assert_true(fabs(whole - plain) <= 1e-12 * plain);
        assert_true(optim_grad_norm(OPTIM_F64, g, n, types[t]) == whole);
    }
    const size_t spots[] = {0, OPTIM_VEC_BLOCK - 1, 3 * OPTIM_VEC_BLOCK + 5, n - 1};
    for (size_t k = 0; k < 4; k++) {
        for (int bad = 0; bad < 2; bad++) {
            double keep = g[spots[k]];
            g[spots[k]] = bad ? NAN : -INFINITY;
            double norm;
            bool fin;
            optim_vec_stats(OPTIM_F64, g, n, 2.0, &norm, &fin);
            assert_false(fin);
            optim_vec_stats(OPTIM_F64, g, n, INFINITY, &norm, &fin);
            assert_false(fin);
            if (bad)
                assert_true(isnan(norm)); /* torch's max propagates NaN */
            g[spots[k]] = keep;
        }
    }
    free(g);
}

static void test_elementwise(void **state)
{
    (void)state;
    float g[5] = {1.5f, -3.0f, 0.25f, NAN, 10.0f}, o[5], a[5] = {1, 1, 1, 1, 1};
    optim_vec_scale(OPTIM_F32, o, g, 5, 0.5);
    assert_true(o[0] == 0.75f && o[1] == -1.5f && o[2] == 0.125f && isnan(o[3]));
    optim_vec_clamp(OPTIM_F32, o, g, 5, 2.0);
    assert_true(o[0] == 1.5f && o[1] == -2.0f && isnan(o[3]) && o[4] == 2.0f);
    optim_vec_add(OPTIM_F32, a, g, 5);
    assert_true(a[0] == 2.5f && a[1] == -2.0f);
    optim_vec_div(OPTIM_F32, a, 5, 2);
    assert_true(a[0] == 1.25f && a[1] == -1.0f);
    float p[3] = {1, 2, 3}, q[3] = {1, 0, 5};
    assert_true(optim_vec_diffsq(OPTIM_F32, p, q, 3) == 8.0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bfloat16),     cmocka_unit_test(test_float16),
        cmocka_unit_test(test_wire_names),   cmocka_unit_test(test_blocked_norms),
        cmocka_unit_test(test_elementwise),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
