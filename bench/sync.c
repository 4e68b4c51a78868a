/*
 * bench/sync.c -- synchronous rounds against the same gradients sent as
 * independent async steps, on a daemon of its own.
 *
 *   build/bench/sync [--workers 2,4,8,16] [--sizes 1000,1000000]
 *                    [--seconds 2] [--optimizer adam] [--optd PATH]
 *
 * For every size and worker count N: N threads, each with its own client
 * (one libcurl handle, one keep-alive connection), send binary float32
 * gradients and get the params back.  Sync: a session in mode sync with N
 * workers; one round is one gradient from every thread and one update.
 * Async: a session of the same size in mode async; every thread sends the
 * same number of gradients, each one an update.  Both runs move the same
 * gradients, so the ratio of their times shows what the barrier costs (or
 * saves: a round commits one update where async commits N).  The number of
 * rounds per cell is calibrated so that the sync run lasts about --seconds.
 * bench/SYNC.md explains the columns and gives a table measured here.
 */
#define _GNU_SOURCE
#include "clients/c/optd_client.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_LIST 8
#define MAX_WORKERS 64
#define MIN_ROUNDS 3
#define MIN_ROUNDS_LARGE 3
#define REPS 3
#define LARGE 100000
#define MAX_ROUNDS 5000
#define ROUND_TIMEOUT_MS 120000

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* ------------------------------------------------------------ daemon */

static pid_t daemon_pid;
static char daemon_dir[256];
static char daemon_url[64];

static void daemon_stop(void)
{
    if (daemon_pid > 0) {
        kill(daemon_pid, SIGTERM);
        int st;
        for (int i = 0; i < 2000; i++) { /* 20 s, then a crash */
            if (waitpid(daemon_pid, &st, WNOHANG) == daemon_pid) {
                daemon_pid = 0;
                break;
            }
            struct timespec ts = {0, 10000000L};
            nanosleep(&ts, NULL);
        }
        if (daemon_pid > 0) {
            kill(daemon_pid, SIGKILL);
            waitpid(daemon_pid, &st, 0);
            daemon_pid = 0;
        }
    }
    if (daemon_dir[0]) {
        DIR *d = opendir(daemon_dir);
        struct dirent *e;
        char path[512];
        while (d && (e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(path, sizeof path, "%s/%s", daemon_dir, e->d_name);
            unlink(path);
        }
        if (d)
            closedir(d);
        rmdir(daemon_dir);
        daemon_dir[0] = '\0';
    }
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "bench/sync: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    if (daemon_dir[0]) {
        char log[512], line[512];
        snprintf(log, sizeof log, "%s/optd.log", daemon_dir);
        FILE *f = fopen(log, "r");
        while (f && fgets(line, sizeof line, f))
            fputs(line, stderr);
        if (f)
            fclose(f);
    }
    daemon_stop();
    exit(1);
}

/* Starts optd on a free port with a fresh database in a temp dir and
 * reads the port back from its first line. */
static void daemon_start(const char *bin)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(daemon_dir, sizeof daemon_dir, "%s/optd-bench-sync-XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(daemon_dir)) {
        daemon_dir[0] = '\0';
        die("mkdtemp: %s", strerror(errno));
    }
    char db[512], log[512];
    snprintf(db, sizeof db, "%s/optd.db", daemon_dir);
    snprintf(log, sizeof log, "%s/optd.log", daemon_dir);
    int out[2];
    if (pipe(out) != 0)
        die("pipe: %s", strerror(errno));
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        int lf = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(out[1], 1);
        if (lf >= 0)
            dup2(lf, 2);
        close(out[0]);
        execl(bin, bin, "--bind", "127.0.0.1", "--port", "0", "--db", db, "--log-level", "warn",
              (char *)NULL);
        fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    daemon_pid = pid;
    close(out[1]);
    char line[256];
    size_t len = 0;
    double deadline = now_s() + 20;
    while (len < sizeof line - 1 && now_s() < deadline) {
        struct pollfd p = {.fd = out[0], .events = POLLIN};
        if (poll(&p, 1, 100) <= 0)
            continue;
        ssize_t n = read(out[0], line + len, 1);
        if (n <= 0)
            break;
        if (line[len] == '\n')
            break;
        len++;
    }
    line[len] = '\0';
    /* The pipe stays open (the daemon writes nothing more to stdout). */
    const char *pre = "optd listening on ";
    if (strncmp(line, pre, strlen(pre)) != 0)
        die("%s did not start (first line: \"%s\")", bin, line);
    snprintf(daemon_url, sizeof daemon_url, "%.63s", line + strlen(pre));
}

/* ------------------------------------------------------------ workers */

typedef struct {
    const char *session;
    int id;
    bool sync;
    int rounds;
    long long base;   /* sync: the step of the first round */
    size_t n;
    float *grad, *params;
    pthread_barrier_t *go;
    optd_client *c;
    int errors;
    char why[640];
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;
    char name[32];
    snprintf(name, sizeof name, "w%d", w->id);
    optd_step_opts o = optd_step_opts_default(); /* binary both ways */
    o.worker = name;
    pthread_barrier_wait(w->go);
    for (int r = 0; r < w->rounds; r++) {
        if (w->sync)
            o.base_step = w->base + r;
        optd_error e;
        long long step = -1;
        if (optd_step_f32_opts(w->c, w->session, w->grad, w->n, NULL, &o, w->params, &step, NULL,
                               &e) != 0) {
            if (w->errors++ == 0)
                snprintf(w->why, sizeof w->why, "%s round %d: %d %s", w->session, r, e.status,
                         e.detail);
            break;
        }
        if (w->sync && step != w->base + r + 1 && w->errors++ == 0)
            snprintf(w->why, sizeof w->why, "%s round %d answered step %lld", w->session, r,
                     step);
    }
    return NULL;
}

typedef struct {
    int n_workers;
    size_t size;
    worker w[MAX_WORKERS];
    pthread_t th[MAX_WORKERS];
    optd_client *c[MAX_WORKERS];
    float *grad[MAX_WORKERS], *params[MAX_WORKERS];
    long long sync_step;
} cell;

/* Runs rounds gradients per worker against session; returns the seconds
 * from the start barrier to the last answer. */
static double run(cell *k, const char *session, bool sync, int rounds)
{
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, (unsigned)k->n_workers + 1);
    for (int i = 0; i < k->n_workers; i++) {
        k->w[i] = (worker){.session = session, .id = i, .sync = sync, .rounds = rounds,
                           .base = k->sync_step, .n = k->size, .grad = k->grad[i],
                           .params = k->params[i], .go = &go, .c = k->c[i]};
        if (pthread_create(&k->th[i], NULL, worker_main, &k->w[i]) != 0)
            die("pthread_create failed");
    }
    pthread_barrier_wait(&go);
    double t0 = now_s();
    for (int i = 0; i < k->n_workers; i++)
        pthread_join(k->th[i], NULL);
    double t = now_s() - t0;
    pthread_barrier_destroy(&go);
    for (int i = 0; i < k->n_workers; i++)
        if (k->w[i].errors)
            die("worker %d: %d errors; first: %s", i, k->w[i].errors, k->w[i].why);
    if (sync)
        k->sync_step += rounds;
    return t;
}

static void create(optd_client *c, const char *name, const char *optimizer, size_t size,
                   const char *mode)
{
    char cfg[512];
    snprintf(cfg, sizeof cfg,
             "{\"optimizer\":%s,\"size\":%zu,\"init\":{\"type\":\"normal\",\"std\":0.1,"
             "\"seed\":7},\"mode\":%s}",
             optimizer, size, mode);
    optd_error e;
    if (optd_create_session(c, name, cfg, &e) < 0)
        die("create %s: %d %s", name, e.status, e.detail);
}

typedef struct {
    size_t size;
    int workers, rounds;
    double sync_rate, async_rate; /* rounds/s; async: workers gradients per round */
    double ratio;                 /* async time / sync time for the same gradients */
} result;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void measure(const char *optimizer, size_t size, int n_workers, double seconds,
                    result *res)
{
    static cell k;
    memset(&k, 0, sizeof k);
    k.n_workers = n_workers;
    k.size = size;
    for (int i = 0; i < n_workers; i++) {
        k.c[i] = optd_client_new(daemon_url, NULL);
        k.grad[i] = malloc(size * sizeof(float));
        k.params[i] = malloc(size * sizeof(float));
        if (!k.c[i] || !k.grad[i] || !k.params[i])
            die("out of memory");
        optd_client_set_retry(k.c[i], 1, 0, 0);
        optd_client_set_timeouts(k.c[i], 5000, ROUND_TIMEOUT_MS);
        unsigned seed = (unsigned)(i * 2654435761u + size);
        for (size_t j = 0; j < size; j++)
            k.grad[i][j] = (float)((double)rand_r(&seed) / RAND_MAX - 0.5) * 1e-2f;
    }
    char s_name[64], a_name[64], mode[160];
    snprintf(s_name, sizeof s_name, "sync-%zu-%d", size, n_workers);
    snprintf(a_name, sizeof a_name, "async-%zu-%d", size, n_workers);
    snprintf(mode, sizeof mode, "{\"type\":\"sync\",\"workers\":%d,\"timeout_ms\":%d}",
             n_workers, ROUND_TIMEOUT_MS);
    create(k.c[0], s_name, optimizer, size, mode);
    create(k.c[0], a_name, optimizer, size, "{\"type\":\"async\"}");

    /* Small sessions: a warm-up (connections, first loads) and a probe of
     * 20 rounds for the pace.  Large ones: one round is both, since its
     * cost dwarfs a connect, and each round is dear on a 2-minute budget. */
    bool large = size >= LARGE;
    if (!large) {
        run(&k, s_name, true, 1);
        run(&k, a_name, false, 1);
    }
    int probe = large ? 1 : 20;
    double tp = run(&k, s_name, true, probe) / probe;
    int rounds = (int)fmin(MAX_ROUNDS,
                           fmax(large ? MIN_ROUNDS_LARGE : MIN_ROUNDS, seconds / fmax(tp, 1e-6)));

    /* The machine is shared: alternate sync and async in REPS slices so
     * that both see the same background load, and keep the medians. */
    int reps = rounds < REPS ? rounds : REPS, per = rounds / reps;
    double sr[REPS], ar[REPS], ratio[REPS];
    for (int i = 0; i < reps; i++) {
        double ts = run(&k, s_name, true, per);
        double ta = run(&k, a_name, false, per);
        sr[i] = per / ts;
        ar[i] = per / ta;
        ratio[i] = ta / ts;
    }
    res->size = size;
    res->workers = n_workers;
    res->rounds = per * reps;
    res->sync_rate = median(sr, reps);
    res->async_rate = median(ar, reps);
    res->ratio = median(ratio, reps);

    optd_error e;
    if (optd_delete(k.c[0], s_name, &e) || optd_delete(k.c[0], a_name, &e))
        die("delete: %d %s", e.status, e.detail);
    for (int i = 0; i < n_workers; i++) {
        optd_client_free(k.c[i]);
        free(k.grad[i]);
        free(k.params[i]);
    }
}

/* ---------------------------------------------------------------- main */

static int parse_list(const char *s, double *out, int *n)
{
    *n = 0;
    while (*s && *n < MAX_LIST) {
        char *end;
        double v = strtod(s, &end);
        if (end == s || v < 1)
            return -1;
        out[(*n)++] = v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return *n ? 0 : -1;
}

static void usage(void)
{
    fprintf(stderr, "usage: sync [--workers 2,4,8,16] [--sizes 1000,1000000] [--seconds 2]\n"
                    "            [--optimizer adam|sgd] [--optd PATH]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    double wl[MAX_LIST] = {2, 4, 8, 16}, sl[MAX_LIST] = {1000, 1000000};
    int n_w = 4, n_s = 2;
    double seconds = 2;
    const char *opt_name = "adam";
    char bin[512];
    const char *env = getenv("OPTD_BIN");
    const char *slash = strrchr(argv[0], '/');
    if (env && *env)
        snprintf(bin, sizeof bin, "%s", env);
    else if (slash)
        snprintf(bin, sizeof bin, "%.*s/../optd", (int)(slash - argv[0]), argv[0]);
    else
        snprintf(bin, sizeof bin, "build/optd");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        if (strcmp(a, "--workers") == 0 && parse_list(v, wl, &n_w) == 0) {
        } else if (strcmp(a, "--sizes") == 0 && parse_list(v, sl, &n_s) == 0) {
        } else if (strcmp(a, "--seconds") == 0 && (seconds = strtod(v, NULL)) > 0) {
        } else if (strcmp(a, "--optimizer") == 0 &&
                   (strcmp(v, "adam") == 0 || strcmp(v, "sgd") == 0)) {
            opt_name = v;
        } else if (strcmp(a, "--optd") == 0) {
            snprintf(bin, sizeof bin, "%s", v);
        } else {
            usage();
        }
        i++;
    }
    for (int i = 0; i < n_w; i++)
        if (wl[i] > MAX_WORKERS)
            die("at most %d workers", MAX_WORKERS);
    const char *optimizer = strcmp(opt_name, "adam") == 0
                                ? "{\"type\":\"adam\",\"lr\":0.001}"
                                : "{\"type\":\"sgd\",\"lr\":0.01,\"momentum\":0.9}";

    signal(SIGPIPE, SIG_IGN);
    daemon_start(bin);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    printf("bench/sync: float32 %s, binary bodies, params back to every worker; optd %s on %ld "
           "cores\n",
           opt_name, daemon_url, cores);
    printf("%9s %7s %6s | %10s %10s | %10s %10s | %9s\n", "params", "workers", "rounds",
           "sync r/s", "sync g/s", "async r/s", "async g/s", "sync/async");
    fflush(stdout);
    double t0 = now_s();
    for (int si = 0; si < n_s; si++) {
        for (int wi = 0; wi < n_w; wi++) {
            result r;
            measure(optimizer, (size_t)sl[si], (int)wl[wi], seconds, &r);
            printf("%9zu %7d %6d | %10.1f %10.0f | %10.1f %10.0f | %9.2f\n", r.size, r.workers,
                   r.rounds, r.sync_rate, r.sync_rate * r.workers, r.async_rate,
                   r.async_rate * r.workers, r.ratio);
            fflush(stdout);
        }
    }
    printf("(r/s: rounds per second -- for async, the same gradients' worth: workers gradients "
           "per round;\n g/s: gradients per second; sync/async: how many times faster the "
           "rounds moved the same\n gradients; medians of %d alternating slices; total %.0f s)\n",
           REPS, now_s() - t0);
    daemon_stop();
    return 0;
}
