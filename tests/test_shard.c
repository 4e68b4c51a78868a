/*
 * test_shard.c -- Optd-Grad-Norm, the whole vector's gradient norm that a
 * sharded session sends with each part: clipping by norm uses it in place
 * of the part's own norm.  A session stepped with it equals a local run of
 * the optim/ kernels clipped with that norm, bit for bit, live, after a
 * kill -9 and replay, through fork with replay, rollback, and an export
 * with its log imported; the norm is part of the idempotency fingerprint;
 * bad values are refused naming the header, changing nothing; a session
 * without clipping by norm ignores it; accumulation and sync refuse it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/c/optd_client.h"
#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"
#include "tests/support/gen.h"

/* Several blocks and a tail block. */
#define N (3 * OPTIM_VEC_BLOCK + 1000)
#define STEPS 10
#define MAX_NORM 1.5

/* The norms the steps carry: a whole vector's norm larger than the part's
 * (clipping scales), and small ones where the part's own norm would clip
 * but the given one does not. */
static double given_norm(int t)
{
    return t % 3 == 2 ? 0.25 + t / 64.0 : 40.0 + 3.0 * t + 1.0 / 3.0;
}

static int step(optd_client *c, const char *name, const float *g, size_t n, double norm,
                const char *key, optd_response *out)
{
    char nh[64], kh[128], path[128];
    snprintf(nh, sizeof nh, "Optd-Grad-Norm: %.17g", norm);
    snprintf(kh, sizeof kh, "Idempotency-Key: %s", key ? key : "");
    const char *h[] = {"Content-Type: application/octet-stream", nh, key ? kh : NULL, NULL};
    snprintf(path, sizeof path, "/v1/sessions/%s/step?params=false", name);
    optd_response r = tapi_req_bin(c, "POST", path, h, g, n * sizeof *g);
    int st = r.status;
    if (out)
        *out = r;
    else
        optd_response_free(&r);
    return st;
}

static void get_params(optd_client *c, const char *name, float *out, long long want_step)
{
    tapi_snap s = tapi_snapshot(c, name);
    assert_int_equal(s.len, N * sizeof(float));
    assert_int_equal(s.params_step, want_step);
    memcpy(out, s.params, s.len);
    tapi_snap_free(&s);
}

static void create_clipped(optd_client *c, const char *name, const char *extra)
{
    char body[512];
    snprintf(body, sizeof body,
             "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":%d,"
             "\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":11},"
             "\"clip\":{\"type\":\"norm\",\"max_norm\":%g}%s}",
             N, MAX_NORM, extra ? extra : "");
    tapi_create(c, name, body, 201);
}

/* The local run: Adam on p, each gradient clipped with the given norm as
 * the engine does (max_norm / (norm + 1e-6), when below 1). */
typedef struct {
    optim_hparams hp;
    optim_state st;
    float *buf[OPTIM_MAX_BUFFERS];
    float *p, *work;
} local_run;

static void local_init(local_run *L, const float *p0)
{
    memset(L, 0, sizeof *L);
    optim_hparams_default(OPTIM_ADAM, &L->hp);
    L->hp.lr = 0.01;
    optim_state_init(&L->hp, &L->st);
    unsigned need = optim_buffers_needed(&L->hp);
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (need & (1u << i)) {
            L->buf[i] = malloc(N * sizeof(float));
            optim_buffer_init(&L->hp, i, OPTIM_F32, L->buf[i], N);
            L->st.buf[i] = L->buf[i];
        }
    L->p = malloc(N * sizeof(float));
    L->work = malloc(N * sizeof(float));
    memcpy(L->p, p0, N * sizeof(float));
}

static void local_step(local_run *L, const float *g, double norm)
{
    double coef = MAX_NORM / (norm + 1e-6);
    if (coef < 1.0)
        optim_vec_scale(OPTIM_F32, L->work, g, N, coef);
    else
        memcpy(L->work, g, N * sizeof(float));
    optim_step(&L->hp, &L->st, OPTIM_F32, L->p, L->work, N);
}

static void local_free(local_run *L)
{
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(L->buf[i]);
    free(L->p);
    free(L->work);
}

static optd_response get_raw(optd_client *c, const char *path)
{
    const char *acc[] = {"Accept: application/octet-stream", NULL};
    return tapi_req(c, "GET", path, acc, NULL);
}

static int post_json(optd_client *c, const char *path, const char *body)
{
    const char *h[] = {"Content-Type: application/json", NULL};
    optd_response r = tapi_req(c, "POST", path, h, body);
    int st = r.status;
    if (st >= 300)
        fprintf(stderr, "POST %s: %d %.*s\n", path, st, (int)r.len, r.body);
    optd_response_free(&r);
    return st;
}

static void test_given_norm_exact(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    create_clipped(c, "s", ",\"retain\":{\"every_steps\":4,\"keep\":5}");

    float *p = malloc(N * sizeof *p), *got = malloc(N * sizeof *got);
    float *g = malloc(N * sizeof *g), *at6 = malloc(N * sizeof *at6),
          *at9 = malloc(N * sizeof *at9);
    get_params(c, "s", p, 0);
    local_run L;
    local_init(&L, p);
    int clipped = 0, unclipped_below_own = 0;
    for (int t = 0; t < STEPS; t++) {
        tgen_fill(OPTIM_F32, g, N, 500 + (uint64_t)t, 0, 1.0);
        double own;
        bool fin;
        optim_vec_stats(OPTIM_F32, g, N, 2.0, &own, &fin);
        double G = given_norm(t);
        clipped += MAX_NORM / (G + 1e-6) < 1.0;
        /* the part's own norm would have clipped; the given one does not */
        unclipped_below_own += MAX_NORM / (G + 1e-6) >= 1.0 && MAX_NORM / (own + 1e-6) < 1.0;
        char key[32];
        snprintf(key, sizeof key, "k%d", t);
        assert_int_equal(step(c, "s", g, N, G, key, NULL), 200);
        local_step(&L, g, G);
        if (t == 5)
            memcpy(at6, L.p, N * sizeof *at6);
        if (t == 8)
            memcpy(at9, L.p, N * sizeof *at9);
    }
    assert_true(clipped > 0 && unclipped_below_own > 0);
    get_params(c, "s", got, STEPS);
    assert_memory_equal(got, L.p, N * sizeof *got);

    /* The history reports the norm clipping used. */
    optd_response h = tapi_req(c, "GET", "/v1/sessions/s/history", NULL, NULL);
    cJSON *doc = tapi_json(&h);
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(doc, "steps");
    int rows = 0;
    const cJSON *row;
    cJSON_ArrayForEach(row, steps) {
        int t = (int)tapi_num(row, "step") - 1;
        assert_true(t >= 0 && t < STEPS);
        assert_true(tapi_num(row, "grad_norm") == given_norm(t));
        rows++;
    }
    assert_true(rows >= 4);
    cJSON_Delete(doc);
    optd_response_free(&h);

    /* The key's fingerprint holds the norm: another norm is 422 and
     * nothing changes; the same norm replays. */
    tapi_snap before = tapi_snapshot(c, "s");
    optd_response r;
    assert_int_equal(step(c, "s", g, N, given_norm(STEPS - 1) * 2, "k9", &r), 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    assert_int_equal(step(c, "s", g, N, given_norm(STEPS - 1), "k9", &r), 200);
    assert_string_equal(optd_response_header(&r, "Optd-Replayed"), "true");
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(c, "s");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);

    /* A crash: replay from the log clips with the logged norms. */
    optd_client_free(c);
    assert_int_equal(tdaemon_kill9(&d), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    get_params(c, "s", got, STEPS);
    assert_memory_equal(got, L.p, N * sizeof *got);

    /* Fork at 4 (the oldest kept checkpoint) with replay re-applies the
     * logged rows 5..10 with their norms. */
    tapi_create(c, "f", "{\"fork\":{\"from\":\"s\",\"step\":4},\"replay\":true}", 201);
    get_params(c, "f", got, STEPS);
    assert_memory_equal(got, L.p, N * sizeof *got);

    /* An export with its log, imported, then rolled back to 9 (its
     * checkpoint 8 + a logged row), equals the local run at 9; the
     * original rolled back to 6 (checkpoint 4 + two rows) the run at 6. */
    optd_response ex = get_raw(c, "/v1/sessions/s/export?log=true");
    assert_int_equal(ex.status, 200);
    const char *ct[] = {"Content-Type: application/octet-stream", NULL};
    optd_response im = tapi_req_bin(c, "PUT", "/v1/sessions/im/export", ct, ex.body, ex.len);
    assert_int_equal(im.status, 201);
    optd_response_free(&im);
    optd_response_free(&ex);
    get_params(c, "im", got, STEPS);
    assert_memory_equal(got, L.p, N * sizeof *got);
    assert_int_equal(post_json(c, "/v1/sessions/im/rollback", "{\"step\":9}"), 200);
    get_params(c, "im", got, 9);
    assert_memory_equal(got, at9, N * sizeof *got);
    assert_int_equal(post_json(c, "/v1/sessions/s/rollback", "{\"step\":6}"), 200);
    get_params(c, "s", got, 6);
    assert_memory_equal(got, at6, N * sizeof *got);

    tapi_snap_free(&before);
    local_free(&L);
    free(p);
    free(got);
    free(g);
    free(at6);
    free(at9);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

static void test_refusals(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    create_clipped(c, "s", NULL);
    float *g = malloc(N * sizeof *g), *a = malloc(N * sizeof *a), *b = malloc(N * sizeof *b);
    tgen_fill(OPTIM_F32, g, N, 77, 0, 1.0);

    /* Not a finite number >= 0: 400 naming the header, nothing changed. */
    static const char *const bad[] = {"-1", "-0.5", "nan", "inf", "1e400", "abc", "1.5x",
                                      "1,2", "0x"};
    tapi_snap before = tapi_snapshot(c, "s");
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char nh[64];
        snprintf(nh, sizeof nh, "Optd-Grad-Norm: %s", bad[i]);
        const char *h[] = {"Content-Type: application/octet-stream", nh, NULL};
        optd_response r = tapi_req_bin(c, "POST", "/v1/sessions/s/step", h, g, N * sizeof *g);
        if (r.status != 400)
            fail_msg("Optd-Grad-Norm '%s': %d", bad[i], r.status);
        tapi_assert_problem(&r, 400, "Optd-Grad-Norm");
        optd_response_free(&r);
    }
    tapi_snap after = tapi_snapshot(c, "s");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    tapi_snap_free(&before);

    /* A non-finite part is still refused (nonfinite "error"). */
    float keep = g[5];
    g[5] = NAN;
    optd_response r;
    assert_int_equal(step(c, "s", g, N, 2.0, NULL, &r), 422);
    tapi_assert_problem(&r, 422, "grad");
    optd_response_free(&r);
    g[5] = keep;

    /* Without clipping by norm the value is ignored: the same as no header. */
    const char *plain = "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":%d,"
                        "\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":11}%s}";
    char body[512];
    snprintf(body, sizeof body, plain, N, "");
    tapi_create(c, "p1", body, 201);
    tapi_create(c, "p2", body, 201);
    snprintf(body, sizeof body, plain, N, ",\"clip\":{\"type\":\"value\",\"max_value\":0.5}");
    tapi_create(c, "v1", body, 201);
    tapi_create(c, "v2", body, 201);
    const char *h[] = {"Content-Type: application/octet-stream", NULL};
    for (int t = 0; t < 3; t++) {
        assert_int_equal(step(c, "p1", g, N, 0.001, NULL, NULL), 200);
        assert_int_equal(step(c, "v1", g, N, 0.001, NULL, NULL), 200);
        optd_response x = tapi_req_bin(c, "POST", "/v1/sessions/p2/step?params=false", h, g,
                                       N * sizeof *g);
        assert_int_equal(x.status, 200);
        optd_response_free(&x);
        x = tapi_req_bin(c, "POST", "/v1/sessions/v2/step?params=false", h, g, N * sizeof *g);
        assert_int_equal(x.status, 200);
        optd_response_free(&x);
    }
    get_params(c, "p1", a, 3);
    get_params(c, "p2", b, 3);
    assert_memory_equal(a, b, N * sizeof *a);
    get_params(c, "v1", a, 3);
    get_params(c, "v2", b, 3);
    assert_memory_equal(a, b, N * sizeof *a);
    /* ... while on the clipped session the same norm does change the result */
    create_clipped(c, "c1", NULL);
    create_clipped(c, "c2", NULL);
    assert_int_equal(step(c, "c1", g, N, 1000.0, NULL, NULL), 200);
    optd_response x = tapi_req_bin(c, "POST", "/v1/sessions/c2/step?params=false", h, g,
                                   N * sizeof *g);
    assert_int_equal(x.status, 200);
    optd_response_free(&x);
    get_params(c, "c1", a, 1);
    get_params(c, "c2", b, 1);
    assert_true(memcmp(a, b, N * sizeof *a) != 0);

    /* Accumulation and sync clip by a norm the request cannot know: 422. */
    create_clipped(c, "acc", ",\"mode\":{\"type\":\"async\",\"accumulate\":2}");
    create_clipped(c, "syn", ",\"mode\":{\"type\":\"sync\",\"workers\":2}");
    static const char *const modes[] = {"acc", "syn"};
    for (int k = 0; k < 2; k++) {
        before = tapi_snapshot(c, modes[k]);
        assert_int_equal(step(c, modes[k], g, N, 2.0, NULL, &r), 422);
        tapi_assert_problem(&r, 422, "Optd-Grad-Norm");
        optd_response_free(&r);
        after = tapi_snapshot(c, modes[k]);
        tapi_assert_same(&before, &after);
        tapi_snap_free(&after);
        tapi_snap_free(&before);
    }

    free(g);
    free(a);
    free(b);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_given_norm_exact),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
