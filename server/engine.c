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
#include "server/observe.h"

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
/* ... and at least this many bytes: a small session does not rewrite its
 * state every few steps (the replay after a crash stays a few MiB). */
#define CKPT_MIN_LOG_BYTES ((size_t)8 << 20)

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

static size_t n_items_of(const api_config *cfg)
{
    size_t k = 0;
    for (size_t i = 0; i < cfg->n_tensors; i++)
        k += optim_vec_blocks((size_t)cfg->tensors[i].size);
    return k;
}

static size_t bookkeeping_bytes(const api_config *cfg)
{
    size_t ni = n_items_of(cfg), nt = cfg->n_tensors;
    return sizeof(eng_session) +
           ni * (sizeof(eng_item) + sizeof(optim_vec_partial) + sizeof(double)) +
           nt * (sizeof(optim_state) + sizeof(optim_plan) + sizeof(uint64_t) + sizeof(bool)) +
           cfg->n_groups * sizeof(eng_group_hp);
}

size_t eng_session_bytes(const eng_session *s)
{
    size_t v = vec_bytes(s), total = v; /* params */
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            total += v;
    if (s->accum)
        total += v;
    return total + bookkeeping_bytes(&s->cfg);
}

void eng_session_free(eng_session *s)
{
    if (!s)
        return;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(s->st.buf[i]);
    if (s->pbuf)
        eng_params_unpin(s->pbuf);
    else
        free(s->params);
    free(s->accum);
    free(s->parts);
    free(s->upd);
    free(s->tst);
    free(s->items);
    free(s->gcur);
    free(s->plans);
    free(s->goff);
    free(s->present);
    free(s->round_sum);
    free(s->round_workers);
    free(s->round_keys);
    free(s->round_fps);
    api_config_free(&s->cfg);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* Group g's hyperparameters for the update after s->st.step updates:
 * the group's own values (the client's current ones first), the lr from
 * the schedule (each group from its own lr, as torch's schedulers scale
 * each group from its initial_lr), cycled momentum from one-cycle. */
static void group_hparams(const eng_session *s, size_t g, double factor, optim_hparams *hp)
{
    *hp = s->cfg.groups[g].opt;
    const eng_group_hp *c = &s->gcur[g];
    if (c->has[ENG_HP_LR])
        hp->lr = c->v[ENG_HP_LR];
    if (c->has[ENG_HP_MOMENTUM])
        hp->momentum = c->v[ENG_HP_MOMENTUM];
    if (c->has[ENG_HP_BETA1])
        hp->betas[0] = c->v[ENG_HP_BETA1];
    optim_sched_value v;
    optim_sched_eval(&s->cfg.sched, &s->plateau, hp->lr, s->st.step, &v);
    hp->lr = v.lr * factor;
    if (v.has_momentum) {
        if (hp->kind == OPTIM_SGD || hp->kind == OPTIM_RMSPROP)
            hp->momentum = v.momentum;
        else
            hp->betas[0] = v.momentum;
    }
}

void eng_group_hparams(const eng_session *s, size_t g, optim_hparams *hp)
{
    group_hparams(s, g, 1.0, hp);
}

double eng_next_lr(const eng_session *s)
{
    optim_hparams hp;
    group_hparams(s, 0, 1.0, &hp);
    return hp.lr;
}

void eng_config_changed(eng_session *s)
{
    for (size_t g = 0; g < s->cfg.n_groups; g++)
        memset(&s->gcur[g], 0, sizeof s->gcur[g]);
}

uint64_t eng_present_size(const eng_session *s, const uint32_t *absent, size_t n_absent)
{
    uint64_t n = s->cfg.size;
    for (size_t k = 0; k < n_absent; k++)
        n -= s->cfg.tensors[absent[k]].size;
    return n;
}

static int ensure_buffers_for(eng_session *s, unsigned need)
{
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (!(need & (1u << i)) || s->st.buf[i])
            continue;
        s->st.buf[i] = malloc(vec_bytes(s) ? vec_bytes(s) : 1);
        if (!s->st.buf[i])
            return ENG_ENOMEM;
        /* Each tensor's slice from its own group's hyperparameters. */
        for (size_t t = 0; t < s->cfg.n_tensors; t++) {
            const api_tensor *T = &s->cfg.tensors[t];
            optim_hparams hp;
            group_hparams(s, T->group, 1.0, &hp);
            optim_buffer_init(&hp, i, s->cfg.dtype,
                              (char *)s->st.buf[i] + T->offset * optim_dtype_size(s->cfg.dtype),
                              (size_t)T->size);
        }
    }
    return ENG_OK;
}

static unsigned buffers_needed(const eng_session *s)
{
    unsigned need = 0;
    for (size_t g = 0; g < s->cfg.n_groups; g++) {
        optim_hparams hp;
        group_hparams(s, g, 1.0, &hp);
        need |= optim_buffers_needed(&hp);
    }
    return need;
}

int eng_ensure_buffers(eng_session *s)
{
    if (s->cfg.mode.accumulate > 1 && !s->accum) {
        s->accum = calloc(1, vec_bytes(s) ? vec_bytes(s) : 1);
        if (!s->accum)
            return ENG_ENOMEM;
    }
    return ensure_buffers_for(s, buffers_needed(s));
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

/* Config, layout and the vectors every session has (params, per-tensor
 * state, the blocks and their partials). */
static int shell_fill(eng_session *s, const api_config *cfg)
{
    if (api_config_copy(&s->cfg, cfg))
        return ENG_ENOMEM;
    size_t ni = n_items_of(cfg), nt = cfg->n_tensors, ng = cfg->n_groups;
    s->params = malloc(vec_bytes(s) ? vec_bytes(s) : 1);
    s->pbuf = malloc(sizeof *s->pbuf);
    if (s->pbuf && s->params)
        *s->pbuf = (eng_pbuf){1, s->params};
    s->parts = malloc((ni ? ni : 1) * sizeof *s->parts);
    s->upd = malloc((ni ? ni : 1) * sizeof *s->upd);
    s->items = malloc((ni ? ni : 1) * sizeof *s->items);
    s->tst = calloc(nt ? nt : 1, sizeof *s->tst);
    s->plans = calloc(nt ? nt : 1, sizeof *s->plans);
    s->goff = calloc(nt ? nt : 1, sizeof *s->goff);
    s->present = calloc(nt ? nt : 1, sizeof *s->present);
    s->gcur = calloc(ng ? ng : 1, sizeof *s->gcur);
    if (!s->params || !s->pbuf || !s->parts || !s->upd || !s->items || !s->tst || !s->plans || !s->goff ||
        !s->present || !s->gcur)
        return ENG_ENOMEM;
    size_t k = 0;
    for (size_t t = 0; t < nt; t++) {
        const api_tensor *T = &cfg->tensors[t];
        for (uint64_t o = 0; o < T->size; o += OPTIM_VEC_BLOCK) {
            uint64_t len = T->size - o < OPTIM_VEC_BLOCK ? T->size - o : OPTIM_VEC_BLOCK;
            s->items[k++] = (eng_item){(uint32_t)t, (uint32_t)len, T->offset + o};
        }
    }
    s->n_items = k;
    return ENG_OK;
}

/* torch creates a tensor's state inside its first step(): rprop's
 * step_size and asgd's eta start from that update's lr. */
static void tensor_state_init(eng_session *s, size_t t, const optim_hparams *hp)
{
    const api_tensor *T = &s->cfg.tensors[t];
    optim_state_init(hp, &s->tst[t]);
    unsigned need = optim_buffers_needed(hp);
    size_t sz = optim_dtype_size(s->cfg.dtype);
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if ((need & (1u << i)) && s->st.buf[i])
            optim_buffer_init(hp, i, s->cfg.dtype, (char *)s->st.buf[i] + T->offset * sz,
                              (size_t)T->size);
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
    if (eng_ensure_buffers(s) != ENG_OK) {
        eng_session_free(s);
        return NULL;
    }
    for (size_t t = 0; t < s->cfg.n_tensors; t++) {
        optim_hparams hp;
        group_hparams(s, s->cfg.tensors[t].group, 1.0, &hp);
        tensor_state_init(s, t, &hp);
    }
    return s;
}

/* ------------------------------------------------------------ pipeline */

/* How the blocked update pass gets each block's gradient. */
enum { G_DIRECT = 0, G_SCALE, G_CLAMP };

typedef struct {
    eng_session *s;
    const void *g;              /* the effective gradient (present tensors)  */
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

/* The gradient of item it: where its block lies in the request's vector
 * (present tensors only, in order). */
static size_t grad_offset(const eng_session *s, const eng_item *it)
{
    const api_tensor *T = &s->cfg.tensors[it->tensor];
    return (size_t)(s->goff[it->tensor] + (it->off - T->offset));
}

static void stats_blocks(void *arg, size_t b0, size_t b1)
{
    stats_job *j = arg;
    eng_session *s = j->s;
    size_t sz = optim_dtype_size(s->cfg.dtype);
    for (size_t b = b0; b < b1; b++) {
        const eng_item *it = &s->items[b];
        if (!s->present[it->tensor])
            continue;
        optim_vec_block_stats(s->cfg.dtype, (const char *)j->g + grad_offset(s, it) * sz, it->len,
                              j->norm_type, &s->parts[b]);
    }
}

static void accum_blocks(void *arg, size_t b0, size_t b1)
{
    accum_job *j = arg;
    eng_session *s = j->s;
    size_t sz = optim_dtype_size(s->cfg.dtype);
    for (size_t b = b0; b < b1; b++) {
        const eng_item *it = &s->items[b];
        char *a = (char *)s->accum + it->off * sz;
        if (j->g)
            optim_vec_add(s->cfg.dtype, a, (const char *)j->g + it->off * sz, it->len);
        else
            optim_vec_div(s->cfg.dtype, a, it->len, j->k);
    }
}

static void update_blocks(void *arg, size_t b0, size_t b1)
{
    update_job *j = arg;
    eng_session *s = j->s;
    optim_dtype dt = s->cfg.dtype;
    size_t sz = optim_dtype_size(dt);
    /* Block-sized work space, in cache: the clipped gradient and the params
     * before the update (for the update norm). */
    double gtmp[OPTIM_VEC_BLOCK], ptmp[OPTIM_VEC_BLOCK];
    for (size_t b = b0; b < b1; b++) {
        const eng_item *it = &s->items[b];
        if (!s->present[it->tensor])
            continue;
        size_t len = it->len;
        char *p = (char *)s->params + it->off * sz;
        const char *g = (const char *)j->g + grad_offset(s, it) * sz;
        if (j->gmode == G_SCALE) {
            optim_vec_scale(dt, gtmp, g, len, j->c);
            g = (const char *)gtmp;
        } else if (j->gmode == G_CLAMP) {
            optim_vec_clamp(dt, gtmp, g, len, j->c);
            g = (const char *)gtmp;
        }
        memcpy(ptmp, p, len * sz);
        optim_state sub = s->tst[it->tensor];
        for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
            sub.buf[i] = s->st.buf[i] ? (char *)s->st.buf[i] + it->off * sz : NULL;
        optim_plan_run(&s->plans[it->tensor], &sub, dt, p, g, 0, len);
        s->upd[b] = optim_vec_diffsq(dt, p, ptmp, len);
        if (j->zero_after)
            memset((char *)j->g + it->off * sz, 0, len * sz);
    }
}

/* The partials of the present tensors' items, combined in order. */
static void combine_present(const eng_session *s, double norm_type, double *norm, bool *finite)
{
    bool inf = isinf(norm_type) && norm_type > 0;
    double acc = 0.0;
    bool fin = true;
    for (size_t b = 0; b < s->n_items; b++) {
        if (!s->present[s->items[b].tensor])
            continue;
        double x = s->parts[b].norm;
        if (inf)
            acc = (x != x || x > acc) ? x : acc;
        else
            acc = acc + x;
        fin = fin && s->parts[b].finite;
    }
    if (norm_type == 2.0)
        acc = sqrt(acc);
    else if (!inf && norm_type != 1.0)
        acc = NAN;
    *norm = acc;
    *finite = fin;
}

/* Marks the present tensors and where each one's gradient starts. */
static void set_present(eng_session *s, const uint32_t *absent, size_t n_absent)
{
    for (size_t t = 0; t < s->cfg.n_tensors; t++)
        s->present[t] = true;
    for (size_t k = 0; k < n_absent; k++)
        s->present[absent[k]] = false;
    uint64_t off = 0;
    for (size_t t = 0; t < s->cfg.n_tensors; t++) {
        s->goff[t] = off;
        if (s->present[t])
            off += s->cfg.tensors[t].size;
    }
}

/* Feeds one gradient through the pipeline.  The live path and replay both
 * call this, so replay is bit-identical.  Fails with ENG_ENONFINITE when
 * refuse_nonfinite is set and the gradient has NaN or Inf: nothing has
 * changed then (the first pass only reads; the client's hyperparameters
 * are taken only after it); or with ENG_ENOMEM when a buffer the update
 * needs cannot be made: the session must then be dropped. */
static int apply(eng_pool *pool, eng_session *s, const eng_step_in *in, bool refuse_nonfinite,
                 eng_step_out *res)
{
    size_t ni = s->n_items;
    memset(res, 0, sizeof *res);
    res->lr = NAN;
    res->update_norm = NAN;
    set_present(s, in->absent, in->n_absent);
    double norm_type = s->cfg.clip.kind == OPTIM_CLIP_NORM ? s->cfg.clip.norm_type : 2.0;
    bool finite;
    double norm;

    /* Pass 1: finiteness and the norm, in one read of the gradient.  With
     * accumulation the norm that clipping needs is the mean's, taken after
     * the mean is formed. */
    stats_job sj = {s, in->grad, s->cfg.mode.accumulate > 1 ? 2.0 : norm_type};
    eng_pool_run(pool, stats_blocks, &sj, ni);
    combine_present(s, sj.norm_type, &norm, &finite);
    res->grad_norm = norm;
    if (!finite && refuse_nonfinite)
        return ENG_ENONFINITE;
    if (!isnan(in->loss))
        s->last_loss = in->loss;
    if (in->ghp) {
        for (size_t g = 0; g < s->cfg.n_groups; g++)
            for (int k = 0; k < ENG_HP_COUNT; k++)
                if (in->ghp[g].has[k]) {
                    s->gcur[g].has[k] = true;
                    s->gcur[g].v[k] = in->ghp[g].v[k];
                    s->client_hp = true;
                }
    }
    if (!finite) {
        res->kind = STORAGE_LOG_SKIP;
        s->n_skipped++;
        return ENG_OK;
    }

    const void *g = in->grad;
    bool zero_after = false;
    if (s->cfg.mode.accumulate > 1) {
        /* (no absent tensors here: the handler refuses them) */
        accum_job aj = {s, in->grad, 0};
        eng_pool_run(pool, accum_blocks, &aj, ni);
        s->accum_count++;
        if (s->accum_count < s->cfg.mode.accumulate) {
            res->kind = STORAGE_LOG_ACCUM;
            return ENG_OK;
        }
        accum_job dj = {s, NULL, s->accum_count};
        eng_pool_run(pool, accum_blocks, &dj, ni);
        s->accum_count = 0;
        g = s->accum;
        zero_after = true;
        stats_job mj = {s, g, norm_type};
        eng_pool_run(pool, stats_blocks, &mj, ni);
        combine_present(s, norm_type, &norm, &finite);
        res->grad_norm = norm;
    }

    res->kind = STORAGE_LOG_STEP;
    update_job uj = {.s = s, .g = g, .gmode = G_DIRECT, .zero_after = zero_after};
    if (s->cfg.clip.kind == OPTIM_CLIP_NORM && in->has_norm && s->cfg.mode.accumulate <= 1) {
        /* The norm of the whole vector this gradient is a part of, given
         * by the client; the finiteness above is still this part's own.
         * The handler refuses it with accumulation; a logged one replayed
         * under accumulation (a fork that changed the mode) leaves the
         * mean's own norm. */
        norm = in->grad_norm;
        res->grad_norm = norm;
    }
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

    /* One-cycle may switch momentum on, a client may too: buffers first.
     * Out of memory here leaves the session half-changed; the caller drops
     * it and the next request reloads it from disk. */
    if (ensure_buffers_for(s, buffers_needed(s)) != ENG_OK)
        return ENG_ENOMEM;
    double lr0 = NAN;
    for (size_t gi = 0; gi < s->cfg.n_groups; gi++) {
        optim_hparams hp;
        group_hparams(s, gi, in->factor, &hp);
        if (gi == 0)
            lr0 = hp.lr;
        const api_group *G = &s->cfg.groups[gi];
        for (size_t k = 0; k < G->n_tensors; k++) {
            uint32_t t = G->tensors[k];
            if (!s->present[t])
                continue;
            if (s->tst[t].step == 0)
                tensor_state_init(s, t, &hp);
            optim_plan_make(&hp, &s->tst[t], &s->plans[t]);
        }
    }
    eng_pool_run(pool, update_blocks, &uj, ni);
    for (size_t t = 0; t < s->cfg.n_tensors; t++)
        if (s->present[t])
            optim_plan_commit(&s->plans[t], &s->tst[t]);
    s->st.step++;
    double sq = 0.0;
    for (size_t b = 0; b < ni; b++)
        if (s->present[s->items[b].tensor])
            sq = sq + s->upd[b];
    res->lr = lr0;
    res->update_norm = sqrt(sq);
    s->last_lr = lr0;
    s->n_applied++;
    if (s->cfg.sched.kind == OPTIM_SCHED_REDUCE_ON_PLATEAU && !isnan(in->loss))
        optim_plateau_observe(&s->cfg.sched, &s->plateau, in->loss);
    return ENG_OK;
}

/* ---------------------------------------------------------- checkpoint
 *
 * Version 2: the header, then per tensor its step and scalars, then per
 * group the client's current values, then params, buffers, accumulation.
 * Version 1 (one tensor, its state in the header) is still read.
 */
typedef struct {
    uint64_t step;
    double scalars[OPTIM_MAX_SCALARS];
} ckpt_tensor;

typedef struct {
    uint8_t has[ENG_HP_COUNT];
    uint8_t pad[8 - ENG_HP_COUNT];
    double v[ENG_HP_COUNT];
} ckpt_group;

/* The checkpoint as pieces: the header and records (in the caller's
 * buffers) and the session's own vectors.  Returns the number of pieces.
 * *recs is a new buffer the caller frees after the write. */
static int checkpoint_pieces(const eng_session *s, ckpt_header *h, void **recs,
                             storage_iov *iov)
{
    size_t v = vec_bytes(s);
    unsigned mask = buffer_mask(s);
    memset(h, 0, sizeof *h);
    memcpy(h->magic, CKPT_MAGIC, 8);
    h->version = 2;
    h->dtype = (uint32_t)s->cfg.dtype;
    h->n = s->cfg.size;
    h->step = s->st.step;
    h->mask = mask;
    h->reserved = s->client_hp ? 1u : 0u;
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
    size_t nt = s->cfg.n_tensors, ng = s->cfg.n_groups;
    size_t rl = nt * sizeof(ckpt_tensor) + ng * sizeof(ckpt_group);
    char *r = calloc(1, rl ? rl : 1);
    *recs = r;
    if (!r)
        return -1;
    for (size_t t = 0; t < nt; t++) {
        ckpt_tensor ct = {s->tst[t].step, {0}};
        memcpy(ct.scalars, s->tst[t].scalars, sizeof ct.scalars);
        memcpy(r + t * sizeof ct, &ct, sizeof ct);
    }
    for (size_t g = 0; g < ng; g++) {
        ckpt_group cg;
        memset(&cg, 0, sizeof cg);
        for (int k = 0; k < ENG_HP_COUNT; k++) {
            cg.has[k] = s->gcur[g].has[k];
            cg.v[k] = s->gcur[g].v[k];
        }
        memcpy(r + nt * sizeof(ckpt_tensor) + g * sizeof cg, &cg, sizeof cg);
    }
    int k = 0;
    iov[k++] = (storage_iov){h, sizeof *h};
    iov[k++] = (storage_iov){r, rl};
    iov[k++] = (storage_iov){s->params, v};
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (mask & (1u << i))
            iov[k++] = (storage_iov){s->st.buf[i], v};
    if (s->accum_count > 0)
        iov[k++] = (storage_iov){s->accum, v};
    return k;
}

#define MAX_PIECES (4 + OPTIM_MAX_BUFFERS)

typedef struct {
    eng_session *s;
    eng_pool *pool;
} replay_ctx;

static int install_ckpt(void *ud, storage_reader *rd, size_t len, int64_t seq)
{
    eng_session *s = ((replay_ctx *)ud)->s;
    ckpt_header h;
    size_t v = vec_bytes(s), nt = s->cfg.n_tensors, ng = s->cfg.n_groups;
    if (len < sizeof h)
        return STORAGE_ECORRUPT;
    int err = storage_read(rd, &h, sizeof h);
    if (err)
        return err;
    if (memcmp(h.magic, CKPT_MAGIC, 8) != 0 || (h.version != 1 && h.version != 2) ||
        h.dtype != (uint32_t)s->cfg.dtype || h.n != s->cfg.size ||
        (h.mask & ~((1u << OPTIM_MAX_BUFFERS) - 1)) || (h.version == 1 && nt != 1))
        return STORAGE_ECORRUPT;
    size_t rl = h.version == 2 ? nt * sizeof(ckpt_tensor) + ng * sizeof(ckpt_group) : 0;
    size_t need = sizeof h + rl + v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (h.mask & (1u << i))
            need += v;
    if (h.accum_count > 0)
        need += v;
    if (len != need)
        return STORAGE_ECORRUPT;
    if (h.version == 2) {
        for (size_t t = 0; t < nt; t++) {
            ckpt_tensor ct;
            if ((err = storage_read(rd, &ct, sizeof ct)))
                return err;
            s->tst[t].step = ct.step;
            memcpy(s->tst[t].scalars, ct.scalars, sizeof ct.scalars);
        }
        for (size_t g = 0; g < ng; g++) {
            ckpt_group cg;
            if ((err = storage_read(rd, &cg, sizeof cg)))
                return err;
            for (int k = 0; k < ENG_HP_COUNT; k++) {
                s->gcur[g].has[k] = cg.has[k] != 0;
                s->gcur[g].v[k] = cg.v[k];
            }
        }
        s->client_hp = h.reserved & 1u;
    } else {
        /* Version 1: one tensor, its state in the header. */
        s->tst[0].step = h.step;
        memcpy(s->tst[0].scalars, h.scalars, sizeof h.scalars);
    }
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

/* ------------------------------------------------------- replay inputs
 *
 * What a log row needs besides its gradient, as its `extra` bytes:
 * "OPX1", u32 absent count, the absent tensor indices (u32 each), u32
 * group count (0 when the step set no group values), then per group one
 * byte of flags (bit k: value k given) and ENG_HP_COUNT doubles.  A step
 * with a client-given gradient norm is "OPX2": the same, then that norm
 * as one double.
 */
#define EXTRA_MAGIC "OPX1"
#define EXTRA_MAGIC_NORM "OPX2"

static void *extra_encode(const eng_step_in *in, size_t n_groups, size_t *len)
{
    size_t ng = in->ghp ? n_groups : 0;
    size_t l = 4 + 4 + 4 * in->n_absent + 4 + ng * (1 + 8 * ENG_HP_COUNT) +
               (in->has_norm ? 8 : 0);
    if (!in->n_absent && !ng && !in->has_norm) {
        *len = 0;
        return NULL;
    }
    unsigned char *b = malloc(l), *p = b;
    if (!b) {
        *len = SIZE_MAX;
        return NULL;
    }
    uint32_t u;
    memcpy(p, in->has_norm ? EXTRA_MAGIC_NORM : EXTRA_MAGIC, 4), p += 4;
    u = (uint32_t)in->n_absent;
    memcpy(p, &u, 4), p += 4;
    for (size_t k = 0; k < in->n_absent; k++)
        memcpy(p, &in->absent[k], 4), p += 4;
    u = (uint32_t)ng;
    memcpy(p, &u, 4), p += 4;
    for (size_t g = 0; g < ng; g++) {
        unsigned char f = 0;
        for (int k = 0; k < ENG_HP_COUNT; k++)
            f |= (unsigned char)(in->ghp[g].has[k] ? 1u << k : 0u);
        *p++ = f;
        for (int k = 0; k < ENG_HP_COUNT; k++)
            memcpy(p, &in->ghp[g].v[k], 8), p += 8;
    }
    if (in->has_norm)
        memcpy(p, &in->grad_norm, 8), p += 8;
    *len = l;
    return b;
}

/* Fills in->absent / in->ghp from a row's extra bytes (buffers owned by the
 * caller: absent has room for every tensor, ghp for every group). */
static int extra_decode(const eng_session *s, const void *extra, size_t len, uint32_t *absent,
                        eng_group_hp *ghp, eng_step_in *in)
{
    in->absent = NULL;
    in->n_absent = 0;
    in->ghp = NULL;
    in->has_norm = false;
    if (!extra || len == 0)
        return 0;
    const unsigned char *p = extra, *end = p + len;
    uint32_t na, ng;
    bool has_norm = len >= 20 && memcmp(p, EXTRA_MAGIC_NORM, 4) == 0;
    if (has_norm) {
        end -= 8;
        memcpy(&in->grad_norm, end, 8);
        if (!isfinite(in->grad_norm) || in->grad_norm < 0)
            return STORAGE_ECORRUPT;
    } else if (len < 12 || memcmp(p, EXTRA_MAGIC, 4) != 0) {
        return STORAGE_ECORRUPT;
    }
    memcpy(&na, p + 4, 4);
    p += 8;
    if (na > s->cfg.n_tensors || (size_t)(end - p) < 4 * (size_t)na + 4)
        return STORAGE_ECORRUPT;
    for (uint32_t k = 0; k < na; k++) {
        memcpy(&absent[k], p, 4), p += 4;
        if (absent[k] >= s->cfg.n_tensors || (k && absent[k] <= absent[k - 1]))
            return STORAGE_ECORRUPT;
    }
    memcpy(&ng, p, 4), p += 4;
    if ((ng != 0 && ng != s->cfg.n_groups) ||
        (size_t)(end - p) != (size_t)ng * (1 + 8 * ENG_HP_COUNT))
        return STORAGE_ECORRUPT;
    for (uint32_t g = 0; g < ng; g++) {
        unsigned char f = *p++;
        for (int k = 0; k < ENG_HP_COUNT; k++) {
            ghp[g].has[k] = (f >> k) & 1u;
            memcpy(&ghp[g].v[k], p, 8), p += 8;
        }
    }
    in->absent = na ? absent : NULL;
    in->n_absent = na;
    in->ghp = ng ? ghp : NULL;
    in->has_norm = has_norm;
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
    eng_step_in in = {.grad = e->grad, .loss = e->loss,
                      .factor = isnan(e->factor) ? 1.0 : e->factor};
    uint32_t *absent = malloc((s->cfg.n_tensors ? s->cfg.n_tensors : 1) * sizeof *absent);
    eng_group_hp *ghp = calloc(s->cfg.n_groups ? s->cfg.n_groups : 1, sizeof *ghp);
    int err = absent && ghp ? extra_decode(s, e->extra, e->extra_len, absent, ghp, &in)
                            : STORAGE_ENOMEM;
    if (!err && (!e->grad ||
                 e->grad_len != eng_present_size(s, in.absent, in.n_absent) *
                                    optim_dtype_size(s->cfg.dtype)))
        err = STORAGE_ECORRUPT;
    if (!err) {
        eng_step_out res;
        err = apply(rc->pool, s, &in, false, &res);
        s->log_bytes += e->grad_len;
        if (!err && (e->kind != res.kind || (int64_t)s->st.step != e->step))
            err = STORAGE_ECORRUPT; /* replay diverged from the log */
    }
    free(absent);
    free(ghp);
    return err;
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
    snprintf(s->created_by, sizeof s->created_by, "%s", info.created_by ? info.created_by : "");
    storage_session_info_free(&info);
    if (err != ENG_OK)
        return err;
    replay_ctx rc = {s, pool};
    err = storage_session_load(db, s->id, install_ckpt, replay_row, &rc);
    if (err == STORAGE_OK && eng_ensure_buffers(s) != ENG_OK)
        err = STORAGE_ENOMEM;
    return err;
}

int eng_session_load_at(storage *db, eng_pool *pool, eng_session *s, int64_t id, int64_t step,
                        const char *config, int64_t *seq_out)
{
    int64_t seq = seq_out && step < 0 ? *seq_out : 0;
    char *at_cfg = NULL;
    int err = storage_locate(db, id, step, &seq, &at_cfg);
    if (err != STORAGE_OK)
        return err;
    api_config cfg;
    const char *use = at_cfg ? at_cfg : config;
    if (!use || api_config_from_json(use, &cfg)) {
        free(at_cfg);
        return STORAGE_ECORRUPT;
    }
    free(at_cfg);
    err = shell_fill(s, &cfg);
    api_config_free(&cfg);
    if (err != ENG_OK)
        return err;
    replay_ctx rc = {s, pool};
    err = storage_session_load_at(db, id, seq, install_ckpt, replay_row, &rc, NULL);
    if (err == STORAGE_OK && eng_ensure_buffers(s) != ENG_OK)
        err = STORAGE_ENOMEM;
    if (err == STORAGE_OK && step >= 0 && (int64_t)s->st.step != step)
        err = STORAGE_ECORRUPT;
    if (err == STORAGE_OK && seq_out)
        *seq_out = seq;
    return err;
}

typedef struct {
    storage *db;
    eng_pool *pool;
    eng_session *s;
    int64_t rows;
} relog_ctx;

static int relog_row(void *ud, const storage_log_entry *e)
{
    relog_ctx *rc = ud;
    rc->rows++;
    return eng_apply_logged(rc->db, rc->pool, rc->s, e);
}

int eng_apply_logged(storage *db, eng_pool *pool, eng_session *s, const storage_log_entry *e)
{
    ENG_ASSERT_LOCKED(s);
    if (e->kind == STORAGE_LOG_SKIP) {
        /* its gradient was not kept: counted, as the original was */
        s->n_skipped++;
        return 0;
    }
    eng_step_in in = {.grad = e->grad, .loss = e->loss,
                      .factor = isnan(e->factor) ? 1.0 : e->factor, .worker = e->worker};
    uint32_t *absent = malloc((s->cfg.n_tensors ? s->cfg.n_tensors : 1) * sizeof *absent);
    eng_group_hp *ghp = calloc(s->cfg.n_groups ? s->cfg.n_groups : 1, sizeof *ghp);
    int err = absent && ghp ? extra_decode(s, e->extra, e->extra_len, absent, ghp, &in)
                            : STORAGE_ENOMEM;
    if (!err && (!e->grad ||
                 e->grad_len != eng_present_size(s, in.absent, in.n_absent) *
                                    optim_dtype_size(s->cfg.dtype)))
        err = STORAGE_ECORRUPT;
    if (!err) {
        eng_step_out out;
        err = eng_step(db, pool, s, &in, &out);
    }
    free(absent);
    free(ghp);
    return err;
}

int eng_relog(storage *db, eng_pool *pool, eng_session *s, int64_t src_id, int64_t after,
              int64_t upto, int64_t *rows)
{
    ENG_ASSERT_LOCKED(s);
    relog_ctx rc = {db, pool, s, 0};
    int err = storage_log_read(db, src_id, after, upto, relog_row, &rc);
    if (rows)
        *rows = rc.rows;
    return err;
}

int eng_session_create(storage *db, eng_session *s, int64_t now)
{
    char *cfg_json = api_config_to_json(&s->cfg);
    if (!cfg_json)
        return ENG_ENOMEM;
    ckpt_header h;
    void *recs;
    storage_iov iov[MAX_PIECES];
    int k = checkpoint_pieces(s, &h, &recs, iov);
    s->created_ms = s->updated_ms = now;
    int err = k < 0 ? ENG_ENOMEM
                    : storage_session_create_owned(db, s->name, cfg_json, now, iov, k,
                                                   (int64_t)s->st.step,
                                                   s->created_by[0] ? s->created_by : NULL,
                                                   (int64_t)s->cfg.size, &s->id);
    free(recs);
    free(cfg_json);
    return err;
}

int eng_checkpoint(storage *db, eng_session *s, bool with_config)
{
    return eng_checkpoint_kind(db, s, with_config,
                               with_config ? STORAGE_CKPT_ANCHOR : STORAGE_CKPT_AUTO, NULL);
}

int eng_checkpoint_kind(storage *db, eng_session *s, bool with_config, int kind,
                        const char *label)
{
    ENG_ASSERT_LOCKED(s);
    char *cfg_json = api_config_to_json(&s->cfg);
    if (!cfg_json)
        return ENG_ENOMEM;
    storage_ckpt_meta m = {.kind = kind, .label = label, .config = cfg_json,
                           .keep = s->cfg.retain.keep};
    ckpt_header h;
    void *recs;
    storage_iov iov[MAX_PIECES];
    int k = checkpoint_pieces(s, &h, &recs, iov);
    /* updated_at is the time of the last change: a PATCH is one, a
     * checkpoint of steps already taken (eviction, shutdown) is not. */
    int64_t now = with_config ? now_ms() : s->updated_ms;
    double t0 = obs_now();
    int err = k < 0 ? ENG_ENOMEM
                    : storage_checkpoint_kept(db, s->id, with_config ? cfg_json : NULL, iov, k,
                                              s->seq, (int64_t)s->st.step, now, &m);
    free(recs);
    free(cfg_json);
    if (err == STORAGE_OK) {
        obs_checkpoint_done(obs_now() - t0);
        s->log_bytes = 0;
        if (with_config)
            s->updated_ms = now;
    }
    return err;
}

int eng_set_params(storage *db, eng_session *s, void *params)
{
    ENG_ASSERT_LOCKED(s);
    eng_pbuf *nb = malloc(sizeof *nb);
    if (!nb) {
        free(params);
        return ENG_ENOMEM;
    }
    *nb = (eng_pbuf){1, params};
    eng_pbuf *old = s->pbuf;
    int64_t prev = s->updated_ms;
    s->pbuf = nb;
    s->params = params;
    s->updated_ms = now_ms();
    int err = eng_checkpoint_kind(db, s, false, STORAGE_CKPT_ANCHOR, NULL);
    if (err != STORAGE_OK) {
        s->pbuf = old;
        s->params = old->data;
        s->updated_ms = prev;
        eng_params_unpin(nb);
        return err;
    }
    eng_params_unpin(old);
    return ENG_OK;
}

int eng_step(storage *db, eng_pool *pool, eng_session *s, const eng_step_in *in,
             eng_step_out *out)
{
    ENG_ASSERT_LOCKED(s);
    assert(in->grad != NULL);
    if (eng_params_own(s) != ENG_OK)
        return ENG_ENOMEM;
    size_t extra_len;
    void *extra = extra_encode(in, s->cfg.n_groups, &extra_len);
    if (extra_len == SIZE_MAX)
        return ENG_ENOMEM;
    struct timespec t0, t1, t2;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int err = apply(pool, s, in, s->cfg.nonfinite == API_NONFINITE_ERROR, out);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    out->kernel_s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (err != ENG_OK) {
        free(extra);
        return err;
    }
    size_t gbytes = eng_present_size(s, in->absent, in->n_absent) * optim_dtype_size(s->cfg.dtype);
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
        .extra = extra,
        .extra_len = extra_len,
        .idem_key = in->key,
        .idem_fp = in->fp,
        .more_keys = in->more_keys,
        .more_fps = in->more_fps,
        .n_more_keys = in->n_more_keys,
        .worker = in->worker,
    };
    /* Checkpoint when the log since the last one outgrows the state, and
     * every retain.every_steps updates (a kept one). */
    ckpt_header h;
    void *recs = NULL;
    char *cfg_json = NULL;
    storage_iov iov[MAX_PIECES];
    int k = 0;
    bool periodic = s->cfg.retain.every_steps > 0 && out->kind == STORAGE_LOG_STEP &&
                    s->st.step % (uint64_t)s->cfg.retain.every_steps == 0;
    size_t ckpt_after = CKPT_LOG_RATIO * eng_session_bytes(s);
    if (ckpt_after < CKPT_MIN_LOG_BYTES)
        ckpt_after = CKPT_MIN_LOG_BYTES;
    if (periodic || s->log_bytes + e.grad_len > ckpt_after) {
        k = checkpoint_pieces(s, &h, &recs, iov);
        if (k >= 0 && !(cfg_json = api_config_to_json(&s->cfg)))
            k = -1;
    }
    storage_ckpt_meta m = {.kind = periodic ? STORAGE_CKPT_PERIODIC : STORAGE_CKPT_AUTO,
                           .config = cfg_json, .keep = s->cfg.retain.keep};
    err = k < 0 ? ENG_ENOMEM : storage_append_kept(db, s->id, &e, iov, k, &m);
    clock_gettime(CLOCK_MONOTONIC, &t2);
    out->commit_s = (double)(t2.tv_sec - t1.tv_sec) + (double)(t2.tv_nsec - t1.tv_nsec) / 1e9;
    out->checkpointed = k > 0;
    free(recs);
    free(cfg_json);
    free(extra);
    if (err != STORAGE_OK)
        return err;
    s->seq = e.seq;
    s->log_bytes = k ? 0 : s->log_bytes + e.grad_len;
    s->updated_ms = e.time_ms;
    return ENG_OK;
}

eng_pbuf *eng_params_pin(eng_session *s)
{
    __atomic_add_fetch(&s->pbuf->refs, 1, __ATOMIC_ACQ_REL);
    return s->pbuf;
}

void eng_params_unpin(eng_pbuf *b)
{
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        free(b->data);
        free(b);
    }
}

int eng_params_own(eng_session *s)
{
    if (__atomic_load_n(&s->pbuf->refs, __ATOMIC_ACQUIRE) == 1)
        return ENG_OK;
    eng_pbuf *nb = malloc(sizeof *nb);
    void *data = malloc(vec_bytes(s) ? vec_bytes(s) : 1);
    if (!nb || !data) {
        free(nb);
        free(data);
        return ENG_ENOMEM;
    }
    memcpy(data, s->params, vec_bytes(s));
    *nb = (eng_pbuf){1, data};
    eng_params_unpin(s->pbuf);
    s->pbuf = nb;
    s->params = data;
    return ENG_OK;
}

void eng_wire_copy(optim_dtype dt, const void *src, optim_wire w, void *dst, size_t n)
{
    if ((w == OPTIM_WIRE_F32 && dt == OPTIM_F32) || (w == OPTIM_WIRE_F64 && dt == OPTIM_F64))
        memcpy(dst, src, n * optim_dtype_size(dt));
    else
        optim_vec_to_wire(dt, src, w, dst, n);
}

void *eng_params_wire(const eng_session *s, optim_wire w, size_t *len)
{
    size_t n = (size_t)s->cfg.size;
    size_t bytes = n * optim_wire_size(w);
    void *b = malloc(bytes ? bytes : 1);
    if (!b)
        return NULL;
    eng_wire_copy(s->cfg.dtype, s->params, w, b, n);
    *len = bytes;
    return b;
}
