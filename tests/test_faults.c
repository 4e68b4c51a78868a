/*
 * test_faults.c -- the daemon under injected faults, end to end.
 *
 * A realistic scenario (two creates, steps with idempotency keys, a PATCH
 * that checkpoints, synchronous rounds of two workers, a restart) runs
 * against a real daemon started with OPTD_FAULT=any:N:EIO (the Nth file
 * operation of each daemon process fails once), and again with
 * OPTD_FAULT=write:N:ENOSPC:persist (a disk that fills up at the Nth write;
 * the space comes back with a restart without the fault), for every N the
 * scenario reaches (OPTD_FAULT_STRIDE: every Kth N; `make faults` runs
 * them all).  At every N:
 *   - each answer is a success or a clean 5xx problem+json: never a hang,
 *     a crash, or another status; a failed request succeeds when retried
 *     once the fault is spent (or the space is back);
 *   - every acknowledged answer carries exactly the params of a local
 *     replay of the acknowledged steps through the optim/ kernels, and its
 *     Optd-Params-Crc32 is their CRC-32;
 *   - after the faults stop: PRAGMA integrity_check is ok, `optd check`
 *     exits 0, and a restarted daemon serves what was acknowledged (params
 *     and steps) and takes new steps.
 * With OPTD_FAULT_COUNT_SYNCS=1 and --durability full, every acknowledged
 * write was synced before its answer was made (the Optd-Fault-Counts
 * header carries the daemon's counters as they were when the answer was
 * made).  An Idempotency-Key reused with a different request is 422; the
 * params digest is the CRC-32 of the params in the session's dtype whatever
 * the answer's form.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

#define NP 64          /* params per session                          */
#define A_STEPS 10     /* steps on the async session                   */
#define B_ROUNDS 2     /* synchronous rounds on the sync session       */
#define ATTEMPTS 4     /* tries of one request before giving up       */
#define OP_MARGIN 25   /* operations after the last answer (shutdown)  */

static const char BIN[] = "Content-Type: application/octet-stream";
static const char ACC[] = "Accept: application/octet-stream";

/* ------------------------------------------------------------ the model */

/* What the daemon must hold: a local replay of the acknowledged requests
 * through the optim/ kernels. */
typedef struct {
    optim_hparams hp;
    optim_state st;
    void *buf[OPTIM_MAX_BUFFERS];
    float p[NP];
} model_session;

static void model_init(model_session *m, double lr, double momentum, float p0)
{
    memset(m, 0, sizeof *m);
    optim_hparams_default(OPTIM_SGD, &m->hp);
    m->hp.lr = lr;
    m->hp.momentum = momentum;
    optim_state_init(&m->hp, &m->st);
    unsigned need = optim_buffers_needed(&m->hp);
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (need & (1u << i)) {
            m->buf[i] = malloc(NP * sizeof(float));
            assert_non_null(m->buf[i]);
            optim_buffer_init(&m->hp, i, OPTIM_F32, m->buf[i], NP);
            m->st.buf[i] = m->buf[i];
        }
    for (int j = 0; j < NP; j++)
        m->p[j] = p0 + 0.01f * (float)j;
}

static void model_free(model_session *m)
{
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(m->buf[i]);
}

static void model_step(model_session *m, const float *g)
{
    optim_step(&m->hp, &m->st, OPTIM_F32, m->p, g, NP);
}

/* Distinct for every step and worker: a step applied twice, or lost,
 * shows in the params. */
static void grad_of(int step, int worker, float *g)
{
    for (int j = 0; j < NP; j++)
        g[j] = (float)(sin(step * 1.7 + j * 0.3 + worker * 0.9) + 0.01 * (step + 1));
}

static void create_body(char *out, size_t n, const char *opt, const char *mode, float p0)
{
    size_t k = (size_t)snprintf(out, n, "{\"optimizer\":%s,%s\"params\":[", opt, mode);
    for (int j = 0; j < NP; j++)
        k += (size_t)snprintf(out + k, n - k, "%s%.9g", j ? "," : "",
                              (double)(p0 + 0.01f * (float)j));
    snprintf(out + k, n - k, "]}");
}

/* ------------------------------------------------------------- one run */

typedef struct {
    tdaemon d;
    bool started;
    optd_client *c;
    const char *const *args;
    char spec[64];       /* OPTD_FAULT while faults are on; "" none   */
    bool persist;        /* the disk-full variant                     */
    bool faults_on;
    int n_ok, n_5xx, space_backs, start_refusals;
    unsigned long long max_ops, max_writes; /* seen in Optd-Fault-Counts */
} frun;

typedef struct {
    unsigned long long reads, writes, syncs, truncates, injected;
    bool present;
} fcounts;

static fcounts counts_of(const optd_response *r)
{
    fcounts c = {0};
    const char *h = optd_response_header(r, "Optd-Fault-Counts");
    if (h && sscanf(h, "reads=%llu writes=%llu syncs=%llu truncates=%llu injected=%llu",
                    &c.reads, &c.writes, &c.syncs, &c.truncates, &c.injected) == 5)
        c.present = true;
    return c;
}

static void faults_env(frun *f, bool on)
{
    f->faults_on = on && f->spec[0];
    if (f->faults_on)
        setenv("OPTD_FAULT", f->spec, 1);
    else
        unsetenv("OPTD_FAULT");
}

static void client_open(frun *f)
{
    f->c = tapi_client(tdaemon_url(&f->d), NULL, false);
    optd_client_set_timeouts(f->c, 5000, 20000);
}

/* Starts (or restarts) the daemon.  Under faults it may refuse to start
 * (a fault while opening the database): that must be a clean exit with a
 * non-zero code; it is then started without faults. */
static void start_daemon(frun *f)
{
    for (;;) {
        int rc = f->started ? tdaemon_restart(&f->d) : tdaemon_start(&f->d, NULL, f->args);
        f->started = true;
        if (rc == 0)
            break;
        int ws = f->d.last_status;
        if (!f->faults_on || !WIFEXITED(ws) || WEXITSTATUS(ws) == 0)
            fail_msg("[%s] the daemon did not start (wait status %d)", f->spec, ws);
        f->start_refusals++;
        faults_env(f, false);
    }
    client_open(f);
}

/* SIGTERM and wait: the daemon must exit by itself (never hang, never die
 * of a signal); with faults on, a non-zero exit (a failed shutdown
 * checkpoint) is allowed. */
static void stop_daemon(frun *f)
{
    optd_client_free(f->c);
    f->c = NULL;
    int rc = tdaemon_stop(&f->d);
    int ws = f->d.last_status;
    if (WIFSIGNALED(ws))
        fail_msg("[%s] the daemon %s (signal %d)", f->spec,
                 WTERMSIG(ws) == SIGKILL ? "hung on SIGTERM" : "crashed", WTERMSIG(ws));
    if (rc != 0 && !f->faults_on)
        fail_msg("[%s] the daemon exited with %d without faults", f->spec, rc);
}

/* The space comes back: a restart without the fault. */
static void space_back(frun *f)
{
    stop_daemon(f);
    faults_env(f, false);
    f->space_backs++;
    start_daemon(f);
}

/* A success, or a clean 5xx problem+json (504 only where allowed). */
static void assert_clean(frun *f, const optd_response *r, const char *what, bool allow_504)
{
    fcounts c = counts_of(r);
    if (c.present) {
        unsigned long long ops = c.reads + c.writes + c.syncs + c.truncates;
        if (ops > f->max_ops)
            f->max_ops = ops;
        if (c.writes > f->max_writes)
            f->max_writes = c.writes;
    }
    if (r->status >= 200 && r->status < 300) {
        f->n_ok++;
        return;
    }
    if (r->status >= 500 && r->status < 600 && (r->status != 504 || allow_504)) {
        f->n_5xx++;
        if (strncmp(r->content_type, "application/problem+json", 24) != 0)
            fail_msg("[%s] %s: %d with Content-Type \"%s\"", f->spec, what, r->status,
                     r->content_type);
        cJSON *j = cJSON_ParseWithLength(r->body, r->len);
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "status");
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
        const cJSON *de = cJSON_GetObjectItemCaseSensitive(j, "detail");
        bool ok = cJSON_IsNumber(st) && st->valueint == r->status && cJSON_IsString(ty) &&
                  strncmp(ty->valuestring, "urn:optd:problem:", 17) == 0 &&
                  cJSON_IsString(de) && de->valuestring[0];
        cJSON_Delete(j);
        if (!ok)
            fail_msg("[%s] %s: %d is not a clean problem: %.*s", f->spec, what, r->status,
                     (int)r->len, r->body);
        return;
    }
    fail_msg("[%s] %s: unexpected %d: %.*s", f->spec, what, r->status,
             (int)(r->len > 400 ? 400 : r->len), r->body);
}

/* One request on client c; an answer must come (no hang, no crash). */
static optd_response send_req(frun *f, optd_client *c, const char *what, const char *method,
                              const char *path, const char *const *hdrs, const void *body,
                              size_t len)
{
    optd_response r;
    optd_error e;
    if (optd_request_err(c, method, path, hdrs, body, len, &r, &e) != 0) {
        int ws = 0;
        bool gone = f->d.pid > 0 && waitpid(f->d.pid, &ws, WNOHANG) == f->d.pid;
        if (gone)
            f->d.pid = 0;
        tdaemon_dump_log(&f->d);
        fail_msg("[%s] %s: no answer (%s)%s", f->spec, what, e.detail,
                 gone ? (WIFSIGNALED(ws) ? ": the daemon crashed" : ": the daemon exited")
                      : ": the daemon hangs");
    }
    return r;
}

/* A write that must be acknowledged in the end: retried while it fails
 * (the fault is spent after one failure; a full disk needs its space
 * back).  Returns the successful answer. */
static optd_response op(frun *f, const char *what, const char *method, const char *path,
                        const char *const *hdrs, const void *body, size_t len)
{
    int fails = 0;
    for (;;) {
        optd_response r = send_req(f, f->c, what, method, path, hdrs, body, len);
        assert_clean(f, &r, what, false);
        if (r.status < 300)
            return r;
        optd_response_free(&r);
        if (++fails < ATTEMPTS)
            continue;
        if (f->faults_on && f->persist) {
            space_back(f);
            fails = 0;
            continue;
        }
        fail_msg("[%s] %s: still failing after %d attempts (the fault is spent%s)", f->spec,
                 what, fails, f->faults_on ? "" : ", faults are off");
    }
}

static long long header_ll(const optd_response *r, const char *name)
{
    const char *h = optd_response_header(r, name);
    if (!h)
        fail_msg("the answer (%d) has no %s", r->status, name);
    return atoll(h);
}

/* An answer that carries params: exactly the model's, with their digest. */
static void assert_params(frun *f, const optd_response *r, const model_session *m,
                          long long step, const char *what)
{
    if (header_ll(r, "Optd-Step") != step)
        fail_msg("[%s] %s: Optd-Step %lld, expected %lld", f->spec, what,
                 header_ll(r, "Optd-Step"), step);
    if (r->len != sizeof m->p || memcmp(r->body, m->p, sizeof m->p) != 0)
        fail_msg("[%s] %s: the params differ from a replay of the acknowledged steps",
                 f->spec, what);
    char want[16];
    snprintf(want, sizeof want, "%08lx",
             (unsigned long)crc32(0, (const Bytef *)m->p, (uInt)sizeof m->p));
    const char *got = optd_response_header(r, "Optd-Params-Crc32");
    if (!got || strcmp(got, want) != 0)
        fail_msg("[%s] %s: Optd-Params-Crc32 %s, expected %s", f->spec, what,
                 got ? got : "(none)", want);
}

/* ------------------------------------------------------- the scenario */

typedef struct {
    model_session a, b;
    int a_steps, b_rounds;
} model;

static void step_a(frun *f, model *m)
{
    int i = ++m->a_steps;
    float g[NP];
    grad_of(i, 0, g);
    char key[64], what[64];
    snprintf(key, sizeof key, "Idempotency-Key: a-%d", i);
    snprintf(what, sizeof what, "step a #%d", i);
    const char *h[] = {BIN, ACC, key, NULL};
    optd_response r = op(f, what, "POST", "/v1/sessions/a/step", h, g, sizeof g);
    model_step(&m->a, g);
    assert_params(f, &r, &m->a, i, what);
    optd_response_free(&r);
}

typedef struct {
    frun *f;
    optd_client *c;
    int round, worker;
    optd_response r;
} worker_arg;

static void *worker_main(void *p)
{
    worker_arg *w = p;
    float g[NP];
    grad_of(100 + w->round, w->worker, g);
    char key[64], wk[64];
    snprintf(key, sizeof key, "Idempotency-Key: b-%d-w%d", w->round, w->worker);
    snprintf(wk, sizeof wk, "Optd-Worker: w%d", w->worker);
    const char *h[] = {BIN, ACC, key, wk, NULL};
    optd_error e;
    for (int k = 0; k < ATTEMPTS; k++) {
        if (optd_request_err(w->c, "POST", "/v1/sessions/b/step", h, g, sizeof g, &w->r, &e) !=
            0) {
            w->r.status = 0;
            return NULL;
        }
        if (w->r.status < 300 || k + 1 == ATTEMPTS ||
            (w->r.status < 500 && w->r.status != 0))
            return NULL;
        optd_response_free(&w->r);
    }
    return NULL;
}

/* One synchronous round of two workers, each on its own connection. */
static void round_b(frun *f, model *m)
{
    int rd = ++m->b_rounds;
    char what[64];
    snprintf(what, sizeof what, "round b #%d", rd);
    for (int tries = 0;; tries++) {
        worker_arg w[2];
        pthread_t t[2];
        for (int k = 0; k < 2; k++) {
            w[k] = (worker_arg){.f = f, .round = rd, .worker = k + 1};
            w[k].c = tapi_client(tdaemon_url(&f->d), NULL, false);
            optd_client_set_timeouts(w[k].c, 5000, 20000);
            assert_int_equal(pthread_create(&t[k], NULL, worker_main, &w[k]), 0);
        }
        for (int k = 0; k < 2; k++)
            pthread_join(t[k], NULL);
        bool ok = true;
        for (int k = 0; k < 2; k++) {
            optd_client_free(w[k].c);
            if (w[k].r.status == 0)
                fail_msg("[%s] %s: worker %d got no answer (hang or crash)", f->spec, what,
                         k + 1);
            assert_clean(f, &w[k].r, what, true);
            ok = ok && w[k].r.status < 300;
        }
        if (ok) {
            float g1[NP], g2[NP], mean[NP];
            grad_of(100 + rd, 1, g1);
            grad_of(100 + rd, 2, g2);
            memset(mean, 0, sizeof mean);
            optim_vec_add(OPTIM_F32, mean, g1, NP);
            optim_vec_add(OPTIM_F32, mean, g2, NP);
            optim_vec_div(OPTIM_F32, mean, NP, 2);
            model_step(&m->b, mean);
            for (int k = 0; k < 2; k++) {
                assert_params(f, &w[k].r, &m->b, rd, what);
                optd_response_free(&w[k].r);
            }
            return;
        }
        for (int k = 0; k < 2; k++)
            optd_response_free(&w[k].r);
        if (f->faults_on && f->persist) {
            space_back(f);
        } else if (tries >= 1) {
            fail_msg("[%s] %s: the round still fails with the fault spent", f->spec, what);
        }
    }
}

static void restart(frun *f)
{
    stop_daemon(f);
    start_daemon(f);
}

static void scenario(frun *f, model *m)
{
    char body[4096];
    create_body(body, sizeof body, "{\"type\":\"sgd\",\"lr\":0.05,\"momentum\":0.9}", "", 0.5f);
    optd_response r = op(f, "create a", "PUT", "/v1/sessions/a", NULL, body, strlen(body));
    optd_response_free(&r);
    create_body(body, sizeof body, "{\"type\":\"sgd\",\"lr\":0.1}",
                "\"mode\":{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":3000},", -0.25f);
    r = op(f, "create b", "PUT", "/v1/sessions/b", NULL, body, strlen(body));
    optd_response_free(&r);
    for (int i = 0; i < 4; i++)
        step_a(f, m);
    /* A PATCH writes a checkpoint with the new config. */
    const char *patch = "{\"optimizer\":{\"lr\":0.02}}";
    r = op(f, "PATCH a", "PATCH", "/v1/sessions/a", NULL, patch, strlen(patch));
    optd_response_free(&r);
    m->a.hp.lr = 0.02;
    round_b(f, m);
    for (int i = 0; i < 4; i++)
        step_a(f, m);
    restart(f);
    round_b(f, m);
    step_a(f, m);
    step_a(f, m);
    const char *h[] = {ACC, NULL};
    r = op(f, "GET params a", "GET", "/v1/sessions/a/params", h, NULL, 0);
    assert_params(f, &r, &m->a, m->a_steps, "GET params a");
    optd_response_free(&r);
}

static int run_optd_check(const char *db)
{
    const char *bin = getenv("OPTD_BIN");
    assert_non_null(bin);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "'%s' check --db '%s' >/dev/null", bin, db);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* After the faults: the file is whole, and a clean daemon serves exactly
 * what was acknowledged and takes new steps. */
static void verify_after(frun *f, model *m)
{
    stop_daemon(f);
    faults_env(f, false);
    if (tapi_integrity_check(tdaemon_db(&f->d)) != 0)
        fail_msg("[%s] integrity_check failed", f->spec);
    if (run_optd_check(tdaemon_db(&f->d)) != 0)
        fail_msg("[%s] optd check failed", f->spec);
    start_daemon(f);
    const char *h[] = {ACC, NULL};
    optd_response r = send_req(f, f->c, "GET params a", "GET", "/v1/sessions/a/params", h,
                               NULL, 0);
    assert_int_equal(r.status, 200);
    assert_params(f, &r, &m->a, m->a_steps, "after the faults: a");
    optd_response_free(&r);
    r = send_req(f, f->c, "GET params b", "GET", "/v1/sessions/b/params", h, NULL, 0);
    assert_int_equal(r.status, 200);
    assert_params(f, &r, &m->b, m->b_rounds, "after the faults: b");
    optd_response_free(&r);
    step_a(f, m); /* it serves again */
    stop_daemon(f);
}

static void one_run(const char *spec, bool persist, frun *out)
{
    frun f = {.persist = persist};
    static const char *const args[] = {NULL};
    f.args = args;
    snprintf(f.spec, sizeof f.spec, "%s", spec ? spec : "");
    model m = {0};
    model_init(&m.a, 0.05, 0.9, 0.5f);
    model_init(&m.b, 0.1, 0.0, -0.25f);
    faults_env(&f, true);
    start_daemon(&f);
    scenario(&f, &m);
    verify_after(&f, &m);
    tdaemon_cleanup(&f.d);
    model_free(&m.a);
    model_free(&m.b);
    unsetenv("OPTD_FAULT");
    if (out)
        *out = f;
}

static int stride(void)
{
    const char *s = getenv("OPTD_FAULT_STRIDE");
    int k = s ? atoi(s) : 7;
    return k > 0 ? k : 1;
}

/* How many operations one daemon process of the scenario makes. */
static void count_ops(unsigned long long *ops, unsigned long long *writes)
{
    setenv("OPTD_FAULT_COUNT_SYNCS", "1", 1);
    frun f;
    one_run(NULL, false, &f);
    unsetenv("OPTD_FAULT_COUNT_SYNCS");
    assert_true(f.max_ops > 0);
    *ops = f.max_ops + OP_MARGIN;
    *writes = f.max_writes + OP_MARGIN;
}

static void fault_loop(const char *op, const char *err, bool persist)
{
    unsigned long long ops, writes;
    count_ops(&ops, &writes);
    unsigned long long top = persist ? writes : ops;
    int k = stride(), runs = 0, with_5xx = 0, refusals = 0, backs = 0;
    long long t0 = tapi_now_ms();
    for (unsigned long long n = 1; n <= top; n += (unsigned long long)k) {
        char spec[64];
        snprintf(spec, sizeof spec, "%s:%llu:%s%s", op, n, err, persist ? ":persist" : "");
        frun f;
        one_run(spec, persist, &f);
        runs++;
        with_5xx += f.n_5xx > 0;
        refusals += f.start_refusals;
        backs += f.space_backs;
    }
    printf("fault loop %s:N:%s%s: N = 1..%llu every %d: %d runs, %d with 5xx answers, %d "
           "refused starts, %d restarts with space back, %lld ms\n",
           op, err, persist ? ":persist" : "", top, k, runs, with_5xx, refusals, backs,
           tapi_now_ms() - t0);
    assert_true(with_5xx > 0); /* the faults did reach the answers */
}

static void test_fault_loop_eio(void **state)
{
    (void)state;
    fault_loop("any", "EIO", false);
}

static void test_fault_loop_disk_full(void **state)
{
    (void)state;
    fault_loop("write", "ENOSPC", true);
}

/* ------------------------------------------------------- sync proof */

typedef struct {
    frun *f;
    unsigned long long last; /* syncs counted when the last ack was made */
    int acked;
} syncs_seen;

/* A write that must be acknowledged with status; its answer must have been
 * made after at least one more sync than the previous acknowledged one. */
static void acked_write(syncs_seen *s, const char *what, const char *method, const char *path,
                        const char *const *hdrs, const void *body, size_t len, int status)
{
    optd_response r = send_req(s->f, s->f->c, what, method, path, hdrs, body, len);
    if (r.status != status)
        fail_msg("%s: expected %d, got %d: %.*s", what, status, r.status, (int)r.len, r.body);
    fcounts c = counts_of(&r);
    if (!c.present)
        fail_msg("%s: no Optd-Fault-Counts with OPTD_FAULT_COUNT_SYNCS=1", what);
    if (c.syncs <= s->last)
        fail_msg("%s was acknowledged without a sync under --durability full (syncs %llu "
                 "before, %llu when the answer was made)", what, s->last, c.syncs);
    s->last = c.syncs;
    s->acked++;
    optd_response_free(&r);
}

typedef struct {
    const char *url;
    int status;
} parked_arg;

static void *parked_worker(void *p)
{
    parked_arg *a = p;
    optd_client *c = tapi_client(a->url, NULL, false);
    float g[NP];
    grad_of(7, 1, g);
    const char *h[] = {BIN, "Optd-Worker: w1", "Idempotency-Key: r-w1", NULL};
    optd_response r;
    a->status = optd_request(c, "POST", "/v1/sessions/sy/step", h, g, sizeof g, &r) == 0
                    ? r.status
                    : 0;
    if (a->status)
        optd_response_free(&r);
    optd_client_free(c);
    return NULL;
}

/* Waits until the sync session's open round has received n gradients. */
static void wait_round(frun *f, const char *name, int n)
{
    char path[128];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    for (int i = 0; i < 500; i++) {
        optd_response r = send_req(f, f->c, "GET session", "GET", path, NULL, NULL, 0);
        cJSON *j = tapi_json(&r);
        const cJSON *round = cJSON_GetObjectItemCaseSensitive(j, "round");
        const cJSON *rec = cJSON_GetObjectItemCaseSensitive(round, "received");
        bool there = cJSON_IsNumber(rec) && rec->valueint == n;
        cJSON_Delete(j);
        optd_response_free(&r);
        if (there)
            return;
        usleep(10000);
    }
    fail_msg("the round of %s never received %d gradients", name, n);
}

/* Under --durability full every acknowledged write (create, steps with
 * and without keys, a vector stored in a file, PATCH, PUT params, a
 * synchronous round, DELETE) was synced before its answer was made. */
static void test_full_syncs_before_ack(void **state)
{
    (void)state;
    setenv("OPTD_FAULT_COUNT_SYNCS", "1", 1);
    static const char *const args[] = {"--durability", "full", NULL};
    frun f = {.args = args};
    start_daemon(&f);
    syncs_seen s = {.f = &f};
    optd_response r = send_req(&f, f.c, "healthz", "GET", "/healthz", NULL, NULL, 0);
    fcounts c0 = counts_of(&r);
    assert_true(c0.present);
    s.last = c0.syncs;
    optd_response_free(&r);

    char body[4096];
    create_body(body, sizeof body, "{\"type\":\"adam\",\"lr\":0.01}", "", 1.0f);
    acked_write(&s, "create", "PUT", "/v1/sessions/s", NULL, body, strlen(body), 201);
    float g[NP];
    for (int i = 0; i < 6; i++) {
        grad_of(i, 0, g);
        char key[48];
        snprintf(key, sizeof key, "Idempotency-Key: s-%d", i);
        const char *h[] = {BIN, i % 2 ? key : NULL, NULL};
        acked_write(&s, "a step", "POST", "/v1/sessions/s/step?params=false", h, g, sizeof g,
                    200);
    }
    const char *patch = "{\"optimizer\":{\"lr\":0.001}}";
    acked_write(&s, "PATCH", "PATCH", "/v1/sessions/s", NULL, patch, strlen(patch), 200);
    const char *hb[] = {BIN, NULL};
    acked_write(&s, "PUT params", "PUT", "/v1/sessions/s/params", hb, g, sizeof g, 200);

    /* A vector over 256 KiB lives in a file: synced too. */
    enum { BIG = 100000 };
    const char *bigcfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":100000}";
    acked_write(&s, "create big", "PUT", "/v1/sessions/big", NULL, bigcfg, strlen(bigcfg), 201);
    float *bg = calloc(BIG, sizeof *bg);
    assert_non_null(bg);
    for (int i = 0; i < BIG; i++)
        bg[i] = (float)(i % 17) * 0.01f;
    acked_write(&s, "big step", "POST", "/v1/sessions/big/step?params=false", hb, bg,
                BIG * sizeof *bg, 200);
    free(bg);

    /* A synchronous round: the answer of the request that closed it. */
    const char *sycfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":64,"
                        "\"mode\":{\"type\":\"sync\",\"workers\":2}}";
    acked_write(&s, "create sync", "PUT", "/v1/sessions/sy", NULL, sycfg, strlen(sycfg), 201);
    parked_arg pa = {.url = tdaemon_url(&f.d)};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, parked_worker, &pa), 0);
    wait_round(&f, "sy", 1);
    grad_of(7, 2, g);
    const char *hw[] = {BIN, "Optd-Worker: w2", "Idempotency-Key: r-w2", NULL};
    acked_write(&s, "the round's closing step", "POST", "/v1/sessions/sy/step", hw, g, sizeof g,
                200);
    pthread_join(t, NULL);
    assert_int_equal(pa.status, 200);

    acked_write(&s, "DELETE", "DELETE", "/v1/sessions/s", NULL, NULL, 0, 204);
    assert_true(s.last >= (unsigned long long)s.acked);
    printf("--durability full: %d acknowledged writes, each after its sync (%llu syncs)\n",
           s.acked, s.last - c0.syncs);
    stop_daemon(&f);
    unsetenv("OPTD_FAULT_COUNT_SYNCS");
    tdaemon_cleanup(&f.d);
}

/* ------------------------------------------------ idempotency fingerprints */

static optd_response plain(frun *f, const char *method, const char *path,
                           const char *const *hdrs, const void *body, size_t len, int status)
{
    optd_response r = send_req(f, f->c, path, method, path, hdrs, body, len);
    if (r.status != status)
        fail_msg("%s %s: expected %d, got %d: %.*s", method, path, status, r.status,
                 (int)r.len, r.body);
    return r;
}

static void test_idem_key_reused(void **state)
{
    (void)state;
    frun f = {0};
    start_daemon(&f);
    char body[4096];
    create_body(body, sizeof body, "{\"type\":\"sgd\",\"lr\":0.1}", "", 0.0f);
    optd_response r = plain(&f, "PUT", "/v1/sessions/k", NULL, body, strlen(body), 201);
    optd_response_free(&r);
    float g1[NP], g2[NP];
    grad_of(1, 0, g1);
    grad_of(2, 0, g2);
    const char *hx[] = {BIN, "Idempotency-Key: x", NULL};
    const char *hx_loss[] = {BIN, "Idempotency-Key: x", "Optd-Loss: 0.5", NULL};
    r = plain(&f, "POST", "/v1/sessions/k/step", hx, g1, sizeof g1, 200);
    optd_response_free(&r);
    tapi_snap before = tapi_snapshot(f.c, "k");

    /* another gradient, or another loss, under the same key */
    r = plain(&f, "POST", "/v1/sessions/k/step", hx, g2, sizeof g2, 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    r = plain(&f, "POST", "/v1/sessions/k/step", hx_loss, g1, sizeof g1, 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(f.c, "k");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    /* the same request is a replay */
    r = plain(&f, "POST", "/v1/sessions/k/step", hx, g1, sizeof g1, 200);
    assert_non_null(optd_response_header(&r, "Optd-Replayed"));
    optd_response_free(&r);

    /* JSON: a loss in the body counts */
    const char *hy[] = {"Idempotency-Key: y", NULL};
    char jb[4096];
    size_t k = (size_t)snprintf(jb, sizeof jb, "{\"loss\":1.5,\"grad\":[");
    for (int i = 0; i < NP; i++)
        k += (size_t)snprintf(jb + k, sizeof jb - k, "%s%.9g", i ? "," : "", (double)g2[i]);
    snprintf(jb + k, sizeof jb - k, "]}");
    r = plain(&f, "POST", "/v1/sessions/k/step", hy, jb, strlen(jb), 200);
    optd_response_free(&r);
    jb[10] = '7'; /* "loss":1.7 */
    r = plain(&f, "POST", "/v1/sessions/k/step", hy, jb, strlen(jb), 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    tapi_snap_free(&before);
    before = tapi_snapshot(f.c, "k");
    assert_int_equal(before.session_step, 2);

    /* the fingerprint is stored with the key: it survives a restart */
    stop_daemon(&f);
    start_daemon(&f);
    r = plain(&f, "POST", "/v1/sessions/k/step", hx, g2, sizeof g2, 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    r = plain(&f, "POST", "/v1/sessions/k/step", hx, g1, sizeof g1, 200);
    assert_non_null(optd_response_header(&r, "Optd-Replayed"));
    optd_response_free(&r);
    after = tapi_snapshot(f.c, "k");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&after);
    tapi_snap_free(&before);

    /* synchronous rounds: a rejoin with another gradient, and a key of a
     * closed round */
    const char *sycfg = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":64,"
                        "\"mode\":{\"type\":\"sync\",\"workers\":2}}";
    r = plain(&f, "PUT", "/v1/sessions/sy", NULL, sycfg, strlen(sycfg), 201);
    optd_response_free(&r);
    parked_arg pa = {.url = tdaemon_url(&f.d)};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, parked_worker, &pa), 0);
    wait_round(&f, "sy", 1);
    float g[NP];
    grad_of(8, 1, g); /* not the gradient the parked request sent */
    const char *hw1[] = {BIN, "Optd-Worker: w1", "Idempotency-Key: r-w1", NULL};
    r = plain(&f, "POST", "/v1/sessions/sy/step", hw1, g, sizeof g, 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    wait_round(&f, "sy", 1);
    grad_of(7, 2, g);
    const char *hw2[] = {BIN, "Optd-Worker: w2", "Idempotency-Key: r-w2", NULL};
    r = plain(&f, "POST", "/v1/sessions/sy/step", hw2, g, sizeof g, 200);
    optd_response_free(&r);
    pthread_join(t, NULL);
    assert_int_equal(pa.status, 200);
    grad_of(9, 2, g);
    r = plain(&f, "POST", "/v1/sessions/sy/step", hw2, g, sizeof g, 422);
    tapi_assert_problem(&r, 422, "Idempotency-Key");
    optd_response_free(&r);
    grad_of(7, 2, g);
    r = plain(&f, "POST", "/v1/sessions/sy/step", hw2, g, sizeof g, 200);
    assert_non_null(optd_response_header(&r, "Optd-Replayed"));
    assert_int_equal(header_ll(&r, "Optd-Step"), 1);
    optd_response_free(&r);
    stop_daemon(&f);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&f.d)), 0);
    tdaemon_cleanup(&f.d);
}

/* ------------------------------------------------------ params digest */

static void crc_hex(const void *p, size_t n, char out[16])
{
    snprintf(out, 16, "%08lx", (unsigned long)crc32(0, (const Bytef *)p, (uInt)n));
}

static void test_params_digest(void **state)
{
    (void)state;
    frun f = {0};
    start_daemon(&f);
    char body[4096], want[16];
    create_body(body, sizeof body, "{\"type\":\"sgd\",\"lr\":0.1}", "", 0.25f);
    optd_response r = plain(&f, "PUT", "/v1/sessions/d", NULL, body, strlen(body), 201);
    optd_response_free(&r);
    float p[NP];
    for (int j = 0; j < NP; j++)
        p[j] = 0.25f + 0.01f * (float)j;
    crc_hex(p, sizeof p, want);

    /* JSON, binary, and binary in another wire dtype: the same digest */
    const char *forms[][3] = {{NULL}, {ACC, NULL}, {ACC, "Optd-Params-Dtype: bfloat16", NULL},
                              {ACC, "Optd-Params-Dtype: float64", NULL}};
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        r = plain(&f, "GET", "/v1/sessions/d/params", forms[i][0] ? forms[i] : NULL, NULL, 0,
                  200);
        const char *h = optd_response_header(&r, "Optd-Params-Crc32");
        if (!h || strcmp(h, want) != 0)
            fail_msg("form %zu: Optd-Params-Crc32 %s, expected %s", i, h ? h : "(none)", want);
        optd_response_free(&r);
    }
    /* a step's answer: the new params' digest; without params, none */
    float g[NP];
    grad_of(3, 0, g);
    const char *hs[] = {BIN, ACC, NULL};
    r = plain(&f, "POST", "/v1/sessions/d/step", hs, g, sizeof g, 200);
    crc_hex(r.body, r.len, want);
    assert_string_equal(optd_response_header(&r, "Optd-Params-Crc32"), want);
    assert_true(memcmp(r.body, p, sizeof p) != 0);
    optd_response_free(&r);
    r = plain(&f, "POST", "/v1/sessions/d/step?params=false", hs, g, sizeof g, 200);
    assert_null(optd_response_header(&r, "Optd-Params-Crc32"));
    optd_response_free(&r);

    /* float64: the digest of the 8-byte values */
    const char *cfg64 = "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"dtype\":\"float64\","
                        "\"params\":[0.1,-2.5,3]}";
    r = plain(&f, "PUT", "/v1/sessions/d64", NULL, cfg64, strlen(cfg64), 201);
    optd_response_free(&r);
    double p64[3] = {0.1, -2.5, 3};
    crc_hex(p64, sizeof p64, want);
    r = plain(&f, "GET", "/v1/sessions/d64/params", NULL, NULL, 0, 200);
    assert_string_equal(optd_response_header(&r, "Optd-Params-Crc32"), want);
    optd_response_free(&r);
    stop_daemon(&f);
    tdaemon_cleanup(&f.d);
}

/* ---------------------------------------------- allocation failures */

/* The shim next to this test binary (the Makefile builds it there). */
static void shim_path(char *out, size_t n)
{
    char exe[1024];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    assert_true(k > 0);
    exe[k] = '\0';
    char *slash = strrchr(exe, '/');
    assert_non_null(slash);
    *slash = '\0';
    snprintf(out, n, "%s/failmalloc.so", exe);
    assert_int_equal(access(out, R_OK), 0);
}

/* Starts the daemon with the shim preloaded and OPTD_FAILMALLOC=spec
 * (NULL: a daemon without the shim).  Only the daemon gets them. */
static void start_with_shim(frun *f, const char *spec)
{
    char shim[1100];
    char *asan_old = getenv("ASAN_OPTIONS") ? strdup(getenv("ASAN_OPTIONS")) : NULL;
    /* Under valgrind (make valgrind) the shim cannot see the daemon's
     * allocations (valgrind replaces malloc everywhere): the daemon with
     * the shim runs natively, this test and every other daemon still
     * under valgrind. */
    char *vg_old = spec && getenv("OPTD_VALGRIND_DAEMON") ? strdup(getenv("OPTD_VALGRIND_DAEMON"))
                                                         : NULL;
    if (vg_old)
        unsetenv("OPTD_VALGRIND_DAEMON");
    if (spec) {
        shim_path(shim, sizeof shim);
        setenv("LD_PRELOAD", shim, 1);
        setenv("OPTD_FAILMALLOC", spec, 1);
        /* under make asan: the shim comes before ASan's runtime */
        char asan[1024];
        snprintf(asan, sizeof asan, "%s%sverify_asan_link_order=0", asan_old ? asan_old : "",
                 asan_old ? ":" : "");
        setenv("ASAN_OPTIONS", asan, 1);
    }
    start_daemon(f);
    if (vg_old) {
        setenv("OPTD_VALGRIND_DAEMON", vg_old, 1);
        free(vg_old);
    }
    unsetenv("LD_PRELOAD");
    unsetenv("OPTD_FAILMALLOC");
    if (asan_old)
        setenv("ASAN_OPTIONS", asan_old, 1);
    else
        unsetenv("ASAN_OPTIONS");
    free(asan_old);
}

/* The shim's closing line in the daemon's log: allocations counted and
 * failed.  -1 when absent. */
static long long shim_counted(const frun *f, long long *failed)
{
    FILE *fp = fopen(f->d.log, "r");
    assert_non_null(fp);
    char line[512];
    long long a = -1, b = -1;
    while (fgets(line, sizeof line, fp)) {
        long long x, y;
        if (sscanf(line, "failmalloc: %lld allocations counted, %lld failed", &x, &y) == 2) {
            a = x;
            b = y;
        }
    }
    fclose(fp);
    if (failed)
        *failed = b;
    return a;
}

static bool has_text(const optd_response *r, const char *t)
{
    size_t n = strlen(t);
    for (size_t i = 0; r->body && i + n <= r->len; i++)
        if (memcmp(r->body + i, t, n) == 0)
            return true;
    return false;
}

/* A request that must succeed in the end; a failed allocation may make
 * it answer 503 "out of memory" (problem+json), never anything else.
 * Returns the successful answer. */
static optd_response mop(frun *f, const char *what, const char *method, const char *path,
                         const char *const *hdrs, const void *body, size_t len, int ok1,
                         int ok2)
{
    for (int k = 0; k < ATTEMPTS; k++) {
        optd_response r = send_req(f, f->c, what, method, path, hdrs, body, len);
        if (r.status == ok1 || r.status == ok2)
            return r;
        if (r.status != 503 || !has_text(&r, "out of memory"))
            fail_msg("[%s] %s: expected %d or 503 \"out of memory\", got %d: %.*s", f->spec,
                     what, ok1, r.status, (int)(r.len > 400 ? 400 : r.len), r.body);
        assert_clean(f, &r, what, false);
        optd_response_free(&r);
    }
    fail_msg("[%s] %s: still failing after %d attempts (only one allocation fails)", f->spec,
             what, ATTEMPTS);
    optd_response none = {0};
    return none;
}

static void json_vec(char *out, size_t n, const char *member, const float *v, const char *tail)
{
    size_t k = (size_t)snprintf(out, n, "{\"%s\":[", member);
    for (int j = 0; j < NP; j++)
        k += (size_t)snprintf(out + k, n - k, "%s%.9g", j ? "," : "", (double)v[j]);
    snprintf(out + k, n - k, "]%s}", tail);
}

static void malloc_scenario(frun *f, model *m)
{
    char body[4096];
    create_body(body, sizeof body, "{\"type\":\"sgd\",\"lr\":0.05,\"momentum\":0.9}", "", 0.5f);
    optd_response r = mop(f, "create a", "PUT", "/v1/sessions/a", NULL, body, strlen(body), 201,
                          200);
    optd_response_free(&r);
    /* a JSON step */
    float g[NP];
    grad_of(++m->a_steps, 0, g);
    json_vec(body, sizeof body, "grad", g, ",\"loss\":0.75");
    const char *hj[] = {"Idempotency-Key: m-1", NULL};
    r = mop(f, "JSON step", "POST", "/v1/sessions/a/step", hj, body, strlen(body), 200, 200);
    model_step(&m->a, g);
    optd_response_free(&r);
    /* binary steps */
    for (int i = 0; i < 2; i++) {
        grad_of(++m->a_steps, 0, g);
        char key[48];
        snprintf(key, sizeof key, "Idempotency-Key: m-%d", m->a_steps);
        const char *hb[] = {BIN, ACC, key, NULL};
        r = mop(f, "binary step", "POST", "/v1/sessions/a/step", hb, g, sizeof g, 200, 200);
        model_step(&m->a, g);
        assert_params(f, &r, &m->a, m->a_steps, "binary step");
        optd_response_free(&r);
    }
    const char *patch = "{\"optimizer\":{\"lr\":0.02},\"metadata\":{\"run\":\"m\"}}";
    r = mop(f, "PATCH", "PATCH", "/v1/sessions/a", NULL, patch, strlen(patch), 200, 200);
    m->a.hp.lr = 0.02;
    optd_response_free(&r);
    static const char *const reads[] = {"/v1/sessions/a", "/v1/sessions/a/params",
                                        "/v1/sessions/a/history", "/v1/sessions",
                                        "/v1/optimizers", "/healthz", "/v1/sessions/a/state"};
    for (size_t i = 0; i < sizeof reads / sizeof reads[0]; i++) {
        r = mop(f, reads[i], "GET", reads[i], NULL, NULL, 0, 200, 200);
        optd_response_free(&r);
    }
    /* a synchronous round */
    create_body(body, sizeof body, "{\"type\":\"sgd\",\"lr\":0.1}",
                "\"mode\":{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":3000},", -0.25f);
    r = mop(f, "create b", "PUT", "/v1/sessions/b", NULL, body, strlen(body), 201, 200);
    optd_response_free(&r);
    round_b(f, m);
    /* PUT params, then a step from them */
    float p[NP];
    for (int j = 0; j < NP; j++)
        p[j] = 0.125f * (float)(j % 9) - 0.5f;
    const char *hp[] = {BIN, NULL};
    r = mop(f, "PUT params", "PUT", "/v1/sessions/a/params", hp, p, sizeof p, 200, 200);
    memcpy(m->a.p, p, sizeof p);
    optd_response_free(&r);
    grad_of(++m->a_steps, 0, g);
    const char *hb[] = {BIN, ACC, "Idempotency-Key: m-last", NULL};
    r = mop(f, "step after PUT params", "POST", "/v1/sessions/a/step", hb, g, sizeof g, 200,
            200);
    model_step(&m->a, g);
    assert_params(f, &r, &m->a, m->a_steps, "step after PUT params");
    optd_response_free(&r);
    r = mop(f, "DELETE b", "DELETE", "/v1/sessions/b", NULL, NULL, 0, 204, 204);
    optd_response_free(&r);
}

/* One run with the Nth allocation failing (0: only counting).  Returns
 * the allocations the shim counted. */
static long long malloc_run(long long n)
{
    frun f = {0};
    snprintf(f.spec, sizeof f.spec, "malloc:%lld", n);
    model m = {0};
    model_init(&m.a, 0.05, 0.9, 0.5f);
    model_init(&m.b, 0.1, 0.0, -0.25f);
    char spec[32];
    snprintf(spec, sizeof spec, "%lld", n);
    start_with_shim(&f, spec);
    malloc_scenario(&f, &m);
    /* A clean exit: under make asan, a leak fails it. */
    stop_daemon(&f);
    long long failed;
    long long counted = shim_counted(&f, &failed);
    if (counted < 0)
        fail_msg("[%s] the shim's line is missing from the daemon's log", f.spec);
    if (n > 0 && n <= counted && failed != 1)
        fail_msg("[%s] %lld allocations failed, expected 1", f.spec, failed);
    /* Without the shim: what was acknowledged is there, and it serves. */
    if (tapi_integrity_check(tdaemon_db(&f.d)) != 0)
        fail_msg("[%s] integrity_check failed", f.spec);
    start_with_shim(&f, NULL);
    const char *h[] = {ACC, NULL};
    optd_response r = send_req(&f, f.c, "GET params a", "GET", "/v1/sessions/a/params", h,
                               NULL, 0);
    if (r.status != 200)
        fail_msg("[%s] after the run, GET params: %d %.*s", f.spec, r.status, (int)r.len,
                 r.body);
    assert_params(&f, &r, &m.a, m.a_steps, "after the run: a");
    optd_response_free(&r);
    r = send_req(&f, f.c, "GET b", "GET", "/v1/sessions/b", NULL, NULL, 0);
    assert_int_equal(r.status, 404);
    optd_response_free(&r);
    step_a(&f, &m);
    stop_daemon(&f);
    tdaemon_cleanup(&f.d);
    model_free(&m.a);
    model_free(&m.b);
    return counted;
}

/* Every allocation the daemon makes while handling the scenario's
 * requests (its own, cJSON's, SQLite's) fails once, in turn
 * (OPTD_FAILMALLOC_STRIDE: every Kth; make test samples about 30). */
static void test_malloc_loop(void **state)
{
    (void)state;
    long long total = malloc_run(0);
    assert_true(total > 0);
    const char *s = getenv("OPTD_FAILMALLOC_STRIDE");
    long long k = s ? atoll(s) : total / 30 + 1;
    if (k < 1)
        k = 1;
    int runs = 0;
    long long t0 = tapi_now_ms();
    /* A part of a long loop, by hand: OPTD_FAILMALLOC_FROM / _TO. */
    const char *from = getenv("OPTD_FAILMALLOC_FROM"), *to = getenv("OPTD_FAILMALLOC_TO");
    if (to && atoll(to) < total)
        total = atoll(to);
    for (long long n = from ? atoll(from) : 1; n <= total; n += k) {
        malloc_run(n);
        runs++;
    }
    printf("allocation failures: N = 1..%lld every %lld: %d runs, %lld ms\n", total, k, runs,
           tapi_now_ms() - t0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_params_digest),
        cmocka_unit_test(test_idem_key_reused),
        cmocka_unit_test(test_full_syncs_before_ack),
        cmocka_unit_test(test_fault_loop_eio),
        cmocka_unit_test(test_fault_loop_disk_full),
        cmocka_unit_test(test_malloc_loop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
