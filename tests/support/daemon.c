/*
 * daemon.c -- starting, stopping and crashing the real daemon for the
 * integration tests (libmicrohttpd's testcurl/ and lwan's testsuite do the
 * same: a real process on a port the kernel picked, stopped by PID).
 */
#define _GNU_SOURCE /* prctl's PR_SET_PDEATHSIG */
#include "tests/support/daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LISTEN_PREFIX "optd listening on http://127.0.0.1:"
/* With --tls-cert the daemon serves HTTPS. */
#define LISTEN_PREFIX_TLS "optd listening on https://127.0.0.1:"

/* Is this test process itself running under valgrind?  Valgrind preloads
 * its vgpreload_*.so into the programs it runs. */
static bool test_under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "vgpreload");
}

/* The command to prefix the daemon with, or NULL.  When the test itself
 * runs under valgrind (tests/run.sh with OPTD_VALGRIND=1 traces children),
 * the daemon is already traced by that valgrind: a second valgrind inside
 * the first cannot start, so no prefix then. */
static const char *daemon_prefix(void)
{
    const char *v = getenv("OPTD_VALGRIND_DAEMON");
    if (!v || !*v || test_under_valgrind())
        return NULL;
    return v;
}

static bool under_valgrind(void)
{
    return daemon_prefix() || test_under_valgrind();
}

/* Valgrind makes a start or a stop ten times slower. */
static int start_timeout_ms(void) { return under_valgrind() ? 120000 : 20000; }
static int stop_timeout_ms(void) { return under_valgrind() ? 120000 : 20000; }

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *tdaemon_url(const tdaemon *d) { return d->url; }
const char *tdaemon_db(const tdaemon *d) { return d->db; }

void tdaemon_dump_log(const tdaemon *d)
{
    FILE *f = fopen(d->log, "r");
    if (!f)
        return;
    fprintf(stderr, "---- %s\n", d->log);
    char line[1024];
    while (fgets(line, sizeof line, f))
        fputs(line, stderr);
    fprintf(stderr, "----\n");
    fclose(f);
}

/* Copies the daemon's stdout after the listening line into the log, so a
 * chatty daemon never blocks on a full pipe. */
static void *drain_main(void *arg)
{
    tdaemon *d = arg;
    int log = open(d->log, O_WRONLY | O_APPEND | O_CLOEXEC);
    char buf[4096];
    for (;;) {
        ssize_t n = read(d->out_fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (log >= 0 && write(log, buf, (size_t)n) < 0) {
            /* a lost log line must not stop the draining */
        }
    }
    if (log >= 0)
        close(log);
    return NULL;
}

static void reap_io(tdaemon *d)
{
    if (d->drain_running) {
        pthread_join(d->drain, NULL);
        d->drain_running = false;
    }
    if (d->out_fd >= 0) {
        close(d->out_fd);
        d->out_fd = -1;
    }
}

/* Splits OPTD_VALGRIND_DAEMON on spaces into argv[0..]; returns the count.
 * The words point into *store (a new string; caller frees). */
static int prefix_words(char **argv, int max, char **store)
{
    *store = NULL;
    const char *v = daemon_prefix();
    if (!v)
        return 0;
    *store = strdup(v);
    if (!*store)
        return 0;
    int n = 0;
    char *save = NULL;
    for (char *w = strtok_r(*store, " ", &save); w && n < max; w = strtok_r(NULL, " ", &save))
        argv[n++] = w;
    return n;
}

/* Forks and execs the daemon on port, then reads its stdout until it says
 * where it listens.  0; -2 when it exited before listening (the port may
 * be taken); -1 on other failures. */
static int spawn(tdaemon *d, int port)
{
    const char *bin = getenv("OPTD_BIN");
    /* tests/run.sh sets OPTD_BIN; a suite run by hand from the repository
     * root finds the default build. */
    if ((!bin || !*bin) && access("build/optd", X_OK) == 0)
        bin = "build/optd";
    if (!bin || !*bin) {
        fprintf(stderr, "tdaemon: OPTD_BIN is not set (tests/run.sh sets it to build/optd)\n");
        return -1;
    }
    char portbuf[16];
    snprintf(portbuf, sizeof portbuf, "%d", port);
    char *argv[TDAEMON_MAX_ARGS * 2 + 16];
    char *store = NULL;
    int argc = prefix_words(argv, TDAEMON_MAX_ARGS, &store);
    argv[argc++] = (char *)bin;
    argv[argc++] = "--bind";
    argv[argc++] = "127.0.0.1";
    argv[argc++] = "--port";
    argv[argc++] = portbuf;
    argv[argc++] = "--db";
    argv[argc++] = d->db;
    for (int i = 0; d->extra[i]; i++)
        argv[argc++] = d->extra[i];
    argv[argc] = NULL;

    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        perror("tdaemon: pipe");
        free(store);
        return -1;
    }
    int log = open(d->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log < 0) {
        perror("tdaemon: log");
        close(pfd[0]);
        close(pfd[1]);
        free(store);
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        perror("tdaemon: fork");
        close(pfd[0]);
        close(pfd[1]);
        close(log);
        free(store);
        return -1;
    }
    if (pid == 0) {
        /* A test that dies must not leave a daemon behind. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(pfd[1], STDOUT_FILENO);
        dup2(log, STDERR_FILENO);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    close(log);
    free(store);
    d->pid = pid;
    d->out_fd = pfd[0];

    /* Read line by line until the listening line. */
    char line[512];
    size_t len = 0;
    long long deadline = now_ms() + start_timeout_ms();
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            fprintf(stderr, "tdaemon: no listening line within %d ms\n", start_timeout_ms());
            break;
        }
        struct pollfd p = {.fd = d->out_fd, .events = POLLIN};
        int pr = poll(&p, 1, (int)left);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            continue;
        char ch;
        ssize_t n = read(d->out_fd, &ch, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) { /* EOF: the daemon exited */
            int status = 0;
            waitpid(d->pid, &status, 0);
            d->last_status = status;
            d->pid = 0;
            close(d->out_fd);
            d->out_fd = -1;
            return -2;
        }
        if (ch != '\n') {
            if (len + 1 < sizeof line)
                line[len++] = ch;
            continue;
        }
        line[len] = '\0';
        len = 0;
        bool tls = strncmp(line, LISTEN_PREFIX_TLS, strlen(LISTEN_PREFIX_TLS)) == 0;
        if (tls || strncmp(line, LISTEN_PREFIX, strlen(LISTEN_PREFIX)) == 0) {
            d->port = atoi(line + strlen(tls ? LISTEN_PREFIX_TLS : LISTEN_PREFIX));
            snprintf(d->url, sizeof d->url, "%s://127.0.0.1:%d", tls ? "https" : "http", d->port);
            if (pthread_create(&d->drain, NULL, drain_main, d) == 0)
                d->drain_running = true;
            return 0;
        }
    }
    kill(d->pid, SIGKILL);
    waitpid(d->pid, NULL, 0);
    d->pid = 0;
    close(d->out_fd);
    d->out_fd = -1;
    return -1;
}

int tdaemon_start(tdaemon *d, const char *db_path, const char *const *extra_args)
{
    memset(d, 0, sizeof *d);
    d->out_fd = -1;
    snprintf(d->dir, sizeof d->dir, "/tmp/optd-test-XXXXXX");
    if (!mkdtemp(d->dir)) {
        perror("tdaemon: mkdtemp");
        d->dir[0] = '\0';
        return -1;
    }
    snprintf(d->log, sizeof d->log, "%s/optd.log", d->dir);
    if (db_path)
        snprintf(d->db, sizeof d->db, "%s", db_path);
    else
        snprintf(d->db, sizeof d->db, "%s/optd.db", d->dir);
    for (int i = 0; extra_args && extra_args[i]; i++) {
        if (i >= TDAEMON_MAX_ARGS || !(d->extra[i] = strdup(extra_args[i]))) {
            fprintf(stderr, "tdaemon: too many extra arguments\n");
            return -1;
        }
    }
    int rc = spawn(d, 0);
    if (rc != 0) {
        fprintf(stderr, "tdaemon: the daemon did not start (wait status %d)\n", d->last_status);
        tdaemon_dump_log(d);
        return -1;
    }
    return 0;
}

/* Waits up to ms for the daemon to exit; true when it did. */
static bool wait_exit(tdaemon *d, int ms)
{
    long long deadline = now_ms() + ms;
    for (;;) {
        int status;
        pid_t r = waitpid(d->pid, &status, WNOHANG);
        if (r == d->pid || (r < 0 && errno == ECHILD)) {
            d->last_status = r == d->pid ? status : 0;
            d->pid = 0;
            return true;
        }
        if (now_ms() >= deadline)
            return false;
        struct timespec ts = {0, 5 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int tdaemon_stop(tdaemon *d)
{
    if (d->pid <= 0)
        return 0;
    kill(d->pid, SIGTERM);
    int rc;
    if (!wait_exit(d, stop_timeout_ms())) {
        fprintf(stderr, "tdaemon: pid %d ignored SIGTERM for %d ms; killing it\n", (int)d->pid,
                stop_timeout_ms());
        kill(d->pid, SIGKILL);
        waitpid(d->pid, &d->last_status, 0);
        d->pid = 0;
        rc = -1;
    } else if (WIFEXITED(d->last_status)) {
        rc = WEXITSTATUS(d->last_status);
    } else {
        rc = -1;
    }
    reap_io(d);
    if (rc != 0) {
        fprintf(stderr, "tdaemon: daemon exited badly (wait status %d)\n", d->last_status);
        tdaemon_dump_log(d);
    }
    return rc;
}

int tdaemon_kill9(tdaemon *d)
{
    if (d->pid <= 0)
        return -1;
    kill(d->pid, SIGKILL);
    int status;
    pid_t r;
    while ((r = waitpid(d->pid, &status, 0)) < 0 && errno == EINTR) {
    }
    d->last_status = status;
    d->pid = 0;
    reap_io(d);
    return r > 0 ? 0 : -1;
}

int tdaemon_restart(tdaemon *d)
{
    if (d->pid > 0 && tdaemon_stop(d) != 0)
        return -1;
    int rc = spawn(d, d->port);
    if (rc == -2) /* the old port was taken meanwhile: any port will do */
        rc = spawn(d, 0);
    if (rc != 0) {
        fprintf(stderr, "tdaemon: restart failed (wait status %d)\n", d->last_status);
        tdaemon_dump_log(d);
        return -1;
    }
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

void tdaemon_cleanup(tdaemon *d)
{
    if (d->pid > 0)
        tdaemon_stop(d);
    reap_io(d);
    if (d->dir[0]) {
        nftw(d->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        d->dir[0] = '\0';
    }
    for (int i = 0; i < TDAEMON_MAX_ARGS && d->extra[i]; i++) {
        free(d->extra[i]);
        d->extra[i] = NULL;
    }
}
