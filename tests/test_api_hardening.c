/*
 * test_api_hardening.c -- the HTTP layer against hostile or careless
 * clients, on the real daemon: session names matched on the raw path (no
 * %00 truncation, no %2F re-routing), ambiguous body framing refused and
 * the connection closed (request smuggling), HEAD, the Bearer scheme in
 * any case, chunked and presized bodies, connection limits per address and
 * idle timeouts (health stays answerable under a flood), what
 * libmicrohttpd answers by itself, and the flag parser.
 *
 * Cases whose bytes matter are sent over raw sockets; the rest through
 * libcurl (the C client).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

typedef tapi_suite suite;

static int suite_setup(void **state)
{
    static const char *const args[] = {"--max-body-mb", "1", NULL};
    *state = tapi_suite_open(args);
    return *state ? 0 : -1;
}

static int suite_teardown(void **state)
{
    return tapi_suite_close(*state);
}

/* ------------------------------------------------------- raw sockets */

/* A TCP connection to 127.0.0.1:port from source address src (NULL: the
 * kernel's choice), blocking.  The fd, or -1. */
static int raw_connect(int port, const char *src)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (src) {
        struct sockaddr_in a = {.sin_family = AF_INET};
        inet_pton(AF_INET, src, &a.sin_addr);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            close(fd);
            return -1;
        }
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Reads from fd until the peer closes or wait_ms pass without data.
 * Returns the bytes (new buffer, NUL-terminated; caller frees); *closed
 * says whether the peer closed (EOF or reset). */
static char *raw_read(int fd, int wait_ms, bool *closed)
{
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    *closed = false;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int n = poll(&p, 1, wait_ms);
        if (n <= 0)
            break;
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        ssize_t got = read(fd, buf + len, cap - len - 1);
        if (got <= 0) {
            *closed = true;
            break;
        }
        len += (size_t)got;
    }
    buf[len] = '\0';
    return buf;
}

typedef struct {
    int status;
    char *text;   /* the whole answer; owned */
    const char *body;
    bool closed;
} raw_answer;

/* Sends len bytes of req on a new connection and reads the answer (until
 * the server closes, or wait_ms of silence). */
static raw_answer raw_send(int port, const char *req, size_t len, int wait_ms)
{
    int fd = raw_connect(port, NULL);
    assert_true(fd >= 0);
    assert_int_equal(send(fd, req, len, MSG_NOSIGNAL), (ssize_t)len);
    raw_answer a = {0};
    a.text = raw_read(fd, wait_ms, &a.closed);
    close(fd);
    if (sscanf(a.text, "HTTP/1.1 %d", &a.status) != 1)
        a.status = 0;
    const char *b = strstr(a.text, "\r\n\r\n");
    a.body = b ? b + 4 : "";
    return a;
}

static raw_answer raw_str(int port, const char *req, int wait_ms)
{
    return raw_send(port, req, strlen(req), wait_ms);
}

/* Asserts a problem+json answer with this status and field. */
static void assert_raw_problem(const raw_answer *a, int status, const char *field)
{
    if (a->status != status)
        fail_msg("wanted %d, got: %.400s", status, a->text);
    assert_non_null(strstr(a->text, "Content-Type: application/problem+json"));
    cJSON *j = cJSON_Parse(a->body);
    if (!j)
        fail_msg("not JSON: %.400s", a->body);
    assert_int_equal((int)tapi_num(j, "status"), status);
    if (field)
        assert_string_equal(tapi_str(j, "field"), field);
    cJSON_Delete(j);
}

static int port_of(const suite *s)
{
    return s->d.port;
}

static int status_of(optd_client *c, const char *method, const char *path)
{
    optd_response r = tapi_req(c, method, path, NULL, NULL);
    int st = r.status;
    optd_response_free(&r);
    return st;
}

static const char *const SMALL = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3]}";

/* ------------------------------------------------------------- names */

/* "%00" used to end the name early: DELETE victim%00x deleted "victim". */
static void test_name_nul_escape_is_400(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "victim", SMALL, 201);
    static const char *const reqs[] = {
        "DELETE /v1/sessions/victim%00x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "DELETE /v1/sessions/victim%00 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        /* an escape of a name character is not the name either */
        "DELETE /v1/sessions/victi%6D HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET /v1/sessions/%76ictim HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof reqs / sizeof reqs[0]; i++) {
        raw_answer a = raw_str(port_of(s), reqs[i], 3000);
        assert_raw_problem(&a, 400, "name");
        free(a.text);
    }
    assert_int_equal(status_of(s->c, "GET", "/v1/sessions/victim"), 200);
}

/* "%2F" used to become a '/' and route elsewhere: x%2Fparams served the
 * params of x. */
static void test_name_slash_escape_is_400(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "slashy", SMALL, 201);
    static const char *const reqs[] = {
        "GET /v1/sessions/slashy%2Fparams HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET /v1/sessions/slashy%2fhistory HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "DELETE /v1/sessions/%2E%2E HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "DELETE /v1/sessions/. HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET /v1/sessions/slashy%20 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof reqs / sizeof reqs[0]; i++) {
        raw_answer a = raw_str(port_of(s), reqs[i], 3000);
        assert_raw_problem(&a, 400, "name");
        free(a.text);
    }
    /* A name longer than 128 characters: 400 too. */
    char req[512];
    char name[130];
    memset(name, 'n', 129);
    name[129] = '\0';
    snprintf(req, sizeof req, "GET /v1/sessions/%s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
             name);
    raw_answer a = raw_str(port_of(s), req, 3000);
    assert_raw_problem(&a, 400, "name");
    free(a.text);
    assert_int_equal(status_of(s->c, "GET", "/v1/sessions/slashy"), 200);
}

/* Query arguments are still percent-decoded: ?limit=%31 is limit=1. */
static void test_query_still_decoded(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "q-one", SMALL, 201);
    tapi_create(s->c, "q-two", SMALL, 201);
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions?limit=%31", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "sessions")), 1);
    cJSON_Delete(j);
    optd_response_free(&r);
}

/* ---------------------------------------------------------- smuggling */

/* Sends a create whose framing is ambiguous; expects 400 naming field, the
 * connection closed by the server, and nothing created. */
static void expect_framing_refused(suite *s, const char *name, const char *headers,
                                   const char *body, const char *field)
{
    char req[2048];
    snprintf(req, sizeof req,
             "PUT /v1/sessions/%s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n%s\r\n%s",
             name, headers, body);
    /* No "Connection: close": the server must close by itself. */
    raw_answer a = raw_str(port_of(s), req, 3000);
    assert_raw_problem(&a, 400, field);
    if (!a.closed)
        fail_msg("connection left open after: %.200s", a.text);
    free(a.text);
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    assert_int_equal(status_of(s->c, "GET", path), 404);
}

static void test_duplicate_content_length(void **state)
{
    suite *s = *state;
    char h[256];
    size_t n = strlen(SMALL);
    /* the same value twice */
    snprintf(h, sizeof h, "Content-Length: %zu\r\nContent-Length: %zu\r\n", n, n);
    expect_framing_refused(s, "dup-same", h, SMALL, "Content-Length");
    /* two values */
    snprintf(h, sizeof h, "Content-Length: %zu\r\ncontent-length: 3\r\n", n);
    expect_framing_refused(s, "dup-diff", h, SMALL, "Content-Length");
    /* not a plain byte count */
    snprintf(h, sizeof h, "Content-Length: +%zu\r\n", n);
    raw_answer a;
    char req[1024];
    snprintf(req, sizeof req,
             "PUT /v1/sessions/dup-plus HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
             "%s\r\n%s",
             h, SMALL);
    a = raw_str(port_of(s), req, 3000);
    assert_int_equal(a.status, 400); /* by optd or by libmicrohttpd */
    assert_true(a.closed);
    free(a.text);
    assert_int_equal(status_of(s->c, "GET", "/v1/sessions/dup-plus"), 404);
}

static void test_transfer_encoding_with_content_length(void **state)
{
    suite *s = *state;
    char body[512], h[256];
    size_t n = strlen(SMALL);
    snprintf(body, sizeof body, "%zx\r\n%s\r\n0\r\n\r\n", n, SMALL);
    snprintf(h, sizeof h, "Transfer-Encoding: chunked\r\nContent-Length: %zu\r\n", n);
    expect_framing_refused(s, "te-cl", h, body, "Transfer-Encoding");
    snprintf(h, sizeof h, "Content-Length: %zu\r\nTransfer-Encoding: chunked\r\n", strlen(body));
    expect_framing_refused(s, "cl-te", h, body, "Transfer-Encoding");
    snprintf(h, sizeof h, "Transfer-Encoding: gzip, chunked\r\n");
    expect_framing_refused(s, "te-gzip", h, body, "Transfer-Encoding");
}

/* ------------------------------------------------------------ bodies */

/* A chunked binary body in uneven chunks, past the first capacity (64 KiB)
 * so the buffer grows; the params must come back exact. */
static void test_chunked_body_grows(void **state)
{
    suite *s = *state;
    enum { N = 50000 };
    char create[128];
    snprintf(create, sizeof create,
             "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":%d,\"init\":{\"type\":\"zeros\"}}", N);
    tapi_create(s->c, "chunky", create, 201);
    float *v = malloc(N * sizeof *v);
    assert_non_null(v);
    for (int i = 0; i < N; i++)
        v[i] = (float)i * 0.25f - 7.0f;
    const char *head = "PUT /v1/sessions/chunky/params HTTP/1.1\r\nHost: t\r\n"
                       "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n"
                       "Connection: close\r\n\r\n";
    size_t total = N * sizeof *v;
    char *req = malloc(total + 4096);
    assert_non_null(req);
    size_t len = (size_t)sprintf(req, "%s", head);
    static const size_t sizes[] = {1, 1000, 70000, 3, 65536};
    size_t off = 0;
    for (size_t k = 0; off < total; k++) {
        size_t c = k < 5 ? sizes[k] : total - off;
        if (c > total - off)
            c = total - off;
        len += (size_t)sprintf(req + len, "%zx\r\n", c);
        memcpy(req + len, (char *)v + off, c);
        len += c;
        len += (size_t)sprintf(req + len, "\r\n");
        off += c;
    }
    len += (size_t)sprintf(req + len, "0\r\n\r\n");
    raw_answer a = raw_send(port_of(s), req, len, 5000);
    if (a.status != 200)
        fail_msg("chunked PUT params: %.300s", a.text);
    free(a.text);
    free(req);
    static const char *const accept_bin[] = {"Accept: application/octet-stream", NULL};
    optd_response r = tapi_req(s->c, "GET", "/v1/sessions/chunky/params", accept_bin, NULL);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, total);
    assert_memory_equal(r.body, v, total);
    optd_response_free(&r);
    free(v);
}

/* A body of known length past --max-body-mb is 413 before it is read; a
 * chunked one is 413 once it passes the limit. */
static void test_body_limits(void **state)
{
    suite *s = *state;
    raw_answer a = raw_str(port_of(s),
                           "PUT /v1/sessions/big HTTP/1.1\r\nHost: t\r\n"
                           "Content-Type: application/json\r\nContent-Length: 1048577\r\n\r\n{",
                           3000);
    assert_raw_problem(&a, 413, NULL);
    free(a.text);
    /* on a route that takes no body too */
    a = raw_str(port_of(s),
                "GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1048577\r\n\r\n{", 3000);
    assert_raw_problem(&a, 413, NULL);
    free(a.text);
    size_t n = 1100000;
    char *body = malloc(n);
    assert_non_null(body);
    memset(body, ' ', n);
    static const char *const chunked[] = {"Transfer-Encoding: chunked", NULL};
    optd_response r = tapi_req_bin(s->c, "PUT", "/v1/sessions/big", chunked, body, n);
    tapi_assert_problem(&r, 413, NULL);
    optd_response_free(&r);
    free(body);
    assert_int_equal(status_of(s->c, "GET", "/v1/sessions/big"), 404);
}

/* -------------------------------------------------------------- HEAD */

static void test_head(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "heady", SMALL, 201);
    static const char *const paths[] = {"/healthz", "/v1/optimizers", "/v1/sessions",
                                        "/v1/sessions/heady", "/v1/sessions/heady/params",
                                        "/v1/sessions/heady/history"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        optd_response g = tapi_req(s->c, "GET", paths[i], NULL, NULL);
        optd_response h = tapi_req(s->c, "HEAD", paths[i], NULL, NULL);
        assert_int_equal(g.status, 200);
        if (h.status != 200)
            fail_msg("HEAD %s: %d", paths[i], h.status);
        assert_int_equal(h.len, 0);
        assert_string_equal(h.content_type, g.content_type);
        const char *cl = optd_response_header(&h, "Content-Length");
        assert_non_null(cl);
        if (strcmp(paths[i], "/healthz") != 0) /* hot_sessions may move */
            assert_int_equal(strtoull(cl, NULL, 10), g.len);
        optd_response_free(&g);
        optd_response_free(&h);
    }
    /* HEAD of a missing session: 404, no body. */
    optd_response h = tapi_req(s->c, "HEAD", "/v1/sessions/nobody", NULL, NULL);
    assert_int_equal(h.status, 404);
    assert_int_equal(h.len, 0);
    optd_response_free(&h);
    /* HEAD where there is no GET: 405. */
    h = tapi_req(s->c, "HEAD", "/v1/sessions/heady/step", NULL, NULL);
    assert_int_equal(h.status, 405);
    optd_response_free(&h);
    /* Allow names HEAD wherever GET is allowed. */
    optd_response r = tapi_req(s->c, "POST", "/v1/sessions/heady/params", NULL, "{}");
    tapi_assert_problem(&r, 405, NULL);
    const char *allow = optd_response_header(&r, "Allow");
    assert_non_null(allow);
    assert_non_null(strstr(allow, "GET, HEAD"));
    optd_response_free(&r);
}

/* ------------------------------------------------ libmicrohttpd's own */

/* Headers past libmicrohttpd's memory limit are answered by the library
 * itself (431, its own HTML body: 0.9.75 offers no way to change it) and
 * the connection is closed; the daemon serves on. */
static void test_library_errors(void **state)
{
    suite *s = *state;
    size_t n = 70000;
    char *req = malloc(n + 128);
    assert_non_null(req);
    int len = sprintf(req, "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ");
    memset(req + len, 'a', n);
    len += (int)n;
    len += sprintf(req + len, "\r\n\r\n");
    raw_answer a = raw_send(port_of(s), req, (size_t)len, 3000);
    assert_int_equal(a.status, 431);
    assert_true(a.closed);
    free(a.text);
    free(req);
    assert_int_equal(status_of(s->c, "GET", "/healthz"), 200);
}

/* ------------------------------------------------------------ Bearer */

static void test_bearer_any_case(void **state)
{
    (void)state;
    static const char *const args[] = {"--api-key", "s3cret", NULL};
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    static const struct {
        const char *h;
        int status;
    } cases[] = {
        {"Authorization: Bearer s3cret", 200}, {"Authorization: bearer s3cret", 200},
        {"Authorization: BEARER s3cret", 200}, {"Authorization: bEaReR   s3cret", 200},
        {"Authorization: Bearer s3cre", 401},  {"Authorization: Bearers3cret", 401},
        {"Authorization: Basic s3cret", 401},  {"Authorization: bearer", 401},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *hs[] = {cases[i].h, NULL};
        optd_response r = tapi_req(c, "GET", "/v1/optimizers", hs, NULL);
        if (r.status != cases[i].status)
            fail_msg("%s: %d, wanted %d", cases[i].h, r.status, cases[i].status);
        optd_response_free(&r);
    }
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* ------------------------------------------------------- connections */

/* Open sockets from src: how many the server has not closed, after
 * waiting up to wait_ms for it to act. */
static int count_open(const int *fds, int n, int wait_ms)
{
    long long end = tapi_now_ms() + wait_ms;
    int open_n = n;
    bool *gone = calloc((size_t)n, sizeof *gone);
    assert_non_null(gone);
    while (tapi_now_ms() < end) {
        open_n = 0;
        for (int i = 0; i < n; i++) {
            if (gone[i])
                continue;
            struct pollfd p = {.fd = fds[i], .events = POLLIN};
            if (poll(&p, 1, 0) == 1) {
                char b;
                ssize_t got = recv(fds[i], &b, 1, MSG_DONTWAIT);
                if (got <= 0 && !(got < 0 && errno == EAGAIN)) {
                    gone[i] = true;
                    continue;
                }
            }
            open_n++;
        }
        usleep(50 * 1000);
    }
    free(gone);
    return open_n;
}

/* Hundreds of idle connections from one address (127.0.0.2): the address
 * keeps at most --max-connections-per-ip of them, and /healthz from
 * another address answers at once. */
static void test_flood_per_address(void **state)
{
    (void)state;
    enum { FLOOD = 300, PER_IP = 8 };
    static const char *const args[] = {"--max-connections", "64", "--max-connections-per-ip", "8",
                                       "--idle-timeout", "60", "--threads", "2", NULL};
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    int *fds = malloc(FLOOD * sizeof *fds);
    assert_non_null(fds);
    int opened = 0;
    for (int i = 0; i < FLOOD; i++) {
        fds[i] = raw_connect(d.port, "127.0.0.2");
        if (fds[i] >= 0)
            opened++;
    }
    assert_int_equal(opened, FLOOD); /* the kernel accepted them all */
    int still = count_open(fds, FLOOD, 1500);
    if (still > PER_IP)
        fail_msg("%d of %d flood connections still open (limit %d per address)", still, FLOOD,
                 PER_IP);
    assert_true(still >= 1);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    long long t0 = tapi_now_ms();
    optd_response r = tapi_req(c, "GET", "/healthz", NULL, NULL);
    long long ms = tapi_now_ms() - t0;
    assert_int_equal(r.status, 200);
    if (ms > 1000)
        fail_msg("/healthz took %lld ms under the flood", ms);
    optd_response_free(&r);
    optd_client_free(c);
    for (int i = 0; i < FLOOD; i++)
        close(fds[i]);
    free(fds);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* Slowloris: connections from one address (127.0.0.3) that send a header
 * byte well within every idle timeout are never idle, but the address
 * holds at most --max-connections-per-ip of them, and /healthz from
 * another address answers while they dribble. */
static void test_slow_headers_per_address(void **state)
{
    (void)state;
    enum { SLOW = 40, PER_IP = 4 };
    static const char *const args[] = {"--max-connections-per-ip", "4", "--idle-timeout", "1",
                                       "--threads", "2", NULL};
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    int fds[SLOW];
    for (int i = 0; i < SLOW; i++) {
        fds[i] = raw_connect(d.port, "127.0.0.3");
        assert_true(fds[i] >= 0);
        send(fds[i], "GET /healthz HTTP/1.1\r\nX-Slow: ", 31, MSG_NOSIGNAL);
    }
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    /* 2.4 s of dribbling: longer than the idle timeout. */
    for (int round = 0; round < 8; round++) {
        usleep(300 * 1000);
        for (int i = 0; i < SLOW; i++)
            if (fds[i] >= 0)
                send(fds[i], "a", 1, MSG_NOSIGNAL);
        long long t0 = tapi_now_ms();
        optd_response r = tapi_req(c, "GET", "/healthz", NULL, NULL);
        assert_int_equal(r.status, 200);
        if (tapi_now_ms() - t0 > 1000)
            fail_msg("/healthz took %lld ms while headers dribbled", tapi_now_ms() - t0);
        optd_response_free(&r);
    }
    int still = count_open(fds, SLOW, 300);
    if (still > PER_IP || still < 1)
        fail_msg("%d of %d dribbling connections open (limit %d per address)", still, SLOW, PER_IP);
    optd_client_free(c);
    for (int i = 0; i < SLOW; i++)
        close(fds[i]);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* Idle, half-closed and half-sent connections are closed after
 * --idle-timeout (they used to linger 300 s). */
static void test_idle_timeout(void **state)
{
    (void)state;
    static const char *const args[] = {"--idle-timeout=1", NULL};
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    int idle = raw_connect(d.port, NULL);
    int half = raw_connect(d.port, NULL);
    int partial = raw_connect(d.port, NULL);
    assert_true(idle >= 0 && half >= 0 && partial >= 0);
    const char *start = "GET /healthz HTTP/1.1\r\nHost: t\r\n";
    assert_int_equal(send(half, start, strlen(start), MSG_NOSIGNAL), (ssize_t)strlen(start));
    shutdown(half, SHUT_WR);
    assert_int_equal(send(partial, start, strlen(start), MSG_NOSIGNAL), (ssize_t)strlen(start));
    long long t0 = tapi_now_ms();
    int fds[] = {idle, half, partial};
    for (int i = 0; i < 3; i++) {
        bool closed;
        long long left = 6000 - (tapi_now_ms() - t0);
        char *got = raw_read(fds[i], left > 0 ? (int)left : 1, &closed);
        if (!closed)
            fail_msg("connection %d still open after %lld ms", i, tapi_now_ms() - t0);
        free(got);
        close(fds[i]);
    }
    long long ms = tapi_now_ms() - t0;
    assert_true(ms < 6000);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* -------------------------------------------------------------- flags */

/* Runs optd with argv (and one environment assignment, or NULL); returns
 * its exit code, its stdout in out (new buffer; caller frees). */
static int run_optd(const char *const *argv, const char *env, char **out)
{
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(pfd[1], 1);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 2);
        close(pfd[0]);
        close(pfd[1]);
        if (env)
            putenv((char *)env);
        const char *bin = getenv("OPTD_BIN");
        const char *args[32] = {bin ? bin : "build/optd"};
        for (int i = 0; argv[i] && i < 30; i++)
            args[i + 1] = argv[i];
        execv(args[0], (char **)args);
        _exit(127);
    }
    close(pfd[1]);
    bool closed;
    *out = raw_read(pfd[0], 10000, &closed);
    close(pfd[0]);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_flags(void **state)
{
    (void)state;
    char *out;
    static const char *const help[] = {"--help", NULL};
    assert_int_equal(run_optd(help, NULL, &out), 0);
    static const char *const want[] = {
        "--bind", "OPTD_BIND", "--port", "OPTD_PORT", "--db", "OPTD_DB", "--threads",
        "--max-body-mb", "--max-params", "--cache-mb", "--durability", "--api-key",
        "--log-level", "--check-health", "--max-connections ", "OPTD_MAX_CONNECTIONS ",
        "--max-connections-per-ip", "OPTD_MAX_CONNECTIONS_PER_IP", "--idle-timeout",
        "OPTD_IDLE_TIMEOUT", "--version"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (!strstr(out, want[i]))
            fail_msg("--help does not name %s", want[i]);
    free(out);
    static const char *const h[] = {"-h", NULL};
    assert_int_equal(run_optd(h, NULL, &out), 0);
    assert_non_null(strstr(out, "usage: optd"));
    free(out);
    static const char *const version[] = {"--version", NULL};
    assert_int_equal(run_optd(version, NULL, &out), 0);
    assert_true(strncmp(out, "optd ", 5) == 0);
    free(out);
    /* Bad flags and values: exit 2, nothing started. */
    const char *const *const bad[] = {
        (const char *const[]){"--bogus", NULL},
        (const char *const[]){"--port", NULL},
        (const char *const[]){"--port=abc", NULL},
        (const char *const[]){"--port", "70000", NULL},
        (const char *const[]){"--idle-timeout", "0", NULL},
        (const char *const[]){"--max-connections", "-5", NULL},
        (const char *const[]){"--max-connections-per-ip", "9999999", NULL},
        (const char *const[]){"--durability", "sometimes", NULL},
        (const char *const[]){"--log-level=loud", NULL},
        (const char *const[]){"stray", NULL},
        (const char *const[]){"--help=yes", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = run_optd(bad[i], NULL, &out);
        free(out);
        if (rc != 2)
            fail_msg("optd %s %s: exit %d, wanted 2", bad[i][0], bad[i][1] ? bad[i][1] : "", rc);
    }
    /* An environment twin is read, and checked like its flag. */
    static const char *const none[] = {"--version", NULL};
    assert_int_equal(run_optd(none, "OPTD_MAX_CONNECTIONS_PER_IP=x", &out), 2);
    free(out);
    assert_int_equal(run_optd(none, "OPTD_IDLE_TIMEOUT=0", &out), 2);
    free(out);
}

/* A flag beats its environment twin, and both forms (--f v, --f=v) work:
 * the daemon logs its limits at start. */
static void test_flag_over_env(void **state)
{
    (void)state;
    setenv("OPTD_MAX_CONNECTIONS_PER_IP", "5", 1);
    setenv("OPTD_IDLE_TIMEOUT", "7", 1);
    static const char *const args[] = {"--max-connections=50", "--max-connections-per-ip", "6",
                                       NULL};
    tdaemon d;
    int rc = tdaemon_start(&d, NULL, args);
    unsetenv("OPTD_MAX_CONNECTIONS_PER_IP");
    unsetenv("OPTD_IDLE_TIMEOUT");
    assert_int_equal(rc, 0);
    assert_int_equal(tdaemon_stop(&d), 0);
    FILE *f = fopen(d.log, "r");
    assert_non_null(f);
    char line[1024];
    bool seen = false;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "at most 50 connections, 6 per address, idle ones closed after 7 s"))
            seen = true;
    fclose(f);
    if (!seen)
        tdaemon_dump_log(&d);
    assert_true(seen);
    tdaemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_name_nul_escape_is_400),
        cmocka_unit_test(test_name_slash_escape_is_400),
        cmocka_unit_test(test_query_still_decoded),
        cmocka_unit_test(test_duplicate_content_length),
        cmocka_unit_test(test_transfer_encoding_with_content_length),
        cmocka_unit_test(test_chunked_body_grows),
        cmocka_unit_test(test_body_limits),
        cmocka_unit_test(test_head),
        cmocka_unit_test(test_library_errors),
        cmocka_unit_test(test_bearer_any_case),
        cmocka_unit_test(test_flood_per_address),
        cmocka_unit_test(test_slow_headers_per_address),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_flags),
        cmocka_unit_test(test_flag_over_env),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
