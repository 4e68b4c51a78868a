/*
 * handlers.c -- one function per route of api_routes.  Each returns after
 * filling the reply; errors go through api_problem (problem+json) and leave
 * the session exactly as it was.
 */
#include "server/observe.h"
#include "server/server.h"

#include <cjson/cJSON.h>
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define IDEM_KEEP_MS (24LL * 3600 * 1000)
#define IDEM_KEEP_KEYS 10000
#define IDEM_PRUNE_EVERY 1000
#define LIST_DEFAULT 100
#define LIST_MAX 1000

static int reply_json_text(api_reply *r, int status, char *text)
{
    if (!text)
        return api_problem(r, 503, NULL, "out of memory");
    api_reply_body(r, status, "application/json", text, strlen(text));
    return status;
}

static int reply_cjson(api_reply *r, int status, cJSON *doc)
{
    char *s = doc ? cJSON_PrintUnformatted(doc) : NULL;
    cJSON_Delete(doc);
    if (!s)
        return api_problem(r, 503, NULL, "out of memory");
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d)
        memcpy(d, s, n + 1);
    cJSON_free(s);
    return reply_json_text(r, status, d);
}

/* cJSON_AddItemTo* leave the item to the caller when they fail (out of
 * memory copying the key): it is freed here instead of leaking. */
static void add_item(cJSON *obj, const char *key, cJSON *item)
{
    if (!cJSON_AddItemToObject(obj, key, item))
        cJSON_Delete(item);
}

static void add_elem(cJSON *arr, cJSON *item)
{
    if (!cJSON_AddItemToArray(arr, item))
        cJSON_Delete(item);
}

static cJSON *raw_double(double x)
{
    char tmp[40];
    if (!isfinite(x))
        return cJSON_CreateNull();
    snprintf(tmp, sizeof tmp, "%.17g", x);
    return cJSON_CreateRaw(tmp);
}

static cJSON *raw_int(int64_t x)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%lld", (long long)x);
    return cJSON_CreateRaw(tmp);
}

/* RFC 3339 UTC with milliseconds. */
static cJSON *timestamp(int64_t ms)
{
    char tmp[96];
    time_t sec = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    snprintf(tmp, sizeof tmp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    return cJSON_CreateString(tmp);
}

int srv_engine_fail(api_reply *r, int err, const char *what)
{
    const char *msg = storage_last_error();
    if (!msg[0])
        msg = eng_strerror(err);
    switch (err) {
    case STORAGE_EFULL:
        srv_log(SRV_LOG_ERROR, "%s failed: disk full: %s", what, msg);
        return api_problem(r, 503, NULL, "disk full during %s (%s); nothing was changed: free "
                                         "space and retry", what, msg);
    case STORAGE_EGONE:
        srv_log(SRV_LOG_ERROR, "%s refused: THE DATABASE FILE WAS DELETED OR REPLACED: %s; no "
                               "write is acknowledged until optd is restarted", what, msg);
        return api_problem(r, 503, NULL, "the database file was deleted or replaced under optd; "
                                         "nothing was changed and no write will be acknowledged "
                                         "until the daemon is restarted (%s)", msg);
    case STORAGE_ECORRUPT:
    case ENG_EDAMAGED:
        srv_log(SRV_LOG_ERROR, "%s: stored state is damaged: %s", what, msg);
        return api_problem(r, 500, NULL, "the session's stored state is damaged (%s); it is not "
                                         "served; other sessions are unaffected", msg);
    case STORAGE_ENOMEM:
        srv_log(SRV_LOG_ERROR, "%s failed: out of memory", what);
        return api_problem(r, 503, NULL, "out of memory during %s; nothing was changed", what);
    default:
        srv_log(SRV_LOG_ERROR, "%s failed (%s): %s", what, eng_strerror(err), msg);
        return api_problem(r, 503, NULL, "storage failure during %s: %s; nothing was changed",
                           what, msg);
    }
}

/* The session document: its config with every default, plus live state. */
static cJSON *session_doc(const eng_session *s)
{
    char *cfg = api_config_to_json(&s->cfg);
    cJSON *doc = cfg ? cJSON_Parse(cfg) : NULL;
    free(cfg);
    if (!doc)
        return NULL;
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "name", s->name);
    add_item(out, "step", raw_int((int64_t)s->st.step));
    add_item(out, "lr", raw_double(eng_next_lr(s)));
    cJSON *item = doc->child;
    while (item) {
        cJSON *next = item->next;
        cJSON_DetachItemViaPointer(doc, item);
        add_item(out, item->string, item);
        item = next;
    }
    cJSON_Delete(doc);
    /* The layout, always: each tensor's place, each group's effective
     * hyperparameters and current lr. */
    cJSON_DeleteItemFromObjectCaseSensitive(out, "tensors");
    cJSON_DeleteItemFromObjectCaseSensitive(out, "groups");
    cJSON *ts = cJSON_AddArrayToObject(out, "tensors");
    for (size_t i = 0; i < s->cfg.n_tensors; i++) {
        const api_tensor *T = &s->cfg.tensors[i];
        cJSON *t = cJSON_CreateObject();
        cJSON_AddStringToObject(t, "name", T->name);
        cJSON *sh = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < T->ndim; d++)
            add_elem(sh, raw_int(T->shape[d]));
        add_item(t, "offset", raw_int((int64_t)T->offset));
        add_item(t, "size", raw_int((int64_t)T->size));
        add_item(t, "step", raw_int((int64_t)s->tst[i].step));
        add_elem(ts, t);
    }
    cJSON *gs = cJSON_AddArrayToObject(out, "groups");
    for (size_t g = 0; g < s->cfg.n_groups; g++) {
        const api_group *G = &s->cfg.groups[g];
        cJSON *o = cJSON_CreateObject();
        cJSON *names = cJSON_AddArrayToObject(o, "tensors");
        for (size_t k = 0; k < G->n_tensors; k++)
            add_elem(names, cJSON_CreateString(s->cfg.tensors[G->tensors[k]].name));
        /* The group's hyperparameters as its next update uses them, with
         * its base lr (before the schedule); "lr" below is the scheduled one. */
        optim_hparams cur, shown;
        eng_group_hparams(s, g, &cur);
        shown = cur;
        shown.lr = s->gcur[g].has[ENG_HP_LR] ? s->gcur[g].v[ENG_HP_LR] : G->opt.lr;
        char *cj = api_hparams_to_json(&shown);
        cJSON *oj = cj ? cJSON_Parse(cj) : NULL;
        free(cj);
        if (oj)
            add_item(o, "optimizer", oj);
        add_item(o, "lr", raw_double(cur.lr));
        add_elem(gs, o);
    }
    cJSON *state = cJSON_AddObjectToObject(out, "state");
    cJSON *bufs = cJSON_AddArrayToObject(state, "buffers");
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            add_elem(bufs, cJSON_CreateString(optim_buffer_name(s->cfg.opt.kind, i)));
    add_item(state, "last_lr", raw_double(s->last_lr));
    add_item(state, "last_loss", raw_double(s->last_loss));
    add_item(state, "pending_accumulation", raw_int(s->accum_count));
    if (s->cfg.mode.type == API_MODE_SYNC) {
        /* The open round: who has sent, how many are awaited. */
        cJSON *round = cJSON_AddObjectToObject(out, "round");
        add_item(round, "step", raw_int((int64_t)s->st.step));
        add_item(round, "received", raw_int(s->round_count));
        add_item(round, "awaiting", raw_int(s->cfg.mode.workers - s->round_count));
        cJSON *ws = cJSON_AddArrayToObject(round, "workers");
        for (int64_t i = 0; i < s->round_count; i++)
            add_elem(ws, cJSON_CreateString(s->round_workers[i]));
    }
    cJSON *cnt = cJSON_AddObjectToObject(out, "counters");
    add_item(cnt, "applied", raw_int(s->n_applied));
    add_item(cnt, "rejected_stale", raw_int(s->n_stale));
    add_item(cnt, "timed_out", raw_int(s->n_timeout));
    add_item(cnt, "skipped_nonfinite", raw_int(s->n_skipped));
    add_item(out, "created_at", timestamp(s->created_ms));
    add_item(out, "updated_at", timestamp(s->updated_ms));
    if (s->created_by[0])
        add_item(out, "created_by", cJSON_CreateString(s->created_by));
    return out;
}

static int reply_session(api_reply *r, int status, const eng_session *s)
{
    cJSON *doc = session_doc(s);
    return doc ? reply_cjson(r, status, doc) : api_problem(r, 503, NULL, "out of memory");
}

/* Binary params of this size or more stream from the session's buffer. */
#define STREAM_MIN_BYTES (4u << 20)

typedef struct {
    eng_pbuf *buf;              /* pinned: a step meanwhile updates a copy    */
    optim_dtype dtype;
    optim_wire wire;
    size_t n;
} params_stream;

static size_t stream_read(void *ctx, uint64_t pos, char *out, size_t max)
{
    params_stream *ps = ctx;
    size_t es = optim_wire_size(ps->wire), ds = optim_dtype_size(ps->dtype);
    size_t total = ps->n * es;
    if (pos >= total)
        return 0;
    /* Whole elements only. */
    size_t first = (size_t)pos / es, count = max / es;
    if (count == 0)
        return 0;
    if (count > ps->n - first)
        count = ps->n - first;
    eng_wire_copy(ps->dtype, (const char *)ps->buf->data + first * ds, ps->wire, out, count);
    return count * es;
}

static void stream_done(void *ctx)
{
    params_stream *ps = ctx;
    eng_params_unpin(ps->buf);
    free(ps);
}

int srv_reply_session(api_reply *r, int status, const eng_session *s)
{
    return reply_session(r, status, s);
}

/* {"step":t,"lr":x,"params":[...]} or the raw params (binary, in wire
 * form `wire`).  step is the step to report (a replay reports the step its
 * key applied); replayed adds "replayed":true. */
static int reply_params_at(api_reply *r, int status, const eng_session *s, bool want_binary,
                           int wire, uint64_t step, bool replayed, double lr, bool with_lr,
                           bool with_params)
{
    if (want_binary && with_params &&
        (size_t)s->cfg.size * optim_wire_size((optim_wire)wire) >= STREAM_MIN_BYTES) {
        /* Large params are sent from the session's own buffer, converted
         * chunk by chunk, without a copy of the whole vector. */
        params_stream *ps = malloc(sizeof *ps);
        if (!ps)
            return api_problem(r, 503, NULL, "out of memory");
        ps->buf = eng_params_pin((eng_session *)s);
        ps->dtype = s->cfg.dtype;
        ps->wire = (optim_wire)wire;
        ps->n = (size_t)s->cfg.size;
        r->status = status;
        r->content_type = "application/octet-stream";
        r->stream_read = stream_read;
        r->stream_done = stream_done;
        r->stream_ctx = ps;
        r->stream_len = (uint64_t)ps->n * optim_wire_size(ps->wire);
        api_reply_header(r, "Optd-Dtype", "%s", optim_wire_name((optim_wire)wire));
    } else if (want_binary) {
        size_t len = 0;
        char *b = with_params ? eng_params_wire(s, (optim_wire)wire, &len) : NULL;
        if (with_params && !b)
            return api_problem(r, 503, NULL, "out of memory");
        api_reply_body(r, status, "application/octet-stream", b, b ? len : 0);
        if (with_params)
            api_reply_header(r, "Optd-Dtype", "%s", optim_wire_name((optim_wire)wire));
    } else {
        api_buf b = {0};
        int rc = api_buf_printf(&b, "{\"step\":%llu", (unsigned long long)step);
        if (replayed)
            rc |= api_buf_put(&b, ",\"replayed\":true", 16);
        if (with_lr) {
            rc |= api_buf_put(&b, ",\"lr\":", 6);
            rc |= api_buf_double(&b, lr);
        }
        if (with_params) {
            rc |= api_buf_put(&b, ",\"params\":", 10);
            rc |= api_buf_vector(&b, s->cfg.dtype, s->params, (size_t)s->cfg.size);
        }
        rc |= api_buf_put(&b, "}", 1);
        if (rc) {
            free(b.data);
            return api_problem(r, 503, NULL, "out of memory");
        }
        api_reply_body(r, status, "application/json", b.data, b.len);
    }
    api_reply_header(r, "Optd-Step", "%llu", (unsigned long long)step);
    if (with_params)
        /* The params digest: CRC-32 of the params in the session's dtype,
         * little-endian (the layout in memory), whatever the answer's form. */
        api_reply_header(r, "Optd-Params-Crc32", "%08x",
                         (unsigned)storage_crc32(0, s->params,
                                                 (size_t)s->cfg.size *
                                                     optim_dtype_size(s->cfg.dtype)));
    if (with_lr && isfinite(lr))
        api_reply_header(r, "Optd-Lr", "%.17g", lr);
    if (replayed)
        api_reply_header(r, "Optd-Replayed", "true");
    return status;
}

int srv_reply_params(api_reply *r, int status, const eng_session *s, bool want_binary, int wire,
                     double lr, bool with_lr, bool with_params)
{
    return reply_params_at(r, status, s, want_binary, wire, s->st.step, false, lr, with_lr,
                           with_params);
}

/* The wire form of a binary answer: Optd-Params-Dtype, else the session's
 * dtype.  0 or the problem's status. */
static int answer_wire(const eng_session *s, const srv_request *req, int *wire, api_reply *r)
{
    const char *h = req->header(req->conn, "Optd-Params-Dtype");
    optim_wire w = s->cfg.dtype == OPTIM_F64 ? OPTIM_WIRE_F64 : OPTIM_WIRE_F32;
    if (h && optim_wire_parse(h, &w) != OPTIM_OK)
        return api_problem(r, 400, "Optd-Params-Dtype",
                           "Optd-Params-Dtype must be float32, float64, bfloat16 or float16");
    *wire = (int)w;
    return 0;
}

/* ------------------------------------------------------------ routes */

static int h_healthz(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)req;
    char *s = malloc(96);
    if (!s)
        return api_problem(r, 503, NULL, "out of memory");
    snprintf(s, 96, "{\"status\":\"ok\",\"hot_sessions\":%zu}",
             srv_registry_hot_count(ctx->reg));
    return reply_json_text(r, 200, s);
}

static int h_optimizers(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)ctx;
    (void)req;
    return reply_json_text(r, 200, api_catalogue_json());
}

static int h_list(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    const char *ls = req->query(req->conn, "limit");
    const char *after = req->query(req->conn, "after");
    long limit = LIST_DEFAULT;
    if (ls) {
        char *end;
        limit = strtol(ls, &end, 10);
        if (*ls == '\0' || *end || limit < 1 || limit > LIST_MAX)
            return api_problem(r, 400, "limit", "limit must be an integer from 1 to %d", LIST_MAX);
    }
    if (after && !api_name_valid(after, strlen(after)))
        return api_problem(r, 400, "after", "after must be a session name");
    storage_session_info *infos = calloc((size_t)limit, sizeof *infos);
    if (!infos)
        return api_problem(r, 503, NULL, "out of memory");
    /* A token sees the names of its prefix only. */
    const char *prefix = req->who && req->who->kind == SRV_WHO_TOKEN ? req->who->prefix : "";
    int n = prefix[0] ? storage_session_list_prefix(ctx->db, prefix, after, (int)limit, infos)
                      : storage_session_list(ctx->db, after, (int)limit, infos);
    if (n < 0) {
        free(infos);
        return srv_engine_fail(r, n, "listing sessions");
    }
    cJSON *doc = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(doc, "sessions");
    for (int i = 0; i < n; i++) {
        cJSON *cfg = cJSON_Parse(infos[i].config);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", infos[i].name);
        add_item(o, "step", raw_int(infos[i].step));
        if (cfg) {
            cJSON *opt = cJSON_GetObjectItem(cfg, "optimizer");
            add_item(o, "optimizer",
                                  cJSON_Duplicate(cJSON_GetObjectItem(opt, "type"), 1));
            add_item(o, "dtype", cJSON_Duplicate(cJSON_GetObjectItem(cfg, "dtype"), 1));
            add_item(o, "size", cJSON_Duplicate(cJSON_GetObjectItem(cfg, "size"), 1));
            cJSON_Delete(cfg);
        }
        add_item(o, "created_at", timestamp(infos[i].created_ms));
        add_item(o, "updated_at", timestamp(infos[i].updated_ms));
        if (infos[i].created_by)
            add_item(o, "created_by", cJSON_CreateString(infos[i].created_by));
        add_elem(arr, o);
    }
    if (n == limit)
        cJSON_AddStringToObject(doc, "next", infos[n - 1].name);
    else
        cJSON_AddNullToObject(doc, "next");
    for (int i = 0; i < n; i++)
        storage_session_info_free(&infos[i]);
    free(infos);
    return reply_cjson(r, 200, doc);
}

/* 200 when the stored config equals cfg, 409 otherwise. */
static int verify_existing(eng_session *s, const api_config *cfg, api_reply *r)
{
    char *want = api_config_to_json(cfg);
    char *have = api_config_to_json(&s->cfg);
    int same = want && have && strcmp(want, have) == 0;
    free(want);
    free(have);
    if (!same)
        return api_config_conflict(r, s->name, &s->cfg, cfg);
    return reply_session(r, 200, s);
}

static int h_put_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    api_config cfg;
    api_init init;
    void *params = NULL;
    int st = srv_fork(ctx, req, r); /* travel.c; 0 when the body has no fork */
    if (st)
        return st;
    st = api_decode_create(req->body, req->body_len, ctx->cfg->max_params, &cfg, &init,
                               &params, r);
    if (st)
        return st;
    eng_session *s = NULL;
    int err = srv_registry_acquire(ctx->reg, req->name, &s);
    if (err == STORAGE_OK) {
        st = verify_existing(s, &cfg, r);
        srv_registry_release(ctx->reg, s);
        goto out;
    }
    if (err != STORAGE_ENOTFOUND) {
        st = srv_engine_fail(r, err, "reading the session");
        goto out;
    }
    s = eng_session_new(req->name, &cfg, params, &init);
    if (!s) {
        st = api_problem(r, 503, NULL, "out of memory for a session of %llu params",
                         (unsigned long long)cfg.size);
        goto out;
    }
    err = srv_auth_create(ctx->db, req->who, s, srv_now_ms(), r);
    if (err == SRV_EQUOTA) {
        eng_session_free(s);
        st = 429;
        goto out;
    }
    if (err == STORAGE_EEXIST) {
        /* Another request created it meanwhile: verify against that one. */
        eng_session_free(s);
        err = srv_registry_acquire(ctx->reg, req->name, &s);
        if (err == STORAGE_OK) {
            st = verify_existing(s, &cfg, r);
            srv_registry_release(ctx->reg, s);
        } else {
            st = srv_engine_fail(r, err, "reading the session");
        }
        goto out;
    }
    if (err != STORAGE_OK) {
        eng_session_free(s);
        st = srv_engine_fail(r, err, "creating the session");
        goto out;
    }
    st = reply_session(r, 201, s);
    api_reply_header(r, "Location", "/v1/sessions/%s", req->name);
    srv_registry_insert(ctx->reg, s);
out:
    free(params);
    api_config_free(&cfg);
    return st;
}

static int acquire_or_reply(srv_ctx *ctx, const char *name, eng_session **s, api_reply *r)
{
    int err = srv_registry_acquire(ctx->reg, name, s);
    if (err == STORAGE_ENOTFOUND)
        return api_problem(r, 404, "name", "no session named %s", name);
    if (err != STORAGE_OK)
        return srv_engine_fail(r, err, "loading the session");
    return 0;
}

static int h_get_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    st = reply_session(r, 200, s);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_patch_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    api_config next;
    if (api_config_copy(&next, &s->cfg)) {
        srv_registry_release(ctx->reg, s);
        return api_problem(r, 503, NULL, "out of memory");
    }
    st = api_decode_patch(req->body, req->body_len, &next, r);
    if (!st && s->accum_count > 0 && next.mode.accumulate != s->cfg.mode.accumulate)
        st = api_problem(r, 409, "mode.accumulate",
                         "%lld gradients are pending accumulation; change accumulate after the "
                         "next update",
                         (long long)s->accum_count);
    if (st) {
        api_config_free(&next);
        srv_registry_release(ctx->reg, s);
        return st;
    }
    if (s->client_hp && (next.sched.kind != OPTIM_SCHED_NONE || next.sched.warmup_steps > 0)) {
        api_config_free(&next);
        srv_registry_release(ctx->reg, s);
        return api_problem(r, 409, "schedule",
                           "session %s takes its groups' lr and momentum from the client (a "
                           "step carried Optd-Group-* values); it cannot also have a "
                           "server-side schedule", s->name);
    }
    if (s->round_count > 0 && memcmp(&next.mode, &s->cfg.mode, sizeof next.mode) != 0)
        srv_sync_abort(ctx, s, 409, "the session's mode changed; the open round was dropped");
    bool sched_changed = memcmp(&next.sched, &s->cfg.sched, sizeof next.sched) != 0 ||
                         next.opt.lr != s->cfg.opt.lr;
    api_config old = s->cfg;
    optim_plateau old_plateau = s->plateau;
    s->cfg = next;
    if (sched_changed)
        optim_plateau_init(&s->cfg.sched, s->cfg.opt.lr, &s->plateau);
    /* The config's values now win over the client's current ones. */
    eng_config_changed(s);
    int err = eng_ensure_buffers(s) != ENG_OK ? STORAGE_ENOMEM : eng_checkpoint(ctx->db, s, true);
    if (err != STORAGE_OK) {
        /* Memory may hold new buffers: rebuild from disk on next use. */
        s->cfg = old;
        s->plateau = old_plateau;
        api_config_free(&next);
        srv_registry_drop(ctx->reg, s);
        srv_registry_release(ctx->reg, s);
        return srv_engine_fail(r, err, "saving the new config");
    }
    api_config_free(&old);
    obs_config_changed(s);
    st = reply_session(r, 200, s);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_delete_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    int err = storage_session_delete(ctx->db, req->name);
    if (err != STORAGE_OK && err != STORAGE_ENOTFOUND) {
        srv_registry_release(ctx->reg, s);
        return srv_engine_fail(r, err, "deleting the session");
    }
    srv_sync_abort(ctx, s, 404, "the session was deleted; the round was not applied");
    srv_registry_drop(ctx->reg, s);
    srv_registry_release(ctx->reg, s);
    api_reply_body(r, 204, "application/json", NULL, 0);
    return 204;
}

/* Decodes a gradient or params body.  A binary body in the session's
 * dtype is used where it lies, in the request's buffer (*vec points into
 * it, *owned is NULL); JSON and 16-bit bodies are decoded into a new
 * buffer (*owned, the caller frees).  With must_own the result is always a
 * new buffer (it is kept by the session). */
static int decode_vector(const eng_session *s, const srv_request *req, bool is_step, size_t n,
                         bool must_own, const void **vec, void **owned, api_step_meta *meta,
                         api_reply *r)
{
    size_t esz = optim_dtype_size(s->cfg.dtype);
    *vec = NULL;
    *owned = NULL;
    const char *what = is_step ? "grad" : "params";
    int st = 0;
    if (is_step) {
        /* Headers work with JSON bodies too; a body field wins over its header. */
        st = api_decode_step_headers(req->header(req->conn, "Optd-Loss"),
                                     req->header(req->conn, "Optd-Base-Step"),
                                     req->header(req->conn, "Optd-Worker"), meta, r);
        if (st)
            return st;
    }
    if (req->body_binary) {
        const char *dth = req->header(req->conn, "Optd-Dtype");
        optim_wire w = s->cfg.dtype == OPTIM_F64 ? OPTIM_WIRE_F64 : OPTIM_WIRE_F32;
        if (dth && optim_wire_parse(dth, &w) != OPTIM_OK)
            return api_problem(r, 400, "Optd-Dtype",
                               "Optd-Dtype must be float32, float64, bfloat16 or float16");
        bool native = (w == OPTIM_WIRE_F32 && s->cfg.dtype == OPTIM_F32) ||
                      (w == OPTIM_WIRE_F64 && s->cfg.dtype == OPTIM_F64);
        if (!native && (w == OPTIM_WIRE_F32 || w == OPTIM_WIRE_F64))
            return api_problem(r, 422, "Optd-Dtype",
                               "the body is declared %s but session %s is %s; nothing was "
                               "applied (send %s, bfloat16 or float16)",
                               dth, s->name, optim_dtype_name(s->cfg.dtype),
                               optim_dtype_name(s->cfg.dtype));
        size_t wsz = optim_wire_size(w);
        if (req->body_len != n * wsz)
            return api_problem(r, 422, what,
                               "binary %s must be %zu bytes (%zu %s values), got %zu", what,
                               n * wsz, n, optim_wire_name(w), req->body_len);
        if (native && !must_own && ((uintptr_t)req->body % esz) == 0) {
            *vec = req->body;
            return 0;
        }
        void *v = malloc(n * esz > 0 ? n * esz : 1);
        if (!v)
            return api_problem(r, 503, NULL, "out of memory");
        if (native)
            memcpy(v, req->body, n * esz);
        else
            optim_vec_from_wire(w, req->body, s->cfg.dtype, v, n);
        *vec = *owned = v;
        return 0;
    }
    void *v = malloc(n * esz > 0 ? n * esz : 1);
    if (!v)
        return api_problem(r, 503, NULL, "out of memory");
    if (is_step)
        st = api_decode_step_json(req->body, req->body_len, s->cfg.dtype, n, v, meta, r);
    else
        st = api_decode_params_json(req->body, req->body_len, s->cfg.dtype, n, v, r);
    if (st) {
        free(v);
        return st;
    }
    *vec = *owned = v;
    return 0;
}

/* Optd-Absent: the tensors without a gradient in this step, as indices
 * and ranges ("0-57,60").  *out: sorted, without duplicates (a new buffer,
 * NULL when none). */
static int parse_absent(const eng_session *s, const char *h, uint32_t **out, size_t *n,
                        api_reply *r)
{
    *out = NULL;
    *n = 0;
    if (!h)
        return 0;
    size_t nt = s->cfg.n_tensors;
    bool *mark = calloc(nt, sizeof *mark);
    if (!mark)
        return api_problem(r, 503, NULL, "out of memory");
    const char *p = h;
    int st = 0;
    while (*p && !st) {
        char *end;
        while (*p == ' ')
            p++;
        if (*p < '0' || *p > '9') {
            st = 400;
            break;
        }
        unsigned long long a = strtoull(p, &end, 10), b = a;
        p = end;
        if (*p == '-') {
            p++;
            if (*p < '0' || *p > '9') {
                st = 400;
                break;
            }
            b = strtoull(p, &end, 10);
            p = end;
        }
        while (*p == ' ')
            p++;
        if (a > b || b >= nt) {
            st = 400;
            break;
        }
        for (unsigned long long k = a; k <= b; k++)
            mark[k] = true;
        if (*p == ',')
            p++;
        else if (*p)
            st = 400;
    }
    if (st) {
        free(mark);
        return api_problem(r, 400, "Optd-Absent",
                           "Optd-Absent must list tensor indices 0-%zu and ranges such as "
                           "\"0-3,7\"", nt - 1);
    }
    size_t k = 0;
    for (size_t t = 0; t < nt; t++)
        k += mark[t];
    if (k) {
        *out = malloc(k * sizeof **out);
        if (!*out) {
            free(mark);
            return api_problem(r, 503, NULL, "out of memory");
        }
        k = 0;
        for (size_t t = 0; t < nt; t++)
            if (mark[t])
                (*out)[k++] = (uint32_t)t;
    }
    *n = k;
    free(mark);
    return 0;
}

/* Optd-Group-Lr / -Momentum / -Beta1: one value per group, the group's
 * hyperparameter from this step on (torch: a scheduler changed
 * param_groups[i]).  *out: a new array of n_groups, NULL when none given. */
static int parse_group_values(const eng_session *s, const srv_request *req, eng_group_hp **out,
                              api_reply *r)
{
    static const char *const names[ENG_HP_COUNT] = {"Optd-Group-Lr", "Optd-Group-Momentum",
                                                    "Optd-Group-Beta1"};
    *out = NULL;
    size_t ng = s->cfg.n_groups;
    eng_group_hp *g = NULL;
    for (int k = 0; k < ENG_HP_COUNT; k++) {
        const char *h = req->header(req->conn, names[k]);
        if (!h)
            continue;
        if (s->cfg.sched.kind != OPTIM_SCHED_NONE || s->cfg.sched.warmup_steps > 0) {
            free(g);
            return api_problem(r, 409, names[k],
                               "session %s has a server-side schedule; it sets the lr and "
                               "momentum itself (PATCH the schedule to null to drive them from "
                               "the client)", s->name);
        }
        if (!g && !(g = calloc(ng, sizeof *g)))
            return api_problem(r, 503, NULL, "out of memory");
        const char *p = h;
        for (size_t i = 0; i < ng; i++) {
            char *end;
            errno = 0;
            double v = strtod(p, &end);
            if (end == p || errno || !isfinite(v) || (*end && *end != ',') ||
                (i + 1 < ng && *end != ',') || (i + 1 == ng && *end)) {
                free(g);
                return api_problem(r, 400, names[k],
                                   "%s must hold %zu finite numbers, one per group, "
                                   "comma-separated", names[k], ng);
            }
            g[i].has[k] = true;
            g[i].v[k] = v;
            p = *end ? end + 1 : end;
        }
    }
    if (!g)
        return 0;
    /* The values must make valid hyperparameters for each group. */
    for (size_t i = 0; i < ng; i++) {
        optim_hparams hp;
        eng_group_hparams(s, i, &hp);
        if (g[i].has[ENG_HP_LR])
            hp.lr = g[i].v[ENG_HP_LR];
        if (g[i].has[ENG_HP_MOMENTUM])
            hp.momentum = g[i].v[ENG_HP_MOMENTUM];
        if (g[i].has[ENG_HP_BETA1])
            hp.betas[0] = g[i].v[ENG_HP_BETA1];
        optim_error e;
        if (optim_hparams_validate(&hp, &e) != OPTIM_OK) {
            free(g);
            return api_problem(r, 400, e.field, "groups[%zu]: %s %s", i, e.field, e.msg);
        }
    }
    *out = g;
    return 0;
}

/* Optd-Grad-Norm: the gradient norm of the whole logical vector this
 * gradient is a part of (a sharded session), used by clipping by norm in
 * place of the norm of this part.  A finite number >= 0, else 400.  Used
 * only where the session clips by norm (*has false otherwise: the value
 * is ignored); 422 where the norm clipping needs is not the request's
 * (accumulation: the mean's; sync: the round's). */
static int parse_grad_norm(const eng_session *s, const char *h, bool *has, double *norm,
                           api_reply *r)
{
    *has = false;
    *norm = NAN;
    if (!h)
        return 0;
    char *end;
    errno = 0;
    double v = strtod(h, &end);
    while (*end == ' ' || *end == '\t')
        end++;
    if (end == h || *end || errno == ERANGE || !isfinite(v) || v < 0)
        return api_problem(r, 400, "Optd-Grad-Norm",
                           "Optd-Grad-Norm must be one finite number >= 0: the gradient norm "
                           "of the whole vector (17 significant digits round-trip a double)");
    if (s->cfg.clip.kind != OPTIM_CLIP_NORM)
        return 0;
    if (s->cfg.mode.type == API_MODE_SYNC || s->cfg.mode.accumulate > 1)
        return api_problem(r, 422, "Optd-Grad-Norm",
                           "Optd-Grad-Norm works with plain async sessions only (this one %s: "
                           "the norm clipping needs is not this request's)",
                           s->cfg.mode.type == API_MODE_SYNC ? "is in sync mode"
                                                             : "accumulates gradients");
    *has = true;
    *norm = v == 0 ? 0.0 : v; /* -0 is 0 */
    return 0;
}

/* An idempotency key's request fingerprint: CRC-32 of the gradient as
 * decoded (the session's dtype: the same values sent as JSON, binary or a
 * 16-bit form are the same request) and of everything else that changes
 * the update (loss, base_step, absent tensors, group values).  Bit 32 is
 * set so that a fingerprint is never 0, which storage keeps for "not
 * recorded" (keys stored before fingerprints existed). */
static uint64_t step_fingerprint(const void *grad, size_t grad_bytes, const api_step_meta *meta,
                                 const uint32_t *absent, size_t n_absent,
                                 const eng_group_hp *ghp, size_t n_groups, bool has_norm,
                                 double norm)
{
    uint32_t c = storage_crc32(0, grad, grad_bytes);
    double loss = meta->loss;
    int64_t base = meta->base_step;
    c = storage_crc32(c, &loss, sizeof loss);
    c = storage_crc32(c, &base, sizeof base);
    uint64_t na = n_absent;
    c = storage_crc32(c, &na, sizeof na);
    if (n_absent)
        c = storage_crc32(c, absent, n_absent * sizeof *absent);
    for (size_t g = 0; ghp && g < n_groups; g++)
        for (int k = 0; k < ENG_HP_COUNT; k++) {
            unsigned char has = ghp[g].has[k];
            c = storage_crc32(c, &has, 1);
            if (has)
                c = storage_crc32(c, &ghp[g].v[k], sizeof ghp[g].v[k]);
        }
    if (has_norm) /* (without it, the fingerprints of before it existed) */
        c = storage_crc32(c, &norm, sizeof norm);
    return (1ULL << 32) | c;
}

int srv_commit_update(srv_ctx *ctx, eng_session *s, const eng_step_in *in, eng_step_out *out,
                      api_reply *r)
{
    int err = eng_step(ctx->db, ctx->pool, s, in, out);
    if (err == ENG_OK) {
        obs_step_committed(s, in, out);
        if (s->seq % IDEM_PRUNE_EVERY == 0)
            storage_idem_prune(ctx->db, s->id, s->updated_ms - IDEM_KEEP_MS, IDEM_KEEP_KEYS);
        return 0;
    }
    if (err == ENG_ENONFINITE)
        return api_problem(r, 422, "grad",
                           "grad contains NaN or Inf; nothing was applied (set the session's "
                           "nonfinite to \"skip\" to count and skip such steps)");
    /* Memory is ahead of disk: rebuild from disk on next use. */
    srv_registry_drop(ctx->reg, s);
    return srv_engine_fail(r, err, "committing the step");
}

static int h_step(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    const void *grad = NULL;
    void *owned = NULL;
    uint32_t *absent = NULL;
    size_t n_absent = 0;
    eng_group_hp *ghp = NULL;
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    const char *key = req->header(req->conn, "Idempotency-Key");
    const char *qp = req->query(req->conn, "params");
    bool with_params = !(qp && strcmp(qp, "false") == 0);
    int wire = 0;
    if (qp && with_params && strcmp(qp, "true") != 0) {
        st = api_problem(r, 400, "params", "the query parameter params must be true or false");
        goto done;
    }
    int64_t step_now = (int64_t)s->st.step;

    if (key && (strlen(key) == 0 || strlen(key) > API_IDEM_MAX)) {
        st = api_problem(r, 400, "Idempotency-Key", "Idempotency-Key must have 1-%d characters",
                         API_IDEM_MAX);
        goto done;
    }
    if ((st = answer_wire(s, req, &wire, r)))
        goto done;
    if ((st = parse_absent(s, req->header(req->conn, "Optd-Absent"), &absent, &n_absent, r)))
        goto done;
    if (n_absent && (s->cfg.mode.type == API_MODE_SYNC || s->cfg.mode.accumulate > 1)) {
        st = api_problem(r, 422, "Optd-Absent",
                         "absent tensors work with plain async sessions only (this one %s)",
                         s->cfg.mode.type == API_MODE_SYNC ? "is in sync mode"
                                                           : "accumulates gradients");
        goto done;
    }
    if ((st = parse_group_values(s, req, &ghp, r)))
        goto done;
    bool has_norm;
    double gnorm;
    if ((st = parse_grad_norm(s, req->header(req->conn, "Optd-Grad-Norm"), &has_norm, &gnorm, r)))
        goto done;
    st = decode_vector(s, req, true, (size_t)eng_present_size(s, absent, n_absent), false, &grad,
                       &owned, &meta, r);
    if (st)
        goto done;
    uint64_t fp = 0;
    if (key) {
        fp = step_fingerprint(grad,
                              (size_t)eng_present_size(s, absent, n_absent) *
                                  optim_dtype_size(s->cfg.dtype),
                              &meta, absent, n_absent, ghp, s->cfg.n_groups, has_norm, gnorm);
        int64_t recorded;
        double rec_lr;
        int rec_kind;
        uint64_t rec_fp = 0;
        int err = storage_idem_lookup(ctx->db, s->id, key, &recorded, &rec_lr, &rec_kind,
                                      &rec_fp);
        if (err == STORAGE_OK && rec_fp != 0 && rec_fp != fp) {
            st = api_problem(r, 422, "Idempotency-Key",
                             "Idempotency-Key %s was already used for a different request to "
                             "session %s; nothing was applied (use a new key for a new step)",
                             key, s->name);
            goto done;
        }
        if (err == STORAGE_OK && rec_kind == STORAGE_LOG_ACCUM &&
            (int64_t)s->st.step == recorded && s->accum_count > 0) {
            /* The gradient is still waiting in the accumulation: answer
             * like the original 202. */
            st = reply_params_at(r, 202, s, req->want_binary, wire, (uint64_t)recorded, true,
                                 NAN, false, with_params);
            api_reply_header(r, "Optd-Pending", "%lld", (long long)s->accum_count);
            goto done;
        }
        if (err == STORAGE_OK) {
            /* The step and lr of the original update; the params are the
             * session's current ones. */
            st = reply_params_at(r, 200, s, req->want_binary, wire, (uint64_t)recorded, true,
                                 rec_lr, !isnan(rec_lr), with_params);
            goto done;
        }
        if (err != STORAGE_ENOTFOUND) {
            st = srv_engine_fail(r, err, "checking the idempotency key");
            goto done;
        }
    }
    if (s->cfg.mode.type == API_MODE_SYNC) {
        if (ghp) {
            st = api_problem(r, 422, "Optd-Group-Lr",
                             "group hyperparameters from the client work with async sessions "
                             "only; PATCH the groups of a sync session");
            goto done;
        }
        /* A round cannot skip one worker's gradient: refuse it whatever
         * the nonfinite policy, so that the worker can resend. */
        double norm;
        bool finite;
        optim_vec_stats(s->cfg.dtype, grad, (size_t)s->cfg.size, 2.0, &norm, &finite);
        if (!finite) {
            st = api_problem(r, 422, "grad", "grad contains NaN or Inf; nothing was added to "
                                             "the round");
        } else {
            req->waiter->wire = wire;
            st = srv_sync_submit(ctx, s, req, grad, &meta, key, fp, with_params, r);
        }
        goto done;
    }
    double factor = 1.0;
    if (meta.base_step >= 0) {
        if (meta.base_step > step_now) {
            st = api_problem_with(r, 409, "base_step", "step", step_now,
                                  "base_step %lld is ahead of the session's step %lld",
                                  (long long)meta.base_step, (long long)step_now);
            goto done;
        }
        int64_t age = step_now - meta.base_step;
        if (s->cfg.mode.max_staleness >= 0 && age > s->cfg.mode.max_staleness) {
            s->n_stale++;
            obs_step_stale();
            st = api_problem_with(r, 409, "base_step", "step", step_now,
                                  "gradient is %lld steps stale (max_staleness %lld); pull the "
                                  "params and retry",
                                  (long long)age, (long long)s->cfg.mode.max_staleness);
            goto done;
        }
        if (s->cfg.mode.stale_policy == API_STALE_DAMP && age > 0)
            factor = 1.0 / (1.0 + (double)age);
    }

    eng_step_in in = {
        .grad = grad,
        .absent = absent,
        .n_absent = n_absent,
        .ghp = ghp,
        .has_norm = has_norm,
        .grad_norm = gnorm,
        .loss = meta.loss,
        .factor = factor,
        .key = key,
        .fp = fp,
        .worker = meta.worker[0] ? meta.worker : NULL,
    };
    eng_step_out res;
    st = srv_commit_update(ctx, s, &in, &res, r);
    if (st)
        goto done;
    if (res.kind == STORAGE_LOG_ACCUM) {
        st = srv_reply_params(r, 202, s, req->want_binary, wire, NAN, false, with_params);
        api_reply_header(r, "Optd-Pending", "%lld", (long long)s->accum_count);
    } else if (res.kind == STORAGE_LOG_SKIP) {
        st = srv_reply_params(r, 200, s, req->want_binary, wire, NAN, false, with_params);
        api_reply_header(r, "Optd-Skipped", "true");
    } else {
        st = srv_reply_params(r, 200, s, req->want_binary, wire, res.lr, true, with_params);
    }
done:
    free(owned);
    free(absent);
    free(ghp);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_get_params(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    int wire = 0;
    if (!(st = answer_wire(s, req, &wire, r)))
        st = srv_reply_params(r, 200, s, req->want_binary, wire, NAN, false, true);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_put_params(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    const void *v = NULL;
    void *owned = NULL;
    st = decode_vector(s, req, false, (size_t)s->cfg.size, true, &v, &owned, NULL, r);
    if (!st) {
        double norm;
        bool finite;
        optim_vec_stats(s->cfg.dtype, v, (size_t)s->cfg.size, 2.0, &norm, &finite);
        if (!finite)
            st = api_problem(r, 422, "params", "params contain NaN or Inf");
    }
    if (!st) {
        int err = eng_set_params(ctx->db, s, owned); /* takes the buffer */
        owned = NULL;
        if (err != ENG_OK)
            st = srv_engine_fail(r, err, "saving the params");
        else
            st = srv_reply_params(r, 200, s, req->want_binary, 0, NAN, false, false);
    }
    free(owned);
    srv_registry_release(ctx->reg, s);
    return st;
}

typedef struct {
    cJSON *arr;
    int64_t last;
} history_acc;

static int history_row(void *ud, const storage_log_entry *e)
{
    history_acc *h = ud;
    cJSON *o = cJSON_CreateObject();
    add_item(o, "step", raw_int(e->step));
    add_item(o, "time", timestamp(e->time_ms));
    add_item(o, "lr", raw_double(e->lr));
    add_item(o, "loss", raw_double(e->loss));
    add_item(o, "grad_norm", raw_double(e->grad_norm));
    add_item(o, "update_norm", raw_double(e->update_norm));
    if (e->worker)
        cJSON_AddStringToObject(o, "worker", e->worker);
    add_elem(h->arr, o);
    h->last = e->step;
    return 0;
}

static int h_history(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    const char *as = req->query(req->conn, "after");
    const char *ls = req->query(req->conn, "limit");
    long long after = 0, limit = LIST_DEFAULT;
    char *end;
    if (as && (*as == '\0' || (after = strtoll(as, &end, 10)) < 0 || *end)) {
        srv_registry_release(ctx->reg, s);
        return api_problem(r, 400, "after", "after must be a step number >= 0");
    }
    if (ls && (*ls == '\0' || (limit = strtoll(ls, &end, 10)) < 1 || *end || limit > LIST_MAX)) {
        srv_registry_release(ctx->reg, s);
        return api_problem(r, 400, "limit", "limit must be an integer from 1 to %d", LIST_MAX);
    }
    int64_t id = s->id;
    srv_registry_release(ctx->reg, s);
    cJSON *doc = cJSON_CreateObject();
    history_acc h = {cJSON_AddArrayToObject(doc, "steps"), -1};
    int err = storage_history(ctx->db, id, after, (int)limit, history_row, &h);
    if (err != STORAGE_OK) {
        cJSON_Delete(doc);
        return srv_engine_fail(r, err, "reading the history");
    }
    if (cJSON_GetArraySize(h.arr) == limit)
        add_item(doc, "next", raw_int(h.last));
    else
        cJSON_AddNullToObject(doc, "next");
    return reply_cjson(r, 200, doc);
}

/* GET /v1/sessions/{name}/state: the whole optimizer state, safetensors. */
static int h_get_state(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    char *body = NULL;
    size_t len = 0;
    int err = eng_state_export(s, &body, &len);
    if (err == ENG_OK) {
        api_reply_body(r, 200, "application/octet-stream", body, len);
        api_reply_header(r, "Optd-Step", "%llu", (unsigned long long)s->st.step);
        st = 200;
    } else {
        st = srv_engine_fail(r, err, "exporting the state");
    }
    srv_registry_release(ctx->reg, s);
    return st;
}

/* The metadata string key of a parsed state file, or NULL. */
static const char *st_meta(const cJSON *doc, const char *key)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(doc, "__metadata__");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* PUT /v1/sessions/{name}/state: a state file creates the session (201,
 * config from the file) or replaces an existing session's state (200; same
 * tensors, shapes and dtype; the session's hyperparameters are kept). */
static int h_put_state(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    api_st_tensor *t = NULL;
    size_t n = 0;
    cJSON *doc = NULL;
    int st = api_st_parse(req->body, req->body_len, &t, &n, &doc, r);
    if (st)
        return st;
    const char *fmt = st_meta(doc, "optd.format"), *cfg_json = st_meta(doc, "optd.config");
    const char *state_json = st_meta(doc, "optd.state");
    char why[300] = "";
    eng_session *s = NULL;
    if (!fmt || strcmp(fmt, "1") != 0 || !state_json) {
        st = api_problem(r, 422, NULL, "not an optd state file: the metadata needs optd.format "
                                       "\"1\", optd.config and optd.state");
        goto out;
    }
    int tries = 0;
again:;
    int err = srv_registry_acquire(ctx->reg, req->name, &s);
    if (err == ENG_OK) {
        if ((err = eng_state_import(s, t, n, state_json, why, sizeof why)) != ENG_OK) {
            st = err == ENG_EDAMAGED ? api_problem(r, 422, NULL, "%s; nothing was changed", why)
                                     : srv_engine_fail(r, err, "importing the state");
        } else if ((s->updated_ms = srv_now_ms(),
                    err = eng_checkpoint_kind(ctx->db, s, false, STORAGE_CKPT_ANCHOR, NULL)) !=
                   ENG_OK) {
            srv_registry_drop(ctx->reg, s); /* memory is ahead of disk */
            st = srv_engine_fail(r, err, "saving the imported state");
        } else {
            /* An open round was for the state that is gone. */
            if (s->round_count > 0)
                srv_sync_abort(ctx, s, 409, "the session's state was replaced; the round was "
                                            "dropped");
            st = reply_session(r, 200, s);
        }
        srv_registry_release(ctx->reg, s);
        goto out;
    }
    if (err != STORAGE_ENOTFOUND) {
        st = srv_engine_fail(r, err, "reading the session");
        goto out;
    }
    /* A new session from the file's config. */
    api_config cfg;
    if (!cfg_json || api_config_from_json(cfg_json, &cfg)) {
        st = api_problem(r, 422, NULL, "the file's optd.config is not a valid session config");
        goto out;
    }
    if (cfg.size > ctx->cfg->max_params) {
        st = api_problem(r, 413, NULL, "the file's session has %llu params; the limit is %zu",
                         (unsigned long long)cfg.size, ctx->cfg->max_params);
        api_config_free(&cfg);
        goto out;
    }
    api_init zeros = {.type = API_INIT_ZEROS};
    s = eng_session_new(req->name, &cfg, NULL, &zeros);
    api_config_free(&cfg);
    if (!s) {
        st = api_problem(r, 503, NULL, "out of memory for the session");
        goto out;
    }
    eng_lock(s);
    err = eng_state_import(s, t, n, state_json, why, sizeof why);
    if (err == ENG_OK)
        err = srv_auth_create(ctx->db, req->who, s, srv_now_ms(), r);
    eng_unlock(s);
    if (err == SRV_EQUOTA) {
        st = 429;
        eng_session_free(s);
    } else if (err == ENG_EDAMAGED) {
        st = api_problem(r, 422, NULL, "%s; nothing was created", why);
        eng_session_free(s);
    } else if (err == STORAGE_EEXIST && tries++ == 0) {
        /* Created meanwhile: replace that one's state instead. */
        eng_session_free(s);
        s = NULL;
        goto again;
    } else if (err != ENG_OK) {
        st = srv_engine_fail(r, err, "creating the session from the state");
        eng_session_free(s);
    } else {
        st = reply_session(r, 201, s);
        api_reply_header(r, "Location", "/v1/sessions/%s", req->name);
        srv_registry_insert(ctx->reg, s);
    }
out:
    free(t);
    cJSON_Delete(doc);
    return st;
}

/* The token routes: server/auth.c. */
static int h_tokens_list(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)req;
    return srv_auth_tokens_list(ctx->db, r);
}

static int h_tokens_post(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    return srv_auth_tokens_post(ctx->db, req->body, req->body_len, r);
}

static int h_token_get(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    return srv_auth_token_get(ctx->db, req->name, r);
}

static int h_token_delete(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    return srv_auth_token_delete(ctx->db, req->name, r);
}

typedef int (*handler_fn)(srv_ctx *, const srv_request *, api_reply *);

static const handler_fn handlers[API_R_COUNT] = {
    [API_R_HEALTHZ] = h_healthz,
    [API_R_OPTIMIZERS] = h_optimizers,
    [API_R_SESSIONS_LIST] = h_list,
    [API_R_SESSION_PUT] = h_put_session,
    [API_R_SESSION_GET] = h_get_session,
    [API_R_SESSION_PATCH] = h_patch_session,
    [API_R_SESSION_DELETE] = h_delete_session,
    [API_R_STEP] = h_step,
    [API_R_PARAMS_GET] = h_get_params,
    [API_R_PARAMS_PUT] = h_put_params,
    [API_R_HISTORY] = h_history,
    [API_R_STATE_GET] = h_get_state,
    [API_R_STATE_PUT] = h_put_state,
    [API_R_EVENTS] = obs_h_events,
    [API_R_METRICS] = obs_h_metrics,
    [API_R_DASHBOARD] = obs_h_dashboard,
    [API_R_ASSET] = obs_h_asset,
    [API_R_CHECKPOINTS_GET] = srv_h_checkpoints_get,
    [API_R_CHECKPOINTS_POST] = srv_h_checkpoints_post,
    [API_R_ROLLBACK] = srv_h_rollback,
    [API_R_EXPORT_GET] = srv_h_export_get,
    [API_R_EXPORT_PUT] = srv_h_export_put,
    [API_R_TOKENS_LIST] = h_tokens_list,
    [API_R_TOKENS_POST] = h_tokens_post,
    [API_R_TOKEN_GET] = h_token_get,
    [API_R_TOKEN_DELETE] = h_token_delete,
};

/* Under fault injection or sync counting (OPTD_FAULT, OPTD_FAULT_COUNT_SYNCS:
 * tests only, docs/storage.md) every answer carries storage's file
 * operation counters as they were when the answer was made, so that a test
 * can prove a write was synced before it was acknowledged. */
static bool fault_counting(void)
{
    static int on = -1;
    if (__atomic_load_n(&on, __ATOMIC_RELAXED) < 0) {
        const char *f = getenv("OPTD_FAULT"), *c = getenv("OPTD_FAULT_COUNT_SYNCS");
        __atomic_store_n(&on, (f && *f) || (c && strcmp(c, "1") == 0), __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&on, __ATOMIC_RELAXED) > 0;
}

/* Tests only: with OPTD_FAILMALLOC set, the allocation-failure shim that
 * tests/test_faults.c preloads (tests/support/shim/failmalloc.c) counts and
 * fails only the allocations made inside a handler. */
static void (*alloc_scope)(int on);
static pthread_once_t alloc_scope_once = PTHREAD_ONCE_INIT;

static void alloc_scope_find(void)
{
    /* cJSON reports a failed allocation like a syntax error (NULL): its
     * failures are counted (api/jsonmem.c) so that the answer is 503 "out
     * of memory" and not 400 "malformed JSON". */
    api_json_track_allocations();
    if (!getenv("OPTD_FAILMALLOC"))
        return;
    void *self = dlopen(NULL, RTLD_LAZY);
    void *fn = self ? dlsym(self, "optd_failmalloc_scope") : NULL;
    memcpy(&alloc_scope, &fn, sizeof fn);
}

int srv_handle(srv_ctx *ctx, const srv_request *req, api_reply *reply)
{
    pthread_once(&alloc_scope_once, alloc_scope_find);
    if (alloc_scope)
        alloc_scope(1);
    unsigned long json_failed = api_json_failures();
    int st = handlers[req->route->id](ctx, req, reply);
    if (alloc_scope)
        alloc_scope(0);
    if (api_json_failures() != json_failed && ((st >= 400 && st < 500) || st == 500)) {
        /* The 4xx (or the 500 of a stored document that did not parse)
         * came from a JSON document cJSON could not allocate: nothing was
         * changed (an error answer changes nothing). */
        reply->n_headers = 0;
        st = api_problem(reply, 503, NULL, "out of memory while reading the request; nothing "
                                           "was changed");
    } else if (api_json_failures() != json_failed && st >= 200 && st < 300) {
        /* The answer's document could lack members: never send it. */
        reply->n_headers = 0;
        st = api_problem(reply, 503, NULL, "out of memory while writing the answer (the "
                                           "request may have been carried out; it is safe to "
                                           "retry)");
    }
    if (st != SRV_SUSPENDED && fault_counting()) {
        storage_fault_counts c;
        storage_fault_stats(&c);
        api_reply_header(reply, "Optd-Fault-Counts",
                         "reads=%llu writes=%llu syncs=%llu truncates=%llu injected=%llu",
                         (unsigned long long)c.reads, (unsigned long long)c.writes,
                         (unsigned long long)c.syncs, (unsigned long long)c.truncates,
                         (unsigned long long)c.injected);
    }
    return st;
}
