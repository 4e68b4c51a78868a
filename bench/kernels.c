/*
 * bench/kernels.c -- optim_step's speed on one core, float32, against the
 * memory ceiling measured in the same run and against torch.optim.
 *
 *   build/bench/kernels [--sizes 1e3,1e5,1e6,1e7] [--min-time 0.2] [--rounds 3]
 *                       [--threads 2] [--no-torch] [--torch-script PATH]
 *
 * For every size and rule: params/s of optim_step, the memory ceiling in
 * params/s (the better of a copy and a triad loop over arrays as large in
 * total as the rule's vectors, divided by optim_bytes_per_param), the
 * fraction of it reached, the cost of one step and, when /usr/bin/python3
 * imports torch, torch.optim's params/s and optd's speed-up.
 *
 * The machine is shared, so every figure of a cell is taken in the same
 * window: the copy and triad loops run right after the step's batches,
 * and bench/torch_optim.py (kept running, two instances, see "torch")
 * times the same row right after them.  The whole table is walked --rounds
 * times and each figure is the median of all its batches, so a neighbour's
 * burst of load spoils a part of every cell's samples rather than all of a
 * few cells'.  bench/README.md explains the columns.
 *
 * The threaded columns split one step over --threads threads the way the
 * daemon's engine does (server/engine.c): optim_plan_make once, the vector
 * cut into OPTIM_VEC_BLOCK-element blocks, each thread given a contiguous
 * share of the blocks and running optim_plan_run block by block, then
 * optim_plan_commit.  A copy loop split the same way gives the memory
 * ceiling of that many cores.
 */
#include "optim/optim.h"

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZES 8
#define MAX_ROUNDS 10
#define ALIGN 64
/* A batch lasts >= 2 ms: long enough that two clock reads vanish in it even
 * at 1e3 (a step there is a fraction of a µs), short enough that the median
 * of many batches shrugs off the preemptions of a shared machine. */
#define BATCH_SEC 0.002
#define WARMUP_SEC 0.01
/* Batches per cell and round: at least MIN_CHUNK (a 1e7 step is ~5 ms),
 * at most what a pool can take over MAX_ROUNDS. */
#define MIN_CHUNK 2
#define POOL_MAX 512
#define MAX_CHUNK (POOL_MAX / MAX_ROUNDS)

/* ------------------------------------------------------------------ rows */

/* One line of the table: a kind at its defaults, or an extra flag set.
 * key is the name bench/torch_optim.py answers under. */
typedef struct {
    const char *key;
    const char *label;
    optim_kind kind;
    double momentum;
    bool amsgrad;
    bool in_torch;     /* torch 1.13 has it (Lion it has not) */
} row_def;

static const row_def ROWS[] = {
    {"sgd", "sgd", OPTIM_SGD, 0, false, true},
    {"sgd_momentum", "sgd momentum=0.9", OPTIM_SGD, 0.9, false, true},
    {"adagrad", "adagrad", OPTIM_ADAGRAD, 0, false, true},
    {"rmsprop", "rmsprop", OPTIM_RMSPROP, 0, false, true},
    {"adam", "adam", OPTIM_ADAM, 0, false, true},
    {"adam_amsgrad", "adam amsgrad", OPTIM_ADAM, 0, true, true},
    {"adamw", "adamw", OPTIM_ADAMW, 0, false, true},
    {"adamax", "adamax", OPTIM_ADAMAX, 0, false, true},
    {"adadelta", "adadelta", OPTIM_ADADELTA, 0, false, true},
    {"nadam", "nadam", OPTIM_NADAM, 0, false, true},
    {"radam", "radam", OPTIM_RADAM, 0, false, true},
    {"asgd", "asgd", OPTIM_ASGD, 0, false, true},
    {"rprop", "rprop", OPTIM_RPROP, 0, false, true},
    {"lion", "lion", OPTIM_LION, 0, false, false},
};
#define N_ROWS (sizeof ROWS / sizeof ROWS[0])

/* The rows the targets name. */
static const char *const TARGET_ROWS[] = {"adam", "adamw", "sgd_momentum"};
#define N_TARGET_ROWS (sizeof TARGET_ROWS / sizeof TARGET_ROWS[0])
#define TARGET_CEIL_FRACTION 0.70
#define TARGET_TORCH_SPEEDUP 5.0
#define TARGET_SMALL_NS 1000.0
#define TARGET_BIG_N 10000000u
#define TARGET_SMALL_N 1000u
/* At 1e7, Adam on --threads 2 against one thread. */
#define TARGET_THREADS_ROW "adam"
#define TARGET_THREADS_SPEEDUP 1.8

static void row_hparams(const row_def *r, optim_hparams *hp)
{
    optim_hparams_default(r->kind, hp);
    if (r->momentum != 0)
        hp->momentum = r->momentum;
    hp->amsgrad = r->amsgrad;
}

static int row_index(const char *key)
{
    for (size_t r = 0; r < N_ROWS; r++)
        if (strcmp(ROWS[r].key, key) == 0)
            return (int)r;
    return -1;
}

/* ---------------------------------------------------------------- timing
 *
 * Batches are timed with CLOCK_MONOTONIC.  The thread's CPU clock is read
 * beside it only to tell whether the thread kept the CPU: on a shared
 * two-core machine a batch the scheduler cut into measures the neighbour,
 * not the kernel, so such a batch is set aside and used only when too few
 * undisturbed ones were caught.
 */

/* A batch that got less than this share of its wall time on the CPU was
 * preempted. */
#define ON_CPU_SHARE 0.9

static double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The process's CPU clock: the threaded ops' workers count too (they sleep
 * while a single-threaded op runs, so for those it is the thread's). */
static double cpu_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Seconds per call of each batch of one figure, gathered over the rounds:
 * undisturbed batches in s, preempted ones in cut. */
typedef struct {
    double s[POOL_MAX];
    size_t n;
    double cut[POOL_MAX];
    size_t n_cut;
} pool;

static void pool_add(pool *p, double sec, bool undisturbed)
{
    if (undisturbed && p->n < POOL_MAX)
        p->s[p->n++] = sec;
    else if (!undisturbed && p->n_cut < POOL_MAX)
        p->cut[p->n_cut++] = sec;
}

/* Enough undisturbed batches to stand alone. */
#define POOL_ENOUGH 3

/* The median of the undisturbed batches, or of all of them when fewer
 * than POOL_ENOUGH ran undisturbed; 0 for an empty pool. */
static double pool_median(const pool *p)
{
    double all[2 * POOL_MAX];
    size_t n = 0;
    for (size_t i = 0; i < p->n; i++)
        all[n++] = p->s[i];
    if (p->n < POOL_ENOUGH)
        for (size_t i = 0; i < p->n_cut; i++)
            all[n++] = p->cut[i];
    if (n == 0)
        return 0;
    qsort(all, n, sizeof all[0], cmp_double);
    return n % 2 ? all[n / 2] : 0.5 * (all[n / 2 - 1] + all[n / 2]);
}

typedef void (*op_fn)(void *ctx);

typedef struct {
    op_fn fn;
    void *ctx;
    pool *out;       /* each batch's seconds per call is added here */
    unsigned threads; /* CPUs the op keeps busy (0 = 1)             */
} timed_op;

/* One round of a cell: the ops run one after the other, each warmed up
 * and then timed in batches run back to back, as a training loop runs its
 * step (and as torch's steps are timed).  The ceiling loops follow straight
 * after the step, in the same second of the shared machine.  Taking turns
 * batch by batch would share the window more tightly, but each switch
 * between working sets (dirty lines of the other op going back to memory,
 * cold TLB and prefetchers) cost a 1e7 step 15-30%, even after an untimed
 * call.  ops[0] sets the number of batches: undisturbed ones that together
 * last >= min_time, trying at most twice as many; the ceiling loops get as
 * many batches of half the length. */
static void time_ops(timed_op *ops, size_t nops, double min_time)
{
    size_t nsamp = 0;
    for (size_t o = 0; o < nops; o++) {
        size_t calls = 0;
        double t0 = now_sec(), el;
        do {
            ops[o].fn(ops[o].ctx);
            calls++;
            el = now_sec() - t0;
        } while (calls < 2 || el < WARMUP_SEC);
        double per = el / (double)calls;
        double batch = o == 0 ? BATCH_SEC : BATCH_SEC / 2;
        size_t k = per >= batch ? 1 : (size_t)ceil(batch / per);
        if (o == 0) {
            nsamp = (size_t)ceil(min_time / (per * (double)k));
            if (nsamp < MIN_CHUNK)
                nsamp = MIN_CHUNK;
            if (nsamp > MAX_CHUNK)
                nsamp = MAX_CHUNK;
        }
        size_t good = 0;
        for (size_t tries = 0; good < nsamp && tries < 2 * nsamp; tries++) {
            double c = cpu_sec(), a = now_sec();
            for (size_t j = 0; j < k; j++)
                ops[o].fn(ops[o].ctx);
            double wall = now_sec() - a;
            unsigned th = ops[o].threads ? ops[o].threads : 1;
            bool undisturbed = cpu_sec() - c >= ON_CPU_SHARE * th * wall;
            pool_add(ops[o].out, wall / (double)k, undisturbed);
            good += undisturbed;
        }
    }
}

/* ---------------------------------------------------------------- memory */

/* Returns a new 64-byte-aligned array of n floats, every page written;
 * caller frees. */
static float *alloc_floats(size_t n)
{
    size_t bytes = (n * sizeof(float) + ALIGN - 1) / ALIGN * ALIGN;
    float *p = aligned_alloc(ALIGN, bytes ? bytes : ALIGN);
    if (!p) {
        fprintf(stderr, "kernels: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    memset(p, 0, bytes);
    return p;
}

/* Uniform in [-1, 1) from a fixed LCG: same inputs every run. */
static void fill_uniform(float *x, size_t n, uint64_t seed)
{
    uint64_t s = seed * 6364136223846793005u + 1442695040888963407u;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005u + 1442695040888963407u;
        x[i] = (float)((double)(s >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
}

/* ------------------------------------------------------ ceiling loops
 *
 * Compiled like the kernels -- one clone per ISA, chosen by the same
 * resolver -- so the ceiling is what the same vector width can stream.
 * The main loop runs over a multiple of 16 elements for the reason given
 * in docs/optimizers.md (GCC's -O2 cost model), and the copy must not be
 * turned into a memcpy call, whose large-size path uses non-temporal
 * stores the kernels do not have.
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BENCH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define NO_MEMCPY __attribute__((optimize("no-tree-loop-distribute-patterns")))
#define HAVE_CLONES 1
#else
#define BENCH_CLONES
#define NO_MEMCPY
#define HAVE_CLONES 0
#endif

BENCH_CLONES NO_MEMCPY __attribute__((noinline))
static void copy_loop(float *restrict a, const float *restrict b, size_t n)
{
    size_t m = n & ~(size_t)15;
    for (size_t i = 0; i < m; i++)
        a[i] = b[i];
    for (size_t i = m; i < n; i++)
        a[i] = b[i];
}

BENCH_CLONES NO_MEMCPY __attribute__((noinline))
static void triad_loop(float *restrict a, const float *restrict b,
                       const float *restrict c, float s, size_t n)
{
    size_t m = n & ~(size_t)15;
    for (size_t i = 0; i < m; i++)
        a[i] = b[i] + s * c[i];
    for (size_t i = m; i < n; i++)
        a[i] = b[i] + s * c[i];
}

typedef struct {
    float *a, *b, *c;
    size_t n;
} stream_ctx;

static void op_copy(void *ctx)
{
    stream_ctx *s = ctx;
    copy_loop(s->a, s->b, s->n);
}

static void op_triad(void *ctx)
{
    stream_ctx *s = ctx;
    triad_loop(s->a, s->b, s->c, 0.5f, s->n);
}

/* Bytes per element each loop puts on the memory bus: what it reads and
 * writes (8 and 12, counted as optim_bytes_per_param counts) plus the
 * write-allocate read of the destination line, which the in-place
 * optimizer updates never pay (they read every line they write). */
#define COPY_BUS 12.0
#define TRIAD_BUS 16.0

/* ----------------------------------------------------------- optd cells */

typedef struct {
    const optim_hparams *hp;
    optim_state *st;
    float *params;
    const float *grad;
    size_t n;
} step_ctx;

static void op_step(void *ctx)
{
    step_ctx *s = ctx;
    optim_step(s->hp, s->st, OPTIM_F32, s->params, s->grad, s->n);
}

/* ------------------------------------------------------- thread pool
 *
 * threads - 1 workers plus the caller.  A job is a function over a range
 * of blocks; share() cuts nblocks into contiguous shares as the engine
 * does, the caller takes share 0 and waits for the others.
 */
#define MAX_THREADS 16
/* Below this many blocks the engine runs a step on one thread. */
#define POOL_MIN_BLOCKS 8

typedef void (*block_fn)(void *ctx, size_t b0, size_t b1);

typedef struct {
    unsigned threads;
    pthread_t tids[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned long gen;
    unsigned pending;
    bool stop;
    block_fn fn;
    void *ctx;
    size_t nblocks;
} tpool;

typedef struct {
    tpool *p;
    unsigned index;
} tpool_arg;

static tpool_arg tpool_args[MAX_THREADS];

static void share(size_t nblocks, unsigned threads, unsigned i, size_t *b0, size_t *b1)
{
    *b0 = nblocks * i / threads;
    *b1 = nblocks * (i + 1) / threads;
}

static void *tpool_main(void *arg)
{
    tpool_arg *a = arg;
    tpool *p = a->p;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->go, &p->mu);
        if (p->stop)
            break;
        seen = p->gen;
        block_fn fn = p->fn;
        void *ctx = p->ctx;
        size_t b0, b1;
        share(p->nblocks, p->threads, a->index, &b0, &b1);
        pthread_mutex_unlock(&p->mu);
        if (b1 > b0)
            fn(ctx, b0, b1);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void tpool_start(tpool *p, unsigned threads)
{
    memset(p, 0, sizeof *p);
    p->threads = threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    for (unsigned i = 1; i < threads; i++) {
        tpool_args[i].p = p;
        tpool_args[i].index = i;
        if (pthread_create(&p->tids[i], NULL, tpool_main, &tpool_args[i]) != 0) {
            fprintf(stderr, "kernels: pthread_create failed\n");
            exit(1);
        }
    }
}

static void tpool_stop(tpool *p)
{
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 1; i < p->threads; i++)
        pthread_join(p->tids[i], NULL);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
}

static void tpool_run(tpool *p, block_fn fn, void *ctx, size_t nblocks)
{
    if (p->threads < 2 || nblocks < POOL_MIN_BLOCKS) {
        fn(ctx, 0, nblocks);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->nblocks = nblocks;
    p->pending = p->threads - 1;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    size_t b0, b1;
    share(nblocks, p->threads, 0, &b0, &b1);
    if (b1 > b0)
        fn(ctx, b0, b1);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static tpool the_pool;

/* One step on the pool: plan, the blocks, commit. */
typedef struct {
    step_ctx *s;
    optim_plan plan;
} tstep_ctx;

static void step_blocks(void *ctx, size_t b0, size_t b1)
{
    tstep_ctx *t = ctx;
    step_ctx *s = t->s;
    size_t end = b1 * OPTIM_VEC_BLOCK < s->n ? b1 * OPTIM_VEC_BLOCK : s->n;
    for (size_t off = b0 * OPTIM_VEC_BLOCK; off < end; off += OPTIM_VEC_BLOCK)
        optim_plan_run(&t->plan, s->st, OPTIM_F32, s->params, s->grad, off,
                       end - off < OPTIM_VEC_BLOCK ? end : off + OPTIM_VEC_BLOCK);
}

static void op_step_threads(void *ctx)
{
    tstep_ctx t;
    t.s = ctx;
    optim_plan_make(t.s->hp, t.s->st, &t.plan);
    tpool_run(&the_pool, step_blocks, &t, optim_vec_blocks(t.s->n));
    optim_plan_commit(&t.plan, t.s->st);
}

static void copy_blocks(void *ctx, size_t b0, size_t b1)
{
    stream_ctx *s = ctx;
    size_t begin = b0 * OPTIM_VEC_BLOCK;
    size_t end = b1 * OPTIM_VEC_BLOCK < s->n ? b1 * OPTIM_VEC_BLOCK : s->n;
    if (end > begin)
        copy_loop(s->a + begin, s->b + begin, end - begin);
}

static void op_copy_threads(void *ctx)
{
    stream_ctx *s = ctx;
    tpool_run(&the_pool, copy_blocks, s, optim_vec_blocks(s->n));
}

/* The figures of one (row, size) cell, each a pool of batch timings. */
enum {
    F_STEP = 0,        /* optim_step                                       */
    F_COPY,            /* copy loop, per pass                              */
    F_TRIAD,           /* triad loop, per pass                             */
    F_STEP_T,          /* the step split over --threads threads            */
    F_COPY_T,          /* the copy loop split the same way                 */
    F_TORCH,           /* torch as shipped, foreach=True                   */
    F_TUNED_FOREACH,   /* torch, malloc keeping freed memory, foreach=True */
    F_TUNED_SINGLE,    /* ... foreach=False                                */
    F_COUNT
};

typedef struct {
    pool fig[F_COUNT];
    size_t copy_n, triad_n;  /* elements per array of the ceiling loops   */
    bool finite;             /* params still finite after every round     */
} cell;

static size_t n_buffers(const optim_hparams *hp)
{
    unsigned need = optim_buffers_needed(hp);
    size_t k = 0;
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        k += (need >> s) & 1u;
    return k;
}

/* The vectors every cell of a size reuses: params, grad, three buffers,
 * and the ceiling loops' arrays for the largest footprint. */
typedef struct {
    float *params, *grad, *bufs[OPTIM_MAX_BUFFERS];
    stream_ctx cp, tri;
} arena;

static void arena_init(arena *a, size_t max_n)
{
    size_t max_vec = 2 + OPTIM_MAX_BUFFERS;
    a->params = alloc_floats(max_n);
    a->grad = alloc_floats(max_n);
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        a->bufs[s] = alloc_floats(max_n);
    a->cp.a = alloc_floats(max_vec * max_n / 2 + 1);
    a->cp.b = alloc_floats(max_vec * max_n / 2 + 1);
    fill_uniform(a->cp.b, max_vec * max_n / 2 + 1, 11);
    a->tri.a = a->cp.a;
    a->tri.b = a->cp.b;
    a->tri.c = alloc_floats(max_vec * max_n / 3 + 1);
    fill_uniform(a->tri.c, max_vec * max_n / 3 + 1, 12);
}

static void arena_free(arena *a)
{
    free(a->params);
    free(a->grad);
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        free(a->bufs[s]);
    free(a->cp.a);
    free(a->cp.b);
    free(a->tri.c);
}

/* One round of a row at size n: fresh state, the step, then the ceiling
 * loops over arrays as large in total as the rule's vectors (two arrays of
 * half for copy, three of a third for triad). */
static int optd_round(const row_def *row, size_t n, arena *a, cell *c, double min_time)
{
    optim_hparams hp;
    optim_error err;
    row_hparams(row, &hp);
    if (optim_hparams_validate(&hp, &err) != OPTIM_OK) {
        fprintf(stderr, "kernels: row %s: %s: %s\n", row->label, err.field, err.msg);
        return -1;
    }
    optim_state st;
    optim_state_init(&hp, &st);
    unsigned need = optim_buffers_needed(&hp);
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++) {
        st.buf[s] = NULL;
        if (need & (1u << s)) {
            optim_buffer_init(&hp, s, OPTIM_F32, a->bufs[s], n);
            st.buf[s] = a->bufs[s];
        }
    }
    fill_uniform(a->params, n, 1);

    size_t footprint = (2 + n_buffers(&hp)) * n * sizeof(float);
    a->cp.n = c->copy_n = footprint / (2 * sizeof(float));
    a->tri.n = c->triad_n = footprint / (3 * sizeof(float));
    step_ctx sc = {&hp, &st, a->params, a->grad, n};
    timed_op ops[5] = {{op_step, &sc, &c->fig[F_STEP], 1},
                       {op_copy, &a->cp, &c->fig[F_COPY], 1},
                       {op_triad, &a->tri, &c->fig[F_TRIAD], 1},
                       {op_step_threads, &sc, &c->fig[F_STEP_T], the_pool.threads},
                       {op_copy_threads, &a->cp, &c->fig[F_COPY_T], the_pool.threads}};
    /* The threaded ops only where the engine would use its pool. */
    bool threaded = the_pool.threads > 1 && optim_vec_blocks(n) >= POOL_MIN_BLOCKS;
    time_ops(ops, threaded ? 5 : 3, min_time);
    for (size_t j = 0; j < n; j++)
        if (!isfinite(a->params[j])) {
            c->finite = false;
            break;
        }
    return 0;
}

/* -------------------------------------------------------------- machine */

/* "model name" from /proc/cpuinfo, with family and model numbers: a VM may
 * report only "AMD EPYC". */
static void cpu_model(char *out, size_t cap)
{
    char name[160] = "unknown", family[16] = "?", model[16] = "?";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            char *v = strchr(line, ':');
            if (!v)
                continue;
            v++;
            while (*v == ' ' || *v == '\t')
                v++;
            v[strcspn(v, "\n")] = '\0';
            if (strncmp(line, "cpu family", 10) == 0) {
                snprintf(family, sizeof family, "%s", v);
            } else if (strncmp(line, "model\t", 6) == 0) {
                snprintf(model, sizeof model, "%s", v);
            } else if (strncmp(line, "model name", 10) == 0) {
                /* Last of the three in the first CPU's block. */
                snprintf(name, sizeof name, "%s", v);
                break;
            }
        }
        fclose(f);
    }
    snprintf(out, cap, "%s (family %s, model %s), %ld CPUs online", name, family, model,
             sysconf(_SC_NPROCESSORS_ONLN));
}

/* The clone GCC's target_clones resolver runs: it takes the first of
 * avx512f, avx2 that the CPU reports, else the default build. */
static const char *clone_variant(void)
{
#if HAVE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return "avx512f (AVX-512)";
    if (__builtin_cpu_supports("avx2"))
        return "avx2 (AVX2)";
    return "default (baseline x86-64, SSE2)";
#else
    return "none (no target_clones on this compiler/arch: plain build)";
#endif
}

static const char *compiler_name(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#else
    return "unknown C compiler";
#endif
}

/* ---------------------------------------------------------------- torch
 *
 * Two instances of bench/torch_optim.py --serve stay up for the whole run
 * and time each row right after optd's batches of the same cell.
 *   shipped: foreach=True in the caller's environment -- torch as a user
 *            runs it.
 *   tuned:   foreach=True and foreach=False (the better one counts), with
 *            glibc's malloc told to keep freed memory (no mmap, no trim).
 * torch allocates a temporary tensor per operation.  Above glibc's mmap
 * threshold (at most 32 MB, so always at 1e7) each one is a fresh mapping
 * that faults in page by page, which on this VM costs more than the
 * arithmetic; tuned, the pages are reused and torch runs at its
 * memory-bound best.  Both are reported: the first is what torch.optim
 * costs out of the box, the second the fairer race.
 */
#define TORCH_TUNABLES "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

typedef struct {
    const char *name;
    pid_t pid;
    FILE *to, *from;
    bool up;
} torch_proc;

static void cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFD);
    if (fl >= 0)
        fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
}

/* Starts `script --serve` with its stdin and stdout on pipes (tunables NULL
 * leaves the environment alone) and reads its greeting into info.  Returns
 * 0 when it is up. */
static int torch_start(torch_proc *tp, const char *name, const char *script,
                       const char *tunables, char *info, size_t cap)
{
    int in[2], out[2];
    memset(tp, 0, sizeof *tp);
    tp->name = name;
    if (pipe(in) != 0)
        return -1;
    if (pipe(out) != 0) {
        close(in[0]);
        close(in[1]);
        return -1;
    }
    /* The second instance must not inherit the first one's pipe ends, or
     * closing its stdin would not reach it. */
    cloexec(in[0]);
    cloexec(in[1]);
    cloexec(out[0]);
    cloexec(out[1]);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        close(in[0]);
        close(in[1]);
        close(out[0]);
        close(out[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(in[0], STDIN_FILENO);
        dup2(out[1], STDOUT_FILENO);
        if (tunables)
            setenv("GLIBC_TUNABLES", tunables, 1);
        setenv("OMP_NUM_THREADS", "1", 1);
        setenv("MKL_NUM_THREADS", "1", 1);
        execl("/usr/bin/python3", "python3", script, "--serve", (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    tp->pid = pid;
    tp->to = fdopen(in[1], "w");
    tp->from = fdopen(out[0], "r");
    if (!tp->to || !tp->from) {
        if (tp->to)
            fclose(tp->to);
        else
            close(in[1]);
        if (tp->from)
            fclose(tp->from);
        else
            close(out[0]);
        waitpid(pid, NULL, 0);
        return -1;
    }
    char line[256];
    if (!fgets(line, sizeof line, tp->from) || strncmp(line, "# torch ", 8) != 0) {
        fclose(tp->to);
        fclose(tp->from);
        waitpid(pid, NULL, 0);
        return -1;
    }
    line[strcspn(line, "\n")] = '\0';
    snprintf(info, cap, "%.200s", line + 2);
    tp->up = true;
    return 0;
}

/* Asks for one round of a row and adds its batches to out.  A dead
 * instance is marked down; an error answer is reported and skipped. */
static void torch_request(torch_proc *tp, const char *key, size_t n, double min_time,
                          const char *mode, pool *out)
{
    if (!tp->up)
        return;
    if (fprintf(tp->to, "%s %zu %.6g %s\n", key, n, min_time, mode) < 0 || fflush(tp->to) != 0) {
        fprintf(stderr, "kernels: torch (%s) went away\n", tp->name);
        tp->up = false;
        return;
    }
    char *line = NULL;
    size_t cap = 0;
    if (getline(&line, &cap, tp->from) < 0) {
        fprintf(stderr, "kernels: torch (%s) went away\n", tp->name);
        tp->up = false;
    } else if (line[0] == 'S') {
        /* "S key n mode u1 u2 ... ; c1 c2 ...": undisturbed, then cut */
        char *p = line;
        bool undisturbed = true;
        for (int field = 0; field < 4 && p; field++) {
            p = strchr(p, ' ');
            if (p)
                p++;
        }
        while (p && *p) {
            while (*p == ' ')
                p++;
            if (*p == ';') {
                undisturbed = false;
                p++;
                continue;
            }
            char *end;
            double v = strtod(p, &end);
            if (end == p)
                break;
            if (v > 0)
                pool_add(out, v, undisturbed);
            p = end;
        }
    } else {
        line[strcspn(line, "\n")] = '\0';
        fprintf(stderr, "kernels: torch (%s) %s %zu %s: %s\n", tp->name, key, n, mode, line);
    }
    free(line);
}

static void torch_stop(torch_proc *tp)
{
    if (!tp->pid)
        return;
    fclose(tp->to);  /* end of input: the script returns */
    fclose(tp->from);
    waitpid(tp->pid, NULL, 0);
    tp->pid = 0;
    tp->up = false;
}

/* ------------------------------------------------------------ reporting */

/* 1.23e9 -> "1.23 G". */
static const char *si(double v, char *buf, size_t cap)
{
    const char *unit = "";
    if (v >= 1e9) {
        v /= 1e9;
        unit = " G";
    } else if (v >= 1e6) {
        v /= 1e6;
        unit = " M";
    } else if (v >= 1e3) {
        v /= 1e3;
        unit = " k";
    }
    snprintf(buf, cap, "%.3g%s", v, unit);
    return buf;
}

static const char *size_name(size_t n, char *buf, size_t cap)
{
    int e = 0;
    size_t m = n;
    while (m >= 10 && m % 10 == 0) {
        m /= 10;
        e++;
    }
    if (e >= 3)
        snprintf(buf, cap, "%zue%d", m, e);
    else
        snprintf(buf, cap, "%zu", n);
    return buf;
}

static int parse_sizes(const char *arg, size_t *sizes, size_t *n_sizes)
{
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s", arg);
    *n_sizes = 0;
    for (char *tok = strtok(tmp, ","); tok; tok = strtok(NULL, ",")) {
        char *end;
        double v = strtod(tok, &end);
        if (*end != '\0' || !(v >= 1) || v > 1e9 || *n_sizes == MAX_SIZES)
            return -1;
        sizes[(*n_sizes)++] = (size_t)llround(v);
    }
    return *n_sizes ? 0 : -1;
}

/* bench/torch_optim.py from the repository root, else next to the binary's
 * build/bench/ directory. */
static void default_script(const char *argv0, char *out, size_t cap)
{
    snprintf(out, cap, "bench/torch_optim.py");
    if (access(out, R_OK) == 0)
        return;
    const char *slash = strrchr(argv0, '/');
    if (slash)
        snprintf(out, cap, "%.*s/../../bench/torch_optim.py", (int)(slash - argv0), argv0);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kernels [--sizes 1e3,1e5,1e6,1e7] [--min-time SEC] [--rounds N]\n"
            "               [--threads N] [--no-torch] [--torch-script PATH]\n");
}

/* The medians of a cell, in the table's units. */
typedef struct {
    double sec;          /* per optim_step                               */
    double pps;          /* params/s                                     */
    double ceil_bps;     /* better of copy and triad, bus bytes/s        */
    double ceil_pps;     /* ceil_bps / optim_bytes_per_param             */
    double torch_pps;    /* torch as shipped; 0 = none                   */
    double tuned_pps;    /* torch tuned, better mode; 0 = none           */
    bool tuned_single;   /* foreach=False was the better one             */
    double thr_pps;      /* the step on --threads threads; 0 = not run   */
    double thr_ceil_bps; /* the copy loop on as many threads, bus bytes/s */
    double copy_bps;     /* the copy loop on one thread, bus bytes/s     */
} figures;

static void cell_figures(const cell *c, const row_def *row, size_t n, figures *f)
{
    optim_hparams hp;
    row_hparams(row, &hp);
    f->sec = pool_median(&c->fig[F_STEP]);
    f->pps = (double)n / f->sec;
    double copy_bps = COPY_BUS * (double)c->copy_n / pool_median(&c->fig[F_COPY]);
    double triad_bps = TRIAD_BUS * (double)c->triad_n / pool_median(&c->fig[F_TRIAD]);
    f->ceil_bps = copy_bps > triad_bps ? copy_bps : triad_bps;
    f->copy_bps = copy_bps;
    f->ceil_pps = f->ceil_bps / (double)optim_bytes_per_param(&hp, OPTIM_F32);
    double t = pool_median(&c->fig[F_TORCH]);
    double tf = pool_median(&c->fig[F_TUNED_FOREACH]);
    double ts = pool_median(&c->fig[F_TUNED_SINGLE]);
    f->torch_pps = t > 0 ? (double)n / t : 0;
    double pf = tf > 0 ? (double)n / tf : 0, ps = ts > 0 ? (double)n / ts : 0;
    f->tuned_pps = pf > ps ? pf : ps;
    f->tuned_single = ps > pf;
    double st = pool_median(&c->fig[F_STEP_T]), ct = pool_median(&c->fig[F_COPY_T]);
    f->thr_pps = st > 0 ? (double)n / st : 0;
    f->thr_ceil_bps = ct > 0 ? COPY_BUS * (double)c->copy_n / ct : 0;
}

int main(int argc, char **argv)
{
    size_t sizes[MAX_SIZES] = {1000, 100000, 1000000, 10000000};
    size_t n_sizes = 4;
    double min_time = 0.2;
    unsigned rounds = 3;
    bool want_torch = true;
    unsigned threads = 2;
    char script[512];
    default_script(argv[0], script, sizeof script);

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--sizes") == 0 && i + 1 < argc) {
            if (parse_sizes(argv[++i], sizes, &n_sizes) != 0) {
                usage();
                return 2;
            }
        } else if (strcmp(argv[i], "--min-time") == 0 && i + 1 < argc) {
            min_time = strtod(argv[++i], NULL);
            if (!(min_time > 0 && min_time <= 60)) {
                usage();
                return 2;
            }
        } else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) {
            long v = strtol(argv[++i], NULL, 10);
            if (v < 1 || v > MAX_ROUNDS) {
                usage();
                return 2;
            }
            rounds = (unsigned)v;
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            long v = strtol(argv[++i], NULL, 10);
            if (v < 1 || v > MAX_THREADS) {
                usage();
                return 2;
            }
            threads = (unsigned)v;
        } else if (strcmp(argv[i], "--no-torch") == 0) {
            want_torch = false;
        } else if (strcmp(argv[i], "--torch-script") == 0 && i + 1 < argc) {
            snprintf(script, sizeof script, "%s", argv[++i]);
        } else {
            usage();
            return 2;
        }
    }
    /* A torch instance that dies must not take the benchmark with it. */
    signal(SIGPIPE, SIG_IGN);

    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    printf("optd kernel benchmark: optim_step, float32, one thread (and %u: thr columns)\n",
           threads);
    printf("cpu:       %s\n", cpu);
    printf("compiler:  %s\n", compiler_name());
    printf("kernels:   target_clones variant %s\n", clone_variant());
    printf("timing:    CLOCK_MONOTONIC; per cell >= %.2g s of optim_step batches (>= 2 ms\n"
           "           each; torch: half that) over %u round%s, after a warm-up; median;\n"
           "           64-byte-aligned vectors, touched first\n",
           min_time, rounds, rounds == 1 ? "" : "s");

    torch_proc shipped = {0}, tuned = {0};
    char torch_info[256] = "skipped (--no-torch)";
    if (want_torch) {
        if (system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) {
            snprintf(torch_info, sizeof torch_info,
                     "not available (/usr/bin/python3 cannot import torch)");
        } else if (access(script, R_OK) != 0) {
            snprintf(torch_info, sizeof torch_info, "not measured: %.200s not found", script);
        } else if (torch_start(&shipped, "shipped", script, NULL, torch_info,
                               sizeof torch_info) != 0) {
            snprintf(torch_info, sizeof torch_info, "not measured: %.200s --serve failed",
                     script);
        } else {
            char dummy[256];
            if (torch_start(&tuned, "tuned", script, TORCH_TUNABLES, dummy, sizeof dummy) != 0)
                fprintf(stderr, "kernels: the tuned torch instance did not start\n");
        }
    }
    printf("torch:     %s\n\n", torch_info);
    fflush(stdout);

    tpool_start(&the_pool, threads);
    size_t max_n = 0;
    for (size_t i = 0; i < n_sizes; i++)
        if (sizes[i] > max_n)
            max_n = sizes[i];
    arena ar;
    arena_init(&ar, max_n);
    static cell cells[N_ROWS][MAX_SIZES];
    for (size_t r = 0; r < N_ROWS; r++)
        for (size_t i = 0; i < n_sizes; i++)
            cells[r][i].finite = true;

    double chunk = min_time / rounds, t_start = now_sec();
    for (size_t i = 0; i < n_sizes; i++) {
        size_t n = sizes[i];
        char sz[32];
        fill_uniform(ar.grad, n, 2);
        for (unsigned round = 0; round < rounds; round++) {
            fprintf(stderr, "size %s, round %u of %u (%.0f s)\n", size_name(n, sz, sizeof sz),
                    round + 1, rounds, now_sec() - t_start);
            for (size_t r = 0; r < N_ROWS; r++) {
                cell *c = &cells[r][i];
                if (optd_round(&ROWS[r], n, &ar, c, chunk) != 0)
                    return 1;
                if (!ROWS[r].in_torch)
                    continue;
                /* torch's figures get half optd's time: three of them per
                 * cell would otherwise double the run. */
                double tc = chunk / 2;
                torch_request(&shipped, ROWS[r].key, n, tc, "foreach", &c->fig[F_TORCH]);
                torch_request(&tuned, ROWS[r].key, n, tc, "foreach", &c->fig[F_TUNED_FOREACH]);
                torch_request(&tuned, ROWS[r].key, n, tc, "single", &c->fig[F_TUNED_SINGLE]);
            }
        }
    }
    arena_free(&ar);
    tpool_stop(&the_pool);
    torch_stop(&shipped);
    torch_stop(&tuned);

    static figures figs[N_ROWS][MAX_SIZES];
    for (size_t r = 0; r < N_ROWS; r++)
        for (size_t i = 0; i < n_sizes; i++)
            cell_figures(&cells[r][i], &ROWS[r], sizes[i], &figs[r][i]);

    /* ---- the table */
    printf("params/s   optim_step on one vector of `size` float32 elements\n"
           "ceiling/s  this rule's memory ceiling in params/s: ceilGB / optim_bytes_per_param\n"
           "ofceil     params/s as a share of ceiling/s\n"
           "ns/step    one optim_step call\n"
           "torch/s    torch.optim as shipped: foreach=True, default malloc\n"
           "tuned/s    torch.optim at its best: the better of foreach=True (f) and False (s),\n"
           "           malloc keeping freed memory (GLIBC_TUNABLES=" TORCH_TUNABLES ")\n"
           "x          optd's speed-up: params/s over the torch figure to its left\n"
           "GB/s       bytes the step touches per second: optim_bytes_per_param x params/s\n"
           "ceilGB     the better of a copy and a triad loop over arrays as large in total as\n"
           "           the rule's params + grad + buffers, right after the steps, in GB/s\n"
           "           counting the write-allocate (copy 12 B, triad 16 B per element)\n"
           "thr/s      the step split over --threads threads in %d-element blocks, as the\n"
           "           engine splits it (only from %d blocks up, as the engine)\n"
           "xthr       thr/s over params/s (one thread)\n"
           "thrGB      the copy loop split the same way: the ceiling of that many cores, GB/s\n\n",
           OPTIM_VEC_BLOCK, POOL_MIN_BLOCKS);
    printf("%-5s %-16s %8s %9s %6s %9s %8s %6s %9s %6s %6s %6s %8s %5s %6s\n", "size",
           "optimizer", "params/s", "ceiling/s", "ofceil", "ns/step", "torch/s", "x", "tuned/s",
           "x", "GB/s", "ceilGB", "thr/s", "xthr", "thrGB");
    for (size_t i = 0; i < n_sizes; i++) {
        for (size_t r = 0; r < N_ROWS; r++) {
            const figures *f = &figs[r][i];
            optim_hparams hp;
            row_hparams(&ROWS[r], &hp);
            double ns = f->sec * 1e9;
            char sz[32], b1[24], b2[24], v[24];
            char tcol[32] = "-", tx[16] = "-", ucol[32] = "-", ux[16] = "-";
            if (f->torch_pps > 0) {
                si(f->torch_pps, tcol, sizeof tcol);
                snprintf(tx, sizeof tx, "%.1f", f->pps / f->torch_pps);
            }
            if (f->tuned_pps > 0) {
                snprintf(ucol, sizeof ucol, "%s %c", si(f->tuned_pps, v, sizeof v),
                         f->tuned_single ? 's' : 'f');
                snprintf(ux, sizeof ux, "%.1f", f->pps / f->tuned_pps);
            }
            char thcol[24] = "-", thx[16] = "-", thgb[16] = "-";
            if (f->thr_pps > 0) {
                si(f->thr_pps, thcol, sizeof thcol);
                snprintf(thx, sizeof thx, "%.2f", f->thr_pps / f->pps);
                snprintf(thgb, sizeof thgb, "%.1f", f->thr_ceil_bps / 1e9);
            }
            printf("%-5s %-16s %8s %9s %5.0f%% %9.*f %8s %6s %9s %6s %6.1f %6.1f %8s %5s %6s%s\n",
                   size_name(sizes[i], sz, sizeof sz), ROWS[r].label, si(f->pps, b1, sizeof b1),
                   si(f->ceil_pps, b2, sizeof b2), 100 * f->pps / f->ceil_pps, ns < 1e4 ? 1 : 0,
                   ns, tcol, tx, ucol, ux,
                   f->pps * (double)optim_bytes_per_param(&hp, OPTIM_F32) / 1e9,
                   f->ceil_bps / 1e9, thcol, thx, thgb,
                   cells[r][i].finite ? "" : "  (params went non-finite)");
        }
        printf("\n");
    }

    /* ---- how much the neighbours got in the way */
    size_t n_good[2] = {0, 0}, n_cut[2] = {0, 0}, thin = 0;
    for (size_t r = 0; r < N_ROWS; r++) {
        for (size_t i = 0; i < n_sizes; i++) {
            for (int fg = 0; fg < F_COUNT; fg++) {
                const pool *p = &cells[r][i].fig[fg];
                int side = fg >= F_TORCH;
                n_good[side] += p->n;
                n_cut[side] += p->n_cut;
                thin += p->n < POOL_ENOUGH && p->n + p->n_cut > 0;
            }
        }
    }
    printf("preempted batches set aside: optd and ceiling %zu of %zu, torch %zu of %zu;\n"
           "figures from preempted batches too (too few undisturbed): %zu\n\n",
           n_cut[0], n_good[0] + n_cut[0], n_cut[1], n_good[1] + n_cut[1], thin);

    /* ---- step cost at the small size */
    int big = -1, small = -1;
    for (size_t i = 0; i < n_sizes; i++) {
        if (sizes[i] == TARGET_BIG_N)
            big = (int)i;
        if (sizes[i] == TARGET_SMALL_N)
            small = (int)i;
    }
    if (small >= 0) {
        size_t met = 0;
        printf("step cost at 1e3 in us (target < 1 us):\n ");
        for (size_t r = 0; r < N_ROWS; r++) {
            double us = figs[r][small].sec * 1e6;
            met += us * 1e3 < TARGET_SMALL_NS;
            printf(" %s %.3f%s", ROWS[r].key, us,
                   r + 1 == N_ROWS ? "\n" : r % 5 == 4 ? ",\n " : ",");
        }
        printf("  %zu of %zu rows under 1 us\n\n", met, N_ROWS);
    }

    /* ---- targets */
    printf("targets:\n");
    if (big >= 0 && threads > 1) {
        const figures *f = &figs[row_index(TARGET_THREADS_ROW)][big];
        double sp = f->thr_pps / f->pps;
        double ceil_sp = f->thr_ceil_bps / f->copy_bps;
        printf("  %-16s 1e7 %u threads >= %.1fx one thread  %6.2fx   %s\n"
               "  %-16s (the copy ceiling itself scales %.2fx on %u threads: %.1f -> %.1f GB/s)\n",
               TARGET_THREADS_ROW, threads, TARGET_THREADS_SPEEDUP, sp,
               sp >= TARGET_THREADS_SPEEDUP ? "target met" : "missed", "", ceil_sp, threads,
               f->copy_bps / 1e9, f->thr_ceil_bps / 1e9);
    }
    for (size_t t = 0; t < N_TARGET_ROWS; t++) {
        int r = row_index(TARGET_ROWS[t]);
        const char *label = ROWS[r].label;
        if (big >= 0) {
            const figures *f = &figs[r][big];
            double frac = f->pps / f->ceil_pps;
            printf("  %-16s 1e7 >= %.0f%% of memory ceiling    %6.1f%%   %s\n", label,
                   100 * TARGET_CEIL_FRACTION, 100 * frac,
                   frac >= TARGET_CEIL_FRACTION ? "target met" : "missed");
            if (f->torch_pps > 0) {
                double sp = f->pps / f->torch_pps;
                printf("  %-16s 1e7 >= %.0fx torch.optim (shipped) %6.1fx   %s\n", label,
                       TARGET_TORCH_SPEEDUP, sp, sp >= TARGET_TORCH_SPEEDUP ? "target met" : "missed");
            } else {
                printf("  %-16s 1e7 >= %.0fx torch.optim: torch %s\n", label, TARGET_TORCH_SPEEDUP,
                       torch_info);
            }
            if (f->tuned_pps > 0) {
                double sp = f->pps / f->tuned_pps;
                printf("  %-16s 1e7 >= %.0fx torch.optim (tuned)   %6.1fx   %s\n", label,
                       TARGET_TORCH_SPEEDUP, sp, sp >= TARGET_TORCH_SPEEDUP ? "target met" : "missed");
            }
        } else {
            printf("  %-16s 1e7 targets: size 1e7 not in --sizes\n", label);
        }
        if (small >= 0) {
            double ns = figs[r][small].sec * 1e9;
            printf("  %-16s 1e3 step < 1 us                  %6.3f us  %s\n", label, ns / 1e3,
                   ns < TARGET_SMALL_NS ? "target met" : "missed");
        } else {
            printf("  %-16s 1e3 target: size 1e3 not in --sizes\n", label);
        }
    }
    return 0;
}
