/*
 * test_api_concurrency.c -- many clients at once: 8 threads stepping one
 * session (every step applied once, in some order), 8 sessions stepped in
 * parallel (each bit-identical to the kernels run locally), racing creates
 * and racing retries of one idempotency key.
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

#include "clients/c/optd_client.h"
#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"
#include "tests/support/fixture.h"

enum { THREADS = 8, STEPS = 200, N = 16 };
static const double LR = 0.01;

typedef tapi_suite suite;

static int suite_setup(void **state)
{
    *state = tapi_suite_open(NULL);
    return *state ? 0 : -1;
}

static int suite_teardown(void **state)
{
    return tapi_suite_close(*state);
}

/* Worker threads count problems instead of asserting: cmocka's asserts
 * belong to the main thread. */
typedef struct {
    const char *url;
    const char *session;
    int id;
    int errors;
    char first_error[640];
    long long steps[STEPS];
} worker;

static void worker_error(worker *w, const char *what, const optd_error *e)
{
    if (w->errors++ == 0)
        snprintf(w->first_error, sizeof w->first_error, "thread %d: %s: %d %s", w->id, what,
                 e ? e->status : 0, e ? e->detail : "");
}

static void shared_grad(int thread, int i, double *g)
{
    for (int j = 0; j < N; j++)
        g[j] = (thread * STEPS + i + 1) * 1e-3 + j * 1e-4;
}

static void *shared_main(void *arg)
{
    worker *w = arg;
    optd_client *c = optd_client_new(w->url, NULL);
    if (!c) {
        worker_error(w, "client", NULL);
        return NULL;
    }
    /* Half the threads speak JSON, half binary. */
    optd_step_opts o = optd_step_opts_default();
    o.json = w->id % 2;
    for (int i = 0; i < STEPS; i++) {
        double g[N];
        shared_grad(w->id, i, g);
        optd_error e;
        long long st = -1;
        if (optd_step_f64_opts(c, w->session, g, N, NULL, &o, NULL, &st, NULL, &e) != 0) {
            worker_error(w, "step", &e);
            break;
        }
        w->steps[i] = st;
    }
    optd_client_free(c);
    return NULL;
}

static void join_all(pthread_t *th, worker *w, int n)
{
    for (int t = 0; t < n; t++)
        pthread_join(th[t], NULL);
    for (int t = 0; t < n; t++)
        if (w[t].errors)
            fail_msg("%d errors; first: %s", w[t].errors, w[t].first_error);
}

static void test_one_session_many_threads(void **state)
{
    suite *s = *state;
    char cfg[512];
    double init[N];
    int len = snprintf(cfg, sizeof cfg, "{\"optimizer\":{\"type\":\"sgd\",\"lr\":%.17g},"
                                        "\"dtype\":\"float64\",\"params\":[", LR);
    for (int j = 0; j < N; j++) {
        init[j] = 1.0 + j;
        len += snprintf(cfg + len, sizeof cfg - (size_t)len, "%s%.17g", j ? "," : "", init[j]);
    }
    snprintf(cfg + len, sizeof cfg - (size_t)len, "]}");
    tapi_create(s->c, "shared", cfg, 201);

    pthread_t th[THREADS];
    static worker w[THREADS];
    long long t0 = tapi_now_ms();
    for (int t = 0; t < THREADS; t++) {
        w[t] = (worker){.url = tdaemon_url(&s->d), .session = "shared", .id = t};
        assert_int_equal(pthread_create(&th[t], NULL, shared_main, &w[t]), 0);
    }
    join_all(th, w, THREADS);
    long long ms = tapi_now_ms() - t0;

    /* Every step number from 1 to 1600 was answered exactly once, and each
     * thread saw its own steps in increasing order. */
    static unsigned char seen[THREADS * STEPS + 1];
    memset(seen, 0, sizeof seen);
    for (int t = 0; t < THREADS; t++)
        for (int i = 0; i < STEPS; i++) {
            long long st = w[t].steps[i];
            if (st < 1 || st > THREADS * STEPS || seen[st]++)
                fail_msg("thread %d step %d answered step %lld (twice or out of range)", t, i,
                         st);
            if (i && st <= w[t].steps[i - 1])
                fail_msg("thread %d: step %lld after %lld", t, st, w[t].steps[i - 1]);
        }

    double got[N];
    long long step;
    optd_error e;
    assert_int_equal(optd_get_params_f64(s->c, "shared", got, N, &step, &e), 0);
    assert_int_equal(step, THREADS * STEPS);
    /* init - lr * sum(g): the order differs from run to run, the sum not. */
    for (int j = 0; j < N; j++) {
        double sum = 0;
        for (int t = 0; t < THREADS; t++)
            for (int i = 0; i < STEPS; i++) {
                double g[N];
                shared_grad(t, i, g);
                sum += g[j];
            }
        double want = init[j] - LR * sum;
        if (fabs(got[j] - want) > 1e-9)
            fail_msg("param %d: %.17g, expected %.17g", j, got[j], want);
    }
    fprintf(stderr, "one session: %d steps from %d threads in %lld ms\n", THREADS * STEPS,
            THREADS, ms);
}

/* Eight sessions stepped in parallel, each following its own reference
 * case (tests/fixtures/optim/, from torch's rules; float32, 37 params, 120
 * updates): after every checked update the daemon must answer exactly
 * the reference's bits, whatever the other threads do meanwhile. */
static const char *const par_cases[THREADS] = {
    "adam_all_f32_n37",         "adamw_amsgrad_f32_n37", "nadam_wd_f32_n37",
    "radam_wd_f32_n37",         "rmsprop_centered_f32_n37", "sgd_nesterov_wd_f32_n37",
    "adadelta_wd_f32_n37",      "rprop_etas_f32_n37",
};
enum { FN = 37 };

typedef struct {
    const char *url;
    const char *session;
    const tfix_case *fx;
    int id;
    int errors;
    char first_error[640];
    float seen[8][FN]; /* params after each checked update, in fx's order */
} fx_worker;

static void *fx_main(void *arg)
{
    fx_worker *w = arg;
    optd_client *c = optd_client_new(w->url, NULL);
    if (!c) {
        w->errors++;
        snprintf(w->first_error, sizeof w->first_error, "thread %d: no client", w->id);
        return NULL;
    }
    for (int t = 1; t <= w->fx->steps; t++) {
        float g[FN], out[FN];
        tfix_grad(w->fx, t, g, FN);
        optd_error e;
        long long st = -1;
        if (optd_step_f32(c, w->session, g, FN, NULL, out, &st, &e) != 0 || st != t) {
            w->errors++;
            snprintf(w->first_error, sizeof w->first_error, "thread %d: step %d: %d %s (step %lld)",
                     w->id, t, e.status, e.detail, st);
            break;
        }
        for (int k = 0; k < w->fx->n_checks; k++)
            if (w->fx->checks[k].t == t)
                memcpy(w->seen[k], out, sizeof out);
    }
    optd_client_free(c);
    return NULL;
}

static void test_many_sessions_in_parallel(void **state)
{
    suite *s = *state;
    static char names[THREADS][32];
    static tfix_case fx[THREADS];
    for (int t = 0; t < THREADS; t++) {
        assert_int_equal(tfix_load(par_cases[t], &fx[t]), 0);
        assert_true(fx[t].dtype == OPTIM_F32 && fx[t].n == FN);
        snprintf(names[t], sizeof names[t], "par-%d", t);
        char *params = tfix_params_json(&fx[t], FN);
        assert_non_null(params);
        char cfg[2048];
        snprintf(cfg, sizeof cfg, "{\"optimizer\":%s,\"dtype\":\"float32\",\"params\":%s}",
                 fx[t].optimizer, params);
        free(params);
        tapi_create(s->c, names[t], cfg, 201);
    }
    pthread_t th[THREADS];
    static fx_worker w[THREADS];
    long long t0 = tapi_now_ms();
    for (int t = 0; t < THREADS; t++) {
        w[t] = (fx_worker){.url = tdaemon_url(&s->d), .session = names[t], .fx = &fx[t], .id = t};
        assert_int_equal(pthread_create(&th[t], NULL, fx_main, &w[t]), 0);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    long long ms = tapi_now_ms() - t0;

    for (int t = 0; t < THREADS; t++) {
        if (w[t].errors)
            fail_msg("%s", w[t].first_error);
        char why[256];
        for (int k = 0; k < fx[t].n_checks; k++)
            if (tfix_compare(&fx[t], fx[t].checks[k].t, w[t].seen[k], FN, why, sizeof why))
                fail_msg("%s: %s", names[t], why);
        float got[FN];
        long long step;
        optd_error e;
        assert_int_equal(optd_get_params_f32(s->c, names[t], got, FN, &step, &e), 0);
        assert_int_equal(step, fx[t].steps);
        if (tfix_compare(&fx[t], fx[t].steps, got, FN, why, sizeof why))
            fail_msg("%s, GET params: %s", names[t], why);
        tfix_free(&fx[t]);
    }
    fprintf(stderr, "%d sessions x 120 steps in parallel in %lld ms\n", THREADS, ms);
}

/* ------------------------------------------------------------ races */

typedef struct {
    const char *url;
    const char *body;
    int status;
    pthread_barrier_t *go;
} creator;

static void *create_main(void *arg)
{
    creator *k = arg;
    optd_client *c = optd_client_new(k->url, NULL);
    if (!c)
        return NULL;
    optd_client_set_retry(c, 1, 0, 0);
    pthread_barrier_wait(k->go);
    optd_response r;
    if (optd_request(c, "PUT", "/v1/sessions/race", NULL, k->body, strlen(k->body), &r) == 0) {
        k->status = r.status;
        optd_response_free(&r);
    }
    optd_client_free(c);
    return NULL;
}

static void test_racing_creates(void **state)
{
    suite *s = *state;
    const char *same = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2]}";
    char other[THREADS][128];
    pthread_barrier_t go;
    pthread_t th[THREADS];
    creator k[THREADS];

    /* Same config from 8 clients at once: one 201, seven 200. */
    pthread_barrier_init(&go, NULL, THREADS);
    for (int t = 0; t < THREADS; t++) {
        k[t] = (creator){.url = tdaemon_url(&s->d), .body = same, .go = &go};
        assert_int_equal(pthread_create(&th[t], NULL, create_main, &k[t]), 0);
    }
    int n201 = 0, n200 = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        n201 += k[t].status == 201;
        n200 += k[t].status == 200;
    }
    pthread_barrier_destroy(&go);
    assert_int_equal(n201, 1);
    assert_int_equal(n200, THREADS - 1);
    optd_response r = tapi_req(s->c, "DELETE", "/v1/sessions/race", NULL, NULL);
    assert_true(r.status == 200 || r.status == 204);
    optd_response_free(&r);

    /* Eight different configs: one wins, seven conflict, and the session
     * holds the winner's config. */
    pthread_barrier_init(&go, NULL, THREADS);
    for (int t = 0; t < THREADS; t++) {
        snprintf(other[t], sizeof other[t],
                 "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.%d},\"params\":[1,2]}", t + 1);
        k[t] = (creator){.url = tdaemon_url(&s->d), .body = other[t], .go = &go};
        assert_int_equal(pthread_create(&th[t], NULL, create_main, &k[t]), 0);
    }
    int winner = -1, n409 = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        if (k[t].status == 201)
            winner = t;
        n409 += k[t].status == 409;
    }
    pthread_barrier_destroy(&go);
    assert_true(winner >= 0);
    assert_int_equal(n409, THREADS - 1);
    r = tapi_req(s->c, "GET", "/v1/sessions/race", NULL, NULL);
    cJSON *j = tapi_json(&r);
    char lr[16];
    snprintf(lr, sizeof lr, "0.%d", winner + 1);
    assert_true(tapi_num(j, "lr") == strtod(lr, NULL));
    cJSON_Delete(j);
    optd_response_free(&r);
}

typedef struct {
    const char *url;
    pthread_barrier_t *go;
    long long step;
    int replayed;
    int rc;
} keyed;

static void *keyed_main(void *arg)
{
    keyed *k = arg;
    optd_client *c = optd_client_new(k->url, NULL);
    k->rc = -1;
    if (!c)
        return NULL;
    optd_client_set_retry(c, 1, 0, 0);
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = "one-key-for-all-8";
    double g[2] = {1, 1};
    pthread_barrier_wait(k->go);
    optd_error e;
    k->rc = optd_step_f64_opts(c, "keyed", g, 2, NULL, &o, NULL, &k->step, &k->replayed, &e);
    optd_client_free(c);
    return NULL;
}

/* Eight retries of one key racing each other: applied once. */
static void test_racing_idempotency_key(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "keyed",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[0,0],\"dtype\":\"float64\"}",
                201);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, THREADS);
    pthread_t th[THREADS];
    keyed k[THREADS];
    for (int t = 0; t < THREADS; t++) {
        k[t] = (keyed){.url = tdaemon_url(&s->d), .go = &go};
        assert_int_equal(pthread_create(&th[t], NULL, keyed_main, &k[t]), 0);
    }
    int fresh = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(k[t].rc, 0);
        assert_int_equal(k[t].step, 1);
        fresh += !k[t].replayed;
    }
    pthread_barrier_destroy(&go);
    assert_int_equal(fresh, 1);
    double p[2];
    long long step;
    optd_error e;
    assert_int_equal(optd_get_params_f64(s->c, "keyed", p, 2, &step, &e), 0);
    assert_int_equal(step, 1);
    assert_true(p[0] == -0.5 && p[1] == -0.5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_session_many_threads),
        cmocka_unit_test(test_many_sessions_in_parallel),
        cmocka_unit_test(test_racing_creates),
        cmocka_unit_test(test_racing_idempotency_key),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
