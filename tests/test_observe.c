/*
 * test_observe.c -- what an operator sees, against a real daemon: GET
 * /metrics (counts that follow the requests made, checked by Prometheus's
 * own `promtool check metrics`), its token, the per-session series and
 * their limit, the sync gauges; the event stream (live steps, config
 * changes, a resume with Last-Event-ID from the history, a slow watcher
 * dropped while steps go on); X-Request-Id and the access log; the
 * dashboard's embedded files.
 *
 * The event streams and the parked sync steps are read over raw sockets:
 * an answer that never ends (a stream) or that waits (a round) is the
 * point.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

static const char *const JSON_CT[] = {"Content-Type: application/json", NULL};

/* ------------------------------------------------------------ helpers */

static int port_of(const tdaemon *d)
{
    return d->port;
}

/* A raw connection with the request already sent; rcvbuf > 0 shrinks the
 * receive buffer (a slow reader).  Fails the test on error. */
static int raw_send(int port, const char *request, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    size_t n = strlen(request);
    assert_int_equal(write(fd, request, n), (ssize_t)n);
    return fd;
}

typedef struct {
    char *data;
    size_t len, cap;
    bool eof;
} rbuf;

/* Reads from fd into b until needle appears after offset from (or EOF, or
 * timeout_ms).  Returns true when the needle was seen. */
static bool read_until(int fd, rbuf *b, size_t from, const char *needle, int timeout_ms)
{
    long long end = tapi_now_ms() + timeout_ms;
    for (;;) {
        if (b->data && from <= b->len && strstr(b->data + from, needle))
            return true;
        if (b->eof)
            return false;
        long long left = end - tapi_now_ms();
        if (left <= 0)
            return false;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)left) <= 0)
            continue;
        if (b->len + 4097 > b->cap) {
            b->cap = b->cap ? b->cap * 2 : 65536;
            b->data = realloc(b->data, b->cap);
            assert_non_null(b->data);
        }
        ssize_t n = read(fd, b->data + b->len, 4096);
        if (n <= 0) {
            b->eof = true;
            n = 0;
        }
        b->len += (size_t)n;
        b->data[b->len] = '\0';
    }
}

/* strstr ignoring ASCII case (header names). */
static const char *find_nocase(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return hay;
    return NULL;
}

static char *events_request(const char *name, const char *extra_headers)
{
    static char req[512];
    snprintf(req, sizeof req,
             "GET /v1/sessions/%s/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n%s\r\n",
             name, extra_headers ? extra_headers : "");
    return req;
}

static void step(optd_client *c, const char *name, const char *worker, double loss)
{
    char path[160], body[128], wh[160];
    snprintf(path, sizeof path, "/v1/sessions/%s/step", name);
    snprintf(body, sizeof body, "{\"grad\":[0.5,-0.25],\"loss\":%g}", loss);
    snprintf(wh, sizeof wh, "Optd-Worker: %s", worker);
    const char *h[] = {"Content-Type: application/json", wh, NULL};
    optd_response r = tapi_req(c, "POST", path, h, body);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
}

/* The value of the sample "name{labels}" (exact text before the space) in
 * a metrics page, or -1 when absent. */
static double sample(const char *page, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = page; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    }
    return -1;
}

static char *metrics(optd_client *c, const char *auth)
{
    const char *h[] = {auth, NULL};
    optd_response r = tapi_req(c, "GET", "/metrics", auth ? h : NULL, NULL);
    assert_int_equal(r.status, 200);
    assert_true(strncmp(r.content_type, "text/plain; version=0.0.4", 25) == 0);
    char *page = strdup(r.body);
    optd_response_free(&r);
    return page;
}

/* promtool check metrics on text: its exit status. */
static int promtool(const char *text, char *out, size_t n)
{
    char path[] = "/tmp/optd-metrics-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s 2>&1", path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t k = fread(out, 1, n - 1, p);
    out[k] = '\0';
    int st = pclose(p);
    unlink(path);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ------------------------------------------------------------- metrics */

/* Counters follow the requests made; the page passes promtool, which
 * refuses a malformed one; two of three sessions get series of their own
 * (--metrics-sessions 2). */
static void test_metrics_count_and_pass_promtool(void **state)
{
    (void)state;
    const char *args[] = {"--metrics-sessions", "2", NULL};
    tapi_suite *s = tapi_suite_open(args);
    assert_non_null(s);
    const char *names[] = {"m1", "m2", "m3"};
    for (int i = 0; i < 3; i++)
        tapi_create(s->c, names[i], "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2]}",
                    201);
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 3; i++)
            step(s->c, names[i], "w1", 2.0 - 0.25 * k);
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions/nope", NULL, NULL);
    assert_int_equal(r.status, 404);
    optd_response_free(&r);
    r = tapi_req(s->c, "PATCH", "/v1/sessions/m3", JSON_CT, "{\"optimizer\":{\"lr\":0.2}}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);

    char *page = metrics(s->c, NULL);
    /* The PATCH wrote one checkpoint of its own. */
    assert_true(sample(page, "optd_storage_checkpoint_seconds_count") == 1);
    assert_true(sample(page, "optd_steps_total{kind=\"step\"}") == 12);
    assert_true(sample(page, "optd_http_requests_total{method=\"POST\",route=\"/v1/sessions/{name}/step\",status=\"200\"}") == 12);
    assert_true(sample(page, "optd_http_requests_total{method=\"PUT\",route=\"/v1/sessions/{name}\",status=\"201\"}") == 3);
    assert_true(sample(page, "optd_http_requests_total{method=\"GET\",route=\"/v1/sessions/{name}\",status=\"404\"}") == 1);
    assert_true(sample(page, "optd_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/sessions/{name}/step\"}") == 12);
    assert_true(sample(page, "optd_step_phase_seconds_count{phase=\"kernel\"}") == 12);
    assert_true(sample(page, "optd_step_phase_seconds_count{phase=\"commit\"}") == 12);
    assert_true(sample(page, "optd_step_phase_seconds_count{phase=\"decode\"}") == 12);
    assert_true(sample(page, "optd_step_phase_seconds_count{phase=\"encode\"}") == 12);
    assert_true(sample(page, "optd_sessions_hot") == 3);
    assert_true(sample(page, "optd_sessions_stored") == 3);
    assert_true(sample(page, "optd_http_request_bytes_total") > 0);
    assert_true(sample(page, "process_resident_memory_bytes") > 1e6);
    assert_true(sample(page, "process_open_fds") >= 3);
    /* The first two sessions to step have series; the third is counted. */
    assert_true(sample(page, "optd_session_step{session=\"m1\"}") == 4);
    assert_true(sample(page, "optd_session_loss{session=\"m2\"}") == 1.25);
    assert_true(sample(page, "optd_session_lr{session=\"m1\"}") == 0.1);
    assert_true(sample(page, "optd_session_step{session=\"m3\"}") == -1);
    assert_true(sample(page, "optd_session_series_refused_total") == 4);

    char out[4096];
    int rc = promtool(page, out, sizeof out);
    if (rc != 0)
        fail_msg("promtool check metrics: %d: %s", rc, out);
    /* The tool bites: a sample without its value, a counter with a wrong type. */
    assert_int_not_equal(promtool("# TYPE x counter\nx{a=\"1\"\n", out, sizeof out), 0);
    free(page);
    assert_int_equal(tapi_suite_close(s), 0);
}

/* --metrics-token replaces the API key on /metrics (and only there);
 * without one, the API key guards it. */
static void test_metrics_token(void **state)
{
    (void)state;
    const char *args[] = {"--api-key", "k3y", "--metrics-token", "m3tr1cs", NULL};
    tapi_suite *s = tapi_suite_open(args);
    assert_non_null(s);
    const char *none[] = {NULL};
    const char *key[] = {"Authorization: Bearer k3y", NULL};
    const char *tok[] = {"Authorization: Bearer m3tr1cs", NULL};
    optd_response r = tapi_req(s->c, "GET", "/metrics", none, NULL);
    tapi_assert_problem(&r, 401, "");
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/metrics", key, NULL);
    tapi_assert_problem(&r, 401, "");
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/metrics", tok, NULL);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions", tok, NULL);
    tapi_assert_problem(&r, 401, "");
    optd_response_free(&r);
    assert_int_equal(tapi_suite_close(s), 0);

    const char *args2[] = {"--api-key", "k3y", NULL};
    s = tapi_suite_open(args2);
    assert_non_null(s);
    r = tapi_req(s->c, "GET", "/metrics", none, NULL);
    tapi_assert_problem(&r, 401, "");
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/metrics", key, NULL);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    assert_int_equal(tapi_suite_close(s), 0);
}

/* A synchronous round shows as one open round and one waiting worker
 * while its first gradient is parked; both go back to 0 when it closes. */
static void test_metrics_sync_round(void **state)
{
    (void)state;
    tapi_suite *s = tapi_suite_open(NULL);
    assert_non_null(s);
    tapi_create(s->c, "r",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2],"
                "\"mode\":{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":20000}}",
                201);
    const char *body = "{\"grad\":[1,1]}";
    char req[512];
    snprintf(req, sizeof req,
             "POST /v1/sessions/r/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             "Optd-Worker: a\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    int fd = raw_send(port_of(&s->d), req, 0);
    char *page = NULL;
    /* The parked request reaches the daemon in its own time (10 s at
     * most on a loaded machine). */
    for (int i = 0; i < 500; i++) {
        free(page);
        page = metrics(s->c, NULL);
        if (sample(page, "optd_sync_workers_waiting") == 1)
            break;
        usleep(20000);
    }
    assert_true(sample(page, "optd_sync_rounds_open") == 1);
    assert_true(sample(page, "optd_sync_workers_waiting") == 1);
    free(page);
    step(s->c, "r", "b", 1.0);
    rbuf b = {0};
    assert_true(read_until(fd, &b, 0, "\"step\":1", 5000));
    close(fd);
    free(b.data);
    /* The parked request stops counting when libmicrohttpd has completed
     * it, which may be just after its client read the answer. */
    page = NULL;
    for (int i = 0; i < 500; i++) {
        free(page);
        page = metrics(s->c, NULL);
        if (sample(page, "optd_sync_workers_waiting") == 0)
            break;
        usleep(20000);
    }
    assert_true(sample(page, "optd_sync_rounds_open") == 0);
    assert_true(sample(page, "optd_sync_workers_waiting") == 0);
    free(page);
    assert_int_equal(tapi_suite_close(s), 0);
}

/* -------------------------------------------------------------- events */

/* Live step events with their ids and values, a config event after a
 * PATCH; a second watcher resuming with Last-Event-ID gets the steps it
 * missed from the history, then live ones; bad ids and unknown sessions
 * are problems. */
static void test_events_live_and_resume(void **state)
{
    (void)state;
    tapi_suite *s = tapi_suite_open(NULL);
    assert_non_null(s);
    tapi_create(s->c, "ev", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2]}", 201);
    int fd = raw_send(port_of(&s->d), events_request("ev", NULL), 0);
    rbuf b = {0};
    assert_true(read_until(fd, &b, 0, "retry:", 5000));
    assert_non_null(strstr(b.data, "HTTP/1.1 200"));
    assert_non_null(find_nocase(b.data, "Content-Type: text/event-stream"));
    assert_non_null(find_nocase(b.data, "X-Request-Id: "));
    step(s->c, "ev", "w7", 3.5);
    step(s->c, "ev", "w8", 3.25);
    step(s->c, "ev", "w7", 3.0);
    assert_true(read_until(fd, &b, 0, "id: 3\n", 5000));
    const char *e1 = strstr(b.data, "id: 1\nevent: step\ndata: {\"step\":1,");
    assert_non_null(e1);
    assert_non_null(strstr(e1, "\"lr\":0.5,\"loss\":3.5,\"grad_norm\":0.55901699437494745"));
    assert_non_null(strstr(e1, "\"update_norm\":0.27950849718747373,\"worker\":\"w7\"}\n\n"));
    assert_non_null(strstr(b.data, "id: 2\nevent: step\ndata: {\"step\":2,"));
    const char *h[] = {"Content-Type: application/json", NULL};
    optd_response r = tapi_req(s->c, "PATCH", "/v1/sessions/ev", h, "{\"optimizer\":{\"lr\":0.25}}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    assert_true(read_until(fd, &b, 0, "event: config\ndata: {\"step\":3,\"config\":{", 5000));
    assert_non_null(strstr(strstr(b.data, "event: config"), "\"lr\":0.25"));

    /* Resume after step 1: steps 2 and 3 from the history, 4 live. */
    int fd2 = raw_send(port_of(&s->d), events_request("ev", "Last-Event-ID: 1\r\n"), 0);
    rbuf b2 = {0};
    assert_true(read_until(fd2, &b2, 0, "id: 3\n", 5000));
    assert_null(strstr(b2.data, "id: 1\n"));
    const char *p2 = strstr(b2.data, "id: 2\nevent: step\ndata: {\"step\":2,");
    assert_non_null(p2);
    assert_non_null(strstr(p2, "\"worker\":\"w8\""));
    step(s->c, "ev", "w9", 2.5);
    assert_true(read_until(fd2, &b2, 0, "id: 4\n", 5000));
    assert_true(read_until(fd, &b, 0, "id: 4\n", 5000));
    assert_non_null(strstr(strstr(b2.data, "id: 4\n"), "\"lr\":0.25,\"loss\":2.5"));
    /* Each step once, in order. */
    const char *i2 = strstr(b2.data, "id: 2\n"), *i3 = strstr(b2.data, "id: 3\n"),
               *i4 = strstr(b2.data, "id: 4\n");
    assert_true(i2 < i3 && i3 < i4);
    assert_null(strstr(i2 + 1, "id: 2\n"));
    close(fd);
    close(fd2);
    free(b.data);
    free(b2.data);

    /* live=false: the history, then the end of the stream. */
    const char *none[] = {NULL};
    r = tapi_req(s->c, "GET", "/v1/sessions/ev/events?after=2&live=false", none, NULL);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "id: 3\n"));
    assert_non_null(strstr(r.body, "id: 4\n"));
    assert_null(strstr(r.body, "id: 2\n"));
    optd_response_free(&r);

    const char *bad[] = {"Last-Event-ID: 12x", NULL};
    r = tapi_req(s->c, "GET", "/v1/sessions/ev/events", bad, NULL);
    tapi_assert_problem(&r, 400, "Last-Event-ID");
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/ev/events?live=maybe", none, NULL);
    tapi_assert_problem(&r, 400, "live");
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/nope/events", none, NULL);
    tapi_assert_problem(&r, 404, "name");
    optd_response_free(&r);
    assert_int_equal(tapi_suite_close(s), 0);
}

/* A synchronous round's progress and its timeout are events; worker
 * names of any characters stay valid JSON in them. */
static void test_events_round_and_worker_names(void **state)
{
    (void)state;
    tapi_suite *s = tapi_suite_open(NULL);
    assert_non_null(s);
    tapi_create(s->c, "rd",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2],"
                "\"mode\":{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":400}}",
                201);
    int fd = raw_send(port_of(&s->d), events_request("rd", NULL), 0);
    rbuf b = {0};
    assert_true(read_until(fd, &b, 0, "retry:", 5000));
    const char *body = "{\"grad\":[1,1],\"worker\":\"we\\\"ird\\\\\"}";
    char req[512];
    snprintf(req, sizeof req,
             "POST /v1/sessions/rd/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    int wfd = raw_send(port_of(&s->d), req, 0);
    assert_true(read_until(fd, &b, 0,
                           "event: round\ndata: {\"step\":0,\"state\":\"open\",\"received\":1,"
                           "\"awaiting\":1,\"workers\":[\"we\\\"ird\\\\\"]}\n\n",
                           5000));
    /* Nobody else comes: the round times out (504 to the waiting worker). */
    assert_true(read_until(fd, &b, 0, "\"state\":\"timed_out\"", 5000));
    rbuf w = {0};
    assert_true(read_until(wfd, &w, 0, "HTTP/1.1 504", 5000));
    /* The parked request's problem names its own request id (the reaper
     * built it, not this request's thread). */
    assert_true(read_until(wfd, &w, 0, "\"}", 5000));
    const char *hid = find_nocase(w.data, "X-Request-Id: ");
    assert_non_null(hid);
    char want[96];
    snprintf(want, sizeof want, "\"request_id\":\"%.*s\"", (int)strcspn(hid + 14, "\r\n"), hid + 14);
    if (!strstr(w.data, want))
        fail_msg("the 504 lacks %s: %s", want, w.data);
    close(wfd);
    free(w.data);
    /* Each event's data is one line of valid JSON. */
    for (const char *p = strstr(b.data, "data: "); p; p = strstr(p + 1, "data: ")) {
        const char *e = strchr(p, '\n');
        assert_non_null(e);
        char *one = strndup(p + 6, (size_t)(e - p - 6));
        cJSON *o = cJSON_Parse(one);
        if (!o)
            fail_msg("event data is not JSON: %s", one);
        cJSON_Delete(o);
        free(one);
    }
    close(fd);
    free(b.data);
    assert_int_equal(tapi_suite_close(s), 0);
}

/* A watcher that does not read: its buffer fills, it is dropped (counted
 * on /metrics) and its stream ends after what it held, while steps keep
 * their pace; it resumes from where it stopped with Last-Event-ID. */
static void test_events_slow_watcher_dropped(void **state)
{
    (void)state;
    tapi_suite *s = tapi_suite_open(NULL);
    assert_non_null(s);
    tapi_create(s->c, "slow", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"params\":[1,2]}",
                201);
    int fd = raw_send(port_of(&s->d), events_request("slow", NULL), 2048);
    rbuf b = {0};
    assert_true(read_until(fd, &b, 0, "retry:", 5000));
    size_t head = b.len;
    /* Steps while it does not read, until the daemon drops it. */
    int steps = 0;
    double dropped = 0;
    long long t0 = tapi_now_ms();
    while (steps < 40000) {
        for (int i = 0; i < 500; i++, steps++)
            step(s->c, "slow", "w", 1.0);
        char *page = metrics(s->c, NULL);
        dropped = sample(page, "optd_event_watchers_dropped_total");
        free(page);
        if (dropped >= 1)
            break;
    }
    long long ms = tapi_now_ms() - t0;
    print_message("slow watcher dropped after %d steps (%.0f steps/s)\n", steps,
                  steps * 1000.0 / (double)(ms ? ms : 1));
    assert_true(dropped == 1);
    /* Now read: what it held, then the end. */
    assert_false(read_until(fd, &b, head, "never-there", 60000));
    assert_true(b.eof);
    close(fd);
    /* The last id it got; resume from there up to the step now. */
    const char *last = NULL;
    for (const char *p = strstr(b.data, "\nid: "); p; p = strstr(p + 1, "\nid: "))
        last = p + 5;
    assert_non_null(last);
    long long got = atoll(last);
    assert_true(got > 10 && got < steps);
    char hdr[64];
    snprintf(hdr, sizeof hdr, "Last-Event-ID: %lld\r\n", got);
    fd = raw_send(port_of(&s->d), events_request("slow", hdr), 0);
    rbuf b2 = {0};
    char want[32];
    snprintf(want, sizeof want, "id: %d\n", steps);
    assert_true(read_until(fd, &b2, 0, want, 20000));
    snprintf(want, sizeof want, "id: %lld\n", got + 1);
    assert_non_null(strstr(b2.data, want));
    close(fd);
    free(b.data);
    free(b2.data);
    assert_int_equal(tapi_suite_close(s), 0);
}

/* ------------------------------------------- request ids, access log */

static bool hex16(const char *s)
{
    if (!s || strlen(s) != 16)
        return false;
    for (; *s; s++)
        if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
            return false;
    return true;
}

static void test_request_id_and_access_log(void **state)
{
    (void)state;
    char dir[] = "/tmp/optd-alog-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128];
    snprintf(path, sizeof path, "%s/access.log", dir);
    const char *args[] = {"--access-log", path, NULL};
    tapi_suite *s = tapi_suite_open(args);
    assert_non_null(s);
    /* The client's id is echoed, in the header and in the problem. */
    const char *mine[] = {"X-Request-Id: trace-42.a_b:c", NULL};
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions/nope", mine, NULL);
    tapi_assert_problem(&r, 404, "name");
    assert_string_equal(optd_response_header(&r, "X-Request-Id"), "trace-42.a_b:c");
    cJSON *doc = tapi_json(&r);
    assert_string_equal(tapi_str(doc, "request_id"), "trace-42.a_b:c");
    cJSON_Delete(doc);
    optd_response_free(&r);
    /* An unusable one is replaced; none gets one; ids differ. */
    const char *badid[] = {"X-Request-Id: has space", NULL};
    r = tapi_req(s->c, "PUT", "/v1/sessions/a", JSON_CT, "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1]}");
    assert_int_equal(r.status, 201);
    char first[32];
    snprintf(first, sizeof first, "%s", optd_response_header(&r, "X-Request-Id"));
    assert_true(hex16(first));
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/a", badid, NULL);
    assert_int_equal(r.status, 200);
    assert_true(hex16(optd_response_header(&r, "X-Request-Id")));
    assert_string_not_equal(optd_response_header(&r, "X-Request-Id"), first);
    optd_response_free(&r);
    r = tapi_req(s->c, "POST", "/v1/sessions/a/step", JSON_CT, "{\"grad\":[1,2]}");
    tapi_assert_problem(&r, 422, NULL);
    doc = tapi_json(&r);
    assert_string_equal(tapi_str(doc, "request_id"), optd_response_header(&r, "X-Request-Id"));
    cJSON_Delete(doc);
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/no/such/route", NULL, NULL);
    tapi_assert_problem(&r, 404, "");
    optd_response_free(&r);
    assert_int_equal(tapi_suite_close(s), 0);

    /* One JSON line per request, every field there. */
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[2048];
    int n = 0;
    bool saw_mine = false, saw_put = false, saw_unrouted = false;
    while (fgets(line, sizeof line, f)) {
        n++;
        cJSON *o = cJSON_Parse(line);
        if (!o)
            fail_msg("access log line %d is not JSON: %s", n, line);
        const char *rid = tapi_str(o, "request_id");
        const char *method = tapi_str(o, "method");
        const char *t = tapi_str(o, "time");
        assert_int_equal(strlen(t), 24);
        assert_true(tapi_num(o, "latency_ms") >= 0);
        assert_true(tapi_num(o, "bytes_out") > 0 || tapi_num(o, "status") == 204);
        cJSON *sess = cJSON_GetObjectItem(o, "session");
        assert_non_null(sess);
        assert_non_null(cJSON_GetObjectItem(o, "route"));
        assert_non_null(cJSON_GetObjectItem(o, "bytes_in"));
        if (strcmp(rid, "trace-42.a_b:c") == 0) {
            saw_mine = true;
            assert_string_equal(method, "GET");
            assert_string_equal(tapi_str(o, "route"), "/v1/sessions/{name}");
            assert_string_equal(tapi_str(o, "session"), "nope");
            assert_int_equal((int)tapi_num(o, "status"), 404);
        }
        if (strcmp(rid, first) == 0) {
            saw_put = true;
            assert_string_equal(method, "PUT");
            assert_int_equal((int)tapi_num(o, "status"), 201);
            assert_true(tapi_num(o, "bytes_in") > 20);
        }
        if (strcmp(tapi_str(o, "route"), "") == 0) {
            saw_unrouted = true;
            assert_true(cJSON_IsNull(sess));
            assert_int_equal((int)tapi_num(o, "status"), 404);
        }
        cJSON_Delete(o);
    }
    fclose(f);
    assert_true(n >= 5);
    assert_true(saw_mine && saw_put && saw_unrouted);
    unlink(path);
    rmdir(dir);
}

/* ------------------------------------------------------------ dashboard */

static void test_dashboard_files(void **state)
{
    (void)state;
    const char *args[] = {"--api-key", "k", NULL};
    tapi_suite *s = tapi_suite_open(args);
    assert_non_null(s);
    const char *none[] = {NULL};
    optd_response r = tapi_req(s->c, "GET", "/", none, NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.content_type, "text/html; charset=utf-8");
    assert_non_null(strstr(r.body, "assets/uPlot.iife.min.js"));
    assert_non_null(strstr(r.body, "assets/app.js"));
    optd_response_free(&r);
    /* The vendored library, byte for byte. */
    r = tapi_req(s->c, "GET", "/assets/uPlot.iife.min.js", none, NULL);
    assert_int_equal(r.status, 200);
    struct stat st;
    assert_int_equal(stat("web/vendor/uPlot.iife.min.js", &st), 0);
    assert_int_equal(r.len, (size_t)st.st_size);
    assert_non_null(strstr(r.body, "uPlot"));
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/assets/uPlot.LICENSE", none, NULL);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "The MIT License"));
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/assets/missing.js", none, NULL);
    tapi_assert_problem(&r, 404, "name");
    optd_response_free(&r);
    r = tapi_req(s->c, "POST", "/", none, "");
    tapi_assert_problem(&r, 405, "");
    optd_response_free(&r);
    assert_int_equal(tapi_suite_close(s), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_count_and_pass_promtool),
        cmocka_unit_test(test_metrics_token),
        cmocka_unit_test(test_metrics_sync_round),
        cmocka_unit_test(test_events_live_and_resume),
        cmocka_unit_test(test_events_round_and_worker_names),
        cmocka_unit_test(test_events_slow_watcher_dropped),
        cmocka_unit_test(test_request_id_and_access_log),
        cmocka_unit_test(test_dashboard_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
