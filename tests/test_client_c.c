/*
 * test_client_c.c -- the C client library against the real daemon: typed
 * errors, create-or-verify, binary and JSON steps (the same bits either
 * way), idempotency keys reused by retries, params get/set, update,
 * delete, the API key, https:// with a CA and a client certificate, retries
 * across a daemon restart, and sessions of named tensors and param groups
 * with absent tensors on a step.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
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
    if (!s) /* the setup failed and said why */
        return -1;
    optd_client_free(s->c);
    int rc = tdaemon_stop(&s->d);
    tdaemon_cleanup(&s->d);
    free(s);
    return rc == 0 ? 0 : -1;
}

static void test_idempotency_keys(void **state)
{
    (void)state;
    char a[33], b[33];
    assert_int_equal(optd_new_idempotency_key(a), 0);
    assert_int_equal(optd_new_idempotency_key(b), 0);
    assert_int_equal(strlen(a), 32);
    for (int i = 0; i < 32; i++)
        assert_true(isxdigit((unsigned char)a[i]) && !isupper((unsigned char)a[i]));
    assert_string_not_equal(a, b);
}

static void test_create_verify_conflict(void **state)
{
    suite *s = *state;
    const char *cfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3],"
                      "\"dtype\":\"float64\"}";
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "cc", cfg, &e), 1);
    assert_int_equal(optd_create_session(s->c, "cc", cfg, &e), 0);
    assert_int_equal(optd_create_session(s->c, "cc",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.3},"
                                         "\"params\":[1,2,3],\"dtype\":\"float64\"}",
                                         &e),
                     -1);
    assert_int_equal(e.status, 409);
    assert_string_equal(e.type, "urn:optd:problem:conflict");
    assert_true(strlen(e.title) > 0);
    assert_true(strlen(e.detail) > 0);

    /* a field-level error names the field */
    assert_int_equal(optd_create_session(s->c, "cc2",
                                         "{\"optimizer\":{\"type\":\"nope\"},\"params\":[1]}", &e),
                     -1);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.field, "optimizer.type");
    assert_int_equal(e.step, -1);

    char *json = optd_get_session(s->c, "cc", &e);
    assert_non_null(json);
    cJSON *j = cJSON_Parse(json);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "name")->valuestring, "cc");
    assert_int_equal(cJSON_GetObjectItem(j, "step")->valuedouble, 0);
    cJSON_Delete(j);
    free(json);

    assert_null(optd_get_session(s->c, "absent", &e));
    assert_int_equal(e.status, 404);
    assert_string_equal(e.type, "urn:optd:problem:not-found");
}

static void test_steps_binary_and_json_agree(void **state)
{
    suite *s = *state;
    const char *cfg = "{\"optimizer\":{\"type\":\"adamw\",\"lr\":0.02},\"size\":32,"
                      "\"init\":{\"type\":\"normal\",\"std\":1,\"seed\":9}}";
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "bin32", cfg, &e), 1);
    assert_int_equal(optd_create_session(s->c, "json32", cfg, &e), 1);
    optd_step_opts js = optd_step_opts_default();
    js.json = 1;
    float a[32], b[32], g[32];
    for (int i = 0; i < 12; i++) {
        for (int j = 0; j < 32; j++)
            g[j] = (float)sin(i * 1.3 + j * 0.7);
        double loss = 1.0 / (i + 1);
        long long sa = -1, sb = -1;
        int ra = -1, rb = -1;
        assert_int_equal(optd_step_f32_opts(s->c, "bin32", g, 32, &loss, NULL, a, &sa, &ra, &e),
                         0);
        assert_int_equal(optd_step_f32_opts(s->c, "json32", g, 32, &loss, &js, b, &sb, &rb, &e),
                         0);
        assert_int_equal(sa, i + 1);
        assert_int_equal(sb, i + 1);
        assert_int_equal(ra, 0);
        assert_int_equal(rb, 0);
        /* JSON's %.9g carries float32 exactly: the same bits both ways */
        assert_memory_equal(a, b, sizeof a);
    }
    float now[32];
    long long st;
    assert_int_equal(optd_get_params_f32(s->c, "bin32", now, 32, &st, &e), 0);
    assert_int_equal(st, 12);
    assert_memory_equal(now, a, sizeof a);

    /* params_out NULL: ?params=false, the step still counted */
    long long sn = -1;
    assert_int_equal(optd_step_f32(s->c, "bin32", g, 32, NULL, NULL, &sn, &e), 0);
    assert_int_equal(sn, 13);
}

static void test_step_f64_with_options(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "f64",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.25},"
                                         "\"params\":[1,-1],\"dtype\":\"float64\"}",
                                         &e),
                     1);
    double g[2] = {0.5, 4}, p[2];
    long long st;
    optd_step_opts o = optd_step_opts_default();
    o.worker = "w-1";
    o.base_step = 0;
    double loss = 3.25;
    assert_int_equal(optd_step_f64_opts(s->c, "f64", g, 2, &loss, &o, p, &st, NULL, &e), 0);
    assert_int_equal(st, 1);
    assert_true(p[0] == 1 - 0.25 * 0.5 && p[1] == -1 - 0.25 * 4);
    o.json = 1;
    o.base_step = 1;
    assert_int_equal(optd_step_f64_opts(s->c, "f64", g, 2, &loss, &o, p, &st, NULL, &e), 0);
    assert_int_equal(st, 2);
    assert_true(p[0] == (1 - 0.25 * 0.5) - 0.25 * 0.5);

    /* typed errors from the step */
    double g3[3] = {1, 2, 3};
    assert_int_equal(optd_step_f64(s->c, "f64", g3, 3, NULL, p, &st, &e), -1);
    assert_int_equal(e.status, 422);
    assert_string_equal(e.field, "grad");
    assert_string_equal(e.type, "urn:optd:problem:unprocessable");
    g[1] = NAN;
    assert_int_equal(optd_step_f64(s->c, "f64", g, 2, NULL, p, &st, &e), -1);
    assert_int_equal(e.status, 422);
    assert_int_equal(optd_step_f64(s->c, "nope", g3, 3, NULL, p, &st, &e), -1);
    assert_int_equal(e.status, 404);
    assert_int_equal(optd_get_params_f64(s->c, "f64", p, 2, &st, &e), 0);
    assert_int_equal(st, 2);
}

/* Named tensors and param groups on create; absent tensors and per-group
 * lrs on a step, binary and JSON.  w is 2x3, b is 3: the vector is w, b. */
static void test_tensors_groups_absent(void **state)
{
    suite *s = *state;
    optd_error e;
    const double w[6] = {0.5, -1, 2, 0.25, 3, -0.75}, b[3] = {1, 2, 3};
    assert_int_equal(
        optd_create_session(s->c, "layout",
                            "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"dtype\":\"float64\","
                            "\"params\":[0.5,-1,2,0.25,3,-0.75,1,2,3],"
                            "\"tensors\":[{\"name\":\"layer.w\",\"shape\":[2,3]},"
                            "{\"name\":\"layer.b\",\"shape\":[3]}],"
                            "\"groups\":[{\"tensors\":[\"layer.w\"]},"
                            "{\"tensors\":[\"layer.b\"],\"lr\":0.5}]}",
                            &e),
        1);
    char *doc = optd_get_session(s->c, "layout", &e);
    assert_non_null(doc);
    assert_non_null(strstr(doc, "\"name\":\"layer.b\""));
    free(doc);

    /* binary: layer.b absent, grad holds layer.w's six values */
    double g[6] = {1, 2, 3, 4, 5, 6}, p[9], lr[2] = {0.2, 0.3};
    size_t absent_b = 1, absent_w = 0;
    long long st;
    optd_step_opts o = optd_step_opts_default();
    o.absent = &absent_b;
    o.n_absent = 1;
    o.n_groups = 2;
    o.group_lr = lr;
    o.params_len = 9;
    assert_int_equal(optd_step_f64_opts(s->c, "layout", g, 6, NULL, &o, p, &st, NULL, &e), 0);
    assert_int_equal(st, 1);
    for (int i = 0; i < 6; i++)
        assert_true(p[i] == w[i] + -0.2 * g[i]);
    for (int i = 0; i < 3; i++)
        assert_true(p[6 + i] == b[i]);

    /* JSON: layer.w absent; group 1 keeps the lr 0.3 of the last step */
    double gb[3] = {0.5, -0.25, 1}, q[9];
    optd_step_opts j = optd_step_opts_default();
    j.json = 1;
    j.absent = &absent_w;
    j.n_absent = 1;
    j.params_len = 9;
    assert_int_equal(optd_step_f64_opts(s->c, "layout", gb, 3, NULL, &j, q, &st, NULL, &e), 0);
    assert_int_equal(st, 2);
    assert_memory_equal(q, p, 6 * sizeof(double));
    for (int i = 0; i < 3; i++)
        assert_true(q[6 + i] == b[i] + -0.3 * gb[i]);

    /* refused before anything is sent */
    double bad_lr[2] = {0.1, NAN};
    j.n_groups = 2;
    j.group_lr = bad_lr;
    assert_int_equal(optd_step_f64_opts(s->c, "layout", gb, 3, NULL, &j, q, &st, NULL, &e), -1);
    assert_int_equal(e.status, 0);
    assert_int_equal(optd_get_params_f64(s->c, "layout", q, 9, &st, &e), 0);
    assert_int_equal(st, 2);
}

static void test_idempotency_key_reuse(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "idem",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},"
                                         "\"params\":[0],\"dtype\":\"float64\"}",
                                         &e),
                     1);
    char key[33];
    assert_int_equal(optd_new_idempotency_key(key), 0);
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = key;
    double g = 2, p;
    long long st;
    int rep = -1;
    assert_int_equal(optd_step_f64_opts(s->c, "idem", &g, 1, NULL, &o, &p, &st, &rep, &e), 0);
    assert_int_equal(st, 1);
    assert_int_equal(rep, 0);
    assert_true(p == -2);
    /* A retry with the same key (as after a lost answer): a replay. */
    assert_int_equal(optd_step_f64_opts(s->c, "idem", &g, 1, NULL, &o, &p, &st, &rep, &e), 0);
    assert_int_equal(st, 1);
    assert_int_equal(rep, 1);
    assert_true(p == -2);
    /* Without a key override every call is a new step. */
    assert_int_equal(optd_step_f64(s->c, "idem", &g, 1, NULL, &p, &st, &e), 0);
    assert_int_equal(optd_step_f64(s->c, "idem", &g, 1, NULL, &p, &st, &e), 0);
    assert_int_equal(st, 3);
    assert_true(p == -6);
}

static void test_params_get_set(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "pset",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"size\":3,"
                                         "\"init\":{\"type\":\"zeros\"}}",
                                         &e),
                     1);
    float in[3] = {1.5f, -0.0f, 1e-40f}, out[3];
    assert_int_equal(optd_set_params_f32(s->c, "pset", in, 3, &e), 0);
    long long st = -1;
    assert_int_equal(optd_get_params_f32(s->c, "pset", out, 3, &st, &e), 0);
    assert_int_equal(st, 0);
    assert_memory_equal(in, out, sizeof in);
    /* wrong sizes are errors, on either side */
    assert_int_equal(optd_set_params_f32(s->c, "pset", in, 2, &e), -1);
    assert_int_equal(e.status, 422);
    assert_string_equal(e.field, "params");
    assert_int_equal(optd_get_params_f32(s->c, "pset", out, 4, &st, &e), -1);
    double d[3];
    assert_int_equal(optd_get_params_f64(s->c, "pset", d, 3, &st, &e), -1);
    /* float64 session */
    assert_int_equal(optd_create_session(s->c, "pset64",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"size\":3,"
                                         "\"dtype\":\"float64\",\"init\":{\"type\":\"zeros\"}}",
                                         &e),
                     1);
    double din[3] = {0.1, 1e300, -5e-324}, dout[3];
    assert_int_equal(optd_set_params_f64(s->c, "pset64", din, 3, &e), 0);
    assert_int_equal(optd_get_params_f64(s->c, "pset64", dout, 3, &st, &e), 0);
    assert_memory_equal(din, dout, sizeof din);
}

static void test_update_and_delete(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "upd",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},"
                                         "\"params\":[1],\"dtype\":\"float64\"}",
                                         &e),
                     1);
    assert_int_equal(optd_update(s->c, "upd", "{\"optimizer\":{\"lr\":0.75}}", &e), 0);
    double g = 1, p;
    long long st;
    assert_int_equal(optd_step_f64(s->c, "upd", &g, 1, NULL, &p, &st, &e), 0);
    assert_true(p == 1 - 0.75);
    assert_int_equal(optd_update(s->c, "upd", "{\"optimizer\":{\"lr\":-1}}", &e), -1);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.field, "optimizer.lr");
    assert_int_equal(optd_update(s->c, "nope", "{\"optimizer\":{\"lr\":1}}", &e), -1);
    assert_int_equal(e.status, 404);

    assert_int_equal(optd_delete(s->c, "upd", &e), 0);
    assert_null(optd_get_session(s->c, "upd", &e));
    assert_int_equal(e.status, 404);
    assert_int_equal(optd_delete(s->c, "upd", &e), -1);
    assert_int_equal(e.status, 404);
}

/* Checkpoints, rollback, fork (and replay), export and import. */
static void test_time_travel(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "tv",
                                         "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.1},"
                                         "\"params\":[1,2,3,4],\"dtype\":\"float64\","
                                         "\"retain\":{\"every_steps\":3,\"keep\":3}}",
                                         &e),
                     1);
    double at[11][4];
    for (int i = 0; i < 10; i++) {
        double g[4] = {sin(i), cos(i), 0.5 - i * 0.1, 1};
        long long st;
        assert_int_equal(optd_step_f64(s->c, "tv", g, 4, NULL, at[i + 1], &st, &e), 0);
        if (i == 4)
            assert_int_equal(optd_checkpoint(s->c, "tv", "five", &e), 0);
    }
    assert_int_equal(optd_checkpoint(s->c, "tv", "bad label", &e), -1);
    char *list = optd_checkpoints(s->c, "tv", &e);
    assert_non_null(list);
    assert_non_null(strstr(list, "\"five\""));
    free(list);
    double p[4];
    assert_int_equal(optd_fork(s->c, "tv-f", "tv", 6, 1, NULL, &e), 0);
    assert_int_equal(optd_get_params_f64(s->c, "tv-f", p, 4, NULL, &e), 0);
    assert_memory_equal(p, at[10], sizeof p);
    assert_int_equal(optd_fork(s->c, "tv-g", "tv", 6, 1, "{\"optimizer\":{\"lr\":0.01}}", &e), 0);
    assert_int_equal(optd_get_params_f64(s->c, "tv-g", p, 4, NULL, &e), 0);
    assert_memory_not_equal(p, at[10], sizeof p);
    void *file;
    size_t len;
    assert_int_equal(optd_export(s->c, "tv", 1, &file, &len, &e), 0);
    assert_int_equal(optd_import(s->c, "tv-i", file, len, &e), 0);
    assert_int_equal(optd_import(s->c, "tv-i", file, len, &e), -1);
    assert_int_equal(e.status, 409);
    free(file);
    assert_int_equal(optd_get_params_f64(s->c, "tv-i", p, 4, NULL, &e), 0);
    assert_memory_equal(p, at[10], sizeof p);
    assert_int_equal(optd_rollback(s->c, "tv", 7, &e), 0);
    assert_int_equal(optd_get_params_f64(s->c, "tv", p, 4, NULL, &e), 0);
    assert_memory_equal(p, at[7], sizeof p);
    assert_int_equal(optd_rollback_to(s->c, "tv", "five", &e), 0);
    assert_int_equal(optd_get_params_f64(s->c, "tv", p, 4, NULL, &e), 0);
    assert_memory_equal(p, at[5], sizeof p);
    assert_int_equal(optd_rollback(s->c, "tv", 0, &e), -1);
    assert_int_equal(e.status, 409);
    assert_int_equal(optd_fork(s->c, "tv-x", "nope", -1, 0, NULL, &e), -1);
    assert_int_equal(e.status, 404);
}

/* A gradient that only joins a pending accumulation answers 202: the
 * client returns 1 and leaves params_out alone. */
static void test_accumulate_accepted(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "acc",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},"
                                         "\"params\":[1,1],\"dtype\":\"float64\","
                                         "\"mode\":{\"type\":\"async\",\"accumulate\":2}}",
                                         &e),
                     1);
    double g1[2] = {1, 2}, g2[2] = {3, 6}, p[2] = {-7, -7};
    long long st = -1;
    assert_int_equal(optd_step_f64(s->c, "acc", g1, 2, NULL, p, &st, &e), 1);
    assert_int_equal(st, 0);
    assert_true(p[0] == -7 && p[1] == -7);
    assert_int_equal(optd_step_f64(s->c, "acc", g2, 2, NULL, p, &st, &e), 0);
    assert_int_equal(st, 1);
    /* the mean of the two gradients, applied once */
    assert_true(p[0] == 1 - 0.5 * 2.0 && p[1] == 1 - 0.5 * 4.0);
}

/* A stale gradient's 409 carries the session's step in the problem. */
static void test_stale_error_carries_step(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "stale",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},"
                                         "\"params\":[1],\"mode\":{\"type\":\"async\","
                                         "\"max_staleness\":1}}",
                                         &e),
                     1);
    float g = 1, p;
    long long st;
    for (int i = 0; i < 3; i++)
        assert_int_equal(optd_step_f32(s->c, "stale", &g, 1, NULL, &p, &st, &e), 0);
    optd_step_opts o = optd_step_opts_default();
    o.base_step = 0; /* 3 behind, the bound is 1 */
    assert_int_equal(optd_step_f32_opts(s->c, "stale", &g, 1, NULL, &o, &p, &st, NULL, &e), -1);
    assert_int_equal(e.status, 409);
    assert_string_equal(e.field, "base_step");
    assert_int_equal(e.step, 3);
    o.base_step = 2;
    assert_int_equal(optd_step_f32_opts(s->c, "stale", &g, 1, NULL, &o, &p, &st, NULL, &e), 0);
    assert_int_equal(st, 4);
}

static void test_raw_request_headers(void **state)
{
    suite *s = *state;
    optd_error e;
    assert_int_equal(optd_create_session(s->c, "raw",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},"
                                         "\"params\":[1,2],\"dtype\":\"float64\"}",
                                         &e),
                     1);
    const char *h[] = {"Accept: application/octet-stream", NULL};
    optd_response r;
    assert_int_equal(optd_request(s->c, "GET", "/v1/sessions/raw/params", h, NULL, 0, &r), 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, 16);
    /* header names are case-insensitive */
    assert_non_null(optd_response_header(&r, "optd-step"));
    assert_string_equal(optd_response_header(&r, "OPTD-STEP"), "0");
    assert_null(optd_response_header(&r, "Optd-Nothing"));
    assert_non_null(strstr(r.content_type, "application/octet-stream"));
    optd_response_free(&r);

    assert_int_equal(optd_request(s->c, "GET", "/v1/nope", NULL, NULL, 0, &r), 0);
    optd_error_from_response(&r, &e);
    assert_int_equal(e.status, 404);
    assert_string_equal(e.type, "urn:optd:problem:not-found");
    optd_response_free(&r);
}

static void test_api_key(void **state)
{
    (void)state;
    tdaemon d;
    const char *args[] = {"--api-key", "k-123", NULL};
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    optd_client *with = optd_client_new(tdaemon_url(&d), "k-123");
    optd_client *without = optd_client_new(tdaemon_url(&d), NULL);
    optd_error e;
    const char *cfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"params\":[1]}";
    assert_int_equal(optd_create_session(without, "k", cfg, &e), -1);
    assert_int_equal(e.status, 401);
    assert_string_equal(e.type, "urn:optd:problem:unauthorized");
    assert_int_equal(optd_create_session(with, "k", cfg, &e), 1);
    float g = 1, p;
    long long st;
    assert_int_equal(optd_step_f32(with, "k", &g, 1, NULL, &p, &st, &e), 0);
    assert_true(p == 0.0f);
    optd_client_free(with);
    optd_client_free(without);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* https:// with optd_client_set_tls against a daemon that requires client
 * certificates (tests/support/make_test_ca.sh makes them for the test). */
static void test_tls_mutual(void **state)
{
    (void)state;
    char dir[] = "/tmp/optd-c-tls-XXXXXX", cmd[256], f[6][300];
    assert_non_null(mkdtemp(dir));
    snprintf(cmd, sizeof cmd, "sh tests/support/make_test_ca.sh %s", dir);
    assert_int_equal(system(cmd), 0);
    const char *names[] = {"ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                           "other-ca.pem"};
    for (int i = 0; i < 6; i++)
        snprintf(f[i], sizeof f[i], "%s/%s", dir, names[i]);
    const char *args[] = {"--tls-cert", f[1], "--tls-key", f[2], "--tls-client-ca", f[0], NULL};
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    assert_memory_equal(tdaemon_url(&d), "https://", 8);
    optd_error e;
    const char *cfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2],"
                      "\"dtype\":\"float64\"}";

    optd_client *good = optd_client_new(tdaemon_url(&d), NULL);
    assert_int_equal(optd_client_set_tls(good, f[0], f[3], f[4]), 0);
    assert_int_equal(optd_create_session(good, "tls", cfg, &e), 1);
    double g[2] = {1, 1}, p[2];
    long long st;
    assert_int_equal(optd_step_f64(good, "tls", g, 2, NULL, p, &st, &e), 0);
    assert_true(p[0] == 0.5 && p[1] == 1.5);
    assert_int_equal(st, 1);
    assert_int_equal(optd_get_params_f64(good, "tls", p, 2, &st, &e), 0);
    assert_true(p[0] == 0.5 && p[1] == 1.5);

    /* The wrong CA: no answer, reported at once (not retried). */
    optd_client *wrong = optd_client_new(tdaemon_url(&d), NULL);
    assert_int_equal(optd_client_set_tls(wrong, f[5], f[3], f[4]), 0);
    optd_client_set_retry(wrong, 4, 300, 1000);
    long long t0 = tapi_now_ms();
    assert_null(optd_get_session(wrong, "tls", &e));
    assert_true(tapi_now_ms() - t0 < 300);
    assert_int_equal(e.status, 0);
    assert_non_null(strstr(e.detail, "certificate"));
    /* No client certificate: the handshake is refused. */
    optd_client *nocert = optd_client_new(tdaemon_url(&d), NULL);
    assert_int_equal(optd_client_set_tls(nocert, f[0], NULL, NULL), 0);
    optd_client_set_retry(nocert, 1, 0, 0);
    assert_null(optd_get_session(nocert, "tls", &e));
    assert_int_equal(e.status, 0);
    /* A certificate without its key is refused and changes nothing. */
    assert_int_equal(optd_client_set_tls(good, f[0], f[3], NULL), -1);
    assert_int_equal(optd_get_params_f64(good, "tls", p, 2, &st, &e), 0);

    optd_client_free(good);
    optd_client_free(wrong);
    optd_client_free(nocert);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

/* Tokens: minted, listed (never a secret), used, refused outside their
 * scope and prefix, revoked. */
static void test_tokens(void **state)
{
    (void)state;
    tdaemon d;
    const char *args[] = {"--api-key", "k-admin", NULL};
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    optd_client *admin = optd_client_new(tdaemon_url(&d), "k-admin");
    optd_error e;
    char id[OPTD_TOKEN_ID_SIZE], secret[OPTD_TOKEN_SIZE];
    assert_int_equal(optd_create_token(admin, "{\"scopes\":[\"step\"],\"prefix\":\"c-\"}", id,
                                       secret, &e),
                     0);
    assert_int_equal(strlen(id), 16);
    assert_int_equal(strlen(secret), 86);
    assert_true(strncmp(secret, "optd_", 5) == 0 && strncmp(secret + 5, id, 16) == 0);
    char *list = optd_tokens(admin, NULL, &e);
    assert_non_null(list);
    assert_non_null(strstr(list, id));
    assert_null(strstr(list, secret + 22));
    free(list);
    char *one = optd_tokens(admin, id, &e);
    assert_non_null(one);
    assert_non_null(strstr(one, "\"usage\""));
    free(one);
    assert_int_equal(optd_create_session(admin, "c-a",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},"
                                         "\"params\":[1]}",
                                         &e),
                     1);
    optd_client *worker = optd_client_new(tdaemon_url(&d), secret);
    float g = 1, p;
    long long st;
    assert_int_equal(optd_step_f32(worker, "c-a", &g, 1, NULL, &p, &st, &e), 0);
    assert_true(p == 0.0f);
    assert_int_equal(optd_delete(worker, "c-a", &e), -1);
    assert_int_equal(e.status, 403);
    assert_string_equal(e.field, "scope");
    assert_string_equal(e.type, "urn:optd:problem:forbidden");
    assert_null(optd_tokens(worker, NULL, &e));
    assert_int_equal(e.status, 403);
    assert_int_equal(optd_step_f32(worker, "elsewhere", &g, 1, NULL, &p, &st, &e), -1);
    assert_int_equal(e.status, 403);
    assert_string_equal(e.field, "prefix");
    assert_int_equal(optd_revoke_token(admin, id, &e), 0);
    assert_int_equal(optd_step_f32(worker, "c-a", &g, 1, NULL, &p, &st, &e), -1);
    assert_int_equal(e.status, 401);
    assert_int_equal(optd_revoke_token(admin, "0123456789abcdef", &e), -1);
    assert_int_equal(e.status, 404);
    optd_client_free(worker);
    optd_client_free(admin);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* A token of 2 steps per second (burst 1): with retries the client waits
 * each 429's Retry-After out and every step of a burst lands, no faster
 * than the rate allows; with one attempt the caller sees the 429 and its
 * retry_after.  A session quota's 429 (Retry-After 60) comes back at once. */
static void test_retry_after(void **state)
{
    (void)state;
    tdaemon d;
    const char *args[] = {"--api-key", "k-admin", NULL};
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    optd_client *admin = optd_client_new(tdaemon_url(&d), "k-admin");
    optd_error e;
    char id[OPTD_TOKEN_ID_SIZE], secret[OPTD_TOKEN_SIZE];
    assert_int_equal(optd_create_token(admin,
                                       "{\"scopes\":[\"step\"],\"prefix\":\"r-\","
                                       "\"quotas\":{\"steps_per_second\":2,\"burst\":1}}",
                                       id, secret, &e),
                     0);
    const char *cfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"params\":[0]}";
    assert_int_equal(optd_create_session(admin, "r-a", cfg, &e), 1);

    optd_client *hasty = optd_client_new(tdaemon_url(&d), secret);
    optd_client_set_retry(hasty, 1, 50, 2000);
    float g = 1, p;
    long long st = 0;
    assert_int_equal(optd_step_f32(hasty, "r-a", &g, 1, NULL, &p, &st, &e), 0);
    assert_int_equal(st, 1);
    assert_int_equal(e.retry_after, 0);
    assert_int_equal(optd_step_f32(hasty, "r-a", &g, 1, NULL, &p, &st, &e), -1);
    assert_int_equal(e.status, 429);
    assert_string_equal(e.type, "urn:optd:problem:too-many-requests");
    assert_string_equal(e.field, "");
    assert_true(e.retry_after >= 1 && e.retry_after <= OPTD_RETRY_AFTER_MAX_S);

    optd_client *patient = optd_client_new(tdaemon_url(&d), secret);
    /* A backoff of 1 ms: only waiting out Retry-After gets the steps in. */
    optd_client_set_retry(patient, OPTD_DEFAULT_RETRIES + 1, 1, 1);
    long long t0 = tapi_now_ms();
    for (int i = 0; i < 4; i++) {
        assert_int_equal(optd_step_f32(patient, "r-a", &g, 1, NULL, &p, &st, &e), 0);
        assert_int_equal(st, 2 + i);
    }
    /* Four steps from a bucket of at most one: three waits of 0.5 s. */
    assert_true(tapi_now_ms() - t0 >= 1500);
    assert_true(p == -5.0f);

    assert_int_equal(optd_create_token(admin,
                                       "{\"scopes\":[\"admin\"],\"prefix\":\"q-\","
                                       "\"quotas\":{\"max_sessions\":1}}",
                                       id, secret, &e),
                     0);
    optd_client *owner = optd_client_new(tdaemon_url(&d), secret);
    assert_int_equal(optd_create_session(owner, "q-1", cfg, &e), 1);
    t0 = tapi_now_ms();
    assert_int_equal(optd_create_session(owner, "q-2", cfg, &e), -1);
    assert_true(tapi_now_ms() - t0 < 5000);
    assert_int_equal(e.status, 429);
    assert_string_equal(e.field, "max_sessions");
    assert_int_equal(e.retry_after, 60);
    assert_null(optd_get_session(admin, "q-2", &e));
    assert_int_equal(e.status, 404);
    assert_int_equal(e.retry_after, 0);

    optd_client_free(owner);
    optd_client_free(patient);
    optd_client_free(hasty);
    optd_client_free(admin);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* Nobody listening: the client tries max_attempts times, backing off. */
static void test_retry_gives_up(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    char url[64];
    snprintf(url, sizeof url, "%s", tdaemon_url(&d));
    assert_int_equal(tdaemon_stop(&d), 0);
    optd_client *c = optd_client_new(url, NULL);
    optd_client_set_retry(c, 4, 40, 1000);
    optd_error e;
    long long t0 = tapi_now_ms();
    assert_null(optd_get_session(c, "x", &e));
    long long ms = tapi_now_ms() - t0;
    assert_int_equal(e.status, 0);
    assert_true(strlen(e.detail) > 0);
    /* waits 40 + 80 + 160 ms between the 4 attempts */
    if (ms < 280 || ms > 5000)
        fail_msg("4 attempts took %lld ms; expected about 280", ms);
    optd_client_set_retry(c, 1, 40, 1000);
    t0 = tapi_now_ms();
    assert_null(optd_get_session(c, "x", &e));
    assert_true(tapi_now_ms() - t0 < 200);
    optd_client_free(c);
    tdaemon_cleanup(&d);
}

typedef struct {
    const char *url;
    int rc;
    long long step;
    int replayed;
    double p;
    optd_error e;
} retry_job;

static void *retry_main(void *arg)
{
    retry_job *j = arg;
    optd_client *c = optd_client_new(j->url, NULL);
    optd_client_set_retry(c, 40, 25, 200);
    double g = 1;
    j->rc = optd_step_f64_opts(c, "through", &g, 1, NULL, NULL, &j->p, &j->step, &j->replayed,
                               &j->e);
    optd_client_free(c);
    return NULL;
}

/* The daemon is down when the step starts and back 300 ms later: the
 * client's retries carry the step through, applied once. */
static void test_retry_across_restart(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = optd_client_new(tdaemon_url(&d), NULL);
    optd_error e;
    assert_int_equal(optd_create_session(c, "through",
                                         "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},"
                                         "\"params\":[10],\"dtype\":\"float64\"}",
                                         &e),
                     1);
    optd_client_free(c);
    char url[64];
    snprintf(url, sizeof url, "%s", tdaemon_url(&d));
    assert_int_equal(tdaemon_kill9(&d), 0);

    retry_job j = {.url = url};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, retry_main, &j), 0);
    struct timespec ts = {0, 300 * 1000000L};
    nanosleep(&ts, NULL);
    /* restart asks for the same port, so the client's URL stays valid */
    assert_int_equal(tdaemon_restart(&d), 0);
    assert_string_equal(tdaemon_url(&d), url);
    pthread_join(th, NULL);
    if (j.rc != 0)
        fail_msg("step through a restart: %d %s", j.e.status, j.e.detail);
    assert_int_equal(j.step, 1);
    assert_true(j.p == 9);

    c = optd_client_new(tdaemon_url(&d), NULL);
    double p;
    long long st;
    assert_int_equal(optd_get_params_f64(c, "through", &p, 1, &st, &e), 0);
    assert_int_equal(st, 1);
    assert_true(p == 9);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* A relay in front of the daemon that passes requests through and
 * replaces the value of the answers' Optd-Params-Crc32 with "0badf00d":
 * params that are not the ones the daemon sent, as far as a client can
 * tell.  One request per connection. */
typedef struct {
    int lfd;
    int port, upstream;
    int unavailable; /* the first this many requests get a 503 of the relay's own */
    int retry_after; /* ... whose Retry-After this is */
    pthread_t t;
} relay;

/* Reads one HTTP message (head + Content-Length body) into buf; its length
 * or -1. */
static ssize_t read_message(int fd, char *buf, size_t cap)
{
    size_t len = 0;
    for (;;) {
        ssize_t k = read(fd, buf + len, cap - 1 - len);
        if (k <= 0)
            return -1;
        len += (size_t)k;
        buf[len] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        size_t need = (size_t)(end + 4 - buf);
        for (char *p = buf; p < end; p++)
            if (strncasecmp(p, "\r\ncontent-length:", 17) == 0)
                need += strtoul(p + 17, NULL, 10);
        if (len >= need)
            return (ssize_t)len;
    }
}

static void *relay_main(void *arg)
{
    relay *rl = arg;
    static char buf[1 << 20];
    for (;;) {
        int cfd = accept(rl->lfd, NULL, NULL);
        if (cfd < 0)
            return NULL;
        ssize_t n = read_message(cfd, buf, sizeof buf);
        if (n > 0 && rl->unavailable > 0) {
            rl->unavailable--;
            static const char body[] = "{\"type\":\"urn:optd:problem:unavailable\","
                                       "\"title\":\"Service Unavailable\",\"status\":503,"
                                       "\"detail\":\"injected by the test relay\"}";
            int hl = snprintf(buf, sizeof buf,
                              "HTTP/1.1 503 Service Unavailable\r\n"
                              "Content-Type: application/problem+json\r\nRetry-After: %d\r\n"
                              "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                              rl->retry_after, sizeof body - 1, body);
            if (write(cfd, buf, (size_t)hl) != hl)
                hl = -1;
            close(cfd);
            continue;
        }
        int ufd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)rl->upstream)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (n > 0 && ufd >= 0 && connect(ufd, (struct sockaddr *)&a, sizeof a) == 0 &&
            write(ufd, buf, (size_t)n) == n && (n = read_message(ufd, buf, sizeof buf)) > 0) {
            for (char *h = buf; h + 29 < buf + n; h++)
                if (strncasecmp(h, "\r\nOptd-Params-Crc32: ", 21) == 0) {
                    memcpy(h + 21, "0badf00d", 8);
                    break;
                }
            if (write(cfd, buf, (size_t)n) != n)
                n = -1;
        }
        if (ufd >= 0)
            close(ufd);
        close(cfd);
    }
}

static void relay_start_unavailable(relay *rl, int upstream, int unavailable, int retry_after)
{
    rl->upstream = upstream;
    rl->unavailable = unavailable;
    rl->retry_after = retry_after;
    rl->lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(rl->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    assert_int_equal(bind(rl->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(rl->lfd, 8), 0);
    assert_int_equal(getsockname(rl->lfd, (struct sockaddr *)&a, &al), 0);
    rl->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&rl->t, NULL, relay_main, rl), 0);
}

static void relay_start(relay *rl, int upstream)
{
    relay_start_unavailable(rl, upstream, 0, 0);
}

static void relay_stop(relay *rl)
{
    shutdown(rl->lfd, SHUT_RDWR);
    close(rl->lfd);
    pthread_join(rl->t, NULL);
}

static void test_params_digest(void **state)
{
    suite *s = *state;
    const char *cfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2,3]}";
    optd_error e;
    assert_true(optd_create_session(s->c, "digest", cfg, &e) >= 0);
    float g[3] = {0.5f, -1.0f, 2.0f}, p[3];
    long long step;
    /* straight from the daemon: verified, in both forms */
    optd_step_opts o = optd_step_opts_default();
    for (int js = 0; js < 2; js++) {
        o.json = js;
        assert_int_equal(optd_step_f32_opts(s->c, "digest", g, 3, NULL, &o, p, &step, NULL, &e),
                         0);
    }
    assert_int_equal(optd_get_params_f32(s->c, "digest", p, 3, &step, &e), 0);
    optd_response r;
    const char *acc[] = {"Accept: application/octet-stream", NULL};
    assert_int_equal(optd_request(s->c, "GET", "/v1/sessions/digest/params", acc, NULL, 0, &r), 0);
    char want[16];
    snprintf(want, sizeof want, "%08lx", (unsigned long)crc32(0, (const Bytef *)r.body,
                                                             (uInt)r.len));
    assert_string_equal(optd_response_header(&r, OPTD_HEADER_PARAMS_CRC32), want);
    optd_response_free(&r);

    /* through a relay that alters the digest: a typed error */
    relay rl;
    relay_start(&rl, s->d.port);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", rl.port);
    optd_client *c = tapi_client(url, NULL, false);
    assert_int_equal(optd_get_params_f32(c, "digest", p, 3, &step, &e), -1);
    assert_string_equal(e.type, OPTD_ERROR_DIGEST_MISMATCH);
    assert_string_equal(optd_error_kind(&e), "digest_mismatch");
    assert_int_equal(e.status, 200);
    for (int js = 0; js < 2; js++) {
        o.json = js;
        assert_int_equal(optd_step_f32_opts(c, "digest", g, 3, NULL, &o, p, &step, NULL, &e), -1);
        assert_string_equal(optd_error_kind(&e), "digest_mismatch");
    }
    optd_client_set_params_check(c, 0);
    assert_int_equal(optd_get_params_f32(c, "digest", p, 3, &step, &e), 0);
    optd_client_free(c);
    relay_stop(&rl);
}

/* 503 answers naming a Retry-After (from the relay) are retried after it,
 * not after the backoff; out of attempts, the 503 comes back with its
 * retry_after. */
static void test_retry_after_503(void **state)
{
    suite *s = *state;
    const char *cfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"params\":[0]}";
    optd_error e;
    assert_true(optd_create_session(s->c, "busy", cfg, &e) >= 0);
    float g = 1, p;
    long long st;
    char url[64];

    relay rl;
    relay_start_unavailable(&rl, s->d.port, 2, 1);
    snprintf(url, sizeof url, "http://127.0.0.1:%d", rl.port);
    optd_client *c = optd_client_new(url, NULL);
    optd_client_set_params_check(c, 0); /* the relay alters the digest */
    optd_client_set_retry(c, 3, 1, 1);
    long long t0 = tapi_now_ms();
    if (optd_step_f32(c, "busy", &g, 1, NULL, &p, &st, &e) != 0)
        fail_msg("step after two 503s: %d %s", e.status, e.detail);
    long long ms = tapi_now_ms() - t0;
    if (ms < 2000)
        fail_msg("two 503s with Retry-After 1 were retried within %lld ms", ms);
    assert_int_equal(st, 1);
    assert_true(p == -1.0f);
    optd_client_free(c);
    relay_stop(&rl);

    relay_start_unavailable(&rl, s->d.port, 1, 1);
    snprintf(url, sizeof url, "http://127.0.0.1:%d", rl.port);
    c = optd_client_new(url, NULL);
    optd_client_set_retry(c, 1, 1, 1);
    t0 = tapi_now_ms();
    assert_int_equal(optd_step_f32(c, "busy", &g, 1, NULL, &p, &st, &e), -1);
    assert_true(tapi_now_ms() - t0 < 900);
    assert_int_equal(e.status, 503);
    assert_int_equal(e.retry_after, 1);
    assert_string_equal(optd_error_kind(&e), "unavailable");
    optd_client_free(c);
    relay_stop(&rl);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idempotency_keys),
        cmocka_unit_test(test_create_verify_conflict),
        cmocka_unit_test(test_steps_binary_and_json_agree),
        cmocka_unit_test(test_step_f64_with_options),
        cmocka_unit_test(test_tensors_groups_absent),
        cmocka_unit_test(test_idempotency_key_reuse),
        cmocka_unit_test(test_params_get_set),
        cmocka_unit_test(test_update_and_delete),
        cmocka_unit_test(test_time_travel),
        cmocka_unit_test(test_accumulate_accepted),
        cmocka_unit_test(test_stale_error_carries_step),
        cmocka_unit_test(test_raw_request_headers),
        cmocka_unit_test(test_api_key),
        cmocka_unit_test(test_tls_mutual),
        cmocka_unit_test(test_tokens),
        cmocka_unit_test(test_retry_after),
        cmocka_unit_test(test_retry_gives_up),
        cmocka_unit_test(test_retry_across_restart),
        cmocka_unit_test(test_params_digest),
        cmocka_unit_test(test_retry_after_503),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
