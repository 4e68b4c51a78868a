/*
 * test_client_c_shard.c -- the C client's sharded sessions against three
 * real daemons: the client's gradient norm is the daemon's bit for bit;
 * Adam clipped by norm over three shards equals one session holding the
 * whole vector at every one of 100 steps, through a lost answer and two
 * shard daemons killed with SIGKILL and restarted, with nothing applied
 * twice; a layout is split on tensor boundaries with its groups restricted;
 * bad input is refused before anything is sent; update, set params and
 * delete reach every shard; sharded sessions made by
 * the Python client are stepped by this one and the other way round (the
 * suite runs /usr/bin/python3 with clients/python, from the repository
 * root).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

    /* docs/api.md's check values */
    enum { M = 100000 };
    static float h[M];
    for (uint64_t i = 0; i < M; i++)
        h[i] = (float)((double)((i * 2654435761u) % 4294967296u) / 4294967296.0 - 0.5);
    size_t one = M, two[2] = {30000, 70000};
    int fin;
    assert_true(optd_grad_norm_f32(h, &one, 1, 2.0, &fin) == 91.287529596558954);
    assert_true(optd_grad_norm_f32(h, two, 2, 2.0, &fin) == 91.287529596558969);
    assert_true(optd_grad_norm_f32(h, &one, 1, 1.0, &fin) == 25000.155304304324);
    assert_true(optd_grad_norm_f32(h, two, 2, INFINITY, &fin) == 0.5);

    g[7] = NAN;
    int finite = 1;
    size_t n = 10;
    (void)optd_grad_norm_f32(g, &n, 1, 2.0, &finite);
    assert_false(finite);
}

/* A sharded step on a thread of its own: the daemons are restarted from
 * the main thread (a daemon dies with the thread that started it). */
typedef struct {
    optd_sharded *sh;
    const float *g;
    size_t n;
    const char *key;
    float *out;
    long long step;
    optd_error e;
    int rc;
} step_job;

static void *step_main(void *arg)
{
    step_job *j = arg;
    j->rc = optd_sharded_step_f32(j->sh, j->g, j->n, NULL, j->key, j->out, &j->step, &j->e);
    return NULL;
}

#define ADAM_CLIP                                                                             \
    "\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"weight_decay\":0.01},"                   \
    "\"clip\":{\"type\":\"norm\",\"max_norm\":0.5}"

/* Three shards against one session: 100 steps bit for bit.  At step 30
 * shard 1 has already applied the step under its key (an answer lost on
 * the way back): it answers from the key.  At step 50 shard 1's daemon is
 * killed with SIGKILL and restarted 0.4 s later: the step retries shard 1
 * alone until it answers.  At step 60 (no retry window) shard 2's daemon
 * is killed: the step fails on shard 2 alone, a new step is
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
    assert_int_equal(optd_sharded_offset(sh, 1), N / 3); /* i * N / k */
    assert_int_equal(optd_sharded_offset(sh, 2), 2 * N / 3);

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
        if (step == 60) {
            optd_sharded_set_retry_for(sh, 0);
            assert_int_equal(tdaemon_kill9(&s->d[2]), 0);
        }
        int rc;
        if (step == 50) {
            /* killed mid-run and back 0.4 s later: the step retries shard
             * 1 alone until it answers */
            assert_int_equal(tdaemon_kill9(&s->d[1]), 0);
            step_job j = {sh, g, N, NULL, got, -1, {0}, -1};
            pthread_t th;
            assert_int_equal(pthread_create(&th, NULL, step_main, &j), 0);
            struct timespec ts = {0, 400 * 1000000L};
            nanosleep(&ts, NULL);
            assert_int_equal(tdaemon_restart(&s->d[1]), 0);
            pthread_join(th, NULL);
            rc = j.rc;
            st = j.step;
            e = j.e;
        } else {
            rc = optd_sharded_step_f32(sh, g, N, NULL, key, got, &st, &e);
        }
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
 * norm_type inf (the norm of per-tensor blocks), with client-driven group
 * lrs too. */
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
    const cJSON *place = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(j, "metadata"), OPTD_SHARD_META);
    assert_true(tapi_num(place, "index") == 1 && tapi_num(place, "count") == K);
    assert_true(tapi_num(place, "offset") == 10000 && tapi_num(place, "size") == N);
    assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(place, "layout")));
    const cJSON *held = cJSON_GetObjectItemCaseSensitive(place, "groups");
    assert_int_equal(cJSON_GetArraySize(held), 2);
    assert_true(cJSON_GetArrayItem(held, 0)->valuedouble == 0 &&
                cJSON_GetArrayItem(held, 1)->valuedouble == 1);
    cJSON_Delete(j);

    /* from step 11 on, client-driven group lrs: each shard is sent its
     * groups' values (shard 0 holds group 0 only) */
    const double lrs[2] = {0.005, 0.03};
    optd_step_opts o = optd_step_opts_default();
    o.worker = "w7";
    for (int step = 1; step <= 20; step++) {
        fill(g, N, 9, (uint64_t)step, 2.0);
        if (step == 11) {
            o.n_groups = 2;
            o.group_lr = lrs;
        }
        assert_int_equal(
            optd_step_f32_opts(s->c[0], "lref", g, N, NULL, &o, want, NULL, NULL, &e), 0);
        long long st;
        if (optd_sharded_step_f32_opts(sh, g, N, NULL, &o, got, &st, &e))
            fail_msg("layout step %d: %d %s", step, e.status, e.detail);
        assert_same_bits(got, want, N, "layout params", step);
    }
    /* the whole model's groups, or nothing */
    o.n_groups = 1;
    assert_int_equal(optd_sharded_step_f32_opts(sh, g, N, NULL, &o, got, NULL, &e), -1);
    assert_string_equal(e.field, "groups");
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

/* Update, set params and delete act on every shard; a clip switched to
 * norm mid-run makes later steps carry the whole vector's norm.  The three
 * shards share one daemon here (three clients: one per thread). */
static void test_update_params_delete(void **state)
{
    suite *s = *state;
    enum { N = 9000 };
    static float p0[N], g[N], want[N], got[N];
    optd_client *cs[K];
    for (int i = 0; i < K; i++)
        assert_non_null(cs[i] = optd_client_new(tdaemon_url(&s->d[0]), NULL));
    fill(p0, N, 13, 0, 1.0);
    char *params = json_floats(p0, N);
    size_t cap = strlen(params) + 256;
    char *body = malloc(cap);
    snprintf(body, cap, "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"params\":%s}", params);
    free(params);
    optd_error e;
    assert_int_equal(optd_create_session(cs[0], "uref", body, &e), 1);
    optd_sharded *sh = optd_sharded_create(cs, K, "u", body, &e);
    free(body);
    if (!sh)
        fail_msg("create u: %d %s", e.status, e.detail);
    const char *clip = "{\"clip\":{\"type\":\"norm\",\"max_norm\":0.1,\"norm_type\":1}}";
    for (int step = 1; step <= 5; step++) {
        if (step == 2) {
            assert_int_equal(optd_update(cs[0], "uref", clip, &e), 0);
            if (optd_sharded_update(sh, clip, &e))
                fail_msg("update: %d %s", e.status, e.detail);
        }
        if (step == 4) {
            fill(p0, N, 13, 100, 1.0);
            assert_int_equal(optd_set_params_f32(cs[0], "uref", p0, N, &e), 0);
            assert_int_equal(optd_sharded_set_params_f32(sh, p0, N, &e), 0);
            assert_int_equal(optd_sharded_params_f32(sh, got, N, NULL, &e), 0);
            assert_same_bits(got, p0, N, "params set", step);
        }
        fill(g, N, 13, (uint64_t)step, 2.0);
        assert_int_equal(optd_step_f32(cs[0], "uref", g, N, NULL, want, NULL, &e), 0);
        if (optd_sharded_step_f32(sh, g, N, NULL, NULL, got, NULL, &e))
            fail_msg("step %d: %d %s", step, e.status, e.detail);
        assert_same_bits(got, want, N, "updated, set, stepped", step);
    }
    assert_int_equal(optd_sharded_update(sh, "{\"metadata\":{\"a\":1}}", &e), -1);
    assert_string_equal(e.field, "metadata");
    assert_int_equal(optd_sharded_delete(sh, &e), 0);
    for (int i = 0; i < K; i++) {
        char name[32];
        snprintf(name, sizeof name, "u.shard%d", i);
        assert_null(optd_get_session(cs[0], name, &e));
        assert_int_equal(e.status, 404);
    }
    optd_sharded_free(sh);
    for (int i = 0; i < K; i++)
        optd_client_free(cs[i]);
}

/* g(t, i) = (((7t + 13i) mod 17) - 8) / 8: exact in every language. */
static void cross_grad(float *g, size_t n, int t)
{
    for (size_t i = 0; i < n; i++)
        g[i] = (float)((double)((7 * (size_t)t + 13 * i) % 17) - 8.0) / 8.0f;
}

/* Runs /usr/bin/python3 with clients/python importable (from the
 * repository root, as tests/run.sh runs the suites) and the script;
 * returns its stdout (caller frees). */
static char *run_python(const char *script)
{
    char tmpl[] = "/tmp/optd-shard-py.XXXXXX";
    int fd = mkstemp(tmpl);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs(script, f);
    fclose(f);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "PYTHONPATH=clients/python /usr/bin/python3 %s", tmpl);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 20, len = 0;
    char *out = malloc(cap);
    size_t k;
    while ((k = fread(out + len, 1, cap - 1 - len, p)) > 0)
        len += k;
    out[len] = '\0';
    int st = pclose(p);
    unlink(tmpl);
    if (st != 0)
        fail_msg("python3 %s exited with %d: %s", tmpl, st, out);
    return out;
}

#define CROSS_LAYOUT                                                                          \
    "\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},"                                         \
    "\"clip\":{\"type\":\"norm\",\"max_norm\":0.5},"                                          \
    "\"tensors\":[{\"name\":\"a\",\"shape\":[5000]},{\"name\":\"b\",\"shape\":[3000]},"       \
    "{\"name\":\"c\",\"shape\":[2000]},{\"name\":\"d\",\"shape\":[100]}],"                    \
    "\"groups\":[{\"tensors\":[\"a\",\"c\"]},{\"tensors\":[\"b\",\"d\"],\"lr\":0.02}]"

/* The Python client's sharded sessions and this one's are the same thing:
 * a session Python made and stepped, C steps on; one C made and stepped,
 * Python steps on; both equal a single session bit for bit. */
static void test_python_compatible(void **state)
{
    suite *s = *state;
    enum { N = 10100 };
    static float p0[N], g[N], want[N], got[N];
    cross_grad(p0, N, 0);
    char *params = json_floats(p0, N);
    size_t cap = strlen(params) + 1024;
    char *body = malloc(cap);
    snprintf(body, cap, "{" CROSS_LAYOUT ",\"params\":%s}", params);
    free(params);
    optd_error e;
    if (optd_create_session(s->c[0], "xref", body, &e) != 1)
        fail_msg("create xref: %d %s", e.status, e.detail);

    char script[4096];
    snprintf(script, sizeof script,
             "import numpy as np, optd\n"
             "def grad(t):\n"
             "    i = np.arange(%d, dtype=np.int64)\n"
             "    return ((((7 * t + 13 * i) %% 17) - 8) / 8).astype(np.float32)\n"
             "urls = ['%s', '%s', '%s']\n"
             "sh = optd.ShardedSession.create(urls, 'bypy', {'type': 'adam', 'lr': 0.01},\n"
             "    params=grad(0), clip={'type': 'norm', 'max_norm': 0.5},\n"
             "    tensors=[('a', [5000]), ('b', [3000]), ('c', [2000]), ('d', [100])],\n"
             "    groups=[{'tensors': ['a', 'c']}, {'tensors': ['b', 'd'], 'lr': 0.02}])\n"
             "for t in (1, 2, 3):\n"
             "    sh.step(grad(t))\n"
             "print(sh.last_step)\n",
             N, tdaemon_url(&s->d[0]), tdaemon_url(&s->d[1]), tdaemon_url(&s->d[2]));
    char *out = run_python(script);
    assert_string_equal(out, "3\n");
    free(out);

    optd_sharded *sh = optd_sharded_open(s->c, K, "bypy", &e);
    if (!sh)
        fail_msg("open bypy: %d %s", e.status, e.detail);
    for (int t = 1; t <= 6; t++) {
        cross_grad(g, N, t);
        assert_int_equal(optd_step_f32(s->c[0], "xref", g, N, NULL, want, NULL, &e), 0);
        if (t <= 3)
            continue;
        long long st;
        if (optd_sharded_step_f32(sh, g, N, NULL, NULL, got, &st, &e))
            fail_msg("bypy step %d: %d %s", t, e.status, e.detail);
        assert_int_equal(st, t);
        assert_same_bits(got, want, N, "made by Python, stepped by C", t);
    }
    optd_sharded_free(sh);

    /* made by C at the reference's params (step 6), stepped by Python;
     * a fresh Adam from these params is a second reference session */
    free(body);
    params = json_floats(want, N);
    cap = strlen(params) + 1024;
    body = malloc(cap);
    snprintf(body, cap, "{" CROSS_LAYOUT ",\"params\":%s}", params);
    free(params);
    sh = optd_sharded_create(s->c, K, "byc", body, &e);
    if (!sh)
        fail_msg("create byc: %d %s", e.status, e.detail);
    optd_sharded_free(sh);
    assert_int_equal(optd_create_session(s->c[0], "xref2", body, &e), 1);
    free(body);
    cross_grad(g, N, 7);
    assert_int_equal(optd_step_f32(s->c[0], "xref2", g, N, NULL, want, NULL, &e), 0);
    snprintf(script, sizeof script,
             "import numpy as np, optd, sys\n"
             "i = np.arange(%d, dtype=np.int64)\n"
             "g = ((((7 * 7 + 13 * i) %% 17) - 8) / 8).astype(np.float32)\n"
             "sh = optd.ShardedSession.open(['%s', '%s', '%s'], 'byc')\n"
             "p = sh.step(g)\n"
             "sys.stdout.write(np.asarray(p, dtype='<f4').tobytes().hex())\n",
             N, tdaemon_url(&s->d[0]), tdaemon_url(&s->d[1]), tdaemon_url(&s->d[2]));
    out = run_python(script);
    assert_int_equal(strlen(out), N * 8);
    for (size_t i = 0; i < N; i++) {
        unsigned char b[4];
        for (int k = 0; k < 4; k++)
            sscanf(out + 8 * i + 2 * k, "%2hhx", &b[k]);
        memcpy(&got[i], b, 4);
    }
    free(out);
    assert_same_bits(got, want, N, "made by C, stepped by Python", 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_norm_is_the_daemons),
        cmocka_unit_test(test_sharded_matches_single),
        cmocka_unit_test(test_layout_split),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_update_params_delete),
        cmocka_unit_test(test_python_compatible),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
