/*
 * sync.c -- synchronous rounds (mode "sync"): round t closes when N
 * distinct workers have sent a gradient with base_step t; one update with
 * the reduced gradient is applied and committed, and every request of the
 * round is answered with the same step and params.
 *
 * Waiting requests hold no thread: the connection is suspended (MHD) while
 * the session lock is held, and resumed by whoever closes the round -- the
 * last worker's request, or the reaper when the round times out.  An open
 * round holds a reference on its session so that it is never evicted.
 *
 * Lock order: a session's lock, then sy->mu (to list the round); the reaper
 * takes sy->mu, lets it go, then takes the session's lock.
 */
#include "server/observe.h"
#include "server/server.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REAPER_TICK_MS 20

typedef struct round_entry {
    eng_session *s;
    int64_t deadline_ms;
    struct round_entry *next;
} round_entry;

struct srv_sync {
    srv_ctx *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    round_entry *open;          /* sessions with an open round */
    bool stop;
    bool stopping;              /* shutdown began: no request may park */
    bool started;
    pthread_t reaper;
};

/* -------------------------------------------------------- round list */

static void list_add(srv_sync *sy, eng_session *s, int64_t deadline)
{
    round_entry *e = malloc(sizeof *e);
    if (!e)
        return; /* the round then only closes by its workers */
    e->s = s;
    e->deadline_ms = deadline;
    pthread_mutex_lock(&sy->mu);
    e->next = sy->open;
    sy->open = e;
    s->round_listed = true;
    pthread_mutex_unlock(&sy->mu);
    obs_rounds_open(1);
}

static void list_remove(srv_sync *sy, eng_session *s)
{
    pthread_mutex_lock(&sy->mu);
    for (round_entry **pp = &sy->open; *pp; pp = &(*pp)->next) {
        if ((*pp)->s == s) {
            round_entry *e = *pp;
            *pp = e->next;
            free(e);
            obs_rounds_open(-1);
            break;
        }
    }
    s->round_listed = false;
    pthread_mutex_unlock(&sy->mu);
}

/* ------------------------------------------------------------ rounds */

static size_t vec_bytes(const eng_session *s)
{
    return (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
}

static int round_alloc(eng_session *s)
{
    size_t w = (size_t)s->cfg.mode.workers;
    if (!s->round_sum)
        s->round_sum = calloc(1, vec_bytes(s));
    free(s->round_workers);
    free(s->round_keys);
    free(s->round_fps);
    s->round_workers = calloc(w, sizeof *s->round_workers);
    s->round_keys = calloc(w, sizeof *s->round_keys);
    s->round_fps = calloc(w, sizeof *s->round_fps);
    return s->round_sum && s->round_workers && s->round_keys && s->round_fps ? 0 : -1;
}

/* Clears the round (session locked) and lets go of its session ref. */
static void round_reset(srv_ctx *ctx, eng_session *s)
{
    bool was_open = s->round_count > 0;
    if (s->round_sum)
        memset(s->round_sum, 0, vec_bytes(s));
    s->round_count = 0;
    s->round_loss_sum = 0;
    s->round_loss_n = 0;
    s->waiters = NULL;
    if (s->round_listed)
        list_remove(ctx->sync, s);
    if (was_open)
        srv_registry_unhold(ctx->reg, s);
}

/* Copies a problem reply into each waiter and resumes it. */
static void answer_waiters_problem(srv_ctx *ctx, eng_session *s, const api_reply *p)
{
    for (srv_waiter *w = s->waiters, *next; w; w = next) {
        next = w->next;
        w->reply = *p;
        w->reply.body = NULL;
        if (p->body && (w->reply.body = malloc(p->len)))
            memcpy(w->reply.body, p->body, p->len);
        w->reply.len = w->reply.body ? p->len : 0;
        w->done = true;
        ctx->resume(w->conn);
    }
}

/* Closes the round with what it has: one update with the reduced
 * gradient, committed; every waiter answered. r gets the same answer for
 * the request that closed it (want_binary, with_params). */
static int round_close(srv_ctx *ctx, eng_session *s, bool want_binary, int wire,
                       bool with_params, api_reply *r)
{
    size_t n = (size_t)s->cfg.size;
    const char **keys = calloc((size_t)s->round_count, sizeof *keys);
    uint64_t *fps = calloc((size_t)s->round_count, sizeof *fps);
    int st;
    if (!keys || !fps) {
        st = api_problem(r, 503, NULL, "out of memory closing the round");
    } else {
        /* mean: divide in the dtype, like a local mean of the gradients; in
         * place, the round's sum is cleared after this anyway. */
        if (s->cfg.mode.reduce != API_REDUCE_SUM)
            optim_vec_div(s->cfg.dtype, s->round_sum, n, s->round_count);
        size_t nk = 0;
        for (int64_t i = 0; i < s->round_count; i++)
            if (s->round_keys[i][0]) {
                fps[nk] = s->round_fps[i];
                keys[nk++] = s->round_keys[i];
            }
        double loss = s->round_loss_n ? s->round_loss_sum / (double)s->round_loss_n : NAN;
        eng_step_in in = {
            .grad = s->round_sum,
            .loss = loss,
            .factor = 1.0,
            .key = nk ? keys[0] : NULL,
            .fp = nk ? fps[0] : 0,
            .more_keys = nk > 1 ? keys + 1 : NULL,
            .more_fps = nk > 1 ? fps + 1 : NULL,
            .n_more_keys = nk > 1 ? nk - 1 : 0,
        };
        eng_step_out res;
        st = srv_commit_update(ctx, s, &in, &res, r);
        if (!st) {
            int status = res.kind == STORAGE_LOG_ACCUM ? 202 : 200;
            bool with_lr = res.kind == STORAGE_LOG_STEP;
            for (srv_waiter *w = s->waiters, *next; w; w = next) {
                next = w->next;
                srv_reply_params(&w->reply, status, s, w->want_binary, w->wire, res.lr,
                                 with_lr, w->with_params);
                api_reply_header(&w->reply, "Optd-Round-Size", "%lld",
                                 (long long)s->round_count);
                if (status == 202)
                    api_reply_header(&w->reply, "Optd-Pending", "%lld",
                                     (long long)s->accum_count);
                w->done = true;
                ctx->resume(w->conn);
            }
            st = srv_reply_params(r, status, s, want_binary, wire, res.lr, with_lr,
                                  with_params);
            api_reply_header(r, "Optd-Round-Size", "%lld", (long long)s->round_count);
            if (status == 202)
                api_reply_header(r, "Optd-Pending", "%lld", (long long)s->accum_count);
            s->waiters = NULL;
        }
    }
    if (st >= 400)
        answer_waiters_problem(ctx, s, r);
    free(keys);
    free(fps);
    round_reset(ctx, s);
    return st;
}

static void accumulate(eng_session *s, const void *grad)
{
    optim_vec_add(s->cfg.dtype, s->round_sum, grad, (size_t)s->cfg.size);
}

int srv_sync_submit(srv_ctx *ctx, eng_session *s, const srv_request *req, const void *grad,
                    const api_step_meta *meta, const char *key, uint64_t fp, bool with_params,
                    api_reply *r)
{
    int64_t step = (int64_t)s->st.step;
    if (!meta->worker[0])
        return api_problem(r, 400, "worker",
                           "a sync session needs the worker's id (header Optd-Worker or field "
                           "worker)");
    if (meta->base_step >= 0 && meta->base_step != step)
        return api_problem_with(r, 409, "base_step", "step", step,
                                "the open round is for step %lld, not %lld; pull the params and "
                                "compute the gradient at step %lld",
                                (long long)step, (long long)meta->base_step, (long long)step);
    if (!req->waiter || !ctx->resume)
        return api_problem(r, 503, NULL, "this server cannot park requests");
    /* Checked under the session lock: once shutdown's sweep has passed
     * this session, nothing may park here again. */
    if (__atomic_load_n(&ctx->sync->stopping, __ATOMIC_SEQ_CST))
        return api_problem(r, 503, NULL, "optd is shutting down; retry against the next start");
    if (s->round_count == 0 && round_alloc(s))
        return api_problem(r, 503, NULL, "out of memory for the round");
    /* A retry of a request that is already in the round (same worker, same
     * key) waits for the same answer instead of counting twice. */
    bool rejoin = false;
    for (int64_t i = 0; i < s->round_count; i++) {
        if (strcmp(s->round_workers[i], meta->worker) == 0) {
            if (key && strcmp(s->round_keys[i], key) == 0) {
                if (s->round_fps[i] != fp)
                    return api_problem(r, 422, "Idempotency-Key",
                                       "Idempotency-Key %s was already used for a different "
                                       "gradient in the round of step %lld; nothing was added "
                                       "(use a new key for a new step)",
                                       key, (long long)step);
                rejoin = true;
                break;
            }
            return api_problem_with(r, 409, "worker", "step", step,
                                    "worker %s already sent a gradient for the round of step "
                                    "%lld",
                                    meta->worker, (long long)step);
        }
    }
    if (!rejoin) {
        if (s->round_count == 0) {
            s->round_step = step;
            s->round_deadline_ms = srv_now_ms() + s->cfg.mode.timeout_ms;
            srv_registry_hold(ctx->reg, s);
            list_add(ctx->sync, s, s->round_deadline_ms);
        }
        accumulate(s, grad);
        snprintf(s->round_workers[s->round_count], API_WORKER_MAX + 1, "%s", meta->worker);
        snprintf(s->round_keys[s->round_count], API_IDEM_MAX + 1, "%s", key ? key : "");
        s->round_fps[s->round_count] = key ? fp : 0;
        s->round_count++;
        obs_events_round(s, "open");
        if (!isnan(meta->loss)) {
            s->round_loss_sum += meta->loss;
            s->round_loss_n++;
        }
        if (s->round_count >= s->cfg.mode.workers)
            return round_close(ctx, s, req->want_binary, req->waiter->wire, with_params, r);
    }
    /* Park: suspend first, under the session lock, so that whoever closes
     * the round (and needs this lock) can only resume a suspended request. */
    srv_waiter *w = req->waiter;
    int wire = w->wire;
    memset(w, 0, sizeof *w);
    w->wire = wire;
    w->conn = req->conn;
    w->want_binary = req->want_binary;
    w->with_params = with_params;
    snprintf(w->worker, sizeof w->worker, "%s", meta->worker);
    ctx->suspend(req->conn);
    w->next = s->waiters;
    s->waiters = w;
    return SRV_SUSPENDED;
}

void srv_sync_abort(srv_ctx *ctx, eng_session *s, int status, const char *why)
{
    if (s->round_count == 0)
        return;
    api_reply p = {0};
    api_problem_with(&p, status, NULL, "step", (int64_t)s->st.step, "%s", why);
    obs_events_round(s, status == 504 ? "timed_out" : "aborted");
    answer_waiters_problem(ctx, s, &p);
    api_reply_free(&p);
    round_reset(ctx, s);
}

/* ------------------------------------------------------------ reaper */

static void round_timeout(srv_ctx *ctx, eng_session *s)
{
    s->n_timeout++;
    if (s->cfg.mode.on_timeout == API_TIMEOUT_APPLY) {
        api_reply r = {0};
        /* The closing "request" is the reaper: its own answer is dropped. */
        round_close(ctx, s, false, OPTIM_WIRE_F32, false, &r);
        api_reply_free(&r);
        return;
    }
    char why[160];
    snprintf(why, sizeof why,
             "the round of step %lld timed out with %lld of %lld workers; nothing was applied",
             (long long)s->st.step, (long long)s->round_count, (long long)s->cfg.mode.workers);
    srv_sync_abort(ctx, s, 504, why);
}

static void *reaper_main(void *arg)
{
    srv_sync *sy = arg;
    pthread_mutex_lock(&sy->mu);
    while (!sy->stop) {
        int64_t now = srv_now_ms();
        eng_session *due = NULL;
        for (round_entry *e = sy->open; e; e = e->next) {
            if (e->deadline_ms <= now) {
                due = e->s;
                break;
            }
        }
        if (!due) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += REAPER_TICK_MS * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&sy->cv, &sy->mu, &ts);
            continue;
        }
        /* The round holds a ref, and only round_reset (under the session
         * lock) lets it go: take our own before unlocking. */
        srv_registry_hold(sy->ctx->reg, due);
        pthread_mutex_unlock(&sy->mu);
        eng_lock(due);
        if (due->round_count > 0 && due->round_deadline_ms <= srv_now_ms())
            round_timeout(sy->ctx, due);
        eng_unlock(due);
        srv_registry_unhold(sy->ctx->reg, due);
        pthread_mutex_lock(&sy->mu);
    }
    pthread_mutex_unlock(&sy->mu);
    return NULL;
}

srv_sync *srv_sync_new(srv_ctx *ctx)
{
    srv_sync *sy = calloc(1, sizeof *sy);
    if (!sy)
        return NULL;
    sy->ctx = ctx;
    pthread_mutex_init(&sy->mu, NULL);
    pthread_cond_init(&sy->cv, NULL);
    if (pthread_create(&sy->reaper, NULL, reaper_main, sy) != 0) {
        free(sy);
        return NULL;
    }
    sy->started = true;
    return sy;
}

void srv_sync_shutdown(srv_sync *sy)
{
    if (!sy)
        return;
    __atomic_store_n(&sy->stopping, true, __ATOMIC_SEQ_CST);
    if (sy->started) {
        pthread_mutex_lock(&sy->mu);
        sy->stop = true;
        pthread_cond_signal(&sy->cv);
        pthread_mutex_unlock(&sy->mu);
        pthread_join(sy->reaper, NULL);
        sy->started = false;
    }
    /* Answer every waiter 503.  Safe to call again: it sweeps what is left. */
    for (;;) {
        pthread_mutex_lock(&sy->mu);
        eng_session *s = sy->open ? sy->open->s : NULL;
        if (s)
            srv_registry_hold(sy->ctx->reg, s);
        pthread_mutex_unlock(&sy->mu);
        if (!s)
            break;
        eng_lock(s);
        srv_sync_abort(sy->ctx, s, 503, "optd is shutting down; the round was not applied");
        if (s->round_listed)
            list_remove(sy, s); /* defensive: never loop on one entry */
        eng_unlock(s);
        srv_registry_unhold(sy->ctx->reg, s);
    }
}

void srv_sync_free(srv_sync *sy)
{
    if (!sy)
        return;
    srv_sync_shutdown(sy);
    while (sy->open) {
        round_entry *e = sy->open;
        sy->open = e->next;
        free(e);
    }
    pthread_mutex_destroy(&sy->mu);
    pthread_cond_destroy(&sy->cv);
    free(sy);
}
