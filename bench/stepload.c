/*
 * bench/stepload.c -- the timed loops of bench/engine.py: large binary steps
 * against their same-run floor, one kernel pass, the disk's fdatasync rate,
 * reading files.
 *
 *   stepload big --step URL --sink URL --file URL --n N --iters K
 *                [--warmup W] --append PATH
 *       K rounds, each: one floor (POST 4n bytes to nginx's sink, GET the
 *       4n-byte file from nginx, one float32 Adam optim_step over n, a plain
 *       append of 4n bytes to PATH) and then one binary step of the daemon
 *       (POST the 4n-byte gradient, the 4n-byte params answered).  One
 *       keep-alive connection to each server.  Prints
 *         RESULT what=optd n=K p50_ms=.. mean_ms=.. p99_ms=.. min_ms=..
 *         RESULT what=floor ...
 *         RESULT what=post|get|kernel|append ...   (the floor's parts)
 *   stepload steps --step URL --n N --count K   K binary steps of the daemon
 *   stepload kernel --n N --iters K   one float32 Adam optim_step over n
 *   stepload fsync --path P --seconds S
 *       4 KiB pwrite + fdatasync in a loop: RESULT what=fsync rate=../s
 *   stepload read FILE...             reads the files once: RESULT what=read
 *
 * Exits 1 when a request fails or answers anything but 200 with the
 * expected number of bytes.
 */
#include "optim/optim.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static void die(const char *msg)
{
    fprintf(stderr, "stepload: %s\n", msg);
    exit(1);
}

static void *xalloc(size_t bytes)
{
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p)
        die("out of memory");
    memset(p, 0, bytes);
    return p;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* p50, mean, p99 (nearest rank) and min of k samples. */
static void report(const char *what, const double *v, size_t k)
{
    double *s = malloc(k * sizeof *s), sum = 0;
    if (!s || k == 0)
        die("no samples");
    memcpy(s, v, k * sizeof *s);
    qsort(s, k, sizeof *s, cmp_double);
    for (size_t i = 0; i < k; i++)
        sum += s[i];
    size_t r99 = (size_t)((double)k * 0.99 + 0.999999);
    if (r99 < 1)
        r99 = 1;
    double p50 = k % 2 ? s[k / 2] : 0.5 * (s[k / 2 - 1] + s[k / 2]);
    printf("RESULT what=%s n=%zu p50_ms=%.3f mean_ms=%.3f p99_ms=%.3f min_ms=%.3f\n", what, k,
           p50, sum / (double)k, s[r99 - 1], s[0]);
    fflush(stdout);
    free(s);
}

/* ------------------------------------------------------------------ http */

typedef struct {
    char *buf;
    size_t cap, len;
} sink;

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
    sink *s = arg;
    size_t n = size * nmemb;
    if (s->len + n <= s->cap)
        memcpy(s->buf + s->len, ptr, n);
    s->len += n;
    return n;
}

typedef struct {
    CURL *h;
    struct curl_slist *hdr;
    sink in;
} conn;

static void conn_init(conn *c, const char *url, bool post, const void *body, size_t len,
                      bool binary, size_t expect)
{
    c->h = curl_easy_init();
    if (!c->h)
        die("curl_easy_init failed");
    c->hdr = NULL;
    /* No Expect: 100-continue: it would cost a round trip of waiting. */
    c->hdr = curl_slist_append(c->hdr, "Expect:");
    if (binary) {
        c->hdr = curl_slist_append(c->hdr, "Content-Type: application/octet-stream");
        c->hdr = curl_slist_append(c->hdr, "Accept: application/octet-stream");
    }
    curl_easy_setopt(c->h, CURLOPT_URL, url);
    curl_easy_setopt(c->h, CURLOPT_HTTPHEADER, c->hdr);
    curl_easy_setopt(c->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(c->h, CURLOPT_TIMEOUT, 600L);
    curl_easy_setopt(c->h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c->h, CURLOPT_WRITEDATA, &c->in);
    if (post) {
        curl_easy_setopt(c->h, CURLOPT_POST, 1L);
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c->h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    }
    c->in.cap = expect;
    c->in.buf = xalloc(expect ? expect : 1);
}

/* One request; the answer must be 200 with want bytes (SIZE_MAX: any). */
static double conn_do(conn *c, size_t want, const char *label)
{
    c->in.len = 0;
    double t0 = now_ms();
    CURLcode rc = curl_easy_perform(c->h);
    double t = now_ms() - t0;
    long code = 0;
    curl_easy_getinfo(c->h, CURLINFO_RESPONSE_CODE, &code);
    if (rc != CURLE_OK || code != 200 || (want != SIZE_MAX && c->in.len != want)) {
        fprintf(stderr, "stepload: %s: curl %d (%s), status %ld, %zu bytes (want %zu)\n", label,
                (int)rc, curl_easy_strerror(rc), code, c->in.len, want);
        fprintf(stderr, "%.*s\n", (int)(c->in.len < 400 ? c->in.len : 400), c->in.buf);
        exit(1);
    }
    return t;
}

/* ---------------------------------------------------------------- kernel */

typedef struct {
    optim_hparams hp;
    optim_state st;
    float *params, *grad;
    size_t n;
} adam;

static void adam_init(adam *a, size_t n, const float *grad)
{
    optim_hparams_default(OPTIM_ADAM, &a->hp);
    a->hp.lr = 0.001;
    optim_state_init(&a->hp, &a->st);
    unsigned need = optim_buffers_needed(&a->hp);
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++) {
        a->st.buf[s] = NULL;
        if (need & (1u << s)) {
            a->st.buf[s] = xalloc(n * sizeof(float));
            optim_buffer_init(&a->hp, s, OPTIM_F32, a->st.buf[s], n);
        }
    }
    a->params = xalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        a->params[i] = (float)((double)(i % 1000) * 1e-4 - 0.05);
    a->grad = (float *)grad;
    a->n = n;
}

static double adam_step(adam *a)
{
    double t0 = now_ms();
    optim_step(&a->hp, &a->st, OPTIM_F32, a->params, a->grad, a->n);
    return now_ms() - t0;
}

/* The same small finite values as bench/http_step.lua, repeated. */
static float *make_grad(size_t n)
{
    static const float pat[4] = {0.01f, -0.02f, 0.005f, -0.001f};
    float *g = xalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        g[i] = pat[i % 4];
    return g;
}

/* ---------------------------------------------------------------- append */

/* A plain append of len bytes (write(2) until done, no sync); the file is
 * emptied afterwards, outside the timed part. */
static double append_once(int fd, const void *buf, size_t len)
{
    double t0 = now_ms();
    const char *p = buf;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("append: write failed");
        }
        p += w;
        left -= (size_t)w;
    }
    double t = now_ms() - t0;
    if (ftruncate(fd, 0) != 0)
        die("append: ftruncate failed");
    return t;
}

/* ------------------------------------------------------------------ main */

static const char *arg_str(int argc, char **argv, const char *name, const char *def)
{
    for (int i = 2; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0)
            return argv[i + 1];
    if (!def) {
        fprintf(stderr, "stepload: %s is required\n", name);
        exit(2);
    }
    return def;
}

static size_t arg_size(int argc, char **argv, const char *name, const char *def)
{
    const char *s = arg_str(argc, argv, name, def);
    double v = strtod(s, NULL);
    if (!(v >= 1 && v <= 1e10)) {
        fprintf(stderr, "stepload: bad %s %s\n", name, s);
        exit(2);
    }
    return (size_t)v;
}

static int cmd_big(int argc, char **argv)
{
    size_t n = arg_size(argc, argv, "--n", NULL);
    size_t iters = arg_size(argc, argv, "--iters", NULL);
    size_t warm = arg_size(argc, argv, "--warmup", "1");
    size_t bytes = n * sizeof(float);
    float *grad = make_grad(n);
    conn step, post, get;
    conn_init(&step, arg_str(argc, argv, "--step", NULL), true, grad, bytes, true, bytes);
    conn_init(&post, arg_str(argc, argv, "--sink", NULL), true, grad, bytes, false, 4096);
    conn_init(&get, arg_str(argc, argv, "--file", NULL), false, NULL, 0, false, bytes);
    const char *path = arg_str(argc, argv, "--append", NULL);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die("cannot open the append file");
    adam a;
    adam_init(&a, n, grad);

    double *v[6];
    for (int i = 0; i < 6; i++)
        v[i] = calloc(iters, sizeof(double));
    for (size_t k = 0; k < warm + iters; k++) {
        double tp = conn_do(&post, SIZE_MAX, "POST to nginx");
        double tg = conn_do(&get, bytes, "GET from nginx");
        double tk = adam_step(&a);
        double ta = append_once(fd, grad, bytes);
        double ts = conn_do(&step, bytes, "optd step");
        if (k < warm)
            continue;
        size_t j = k - warm;
        v[0][j] = ts;
        v[1][j] = tp + tg + tk + ta;
        v[2][j] = tp;
        v[3][j] = tg;
        v[4][j] = tk;
        v[5][j] = ta;
        fprintf(stderr, "  step %zu/%zu: optd %.1f ms, floor %.1f ms\n", j + 1, iters, ts,
                v[1][j]);
    }
    static const char *names[6] = {"optd", "floor", "post", "get", "kernel", "append"};
    for (int i = 0; i < 6; i++)
        report(names[i], v[i], iters);
    close(fd);
    unlink(path);
    return 0;
}

static int cmd_steps(int argc, char **argv)
{
    size_t n = arg_size(argc, argv, "--n", NULL);
    size_t count = arg_size(argc, argv, "--count", NULL);
    size_t bytes = n * sizeof(float);
    float *grad = make_grad(n);
    conn step;
    conn_init(&step, arg_str(argc, argv, "--step", NULL), true, grad, bytes, true, bytes);
    double *v = calloc(count, sizeof(double));
    for (size_t k = 0; k < count; k++)
        v[k] = conn_do(&step, bytes, "optd step");
    report("optd", v, count);
    return 0;
}

static int cmd_kernel(int argc, char **argv)
{
    size_t n = arg_size(argc, argv, "--n", NULL);
    size_t iters = arg_size(argc, argv, "--iters", NULL);
    adam a;
    adam_init(&a, n, make_grad(n));
    adam_step(&a);
    double *v = calloc(iters, sizeof(double));
    for (size_t k = 0; k < iters; k++)
        v[k] = adam_step(&a);
    report("kernel", v, iters);
    return 0;
}

static int cmd_fsync(int argc, char **argv)
{
    const char *path = arg_str(argc, argv, "--path", NULL);
    double secs = strtod(arg_str(argc, argv, "--seconds", "2"), NULL);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die("cannot open the fsync file");
    char block[4096];
    memset(block, 0x5a, sizeof block);
    /* Each sync makes a new block durable, as an appended log record would. */
    size_t k = 0, cap = 1u << 20;
    double *v = calloc(cap, sizeof(double));
    double t0 = now_ms();
    while (now_ms() - t0 < secs * 1e3 && k < cap) {
        double a = now_ms();
        if (pwrite(fd, block, sizeof block, (off_t)((k % 256) * sizeof block)) !=
                (ssize_t)sizeof block ||
            fdatasync(fd) != 0)
            die("pwrite/fdatasync failed");
        v[k++] = now_ms() - a;
    }
    double el = now_ms() - t0;
    close(fd);
    unlink(path);
    printf("RESULT what=fsync rate=%.1f syncs=%zu seconds=%.2f\n", (double)k / (el / 1e3), k,
           el / 1e3);
    report("fsync_one", v, k);
    return 0;
}

static int cmd_read(int argc, char **argv)
{
    size_t total = 0;
    size_t cap = 1u << 20;
    char *buf = xalloc(cap);
    double t0 = now_ms();
    for (int i = 2; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die("cannot open a file to read");
        ssize_t r;
        while ((r = read(fd, buf, cap)) > 0)
            total += (size_t)r;
        close(fd);
    }
    double t = now_ms() - t0;
    printf("RESULT what=read bytes=%zu ms=%.3f\n", total, t);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: stepload big|steps|kernel|fsync|read ...\n");
        return 2;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = 2;
    if (strcmp(argv[1], "big") == 0)
        rc = cmd_big(argc, argv);
    else if (strcmp(argv[1], "steps") == 0)
        rc = cmd_steps(argc, argv);
    else if (strcmp(argv[1], "kernel") == 0)
        rc = cmd_kernel(argc, argv);
    else if (strcmp(argv[1], "fsync") == 0)
        rc = cmd_fsync(argc, argv);
    else if (strcmp(argv[1], "read") == 0)
        rc = cmd_read(argc, argv);
    else
        fprintf(stderr, "stepload: unknown command %s\n", argv[1]);
    curl_global_cleanup();
    return rc;
}
