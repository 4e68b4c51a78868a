/*
 * failmalloc.c -- an allocation-failure countdown for the daemon, loaded
 * with LD_PRELOAD by tests/test_faults.c (built as
 * $(BUILD)/tests/failmalloc.so, without sanitizers).
 *
 * malloc, calloc and realloc (the daemon's own allocations, cJSON's and
 * SQLite's, which call them) are passed to the next definition (libc, or
 * ASan's interceptors under `make asan`), except that the Nth allocation
 * counted fails with ENOMEM:
 *
 *   OPTD_FAILMALLOC=N      fail the Nth allocation, once
 *   OPTD_FAILMALLOC=0      only count
 *
 * Only allocations made while a request is being handled count: the
 * daemon calls optd_failmalloc_scope(1) / (0) around each handler when
 * OPTD_FAILMALLOC is set (server/handlers.c looks the function up with
 * dlsym), so startup, libmicrohttpd's connection handling and shutdown are
 * never failed.  At exit one line goes to stderr (the daemon's log):
 * "failmalloc: A allocations counted, F failed".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *(*next_malloc)(size_t);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void (*next_free)(void *);

static long long fail_at = -1; /* -1: inert; 0: count only; N: fail the Nth */
static atomic_llong counted;
static atomic_llong failed;
/* initial-exec: no call into the dynamic linker to reach them, which
 * matters when malloc is called while the linker itself is at work (under
 * ASan, from its interceptors' set-up). */
static __thread int in_scope __attribute__((tls_model("initial-exec")));
static int resolving; /* only during the first, single-threaded set-up */

/* dlsym may allocate before the next definitions are known: those few
 * early blocks come from here and are never freed. */
static _Alignas(16) char early[16384];
static size_t early_used;

static void *early_alloc(size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (early_used + n > sizeof early)
        return NULL;
    void *p = early + early_used;
    early_used += n;
    return p;
}

static int is_early(const void *p)
{
    return (const char *)p >= early && (const char *)p < early + sizeof early;
}

static void resolve(void)
{
    if (next_free || resolving)
        return;
    resolving = 1;
    next_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    next_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    next_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    next_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    resolving = 0;
}

__attribute__((constructor)) static void failmalloc_init(void)
{
    resolve();
    const char *s = getenv("OPTD_FAILMALLOC");
    if (s && *s)
        fail_at = atoll(s);
}

__attribute__((destructor)) static void failmalloc_report(void)
{
    if (fail_at < 0)
        return;
    char line[128];
    int n = snprintf(line, sizeof line, "failmalloc: %lld allocations counted, %lld failed\n",
                     (long long)atomic_load(&counted), (long long)atomic_load(&failed));
    if (n > 0 && write(STDERR_FILENO, line, (size_t)n) < 0)
        return;
}

/* Called by the daemon around a request's handler. */
void optd_failmalloc_scope(int on);
void optd_failmalloc_scope(int on)
{
    in_scope = on;
}

static int fail_now(void)
{
    if (!in_scope || fail_at < 0)
        return 0;
    long long k = atomic_fetch_add(&counted, 1) + 1;
    if (k != fail_at)
        return 0;
    atomic_fetch_add(&failed, 1);
    return 1;
}

void *malloc(size_t n)
{
    resolve();
    if (!next_malloc)
        return early_alloc(n);
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return next_malloc(n);
}

void *calloc(size_t k, size_t n)
{
    resolve();
    if (!next_calloc) {
        if (n && k > (size_t)-1 / n)
            return NULL;
        return early_alloc(k * n); /* static: already zero */
    }
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return next_calloc(k, n);
}

void *realloc(void *p, size_t n)
{
    resolve();
    if (p && is_early(p)) {
        void *q = malloc(n);
        size_t left = (size_t)(early + sizeof early - (char *)p);
        if (q)
            memcpy(q, p, n < left ? n : left);
        return q;
    }
    if (!next_realloc)
        return early_alloc(n);
    if (fail_now()) {
        errno = ENOMEM;
        return NULL;
    }
    return next_realloc(p, n);
}

void free(void *p)
{
    if (!p || is_early(p))
        return;
    resolve();
    if (next_free)
        next_free(p);
}
