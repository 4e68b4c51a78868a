/*
 * bench/travel.c -- what time travel costs, on a daemon of its own.
 *
 *   build/bench/travel [--size 1000000] [--steps 1000] [--backup-mb 1024]
 *                      [--optd PATH]
 *
 * Rollback and fork: an Adam session of --size float32 params with
 * retain {every_steps: steps, keep: 2} takes `steps` steps (the kept
 * checkpoint lands on the last), then `steps` more, timed at the client
 * (binary gradients, ?params=false): the live time.  Then a rollback to
 * the step before the head (the nearest kept checkpoint is `steps` - 1
 * updates back: the daemon replays them) and a fork at that step, each
 * timed as one request.  The target: <= 0.5x the live time.
 *
 * Backup: sessions of 1e7 params are stepped until the database and its
 * files hold about --backup-mb MB; then a client steps a small session in
 * a loop (latency of each step recorded) while `optd backup` copies the
 * database; p50/p99/max step latency before and during the backup, and the
 * backup's time, are printed.  --backup-mb 0 skips it.
 */
#define _GNU_SOURCE
#include "clients/c/optd_client.h"

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
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char daemon_dir[256], daemon_url[64], daemon_db[512];
static pid_t daemon_pid;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void daemon_stop(void)
{
    if (daemon_pid > 0) {
        kill(daemon_pid, SIGTERM);
        waitpid(daemon_pid, NULL, 0);
        daemon_pid = 0;
    }
    if (daemon_dir[0]) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", daemon_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "bench/travel: could not remove %s\n", daemon_dir);
        daemon_dir[0] = '\0';
    }
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "bench/travel: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    daemon_stop();
    exit(1);
}

static void daemon_start(const char *bin)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(daemon_dir, sizeof daemon_dir, "%s/optd-bench-travel-XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(daemon_dir)) {
        daemon_dir[0] = '\0';
        die("mkdtemp: %s", strerror(errno));
    }
    char log[512];
    snprintf(daemon_db, sizeof daemon_db, "%s/optd.db", daemon_dir);
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
        execl(bin, bin, "--bind", "127.0.0.1", "--port", "0", "--db", daemon_db, "--log-level",
              "warn", "--cache-mb", "4096", (char *)NULL);
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
        if (read(out[0], line + len, 1) <= 0 || line[len] == '\n')
            break;
        len++;
    }
    line[len] = '\0';
    const char *pre = "optd listening on ";
    if (strncmp(line, pre, strlen(pre)) != 0)
        die("%s did not start (first line: \"%s\")", bin, line);
    snprintf(daemon_url, sizeof daemon_url, "%.63s", line + strlen(pre));
}

static void fill(float *g, size_t n, int i)
{
    for (size_t j = 0; j < n; j++)
        g[j] = (float)sin((double)i * 0.37 + (double)(j % 1000) * 0.013) * 0.01f;
}

static void step_or_die(optd_client *c, const char *name, float *g, size_t n)
{
    optd_error e;
    optd_step_opts o = optd_step_opts_default();
    if (optd_step_f32_opts(c, name, g, n, NULL, &o, NULL, NULL, NULL, &e) != 0)
        die("step %s: %d %s", name, e.status, e.detail);
}

static double timed_post(optd_client *c, const char *method, const char *path, const char *body)
{
    optd_response r;
    double t0 = now_s();
    if (optd_request(c, method, path, NULL, body, strlen(body), &r) != 0)
        die("%s %s: no answer", method, path);
    double t = now_s() - t0;
    if (r.status >= 300)
        die("%s %s: %d %.*s", method, path, r.status, (int)r.len, r.body);
    optd_response_free(&r);
    return t;
}

static void bench_rollback(optd_client *c, size_t n, int steps)
{
    char cfg[256];
    snprintf(cfg, sizeof cfg,
             "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.001},\"size\":%zu,"
             "\"retain\":{\"every_steps\":%d,\"keep\":2}}",
             n, steps);
    optd_error e;
    if (optd_create_session(c, "tr", cfg, &e) < 0)
        die("create: %s", e.detail);
    float *g = malloc(n * sizeof *g);
    if (!g)
        die("out of memory");
    for (int i = 0; i < steps; i++) {
        fill(g, n, i);
        step_or_die(c, "tr", g, n);
    }
    double t0 = now_s();
    for (int i = steps; i < 2 * steps; i++) {
        fill(g, n, i);
        step_or_die(c, "tr", g, n);
    }
    double live = now_s() - t0;
    char body[64];
    snprintf(body, sizeof body, "{\"step\":%d}", 2 * steps - 1);
    double rb = timed_post(c, "POST", "/v1/sessions/tr/rollback", body);
    snprintf(body, sizeof body, "{\"fork\":{\"from\":\"tr\",\"step\":%d}}", 2 * steps - 2);
    double fk = timed_post(c, "PUT", "/v1/sessions/tr-fork", body);
    printf("rollback/fork: %zu float32 params, Adam, a kept checkpoint %d steps back\n", n,
           steps);
    printf("  %d live steps (binary, params=false): %8.3f s  (%.2f ms/step)\n", steps, live,
           live * 1e3 / steps);
    printf("  rollback to step %d (%d replayed):   %8.3f s  = %.3fx the live time\n",
           2 * steps - 1, steps - 1, rb, rb / live);
    printf("  fork at step %d (%d replayed):       %8.3f s  = %.3fx the live time\n",
           2 * steps - 2, steps - 2, fk, fk / live);
    free(g);
    optd_delete(c, "tr", &e);
    optd_delete(c, "tr-fork", &e);
}

typedef struct {
    double *lat;
    size_t n, cap;
    volatile int stop;
    char url[64];
} prober;

static void *probe(void *arg)
{
    prober *p = arg;
    optd_client *c = optd_client_new(p->url, NULL);
    float g[1000];
    fill(g, 1000, 1);
    while (!p->stop && p->n < p->cap) {
        double t0 = now_s();
        step_or_die(c, "probe", g, 1000);
        p->lat[p->n++] = now_s() - t0;
    }
    optd_client_free(c);
    return NULL;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *what, double *lat, size_t n)
{
    if (n == 0) {
        printf("  %-22s no steps\n", what);
        return;
    }
    qsort(lat, n, sizeof *lat, cmp_d);
    printf("  %-22s %6zu steps  p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms\n", what, n,
           lat[n / 2] * 1e3, lat[(size_t)((double)n * 0.99)] * 1e3, lat[n - 1] * 1e3);
}

static long long du(const char *path)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "du -sb '%s' '%s.d' 2>/dev/null | awk '{s+=$1} END {print s}'",
             path, path);
    FILE *f = popen(cmd, "r");
    long long v = 0;
    if (f) {
        if (fscanf(f, "%lld", &v) != 1)
            v = 0;
        pclose(f);
    }
    return v;
}

static void bench_backup(optd_client *c, const char *bin, long long mb)
{
    enum { BIG = 10000000 };
    float *g = malloc((size_t)BIG * sizeof *g);
    if (!g)
        die("out of memory");
    optd_error e;
    int k = 0;
    while (du(daemon_db) < mb * 1000 * 1000) {
        char name[32], cfg[256];
        snprintf(name, sizeof name, "big%d", k);
        snprintf(cfg, sizeof cfg,
                 "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.001},\"size\":%d,"
                 "\"retain\":{\"every_steps\":4,\"keep\":3}}",
                 BIG);
        if (optd_create_session(c, name, cfg, &e) < 0)
            die("create: %s", e.detail);
        for (int i = 0; i < 12; i++) {
            fill(g, BIG, i);
            step_or_die(c, name, g, BIG);
        }
        k++;
    }
    free(g);
    long long size = du(daemon_db);
    if (optd_create_session(c, "probe", "{\"optimizer\":\"sgd\",\"size\":1000}", &e) < 0)
        die("create: %s", e.detail);
    prober p = {.cap = 1000000};
    p.lat = malloc(p.cap * sizeof *p.lat);
    snprintf(p.url, sizeof p.url, "%s", daemon_url);
    pthread_t th;
    pthread_create(&th, NULL, probe, &p);
    usleep(3000000);
    size_t before = p.n;
    char out[600], cmd[1400];
    snprintf(out, sizeof out, "%s/backup.db", daemon_dir);
    snprintf(cmd, sizeof cmd, "'%s' backup --db '%s' '%s' 2>/dev/null", bin, daemon_db, out);
    double t0 = now_s();
    int rc = system(cmd);
    double bt = now_s() - t0;
    size_t during = p.n;
    p.stop = 1;
    pthread_join(th, NULL);
    if (rc != 0)
        die("optd backup failed (%d)", rc);
    printf("backup: a database of %.0f MB (%d sessions of 1e7 params)\n", (double)size / 1e6, k);
    printf("  optd backup: %.2f s (%.0f MB/s)\n", bt, (double)du(out) / 1e6 / bt);
    printf("  a 1000-param session stepped in a loop:\n");
    report("before the backup", p.lat, before);
    report("during the backup", p.lat + before, during - before);
    free(p.lat);
}

int main(int argc, char **argv)
{
    size_t n = 1000000;
    int steps = 1000;
    long long backup_mb = 1024;
    const char *bin = "build/optd";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--size") == 0 && i + 1 < argc)
            n = (size_t)atoll(argv[++i]);
        else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--backup-mb") == 0 && i + 1 < argc)
            backup_mb = atoll(argv[++i]);
        else if (strcmp(argv[i], "--optd") == 0 && i + 1 < argc)
            bin = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--size N] [--steps K] [--backup-mb M] [--optd PATH]\n",
                    argv[0]);
            return 2;
        }
    }
    if (n < 1 || steps < 2)
        die("--size must be >= 1 and --steps >= 2");
    daemon_start(bin);
    optd_client *c = optd_client_new(daemon_url, NULL);
    optd_client_set_timeouts(c, 10000, 3600000);
    bench_rollback(c, n, steps);
    if (backup_mb > 0)
        bench_backup(c, bin, backup_mb);
    optd_client_free(c);
    daemon_stop();
    return 0;
}
