/*
 * test_api_errors.c -- every error of the v1 contract: its status, its
 * problem+json body (type URN, title, status, detail, field), and the rule
 * that an error leaves the session exactly as it was (params byte-identical,
 * step unchanged).
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

#define MAX_BODY_MB 1

typedef tapi_suite suite;

static const char *const E64 = "e64"; /* sgd float64 [1,2,3], one step applied */
static const char *const E32 = "e32"; /* adam float32 size 4, one step applied */

static int suite_setup(void **state)
{
    const char *args[] = {"--max-body-mb", "1", NULL};
    suite *s = tapi_suite_open(args);
    *state = s;
    if (!s)
        return -1;
    /* Each session has a step behind it, so "unchanged" means more than
     * "still at its initial values". */
    optd_response r = tapi_req(s->c, "PUT", "/v1/sessions/e64", NULL,
                               "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3],"
                               "\"dtype\":\"float64\"}");
    int ok = r.status == 201;
    optd_response_free(&r);
    r = tapi_req(s->c, "POST", "/v1/sessions/e64/step", NULL, "{\"grad\":[0.1,0.2,0.3]}");
    ok &= r.status == 200;
    optd_response_free(&r);
    r = tapi_req(s->c, "PUT", "/v1/sessions/e32", NULL,
                 "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":4,"
                 "\"init\":{\"type\":\"normal\",\"std\":1,\"seed\":5}}");
    ok &= r.status == 201;
    optd_response_free(&r);
    r = tapi_req(s->c, "POST", "/v1/sessions/e32/step", NULL, "{\"grad\":[1,-1,0.5,2]}");
    ok &= r.status == 200;
    optd_response_free(&r);
    if (!ok)
        fprintf(stderr, "errors suite: could not prepare its sessions\n");
    return ok ? 0 : -1;
}

static int suite_teardown(void **state)
{
    return tapi_suite_close(*state);
}

/* GET session's body: a PATCH error must leave even the config alone. */
static char *session_text(suite *s, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(s->c, "GET", path, NULL, NULL);
    assert_int_equal(r.status, 200);
    char *t = r.body;
    r.body = NULL;
    optd_response_free(&r);
    return t;
}

/* Sends the request and asserts the problem, then that session (if not
 * NULL) is byte-for-byte as before, its config included. */
static void expect_unchanged(suite *s, const char *session, const char *method,
                             const char *path, const char *const *headers, const void *body,
                             size_t len, int status, const char *field)
{
    tapi_snap before = {0};
    char *text_before = NULL;
    if (session) {
        before = tapi_snapshot(s->c, session);
        text_before = session_text(s, session);
    }
    optd_response r = tapi_req_bin(s->c, method, path, headers, body, len);
    if (r.status != status)
        fail_msg("%s %s: expected %d, got %d: %.*s", method, path, status, r.status,
                 (int)(r.len > 300 ? 300 : r.len), r.body);
    tapi_assert_problem(&r, status, field);
    optd_response_free(&r);
    if (session) {
        tapi_snap after = tapi_snapshot(s->c, session);
        tapi_assert_same(&before, &after);
        char *text_after = session_text(s, session);
        assert_string_equal(text_before, text_after);
        free(text_after);
        free(text_before);
        tapi_snap_free(&after);
        tapi_snap_free(&before);
    }
}

static void expect_json(suite *s, const char *session, const char *method, const char *path,
                        const char *body, int status, const char *field)
{
    expect_unchanged(s, session, method, path, NULL, body, body ? strlen(body) : 0, status,
                     field);
}

static void expect_absent(suite *s, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(s->c, "GET", path, NULL, NULL);
    tapi_assert_problem(&r, 404, NULL);
    optd_response_free(&r);
}

static const char *const BIN[] = {"Content-Type: application/octet-stream",
                                  "Accept: application/octet-stream", NULL};

/* --------------------------------------------------------------- tests */

static void test_malformed_json(void **state)
{
    suite *s = *state;
    expect_json(s, NULL, "PUT", "/v1/sessions/mal", "{\"optimizer\":", 400, NULL);
    expect_absent(s, "mal");
    expect_json(s, NULL, "PUT", "/v1/sessions/mal", "[1,2]", 400, NULL);
    expect_absent(s, "mal");
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[1,2,", 400, NULL);
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[1,2,3]} trailing", 400,
                NULL);
    expect_json(s, E64, "PATCH", "/v1/sessions/e64", "{\"optimizer\":{\"lr\":}", 400, NULL);
    expect_json(s, E64, "PUT", "/v1/sessions/e64/params", "{\"params\":[1,2", 400, NULL);
    /* An existing session's create with a broken body is no conflict. */
    expect_json(s, E64, "PUT", "/v1/sessions/e64", "{nope", 400, NULL);
}

static void test_unknown_optimizer(void **state)
{
    suite *s = *state;
    expect_json(s, NULL, "PUT", "/v1/sessions/unk",
                "{\"optimizer\":{\"type\":\"adamq\"},\"params\":[1,2]}", 400, "optimizer.type");
    expect_absent(s, "unk");
    expect_json(s, NULL, "PUT", "/v1/sessions/unk", "{\"optimizer\":{\"lr\":0.1},\"params\":[1]}",
                400, "optimizer.type");
    expect_absent(s, "unk");
}

static void test_invalid_hyperparameter(void **state)
{
    suite *s = *state;
    expect_json(s, NULL, "PUT", "/v1/sessions/hp",
                "{\"optimizer\":{\"type\":\"adam\",\"betas\":[1.5,0.9]},\"params\":[1]}", 400,
                "optimizer.betas");
    expect_json(s, NULL, "PUT", "/v1/sessions/hp",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":-1},\"params\":[1]}", 400,
                "optimizer.lr");
    expect_json(s, NULL, "PUT", "/v1/sessions/hp",
                "{\"optimizer\":{\"type\":\"adam\",\"eps\":0},\"params\":[1]}", 400,
                "optimizer.eps");
    expect_json(s, NULL, "PUT", "/v1/sessions/hp",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":\"fast\"},\"params\":[1]}", 400,
                "optimizer.lr");
    expect_json(s, NULL, "PUT", "/v1/sessions/hp",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1],"
                "\"schedule\":{\"type\":\"cosine\",\"T_max\":-5}}",
                400, "schedule.T_max");
    expect_absent(s, "hp");
    /* The same through PATCH leaves the running session alone. */
    expect_json(s, E64, "PATCH", "/v1/sessions/e64", "{\"optimizer\":{\"lr\":-0.5}}", 400,
                "optimizer.lr");
    expect_json(s, E32, "PATCH", "/v1/sessions/e32", "{\"optimizer\":{\"betas\":[0.9,1.0]}}", 400,
                "optimizer.betas");
    expect_json(s, E64, "PATCH", "/v1/sessions/e64",
                "{\"schedule\":{\"type\":\"cosine\",\"T_max\":0}}", 400, "schedule.T_max");
}

static void test_unknown_field(void **state)
{
    suite *s = *state;
    expect_json(s, NULL, "PUT", "/v1/sessions/uf",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1],\"bogus\":1}", 400,
                "bogus");
    expect_json(s, NULL, "PUT", "/v1/sessions/uf",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1,\"betas\":[0.9,0.99]},\"params\":[1]}",
                400, "optimizer.betas");
    expect_absent(s, "uf");
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[1,2,3],\"gard\":[1]}", 400,
                "gard");
    expect_json(s, E64, "PATCH", "/v1/sessions/e64", "{\"colour\":\"red\"}", 400, "colour");
    expect_json(s, E64, "PUT", "/v1/sessions/e64/params", "{\"params\":[1,2,3],\"x\":0}", 400,
                "x");
}

static void test_invalid_name(void **state)
{
    suite *s = *state;
    const char *body = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1]}";
    expect_json(s, NULL, "PUT", "/v1/sessions/bad!name", body, 400, "name");
    expect_json(s, NULL, "PUT", "/v1/sessions/bad%20name", body, 400, "name");
    char path[300];
    char longname[130];
    memset(longname, 'a', 129);
    longname[129] = '\0';
    snprintf(path, sizeof path, "/v1/sessions/%s", longname);
    expect_json(s, NULL, "PUT", path, body, 400, "name");
    /* 128 characters is the limit, and fine. */
    longname[128] = '\0';
    tapi_create(s->c, longname, body, 201);
    expect_json(s, NULL, "POST", "/v1/sessions/bad$/step", "{\"grad\":[1]}", 400, "name");
    expect_json(s, NULL, "GET", "/v1/sessions/b@d", NULL, 400, "name");
}

static void test_unknown_session(void **state)
{
    suite *s = *state;
    expect_json(s, NULL, "GET", "/v1/sessions/nope", NULL, 404, NULL);
    expect_json(s, NULL, "POST", "/v1/sessions/nope/step", "{\"grad\":[1]}", 404, NULL);
    expect_json(s, NULL, "GET", "/v1/sessions/nope/params", NULL, 404, NULL);
    expect_json(s, NULL, "PUT", "/v1/sessions/nope/params", "{\"params\":[1]}", 404, NULL);
    expect_json(s, NULL, "PATCH", "/v1/sessions/nope", "{\"optimizer\":{\"lr\":1}}", 404, NULL);
    expect_json(s, NULL, "DELETE", "/v1/sessions/nope", NULL, 404, NULL);
    expect_absent(s, "nope");
}

static void test_conflicting_create(void **state)
{
    suite *s = *state;
    expect_json(s, E64, "PUT", "/v1/sessions/e64",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.2},\"params\":[1,2,3],"
                "\"dtype\":\"float64\"}",
                409, NULL);
    expect_json(s, E64, "PUT", "/v1/sessions/e64",
                "{\"optimizer\":{\"type\":\"adam\"},\"params\":[1,2,3],\"dtype\":\"float64\"}",
                409, NULL);
    expect_json(s, E64, "PUT", "/v1/sessions/e64",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3]}", 409,
                NULL); /* float32 now */
    expect_json(s, E64, "PUT", "/v1/sessions/e64",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3,4],"
                "\"dtype\":\"float64\"}",
                409, NULL);
}

static void test_wrong_length(void **state)
{
    suite *s = *state;
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[1,2]}", 422, "grad");
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[1,2,3,4]}", 422, "grad");
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[]}", 422, "grad");
    double two[2] = {1, 2};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", BIN, two, sizeof two, 422, "grad");
    double four[4] = {1, 2, 3, 4};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", BIN, four, sizeof four, 422,
                     "grad");
    /* 3 floats are 12 bytes: the right count for float32, not float64. */
    float f3[3] = {1, 2, 3};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", BIN, f3, sizeof f3, 422, "grad");
    expect_unchanged(s, E32, "POST", "/v1/sessions/e32/step", BIN, "abc", 3, 422, "grad");
    expect_unchanged(s, E64, "PUT", "/v1/sessions/e64/params", BIN, two, sizeof two, 422,
                     "params");
    expect_json(s, E64, "PUT", "/v1/sessions/e64/params", "{\"params\":[1]}", 422, "params");
}

static void test_nonfinite(void **state)
{
    suite *s = *state;
    double g[3] = {1, NAN, 3};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", BIN, g, sizeof g, 422, "grad");
    g[1] = INFINITY;
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", BIN, g, sizeof g, 422, "grad");
    float f[4] = {0, 0, -INFINITY, 0};
    expect_unchanged(s, E32, "POST", "/v1/sessions/e32/step", BIN, f, sizeof f, 422, "grad");
    f[2] = NAN;
    expect_unchanged(s, E32, "POST", "/v1/sessions/e32/step", BIN, f, sizeof f, 422, "grad");
    /* JSON cannot say NaN, but 1e39 overflows float32. */
    expect_json(s, E32, "POST", "/v1/sessions/e32/step", "{\"grad\":[1,1e39,0,0]}", 422, "grad");
    expect_json(s, E64, "POST", "/v1/sessions/e64/step", "{\"grad\":[1,1e309,0]}", 422, "grad");
    double p[3] = {1, 2, NAN};
    expect_unchanged(s, E64, "PUT", "/v1/sessions/e64/params", BIN, p, sizeof p, 422, "params");
    expect_json(s, E32, "PUT", "/v1/sessions/e32/params", "{\"params\":[1,2,3e38,-1e39]}", 422,
                "params");
    /* Nor may a new session start from non-finite params. */
    expect_json(s, NULL, "PUT", "/v1/sessions/nf",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,1e39]}", 422,
                "params");
    expect_absent(s, "nf");
}

static void test_body_too_large(void **state)
{
    suite *s = *state;
    size_t len = (size_t)MAX_BODY_MB * 1024 * 1024 + 4096;
    char *big = malloc(len);
    assert_non_null(big);
    memset(big, 0, len);
    /* With Expect: 100-continue the daemon can refuse from Content-Length
     * alone, before a byte of the body is sent. */
    const char *h[] = {"Content-Type: application/octet-stream",
                       "Accept: application/octet-stream", "Expect: 100-continue", NULL};
    long long t0 = tapi_now_ms();
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", h, big, len, 413, NULL);
    expect_unchanged(s, E64, "PUT", "/v1/sessions/e64/params", h, big, len, 413, NULL);
    /* A JSON body is no different. */
    memset(big, ' ', len);
    big[0] = '{';
    big[len - 1] = '}';
    const char *hj[] = {"Content-Type: application/json", "Expect: 100-continue", NULL};
    expect_unchanged(s, NULL, "PUT", "/v1/sessions/huge", hj, big, len, 413, NULL);
    expect_absent(s, "huge");
    /* curl waits 1 s for a "100 Continue" that a refusing server never
     * sends; an answer well before that came from the headers. */
    assert_true(tapi_now_ms() - t0 < 3 * 1000);

    /* Without Expect: a Content-Length of 1 GiB and only 1 KiB sent.  A
     * daemon that waited for the body would never answer. */
    optd_client *quick = tapi_client(tdaemon_url(&s->d), NULL, false);
    optd_client_set_timeouts(quick, 2000, 5000);
    const char *hl[] = {"Content-Type: application/octet-stream", "Content-Length: 1073741824",
                        NULL};
    tapi_snap before = tapi_snapshot(s->c, E64);
    optd_response r;
    optd_error e;
    if (optd_request_err(quick, "POST", "/v1/sessions/e64/step", hl, big, 1024, &r, &e) != 0)
        fail_msg("1 GiB Content-Length: no answer (%s): the body was not refused from its "
                 "Content-Length", e.detail);
    tapi_assert_problem(&r, 413, NULL);
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(s->c, E64);
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(quick);
    free(big);
}

static void test_unsupported_media_type(void **state)
{
    suite *s = *state;
    const char *h[] = {"Content-Type: text/plain", NULL};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", h, "{\"grad\":[1,2,3]}", 16, 415,
                     NULL);
    const char *hf[] = {"Content-Type: application/x-www-form-urlencoded", NULL};
    expect_unchanged(s, E64, "PUT", "/v1/sessions/e64/params", hf, "params=1", 8, 415, NULL);
    /* A session is created from JSON only. */
    const char *hb[] = {"Content-Type: application/octet-stream", NULL};
    expect_unchanged(s, NULL, "PUT", "/v1/sessions/mt", hb, "\0\0\0\0", 4, 415, NULL);
    expect_absent(s, "mt");
    expect_unchanged(s, E64, "PATCH", "/v1/sessions/e64", h, "{}", 2, 415, NULL);
}

static void test_not_acceptable(void **state)
{
    suite *s = *state;
    const char *h[] = {"Accept: text/html", NULL};
    expect_unchanged(s, E64, "GET", "/v1/sessions/e64", h, NULL, 0, 406, NULL);
    expect_unchanged(s, E64, "GET", "/v1/sessions/e64/params", h, NULL, 0, 406, NULL);
    /* Checked before the step is applied. */
    const char *hs[] = {"Accept: text/html", "Content-Type: application/json", NULL};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", hs, "{\"grad\":[1,2,3]}", 16, 406,
                     NULL);
    const char *hb[] = {"Accept: text/html", "Content-Type: application/octet-stream", NULL};
    double g[3] = {1, 2, 3};
    expect_unchanged(s, E64, "POST", "/v1/sessions/e64/step", hb, g, sizeof g, 406, NULL);
    /* JSON-only routes do not offer binary. */
    const char *hbin[] = {"Accept: application/octet-stream", NULL};
    expect_unchanged(s, E64, "GET", "/v1/sessions/e64", hbin, NULL, 0, 406, NULL);
}

static void test_unknown_path_and_method(void **state)
{
    suite *s = *state;
    expect_json(s, NULL, "GET", "/v1/nope", NULL, 404, NULL);
    expect_json(s, NULL, "GET", "/v2/sessions", NULL, 404, NULL);
    expect_json(s, E64, "GET", "/v1/sessions/e64/bogus", NULL, 404, NULL);
    expect_json(s, NULL, "GET", "/nothing-here", NULL, 404, NULL);

    struct {
        const char *method, *path;
        const char *allow[4];
    } cases[] = {
        {"DELETE", "/v1/sessions", {"GET"}},
        {"POST", "/v1/sessions/e64", {"GET", "PUT", "PATCH", "DELETE"}},
        {"GET", "/v1/sessions/e64/step", {"POST"}},
        {"DELETE", "/v1/sessions/e64/params", {"GET", "PUT"}},
        {"POST", "/healthz", {"GET"}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tapi_snap before = tapi_snapshot(s->c, E64);
        optd_response r = tapi_req(s->c, cases[i].method, cases[i].path, NULL,
                                   strcmp(cases[i].method, "POST") == 0 ? "{}" : NULL);
        tapi_assert_problem(&r, 405, NULL);
        const char *allow = optd_response_header(&r, "Allow");
        if (!allow)
            fail_msg("%s %s: 405 without Allow", cases[i].method, cases[i].path);
        for (int k = 0; k < 4 && cases[i].allow[k]; k++)
            if (!strstr(allow, cases[i].allow[k]))
                fail_msg("%s %s: Allow \"%s\" lacks %s", cases[i].method, cases[i].path, allow,
                         cases[i].allow[k]);
        optd_response_free(&r);
        tapi_snap after = tapi_snapshot(s->c, E64);
        tapi_assert_same(&before, &after);
        tapi_snap_free(&before);
        tapi_snap_free(&after);
    }
}

static void test_api_key(void **state)
{
    (void)state;
    tdaemon d;
    const char *args[] = {"--api-key", "s3cret-K", NULL};
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    optd_client *good = tapi_client(tdaemon_url(&d), "s3cret-K", false);
    optd_client *none = tapi_client(tdaemon_url(&d), NULL, false);
    optd_client *bad = tapi_client(tdaemon_url(&d), "s3cret-k", false);

    /* /healthz needs no key */
    optd_response r = tapi_req(none, "GET", "/healthz", NULL, NULL);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);

    tapi_create(good, "k", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2]}", 201);
    tapi_snap before = tapi_snapshot(good, "k");
    const char *paths[][2] = {
        {"GET", "/v1/sessions"},
        {"GET", "/v1/optimizers"},
        {"GET", "/v1/sessions/k"},
        {"POST", "/v1/sessions/k/step"},
        {"GET", "/v1/sessions/k/params"},
        {"PUT", "/v1/sessions/k/params"},
        {"PATCH", "/v1/sessions/k"},
        {"DELETE", "/v1/sessions/k"},
        {"PUT", "/v1/sessions/k2"},
    };
    const char *bodies[] = {NULL, NULL, NULL, "{\"grad\":[1,1]}", NULL, "{\"params\":[9,9]}",
                            "{\"optimizer\":{\"lr\":1}}", NULL,
                            "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1]}"};
    const char *const basic[] = {"Authorization: Basic czNjcmV0LUs=", NULL};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        for (int who = 0; who < 3; who++) {
            optd_response e = who == 2 ? tapi_req(none, paths[i][0], paths[i][1], basic, bodies[i])
                                       : tapi_req(who ? bad : none, paths[i][0], paths[i][1],
                                                  NULL, bodies[i]);
            if (e.status != 401)
                fail_msg("%s %s (%s): expected 401, got %d", paths[i][0], paths[i][1],
                         who == 0 ? "no key" : who == 1 ? "wrong key" : "Basic", e.status);
            tapi_assert_problem(&e, 401, NULL);
            optd_response_free(&e);
        }
    }
    tapi_snap after = tapi_snapshot(good, "k");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    r = tapi_req(good, "GET", "/v1/sessions/k2", NULL, NULL);
    assert_int_equal(r.status, 404);
    optd_response_free(&r);
    /* and the right key still works */
    r = tapi_req(good, "POST", "/v1/sessions/k/step", NULL, "{\"grad\":[1,1]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);

    optd_client_free(good);
    optd_client_free(none);
    optd_client_free(bad);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* After all of the above the sessions still work and sit where they were. */
static void test_still_healthy(void **state)
{
    suite *s = *state;
    tapi_snap a = tapi_snapshot(s->c, E64);
    assert_int_equal(a.session_step, 1);
    assert_int_equal(a.len, 3 * sizeof(double));
    double p[3];
    memcpy(p, a.params, sizeof p);
    assert_true(p[0] == 1 - 0.1 * 0.1 && p[1] == 2 - 0.1 * 0.2 && p[2] == 3 - 0.1 * 0.3);
    tapi_snap_free(&a);
    optd_response r = tapi_req(s->c, "POST", "/v1/sessions/e64/step", NULL, "{\"grad\":[1,1,1]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    a = tapi_snapshot(s->c, E64);
    assert_int_equal(a.session_step, 2);
    tapi_snap_free(&a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_malformed_json),
        cmocka_unit_test(test_unknown_optimizer),
        cmocka_unit_test(test_invalid_hyperparameter),
        cmocka_unit_test(test_unknown_field),
        cmocka_unit_test(test_invalid_name),
        cmocka_unit_test(test_unknown_session),
        cmocka_unit_test(test_conflicting_create),
        cmocka_unit_test(test_wrong_length),
        cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_body_too_large),
        cmocka_unit_test(test_unsupported_media_type),
        cmocka_unit_test(test_not_acceptable),
        cmocka_unit_test(test_unknown_path_and_method),
        cmocka_unit_test(test_api_key),
        cmocka_unit_test(test_still_healthy),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
