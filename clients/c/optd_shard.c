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
    double norm_type;
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
    if (!s->clients || !s->names || !s->offs || !s->done || !s->steps)
        goto oom;
    for (size_t i = 0; i < k; i++) {
        s->clients[i] = clients[i];
        if (!(s->names[i] = malloc(SHARD_NAME_MAX)))
            goto oom;
        snprintf(s->names[i], SHARD_NAME_MAX, "%s.shard%zu", name, i);
    }
    s->norm_type = 2.0;
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

/* Fills offsets, layout, dtype and the clip's norm from the shards'
 * session documents.  0 or -1. */
static int read_layout(optd_sharded *s, cJSON *const *docs, optd_error *err)
{
    size_t nt = 0;
    bool plain = true;
    for (size_t i = 0; i < s->k; i++) {
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(docs[i], "tensors");
        const cJSON *t0 = cJSON_GetArrayItem(ts, 0);
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(t0, "name");
        if (cJSON_GetArraySize(ts) != 1 || !cJSON_IsString(nm) || strcmp(nm->valuestring, "params"))
            plain = false;
        nt += (size_t)cJSON_GetArraySize(ts);
    }
    s->sizes = calloc(nt ? nt : 1, sizeof *s->sizes);
    if (!s->sizes) {
        shard_err(err, 0, NULL, "out of memory");
        return -1;
    }
    const char *dt0 = NULL;
    for (size_t i = 0; i < s->k; i++) {
        const cJSON *size = cJSON_GetObjectItemCaseSensitive(docs[i], "size");
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(docs[i], "dtype");
        if (!cJSON_IsNumber(size) || size->valuedouble < 1 || !cJSON_IsString(dt)) {
            shard_err(err, 0, NULL, "shard %zu: a session document without size or dtype", i);
            return -1;
        }
        if (!dt0)
            dt0 = dt->valuestring;
        if (strcmp(dt0, dt->valuestring)) {
            shard_err(err, 0, NULL, "shard %zu is %s, shard 0 is %s", i, dt->valuestring, dt0);
            return -1;
        }
        s->offs[i + 1] = s->offs[i] + (size_t)size->valuedouble;
        const cJSON *t;
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(docs[i], "tensors"))
        {
            const cJSON *ts = cJSON_GetObjectItemCaseSensitive(t, "size");
            s->sizes[s->n_sizes++] = cJSON_IsNumber(ts) ? (size_t)ts->valuedouble : 0;
        }
    }
    if (plain) { /* without a layout the whole vector is one tensor */
        s->sizes[0] = s->offs[s->k];
        s->n_sizes = 1;
    }
    s->esize = strcmp(dt0, "float64") == 0 ? 8 : 4;
    const cJSON *clip = cJSON_GetObjectItemCaseSensitive(docs[0], "clip");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(clip, "type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "norm") == 0) {
        const cJSON *nt_ = cJSON_GetObjectItemCaseSensitive(clip, "norm_type");
        if (cJSON_IsNumber(nt_))
            s->norm_type = nt_->valuedouble;
        else if (cJSON_IsString(nt_) && strcmp(nt_->valuestring, "inf") == 0)
            s->norm_type = INFINITY;
    }
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

/* Shard bodies: the shared body with its own "params" (or "size"),
 * "tensors" and "groups".  docs[i] are new (caller deletes). */
static int split_config(optd_sharded *s, const cJSON *root, cJSON **docs, optd_error *err)
{
    size_t k = s->k;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(root, "params");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(root, "size");
    const cJSON *init = cJSON_GetObjectItemCaseSensitive(root, "init");
    const cJSON *tensors = cJSON_GetObjectItemCaseSensitive(root, "tensors");
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(root, "groups");
    const cJSON *itype = cJSON_GetObjectItemCaseSensitive(init, "type");
    if (init && !(cJSON_IsString(itype) && strcmp(itype->valuestring, "zeros") == 0)) {
        shard_err(err, 0, "init", "a sharded session takes params or a zeros init: a seeded init "
                                  "would draw every shard's own numbers");
        return -1;
    }
    size_t n = cJSON_IsArray(params) ? (size_t)cJSON_GetArraySize(params)
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
            e *= cJSON_IsNumber(d) && d->valuedouble > 0 ? (size_t)d->valuedouble : 0;
            tsz[t++] = e;
            total += e;
        }
        if (nt < k) {
            shard_err(err, 0, "tensors", "%zu tensors cannot be split over %zu shards", nt, k);
            goto done;
        }
        if (n && n != total) {
            shard_err(err, 0, "params", "the tensors hold %zu elements, the params %zu", total, n);
            goto done;
        }
        n = total;
        /* run i ends at the first boundary at or past (i+1)/k of the
         * elements, leaving a tensor to each later run */
        size_t acc = 0;
        t = 0;
        for (size_t i = 0; i + 1 < k; i++) {
            double target = (double)total * (double)(i + 1) / (double)k;
            acc += tsz[t++];
            while (t < nt - (k - 1 - i) && (double)acc < target)
                acc += tsz[t++];
            cut[i + 1] = t;
        }
        cut[k] = nt;
        for (size_t i = 0; i < k; i++) {
            s->offs[i + 1] = s->offs[i];
            for (size_t j = cut[i]; j < cut[i + 1]; j++)
                s->offs[i + 1] += tsz[j];
        }
    } else {
        if (n < k) {
            shard_err(err, 0, "params", "%zu params cannot be split over %zu shards", n, k);
            goto done;
        }
        for (size_t i = 0; i < k; i++)
            s->offs[i + 1] = s->offs[i] + n / k + (i < n % k ? 1 : 0);
    }
    for (size_t i = 0; i < k; i++) {
        cJSON *d = docs[i] = cJSON_Duplicate(root, 1);
        if (!d)
            goto oom;
        cJSON_DeleteItemFromObjectCaseSensitive(d, "params");
        cJSON_DeleteItemFromObjectCaseSensitive(d, "size");
        cJSON_DeleteItemFromObjectCaseSensitive(d, "tensors");
        cJSON_DeleteItemFromObjectCaseSensitive(d, "groups");
        if (cJSON_IsArray(params)) {
            cJSON *a = cJSON_AddArrayToObject(d, "params");
            if (!a)
                goto oom;
            size_t j = 0;
            const cJSON *v;
            cJSON_ArrayForEach(v, params)
            {
                if (j >= s->offs[i] && j < s->offs[i + 1] &&
                    !cJSON_AddItemToArray(a, cJSON_CreateNumber(v->valuedouble)))
                    goto oom;
                j++;
            }
        } else if (!nt && !cJSON_AddNumberToObject(d, "size", (double)(s->offs[i + 1] - s->offs[i]))) {
            goto oom;
        }
        if (nt) {
            cJSON *ta = cJSON_AddArrayToObject(d, "tensors");
            if (!ta)
                goto oom;
            for (size_t j = cut[i]; j < cut[i + 1]; j++) {
                cJSON *dup = cJSON_Duplicate(cJSON_GetArrayItem(tensors, (int)j), 1);
                if (!dup || !cJSON_AddItemToArray(ta, dup))
                    goto oom;
            }
            cJSON *ga = NULL;
            const cJSON *G;
            cJSON_ArrayForEach(G, groups)
            {
                cJSON *g = cJSON_Duplicate(G, 1);
                cJSON *gt = cJSON_CreateArray();
                if (!g || !gt) {
                    cJSON_Delete(g);
                    cJSON_Delete(gt);
                    goto oom;
                }
                const cJSON *nm;
                cJSON_ArrayForEach(nm, cJSON_GetObjectItemCaseSensitive(G, "tensors"))
                {
                    for (size_t j = cut[i]; j < cut[i + 1] && cJSON_IsString(nm); j++) {
                        const cJSON *tn = cJSON_GetObjectItemCaseSensitive(
                            cJSON_GetArrayItem(tensors, (int)j), "name");
                        if (cJSON_IsString(tn) && strcmp(tn->valuestring, nm->valuestring) == 0)
                            cJSON_AddItemToArray(gt, cJSON_CreateString(nm->valuestring));
                    }
                }
                if (cJSON_GetArraySize(gt) == 0) {
                    cJSON_Delete(g);
                    cJSON_Delete(gt);
                    continue;
                }
                cJSON_ReplaceItemInObjectCaseSensitive(g, "tensors", gt);
                if (!ga && !(ga = cJSON_AddArrayToObject(d, "groups"))) {
                    cJSON_Delete(g);
                    goto oom;
                }
                cJSON_AddItemToArray(ga, g);
            }
        }
        if (exact_numbers(d))
            goto oom;
    }
    ret = 0;
    goto done;
oom:
    shard_err(err, 0, NULL, "out of memory");
done:
    free(tsz);
    free(cut);
    return ret;
}

typedef struct {
    char **bodies;
    optd_error *errs;
    int *rc;
} create_job;

static void create_one(optd_sharded *s, size_t i, void *arg)
{
    create_job *j = arg;
    j->rc[i] = optd_create_session(s->clients[i], s->names[i], j->bodies[i], &j->errs[i]) < 0;
}

optd_sharded *optd_sharded_create(optd_client *const *clients, size_t k, const char *name,
                                  const char *config_json, optd_error *err)
{
    optd_sharded *s = sharded_new(clients, k, name, err);
    if (!s)
        return NULL;
    cJSON *root = config_json ? cJSON_Parse(config_json) : NULL;
    cJSON **docs = calloc(k, sizeof *docs);
    char **bodies = calloc(k, sizeof *bodies);
    optd_error *errs = calloc(k, sizeof *errs);
    int *rc = calloc(k, sizeof *rc);
    int ret = -1;
    if (!docs || !bodies || !errs || !rc) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    if (!cJSON_IsObject(root)) {
        shard_err(err, 0, NULL, "the create body is not a JSON object");
        goto done;
    }
    if (split_config(s, root, docs, err))
        goto done;
    for (size_t i = 0; i < k; i++)
        if (!(bodies[i] = cJSON_PrintUnformatted(docs[i]))) {
            shard_err(err, 0, NULL, "out of memory");
            goto done;
        }
    create_job j = {bodies, errs, rc};
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
    /* the offsets the daemons hold are the ones to trust */
    memset(s->offs, 0, (k + 1) * sizeof *s->offs);
    ret = open_all(s, err);
done:
    for (size_t i = 0; i < k; i++) {
        if (docs)
            cJSON_Delete(docs[i]);
        if (bodies)
            free(bodies[i]);
    }
    free(docs);
    free(bodies);
    free(errs);
    free(rc);
    cJSON_Delete(root);
    if (ret) {
        optd_sharded_free(s);
        return NULL;
    }
    return s;
}

/* ------------------------------------------------------------ steps */

typedef struct {
    const void *grad;
    const double *loss;
    bool want_params;
    optd_error *errs;
    int *rc;
} step_job;

static void step_one(optd_sharded *s, size_t i, void *arg)
{
    step_job *j = arg;
    char key[SHARD_KEY_MAX + 24];
    snprintf(key, sizeof key, "%s.%zu", s->key, i);
    optd_step_opts o = optd_step_opts_default();
    o.idempotency_key = key;
    o.grad_norm = &s->norm;
    o.wire = OPTD_WIRE_FULL;
    size_t n = s->offs[i + 1] - s->offs[i];
    const char *g = (const char *)j->grad + s->offs[i] * s->esize;
    unsigned char *out = j->want_params ? s->answers + s->offs[i] * s->esize : NULL;
    long long step = -1;
    int rc = s->esize == 8
                 ? optd_step_f64_opts(s->clients[i], s->names[i], (const double *)g, n, j->loss,
                                      &o, (double *)out, &step, NULL, &j->errs[i])
                 : optd_step_f32_opts(s->clients[i], s->names[i], (const float *)g, n, j->loss,
                                      &o, (float *)out, &step, NULL, &j->errs[i]);
    if (rc == 0) {
        s->steps[i] = step;
        s->done[i] = true;
    } else if (rc == 1) {
        shard_err(&j->errs[i], 202, NULL, "shard %zu accepted the gradient without applying it", i);
    }
    j->rc[i] = rc;
}

static int sharded_step(optd_sharded *s, const void *grad, size_t n, size_t esize,
                        const double *loss, const char *key, void *params_out,
                        long long *step_out, optd_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    if (esize != s->esize) {
        shard_err(err, 0, "dtype", "the sharded session is %s", s->esize == 8 ? "float64" : "float32");
        return -1;
    }
    if (n != optd_sharded_size(s) || !grad) {
        shard_err(err, 0, "grad", "a gradient of %zu elements for a sharded session of %zu", n,
                  optd_sharded_size(s));
        return -1;
    }
    int finite;
    double norm = grad_norm(esize == 8 ? OPTIM_F64 : OPTIM_F32, grad, s->sizes, s->n_sizes,
                            s->norm_type, &finite);
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
        s->pending = true;
    }
    bool *want = calloc(s->k, sizeof *want);
    optd_error *errs = calloc(s->k, sizeof *errs);
    int *rc = calloc(s->k, sizeof *rc);
    int ret = -1;
    if (!want || !errs || !rc) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < s->k; i++)
        want[i] = !s->done[i];
    /* The answers are kept for a retry, so params are always asked for. */
    step_job j = {grad, loss, true, errs, rc};
    if (each_shard(s, want, step_one, &j)) {
        shard_err(err, 0, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < s->k; i++)
        if (want[i] && rc[i]) {
            if (err) {
                *err = errs[i];
                char d[sizeof err->detail];
                snprintf(d, sizeof d, "shard %zu: %.480s", i, errs[i].detail);
                memcpy(err->detail, d, sizeof d);
            }
            goto done;
        }
    s->pending = false;
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
    free(want);
    free(errs);
    free(rc);
    return ret;
}

int optd_sharded_step_f32(optd_sharded *s, const float *grad, size_t n, const double *loss,
                          const char *key, float *params_out, long long *step_out,
                          optd_error *err)
{
    return sharded_step(s, grad, n, 4, loss, key, params_out, step_out, err);
}

int optd_sharded_step_f64(optd_sharded *s, const double *grad, size_t n, const double *loss,
                          const char *key, double *params_out, long long *step_out,
                          optd_error *err)
{
    return sharded_step(s, grad, n, 8, loss, key, params_out, step_out, err);
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
