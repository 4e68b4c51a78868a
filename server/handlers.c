/*
 * handlers.c -- one function per route of api_routes.  Each returns after
 * filling the reply; errors go through api_problem (problem+json) and leave
 * the session exactly as it was.
 */
#include "server/server.h"

#include <cjson/cJSON.h>
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

int srv_storage_fail(api_reply *r, storage *db, int err, const char *what)
{
    (void)db;
    const char *msg = storage_last_error();
    srv_log(SRV_LOG_ERROR, "%s failed (%d): %s", what, err, msg);
    return api_problem(r, 503, NULL, "storage failure during %s: %s; nothing was changed", what,
                       msg);
}

/* The session document: its config with every default, plus live state. */
static cJSON *session_doc(const srv_session *s)
{
    char *cfg = api_config_to_json(&s->cfg);
    cJSON *doc = cfg ? cJSON_Parse(cfg) : NULL;
    free(cfg);
    if (!doc)
        return NULL;
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "name", s->name);
    cJSON_AddItemToObject(out, "step", raw_int((int64_t)s->st.step));
    cJSON_AddItemToObject(out, "lr", raw_double(srv_session_next_lr(s)));
    cJSON *item = doc->child;
    while (item) {
        cJSON *next = item->next;
        cJSON_DetachItemViaPointer(doc, item);
        cJSON_AddItemToObject(out, item->string, item);
        item = next;
    }
    cJSON_Delete(doc);
    cJSON *state = cJSON_AddObjectToObject(out, "state");
    cJSON *bufs = cJSON_AddArrayToObject(state, "buffers");
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            cJSON_AddItemToArray(bufs, cJSON_CreateString(optim_buffer_name(s->cfg.opt.kind, i)));
    cJSON_AddItemToObject(state, "last_lr", raw_double(s->last_lr));
    cJSON_AddItemToObject(state, "last_loss", raw_double(s->last_loss));
    cJSON_AddItemToObject(state, "pending_accumulation", raw_int(s->accum_count));
    if (s->cfg.mode.type == API_MODE_SYNC) {
        /* The open round: who has sent, how many are awaited. */
        cJSON *round = cJSON_AddObjectToObject(out, "round");
        cJSON_AddItemToObject(round, "step", raw_int((int64_t)s->st.step));
        cJSON_AddItemToObject(round, "received", raw_int(s->round_count));
        cJSON_AddItemToObject(round, "awaiting", raw_int(s->cfg.mode.workers - s->round_count));
        cJSON *ws = cJSON_AddArrayToObject(round, "workers");
        for (int64_t i = 0; i < s->round_count; i++)
            cJSON_AddItemToArray(ws, cJSON_CreateString(s->round_workers[i]));
    }
    cJSON *cnt = cJSON_AddObjectToObject(out, "counters");
    cJSON_AddItemToObject(cnt, "applied", raw_int(s->n_applied));
    cJSON_AddItemToObject(cnt, "rejected_stale", raw_int(s->n_stale));
    cJSON_AddItemToObject(cnt, "timed_out", raw_int(s->n_timeout));
    cJSON_AddItemToObject(cnt, "skipped_nonfinite", raw_int(s->n_skipped));
    cJSON_AddItemToObject(out, "created_at", timestamp(s->created_ms));
    cJSON_AddItemToObject(out, "updated_at", timestamp(s->updated_ms));
    return out;
}

static int reply_session(api_reply *r, int status, const srv_session *s)
{
    cJSON *doc = session_doc(s);
    return doc ? reply_cjson(r, status, doc) : api_problem(r, 503, NULL, "out of memory");
}

/* {"step":t,"lr":x,"params":[...]} or the raw params (binary). */
/* The params answer; step is the step to report (a replay reports the
 * step its key applied), replayed adds "replayed":true. */
static int reply_params_at(api_reply *r, int status, const srv_session *s, bool want_binary,
                           uint64_t step, bool replayed, double lr, bool with_lr,
                           bool with_params)
{
    size_t bytes = (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
    if (want_binary) {
        char *b = with_params ? malloc(bytes ? bytes : 1) : NULL;
        if (with_params && !b)
            return api_problem(r, 503, NULL, "out of memory");
        if (b)
            memcpy(b, s->params, bytes);
        api_reply_body(r, status, "application/octet-stream", b, b ? bytes : 0);
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
    if (with_lr && isfinite(lr))
        api_reply_header(r, "Optd-Lr", "%.17g", lr);
    if (replayed)
        api_reply_header(r, "Optd-Replayed", "true");
    return status;
}

int srv_reply_params(api_reply *r, int status, const srv_session *s, bool want_binary,
                     double lr, bool with_lr, bool with_params)
{
    return reply_params_at(r, status, s, want_binary, s->st.step, false, lr, with_lr,
                           with_params);
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
    int n = storage_session_list(ctx->db, after, (int)limit, infos);
    if (n < 0) {
        free(infos);
        return srv_storage_fail(r, ctx->db, n, "listing sessions");
    }
    cJSON *doc = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(doc, "sessions");
    for (int i = 0; i < n; i++) {
        cJSON *cfg = cJSON_Parse(infos[i].config);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", infos[i].name);
        cJSON_AddItemToObject(o, "step", raw_int(infos[i].step));
        if (cfg) {
            cJSON *opt = cJSON_GetObjectItem(cfg, "optimizer");
            cJSON_AddItemToObject(o, "optimizer",
                                  cJSON_Duplicate(cJSON_GetObjectItem(opt, "type"), 1));
            cJSON_AddItemToObject(o, "dtype", cJSON_Duplicate(cJSON_GetObjectItem(cfg, "dtype"), 1));
            cJSON_AddItemToObject(o, "size", cJSON_Duplicate(cJSON_GetObjectItem(cfg, "size"), 1));
            cJSON_Delete(cfg);
        }
        cJSON_AddItemToObject(o, "created_at", timestamp(infos[i].created_ms));
        cJSON_AddItemToObject(o, "updated_at", timestamp(infos[i].updated_ms));
        cJSON_AddItemToArray(arr, o);
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
static int verify_existing(srv_session *s, const api_config *cfg, api_reply *r)
{
    char *want = api_config_to_json(cfg);
    char *have = api_config_to_json(&s->cfg);
    int same = want && have && strcmp(want, have) == 0;
    free(want);
    free(have);
    if (!same)
        return api_problem(r, 409, NULL,
                           "session %s exists with a different config (GET it to compare, "
                           "DELETE it to start over)",
                           s->name);
    return reply_session(r, 200, s);
}

static int h_put_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    api_config cfg;
    api_init init;
    void *params = NULL;
    int st = api_decode_create(req->body, req->body_len, ctx->cfg->max_params, &cfg, &init,
                               &params, r);
    if (st)
        return st;
    srv_session *s = NULL;
    int err = srv_registry_acquire(ctx->reg, req->name, &s);
    if (err == STORAGE_OK) {
        st = verify_existing(s, &cfg, r);
        srv_registry_release(ctx->reg, s);
        goto out;
    }
    if (err != STORAGE_ENOTFOUND) {
        st = srv_storage_fail(r, ctx->db, err, "reading the session");
        goto out;
    }
    s = srv_session_new(req->name, &cfg, params, &init);
    if (!s) {
        st = api_problem(r, 503, NULL, "out of memory for a session of %llu params",
                         (unsigned long long)cfg.size);
        goto out;
    }
    char *cfg_json = api_config_to_json(&s->cfg);
    size_t len = 0;
    void *blob = srv_session_checkpoint(s, &len);
    s->created_ms = s->updated_ms = srv_now_ms();
    err = cfg_json && blob ? storage_session_create(ctx->db, req->name, cfg_json, s->created_ms,
                                                    &(storage_iov){blob, len}, 1, &s->id)
                           : STORAGE_ENOMEM;
    free(cfg_json);
    free(blob);
    if (err == STORAGE_EEXIST) {
        /* Another request created it meanwhile: verify against that one. */
        srv_session_free(s);
        err = srv_registry_acquire(ctx->reg, req->name, &s);
        if (err == STORAGE_OK) {
            st = verify_existing(s, &cfg, r);
            srv_registry_release(ctx->reg, s);
        } else {
            st = srv_storage_fail(r, ctx->db, err, "reading the session");
        }
        goto out;
    }
    if (err != STORAGE_OK) {
        srv_session_free(s);
        st = srv_storage_fail(r, ctx->db, err, "creating the session");
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

static int acquire_or_reply(srv_ctx *ctx, const char *name, srv_session **s, api_reply *r)
{
    int err = srv_registry_acquire(ctx->reg, name, s);
    if (err == STORAGE_ENOTFOUND)
        return api_problem(r, 404, "name", "no session named %s", name);
    if (err != STORAGE_OK)
        return srv_storage_fail(r, ctx->db, err, "loading the session");
    return 0;
}

static int h_get_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    st = reply_session(r, 200, s);
    srv_registry_release(ctx->reg, s);
    return st;
}

/* Writes a full checkpoint (and config) of s; on failure the caller must
 * drop the session. */
static int write_checkpoint(srv_ctx *ctx, srv_session *s, bool with_config)
{
    char *cfg_json = with_config ? api_config_to_json(&s->cfg) : NULL;
    size_t len = 0;
    void *blob = srv_session_checkpoint(s, &len);
    int64_t now = srv_now_ms();
    int err = blob && (!with_config || cfg_json)
                  ? storage_checkpoint(ctx->db, s->id, cfg_json, &(storage_iov){blob, len}, 1,
                                       s->seq, (int64_t)s->st.step, now)
                  : STORAGE_ENOMEM;
    free(cfg_json);
    free(blob);
    if (err == STORAGE_OK) {
        s->log_bytes = 0;
        s->updated_ms = now;
    }
    return err;
}

static int h_patch_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
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
    if (s->round_count > 0 && memcmp(&next.mode, &s->cfg.mode, sizeof next.mode) != 0)
        srv_sync_abort(ctx, s, 409, "the session's mode changed; the open round was dropped");
    bool sched_changed = memcmp(&next.sched, &s->cfg.sched, sizeof next.sched) != 0 ||
                         next.opt.lr != s->cfg.opt.lr;
    api_config old = s->cfg;
    optim_plateau old_plateau = s->plateau;
    s->cfg = next;
    if (sched_changed)
        optim_plateau_init(&s->cfg.sched, s->cfg.opt.lr, &s->plateau);
    int err = srv_session_ensure_buffers(s) ? STORAGE_ENOMEM : write_checkpoint(ctx, s, true);
    if (err != STORAGE_OK) {
        /* Memory may hold new buffers: rebuild from disk on next use. */
        s->cfg = old;
        s->plateau = old_plateau;
        api_config_free(&next);
        srv_registry_drop(ctx->reg, s);
        srv_registry_release(ctx->reg, s);
        return srv_storage_fail(r, ctx->db, err, "saving the new config");
    }
    api_config_free(&old);
    st = reply_session(r, 200, s);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_delete_session(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    int err = storage_session_delete(ctx->db, req->name);
    if (err != STORAGE_OK && err != STORAGE_ENOTFOUND) {
        srv_registry_release(ctx->reg, s);
        return srv_storage_fail(r, ctx->db, err, "deleting the session");
    }
    srv_sync_abort(ctx, s, 404, "the session was deleted; the round was not applied");
    srv_registry_drop(ctx->reg, s);
    srv_registry_release(ctx->reg, s);
    api_reply_body(r, 204, "application/json", NULL, 0);
    return 204;
}

/* Decodes a gradient or params body into a new buffer of the session's
 * dtype. */
static int decode_vector(const srv_session *s, const srv_request *req, bool is_step,
                         void **out, api_step_meta *meta, api_reply *r)
{
    size_t n = (size_t)s->cfg.size;
    void *v = malloc(n * optim_dtype_size(s->cfg.dtype));
    if (!v)
        return api_problem(r, 503, NULL, "out of memory");
    int st;
    const char *dth = req->body_binary ? req->header(req->conn, "Optd-Dtype") : NULL;
    optim_dtype said;
    if (dth && optim_dtype_parse(dth, &said) != OPTIM_OK) {
        free(v);
        return api_problem(r, 400, "Optd-Dtype", "Optd-Dtype must be float32 or float64");
    }
    if (dth && said != s->cfg.dtype) {
        free(v);
        return api_problem(r, 422, "Optd-Dtype",
                           "the body is declared %s but session %s is %s; nothing was applied",
                           dth, s->name, optim_dtype_name(s->cfg.dtype));
    }
    if (req->body_binary) {
        st = api_decode_vector_binary(req->body, req->body_len, s->cfg.dtype, n, v,
                                      is_step ? "grad" : "params", r);
        if (!st && is_step)
            st = api_decode_step_headers(req->header(req->conn, "Optd-Loss"),
                                         req->header(req->conn, "Optd-Base-Step"),
                                         req->header(req->conn, "Optd-Worker"), meta, r);
    } else if (is_step) {
        /* Headers work with JSON bodies too; a body field wins over its header. */
        st = api_decode_step_headers(req->header(req->conn, "Optd-Loss"),
                                     req->header(req->conn, "Optd-Base-Step"),
                                     req->header(req->conn, "Optd-Worker"), meta, r);
        if (!st)
            st = api_decode_step_json(req->body, req->body_len, s->cfg.dtype, n, v, meta, r);
    } else {
        st = api_decode_params_json(req->body, req->body_len, s->cfg.dtype, n, v, r);
    }
    if (st) {
        free(v);
        return st;
    }
    *out = v;
    return 0;
}

/* Applies one gradient to a locked session and commits the log row (with
 * its idempotency keys), checkpointing when the log has outgrown the state.
 * On a failed commit the session is dropped (memory is ahead of disk; the
 * next request reloads) and the reply holds the 503. */
int srv_commit_update(srv_ctx *ctx, srv_session *s, const void *grad, double loss, double factor,
                      const char *key, const char *const *more_keys, size_t n_more_keys,
                      const char *worker, srv_apply_result *res, api_reply *r)
{
    srv_session_apply(s, grad, loss, factor, res);
    size_t gbytes = (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
    storage_log_entry e = {
        .seq = s->seq + 1,
        .kind = res->kind,
        .step = (int64_t)s->st.step,
        .time_ms = srv_now_ms(),
        .lr = res->lr,
        .factor = factor,
        .loss = loss,
        .grad_norm = res->grad_norm,
        .update_norm = res->update_norm,
        .grad = res->kind == STORAGE_LOG_SKIP ? NULL : grad,
        .grad_len = res->kind == STORAGE_LOG_SKIP ? 0 : gbytes,
        .idem_key = key,
        .more_keys = more_keys,
        .n_more_keys = n_more_keys,
        .worker = worker,
    };
    /* Checkpoint when the log since the last one outgrows the state. */
    void *blob = NULL;
    size_t blob_len = 0;
    if (s->log_bytes + gbytes > srv_session_bytes(s))
        blob = srv_session_checkpoint(s, &blob_len);
    int err = storage_append(ctx->db, s->id, &e, &(storage_iov){blob, blob_len}, blob ? 1 : 0);
    free(blob);
    if (err != STORAGE_OK) {
        srv_registry_drop(ctx->reg, s);
        return srv_storage_fail(r, ctx->db, err, "committing the step");
    }
    s->seq = e.seq;
    s->log_bytes = blob ? 0 : s->log_bytes + e.grad_len;
    s->updated_ms = e.time_ms;
    if (s->seq % IDEM_PRUNE_EVERY == 0)
        storage_idem_prune(ctx->db, s->id, e.time_ms - IDEM_KEEP_MS, IDEM_KEEP_KEYS);
    return 0;
}

static int h_step(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    void *grad = NULL;
    api_step_meta meta = {.loss = NAN, .base_step = -1};
    const char *key = req->header(req->conn, "Idempotency-Key");
    const char *qp = req->query(req->conn, "params");
    bool with_params = !(qp && strcmp(qp, "false") == 0);
    if (qp && with_params && strcmp(qp, "true") != 0) {
        srv_registry_release(ctx->reg, s);
        return api_problem(r, 400, "params", "the query parameter params must be true or false");
    }
    int64_t step_now = (int64_t)s->st.step;

    if (key && (strlen(key) == 0 || strlen(key) > API_IDEM_MAX)) {
        st = api_problem(r, 400, "Idempotency-Key", "Idempotency-Key must have 1-%d characters",
                         API_IDEM_MAX);
        goto done;
    }
    st = decode_vector(s, req, true, &grad, &meta, r);
    if (st)
        goto done;
    if (key) {
        int64_t recorded;
        double rec_lr;
        int rec_kind;
        int err = storage_idem_lookup(ctx->db, s->id, key, &recorded, &rec_lr, &rec_kind, NULL);
        if (err == STORAGE_OK && rec_kind == STORAGE_LOG_ACCUM &&
            (int64_t)s->st.step == recorded && s->accum_count > 0) {
            /* The gradient is still waiting in the accumulation: answer
             * like the original 202. */
            st = reply_params_at(r, 202, s, req->want_binary, (uint64_t)recorded, true, NAN,
                                 false, with_params);
            api_reply_header(r, "Optd-Pending", "%lld", (long long)s->accum_count);
            goto done;
        }
        if (err == STORAGE_OK) {
            /* The step and lr of the original update; the params are the
             * session's current ones. */
            st = reply_params_at(r, 200, s, req->want_binary, (uint64_t)recorded, true, rec_lr,
                                 !isnan(rec_lr), with_params);
            goto done;
        }
        if (err != STORAGE_ENOTFOUND) {
            st = srv_storage_fail(r, ctx->db, err, "checking the idempotency key");
            goto done;
        }
    }
    bool finite = api_vector_finite(s->cfg.dtype, grad, (size_t)s->cfg.size);
    if (s->cfg.mode.type == API_MODE_SYNC) {
        /* A round cannot skip one worker's gradient: refuse it whatever
         * the nonfinite policy, so that the worker can resend. */
        if (!finite)
            st = api_problem(r, 422, "grad", "grad contains NaN or Inf; nothing was added to "
                                             "the round");
        else
            st = srv_sync_submit(ctx, s, req, grad, &meta, key, with_params, r);
        goto done;
    }
    if (!finite && s->cfg.nonfinite == API_NONFINITE_ERROR) {
        st = api_problem(r, 422, "grad",
                         "grad contains NaN or Inf; nothing was applied (set the session's "
                         "nonfinite to \"skip\" to count and skip such steps)");
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
            st = api_problem_with(r, 409, "base_step", "step", step_now,
                                  "gradient is %lld steps stale (max_staleness %lld); pull the "
                                  "params and retry",
                                  (long long)age, (long long)s->cfg.mode.max_staleness);
            goto done;
        }
        if (s->cfg.mode.stale_policy == API_STALE_DAMP && age > 0)
            factor = 1.0 / (1.0 + (double)age);
    }

    srv_apply_result res;
    st = srv_commit_update(ctx, s, grad, meta.loss, factor, key, NULL, 0,
                           meta.worker[0] ? meta.worker : NULL, &res, r);
    if (st)
        goto done;
    if (res.kind == STORAGE_LOG_ACCUM) {
        st = srv_reply_params(r, 202, s, req->want_binary, NAN, false, with_params);
        api_reply_header(r, "Optd-Pending", "%lld", (long long)s->accum_count);
    } else if (res.kind == STORAGE_LOG_SKIP) {
        st = srv_reply_params(r, 200, s, req->want_binary, NAN, false, with_params);
        api_reply_header(r, "Optd-Skipped", "true");
    } else {
        st = srv_reply_params(r, 200, s, req->want_binary, res.lr, true, with_params);
    }
done:
    free(grad);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_get_params(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    st = srv_reply_params(r, 200, s, req->want_binary, NAN, false, true);
    srv_registry_release(ctx->reg, s);
    return st;
}

static int h_put_params(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
    int st = acquire_or_reply(ctx, req->name, &s, r);
    if (st)
        return st;
    void *v = NULL;
    st = decode_vector(s, req, false, &v, NULL, r);
    if (!st && !api_vector_finite(s->cfg.dtype, v, (size_t)s->cfg.size))
        st = api_problem(r, 422, "params", "params contain NaN or Inf");
    if (!st) {
        size_t bytes = (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
        memcpy(s->snap, s->params, bytes);
        memcpy(s->params, v, bytes);
        int err = write_checkpoint(ctx, s, false);
        if (err != STORAGE_OK) {
            memcpy(s->params, s->snap, bytes);
            st = srv_storage_fail(r, ctx->db, err, "saving the params");
        } else {
            st = srv_reply_params(r, 200, s, req->want_binary, NAN, false, false);
        }
    }
    free(v);
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
    cJSON_AddItemToObject(o, "step", raw_int(e->step));
    cJSON_AddItemToObject(o, "time", timestamp(e->time_ms));
    cJSON_AddItemToObject(o, "lr", raw_double(e->lr));
    cJSON_AddItemToObject(o, "loss", raw_double(e->loss));
    cJSON_AddItemToObject(o, "grad_norm", raw_double(e->grad_norm));
    cJSON_AddItemToObject(o, "update_norm", raw_double(e->update_norm));
    if (e->worker)
        cJSON_AddStringToObject(o, "worker", e->worker);
    cJSON_AddItemToArray(h->arr, o);
    h->last = e->step;
    return 0;
}

static int h_history(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    srv_session *s;
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
        return srv_storage_fail(r, ctx->db, err, "reading the history");
    }
    if (cJSON_GetArraySize(h.arr) == limit)
        cJSON_AddItemToObject(doc, "next", raw_int(h.last));
    else
        cJSON_AddNullToObject(doc, "next");
    return reply_cjson(r, 200, doc);
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
};

int srv_handle(srv_ctx *ctx, const srv_request *req, api_reply *reply)
{
    return handlers[req->route->id](ctx, req, reply);
}
