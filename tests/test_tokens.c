/*
 * test_tokens.c -- scoped tokens against a real daemon: minting, listing
 * (never a secret), revocation seen by the very next request, expiry, the
 * route-by-route battery (no credential 401, a scope too small 403, the
 * right scope outside the prefix 403, the right token passes; every
 * refusal leaves the session as it was), created_by, quotas and step rates
 * (429 with Retry-After, another token unaffected), secrets absent from the
 * database, tokens kept across a restart, and the token routes refused
 * when authentication is off.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api/api.h"
#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

#define ADMIN_KEY "test-admin-key"
#define CREATE_BODY "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3,4]}"
#define WATCHED "bat-s" /* the session every refusal must leave alone */

typedef struct {
    tdaemon d;
    optd_client *admin; /* the admin key */
    optd_client *anon;  /* no credential */
} suite;

static int suite_setup(void **state)
{
    suite *s = calloc(1, sizeof *s);
    *state = s;
    const char *args[] = {"--api-key", ADMIN_KEY, NULL};
    if (!s || tdaemon_start(&s->d, NULL, args) != 0)
        return -1;
    s->admin = optd_client_new(tdaemon_url(&s->d), ADMIN_KEY);
    s->anon = optd_client_new(tdaemon_url(&s->d), NULL);
    if (!s->admin || !s->anon)
        return -1;
    optd_client_set_retry(s->admin, 1, 0, 0);
    optd_client_set_retry(s->anon, 1, 0, 0);
    return 0;
}

static int suite_teardown(void **state)
{
    suite *s = *state;
    if (!s)
        return -1;
    optd_client_free(s->admin);
    optd_client_free(s->anon);
    int rc = tdaemon_stop(&s->d);
    if (rc == 0 && tapi_integrity_check(tdaemon_db(&s->d)) != 0)
        rc = -1;
    tdaemon_cleanup(&s->d);
    free(s);
    return rc;
}

/* A minted token: its id and secret, and a client that sends it. */
typedef struct {
    char id[32];
    char secret[128];
    optd_client *c;
} tok;

/* Mints a token with the mint request body; asserts 201. */
static tok mint(suite *s, const char *body)
{
    optd_response r = tapi_req(s->admin, "POST", "/v1/tokens", NULL, body);
    if (r.status != 201)
        fail_msg("mint %s: %d %.*s", body, r.status, (int)r.len, r.body);
    cJSON *j = tapi_json(&r);
    tok t = {0};
    snprintf(t.id, sizeof t.id, "%s", tapi_str(j, "id"));
    snprintf(t.secret, sizeof t.secret, "%s", tapi_str(j, "token"));
    char loc[64];
    snprintf(loc, sizeof loc, "/v1/tokens/%s", t.id);
    const char *l = optd_response_header(&r, "Location");
    assert_non_null(l);
    assert_string_equal(l, loc);
    cJSON_Delete(j);
    optd_response_free(&r);
    t.c = tapi_client(tdaemon_url(&s->d), t.secret, false);
    return t;
}

static void tok_free(tok *t)
{
    optd_client_free(t->c);
    t->c = NULL;
}

static int status_of(optd_client *c, const char *method, const char *path, const char *body)
{
    optd_response r = tapi_req(c, method, path, NULL, body);
    int st = r.status;
    optd_response_free(&r);
    return st;
}

static void ensure_session(suite *s, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    /* 409: it exists with another config (a PATCH changed it). */
    int st = status_of(s->admin, "PUT", path, CREATE_BODY);
    if (st != 201 && st != 200 && st != 409)
        fail_msg("creating %s: %d", name, st);
}

static void drop_session(suite *s, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    int st = status_of(s->admin, "DELETE", path, NULL);
    assert_true(st == 204 || st == 404);
}

/* GET path's body as JSON (admin key), asserting 200. */
static cJSON *get_json(suite *s, const char *path)
{
    optd_response r = tapi_req(s->admin, "GET", path, NULL, NULL);
    if (r.status != 200)
        fail_msg("GET %s: %d %.*s", path, r.status, (int)r.len, r.body);
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    return j;
}

static void assert_401(const optd_response *r)
{
    tapi_assert_problem(r, 401, NULL);
    const char *w = optd_response_header(r, "WWW-Authenticate");
    assert_non_null(w);
    assert_true(strncmp(w, "Bearer", 6) == 0);
}

/* ------------------------------------------------------------ minting */

static void test_mint_list_get_revoke(void **state)
{
    suite *s = *state;
    tok t = mint(s, "{\"scopes\":[\"read\"],\"prefix\":\"ml-\",\"label\":\"ci reader\","
                    "\"quotas\":{\"max_sessions\":3}}");
    /* optd_<16 hex>_<64 hex> */
    assert_int_equal(strlen(t.secret), 5 + 16 + 1 + 64);
    assert_true(strncmp(t.secret, "optd_", 5) == 0);
    assert_true(strncmp(t.secret + 5, t.id, 16) == 0);
    const char *secret_part = t.secret + 22;

    optd_response r = tapi_req(s->admin, "GET", "/v1/tokens", NULL, NULL);
    assert_int_equal(r.status, 200);
    assert_null(strstr(r.body, secret_part));
    assert_null(strstr(r.body, "\"token\""));
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    const cJSON *e, *found = NULL;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(j, "tokens"))
    {
        if (strcmp(tapi_str(e, "id"), t.id) == 0)
            found = e;
    }
    assert_non_null(found);
    assert_string_equal(tapi_str(found, "prefix"), "ml-");
    assert_string_equal(tapi_str(found, "label"), "ci reader");
    assert_string_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(found, "scopes"), 0)->valuestring,
                        "read");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(found, "scopes")), 1);
    assert_int_equal((int)tapi_num(cJSON_GetObjectItem(found, "quotas"), "max_sessions"), 3);
    cJSON_Delete(j);

    char path[64];
    snprintf(path, sizeof path, "/v1/tokens/%s", t.id);
    r = tapi_req(s->admin, "GET", path, NULL, NULL);
    assert_int_equal(r.status, 200);
    assert_null(strstr(r.body, secret_part));
    j = tapi_json(&r);
    assert_null(cJSON_GetObjectItem(j, "token"));
    assert_null(cJSON_GetObjectItem(j, "revoked_at"));
    assert_int_equal((int)tapi_num(cJSON_GetObjectItem(j, "usage"), "sessions"), 0);
    cJSON_Delete(j);
    optd_response_free(&r);

    /* The token works... */
    assert_int_equal(status_of(t.c, "GET", "/v1/sessions", NULL), 200);
    /* ...a token never manages tokens... */
    r = tapi_req(t.c, "GET", "/v1/tokens", NULL, NULL);
    tapi_assert_problem(&r, 403, "scope");
    optd_response_free(&r);
    /* ...and once revoked, the very next request is refused. */
    assert_int_equal(status_of(s->admin, "DELETE", path, NULL), 204);
    r = tapi_req(t.c, "GET", "/v1/sessions", NULL, NULL);
    assert_401(&r);
    assert_non_null(strstr(r.body, "revoked"));
    optd_response_free(&r);
    j = get_json(s, path);
    assert_non_null(cJSON_GetObjectItem(j, "revoked_at"));
    cJSON_Delete(j);
    /* Revoking again is harmless; an unknown id is 404. */
    assert_int_equal(status_of(s->admin, "DELETE", path, NULL), 204);
    r = tapi_req(s->admin, "DELETE", "/v1/tokens/0123456789abcdef", NULL, NULL);
    tapi_assert_problem(&r, 404, NULL);
    optd_response_free(&r);
    r = tapi_req(s->admin, "GET", "/v1/tokens/0123456789abcdef", NULL, NULL);
    tapi_assert_problem(&r, 404, NULL);
    optd_response_free(&r);
    tok_free(&t);
}

static int token_count(suite *s)
{
    cJSON *j = get_json(s, "/v1/tokens");
    int n = cJSON_GetArraySize(cJSON_GetObjectItem(j, "tokens"));
    cJSON_Delete(j);
    return n;
}

static void test_bad_mint_requests(void **state)
{
    suite *s = *state;
    static const struct {
        const char *body, *field;
    } bad[] = {
        {"{}", "scopes"},
        {"{\"scopes\":[]}", "scopes"},
        {"{\"scopes\":\"read\"}", "scopes"},
        {"{\"scopes\":[\"write\"]}", "scopes"},
        {"{\"scopes\":[\"read\"],\"prefix\":\"run42/\"}", "prefix"},
        {"{\"scopes\":[\"read\"],\"prefix\":7}", "prefix"},
        {"{\"scopes\":[\"read\"],\"expires_in\":0}", "expires_in"},
        {"{\"scopes\":[\"read\"],\"expires_in\":1.5}", "expires_in"},
        {"{\"scopes\":[\"read\"],\"expires_at\":\"tomorrow\"}", "expires_at"},
        {"{\"scopes\":[\"read\"],\"expires_at\":\"2001-01-01T00:00:00Z\"}", "expires_at"},
        {"{\"scopes\":[\"read\"],\"expires_in\":60,\"expires_at\":\"2099-01-01T00:00:00Z\"}",
         "expires_at"},
        {"{\"scopes\":[\"read\"],\"owner\":\"x\"}", "owner"},
        {"{\"scopes\":[\"read\"],\"quotas\":{\"max_sessions\":0}}", "quotas.max_sessions"},
        {"{\"scopes\":[\"read\"],\"quotas\":{\"max_params\":-5}}", "quotas.max_params"},
        {"{\"scopes\":[\"read\"],\"quotas\":{\"steps_per_second\":0}}",
         "quotas.steps_per_second"},
        {"{\"scopes\":[\"read\"],\"quotas\":{\"burst\":4}}", "quotas.burst"},
        {"{\"scopes\":[\"read\"],\"quotas\":{\"steps_per_second\":1,\"burst\":0.5}}",
         "quotas.burst"},
        {"{\"scopes\":[\"read\"],\"quotas\":{\"speed\":1}}", "quotas"},
    };
    int before = token_count(s);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        optd_response r = tapi_req(s->admin, "POST", "/v1/tokens", NULL, bad[i].body);
        if (r.status != 400)
            fail_msg("%s: %d %.*s", bad[i].body, r.status, (int)r.len, r.body);
        tapi_assert_problem(&r, 400, bad[i].field);
        optd_response_free(&r);
    }
    optd_response r = tapi_req(s->admin, "POST", "/v1/tokens", NULL, "{\"scopes\":");
    tapi_assert_problem(&r, 400, NULL);
    optd_response_free(&r);
    assert_int_equal(token_count(s), before);
}

static void test_expiry(void **state)
{
    suite *s = *state;
    tok t = mint(s, "{\"scopes\":[\"read\"],\"expires_in\":1}");
    cJSON *j;
    char path[64];
    snprintf(path, sizeof path, "/v1/tokens/%s", t.id);
    j = get_json(s, path);
    assert_non_null(cJSON_GetObjectItem(j, "expires_at"));
    cJSON_Delete(j);
    assert_int_equal(status_of(t.c, "GET", "/v1/optimizers", NULL), 200);
    struct timespec ts = {1, 200 * 1000000L};
    nanosleep(&ts, NULL);
    optd_response r = tapi_req(t.c, "GET", "/v1/optimizers", NULL, NULL);
    assert_401(&r);
    assert_non_null(strstr(r.body, "expired"));
    optd_response_free(&r);
    tok_free(&t);
    /* expires_at in the future works. */
    tok u = mint(s, "{\"scopes\":[\"read\"],\"expires_at\":\"2099-06-01T12:00:00.5Z\"}");
    snprintf(path, sizeof path, "/v1/tokens/%s", u.id);
    j = get_json(s, path);
    assert_string_equal(tapi_str(j, "expires_at"), "2099-06-01T12:00:00.500Z");
    cJSON_Delete(j);
    assert_int_equal(status_of(u.c, "GET", "/v1/optimizers", NULL), 200);
    tok_free(&u);
}

static void test_wrong_credentials(void **state)
{
    suite *s = *state;
    static const char *const creds[] = {
        "wrong-key",
        "optd_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
        "optd_short",
    };
    for (size_t i = 0; i < sizeof creds / sizeof creds[0]; i++) {
        optd_client *c = tapi_client(tdaemon_url(&s->d), creds[i], false);
        optd_response r = tapi_req(c, "GET", "/v1/sessions", NULL, NULL);
        assert_401(&r);
        optd_response_free(&r);
        optd_client_free(c);
    }
    /* A real id with a wrong secret. */
    tok t = mint(s, "{\"scopes\":[\"admin\"]}");
    char forged[128];
    snprintf(forged, sizeof forged, "%s", t.secret);
    forged[30] = forged[30] == 'a' ? 'b' : 'a';
    optd_client *c = tapi_client(tdaemon_url(&s->d), forged, false);
    optd_response r = tapi_req(c, "GET", "/v1/sessions", NULL, NULL);
    assert_401(&r);
    assert_null(strstr(r.body, "revoked"));
    optd_response_free(&r);
    optd_client_free(c);
    tok_free(&t);
}

/* ---------------------------------------------------- the route battery */

/* A request of one route: where, what body, what a passing one answers. */
typedef struct {
    char name[64];       /* the {name} of the passing request            */
    char query[32];
    char *body;          /* owned; NULL: none                            */
    size_t len;
    const char *ctype;   /* NULL: JSON when there is a body              */
    const char *accept;  /* NULL: none                                   */
    int ok;              /* the passing request's status                 */
} spec;

static optd_response send_route(optd_client *c, const api_route *rt, const char *name,
                                const spec *sp)
{
    char path[256] = "";
    const char *brace = strchr(rt->pattern, '{');
    if (brace)
        snprintf(path, sizeof path, "%.*s%s%s%s", (int)(brace - rt->pattern), rt->pattern, name,
                 strchr(brace, '}') + 1, sp->query);
    else
        snprintf(path, sizeof path, "%s%s", rt->pattern, sp->query);
    const char *hdrs[3] = {NULL, NULL, NULL};
    int n = 0;
    char ct[96], ac[96];
    if (sp->ctype) {
        snprintf(ct, sizeof ct, "Content-Type: %s", sp->ctype);
        hdrs[n++] = ct;
    }
    if (sp->accept) {
        snprintf(ac, sizeof ac, "Accept: %s", sp->accept);
        hdrs[n++] = ac;
    }
    return tapi_req_bin(c, rt->method, path, hdrs, sp->body, sp->len);
}

static char *dup_bytes(const char *p, size_t n)
{
    char *d = malloc(n + 1);
    assert_non_null(d);
    memcpy(d, p, n);
    d[n] = '\0';
    return d;
}

/* A GET's body (admin key) as bytes. */
static char *get_bytes(suite *s, const char *path, const char *accept, size_t *len)
{
    char h[96];
    snprintf(h, sizeof h, "Accept: %s", accept);
    const char *hdrs[] = {h, NULL};
    optd_response r = tapi_req(s->admin, "GET", path, hdrs, NULL);
    if (r.status != 200)
        fail_msg("GET %s: %d", path, r.status);
    char *b = dup_bytes(r.body, r.len);
    *len = r.len;
    optd_response_free(&r);
    return b;
}

static void set_json(spec *sp, const char *body)
{
    sp->body = dup_bytes(body, strlen(body));
    sp->len = strlen(body);
}

/* The passing request of route rt (preparing what it needs: a session to
 * delete, a file to import, a token to revoke).  The work session is
 * bat-w; the watched one is never touched by a passing request. */
static spec spec_for(suite *s, const api_route *rt)
{
    spec sp = {.ok = 200};
    snprintf(sp.name, sizeof sp.name, "bat-w");
    ensure_session(s, "bat-w");
    size_t n;
    switch (rt->id) {
    case API_R_SESSION_PUT:
        drop_session(s, "bat-new");
        snprintf(sp.name, sizeof sp.name, "bat-new");
        set_json(&sp, CREATE_BODY);
        sp.ok = 201;
        break;
    case API_R_SESSION_PATCH:
        set_json(&sp, "{\"optimizer\":{\"lr\":0.05}}");
        break;
    case API_R_SESSION_DELETE:
        ensure_session(s, "bat-del");
        snprintf(sp.name, sizeof sp.name, "bat-del");
        sp.ok = 204;
        break;
    case API_R_STEP:
        set_json(&sp, "{\"grad\":[0.5,0.5,0.5,0.5]}");
        break;
    case API_R_PARAMS_PUT:
        set_json(&sp, "{\"params\":[4,3,2,1]}");
        break;
    case API_R_STATE_GET:
    case API_R_EXPORT_GET:
        sp.accept = "application/octet-stream";
        break;
    case API_R_STATE_PUT:
        sp.body = get_bytes(s, "/v1/sessions/bat-w/state", "application/octet-stream", &n);
        sp.len = n;
        sp.ctype = "application/octet-stream";
        break;
    case API_R_EXPORT_PUT:
        drop_session(s, "bat-imp");
        sp.body = get_bytes(s, "/v1/sessions/bat-w/export", "application/octet-stream", &n);
        sp.len = n;
        sp.ctype = "application/octet-stream";
        snprintf(sp.name, sizeof sp.name, "bat-imp");
        sp.ok = 201;
        break;
    case API_R_EVENTS:
        snprintf(sp.query, sizeof sp.query, "?live=false");
        break;
    case API_R_ASSET:
        snprintf(sp.name, sizeof sp.name, "uPlot.LICENSE");
        break;
    case API_R_CHECKPOINTS_POST: {
        static int label;
        char b[64];
        snprintf(b, sizeof b, "{\"label\":\"bat%d\"}", label++);
        set_json(&sp, b);
        sp.ok = 201;
        break;
    }
    case API_R_ROLLBACK:
        /* to the checkpoint the route before made */
        set_json(&sp, "{\"label\":\"bat0\"}");
        break;
    case API_R_TOKENS_POST:
        set_json(&sp, "{\"scopes\":[\"read\"],\"label\":\"battery\"}");
        sp.ok = 201;
        break;
    case API_R_TOKEN_GET:
    case API_R_TOKEN_DELETE: {
        optd_response r = tapi_req(s->admin, "POST", "/v1/tokens", NULL,
                                   "{\"scopes\":[\"read\"],\"label\":\"to-revoke\"}");
        assert_int_equal(r.status, 201);
        cJSON *j = tapi_json(&r);
        snprintf(sp.name, sizeof sp.name, "%s", tapi_str(j, "id"));
        cJSON_Delete(j);
        optd_response_free(&r);
        sp.ok = rt->id == API_R_TOKEN_DELETE ? 204 : 200;
        break;
    }
    default:
        break;
    }
    return sp;
}

static void test_route_battery(void **state)
{
    suite *s = *state;
    ensure_session(s, WATCHED);
    assert_int_equal(status_of(s->admin, "POST", "/v1/sessions/" WATCHED "/step",
                               "{\"grad\":[1,1,1,1]}"),
                     200);
    /* By scope: the tokens of prefix "bat-", and one of each scope whose
     * prefix is elsewhere. */
    static const char *const scope_json[] = {"", "read", "step", "admin"};
    tok in[4], out[4];
    for (int sc = API_SCOPE_READ; sc <= API_SCOPE_ADMIN; sc++) {
        char b[128];
        snprintf(b, sizeof b, "{\"scopes\":[\"%s\"],\"prefix\":\"bat-\"}", scope_json[sc]);
        in[sc] = mint(s, b);
        snprintf(b, sizeof b, "{\"scopes\":[\"%s\"],\"prefix\":\"other-\"}", scope_json[sc]);
        out[sc] = mint(s, b);
    }
    tapi_snap before = tapi_snapshot(s->admin, WATCHED);
    size_t checked = 0;
    for (size_t i = 0; i < api_route_count; i++) {
        const api_route *rt = &api_routes[i];
        spec sp = spec_for(s, rt);
        bool named = strchr(rt->pattern, '{') != NULL;
        bool session = named && strncmp(rt->pattern, "/v1/sessions/", 13) == 0;
        /* Refusals go to the watched session (or the route's own target
         * when it is not a session route). */
        const char *target = session ? WATCHED : sp.name;
        optd_response r;
        if (rt->scope == API_SCOPE_PUBLIC) {
            r = send_route(s->anon, rt, sp.name, &sp);
            if (r.status != sp.ok)
                fail_msg("%s %s without a credential: %d", rt->method, rt->pattern, r.status);
            optd_response_free(&r);
            free(sp.body);
            checked++;
            continue;
        }
        /* No credential. */
        r = send_route(s->anon, rt, target, &sp);
        if (r.status != 401)
            fail_msg("%s %s without a credential: %d", rt->method, rt->pattern, r.status);
        assert_401(&r);
        optd_response_free(&r);
        if (rt->scope == API_SCOPE_KEY) {
            /* Even an admin token is not the admin key. */
            r = send_route(in[API_SCOPE_ADMIN].c, rt, target, &sp);
            int want = rt->id == API_R_METRICS ? 401 : 403;
            if (r.status != want)
                fail_msg("%s %s with an admin token: %d", rt->method, rt->pattern, r.status);
            tapi_assert_problem(&r, want, want == 403 ? "scope" : NULL);
            optd_response_free(&r);
        } else {
            /* A scope too small, inside the prefix. */
            if (rt->scope > API_SCOPE_READ) {
                r = send_route(in[rt->scope - 1].c, rt, target, &sp);
                if (r.status != 403)
                    fail_msg("%s %s with scope %s: %d %.*s", rt->method, rt->pattern,
                             scope_json[rt->scope - 1], r.status, (int)r.len, r.body);
                tapi_assert_problem(&r, 403, "scope");
                assert_non_null(strstr(r.body, scope_json[rt->scope]));
                optd_response_free(&r);
            }
            /* The right scope, outside the prefix. */
            if (named) {
                r = send_route(out[rt->scope].c, rt, target, &sp);
                if (r.status != 403)
                    fail_msg("%s %s outside the prefix: %d", rt->method, rt->pattern, r.status);
                tapi_assert_problem(&r, 403, "prefix");
                assert_non_null(strstr(r.body, "other-"));
                optd_response_free(&r);
            }
        }
        tapi_snap now = tapi_snapshot(s->admin, WATCHED);
        tapi_assert_same(&before, &now);
        tapi_snap_free(&now);
        /* The right credential passes: the admin key for the key's
         * routes, else the token of exactly the route's scope. */
        optd_client *ok = rt->scope == API_SCOPE_KEY ? s->admin : in[rt->scope].c;
        r = send_route(ok, rt, sp.name, &sp);
        if (r.status != sp.ok)
            fail_msg("%s %s with the right credential: %d %.*s", rt->method, rt->pattern,
                     r.status, (int)(r.len > 300 ? 300 : r.len), r.body);
        optd_response_free(&r);
        free(sp.body);
        checked++;
    }
    assert_int_equal(checked, api_route_count);
    tapi_snap after = tapi_snapshot(s->admin, WATCHED);
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    tapi_snap_free(&before);
    /* The list a token sees holds its prefix's names only. */
    ensure_session(s, "other-one");
    optd_response r = tapi_req(in[API_SCOPE_READ].c, "GET", "/v1/sessions", NULL, NULL);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\"bat-w\""));
    assert_null(strstr(r.body, "other-one"));
    optd_response_free(&r);
    r = tapi_req(out[API_SCOPE_READ].c, "GET", "/v1/sessions?limit=1", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    const cJSON *arr = cJSON_GetObjectItem(j, "sessions");
    assert_int_equal(cJSON_GetArraySize(arr), 1);
    assert_string_equal(tapi_str(cJSON_GetArrayItem(arr, 0), "name"), "other-one");
    cJSON_Delete(j);
    optd_response_free(&r);
    /* A fork may not read a parent outside the prefix. */
    r = tapi_req(in[API_SCOPE_ADMIN].c, "PUT", "/v1/sessions/bat-fork", NULL,
                 "{\"fork\":{\"from\":\"other-one\"}}");
    tapi_assert_problem(&r, 403, "prefix");
    optd_response_free(&r);
    for (int sc = API_SCOPE_READ; sc <= API_SCOPE_ADMIN; sc++) {
        tok_free(&in[sc]);
        tok_free(&out[sc]);
    }
}

/* ---------------------------------------------------------- created_by */

static const char *created_by_of(suite *s, const char *name, cJSON **keep)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    *keep = get_json(s, path);
    const cJSON *m = cJSON_GetObjectItem(*keep, "created_by");
    return cJSON_IsString(m) ? m->valuestring : NULL;
}

static void test_created_by(void **state)
{
    suite *s = *state;
    tok t = mint(s, "{\"scopes\":[\"admin\"],\"prefix\":\"cb-\"}");
    cJSON *j;
    assert_int_equal(status_of(t.c, "PUT", "/v1/sessions/cb-tok", CREATE_BODY), 201);
    assert_string_equal(created_by_of(s, "cb-tok", &j), t.id);
    cJSON_Delete(j);
    assert_int_equal(status_of(s->admin, "PUT", "/v1/sessions/cb-admin", CREATE_BODY), 201);
    assert_string_equal(created_by_of(s, "cb-admin", &j), "admin");
    cJSON_Delete(j);
    /* A fork and an import record their caller, not the parent's. */
    assert_int_equal(status_of(t.c, "PUT", "/v1/sessions/cb-fork",
                               "{\"fork\":{\"from\":\"cb-admin\"}}"),
                     201);
    assert_string_equal(created_by_of(s, "cb-fork", &j), t.id);
    cJSON_Delete(j);
    size_t n;
    char *file = get_bytes(s, "/v1/sessions/cb-admin/export", "application/octet-stream", &n);
    const char *h[] = {"Content-Type: application/octet-stream", NULL};
    optd_response r = tapi_req_bin(t.c, "PUT", "/v1/sessions/cb-imp/export", h, file, n);
    assert_int_equal(r.status, 201);
    optd_response_free(&r);
    free(file);
    assert_string_equal(created_by_of(s, "cb-imp", &j), t.id);
    cJSON_Delete(j);
    /* The list shows it too. */
    r = tapi_req(t.c, "GET", "/v1/sessions", NULL, NULL);
    j = tapi_json(&r);
    optd_response_free(&r);
    int seen = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(j, "sessions"))
    {
        const char *want = strcmp(tapi_str(e, "name"), "cb-admin") == 0 ? "admin" : t.id;
        assert_string_equal(tapi_str(e, "created_by"), want);
        seen++;
    }
    assert_int_equal(seen, 4);
    cJSON_Delete(j);
    tok_free(&t);
}

/* -------------------------------------------------------------- quotas */

static void assert_429(const optd_response *r, const char *field)
{
    tapi_assert_problem(r, 429, field);
    const char *ra = optd_response_header(r, "Retry-After");
    assert_non_null(ra);
    char *end;
    long v = strtol(ra, &end, 10);
    assert_true(*ra && *end == '\0' && v >= 1);
}

static void test_quota_sessions_and_params(void **state)
{
    suite *s = *state;
    tok a = mint(s, "{\"scopes\":[\"admin\"],\"prefix\":\"qa-\","
                    "\"quotas\":{\"max_sessions\":2,\"max_params\":10}}");
    tok b = mint(s, "{\"scopes\":[\"admin\"],\"prefix\":\"qb-\"}");
    assert_int_equal(status_of(a.c, "PUT", "/v1/sessions/qa-1", CREATE_BODY), 201); /* 4 */
    /* 4 + 8 params would pass max_params 10. */
    optd_response r = tapi_req(a.c, "PUT", "/v1/sessions/qa-big", NULL,
                               "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":8,"
                               "\"init\":{\"type\":\"zeros\"}}");
    assert_429(&r, "max_params");
    optd_response_free(&r);
    assert_int_equal(status_of(s->admin, "GET", "/v1/sessions/qa-big", NULL), 404);
    assert_int_equal(status_of(a.c, "PUT", "/v1/sessions/qa-2", CREATE_BODY), 201); /* 8 */
    /* A third session passes max_sessions 2. */
    r = tapi_req(a.c, "PUT", "/v1/sessions/qa-3",
                 NULL, "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1]}");
    assert_429(&r, "max_sessions");
    optd_response_free(&r);
    /* Neither does a fork. */
    r = tapi_req(a.c, "PUT", "/v1/sessions/qa-f", NULL, "{\"fork\":{\"from\":\"qa-1\"}}");
    assert_429(&r, "max_sessions");
    optd_response_free(&r);
    assert_int_equal(status_of(s->admin, "GET", "/v1/sessions/qa-3", NULL), 404);
    assert_int_equal(status_of(s->admin, "GET", "/v1/sessions/qa-f", NULL), 404);
    /* Re-creating an existing one is no new session. */
    assert_int_equal(status_of(a.c, "PUT", "/v1/sessions/qa-1", CREATE_BODY), 200);
    /* Another token is unaffected. */
    for (int i = 0; i < 3; i++) {
        char path[64];
        snprintf(path, sizeof path, "/v1/sessions/qb-%d", i);
        assert_int_equal(status_of(b.c, "PUT", path, CREATE_BODY), 201);
    }
    /* The usage the token's document shows; a deletion makes room. */
    char path[64];
    snprintf(path, sizeof path, "/v1/tokens/%s", a.id);
    cJSON *j = get_json(s, path);
    assert_int_equal((int)tapi_num(cJSON_GetObjectItem(j, "usage"), "sessions"), 2);
    assert_int_equal((int)tapi_num(cJSON_GetObjectItem(j, "usage"), "params"), 8);
    cJSON_Delete(j);
    assert_int_equal(status_of(a.c, "DELETE", "/v1/sessions/qa-2", NULL), 204);
    assert_int_equal(status_of(a.c, "PUT", "/v1/sessions/qa-3", CREATE_BODY), 201);
    tok_free(&a);
    tok_free(&b);
}

/* Concurrent creates cannot pass max_sessions together: the check and the
 * create are one step under a lock. */
typedef struct {
    const char *url, *secret;
    int i, status;
} racer;

static void *race_create(void *arg)
{
    racer *r = arg;
    optd_client *c = optd_client_new(r->url, r->secret);
    optd_client_set_retry(c, 1, 0, 0);
    char path[64];
    snprintf(path, sizeof path, "/v1/sessions/race-%d", r->i);
    /* Large enough that writing its first checkpoint takes a while: the
     * creates overlap. */
    static const char body[] = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":1000000}";
    optd_response resp;
    r->status = optd_request(c, "PUT", path, NULL, body, strlen(body), &resp) == 0
                    ? resp.status
                    : -1;
    if (r->status >= 0)
        optd_response_free(&resp);
    optd_client_free(c);
    return NULL;
}

static void test_quota_concurrent_creates(void **state)
{
    suite *s = *state;
    tok t = mint(s, "{\"scopes\":[\"admin\"],\"prefix\":\"race-\",\"quotas\":{\"max_sessions\":3}}");
    enum { N = 8 };
    racer r[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        r[i] = (racer){tdaemon_url(&s->d), t.secret, i, 0};
        assert_int_equal(pthread_create(&th[i], NULL, race_create, &r[i]), 0);
    }
    int created = 0, refused = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        created += r[i].status == 201;
        refused += r[i].status == 429;
    }
    assert_int_equal(created, 3);
    assert_int_equal(refused, N - 3);
    char path[64];
    snprintf(path, sizeof path, "/v1/tokens/%s", t.id);
    cJSON *j = get_json(s, path);
    assert_int_equal((int)tapi_num(cJSON_GetObjectItem(j, "usage"), "sessions"), 3);
    cJSON_Delete(j);
    tok_free(&t);
}

static long long session_step(suite *s, const char *name)
{
    char path[64];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    cJSON *j = get_json(s, path);
    long long st = (long long)tapi_num(j, "step");
    cJSON_Delete(j);
    return st;
}

static void test_step_rate(void **state)
{
    suite *s = *state;
    tok slow = mint(s, "{\"scopes\":[\"step\"],\"prefix\":\"rt-\","
                       "\"quotas\":{\"steps_per_second\":0.5,\"burst\":2}}");
    tok fast = mint(s, "{\"scopes\":[\"step\"],\"prefix\":\"rt-\"}");
    ensure_session(s, "rt-a");
    ensure_session(s, "rt-b");
    const char *grad = "{\"grad\":[0.1,0.1,0.1,0.1]}";
    /* The burst passes, the next one is refused and changes nothing. */
    assert_int_equal(status_of(slow.c, "POST", "/v1/sessions/rt-a/step", grad), 200);
    assert_int_equal(status_of(slow.c, "POST", "/v1/sessions/rt-a/step", grad), 200);
    tapi_snap before = tapi_snapshot(s->admin, "rt-a");
    optd_response r = tapi_req(slow.c, "POST", "/v1/sessions/rt-a/step", NULL, grad);
    assert_429(&r, "");
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(s->admin, "rt-a");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    /* Reads are not steps: the bucket does not count them. */
    assert_int_equal(status_of(slow.c, "GET", "/v1/sessions/rt-a/params", NULL), 200);
    /* Another token keeps its full rate meanwhile, on any session. */
    long long t0 = tapi_now_ms();
    for (int i = 0; i < 40; i++)
        assert_int_equal(status_of(fast.c, "POST", "/v1/sessions/rt-b/step", grad), 200);
    assert_true(tapi_now_ms() - t0 < 10000);
    assert_int_equal(session_step(s, "rt-b"), 40);
    /* The slow one is still refused until its bucket refills (2 s). */
    r = tapi_req(slow.c, "POST", "/v1/sessions/rt-b/step", NULL, grad);
    if (tapi_now_ms() - t0 < 1500)
        assert_429(&r, "");
    optd_response_free(&r);
    struct timespec ts = {2, 100 * 1000000L};
    nanosleep(&ts, NULL);
    assert_int_equal(status_of(slow.c, "POST", "/v1/sessions/rt-a/step", grad), 200);
    assert_int_equal(session_step(s, "rt-a"), 3);
    tok_free(&slow);
    tok_free(&fast);
}

/* ---------------------------------------------------- secrets at rest */

static bool file_contains(const char *path, const void *needle, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return false;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc(len > 0 ? (size_t)len : 1);
    assert_non_null(b);
    size_t got = fread(b, 1, (size_t)len, f);
    fclose(f);
    bool found = false;
    for (size_t i = 0; !found && got >= n && i <= got - n; i++)
        found = memcmp(b + i, needle, n) == 0;
    free(b);
    return found;
}

static void test_secrets_hashed_at_rest(void **state)
{
    suite *s = *state;
    tok t = mint(s, "{\"scopes\":[\"read\"],\"label\":\"at-rest\"}");
    const char *hexpart = t.secret + 22;
    unsigned char raw[32];
    for (int i = 0; i < 32; i++)
        sscanf(hexpart + 2 * i, "%2hhx", &raw[i]);
    /* Every column of the tokens table... */
    sqlite3 *db;
    assert_int_equal(sqlite3_open_v2(tdaemon_db(&s->d), &db, SQLITE_OPEN_READONLY, NULL),
                     SQLITE_OK);
    sqlite3_stmt *q;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT * FROM tokens WHERE id = ?1", -1, &q, NULL),
                     SQLITE_OK);
    sqlite3_bind_text(q, 1, t.id, -1, SQLITE_STATIC);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    for (int c = 0; c < sqlite3_column_count(q); c++) {
        const char *name = sqlite3_column_name(q, c);
        const void *v = sqlite3_column_blob(q, c);
        int n = sqlite3_column_bytes(q, c);
        if (strcmp(name, "hash") == 0)
            assert_int_equal(n, 32);
        for (int i = 0; v && i + 32 <= n; i++)
            assert_true(memcmp((const char *)v + i, raw, 32) != 0);
        for (int i = 0; v && i + 64 <= n; i++)
            assert_true(memcmp((const char *)v + i, hexpart, 64) != 0);
    }
    sqlite3_finalize(q);
    sqlite3_close(db);
    /* ...and every byte of the database and its WAL: neither the secret's
     * text nor its bytes. */
    char wal[600];
    snprintf(wal, sizeof wal, "%s-wal", tdaemon_db(&s->d));
    const char *files[] = {tdaemon_db(&s->d), wal};
    for (int f = 0; f < 2; f++) {
        assert_false(file_contains(files[f], hexpart, 64));
        assert_false(file_contains(files[f], raw, 32));
    }
    /* The key beside it is private. */
    char key[600];
    snprintf(key, sizeof key, "%s.token-key", tdaemon_db(&s->d));
    FILE *kf = fopen(key, "rb");
    assert_non_null(kf);
    fclose(kf);
    tok_free(&t);
}

/* Tokens are kept across a restart; a revoked one stays revoked. */
static void test_restart_keeps_tokens(void **state)
{
    suite *s = *state;
    tok keep = mint(s, "{\"scopes\":[\"read\"]}");
    tok gone = mint(s, "{\"scopes\":[\"read\"]}");
    char path[64];
    snprintf(path, sizeof path, "/v1/tokens/%s", gone.id);
    assert_int_equal(status_of(s->admin, "DELETE", path, NULL), 204);
    assert_int_equal(tdaemon_restart(&s->d), 0);
    optd_client_free(s->admin);
    optd_client_free(s->anon);
    s->admin = tapi_client(tdaemon_url(&s->d), ADMIN_KEY, false);
    s->anon = tapi_client(tdaemon_url(&s->d), NULL, false);
    tok_free(&keep);
    tok_free(&gone);
    keep.c = tapi_client(tdaemon_url(&s->d), keep.secret, false);
    gone.c = tapi_client(tdaemon_url(&s->d), gone.secret, false);
    assert_int_equal(status_of(keep.c, "GET", "/v1/optimizers", NULL), 200);
    optd_response r = tapi_req(gone.c, "GET", "/v1/optimizers", NULL, NULL);
    assert_401(&r);
    optd_response_free(&r);
    tok_free(&keep);
    tok_free(&gone);
}

/* Without an admin key authentication is off and tokens are refused. */
static void test_tokens_need_admin_key(void **state)
{
    (void)state;
    tapi_suite *o = tapi_suite_open(NULL);
    assert_non_null(o);
    optd_response r = tapi_req(o->c, "POST", "/v1/tokens", NULL, "{\"scopes\":[\"read\"]}");
    tapi_assert_problem(&r, 409, NULL);
    assert_non_null(strstr(r.body, "--api-key"));
    optd_response_free(&r);
    r = tapi_req(o->c, "GET", "/v1/tokens", NULL, NULL);
    tapi_assert_problem(&r, 409, NULL);
    optd_response_free(&r);
    tapi_create(o->c, "open", CREATE_BODY, 201);
    r = tapi_req(o->c, "GET", "/v1/sessions/open", NULL, NULL);
    cJSON *j = tapi_json(&r);
    assert_null(cJSON_GetObjectItem(j, "created_by"));
    cJSON_Delete(j);
    optd_response_free(&r);
    assert_int_equal(tapi_suite_close(o), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mint_list_get_revoke),
        cmocka_unit_test(test_bad_mint_requests),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_wrong_credentials),
        cmocka_unit_test(test_route_battery),
        cmocka_unit_test(test_created_by),
        cmocka_unit_test(test_quota_sessions_and_params),
        cmocka_unit_test(test_quota_concurrent_creates),
        cmocka_unit_test(test_step_rate),
        cmocka_unit_test(test_secrets_hashed_at_rest),
        cmocka_unit_test(test_restart_keeps_tokens),
        cmocka_unit_test(test_tokens_need_admin_key),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
