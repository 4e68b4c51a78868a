/*
 * test_client_c_wire.c -- the C client's 16-bit wire forms: the conversions
 * on hand-computed bit patterns, and bfloat16 / float16 steps and params
 * against the real daemon (a 16-bit step is the full-width step of the
 * widened gradient; a 16-bit answer is the client's narrowing of the full
 * params), also with absent tensors and per-group values on the step.
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

#include "clients/c/optd_client.h"
#include "tests/support/daemon.h"

typedef struct {
    tdaemon d;
    optd_client *c;
} suite;

static int suite_setup(void **state)
{
    suite *s = calloc(1, sizeof *s);
    *state = NULL;
    if (!s)
        return -1;
    if (tdaemon_start(&s->d, NULL, NULL) != 0) {
        tdaemon_cleanup(&s->d);
        free(s);
        return -1;
    }
    s->c = optd_client_new(tdaemon_url(&s->d), NULL);
    *state = s;
    return s->c ? 0 : -1;
}

static int suite_teardown(void **state)
{
    suite *s = *state;
    if (!s)
        return -1;
    optd_client_free(s->c);
    int rc = tdaemon_stop(&s->d);
    tdaemon_cleanup(&s->d);
    free(s);
    return rc == 0 ? 0 : -1;
}

static float f32_of(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static uint32_t bits_of(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* {float32 bits, bfloat16 bits} */
static const uint32_t BF16[][2] = {
    {0x3f800000, 0x3f80}, /* 1.0 */
    {0x80000000, 0x8000}, /* -0.0 */
    {0x3f808000, 0x3f80}, /* tie, lower half even: down */
    {0x3f818000, 0x3f82}, /* tie, lower half odd: up */
    {0x3f808001, 0x3f81}, /* just past the tie */
    {0x3f807fff, 0x3f80}, /* just below the tie */
    {0xc0490fdb, 0xc049}, /* -pi */
    {0x7f7fffff, 0x7f80}, /* largest float32: Inf */
    {0xff800000, 0xff80}, /* -Inf */
    {0x7fc00000, 0x7fc0}, /* quiet NaN */
    {0x7f800001, 0x7fc0}, /* signalling NaN becomes quiet */
    {0xff812345, 0xffc1}, /* sign and top payload bits kept */
    {0x00008000, 0x0000}, /* tie at the bottom: to even */
    {0x00018000, 0x0002}, /* tie to even upward */
};

/* {float32 bits, float16 bits} */
static const uint32_t F16[][2] = {
    {0x3f800000, 0x3c00}, /* 1.0 */
    {0xc0000000, 0xc000}, /* -2.0 */
    {0x3dcccccd, 0x2e66}, /* 0.1 */
    {0x3f801000, 0x3c00}, /* 1 + 2^-11: tie, even is down */
    {0x3f803000, 0x3c02}, /* 1 + 3*2^-11: tie, even is up */
    {0x3f801001, 0x3c01}, /* just past the tie */
    {0x477fe000, 0x7bff}, /* 65504, the largest float16 */
    {0x477fefff, 0x7bff}, /* just below 65520 */
    {0x477ff000, 0x7c00}, /* 65520: Inf */
    {0xc77ff000, 0xfc00}, /* -65520: -Inf */
    {0x7f800000, 0x7c00}, /* Inf */
    {0x38800000, 0x0400}, /* 2^-14, the smallest normal */
    {0x387fe000, 0x0400}, /* 1023.5 * 2^-24: tie, even is up */
    {0x387fc000, 0x03ff}, /* 1023 * 2^-24, the largest subnormal */
    {0x33800000, 0x0001}, /* 2^-24, the smallest subnormal */
    {0x33000000, 0x0000}, /* 2^-25: tie, even is 0 */
    {0x33000001, 0x0001}, /* just past 2^-25 */
    {0xb3000001, 0x8001},
    {0x33c00000, 0x0002}, /* 1.5 * 2^-24: tie, even is up */
    {0x34200000, 0x0002}, /* 2.5 * 2^-24: tie, even is down */
    {0x00000001, 0x0000}, /* float32 subnormal */
    {0x7fc00000, 0x7e00}, /* quiet NaN */
    {0x7f800001, 0x7e00}, /* signalling NaN becomes quiet */
    {0xffc02000, 0xfe01}, /* sign and top payload bits kept */
};

/* {float16 bits, float32 bits} */
static const uint32_t F16_UP[][2] = {
    {0x3c00, 0x3f800000}, {0x0001, 0x33800000}, {0x03ff, 0x387fc000},
    {0x0400, 0x38800000}, {0x7bff, 0x477fe000}, {0x7c00, 0x7f800000},
    {0xfe01, 0xffc02000}, {0x3555, 0x3eaaa000}, {0x8200, 0xb8000000},
};

static void test_conversions(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof BF16 / sizeof BF16[0]; i++)
        assert_int_equal(optd_f32_to_bf16(f32_of(BF16[i][0])), BF16[i][1]);
    for (size_t i = 0; i < sizeof F16 / sizeof F16[0]; i++)
        assert_int_equal(optd_f32_to_f16(f32_of(F16[i][0])), F16[i][1]);
    for (size_t i = 0; i < sizeof F16_UP / sizeof F16_UP[0]; i++)
        assert_int_equal(bits_of(optd_f16_to_f32((uint16_t)F16_UP[i][0])), F16_UP[i][1]);
    assert_int_equal(bits_of(optd_bf16_to_f32(0xc049)), 0xc0490000);
    /* Every pattern widens and narrows back to itself; a signalling NaN
     * comes back quiet. */
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t b = (uint16_t)h, f = (uint16_t)h;
        if ((b & 0x7f80) == 0x7f80 && (b & 0x7f))
            b |= 0x40;
        if ((f & 0x7c00) == 0x7c00 && (f & 0x3ff))
            f |= 0x200;
        assert_int_equal(optd_f32_to_bf16(optd_bf16_to_f32((uint16_t)h)), b);
        assert_int_equal(optd_f32_to_f16(optd_f16_to_f32((uint16_t)h)), f);
    }
}

/* v narrowed to w and widened back, as the daemon does it to a 16-bit
 * gradient (doubles through float). */
static void round_trip(const double *v, double *out, size_t n, optd_wire w)
{
    for (size_t i = 0; i < n; i++) {
        float f = (float)v[i];
        out[i] = w == OPTD_WIRE_BFLOAT16 ? optd_bf16_to_f32(optd_f32_to_bf16(f))
                                         : optd_f16_to_f32(optd_f32_to_f16(f));
    }
}

static void round_trip_f(const float *v, float *out, size_t n, optd_wire w)
{
    for (size_t i = 0; i < n; i++)
        out[i] = w == OPTD_WIRE_BFLOAT16 ? optd_bf16_to_f32(optd_f32_to_bf16(v[i]))
                                         : optd_f16_to_f32(optd_f32_to_f16(v[i]));
}

#define N 300

static void create_pair(optd_client *c, const char *a, const char *b, const char *dtype)
{
    char *cfg = malloc(N * 30 + 200);
    assert_non_null(cfg);
    size_t k = (size_t)sprintf(cfg, "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},"
                                    "\"dtype\":\"%s\",\"params\":[", dtype);
    for (int i = 0; i < N; i++)
        k += (size_t)sprintf(cfg + k, "%s%.17g", i ? "," : "", sin(i + 1.0) * 2);
    strcpy(cfg + k, "]}");
    optd_error e;
    assert_int_equal(optd_create_session(c, a, cfg, &e), 1);
    assert_int_equal(optd_create_session(c, b, cfg, &e), 1);
    free(cfg);
}

static void test_f64_steps(void **state)
{
    suite *s = *state;
    const optd_wire wires[] = {OPTD_WIRE_BFLOAT16, OPTD_WIRE_FLOAT16};
    static double grad[N], wide[N], got[N], full[N], ref[N], want[N];
    for (int wi = 0; wi < 2; wi++) {
        char a[32], b[32];
        snprintf(a, sizeof a, "w16-f64-%d", wi);
        snprintf(b, sizeof b, "w64-f64-%d", wi);
        create_pair(s->c, a, b, "float64");
        optd_step_opts o = optd_step_opts_default();
        o.wire = wires[wi];
        for (int k = 1; k <= 3; k++) {
            for (int i = 0; i < N; i++)
                grad[i] = cos(i * k + 0.5) * pow(10, i % 12 - 8);
            long long step = -1;
            optd_error e;
            assert_int_equal(
                optd_step_f64_opts(s->c, a, grad, N, NULL, &o, got, &step, NULL, &e), 0);
            assert_int_equal(step, k);
            round_trip(grad, wide, N, wires[wi]);
            assert_int_equal(optd_step_f64(s->c, b, wide, N, NULL, ref, NULL, &e), 0);
            assert_int_equal(optd_get_params_f64(s->c, a, full, N, NULL, &e), 0);
            assert_int_equal(optd_get_params_f64(s->c, b, ref, N, NULL, &e), 0);
            assert_memory_equal(full, ref, sizeof full);
            round_trip(full, want, N, wires[wi]);
            assert_memory_equal(got, want, sizeof got);
            assert_memory_not_equal(got, full, sizeof got);
        }
    }
}

static void test_client_default_f32(void **state)
{
    suite *s = *state;
    optd_client *c = optd_client_new(tdaemon_url(&s->d), NULL);
    assert_non_null(c);
    assert_int_equal(optd_client_set_wire(c, (optd_wire)7), -1);
    assert_int_equal(optd_client_set_wire(c, OPTD_WIRE_FLOAT16), 0);
    create_pair(c, "w16-f32", "w32-f32", "float32");
    static float grad[N], wide[N], got[N], full[N], ref[N], want[N];
    optd_error e;
    for (int k = 1; k <= 3; k++) {
        for (int i = 0; i < N; i++)
            grad[i] = (float)(cos(i * k + 0.5) * pow(10, i % 12 - 8));
        assert_int_equal(optd_step_f32(c, "w16-f32", grad, N, NULL, got, NULL, &e), 0);
        round_trip_f(grad, wide, N, OPTD_WIRE_FLOAT16);
        optd_step_opts full_width = optd_step_opts_default();
        full_width.wire = OPTD_WIRE_FULL;
        assert_int_equal(optd_step_f32_opts(c, "w32-f32", wide, N, NULL, &full_width, ref, NULL,
                                            NULL, &e),
                         0);
        assert_int_equal(
            optd_get_params_f32_wire(c, "w16-f32", full, N, OPTD_WIRE_FULL, NULL, &e), 0);
        assert_memory_equal(full, ref, sizeof full);
        round_trip_f(full, want, N, OPTD_WIRE_FLOAT16);
        assert_memory_equal(got, want, sizeof got);
    }
    /* the client's default applies to params too; a call can name another */
    assert_int_equal(optd_get_params_f32(c, "w16-f32", got, N, NULL, &e), 0);
    assert_memory_equal(got, want, sizeof got);
    assert_int_equal(
        optd_get_params_f32_wire(c, "w16-f32", got, N, OPTD_WIRE_BFLOAT16, NULL, &e), 0);
    round_trip_f(full, want, N, OPTD_WIRE_BFLOAT16);
    assert_memory_equal(got, want, sizeof got);
    /* JSON cannot carry a 16-bit form: refused before anything is sent */
    optd_step_opts js = optd_step_opts_default();
    js.json = 1;
    assert_int_equal(optd_step_f32_opts(c, "w16-f32", grad, N, NULL, &js, got, NULL, NULL, &e),
                     -1);
    assert_int_equal(e.status, 0);
    optd_client_free(c);
}

static void test_set_params(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "w16-set",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"dtype\":\"float64\","
                                         "\"size\":5}",
                                         &e),
                     1);
    const double v[5] = {1.0, 65519.0, ldexp(1, -24), -0.1, 1.0 + ldexp(1, -11)};
    assert_int_equal(optd_set_params_f64_wire(s->c, "w16-set", v, 5, OPTD_WIRE_FLOAT16, &e), 0);
    double got[5];
    assert_int_equal(optd_get_params_f64(s->c, "w16-set", got, 5, NULL, &e), 0);
    const double want[5] = {1.0, 65504.0, ldexp(1, -24), -0.0999755859375, 1.0};
    assert_memory_equal(got, want, sizeof got);
    /* 65520 narrows to Inf, which params may not hold: a 422, nothing changed */
    const double inf[5] = {65520, 65520, 65520, 65520, 65520};
    assert_int_equal(optd_set_params_f64_wire(s->c, "w16-set", inf, 5, OPTD_WIRE_FLOAT16, &e),
                     -1);
    assert_int_equal(e.status, 422);
    double again[5];
    assert_int_equal(optd_get_params_f64(s->c, "w16-set", again, 5, NULL, &e), 0);
    assert_memory_equal(again, want, sizeof again);
}

/* Absent tensors and per-group lrs on a 16-bit step: the gradient holds the
 * present tensors only, the answer is every tensor's params in the form
 * (params_len of them).  w is 2x3, b is 3: the vector is w, b. */
static void test_absent_groups(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(
        optd_create_session(s->c, "w16-layout",
                            "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"dtype\":\"float64\","
                            "\"params\":[0.5,-1,2,0.25,3,-0.75,1,2,3],"
                            "\"tensors\":[{\"name\":\"layer.w\",\"shape\":[2,3]},"
                            "{\"name\":\"layer.b\",\"shape\":[3]}],"
                            "\"groups\":[{\"tensors\":[\"layer.w\"]},"
                            "{\"tensors\":[\"layer.b\"],\"lr\":0.5}]}",
                            &e),
        1);
    const double w[6] = {0.5, -1, 2, 0.25, 3, -0.75}, b[3] = {1, 2, 3};
    /* bfloat16: layer.b absent, grad holds layer.w's six values (exact in
     * 16 bits), each group with its own lr */
    double g[6] = {1, 2, 3, 4, 5, 6}, got[9], full[9], want[9], lr[2] = {0.2, 0.3};
    size_t absent_b = 1, absent_w = 0;
    long long st = -1;
    optd_step_opts o = optd_step_opts_default();
    o.wire = OPTD_WIRE_BFLOAT16;
    o.absent = &absent_b;
    o.n_absent = 1;
    o.n_groups = 2;
    o.group_lr = lr;
    o.params_len = 9;
    assert_int_equal(optd_step_f64_opts(s->c, "w16-layout", g, 6, NULL, &o, got, &st, NULL, &e),
                     0);
    assert_int_equal(st, 1);
    assert_int_equal(
        optd_get_params_f64_wire(s->c, "w16-layout", full, 9, OPTD_WIRE_FULL, &st, &e), 0);
    for (int i = 0; i < 6; i++)
        assert_true(full[i] == w[i] + -0.2 * g[i]);
    for (int i = 0; i < 3; i++)
        assert_true(full[6 + i] == b[i]);
    round_trip(full, want, 9, OPTD_WIRE_BFLOAT16);
    assert_memory_equal(got, want, sizeof got);

    /* float16: layer.w absent; group 1 keeps the lr 0.3 of the last step */
    double gb[3] = {0.5, -0.25, 1}, prev[9];
    memcpy(prev, full, sizeof prev);
    optd_step_opts f = optd_step_opts_default();
    f.wire = OPTD_WIRE_FLOAT16;
    f.absent = &absent_w;
    f.n_absent = 1;
    f.params_len = 9;
    assert_int_equal(optd_step_f64_opts(s->c, "w16-layout", gb, 3, NULL, &f, got, &st, NULL, &e),
                     0);
    assert_int_equal(st, 2);
    assert_int_equal(
        optd_get_params_f64_wire(s->c, "w16-layout", full, 9, OPTD_WIRE_FULL, NULL, &e), 0);
    assert_memory_equal(full, prev, 6 * sizeof(double));
    for (int i = 0; i < 3; i++)
        assert_true(full[6 + i] == b[i] + -0.3 * gb[i]);
    round_trip(full, want, 9, OPTD_WIRE_FLOAT16);
    assert_memory_equal(got, want, sizeof got);

    /* without params_len the answer (9 values) is not the 3 expected: an
     * error, though the step itself was applied */
    f.params_len = 0;
    assert_int_equal(optd_step_f64_opts(s->c, "w16-layout", gb, 3, NULL, &f, got, &st, NULL, &e),
                     -1);
    assert_int_equal(e.status, 200);
    /* a gradient of the wrong length for the present tensors changes nothing */
    f.params_len = 9;
    assert_int_equal(optd_step_f64_opts(s->c, "w16-layout", g, 6, NULL, &f, got, &st, NULL, &e),
                     -1);
    assert_int_equal(e.status, 422);
    assert_int_equal(optd_get_params_f64(s->c, "w16-layout", full, 9, &st, &e), 0);
    assert_int_equal(st, 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conversions),
        cmocka_unit_test(test_f64_steps),
        cmocka_unit_test(test_client_default_f32),
        cmocka_unit_test(test_set_params),
        cmocka_unit_test(test_absent_groups),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
