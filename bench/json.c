/*
 * bench/json.c -- JSON vectors: decoding a step body and printing params,
 * the cJSON / snprintf way optd used before against the way it does now,
 * measured in the same run; and the exhaustive check of the float32
 * printer.
 *
 *   build/bench/json [--sizes 1e3,1e6] [--min-time 0.3]
 *   build/bench/json --exhaustive-f32 [--threads 2] [--from 0 --to 4294967296]
 *   build/bench/json --check-f64 N [--threads 2]
 *
 * Timing: float32 vectors of gradient-like values (magnitudes 1e-7..1e1,
 * both signs).  Bodies are {"grad":[...],"loss":0.5} with the numbers in
 * two spellings: %.9g (what optd prints, 9 significant digits) and %.17g
 * (the length of the shortest repr Python and JavaScript print for a
 * float32 widened to double: 16-17 digits).  "old decode" is the former
 * api_decode_step_json (cJSON parse of the whole body, a node per number,
 * walk, convert); "new decode" is api_decode_step_json.  "old encode" is
 * the former api_buf_vector (snprintf "%.9g" per element); "new encode"
 * is api_buf_vector.  Every call is timed on its own, in the thread's CPU
 * time; p50, mean and p99 over at least --min-time seconds of calls;
 * MB/s = body bytes / mean.
 * cJSON's heap is counted through cJSON_InitHooks: its peak during one
 * decode is printed too.
 *
 * --exhaustive-f32 prints every float32 bit pattern in the range with
 * api_fmt_f32_fast and snprintf "%.9g" and counts the values the fast path
 * answered, those it left to snprintf, and mismatches (must be 0).
 * --check-f64 N does the same for N random float64 bit patterns and N
 * gradient-like doubles against "%.17g".
 */
#include "api/api.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The calls are timed in this thread's CPU time: on a shared machine a
 * 100 ms call is preempted by every neighbour, and wall time would time
 * them rather than the code. */
static double cpu_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x2545f4914f6cdd1du;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* ------------------------------------------------------- cJSON's heap */

static size_t heap_now, heap_peak;

static void *count_malloc(size_t n)
{
    size_t *p = malloc(n + sizeof(size_t) * 2);
    if (!p)
        return NULL;
    p[0] = n;
    heap_now += n;
    if (heap_now > heap_peak)
        heap_peak = heap_now;
    return p + 2;
}

static void count_free(void *q)
{
    if (!q)
        return;
    size_t *p = (size_t *)q - 2;
    heap_now -= p[0];
    free(p);
}

/* ------------------------------------------------------- the old ways */

static float to_f32(double d)
{
    if (d > 3.4028235677973366e38)
        return INFINITY;
    if (d < -3.4028235677973366e38)
        return -INFINITY;
    return (float)d;
}

/* The former decoder, minus its error messages: parse everything, walk. */
static int old_decode(const char *body, size_t len, size_t n, float *out)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!root)
        return -1;
    const cJSON *m, *grad = NULL;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "grad") == 0)
            grad = m;
    }
    size_t i = 0;
    const cJSON *e;
    int rc = 0;
    cJSON_ArrayForEach(e, grad)
    {
        if (i >= n || !cJSON_IsNumber(e)) {
            rc = -1;
            break;
        }
        out[i++] = to_f32(e->valuedouble);
    }
    cJSON_Delete(root);
    return rc == 0 && i == n ? 0 : -1;
}

/* The former printer: snprintf per element into one reservation. */
static int old_encode(api_buf *b, const float *v, size_t n)
{
    size_t need = n * 17 + 2;
    if (b->cap < need + 1) {
        free(b->data);
        b->data = malloc(need + 1);
        if (!b->data)
            return -1;
        b->cap = need + 1;
    }
    char *p = b->data;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        double x = v[i];
        int k = isfinite(x) ? snprintf(p, 18, "%.9g", x) : snprintf(p, 18, "null");
        p += k;
        if (i + 1 < n)
            *p++ = ',';
    }
    *p++ = ']';
    *p = '\0';
    b->len = (size_t)(p - b->data);
    return 0;
}

/* ------------------------------------------------------- timing */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    double p50, mean, p99;
    size_t calls;
} stats;

typedef int (*op_fn)(void *ctx);

static stats time_op(op_fn op, void *ctx, double min_time)
{
    size_t cap = 1024, n = 0;
    double *t = malloc(cap * sizeof *t);
    double start = now_sec(), total = 0;
    if (!t)
        abort();
    for (int w = 0; w < 2; w++)
        if (op(ctx))
            abort();
    while ((total < min_time || n < 5) && n < 1000000) {
        double a = cpu_sec();
        if (op(ctx)) {
            fprintf(stderr, "json: an operation failed\n");
            exit(1);
        }
        double d = cpu_sec() - a;
        if (n == cap) {
            cap *= 2;
            t = realloc(t, cap * sizeof *t);
            if (!t)
                abort();
        }
        t[n++] = d;
        total += d;
        if (now_sec() - start > 20 * min_time + 5)
            break;
    }
    qsort(t, n, sizeof *t, cmp_double);
    stats s = {t[n / 2], total / (double)n, t[(size_t)((double)(n - 1) * 0.99)], n};
    free(t);
    return s;
}

typedef struct {
    const char *body;
    size_t len, n;
    float *out;
    api_buf buf;
    const float *v;
} job;

static int op_old_decode(void *p)
{
    job *j = p;
    return old_decode(j->body, j->len, j->n, j->out);
}

static int op_new_decode(void *p)
{
    job *j = p;
    api_reply r = {0};
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    int st = api_decode_step_json(j->body, j->len, OPTIM_F32, j->n, j->out, &meta, &r);
    api_reply_free(&r);
    return st;
}

static int op_old_encode(void *p)
{
    job *j = p;
    return old_encode(&j->buf, j->v, j->n);
}

static int op_new_encode(void *p)
{
    job *j = p;
    j->buf.len = 0;
    return api_buf_vector(&j->buf, OPTIM_F32, j->v, j->n);
}

static void print_row(const char *what, size_t n, size_t bytes, stats s, double base_mean)
{
    printf("| %-24s | %9zu | %10.3f | %10.3f | %10.3f | %8.1f | %6.2fx |\n", what, n,
           s.p50 * 1e3, s.mean * 1e3, s.p99 * 1e3, (double)bytes / s.mean / 1e6,
           base_mean > 0 ? base_mean / s.mean : 1.0);
}

static char *body_of(const float *v, size_t n, const char *fmt, size_t *len)
{
    size_t cap = n * 26 + 64;
    char *b = malloc(cap), *p = b;
    if (!b)
        abort();
    p += sprintf(p, "{\"grad\":[");
    for (size_t i = 0; i < n; i++) {
        p += sprintf(p, fmt, (double)v[i]);
        if (i + 1 < n)
            *p++ = ',';
    }
    p += sprintf(p, "],\"loss\":0.5}");
    *len = (size_t)(p - b);
    return b;
}

static void bench_size(size_t n, double min_time)
{
    float *v = malloc(n * sizeof *v), *out = malloc(n * sizeof *out);
    if (!v || !out)
        abort();
    for (size_t i = 0; i < n; i++) {
        double u = (double)(rnd() >> 11) / 9007199254740992.0;
        v[i] = (float)((rnd() & 1 ? -1 : 1) * pow(10, -7 + 8 * u));
    }
    static const char *const fmts[] = {"%.9g", "%.17g"};
    for (int f = 0; f < 2; f++) {
        job j = {0};
        j.body = body_of(v, n, fmts[f], &j.len);
        j.n = n;
        j.out = out;
        char label[64];
        heap_peak = heap_now = 0;
        op_old_decode(&j);
        size_t old_peak = heap_peak;
        heap_peak = heap_now = 0;
        op_new_decode(&j);
        size_t new_peak = heap_peak;
        /* Both must read the same floats. */
        float *o2 = malloc(n * sizeof *o2);
        if (!o2 || old_decode(j.body, j.len, n, o2) || op_new_decode(&j) ||
            memcmp(o2, out, n * sizeof *o2) != 0) {
            fprintf(stderr, "json: old and new decode differ\n");
            exit(1);
        }
        free(o2);
        stats so = time_op(op_old_decode, &j, min_time);
        snprintf(label, sizeof label, "old decode (%s)", fmts[f]);
        print_row(label, n, j.len, so, 0);
        stats sn = time_op(op_new_decode, &j, min_time);
        snprintf(label, sizeof label, "new decode (%s)", fmts[f]);
        print_row(label, n, j.len, sn, so.mean);
        printf("|   cJSON peak heap: old %zu bytes (%.1fx the body), new %zu bytes |\n", old_peak,
               (double)old_peak / (double)j.len, new_peak);
        free((char *)j.body);
    }
    job j = {0};
    j.v = v;
    j.n = n;
    op_old_encode(&j);
    api_buf nb = {0};
    api_buf_vector(&nb, OPTIM_F32, v, n);
    if (nb.len != j.buf.len || memcmp(nb.data, j.buf.data, nb.len) != 0) {
        fprintf(stderr, "json: old and new encode differ\n");
        exit(1);
    }
    size_t bytes = nb.len;
    free(nb.data);
    stats so = time_op(op_old_encode, &j, min_time);
    print_row("old encode (snprintf)", n, bytes, so, 0);
    free(j.buf.data);
    j.buf = (api_buf){0};
    stats sn = time_op(op_new_encode, &j, min_time);
    print_row("new encode", n, bytes, sn, so.mean);
    free(j.buf.data);
    free(v);
    free(out);
}

/* ------------------------------------------------------- exhaustive */

typedef struct {
    uint64_t from, to; /* float32: bit patterns; float64: sample count */
    int f64;
    uint64_t seed;
    uint64_t fast, slow, bad;
    uint64_t like_fast, like_slow; /* float64: the gradient-like half */
} chunk;

static void *run_chunk(void *p)
{
    chunk *c = p;
    char a[48], b[48];
    uint64_t s = c->seed | 1;
    for (uint64_t i = c->from; i < c->to; i++) {
        size_t n;
        if (!c->f64) {
            uint32_t u = (uint32_t)i;
            float f;
            memcpy(&f, &u, sizeof f);
            if (!isfinite(f))
                continue;
            n = api_fmt_f32_fast(a, f);
            if (!n) {
                c->slow++;
                continue;
            }
            snprintf(b, sizeof b, "%.9g", (double)f);
        } else {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            double d;
            if (i & 1) {
                memcpy(&d, &s, sizeof d);
            } else {
                double u = (double)(s >> 11) / 9007199254740992.0;
                d = ((s & 1) ? -1 : 1) * pow(10, -12 + 16 * u);
            }
            if (!isfinite(d))
                continue;
            n = api_fmt_f64_fast(a, d);
            if (!(i & 1))
                *(n ? &c->like_fast : &c->like_slow) += 1;
            if (!n) {
                c->slow++;
                continue;
            }
            snprintf(b, sizeof b, "%.17g", d);
        }
        a[n] = '\0';
        c->fast++;
        if (strcmp(a, b) != 0 && c->bad++ < 5)
            fprintf(stderr, "MISMATCH 0x%llx: \"%s\" vs snprintf \"%s\"\n", (unsigned long long)i,
                    a, b);
    }
    return NULL;
}

static int check_all(uint64_t from, uint64_t to, int f64, int threads)
{
    chunk c[16];
    pthread_t th[16];
    double t0 = now_sec();
    uint64_t span = (to - from + (uint64_t)threads - 1) / (uint64_t)threads;
    for (int i = 0; i < threads; i++) {
        uint64_t a = from + span * (uint64_t)i, b = a + span > to ? to : a + span;
        c[i] = (chunk){.from = a, .to = b, .f64 = f64, .seed = 0x9e3779b97f4a7c15u * (uint64_t)(i + 1)};
        pthread_create(&th[i], NULL, run_chunk, &c[i]);
    }
    uint64_t fast = 0, slow = 0, bad = 0, lf = 0, ls = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        fast += c[i].fast;
        slow += c[i].slow;
        bad += c[i].bad;
        lf += c[i].like_fast;
        ls += c[i].like_slow;
    }
    printf("%s [%llu, %llu): %llu finite values, %llu printed by the fast path and equal to "
           "snprintf: %s (%llu mismatches), %llu (%.2e of them) left to snprintf; %.0f s\n",
           f64 ? "float64 samples" : "float32 bit patterns", (unsigned long long)from,
           (unsigned long long)to, (unsigned long long)(fast + slow), (unsigned long long)fast,
           bad ? "NO" : "yes", (unsigned long long)bad, (unsigned long long)slow,
           (double)slow / (double)(fast + slow), now_sec() - t0);
    if (f64)
        printf("  of them gradient-like (|x| in 1e-12..1e4): %llu, %llu (%.2e) left to snprintf; "
               "random bit patterns: %llu, %llu left to snprintf (|x| beyond 1e+-40 always is)\n",
               (unsigned long long)(lf + ls), (unsigned long long)ls,
               (double)ls / (double)(lf + ls + !(lf + ls)),
               (unsigned long long)(fast + slow - lf - ls), (unsigned long long)(slow - ls));
    return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
    double min_time = 0.3;
    size_t sizes[8] = {1000, 1000000};
    int n_sizes = 2, threads = 2, mode = 0;
    uint64_t from = 0, to = UINT64_C(1) << 32, f64n = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--exhaustive-f32")) {
            mode = 1;
        } else if (!strcmp(a, "--check-f64") && v) {
            mode = 2;
            f64n = (uint64_t)strtod(v, NULL);
            i++;
        } else if (!strcmp(a, "--threads") && v) {
            threads = atoi(v);
            i++;
        } else if (!strcmp(a, "--from") && v) {
            from = (uint64_t)strtod(v, NULL);
            i++;
        } else if (!strcmp(a, "--to") && v) {
            to = (uint64_t)strtod(v, NULL);
            i++;
        } else if (!strcmp(a, "--min-time") && v) {
            min_time = strtod(v, NULL);
            i++;
        } else if (!strcmp(a, "--sizes") && v) {
            n_sizes = 0;
            for (char *s = argv[++i]; *s && n_sizes < 8;) {
                char *end;
                sizes[n_sizes++] = (size_t)strtod(s, &end);
                s = *end == ',' ? end + 1 : end;
                if (end == s && *end != '\0')
                    break;
            }
        } else {
            fprintf(stderr,
                    "usage: json [--sizes 1e3,1e6] [--min-time S] | --exhaustive-f32 [--from A "
                    "--to B] | --check-f64 N   [--threads T]\n");
            return 2;
        }
    }
    if (threads < 1 || threads > 16)
        threads = 2;
    if (mode == 1)
        return check_all(from, to > (UINT64_C(1) << 32) ? UINT64_C(1) << 32 : to, 0, threads);
    if (mode == 2)
        return check_all(0, f64n, 1, threads);

    cJSON_Hooks hooks = {count_malloc, count_free};
    cJSON_InitHooks(&hooks);
    printf("| float32 JSON vector      |  elements |   p50 (ms) |  mean (ms) |   p99 (ms) |     MB/s | vs old  |\n");
    printf("|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < n_sizes; i++)
        bench_size(sizes[i], min_time);
    return 0;
}
