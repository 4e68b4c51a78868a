/*
 * session.c -- one optimizer session in memory: the step pipeline shared by
 * the live path and by replay, and the checkpoint format.
 *
 * Checkpoint blob (little-endian): ckpt_header, then params, then each
 * buffer whose bit is set in the mask (slot order), then the pending
 * accumulation when accum_count > 0.
 */
#include "server/server.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CKPT_MAGIC "OPTDCKP1"

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

static size_t vec_bytes(const srv_session *s)
{
    return (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
}

static unsigned buffer_mask(const srv_session *s)
{
    unsigned m = 0;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            m |= 1u << i;
    return m;
}

size_t srv_session_bytes(const srv_session *s)
{
    size_t v = vec_bytes(s), total = 3 * v; /* params, scratch, snap */
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            total += v;
    if (s->accum)
        total += v;
    return total + sizeof *s;
}

void srv_session_free(srv_session *s)
{
    if (!s)
        return;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(s->st.buf[i]);
    free(s->params);
    free(s->accum);
    free(s->scratch);
    free(s->snap);
    free(s->round_sum);
    free(s->round_workers);
    free(s->round_keys);
    api_config_free(&s->cfg);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* The hyperparameters of the next update: lr from the schedule, cycled
 * momentum from one-cycle. */
static void effective_hparams(const srv_session *s, double factor, optim_hparams *hp)
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

double srv_session_next_lr(const srv_session *s)
{
    optim_hparams hp;
    effective_hparams(s, 1.0, &hp);
    return hp.lr;
}

static int ensure_buffers_for(srv_session *s, const optim_hparams *hp)
{
    unsigned need = optim_buffers_needed(hp);
    size_t n = (size_t)s->cfg.size;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (!(need & (1u << i)) || s->st.buf[i])
            continue;
        s->st.buf[i] = malloc(vec_bytes(s));
        if (!s->st.buf[i])
            return -1;
        optim_buffer_init(hp, i, s->cfg.dtype, s->st.buf[i], n);
    }
    return 0;
}

int srv_session_ensure_buffers(srv_session *s)
{
    optim_hparams hp;
    effective_hparams(s, 1.0, &hp);
    if (s->cfg.mode.accumulate > 1 && !s->accum) {
        s->accum = calloc(1, vec_bytes(s));
        if (!s->accum)
            return -1;
    }
    return ensure_buffers_for(s, &hp);
}

static srv_session *alloc_session(const char *name, const api_config *cfg)
{
    srv_session *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    snprintf(s->name, sizeof s->name, "%s", name);
    pthread_mutex_init(&s->mu, NULL);
    if (api_config_copy(&s->cfg, cfg)) {
        srv_session_free(s);
        return NULL;
    }
    size_t bytes = vec_bytes(s);
    s->params = malloc(bytes);
    s->scratch = malloc(bytes);
    s->snap = malloc(bytes);
    if (!s->params || !s->scratch || !s->snap) {
        srv_session_free(s);
        return NULL;
    }
    s->last_loss = NAN;
    s->last_lr = NAN;
    return s;
}

srv_session *srv_session_new(const char *name, const api_config *cfg, const void *params,
                             const api_init *init)
{
    srv_session *s = alloc_session(name, cfg);
    if (!s)
        return NULL;
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
    if (srv_session_ensure_buffers(s)) {
        srv_session_free(s);
        return NULL;
    }
    return s;
}

/* ------------------------------------------------------------ pipeline */

static double diff_norm(optim_dtype dt, const void *a, const void *b, size_t n)
{
    double acc = 0.0;
    if (dt == OPTIM_F32) {
        const float *x = a, *y = b;
        for (size_t i = 0; i < n; i++) {
            double d = (double)x[i] - (double)y[i];
            acc += d * d;
        }
    } else {
        const double *x = a, *y = b;
        for (size_t i = 0; i < n; i++) {
            double d = x[i] - y[i];
            acc += d * d;
        }
    }
    return sqrt(acc);
}

static void accum_add(optim_dtype dt, void *acc, const void *g, size_t n)
{
    if (dt == OPTIM_F32) {
        float *a = acc;
        const float *x = g;
        for (size_t i = 0; i < n; i++)
            a[i] += x[i];
    } else {
        double *a = acc;
        const double *x = g;
        for (size_t i = 0; i < n; i++)
            a[i] += x[i];
    }
}

/* out = acc / k, then acc = 0. */
static void accum_take_mean(optim_dtype dt, void *acc, void *out, size_t n, int64_t k)
{
    if (dt == OPTIM_F32) {
        float *a = acc, *o = out, kk = (float)k;
        for (size_t i = 0; i < n; i++) {
            o[i] = a[i] / kk;
            a[i] = 0.0f;
        }
    } else {
        double *a = acc, *o = out, kk = (double)k;
        for (size_t i = 0; i < n; i++) {
            o[i] = a[i] / kk;
            a[i] = 0.0;
        }
    }
}

void srv_session_apply(srv_session *s, const void *grad, double loss, double factor,
                       srv_apply_result *res)
{
    size_t n = (size_t)s->cfg.size;
    optim_dtype dt = s->cfg.dtype;
    memset(res, 0, sizeof *res);
    res->lr = NAN;
    res->update_norm = NAN;
    if (!isnan(loss))
        s->last_loss = loss;

    if (!api_vector_finite(dt, grad, n)) {
        /* Only reachable with nonfinite = "skip": the HTTP layer answers 422
         * otherwise. */
        res->kind = STORAGE_LOG_SKIP;
        res->grad_norm = optim_grad_norm(dt, grad, n, 2.0);
        s->n_skipped++;
        return;
    }

    if (s->cfg.mode.accumulate > 1) {
        if (!s->accum)
            s->accum = calloc(1, vec_bytes(s)); /* allocated on create/PATCH; see ensure */
        accum_add(dt, s->accum, grad, n);
        s->accum_count++;
        if (s->accum_count < s->cfg.mode.accumulate) {
            res->kind = STORAGE_LOG_ACCUM;
            res->grad_norm = optim_grad_norm(dt, grad, n, 2.0);
            return;
        }
        accum_take_mean(dt, s->accum, s->scratch, n, s->accum_count);
        s->accum_count = 0;
    } else {
        memcpy(s->scratch, grad, vec_bytes(s));
    }

    res->kind = STORAGE_LOG_STEP;
    if (s->cfg.clip.kind != OPTIM_CLIP_NONE && s->cfg.clip.kind != OPTIM_CLIP_VALUE)
        res->grad_norm = optim_clip_apply(&s->cfg.clip, dt, s->scratch, n);
    else {
        res->grad_norm = optim_grad_norm(dt, s->scratch, n, 2.0);
        if (s->cfg.clip.kind == OPTIM_CLIP_VALUE)
            optim_clip_apply(&s->cfg.clip, dt, s->scratch, n);
    }

    optim_hparams hp;
    effective_hparams(s, factor, &hp);
    /* One-cycle may switch momentum on: its buffer must exist. */
    ensure_buffers_for(s, &hp);
    memcpy(s->snap, s->params, vec_bytes(s));
    optim_step(&hp, &s->st, dt, s->params, s->scratch, n);
    res->lr = hp.lr;
    res->update_norm = diff_norm(dt, s->params, s->snap, n);
    s->last_lr = hp.lr;
    s->n_applied++;
    if (s->cfg.sched.kind == OPTIM_SCHED_REDUCE_ON_PLATEAU && !isnan(loss))
        optim_plateau_observe(&s->cfg.sched, &s->plateau, loss);
}

/* ---------------------------------------------------------- checkpoint */

void *srv_session_checkpoint(const srv_session *s, size_t *len)
{
    size_t v = vec_bytes(s);
    unsigned mask = buffer_mask(s);
    size_t total = sizeof(ckpt_header) + v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (mask & (1u << i))
            total += v;
    if (s->accum_count > 0)
        total += v;
    char *blob = malloc(total);
    if (!blob)
        return NULL;
    ckpt_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, CKPT_MAGIC, 8);
    h.version = 1;
    h.dtype = (uint32_t)s->cfg.dtype;
    h.n = s->cfg.size;
    h.step = s->st.step;
    h.mask = mask;
    memcpy(h.scalars, s->st.scalars, sizeof h.scalars);
    h.plateau_lr = s->plateau.lr;
    h.plateau_best = s->plateau.best;
    h.plateau_bad = s->plateau.num_bad_epochs;
    h.plateau_cooldown = s->plateau.cooldown_counter;
    h.plateau_epoch = s->plateau.last_epoch;
    h.accum_count = s->accum_count;
    h.n_applied = s->n_applied;
    h.n_stale = s->n_stale;
    h.n_timeout = s->n_timeout;
    h.n_skipped = s->n_skipped;
    h.last_lr = s->last_lr;
    h.last_loss = s->last_loss;
    char *p = blob;
    memcpy(p, &h, sizeof h);
    p += sizeof h;
    memcpy(p, s->params, v);
    p += v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (mask & (1u << i)) {
            memcpy(p, s->st.buf[i], v);
            p += v;
        }
    }
    if (s->accum_count > 0)
        memcpy(p, s->accum, v);
    *len = total;
    return blob;
}

static int install_blob(srv_session *s, const void *blob, size_t len, int64_t seq);

/* Pulls the checkpoint into one buffer, then installs it. */
static int install_ckpt(void *ud, storage_reader *r, size_t len, int64_t seq)
{
    void *blob = malloc(len ? len : 1);
    if (!blob)
        return STORAGE_ENOMEM;
    int err = storage_read(r, blob, len);
    if (err == STORAGE_OK)
        err = install_blob(ud, blob, len, seq);
    free(blob);
    return err;
}

static int install_blob(srv_session *s, const void *blob, size_t len, int64_t seq)
{
    ckpt_header h;
    size_t v = vec_bytes(s);
    if (len < sizeof h)
        return STORAGE_ECORRUPT;
    memcpy(&h, blob, sizeof h);
    if (memcmp(h.magic, CKPT_MAGIC, 8) != 0 || h.version != 1 || h.dtype != (uint32_t)s->cfg.dtype ||
        h.n != s->cfg.size || (h.mask & ~((1u << OPTIM_MAX_BUFFERS) - 1)))
        return STORAGE_ECORRUPT;
    size_t need = sizeof h + v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (h.mask & (1u << i))
            need += v;
    if (h.accum_count > 0)
        need += v;
    if (len != need)
        return STORAGE_ECORRUPT;
    const char *p = (const char *)blob + sizeof h;
    memcpy(s->params, p, v);
    p += v;
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (!(h.mask & (1u << i)))
            continue;
        if (!(s->st.buf[i] = malloc(v)))
            return STORAGE_ENOMEM;
        memcpy(s->st.buf[i], p, v);
        p += v;
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
        if (!(s->accum = calloc(1, v)))
            return STORAGE_ENOMEM;
        if (h.accum_count > 0)
            memcpy(s->accum, p, v);
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
    srv_session *s = ud;
    s->seq = e->seq;
    if (e->kind == STORAGE_LOG_SKIP) {
        s->n_skipped++;
        return 0;
    }
    if (!e->grad || e->grad_len != vec_bytes(s))
        return STORAGE_ECORRUPT;
    srv_apply_result res;
    srv_session_apply(s, e->grad, e->loss, isnan(e->factor) ? 1.0 : e->factor, &res);
    s->log_bytes += e->grad_len;
    if (e->kind != res.kind || (int64_t)s->st.step != e->step)
        return STORAGE_ECORRUPT; /* replay diverged from the log */
    return 0;
}

int srv_session_load(storage *db, const storage_session_info *info, srv_session **out)
{
    *out = NULL;
    api_config cfg;
    if (api_config_from_json(info->config, &cfg))
        return STORAGE_ECORRUPT;
    srv_session *s = alloc_session(info->name, &cfg);
    api_config_free(&cfg);
    if (!s)
        return STORAGE_ENOMEM;
    s->id = info->id;
    s->created_ms = info->created_ms;
    s->updated_ms = info->updated_ms;
    int err = storage_session_load(db, s->id, install_ckpt, replay_row, s);
    if (err == STORAGE_OK && srv_session_ensure_buffers(s))
        err = STORAGE_ENOMEM;
    if (err != STORAGE_OK) {
        srv_session_free(s);
        return err;
    }
    *out = s;
    return STORAGE_OK;
}
