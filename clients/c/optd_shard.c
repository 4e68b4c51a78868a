/*
 * optd_shard.c -- sharded sessions of the C client: one logical vector
 * split by ranges over sessions on several daemons (optd_client.h,
 * "sharded sessions").
 *
 * A step computes the whole gradient's norm with liboptim's blocked
 * reductions (the daemon's own code, so the same bits), then sends every
 * shard its slice with Optd-Grad-Norm from one thread per shard, each on
 * its own optd_client.  A step some shards did not answer stays pending
 * with their answers kept: a step with its key sends it to the others only.
 *
 * Create bodies are split with cJSON; every number of a shard's body is
 * printed with %.17g (cJSON's own printing may be one ULP off), so a shard
 * gets exactly the hyperparameters and params the whole session would.
 */
#include "clients/c/optd_client.h"
#include "optim/optim.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SHARD_NAME_MAX 160
#define SHARD_KEY_MAX 240

struct optd_sharded {
    optd_client **clients;      /* borrowed, k of them                       */
    size_t k;
    char **names;               /* "NAME.shard<i>"                           */
    size_t *offs;               /* k + 1: shard i holds [offs[i], offs[i+1]) */
    size_t *sizes;              /* the whole vector's tensors, for the norm  */
    size_t n_sizes;
    size_t esize;               /* 4 or 8                                    */
    double norm_type;           /* 0: no clipping by norm                    */
    size_t **groups;            /* per shard: the model's groups it holds    */
    size_t *n_groups;
    size_t n_model_groups;
    long retry_for_ms;
    /* The unfinished step, when pending. */
    bool pending;
    char key[SHARD_KEY_MAX];
    double norm;
    bool *done;
    unsigned char *answers;     /* the shards' params, in place              */
    long long *steps;
};

static void shard_err(optd_error *err, int status, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void shard_err(optd_error *err, int status, const char *field, const char *fmt, ...)
{
    if (!err)
        return;
    memset(err, 0, sizeof *err);
    err->status = status;
    err->step = -1;
    snprintf(err->field, sizeof err->field, "%s", field ? field : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->detail, sizeof err->detail, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- norm */

static double grad_norm(optim_dtype dt, const void *grad, const size_t *sizes, size_t n_sizes,
                        double norm_type, int *finite)
{
    size_t es = optim_dtype_size(dt);
    bool inf = isinf(norm_type) && norm_type > 0, fin = true;
    double acc = 0.0;
    const char *g = grad;
    for (size_t t = 0; t < n_sizes; t++) {
        for (size_t o = 0; o < sizes[t]; o += OPTIM_VEC_BLOCK) {
            size_t len = sizes[t] - o < OPTIM_VEC_BLOCK ? sizes[t] - o : OPTIM_VEC_BLOCK;
            optim_vec_partial p;
            optim_vec_block_stats(dt, g + o * es, len, norm_type, &p);
            if (inf)
                acc = (p.norm != p.norm || p.norm > acc) ? p.norm : acc;
            else
                acc = acc + p.norm;
            fin = fin && p.finite;
        }
        g += sizes[t] * es;
    }
    if (norm_type == 2.0)
        acc = sqrt(acc);
    else if (!inf && norm_type != 1.0)
        acc = NAN;
    if (finite)
        *finite = fin;
    return acc;
}

double optd_grad_norm_f32(const float *grad, const size_t *sizes, size_t n_sizes,
                          double norm_type, int *finite)
{
    return grad_norm(OPTIM_F32, grad, sizes, n_sizes, norm_type, finite);
}

double optd_grad_norm_f64(const double *grad, const size_t *sizes, size_t n_sizes,
                          double norm_type, int *finite)
{
    return grad_norm(OPTIM_F64, grad, sizes, n_sizes, norm_type, finite);
}

/* ---------------------------------------------------------- handles */

void optd_sharded_free(optd_sharded *s)
{
    if (!s)
        return;
    for (size_t i = 0; s->names && i < s->k; i++)
        free(s->names[i]);
    for (size_t i = 0; s->groups && i < s->k; i++)
        free(s->groups[i]);
    free(s->groups);
    free(s->n_groups);
    free(s->names);
    free(s->clients);
    free(s->offs);
    free(s->sizes);
    free(s->done);
    free(s->answers);
    free(s->steps);
    free(s);
}

size_t optd_sharded_size(const optd_sharded *s)
{
    return s->offs[s->k];
}

size_t optd_sharded_offset(const optd_sharded *s, size_t i)
{
    return s->offs[i <= s->k ? i : s->k];
}

const char *optd_sharded_pending_key(const optd_sharded *s)
{
    return s->pending ? s->key : NULL;
}

int optd_sharded_shard_done(const optd_sharded *s, size_t i)
{
    return s->pending && i < s->k && s->done[i];
}

/* A handle with names and clients, nothing read yet.  NULL when out of
 * memory or the names are too long. */
static optd_sharded *sharded_new(optd_client *const *clients, size_t k, const char *name,
                                 optd_error *err)
{
    if (!clients || k == 0 || !name) {
        shard_err(err, 0, NULL, "a sharded session needs a name and at least one client");
        return NULL;
    }
    if (strlen(name) + 16 > SHARD_NAME_MAX) {
        shard_err(err, 0, "name", "the name is too long for its shards' names");
        return NULL;
    }
    optd_sharded *s = calloc(1, sizeof *s);
    if (!s)
        goto oom;
    s->k = k;
    s->clients = calloc(k, sizeof *s->clients);
    s->names = calloc(k, sizeof *s->names);
    s->offs = calloc(k + 1, sizeof *s->offs);
    s->done = calloc(k, sizeof *s->done);
    s->steps = calloc(k, sizeof *s->steps);
    s->groups = calloc(k, sizeof *s->groups);
    s->n_groups = calloc(k, sizeof *s->n_groups);
    if (!s->clients || !s->names || !s->offs || !s->done || !s->steps || !s->groups ||
        !s->n_groups)
        goto oom;
    for (size_t i = 0; i < k; i++) {
        s->clients[i] = clients[i];
        if (!(s->names[i] = malloc(SHARD_NAME_MAX)))
            goto oom;
        snprintf(s->names[i], SHARD_NAME_MAX, "%s.shard%zu", name, i);
    }
    s->retry_for_ms = OPTD_SHARD_RETRY_FOR_MS;
    return s;
oom:
    optd_sharded_free(s);
    shard_err(err, 0, NULL, "out of memory");
    return NULL;
}

/* Runs f(s, i, arg) for every shard i with want[i] (NULL: all) on a thread
 * of its own; the last shard runs on the calling thread. */
typedef struct {
    void (*f)(optd_sharded *, size_t, void *);
    optd_sharded *s;
    size_t i;
    void *arg;
} shard_job;

static void *shard_thread(void *p)
{
    shard_job *j = p;
    j->f(j->s, j->i, j->arg);
    return NULL;
}

static int each_shard(optd_sharded *s, const bool *want, void (*f)(optd_sharded *, size_t, void *),
                      void *arg)
{
    shard_job *jobs = calloc(s->k, sizeof *jobs);
    pthread_t *th = calloc(s->k, sizeof *th);
    bool *started = calloc(s->k, sizeof *started);
    if (!jobs || !th || !started) {
        free(jobs);
        free(th);
        free(started);
        return -1;
    }
    for (size_t i = 0; i < s->k; i++) {
        if (want && !want[i])
            continue;
        jobs[i] = (shard_job){f, s, i, arg};
        /* without a thread (none left), the shard runs here */
        started[i] = pthread_create(&th[i], NULL, shard_thread, &jobs[i]) == 0;
        if (!started[i])
            f(s, i, arg);
    }
    for (size_t i = 0; i < s->k; i++)
        if (started[i])
            pthread_join(th[i], NULL);
    free(jobs);
    free(th);
    free(started);
    return 0;
}

/* ------------------------------------------------------------ open */

typedef struct {
    cJSON **docs;
    optd_error *errs;
    int *rc;
} open_job;

static void open_one(optd_sharded *s, size_t i, void *arg)
{
    open_job *j = arg;
    char *doc = optd_get_session(s->clients[i], s->names[i], &j->errs[i]);
    j->rc[i] = doc ? 0 : -1;
    if (doc) {
        j->docs[i] = cJSON_Parse(doc);
        if (!j->docs[i]) {
            shard_err(&j->errs[i], 0, NULL, "shard %zu: an undecodable session document", i);
            j->rc[i] = -1;
        }
    }
    free(doc);
}

/* A member of an object as a number; dflt when absent or not a number. */
static double num_or(const cJSON *obj, const char *name, double dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

/* Whether steps carry the whole vector's norm, and of which type, from a
 * shard's session document.  0 or -1 (norm clipping in sync mode or with
 * accumulation). */
static int read_clip(optd_sharded *s, const cJSON *doc, optd_error *err)
{
    const cJSON *clip = cJSON_GetObjectItemCaseSensitive(doc, "clip");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(clip, "type");
    s->norm_type = 0; /* no clipping by norm: no Optd-Grad-Norm */
    if (cJSON_IsString(type) && strcmp(type->valuestring, "norm") == 0) {
        const cJSON *nt_ = cJSON_GetObjectItemCaseSensitive(clip, "norm_type");
        s->norm_type = 2.0;
        if (cJSON_IsNumber(nt_))
            s->norm_type = nt_->valuedouble;
        else if (cJSON_IsString(nt_) && (strcmp(nt_->valuestring, "inf") == 0 ||
                                         strcmp(nt_->valuestring, "Infinity") == 0))
            s->norm_type = INFINITY;
        const cJSON *mode = cJSON_GetObjectItemCaseSensitive(doc, "mode");
        const cJSON *mt = cJSON_GetObjectItemCaseSensitive(mode, "type");
        if ((cJSON_IsString(mt) && strcmp(mt->valuestring, "sync") == 0) ||
            num_or(mode, "accumulate", 1) > 1) {
            shard_err(err, 0, "clip", "a sharded session cannot clip by norm in sync mode or "
                                      "with accumulation: the norm is the round's or the mean's");
            return -1;
        }
    }
    return 0;
}

/* Fills offsets, layout, dtype and the clip's norm from the shards'
 * session documents and the place each one's metadata records
 * (OPTD_SHARD_META).  0 or -1. */
static int read_layout(optd_sharded *s, cJSON *const *docs, optd_error *err)
{
    size_t nt = 0;
    for (size_t i = 0; i < s->k; i++)
        nt += (size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(docs[i], "tensors"));
    s->sizes = calloc(nt ? nt : 1, sizeof *s->sizes);
    if (!s->sizes) {
        shard_err(err, 0, NULL, "out of memory");
        return -1;
    }
    const char *dt0 = NULL;
    bool layout = false;
    size_t total = 0;
    for (size_t i = 0; i < s->k; i++) {
        const cJSON *size = cJSON_GetObjectItemCaseSensitive(docs[i], "size");
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(docs[i], "dtype");
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(docs[i], "metadata"), OPTD_SHARD_META);
        if (!cJSON_IsNumber(size) || size->valuedouble < 1 || !cJSON_IsString(dt)) {
            shard_err(err, 0, NULL, "shard %zu: a session document without size or dtype", i);
            return -1;
        }
        if (num_or(m, "index", -1) != (double)i || num_or(m, "count", -1) != (double)s->k) {
            shard_err(err, 0, NULL, "%s is not shard %zu of %zu", s->names[i], i, s->k);
            return -1;
        }
        if (num_or(m, "offset", -1) != (double)s->offs[i]) {
            shard_err(err, 0, NULL, "shard %zu starts at %.0f, not where shard %zu ends (%zu)", i,
                      num_or(m, "offset", -1), i ? i - 1 : 0, s->offs[i]);
            return -1;
        }
        if (!dt0)
            dt0 = dt->valuestring;
        if (strcmp(dt0, dt->valuestring)) {
            shard_err(err, 0, NULL, "shard %zu is %s, shard 0 is %s", i, dt->valuestring, dt0);
            return -1;
        }
        s->offs[i + 1] = s->offs[i] + (size_t)size->valuedouble;
        total = (size_t)num_or(m, "size", 0);
        layout = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "layout"));
        const cJSON *held = cJSON_GetObjectItemCaseSensitive(m, "groups"), *gv;
        if (!(s->groups[i] = calloc((size_t)cJSON_GetArraySize(held) + 1, sizeof **s->groups))) {
            shard_err(err, 0, NULL, "out of memory");
            return -1;
        }
        cJSON_ArrayForEach(gv, held)
        {
            size_t gi = cJSON_IsNumber(gv) && gv->valuedouble >= 0 ? (size_t)gv->valuedouble : 0;
            s->groups[i][s->n_groups[i]++] = gi;
            if (gi + 1 > s->n_model_groups)
                s->n_model_groups = gi + 1;
        }
        const cJSON *t;
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(docs[i], "tensors"))
        {
            s->sizes[s->n_sizes++] = (size_t)num_or(t, "size", 0);
        }
    }
    if (total != s->offs[s->k]) {
        shard_err(err, 0, NULL, "the shards hold %zu elements, their metadata says %zu",
                  s->offs[s->k], total);
        return -1;
    }
    if (!layout) { /* without a layout the whole vector is one tensor */
        s->sizes[0] = s->offs[s->k];
        s->n_sizes = 1;
    }
    s->esize = strcmp(dt0, "float64") == 0 ? 8 : 4;
    if (read_clip(s, docs[0], err))
        return -1;
    if (!(s->answers = malloc(s->offs[s->k] * s->esize))) {
        shard_err(err, 0, NULL, "out of memory");
        return -1;
    }
    return 0;
}

static int open_all(optd_sharded *s, optd_error *err)
{
    cJSON **docs = calloc(s->k, sizeof *docs);
    optd_error *errs = calloc(s->k, sizeof *errs);
    int *rc = calloc(s->k, sizeof *rc);
    int ret = -1;
    if (!docs || !errs || !rc) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    open_job j = {docs, errs, rc};
    if (each_shard(s, NULL, open_one, &j)) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < s->k; i++)
        if (rc[i]) {
            if (err)
                *err = errs[i];
            goto done;
        }
    ret = read_layout(s, docs, err);
done:
    for (size_t i = 0; docs && i < s->k; i++)
        cJSON_Delete(docs[i]);
    free(docs);
    free(errs);
    free(rc);
    return ret;
}

optd_sharded *optd_sharded_open(optd_client *const *clients, size_t k, const char *name,
                                optd_error *err)
{
    optd_sharded *s = sharded_new(clients, k, name, err);
    if (s && open_all(s, err)) {
        optd_sharded_free(s);
        return NULL;
    }
    return s;
}

/* ---------------------------------------------------------- create */

/* Every number of item (and below) becomes raw %.17g text, which reads
 * back as the same double.  0 or -1 (out of memory). */
static int exact_numbers(cJSON *item)
{
    for (cJSON *c = item->child; c; c = c->next) {
        if (cJSON_IsNumber(c)) {
            char buf[40];
            snprintf(buf, sizeof buf, "%.17g", c->valuedouble);
            cJSON *raw = cJSON_CreateRaw(buf);
            /* (replacing by pointer would drop an object member's name) */
            bool ok = raw && (c->string ? cJSON_ReplaceItemInObjectCaseSensitive(item, c->string, raw)
                                        : cJSON_ReplaceItemViaPointer(item, c, raw));
            if (!ok) {
                cJSON_Delete(raw);
                return -1;
            }
            c = raw;
        } else if (exact_numbers(c)) {
            return -1;
        }
    }
    return 0;
}

/* Where shard i starts in a vector of n_t tensors of sizes tsz (cut[i]:
 * its first tensor): cut i (1..k-1) is the tensor boundary nearest to
 * i*total/k (the lower one on a tie) after cut i-1, leaving a tensor to
 * every later shard.  Without tensors: offs[i] = i*n/k rounded down.  The
 * Python client's rules. */
static void split_offsets(size_t k, size_t n, const size_t *tsz, size_t nt, size_t *cut,
                          size_t *offs)
{
    if (!nt) {
        for (size_t i = 0; i <= k; i++)
            offs[i] = (size_t)((unsigned long long)i * n / k);
        return;
    }
    size_t total = 0;
    for (size_t j = 0; j < nt; j++)
        total += tsz[j];
    cut[0] = 0;
    cut[k] = nt;
    for (size_t i = 1; i < k; i++) {
        double target = (double)(i * total) / (double)k;
        size_t best = 0, end = 0;
        double bd = 0;
        for (size_t j = 0; j < cut[i - 1] + 1; j++)
            end += tsz[j];
        for (size_t j = cut[i - 1] + 1; j <= nt - (k - i); j++) {
            double d = fabs((double)end - target);
            if (!best || d < bd) {
                best = j;
                bd = d;
            }
            end += tsz[j];
        }
        cut[i] = best;
    }
    offs[0] = 0;
    for (size_t i = 0; i < k; i++) {
        offs[i + 1] = offs[i];
        for (size_t j = cut[i]; j < cut[i + 1]; j++)
            offs[i + 1] += tsz[j];
    }
}

/* The create body of shard i: the shared body with a zeros init, its own
 * "size" (or "tensors" and "groups") and its place in "metadata".  New
 * (caller deletes), or NULL when out of memory. */
static cJSON *shard_body(const optd_sharded *s, const cJSON *root, size_t i, const size_t *cut,
                         size_t nt, size_t n)
{
    const cJSON *tensors = cJSON_GetObjectItemCaseSensitive(root, "tensors");
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(root, "groups");
    cJSON *d = cJSON_Duplicate(root, 1);
    if (!d)
        return NULL;
    static const char *const drop[] = {"params", "size", "init", "tensors", "groups", "metadata"};
    for (size_t j = 0; j < sizeof drop / sizeof drop[0]; j++)
        cJSON_DeleteItemFromObjectCaseSensitive(d, drop[j]);
    cJSON *init = cJSON_AddObjectToObject(d, "init");
    cJSON *meta = cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(root, "metadata"), 1);
    if (!meta)
        meta = cJSON_CreateObject();
    else
        cJSON_DeleteItemFromObjectCaseSensitive(meta, OPTD_SHARD_META);
    cJSON *place = cJSON_CreateObject(), *gi = cJSON_CreateArray();
    bool ok = init && cJSON_AddStringToObject(init, "type", "zeros") && meta && place && gi &&
              cJSON_AddItemToObject(d, "metadata", meta);
    if (ok && nt) {
        cJSON *ta = cJSON_AddArrayToObject(d, "tensors");
        ok = ta != NULL;
        for (size_t j = cut[i]; ok && j < cut[i + 1]; j++) {
            cJSON *dup = cJSON_Duplicate(cJSON_GetArrayItem(tensors, (int)j), 1);
            ok = dup && cJSON_AddItemToArray(ta, dup);
        }
        cJSON *ga = NULL;
        int g_index = 0;
        const cJSON *G;
        cJSON_ArrayForEach(G, groups)
        {
            cJSON *held = cJSON_CreateArray();
            const cJSON *nm;
            cJSON_ArrayForEach(nm, cJSON_GetObjectItemCaseSensitive(G, "tensors"))
            {
                for (size_t j = cut[i]; ok && held && j < cut[i + 1] && cJSON_IsString(nm); j++) {
                    const cJSON *tn =
                        cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(tensors, (int)j), "name");
                    if (cJSON_IsString(tn) && strcmp(tn->valuestring, nm->valuestring) == 0)
                        ok = cJSON_AddItemToArray(held, cJSON_CreateString(nm->valuestring));
                }
            }
            if (held && cJSON_GetArraySize(held) > 0) {
                cJSON *g = cJSON_Duplicate(G, 1);
                ok = ok && g && cJSON_ReplaceItemInObjectCaseSensitive(g, "tensors", held);
                if (ok && !ga)
                    ok = (ga = cJSON_AddArrayToObject(d, "groups")) != NULL;
                ok = ok && cJSON_AddItemToArray(ga, g) &&
                     cJSON_AddItemToArray(gi, cJSON_CreateNumber(g_index));
                if (!ok)
                    cJSON_Delete(g);
            } else {
                cJSON_Delete(held);
                ok = ok && held;
            }
            g_index++;
        }
    } else if (ok) {
        ok = cJSON_AddNumberToObject(d, "size", (double)(s->offs[i + 1] - s->offs[i])) != NULL;
    }
    if (ok && (!nt || !cJSON_IsArray(groups)))
        ok = cJSON_AddItemToArray(gi, cJSON_CreateNumber(0));
    ok = ok && cJSON_AddNumberToObject(place, "index", (double)i) &&
         cJSON_AddNumberToObject(place, "count", (double)s->k) &&
         cJSON_AddNumberToObject(place, "offset", (double)s->offs[i]) &&
         cJSON_AddNumberToObject(place, "size", (double)n) && cJSON_AddItemToObject(place, "groups", gi);
    if (ok)
        gi = NULL;
    ok = ok && cJSON_AddBoolToObject(place, "layout", nt > 0) &&
         cJSON_AddItemToObject(meta, OPTD_SHARD_META, place);
    if (ok)
        place = NULL;
    cJSON_Delete(gi);
    cJSON_Delete(place);
    if (!ok || exact_numbers(d)) {
        cJSON_Delete(d);
        return NULL;
    }
    return d;
}

/* Splits a create body: offsets into s, each shard's body into bodies[i]
 * (new strings), the initial params in the session's dtype into *params
 * (new, or NULL when the body has none).  0 or -1. */
static int split_config(optd_sharded *s, const cJSON *root, char **bodies, void **params,
                        optd_error *err)
{
    size_t k = s->k;
    const cJSON *pj = cJSON_GetObjectItemCaseSensitive(root, "params");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(root, "size");
    const cJSON *init = cJSON_GetObjectItemCaseSensitive(root, "init");
    const cJSON *tensors = cJSON_GetObjectItemCaseSensitive(root, "tensors");
    const cJSON *itype = cJSON_GetObjectItemCaseSensitive(init, "type");
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(root, "dtype");
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    *params = NULL;
    if (init && !(cJSON_IsString(itype) && strcmp(itype->valuestring, "zeros") == 0)) {
        shard_err(err, 0, "init", "a sharded session takes params or a zeros init: a seeded init "
                                  "would draw every shard's own numbers");
        return -1;
    }
    if (meta && !cJSON_IsObject(meta)) {
        shard_err(err, 0, "metadata", "the metadata of a sharded session must be an object");
        return -1;
    }
    if (cJSON_GetObjectItemCaseSensitive(root, "groups") && !cJSON_IsArray(tensors)) {
        shard_err(err, 0, "groups", "groups need tensors");
        return -1;
    }
    size_t n = cJSON_IsArray(pj) ? (size_t)cJSON_GetArraySize(pj)
               : cJSON_IsNumber(size) && size->valuedouble > 0 ? (size_t)size->valuedouble
                                                               : 0;
    size_t nt = cJSON_IsArray(tensors) ? (size_t)cJSON_GetArraySize(tensors) : 0;
    size_t *tsz = calloc(nt ? nt : 1, sizeof *tsz), *cut = calloc(k + 1, sizeof *cut);
    int ret = -1;
    if (!tsz || !cut) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    if (nt) {
        size_t total = 0, t = 0;
        const cJSON *T;
        cJSON_ArrayForEach(T, tensors)
        {
            size_t e = 1;
            const cJSON *d;
            cJSON_ArrayForEach(d, cJSON_GetObjectItemCaseSensitive(T, "shape"))
            {
                e *= cJSON_IsNumber(d) && d->valuedouble > 0 ? (size_t)d->valuedouble : 0;
            }
            tsz[t++] = e;
            total += e;
        }
        if (nt < k) {
            shard_err(err, 0, "tensors", "%zu tensors cannot make %zu shards: each shard holds "
                                         "whole tensors", nt, k);
            goto done;
        }
        if (n && n != total) {
            shard_err(err, 0, "params", "the tensors hold %zu elements, the params %zu", total, n);
            goto done;
        }
        n = total;
    } else if (n < k) {
        shard_err(err, 0, "params", "%zu values cannot make %zu shards", n, k);
        goto done;
    }
    split_offsets(k, n, tsz, nt, cut, s->offs);
    if (cJSON_IsArray(pj)) {
        bool f64 = cJSON_IsString(dtype) && strcmp(dtype->valuestring, "float64") == 0;
        char *p = *params = malloc(n * (f64 ? 8 : 4));
        if (!p) {
            shard_err(err, 0, NULL, "out of memory");
            goto done;
        }
        const cJSON *v;
        cJSON_ArrayForEach(v, pj)
        {
            /* a double rounded to float as the daemon rounds a create body's */
            if (f64) {
                double x = v->valuedouble;
                memcpy(p, &x, 8);
                p += 8;
            } else {
                float x = (float)v->valuedouble;
                memcpy(p, &x, 4);
                p += 4;
            }
        }
    }
    for (size_t i = 0; i < k; i++) {
        cJSON *d = shard_body(s, root, i, cut, nt, n);
        bodies[i] = d ? cJSON_PrintUnformatted(d) : NULL;
        cJSON_Delete(d);
        if (!bodies[i]) {
            shard_err(err, 0, NULL, "out of memory");
            goto done;
        }
    }
    ret = 0;
done:
    free(tsz);
    free(cut);
    return ret;
}

typedef struct {
    char **bodies;
    const char *params; /* the whole vector's initial params, or NULL */
    optd_error *errs;
    int *rc;
} create_job;

/* Creates shard i; while it is at step 0, gives it its range of the
 * params (binary), as the Python client does. */
static void create_one(optd_sharded *s, size_t i, void *arg)
{
    create_job *j = arg;
    optd_error *e = &j->errs[i];
    int created = optd_create_session(s->clients[i], s->names[i], j->bodies[i], e);
    j->rc[i] = created < 0;
    if (created < 0 || !j->params)
        return;
    if (!created) {
        long long step = -1;
        char *doc = optd_get_session(s->clients[i], s->names[i], e);
        cJSON *dj = doc ? cJSON_Parse(doc) : NULL;
        step = (long long)num_or(dj, "step", -1);
        cJSON_Delete(dj);
        free(doc);
        if (!doc) {
            j->rc[i] = 1;
            return;
        }
        if (step != 0)
            return;
    }
    size_t n = s->offs[i + 1] - s->offs[i];
    const char *p = j->params + s->offs[i] * s->esize;
    j->rc[i] = (s->esize == 8 ? optd_set_params_f64_wire(s->clients[i], s->names[i],
                                                         (const double *)p, n, OPTD_WIRE_FULL, e)
                              : optd_set_params_f32_wire(s->clients[i], s->names[i],
                                                         (const float *)p, n, OPTD_WIRE_FULL, e)) != 0;
}

optd_sharded *optd_sharded_create(optd_client *const *clients, size_t k, const char *name,
                                  const char *config_json, optd_error *err)
{
    optd_sharded *s = sharded_new(clients, k, name, err);
    if (!s)
        return NULL;
    cJSON *root = config_json ? cJSON_Parse(config_json) : NULL;
    char **bodies = calloc(k, sizeof *bodies);
    optd_error *errs = calloc(k, sizeof *errs);
    int *rc = calloc(k, sizeof *rc);
    void *params = NULL;
    int ret = -1;
    if (!bodies || !errs || !rc) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        shard_err(err, 0, NULL, "the create body is not a JSON object");
        goto done;
    }
    if (split_config(s, root, bodies, &params, err))
        goto done;
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(root, "dtype");
    s->esize = cJSON_IsString(dtype) && strcmp(dtype->valuestring, "float64") == 0 ? 8 : 4;
    create_job j = {bodies, params, errs, rc};
    if (each_shard(s, NULL, create_one, &j)) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < k; i++)
        if (rc[i]) {
            if (err) {
                *err = errs[i];
                char d[sizeof err->detail];
                snprintf(d, sizeof d, "shard %zu: %.480s", i, errs[i].detail);
                memcpy(err->detail, d, sizeof d);
            }
            goto done;
        }
    /* the places the daemons hold are the ones to trust */
    memset(s->offs, 0, (k + 1) * sizeof *s->offs);
    ret = open_all(s, err);
done:
    for (size_t i = 0; bodies && i < k; i++)
        free(bodies[i]);
    free(bodies);
    free(errs);
    free(rc);
    free(params);
    cJSON_Delete(root);
    if (ret) {
        optd_sharded_free(s);
        return NULL;
    }
    return s;
}

/* ------------------------------------------------------------ steps */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void optd_sharded_set_retry_for(optd_sharded *s, long ms)
{
    s->retry_for_ms = ms < 0 ? 0 : ms;
}

typedef struct {
    const void *grad;
    const double *loss;
    const optd_step_opts *opts; /* the whole model's; may be NULL            */
    bool want_params;
    optd_error *errs;
    int *rc;
} step_job;

/* The values of shard i's groups, from the whole model's (NULL stays
 * NULL).  A new array, or NULL when out of memory (*oom set). */
static double *shard_groups(const optd_sharded *s, size_t i, const double *all, bool *oom)
{
    if (!all)
        return NULL;
    double *v = malloc((s->n_groups[i] ? s->n_groups[i] : 1) * sizeof *v);
    if (!v) {
        *oom = true;
        return NULL;
    }
    for (size_t g = 0; g < s->n_groups[i]; g++)
        v[g] = all[s->groups[i][g]];
    return v;
}

static void step_one(optd_sharded *s, size_t i, void *arg)
{
    step_job *j = arg;
    char key[SHARD_KEY_MAX + 24];
    snprintf(key, sizeof key, "%s.%zu", s->key, i);
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = key;
    o.grad_norm = s->norm_type != 0 ? &s->norm : NULL;
    o.wire = OPTD_WIRE_FULL;
    bool oom = false;
    if (j->opts) {
        o.base_step = j->opts->base_step;
        o.worker = j->opts->worker;
        if (j->opts->n_groups) {
            o.n_groups = s->n_groups[i];
            o.group_lr = shard_groups(s, i, j->opts->group_lr, &oom);
            o.group_momentum = shard_groups(s, i, j->opts->group_momentum, &oom);
            o.group_beta1 = shard_groups(s, i, j->opts->group_beta1, &oom);
        }
    }
    if (oom) {
        shard_err(&j->errs[i], 0, NULL, "out of memory");
        j->rc[i] = -1;
        free((void *)o.group_lr);
        free((void *)o.group_momentum);
        free((void *)o.group_beta1);
        return;
    }
    size_t n = s->offs[i + 1] - s->offs[i];
    const char *g = (const char *)j->grad + s->offs[i] * s->esize;
    unsigned char *out = j->want_params ? s->answers + s->offs[i] * s->esize : NULL;
    long long step = -1;
    int rc = s->esize == 8
                 ? optd_step_f64_opts(s->clients[i], s->names[i], (const double *)g, n, j->loss,
                                      &o, (double *)out, &step, NULL, &j->errs[i])
                 : optd_step_f32_opts(s->clients[i], s->names[i], (const float *)g, n, j->loss,
                                      &o, (float *)out, &step, NULL, &j->errs[i]);
    free((void *)o.group_lr);
    free((void *)o.group_momentum);
    free((void *)o.group_beta1);
    if (rc == 0) {
        s->steps[i] = step;
        s->done[i] = true;
    } else if (rc == 1) {
        shard_err(&j->errs[i], 202, NULL, "shard %zu accepted the gradient without applying it", i);
    }
    j->rc[i] = rc;
}

static int sharded_step(optd_sharded *s, const void *grad, size_t n, size_t esize,
                        const double *loss, const optd_step_opts *opts, void *params_out,
                        long long *step_out, optd_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    const char *key = opts ? opts->idempotency_key : NULL;
    if (opts && (opts->json || opts->n_absent || opts->grad_norm || opts->params_len ||
                 (opts->wire != OPTD_WIRE_DEFAULT && opts->wire != OPTD_WIRE_FULL))) {
        shard_err(err, 0, NULL, "a sharded step takes a key, base_step, worker and group values; "
                                "not json, absent tensors, a wire form, grad_norm or params_len");
        return -1;
    }
    if (opts && opts->n_groups && opts->n_groups != s->n_model_groups) {
        shard_err(err, 0, "groups", "%zu group values for a model of %zu groups", opts->n_groups,
                  s->n_model_groups);
        return -1;
    }
    if (esize != s->esize) {
        shard_err(err, 0, "dtype", "the sharded session is %s", s->esize == 8 ? "float64" : "float32");
        return -1;
    }
    if (n != optd_sharded_size(s) || !grad) {
        shard_err(err, 0, "grad", "a gradient of %zu elements for a sharded session of %zu", n,
                  optd_sharded_size(s));
        return -1;
    }
    /* (without clipping by norm, the 2-norm: only its finiteness counts) */
    int finite;
    double norm = grad_norm(esize == 8 ? OPTIM_F64 : OPTIM_F32, grad, s->sizes, s->n_sizes,
                            s->norm_type != 0 ? s->norm_type : 2.0, &finite);
    if (!finite) {
        shard_err(err, 0, "grad", "the gradient has NaN or Inf elements: nothing was sent");
        return -1;
    }
    char fresh[33];
    if (!key) {
        if (optd_new_idempotency_key(fresh)) {
            shard_err(err, 0, NULL, "getrandom failed: no idempotency key");
            return -1;
        }
        key = fresh;
    }
    if (strlen(key) > 180) {
        shard_err(err, 0, "Idempotency-Key", "keys of up to 180 characters leave room for the shards' suffixes");
        return -1;
    }
    if (s->pending && strcmp(s->key, key) != 0) {
        shard_err(err, 0, "Idempotency-Key",
                  "sharded step %s is unfinished on some shards: step again with its key first",
                  s->key);
        return -1;
    }
    if (s->pending && memcmp(&s->norm, &norm, sizeof norm) != 0) {
        shard_err(err, 0, "grad", "sharded step %s is being retried with another gradient", key);
        return -1;
    }
    if (!s->pending) {
        snprintf(s->key, sizeof s->key, "%s", key);
        s->norm = norm;
        memset(s->done, 0, s->k * sizeof *s->done);
    }
    bool *want = calloc(s->k, sizeof *want);
    optd_error *errs = calloc(s->k, sizeof *errs);
    int *rc = calloc(s->k, sizeof *rc);
    int ret = -1;
    if (!want || !errs || !rc) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    /* Rounds: every shard not done, at once; the ones that failed
     * transiently (no answer, 502, 503, 504) again, alone, until the retry
     * window closes. */
    long long deadline = now_ms() + s->retry_for_ms;
    long wait = 100;
    for (;;) {
        size_t n_want = 0;
        for (size_t i = 0; i < s->k; i++)
            n_want += (want[i] = !s->done[i]);
        if (!n_want)
            break;
        /* The answers are kept for a retry, so params are always asked for. */
        step_job j = {grad, loss, opts, true, errs, rc};
        if (each_shard(s, want, step_one, &j)) {
            shard_err(err, 0, NULL, "out of memory");
            goto done;
        }
        size_t bad = s->k;
        bool retry = true;
        for (size_t i = 0; i < s->k; i++)
            if (want[i] && rc[i]) {
                int st = errs[i].status;
                retry = retry && (st == 0 || st == 502 || st == 503 || st == 504);
                if (bad == s->k)
                    bad = i;
            }
        if (bad == s->k)
            continue;
        if (!retry || now_ms() + wait > deadline) {
            if (err) {
                *err = errs[bad];
                char d[sizeof err->detail];
                snprintf(d, sizeof d, "shard %zu: %.480s", bad, errs[bad].detail);
                memcpy(err->detail, d, sizeof d);
            }
            goto done;
        }
        struct timespec ts = {wait / 1000, (wait % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        wait = wait >= 1000 ? 2000 : wait * 2;
    }
    for (size_t i = 1; i < s->k; i++)
        if (s->steps[i] != s->steps[0]) {
            shard_err(err, 0, NULL, "the shards are at different steps (%lld, %lld)",
                      s->steps[0], s->steps[i]);
            goto done;
        }
    if (params_out)
        memcpy(params_out, s->answers, n * esize);
    if (step_out)
        *step_out = s->steps[0];
    ret = 0;
done:
    /* A failed step stays pending when some shards applied it and others
     * did not. */
    {
        size_t n_done = 0;
        for (size_t i = 0; i < s->k; i++)
            n_done += s->done[i];
        s->pending = ret && n_done > 0 && n_done < s->k;
    }
    free(want);
    free(errs);
    free(rc);
    return ret;
}

int optd_sharded_step_f32(optd_sharded *s, const float *grad, size_t n, const double *loss,
                          const char *key, float *params_out, long long *step_out,
                          optd_error *err)
{
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = key;
    return sharded_step(s, grad, n, 4, loss, &o, params_out, step_out, err);
}

int optd_sharded_step_f32_opts(optd_sharded *s, const float *grad, size_t n,
                               const double *loss, const optd_step_opts *opts,
                               float *params_out, long long *step_out, optd_error *err)
{
    return sharded_step(s, grad, n, 4, loss, opts, params_out, step_out, err);
}

int optd_sharded_step_f64(optd_sharded *s, const double *grad, size_t n, const double *loss,
                          const char *key, double *params_out, long long *step_out,
                          optd_error *err)
{
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = key;
    return sharded_step(s, grad, n, 8, loss, &o, params_out, step_out, err);
}

int optd_sharded_step_f64_opts(optd_sharded *s, const double *grad, size_t n,
                               const double *loss, const optd_step_opts *opts,
                               double *params_out, long long *step_out, optd_error *err)
{
    return sharded_step(s, grad, n, 8, loss, opts, params_out, step_out, err);
}

/* ------------------------------------------- update, params, delete */

typedef struct {
    const char *patch;
    const void *params;
    optd_error *errs;
    int *rc;
} every_job;

static void update_one(optd_sharded *s, size_t i, void *arg)
{
    every_job *j = arg;
    j->rc[i] = optd_update(s->clients[i], s->names[i], j->patch, &j->errs[i]);
}

static void set_params_one(optd_sharded *s, size_t i, void *arg)
{
    every_job *j = arg;
    size_t n = s->offs[i + 1] - s->offs[i];
    const char *p = (const char *)j->params + s->offs[i] * s->esize;
    j->rc[i] = s->esize == 8 ? optd_set_params_f64_wire(s->clients[i], s->names[i],
                                                        (const double *)p, n, OPTD_WIRE_FULL,
                                                        &j->errs[i])
                             : optd_set_params_f32_wire(s->clients[i], s->names[i],
                                                        (const float *)p, n, OPTD_WIRE_FULL,
                                                        &j->errs[i]);
}

static void delete_one(optd_sharded *s, size_t i, void *arg)
{
    every_job *j = arg;
    j->rc[i] = optd_delete(s->clients[i], s->names[i], &j->errs[i]);
}

/* f on every shard at once; the first failure's error (its detail naming
 * the shard) in err.  0 or -1. */
static int on_every_shard(optd_sharded *s, void (*f)(optd_sharded *, size_t, void *),
                          const char *patch, const void *params, optd_error *err)
{
    optd_error *errs = calloc(s->k, sizeof *errs);
    int *rc = calloc(s->k, sizeof *rc);
    every_job j = {patch, params, errs, rc};
    int ret = -1;
    if (!errs || !rc || each_shard(s, NULL, f, &j)) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < s->k; i++)
        if (rc[i]) {
            if (err) {
                *err = errs[i];
                char d[sizeof err->detail];
                snprintf(d, sizeof d, "shard %zu: %.480s", i, errs[i].detail);
                memcpy(err->detail, d, sizeof d);
            }
            goto done;
        }
    ret = 0;
done:
    free(errs);
    free(rc);
    return ret;
}

int optd_sharded_update(optd_sharded *s, const char *patch_json, optd_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    cJSON *pj = patch_json ? cJSON_Parse(patch_json) : NULL;
    bool meta = pj && cJSON_GetObjectItemCaseSensitive(pj, "metadata");
    cJSON_Delete(pj);
    if (meta) {
        shard_err(err, 0, "metadata", "the shards' metadata keeps their places: change it shard "
                                      "by shard");
        return -1;
    }
    if (on_every_shard(s, update_one, patch_json, NULL, err))
        return -1;
    /* the clip may have changed: read it again */
    char *doc = optd_get_session(s->clients[0], s->names[0], err);
    cJSON *dj = doc ? cJSON_Parse(doc) : NULL;
    free(doc);
    int rc = dj ? read_clip(s, dj, err) : -1;
    if (doc && !dj)
        shard_err(err, 0, NULL, "shard 0: an undecodable session document");
    cJSON_Delete(dj);
    return rc;
}

static int sharded_set_params(optd_sharded *s, const void *params, size_t n, size_t esize,
                              optd_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    if (esize != s->esize || n != optd_sharded_size(s) || !params) {
        shard_err(err, 0, "params", "%zu elements of %zu bytes for a sharded session of %zu of %zu",
                  n, esize, optd_sharded_size(s), s->esize);
        return -1;
    }
    return on_every_shard(s, set_params_one, NULL, params, err);
}

int optd_sharded_set_params_f32(optd_sharded *s, const float *params, size_t n, optd_error *err)
{
    return sharded_set_params(s, params, n, 4, err);
}

int optd_sharded_set_params_f64(optd_sharded *s, const double *params, size_t n,
                                optd_error *err)
{
    return sharded_set_params(s, params, n, 8, err);
}

int optd_sharded_delete(optd_sharded *s, optd_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    return on_every_shard(s, delete_one, NULL, NULL, err);
}

/* ----------------------------------------------------------- params */

typedef struct {
    unsigned char *out;
    long long *steps;
    optd_error *errs;
    int *rc;
} params_job;

static void params_one(optd_sharded *s, size_t i, void *arg)
{
    params_job *j = arg;
    size_t n = s->offs[i + 1] - s->offs[i];
    unsigned char *o = j->out + s->offs[i] * s->esize;
    j->rc[i] = s->esize == 8 ? optd_get_params_f64_wire(s->clients[i], s->names[i], (double *)o,
                                                        n, OPTD_WIRE_FULL, &j->steps[i],
                                                        &j->errs[i])
                             : optd_get_params_f32_wire(s->clients[i], s->names[i], (float *)o,
                                                        n, OPTD_WIRE_FULL, &j->steps[i],
                                                        &j->errs[i]);
}

static int sharded_params(optd_sharded *s, void *out, size_t n, size_t esize,
                          long long *steps_out, optd_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    if (esize != s->esize || n != optd_sharded_size(s) || !out) {
        shard_err(err, 0, NULL, "%zu elements of %zu bytes for a sharded session of %zu of %zu",
                  n, esize, optd_sharded_size(s), s->esize);
        return -1;
    }
    long long *steps = calloc(s->k, sizeof *steps);
    optd_error *errs = calloc(s->k, sizeof *errs);
    int *rc = calloc(s->k, sizeof *rc);
    int ret = -1;
    params_job j = {out, steps, errs, rc};
    if (!steps || !errs || !rc || each_shard(s, NULL, params_one, &j)) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < s->k; i++)
        if (rc[i]) {
            if (err)
                *err = errs[i];
            goto done;
        }
    if (steps_out)
        memcpy(steps_out, steps, s->k * sizeof *steps);
    ret = 0;
done:
    free(steps);
    free(errs);
    free(rc);
    return ret;
}

int optd_sharded_params_f32(optd_sharded *s, float *out, size_t n, long long *steps_out,
                            optd_error *err)
{
    return sharded_params(s, out, n, 4, steps_out, err);
}

int optd_sharded_params_f64(optd_sharded *s, double *out, size_t n, long long *steps_out,
                            optd_error *err)
{
    return sharded_params(s, out, n, 8, steps_out, err);
}
