/*
 * engine_state.c -- a session's whole optimizer state as one portable
 * safetensors file, and back (GET/PUT /v1/sessions/{name}/state).
 *
 * Tensors: "<name>" holds tensor <name>'s params, "<name>.<buffer>" each of
 * its optimizer buffers under torch's name (exp_avg, momentum_buffer, ...),
 * "optd.accumulation" the pending accumulation of the whole vector when
 * gradients wait.  Metadata (strings): "optd.format" "1", "optd.config" the
 * canonical session config, "optd.state" a JSON object: the session's step,
 * each tensor's own step and scalars (mu_product, eta, mu, ...), each
 * group's client-set values, the plateau scheduler, counters, last lr and
 * loss.  Numbers are printed so that they read back exactly.
 */
#include "server/engine.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STATE_FORMAT "1"

static cJSON *num(double x)
{
    char b[40];
    if (!isfinite(x))
        return isnan(x) ? cJSON_CreateNull() : cJSON_CreateString(x > 0 ? "inf" : "-inf");
    snprintf(b, sizeof b, "%.17g", x);
    return cJSON_CreateRaw(b);
}

/* cJSON_AddItemTo* leave the item to the caller when they fail (out of
 * memory for the key, or no parent): freed here instead of leaking. */
static void put(cJSON *obj, const char *key, cJSON *item)
{
    if (!cJSON_AddItemToObject(obj, key, item))
        cJSON_Delete(item);
}

static void put_elem(cJSON *arr, cJSON *item)
{
    if (!cJSON_AddItemToArray(arr, item))
        cJSON_Delete(item);
}

static double num_of(const cJSON *v, double dflt)
{
    if (cJSON_IsNumber(v))
        return v->valuedouble;
    if (cJSON_IsString(v))
        return strcmp(v->valuestring, "inf") == 0 ? INFINITY
               : strcmp(v->valuestring, "-inf") == 0 ? -INFINITY
                                                      : dflt;
    if (cJSON_IsNull(v))
        return NAN;
    return dflt;
}

static char *state_json(const eng_session *s)
{
    cJSON *o = cJSON_CreateObject();
    put(o, "step", num((double)s->st.step));
    cJSON *steps = cJSON_AddObjectToObject(o, "steps");
    cJSON *scalars = cJSON_AddObjectToObject(o, "scalars");
    cJSON *mi = s->cfg.opt.kind == OPTIM_SGD ? cJSON_AddObjectToObject(o, "momentum_initialized")
                                             : NULL;
    for (size_t t = 0; t < s->cfg.n_tensors; t++) {
        const char *tn = s->cfg.tensors[t].name;
        put(steps, tn, num((double)s->tst[t].step));
        cJSON *sc = cJSON_AddObjectToObject(scalars, tn);
        for (unsigned i = 0; i < OPTIM_MAX_SCALARS; i++) {
            const char *nm = optim_scalar_name(s->cfg.opt.kind, i);
            if (!nm)
                break;
            put(sc, nm, num(s->tst[t].scalars[i]));
        }
        /* torch's SGD makes momentum_buffer at a tensor's first update. */
        if (mi)
            cJSON_AddBoolToObject(mi, tn, s->tst[t].scalars[0] != 0.0);
    }
    cJSON *gs = cJSON_AddArrayToObject(o, "groups");
    for (size_t g = 0; g < s->cfg.n_groups; g++) {
        cJSON *e = cJSON_CreateObject();
        const eng_group_hp *c = &s->gcur[g];
        if (c->has[ENG_HP_LR])
            put(e, "lr", num(c->v[ENG_HP_LR]));
        if (c->has[ENG_HP_MOMENTUM])
            put(e, "momentum", num(c->v[ENG_HP_MOMENTUM]));
        if (c->has[ENG_HP_BETA1]) {
            cJSON *b = cJSON_AddArrayToObject(e, "betas");
            put_elem(b, num(c->v[ENG_HP_BETA1]));
            put_elem(b, num(s->cfg.groups[g].opt.betas[1]));
        }
        put_elem(gs, e);
    }
    cJSON *pl = cJSON_AddObjectToObject(o, "plateau");
    put(pl, "lr", num(s->plateau.lr));
    put(pl, "best", num(s->plateau.best));
    put(pl, "num_bad_epochs", num((double)s->plateau.num_bad_epochs));
    put(pl, "cooldown_counter", num((double)s->plateau.cooldown_counter));
    put(pl, "last_epoch", num((double)s->plateau.last_epoch));
    cJSON *c = cJSON_AddObjectToObject(o, "counters");
    put(c, "applied", num((double)s->n_applied));
    put(c, "rejected_stale", num((double)s->n_stale));
    put(c, "timed_out", num((double)s->n_timeout));
    put(c, "skipped_nonfinite", num((double)s->n_skipped));
    put(o, "accumulated", num((double)s->accum_count));
    put(o, "last_lr", num(s->last_lr));
    put(o, "last_loss", num(s->last_loss));
    cJSON_AddBoolToObject(o, "client_hyperparameters", s->client_hp);
    char *txt = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return txt;
}

int eng_state_export(const eng_session *s, char **body, size_t *len)
{
    return eng_state_export_with(s, NULL, 0, NULL, 0, body, len);
}

int eng_state_export_with(const eng_session *s, const api_st_tensor *more, size_t n_more,
                          const char *const *more_meta, size_t n_more_meta, char **body,
                          size_t *len)
{
    size_t nt = s->cfg.n_tensors, sz = optim_dtype_size(s->cfg.dtype);
    size_t cap = nt * (1 + OPTIM_MAX_BUFFERS) + 1 + n_more;
    api_st_tensor *t = calloc(cap, sizeof *t);
    char **names = calloc(cap, sizeof *names);
    char *cfg = api_config_to_json(&s->cfg), *st = state_json(s);
    int err = t && names && cfg && st ? ENG_OK : ENG_ENOMEM;
    size_t k = 0, data = 0;
    for (size_t i = 0; i < nt && !err; i++) {
        const api_tensor *T = &s->cfg.tensors[i];
        for (int slot = -1; slot < OPTIM_MAX_BUFFERS && !err; slot++) {
            const void *src = slot < 0 ? s->params : s->st.buf[slot];
            if (!src)
                continue;
            const char *bn = slot < 0 ? NULL : optim_buffer_name(s->cfg.opt.kind, (unsigned)slot);
            if (slot >= 0 && !bn)
                continue;
            size_t nl = strlen(T->name) + (bn ? strlen(bn) + 2 : 1);
            if (!(names[k] = malloc(nl))) {
                err = ENG_ENOMEM;
                break;
            }
            snprintf(names[k], nl, bn ? "%s.%s" : "%s", T->name, bn ? bn : "");
            api_st_tensor *e = &t[k++];
            e->name = names[k - 1];
            e->dtype = s->cfg.dtype;
            e->ndim = T->ndim;
            memcpy(e->shape, T->shape, sizeof e->shape);
            e->data = (const char *)src + T->offset * sz;
            e->bytes = (size_t)T->size * sz;
            data += e->bytes;
        }
    }
    if (!err && s->accum_count > 0 && s->accum) {
        api_st_tensor *e = &t[k++];
        e->name = "optd.accumulation";
        e->dtype = s->cfg.dtype;
        e->ndim = 1;
        e->shape[0] = (int64_t)s->cfg.size;
        e->data = s->accum;
        e->bytes = (size_t)s->cfg.size * sz;
        data += e->bytes;
    }
    for (size_t i = 0; i < n_more && !err; i++) {
        t[k++] = more[i];
        data += more[i].bytes;
    }
    size_t hl = 0;
    char *hdr = NULL;
    const char **meta = calloc(6 + 2 * n_more_meta, sizeof *meta);
    if (!meta)
        err = ENG_ENOMEM;
    if (!err) {
        meta[0] = "optd.format", meta[1] = STATE_FORMAT, meta[2] = "optd.config", meta[3] = cfg;
        meta[4] = "optd.state", meta[5] = st;
        for (size_t i = 0; i < 2 * n_more_meta; i++)
            meta[6 + i] = more_meta[i];
        hdr = api_st_header(t, k, meta, 3 + n_more_meta, &hl);
        if (!hdr)
            err = ENG_ENOMEM;
    }
    free(meta);
    char *out = err ? NULL : malloc(hl + data);
    if (!err && out) {
        memcpy(out, hdr, hl);
        size_t off = hl;
        for (size_t i = 0; i < k; i++) {
            memcpy(out + off, t[i].data, t[i].bytes);
            off += t[i].bytes;
        }
        *body = out;
        *len = hl + data;
    } else if (!err) {
        err = ENG_ENOMEM;
    }
    for (size_t i = 0; i < cap && names; i++)
        free(names[i]);
    free(names);
    free(t);
    free(hdr);
    free(cfg);
    cJSON_free(st);
    return err;
}

/* Checks that the file fits s's layout and dtype, naming the first
 * mismatch in err. */
static int check_fit(const eng_session *s, const api_st_tensor *t, size_t n, char *err,
                     size_t errn)
{
    for (size_t i = 0; i < s->cfg.n_tensors; i++) {
        const api_tensor *T = &s->cfg.tensors[i];
        const api_st_tensor *e = api_st_find(t, n, T->name);
        if (!e) {
            snprintf(err, errn, "the file has no tensor %s", T->name);
            return -1;
        }
        if (e->dtype != s->cfg.dtype || e->ndim != T->ndim ||
            memcmp(e->shape, T->shape, (size_t)T->ndim * sizeof T->shape[0]) != 0) {
            snprintf(err, errn, "tensor %s: the file's dtype or shape differs from the session's",
                     T->name);
            return -1;
        }
        for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++) {
            const char *bn = optim_buffer_name(s->cfg.opt.kind, b);
            if (!bn)
                break;
            char nm[API_TENSOR_NAME_MAX + 32];
            snprintf(nm, sizeof nm, "%s.%s", T->name, bn);
            const api_st_tensor *be = api_st_find(t, n, nm);
            if (be && (be->dtype != s->cfg.dtype || be->bytes != (size_t)T->size *
                                                                     optim_dtype_size(s->cfg.dtype))) {
                snprintf(err, errn, "tensor %s: dtype or size differs from the session's", nm);
                return -1;
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (strcmp(t[i].name, "optd.accumulation") == 0)
            continue;
        bool known = false;
        for (size_t k = 0; k < s->cfg.n_tensors && !known; k++) {
            const char *tn = s->cfg.tensors[k].name;
            size_t l = strlen(tn);
            if (strncmp(t[i].name, tn, l) != 0)
                continue;
            if (t[i].name[l] == '\0')
                known = true;
            for (unsigned b = 0; b < OPTIM_MAX_BUFFERS && !known && t[i].name[l] == '.'; b++) {
                const char *bn = optim_buffer_name(s->cfg.opt.kind, b);
                known = bn && strcmp(t[i].name + l + 1, bn) == 0;
            }
        }
        if (!known) {
            snprintf(err, errn, "the file's tensor %s is not part of this session's state",
                     t[i].name);
            return -1;
        }
    }
    return 0;
}

int eng_state_import(eng_session *s, const api_st_tensor *t, size_t n, const char *state_json_text,
                     char *err, size_t errn)
{
    if (check_fit(s, t, n, err, errn))
        return ENG_EDAMAGED;
    cJSON *o = state_json_text ? cJSON_Parse(state_json_text) : NULL;
    cJSON *steps = cJSON_GetObjectItemCaseSensitive(o, "steps");
    cJSON *scalars = cJSON_GetObjectItemCaseSensitive(o, "scalars");
    if (!cJSON_IsObject(o) || !cJSON_IsObject(steps)) {
        cJSON_Delete(o);
        snprintf(err, errn, "the file's optd.state metadata is missing or has no \"steps\"");
        return ENG_EDAMAGED;
    }
    const api_st_tensor *acc = api_st_find(t, n, "optd.accumulation");
    double accumulated = num_of(cJSON_GetObjectItemCaseSensitive(o, "accumulated"), 0);
    if ((acc && (acc->dtype != s->cfg.dtype ||
                 acc->bytes != (size_t)s->cfg.size * optim_dtype_size(s->cfg.dtype))) ||
        (accumulated > 0 && !acc) || accumulated < 0 ||
        (accumulated > 0 && accumulated >= (double)s->cfg.mode.accumulate)) {
        cJSON_Delete(o);
        snprintf(err, errn, "the file's pending accumulation does not fit the session");
        return ENG_EDAMAGED;
    }
    /* Every buffer the file holds must exist here before anything changes. */
    size_t sz = optim_dtype_size(s->cfg.dtype);
    for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++) {
        const char *bn = optim_buffer_name(s->cfg.opt.kind, b);
        if (!bn || s->st.buf[b])
            continue;
        for (size_t i = 0; i < s->cfg.n_tensors && !s->st.buf[b]; i++) {
            char nm[API_TENSOR_NAME_MAX + 32];
            snprintf(nm, sizeof nm, "%s.%s", s->cfg.tensors[i].name, bn);
            if (api_st_find(t, n, nm)) {
                s->st.buf[b] = calloc(1, s->cfg.size > 0 ? (size_t)s->cfg.size * sz : 1);
                if (!s->st.buf[b]) {
                    cJSON_Delete(o);
                    return ENG_ENOMEM;
                }
            }
        }
    }
    if (s->cfg.mode.accumulate > 1 && !s->accum &&
        !(s->accum = calloc(1, s->cfg.size > 0 ? (size_t)s->cfg.size * sz : 1))) {
        cJSON_Delete(o);
        return ENG_ENOMEM;
    }
    if (eng_params_own(s) != ENG_OK) {
        cJSON_Delete(o);
        return ENG_ENOMEM;
    }
    /* From here nothing fails. */
    for (size_t i = 0; i < s->cfg.n_tensors; i++) {
        const api_tensor *T = &s->cfg.tensors[i];
        const api_st_tensor *e = api_st_find(t, n, T->name);
        memcpy((char *)s->params + T->offset * sz, e->data, e->bytes);
        for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++) {
            const char *bn = optim_buffer_name(s->cfg.opt.kind, b);
            if (!bn)
                break;
            char nm[API_TENSOR_NAME_MAX + 32];
            snprintf(nm, sizeof nm, "%s.%s", T->name, bn);
            const api_st_tensor *be = api_st_find(t, n, nm);
            if (be)
                memcpy((char *)s->st.buf[b] + T->offset * sz, be->data, be->bytes);
        }
        s->tst[i].step = (uint64_t)num_of(cJSON_GetObjectItemCaseSensitive(steps, T->name), 0);
        cJSON *sc = cJSON_GetObjectItemCaseSensitive(scalars, T->name);
        for (unsigned k = 0; k < OPTIM_MAX_SCALARS; k++) {
            const char *nm = optim_scalar_name(s->cfg.opt.kind, k);
            if (!nm)
                break;
            cJSON *v = cJSON_GetObjectItemCaseSensitive(sc, nm);
            if (v)
                s->tst[i].scalars[k] = num_of(v, s->tst[i].scalars[k]);
        }
        cJSON *mi = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(o, "momentum_initialized"), T->name);
        if (s->cfg.opt.kind == OPTIM_SGD && mi)
            s->tst[i].scalars[0] = cJSON_IsTrue(mi) ? 1.0 : 0.0;
    }
    s->st.step = (uint64_t)num_of(cJSON_GetObjectItemCaseSensitive(o, "step"), 0);
    cJSON *gs = cJSON_GetObjectItemCaseSensitive(o, "groups");
    for (size_t g = 0; g < s->cfg.n_groups; g++) {
        cJSON *e = cJSON_GetArrayItem(gs, (int)g);
        cJSON *lr = cJSON_GetObjectItemCaseSensitive(e, "lr");
        cJSON *mo = cJSON_GetObjectItemCaseSensitive(e, "momentum");
        cJSON *be = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(e, "betas"), 0);
        cJSON *vals[ENG_HP_COUNT] = {lr, mo, be};
        for (int k = 0; k < ENG_HP_COUNT; k++) {
            s->gcur[g].has[k] = vals[k] != NULL;
            s->gcur[g].v[k] = vals[k] ? num_of(vals[k], 0) : 0;
        }
    }
    s->client_hp = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "client_hyperparameters"));
    cJSON *pl = cJSON_GetObjectItemCaseSensitive(o, "plateau");
    if (pl) {
        s->plateau.lr = num_of(cJSON_GetObjectItemCaseSensitive(pl, "lr"), s->plateau.lr);
        s->plateau.best = num_of(cJSON_GetObjectItemCaseSensitive(pl, "best"), s->plateau.best);
        s->plateau.num_bad_epochs =
            (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(pl, "num_bad_epochs"), 0);
        s->plateau.cooldown_counter =
            (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(pl, "cooldown_counter"), 0);
        s->plateau.last_epoch = (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(pl, "last_epoch"), 0);
    }
    cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "counters");
    s->n_applied = (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(c, "applied"), 0);
    s->n_stale = (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(c, "rejected_stale"), 0);
    s->n_timeout = (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(c, "timed_out"), 0);
    s->n_skipped = (int64_t)num_of(cJSON_GetObjectItemCaseSensitive(c, "skipped_nonfinite"), 0);
    s->last_lr = num_of(cJSON_GetObjectItemCaseSensitive(o, "last_lr"), NAN);
    s->last_loss = num_of(cJSON_GetObjectItemCaseSensitive(o, "last_loss"), NAN);
    s->accum_count = (int64_t)accumulated;
    if (s->accum) {
        if (acc && accumulated > 0)
            memcpy(s->accum, acc->data, acc->bytes);
        else
            memset(s->accum, 0, (size_t)s->cfg.size * sz);
    }
    cJSON_Delete(o);
    return ENG_OK;
}
