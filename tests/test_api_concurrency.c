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
    float out32[N];
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

/* Adam float32 on the client's side with optd's own kernels: the daemon
 * must give exactly the same bits. */
typedef struct {
    optim_hparams hp;
    optim_state st;
} local_opt;

static void local_init(local_opt *o)
{
    optim_hparams_default(OPTIM_ADAM, &o->hp);
    o->hp.lr = 0.01;
    o->hp.weight_decay = 0.01;
    optim_state_init(&o->hp, &o->st);
    unsigned need = optim_buffers_needed(&o->hp);
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        o->st.buf[i] = NULL;
        if (need & (1u << i)) {
            o->st.buf[i] = malloc(N * sizeof(float));
            assert_non_null(o->st.buf[i]);
            optim_buffer_init(&o->hp, i, OPTIM_F32, o->st.buf[i], N);
        }
    }
}

static void local_free(local_opt *o)
{
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(o->st.buf[i]);
}

static void own_grad(int id, int i, float *g)
{
    for (int j = 0; j < N; j++)
        g[j] = (float)sin(id * 1000.0 + i * 0.37 + j);
}

static void *own_main(void *arg)
{
    worker *w = arg;
    optd_client *c = optd_client_new(w->url, NULL);
    if (!c) {
        worker_error(w, "client", NULL);
        return NULL;
    }
    for (int i = 0; i < STEPS; i++) {
        float g[N];
        own_grad(w->id, i, g);
        optd_error e;
        long long st = -1;
        /* every 10th step asks for the params back */
        float *out = i % 10 == 9 || i == STEPS - 1 ? w->out32 : NULL;
        if (optd_step_f32(c, w->session, g, N, NULL, out, &st, &e) != 0) {
            worker_error(w, "step", &e);
            break;
        }
        if (st != i + 1) {
            worker_error(w, "unexpected step number", NULL);
            break;
        }
        w->steps[i] = st;
    }
    optd_client_free(c);
    return NULL;
}

static void test_many_sessions_in_parallel(void **state)
{
    suite *s = *state;
    static char names[THREADS][32];
    static float init[THREADS][N];
    for (int t = 0; t < THREADS; t++) {
        snprintf(names[t], sizeof names[t], "par-%d", t);
        char cfg[256];
        snprintf(cfg, sizeof cfg,
                 "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"weight_decay\":0.01},"
                 "\"size\":%d,\"init\":{\"type\":\"normal\",\"std\":0.3,\"seed\":%d}}",
                 N, 100 + t);
        tapi_create(s->c, names[t], cfg, 201);
        optd_error e;
        assert_int_equal(optd_get_params_f32(s->c, names[t], init[t], N, NULL, &e), 0);
    }
    pthread_t th[THREADS];
    static worker w[THREADS];
    long long t0 = tapi_now_ms();
    for (int t = 0; t < THREADS; t++) {
        w[t] = (worker){.url = tdaemon_url(&s->d), .session = names[t], .id = t};
        assert_int_equal(pthread_create(&th[t], NULL, own_main, &w[t]), 0);
    }
    join_all(th, w, THREADS);
    long long ms = tapi_now_ms() - t0;

    for (int t = 0; t < THREADS; t++) {
        local_opt o;
        local_init(&o);
        float p[N];
        memcpy(p, init[t], sizeof p);
        for (int i = 0; i < STEPS; i++) {
            float g[N];
            own_grad(t, i, g);
            optim_step(&o.hp, &o.st, OPTIM_F32, p, g, N);
        }
        local_free(&o);
        float got[N];
        long long step;
        optd_error e;
        assert_int_equal(optd_get_params_f32(s->c, names[t], got, N, &step, &e), 0);
        assert_int_equal(step, STEPS);
        if (memcmp(got, p, sizeof p) != 0)
            fail_msg("%s: the daemon's params differ from the kernels run locally", names[t]);
        assert_memory_equal(w[t].out32, p, sizeof p);
    }
    fprintf(stderr, "%d sessions x %d steps in parallel in %lld ms\n", THREADS, STEPS, ms);
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
