/*
 * test_api_vector.c -- JSON vectors without a node per number.
 *
 * Decoding: the fast scanner must read exactly what cJSON reads (every
 * element bit for bit, against a reference decoder built on cJSON here,
 * over thousands of generated bodies in every number spelling JSON allows)
 * and every malformed or wrong body must get the same status, field and
 * detail as before; a duplicated vector member is a 400 naming it.
 * Printing: api_fmt_f32 / api_fmt_f64 / api_buf_vector against snprintf's
 * "%.9g" / "%.17g", byte for byte, for millions of values of every class
 * (every float32 exponent, subnormals, powers of two and ten and their
 * neighbours, ties, random bit patterns).  One daemon check: a duplicated
 * grad over HTTP is refused and changes nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "api/api.h"
#include "tests/support/apitest.h"

/* ------------------------------------------------------------ helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t rnd(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static float f32_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double f64_of(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* What the decoder stored before the fast path: cJSON's double, then
 * to float32 with overflow to infinity. */
static float ref_f32(double d)
{
    if (d > 3.4028235677973366e38)
        return INFINITY;
    if (d < -3.4028235677973366e38)
        return -INFINITY;
    return (float)d;
}

/* The reference decode of body's member `field` with cJSON: 0 and out
 * filled, or -1 when it is not an array of n numbers. */
static int ref_decode(const char *body, const char *field, optim_dtype dt, size_t n, void *out)
{
    cJSON *root = cJSON_Parse(body);
    if (!root)
        return -1;
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, field), *e;
    size_t i = 0;
    int rc = cJSON_IsArray(a) ? 0 : -1;
    cJSON_ArrayForEach(e, a)
    {
        if (i >= n || !cJSON_IsNumber(e)) {
            rc = -1;
            break;
        }
        if (dt == OPTIM_F32)
            ((float *)out)[i] = ref_f32(e->valuedouble);
        else
            ((double *)out)[i] = e->valuedouble;
        i++;
    }
    if (i != n)
        rc = -1;
    cJSON_Delete(root);
    return rc;
}

typedef struct {
    char *data;
    size_t len, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->data = realloc(b->data, b->cap);
        assert_non_null(b->data);
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_ws(sbuf *b)
{
    static const char *const ws[] = {"", "", "", " ", "\n", "\t", "\r\n  "};
    sb_str(b, ws[rnd() % 7]);
}

/* One number in one of the spellings clients send. */
static void sb_number(sbuf *b)
{
    char t[400];
    uint64_t r = rnd();
    double d = f64_of(rnd());
    if (!isfinite(d))
        d = 0.5;
    float f = (float)((double)(int64_t)rnd() / 9.2e18 * pow(10, (int)(rnd() % 20) - 12));
    switch (r % 20) {
    case 0: snprintf(t, sizeof t, "%.9g", (double)f); break;
    case 1: snprintf(t, sizeof t, "%.17g", d); break;
    case 2: snprintf(t, sizeof t, "%.17g", (double)f); break;
    case 3: snprintf(t, sizeof t, "%lld", (long long)(rnd() % 2000001) - 1000000); break;
    case 4: snprintf(t, sizeof t, "%.3E", (double)f); break;
    case 5: snprintf(t, sizeof t, "%.25e", d); break;           /* > 19 digits */
    case 6: snprintf(t, sizeof t, "%.30f", (double)f); break;   /* long fraction */
    case 7: snprintf(t, sizeof t, "%.0f", d); break;            /* up to 309 digits */
    case 8: {
        int x = (int)(rnd() % 600) - 300;
        snprintf(t, sizeof t, "%se%s%d", (r >> 8) & 1 ? "-0" : "0",
                 x < 0 ? "-" : (r >> 9) & 1 ? "+" : "", abs(x));
        break;
    }
    case 9: snprintf(t, sizeof t, "%llue%d", (unsigned long long)(rnd() >> (rnd() % 64)),
                     (int)(rnd() % 700) - 350); break;
    case 10: snprintf(t, sizeof t, "9007199254740993e%d", (int)(rnd() % 50) - 25); break;
    case 11: snprintf(t, sizeof t, "%.6fe%d", (double)f, (int)(rnd() % 80) - 40); break;
    case 12: snprintf(t, sizeof t, "0.%0*d%llu", (int)(rnd() % 30), 0,
                      (unsigned long long)(rnd() % 100000000000ull)); break;
    case 13: snprintf(t, sizeof t, "%.17g", f64_of(rnd() & 0x000fffffffffffffu)); break; /* subnormal */
    case 14: snprintf(t, sizeof t, "%.8e", (double)FLT_MAX * (1 + (double)(r % 1000) / 1e8)); break;
    case 15: snprintf(t, sizeof t, "%.17g", (double)f * pow(10, (int)(rnd() % 40) - 20)); break;
    case 16: snprintf(t, sizeof t, "%.19g", (double)f * pow(10, (int)(rnd() % 40) - 20)); break;
    case 17: /* odd integers above 2^53: ties and near-ties between doubles */
        snprintf(t, sizeof t, "%llue%d",
                 (unsigned long long)((UINT64_C(1) << (53 + rnd() % 11)) + (rnd() % 64)),
                 (int)(rnd() % 50) - 25);
        break;
    case 18: snprintf(t, sizeof t, "%.18e", (double)f); break;
    case 19: { /* 16-19 digits of a midpoint between two doubles: where
                * the decoder's error bound must send it to strtod */
        long double x;
        if (r & 0x100) { /* just below a power of two, where the ulp halves */
            x = ldexpl(1.0L - 0x1p-54L, (int)(rnd() % 150) - 60);
        } else {
            double base = (double)(int64_t)rnd() / 9.2e18 * pow(10, (int)(rnd() % 40) - 15);
            x = (long double)fabs(base) + (long double)(nextafter(fabs(base), INFINITY) -
                                                        fabs(base)) / 2;
        }
        snprintf(t, sizeof t, "%.*Le", 15 + (int)(rnd() % 4), x);
        break;
    }
    default: snprintf(t, sizeof t, "%.9g", (double)f32_of((uint32_t)rnd() & 0x7f7fffffu)); break;
    }
    if ((r >> 20) % 4 == 0 && t[0] != '-')
        sb_str(b, "-");
    sb_str(b, t);
}

/* A step body with n random numbers and the other members in random
 * order; returns a new string. */
static char *gen_step(size_t n, const char *field)
{
    sbuf b = {0};
    sb_ws(&b);
    sb_str(&b, "{");
    int meta_before = (int)(rnd() % 3), meta_after = (int)(rnd() % 3);
    bool step = strcmp(field, "grad") == 0;
    static const char *const metas[] = {"\"loss\":0.25", "\"worker\":\"w[1],{x}\\\"\"",
                                        "\"base_step\":7", "\"loss\":null"};
    bool first = true;
    for (int i = 0; step && i < meta_before; i++) {
        sb_ws(&b);
        sb_str(&b, metas[rnd() % 4]);
        sb_ws(&b);
        sb_str(&b, ",");
        first = false;
    }
    (void)first;
    sb_ws(&b);
    sb_str(&b, "\"");
    sb_str(&b, field);
    sb_str(&b, "\"");
    sb_ws(&b);
    sb_str(&b, ":");
    sb_ws(&b);
    sb_str(&b, "[");
    for (size_t i = 0; i < n; i++) {
        sb_ws(&b);
        sb_number(&b);
        sb_ws(&b);
        if (i + 1 < n)
            sb_str(&b, ",");
    }
    sb_str(&b, "]");
    for (int i = 0; step && i < meta_after; i++) {
        sb_ws(&b);
        sb_str(&b, ",");
        sb_ws(&b);
        sb_str(&b, metas[rnd() % 4]);
    }
    sb_ws(&b);
    sb_str(&b, "}");
    sb_ws(&b);
    return b.data;
}

/* A fresh copy of s without a NUL after it, so that ASan sees any read
 * past the body. */
static char *exact_copy(const char *s, size_t len)
{
    char *p = malloc(len ? len : 1);
    assert_non_null(p);
    memcpy(p, s, len);
    return p;
}

/* ------------------------------------------------------------ decoding */

static void decode_matches_cjson(optim_dtype dt, const char *field, int bodies)
{
    for (int k = 0; k < bodies; k++) {
        size_t n = 1 + rnd() % (k % 10 == 0 ? 3000 : 40);
        char *body = gen_step(n, field);
        size_t len = strlen(body);
        size_t esz = dt == OPTIM_F32 ? 4 : 8;
        unsigned char *want = malloc(n * esz), *got = malloc(n * esz);
        assert_non_null(want);
        assert_non_null(got);
        if (ref_decode(body, field, dt, n, want) != 0)
            fail_msg("cJSON refuses the generated body %.300s", body);
        char *copy = exact_copy(body, len);
        api_reply r = {0};
        api_step_meta meta = {.loss = NAN, .base_step = -1};
        int st = strcmp(field, "grad") == 0
                     ? api_decode_step_json(copy, len, dt, n, got, &meta, &r)
                     : api_decode_params_json(copy, len, dt, n, got, &r);
        if (st != 0)
            fail_msg("status %d for %.200s: %.*s", st, body, (int)r.len, r.body);
        if (memcmp(want, got, n * esz) != 0) {
            for (size_t i = 0; i < n; i++)
                if (memcmp(want + i * esz, got + i * esz, esz) != 0)
                    fail_msg("element %zu differs from cJSON's in %.300s", i, body);
        }
        api_reply_free(&r);
        free(copy);
        free(want);
        free(got);
        free(body);
    }
}

static void test_decode_f32_matches_cjson(void **state)
{
    (void)state;
    decode_matches_cjson(OPTIM_F32, "grad", 3000);
    decode_matches_cjson(OPTIM_F32, "params", 500);
}

static void test_decode_f64_matches_cjson(void **state)
{
    (void)state;
    decode_matches_cjson(OPTIM_F64, "grad", 3000);
    decode_matches_cjson(OPTIM_F64, "params", 500);
}

/* Hand-picked spellings and their exact values. */
static void test_decode_exact_values(void **state)
{
    (void)state;
    const char *body = "{\"grad\":[0,-0,1e0,0.1,-2.5E-3,1.7976931348623157e308,"
                       "4.9406564584124654e-324,9007199254740993,1e23,123456789012345678901234,"
                       "1E400,-1e-400,0.30000000000000004441]}";
    double want[] = {0, -0.0, 1, 0.1, -2.5e-3, DBL_MAX, 4.9406564584124654e-324,
                     9007199254740992.0, 1e23, 123456789012345678901234.0, INFINITY, -0.0,
                     0.30000000000000004};
    size_t n = sizeof want / sizeof want[0];
    double got[sizeof want / sizeof want[0]];
    api_reply r = {0};
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    assert_int_equal(api_decode_step_json(body, strlen(body), OPTIM_F64, n, got, &meta, &r), 0);
    assert_memory_equal(got, want, sizeof want);
    float gf[sizeof want / sizeof want[0]];
    assert_int_equal(api_decode_step_json(body, strlen(body), OPTIM_F32, n, gf, &meta, &r), 0);
    for (size_t i = 0; i < n; i++) {
        float w = ref_f32(want[i]);
        assert_memory_equal(&gf[i], &w, sizeof w);
    }
    /* Meta members around the vector. */
    const char *b2 = " {\"loss\" : 1.5,\"grad\":[1,2],\"worker\":\"a,]\\\"}\",\"base_step\":3} ";
    api_step_meta m2 = {.loss = NAN, .base_step = -1};
    assert_int_equal(api_decode_step_json(b2, strlen(b2), OPTIM_F64, 2, got, &m2, &r), 0);
    assert_true(m2.loss == 1.5);
    assert_int_equal(m2.base_step, 3);
    assert_string_equal(m2.worker, "a,]\"}");
    assert_true(got[0] == 1 && got[1] == 2);
    api_reply_free(&r);
}

/* What the old decoder also took (cJSON is lenient): same values. */
static void test_decode_lenient_spellings_as_before(void **state)
{
    (void)state;
    const char *body = "{\"grad\":[01,1.,1.e1,-00,\"x\"]}";
    double got[4];
    api_reply r = {0};
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    const char *b1 = "{\"grad\":[01,1.,1.e1,-00]}";
    assert_int_equal(api_decode_step_json(b1, strlen(b1), OPTIM_F64, 4, got, &meta, &r), 0);
    assert_true(got[0] == 1 && got[1] == 1 && got[2] == 10 && got[3] == 0 && signbit(got[3]));
    assert_int_equal(api_decode_step_json(body, strlen(body), OPTIM_F64, 5, got, &meta, &r), 400);
    api_reply_free(&r);
}

typedef struct {
    const char *body;
    size_t n;
    int status;
    const char *field; /* NULL: no field member */
    const char *detail;
} err_case;

static void check_error(const err_case *c, bool step)
{
    size_t len = strlen(c->body);
    char *copy = exact_copy(c->body, len);
    double out[8];
    api_reply r = {0};
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    int st = step ? api_decode_step_json(copy, len, OPTIM_F32, c->n, out, &meta, &r)
                  : api_decode_params_json(copy, len, OPTIM_F32, c->n, out, &r);
    if (st != c->status)
        fail_msg("%s: status %d, want %d", c->body, st, c->status);
    assert_int_equal(r.status, c->status);
    assert_string_equal(r.content_type, "application/problem+json");
    cJSON *j = cJSON_ParseWithLength(r.body, r.len);
    assert_non_null(j);
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(j, "detail");
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "field");
    assert_true(cJSON_IsString(d));
    if (strcmp(d->valuestring, c->detail) != 0)
        fail_msg("%s: detail \"%s\", want \"%s\"", c->body, d->valuestring, c->detail);
    if (c->field) {
        assert_true(cJSON_IsString(f));
        assert_string_equal(f->valuestring, c->field);
    } else {
        assert_null(f);
    }
    cJSON_Delete(j);
    api_reply_free(&r);
    free(copy);
}

static void test_decode_errors_as_before(void **state)
{
    (void)state;
    static const err_case steps[] = {
        {"{\"grad\":[1,2,3]", 3, 400, NULL, "malformed JSON near byte 14"},
        {"{\"grad\":[1,2,3]} x", 3, 400, NULL, "the body must be one JSON object"},
        {"{\"grad\":[1,2,3]}{}", 3, 400, NULL, "the body must be one JSON object"},
        {"[1,2,3]", 3, 400, NULL, "the body must be one JSON object"},
        {"", 3, 400, NULL, "malformed JSON near byte 0"},
        {"{\"grad\":[1,2]}", 3, 422, "grad", "grad has 2 elements; the session has 3"},
        {"{\"grad\":[]}", 3, 422, "grad", "grad has 0 elements; the session has 3"},
        {"{\"grad\":[1,2,3,4]}", 3, 422, "grad", "grad has more than the session's 3 elements"},
        {"{\"grad\":[1,\"2\",3]}", 3, 400, "grad", "grad[1] is not a number"},
        {"{\"grad\":[1,2,null]}", 3, 400, "grad", "grad[2] is not a number"},
        {"{\"grad\":[[1],2,3]}", 3, 400, "grad", "grad[0] is not a number"},
        {"{\"grad\":[1,2,true]}", 3, 400, "grad", "grad[2] is not a number"},
        {"{\"grad\":\"1,2,3\"}", 3, 400, "grad", "grad must be an array of numbers"},
        {"{\"grad\":{\"0\":1}}", 3, 400, "grad", "grad must be an array of numbers"},
        {"{\"grad\":[1,2,3],\"lr\":1}", 3, 400, "lr",
         "unknown field \"lr\" (grad, loss, base_step, worker)"},
        {"{\"lr\":1,\"grad\":[1]}", 3, 400, "lr",
         "unknown field \"lr\" (grad, loss, base_step, worker)"},
        {"{\"grad\":[1],\"loss\":\"x\"}", 3, 400, "loss", "loss must be a finite number"},
        {"{\"grad\":[1,2,3],\"loss\":1e400}", 3, 400, "loss", "loss must be a finite number"},
        {"{\"grad\":[1,2,3],\"base_step\":-1}", 3, 400, "base_step",
         "base_step must be a non-negative integer"},
        {"{\"grad\":[1,2,3],\"base_step\":1.5}", 3, 400, "base_step",
         "base_step must be a non-negative integer"},
        {"{\"grad\":[1,2,3],\"worker\":\"\"}", 3, 400, "worker",
         "worker must be a string of 1-128 characters"},
        {"{\"loss\":1}", 3, 400, "grad", "grad (an array of numbers) is required"},
        {"{}", 3, 400, "grad", "grad (an array of numbers) is required"},
        {"{\"grad\":[1,2,3],\"grad\":[1,2,3]}", 3, 400, "grad", "grad appears more than once"},
        {"{\"grad\":[1,2,3],\"gr\\u0061d\":[4,5,6]}", 3, 400, "grad",
         "grad appears more than once"},
        {"{\"grad\":[1,2,3],\"loss\":1,\"grad\":\"x\"}", 3, 400, "grad",
         "grad appears more than once"},
        {"{\"grad\":[1,2,+3]}", 3, 400, NULL, "malformed JSON near byte 13"},
        {"{\"grad\":[1,2,.3]}", 3, 400, NULL, "malformed JSON near byte 13"},
        {"{\"grad\":[1,2,0x3]}", 3, 400, NULL, "malformed JSON near byte 14"},
        {"{\"grad\":[1,2,Infinity]}", 3, 400, NULL, "malformed JSON near byte 13"},
        {"{\"grad\":[1,2,NaN]}", 3, 400, NULL, "malformed JSON near byte 13"},
        {"{\"grad\":[1,2,-]}", 3, 400, NULL, "malformed JSON near byte 13"},
        {"{\"grad\":[1,2,1e]}", 3, 400, NULL, "malformed JSON near byte 14"},
        {"{\"grad\":[1,,3]}", 3, 400, NULL, "malformed JSON near byte 11"},
        {"{\"grad\":[1,2,3,]}", 3, 400, NULL, "malformed JSON near byte 15"},
        {"{\"grad\":[1 2 3]}", 3, 400, NULL, "malformed JSON near byte 11"},
        {"{\"grad\":[1,2,3],}", 3, 400, NULL, "malformed JSON near byte 16"},
        {"{\"grad\":[1,2,3] \"loss\":1}", 3, 400, NULL, "malformed JSON near byte 16"},
        {"{\"grad\":[1,2,3],\"loss\":01x}", 3, 400, NULL, "malformed JSON near byte 25"},
    };
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++)
        check_error(&steps[i], true);
    static const err_case params[] = {
        {"{\"params\":[1,2]}", 3, 422, "params", "params has 2 elements; the session has 3"},
        {"{\"params\":[1,2,3],\"x\":0}", 3, 400, "x", "unknown field \"x\" (params)"},
        {"{\"params\":[1,2,3],\"params\":[1,2,3]}", 3, 400, "params",
         "params appears more than once"},
        {"{\"params\":[1,{},3]}", 3, 400, "params", "params[1] is not a number"},
        {"{\"grad\":[1,2,3]}", 3, 400, "grad", "unknown field \"grad\" (params)"},
        {"{}", 3, 400, "params", "params (an array of numbers) is required"},
    };
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++)
        check_error(&params[i], false);
}

/* Truncations of a valid body, without a NUL after them: each is refused
 * (never read past its end, as ASan checks). */
static void test_decode_truncated(void **state)
{
    (void)state;
    const char *body = "{\"loss\":0.5,\"grad\":[1.5e-3,-2,3.25],\"worker\":\"w\"}";
    size_t len = strlen(body);
    float out[3];
    for (size_t l = 0; l < len; l++) {
        char *copy = exact_copy(body, l);
        api_reply r = {0};
        api_step_meta meta = {.loss = NAN, .base_step = -1};
        assert_int_equal(api_decode_step_json(copy, l, OPTIM_F32, 3, out, &meta, &r), 400);
        api_reply_free(&r);
        free(copy);
    }
    char *copy = exact_copy(body, len);
    api_reply r = {0};
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    assert_int_equal(api_decode_step_json(copy, len, OPTIM_F32, 3, out, &meta, &r), 0);
    assert_true(out[0] == 1.5e-3f && out[1] == -2 && out[2] == 3.25f);
    free(copy);
}

/* Bodies with random bytes changed, inserted or removed, in buffers with
 * nothing after them: never a read past the end (ASan), and whatever the
 * decoder accepts cJSON reads as the same numbers. */
static void test_decode_mutations(void **state)
{
    (void)state;
    static const char alphabet[] = "{}[],:\"\\ -+.eE0123456789gradlosnutf\t\n";
    for (int k = 0; k < 20000; k++) {
        size_t n = 1 + rnd() % 6;
        char *body = gen_step(n, k % 4 ? "grad" : "params");
        size_t len = strlen(body);
        char *m = malloc(len + 8);
        assert_non_null(m);
        memcpy(m, body, len + 1);
        for (int e = 0, edits = 1 + (int)(rnd() % 3); e < edits; e++) {
            size_t at = rnd() % (len + 1);
            char c = alphabet[rnd() % (sizeof alphabet - 1)];
            switch (rnd() % 3) {
            case 0:
                if (at < len)
                    m[at] = c;
                break;
            case 1:
                memmove(m + at + 1, m + at, len - at + 1);
                m[at] = c;
                len++;
                break;
            default:
                if (at < len) {
                    memmove(m + at, m + at + 1, len - at);
                    len--;
                }
                break;
            }
        }
        m[len] = '\0';
        char *copy = exact_copy(m, len);
        double got[8], want[8];
        api_reply r = {0};
        api_step_meta meta = {.loss = NAN, .base_step = -1};
        int st = k % 4 ? api_decode_step_json(copy, len, OPTIM_F64, n, got, &meta, &r)
                       : api_decode_params_json(copy, len, OPTIM_F64, n, got, &r);
        if (st == 0) {
            if (ref_decode(m, k % 4 ? "grad" : "params", OPTIM_F64, n, want) != 0)
                fail_msg("accepted what cJSON refuses: %s", m);
            assert_memory_equal(got, want, n * sizeof got[0]);
        } else {
            assert_true(st == 400 || st == 422);
            assert_int_equal(r.status, st);
        }
        api_reply_free(&r);
        free(copy);
        free(m);
        free(body);
    }
}

/* ------------------------------------------------------------ printing */

static long f32_mismatches, f64_mismatches;

static void check_f32(float x)
{
    char got[40], want[40];
    size_t n = api_fmt_f32(got, x);
    got[n] = '\0';
    snprintf(want, sizeof want, "%.9g", (double)x);
    if (strcmp(got, want) != 0 && f32_mismatches++ < 10) {
        uint32_t u;
        memcpy(&u, &x, sizeof u);
        print_error("float32 0x%08x: \"%s\", snprintf \"%s\"\n", u, got, want);
    }
}

static void check_f64(double x)
{
    char got[40], want[40];
    size_t n = api_fmt_f64(got, x);
    got[n] = '\0';
    snprintf(want, sizeof want, "%.17g", x);
    if (strcmp(got, want) != 0 && f64_mismatches++ < 10) {
        uint64_t u;
        memcpy(&u, &x, sizeof u);
        print_error("float64 0x%016llx: \"%s\", snprintf \"%s\"\n", (unsigned long long)u, got,
                    want);
    }
}

static void check_f32_both(float x)
{
    check_f32(x);
    check_f32(-x);
}

/* Every exponent (subnormals included) with the edge mantissas and 2,000
 * random ones; every power of two and ten with 8 neighbours each side;
 * the integers up to 2^20 and around 10^9; exact decimal ties at the 10th
 * digit (odd multiples of 5^k / 2^k); 3M random bit patterns. */
static void test_print_f32_like_snprintf(void **state)
{
    (void)state;
    f32_mismatches = 0;
    for (uint32_t e = 0; e < 255; e++) {
        static const uint32_t edge[] = {0, 1, 2, 3, 0x7fffff, 0x7ffffe, 0x400000, 0x3fffff};
        for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++)
            check_f32_both(f32_of(e << 23 | edge[i]));
        for (int i = 0; i < 2000; i++)
            check_f32_both(f32_of(e << 23 | ((uint32_t)rnd() & 0x7fffff)));
    }
    for (int k = -149; k <= 127; k++) {
        float p = ldexpf(1.0f, k);
        uint32_t u;
        memcpy(&u, &p, sizeof u);
        for (int d = -8; d <= 8; d++)
            check_f32_both(f32_of(u + (uint32_t)d));
    }
    for (int k = -45; k <= 38; k++) {
        float p = (float)pow(10, k);
        uint32_t u;
        memcpy(&u, &p, sizeof u);
        for (int d = -8; d <= 8; d++)
            check_f32_both(f32_of(u + (uint32_t)d));
    }
    for (uint32_t i = 0; i <= (1u << 20); i++)
        check_f32(f32_of(i) == 0 ? 0.0f : (float)i);
    for (int64_t i = 999999000; i <= 1000001000; i += 8)
        check_f32_both((float)i);
    /* m * 2^-k with m odd: the exact expansion ends in 5 at digit k after
     * the point; many of these are ties at the 10th significant digit. */
    for (int k = 1; k <= 149; k++)
        for (uint32_t m = 1; m < 4000; m += 2)
            check_f32_both(ldexpf((float)m, -k));
    for (long i = 0; i < 3000000; i++)
        check_f32(f32_of((uint32_t)rnd()));
    if (f32_mismatches)
        fail_msg("%ld float32 values print differently from snprintf", f32_mismatches);
}

static void test_print_f64_like_snprintf(void **state)
{
    (void)state;
    f64_mismatches = 0;
    for (uint64_t e = 0; e < 2047; e++) {
        static const uint64_t edge[] = {0, 1, 2, 0xfffffffffffffu, 0x8000000000000u};
        for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++)
            check_f64(f64_of(e << 52 | edge[i]));
        for (int i = 0; i < 100; i++)
            check_f64(f64_of(e << 52 | (rnd() & 0xfffffffffffffu)));
    }
    for (int k = -1074; k <= 1023; k++) {
        double p = ldexp(1.0, k);
        uint64_t u;
        memcpy(&u, &p, sizeof u);
        for (int d = -4; d <= 4; d++)
            check_f64(f64_of(u + (uint64_t)(int64_t)d));
    }
    for (int k = -323; k <= 308; k++) {
        char t[16];
        snprintf(t, sizeof t, "1e%d", k);
        double p = strtod(t, NULL);
        uint64_t u;
        memcpy(&u, &p, sizeof u);
        for (int d = -4; d <= 4; d++)
            check_f64(f64_of(u + (uint64_t)(int64_t)d));
    }
    for (int64_t i = 99999999999990000; i <= 100000000000010000; i += 7)
        check_f64((double)i);
    for (int k = 1; k <= 80; k++)
        for (uint64_t m = 1; m < 3000; m += 2)
            check_f64(-ldexp((double)m * 1e9 + 5, -k));
    /* The gradients and params of real sessions: |x| in [1e-12, 1e4],
     * and float32 values widened (a float64 session fed float32 data). */
    for (long i = 0; i < 600000; i++) {
        double x = (double)(int64_t)rnd() / 9.2e18 * pow(10, (double)(rnd() % 160) / 10 - 12);
        check_f64(x);
        check_f64((double)(float)x);
    }
    for (long i = 0; i < 600000; i++)
        check_f64(f64_of(rnd()));
    if (f64_mismatches)
        fail_msg("%ld float64 values print differently from snprintf", f64_mismatches);
}

static void test_buf_vector(void **state)
{
    (void)state;
    float f[] = {1.0f, -0.0f, NAN, 0.1f, INFINITY, 3.4028235e38f, 1e-45f, -123456.789f};
    api_buf b = {0};
    assert_int_equal(api_buf_vector(&b, OPTIM_F32, f, 8), 0);
    assert_string_equal(b.data, "[1,-0,null,0.100000001,null,3.40282347e+38,1.40129846e-45,"
                                "-123456.789]");
    b.len = 0;
    assert_int_equal(api_buf_vector(&b, OPTIM_F32, f, 0), 0);
    assert_string_equal(b.data, "[]");
    double d[] = {0.1, -INFINITY, 1e300, 5e-324, 12345678901234567.0};
    b.len = 0;
    assert_int_equal(api_buf_vector(&b, OPTIM_F64, d, 5), 0);
    assert_string_equal(b.data, "[0.10000000000000001,null,1.0000000000000001e+300,"
                                "4.9406564584124654e-324,12345678901234568]");
    /* Appends after what is there; a long vector equals the snprintf join. */
    size_t n = 100000;
    float *v = malloc(n * sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++)
        v[i] = f32_of((uint32_t)rnd());
    b.len = 0;
    assert_int_equal(api_buf_put(&b, "x=", 2), 0);
    assert_int_equal(api_buf_vector(&b, OPTIM_F32, v, n), 0);
    sbuf w = {0};
    sb_str(&w, "x=[");
    for (size_t i = 0; i < n; i++) {
        char t[40];
        if (isfinite(v[i]))
            snprintf(t, sizeof t, "%.9g%s", (double)v[i], i + 1 < n ? "," : "");
        else
            snprintf(t, sizeof t, "null%s", i + 1 < n ? "," : "");
        sb_str(&w, t);
    }
    sb_str(&w, "]");
    assert_int_equal(b.len, w.len);
    assert_string_equal(b.data, w.data);
    free(w.data);
    free(v);
    free(b.data);
}

/* Printed then decoded: the same bits (every finite float32 and float64
 * round-trips). */
static void test_round_trip(void **state)
{
    (void)state;
    size_t n = 50000;
    float *f = malloc(n * sizeof *f), *f2 = malloc(n * sizeof *f2);
    double *d = malloc(n * sizeof *d), *d2 = malloc(n * sizeof *d2);
    assert_true(f && f2 && d && d2);
    for (size_t i = 0; i < n; i++) {
        do
            f[i] = f32_of((uint32_t)rnd());
        while (!isfinite(f[i]));
        do
            d[i] = f64_of(rnd());
        while (!isfinite(d[i]));
    }
    for (int dt = 0; dt < 2; dt++) {
        api_buf b = {0};
        assert_int_equal(api_buf_put(&b, "{\"params\":", 10), 0);
        assert_int_equal(api_buf_vector(&b, dt ? OPTIM_F64 : OPTIM_F32, dt ? (void *)d : (void *)f,
                                        n),
                         0);
        assert_int_equal(api_buf_put(&b, "}", 1), 0);
        api_reply r = {0};
        assert_int_equal(api_decode_params_json(b.data, b.len, dt ? OPTIM_F64 : OPTIM_F32, n,
                                                dt ? (void *)d2 : (void *)f2, &r),
                         0);
        if (dt)
            assert_memory_equal(d, d2, n * sizeof *d);
        else
            assert_memory_equal(f, f2, n * sizeof *f);
        free(b.data);
    }
    free(f);
    free(f2);
    free(d);
    free(d2);
}

/* ------------------------------------------------------------ daemon */

static void test_daemon_duplicate_grad(void **state)
{
    (void)state;
    tapi_suite *s = tapi_suite_open(NULL);
    assert_non_null(s);
    tapi_create(s->c, "dup", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2,3]}",
                201);
    tapi_snap before = tapi_snapshot(s->c, "dup");
    optd_response r = tapi_req(s->c, "POST", "/v1/sessions/dup/step", NULL,
                               "{\"grad\":[1,1,1],\"grad\":[2,2,2]}");
    tapi_assert_problem(&r, 400, "grad");
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(s->c, "dup");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    /* A step in exotic spellings lands exactly like the plain one. */
    tapi_create(s->c, "plain", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2,3]}",
                201);
    r = tapi_req(s->c, "POST", "/v1/sessions/plain/step", NULL, "{\"grad\":[0.2,0,1]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    r = tapi_req(s->c, "POST", "/v1/sessions/dup/step", NULL,
                 "{ \"loss\":1,\n \"grad\" : [ 2E-1 , -0.0e5,\t1.000000000000000000000001 ] }");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    tapi_snap a = tapi_snapshot(s->c, "plain"), b = tapi_snapshot(s->c, "dup");
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.params, b.params, a.len);
    assert_memory_not_equal(a.params, before.params, a.len);
    tapi_snap_free(&a);
    tapi_snap_free(&b);
    tapi_snap_free(&before);
    assert_int_equal(tapi_suite_close(s), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_f32_matches_cjson),
        cmocka_unit_test(test_decode_f64_matches_cjson),
        cmocka_unit_test(test_decode_exact_values),
        cmocka_unit_test(test_decode_lenient_spellings_as_before),
        cmocka_unit_test(test_decode_errors_as_before),
        cmocka_unit_test(test_decode_truncated),
        cmocka_unit_test(test_decode_mutations),
        cmocka_unit_test(test_print_f32_like_snprintf),
        cmocka_unit_test(test_print_f64_like_snprintf),
        cmocka_unit_test(test_buf_vector),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_daemon_duplicate_grad),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
