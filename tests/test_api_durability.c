/*
 * test_api_durability.c -- what survives the daemon: a clean restart keeps
 * every session bit for bit (and its idempotency keys); kill -9 at random
 * moments under a stream of steps loses no acknowledged step, applies a
 * retried key exactly once, replays the log bit-identically to an
 * uninterrupted run, and leaves PRAGMA integrity_check = ok.
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

#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

static unsigned seed;      /* advanced by rand_r */
static unsigned seed0;     /* as given, to repeat a run */

static cJSON *get_session(optd_client *c, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(c, "GET", path, NULL, NULL);
    if (r.status != 200)
        fail_msg("GET %s: %d %.*s", path, r.status, (int)r.len, r.body);
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    return j;
}

/* The members of GET session that a restart must not change. */
static void assert_same_session(const cJSON *a, const cJSON *b)
{
    static const char *const keys[] = {"name", "dtype",    "size", "step", "lr",
                                       "optimizer", "schedule", "clip", "mode", "metadata"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(a, keys[i]);
        const cJSON *y = cJSON_GetObjectItemCaseSensitive(b, keys[i]);
        if (!x || !y || !cJSON_Compare(x, y, 1)) {
            char *sx = x ? cJSON_PrintUnformatted(x) : NULL;
            char *sy = y ? cJSON_PrintUnformatted(y) : NULL;
            fail_msg("\"%s\" changed across the restart: %s -> %s", keys[i], sx ? sx : "(none)",
                     sy ? sy : "(none)");
        }
    }
}

static void grad_f32(int i, float *g, size_t n)
{
    for (size_t j = 0; j < n; j++)
        g[j] = (float)(cos(i * 3.0 + (double)j * 0.5) + 0.01 * i);
}

static void grad_f64(int i, double *g, size_t n)
{
    /* distinct for every step, so a doubled step shows in the params */
    for (size_t j = 0; j < n; j++)
        g[j] = sin(i * 7.0 + (double)j) + (i + 1) * 1e-3;
}

static void step_ok_f32(optd_client *c, const char *name, int i, size_t n, long long want_step)
{
    float g[64];
    grad_f32(i, g, n);
    long long step = -1;
    optd_error e;
    if (optd_step_f32(c, name, g, n, NULL, NULL, &step, &e) != 0)
        fail_msg("step %s #%d: %d %s", name, i, e.status, e.detail);
    assert_int_equal(step, want_step);
}

/* ------------------------------------------------------------ restart */

static const char *const ADAM_CFG =
    "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"amsgrad\":true},\"size\":64,"
    "\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":11},"
    "\"schedule\":{\"type\":\"cosine\",\"T_max\":30},\"metadata\":{\"owner\":\"t\"}}";

static void test_restart_keeps_everything(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    tapi_create(c, "r-sgd",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1,\"momentum\":0.9},\"params\":[1,2,3],"
                "\"dtype\":\"float64\"}",
                201);
    tapi_create(c, "r-adam", ADAM_CFG, 201);
    tapi_create(c, "r-empty", "{\"optimizer\":{\"type\":\"rmsprop\"},\"params\":[4,5]}", 201);
    for (int i = 0; i < 10; i++) {
        step_ok_f32(c, "r-adam", i, 64, i + 1);
        double g[3];
        grad_f64(i, g, 3);
        long long st;
        optd_error e;
        assert_int_equal(optd_step_f64(c, "r-sgd", g, 3, NULL, NULL, &st, &e), 0);
    }
    /* one keyed step, to replay after the restart */
    const char *hk[] = {"Idempotency-Key: before-restart-1", NULL};
    optd_response r = tapi_req(c, "POST", "/v1/sessions/r-sgd/step", hk, "{\"grad\":[1,1,1]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);

    const char *names[] = {"r-sgd", "r-adam", "r-empty"};
    tapi_snap before[3];
    cJSON *sess_before[3];
    for (int k = 0; k < 3; k++) {
        before[k] = tapi_snapshot(c, names[k]);
        sess_before[k] = get_session(c, names[k]);
    }
    assert_int_equal(before[0].session_step, 11);

    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    optd_client_free(c);
    c = tapi_client(tdaemon_url(&d), NULL, false);

    for (int k = 0; k < 3; k++) {
        tapi_snap after = tapi_snapshot(c, names[k]);
        tapi_assert_same(&before[k], &after);
        tapi_snap_free(&after);
        cJSON *sa = get_session(c, names[k]);
        assert_same_session(sess_before[k], sa);
        cJSON_Delete(sa);
        cJSON_Delete(sess_before[k]);
    }

    /* The key survived: a replay, nothing applied. */
    r = tapi_req(c, "POST", "/v1/sessions/r-sgd/step", hk, "{\"grad\":[1,1,1]}");
    assert_int_equal(r.status, 200);
    const char *rep = optd_response_header(&r, "Optd-Replayed");
    if (!rep || strcmp(rep, "true") != 0)
        fail_msg("an idempotency key recorded before a restart did not replay after it");
    optd_response_free(&r);
    tapi_snap again = tapi_snapshot(c, "r-sgd");
    tapi_assert_same(&before[0], &again);
    tapi_snap_free(&again);

    /* Continuing after the restart equals a run that never stopped. */
    for (int i = 10; i < 20; i++)
        step_ok_f32(c, "r-adam", i, 64, i + 1);
    tapi_create(c, "r-adam-ref", ADAM_CFG, 201);
    for (int i = 0; i < 20; i++)
        step_ok_f32(c, "r-adam-ref", i, 64, i + 1);
    tapi_snap x = tapi_snapshot(c, "r-adam"), y = tapi_snapshot(c, "r-adam-ref");
    tapi_assert_same(&x, &y);
    tapi_snap_free(&x);
    tapi_snap_free(&y);

    for (int k = 0; k < 3; k++)
        tapi_snap_free(&before[k]);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

/* -------------------------------------------------------------- crash */

enum { N_SGD = 8, N_ADAM = 8, MAX_OPS = 100000, ROUNDS = 24 };
static const double SGD_LR = 0.01;

static const char *const CRASH_SGD_CFG =
    "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.01},\"params\":[1,2,3,4,5,6,7,8],"
    "\"dtype\":\"float64\"}";
static const char *const CRASH_ADAM_CFG =
    "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.05},\"size\":8,"
    "\"init\":{\"type\":\"uniform\",\"low\":-1,\"high\":1,\"seed\":3},"
    "\"schedule\":{\"type\":\"step\",\"step_size\":7,\"gamma\":0.5}}";

/* Operation k goes to lane k % 2 (0: SGD float64, 1: Adam float32) as that
 * lane's step number k / 2 + 1, with its own idempotency key. */
typedef struct {
    char url[64];
    int next;                    /* first operation not yet acknowledged  */
    int violations;              /* answers with an unexpected step       */
    char (*keys)[33];
} streamer;

static int op_step(optd_client *c, const streamer *s, int k, long long *step, int *replayed,
                   optd_error *e)
{
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = s->keys[k];
    int i = k / 2;
    if (k % 2 == 0) {
        double g[N_SGD];
        grad_f64(i, g, N_SGD);
        return optd_step_f64_opts(c, "c-sgd", g, N_SGD, NULL, &o, NULL, step, replayed, e);
    }
    float g[N_ADAM];
    grad_f32(i, g, N_ADAM);
    return optd_step_f32_opts(c, "c-adam", g, N_ADAM, NULL, &o, NULL, step, replayed, e);
}

/* Streams operations until one fails (the daemon died).  No cmocka
 * asserts here: they are not thread-safe; violations are counted. */
static void *stream_main(void *arg)
{
    streamer *s = arg;
    optd_client *c = optd_client_new(s->url, NULL);
    if (!c)
        return NULL;
    optd_client_set_retry(c, 1, 0, 0);
    optd_client_set_timeouts(c, 2000, 10000);
    while (s->next < MAX_OPS) {
        long long step = -1;
        int rep = 0;
        optd_error e;
        if (op_step(c, s, s->next, &step, &rep, &e) != 0)
            break;
        if (step != s->next / 2 + 1 || rep)
            s->violations++;
        s->next++;
    }
    optd_client_free(c);
    return NULL;
}

static void sgd_expected(int steps, double *p)
{
    for (int j = 0; j < N_SGD; j++)
        p[j] = j + 1;
    double g[N_SGD];
    for (int i = 0; i < steps; i++) {
        grad_f64(i, g, N_SGD);
        for (int j = 0; j < N_SGD; j++)
            p[j] = p[j] - SGD_LR * g[j];
    }
}

static void assert_sgd_params(optd_client *c, int steps)
{
    double want[N_SGD], got[N_SGD];
    sgd_expected(steps, want);
    long long st;
    optd_error e;
    if (optd_get_params_f64(c, "c-sgd", got, N_SGD, &st, &e) != 0)
        fail_msg("GET c-sgd params: %d %s", e.status, e.detail);
    assert_int_equal(st, steps);
    for (int j = 0; j < N_SGD; j++)
        if (fabs(got[j] - want[j]) > 1e-9)
            fail_msg("c-sgd[%d] after %d steps: %.17g, expected %.17g (a step lost or doubled)",
                     j, steps, got[j], want[j]);
}

static long long session_step(optd_client *c, const char *name)
{
    cJSON *j = get_session(c, name);
    long long s = (long long)tapi_num(j, "step");
    cJSON_Delete(j);
    return s;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000L};
    nanosleep(&ts, NULL);
}

static void test_crash_kill9(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    tapi_create(c, "c-sgd", CRASH_SGD_CFG, 201);
    tapi_create(c, "c-adam", CRASH_ADAM_CFG, 201);

    char(*keys)[33] = calloc(MAX_OPS, 33);
    assert_non_null(keys);
    streamer s = {.next = 0, .violations = 0, .keys = keys};
    int applied_by_retry = 0, lost_in_flight = 0;
    long long t0 = tapi_now_ms();

    for (int round = 0; round < ROUNDS; round++) {
        /* Keys for the operations this round may reach. */
        for (int k = s.next; k < s.next + 4000 && k < MAX_OPS; k++)
            if (!keys[k][0])
                assert_int_equal(optd_new_idempotency_key(keys[k]), 0);
        snprintf(s.url, sizeof s.url, "%s", tdaemon_url(&d));
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, stream_main, &s), 0);
        sleep_us(2000 + (long)(rand_r(&seed) % 40000));
        assert_int_equal(tdaemon_kill9(&d), 0);
        pthread_join(th, NULL);
        assert_int_equal(s.violations, 0);
        assert_true(s.next < MAX_OPS - 4000);

        /* Every 4th crash, look at the file as the crash left it. */
        if (round % 4 == 3)
            assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);

        assert_int_equal(tdaemon_restart(&d), 0);
        optd_client_free(c);
        c = tapi_client(tdaemon_url(&d), NULL, false);

        /* Operations before s.next were acknowledged; s.next was in flight
         * (or not yet sent) and may or may not have been applied. */
        int k = s.next;
        long long acked[2] = {(k + 1) / 2, k / 2};
        long long now[2] = {session_step(c, "c-sgd"), session_step(c, "c-adam")};
        int lane = k % 2;
        for (int l = 0; l < 2; l++) {
            long long hi = acked[l] + (l == lane ? 1 : 0);
            if (now[l] < acked[l] || now[l] > hi)
                fail_msg("round %d: lane %d at step %lld; %lld acknowledged (seed %u)", round, l,
                         now[l], acked[l], seed0);
        }
        assert_sgd_params(c, (int)now[0]);
        bool was_applied = now[lane] == acked[lane] + 1;

        /* The retry of the unacknowledged key applies exactly once. */
        long long step = -1;
        int rep = -1;
        optd_error e;
        for (int again = 0; again < 2; again++) {
            if (op_step(c, &s, k, &step, &rep, &e) != 0)
                fail_msg("retry of op %d: %d %s", k, e.status, e.detail);
            assert_int_equal(step, k / 2 + 1);
            /* A replay the second time in any case; the first time only
             * when the crash came after the commit. */
            assert_int_equal(rep, again ? 1 : (was_applied ? 1 : 0));
        }
        applied_by_retry += !was_applied;
        lost_in_flight += was_applied;
        s.next = k + 1;
        assert_int_equal(session_step(c, lane ? "c-adam" : "c-sgd"), k / 2 + 1);
    }

    int n = s.next;
    int n_sgd = (n + 1) / 2, n_adam = n / 2;
    assert_sgd_params(c, n_sgd);
    assert_int_equal(session_step(c, "c-adam"), n_adam);

    /* Recovery replays the log through the same kernels: the crashed Adam
     * equals an uninterrupted run, bit for bit. */
    tapi_create(c, "c-adam-ref", CRASH_ADAM_CFG, 201);
    for (int i = 0; i < n_adam; i++) {
        float g[N_ADAM];
        grad_f32(i, g, N_ADAM);
        optd_error e;
        if (optd_step_f32(c, "c-adam-ref", g, N_ADAM, NULL, NULL, NULL, &e) != 0)
            fail_msg("reference step %d: %d %s", i, e.status, e.detail);
    }
    tapi_snap a = tapi_snapshot(c, "c-adam"), b = tapi_snapshot(c, "c-adam-ref");
    tapi_assert_same(&a, &b);
    tapi_snap_free(&a);
    tapi_snap_free(&b);

    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
    free(keys);
    fprintf(stderr,
            "crash: %d kill -9 in %lld ms, %d steps (%d sgd, %d adam); in-flight step committed "
            "before the crash %d times, applied by its retry %d times (seed %u)\n",
            ROUNDS, tapi_now_ms() - t0, n, n_sgd, n_adam, lost_in_flight, applied_by_retry,
            seed0);
}

/* A crash right after create: the session exists, at step 0. */
static void test_crash_after_create(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    tapi_create(c, "fresh", ADAM_CFG, 201);
    tapi_snap before = tapi_snapshot(c, "fresh");
    optd_client_free(c);
    assert_int_equal(tdaemon_kill9(&d), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    tapi_snap after = tapi_snapshot(c, "fresh");
    tapi_assert_same(&before, &after);
    /* and create-or-verify still recognises its config */
    tapi_create(c, "fresh", ADAM_CFG, 200);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

int main(void)
{
    const char *env = getenv("OPTD_TEST_SEED");
    seed0 = env ? (unsigned)strtoul(env, NULL, 10) : (unsigned)time(NULL);
    seed = seed0;
    fprintf(stderr, "test_api_durability: seed %u (set OPTD_TEST_SEED to repeat)\n", seed0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_restart_keeps_everything),
        cmocka_unit_test(test_crash_kill9),
        cmocka_unit_test(test_crash_after_create),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
