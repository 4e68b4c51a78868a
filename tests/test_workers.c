/*
 * test_workers.c -- many workers, one optimizer state.
 *
 * Synchronous rounds driven by real worker processes (fork, one libcurl
 * handle each) and compared with a serial run computed here; the round's
 * edge cases (timeouts both ways, a duplicate worker and its retry, a wrong
 * round, a waiter killed mid-round, PATCH/DELETE with an open round,
 * shutdown with waiters, 64 parked connections against a small thread
 * pool); async staleness bounds and damping; accumulation, including a
 * crash in the middle of a pending one; and a 16 x 500 load run.
 *
 * Worker processes and threads never call cmocka: they record what they
 * saw (shared memory or a struct) and the test asserts afterwards.
 */
#define _GNU_SOURCE /* prctl's PR_SET_PDEATHSIG */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clients/c/optd_client.h"
#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

/* ------------------------------------------------------------- timing */

/* Under valgrind everything is ten to fifty times slower. */
static bool slow_env(void)
{
    const char *p = getenv("LD_PRELOAD");
    const char *v = getenv("OPTD_VALGRIND_DAEMON");
    return (v && *v) || (p && strstr(p, "vgpreload"));
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* The API cannot show whether a request is parked in its round yet: after
 * a request has been handed to libcurl, give the daemon this long to read
 * and park it (a loopback request takes well under a millisecond). */
static long settle_ms(void)
{
    return slow_env() ? 3000 : 500;
}

/* --------------------------------------------------------------- suite */

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

/* ------------------------------------------- what a test leaves behind */

/* cmocka leaves a failed test by longjmp: whatever the test had started
 * (request threads, its own daemon, child processes) would live on, write
 * into the test's dead stack frame and disturb, or crash, the tests after
 * it.  So everything a test starts is registered here, its storage
 * outlives the frame (static), and test_teardown, run after every test,
 * kills the children, stops the daemons and joins the threads: the suite
 * goes on and reports every remaining test. */
typedef struct call call;
static struct {
    call *calls[128];
    int ncalls;
    tdaemon *daemons[4];
    int ndaemons;
    pid_t pids[8];
    int npids;
    pthread_t threads[16];
    int nthreads;
} live;

static void live_call_add(call *k)
{
    if (live.ncalls == (int)(sizeof live.calls / sizeof live.calls[0]))
        abort(); /* a test started more calls than it may */
    live.calls[live.ncalls++] = k;
}

static void live_call_remove(call *k)
{
    for (int i = 0; i < live.ncalls; i++)
        if (live.calls[i] == k) {
            live.calls[i] = live.calls[--live.ncalls];
            return;
        }
}

static void live_pid_add(pid_t pid)
{
    if (live.npids == (int)(sizeof live.pids / sizeof live.pids[0]))
        abort();
    live.pids[live.npids++] = pid;
}

static void live_pid_remove(pid_t pid)
{
    for (int i = 0; i < live.npids; i++)
        if (live.pids[i] == pid) {
            live.pids[i] = live.pids[--live.npids];
            return;
        }
}

static void live_thread_add(pthread_t th)
{
    if (live.nthreads == (int)(sizeof live.threads / sizeof live.threads[0]))
        abort();
    live.threads[live.nthreads++] = th;
}

static void live_thread_remove(pthread_t th)
{
    for (int i = 0; i < live.nthreads; i++)
        if (pthread_equal(live.threads[i], th)) {
            live.threads[i] = live.threads[--live.nthreads];
            return;
        }
}

/* Starts a daemon of the test's own; d must be static (it outlives a
 * failed test).  test_teardown cleans it up whatever happened. */
static void own_daemon_start(tdaemon *d, const char *const *args)
{
    if (live.ndaemons == (int)(sizeof live.daemons / sizeof live.daemons[0]))
        abort();
    memset(d, 0, sizeof *d);
    d->out_fd = -1;
    assert_int_equal(tdaemon_start(d, NULL, args), 0);
    live.daemons[live.ndaemons++] = d;
}

static void call_discard(call *k);
static bool call_finished(call *k);

/* OPTD_WORKERS_FAIL=test_a,test_b: those tests fail on purpose at their
 * most delicate point (requests parked, a daemon of their own running, a
 * child forked, threads running).  tests/test_workers_fail.sh uses it to
 * prove that the suite still runs and reports every other test. */
static void planted_failure(const char *test)
{
    const char *list = getenv("OPTD_WORKERS_FAIL");
    size_t n = strlen(test);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, test, n) == 0)
            fail_msg("%s: planted failure (OPTD_WORKERS_FAIL)", test);
        p = end ? end + 1 : p + len;
    }
}


/* ------------------------------------------------------------ helpers */

/* Appends printf output to a growing string; aborts the test on OOM. */
typedef struct {
    char *s;
    size_t len, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            abort();
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 256;
        while (cap <= b->len + (size_t)n)
            cap *= 2;
        char *p = realloc(b->s, cap);
        if (!p)
            abort();
        b->s = p;
        b->cap = cap;
    }
}

/* Prints n elements of a float32 or float64 vector as a JSON array body
 * ("%.9g" and "%.17g" round-trip exactly). */
static void sb_vector(sbuf *b, const void *v, int n, bool f64)
{
    sb_printf(b, "[");
    for (int j = 0; j < n; j++) {
        if (f64)
            sb_printf(b, "%s%.17g", j ? "," : "", ((const double *)v)[j]);
        else
            sb_printf(b, "%s%.9g", j ? "," : "", (double)((const float *)v)[j]);
    }
    sb_printf(b, "]");
}

/* PUT a session with explicit float64 params (float32-representable when
 * dtype is float32); mode may be NULL. */
static void create_session(optd_client *c, const char *name, const char *optimizer,
                           const char *dtype, const double *p, int n, const char *mode)
{
    sbuf b = {0};
    sb_printf(&b, "{\"optimizer\":%s,\"dtype\":\"%s\",\"params\":", optimizer, dtype);
    sb_vector(&b, p, n, true);
    if (mode)
        sb_printf(&b, ",\"mode\":%s", mode);
    sb_printf(&b, "}");
    tapi_create(c, name, b.s, 201);
    free(b.s);
}

/* GET /v1/sessions/{name} parsed; cJSON_Delete it. */
static cJSON *get_session(optd_client *c, const char *name)
{
    char path[192];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(c, "GET", path, NULL, NULL);
    if (r.status != 200)
        fail_msg("GET %s: %d %.*s", path, r.status, (int)r.len, r.body);
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    return j;
}

static long long counter(const cJSON *session, const char *name)
{
    const cJSON *cn = cJSON_GetObjectItemCaseSensitive(session, "counters");
    if (!cJSON_IsObject(cn))
        fail_msg("the session has no counters object");
    return (long long)tapi_num(cn, name);
}

static void get_params64(optd_client *c, const char *name, double *out, int n, long long *step)
{
    optd_error e;
    if (optd_get_params_f64(c, name, out, (size_t)n, step, &e) != 0)
        fail_msg("GET %s/params: %d %s", name, e.status, e.detail);
}

static uint64_t fnv1a(const void *p, size_t len)
{
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= b[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void assert_params64(const char *what, const double *got, const double *want, int n,
                            double tol)
{
    for (int j = 0; j < n; j++) {
        double d = fabs(got[j] - want[j]);
        if (!(d <= tol * fmax(1.0, fabs(want[j]))))
            fail_msg("%s: param %d is %.17g, expected %.17g (|diff| %.3g > %.3g)", what, j,
                     got[j], want[j], d, tol);
    }
}

/* ------------------------------------------- one request on a thread */

/* A step request sent from its own thread with its own client, so that
 * the test can hold many requests parked in a round at once. */
struct call {
    char url[64];
    char path[192];
    char *body;
    size_t len;
    char hbuf[3][256];
    const char *hdrs[6];
    long timeout_ms;
    optd_response r;
    int rc;       /* optd_request's: 0 when an answer came */
    int started;  /* the request is being handed to libcurl (atomic) */
    int finished; /* atomic */
    long long t_start, t_end;
    pthread_t th;
};

static void *call_main(void *arg)
{
    call *k = arg;
    k->rc = -1;
    optd_client *c = optd_client_new(k->url, NULL);
    if (c) {
        optd_client_set_retry(c, 1, 0, 0);
        optd_client_set_timeouts(c, 5000, k->timeout_ms);
        k->t_start = tapi_now_ms();
        __atomic_store_n(&k->started, 1, __ATOMIC_SEQ_CST);
        k->rc = optd_request(c, "POST", k->path, k->hdrs, k->body, k->len, &k->r);
        k->t_end = tapi_now_ms();
        optd_client_free(c);
    }
    __atomic_store_n(&k->started, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&k->finished, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* Fills k with POST /v1/sessions/{session}/step and a JSON body
 * {"grad":g,"worker":worker,"base_step":base} (worker NULL / base < 0:
 * left out) and the Idempotency-Key key (NULL: none). */
static void call_prepare(call *k, const char *url, const char *session, const double *g, int n,
                         const char *worker, long long base, const char *key)
{
    memset(k, 0, sizeof *k);
    snprintf(k->url, sizeof k->url, "%s", url);
    snprintf(k->path, sizeof k->path, "/v1/sessions/%s/step", session);
    sbuf b = {0};
    sb_printf(&b, "{\"grad\":");
    sb_vector(&b, g, n, true);
    if (worker)
        sb_printf(&b, ",\"worker\":\"%s\"", worker);
    if (base >= 0)
        sb_printf(&b, ",\"base_step\":%lld", base);
    sb_printf(&b, "}");
    k->body = b.s;
    k->len = b.len;
    int nh = 0;
    k->hdrs[nh++] = "Content-Type: application/json";
    if (key) {
        snprintf(k->hbuf[0], sizeof k->hbuf[0], "Idempotency-Key: %s", key);
        k->hdrs[nh++] = k->hbuf[0];
    }
    k->hdrs[nh] = NULL;
    k->timeout_ms = slow_env() ? 300000 : 60000;
}

/* Adds "loss" to a prepared body. */
static void call_add_loss(call *k, double loss)
{
    sbuf b = {.s = k->body, .len = k->len - 1, .cap = k->len + 1}; /* drop the "}" */
    sb_printf(&b, ",\"loss\":%.17g}", loss);
    k->body = b.s;
    k->len = b.len;
}

static void call_start(call *k)
{
    if (pthread_create(&k->th, NULL, call_main, k) != 0)
        fail_msg("pthread_create failed");
    live_call_add(k);
}

/* The same request, started on its own thread. */
static void call_step(call *k, const char *url, const char *session, const double *g, int n,
                      const char *worker, long long base, const char *key)
{
    call_prepare(k, url, session, g, n, worker, base, key);
    call_start(k);
}

static void call_wait_started(call *k)
{
    while (!__atomic_load_n(&k->started, __ATOMIC_SEQ_CST))
        sleep_ms(1);
}

static bool call_finished(call *k)
{
    return __atomic_load_n(&k->finished, __ATOMIC_SEQ_CST) != 0;
}

/* Joins the thread of a started call and frees its body. */
static void call_reap(call *k)
{
    pthread_join(k->th, NULL);
    live_call_remove(k);
    free(k->body);
    k->body = NULL;
}

/* Joins the thread and asserts that an HTTP answer came. */
static void call_join(call *k)
{
    call_reap(k);
    if (k->rc != 0)
        fail_msg("%s: no HTTP answer", k->path);
}

static void call_free(call *k)
{
    optd_response_free(&k->r);
}

/* Joins a call a failed test left running and drops its answer. */
static void call_discard(call *k)
{
    call_reap(k);
    call_free(k);
}

/* After every test: kills the children, stops the daemons and joins the
 * threads it left (see "what a test leaves behind"). */
static int test_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < live.npids; i++) {
        kill(live.pids[i], SIGKILL);
        waitpid(live.pids[i], NULL, 0);
    }
    live.npids = 0;
    /* A stopped daemon answers its parked requests, so their threads end. */
    for (int i = 0; i < live.ndaemons; i++)
        tdaemon_cleanup(live.daemons[i]);
    live.ndaemons = 0;
    for (int i = 0; i < live.nthreads; i++)
        pthread_join(live.threads[i], NULL);
    live.nthreads = 0;
    /* A request parked on the suite's daemon only ends at its round's
     * timeout: give the others a moment, then let such a thread finish on
     * its own (its call is static, so it writes nowhere it should not). */
    long long until = tapi_now_ms() + 2000;
    while (live.ncalls > 0) {
        call *k = live.calls[0];
        while (!call_finished(k) && tapi_now_ms() < until)
            sleep_ms(5);
        if (call_finished(k)) {
            call_discard(k);
        } else {
            pthread_detach(k->th);
            live_call_remove(k);
        }
    }
    return 0;
}

/* The same request, synchronously on this thread with client c. */
static optd_response step_now(optd_client *c, const char *session, const double *g, int n,
                              const char *worker, long long base, const char *key)
{
    call k;
    call_prepare(&k, "", session, g, n, worker, base, key);
    optd_response r = tapi_req_bin(c, "POST", k.path, k.hdrs, k.body, k.len);
    free(k.body);
    return r;
}

static long long header_ll(const optd_response *r, const char *name)
{
    const char *v = optd_response_header(r, name);
    if (!v)
        fail_msg("status %d: no %s header", r->status, name);
    return atoll(v);
}

/* Asserts a 200 answer of a round: Optd-Step, Optd-Round-Size, and the
 * params (JSON body) equal want exactly. */
static void assert_round_answer(const optd_response *r, long long step, int round_size,
                                const double *want, int n)
{
    if (r->status != 200)
        fail_msg("expected 200 for the round, got %d: %.*s", r->status, (int)r->len, r->body);
    assert_int_equal(header_ll(r, "Optd-Step"), step);
    assert_int_equal(header_ll(r, "Optd-Round-Size"), round_size);
    cJSON *j = tapi_json(r);
    assert_int_equal((long long)tapi_num(j, "step"), step);
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "params");
    assert_true(cJSON_IsArray(p));
    assert_int_equal(cJSON_GetArraySize(p), n);
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, p)
    {
        if (e->valuedouble != want[i])
            fail_msg("param %d: %.17g, expected %.17g", i, e->valuedouble, want[i]);
        i++;
    }
    cJSON_Delete(j);
}

/* The problem's "step" member. */
static long long problem_step(const optd_response *r)
{
    cJSON *j = tapi_json(r);
    long long st = (long long)tapi_num(j, "step");
    cJSON_Delete(j);
    return st;
}

static void fresh_name(char *out, size_t len, const char *prefix)
{
    static int seq;
    snprintf(out, len, "%s-%d", prefix, ++seq);
}

/* ================================================ worker processes */

/* What one worker saw after one round (written by the worker process). */
typedef struct {
    int status;       /* HTTP status; 0: no answer; -1: bad answer */
    int round_size;   /* Optd-Round-Size, -1 when absent */
    long long step;   /* Optd-Step */
    uint64_t sum;     /* FNV-1a of the params' bytes */
} round_rec;

typedef void (*grad_fn)(int w, int r, const void *params, void *g, int n);

typedef struct {
    const char *url;
    const char *session;
    int workers, rounds, n;
    bool f64;
    grad_fn grad;
    bool keep_params;     /* fill plog */
    /* shared with the workers (MAP_SHARED), allocated by run_workers */
    round_rec *rec;       /* [workers][rounds] */
    unsigned char *plog;  /* [workers][rounds][n] params after each round */
    unsigned char *final; /* [workers][n] params after the last round */
} proc_run;

static void worker_name(char *out, size_t len, int w)
{
    snprintf(out, len, "worker-%d", w);
}

/* One round for worker w: even workers speak JSON, odd ones binary (so
 * both ways of naming the worker and the base step are exercised).
 * Fills rec and, on 200, params.  0 on 200. */
static int proc_step(optd_client *c, const proc_run *pr, int w, long long base, const void *g,
                     void *params, round_rec *rec)
{
    size_t es = pr->f64 ? 8 : 4, vbytes = (size_t)pr->n * es;
    char path[192], wname[64], h_worker[128], h_base[64];
    snprintf(path, sizeof path, "/v1/sessions/%s/step", pr->session);
    worker_name(wname, sizeof wname, w);
    const char *hdrs[6];
    int nh = 0;
    bool json = w % 2 == 0;
    sbuf b = {0};
    const void *body = g;
    size_t len = vbytes;
    if (json) {
        hdrs[nh++] = "Content-Type: application/json";
        hdrs[nh++] = "Accept: application/json";
        sb_printf(&b, "{\"grad\":");
        sb_vector(&b, g, pr->n, pr->f64);
        sb_printf(&b, ",\"worker\":\"%s\",\"base_step\":%lld}", wname, base);
        body = b.s;
        len = b.len;
    } else {
        snprintf(h_worker, sizeof h_worker, "Optd-Worker: %s", wname);
        snprintf(h_base, sizeof h_base, "Optd-Base-Step: %lld", base);
        hdrs[nh++] = "Content-Type: application/octet-stream";
        hdrs[nh++] = "Accept: application/octet-stream";
        hdrs[nh++] = h_worker;
        hdrs[nh++] = h_base;
    }
    hdrs[nh] = NULL;
    optd_response r;
    int rc = optd_request(c, "POST", path, hdrs, body, len, &r);
    free(b.s);
    rec->status = 0;
    rec->round_size = -1;
    rec->step = -1;
    if (rc != 0)
        return -1;
    rec->status = r.status;
    const char *v = optd_response_header(&r, "Optd-Round-Size");
    if (v)
        rec->round_size = atoi(v);
    v = optd_response_header(&r, "Optd-Step");
    if (v)
        rec->step = atoll(v);
    int ret = r.status == 200 ? 0 : -1;
    if (ret == 0 && json) {
        cJSON *j = cJSON_ParseWithLength(r.body, r.len);
        const cJSON *p = j ? cJSON_GetObjectItemCaseSensitive(j, "params") : NULL;
        int i = 0;
        const cJSON *e;
        if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == pr->n) {
            cJSON_ArrayForEach(e, p)
            {
                if (pr->f64)
                    ((double *)params)[i] = e->valuedouble;
                else
                    ((float *)params)[i] = (float)e->valuedouble;
                i++;
            }
        }
        if (i != pr->n)
            ret = -1;
        cJSON_Delete(j);
    } else if (ret == 0) {
        if (r.len == vbytes)
            memcpy(params, r.body, vbytes);
        else
            ret = -1;
    }
    if (ret && r.status == 200)
        rec->status = -1;
    if (ret == 0)
        rec->sum = fnv1a(params, vbytes);
    optd_response_free(&r);
    return ret;
}

/* The body of worker process w.  Returns its exit code. */
static int worker_main(const proc_run *pr, int w)
{
    size_t vbytes = (size_t)pr->n * (pr->f64 ? 8 : 4);
    optd_client *c = optd_client_new(pr->url, NULL);
    void *params = malloc(vbytes), *g = malloc(vbytes);
    if (!c || !params || !g)
        return 2;
    /* No retries: the test wants every answer as it came. */
    optd_client_set_retry(c, 1, 0, 0);
    optd_client_set_timeouts(c, 5000, slow_env() ? 600000 : 60000);
    long long step = -1;
    int rc = pr->f64 ? optd_get_params_f64(c, pr->session, params, (size_t)pr->n, &step, NULL)
                     : optd_get_params_f32(c, pr->session, params, (size_t)pr->n, &step, NULL);
    if (rc != 0 || step != 0)
        return 3;
    for (int r = 0; r < pr->rounds; r++) {
        round_rec *rec = &pr->rec[w * pr->rounds + r];
        pr->grad(w, r, params, g, pr->n);
        /* base_step is the step these params are from. */
        if (proc_step(c, pr, w, r, g, params, rec) != 0)
            return 4;
        if (pr->plog)
            memcpy(pr->plog + ((size_t)w * (size_t)pr->rounds + (size_t)r) * vbytes, params,
                   vbytes);
    }
    memcpy(pr->final + (size_t)w * vbytes, params, vbytes);
    optd_client_free(c);
    free(params);
    free(g);
    return 0;
}

static void *shared_alloc(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        fail_msg("mmap %zu bytes: %s", len, strerror(errno));
    memset(p, 0, len);
    return p;
}

/* Forks one process per worker, waits for all (killing them past
 * deadline_ms), and fails the test unless every one exited 0.  Returns
 * the wall time in ms. */
static long long run_workers(proc_run *pr, long long deadline_ms)
{
    size_t vbytes = (size_t)pr->n * (pr->f64 ? 8 : 4);
    pr->rec = shared_alloc(sizeof(round_rec) * (size_t)pr->workers * (size_t)pr->rounds);
    pr->final = shared_alloc(vbytes * (size_t)pr->workers);
    pr->plog = NULL;
    if (pr->keep_params)
        pr->plog = shared_alloc(vbytes * (size_t)pr->workers * (size_t)pr->rounds);
    pid_t pids[64];
    assert_true(pr->workers <= 64);
    fflush(NULL); /* a child must not flush the parent's buffered output */
    long long t0 = tapi_now_ms();
    for (int w = 0; w < pr->workers; w++) {
        pid_t pid = fork();
        if (pid < 0)
            fail_msg("fork: %s", strerror(errno));
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            _exit(worker_main(pr, w));
        }
        pids[w] = pid;
    }
    int status[64];
    bool done[64] = {0};
    int left = pr->workers;
    bool killed = false;
    while (left > 0) {
        for (int w = 0; w < pr->workers; w++) {
            if (done[w])
                continue;
            pid_t p = waitpid(pids[w], &status[w], WNOHANG);
            if (p == pids[w]) {
                done[w] = true;
                left--;
            }
        }
        if (left > 0 && !killed && tapi_now_ms() - t0 > deadline_ms) {
            for (int w = 0; w < pr->workers; w++)
                if (!done[w])
                    kill(pids[w], SIGKILL);
            killed = true;
        }
        if (left > 0)
            sleep_ms(2);
    }
    long long ms = tapi_now_ms() - t0;
    for (int w = 0; w < pr->workers; w++) {
        if (WIFEXITED(status[w]) && WEXITSTATUS(status[w]) == 0)
            continue;
        /* Say which round went wrong and how. */
        for (int r = 0; r < pr->rounds; r++) {
            const round_rec *rec = &pr->rec[w * pr->rounds + r];
            if (rec->status != 200)
                fail_msg("worker %d%s: round %d answered %d (step %lld)", w,
                         killed ? " (killed at the deadline)" : "", r, rec->status, rec->step);
        }
        fail_msg("worker %d exited badly (status 0x%x)%s", w, status[w],
                 killed ? ", killed at the deadline" : "");
    }
    return ms;
}

static void free_run(proc_run *pr)
{
    size_t vbytes = (size_t)pr->n * (pr->f64 ? 8 : 4);
    munmap(pr->rec, sizeof(round_rec) * (size_t)pr->workers * (size_t)pr->rounds);
    munmap(pr->final, vbytes * (size_t)pr->workers);
    if (pr->plog)
        munmap(pr->plog, vbytes * (size_t)pr->workers * (size_t)pr->rounds);
}

/* Every worker got 200 with step r + 1 and a full round in every round,
 * and all saw the same params (checksums) after each round. */
static void assert_rounds_agree(const proc_run *pr)
{
    for (int r = 0; r < pr->rounds; r++) {
        const round_rec *first = &pr->rec[r];
        for (int w = 0; w < pr->workers; w++) {
            const round_rec *rec = &pr->rec[w * pr->rounds + r];
            if (rec->status != 200 || rec->step != r + 1 || rec->round_size != pr->workers)
                fail_msg("worker %d round %d: status %d, step %lld, round size %d (want 200, "
                         "%d, %d)",
                         w, r, rec->status, rec->step, rec->round_size, r + 1, pr->workers);
            if (rec->sum != first->sum)
                fail_msg("round %d: worker %d saw other params than worker 0", r, w);
        }
    }
}

/* ------------------------------------- 4 workers vs a serial run, f64 */

enum { P4_WORKERS = 4, P4_ROUNDS = 100, P4_N = 12 };

/* A quadratic pull towards a per-worker target plus a per-round wiggle:
 * the gradient depends on the params, so a worker that got wrong params
 * sends a wrong gradient. */
static void grad64(int w, int r, const void *params, void *g, int n)
{
    const double *p = params;
    double *o = g;
    for (int j = 0; j < n; j++)
        o[j] = 0.5 * (p[j] - (0.3 * w - 0.05 * j)) + 0.01 * sin(0.7 * r + 1.3 * w + 0.11 * j);
}

static void init64(double *p, int n)
{
    for (int j = 0; j < n; j++)
        p[j] = 1.0 - 0.125 * j;
}

/* torch.optim.SGD (momentum, dampening 0) and torch.optim.Adam
 * (torch 1.13 _single_tensor_adam), written out in double. */
typedef struct {
    bool adam;
    double lr, momentum, beta1, beta2, eps;
    long t;
    double buf[P4_N], m[P4_N], v[P4_N];
} ref_opt;

static void ref_step(ref_opt *o, double *p, const double *g, int n)
{
    o->t++;
    if (!o->adam) {
        for (int j = 0; j < n; j++) {
            o->buf[j] = o->t == 1 ? g[j] : o->momentum * o->buf[j] + g[j];
            p[j] += -o->lr * o->buf[j];
        }
        return;
    }
    double bc1 = 1.0 - pow(o->beta1, (double)o->t);
    double bc2 = 1.0 - pow(o->beta2, (double)o->t);
    double step_size = o->lr / bc1, bc2_sqrt = sqrt(bc2);
    for (int j = 0; j < n; j++) {
        o->m[j] = o->m[j] * o->beta1 + g[j] * (1.0 - o->beta1);
        o->v[j] = o->v[j] * o->beta2 + g[j] * g[j] * (1.0 - o->beta2);
        double denom = sqrt(o->v[j]) / bc2_sqrt + o->eps;
        p[j] += -step_size * (o->m[j] / denom);
    }
}

static void run_serial_compare(suite *s, bool adam)
{
    char name[64];
    fresh_name(name, sizeof name, adam ? "sync-adam" : "sync-sgd");
    double init[P4_N];
    init64(init, P4_N);
    ref_opt o = {.adam = adam, .lr = adam ? 0.01 : 0.05, .momentum = 0.9, .beta1 = 0.9,
                 .beta2 = 0.999, .eps = 1e-8};
    char opt[128];
    if (adam)
        snprintf(opt, sizeof opt, "{\"type\":\"adam\",\"lr\":%.17g}", o.lr);
    else
        snprintf(opt, sizeof opt, "{\"type\":\"sgd\",\"lr\":%.17g,\"momentum\":%.17g}", o.lr,
                 o.momentum);
    create_session(s->c, name, opt, "float64", init, P4_N,
                   "{\"type\":\"sync\",\"workers\":4,\"timeout_ms\":20000}");

    proc_run pr = {.url = tdaemon_url(&s->d), .session = name, .workers = P4_WORKERS,
                   .rounds = P4_ROUNDS, .n = P4_N, .f64 = true, .grad = grad64,
                   .keep_params = true};
    long long ms = run_workers(&pr, slow_env() ? 600000 : 30000);
    assert_rounds_agree(&pr);

    /* The serial run: every round, the mean of the 4 workers' gradients at
     * the same params, one optimizer step. */
    double p[P4_N], g[P4_N], mean[P4_N];
    memcpy(p, init, sizeof p);
    const double *plog = (const double *)pr.plog;
    for (int r = 0; r < P4_ROUNDS; r++) {
        memset(mean, 0, sizeof mean);
        for (int w = 0; w < P4_WORKERS; w++) {
            grad64(w, r, p, g, P4_N);
            for (int j = 0; j < P4_N; j++)
                mean[j] += g[j];
        }
        for (int j = 0; j < P4_N; j++)
            mean[j] /= P4_WORKERS;
        ref_step(&o, p, mean, P4_N);
        for (int w = 0; w < P4_WORKERS; w++) {
            char what[64];
            snprintf(what, sizeof what, "round %d, worker %d", r, w);
            assert_params64(what, plog + ((size_t)w * P4_ROUNDS + (size_t)r) * P4_N, p, P4_N,
                            1e-12);
        }
    }
    double got[P4_N];
    long long step;
    get_params64(s->c, name, got, P4_N, &step);
    assert_int_equal(step, P4_ROUNDS);
    assert_params64("final params", got, p, P4_N, 1e-12);
    assert_memory_equal(got, pr.final, sizeof got);
    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "applied"), P4_ROUNDS);
    assert_int_equal(counter(j, "timed_out"), 0);
    cJSON_Delete(j);
    free_run(&pr);
    fprintf(stderr, "%s: %d workers x %d rounds in %lld ms\n", adam ? "adam" : "sgd",
            P4_WORKERS, P4_ROUNDS, ms);
}

static void test_sync_sgd_matches_serial(void **state)
{
    run_serial_compare(*state, false);
}

static void test_sync_adam_matches_serial(void **state)
{
    run_serial_compare(*state, true);
}

/* ------------------------------------------------- small round cases */

/* Exact arithmetic throughout: lr 0.5 and gradients with few bits. */
static const char *SGD_HALF = "{\"type\":\"sgd\",\"lr\":0.5}";

static void test_sync_timeout_fail(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "timeout-fail");
    double init[3] = {1, 2, 3}, g[3] = {1, 1, 1};
    long timeout = slow_env() ? 3000 : 400;
    char mode[160];
    snprintf(mode, sizeof mode,
             "{\"type\":\"sync\",\"workers\":3,\"timeout_ms\":%ld,\"on_timeout\":\"fail\"}",
             timeout);
    create_session(s->c, name, SGD_HALF, "float64", init, 3, mode);
    tapi_snap before = tapi_snapshot(s->c, name);

    static call k[2];
    long long t0 = tapi_now_ms();
    call_step(&k[0], tdaemon_url(&s->d), name, g, 3, "a", 0, NULL);
    call_step(&k[1], tdaemon_url(&s->d), name, g, 3, "b", -1, NULL); /* the open round */
    for (int i = 0; i < 2; i++) {
        call_join(&k[i]);
        tapi_assert_problem(&k[i].r, 504, NULL);
        assert_int_equal(problem_step(&k[i].r), 0);
        long long waited = k[i].t_end - t0;
        if (waited < timeout - 50 || waited > timeout + (slow_env() ? 30000 : 3000))
            fail_msg("the 504 came after %lld ms; timeout_ms is %ld", waited, timeout);
        call_free(&k[i]);
    }
    /* Nothing applied. */
    tapi_snap after = tapi_snapshot(s->c, name);
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "timed_out"), 1);
    assert_int_equal(counter(j, "applied"), 0);
    cJSON_Delete(j);

    /* The next round starts clean: three workers, one update. */
    for (int i = 0; i < 2; i++)
        call_step(&k[i], tdaemon_url(&s->d), name, g, 3, i ? "b" : "a", 0, NULL);
    optd_response r = step_now(s->c, name, g, 3, "c", 0, NULL);
    double want[3] = {0.5, 1.5, 2.5};
    assert_round_answer(&r, 1, 3, want, 3);
    optd_response_free(&r);
    for (int i = 0; i < 2; i++) {
        call_join(&k[i]);
        assert_round_answer(&k[i].r, 1, 3, want, 3);
        call_free(&k[i]);
    }
}

static void test_sync_timeout_apply(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "timeout-apply");
    double init[3] = {1, 2, 3}, g1[3] = {1, 0, -1}, g2[3] = {3, 2, 1};
    long timeout = slow_env() ? 3000 : 400;
    char mode[160];
    snprintf(mode, sizeof mode,
             "{\"type\":\"sync\",\"workers\":3,\"timeout_ms\":%ld,\"on_timeout\":\"apply\"}",
             timeout);
    create_session(s->c, name, SGD_HALF, "float64", init, 3, mode);

    static call k[2];
    long long t0 = tapi_now_ms();
    call_step(&k[0], tdaemon_url(&s->d), name, g1, 3, "a", 0, NULL);
    call_step(&k[1], tdaemon_url(&s->d), name, g2, 3, "b", 0, NULL);
    /* The partial round's mean (2, 1, 0) is applied: step 1. */
    double want[3] = {0, 1.5, 3};
    for (int i = 0; i < 2; i++) {
        call_join(&k[i]);
        assert_round_answer(&k[i].r, 1, 2, want, 3);
        if (k[i].t_end - t0 < timeout - 50)
            fail_msg("the partial round was applied after %lld ms; timeout_ms is %ld",
                     k[i].t_end - t0, timeout);
        call_free(&k[i]);
    }
    double got[3];
    long long step;
    get_params64(s->c, name, got, 3, &step);
    assert_int_equal(step, 1);
    assert_memory_equal(got, want, sizeof got);
    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "timed_out"), 1);
    assert_int_equal(counter(j, "applied"), 1);
    cJSON_Delete(j);
}

/* reduce "sum", the binary path with its Optd-Worker header, and a step
 * without a worker id. */
static void test_sync_reduce_sum_and_worker_id(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "sum");
    double init[2] = {1, 2}, g1[2] = {0.5, 1}, g2[2] = {1.5, -1};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":20000,\"reduce\":\"sum\"}");
    optd_response r = step_now(s->c, name, g1, 2, NULL, 0, NULL);
    tapi_assert_problem(&r, 400, "worker");
    optd_response_free(&r);

    static call k;
    call_prepare(&k, tdaemon_url(&s->d), name, g1, 2, "json-worker", 0, NULL);
    call_add_loss(&k, 1.0);
    call_start(&k);
    call_wait_started(&k);
    planted_failure(__func__);
    char path[192];
    snprintf(path, sizeof path, "/v1/sessions/%s/step", name);
    const char *bin[] = {"Content-Type: application/octet-stream",
                         "Accept: application/octet-stream", "Optd-Worker: binary-worker",
                         "Optd-Base-Step: 0", "Optd-Loss: 4", NULL};
    /* A non-finite gradient is refused whatever the nonfinite policy (a
     * round cannot skip a worker) and joins nothing. */
    double bad[2] = {NAN, 1};
    r = tapi_req_bin(s->c, "POST", path, bin, bad, sizeof bad);
    tapi_assert_problem(&r, 422, "grad");
    optd_response_free(&r);
    assert_false(call_finished(&k));
    r = tapi_req_bin(s->c, "POST", path, bin, g2, sizeof g2);
    assert_int_equal(r.status, 200);
    assert_int_equal(header_ll(&r, "Optd-Step"), 1);
    assert_int_equal(header_ll(&r, "Optd-Round-Size"), 2);
    double want[2] = {0, 2}; /* init - 0.5 * (g1 + g2) */
    assert_int_equal(r.len, sizeof want);
    assert_memory_equal(r.body, want, sizeof want);
    optd_response_free(&r);
    call_join(&k);
    assert_round_answer(&k.r, 1, 2, want, 2);
    call_free(&k);
    /* The round's loss is the mean of the workers' losses. */
    snprintf(path, sizeof path, "/v1/sessions/%s/history", name);
    r = tapi_req(s->c, "GET", path, NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(j, "steps");
    assert_int_equal(cJSON_GetArraySize(steps), 1);
    const cJSON *row = cJSON_GetArrayItem(steps, 0);
    assert_int_equal((long long)tapi_num(row, "step"), 1);
    assert_true(tapi_num(row, "loss") == 2.5);
    cJSON_Delete(j);
    optd_response_free(&r);
}

/* A second gradient from one worker in a round is refused; a retry with
 * the same Idempotency-Key waits for the same answer and counts once; a
 * retry after the round replays it. */
static void test_sync_duplicate_worker(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "dup");
    double init[2] = {1, 2}, ga[2] = {2, 4}, gb[2] = {0, 2};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":20000}");
    static call first, retry;
    call_step(&first, tdaemon_url(&s->d), name, ga, 2, "a", 0, "key-a-0");
    call_wait_started(&first);
    sleep_ms(settle_ms());

    /* Another gradient from a: 409 at once, naming the worker and step. */
    optd_response r = step_now(s->c, name, ga, 2, "a", 0, "key-a-other");
    tapi_assert_problem(&r, 409, "worker");
    assert_int_equal(problem_step(&r), 0);
    optd_response_free(&r);
    r = step_now(s->c, name, ga, 2, "a", 0, NULL);
    tapi_assert_problem(&r, 409, "worker");
    optd_response_free(&r);

    /* Its retry (same key) waits with the first. */
    call_step(&retry, tdaemon_url(&s->d), name, ga, 2, "a", 0, "key-a-0");
    call_wait_started(&retry);
    sleep_ms(settle_ms());
    assert_false(call_finished(&first));
    assert_false(call_finished(&retry));

    r = step_now(s->c, name, gb, 2, "b", 0, "key-b-0");
    double want[2] = {0.5, 0.5}; /* init - 0.5 * mean(ga, gb): a counted once */
    assert_round_answer(&r, 1, 2, want, 2);
    optd_response_free(&r);
    call_join(&first);
    assert_round_answer(&first.r, 1, 2, want, 2);
    call_free(&first);
    call_join(&retry);
    assert_round_answer(&retry.r, 1, 2, want, 2);
    call_free(&retry);

    /* After the round, both keys replay step 1 and apply nothing. */
    const char *keys[2] = {"key-a-0", "key-b-0"};
    for (int i = 0; i < 2; i++) {
        r = step_now(s->c, name, i ? gb : ga, 2, i ? "b" : "a", 0, keys[i]);
        assert_int_equal(r.status, 200);
        const char *rep = optd_response_header(&r, "Optd-Replayed");
        assert_non_null(rep);
        assert_string_equal(rep, "true");
        assert_int_equal(header_ll(&r, "Optd-Step"), 1);
        optd_response_free(&r);
    }
    double got[2];
    long long step;
    get_params64(s->c, name, got, 2, &step);
    assert_int_equal(step, 1);
    assert_memory_equal(got, want, sizeof got);
}

/* A gradient computed at another step is refused with the round's step,
 * and does not join the round. */
static void test_sync_wrong_round(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "wrong-round");
    double init[2] = {1, 2}, g[2] = {1, 1};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":20000}");
    optd_response r = step_now(s->c, name, g, 2, "a", 3, NULL);
    tapi_assert_problem(&r, 409, "base_step");
    assert_int_equal(problem_step(&r), 0);
    optd_response_free(&r);

    static call k;
    call_step(&k, tdaemon_url(&s->d), name, g, 2, "a", 0, NULL);
    call_wait_started(&k);
    sleep_ms(settle_ms());
    /* b's gradient for a future round: refused while a waits. */
    r = step_now(s->c, name, g, 2, "b", 1, NULL);
    tapi_assert_problem(&r, 409, "base_step");
    assert_int_equal(problem_step(&r), 0);
    optd_response_free(&r);
    assert_false(call_finished(&k));
    r = step_now(s->c, name, g, 2, "b", 0, NULL);
    double want1[2] = {0.5, 1.5};
    assert_round_answer(&r, 1, 2, want1, 2);
    optd_response_free(&r);
    call_join(&k);
    assert_round_answer(&k.r, 1, 2, want1, 2);
    call_free(&k);

    /* A late gradient for round 0 now: 409 with step 1. */
    r = step_now(s->c, name, g, 2, "a", 0, NULL);
    tapi_assert_problem(&r, 409, "base_step");
    assert_int_equal(problem_step(&r), 1);
    optd_response_free(&r);
    /* It joined nothing: the round of step 1 still needs two workers. */
    call_step(&k, tdaemon_url(&s->d), name, g, 2, "a", 1, NULL);
    r = step_now(s->c, name, g, 2, "b", 1, NULL);
    double want2[2] = {0, 1};
    assert_round_answer(&r, 2, 2, want2, 2);
    optd_response_free(&r);
    call_join(&k);
    assert_round_answer(&k.r, 2, 2, want2, 2);
    call_free(&k);
}

/* A worker process killed while it waits: its gradient stays in the
 * round, the others close it, and the daemon carries on. */
static void test_sync_killed_waiter(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "killed");
    double init[2] = {1, 2}, ga[2] = {3, 0}, gb[2] = {0, 3}, gc[2] = {0, 0};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":3,\"timeout_ms\":20000}");
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(pfd[0]);
        optd_client *c = optd_client_new(tdaemon_url(&s->d), NULL);
        if (!c)
            _exit(2);
        optd_client_set_retry(c, 1, 0, 0);
        optd_step_opts o = optd_step_opts_default();
        o.worker = "a";
        o.base_step = 0;
        o.json = 1;
        if (write(pfd[1], "x", 1) != 1)
            _exit(2);
        optd_step_f64_opts(c, name, ga, 2, NULL, &o, NULL, NULL, NULL, NULL);
        _exit(3); /* never reached: killed while it waits */
    }
    live_pid_add(pid);
    planted_failure(__func__);
    close(pfd[1]);
    char x;
    assert_int_equal(read(pfd[0], &x, 1), 1);
    close(pfd[0]);
    sleep_ms(settle_ms());
    int st = 0;
    assert_int_equal(waitpid(pid, &st, WNOHANG), 0); /* still waiting */
    assert_int_equal(kill(pid, SIGKILL), 0);
    assert_int_equal(waitpid(pid, &st, 0), pid);
    live_pid_remove(pid);
    assert_true(WIFSIGNALED(st));

    static call k;
    call_step(&k, tdaemon_url(&s->d), name, gb, 2, "b", 0, NULL);
    optd_response r = step_now(s->c, name, gc, 2, "c", 0, NULL);
    double want[2] = {0.5, 1.5}; /* init - 0.5 * mean(ga, gb, gc) */
    assert_round_answer(&r, 1, 3, want, 2);
    optd_response_free(&r);
    call_join(&k);
    assert_round_answer(&k.r, 1, 3, want, 2);
    call_free(&k);

    /* The next round: a gives up waiting (its client times out and closes
     * the connection) and retries with the same key: the retry waits for
     * the round instead of counting twice or being refused. */
    static call gave_up, ks[2];
    call_prepare(&gave_up, tdaemon_url(&s->d), name, ga, 2, "a", 1, "a-round-1");
    gave_up.timeout_ms = settle_ms();
    call_start(&gave_up);
    call_reap(&gave_up);
    assert_int_not_equal(gave_up.rc, 0); /* timed out: no answer */
    call_step(&ks[0], tdaemon_url(&s->d), name, ga, 2, "a", 1, "a-round-1");
    call_wait_started(&ks[0]);
    call_step(&ks[1], tdaemon_url(&s->d), name, gb, 2, "b", 1, NULL);
    call_wait_started(&ks[1]);
    sleep_ms(settle_ms());
    assert_false(call_finished(&ks[0]) || call_finished(&ks[1]));
    r = step_now(s->c, name, gc, 2, "c", 1, NULL);
    double want2[2] = {0, 1};
    assert_round_answer(&r, 2, 3, want2, 2);
    optd_response_free(&r);
    for (int i = 0; i < 2; i++) {
        call_join(&ks[i]);
        assert_round_answer(&ks[i].r, 2, 3, want2, 2);
        call_free(&ks[i]);
    }
    r = tapi_req(s->c, "GET", "/healthz", NULL, NULL);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
}

/* PATCH of the mode drops an open round (409 to its waiters); DELETE
 * drops it with 404.  Nothing is applied. */
static void test_sync_patch_delete_drop_round(void **state)
{
    suite *s = *state;
    char name[64], path[192];
    fresh_name(name, sizeof name, "dropped");
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    double init[2] = {1, 2}, g[2] = {1, 1};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":20000}");
    tapi_snap before = tapi_snapshot(s->c, name);

    static call k;
    call_step(&k, tdaemon_url(&s->d), name, g, 2, "a", 0, NULL);
    call_wait_started(&k);
    sleep_ms(settle_ms());
    optd_response r = tapi_req(s->c, "PATCH", path, NULL,
                               "{\"mode\":{\"type\":\"sync\",\"workers\":3,\"timeout_ms\":20000}}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    call_join(&k);
    tapi_assert_problem(&k.r, 409, NULL);
    call_free(&k);
    tapi_snap after = tapi_snapshot(s->c, name);
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    tapi_snap_free(&before);

    call_step(&k, tdaemon_url(&s->d), name, g, 2, "a", 0, NULL);
    call_wait_started(&k);
    sleep_ms(settle_ms());
    r = tapi_req(s->c, "DELETE", path, NULL, NULL);
    assert_int_equal(r.status, 204);
    optd_response_free(&r);
    call_join(&k);
    tapi_assert_problem(&k.r, 404, NULL);
    call_free(&k);
}

/* SIGTERM while two workers wait: both get 503, the daemon exits cleanly,
 * and nothing of the round was applied. */
static void test_sync_shutdown_answers_503(void **state)
{
    (void)state;
    static tdaemon d;
    own_daemon_start(&d, NULL);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    double init[2] = {1, 2}, g[2] = {1, 1};
    create_session(c, "shut", SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":3,\"timeout_ms\":60000}");
    static call k[2];
    for (int i = 0; i < 2; i++) {
        call_step(&k[i], tdaemon_url(&d), "shut", g, 2, i ? "b" : "a", 0, NULL);
        call_wait_started(&k[i]);
    }
    sleep_ms(settle_ms());
    assert_false(call_finished(&k[0]) || call_finished(&k[1]));
    long long t0 = tapi_now_ms();
    assert_int_equal(tdaemon_stop(&d), 0);
    long long stop_ms = tapi_now_ms() - t0;
    for (int i = 0; i < 2; i++) {
        call_join(&k[i]);
        tapi_assert_problem(&k[i].r, 503, NULL);
        call_free(&k[i]);
    }
    if (!slow_env() && stop_ms > 3000)
        fail_msg("stopping with two waiters took %lld ms", stop_ms);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);

    assert_int_equal(tdaemon_restart(&d), 0);
    optd_client_free(c);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    double got[2];
    long long step;
    get_params64(c, "shut", got, 2, &step);
    assert_int_equal(step, 0);
    assert_memory_equal(got, init, sizeof got);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* An open round keeps its session in memory: with a 1 MiB cache and other
 * sessions stepped meanwhile, the waiter's gradient is still there when
 * the round closes. */
enum { CACHE_N = 200000 }; /* 800 KB of float32 params: one such session fills the cache */

static void test_sync_round_survives_cache_pressure(void **state)
{
    (void)state;
    static tdaemon d;
    const char *args[] = {"--cache-mb", "1", NULL};
    own_daemon_start(&d, args);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    char cfg[256];
    snprintf(cfg, sizeof cfg,
             "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"size\":%d,\"init\":{\"type\":"
             "\"zeros\"},\"mode\":{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":60000}}",
             CACHE_N);
    tapi_create(c, "round", cfg, 201);
    snprintf(cfg, sizeof cfg,
             "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"size\":%d,\"init\":{\"type\":"
             "\"zeros\"}}",
             CACHE_N);
    tapi_create(c, "other-0", cfg, 201);
    tapi_create(c, "other-1", cfg, 201);

    float *ga = calloc(CACHE_N, sizeof(float)), *gb = calloc(CACHE_N, sizeof(float));
    float *p = malloc(CACHE_N * sizeof(float));
    assert_true(ga && gb && p);
    for (int j = 0; j < CACHE_N; j++) {
        ga[j] = (float)(j % 7);
        gb[j] = 1.0f;
    }
    /* a parks with its gradient, on a thread (binary body). */
    static call k;
    memset(&k, 0, sizeof k);
    snprintf(k.url, sizeof k.url, "%s", tdaemon_url(&d));
    snprintf(k.path, sizeof k.path, "/v1/sessions/round/step?params=false");
    k.body = malloc(CACHE_N * sizeof(float));
    assert_non_null(k.body);
    memcpy(k.body, ga, CACHE_N * sizeof(float));
    k.len = CACHE_N * sizeof(float);
    k.hdrs[0] = "Content-Type: application/octet-stream";
    k.hdrs[1] = "Optd-Worker: a";
    k.hdrs[2] = "Optd-Base-Step: 0";
    k.timeout_ms = 60000;
    call_start(&k);
    call_wait_started(&k);
    planted_failure(__func__);
    sleep_ms(settle_ms());
    /* Pressure: the other sessions are loaded and stepped in turn. */
    for (int i = 0; i < 6; i++) {
        optd_error e;
        long long st;
        if (optd_step_f32(c, i % 2 ? "other-1" : "other-0", gb, CACHE_N, NULL, NULL, &st, &e))
            fail_msg("step on other-%d: %d %s", i % 2, e.status, e.detail);
        if (optd_get_params_f32(c, i % 2 ? "other-0" : "other-1", p, CACHE_N, &st, &e))
            fail_msg("params of other: %d %s", e.status, e.detail);
    }
    assert_false(call_finished(&k));
    optd_step_opts o = optd_step_opts_default();
    o.worker = "b";
    o.base_step = 0;
    long long step = -1;
    optd_error e;
    if (optd_step_f32_opts(c, "round", gb, CACHE_N, NULL, &o, p, &step, NULL, &e) != 0)
        fail_msg("b's step: %d %s", e.status, e.detail);
    assert_int_equal(step, 1);
    for (int j = 0; j < CACHE_N; j++) {
        float want = -0.5f * ((ga[j] + gb[j]) / 2.0f);
        if (p[j] != want)
            fail_msg("param %d is %.9g, expected %.9g: a's gradient was lost", j, (double)p[j],
                     (double)want);
    }
    call_join(&k);
    assert_int_equal(k.r.status, 200);
    assert_int_equal(header_ll(&k.r, "Optd-Round-Size"), 2);
    call_free(&k);
    free(ga);
    free(gb);
    free(p);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

/* A step that comes in on an open keep-alive connection after the round's
 * waiters were answered 503 -- while the daemon is still stopping -- must
 * not be parked (nothing would ever resume it): it gets an answer or a
 * closed connection, and the daemon still exits cleanly. */
typedef struct {
    tdaemon *d;
    int rc;
} stopper;

static void *stop_main(void *arg)
{
    stopper *st = arg;
    st->rc = tdaemon_stop(st->d);
    return NULL;
}

static void test_sync_shutdown_late_arrival(void **state)
{
    (void)state;
    static tdaemon d;
    own_daemon_start(&d, NULL);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    double init[2] = {1, 2}, g[2] = {1, 1};
    create_session(c, "late", SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":3,\"timeout_ms\":60000}");
    /* The late worker's connection is open before the stop begins. */
    optd_client *late = tapi_client(tdaemon_url(&d), NULL, false);
    optd_client_set_timeouts(late, 5000, 15000);
    optd_response r = tapi_req(late, "GET", "/v1/sessions/late", NULL, NULL);
    assert_int_equal(r.status, 200);
    optd_response_free(&r);

    static call k;
    call_step(&k, tdaemon_url(&d), "late", g, 2, "a", 0, NULL);
    call_wait_started(&k);
    planted_failure(__func__);
    sleep_ms(settle_ms());
    static stopper st;
    st = (stopper){.d = &d, .rc = -2};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, stop_main, &st), 0);
    live_thread_add(th);
    while (!call_finished(&k))
        sleep_ms(1);
    /* Right after a's 503: b's gradient, on the open connection. */
    static call lk;
    call_prepare(&lk, "", "late", g, 2, "b", 0, NULL);
    long long t0 = tapi_now_ms();
    optd_error e;
    int rc = optd_request_err(late, "POST", lk.path, lk.hdrs, lk.body, lk.len, &r, &e);
    long long late_ms = tapi_now_ms() - t0;
    free(lk.body);
    pthread_join(th, NULL);
    live_thread_remove(th);
    call_join(&k);
    tapi_assert_problem(&k.r, 503, NULL);
    call_free(&k);
    fprintf(stderr, "late step during the stop: %s %d after %lld ms; daemon exit %d\n",
            rc == 0 ? "answered" : "no answer", rc == 0 ? r.status : e.status, late_ms, st.rc);
    if (rc == 0) {
        if (r.status != 503)
            fail_msg("a step during the stop was answered %d: %.*s", r.status, (int)r.len,
                     r.body);
        optd_response_free(&r);
    }
    if (st.rc != 0) {
        tdaemon_dump_log(&d);
        fail_msg("the daemon did not exit cleanly (%d) after a step came in during the stop",
                 st.rc);
    }
    if (!slow_env() && late_ms > 3000)
        fail_msg("the late step hung for %lld ms", late_ms);
    optd_client_free(late);
    optd_client_free(c);
    tdaemon_cleanup(&d);
}

/* 64 parked requests hold no HTTP thread: another session answers within
 * a second while they wait; the 65th worker closes the round for all. */
enum { WIDE = 64 };

static void test_sync_64_waiters(void **state)
{
    suite *s = *state;
    char name[64], other[64];
    fresh_name(name, sizeof name, "wide");
    fresh_name(other, sizeof other, "bystander");
    double init[2] = {100, -100};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":65,\"timeout_ms\":60000}");
    create_session(s->c, other, SGD_HALF, "float64", init, 2, NULL);

    static call k[WIDE];
    char wn[16];
    for (int w = 0; w < WIDE; w++) {
        double g[2] = {w, -2.0 * w};
        snprintf(wn, sizeof wn, "w%d", w);
        call_step(&k[w], tdaemon_url(&s->d), name, g, 2, wn, 0, NULL);
    }
    for (int w = 0; w < WIDE; w++)
        call_wait_started(&k[w]);
    sleep_ms(2 * settle_ms());

    char path[192];
    snprintf(path, sizeof path, "/v1/sessions/%s", other);
    long long t0 = tapi_now_ms();
    optd_response r = tapi_req(s->c, "GET", path, NULL, NULL);
    long long get_ms = tapi_now_ms() - t0;
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    /* and a step on the other session */
    double g1[2] = {1, 1};
    t0 = tapi_now_ms();
    r = step_now(s->c, other, g1, 2, NULL, -1, NULL);
    long long step_ms = tapi_now_ms() - t0;
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    /* The session of the open round itself is not locked by its waiters. */
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    t0 = tapi_now_ms();
    r = tapi_req(s->c, "GET", path, NULL, NULL);
    long long own_ms = tapi_now_ms() - t0;
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    if (!slow_env() && (get_ms > 1000 || step_ms > 1000 || own_ms > 1000))
        fail_msg("with %d parked requests a GET took %lld ms, a step %lld ms and a GET of "
                 "their session %lld ms",
                 WIDE, get_ms, step_ms, own_ms);
    for (int w = 0; w < WIDE; w++)
        if (call_finished(&k[w]))
            fail_msg("worker w%d was answered before the round was full (status %d)", w,
                     k[w].r.status);

    double g65[2] = {64, -128};
    r = step_now(s->c, name, g65, 2, "w64", 0, NULL);
    /* mean of w = 0..64 is 32: init - 0.5 * (32, -64) */
    double want[2] = {84, -68};
    assert_round_answer(&r, 1, 65, want, 2);
    optd_response_free(&r);
    for (int w = 0; w < WIDE; w++) {
        call_join(&k[w]);
        assert_round_answer(&k[w].r, 1, 65, want, 2);
        call_free(&k[w]);
    }
    fprintf(stderr, "64 parked: GET %lld ms, step %lld ms\n", get_ms, step_ms);
}

/* Sync with accumulate 2: the first round's answer is a 202 (pending),
 * the second applies the mean of both round means. */
static void test_sync_accumulate(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "sync-accum");
    double init[2] = {1, 2}, ga[2] = {1, 0}, gb[2] = {3, 2}, gc[2] = {0, 2}, gd[2] = {0, 0};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":20000,\"accumulate\":2}");
    static call k;
    call_step(&k, tdaemon_url(&s->d), name, ga, 2, "a", 0, NULL);
    optd_response r = step_now(s->c, name, gb, 2, "b", 0, NULL);
    call_join(&k);
    const optd_response *both[2] = {&r, &k.r};
    for (int i = 0; i < 2; i++) {
        if (both[i]->status != 202)
            fail_msg("first round of an accumulate-2 session: %d %.*s (want 202)",
                     both[i]->status, (int)both[i]->len, both[i]->body);
        assert_int_equal(header_ll(both[i], "Optd-Step"), 0);
        assert_int_equal(header_ll(both[i], "Optd-Round-Size"), 2);
        /* The contract's 202: the pending count is told. */
        assert_int_equal(header_ll(both[i], "Optd-Pending"), 1);
    }
    optd_response_free(&r);
    call_free(&k);
    call_step(&k, tdaemon_url(&s->d), name, gc, 2, "a", 0, NULL);
    r = step_now(s->c, name, gd, 2, "b", 0, NULL);
    /* means (2, 1) and (0, 1): their mean (1, 1) */
    double want[2] = {0.5, 1.5};
    assert_round_answer(&r, 1, 2, want, 2);
    optd_response_free(&r);
    call_join(&k);
    assert_round_answer(&k.r, 1, 2, want, 2);
    call_free(&k);
}

/* ------------------------------------------------------------- async */

/* Serially, with every age from 0 to 4 against max_staleness 2: exactly
 * the steps older than 2 are refused (409 with the step), counted, and
 * change nothing. */
static void test_async_max_staleness(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "stale");
    double init[2] = {1, 2}, g[2] = {0.25, 0.5};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"async\",\"max_staleness\":2}");
    long long step = 0;
    int rejected = 0, applied = 0;
    double p[2] = {1, 2};
    for (int i = 0; i < 4; i++) { /* reach step 4 */
        optd_response r = step_now(s->c, name, g, 2, NULL, step, NULL);
        assert_int_equal(r.status, 200);
        optd_response_free(&r);
        step++;
        applied++;
        p[0] -= 0.5 * g[0];
        p[1] -= 0.5 * g[1];
    }
    const int ages[] = {0, 3, 1, 4, 2, 3, 0, 2};
    for (size_t i = 0; i < sizeof ages / sizeof ages[0]; i++) {
        tapi_snap before = tapi_snapshot(s->c, name);
        optd_response r = step_now(s->c, name, g, 2, "w", step - ages[i], NULL);
        if (ages[i] > 2) {
            tapi_assert_problem(&r, 409, "base_step");
            assert_int_equal(problem_step(&r), step);
            tapi_snap after = tapi_snapshot(s->c, name);
            tapi_assert_same(&before, &after);
            tapi_snap_free(&after);
            rejected++;
        } else {
            if (r.status != 200)
                fail_msg("age %d (max_staleness 2): %d %.*s", ages[i], r.status, (int)r.len,
                         r.body);
            step++;
            applied++;
            p[0] -= 0.5 * g[0];
            p[1] -= 0.5 * g[1];
            assert_int_equal(header_ll(&r, "Optd-Step"), step);
        }
        tapi_snap_free(&before);
        optd_response_free(&r);
    }
    /* Ahead of the session: refused, but not stale. */
    optd_response r = step_now(s->c, name, g, 2, NULL, step + 1, NULL);
    tapi_assert_problem(&r, 409, "base_step");
    assert_int_equal(problem_step(&r), step);
    optd_response_free(&r);

    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "rejected_stale"), rejected);
    assert_int_equal(counter(j, "applied"), applied);
    assert_int_equal((long long)tapi_num(j, "step"), step);
    cJSON_Delete(j);
    double got[2];
    get_params64(s->c, name, got, 2, &step);
    assert_memory_equal(got, p, sizeof p);
}

/* Four threads pull, think, and push with the step they pulled: every
 * 200 was at most max_staleness old when applied, every 409 more, and
 * the counters match the answers one for one. */
enum { ST_THREADS = 4, ST_STEPS = 60 };

typedef struct {
    const char *url, *session;
    int id;
    int ok, stale, other;
    char why[256];
} stale_worker;

static void *stale_main(void *arg)
{
    stale_worker *w = arg;
    optd_client *c = optd_client_new(w->url, NULL);
    if (!c) {
        w->other++;
        return NULL;
    }
    optd_client_set_retry(c, 1, 0, 0);
    unsigned seed = (unsigned)w->id * 7919u + 1;
    for (int i = 0; i < ST_STEPS; i++) {
        double p[4], g[4];
        long long base;
        optd_error e;
        if (optd_get_params_f64(c, w->session, p, 4, &base, &e) != 0) {
            w->other++;
            snprintf(w->why, sizeof w->why, "get: %d %.160s", e.status, e.detail);
            break;
        }
        for (int j = 0; j < 4; j++)
            g[j] = 0.01 * (p[j] - w->id);
        sleep_ms(rand_r(&seed) % 3);
        optd_step_opts o = optd_step_opts_default();
        o.base_step = base;
        long long st = -1;
        int rc = optd_step_f64_opts(c, w->session, g, 4, NULL, &o, NULL, &st, NULL, &e);
        if (rc == 0 && st - 1 - base >= 0 && st - 1 - base <= 1) {
            w->ok++;
        } else if (rc != 0 && e.status == 409 && e.step - base > 1) {
            w->stale++;
        } else {
            w->other++;
            snprintf(w->why, sizeof w->why, "base %lld: rc %d status %d step %lld / %lld %.120s",
                     base, rc, e.status, st, e.step, e.detail);
        }
    }
    optd_client_free(c);
    return NULL;
}

static void test_async_staleness_concurrent(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "stale-threads");
    double init[4] = {1, 2, 3, 4};
    create_session(s->c, name, "{\"type\":\"sgd\",\"lr\":0.1}", "float64", init, 4,
                   "{\"type\":\"async\",\"max_staleness\":1}");
    pthread_t th[ST_THREADS];
    static stale_worker w[ST_THREADS];
    for (int t = 0; t < ST_THREADS; t++) {
        w[t] = (stale_worker){.url = tdaemon_url(&s->d), .session = name, .id = t};
        assert_int_equal(pthread_create(&th[t], NULL, stale_main, &w[t]), 0);
        live_thread_add(th[t]);
    }
    planted_failure(__func__);
    for (int t = 0; t < ST_THREADS; t++) {
        pthread_join(th[t], NULL);
        live_thread_remove(th[t]);
    }
    int ok = 0, stale = 0;
    for (int t = 0; t < ST_THREADS; t++) {
        if (w[t].other)
            fail_msg("thread %d: %d unexpected answers; %s", t, w[t].other, w[t].why);
        ok += w[t].ok;
        stale += w[t].stale;
    }
    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "rejected_stale"), stale);
    assert_int_equal(counter(j, "applied"), ok);
    assert_int_equal((long long)tapi_num(j, "step"), ok);
    cJSON_Delete(j);
    fprintf(stderr, "max_staleness 1, %d threads: %d applied, %d stale\n", ST_THREADS, ok,
            stale);
}

/* stale_policy damp: an update of age a uses lr / (1 + a), and says so. */
static void test_async_damp(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "damp");
    double p[2] = {1, 2}, g[2] = {0.75, -0.5};
    create_session(s->c, name, SGD_HALF, "float64", p, 2,
                   "{\"type\":\"async\",\"max_staleness\":3,\"stale_policy\":\"damp\"}");
    long long step = 0;
    const int ages[] = {0, 0, 0, 3, 2, 1, 0, 4};
    for (size_t i = 0; i < sizeof ages / sizeof ages[0]; i++) {
        long long base = step - ages[i];
        if (base < 0)
            continue;
        optd_response r = step_now(s->c, name, g, 2, NULL, base, NULL);
        if (ages[i] > 3) {
            tapi_assert_problem(&r, 409, "base_step");
            optd_response_free(&r);
            continue;
        }
        assert_int_equal(r.status, 200);
        double lr = 0.5 * (1.0 / (1.0 + ages[i]));
        step++;
        for (int j = 0; j < 2; j++)
            p[j] += -lr * g[j];
        cJSON *jr = tapi_json(&r);
        double got_lr = tapi_num(jr, "lr");
        if (got_lr != lr)
            fail_msg("age %d: the answer's lr is %.17g, expected 0.5 / %d = %.17g", ages[i],
                     got_lr, 1 + ages[i], lr);
        const cJSON *pa = cJSON_GetObjectItemCaseSensitive(jr, "params");
        assert_true(cJSON_IsArray(pa));
        double got[2] = {cJSON_GetArrayItem(pa, 0)->valuedouble,
                         cJSON_GetArrayItem(pa, 1)->valuedouble};
        assert_params64("damped params", got, p, 2, 1e-15);
        assert_int_equal((long long)tapi_num(jr, "step"), step);
        cJSON_Delete(jr);
        const char *hl = optd_response_header(&r, "Optd-Lr");
        assert_non_null(hl);
        assert_true(strtod(hl, NULL) == lr);
        optd_response_free(&r);
    }
    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "rejected_stale"), 1);
    assert_int_equal((long long)tapi_num(j, "step"), step);
    cJSON_Delete(j);
}

/* accumulate 3: 202 with Optd-Pending for the first two gradients, the
 * mean applied with the third; a crash between acknowledged 202s and the
 * third keeps them. */
static void expect_pending(const optd_response *r, long long pending, long long step)
{
    if (r->status != 202)
        fail_msg("expected 202 (pending %lld), got %d: %.*s", pending, r->status, (int)r->len,
                 r->body);
    assert_int_equal(header_ll(r, "Optd-Pending"), pending);
    assert_int_equal(header_ll(r, "Optd-Step"), step);
}

static void test_async_accumulate_survives_crash(void **state)
{
    (void)state;
    static tdaemon d;
    own_daemon_start(&d, NULL);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    double init[2] = {1, 2};
    const double g[6][2] = {{1, 0}, {0, 1}, {2, 2}, {4, 0}, {0, 4}, {-1, 2}};
    create_session(c, "accum", SGD_HALF, "float64", init, 2,
                   "{\"type\":\"async\",\"accumulate\":3}");
    optd_response r = step_now(c, "accum", g[0], 2, NULL, -1, "acc-0");
    expect_pending(&r, 1, 0);
    optd_response_free(&r);
    r = step_now(c, "accum", g[1], 2, NULL, -1, "acc-1");
    expect_pending(&r, 2, 0);
    optd_response_free(&r);

    assert_int_equal(tdaemon_kill9(&d), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    optd_client_free(c);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    cJSON *j = get_session(c, "accum");
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "state");
    assert_int_equal((long long)tapi_num(st, "pending_accumulation"), 2);
    assert_int_equal((long long)tapi_num(j, "step"), 0);
    cJSON_Delete(j);

    r = step_now(c, "accum", g[2], 2, NULL, -1, "acc-2");
    double want1[2] = {0.5, 1.5}; /* init - 0.5 * mean(1,0 0,1 2,2) */
    assert_int_equal(r.status, 200);
    assert_int_equal(header_ll(&r, "Optd-Step"), 1);
    assert_null(optd_response_header(&r, "Optd-Pending"));
    optd_response_free(&r);
    double got[2];
    long long step;
    get_params64(c, "accum", got, 2, &step);
    assert_int_equal(step, 1);
    assert_memory_equal(got, want1, sizeof got);

    /* Every third from now on. */
    r = step_now(c, "accum", g[3], 2, NULL, -1, NULL);
    expect_pending(&r, 1, 1);
    optd_response_free(&r);
    r = step_now(c, "accum", g[4], 2, NULL, -1, NULL);
    expect_pending(&r, 2, 1);
    optd_response_free(&r);
    r = step_now(c, "accum", g[5], 2, NULL, -1, NULL);
    assert_int_equal(r.status, 200);
    assert_int_equal(header_ll(&r, "Optd-Step"), 2);
    optd_response_free(&r);
    double want2[2] = {0, 0.5}; /* want1 - 0.5 * mean(4,0 0,4 -1,2) = want1 - 0.5 * (1, 2) */
    get_params64(c, "accum", got, 2, &step);
    assert_int_equal(step, 2);
    assert_memory_equal(got, want2, sizeof got);

    /* A crash after the update: replay gives the same bits. */
    assert_int_equal(tdaemon_kill9(&d), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    optd_client_free(c);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    get_params64(c, "accum", got, 2, &step);
    assert_int_equal(step, 2);
    assert_memory_equal(got, want2, sizeof got);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

/* The retry of an acknowledged 202 whose answer was lost: a replay that
 * adds nothing, and -- the gradient being still pending -- a 202 again,
 * not a 200 that a client would take for "applied". */
static void test_async_replay_of_pending(void **state)
{
    suite *s = *state;
    char name[64];
    fresh_name(name, sizeof name, "accum-replay");
    double init[2] = {1, 2}, g[2] = {1, 1};
    create_session(s->c, name, SGD_HALF, "float64", init, 2,
                   "{\"type\":\"async\",\"accumulate\":3}");
    optd_response r = step_now(s->c, name, g, 2, NULL, -1, "pending-0");
    expect_pending(&r, 1, 0);
    optd_response_free(&r);
    r = step_now(s->c, name, g, 2, NULL, -1, "pending-0");
    const char *rep = optd_response_header(&r, "Optd-Replayed");
    if (!rep || strcmp(rep, "true") != 0)
        fail_msg("the retry was not a replay: %d %.*s", r.status, (int)r.len, r.body);
    cJSON *j = get_session(s->c, name);
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "state");
    assert_int_equal((long long)tapi_num(st, "pending_accumulation"), 1);
    assert_int_equal((long long)tapi_num(j, "step"), 0);
    cJSON_Delete(j);
    assert_int_equal(header_ll(&r, "Optd-Step"), 0);
    if (r.status != 202)
        fail_msg("the replay of a pending (202) gradient answered %d: %.*s", r.status,
                 (int)r.len, r.body);
    optd_response_free(&r);
}

/* ------------------------------------------------------------ load */

enum { LOAD_WORKERS = 16, LOAD_ROUNDS = 500, LOAD_N = 100 };

/* Gradients on a 2^-10 grid with |g| <= 8: a sum of 16 of them is exact
 * in float32 whatever the order the workers arrive in, and so is the mean
 * (a division by 16), so the daemon's result must equal the serial run
 * bit for bit. */
static void grad32(int w, int r, const void *params, void *g, int n)
{
    const float *p = params;
    float *o = g;
    for (int j = 0; j < n; j++) {
        double pull = (double)p[j] - 0.01 * (double)((w * 31 + j * 7) % 23);
        double x = nearbyint(ldexp(pull, 10)) + (double)((w * 7 + r * 3 + j) % 17 - 8) * 16;
        x = fmax(-8192.0, fmin(8192.0, x));
        o[j] = (float)ldexp(x, -10);
    }
}

static void test_sync_load(void **state)
{
    suite *s = *state;
    int rounds = slow_env() ? LOAD_ROUNDS / 20 : LOAD_ROUNDS;
    char name[64];
    fresh_name(name, sizeof name, "load");
    double init[LOAD_N];
    for (int j = 0; j < LOAD_N; j++)
        init[j] = ldexp((double)((j * 37) % 101) - 50.0, -6);
    create_session(s->c, name, "{\"type\":\"sgd\",\"lr\":0.01,\"momentum\":0.9}", "float32",
                   init, LOAD_N, "{\"type\":\"sync\",\"workers\":16,\"timeout_ms\":30000}");

    proc_run pr = {.url = tdaemon_url(&s->d), .session = name, .workers = LOAD_WORKERS,
                   .rounds = rounds, .n = LOAD_N, .f64 = false, .grad = grad32};
    long long ms = run_workers(&pr, slow_env() ? 1200000 : 60000);
    assert_rounds_agree(&pr);

    /* The serial run, written from torch.optim.SGD's rule in float32 (not
     * with optd's kernels): buf = g on the first update, then
     * buf = buf * momentum + g; p = p + (-lr) * buf, every operation
     * rounded to float. */
    const float momentum = 0.9f, neg_lr = -0.01f;
    float p[LOAD_N], g[LOAD_N], sum[LOAD_N], buf[LOAD_N] = {0};
    for (int j = 0; j < LOAD_N; j++)
        p[j] = (float)init[j];
    for (int r = 0; r < rounds; r++) {
        memset(sum, 0, sizeof sum);
        for (int w = 0; w < LOAD_WORKERS; w++) {
            grad32(w, r, p, g, LOAD_N);
            for (int j = 0; j < LOAD_N; j++)
                sum[j] += g[j];
        }
        for (int j = 0; j < LOAD_N; j++) {
            sum[j] /= (float)LOAD_WORKERS;
            float prod = buf[j] * momentum;
            buf[j] = r == 0 ? sum[j] : prod + sum[j];
            float step_j = neg_lr * buf[j];
            p[j] = p[j] + step_j;
        }
        if (pr.rec[r].sum != fnv1a(p, sizeof p))
            fail_msg("round %d: the workers' params differ from the serial run's", r);
    }
    float got[LOAD_N];
    long long step;
    optd_error e;
    assert_int_equal(optd_get_params_f32(s->c, name, got, LOAD_N, &step, &e), 0);
    assert_int_equal(step, rounds);
    assert_memory_equal(got, p, sizeof p);
    for (int w = 0; w < LOAD_WORKERS; w++)
        assert_memory_equal(pr.final + (size_t)w * sizeof p, p, sizeof p);
    cJSON *j = get_session(s->c, name);
    assert_int_equal(counter(j, "applied"), rounds);
    assert_int_equal(counter(j, "timed_out"), 0);
    cJSON_Delete(j);
    free_run(&pr);
    fprintf(stderr, "load: %d workers x %d rounds (%d params, float32) in %lld ms = %.0f "
                    "rounds/s\n",
            LOAD_WORKERS, rounds, LOAD_N, ms, ms ? rounds * 1000.0 / (double)ms : 0.0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_sync_sgd_matches_serial, test_teardown),
        cmocka_unit_test_teardown(test_sync_adam_matches_serial, test_teardown),
        cmocka_unit_test_teardown(test_sync_timeout_fail, test_teardown),
        cmocka_unit_test_teardown(test_sync_timeout_apply, test_teardown),
        cmocka_unit_test_teardown(test_sync_reduce_sum_and_worker_id, test_teardown),
        cmocka_unit_test_teardown(test_sync_duplicate_worker, test_teardown),
        cmocka_unit_test_teardown(test_sync_wrong_round, test_teardown),
        cmocka_unit_test_teardown(test_sync_killed_waiter, test_teardown),
        cmocka_unit_test_teardown(test_sync_patch_delete_drop_round, test_teardown),
        cmocka_unit_test_teardown(test_sync_64_waiters, test_teardown),
        cmocka_unit_test_teardown(test_sync_accumulate, test_teardown),
        cmocka_unit_test_teardown(test_async_max_staleness, test_teardown),
        cmocka_unit_test_teardown(test_async_staleness_concurrent, test_teardown),
        cmocka_unit_test_teardown(test_async_damp, test_teardown),
        cmocka_unit_test_teardown(test_async_replay_of_pending, test_teardown),
        cmocka_unit_test_teardown(test_sync_load, test_teardown),
        cmocka_unit_test_teardown(test_sync_round_survives_cache_pressure, test_teardown),
        cmocka_unit_test_teardown(test_sync_shutdown_answers_503, test_teardown),
        cmocka_unit_test_teardown(test_sync_shutdown_late_arrival, test_teardown),
        cmocka_unit_test_teardown(test_async_accumulate_survives_crash, test_teardown),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
