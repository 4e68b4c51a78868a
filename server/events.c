/*
 * events.c -- GET /v1/sessions/{name}/events: a session's live events as
 * Server-Sent Events.  One event per committed step ("step", with the step
 * as its id; "accumulate" and "skip" for the gradients that applied no
 * update) and per config change ("config").
 *
 * No thread per watcher.  The stream is a libmicrohttpd response read
 * from a callback: the callback hands out what the watcher's buffer holds,
 * and when it is empty it suspends the connection and returns 0 bytes.
 * The step path appends the event's text to each watcher's buffer under
 * the watcher's own lock: a bounded memcpy per watcher, never a wait on
 * the network.  A pump thread resumes the suspended readers that have
 * events every PUMP_MS, so a busy session's events leave in batches.  A watcher whose buffer
 * (WATCH_BUF) is full is dropped: its stream ends after what it holds,
 * and the client resumes with Last-Event-ID, which the stream serves from
 * the step history (storage_history) a page at a time before going live.
 *
 * LOCKING: watchers_mu (a read-write lock: steps and the pump read, a
 * stream's start and end write) guards the list; a watcher's mu guards its live
 * buffer and its suspended flag (so that a suspend and a resume never
 * cross).  Order: session lock -> watchers_mu -> watcher mu.  The history
 * part of a stream belongs to the reader alone (MHD calls it for one
 * connection at a time).
 */
#include "server/cors.h"
#include "server/observe.h"

#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WATCH_BUF (64 * 1024)  /* live bytes a watcher may have unread     */
#define WATCH_MAX 1024         /* watchers in all                          */
#define HIST_PAGE 128          /* history rows read at a time on a resume  */
#define KEEPALIVE_S 15         /* a comment line this often keeps proxies,
                                  and the idle timeout, from closing        */
#define EVENT_MAX 1024         /* one step event's text                    */
#define PUMP_MS 50             /* how often waiting events are sent         */

typedef struct watcher {
    struct watcher *next;
    char name[API_NAME_MAX + 1];
    int64_t session_id;
    struct MHD_Connection *conn;
    pthread_mutex_t mu;
    char *buf;                 /* live events, [off, len) unread            */
    size_t off, len;
    bool suspended, ended;
    /* the reader's alone: the history to send first */
    bool backlog;
    int64_t cursor, upto;      /* steps (cursor, upto] still to send        */
    api_buf hist;
    size_t hoff;
} watcher;

static pthread_rwlock_t watchers_mu = PTHREAD_RWLOCK_INITIALIZER;
static watcher *watchers;
static size_t n_watchers;       /* also read without the lock (fast path)   */
static uint64_t n_dropped;
static storage *events_db;

static pthread_t keepalive_thread;
static bool keepalive_started, stopping;
static pthread_cond_t keepalive_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t keepalive_mu = PTHREAD_MUTEX_INITIALIZER;

size_t obs_events_watchers(void)
{
    return __atomic_load_n(&n_watchers, __ATOMIC_RELAXED);
}

uint64_t obs_events_dropped(void)
{
    return __atomic_load_n(&n_dropped, __ATOMIC_RELAXED);
}

/* Appends text to w's live buffer (w->mu held); drops w when it is full;
 * wakes a suspended reader. */
static void push_locked(watcher *w, const char *text, size_t n)
{
    if (w->ended)
        return;
    if (w->len + n > WATCH_BUF && w->off > 0) {
        memmove(w->buf, w->buf + w->off, w->len - w->off);
        w->len -= w->off;
        w->off = 0;
    }
    if (w->len + n > WATCH_BUF) {
        w->ended = true; /* too slow: it gets what it has, then the end */
        __atomic_add_fetch(&n_dropped, 1, __ATOMIC_RELAXED);
        srv_log(SRV_LOG_INFO, "event stream of %s dropped: the watcher reads too slowly",
                w->name);
    } else {
        memcpy(w->buf + w->len, text, n);
        w->len += n;
    }
    /* The pump thread wakes readers every PUMP_MS: events of a busy
     * session go out in batches, not one wakeup (and one write) each.
     * A buffer past half full, or an ended stream, wakes at once. */
    if (w->suspended && (w->ended || w->len - w->off > WATCH_BUF / 2)) {
        w->suspended = false;
        MHD_resume_connection(w->conn);
    }
}

/* Sends text to every watcher of session name (all when name is NULL). */
static void broadcast(const char *name, const char *text, size_t n)
{
    if (__atomic_load_n(&n_watchers, __ATOMIC_RELAXED) == 0)
        return;
    pthread_rwlock_rdlock(&watchers_mu);
    for (watcher *w = watchers; w; w = w->next) {
        if (name && strcmp(w->name, name) != 0)
            continue;
        pthread_mutex_lock(&w->mu);
        push_locked(w, text, n);
        pthread_mutex_unlock(&w->mu);
    }
    pthread_rwlock_unlock(&watchers_mu);
}

static bool session_watched(const char *name)
{
    if (__atomic_load_n(&n_watchers, __ATOMIC_RELAXED) == 0)
        return false;
    bool any = false;
    pthread_rwlock_rdlock(&watchers_mu);
    for (watcher *w = watchers; w && !any; w = w->next)
        any = strcmp(w->name, name) == 0;
    pthread_rwlock_unlock(&watchers_mu);
    return any;
}

/* ------------------------------------------------------------ format */

static int put_time(api_buf *b, int64_t ms)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    return api_buf_printf(b, "\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\"", tm.tm_year + 1900,
                          tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                          (int)(ms % 1000));
}

/* A JSON string (worker names are any 1-128 characters): quotes,
 * backslashes and control characters escaped, so the event stays one
 * line of JSON. */
static int put_string(api_buf *b, const char *v)
{
    int rc = api_buf_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\')
            rc |= api_buf_printf(b, "\\%c", *p);
        else if (*p < 0x20 || *p == 0x7f)
            rc |= api_buf_printf(b, "\\u%04x", *p);
        else
            rc |= api_buf_put(b, (const char *)p, 1);
    }
    return rc | api_buf_put(b, "\"", 1);
}

/* One event in SSE form: "id: STEP\nevent: KIND\ndata: {...}\n\n".  An
 * applied step carries its step as the id; the other kinds carry none (a
 * resume restarts after the last applied step). */
static int format_step(api_buf *b, int kind, int64_t step, int64_t time_ms, double lr,
                       double loss, double grad_norm, double update_norm, const char *worker)
{
    static const char *const kinds[3] = {"step", "accumulate", "skip"};
    int rc = 0;
    if (kind == STORAGE_LOG_STEP)
        rc |= api_buf_printf(b, "id: %lld\n", (long long)step);
    rc |= api_buf_printf(b, "event: %s\ndata: {\"step\":%lld,\"time\":",
                         kinds[kind >= 0 && kind < 3 ? kind : 0], (long long)step);
    rc |= put_time(b, time_ms);
    rc |= api_buf_put(b, ",\"lr\":", 6);
    rc |= api_buf_double(b, lr);
    rc |= api_buf_put(b, ",\"loss\":", 8);
    rc |= api_buf_double(b, loss);
    rc |= api_buf_put(b, ",\"grad_norm\":", 13);
    rc |= api_buf_double(b, grad_norm);
    rc |= api_buf_put(b, ",\"update_norm\":", 15);
    rc |= api_buf_double(b, update_norm);
    if (worker && worker[0]) {
        rc |= api_buf_put(b, ",\"worker\":", 10);
        rc |= put_string(b, worker);
    }
    rc |= api_buf_put(b, "}\n\n", 3);
    return rc;
}

void obs_events_step(const eng_session *s, const eng_step_in *in, const eng_step_out *out)
{
    if (!session_watched(s->name))
        return;
    char text[EVENT_MAX];
    api_buf b = {0};
    if (format_step(&b, out->kind, (int64_t)s->st.step, s->updated_ms, out->lr, in->loss,
                    out->grad_norm, out->update_norm, in->worker) == 0 &&
        b.len < sizeof text) {
        memcpy(text, b.data, b.len);
        broadcast(s->name, text, b.len);
    }
    free(b.data);
}

void obs_config_changed(const eng_session *s)
{
    if (!session_watched(s->name))
        return;
    char *cfg = api_config_to_json(&s->cfg);
    api_buf b = {0};
    if (cfg && api_buf_printf(&b, "event: config\ndata: {\"step\":%llu,\"config\":%s}\n\n",
                              (unsigned long long)s->st.step, cfg) == 0)
        broadcast(s->name, b.data, b.len);
    free(b.data);
    free(cfg);
}

void obs_events_round(const eng_session *s, const char *state)
{
    if (!session_watched(s->name))
        return;
    api_buf b = {0};
    int rc = api_buf_printf(&b,
                            "event: round\ndata: {\"step\":%lld,\"state\":\"%s\",\"received\":%lld,"
                            "\"awaiting\":%lld,\"workers\":[",
                            (long long)s->round_step, state, (long long)s->round_count,
                            (long long)(s->cfg.mode.workers - s->round_count));
    for (int64_t i = 0; i < s->round_count; i++) {
        if (i)
            rc |= api_buf_put(&b, ",", 1);
        rc |= put_string(&b, s->round_workers[i]);
    }
    rc |= api_buf_put(&b, "]}\n\n", 4);
    if (rc == 0)
        broadcast(s->name, b.data, b.len);
    free(b.data);
}

/* ------------------------------------------------------------ stream */

static int history_row(void *ud, const storage_log_entry *e)
{
    watcher *w = ud;
    if (e->step > w->upto)
        return 1; /* live from here: stop */
    w->cursor = e->step;
    return format_step(&w->hist, e->kind, e->step, e->time_ms, e->lr, e->loss, e->grad_norm,
                       e->update_norm, e->worker) ? -1 : 0;
}

/* Reads the next page of the backlog into w->hist. */
static void fill_history(watcher *w)
{
    w->hist.len = 0;
    w->hoff = 0;
    int64_t before = w->cursor;
    int err = storage_history(events_db, w->session_id, w->cursor, HIST_PAGE, history_row, w);
    if ((err != STORAGE_OK && err != 1) || w->cursor == before || w->cursor >= w->upto) {
        if (err < 0)
            srv_log(SRV_LOG_WARN, "event stream of %s: reading the history failed: %s", w->name,
                    storage_last_error());
        w->backlog = false;
    }
}

static ssize_t reader(void *cls, uint64_t pos, char *out, size_t max)
{
    (void)pos;
    watcher *w = cls;
    for (;;) {
        if (w->hoff < w->hist.len) {
            size_t n = w->hist.len - w->hoff < max ? w->hist.len - w->hoff : max;
            memcpy(out, w->hist.data + w->hoff, n);
            w->hoff += n;
            obs_bytes_out(n);
            return (ssize_t)n;
        }
        if (!w->backlog)
            break;
        fill_history(w);
    }
    pthread_mutex_lock(&w->mu);
    if (w->off < w->len) {
        size_t n = w->len - w->off < max ? w->len - w->off : max;
        memcpy(out, w->buf + w->off, n);
        w->off += n;
        if (w->off == w->len)
            w->off = w->len = 0;
        pthread_mutex_unlock(&w->mu);
        obs_bytes_out(n);
        return (ssize_t)n;
    }
    if (w->ended) {
        pthread_mutex_unlock(&w->mu);
        return MHD_CONTENT_READER_END_OF_STREAM;
    }
    /* Nothing to send: park until push_locked resumes us. */
    w->suspended = true;
    MHD_suspend_connection(w->conn);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

static void unlink_watcher(watcher *w)
{
    pthread_rwlock_wrlock(&watchers_mu);
    for (watcher **pp = &watchers; *pp; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            __atomic_sub_fetch(&n_watchers, 1, __ATOMIC_RELAXED);
            break;
        }
    }
    pthread_rwlock_unlock(&watchers_mu);
}

/* The response is destroyed: the watcher goes. */
static void watcher_free(void *cls)
{
    watcher *w = cls;
    unlink_watcher(w);
    pthread_mutex_destroy(&w->mu);
    free(w->buf);
    free(w->hist.data);
    free(w);
}

/* A step number: 0 and *v, or -1. */
static int parse_step(const char *t, int64_t *v)
{
    if (!t || *t < '0' || *t > '9')
        return -1;
    char *end;
    errno = 0;
    long long n = strtoll(t, &end, 10);
    if (*end || errno)
        return -1;
    *v = n;
    return 0;
}

int obs_events_open(srv_ctx *ctx, void *conn, const char *name, const char *last_event_id,
                    const char *after, const char *live, const char *request_id, int *ok,
                    api_reply *r)
{
    int64_t cursor = -1;
    if (last_event_id && *last_event_id) {
        if (parse_step(last_event_id, &cursor))
            return api_problem(r, 400, "Last-Event-ID",
                               "Last-Event-ID must be a step number (the id of an event)");
    } else if (after) {
        if (parse_step(after, &cursor))
            return api_problem(r, 400, "after", "after must be a step number");
    }
    bool follow = true;
    if (live) {
        if (strcmp(live, "false") == 0)
            follow = false;
        else if (strcmp(live, "true") != 0)
            return api_problem(r, 400, "live", "live must be true or false");
    }
    if (__atomic_load_n(&stopping, __ATOMIC_RELAXED))
        return api_problem(r, 503, NULL, "the daemon is stopping");
    if (obs_events_watchers() >= WATCH_MAX)
        return api_problem(r, 503, NULL, "too many event streams open (at most %d)", WATCH_MAX);
    watcher *w = calloc(1, sizeof *w);
    char *buf = malloc(WATCH_BUF);
    if (!w || !buf) {
        free(w);
        free(buf);
        return api_problem(r, 503, NULL, "out of memory for an event stream");
    }
    w->buf = buf;
    pthread_mutex_init(&w->mu, NULL);
    snprintf(w->name, sizeof w->name, "%s", name);
    w->conn = conn;
    eng_session *s;
    int err = srv_registry_acquire(ctx->reg, name, &s);
    if (err != ENG_OK) {
        watcher_free(w);
        if (err == STORAGE_ENOTFOUND)
            return api_problem(r, 404, "name", "no session named %s", name);
        return srv_engine_fail(r, err, "loading the session");
    }
    /* Under the session lock: no step commits between reading where the
     * session is and being on the list. */
    w->session_id = s->id;
    w->upto = (int64_t)s->st.step;
    w->cursor = cursor;
    w->backlog = cursor >= 0 && cursor < w->upto;
    w->ended = !follow; /* the history, then the end */
    static const char hello[] = "retry: 2000\n\n";
    memcpy(w->buf, hello, sizeof hello - 1);
    w->len = sizeof hello - 1;
    pthread_rwlock_rdlock(&watchers_mu);
    if (__atomic_load_n(&stopping, __ATOMIC_RELAXED))
        w->ended = true; /* raced the stop: it ends at once */
    w->next = watchers;
    watchers = w;
    __atomic_add_fetch(&n_watchers, 1, __ATOMIC_RELAXED);
    pthread_rwlock_unlock(&watchers_mu);
    srv_registry_release(ctx->reg, s);

    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, reader, w, watcher_free);
    if (!resp) {
        watcher_free(w);
        return api_problem(r, 503, NULL, "out of memory for an event stream");
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    /* An ended stream (dropped, stopped) closes its connection: the
     * client's EventSource or loop reconnects. */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    if (request_id)
        MHD_add_response_header(resp, "X-Request-Id", request_id);
    srv_cors_decorate(conn, "GET", "", 200, resp);
    *ok = MHD_queue_response(conn, 200, resp) == MHD_YES;
    MHD_destroy_response(resp); /* freed, with the watcher, when the stream ends */
    return 0;
}

int obs_h_events(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)ctx;
    (void)req;
    return api_problem(r, 500, NULL, "the event stream is served by the HTTP layer");
}

/* ---------------------------------------------------------- keepalive */

/* Wakes every reader with unsent events (PUMP_MS), and every reader with a
 * keepalive comment (KEEPALIVE_S). */
static void pump(bool keepalive)
{
    static const char ping[] = ": keepalive\n\n";
    pthread_rwlock_rdlock(&watchers_mu);
    for (watcher *w = watchers; w; w = w->next) {
        pthread_mutex_lock(&w->mu);
        if (keepalive)
            push_locked(w, ping, sizeof ping - 1);
        if (w->suspended && (w->off < w->len || w->ended)) {
            w->suspended = false;
            MHD_resume_connection(w->conn);
        }
        pthread_mutex_unlock(&w->mu);
    }
    pthread_rwlock_unlock(&watchers_mu);
}

static void *keepalive_main(void *arg)
{
    (void)arg;
    struct timespec last;
    clock_gettime(CLOCK_MONOTONIC, &last);
    pthread_mutex_lock(&keepalive_mu);
    while (!__atomic_load_n(&stopping, __ATOMIC_RELAXED)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += PUMP_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&keepalive_cv, &keepalive_mu, &ts);
        if (__atomic_load_n(&stopping, __ATOMIC_RELAXED))
            break;
        pthread_mutex_unlock(&keepalive_mu);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        bool ka = now.tv_sec - last.tv_sec >= KEEPALIVE_S;
        if (ka)
            last = now;
        if (obs_events_watchers() > 0)
            pump(ka);
        pthread_mutex_lock(&keepalive_mu);
    }
    pthread_mutex_unlock(&keepalive_mu);
    return NULL;
}

int obs_events_init(srv_ctx *ctx)
{
    events_db = ctx->db;
    stopping = false;
    if (pthread_create(&keepalive_thread, NULL, keepalive_main, NULL) != 0)
        return -1;
    keepalive_started = true;
    return 0;
}

void obs_events_shutdown(void)
{
    pthread_mutex_lock(&keepalive_mu);
    __atomic_store_n(&stopping, true, __ATOMIC_RELAXED);
    pthread_cond_signal(&keepalive_cv);
    pthread_mutex_unlock(&keepalive_mu);
    if (keepalive_started)
        pthread_join(keepalive_thread, NULL);
    keepalive_started = false;
    /* Every stream ends (after what it holds); suspended ones wake up. */
    pthread_rwlock_rdlock(&watchers_mu);
    for (watcher *w = watchers; w; w = w->next) {
        pthread_mutex_lock(&w->mu);
        w->ended = true;
        if (w->suspended) {
            w->suspended = false;
            MHD_resume_connection(w->conn);
        }
        pthread_mutex_unlock(&w->mu);
    }
    pthread_rwlock_unlock(&watchers_mu);
}
