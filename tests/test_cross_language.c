/*
 * test_cross_language.c -- one session, four clients.
 *
 * The Python, JavaScript, C and Go clients drive the same daemon: in turns
 * (Python sends steps 0..24, JS 25..49, C 50..74, Go 75..99 of one session)
 * and in synchronous rounds (all four at once, one gradient each per round).
 * Every worker is its own process running its language's client: the
 * programs in tests/cross/ (the Go one built once per run), and for C a
 * fork of this binary.  Each worker prints, after every step, the step the
 * daemon reported and the params as the hex of their little-endian bytes;
 * the test checks every line against a reference computed here: bit for bit
 * for SGD in float64, within 1e-6 of torch's Adam rule (in double) in float32.  Each
 * worker alternates its client's default wire form with forced JSON and
 * forced binary steps; the workers reach the daemon through a relay that
 * counts both forms, so the wire itself shows that every language sent each.
 *
 * The gradient stream g(t, i, w) = (((7t + 13i + 5w) mod 17) - 8) / 8 is
 * k/8 with |k| <= 8, exact in both dtypes, so every language computes the
 * same bits; with lr 1/8, SGD's products, the round means (sums of eighths
 * over 4) and the params stay exact, so the reference is exact too.
 *
 * Needs /usr/bin/python3, node and go (Debian: python3, nodejs, golang-go):
 * a missing toolchain fails the suite.  Run from the repository root.
 */
#define _GNU_SOURCE /* prctl's PR_SET_PDEATHSIG */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "clients/c/optd_client.h"
#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

enum {
    SIZE = 16,       /* params per session                                */
    TURN = 25,       /* steps per language in turns                       */
    ROUNDS = 50,     /* synchronous rounds                                */
    PATH_LEN = 4096,
};

/* A worker that takes longer than this is killed and fails the test (the
 * whole suite normally runs in a few seconds). */
#define WORKER_TIMEOUT_MS 60000LL
#define GO_BUILD_TIMEOUT_MS 180000LL

typedef enum { LANG_PY, LANG_JS, LANG_C, LANG_GO, N_LANGS } lang_id;

/* Also each worker's id (Optd-Worker / "worker"). */
static const char *const lang_name[N_LANGS] = {"py", "js", "c", "go"};

static double grad_value(long long t, int i, int w)
{
    return (double)((7 * t + 13 * i + 5 * w) % 17 - 8) / 8.0;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

/* Under valgrind (the test, the daemon or both) everything is ten to fifty
 * times slower: the C worker and the daemon are traced, the others are
 * not. */
static long long worker_timeout_ms(void)
{
    const char *p = getenv("LD_PRELOAD");
    const char *v = getenv("OPTD_VALGRIND_DAEMON");
    bool slow = (v && *v) || (p && strstr(p, "vgpreload"));
    return slow ? 20 * WORKER_TIMEOUT_MS : WORKER_TIMEOUT_MS;
}

/* --------------------------------------------------- little-endian bytes */

/* n elements of dtype dt as little-endian bytes (put_le), and element i of
 * such bytes as a double (get_le): the workers print exactly these bytes,
 * whatever the host's byte order. */
static void put_le(optim_dtype dt, const void *v, size_t n, unsigned char *out)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t bits = 0;
        size_t w = optim_dtype_size(dt);
        if (dt == OPTIM_F64) {
            memcpy(&bits, (const double *)v + i, 8);
        } else {
            uint32_t b32;
            memcpy(&b32, (const float *)v + i, 4);
            bits = b32;
        }
        for (size_t k = 0; k < w; k++)
            out[i * w + k] = (unsigned char)(bits >> (8 * k));
    }
}

static double get_le(optim_dtype dt, const unsigned char *b, size_t i)
{
    size_t w = optim_dtype_size(dt);
    uint64_t bits = 0;
    for (size_t k = 0; k < w; k++)
        bits |= (uint64_t)b[i * w + k] << (8 * k);
    if (dt == OPTIM_F64) {
        double d;
        memcpy(&d, &bits, 8);
        return d;
    }
    uint32_t b32 = (uint32_t)bits;
    float f;
    memcpy(&f, &b32, 4);
    return f;
}

static int hex_digit(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* ------------------------------------------------------ a counting proxy
 *
 * The workers reach the daemon through a byte-for-byte TCP relay that
 * counts the step bodies of each wire form it sees go by (the
 * Content-Type of each request), so the test knows from the wire, not
 * from the clients' word, that every language sent both JSON and binary
 * steps.  One thread, poll(); a handful of small requests at a time.
 */
#define PX_PAIRS 64
#define PX_TAIL 64 /* longer than "content-type:" + spaces + the longest type */

typedef struct {
    int listen_fd, wake[2];
    int daemon_port;
    char url[64];
    pthread_t th;
    bool running;
    int fd_c[PX_PAIRS], fd_s[PX_PAIRS]; /* client side, daemon side; -1: free */
    char tail[PX_PAIRS][PX_TAIL];       /* the end of what the client sent  */
    size_t tail_len[PX_PAIRS];
    long n_json, n_binary;              /* atomics                          */
} proxy;

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Counts the Content-Type headers in buf[0..len) that end past buf[skip]
 * (those ending earlier were counted with the previous chunk). */
static void px_scan(proxy *px, const char *buf, size_t len, size_t skip)
{
    static const char key[] = "content-type:";
    size_t kl = sizeof key - 1;
    for (size_t i = 0; i + kl <= len; i++) {
        if (strncasecmp(buf + i, key, kl) != 0)
            continue;
        size_t j = i + kl;
        while (j < len && (buf[j] == ' ' || buf[j] == '\t'))
            j++;
        static const char *const types[2] = {"application/json", "application/octet-stream"};
        for (int k = 0; k < 2; k++) {
            size_t tl = strlen(types[k]);
            if (j + tl <= len && j + tl > skip && !strncasecmp(buf + j, types[k], tl))
                __atomic_add_fetch(k ? &px->n_binary : &px->n_json, 1, __ATOMIC_SEQ_CST);
        }
    }
}

static void px_close(proxy *px, int i)
{
    close(px->fd_c[i]);
    close(px->fd_s[i]);
    px->fd_c[i] = px->fd_s[i] = -1;
}

static int px_connect_daemon(const proxy *px)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)px->daemon_port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *px_main(void *arg)
{
    proxy *px = arg;
    for (;;) {
        struct pollfd pf[2 + 2 * PX_PAIRS];
        int slot[2 + 2 * PX_PAIRS];
        nfds_t n = 0;
        pf[n++] = (struct pollfd){.fd = px->wake[0], .events = POLLIN};
        pf[n++] = (struct pollfd){.fd = px->listen_fd, .events = POLLIN};
        for (int i = 0; i < PX_PAIRS; i++) {
            if (px->fd_c[i] < 0)
                continue;
            slot[n] = i;
            pf[n++] = (struct pollfd){.fd = px->fd_c[i], .events = POLLIN};
            slot[n] = i;
            pf[n++] = (struct pollfd){.fd = px->fd_s[i], .events = POLLIN};
        }
        if (poll(pf, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pf[0].revents)
            break;
        if (pf[1].revents & POLLIN) {
            int c = accept4(px->listen_fd, NULL, NULL, SOCK_CLOEXEC);
            int free_i = -1;
            for (int i = 0; i < PX_PAIRS && free_i < 0; i++)
                if (px->fd_c[i] < 0)
                    free_i = i;
            int d = c >= 0 && free_i >= 0 ? px_connect_daemon(px) : -1;
            if (d < 0) {
                if (c >= 0)
                    close(c);
            } else {
                px->fd_c[free_i] = c;
                px->fd_s[free_i] = d;
                px->tail_len[free_i] = 0;
            }
        }
        for (nfds_t k = 2; k < n; k++) {
            int i = slot[k];
            if (!pf[k].revents || px->fd_c[i] < 0)
                continue;
            bool from_client = pf[k].fd == px->fd_c[i];
            char buf[PX_TAIL + 65536];
            size_t off = from_client ? px->tail_len[i] : 0;
            memcpy(buf, px->tail[i], off);
            ssize_t r = read(pf[k].fd, buf + off, sizeof buf - off);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0 || write_all(from_client ? px->fd_s[i] : px->fd_c[i], buf + off,
                                    (size_t)r) != 0) {
                px_close(px, i);
                continue;
            }
            if (from_client) {
                size_t len = off + (size_t)r;
                px_scan(px, buf, len, off);
                size_t keep = len < PX_TAIL ? len : PX_TAIL;
                memcpy(px->tail[i], buf + len - keep, keep);
                px->tail_len[i] = keep;
            }
        }
    }
    for (int i = 0; i < PX_PAIRS; i++)
        if (px->fd_c[i] >= 0)
            px_close(px, i);
    return NULL;
}

static int proxy_start(proxy *px, int daemon_port)
{
    memset(px, 0, sizeof *px);
    px->listen_fd = px->wake[0] = px->wake[1] = -1;
    for (int i = 0; i < PX_PAIRS; i++)
        px->fd_c[i] = px->fd_s[i] = -1;
    px->daemon_port = daemon_port;
    px->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (px->listen_fd < 0 || bind(px->listen_fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        listen(px->listen_fd, 64) != 0 ||
        getsockname(px->listen_fd, (struct sockaddr *)&a, &al) != 0 ||
        pipe2(px->wake, O_CLOEXEC) != 0) {
        fprintf(stderr, "proxy: %s\n", strerror(errno));
        return -1;
    }
    snprintf(px->url, sizeof px->url, "http://127.0.0.1:%d", ntohs(a.sin_port));
    if (pthread_create(&px->th, NULL, px_main, px) != 0)
        return -1;
    px->running = true;
    return 0;
}

static void proxy_stop(proxy *px)
{
    if (px->running) {
        if (write(px->wake[1], "x", 1) != 1)
            abort(); /* the thread would never end */
        pthread_join(px->th, NULL);
        px->running = false;
    }
    if (px->listen_fd >= 0)
        close(px->listen_fd);
    for (int k = 0; k < 2; k++)
        if (px->wake[k] >= 0)
            close(px->wake[k]);
    px->listen_fd = px->wake[0] = px->wake[1] = -1;
}

/* The step bodies counted so far, and reset. */
static void proxy_take(proxy *px, long *json, long *binary)
{
    *json = __atomic_exchange_n(&px->n_json, 0, __ATOMIC_SEQ_CST);
    *binary = __atomic_exchange_n(&px->n_binary, 0, __ATOMIC_SEQ_CST);
}

/* -------------------------------------------------------------- suite */

typedef struct {
    tdaemon d;
    proxy px;               /* the workers' way to the daemon              */
    optd_client *c;         /* the test's own, straight to the daemon      */
    char root[PATH_LEN];    /* the repository (the working directory)      */
    char dir[PATH_LEN];     /* mkdtemp: worker outputs and the Go binary   */
    char go_bin[PATH_LEN + 16];
    int runs;               /* numbers the output files                    */
} suite;

/* Prints a file to stderr (a failing worker's output), at most max bytes
 * from its end. */
static void dump_file(const char *label, const char *path, long max)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "--- %s: cannot open %s: %s\n", label, path, strerror(errno));
        return;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    if (len > max) {
        fseek(f, len - max, SEEK_SET);
        fprintf(stderr, "--- %s (last %ld of %ld bytes):\n", label, max, len);
    } else {
        fseek(f, 0, SEEK_SET);
        fprintf(stderr, "--- %s (%ld bytes):\n", label, len);
    }
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        fwrite(buf, 1, n, stderr);
    fprintf(stderr, "--- end of %s\n", label);
    fclose(f);
}

static void mkdir_p(const char *path)
{
    char tmp[PATH_LEN];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0700);
            *p = '/';
        }
    }
    mkdir(tmp, 0700);
}

/* Waits for pid up to timeout_ms; SIGKILLs it after that.  Returns the wait
 * status, or -1 when it had to be killed. */
static int wait_deadline(pid_t pid, long long timeout_ms)
{
    long long deadline = tapi_now_ms() + timeout_ms;
    for (;;) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        if (r < 0 && errno != EINTR)
            return -1;
        if (tapi_now_ms() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        sleep_ms(5);
    }
}

/* Opens path for writing as fd target (1 or 2) in a child; _exits on
 * failure. */
static void child_redirect(const char *path, int target)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || dup2(fd, target) < 0)
        _exit(126);
    close(fd);
}

/* Builds tests/cross/worker_go once into the suite's temp dir: offline (no
 * module proxy; the client comes from the go.mod's replace), with the same
 * build cache as clients/go/test.sh so a warm cache is shared. */
static int build_go_worker(suite *s)
{
    char src[PATH_LEN + 32], out[PATH_LEN + 32], err[PATH_LEN + 32];
    snprintf(src, sizeof src, "%s/tests/cross/worker_go", s->root);
    snprintf(s->go_bin, sizeof s->go_bin, "%s/worker_go", s->dir);
    snprintf(out, sizeof out, "%s/go-build.out", s->dir);
    snprintf(err, sizeof err, "%s/go-build.err", s->dir);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        child_redirect(out, 1);
        child_redirect(err, 2);
        if (chdir(src) != 0) {
            fprintf(stderr, "cannot enter %s: %s\n", src, strerror(errno));
            _exit(126);
        }
        char base[PATH_LEN], dir[PATH_LEN + 16];
        const char *tmp = getenv("TMPDIR");
        snprintf(base, sizeof base, "%s/optd-go-%ld", tmp && *tmp ? tmp : "/tmp", (long)getuid());
        if (!getenv("GOCACHE") || !*getenv("GOCACHE")) {
            snprintf(dir, sizeof dir, "%s/cache", base);
            mkdir_p(dir);
            setenv("GOCACHE", dir, 1);
        }
        if (!getenv("GOPATH") || !*getenv("GOPATH")) {
            snprintf(dir, sizeof dir, "%s/gopath", base);
            mkdir_p(dir);
            setenv("GOPATH", dir, 1);
        }
        setenv("GOTOOLCHAIN", "local", 1);
        setenv("GOPROXY", "off", 1);
        setenv("GOSUMDB", "off", 1);
        setenv("GO111MODULE", "on", 1);
        setenv("GOFLAGS", "-mod=mod -buildvcs=false", 1);
        execlp("go", "go", "build", "-o", s->go_bin, ".", (char *)NULL);
        fprintf(stderr, "cannot run go: %s (Debian package golang-go)\n", strerror(errno));
        _exit(127);
    }
    long long t0 = tapi_now_ms();
    int status = wait_deadline(pid, GO_BUILD_TIMEOUT_MS);
    if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "building the Go worker (%s) failed: %s\n", src,
                status == -1 ? "timed out" : "non-zero exit");
        dump_file("go build stderr", err, 8000);
        dump_file("go build stdout", out, 2000);
        return -1;
    }
    print_message("[ cross    ] Go worker built in %lld ms\n", tapi_now_ms() - t0);
    return 0;
}

static void remove_dir(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            char p[PATH_LEN + 300];
            snprintf(p, sizeof p, "%s/%s", path, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(path);
}

static int suite_teardown(void **state);

static int suite_setup(void **state)
{
    suite *s = calloc(1, sizeof *s);
    *state = NULL;
    if (!s)
        return -1;
    *state = s;
    s->px.listen_fd = s->px.wake[0] = s->px.wake[1] = -1;
    if (!getcwd(s->root, sizeof s->root)) {
        fprintf(stderr, "getcwd: %s\n", strerror(errno));
        goto fail;
    }
    static const char *const needed[] = {"tests/cross/worker.py", "tests/cross/worker.mjs",
                                         "tests/cross/worker_go/main.go",
                                         "clients/python/optd/__init__.py", "clients/js/optd.js",
                                         "clients/go/go.mod"};
    for (size_t i = 0; i < sizeof needed / sizeof *needed; i++) {
        char p[PATH_LEN + 64];
        snprintf(p, sizeof p, "%s/%s", s->root, needed[i]);
        if (access(p, R_OK) != 0) {
            fprintf(stderr, "%s not found: run the suite from the repository root\n", p);
            goto fail;
        }
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(s->dir, sizeof s->dir, "%s/optd-cross-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(s->dir)) {
        fprintf(stderr, "mkdtemp %s: %s\n", s->dir, strerror(errno));
        s->dir[0] = 0;
        goto fail;
    }
    if (build_go_worker(s) != 0)
        goto fail;
    if (tdaemon_start(&s->d, NULL, NULL) != 0)
        goto fail;
    if (proxy_start(&s->px, s->d.port) != 0)
        goto fail;
    s->c = optd_client_new(tdaemon_url(&s->d), NULL);
    if (!s->c)
        goto fail;
    return 0;
fail:
    suite_teardown(state);
    *state = NULL;
    return -1;
}

static int suite_teardown(void **state)
{
    suite *s = *state;
    if (!s) /* the setup failed and said why */
        return -1;
    int rc = 0;
    if (s->c)
        optd_client_free(s->c);
    proxy_stop(&s->px);
    if (s->d.pid) {
        rc = tdaemon_stop(&s->d);
        if (rc == 0 && tapi_integrity_check(tdaemon_db(&s->d)) != 0)
            rc = -1;
    }
    tdaemon_cleanup(&s->d);
    if (s->dir[0])
        remove_dir(s->dir);
    free(s);
    *state = NULL;
    return rc == 0 ? 0 : -1;
}

/* --------------------------------------------------------- the C worker */

/* The C client's worker, run in a forked child with stdout going to its
 * output file: the same protocol as tests/cross/worker.* (see there).
 * The wire form rotates with (t + w) mod 3: the client's default (binary),
 * JSON, binary asked for explicitly.  Returns the exit code. */
static int c_worker(const char *url, const char *session, optim_dtype dt, const char *name,
                    int w, long long t0, long long t1)
{
    optd_client *c = optd_client_new(url, NULL);
    if (!c) {
        fprintf(stderr, "c worker: out of memory\n");
        return 1;
    }
    int rc = 0;
    for (long long t = t0; t < t1 && rc == 0; t++) {
        optd_step_opts o = optd_step_opts_default();
        o.base_step = t;
        o.worker = name;
        o.json = (t + w) % 3 == 1;
        double g[SIZE], p64[SIZE];
        float g32[SIZE], p32[SIZE];
        for (int i = 0; i < SIZE; i++) {
            g[i] = grad_value(t, i, w);
            g32[i] = (float)g[i];
        }
        long long step = -1;
        optd_error e = {0};
        int r = dt == OPTIM_F64
                    ? optd_step_f64_opts(c, session, g, SIZE, NULL, &o, p64, &step, NULL, &e)
                    : optd_step_f32_opts(c, session, g32, SIZE, NULL, &o, p32, &step, NULL, &e);
        if (r != 0) {
            fprintf(stderr, "c worker: step t=%lld: %s %d %s: %s (field %s)\n", t,
                    r > 0 ? "not applied (202)" : "error", e.status, e.type, e.detail, e.field);
            rc = 1;
            break;
        }
        unsigned char b[SIZE * 8];
        put_le(dt, dt == OPTIM_F64 ? (const void *)p64 : (const void *)p32, SIZE, b);
        printf("%lld %lld ", t, step);
        for (size_t k = 0; k < SIZE * optim_dtype_size(dt); k++)
            printf("%02x", b[k]);
        printf("\n");
    }
    optd_client_free(c);
    if (fflush(stdout) != 0)
        rc = 1;
    return rc;
}

/* ------------------------------------------------------------- workers */

typedef struct {
    lang_id lang;
    const char *session;
    optim_dtype dt;
    int w;                        /* the gradient stream's worker index  */
    long long t0, t1;             /* steps t0 .. t1-1                     */
    pid_t pid;
    long long started, ms;        /* wall time from spawn to exit        */
    int status;                   /* wait status; -1: killed at timeout  */
    char out[PATH_LEN + 64], err[PATH_LEN + 64];
} worker;

/* Forks the worker with stdout and stderr going to files in the suite's
 * temp dir. */
static void worker_spawn(suite *s, worker *k)
{
    int run = s->runs++;
    snprintf(k->out, sizeof k->out, "%s/%s-%d.out", s->dir, lang_name[k->lang], run);
    snprintf(k->err, sizeof k->err, "%s/%s-%d.err", s->dir, lang_name[k->lang], run);
    char a_size[16], a_w[16], a_t0[32], a_t1[32], script[PATH_LEN + 64];
    snprintf(a_size, sizeof a_size, "%d", SIZE);
    snprintf(a_w, sizeof a_w, "%d", k->w);
    snprintf(a_t0, sizeof a_t0, "%lld", k->t0);
    snprintf(a_t1, sizeof a_t1, "%lld", k->t1);
    const char *url = s->px.url, *dtype = optim_dtype_name(k->dt);
    const char *name = lang_name[k->lang];
    fflush(stdout);
    fflush(stderr);
    k->started = tapi_now_ms();
    pid_t pid = fork();
    if (pid < 0)
        fail_msg("fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        child_redirect(k->out, 1);
        child_redirect(k->err, 2);
        /* The C worker does not exec: let go of the test's sockets (the
         * proxy's, the daemon harness's) so that their closes are seen. */
        for (int fd = 3; fd < 1024; fd++)
            close(fd);
        switch (k->lang) {
        case LANG_C:
            _exit(c_worker(url, k->session, k->dt, name, k->w, k->t0, k->t1));
        case LANG_PY:
            snprintf(script, sizeof script, "%s/tests/cross/worker.py", s->root);
            execl("/usr/bin/python3", "python3", script, url, k->session, dtype, a_size, name, a_w,
                  a_t0, a_t1, (char *)NULL);
            fprintf(stderr, "cannot run /usr/bin/python3: %s (Debian package python3)\n",
                    strerror(errno));
            break;
        case LANG_JS:
            snprintf(script, sizeof script, "%s/tests/cross/worker.mjs", s->root);
            execlp("node", "node", script, url, k->session, dtype, a_size, name, a_w, a_t0, a_t1,
                   (char *)NULL);
            fprintf(stderr, "cannot run node: %s (Debian package nodejs)\n", strerror(errno));
            break;
        case LANG_GO:
            execl(s->go_bin, "worker_go", url, k->session, dtype, a_size, name, a_w, a_t0, a_t1,
                  (char *)NULL);
            fprintf(stderr, "cannot run %s: %s\n", s->go_bin, strerror(errno));
            break;
        default:
            break;
        }
        _exit(127);
    }
    k->pid = pid;
}

static bool exited_ok(int status)
{
    return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* Waits for every worker and fails the test, after printing the output of
 * each failed one, when any did not exit 0.  Those still running after the
 * timeout are killed, and so are the others as soon as one fails: in a
 * synchronous round they would only wait for the missing gradient until
 * the round times out. */
static void workers_wait(worker *ws, int n)
{
    long long deadline = tapi_now_ms() + worker_timeout_ms();
    int left = n;
    bool failed = false;
    while (left > 0) {
        for (int i = 0; i < n; i++) {
            worker *k = &ws[i];
            if (!k->pid)
                continue;
            int status;
            pid_t r = waitpid(k->pid, &status, WNOHANG);
            if (r == k->pid || (r < 0 && errno != EINTR)) {
                k->status = r == k->pid ? status : -1;
                k->ms = tapi_now_ms() - k->started;
                k->pid = 0;
                left--;
                failed = failed || !exited_ok(k->status);
            }
        }
        if (left > 0 && (failed || tapi_now_ms() > deadline)) {
            for (int i = 0; i < n; i++) {
                worker *k = &ws[i];
                if (!k->pid)
                    continue;
                kill(k->pid, SIGKILL);
                waitpid(k->pid, NULL, 0);
                k->status = -1;
                k->ms = tapi_now_ms() - k->started;
                k->pid = 0;
                left--;
            }
        }
        if (left > 0)
            sleep_ms(5);
    }
    int bad = 0;
    for (int i = 0; i < n; i++) {
        worker *k = &ws[i];
        if (exited_ok(k->status))
            continue;
        bad++;
        if (k->status == -1)
            fprintf(stderr, "%s worker (steps %lld..%lld) killed after %lld ms%s\n",
                    lang_name[k->lang], k->t0, k->t1 - 1, k->ms,
                    failed ? " (another worker had failed)" : " (timeout)");
        else if (WIFEXITED(k->status))
            fprintf(stderr, "%s worker (steps %lld..%lld) exited with %d\n", lang_name[k->lang],
                    k->t0, k->t1 - 1, WEXITSTATUS(k->status));
        else
            fprintf(stderr, "%s worker (steps %lld..%lld) died of signal %d\n",
                    lang_name[k->lang], k->t0, k->t1 - 1, WTERMSIG(k->status));
        dump_file("its stderr", k->err, 8000);
        dump_file("its stdout", k->out, 2000);
    }
    if (bad)
        fail_msg("%d of %d workers did not finish (their output is above)", bad, n);
}

/* Reads a worker's output: one line "t step hex" per step t0 .. t1-1, in
 * order, step == t + 1, hex the little-endian bytes of SIZE params.  Fails
 * the test on anything else.  Returns (t1 - t0) vectors of bytes; caller
 * frees. */
static unsigned char *worker_read(const worker *k)
{
    size_t vb = SIZE * optim_dtype_size(k->dt);
    long long n = k->t1 - k->t0;
    unsigned char *got = malloc((size_t)n * vb);
    assert_non_null(got);
    FILE *f = fopen(k->out, "r");
    if (!f)
        fail_msg("cannot open %s: %s", k->out, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    long long t = k->t0;
    for (; t < k->t1; t++) {
        ssize_t len = getline(&line, &cap, f);
        if (len < 0)
            break;
        long long lt, step;
        int off = 0;
        if (sscanf(line, "%lld %lld %n", &lt, &step, &off) != 2 || lt != t) {
            fclose(f);
            dump_file("worker stdout", k->out, 4000);
            fail_msg("%s worker: line %lld is not \"%lld step hex\": %.80s", lang_name[k->lang],
                     t - k->t0 + 1, t, line);
        }
        if (step != t + 1)
            fail_msg("%s worker: the step sent with base_step %lld answered step %lld, expected "
                     "%lld", lang_name[k->lang], t, step, t + 1);
        const char *h = line + off;
        size_t hl = strcspn(h, "\r\n");
        if (hl != 2 * vb)
            fail_msg("%s worker, t=%lld: %zu hex digits of params, expected %zu",
                     lang_name[k->lang], t, hl, 2 * vb);
        unsigned char *dst = got + (size_t)(t - k->t0) * vb;
        for (size_t j = 0; j < vb; j++) {
            int hi = hex_digit(h[2 * j]), lo = hex_digit(h[2 * j + 1]);
            if (hi < 0 || lo < 0)
                fail_msg("%s worker, t=%lld: not hex: %.40s", lang_name[k->lang], t, h);
            dst[j] = (unsigned char)(hi << 4 | lo);
        }
    }
    free(line);
    fclose(f);
    if (t != k->t1)
        fail_msg("%s worker printed %lld of %lld steps (exited 0)", lang_name[k->lang],
                 t - k->t0, n);
    return got;
}

/* Compares params (little-endian bytes) with the reference's: bit for bit
 * when tol is 0, else every element within tol.  Counts the elements that
 * differ in any bit in *inexact (may be NULL). */
static void assert_params(const char *who, long long t, optim_dtype dt, const unsigned char *got,
                          const unsigned char *want, double tol, long *inexact)
{
    for (size_t i = 0; i < SIZE; i++) {
        size_t w = optim_dtype_size(dt);
        if (!memcmp(got + i * w, want + i * w, w))
            continue;
        double g = get_le(dt, got, i), x = get_le(dt, want, i);
        if (tol == 0 || !(fabs(g - x) <= tol))
            fail_msg("%s, after step %lld: param %zu is %.17g (%a), expected %.17g (%a)%s", who,
                     t + 1, i, g, g, x, x, tol == 0 ? " bit for bit" : "");
        if (inexact)
            (*inexact)++;
    }
}

/* ------------------------------------------------------------- checks */

/* GET /v1/sessions/{name} parsed; cJSON_Delete it. */
static cJSON *get_json(optd_client *c, const char *path)
{
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

/* The daemon's final params and step, read back with the C client (binary)
 * and compared with the reference; its counters say every step applied. */
static void assert_final(suite *s, const char *session, optim_dtype dt, long long steps,
                         const unsigned char *want, double tol)
{
    double p64[SIZE];
    float p32[SIZE];
    long long step = -1;
    optd_error e;
    int r = dt == OPTIM_F64 ? optd_get_params_f64(s->c, session, p64, SIZE, &step, &e)
                            : optd_get_params_f32(s->c, session, p32, SIZE, &step, &e);
    if (r != 0)
        fail_msg("GET %s/params: %d %s", session, e.status, e.detail);
    assert_int_equal(step, steps);
    unsigned char b[SIZE * 8];
    put_le(dt, dt == OPTIM_F64 ? (const void *)p64 : (const void *)p32, SIZE, b);
    char who[160];
    snprintf(who, sizeof who, "%s: the daemon's final params", session);
    assert_params(who, steps - 1, dt, b, want, tol, NULL);

    char path[192];
    snprintf(path, sizeof path, "/v1/sessions/%s", session);
    cJSON *j = get_json(s->c, path);
    assert_int_equal((long long)tapi_num(j, "step"), steps);
    assert_int_equal(counter(j, "applied"), steps);
    assert_int_equal(counter(j, "rejected_stale"), 0);
    assert_int_equal(counter(j, "timed_out"), 0);
    cJSON_Delete(j);
}

/* The history names, for every step, the worker that sent it: the worker
 * id travelled from each client (header or JSON field) to the step log. */
static void assert_history_workers(suite *s, const char *session)
{
    char path[192];
    snprintf(path, sizeof path, "/v1/sessions/%s/history?after=0&limit=1000", session);
    cJSON *j = get_json(s->c, path);
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(j, "steps");
    assert_true(cJSON_IsArray(steps));
    assert_int_equal(cJSON_GetArraySize(steps), N_LANGS * TURN);
    long long k = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, steps) {
        assert_int_equal((long long)tapi_num(e, "step"), k + 1);
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(e, "worker");
        const char *want = lang_name[k / TURN];
        if (!cJSON_IsString(w) || strcmp(w->valuestring, want) != 0)
            fail_msg("%s history: step %lld names worker %s, expected %s", session, k + 1,
                     cJSON_IsString(w) ? w->valuestring : "(none)", want);
        k++;
    }
    cJSON_Delete(j);
}

/* The step bodies a worker sends as JSON and as binary: by (t + w) mod 3,
 * its client's default (JSON for Python and JS at 16 elements, binary for C
 * and Go), JSON, binary. */
static void expected_forms(lang_id l, int w, long long t0, long long t1, long *json,
                           long *binary)
{
    bool default_json = l == LANG_PY || l == LANG_JS;
    for (long long t = t0; t < t1; t++) {
        long long f = (t + w) % 3;
        if (f == 1 || (f == 0 && default_json))
            (*json)++;
        else
            (*binary)++;
    }
}

/* Asserts that the proxy saw at least the expected step bodies of each
 * form since the last call (a client's retry may add some). */
static void assert_forms(suite *s, const char *who, long want_json, long want_binary)
{
    long json, binary;
    proxy_take(&s->px, &json, &binary);
    if (json < want_json || binary < want_binary)
        fail_msg("%s: the wire carried %ld JSON and %ld binary step bodies, expected %ld and %ld",
                 who, json, binary, want_json, want_binary);
}

/* Runs the four languages one after another on one session: Python steps
 * 0..24, JS 25..49, C 50..74, Go 75..99, each with base_step t.  ref holds
 * the reference params (little-endian bytes) after 0 .. 100 steps. */
static void run_turns(suite *s, const char *session, optim_dtype dt, const unsigned char *ref,
                      double tol)
{
    size_t vb = SIZE * optim_dtype_size(dt);
    long inexact = 0;
    long long ms[N_LANGS];
    for (int l = 0; l < N_LANGS; l++) {
        worker k = {.lang = (lang_id)l, .session = session, .dt = dt, .w = 0,
                    .t0 = (long long)l * TURN, .t1 = (long long)(l + 1) * TURN};
        proxy_take(&s->px, &(long){0}, &(long){0});
        worker_spawn(s, &k);
        workers_wait(&k, 1);
        ms[l] = k.ms;
        unsigned char *got = worker_read(&k);
        char who[96];
        snprintf(who, sizeof who, "%s worker on %s", lang_name[l], session);
        long want_json = 0, want_binary = 0;
        expected_forms(k.lang, k.w, k.t0, k.t1, &want_json, &want_binary);
        assert_forms(s, who, want_json, want_binary);
        for (long long t = k.t0; t < k.t1; t++)
            assert_params(who, t, dt, got + (size_t)(t - k.t0) * vb, ref + (size_t)(t + 1) * vb,
                          tol, &inexact);
        free(got);
    }
    assert_final(s, session, dt, N_LANGS * TURN, ref + (size_t)N_LANGS * TURN * vb, tol);
    assert_history_workers(s, session);
    print_message("[ cross    ] %s: py %lld ms, js %lld ms, c %lld ms, go %lld ms; "
                  "%ld of %d elements not bit-identical to the reference\n",
                  session, ms[0], ms[1], ms[2], ms[3], inexact, N_LANGS * TURN * SIZE);
}

/* ---------------------------------------------------------------- tests */

/* SGD in float64, in turns: every step's params, as each client received
 * them, bit-identical to p -= 0.125 * g computed here. */
static void test_turns_sgd_f64(void **state)
{
    suite *s = *state;
    tapi_create(s->c, "cross-sgd",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.125},\"dtype\":\"float64\","
                "\"size\":16,\"init\":{\"type\":\"zeros\"}}",
                201);
    const int steps = N_LANGS * TURN;
    size_t vb = SIZE * 8;
    unsigned char *ref = malloc((size_t)(steps + 1) * vb);
    assert_non_null(ref);
    double p[SIZE] = {0};
    put_le(OPTIM_F64, p, SIZE, ref);
    for (int t = 0; t < steps; t++) {
        for (int i = 0; i < SIZE; i++)
            p[i] -= 0.125 * grad_value(t, i, 0);
        put_le(OPTIM_F64, p, SIZE, ref + (size_t)(t + 1) * vb);
    }
    run_turns(s, "cross-sgd", OPTIM_F64, ref, 0);
    free(ref);
}

/* Adam (amsgrad, weight decay) in float32, in turns: within 1e-6 of
 * torch's rule computed here in double. */
static void test_turns_adam_f32(void **state)
{
    suite *s = *state;
    float p[SIZE];
    char body[1024];
    int len = snprintf(body, sizeof body,
                       "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"betas\":[0.85,0.995],"
                       "\"eps\":1e-7,\"weight_decay\":0.02,\"amsgrad\":true},"
                       "\"dtype\":\"float32\",\"params\":[");
    for (int i = 0; i < SIZE; i++) {
        p[i] = (float)(2 * i - 15) / 16.0f; /* exact */
        len += snprintf(body + len, sizeof body - (size_t)len, "%s%.9g", i ? "," : "",
                        (double)p[i]);
    }
    snprintf(body + len, sizeof body - (size_t)len, "]}");
    tapi_create(s->c, "cross-adam", body, 201);

    /* torch's Adam (L2 weight decay, amsgrad) in double, written from
     * torch.optim's rule rather than taken from optd's kernels. */
    const double lr = 0.01, b1 = 0.85, b2 = 0.995, eps = 1e-7, wd = 0.02;
    double pd[SIZE], m[SIZE] = {0}, v[SIZE] = {0}, vmax[SIZE] = {0};
    for (int i = 0; i < SIZE; i++)
        pd[i] = p[i];
    const int steps = N_LANGS * TURN;
    size_t vb = SIZE * 4;
    unsigned char *ref = malloc((size_t)(steps + 1) * vb);
    assert_non_null(ref);
    put_le(OPTIM_F32, p, SIZE, ref);
    for (int t = 0; t < steps; t++) {
        double bc1 = 1 - pow(b1, t + 1), bc2 = 1 - pow(b2, t + 1);
        for (int i = 0; i < SIZE; i++) {
            double g = (double)(float)grad_value(t, i, 0) + wd * pd[i];
            m[i] = b1 * m[i] + (1 - b1) * g;
            v[i] = b2 * v[i] + (1 - b2) * g * g;
            vmax[i] = fmax(vmax[i], v[i]);
            pd[i] -= lr / bc1 * m[i] / (sqrt(vmax[i]) / sqrt(bc2) + eps);
            p[i] = (float)pd[i];
        }
        put_le(OPTIM_F32, p, SIZE, ref + (size_t)(t + 1) * vb);
    }
    run_turns(s, "cross-adam", OPTIM_F32, ref, 1e-6);
    free(ref);
}

/* Synchronous rounds: the four languages at once, worker w sending
 * g(t, ., w) for rounds 0..49.  Every worker received the same params each
 * round, bit-identical to p -= 0.125 * mean(g(t, ., 0..3)). */
static void test_sync_rounds_f64(void **state)
{
    suite *s = *state;
    const char *session = "cross-sync";
    tapi_create(s->c, session,
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.125},\"dtype\":\"float64\","
                "\"size\":16,\"init\":{\"type\":\"zeros\"},"
                "\"mode\":{\"type\":\"sync\",\"workers\":4,\"timeout_ms\":20000}}",
                201);
    size_t vb = SIZE * 8;
    unsigned char *ref = malloc((size_t)(ROUNDS + 1) * vb);
    assert_non_null(ref);
    double p[SIZE] = {0};
    put_le(OPTIM_F64, p, SIZE, ref);
    for (int t = 0; t < ROUNDS; t++) {
        for (int i = 0; i < SIZE; i++) {
            double sum = 0;
            for (int w = 0; w < N_LANGS; w++)
                sum += grad_value(t, i, w);
            p[i] -= 0.125 * (sum / N_LANGS);
        }
        put_le(OPTIM_F64, p, SIZE, ref + (size_t)(t + 1) * vb);
    }

    worker ws[N_LANGS];
    long want_json = 0, want_binary = 0;
    proxy_take(&s->px, &(long){0}, &(long){0});
    long long t0 = tapi_now_ms();
    for (int l = 0; l < N_LANGS; l++) {
        ws[l] = (worker){.lang = (lang_id)l, .session = session, .dt = OPTIM_F64, .w = l,
                         .t0 = 0, .t1 = ROUNDS};
        expected_forms(ws[l].lang, ws[l].w, ws[l].t0, ws[l].t1, &want_json, &want_binary);
        worker_spawn(s, &ws[l]);
    }
    workers_wait(ws, N_LANGS);
    long long wall = tapi_now_ms() - t0;
    assert_forms(s, "the sync workers", want_json, want_binary);

    unsigned char *got[N_LANGS];
    for (int l = 0; l < N_LANGS; l++)
        got[l] = worker_read(&ws[l]);
    /* First among themselves (one answer per round for everyone), then
     * against the reference. */
    for (long long t = 0; t < ROUNDS; t++) {
        for (int l = 1; l < N_LANGS; l++) {
            if (memcmp(got[l] + (size_t)t * vb, got[0] + (size_t)t * vb, vb) != 0) {
                char who[96];
                snprintf(who, sizeof who, "round %lld: the %s worker's params against the %s "
                         "worker's", t, lang_name[l], lang_name[0]);
                assert_params(who, t, OPTIM_F64, got[l] + (size_t)t * vb,
                              got[0] + (size_t)t * vb, 0, NULL);
            }
        }
        assert_params("the sync round's params", t, OPTIM_F64, got[0] + (size_t)t * vb,
                      ref + (size_t)(t + 1) * vb, 0, NULL);
    }
    for (int l = 0; l < N_LANGS; l++)
        free(got[l]);
    assert_final(s, session, OPTIM_F64, ROUNDS, ref + (size_t)ROUNDS * vb, 0);
    free(ref);
    print_message("[ cross    ] %s: %d rounds x %d languages in %lld ms\n", session, ROUNDS,
                  N_LANGS, wall);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_turns_sgd_f64),
        cmocka_unit_test(test_sync_rounds_f64),
        cmocka_unit_test(test_turns_adam_f32),
    };
    return cmocka_run_group_tests_name("cross_language", tests, suite_setup, suite_teardown);
}
