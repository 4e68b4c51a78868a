/*
 * metrics.c -- GET /metrics in the Prometheus text exposition format
 * (version 0.0.4): request counters and latency histograms, the phases of a
 * step, SQLite commit latency, sessions, rounds, event watchers, the
 * process's memory and descriptors, and (with --metrics-sessions N) the
 * live values of at most N sessions.
 *
 * Every counter is a relaxed atomic bumped where the thing happens; a
 * histogram is an array of per-bucket counters (not cumulative: the scrape
 * adds them up) plus a count and a sum in nanoseconds.  Nothing here takes
 * a lock on the request path except the per-session table, and only when
 * --metrics-sessions is set.
 */
#include "server/observe.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------- histograms */

static const double bucket_le[] = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                   0.005,   0.01,   0.025,   0.05,   0.1,   0.25,
                                   0.5,     1,      2.5,     5,      10};
#define N_BUCKETS (sizeof bucket_le / sizeof bucket_le[0])

typedef struct {
    uint64_t b[N_BUCKETS + 1]; /* the last one is +Inf only */
    uint64_t count;
    uint64_t sum_ns;
} histo;

static void observe(histo *h, double s)
{
    if (!(s >= 0))
        s = 0;
    size_t i = 0;
    while (i < N_BUCKETS && s > bucket_le[i])
        i++;
    __atomic_add_fetch(&h->b[i], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&h->count, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&h->sum_ns, (uint64_t)(s * 1e9), __ATOMIC_RELAXED);
}

static uint64_t ld(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static void add(uint64_t *p, uint64_t n)
{
    __atomic_add_fetch(p, n, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------- counters */

/* The statuses optd answers; anything else counts as "other". */
static const int statuses[] = {200, 201, 202, 204, 304, 400, 401, 404, 405, 406,
                               409, 413, 415, 422, 429, 500, 503, 504};
#define N_STATUS (sizeof statuses / sizeof statuses[0])
#define N_ROUTES (API_R_COUNT + 1) /* + unmatched */

enum { PH_DECODE, PH_KERNEL, PH_COMMIT, PH_ENCODE, N_PHASES };
static const char *const phase_names[N_PHASES] = {"decode", "kernel", "commit", "encode"};

static struct {
    uint64_t requests[N_ROUTES][N_STATUS + 1];
    histo latency[N_ROUTES];
    uint64_t bytes_in, bytes_out;
    histo phase[N_PHASES];
    histo commit_plain, commit_ckpt;
    uint64_t steps[3]; /* by STORAGE_LOG_* kind */
    uint64_t stale_rejected, stale_damped;
    uint64_t evicted;
    histo load;
    int64_t rounds_open;
    const int *parked;
    double start_time;
} M;

/* Marks of the step being handled on this thread (obs_now seconds). */
static _Thread_local double mark_engine_begin, mark_engine_end;

double obs_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int status_index(int status)
{
    for (size_t i = 0; i < N_STATUS; i++)
        if (statuses[i] == status)
            return (int)i;
    return (int)N_STATUS;
}

void obs_request_done(int route, int status, uint64_t bytes_in, uint64_t bytes_out,
                      double seconds)
{
    if (route < 0 || route > API_R_COUNT)
        route = API_R_COUNT;
    add(&M.requests[route][status_index(status)], 1);
    observe(&M.latency[route], seconds);
    add(&M.bytes_in, bytes_in);
    add(&M.bytes_out, bytes_out);
}

void obs_bytes_out(uint64_t n)
{
    add(&M.bytes_out, n);
}

void obs_step_request(double t_begin, double t_end)
{
    if (mark_engine_begin > 0 && mark_engine_begin >= t_begin && mark_engine_end <= t_end) {
        observe(&M.phase[PH_DECODE], mark_engine_begin - t_begin);
        observe(&M.phase[PH_ENCODE], t_end - mark_engine_end);
    }
    mark_engine_begin = mark_engine_end = 0;
}

void obs_step_stale(void)
{
    add(&M.stale_rejected, 1);
}

void obs_session_evicted(void)
{
    add(&M.evicted, 1);
}

void obs_session_loaded(double seconds)
{
    observe(&M.load, seconds);
}

void obs_rounds_open(int delta)
{
    __atomic_add_fetch(&M.rounds_open, delta, __ATOMIC_RELAXED);
}

void obs_set_waiting_source(const int *parked_now)
{
    M.parked = parked_now;
}

/* ------------------------------------------------- per-session series */

/* The live values of at most --metrics-sessions sessions: the first ones
 * to step keep their slot until they are deleted; the rest are counted. */
typedef struct {
    char name[API_NAME_MAX + 1];
    int64_t step;
    double lr, loss, grad_norm, update_norm;
} series;

static pthread_mutex_t series_mu = PTHREAD_MUTEX_INITIALIZER;
static series *series_tab;
static size_t series_n, series_max;
static uint64_t series_refused;

static void series_update(const eng_session *s, const eng_step_in *in, const eng_step_out *out)
{
    pthread_mutex_lock(&series_mu);
    series *e = NULL;
    for (size_t i = 0; i < series_n && !e; i++)
        if (strcmp(series_tab[i].name, s->name) == 0)
            e = &series_tab[i];
    if (!e && series_n < series_max) {
        e = &series_tab[series_n++];
        snprintf(e->name, sizeof e->name, "%s", s->name);
        e->lr = e->loss = e->grad_norm = e->update_norm = NAN;
    }
    if (e) {
        e->step = (int64_t)s->st.step;
        if (out->kind == STORAGE_LOG_STEP) {
            e->lr = out->lr;
            e->grad_norm = out->grad_norm;
            e->update_norm = out->update_norm;
        }
        if (isfinite(in->loss))
            e->loss = in->loss;
    } else {
        series_refused++;
    }
    pthread_mutex_unlock(&series_mu);
}

void obs_step_committed(const eng_session *s, const eng_step_in *in, const eng_step_out *out)
{
    double now = obs_now();
    mark_engine_end = now;
    mark_engine_begin = now - out->kernel_s - out->commit_s;
    observe(&M.phase[PH_KERNEL], out->kernel_s);
    observe(&M.phase[PH_COMMIT], out->commit_s);
    observe(out->checkpointed ? &M.commit_ckpt : &M.commit_plain, out->commit_s);
    if (out->kind >= 0 && out->kind < 3)
        add(&M.steps[out->kind], 1);
    if (in->factor < 1)
        add(&M.stale_damped, 1);
    if (series_max)
        series_update(s, in, out);
    obs_events_step(s, in, out);
}

/* -------------------------------------------------------------- scrape */

static int put_histo(api_buf *b, const char *name, const char *labels, const histo *h)
{
    int rc = 0;
    uint64_t cum = 0;
    const char *sep = labels[0] ? "," : "";
    for (size_t i = 0; i < N_BUCKETS; i++) {
        cum += ld(&h->b[i]);
        rc |= api_buf_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, bucket_le[i],
                             (unsigned long long)cum);
    }
    cum += ld(&h->b[N_BUCKETS]);
    rc |= api_buf_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
                         (unsigned long long)cum);
    const char *o = labels[0] ? "{" : "", *c = labels[0] ? "}" : "";
    rc |= api_buf_printf(b, "%s_sum%s%s%s %.9f\n", name, o, labels, c, (double)ld(&h->sum_ns) / 1e9);
    /* The count is the buckets' total: a scrape between a bucket's and the
     * count's increment would otherwise disagree with itself. */
    rc |= api_buf_printf(b, "%s_count%s%s%s %llu\n", name, o, labels, c, (unsigned long long)cum);
    return rc;
}

static int put_meta(api_buf *b, const char *name, const char *type, const char *help)
{
    return api_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static int put_gauge(api_buf *b, const char *name, const char *help, double v)
{
    int rc = put_meta(b, name, "gauge", help);
    return rc | api_buf_printf(b, "%s %.17g\n", name, v);
}

static int put_counter(api_buf *b, const char *name, const char *help, uint64_t v)
{
    int rc = put_meta(b, name, "counter", help);
    return rc | api_buf_printf(b, "%s %llu\n", name, (unsigned long long)v);
}

/* A label value: \, " and newlines escaped (session names cannot hold
 * them, but the format asks for it). */
static void label_value(char *out, size_t n, const char *v)
{
    size_t k = 0;
    for (; *v && k + 3 < n; v++) {
        if (*v == '\\' || *v == '"')
            out[k++] = '\\';
        out[k++] = *v == '\n' ? 'n' : *v;
    }
    out[k] = '\0';
}

static double rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long size = 0, rss = 0;
    if (!f)
        return 0;
    if (fscanf(f, "%llu %llu", &size, &rss) != 2)
        rss = 0;
    fclose(f);
    return (double)rss * (double)sysconf(_SC_PAGESIZE);
}

static double open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return 0;
    double n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

/* Sessions in storage, counted a page at a time; refreshed at most every
 * STORED_REFRESH_S seconds so that a fast scraper costs little. */
#define STORED_REFRESH_S 10.0
#define STORED_PAGE 256
static pthread_mutex_t stored_mu = PTHREAD_MUTEX_INITIALIZER;
static double stored_at = -1e9;
static double stored_n = -1;

static double stored_sessions(storage *db)
{
    pthread_mutex_lock(&stored_mu);
    if (obs_now() - stored_at >= STORED_REFRESH_S) {
        storage_session_info *infos = calloc(STORED_PAGE, sizeof *infos);
        char *after = NULL;
        double n = 0;
        int got = STORED_PAGE;
        while (infos && got == STORED_PAGE) {
            got = storage_session_list(db, after, STORED_PAGE, infos);
            free(after);
            after = NULL;
            if (got < 0) {
                n = -1;
                break;
            }
            n += got;
            if (got == STORED_PAGE)
                after = strdup(infos[got - 1].name);
            for (int i = 0; i < got; i++)
                storage_session_info_free(&infos[i]);
            if (got == STORED_PAGE && !after) {
                n = -1;
                break;
            }
        }
        free(after);
        free(infos);
        if (infos && n >= 0) {
            stored_n = n;
            stored_at = obs_now();
        }
    }
    double n = stored_n;
    pthread_mutex_unlock(&stored_mu);
    return n;
}

int obs_h_metrics(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)req; /* http.c checked the token */
    api_buf b = {0};
    int rc = 0;
    char labels[256];

    rc |= put_meta(&b, "optd_http_requests_total", "counter",
                   "HTTP requests answered, by method, route and status.");
    for (size_t i = 0; i < N_ROUTES; i++) {
        const char *m = i < API_R_COUNT ? api_routes[i].method : "";
        const char *p = i < API_R_COUNT ? api_routes[i].pattern : "unmatched";
        for (size_t k = 0; k <= N_STATUS; k++) {
            uint64_t v = ld(&M.requests[i][k]);
            if (!v)
                continue;
            char st[8];
            if (k < N_STATUS)
                snprintf(st, sizeof st, "%d", statuses[k]);
            else
                snprintf(st, sizeof st, "other");
            rc |= api_buf_printf(&b,
                                 "optd_http_requests_total{method=\"%s\",route=\"%s\",status=\"%s\"} "
                                 "%llu\n",
                                 m, p, st, (unsigned long long)v);
        }
    }
    rc |= put_meta(&b, "optd_http_request_duration_seconds", "histogram",
                   "Time from the request line to the last byte queued, by route.");
    for (size_t i = 0; i < N_ROUTES; i++) {
        if (!ld(&M.latency[i].count))
            continue;
        snprintf(labels, sizeof labels, "method=\"%s\",route=\"%s\"",
                 i < API_R_COUNT ? api_routes[i].method : "",
                 i < API_R_COUNT ? api_routes[i].pattern : "unmatched");
        rc |= put_histo(&b, "optd_http_request_duration_seconds", labels, &M.latency[i]);
    }
    rc |= put_counter(&b, "optd_http_request_bytes_total", "Request body bytes received.",
                      ld(&M.bytes_in));
    rc |= put_counter(&b, "optd_http_response_bytes_total",
                      "Response body bytes sent (event streams included).", ld(&M.bytes_out));

    rc |= put_meta(&b, "optd_step_phase_seconds", "histogram",
                   "Phases of a step: decode (request to engine), kernel (clip, schedule, "
                   "update), commit (SQLite), encode (engine to answer).");
    for (int p = 0; p < N_PHASES; p++) {
        snprintf(labels, sizeof labels, "phase=\"%s\"", phase_names[p]);
        rc |= put_histo(&b, "optd_step_phase_seconds", labels, &M.phase[p]);
    }
    rc |= put_meta(&b, "optd_storage_commit_seconds", "histogram",
                   "SQLite commit of a step's log row, alone or with a checkpoint.");
    rc |= put_histo(&b, "optd_storage_commit_seconds", "checkpoint=\"false\"", &M.commit_plain);
    rc |= put_histo(&b, "optd_storage_commit_seconds", "checkpoint=\"true\"", &M.commit_ckpt);

    rc |= put_meta(&b, "optd_steps_total", "counter",
                   "Gradients committed: applied updates, accumulated micro-batches, skipped "
                   "non-finite gradients.");
    static const char *const kinds[3] = {"step", "accumulate", "skip"};
    for (int k = 0; k < 3; k++)
        rc |= api_buf_printf(&b, "optd_steps_total{kind=\"%s\"} %llu\n", kinds[k],
                             (unsigned long long)ld(&M.steps[k]));
    rc |= put_meta(&b, "optd_stale_gradients_total", "counter",
                   "Stale gradients: refused (stale=reject) or applied with a damped lr.");
    rc |= api_buf_printf(&b, "optd_stale_gradients_total{outcome=\"rejected\"} %llu\n",
                         (unsigned long long)ld(&M.stale_rejected));
    rc |= api_buf_printf(&b, "optd_stale_gradients_total{outcome=\"damped\"} %llu\n",
                         (unsigned long long)ld(&M.stale_damped));

    rc |= put_gauge(&b, "optd_sessions_hot", "Sessions held in memory.",
                    (double)srv_registry_hot_count(ctx->reg));
    double stored = stored_sessions(ctx->db);
    if (stored >= 0)
        rc |= put_gauge(&b, "optd_sessions_stored",
                        "Sessions in the database (refreshed every 10 s at most).", stored);
    rc |= put_counter(&b, "optd_sessions_evicted_total",
                      "Sessions evicted from memory under --cache-mb.", ld(&M.evicted));
    rc |= put_meta(&b, "optd_session_load_seconds", "histogram",
                   "Loading a cold session: checkpoint read and log replay.");
    rc |= put_histo(&b, "optd_session_load_seconds", "", &M.load);
    rc |= put_gauge(&b, "optd_sync_rounds_open", "Synchronous rounds waiting for workers.",
                    (double)__atomic_load_n(&M.rounds_open, __ATOMIC_RELAXED));
    rc |= put_gauge(&b, "optd_sync_workers_waiting",
                    "Step requests parked until their round closes.",
                    M.parked ? (double)__atomic_load_n(M.parked, __ATOMIC_RELAXED) : 0);
    rc |= put_gauge(&b, "optd_event_watchers", "Event streams attached.",
                    (double)obs_events_watchers());
    rc |= put_counter(&b, "optd_event_watchers_dropped_total",
                      "Event streams ended because the watcher read too slowly.",
                      obs_events_dropped());

    rc |= put_gauge(&b, "process_resident_memory_bytes", "Resident memory size in bytes.",
                    rss_bytes());
    rc |= put_gauge(&b, "process_open_fds", "Open file descriptors.", open_fds());
    rc |= put_gauge(&b, "process_start_time_seconds",
                    "Start time of the process since the epoch in seconds.", M.start_time);

    if (series_max) {
        static const char *const names[5][2] = {
            {"optd_session_step", "A session's step (--metrics-sessions)."},
            {"optd_session_lr", "The lr of a session's last update."},
            {"optd_session_loss", "The last loss a session's workers reported."},
            {"optd_session_grad_norm", "The gradient norm of a session's last update."},
            {"optd_session_update_norm", "The update norm of a session's last update."}};
        pthread_mutex_lock(&series_mu);
        for (int k = 0; k < 5; k++) {
            rc |= put_meta(&b, names[k][0], "gauge", names[k][1]);
            for (size_t i = 0; i < series_n; i++) {
                const series *e = &series_tab[i];
                double v = k == 0 ? (double)e->step
                           : k == 1 ? e->lr
                           : k == 2 ? e->loss
                           : k == 3 ? e->grad_norm
                                    : e->update_norm;
                char lv[2 * API_NAME_MAX + 1];
                label_value(lv, sizeof lv, e->name);
                if (isfinite(v))
                    rc |= api_buf_printf(&b, "%s{session=\"%s\"} %.17g\n", names[k][0], lv, v);
                else
                    rc |= api_buf_printf(&b, "%s{session=\"%s\"} NaN\n", names[k][0], lv);
            }
        }
        uint64_t refused = series_refused;
        pthread_mutex_unlock(&series_mu);
        rc |= put_counter(&b, "optd_session_series_refused_total",
                          "Steps of sessions beyond --metrics-sessions (no series of their own).",
                          refused);
    }
    if (rc) {
        free(b.data);
        return api_problem(r, 503, NULL, "out of memory");
    }
    api_reply_body(r, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
    return 200;
}

int obs_metrics_init(const srv_config *cfg)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    M.start_time = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    series_max = cfg->metrics_sessions;
    if (series_max) {
        series_tab = calloc(series_max, sizeof *series_tab);
        if (!series_tab)
            return -1;
    }
    return 0;
}
