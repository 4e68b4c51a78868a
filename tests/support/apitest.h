/*
 * apitest.h -- helpers shared by the integration tests that drive the
 * daemon over HTTP: raw requests with cmocka assertions, problem+json
 * checks, and snapshots of a session's state to prove an error changed
 * nothing.  Include after <cmocka.h>.
 */
#ifndef TESTS_SUPPORT_APITEST_H
#define TESTS_SUPPORT_APITEST_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "clients/c/optd_client.h"
#include "tests/support/daemon.h"

/* A client for url with retries off (a test sees every answer), or with
 * the default retries when retry is true.  Fails the test on OOM. */
optd_client *tapi_client(const char *url, const char *api_key, bool retry);

/* One request; fails the test when no HTTP answer came.  body may be NULL
 * (none) or a NUL-terminated string.  Free with optd_response_free. */
optd_response tapi_req(optd_client *c, const char *method, const char *path,
                       const char *const *headers, const char *body);
/* The same with a binary body of len bytes. */
optd_response tapi_req_bin(optd_client *c, const char *method, const char *path,
                           const char *const *headers, const void *body, size_t len);

/* The body parsed as JSON (fails the test if it is not); cJSON_Delete it. */
cJSON *tapi_json(const optd_response *r);
/* Member of an object as a number / string; fails the test when absent. */
double tapi_num(const cJSON *obj, const char *name);
const char *tapi_str(const cJSON *obj, const char *name);

/* Asserts an RFC 9457 problem: this status, Content-Type
 * application/problem+json, a urn:optd:problem: type, a title, a detail,
 * "status" equal to the HTTP status, and field == expected (NULL: not
 * checked; "" : must be absent). */
void tapi_assert_problem(const optd_response *r, int status, const char *field);

/* PUT /v1/sessions/{name} with body; asserts the status. */
void tapi_create(optd_client *c, const char *name, const char *body, int status);

/* A session's observable state: the params as bytes (binary GET), their
 * Optd-Step, and GET session's "step". */
typedef struct {
    unsigned char *params;
    size_t len;
    long long params_step;
    long long session_step;
} tapi_snap;

tapi_snap tapi_snapshot(optd_client *c, const char *name);
/* Asserts b is byte-identical to a (params and both steps). */
void tapi_assert_same(const tapi_snap *a, const tapi_snap *b);
void tapi_snap_free(tapi_snap *s);

/* PRAGMA integrity_check on a database file (no daemon running): 0 when
 * "ok", else -1 after printing what SQLite said. */
int tapi_integrity_check(const char *db_path);

/* Milliseconds of a monotonic clock. */
long long tapi_now_ms(void);

/* A suite's daemon and client: most integration suites share one of each. */
typedef struct {
    tdaemon d;
    optd_client *c;
} tapi_suite;

/* Starts a daemon (extra args may be NULL) and a client without retries.
 * NULL after saying why. */
tapi_suite *tapi_suite_open(const char *const *args);
/* Stops the daemon (a clean exit is required), checks the database's
 * integrity, frees everything.  0 or -1. */
int tapi_suite_close(tapi_suite *s);

#endif /* TESTS_SUPPORT_APITEST_H */
