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
static int fork_config(cJSON *root, eng_session *s, api_reply *r)
{
    cJSON *patch = cJSON_Duplicate(root, 1);
    if (!patch)
        return api_problem(r, 503, NULL, "out of memory");
    cJSON_DeleteItemFromObjectCaseSensitive(patch, "fork");
    cJSON_DeleteItemFromObjectCaseSensitive(patch, "replay");
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
    if ((err = eng_session_create(ctx->db, s, now)) != ENG_OK) {
        st = srv_engine_fail(r, err, "creating the fork");
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
