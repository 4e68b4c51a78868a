/*
 * test_client_c_shard.c -- the C client's sharded sessions against three
 * real daemons: the client's gradient norm is the daemon's bit for bit;
 * Adam clipped by norm over three shards equals one session holding the
 * whole vector at every one of 100 steps, through a lost answer and a
 * shard's daemon killed with SIGKILL and restarted, with nothing applied
 * twice; a layout is split on tensor boundaries with its groups restricted;
 * bad input is refused before anything is sent.
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

#include <cjson/cJSON.h>

#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"
#include "tests/support/gen.h"

#define K 3

typedef struct {
    tdaemon d[K];
    optd_client *c[K];
} suite;

static int suite_setup(void **state)
{
    suite *s = calloc(1, sizeof *s);
    *state = NULL;
    if (!s)
        return -1;
    for (int i = 0; i < K; i++) {
        if (tdaemon_start(&s->d[i], NULL, NULL) != 0)
            return -1;
        if (!(s->c[i] = optd_client_new(tdaemon_url(&s->d[i]), NULL)))
            return -1;
        /* a dead daemon is given up on quickly */
        optd_client_set_retry(s->c[i], 3, 10, 40);
    }
    *state = s;
    return 0;
}

static int suite_teardown(void **state)
{
    suite *s = *state;
    if (!s)
        return -1;
    int rc = 0;
    for (int i = 0; i < K; i++) {
        optd_client_free(s->c[i]);
        if (tdaemon_stop(&s->d[i]) != 0)
            rc = -1;
        tdaemon_cleanup(&s->d[i]);
    }
    free(s);
    return rc;
}

static void fill(float *g, size_t n, uint64_t seed, uint64_t stream, double scale)
{
    tgen_fill(OPTIM_F32, g, n, seed, stream, scale);
}

static void assert_same_bits(const float *got, const float *want, size_t n, const char *what,
                             int step)
{
    if (memcmp(got, want, n * sizeof *got) == 0)
        return;
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof *got))
            fail_msg("%s, step %d: [%zu] = %.9g, want %.9g", what, step, i, got[i], want[i]);
}

/* "[0.25,-1,...]" with every float exact. */
static char *json_floats(const float *v, size_t n)
{
    char *b = malloc(n * 20 + 4), *p = b;
    assert_non_null(b);
    *p++ = '[';
    for (size_t i = 0; i < n; i++)
        p += sprintf(p, "%s%.9g", i ? "," : "", v[i]);
    strcpy(p, "]");
    return b;
}

/* A member of a session's document, as a number. */
static double doc_num(optd_client *c, const char *name, const char *outer, const char *member)
{
    optd_error e;
    char *doc = optd_get_session(c, name, &e);
    if (!doc)
        fail_msg("GET %s: %d %s", name, e.status, e.detail);
    cJSON *j = cJSON_Parse(doc);
    free(doc);
    const cJSON *o = outer ? cJSON_GetObjectItemCaseSensitive(j, outer) : j;
    double v = tapi_num(o, member);
    cJSON_Delete(j);
    return v;
}

/* The grad_norm the daemon logged with step 1 of session name. */
static double logged_norm(optd_client *c, const char *name)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/sessions/%s/history", name);
    optd_response r = tapi_req(c, "GET", path, NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    const cJSON *st = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(j, "steps"), 0);
    double v = tapi_num(st, "grad_norm");
    cJSON_Delete(j);
    optd_response_free(&r);
    return v;
}

static void test_norm_is_the_daemons(void **state)
{
    suite *s = *state;
    enum { N = 3 * 8192 + 1000 };
    static float p0[N], g[N];
    static const struct {
        const char *name, *norm_type, *tensors;
        size_t sizes[3], n_sizes;
        double nt;
    } cases[] = {
        {"cn2", "2", NULL, {N}, 1, 2.0},
        {"cn1", "1", NULL, {N}, 1, 1.0},
        {"cninf", "\"inf\"", NULL, {N}, 1, INFINITY},
        {"cnlay", "2",
         "[{\"name\":\"a\",\"shape\":[100,90]},{\"name\":\"b\",\"shape\":[5]},"
         "{\"name\":\"c\",\"shape\":[16571]}]",
         {9000, 5, N - 9005}, 3, 2.0},
    };
    char *params = json_floats(p0, N);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        size_t cap = strlen(params) + 512;
        char *body = malloc(cap);
        snprintf(body, cap,
                 "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.01},\"params\":%s,"
                 "\"clip\":{\"type\":\"norm\",\"max_norm\":1,\"norm_type\":%s}%s%s}",
                 params, cases[k].norm_type, cases[k].tensors ? ",\"tensors\":" : "",
                 cases[k].tensors ? cases[k].tensors : "");
        optd_error e;
        if (optd_create_session(s->c[0], cases[k].name, body, &e) != 1)
            fail_msg("create %s: %d %s", cases[k].name, e.status, e.detail);
        free(body);
        fill(g, N, 21, k + 1, 4.0);
        assert_int_equal(optd_step_f32(s->c[0], cases[k].name, g, N, NULL, NULL, NULL, &e), 0);
        int finite = 0;
        double mine = optd_grad_norm_f32(g, cases[k].sizes, cases[k].n_sizes, cases[k].nt, &finite);
        double theirs = logged_norm(s->c[0], cases[k].name);
        assert_true(finite);
        if (memcmp(&mine, &theirs, sizeof mine))
            fail_msg("%s: client norm %.17g, daemon's %.17g", cases[k].name, mine, theirs);
    }
    free(params);
    g[7] = NAN;
    int finite = 1;
    size_t n = 10;
    (void)optd_grad_norm_f32(g, &n, 1, 2.0, &finite);
    assert_false(finite);
}

#define ADAM_CLIP                                                                             \
    "\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"weight_decay\":0.01},"                   \
    "\"clip\":{\"type\":\"norm\",\"max_norm\":0.5}"

/* Three shards against one session: 100 steps bit for bit.  At step 30
 * shard 1 has already applied the step under its key (an answer lost on
 * the way back): it answers from the key.  At step 60 shard 2's daemon is
 * killed with SIGKILL: the step fails on shard 2 alone, a new step is
 * refused, the daemon restarts on its database and the step finished with
 * its key reaches shard 2 only.  Every shard ends with 100 updates. */
static void test_sharded_matches_single(void **state)
{
    suite *s = *state;
    enum { N = 2 * 8192 + 3001 };
    static float p0[N], g[N], want[N], got[N];
    fill(p0, N, 5, 0, 1.0);
    char *params = json_floats(p0, N);
    size_t cap = strlen(params) + 256;
    char *body = malloc(cap);
    snprintf(body, cap, "{" ADAM_CLIP ",\"params\":%s}", params);
    optd_error e;
    if (optd_create_session(s->c[0], "ref", body, &e) != 1)
        fail_msg("create ref: %d %s", e.status, e.detail);
    optd_sharded *sh = optd_sharded_create(s->c, K, "m", body, &e);
    if (!sh)
        fail_msg("create m: %d %s", e.status, e.detail);
    free(body);
    free(params);
    assert_int_equal(optd_sharded_size(sh), N);
    assert_int_equal(optd_sharded_offset(sh, 1), N / 3 + 1); /* 19385 % 3 == 2 */
    assert_int_equal(optd_sharded_offset(sh, 2), 2 * (N / 3) + 2);

    for (int step = 1; step <= 100; step++) {
        fill(g, N, 5, (uint64_t)step, 2.0);
        long long st = -1;
        assert_int_equal(optd_step_f32(s->c[0], "ref", g, N, NULL, want, NULL, &e), 0);
        const char *key = NULL;
        char k30[33];
        if (step == 30) {
            /* shard 1 gets its part under the step's derived key first */
            assert_int_equal(optd_new_idempotency_key(k30), 0);
            key = k30;
            int fin;
            size_t n = N;
            double norm = optd_grad_norm_f32(g, &n, 1, 2.0, &fin);
            char k1[40];
            snprintf(k1, sizeof k1, "%s.1", k30);
            optd_step_opts o = optd_step_opts_default();
            o.idempotency_key = k1;
            o.grad_norm = &norm;
            size_t off = optd_sharded_offset(sh, 1), len = optd_sharded_offset(sh, 2) - off;
            assert_int_equal(optd_step_f32_opts(s->c[1], "m.shard1", g + off, len, NULL, &o, NULL,
                                                &st, NULL, &e),
                             0);
            assert_int_equal(st, 30);
        }
        if (step == 60)
            assert_int_equal(tdaemon_kill9(&s->d[2]), 0);
        int rc = optd_sharded_step_f32(sh, g, N, NULL, key, got, &st, &e);
        if (step == 60) {
            assert_int_equal(rc, -1);
            assert_int_equal(e.status, 0); /* no answer from shard 2 */
            const char *pk = optd_sharded_pending_key(sh);
            assert_non_null(pk);
            char pending[64];
            snprintf(pending, sizeof pending, "%s", pk);
            assert_true(optd_sharded_shard_done(sh, 0) && optd_sharded_shard_done(sh, 1));
            assert_false(optd_sharded_shard_done(sh, 2));
            /* another step may not start before this one is finished */
            assert_int_equal(optd_sharded_step_f32(sh, g, N, NULL, NULL, got, &st, &e), -1);
            assert_string_equal(e.field, "Idempotency-Key");
            assert_int_equal(tdaemon_restart(&s->d[2]), 0);
            rc = optd_sharded_step_f32(sh, g, N, NULL, pending, got, &st, &e);
            assert_null(optd_sharded_pending_key(sh));
        }
        if (rc != 0)
            fail_msg("step %d: %d %s", step, e.status, e.detail);
        assert_int_equal(st, step);
        assert_same_bits(got, want, N, "sharded params", step);
    }
    optd_sharded_free(sh);

    /* A handle opened from the daemons alone: same params, 100 updates on
     * every shard, none applied twice. */
    optd_client *fresh[K];
    for (int i = 0; i < K; i++)
        fresh[i] = optd_client_new(tdaemon_url(&s->d[i]), NULL);
    sh = optd_sharded_open(fresh, K, "m", &e);
    if (!sh)
        fail_msg("open m: %d %s", e.status, e.detail);
    long long steps[K];
    assert_int_equal(optd_sharded_params_f32(sh, got, N, steps, &e), 0);
    assert_same_bits(got, want, N, "params", 100);
    for (int i = 0; i < K; i++) {
        char name[32];
        snprintf(name, sizeof name, "m.shard%d", i);
        assert_int_equal(steps[i], 100);
        assert_true(doc_num(fresh[i], name, "counters", "applied") == 100);
    }
    optd_sharded_free(sh);
    for (int i = 0; i < K; i++)
        optd_client_free(fresh[i]);
}

/* A layout is split on tensor boundaries; each shard gets its tensors and
 * the groups restricted to them; the run equals the single session's with
 * norm_type inf (the norm of per-tensor blocks). */
static void test_layout_split(void **state)
{
    suite *s = *state;
    enum { N = 10000 + 100 + 9000 + 10 + 3000 };
    static float p0[N], g[N], want[N], got[N];
    fill(p0, N, 9, 0, 1.0);
    char *params = json_floats(p0, N);
    size_t cap = strlen(params) + 1024;
    char *body = malloc(cap);
    snprintf(body, cap,
             "{\"optimizer\":{\"type\":\"adamw\",\"lr\":0.01},"
             "\"clip\":{\"type\":\"norm\",\"max_norm\":0.1,\"norm_type\":\"inf\"},"
             "\"tensors\":[{\"name\":\"w1\",\"shape\":[100,100]},{\"name\":\"b1\",\"shape\":[100]},"
             "{\"name\":\"w2\",\"shape\":[9000]},{\"name\":\"b2\",\"shape\":[10]},"
             "{\"name\":\"w3\",\"shape\":[3000]}],"
             "\"groups\":[{\"tensors\":[\"w1\",\"w2\",\"w3\"]},"
             "{\"tensors\":[\"b1\",\"b2\"],\"weight_decay\":0,\"lr\":0.02}],"
             "\"params\":%s}",
             params);
    optd_error e;
    if (optd_create_session(s->c[0], "lref", body, &e) != 1)
        fail_msg("create lref: %d %s", e.status, e.detail);
    optd_sharded *sh = optd_sharded_create(s->c, K, "lay", body, &e);
    if (!sh)
        fail_msg("create lay: %d %s", e.status, e.detail);
    free(body);
    free(params);
    assert_int_equal(optd_sharded_offset(sh, 1), 10000);
    assert_int_equal(optd_sharded_offset(sh, 2), 19100);
    assert_int_equal(optd_sharded_offset(sh, 3), N);

    char *doc = optd_get_session(s->c[1], "lay.shard1", &e);
    assert_non_null(doc);
    cJSON *j = cJSON_Parse(doc);
    free(doc);
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(j, "tensors");
    const cJSON *gs = cJSON_GetObjectItemCaseSensitive(j, "groups");
    assert_int_equal(cJSON_GetArraySize(ts), 2);
    assert_string_equal(tapi_str(cJSON_GetArrayItem(ts, 0), "name"), "b1");
    assert_int_equal(cJSON_GetArraySize(gs), 2);
    const cJSON *g0 = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(gs, 0), "tensors");
    assert_int_equal(cJSON_GetArraySize(g0), 1);
    assert_string_equal(cJSON_GetArrayItem(g0, 0)->valuestring, "w2");
    cJSON_Delete(j);

    for (int step = 1; step <= 20; step++) {
        fill(g, N, 9, (uint64_t)step, 2.0);
        assert_int_equal(optd_step_f32(s->c[0], "lref", g, N, NULL, want, NULL, &e), 0);
        long long st;
        if (optd_sharded_step_f32(sh, g, N, NULL, NULL, got, &st, &e))
            fail_msg("layout step %d: %d %s", step, e.status, e.detail);
        assert_same_bits(got, want, N, "layout params", step);
    }
    optd_sharded_free(sh);
}

/* Bad input: refused by the client before anything reaches a daemon. */
static void test_bad_input(void **state)
{
    suite *s = *state;
    optd_error e;
    const char *seeded = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":30,"
                         "\"init\":{\"type\":\"normal\",\"std\":1,\"seed\":3}}";
    assert_null(optd_sharded_create(s->c, K, "bad", seeded, &e));
    assert_string_equal(e.field, "init");
    const char *two = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},"
                      "\"tensors\":[{\"name\":\"a\",\"shape\":[3]},{\"name\":\"b\",\"shape\":[2]}]}";
    assert_null(optd_sharded_create(s->c, K, "bad", two, &e));
    assert_string_equal(e.field, "tensors");
    /* nothing was created */
    char *doc = optd_get_session(s->c[0], "bad.shard0", &e);
    assert_null(doc);
    assert_int_equal(e.status, 404);

    const char *zeros = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":10,"
                        "\"init\":{\"type\":\"zeros\"},\"clip\":{\"type\":\"norm\",\"max_norm\":1}}";
    optd_sharded *sh = optd_sharded_create(s->c, K, "z", zeros, &e);
    if (!sh)
        fail_msg("create z: %d %s", e.status, e.detail);
    float g[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, INFINITY};
    long long steps[K];
    float p[10];
    assert_int_equal(optd_sharded_step_f32(sh, g, 10, NULL, NULL, p, NULL, &e), -1);
    assert_string_equal(e.field, "grad");
    assert_null(optd_sharded_pending_key(sh));
    assert_int_equal(optd_sharded_step_f32(sh, g, 9, NULL, NULL, p, NULL, &e), -1);
    assert_string_equal(e.field, "grad");
    double gd[10] = {0};
    assert_int_equal(optd_sharded_step_f64(sh, gd, 10, NULL, NULL, NULL, NULL, &e), -1);
    assert_string_equal(e.field, "dtype");
    assert_int_equal(optd_sharded_params_f32(sh, p, 10, steps, &e), 0);
    for (int i = 0; i < K; i++)
        assert_int_equal(steps[i], 0);
    for (int i = 0; i < 10; i++)
        assert_true(p[i] == 0);
    g[9] = 10;
    long long st;
    assert_int_equal(optd_sharded_step_f32(sh, g, 10, NULL, NULL, p, &st, &e), 0);
    assert_int_equal(st, 1);
    optd_sharded_free(sh);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_norm_is_the_daemons),
        cmocka_unit_test(test_sharded_matches_single),
        cmocka_unit_test(test_layout_split),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
