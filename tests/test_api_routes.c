/*
 * test_api_routes.c -- every route of the v1 contract against the real
 * daemon on a real SQLite file: create-or-verify, get, list paging, patch,
 * delete, JSON and binary steps, idempotent replays, params get/put, and
 * bit-exact JSON number round trips.
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
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

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

static const char *const JSON_ACCEPT[] = {"Accept: application/json", NULL};
static const char *const BIN_IO[] = {"Content-Type: application/octet-stream",
                                     "Accept: application/octet-stream", NULL};

static const cJSON *member(const cJSON *o, const char *name)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!m)
        fail_msg("missing member \"%s\"", name);
    return m;
}

/* --------------------------------------------------------------- tests */

static void test_healthz(void **state)
{
    suite *s = *state;
    optd_response r = tapi_req(s->c, "GET", "/healthz", NULL, NULL);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
}

static bool has_type(const cJSON *arr, const char *type)
{
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "type");
        if (cJSON_IsString(t) && strcmp(t->valuestring, type) == 0)
            return true;
    }
    return false;
}

static void test_optimizers_catalogue(void **state)
{
    suite *s = *state;
    optd_response r = tapi_req(s->c, "GET", "/v1/optimizers", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    const cJSON *opts = member(j, "optimizers");
    assert_true(cJSON_IsArray(opts));
    static const char *const names[] = {"sgd",   "adagrad", "rmsprop", "adam",
                                        "adamw", "adamax",  "adadelta", "nadam",
                                        "radam", "asgd",    "rprop"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!has_type(opts, names[i]))
            fail_msg("/v1/optimizers lacks %s", names[i]);
    /* Adam's defaults are torch's. */
    const cJSON *e;
    bool seen = false;
    cJSON_ArrayForEach(e, opts)
    {
        if (strcmp(tapi_str(e, "type"), "adam") != 0)
            continue;
        const cJSON *hp;
        cJSON_ArrayForEach(hp, member(e, "hyperparameters"))
        {
            const char *n = tapi_str(hp, "name");
            if (strcmp(n, "lr") == 0) {
                assert_true(tapi_num(hp, "default") == 0.001);
                seen = true;
            } else if (strcmp(n, "betas") == 0) {
                const cJSON *d = member(hp, "default");
                assert_int_equal(cJSON_GetArraySize(d), 2);
                assert_true(cJSON_GetArrayItem(d, 0)->valuedouble == 0.9);
                assert_true(cJSON_GetArrayItem(d, 1)->valuedouble == 0.999);
            }
        }
    }
    assert_true(seen);
    assert_true(cJSON_GetArraySize(member(j, "schedules")) > 0);
    const cJSON *clips = member(j, "clips");
    assert_true(has_type(clips, "norm"));
    assert_true(has_type(clips, "value"));
    cJSON_Delete(j);
    optd_response_free(&r);
}

static cJSON *get_session(suite *s, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(s->c, "GET", path, NULL, NULL);
    if (r.status != 200)
        fail_msg("GET %s: %d %.*s", path, r.status, (int)r.len, r.body);
    assert_non_null(strstr(r.content_type, "application/json"));
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    return j;
}

static void test_create_verify_get(void **state)
{
    suite *s = *state;
    const char *body = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3],"
                       "\"dtype\":\"float64\"}";
    tapi_create(s->c, "cv", body, 201);
    /* The same config again: 200, nothing changes. */
    tapi_create(s->c, "cv", body, 200);
    /* Spelling the defaults out is still the same config. */
    tapi_create(s->c, "cv",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1,\"momentum\":0,\"weight_decay\":0},"
                "\"params\":[1,2,3],\"dtype\":\"float64\"}",
                200);

    cJSON *j = get_session(s, "cv");
    assert_string_equal(tapi_str(j, "name"), "cv");
    assert_string_equal(tapi_str(j, "dtype"), "float64");
    assert_int_equal((long long)tapi_num(j, "size"), 3);
    assert_int_equal((long long)tapi_num(j, "step"), 0);
    assert_true(tapi_num(j, "lr") == 0.1);
    const cJSON *opt = member(j, "optimizer");
    assert_string_equal(tapi_str(opt, "type"), "sgd");
    assert_true(tapi_num(opt, "lr") == 0.1);
    /* every default filled in */
    assert_true(tapi_num(opt, "momentum") == 0);
    assert_true(tapi_num(opt, "dampening") == 0);
    assert_true(tapi_num(opt, "weight_decay") == 0);
    assert_true(cJSON_IsFalse(member(opt, "nesterov")));
    assert_true(cJSON_IsFalse(member(opt, "maximize")));
    member(j, "schedule");
    member(j, "clip");
    member(j, "mode");
    member(j, "metadata");
    bool created = cJSON_GetObjectItemCaseSensitive(j, "created") ||
                   cJSON_GetObjectItemCaseSensitive(j, "created_at");
    bool updated = cJSON_GetObjectItemCaseSensitive(j, "updated") ||
                   cJSON_GetObjectItemCaseSensitive(j, "updated_at");
    if (!created || !updated)
        fail_msg("GET session lacks created/updated timestamps");
    cJSON_Delete(j);

    /* Defaults of another optimizer: Adam's torch defaults. */
    tapi_create(s->c, "cv-adam", "{\"optimizer\":{\"type\":\"adam\"},\"size\":4,\"init\":{\"type\":\"zeros\"}}",
                201);
    j = get_session(s, "cv-adam");
    assert_string_equal(tapi_str(j, "dtype"), "float32");
    opt = member(j, "optimizer");
    assert_true(tapi_num(opt, "lr") == 0.001);
    assert_true(tapi_num(opt, "eps") == 1e-8);
    assert_true(tapi_num(opt, "weight_decay") == 0);
    assert_true(cJSON_IsFalse(member(opt, "amsgrad")));
    const cJSON *betas = member(opt, "betas");
    assert_int_equal(cJSON_GetArraySize(betas), 2);
    assert_true(cJSON_GetArrayItem(betas, 0)->valuedouble == 0.9);
    assert_true(cJSON_GetArrayItem(betas, 1)->valuedouble == 0.999);
    cJSON_Delete(j);
}

static void get_f32(suite *s, const char *name, float *out, size_t n)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s/params", name);
    const char *h[] = {"Accept: application/octet-stream", NULL};
    optd_response r = tapi_req(s->c, "GET", path, h, NULL);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.content_type, "application/octet-stream"));
    assert_int_equal(r.len, n * sizeof(float));
    memcpy(out, r.body, r.len);
    optd_response_free(&r);
}

static void test_create_init(void **state)
{
    suite *s = *state;
    enum { N = 1000 };
    static float a[N], b[N], c[N];
    tapi_create(s->c, "init-n1",
                "{\"optimizer\":{\"type\":\"adam\"},\"size\":1000,"
                "\"init\":{\"type\":\"normal\",\"std\":0.1,\"seed\":1}}",
                201);
    tapi_create(s->c, "init-n1b",
                "{\"optimizer\":{\"type\":\"adam\"},\"size\":1000,"
                "\"init\":{\"type\":\"normal\",\"std\":0.1,\"seed\":1}}",
                201);
    tapi_create(s->c, "init-n2",
                "{\"optimizer\":{\"type\":\"adam\"},\"size\":1000,"
                "\"init\":{\"type\":\"normal\",\"std\":0.1,\"seed\":2}}",
                201);
    get_f32(s, "init-n1", a, N);
    get_f32(s, "init-n1b", b, N);
    get_f32(s, "init-n2", c, N);
    /* A seed gives the same vector every time; another seed another one. */
    assert_memory_equal(a, b, sizeof a);
    assert_memory_not_equal(a, c, sizeof a);
    double sum = 0, sq = 0;
    for (int i = 0; i < N; i++) {
        sum += a[i];
        sq += (double)a[i] * a[i];
    }
    double mean = sum / N, sd = sqrt(sq / N - mean * mean);
    if (fabs(mean) > 0.02 || sd < 0.09 || sd > 0.11)
        fail_msg("normal(std 0.1) init has mean %g, std %g", mean, sd);

    tapi_create(s->c, "init-z", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"size\":1000,\"init\":{\"type\":\"zeros\"}}",
                201);
    get_f32(s, "init-z", a, N);
    for (int i = 0; i < N; i++)
        assert_true(a[i] == 0.0f);

    tapi_create(s->c, "init-u",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"size\":1000,"
                "\"init\":{\"type\":\"uniform\",\"low\":-0.5,\"high\":0.25,\"seed\":7}}",
                201);
    get_f32(s, "init-u", a, N);
    float lo = 1, hi = -1;
    for (int i = 0; i < N; i++) {
        assert_true(a[i] >= -0.5f && a[i] <= 0.25f);
        lo = a[i] < lo ? a[i] : lo;
        hi = a[i] > hi ? a[i] : hi;
    }
    assert_true(lo < -0.45f && hi > 0.2f); /* it spans the range */
}

static void test_list_paging(void **state)
{
    suite *s = *state;
    const char *names[] = {"page-a", "page-b", "page-c", "page-d", "page-e"};
    for (int i = 0; i < 5; i++)
        tapi_create(s->c, names[i], "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[0]}", 201);
    char after[200] = "";
    char prev[200] = "";
    int seen = 0, pages = 0;
    for (;;) {
        char path[300];
        if (after[0])
            snprintf(path, sizeof path, "/v1/sessions?limit=2&after=%s", after);
        else
            snprintf(path, sizeof path, "/v1/sessions?limit=2");
        optd_response r = tapi_req(s->c, "GET", path, NULL, NULL);
        assert_int_equal(r.status, 200);
        cJSON *j = tapi_json(&r);
        const cJSON *list = member(j, "sessions");
        assert_true(cJSON_IsArray(list));
        assert_true(cJSON_GetArraySize(list) <= 2);
        const cJSON *e;
        cJSON_ArrayForEach(e, list)
        {
            const char *n = cJSON_IsString(e) ? e->valuestring : tapi_str(e, "name");
            /* by name, each once */
            assert_true(strcmp(n, prev) > 0);
            snprintf(prev, sizeof prev, "%s", n);
            for (int i = 0; i < 5; i++)
                if (strcmp(n, names[i]) == 0)
                    seen |= 1 << i;
        }
        const cJSON *next = member(j, "next");
        pages++;
        assert_true(pages < 100);
        if (cJSON_IsNull(next)) {
            cJSON_Delete(j);
            optd_response_free(&r);
            break;
        }
        assert_true(cJSON_IsString(next));
        assert_true(cJSON_GetArraySize(list) == 2);
        snprintf(after, sizeof after, "%s", next->valuestring);
        cJSON_Delete(j);
        optd_response_free(&r);
    }
    assert_int_equal(seen, 31);
    assert_true(pages >= 3);

    /* after= past every name: an empty page, next null. */
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions?after=zzzz", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    assert_int_equal(cJSON_GetArraySize(member(j, "sessions")), 0);
    assert_true(cJSON_IsNull(member(j, "next")));
    cJSON_Delete(j);
    optd_response_free(&r);
}

/* One JSON step; returns the parsed answer (cJSON_Delete it). */
static cJSON *step_json(suite *s, const char *name, const char *body, const char *query)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s/step%s", name, query ? query : "");
    optd_response r = tapi_req(s->c, "POST", path, JSON_ACCEPT, body);
    if (r.status != 200)
        fail_msg("POST %s: %d %.*s", path, r.status, (int)r.len, r.body);
    assert_non_null(strstr(r.content_type, "application/json"));
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    return j;
}

static void test_patch(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "patch",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2],\"dtype\":\"float64\"}",
                201);
    optd_response r = tapi_req(s->c, "PATCH", "/v1/sessions/patch", NULL,
                               "{\"optimizer\":{\"lr\":0.5},\"metadata\":{\"run\":\"x7\"}}");
    if (r.status < 200 || r.status > 299)
        fail_msg("PATCH: %d %.*s", r.status, (int)r.len, r.body);
    optd_response_free(&r);
    cJSON *j = get_session(s, "patch");
    assert_true(tapi_num(j, "lr") == 0.5);
    assert_true(tapi_num(member(j, "optimizer"), "lr") == 0.5);
    assert_string_equal(tapi_str(member(j, "metadata"), "run"), "x7");
    assert_string_equal(tapi_str(member(j, "optimizer"), "type"), "sgd");
    cJSON_Delete(j);

    /* The next step uses the new lr. */
    j = step_json(s, "patch", "{\"grad\":[1,-2]}", NULL);
    assert_true(tapi_num(j, "lr") == 0.5);
    const cJSON *p = member(j, "params");
    assert_true(cJSON_GetArrayItem(p, 0)->valuedouble == 1.0 - 0.5 * 1.0);
    assert_true(cJSON_GetArrayItem(p, 1)->valuedouble == 2.0 - 0.5 * -2.0);
    cJSON_Delete(j);

    /* A schedule added mid-run shows in GET. */
    r = tapi_req(s->c, "PATCH", "/v1/sessions/patch", NULL,
                 "{\"clip\":{\"type\":\"norm\",\"max_norm\":1.0}}");
    if (r.status < 200 || r.status > 299)
        fail_msg("PATCH clip: %d %.*s", r.status, (int)r.len, r.body);
    optd_response_free(&r);
    j = get_session(s, "patch");
    assert_string_equal(tapi_str(member(j, "clip"), "type"), "norm");
    assert_int_equal((long long)tapi_num(j, "step"), 1);
    cJSON_Delete(j);
}

static void test_delete(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "del", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2]}", 201);
    cJSON *j = step_json(s, "del", "{\"grad\":[1,1]}", NULL);
    cJSON_Delete(j);
    optd_response r = tapi_req(s->c, "DELETE", "/v1/sessions/del", NULL, NULL);
    assert_true(r.status == 200 || r.status == 204);
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/del", NULL, NULL);
    tapi_assert_problem(&r, 404, NULL);
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/del/params", NULL, NULL);
    tapi_assert_problem(&r, 404, NULL);
    optd_response_free(&r);
    /* The name is free again: a new session at step 0 with the new params. */
    tapi_create(s->c, "del", "{\"optimizer\":{\"type\":\"adam\"},\"params\":[5,6,7]}", 201);
    j = get_session(s, "del");
    assert_int_equal((long long)tapi_num(j, "step"), 0);
    assert_int_equal((long long)tapi_num(j, "size"), 3);
    cJSON_Delete(j);
}

static void test_step_json(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "sj",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3],\"dtype\":\"float64\"}",
                201);
    double p[3] = {1, 2, 3};
    const double g1[3] = {0.5, -1, 2};
    cJSON *j = step_json(s, "sj", "{\"grad\":[0.5,-1,2]}", NULL);
    assert_int_equal((long long)tapi_num(j, "step"), 1);
    assert_true(tapi_num(j, "lr") == 0.1);
    const cJSON *arr = member(j, "params");
    assert_int_equal(cJSON_GetArraySize(arr), 3);
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        p[i] = p[i] - 0.1 * g1[i];
        assert_true(e->valuedouble == p[i]);
        i++;
    }
    cJSON_Delete(j);

    /* loss and base_step ride along */
    j = step_json(s, "sj", "{\"grad\":[0.25,0.25,0.25],\"loss\":1.5,\"base_step\":1}", NULL);
    assert_int_equal((long long)tapi_num(j, "step"), 2);
    cJSON_Delete(j);

    /* ?params=false leaves the params out */
    j = step_json(s, "sj", "{\"grad\":[0,0,1]}", "?params=false");
    assert_int_equal((long long)tapi_num(j, "step"), 3);
    assert_null(cJSON_GetObjectItemCaseSensitive(j, "params"));
    cJSON_Delete(j);

    cJSON *sess = get_session(s, "sj");
    assert_int_equal((long long)tapi_num(sess, "step"), 3);
    cJSON_Delete(sess);
}

static void test_step_binary(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "sb", "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":16,"
                            "\"init\":{\"type\":\"normal\",\"std\":1,\"seed\":3}}",
                201);
    float g[16];
    for (int i = 0; i < 16; i++)
        g[i] = (float)(i - 8) / 7.0f;
    const char *h[] = {"Content-Type: application/octet-stream", "Accept: application/octet-stream",
                       "Optd-Loss: 0.75", NULL};
    for (int k = 1; k <= 3; k++) {
        optd_response r = tapi_req_bin(s->c, "POST", "/v1/sessions/sb/step", h, g, sizeof g);
        if (r.status != 200)
            fail_msg("binary step: %d %.*s", r.status, (int)r.len, r.body);
        assert_non_null(strstr(r.content_type, "application/octet-stream"));
        assert_int_equal(r.len, sizeof g);
        const char *st = optd_response_header(&r, "Optd-Step");
        const char *lr = optd_response_header(&r, "Optd-Lr");
        assert_non_null(st);
        assert_non_null(lr);
        assert_int_equal(atoll(st), k);
        assert_true(strtod(lr, NULL) == 0.01);
        /* The answer is the params the daemon now holds. */
        float now[16];
        get_f32(s, "sb", now, 16);
        assert_memory_equal(now, r.body, sizeof now);
        optd_response_free(&r);
    }
    /* ?params=false with binary: no params, the step in the header. */
    optd_response r =
        tapi_req_bin(s->c, "POST", "/v1/sessions/sb/step?params=false", h, g, sizeof g);
    assert_int_equal(r.status, 200);
    assert_int_equal(atoll(optd_response_header(&r, "Optd-Step")), 4);
    assert_true(r.len != sizeof g);
    optd_response_free(&r);
}

static void test_idempotent_replay(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "idem",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2],\"dtype\":\"float64\"}",
                201);
    const char *k1[] = {"Accept: application/json", "Idempotency-Key: 3f2a9c0d11e84b7f", NULL};
    optd_response r = tapi_req(s->c, "POST", "/v1/sessions/idem/step", k1, "{\"grad\":[1,1]}");
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    assert_int_equal((long long)tapi_num(j, "step"), 1);
    const char *rep = optd_response_header(&r, "Optd-Replayed");
    assert_true(!rep || strcmp(rep, "true") != 0);
    cJSON_Delete(j);
    optd_response_free(&r);
    tapi_snap before = tapi_snapshot(s->c, "idem");

    /* The same key with another gradient is a client bug: 422, nothing
     * applied.  The same request again is a retry: replayed. */
    r = tapi_req(s->c, "POST", "/v1/sessions/idem/step", k1, "{\"grad\":[5,5]}");
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    r = tapi_req(s->c, "POST", "/v1/sessions/idem/step", k1, "{\"grad\":[1,1]}");
    assert_int_equal(r.status, 200);
    rep = optd_response_header(&r, "Optd-Replayed");
    assert_non_null(rep);
    assert_string_equal(rep, "true");
    j = tapi_json(&r);
    assert_int_equal((long long)tapi_num(j, "step"), 1);
    cJSON_Delete(j);
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(s->c, "idem");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);

    /* The key's request was JSON: the same gradient sent in binary is
     * another request (the fingerprint covers the body as sent). */
    const char *kb[] = {"Content-Type: application/octet-stream",
                        "Accept: application/octet-stream", "Idempotency-Key: 3f2a9c0d11e84b7f",
                        NULL};
    double g[2] = {1, 1};
    r = tapi_req_bin(s->c, "POST", "/v1/sessions/idem/step", kb, g, sizeof g);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    after = tapi_snapshot(s->c, "idem");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    tapi_snap_free(&before);

    /* A new key applies. */
    const char *k2[] = {"Accept: application/json", "Idempotency-Key: 77aa", NULL};
    r = tapi_req(s->c, "POST", "/v1/sessions/idem/step", k2, "{\"grad\":[1,1]}");
    assert_int_equal(r.status, 200);
    j = tapi_json(&r);
    assert_int_equal((long long)tapi_num(j, "step"), 2);
    cJSON_Delete(j);
    optd_response_free(&r);

    /* Binary replay: Optd-Step is the recorded step. */
    const char *kb2[] = {"Content-Type: application/octet-stream",
                         "Accept: application/octet-stream", "Idempotency-Key: b-1", NULL};
    r = tapi_req_bin(s->c, "POST", "/v1/sessions/idem/step", kb2, g, sizeof g);
    assert_int_equal(r.status, 200);
    assert_int_equal(atoll(optd_response_header(&r, "Optd-Step")), 3);
    optd_response_free(&r);
    before = tapi_snapshot(s->c, "idem");
    r = tapi_req_bin(s->c, "POST", "/v1/sessions/idem/step", kb2, g, sizeof g);
    assert_int_equal(r.status, 200);
    assert_int_equal(atoll(optd_response_header(&r, "Optd-Step")), 3);
    assert_string_equal(optd_response_header(&r, "Optd-Replayed"), "true");
    optd_response_free(&r);
    after = tapi_snapshot(s->c, "idem");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    tapi_snap_free(&before);
}

static void test_params_get_put(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "pp",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3],\"dtype\":\"float64\"}",
                201);
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions/pp/params", JSON_ACCEPT, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    assert_int_equal((long long)tapi_num(j, "step"), 0);
    const cJSON *arr = member(j, "params");
    assert_int_equal(cJSON_GetArraySize(arr), 3);
    assert_true(cJSON_GetArrayItem(arr, 2)->valuedouble == 3.0);
    cJSON_Delete(j);
    optd_response_free(&r);

    /* PUT JSON, read binary */
    r = tapi_req(s->c, "PUT", "/v1/sessions/pp/params", NULL, "{\"params\":[4.5,-5,6e-300]}");
    if (r.status < 200 || r.status > 299)
        fail_msg("PUT params: %d %.*s", r.status, (int)r.len, r.body);
    optd_response_free(&r);
    const char *bin[] = {"Accept: application/octet-stream", NULL};
    r = tapi_req(s->c, "GET", "/v1/sessions/pp/params", bin, NULL);
    assert_int_equal(r.status, 200);
    assert_int_equal(atoll(optd_response_header(&r, "Optd-Step")), 0);
    double want[3] = {4.5, -5, 6e-300};
    assert_int_equal(r.len, sizeof want);
    assert_memory_equal(r.body, want, sizeof want);
    optd_response_free(&r);

    /* PUT binary, read JSON; a step then starts from them. */
    double put[3] = {0.125, 1e10, -7};
    r = tapi_req_bin(s->c, "PUT", "/v1/sessions/pp/params", BIN_IO, put, sizeof put);
    if (r.status < 200 || r.status > 299)
        fail_msg("PUT binary params: %d %.*s", r.status, (int)r.len, r.body);
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/pp/params", JSON_ACCEPT, NULL);
    j = tapi_json(&r);
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, member(j, "params")) assert_true(e->valuedouble == put[i++]);
    cJSON_Delete(j);
    optd_response_free(&r);
    j = step_json(s, "pp", "{\"grad\":[1,2,3]}", NULL);
    i = 0;
    cJSON_ArrayForEach(e, member(j, "params"))
    {
        assert_true(e->valuedouble == put[i] - 0.1 * (double)(i + 1));
        i++;
    }
    cJSON_Delete(j);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Every finite float32 / float64, subnormals and extremes included, comes
 * back from JSON with the same bits, both ways. */
static void test_json_roundtrip_bits(void **state)
{
    suite *s = *state;
    enum { N = 256 };
    float f[N];
    double d[N];
    for (int i = 0; i < N; i++) {
        uint32_t u;
        do {
            u = (uint32_t)next_rand();
            memcpy(&f[i], &u, 4);
        } while (!isfinite(f[i]));
        uint64_t v;
        do {
            v = next_rand();
            memcpy(&d[i], &v, 8);
        } while (!isfinite(d[i]));
    }
    f[0] = 1.4e-45f; /* smallest subnormal */
    f[1] = 3.40282347e38f;
    f[2] = -0.0f;
    f[3] = 0.1f;
    d[0] = 4.9406564584124654e-324;
    d[1] = 1.7976931348623157e308;
    d[2] = -0.0;
    d[3] = 0.1;
    tapi_create(s->c, "rt32", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":256,\"init\":{\"type\":\"zeros\"}}", 201);
    tapi_create(s->c, "rt64", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":256,\"dtype\":\"float64\",\"init\":{\"type\":\"zeros\"}}", 201);

    /* binary in, JSON out */
    optd_response r = tapi_req_bin(s->c, "PUT", "/v1/sessions/rt32/params", BIN_IO, f, sizeof f);
    assert_true(r.status >= 200 && r.status <= 299);
    optd_response_free(&r);
    r = tapi_req_bin(s->c, "PUT", "/v1/sessions/rt64/params", BIN_IO, d, sizeof d);
    assert_true(r.status >= 200 && r.status <= 299);
    optd_response_free(&r);
    for (int which = 0; which < 2; which++) {
        r = tapi_req(s->c, "GET", which ? "/v1/sessions/rt64/params" : "/v1/sessions/rt32/params",
                     JSON_ACCEPT, NULL);
        assert_int_equal(r.status, 200);
        /* Parse the numbers with strtod ourselves: exactly what a careful
         * client does with the text. */
        const char *p = strstr(r.body, "\"params\"");
        assert_non_null(p);
        p = strchr(p, '[');
        assert_non_null(p);
        p++;
        for (int i = 0; i < N; i++) {
            char *end;
            double x = strtod(p, &end);
            assert_true(end != p);
            if (which == 0) {
                float y = (float)x;
                if (memcmp(&y, &f[i], 4) != 0)
                    fail_msg("float32 [%d]: sent %.9g, JSON says %.*s", i, (double)f[i],
                             (int)(end - p), p);
            } else if (memcmp(&x, &d[i], 8) != 0) {
                fail_msg("float64 [%d]: sent %.17g, JSON says %.*s", i, d[i], (int)(end - p), p);
            }
            p = end;
            while (*p == ',' || *p == ' ')
                p++;
        }
        optd_response_free(&r);
    }

    /* JSON in (%.9g / %.17g), binary out */
    for (int which = 0; which < 2; which++) {
        size_t cap = 64 + (size_t)N * 32, len = 0;
        char *body = malloc(cap);
        assert_non_null(body);
        len += (size_t)snprintf(body + len, cap - len, "{\"params\":[");
        for (int i = 0; i < N; i++)
            len += (size_t)snprintf(body + len, cap - len, which ? "%s%.17g" : "%s%.9g",
                                    i ? "," : "", which ? d[i] : (double)f[i]);
        snprintf(body + len, cap - len, "]}");
        const char *path = which ? "/v1/sessions/rt64/params" : "/v1/sessions/rt32/params";
        /* Zero them first so the JSON PUT has something to change. */
        static const double zeros[N];
        r = tapi_req_bin(s->c, "PUT", path, BIN_IO, zeros, which ? sizeof d : sizeof f);
        assert_true(r.status >= 200 && r.status <= 299);
        optd_response_free(&r);
        r = tapi_req(s->c, "PUT", path, NULL, body);
        if (r.status < 200 || r.status > 299)
            fail_msg("PUT JSON params: %d %.*s", r.status, (int)r.len, r.body);
        optd_response_free(&r);
        free(body);
        const char *bin[] = {"Accept: application/octet-stream", NULL};
        r = tapi_req(s->c, "GET", path, bin, NULL);
        assert_int_equal(r.len, which ? sizeof d : sizeof f);
        assert_memory_equal(r.body, which ? (void *)d : (void *)f, r.len);
        optd_response_free(&r);
    }
}

static void test_history(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "hist", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2]}", 201);
    cJSON_Delete(step_json(s, "hist", "{\"grad\":[1,1],\"loss\":2.5}", NULL));
    cJSON_Delete(step_json(s, "hist", "{\"grad\":[1,1],\"loss\":1.5}", NULL));
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions/hist/history", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    /* Both losses are in the history. */
    assert_non_null(strstr(r.body, "2.5"));
    assert_non_null(strstr(r.body, "1.5"));
    cJSON_Delete(j);
    optd_response_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_healthz),
        cmocka_unit_test(test_optimizers_catalogue),
        cmocka_unit_test(test_create_verify_get),
        cmocka_unit_test(test_create_init),
        cmocka_unit_test(test_list_paging),
        cmocka_unit_test(test_patch),
        cmocka_unit_test(test_delete),
        cmocka_unit_test(test_step_json),
        cmocka_unit_test(test_step_binary),
        cmocka_unit_test(test_idempotent_replay),
        cmocka_unit_test(test_params_get_put),
        cmocka_unit_test(test_json_roundtrip_bits),
        cmocka_unit_test(test_history),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
