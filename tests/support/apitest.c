/*
 * apitest.c -- request helpers and state snapshots for the integration
 * tests (see apitest.h).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "tests/support/apitest.h"

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

long long tapi_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

optd_client *tapi_client(const char *url, const char *api_key, bool retry)
{
    optd_client *c = optd_client_new(url, api_key);
    assert_non_null(c);
    if (!retry)
        optd_client_set_retry(c, 1, 0, 0);
    optd_client_set_timeouts(c, 5000, 60000);
    return c;
}

optd_response tapi_req_bin(optd_client *c, const char *method, const char *path,
                           const char *const *headers, const void *body, size_t len)
{
    optd_response r;
    optd_error e;
    if (optd_request_err(c, method, path, headers, body, len, &r, &e) != 0)
        fail_msg("%s %s: no answer: %s", method, path, e.detail);
    return r;
}

optd_response tapi_req(optd_client *c, const char *method, const char *path,
                       const char *const *headers, const char *body)
{
    return tapi_req_bin(c, method, path, headers, body, body ? strlen(body) : 0);
}

cJSON *tapi_json(const optd_response *r)
{
    cJSON *j = cJSON_ParseWithLength(r->body, r->len);
    if (!j)
        fail_msg("not JSON (status %d): %.*s", r->status, (int)(r->len > 300 ? 300 : r->len),
                 r->body);
    return j;
}

double tapi_num(const cJSON *obj, const char *name)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!cJSON_IsNumber(m))
        fail_msg("member \"%s\" is not a number", name);
    return m->valuedouble;
}

const char *tapi_str(const cJSON *obj, const char *name)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!cJSON_IsString(m))
        fail_msg("member \"%s\" is not a string", name);
    return m->valuestring;
}

void tapi_assert_problem(const optd_response *r, int status, const char *field)
{
    if (r->status != status)
        fail_msg("expected status %d, got %d: %.*s", status, r->status,
                 (int)(r->len > 400 ? 400 : r->len), r->body);
    if (strncmp(r->content_type, "application/problem+json", 24) != 0)
        fail_msg("status %d: Content-Type is \"%s\", not application/problem+json", status,
                 r->content_type);
    cJSON *j = tapi_json(r);
    const char *type = tapi_str(j, "type");
    if (strncmp(type, "urn:optd:problem:", 17) != 0)
        fail_msg("problem type \"%s\" is not a urn:optd:problem: URN", type);
    assert_true(strlen(tapi_str(j, "title")) > 0);
    assert_true(strlen(tapi_str(j, "detail")) > 0);
    assert_int_equal((int)tapi_num(j, "status"), status);
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(j, "field");
    if (field && *field) {
        if (!cJSON_IsString(f))
            fail_msg("status %d: expected field \"%s\", the problem has none: %.*s", status,
                     field, (int)r->len, r->body);
        if (strcmp(f->valuestring, field) != 0)
            fail_msg("status %d: expected field \"%s\", got \"%s\"", status, field,
                     f->valuestring);
    } else if (field && f) {
        fail_msg("status %d: unexpected field \"%s\"", status,
                 cJSON_IsString(f) ? f->valuestring : "?");
    }
    cJSON_Delete(j);
}

void tapi_create(optd_client *c, const char *name, const char *body, int status)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(c, "PUT", path, NULL, body);
    if (r.status != status)
        fail_msg("PUT %s: expected %d, got %d: %.*s", path, status, r.status, (int)r.len,
                 r.body);
    optd_response_free(&r);
}

tapi_snap tapi_snapshot(optd_client *c, const char *name)
{
    tapi_snap s = {0};
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s/params", name);
    const char *bin[] = {"Accept: application/octet-stream", NULL};
    optd_response r = tapi_req(c, "GET", path, bin, NULL);
    if (r.status != 200)
        fail_msg("GET %s: %d %.*s", path, r.status, (int)r.len, r.body);
    const char *st = optd_response_header(&r, "Optd-Step");
    assert_non_null(st);
    s.params_step = atoll(st);
    s.params = (unsigned char *)r.body;
    s.len = r.len;
    r.body = NULL;
    optd_response_free(&r);

    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    r = tapi_req(c, "GET", path, NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    s.session_step = (long long)tapi_num(j, "step");
    cJSON_Delete(j);
    optd_response_free(&r);
    return s;
}

void tapi_assert_same(const tapi_snap *a, const tapi_snap *b)
{
    assert_int_equal(a->params_step, b->params_step);
    assert_int_equal(a->session_step, b->session_step);
    assert_int_equal(a->len, b->len);
    assert_memory_equal(a->params, b->params, a->len);
}

void tapi_snap_free(tapi_snap *s)
{
    free(s->params);
    s->params = NULL;
}

int tapi_integrity_check(const char *db_path)
{
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
        fprintf(stderr, "integrity: cannot open %s: %s\n", db_path, sqlite3_errmsg(db));
        sqlite3_close(db);
        return -1;
    }
    sqlite3_stmt *stmt = NULL;
    int rc = -1;
    if (sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &stmt, NULL) == SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW) {
        const char *res = (const char *)sqlite3_column_text(stmt, 0);
        if (res && strcmp(res, "ok") == 0)
            rc = 0;
        else
            fprintf(stderr, "integrity_check: %s\n", res ? res : "(null)");
    } else {
        fprintf(stderr, "integrity_check failed: %s\n", sqlite3_errmsg(db));
    }
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return rc;
}

tapi_suite *tapi_suite_open(const char *const *args)
{
    tapi_suite *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (tdaemon_start(&s->d, NULL, args) != 0) {
        tdaemon_cleanup(&s->d);
        free(s);
        return NULL;
    }
    s->c = tapi_client(tdaemon_url(&s->d), NULL, false);
    return s;
}

int tapi_suite_close(tapi_suite *s)
{
    if (!s)
        return -1;
    optd_client_free(s->c);
    int rc = tdaemon_stop(&s->d);
    if (rc == 0 && tapi_integrity_check(tdaemon_db(&s->d)) != 0)
        rc = -1;
    tdaemon_cleanup(&s->d);
    free(s);
    return rc == 0 ? 0 : -1;
}
