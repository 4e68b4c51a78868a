/*
 * test_tls.c -- HTTPS: the real daemon with --tls-cert/--tls-key (and
 * --tls-client-ca for mutual TLS) driven by libcurl and the C client, with
 * certificates tests/support/make_test_ca.sh makes for this run.
 *
 * Served with the right CA; refused with the wrong CA
 * (CURLE_PEER_FAILED_VERIFICATION); plain HTTP to the TLS port gets no
 * HTTP answer; mutual TLS refuses a client without a certificate or with
 * one from another CA in the handshake and serves the right one; SIGHUP
 * swaps to a certificate from a new CA with the session intact, only the
 * new CA verifying new connections while a connection opened before keeps
 * working; a bad file at SIGHUP keeps the old certificate and logs an
 * error; SIGHUP without TLS keeps the daemon running; bad flags stop the
 * start with a clear message; --check-health probes an https:// URL.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "tests/support/apitest.h"

#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char ca_dir[256];

/* DIR/NAME of the test certificates (a static buffer per call slot). */
static const char *pem(const char *name)
{
    static char bufs[8][512];
    static int next;
    char *b = bufs[next++ % 8];
    snprintf(b, sizeof bufs[0], "%s/%s", ca_dir, name);
    return b;
}

static int copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb"), *out = in ? fopen(to, "wb") : NULL;
    int rc = in && out ? 0 : -1;
    char buf[4096];
    size_t n;
    while (rc == 0 && (n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n)
            rc = -1;
    if (in)
        fclose(in);
    if (out && fclose(out) != 0)
        rc = -1;
    return rc;
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(ca_dir, sizeof ca_dir, "/tmp/optd-tls-XXXXXX");
    if (!mkdtemp(ca_dir))
        return -1;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "sh tests/support/make_test_ca.sh %s", ca_dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "test_tls: %s failed\n", cmd);
        return -1;
    }
    return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", ca_dir);
    curl_global_cleanup();
    return system(cmd) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------ helpers */

static size_t sink(char *p, size_t size, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return size * n;
}

/* GET url+path with libcurl on handle h (NULL: a fresh one): ca, client
 * cert/key may be NULL.  Returns the CURLcode; *status the HTTP status. */
static CURLcode get_on(CURL *h, const char *url, const char *path, const char *ca,
                       const char *cert, const char *key, long *status)
{
    CURL *own = h ? NULL : curl_easy_init();
    CURL *e = h ? h : own;
    assert_non_null(e);
    char full[256];
    snprintf(full, sizeof full, "%s%s", url, path);
    curl_easy_setopt(e, CURLOPT_URL, full);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
    if (ca)
        curl_easy_setopt(e, CURLOPT_CAINFO, ca);
    if (cert) {
        curl_easy_setopt(e, CURLOPT_SSLCERT, cert);
        curl_easy_setopt(e, CURLOPT_SSLKEY, key);
    }
    *status = 0;
    CURLcode rc = curl_easy_perform(e);
    if (rc == CURLE_OK)
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, status);
    if (own)
        curl_easy_cleanup(own);
    return rc;
}

static CURLcode get(const char *url, const char *ca, const char *cert, const char *key,
                    long *status)
{
    return get_on(NULL, url, "/healthz", ca, cert, key, status);
}

/* Waits up to 10 s for text in the daemon's log; true when it came. */
static bool log_has(const tdaemon *d, const char *text)
{
    long long deadline = tapi_now_ms() + 10000;
    char buf[1 << 16];
    while (tapi_now_ms() < deadline) {
        FILE *f = fopen(d->log, "r");
        if (f) {
            size_t n = fread(buf, 1, sizeof buf - 1, f);
            buf[n] = '\0';
            fclose(f);
            if (strstr(buf, text))
                return true;
        }
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    tdaemon_dump_log(d);
    return false;
}

/* Counts the occurrences of text in the daemon's log. */
static int log_count(const tdaemon *d, const char *text)
{
    char buf[1 << 16];
    FILE *f = fopen(d->log, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    int k = 0;
    for (const char *p = buf; (p = strstr(p, text)); p += strlen(text))
        k++;
    return k;
}

/* SIGHUP and wait for the n-th log line with text. */
static void hup_and_wait(tdaemon *d, const char *text)
{
    int before = log_count(d, text);
    assert_int_equal(kill(d->pid, SIGHUP), 0);
    long long deadline = tapi_now_ms() + 10000;
    while (log_count(d, text) <= before) {
        if (tapi_now_ms() > deadline) {
            tdaemon_dump_log(d);
            fail_msg("no \"%s\" in the log after SIGHUP", text);
        }
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(kill(d->pid, 0), 0); /* still running */
}

/* A C client for d verifying against ca (client cert/key may be NULL). */
static optd_client *client(const tdaemon *d, const char *ca, const char *cert, const char *key)
{
    optd_client *c = tapi_client(tdaemon_url(d), NULL, false);
    assert_int_equal(optd_client_set_tls(c, ca, cert, key), 0);
    return c;
}

/* Creates SGD session name with params [1, 2] and takes one step of
 * grad [1, 1] (lr 0.5): params [0.5, 1.5] at step 1. */
static void create_and_step(optd_client *c, const char *name)
{
    char path[128];
    tapi_create(c, name, "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2],"
                         "\"dtype\":\"float64\"}",
                201);
    snprintf(path, sizeof path, "/v1/sessions/%s/step", name);
    optd_response r = tapi_req(c, "POST", path, NULL, "{\"grad\":[1,1]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    snprintf(path, sizeof path, "/v1/sessions/%s/params", name);
    r = tapi_req(c, "GET", path, NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "params");
    assert_true(cJSON_IsArray(p));
    assert_int_equal(cJSON_GetArraySize(p), 2);
    assert_true(cJSON_GetArrayItem(p, 0)->valuedouble == 0.5);
    assert_true(cJSON_GetArrayItem(p, 1)->valuedouble == 1.5);
    assert_int_equal((int)tapi_num(j, "step"), 1);
    cJSON_Delete(j);
    optd_response_free(&r);
}

static void start(tdaemon *d, const char *cert, const char *key, const char *client_ca)
{
    const char *args[] = {"--tls-cert", cert, "--tls-key", key,
                          client_ca ? "--tls-client-ca" : NULL, client_ca, NULL};
    assert_int_equal(tdaemon_start(d, NULL, args), 0);
    assert_memory_equal(tdaemon_url(d), "https://", 8);
}

static void stop(tdaemon *d)
{
    assert_int_equal(tdaemon_stop(d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(d)), 0);
    tdaemon_cleanup(d);
}

/* -------------------------------------------------------------- tests */

static void test_serves_with_right_ca(void **state)
{
    (void)state;
    tdaemon d;
    start(&d, pem("server.pem"), pem("server.key"), NULL);
    optd_client *c = client(&d, pem("ca.pem"), NULL, NULL);
    create_and_step(c, "tls");
    optd_client_free(c);
    /* localhost is in the certificate too. */
    char url[64];
    snprintf(url, sizeof url, "https://localhost:%d", d.port);
    long st;
    assert_int_equal(get(url, pem("ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 200);
    stop(&d);
}

static void test_wrong_ca_fails(void **state)
{
    (void)state;
    tdaemon d;
    start(&d, pem("server.pem"), pem("server.key"), NULL);
    long st;
    assert_int_equal(get(tdaemon_url(&d), pem("other-ca.pem"), NULL, NULL, &st),
                     CURLE_PEER_FAILED_VERIFICATION);
    assert_int_equal(st, 0);
    /* The system's CAs do not know the test CA either. */
    assert_int_equal(get(tdaemon_url(&d), NULL, NULL, NULL, &st), CURLE_PEER_FAILED_VERIFICATION);
    /* The C client reports it as no answer, and does not retry it. */
    optd_client *c = client(&d, pem("other-ca.pem"), NULL, NULL);
    optd_response r;
    optd_error e;
    assert_int_equal(optd_request_err(c, "GET", "/healthz", NULL, NULL, 0, &r, &e), -1);
    optd_client_free(c);
    stop(&d);
}

static void test_plain_http_to_tls_port_fails(void **state)
{
    (void)state;
    tdaemon d;
    start(&d, pem("server.pem"), pem("server.key"), NULL);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", d.port);
    long st;
    CURLcode rc = get(url, NULL, NULL, NULL, &st);
    assert_int_not_equal(rc, CURLE_OK);
    assert_int_equal(st, 0);
    /* and the daemon serves TLS on as before */
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 200);
    stop(&d);
}

static void test_mtls(void **state)
{
    (void)state;
    tdaemon d;
    start(&d, pem("server.pem"), pem("server.key"), pem("ca.pem"));
    long st;
    /* No client certificate: refused in the handshake, no HTTP answer. */
    assert_int_not_equal(get(tdaemon_url(&d), pem("ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 0);
    /* A client certificate from another CA: refused, and logged. */
    assert_int_not_equal(
        get(tdaemon_url(&d), pem("ca.pem"), pem("other-client.pem"), pem("other-client.key"), &st),
        CURLE_OK);
    assert_int_equal(st, 0);
    assert_true(log_has(&d, "refused: client certificate does not verify"));
    /* TLS 1.2 too, where the client sees the refusal in the handshake. */
    CURL *h = curl_easy_init();
    curl_easy_setopt(h, CURLOPT_SSLVERSION, (long)(CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_TLSv1_2));
    assert_int_not_equal(get_on(h, tdaemon_url(&d), "/healthz", pem("ca.pem"), NULL, NULL, &st),
                         CURLE_OK);
    assert_int_equal(st, 0);
    curl_easy_cleanup(h);
    /* The right one: served, the whole API through the C client. */
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), pem("client.pem"), pem("client.key"), &st),
                     CURLE_OK);
    assert_int_equal(st, 200);
    optd_client *c = client(&d, pem("ca.pem"), pem("client.pem"), pem("client.key"));
    create_and_step(c, "mtls");
    optd_client_free(c);
    /* The C client without its certificate gets no answer. */
    c = client(&d, pem("ca.pem"), NULL, NULL);
    optd_response r;
    optd_error e;
    assert_int_equal(optd_request_err(c, "GET", "/healthz", NULL, NULL, 0, &r, &e), -1);
    optd_client_free(c);
    stop(&d);
}

/* Files the daemon serves from, which the test rewrites before SIGHUP. */
static void live_files(tdaemon *d, char *cert, char *key, char *ca, size_t n, const char *from_cert,
                       const char *from_key, const char *from_ca)
{
    snprintf(cert, n, "%s/live-%d.pem", ca_dir, (int)getpid());
    snprintf(key, n, "%s/live-%d.key", ca_dir, (int)getpid());
    snprintf(ca, n, "%s/live-%d-ca.pem", ca_dir, (int)getpid());
    assert_int_equal(copy_file(from_cert, cert), 0);
    assert_int_equal(copy_file(from_key, key), 0);
    if (from_ca)
        assert_int_equal(copy_file(from_ca, ca), 0);
    start(d, cert, key, from_ca ? ca : NULL);
}

static void test_sighup_new_ca_keeps_sessions(void **state)
{
    (void)state;
    tdaemon d;
    char cert[512], key[512], ca[512];
    live_files(&d, cert, key, ca, sizeof cert, pem("server.pem"), pem("server.key"), NULL);
    pid_t pid = d.pid;
    optd_client *c = client(&d, pem("ca.pem"), NULL, NULL);
    create_and_step(c, "rot");
    tapi_snap before = tapi_snapshot(c, "rot");
    /* A connection opened before the reload (libcurl keeps it alive). */
    CURL *kept = curl_easy_init();
    long st;
    assert_int_equal(get_on(kept, tdaemon_url(&d), "/healthz", pem("ca.pem"), NULL, NULL, &st),
                     CURLE_OK);
    long conns = 0;
    curl_easy_getinfo(kept, CURLINFO_NUM_CONNECTS, &conns);
    assert_int_equal(conns, 1);

    assert_int_equal(copy_file(pem("other-server.pem"), cert), 0);
    assert_int_equal(copy_file(pem("other-server.key"), key), 0);
    hup_and_wait(&d, "TLS reloaded on SIGHUP");
    assert_int_equal(d.pid, pid);

    /* The connection in flight keeps working, on the same connection. */
    assert_int_equal(get_on(kept, tdaemon_url(&d), "/v1/sessions/rot", pem("ca.pem"), NULL, NULL,
                            &st),
                     CURLE_OK);
    assert_int_equal(st, 200);
    curl_easy_getinfo(kept, CURLINFO_NUM_CONNECTS, &conns);
    assert_int_equal(conns, 0); /* reused, not a new one */
    curl_easy_cleanup(kept);
    /* New connections verify against the new CA only. */
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), NULL, NULL, &st),
                     CURLE_PEER_FAILED_VERIFICATION);
    assert_int_equal(get(tdaemon_url(&d), pem("other-ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 200);
    /* The session is intact: same step, same params. */
    optd_client_free(c);
    c = client(&d, pem("other-ca.pem"), NULL, NULL);
    tapi_snap after = tapi_snapshot(c, "rot");
    tapi_assert_same(&before, &after);
    assert_int_equal(after.session_step, 1);
    /* and steps on from there */
    optd_response r = tapi_req(c, "POST", "/v1/sessions/rot/step", NULL, "{\"grad\":[1,1]}");
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    assert_int_equal((int)tapi_num(j, "step"), 2);
    cJSON_Delete(j);
    optd_response_free(&r);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(c);
    stop(&d);
}

static void test_sighup_bad_file_keeps_old(void **state)
{
    (void)state;
    tdaemon d;
    char cert[512], key[512], ca[512];
    live_files(&d, cert, key, ca, sizeof cert, pem("server.pem"), pem("server.key"), NULL);
    long st;
    /* Not PEM at all. */
    FILE *f = fopen(cert, "w");
    assert_non_null(f);
    fputs("this is not a certificate\n", f);
    fclose(f);
    hup_and_wait(&d, "error SIGHUP: TLS files not reloaded");
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 200);
    /* A certificate with a key that is not its own. */
    assert_int_equal(copy_file(pem("other-server.pem"), cert), 0);
    hup_and_wait(&d, "error SIGHUP: TLS files not reloaded");
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 200);
    assert_int_equal(get(tdaemon_url(&d), pem("other-ca.pem"), NULL, NULL, &st),
                     CURLE_PEER_FAILED_VERIFICATION);
    /* A missing key file. */
    assert_int_equal(copy_file(pem("server.pem"), cert), 0);
    assert_int_equal(unlink(key), 0);
    hup_and_wait(&d, "error SIGHUP: TLS files not reloaded");
    assert_true(log_has(&d, "No such file or directory"));
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), NULL, NULL, &st), CURLE_OK);
    assert_int_equal(st, 200);
    stop(&d);
}

static void test_sighup_reloads_client_ca(void **state)
{
    (void)state;
    tdaemon d;
    char cert[512], key[512], ca[512];
    live_files(&d, cert, key, ca, sizeof cert, pem("server.pem"), pem("server.key"),
               pem("ca.pem"));
    long st;
    assert_int_equal(get(tdaemon_url(&d), pem("ca.pem"), pem("client.pem"), pem("client.key"), &st),
                     CURLE_OK);
    assert_int_equal(st, 200);
    assert_int_not_equal(
        get(tdaemon_url(&d), pem("ca.pem"), pem("other-client.pem"), pem("other-client.key"), &st),
        CURLE_OK);
    /* Client certificates now come from the other CA. */
    assert_int_equal(copy_file(pem("other-ca.pem"), ca), 0);
    hup_and_wait(&d, "TLS reloaded on SIGHUP");
    assert_int_equal(
        get(tdaemon_url(&d), pem("ca.pem"), pem("other-client.pem"), pem("other-client.key"), &st),
        CURLE_OK);
    assert_int_equal(st, 200);
    assert_int_not_equal(
        get(tdaemon_url(&d), pem("ca.pem"), pem("client.pem"), pem("client.key"), &st), CURLE_OK);
    assert_int_equal(st, 0);
    /* A CA file with no certificate in it: the other CA stays. */
    FILE *f = fopen(ca, "w");
    assert_non_null(f);
    fclose(f);
    hup_and_wait(&d, "error SIGHUP: TLS files not reloaded");
    assert_int_equal(
        get(tdaemon_url(&d), pem("ca.pem"), pem("other-client.pem"), pem("other-client.key"), &st),
        CURLE_OK);
    assert_int_equal(st, 200);
    stop(&d);
}

static void test_sighup_without_tls_keeps_serving(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    create_and_step(c, "plain");
    tapi_snap before = tapi_snapshot(c, "plain");
    hup_and_wait(&d, "SIGHUP: TLS is off");
    tapi_snap after = tapi_snapshot(c, "plain");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(c);
    stop(&d);
}

/* Runs the daemon with args (it must not start); returns its exit status
 * and what it printed in out. */
static int run_refused(const char *args, char *out, size_t n)
{
    const char *bin = getenv("OPTD_BIN");
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s --port 0 --db %s/refused.db %s 2>&1 </dev/null",
             bin && *bin ? bin : "build/optd", ca_dir, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t got = fread(out, 1, n - 1, p);
    out[got] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* optd --check-health URL against the TLS daemon: its exit status. */
static int check_health(const char *url)
{
    char out[4096], args[256];
    snprintf(args, sizeof args, "--check-health %s", url);
    return run_refused(args, out, sizeof out);
}

static void test_check_health_over_https(void **state)
{
    (void)state;
    tdaemon d;
    start(&d, pem("server.pem"), pem("server.key"), NULL);
    char url[128];
    snprintf(url, sizeof url, "%s", tdaemon_url(&d));
    assert_int_equal(check_health(url), 0);
    /* Plain HTTP to the TLS port is no answer. */
    char plain[128];
    snprintf(plain, sizeof plain, "http://127.0.0.1:%d", d.port);
    assert_int_equal(check_health(plain), 1);
    stop(&d);
    assert_int_equal(check_health(url), 1);
}

static void test_bad_flags_refused(void **state)
{
    (void)state;
    char out[4096], args[1536];
    snprintf(args, sizeof args, "--tls-cert %s", pem("server.pem"));
    assert_int_equal(run_refused(args, out, sizeof out), 2);
    assert_non_null(strstr(out, "--tls-cert and --tls-key"));
    snprintf(args, sizeof args, "--tls-key %s", pem("server.key"));
    assert_int_equal(run_refused(args, out, sizeof out), 2);
    assert_non_null(strstr(out, "--tls-cert and --tls-key"));
    snprintf(args, sizeof args, "--tls-client-ca %s", pem("ca.pem"));
    assert_int_equal(run_refused(args, out, sizeof out), 2);
    assert_non_null(strstr(out, "--tls-client-ca needs"));
    /* Files that do not load: exit 1 naming the file. */
    snprintf(args, sizeof args, "--tls-cert %s/absent.pem --tls-key %s", ca_dir, pem("server.key"));
    assert_int_equal(run_refused(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "absent.pem"));
    snprintf(args, sizeof args, "--tls-cert %s --tls-key %s", pem("server.pem"),
             pem("other-server.key"));
    assert_int_equal(run_refused(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "error TLS:"));
    snprintf(args, sizeof args, "--tls-cert %s --tls-key %s --tls-client-ca %s", pem("server.pem"),
             pem("server.key"), pem("server.key"));
    assert_int_equal(run_refused(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "error TLS:"));
    /* The environment twins. */
    setenv("OPTD_TLS_CERT", pem("server.pem"), 1);
    assert_int_equal(run_refused("", out, sizeof out), 2);
    assert_non_null(strstr(out, "OPTD_TLS_KEY"));
    unsetenv("OPTD_TLS_CERT");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_serves_with_right_ca),
        cmocka_unit_test(test_wrong_ca_fails),
        cmocka_unit_test(test_plain_http_to_tls_port_fails),
        cmocka_unit_test(test_mtls),
        cmocka_unit_test(test_sighup_new_ca_keeps_sessions),
        cmocka_unit_test(test_sighup_bad_file_keeps_old),
        cmocka_unit_test(test_sighup_reloads_client_ca),
        cmocka_unit_test(test_sighup_without_tls_keeps_serving),
        cmocka_unit_test(test_bad_flags_refused),
        cmocka_unit_test(test_check_health_over_https),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
