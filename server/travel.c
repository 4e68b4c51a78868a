/*
 * travel.c -- a session's history as something to use: kept checkpoints
 * (list, take one by label), rollback to a step, fork at a step (with
 * another config, and optionally a counterfactual replay of the parent's
 * logged gradients).  Handlers only: decode, call the engine / storage,
 * map.  Design and guarantees: docs/api.md "Time travel" and
 * docs/storage.md "Kept checkpoints".
 *
 * Atomicity: a rollback is one storage commit (storage_rollback); a fork
 * is built under a temporary name ("~fork-...", which no request can name)
 * and renamed in one commit when complete; a crash before that leaves a
 * session storage_open deletes.  Nothing half-done is ever visible.
 */
#include "server/server.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LABEL_MAX 128

static cJSON *parse_or_reply(const srv_request *req, api_reply *r)
{
    cJSON *root = cJSON_ParseWithLength(req->body ? req->body : "", req->body_len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        api_problem(r, 400, NULL, "the body must be a JSON object");
        return NULL;
    }
    return root;
}

static bool json_i64(const cJSON *v, int64_t *out)
{
    if (!cJSON_IsNumber(v))
        return false;
    double d = v->valuedouble;
    if (d != floor(d) || d < 0 || d > 9007199254740992.0)
        return false;
    *out = (int64_t)d;
    return true;
}

static int reply_doc(api_reply *r, int status, cJSON *doc)
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
    if (!d)
        return api_problem(r, 503, NULL, "out of memory");
    api_reply_body(r, status, "application/json", d, n);
    return status;
}

static void add_int(cJSON *o, const char *k, int64_t v)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%" PRId64, v);
    cJSON_AddItemToObject(o, k, cJSON_CreateRaw(tmp));
}

static void add_time(cJSON *o, const char *k, int64_t ms)
{
    char tmp[96];
    time_t sec = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    snprintf(tmp, sizeof tmp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    cJSON_AddStringToObject(o, k, tmp);
}

static const char *kind_name(int kind)
{
    switch (kind) {
    case STORAGE_CKPT_ANCHOR: return "anchor";
    case STORAGE_CKPT_PERIODIC: return "periodic";
    case STORAGE_CKPT_LABEL: return "label";
    default: return "auto";
    }
}

/* A storage result of a travel request as a reply: ERANGE is 409 (the
 * step is not in the kept history), the rest as elsewhere. */
static int travel_fail(api_reply *r, int err, const char *field, const char *what)
{
    if (err == STORAGE_ERANGE)
        return api_problem(r, 409, field, "%s; nothing was changed", storage_last_error());
    return srv_engine_fail(r, err, what);
}

/* ------------------------------------------------------ checkpoints */

static int list_row(void *ud, const storage_ckpt_info *c)
{
    cJSON *o = cJSON_CreateObject();
    add_int(o, "step", c->step);
    add_time(o, "time", c->time_ms);
    if (c->label)
        cJSON_AddStringToObject(o, "label", c->label);
    else
        cJSON_AddNullToObject(o, "label");
    cJSON_AddStringToObject(o, "kind", kind_name(c->kind));
    add_int(o, "bytes", c->bytes);
    cJSON_AddItemToArray((cJSON *)ud, o);
    return 0;
}

int srv_h_checkpoints_get(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s;
    int err = srv_registry_acquire(ctx->reg, req->name, &s);
    if (err == STORAGE_ENOTFOUND)
        return api_problem(r, 404, "name", "no session named %s", req->name);
    if (err != STORAGE_OK)
        return srv_engine_fail(r, err, "loading the session");
    cJSON *doc = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(doc, "checkpoints");
    err = storage_ckpt_list(ctx->db, s->id, list_row, arr);
    cJSON *first = cJSON_GetArrayItem(arr, 0);
    if (first)
        cJSON_AddItemToObject(doc, "oldest_step",
                              cJSON_Duplicate(cJSON_GetObjectItem(first, "step"), 1));
    add_int(doc, "step", (int64_t)s->st.step);
    srv_registry_release(ctx->reg, s);
    if (err != STORAGE_OK) {
        cJSON_Delete(doc);
        return srv_engine_fail(r, err, "listing the checkpoints");
    }
    return reply_doc(r, 200, doc);
}

static bool label_valid(const char *l)
{
    size_t n = strlen(l);
    return n >= 1 && n <= LABEL_MAX && api_name_valid(l, n);
}

int srv_h_checkpoints_post(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    cJSON *root = parse_or_reply(req, r);
    if (!root)
        return 400;
    int st = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "label") != 0) {
            st = api_problem(r, 400, m->string, "unknown field \"%s\" (label)", m->string);
            break;
        }
    }
    const cJSON *jl = cJSON_GetObjectItemCaseSensitive(root, "label");
    if (!st && (!cJSON_IsString(jl) || !label_valid(jl->valuestring)))
        st = api_problem(r, 400, "label",
                         "label is required: 1-%d characters of A-Z a-z 0-9 . _ -", LABEL_MAX);
    eng_session *s = NULL;
    if (!st) {
        int err = srv_registry_acquire(ctx->reg, req->name, &s);
        if (err == STORAGE_ENOTFOUND)
            st = api_problem(r, 404, "name", "no session named %s", req->name);
        else if (err != STORAGE_OK)
            st = srv_engine_fail(r, err, "loading the session");
    }
    if (!st) {
        int err = eng_checkpoint_kind(ctx->db, s, false, STORAGE_CKPT_LABEL, jl->valuestring);
        if (err == STORAGE_EEXIST) {
            st = api_problem(r, 409, "label", "%s", storage_last_error());
        } else if (err != STORAGE_OK) {
            st = srv_engine_fail(r, err, "writing the checkpoint");
        } else {
            cJSON *o = cJSON_CreateObject();
            add_int(o, "step", (int64_t)s->st.step);
            add_time(o, "time", s->updated_ms);
            cJSON_AddStringToObject(o, "label", jl->valuestring);
            cJSON_AddStringToObject(o, "kind", "label");
            st = reply_doc(r, 201, o);
        }
        srv_registry_release(ctx->reg, s);
    }
    cJSON_Delete(root);
    return st;
}

/* --------------------------------------------------------- rollback */

int srv_h_rollback(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    cJSON *root = parse_or_reply(req, r);
    if (!root)
        return 400;
    int st = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "step") != 0 && strcmp(m->string, "label") != 0) {
            st = api_problem(r, 400, m->string, "unknown field \"%s\" (step, label)", m->string);
            break;
        }
    }
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(root, "step");
    const cJSON *jl = cJSON_GetObjectItemCaseSensitive(root, "label");
    int64_t t = -1;
    if (!st && !!js == !!jl)
        st = api_problem(r, 400, "step", "give the step to return to, or the label of a kept "
                                         "checkpoint (one of them)");
    if (!st && js && !json_i64(js, &t))
        st = api_problem(r, 400, "step", "step must be an integer >= 0");
    if (!st && jl && (!cJSON_IsString(jl) || !label_valid(jl->valuestring)))
        st = api_problem(r, 400, "label", "label must be 1-%d characters of A-Z a-z 0-9 . _ -",
                         LABEL_MAX);
    eng_session *s = NULL;
    if (!st) {
        int err = srv_registry_acquire(ctx->reg, req->name, &s);
        if (err == STORAGE_ENOTFOUND)
            st = api_problem(r, 404, "name", "no session named %s", req->name);
        else if (err != STORAGE_OK)
            st = srv_engine_fail(r, err, "loading the session");
    }
    if (!st && jl) {
        int64_t found = storage_ckpt_step(ctx->db, s->id, jl->valuestring);
        if (found < 0)
            st = found == STORAGE_ENOTFOUND
                     ? api_problem(r, 404, "label", "session %s has no checkpoint labelled %s",
                                   s->name, jl->valuestring)
                     : srv_engine_fail(r, (int)found, "finding the checkpoint");
        t = found;
    }
    if (s && !st && t > (int64_t)s->st.step)
        st = api_problem_with(r, 422, "step", "step", (int64_t)s->st.step,
                              "step %lld is after the session's step %lld", (long long)t,
                              (long long)s->st.step);
    if (s && !st) {
        int64_t seq;
        int err = storage_rollback(ctx->db, s->id, t, srv_now_ms(), &seq);
        if (err != STORAGE_OK) {
            st = travel_fail(r, err, "step", "rolling back");
        } else {
            /* The round in flight was for a state that is gone. */
            if (s->round_count > 0)
                srv_sync_abort(ctx, s, 409, "the session was rolled back; the round was "
                                            "dropped: pull the params and resend");
            /* Memory is ahead of disk now: the next use (this one) loads
             * the nearest checkpoint and replays the log up to t. */
            srv_registry_drop(ctx->reg, s);
            srv_registry_release(ctx->reg, s);
            s = NULL;
            err = srv_registry_acquire(ctx->reg, req->name, &s);
            if (err != STORAGE_OK) {
                s = NULL;
                st = srv_engine_fail(r, err, "loading the rolled-back session");
            } else {
                srv_log(SRV_LOG_INFO, "session %s rolled back to step %lld", s->name,
                        (long long)t);
                st = srv_reply_session(r, 200, s);
            }
        }
    }
    if (s)
        srv_registry_release(ctx->reg, s);
    cJSON_Delete(root);
    return st;
}

/* ------------------------------------------------------------- fork */

static atomic_ullong fork_counter;

static const char *const fork_refused[] = {"params", "size", "init", "dtype", "tensors", NULL};

/* Fills cfg (a copy of the fork's config at t) with the body's PATCH-like
 * fields; 0 or the problem's status. */
/* The optimizer's type in a fork body's "optimizer" ("adam" or
 * {"type": "adam", ...}), or NULL when it names none. */
static const char *body_type(const cJSON *opt)
{
    if (cJSON_IsString(opt))
        return opt->valuestring;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(opt, "type");
    return cJSON_IsString(t) ? t->valuestring : NULL;
}

/* A fork to another optimizer type: the config becomes the parent's with
 * this optimizer (its hyperparameters from the body, the rest torch's
 * defaults), and the state keeps the params (and a pending accumulation)
 * and the session's step, while the optimizer's own state starts afresh:
 * no buffers, every tensor's step 0 (torch: a new optimizer over the same
 * parameters). */
static int fork_new_optimizer(const cJSON *opt, eng_session *s, api_reply *r)
{
    char *cur = api_config_to_json(&s->cfg);
    cJSON *doc = cur ? cJSON_Parse(cur) : NULL;
    free(cur);
    if (!doc)
        return api_problem(r, 503, NULL, "out of memory");
    cJSON *o = cJSON_IsString(opt) ? cJSON_CreateObject() : cJSON_Duplicate(opt, 1);
    if (o && cJSON_IsString(opt))
        cJSON_AddStringToObject(o, "type", opt->valuestring);
    cJSON_ReplaceItemInObjectCaseSensitive(doc, "optimizer", o);
    char *text = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    if (!text)
        return api_problem(r, 503, NULL, "out of memory");
    /* Decoded as a create would be (the same messages), then checked as a
     * stored config (the layout and the groups' overrides must fit). */
    api_config probe, next;
    api_init init;
    void *params = NULL;
    cJSON *check = cJSON_Parse(text);
    if (check) {
        cJSON_DeleteItemFromObjectCaseSensitive(check, "groups");
        cJSON_DeleteItemFromObjectCaseSensitive(check, "tensors");
        cJSON_DeleteItemFromObjectCaseSensitive(check, "retain");
    }
    char *ctext = check ? cJSON_PrintUnformatted(check) : NULL;
    cJSON_Delete(check);
    int st = ctext ? api_decode_create(ctext, strlen(ctext), SIZE_MAX, &probe, &init, &params, r)
                   : api_problem(r, 503, NULL, "out of memory");
    cJSON_free(ctext);
    free(params);
    if (st) {
        cJSON_free(text);
        return st;
    }
    api_config_free(&probe);
    int bad = api_config_from_json(text, &next);
    cJSON_free(text);
    if (bad)
        return api_problem(r, 400, "optimizer",
                           "the parent's groups set hyperparameters the new optimizer does not "
                           "have; fork with the same optimizer type, or PATCH the groups first");
    api_config_free(&s->cfg);
    s->cfg = next;
    for (size_t t = 0; t < s->cfg.n_tensors; t++)
        memset(&s->tst[t], 0, sizeof s->tst[t]);
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        free(s->st.buf[i]);
        s->st.buf[i] = NULL;
    }
    s->client_hp = false;
    optim_plateau_init(&s->cfg.sched, s->cfg.opt.lr, &s->plateau);
    return 0;
}

static int fork_config(cJSON *root, eng_session *s, api_reply *r)
{
    const cJSON *jo = cJSON_GetObjectItemCaseSensitive(root, "optimizer");
    const char *type = jo ? body_type(jo) : NULL;
    bool new_type = type && strcmp(type, optim_info_of(s->cfg.opt.kind)->name) != 0;
    if (new_type) {
        int st = fork_new_optimizer(jo, s, r);
        if (st)
            return st;
    }
    cJSON *patch = cJSON_Duplicate(root, 1);
    if (!patch)
        return api_problem(r, 503, NULL, "out of memory");
    cJSON_DeleteItemFromObjectCaseSensitive(patch, "fork");
    cJSON_DeleteItemFromObjectCaseSensitive(patch, "replay");
    if (new_type)
        cJSON_DeleteItemFromObjectCaseSensitive(patch, "optimizer");
    char *text = cJSON_PrintUnformatted(patch);
    cJSON_Delete(patch);
    if (!text)
        return api_problem(r, 503, NULL, "out of memory");
    api_config next;
    if (api_config_copy(&next, &s->cfg)) {
        cJSON_free(text);
        return api_problem(r, 503, NULL, "out of memory");
    }
    int st = api_decode_patch(text, strlen(text), &next, r);
    cJSON_free(text);
    if (!st && s->accum_count > 0 && next.mode.accumulate != s->cfg.mode.accumulate)
        st = api_problem(r, 409, "mode.accumulate",
                         "%lld gradients are pending accumulation at that step; fork with the "
                         "same accumulate",
                         (long long)s->accum_count);
    if (!st && s->client_hp && (next.sched.kind != OPTIM_SCHED_NONE || next.sched.warmup_steps > 0))
        st = api_problem(r, 409, "schedule", "the parent takes its groups' lr and momentum from "
                                             "the client; the fork cannot have a schedule");
    if (st) {
        api_config_free(&next);
        return st;
    }
    bool sched_changed = memcmp(&next.sched, &s->cfg.sched, sizeof next.sched) != 0 ||
                         next.opt.lr != s->cfg.opt.lr;
    api_config_free(&s->cfg);
    s->cfg = next;
    if (sched_changed)
        optim_plateau_init(&s->cfg.sched, s->cfg.opt.lr, &s->plateau);
    eng_config_changed(s);
    if (eng_ensure_buffers(s) != ENG_OK)
        return api_problem(r, 503, NULL, "out of memory");
    return 0;
}

int srv_fork(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    cJSON *root = cJSON_ParseWithLength(req->body ? req->body : "", req->body_len);
    const cJSON *jf = root ? cJSON_GetObjectItemCaseSensitive(root, "fork") : NULL;
    if (!jf) {
        cJSON_Delete(root);
        return 0; /* not a fork */
    }
    int st = 0;
    for (int i = 0; fork_refused[i] && !st; i++)
        if (cJSON_GetObjectItemCaseSensitive(root, fork_refused[i]))
            st = api_problem(r, 400, fork_refused[i],
                             "\"%s\" cannot be given with fork: a fork has its parent's layout "
                             "and state",
                             fork_refused[i]);
    const cJSON *from = cJSON_GetObjectItemCaseSensitive(jf, "from");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(jf, "step");
    const cJSON *jr = cJSON_GetObjectItemCaseSensitive(root, "replay");
    int64_t t = -1;
    if (!st && !cJSON_IsObject(jf))
        st = api_problem(r, 400, "fork", "fork must be {\"from\": name, \"step\": t}");
    if (!st) {
        const cJSON *m;
        cJSON_ArrayForEach(m, jf)
        {
            if (strcmp(m->string, "from") != 0 && strcmp(m->string, "step") != 0) {
                st = api_problem(r, 400, "fork", "unknown field \"fork.%s\" (from, step)",
                                 m->string);
                break;
            }
        }
    }
    if (!st && (!cJSON_IsString(from) || !api_name_valid(from->valuestring,
                                                          strlen(from->valuestring))))
        st = api_problem(r, 400, "fork.from", "fork.from must be a session name");
    if (!st && !srv_auth_name_ok(req->who, from->valuestring))
        st = api_problem(r, 403, "prefix", "session %s is outside this token's prefix \"%s\"",
                         from->valuestring, req->who->prefix);
    if (!st && strcmp(from->valuestring, req->name) == 0)
        st = api_problem(r, 400, "fork.from", "a session cannot be forked onto itself");
    if (!st && js && !json_i64(js, &t))
        st = api_problem(r, 400, "fork.step", "fork.step must be an integer >= 0");
    if (!st && jr && !cJSON_IsBool(jr))
        st = api_problem(r, 400, "replay", "replay must be true or false");
    bool replay = jr && cJSON_IsTrue(jr);
    if (st) {
        cJSON_Delete(root);
        return st;
    }
    storage_session_info info;
    int err = storage_session_get(ctx->db, req->name, &info);
    if (err == STORAGE_OK) {
        storage_session_info_free(&info);
        cJSON_Delete(root);
        return api_problem(r, 409, "name", "a session named %s exists; a fork creates a new "
                                           "one (delete it first)", req->name);
    }
    eng_session *parent = NULL, *s = NULL;
    err = srv_registry_acquire(ctx->reg, from->valuestring, &parent);
    if (err != STORAGE_OK) {
        st = err == STORAGE_ENOTFOUND
                 ? api_problem(r, 404, "fork.from", "no session named %s", from->valuestring)
                 : srv_engine_fail(r, err, "loading the parent");
        cJSON_Delete(root);
        return st;
    }
    int64_t head = (int64_t)parent->st.step;
    if (t < 0)
        t = head;
    if (t > head) {
        st = api_problem_with(r, 422, "fork.step", "step", head,
                              "fork.step %lld is after session %s's step %lld", (long long)t,
                              parent->name, (long long)head);
        goto out;
    }
    char tmp[64];
    snprintf(tmp, sizeof tmp, "~fork-%llx-%llx", (unsigned long long)srv_now_ms(),
             (unsigned long long)atomic_fetch_add(&fork_counter, 1));
    if (!(s = eng_session_shell(tmp))) {
        st = api_problem(r, 503, NULL, "out of memory");
        goto out;
    }
    eng_lock(s);
    char *parent_cfg = api_config_to_json(&parent->cfg);
    int64_t seq = 0;
    err = parent_cfg ? eng_session_load_at(ctx->db, ctx->pool, s, parent->id, t, parent_cfg, &seq)
                     : ENG_ENOMEM;
    free(parent_cfg);
    if (err != ENG_OK) {
        st = travel_fail(r, err, "fork.step", "reading the parent's state");
        goto out;
    }
    if ((st = fork_config(root, s, r)))
        goto out;
    s->seq = 0;
    s->log_bytes = 0;
    int64_t now = srv_now_ms();
    if ((err = srv_auth_create(ctx->db, req->who, s, now, r)) != ENG_OK) {
        st = err == SRV_EQUOTA ? 429 : srv_engine_fail(r, err, "creating the fork");
        goto out;
    }
    int64_t rows = 0;
    if (replay && (err = eng_relog(ctx->db, ctx->pool, s, parent->id, seq, parent->seq, &rows))) {
        st = travel_fail(r, err, "replay", "replaying the parent's log");
        storage_session_delete(ctx->db, tmp);
        goto out;
    }
    if ((err = storage_session_rename(ctx->db, s->id, req->name)) != STORAGE_OK) {
        st = err == STORAGE_EEXIST
                 ? api_problem(r, 409, "name", "a session named %s was created meanwhile",
                               req->name)
                 : srv_engine_fail(r, err, "naming the fork");
        storage_session_delete(ctx->db, tmp);
        goto out;
    }
    snprintf(s->name, sizeof s->name, "%s", req->name);
    srv_log(SRV_LOG_INFO, "session %s forked from %s at step %lld%s (%lld rows replayed)",
            s->name, parent->name, (long long)t, replay ? ", replayed" : "", (long long)rows);
    st = srv_reply_session(r, 201, s);
    api_reply_header(r, "Location", "/v1/sessions/%s", req->name);
    eng_unlock(s);
    srv_registry_insert(ctx->reg, s);
    s = NULL;
out:
    if (s) {
        eng_unlock(s);
        eng_session_free(s);
    }
    srv_registry_release(ctx->reg, parent);
    cJSON_Delete(root);
    return st;
}

/* ------------------------------------------------------ export/import
 *
 * The file is the state file (GET /state) with more: "optd.export" "1"
 * in the metadata, and with the log, the state is the one of the log's
 * base (the oldest kept checkpoint, or the newest anchor after it: from
 * there every row replays under one config), each row's gradient a tensor
 * "optd.log.<seq>", the rows in "optd.log" (JSON) and the head to reach in
 * "optd.head" ({"step", "params_crc"}).  An import replays the rows through
 * the engine and checks the head before the session becomes visible.
 */

typedef struct {
    cJSON *rows;
    api_st_tensor *t;
    char **names;
    void **data;
    size_t n, cap;
    optim_dtype dtype;
    int64_t first_seq;
} log_acc;

static void log_acc_free(log_acc *a)
{
    for (size_t i = 0; i < a->n; i++) {
        free(a->names[i]);
        free(a->data[i]);
    }
    free(a->names);
    free(a->data);
    free(a->t);
    cJSON_Delete(a->rows);
}

static cJSON *num_or_null(double x)
{
    char tmp[40];
    if (!isfinite(x))
        return cJSON_CreateNull();
    snprintf(tmp, sizeof tmp, "%.17g", x);
    return cJSON_CreateRaw(tmp);
}

static int log_row(void *ud, const storage_log_entry *e)
{
    log_acc *a = ud;
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return STORAGE_ENOMEM;
    cJSON_AddItemToArray(a->rows, o);
    add_int(o, "seq", e->seq);
    add_int(o, "kind", e->kind);
    add_int(o, "step", e->step);
    add_int(o, "time_ms", e->time_ms);
    cJSON_AddItemToObject(o, "lr", num_or_null(e->lr));
    cJSON_AddItemToObject(o, "factor", num_or_null(e->factor));
    cJSON_AddItemToObject(o, "loss", num_or_null(e->loss));
    cJSON_AddItemToObject(o, "grad_norm", num_or_null(e->grad_norm));
    cJSON_AddItemToObject(o, "update_norm", num_or_null(e->update_norm));
    if (e->worker)
        cJSON_AddStringToObject(o, "worker", e->worker);
    if (e->extra && e->extra_len) {
        char *hex = malloc(2 * e->extra_len + 1);
        if (!hex)
            return STORAGE_ENOMEM;
        for (size_t i = 0; i < e->extra_len; i++)
            snprintf(hex + 2 * i, 3, "%02x", ((const unsigned char *)e->extra)[i]);
        cJSON_AddStringToObject(o, "extra", hex);
        free(hex);
    }
    if (!e->grad)
        return 0;
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 64;
        api_st_tensor *t = realloc(a->t, cap * sizeof *t);
        if (t)
            a->t = t;
        char **nm = realloc(a->names, cap * sizeof *nm);
        if (nm)
            a->names = nm;
        void **d = realloc(a->data, cap * sizeof *d);
        if (d)
            a->data = d;
        if (!t || !nm || !d)
            return STORAGE_ENOMEM;
        a->cap = cap;
    }
    char name[48];
    snprintf(name, sizeof name, "optd.log.%" PRId64, e->seq);
    void *copy = malloc(e->grad_len ? e->grad_len : 1);
    char *nm = malloc(strlen(name) + 1);
    if (!copy || !nm) {
        free(copy);
        free(nm);
        return STORAGE_ENOMEM;
    }
    memcpy(copy, e->grad, e->grad_len);
    strcpy(nm, name);
    size_t es = optim_dtype_size(a->dtype);
    a->names[a->n] = nm;
    a->data[a->n] = copy;
    a->t[a->n] = (api_st_tensor){.name = nm, .dtype = a->dtype, .ndim = 1,
                                 .shape = {(int64_t)(e->grad_len / es)}, .data = copy,
                                 .bytes = e->grad_len};
    a->n++;
    return 0;
}

typedef struct {
    int64_t oldest_seq, base_seq;
    bool any;
} base_acc;

static int base_row(void *ud, const storage_ckpt_info *c)
{
    base_acc *b = ud;
    if (!b->any) {
        b->any = true;
        b->oldest_seq = b->base_seq = c->seq;
    }
    if (c->kind == STORAGE_CKPT_ANCHOR && c->seq > b->base_seq)
        b->base_seq = c->seq;
    return 0;
}

int srv_export_session(storage *db, eng_pool *pool, eng_session *s, bool with_log, char **body,
                       size_t *len)
{
    ENG_ASSERT_LOCKED(s);
    if (!with_log) {
        const char *meta[] = {"optd.export", "1"};
        return eng_state_export_with(s, NULL, 0, meta, 1, body, len);
    }
    base_acc b = {0};
    int err = storage_ckpt_list(db, s->id, base_row, &b);
    if (err != STORAGE_OK)
        return err;
    if (!b.any)
        return STORAGE_ECORRUPT;
    eng_session *base = eng_session_shell("~export");
    if (!base)
        return ENG_ENOMEM;
    eng_lock(base);
    char *cfg = api_config_to_json(&s->cfg);
    int64_t seq = b.base_seq;
    err = cfg ? eng_session_load_at(db, pool, base, s->id, -1, cfg, &seq) : ENG_ENOMEM;
    free(cfg);
    log_acc a = {.rows = cJSON_CreateArray(), .dtype = s->cfg.dtype};
    if (err == ENG_OK && !a.rows)
        err = ENG_ENOMEM;
    if (err == ENG_OK)
        err = storage_log_read(db, s->id, b.base_seq, s->seq, log_row, &a);
    char *rows = NULL, head[160];
    if (err == ENG_OK && !(rows = cJSON_PrintUnformatted(a.rows)))
        err = ENG_ENOMEM;
    if (err == ENG_OK) {
        size_t vb = (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
        snprintf(head, sizeof head, "{\"step\":%llu,\"params_crc\":%u}",
                 (unsigned long long)s->st.step, storage_crc32(0, s->params, vb));
        const char *meta[] = {"optd.export", "1", "optd.log", rows, "optd.head", head};
        err = eng_state_export_with(base, a.t, a.n, meta, 3, body, len);
    }
    cJSON_free(rows);
    log_acc_free(&a);
    eng_unlock(base);
    eng_session_free(base);
    return err;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static const char *meta_str(const cJSON *doc, const char *key)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(doc, "__metadata__");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double num_of(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* Replays the file's log rows into s; 0, or ENG_EDAMAGED with why. */
static int import_log(storage *db, eng_pool *pool, eng_session *s, const cJSON *rows,
                      const api_st_tensor *t, size_t n, char *why, size_t whyn)
{
    const cJSON *o;
    cJSON_ArrayForEach(o, rows)
    {
        storage_log_entry e;
        memset(&e, 0, sizeof e);
        e.seq = (int64_t)num_of(o, "seq");
        e.kind = (int)num_of(o, "kind");
        e.loss = num_of(o, "loss");
        e.factor = num_of(o, "factor");
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(o, "worker");
        e.worker = cJSON_IsString(w) ? w->valuestring : NULL;
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, "extra");
        unsigned char *extra = NULL;
        if (cJSON_IsString(x)) {
            size_t l = strlen(x->valuestring);
            extra = malloc(l / 2 + 1);
            if (!extra)
                return ENG_ENOMEM;
            for (size_t i = 0; i + 1 < l + 1 && 2 * i < l; i++) {
                int hi = hexval(x->valuestring[2 * i]), lo = hexval(x->valuestring[2 * i + 1]);
                if (hi < 0 || lo < 0 || l % 2) {
                    free(extra);
                    snprintf(why, whyn, "log row %lld: extra is not hex", (long long)e.seq);
                    return ENG_EDAMAGED;
                }
                extra[i] = (unsigned char)(hi * 16 + lo);
            }
            e.extra = extra;
            e.extra_len = l / 2;
        }
        if (e.kind != STORAGE_LOG_SKIP) {
            char name[48];
            snprintf(name, sizeof name, "optd.log.%lld", (long long)e.seq);
            const api_st_tensor *g = api_st_find(t, n, name);
            if (!g || g->dtype != s->cfg.dtype) {
                free(extra);
                snprintf(why, whyn, "log row %lld has no gradient %s of the session's dtype",
                         (long long)e.seq, name);
                return ENG_EDAMAGED;
            }
            e.grad = g->data;
            e.grad_len = g->bytes;
        }
        int err = eng_apply_logged(db, pool, s, &e);
        free(extra);
        if (err == STORAGE_ECORRUPT) {
            snprintf(why, whyn, "log row %lld does not fit the session (absent tensors, groups "
                                "or length)", (long long)e.seq);
            return ENG_EDAMAGED;
        }
        if (err != ENG_OK)
            return err;
    }
    return ENG_OK;
}

static atomic_ullong import_counter;

int srv_import_session(storage *db, eng_pool *pool, const char *name, const char *body,
                       size_t len, size_t max_params, const srv_principal *who,
                       eng_session **out, api_reply *r)
{
    *out = NULL;
    api_st_tensor *t = NULL;
    size_t n = 0;
    cJSON *doc = NULL;
    int st = api_st_parse(body, len, &t, &n, &doc, r);
    if (st)
        return st;
    const char *fmt = meta_str(doc, "optd.format"), *cfg_json = meta_str(doc, "optd.config");
    const char *state_json = meta_str(doc, "optd.state"), *log = meta_str(doc, "optd.log");
    const char *head = meta_str(doc, "optd.head");
    eng_session *s = NULL;
    cJSON *rows = NULL, *hd = NULL;
    api_config cfg;
    bool have_cfg = false;
    char why[300] = "", tmp[64];
    int64_t id = -1;
    if (!fmt || strcmp(fmt, "1") != 0 || !state_json || !cfg_json) {
        st = api_problem(r, 422, NULL, "not an optd export: the metadata needs optd.format "
                                       "\"1\", optd.config and optd.state");
        goto out;
    }
    if (log && (!(rows = cJSON_Parse(log)) || !cJSON_IsArray(rows) || !head ||
                !(hd = cJSON_Parse(head)) || !isfinite(num_of(hd, "step")))) {
        st = api_problem(r, 422, NULL, "the export's optd.log or optd.head is not valid");
        goto out;
    }
    if (api_config_from_json(cfg_json, &cfg)) {
        st = api_problem(r, 422, NULL, "the export's optd.config is not a valid session config");
        goto out;
    }
    have_cfg = true;
    if (cfg.size > max_params) {
        st = api_problem(r, 413, NULL, "the export's session has %llu params; the limit is %zu",
                         (unsigned long long)cfg.size, max_params);
        goto out;
    }
    storage_session_info info;
    int err = storage_session_get(db, name, &info);
    if (err == STORAGE_OK) {
        storage_session_info_free(&info);
        st = api_problem(r, 409, "name", "a session named %s exists; an import creates a new one",
                         name);
        goto out;
    }
    /* the state's own tensors (the log's are not the state's) */
    size_t ns = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(t[i].name, "optd.log.", 9) != 0)
            t[ns++] = t[i];
    api_init zeros = {.type = API_INIT_ZEROS};
    snprintf(tmp, sizeof tmp, "~import-%llx",
             (unsigned long long)atomic_fetch_add(&import_counter, 1));
    if (!(s = eng_session_new(tmp, &cfg, NULL, &zeros))) {
        st = api_problem(r, 503, NULL, "out of memory for the session");
        goto out;
    }
    eng_lock(s);
    err = eng_state_import(s, t, ns, state_json, why, sizeof why);
    if (err == ENG_OK)
        err = srv_auth_create(db, who, s, srv_now_ms(), r);
    if (err == ENG_OK)
        id = s->id;
    if (err == ENG_OK && rows) {
        /* the log tensors again, for the replay */
        api_st_tensor *all = NULL;
        size_t na = 0;
        cJSON *d2 = NULL;
        api_reply scratch = {0};
        if (api_st_parse(body, len, &all, &na, &d2, &scratch) != 0) {
            err = ENG_ENOMEM;
        } else {
            err = import_log(db, pool, s, rows, all, na, why, sizeof why);
        }
        api_reply_free(&scratch);
        free(all);
        cJSON_Delete(d2);
        if (err == ENG_OK) {
            size_t vb = (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype);
            if ((int64_t)s->st.step != (int64_t)num_of(hd, "step") ||
                (double)storage_crc32(0, s->params, vb) != num_of(hd, "params_crc")) {
                snprintf(why, sizeof why, "the replayed log does not reach the exported head "
                                          "(step %lld, params_crc)", (long long)num_of(hd, "step"));
                err = ENG_EDAMAGED;
            }
        }
    }
    if (err == ENG_OK) {
        err = storage_session_rename(db, s->id, name);
        if (err == STORAGE_EEXIST) {
            st = api_problem(r, 409, "name", "a session named %s was created meanwhile", name);
            goto out;
        }
    }
    if (err == SRV_EQUOTA)
        st = 429;
    else if (err == ENG_EDAMAGED)
        st = api_problem(r, 422, NULL, "%s; nothing was created", why);
    else if (err != ENG_OK)
        st = srv_engine_fail(r, err, "importing the session");
    if (err == ENG_OK) {
        snprintf(s->name, sizeof s->name, "%s", name);
        eng_unlock(s);
        *out = s;
        s = NULL;
    }
out:
    if (s) {
        if (id >= 0)
            storage_session_delete(db, tmp);
        eng_unlock(s);
        eng_session_free(s);
    }
    if (have_cfg)
        api_config_free(&cfg);
    cJSON_Delete(rows);
    cJSON_Delete(hd);
    cJSON_Delete(doc);
    free(t);
    return st;
}

int srv_h_export_get(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    const char *ql = req->query(req->conn, "log");
    if (ql && strcmp(ql, "true") != 0 && strcmp(ql, "false") != 0)
        return api_problem(r, 400, "log", "the query parameter log must be true or false");
    eng_session *s;
    int err = srv_registry_acquire(ctx->reg, req->name, &s);
    if (err == STORAGE_ENOTFOUND)
        return api_problem(r, 404, "name", "no session named %s", req->name);
    if (err != STORAGE_OK)
        return srv_engine_fail(r, err, "loading the session");
    char *body = NULL;
    size_t len = 0;
    int st;
    err = srv_export_session(ctx->db, ctx->pool, s, ql && strcmp(ql, "true") == 0, &body, &len);
    if (err == ENG_OK) {
        api_reply_body(r, 200, "application/octet-stream", body, len);
        api_reply_header(r, "Optd-Step", "%llu", (unsigned long long)s->st.step);
        st = 200;
    } else {
        st = srv_engine_fail(r, err, "exporting the session");
    }
    srv_registry_release(ctx->reg, s);
    return st;
}

int srv_h_export_put(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    eng_session *s = NULL;
    int st = srv_import_session(ctx->db, ctx->pool, req->name, req->body, req->body_len,
                                ctx->cfg->max_params, req->who, &s, r);
    if (st)
        return st;
    st = srv_reply_session(r, 201, s);
    api_reply_header(r, "Location", "/v1/sessions/%s", req->name);
    srv_registry_insert(ctx->reg, s);
    return st;
}
