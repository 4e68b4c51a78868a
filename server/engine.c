/*
 * engine.c -- the step engine (engine.h): one session in memory, the step
 * pipeline shared by the live path and by replay, commit, checkpoint,
 * create and load.
 *
 * Checkpoint bytes (little-endian): ckpt_header, then params, then each
 * buffer whose bit is set in the mask (slot order), then the pending
 * accumulation when accum_count > 0.  They are handed to storage as
 * pieces pointing at the session's own vectors: nothing is copied.
 *
 * Passes over the vector per applied step (docs/architecture.md lists them
 * with what they cost): one fused read of the gradient for finiteness and
 * norm; one blocked pass that, block by block while it is in cache, builds
 * the clipped gradient when clipping scales it, keeps a copy of the params
 * block, runs the kernel and sums the update's squares.
 */
#include "server/engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CKPT_MAGIC "OPTDCKP1"

/* A checkpoint is written when the gradients logged since the last one
 * pass this many times the state's size: replay after a crash reads at
 * most that much, and a large session does not rewrite its whole state
 * every few steps. */
#define CKPT_LOG_RATIO 2

/* Below this many blocks a step runs on its own thread: waking the pool
 * costs more than it saves. */
#define POOL_MIN_BLOCKS 8

typedef struct {
    char magic[8];
    uint32_t version;
    uint32_t dtype;
    uint64_t n;
    uint64_t step;
    uint32_t mask;
    uint32_t reserved;
    double scalars[OPTIM_MAX_SCALARS];
    double plateau_lr, plateau_best;
    int64_t plateau_bad, plateau_cooldown, plateau_epoch;
    int64_t accum_count;
    int64_t n_applied, n_stale, n_timeout, n_skipped;
    double last_lr, last_loss;
} ckpt_header;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *eng_strerror(int err)
{
    switch (err) {
    case ENG_OK:
        return "ok";
    case ENG_ENONFINITE:
        return "the gradient contains NaN or Inf";
    case ENG_EDAMAGED:
        return "the session's stored state is damaged";
    default:
        return storage_strerror(err);
    }
}

/* ------------------------------------------------------------ pool */

struct eng_pool {
    int threads;                /* the caller included                    */
    pthread_t *tids;
    pthread_mutex_t run_mu;     /* one job at a time (trylock)            */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    uint64_t gen;
    int pending;
    bool stop;
    void (*fn)(void *, size_t, size_t);
    void *arg;
    size_t nblocks;
};

typedef struct {
    eng_pool *p;
    int index;
} pool_worker;

static void share(size_t nblocks, int threads, int i, size_t *b0, size_t *b1)
{
    *b0 = nblocks * (size_t)i / (size_t)threads;
    *b1 = nblocks * (size_t)(i + 1) / (size_t)threads;
}

static void *pool_main(void *arg)
{
    pool_worker *w = arg;
    eng_pool *p = w->p;
    int index = w->index;
    free(w);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->go, &p->mu);
        if (p->stop)
            break;
        seen = p->gen;
        size_t b0, b1;
        share(p->nblocks, p->threads, index, &b0, &b1);
        void (*fn)(void *, size_t, size_t) = p->fn;
        void *a = p->arg;
        pthread_mutex_unlock(&p->mu);
        if (b1 > b0)
            fn(a, b0, b1);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

eng_pool *eng_pool_new(int threads)
{
    eng_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->threads = threads < 1 ? 1 : threads;
    pthread_mutex_init(&p->run_mu, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    p->tids = calloc((size_t)p->threads, sizeof *p->tids);
    if (!p->tids) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < p->threads; i++) {
        pool_worker *w = malloc(sizeof *w);
        if (w) {
            w->p = p;
            w->index = i;
        }
        if (!w || pthread_create(&p->tids[i], NULL, pool_main, w) != 0) {
            free(w);
            p->threads = i; /* run with what started */
            break;
        }
    }
    return p;
}

void eng_pool_free(eng_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->threads; i++)
        pthread_join(p->tids[i], NULL);
    free(p->tids);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->run_mu);
    free(p);
}

int eng_pool_threads(const eng_pool *p)
{
    return p ? p->threads : 1;
}

void eng_pool_run(eng_pool *p, void (*fn)(void *arg, size_t b0, size_t b1), void *arg,
                  size_t nblocks)
{
    if (!p || p->threads < 2 || nblocks < POOL_MIN_BLOCKS ||
        pthread_mutex_trylock(&p->run_mu) != 0) {
        if (nblocks)
            fn(arg, 0, nblocks);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->nblocks = nblocks;
    p->pending = p->threads - 1;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    size_t b0, b1;
    share(nblocks, p->threads, 0, &b0, &b1);
    if (b1 > b0)
        fn(arg, b0, b1);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->run_mu);
}

/* ------------------------------------------------------------ session */

void eng_lock(eng_session *s)
{
    pthread_mutex_lock(&s->mu);
    s->locked = true;
}

void eng_unlock(eng_session *s)
{
    s->locked = false;
    pthread_mutex_unlock(&s->mu);
}

static size_t vec_bytes(const eng_session *s)
{
    return (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
}

static unsigned buffer_mask(const eng_session *s)
{
    unsigned m = 0;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            m |= 1u << i;
    return m;
}

static size_t bookkeeping_bytes(uint64_t n)
{
    size_t nb = optim_vec_blocks((size_t)n);
    return sizeof(eng_session) + nb * (sizeof(optim_vec_partial) + sizeof(double));
}

size_t eng_session_bytes(const eng_session *s)
{
    size_t v = vec_bytes(s), total = v; /* params */
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            total += v;
    if (s->accum)
        total += v;
    return total + bookkeeping_bytes(s->cfg.size);
}

size_t eng_config_bytes(const api_config *cfg)
{
    size_t v = (size_t)cfg->size * optim_dtype_size(cfg->dtype);
    unsigned need = optim_buffers_needed(&cfg->opt);
    size_t total = v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (need & (1u << i))
            total += v;
    if (cfg->mode.accumulate > 1)
        total += v;
    return total + bookkeeping_bytes(cfg->size);
}

void eng_session_free(eng_session *s)
{
    if (!s)
        return;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(s->st.buf[i]);
    free(s->params);
    free(s->accum);
    free(s->parts);
    free(s->upd);
    free(s->round_sum);
    free(s->round_workers);
    free(s->round_keys);
    free(s->round_fps);
    api_config_free(&s->cfg);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* The hyperparameters of the next update: lr from the schedule, cycled
 * momentum from one-cycle. */
static void effective_hparams(const eng_session *s, double factor, optim_hparams *hp)
{
    *hp = s->cfg.opt;
    optim_sched_value v;
    optim_sched_eval(&s->cfg.sched, &s->plateau, s->cfg.opt.lr, s->st.step, &v);
    hp->lr = v.lr * factor;
    if (v.has_momentum) {
        if (hp->kind == OPTIM_SGD || hp->kind == OPTIM_RMSPROP)
            hp->momentum = v.momentum;
        else
            hp->betas[0] = v.momentum;
    }
}

double eng_next_lr(const eng_session *s)
{
    optim_hparams hp;
    effective_hparams(s, 1.0, &hp);
    return hp.lr;
}

static int ensure_buffers_for(eng_session *s, const optim_hparams *hp)
{
    unsigned need = optim_buffers_needed(hp);
    size_t n = (size_t)s->cfg.size;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (!(need & (1u << i)) || s->st.buf[i])
            continue;
        s->st.buf[i] = malloc(vec_bytes(s) ? vec_bytes(s) : 1);
        if (!s->st.buf[i])
            return ENG_ENOMEM;
        optim_buffer_init(hp, i, s->cfg.dtype, s->st.buf[i], n);
    }
    return ENG_OK;
}

int eng_ensure_buffers(eng_session *s)
{
    optim_hparams hp;
    effective_hparams(s, 1.0, &hp);
    if (s->cfg.mode.accumulate > 1 && !s->accum) {
        s->accum = calloc(1, vec_bytes(s) ? vec_bytes(s) : 1);
        if (!s->accum)
            return ENG_ENOMEM;
    }
    return ensure_buffers_for(s, &hp);
}

eng_session *eng_session_shell(const char *name)
{
    eng_session *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    snprintf(s->name, sizeof s->name, "%s", name);
    pthread_mutex_init(&s->mu, NULL);
    s->last_loss = NAN;
    s->last_lr = NAN;
    return s;
}

/* Config and the vectors every session has (params, block partials). */
static int shell_fill(eng_session *s, const api_config *cfg)
{
    if (api_config_copy(&s->cfg, cfg))
        return ENG_ENOMEM;
    size_t nb = optim_vec_blocks((size_t)cfg->size);
    s->params = malloc(vec_bytes(s) ? vec_bytes(s) : 1);
    s->parts = malloc((nb ? nb : 1) * sizeof *s->parts);
    s->upd = malloc((nb ? nb : 1) * sizeof *s->upd);
    return s->params && s->parts && s->upd ? ENG_OK : ENG_ENOMEM;
}

eng_session *eng_session_new(const char *name, const api_config *cfg, const void *params,
                             const api_init *init)
{
    eng_session *s = eng_session_shell(name);
    if (!s)
        return NULL;
    if (shell_fill(s, cfg) != ENG_OK) {
        eng_session_free(s);
        return NULL;
    }
    if (params)
        memcpy(s->params, params, vec_bytes(s));
    else
        api_init_fill(init, cfg->dtype, s->params, (size_t)cfg->size);
    optim_plateau_init(&s->cfg.sched, s->cfg.opt.lr, &s->plateau);
    /* torch creates state inside the first step(): rprop's step_size and
     * asgd's eta start from update 1's lr, schedule included. */
    optim_hparams hp;
    effective_hparams(s, 1.0, &hp);
    optim_state_init(&hp, &s->st);
    if (eng_ensure_buffers(s) != ENG_OK) {
        eng_session_free(s);
        return NULL;
    }
    return s;
}

/* ------------------------------------------------------------ pipeline */

/* How the blocked update pass gets each block's gradient. */
enum { G_DIRECT = 0, G_SCALE, G_CLAMP };

typedef struct {
    eng_session *s;
    const void *g;              /* the effective gradient (n elements)      */
    const optim_plan *plan;
    int gmode;
    double c;                   /* scale coefficient or clamp bound          */
    bool zero_after;            /* zero g's block after use (accumulation)   */
} update_job;

typedef struct {
    eng_session *s;
    const void *g;
    double norm_type;
} stats_job;

typedef struct {
    eng_session *s;
    const void *g;              /* add g to the accumulation; NULL: divide   */
    int64_t k;
} accum_job;

static size_t block_len(size_t n, size_t b)
{
    size_t off = b * OPTIM_VEC_BLOCK;
    return n - off < OPTIM_VEC_BLOCK ? n - off : OPTIM_VEC_BLOCK;
}

static void stats_blocks(void *arg, size_t b0, size_t b1)
{
    stats_job *j = arg;
    size_t n = (size_t)j->s->cfg.size, sz = optim_dtype_size(j->s->cfg.dtype);
    for (size_t b = b0; b < b1; b++)
        optim_vec_block_stats(j->s->cfg.dtype, (const char *)j->g + b * OPTIM_VEC_BLOCK * sz,
                              block_len(n, b), j->norm_type, &j->s->parts[b]);
}

static void accum_blocks(void *arg, size_t b0, size_t b1)
{
    accum_job *j = arg;
    size_t n = (size_t)j->s->cfg.size, sz = optim_dtype_size(j->s->cfg.dtype);
    for (size_t b = b0; b < b1; b++) {
        char *a = (char *)j->s->accum + b * OPTIM_VEC_BLOCK * sz;
        if (j->g)
            optim_vec_add(j->s->cfg.dtype, a, (const char *)j->g + b * OPTIM_VEC_BLOCK * sz,
                          block_len(n, b));
        else
            optim_vec_div(j->s->cfg.dtype, a, block_len(n, b), j->k);
    }
}

static void update_blocks(void *arg, size_t b0, size_t b1)
{
    update_job *j = arg;
    eng_session *s = j->s;
    optim_dtype dt = s->cfg.dtype;
    size_t n = (size_t)s->cfg.size, sz = optim_dtype_size(dt);
    /* Block-sized work space, in cache: the clipped gradient and the params
     * before the update (for the update norm). */
    double gtmp[OPTIM_VEC_BLOCK], ptmp[OPTIM_VEC_BLOCK];
    for (size_t b = b0; b < b1; b++) {
        size_t off = b * OPTIM_VEC_BLOCK * sz, len = block_len(n, b);
        char *p = (char *)s->params + off;
        const char *g = (const char *)j->g + off;
        if (j->gmode == G_SCALE) {
            optim_vec_scale(dt, gtmp, g, len, j->c);
            g = (const char *)gtmp;
        } else if (j->gmode == G_CLAMP) {
            optim_vec_clamp(dt, gtmp, g, len, j->c);
            g = (const char *)gtmp;
        }
        memcpy(ptmp, p, len * sz);
        optim_state sub = s->st;
        for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
            if (sub.buf[i])
                sub.buf[i] = (char *)sub.buf[i] + off;
        optim_plan_run(j->plan, &sub, dt, p, g, 0, len);
        s->upd[b] = optim_vec_diffsq(dt, p, ptmp, len);
        if (j->zero_after)
            memset((char *)j->g + off, 0, len * sz);
    }
}

/* Feeds one gradient through the pipeline.  The live path and replay both
 * call this, so replay is bit-identical.  Fails only with ENG_ENONFINITE,
 * when refuse_nonfinite is set and the gradient has NaN or Inf: nothing has
 * changed then (the first pass only reads). */
static int apply(eng_pool *pool, eng_session *s, const void *grad, double loss, double factor,
                 bool refuse_nonfinite, eng_step_out *res)
{
    size_t n = (size_t)s->cfg.size, nb = optim_vec_blocks(n);
    memset(res, 0, sizeof *res);
    res->lr = NAN;
    res->update_norm = NAN;
    double norm_type = s->cfg.clip.kind == OPTIM_CLIP_NORM ? s->cfg.clip.norm_type : 2.0;
    bool finite;
    double norm;

    /* Pass 1: finiteness and the norm, in one read of the gradient.  With
     * accumulation the norm that clipping needs is the mean's, taken after
     * the mean is formed. */
    stats_job sj = {s, grad, s->cfg.mode.accumulate > 1 ? 2.0 : norm_type};
    eng_pool_run(pool, stats_blocks, &sj, nb);
    optim_vec_stats_combine(sj.norm_type, s->parts, nb, &norm, &finite);
    res->grad_norm = norm;
    if (!finite && refuse_nonfinite)
        return ENG_ENONFINITE;
    if (!isnan(loss))
        s->last_loss = loss;
    if (!finite) {
        res->kind = STORAGE_LOG_SKIP;
        s->n_skipped++;
        return ENG_OK;
    }

    const void *g = grad;
    bool zero_after = false;
    if (s->cfg.mode.accumulate > 1) {
        accum_job aj = {s, grad, 0};
        eng_pool_run(pool, accum_blocks, &aj, nb);
        s->accum_count++;
        if (s->accum_count < s->cfg.mode.accumulate) {
            res->kind = STORAGE_LOG_ACCUM;
            return ENG_OK;
        }
        accum_job dj = {s, NULL, s->accum_count};
        eng_pool_run(pool, accum_blocks, &dj, nb);
        s->accum_count = 0;
        g = s->accum;
        zero_after = true;
        stats_job mj = {s, g, norm_type};
        eng_pool_run(pool, stats_blocks, &mj, nb);
        optim_vec_stats_combine(norm_type, s->parts, nb, &norm, &finite);
        res->grad_norm = norm;
    }

    res->kind = STORAGE_LOG_STEP;
    update_job uj = {.s = s, .g = g, .gmode = G_DIRECT, .zero_after = zero_after};
    if (s->cfg.clip.kind == OPTIM_CLIP_NORM) {
        /* torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), applied
         * only when below 1.  A NaN coefficient fails the test. */
        double coef = s->cfg.clip.max_norm / (norm + 1e-6);
        if (coef < 1.0) {
            uj.gmode = G_SCALE;
            uj.c = coef;
        }
    } else if (s->cfg.clip.kind == OPTIM_CLIP_VALUE) {
        uj.gmode = G_CLAMP;
        uj.c = s->cfg.clip.max_value;
    }

    optim_hparams hp;
    effective_hparams(s, factor, &hp);
    /* One-cycle may switch momentum on: its buffer must exist. */
    ensure_buffers_for(s, &hp);
    optim_plan plan;
    optim_plan_make(&hp, &s->st, &plan);
    uj.plan = &plan;
    eng_pool_run(pool, update_blocks, &uj, nb);
    optim_plan_commit(&plan, &s->st);
    double sq = 0.0;
    for (size_t b = 0; b < nb; b++)
        sq = sq + s->upd[b];
    res->lr = hp.lr;
    res->update_norm = sqrt(sq);
    s->last_lr = hp.lr;
    s->n_applied++;
    if (s->cfg.sched.kind == OPTIM_SCHED_REDUCE_ON_PLATEAU && !isnan(loss))
        optim_plateau_observe(&s->cfg.sched, &s->plateau, loss);
    return ENG_OK;
}

/* ---------------------------------------------------------- checkpoint */

/* The checkpoint as pieces: the header (in *h) and the session's own
 * vectors.  Returns the number of pieces (<= 2 + OPTIM_MAX_BUFFERS + 1). */
static int checkpoint_pieces(const eng_session *s, ckpt_header *h, storage_iov *iov)
{
    size_t v = vec_bytes(s);
    unsigned mask = buffer_mask(s);
    memset(h, 0, sizeof *h);
    memcpy(h->magic, CKPT_MAGIC, 8);
    h->version = 1;
    h->dtype = (uint32_t)s->cfg.dtype;
    h->n = s->cfg.size;
    h->step = s->st.step;
    h->mask = mask;
    memcpy(h->scalars, s->st.scalars, sizeof h->scalars);
    h->plateau_lr = s->plateau.lr;
    h->plateau_best = s->plateau.best;
    h->plateau_bad = s->plateau.num_bad_epochs;
    h->plateau_cooldown = s->plateau.cooldown_counter;
    h->plateau_epoch = s->plateau.last_epoch;
    h->accum_count = s->accum_count;
    h->n_applied = s->n_applied;
    h->n_stale = s->n_stale;
    h->n_timeout = s->n_timeout;
    h->n_skipped = s->n_skipped;
    h->last_lr = s->last_lr;
    h->last_loss = s->last_loss;
    int k = 0;
    iov[k++] = (storage_iov){h, sizeof *h};
    iov[k++] = (storage_iov){s->params, v};
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (mask & (1u << i))
            iov[k++] = (storage_iov){s->st.buf[i], v};
    if (s->accum_count > 0)
        iov[k++] = (storage_iov){s->accum, v};
    return k;
}

#define MAX_PIECES (3 + OPTIM_MAX_BUFFERS)

typedef struct {
    eng_session *s;
    eng_pool *pool;
} replay_ctx;

static int install_ckpt(void *ud, storage_reader *rd, size_t len, int64_t seq)
{
    eng_session *s = ((replay_ctx *)ud)->s;
    ckpt_header h;
    size_t v = vec_bytes(s);
    if (len < sizeof h)
        return STORAGE_ECORRUPT;
    int err = storage_read(rd, &h, sizeof h);
    if (err)
        return err;
    if (memcmp(h.magic, CKPT_MAGIC, 8) != 0 || h.version != 1 ||
        h.dtype != (uint32_t)s->cfg.dtype || h.n != s->cfg.size ||
        (h.mask & ~((1u << OPTIM_MAX_BUFFERS) - 1)))
        return STORAGE_ECORRUPT;
    size_t need = sizeof h + v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (h.mask & (1u << i))
            need += v;
    if (h.accum_count > 0)
        need += v;
    if (len != need)
        return STORAGE_ECORRUPT;
    if ((err = storage_read(rd, s->params, v)))
        return err;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (!(h.mask & (1u << i)))
            continue;
        if (!(s->st.buf[i] = malloc(v ? v : 1)))
            return STORAGE_ENOMEM;
        if ((err = storage_read(rd, s->st.buf[i], v)))
            return err;
    }
    s->st.step = h.step;
    memcpy(s->st.scalars, h.scalars, sizeof h.scalars);
    s->plateau.lr = h.plateau_lr;
    s->plateau.best = h.plateau_best;
    s->plateau.num_bad_epochs = h.plateau_bad;
    s->plateau.cooldown_counter = h.plateau_cooldown;
    s->plateau.last_epoch = h.plateau_epoch;
    s->accum_count = h.accum_count;
    if (h.accum_count > 0 || s->cfg.mode.accumulate > 1) {
        if (!(s->accum = calloc(1, v ? v : 1)))
            return STORAGE_ENOMEM;
        if (h.accum_count > 0 && (err = storage_read(rd, s->accum, v)))
            return err;
    }
    s->n_applied = h.n_applied;
    s->n_stale = h.n_stale;
    s->n_timeout = h.n_timeout;
    s->n_skipped = h.n_skipped;
    s->last_lr = h.last_lr;
    s->last_loss = h.last_loss;
    s->seq = seq;
    return 0;
}

static int replay_row(void *ud, const storage_log_entry *e)
{
    replay_ctx *rc = ud;
    eng_session *s = rc->s;
    s->seq = e->seq;
    if (e->kind == STORAGE_LOG_SKIP) {
        s->n_skipped++;
        return 0;
    }
    if (!e->grad || e->grad_len != vec_bytes(s))
        return STORAGE_ECORRUPT;
    eng_step_out res;
    apply(rc->pool, s, e->grad, e->loss, isnan(e->factor) ? 1.0 : e->factor, false, &res);
    s->log_bytes += e->grad_len;
    if (e->kind != res.kind || (int64_t)s->st.step != e->step)
        return STORAGE_ECORRUPT; /* replay diverged from the log */
    return 0;
}

int eng_session_load(storage *db, eng_pool *pool, eng_session *s)
{
    storage_session_info info;
    int err = storage_session_get(db, s->name, &info);
    if (err != STORAGE_OK)
        return err;
    api_config cfg;
    if (api_config_from_json(info.config, &cfg)) {
        storage_session_info_free(&info);
        return STORAGE_ECORRUPT;
    }
    err = shell_fill(s, &cfg);
    api_config_free(&cfg);
    s->id = info.id;
    s->created_ms = info.created_ms;
    s->updated_ms = info.updated_ms;
    storage_session_info_free(&info);
    if (err != ENG_OK)
        return err;
    replay_ctx rc = {s, pool};
    err = storage_session_load(db, s->id, install_ckpt, replay_row, &rc);
    if (err == STORAGE_OK && eng_ensure_buffers(s) != ENG_OK)
        err = STORAGE_ENOMEM;
    return err;
}

int eng_session_create(storage *db, eng_session *s, int64_t now)
{
    char *cfg_json = api_config_to_json(&s->cfg);
    if (!cfg_json)
        return ENG_ENOMEM;
    ckpt_header h;
    storage_iov iov[MAX_PIECES];
    int k = checkpoint_pieces(s, &h, iov);
    s->created_ms = s->updated_ms = now;
    int err = storage_session_create(db, s->name, cfg_json, now, iov, k, &s->id);
    free(cfg_json);
    return err;
}

int eng_checkpoint(storage *db, eng_session *s, bool with_config)
{
    ENG_ASSERT_LOCKED(s);
    char *cfg_json = with_config ? api_config_to_json(&s->cfg) : NULL;
    if (with_config && !cfg_json)
        return ENG_ENOMEM;
    ckpt_header h;
    storage_iov iov[MAX_PIECES];
    int k = checkpoint_pieces(s, &h, iov);
    int64_t now = now_ms();
    int err = storage_checkpoint(db, s->id, cfg_json, iov, k, s->seq, (int64_t)s->st.step, now);
    free(cfg_json);
    if (err == STORAGE_OK) {
        s->log_bytes = 0;
        if (with_config)
            s->updated_ms = now;
    }
    return err;
}

int eng_set_params(storage *db, eng_session *s, void *params)
{
    ENG_ASSERT_LOCKED(s);
    void *old = s->params;
    s->params = params;
    int err = eng_checkpoint(db, s, false);
    if (err != STORAGE_OK) {
        s->params = old;
        free(params);
        return err;
    }
    free(old);
    return ENG_OK;
}

int eng_step(storage *db, eng_pool *pool, eng_session *s, const eng_step_in *in,
             eng_step_out *out)
{
    ENG_ASSERT_LOCKED(s);
    assert(in->grad != NULL);
    int err = apply(pool, s, in->grad, in->loss, in->factor,
                    s->cfg.nonfinite == API_NONFINITE_ERROR, out);
    if (err != ENG_OK)
        return err;
    size_t gbytes = vec_bytes(s);
    storage_log_entry e = {
        .seq = s->seq + 1,
        .kind = out->kind,
        .step = (int64_t)s->st.step,
        .time_ms = now_ms(),
        .lr = out->lr,
        .factor = in->factor,
        .loss = in->loss,
        .grad_norm = out->grad_norm,
        .update_norm = out->update_norm,
        .grad = out->kind == STORAGE_LOG_SKIP ? NULL : in->grad,
        .grad_len = out->kind == STORAGE_LOG_SKIP ? 0 : gbytes,
        .idem_key = in->key,
        .idem_fp = in->fp,
        .more_keys = in->more_keys,
        .more_fps = in->more_fps,
        .n_more_keys = in->n_more_keys,
        .worker = in->worker,
    };
    /* Checkpoint when the log since the last one outgrows the state. */
    ckpt_header h;
    storage_iov iov[MAX_PIECES];
    int k = 0;
    if (s->log_bytes + e.grad_len > CKPT_LOG_RATIO * eng_session_bytes(s))
        k = checkpoint_pieces(s, &h, iov);
    err = storage_append(db, s->id, &e, iov, k);
    if (err != STORAGE_OK)
        return err;
    s->seq = e.seq;
    s->log_bytes = k ? 0 : s->log_bytes + e.grad_len;
    s->updated_ms = e.time_ms;
    return ENG_OK;
}

void *eng_params_wire(const eng_session *s, optim_wire w, size_t *len)
{
    size_t n = (size_t)s->cfg.size;
    size_t bytes = n * optim_wire_size(w);
    void *b = malloc(bytes ? bytes : 1);
    if (!b)
        return NULL;
    if ((w == OPTIM_WIRE_F32 && s->cfg.dtype == OPTIM_F32) ||
        (w == OPTIM_WIRE_F64 && s->cfg.dtype == OPTIM_F64))
        memcpy(b, s->params, bytes);
    else
        optim_vec_to_wire(s->cfg.dtype, s->params, w, b, n);
    *len = bytes;
    return b;
}
