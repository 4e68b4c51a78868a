/*
 * session_config.c -- session configuration: decoding create/PATCH bodies through
 * optim's hyperparameter tables, the canonical JSON form stored with a
 * session, the /v1/optimizers catalogue, and deterministic initialisation.
 */
#include "api/api.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

#define MODE_DEFAULT_TIMEOUT_MS 30000

static void layout_free(api_config *c)
{
    for (size_t i = 0; i < c->n_tensors; i++)
        free(c->tensors[i].name);
    free(c->tensors);
    for (size_t i = 0; i < c->n_groups; i++) {
        free(c->groups[i].tensors);
        free(c->groups[i].overrides);
    }
    free(c->groups);
    c->tensors = NULL;
    c->groups = NULL;
    c->n_tensors = c->n_groups = 0;
}

void api_config_free(api_config *c)
{
    free(c->metadata);
    c->metadata = NULL;
    layout_free(c);
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

int api_config_copy(api_config *dst, const api_config *src)
{
    *dst = *src;
    dst->metadata = NULL;
    dst->tensors = NULL;
    dst->groups = NULL;
    dst->n_tensors = dst->n_groups = 0;
    if (src->metadata && !(dst->metadata = dup_str(src->metadata)))
        return -1;
    if (src->n_tensors) {
        if (!(dst->tensors = calloc(src->n_tensors, sizeof *dst->tensors)))
            goto oom;
        dst->n_tensors = src->n_tensors;
        for (size_t i = 0; i < src->n_tensors; i++) {
            dst->tensors[i] = src->tensors[i];
            if (!(dst->tensors[i].name = dup_str(src->tensors[i].name)))
                goto oom;
        }
    }
    if (src->n_groups) {
        if (!(dst->groups = calloc(src->n_groups, sizeof *dst->groups)))
            goto oom;
        dst->n_groups = src->n_groups;
        for (size_t g = 0; g < src->n_groups; g++) {
            const api_group *a = &src->groups[g];
            api_group *b = &dst->groups[g];
            b->opt = a->opt;
            b->n_tensors = a->n_tensors;
            b->tensors = malloc((a->n_tensors ? a->n_tensors : 1) * sizeof *b->tensors);
            b->overrides = dup_str(a->overrides);
            if (!b->tensors || !b->overrides)
                goto oom;
            memcpy(b->tensors, a->tensors, a->n_tensors * sizeof *b->tensors);
        }
    }
    return 0;
oom:
    api_config_free(dst);
    return -1;
}

long api_tensor_find(const api_config *c, const char *name)
{
    for (size_t i = 0; i < c->n_tensors; i++)
        if (strcmp(c->tensors[i].name, name) == 0)
            return (long)i;
    return -1;
}

/* ------------------------------------------------------------ parsing */

/* Parses a whole body as one JSON value; 400 on anything else. */
static cJSON *parse_body(const char *body, size_t len, api_reply *r)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!root) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        api_problem(r, 400, NULL, "malformed JSON near byte %zu", at);
        return NULL;
    }
    while (end && (size_t)(end - body) < len &&
           (*end == ' ' || *end == '\n' || *end == '\r' || *end == '\t'))
        end++;
    if (end && (size_t)(end - body) < len) {
        cJSON_Delete(root);
        api_problem(r, 400, NULL, "malformed JSON: trailing data at byte %zu",
                    (size_t)(end - body));
        return NULL;
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        api_problem(r, 400, NULL, "the body must be a JSON object");
        return NULL;
    }
    return root;
}

static void path_of(char *out, size_t n, const char *prefix, const char *name)
{
    if (prefix && *prefix)
        snprintf(out, n, "%s.%s", prefix, name);
    else
        snprintf(out, n, "%s", name);
}

static int bad(api_reply *r, const char *prefix, const char *name, const char *what)
{
    char field[96];
    path_of(field, sizeof field, prefix, name);
    return api_problem(r, 400, field, "%s %s", field, what);
}

static bool json_int(const cJSON *v, int64_t *out)
{
    if (!cJSON_IsNumber(v))
        return false;
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d) || fabs(d) > 9007199254740992.0)
        return false;
    *out = (int64_t)d;
    return true;
}

static const optim_hp_spec *spec_find(const optim_hp_spec *specs, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(specs[i].name, name) == 0)
            return &specs[i];
    return NULL;
}


/* ------------------------------------------------------ valid names */

/* Edit distance (Levenshtein) between two short names, case folded, so
 * that "Adam" is at 0 from "adam" and "cosin" at 1 from "cosine".  Names
 * longer than NAME_CMP_MAX compare as far apart. */
#define NAME_CMP_MAX 63
static size_t name_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > NAME_CMP_MAX || lb > NAME_CMP_MAX)
        return SIZE_MAX;
    size_t row[NAME_CMP_MAX + 1];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            int same = tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 1]);
            size_t best = diag + (same ? 0 : 1);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* The valid name closest to given, or NULL when none is near: a case-only
 * difference, or at most two edits (and fewer than the name's length). */
const char *api_closest_name(const char *given, const char *const *names, size_t n)
{
    const char *best = NULL;
    size_t best_d = SIZE_MAX, len = strlen(given);
    for (size_t i = 0; i < n; i++) {
        size_t d = name_distance(given, names[i]);
        if (d < best_d)
            best = names[i], best_d = d;
    }
    if (!best || best_d > 2 || best_d >= len)
        return NULL;
    return best;
}

/* Writes "[; did you mean \"x\"?] (valid: a, b, c)" into out. */
static void names_hint(char *out, size_t size, const char *given, const char *const *names,
                       size_t n)
{
    size_t l = 0;
    const char *close = api_closest_name(given, names, n);
    if (close)
        l += (size_t)snprintf(out, size, "; did you mean \"%s\"?", close);
    if (l < size)
        l += (size_t)snprintf(out + l, size - l, " (valid:");
    for (size_t i = 0; i < n && l < size; i++)
        l += (size_t)snprintf(out + l, size - l, "%s %s", i ? "," : "", names[i]);
    if (l < size)
        snprintf(out + l, size - l, ")");
}

#define MAX_NAMES 64

static size_t optimizer_names(const char **names)
{
    size_t n = 0;
    for (int k = 0; k < OPTIM_KIND_COUNT && n < MAX_NAMES; k++)
        names[n++] = optim_info_of((optim_kind)k)->name;
    return n;
}

static size_t spec_names(const optim_hp_spec *specs, size_t count, const char **names)
{
    size_t n = 0;
    for (size_t i = 0; i < count && n < MAX_NAMES; i++)
        names[n++] = specs[i].name;
    return n;
}

/* Decodes one hyperparameter value into base per its spec. */
static int spec_set(const optim_hp_spec *s, const cJSON *v, void *base, const char *prefix,
                    api_reply *r)
{
    char *b = base;
    switch (s->type) {
    case OPTIM_HP_NUM_INF:
        if (cJSON_IsString(v) && strcmp(v->valuestring, "inf") == 0) {
            *(double *)(b + s->offset) = INFINITY;
            return 0;
        }
        /* fall through */
    case OPTIM_HP_NUM:
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
            return bad(r, prefix, s->name,
                       s->type == OPTIM_HP_NUM_INF ? "must be a finite number or \"inf\""
                                                   : "must be a finite number");
        *(double *)(b + s->offset) = v->valuedouble;
        return 0;
    case OPTIM_HP_INT: {
        int64_t x;
        if (!json_int(v, &x))
            return bad(r, prefix, s->name, "must be an integer");
        *(int64_t *)(b + s->offset) = x;
        return 0;
    }
    case OPTIM_HP_BOOL:
        if (!cJSON_IsBool(v))
            return bad(r, prefix, s->name, "must be true or false");
        *(bool *)(b + s->offset) = cJSON_IsTrue(v);
        return 0;
    case OPTIM_HP_PAIR: {
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2)
            return bad(r, prefix, s->name, "must be an array of two numbers");
        double *d = (double *)(b + s->offset);
        int i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble))
                return bad(r, prefix, s->name, "must be an array of two finite numbers");
            d[i++] = e->valuedouble;
        }
        return 0;
    }
    case OPTIM_HP_ENUM:
        if (cJSON_IsString(v)) {
            for (int i = 0; s->choices[i]; i++) {
                if (strcmp(s->choices[i], v->valuestring) == 0) {
                    *(int *)(b + s->offset) = i;
                    return 0;
                }
            }
        }
        {
            char what[200] = "must be one of";
            for (int i = 0; s->choices[i]; i++) {
                size_t l = strlen(what);
                snprintf(what + l, sizeof what - l, "%s \"%s\"", i ? "," : "", s->choices[i]);
            }
            return bad(r, prefix, s->name, what);
        }
    case OPTIM_HP_INT_LIST: {
        if (!cJSON_IsArray(v))
            return bad(r, prefix, s->name, "must be an array of integers");
        int64_t *out = (int64_t *)(b + s->offset);
        size_t n = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (n >= OPTIM_MAX_LIST)
                return bad(r, prefix, s->name, "has too many entries (at most 64)");
            if (!json_int(e, &out[n]))
                return bad(r, prefix, s->name, "must be an array of integers");
            n++;
        }
        *(size_t *)(b + s->count_offset) = n;
        return 0;
    }
    }
    return bad(r, prefix, s->name, "has an unknown type");
}

/* Decodes the members of obj (except "type") through the table; unknown
 * members are refused by name.  With check_required, every required spec
 * must be present. */
static int specs_decode(const cJSON *obj, const optim_hp_spec *specs, size_t n, void *base,
                        const char *prefix, const char *kind_name, bool check_required,
                        api_reply *r)
{
    const cJSON *m;
    cJSON_ArrayForEach(m, obj)
    {
        if (strcmp(m->string, "type") == 0)
            continue;
        const optim_hp_spec *s = spec_find(specs, n, m->string);
        if (!s) {
            char field[96], hint[400];
            const char *names[MAX_NAMES];
            path_of(field, sizeof field, prefix, m->string);
            names_hint(hint, sizeof hint, m->string, names, spec_names(specs, n, names));
            return api_problem(r, 400, field, "unknown hyperparameter \"%s\" for %s%s",
                               m->string, kind_name, hint);
        }
        int st = spec_set(s, m, base, prefix, r);
        if (st)
            return st;
    }
    if (check_required) {
        for (size_t i = 0; i < n; i++)
            if (specs[i].required && !cJSON_GetObjectItemCaseSensitive(obj, specs[i].name))
                return bad(r, prefix, specs[i].name, "is required");
    }
    return 0;
}

static int optim_err_reply(api_reply *r, const char *prefix, const optim_error *e)
{
    char field[96];
    path_of(field, sizeof field, prefix, e->field);
    return api_problem(r, 400, field, "%s: %s", field, e->msg);
}

static const char *type_of(const cJSON *obj, const char *prefix, api_reply *r)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "type");
    if (!cJSON_IsString(t)) {
        bad(r, prefix, "type", "is required (a string)");
        return NULL;
    }
    return t->valuestring;
}

static int decode_optimizer(const cJSON *v, optim_hparams *hp, bool patch, api_reply *r)
{
    if (cJSON_IsString(v)) {
        /* "optimizer": "adam" is {"type": "adam"} with every default. */
        cJSON *obj = cJSON_CreateObject();
        if (!obj || !cJSON_AddStringToObject(obj, "type", v->valuestring)) {
            cJSON_Delete(obj);
            return api_problem(r, 500, NULL, "out of memory");
        }
        int st = decode_optimizer(obj, hp, patch, r);
        cJSON_Delete(obj);
        return st;
    }
    if (!cJSON_IsObject(v))
        return bad(r, NULL, "optimizer", "must be a name or an object with a \"type\"");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(v, "type");
    const optim_info *info;
    if (patch && !t) {
        info = optim_info_of(hp->kind);
    } else {
        const char *name = type_of(v, "optimizer", r);
        if (!name)
            return 400;
        info = optim_find(name);
        if (!info) {
            char hint[400];
            const char *names[MAX_NAMES];
            names_hint(hint, sizeof hint, name, names, optimizer_names(names));
            return api_problem(r, 400, "optimizer.type", "unknown optimizer \"%s\"%s", name,
                               hint);
        }
        if (patch && info->kind != hp->kind)
            return api_problem(r, 400, "optimizer.type",
                               "the optimizer type cannot change (session has %s)",
                               optim_info_of(hp->kind)->name);
        if (!patch)
            optim_hparams_default(info->kind, hp);
    }
    int st = specs_decode(v, info->hps, info->n_hps, hp, "optimizer", info->name, !patch, r);
    if (st)
        return st;
    optim_error e;
    if (optim_hparams_validate(hp, &e) != OPTIM_OK)
        return optim_err_reply(r, "optimizer", &e);
    return 0;
}

/* Schedules and clips decode alike: null means none, otherwise a "type"
 * naming an entry of the family's table, its hyperparameters, and the
 * family's validation.  One decoder, described per family. */
typedef struct {
    const char *field;          /* "schedule", "clip"                     */
    /* Fills names with the family's kinds; returns how many. */
    size_t (*names)(const char **names);
    /* Finds name; on success fills the spec table and resets cfg to the
     * kind's defaults.  false when unknown. */
    bool (*select)(const char *name, void *cfg, const optim_hp_spec **hps, size_t *n,
                   const char **canon);
    void (*none)(void *cfg);
    int (*validate)(const void *cfg, optim_error *e);
} family;

static bool sched_select(const char *name, void *cfg, const optim_hp_spec **hps, size_t *n,
                         const char **canon)
{
    const optim_sched_info *info = optim_sched_find(name);
    if (!info)
        return false;
    optim_sched_default(info->kind, cfg);
    *hps = info->hps, *n = info->n_hps, *canon = info->name;
    return true;
}
static size_t sched_names(const char **names)
{
    size_t n = 0;
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT && n < MAX_NAMES; k++)
        names[n++] = optim_sched_info_of((optim_sched_kind)k)->name;
    return n;
}
static void sched_none(void *cfg) { optim_sched_default(OPTIM_SCHED_NONE, cfg); }
static int sched_validate(const void *cfg, optim_error *e) { return optim_sched_validate(cfg, e); }

static bool clip_select(const char *name, void *cfg, const optim_hp_spec **hps, size_t *n,
                        const char **canon)
{
    const optim_clip_info *info = optim_clip_find(name);
    if (!info)
        return false;
    optim_clip_default(info->kind, cfg);
    *hps = info->hps, *n = info->n_hps, *canon = info->name;
    return true;
}
static size_t clip_names(const char **names)
{
    size_t n = 0;
    const optim_clip_info *ci;
    for (int k = OPTIM_CLIP_NONE + 1; (ci = optim_clip_info_of((optim_clip_kind)k)) && n < MAX_NAMES;
         k++)
        names[n++] = ci->name;
    return n;
}
static void clip_none(void *cfg) { optim_clip_default(OPTIM_CLIP_NONE, cfg); }
static int clip_validate(const void *cfg, optim_error *e) { return optim_clip_validate(cfg, e); }

static const family schedule_family = {"schedule", sched_names, sched_select, sched_none,
                                       sched_validate};
static const family clip_family = {"clip", clip_names, clip_select, clip_none, clip_validate};

static int decode_family(const cJSON *v, const family *f, void *cfg, api_reply *r)
{
    if (cJSON_IsNull(v)) {
        f->none(cfg);
        return 0;
    }
    if (!cJSON_IsObject(v))
        return bad(r, NULL, f->field, "must be an object with a \"type\" (or null)");
    const char *name = type_of(v, f->field, r);
    if (!name)
        return 400;
    const optim_hp_spec *hps;
    size_t n;
    const char *canon;
    if (!f->select(name, cfg, &hps, &n, &canon)) {
        char field[32], hint[400];
        const char *names[MAX_NAMES];
        snprintf(field, sizeof field, "%s.type", f->field);
        names_hint(hint, sizeof hint, name, names, f->names(names));
        return api_problem(r, 400, field, "unknown %s \"%s\"%s", f->field, name, hint);
    }
    int st = specs_decode(v, hps, n, cfg, f->field, canon, true, r);
    if (st)
        return st;
    optim_error e;
    if (f->validate(cfg, &e) != OPTIM_OK)
        return optim_err_reply(r, f->field, &e);
    return 0;
}

static int decode_schedule(const cJSON *v, optim_schedule *s, api_reply *r)
{
    return decode_family(v, &schedule_family, s, r);
}

static int decode_clip(const cJSON *v, optim_clip *c, api_reply *r)
{
    return decode_family(v, &clip_family, c, r);
}

/* The mode's fields, as a spec table of our own so that they decode like
 * hyperparameters. */
static const char *const stale_choices[] = {"reject", "damp", NULL};
static const char *const reduce_choices[] = {"mean", "sum", NULL};
static const char *const timeout_choices[] = {"fail", "apply", NULL};
static const optim_hp_spec async_specs[] = {
    {"max_staleness", OPTIM_HP_INT, offsetof(api_mode, max_staleness), 0, {-1, 0}, false, NULL,
     "reject a step whose base_step is more than k steps behind (-1: no bound)"},
    {"stale_policy", OPTIM_HP_ENUM, offsetof(api_mode, stale_policy), 0, {0, 0}, false,
     stale_choices, "reject: only the bound applies; damp: lr / (1 + age) for late gradients"},
    {"accumulate", OPTIM_HP_INT, offsetof(api_mode, accumulate), 0, {1, 0}, false, NULL,
     "apply the mean of every K gradients"},
};
static const optim_hp_spec sync_specs[] = {
    {"workers", OPTIM_HP_INT, offsetof(api_mode, workers), 0, {0, 0}, true, NULL,
     "distinct workers per round"},
    {"timeout_ms", OPTIM_HP_INT, offsetof(api_mode, timeout_ms), 0,
     {MODE_DEFAULT_TIMEOUT_MS, 0}, false, NULL, "how long a round waits"},
    {"reduce", OPTIM_HP_ENUM, offsetof(api_mode, reduce), 0, {0, 0}, false, reduce_choices,
     "how a round's gradients combine"},
    {"on_timeout", OPTIM_HP_ENUM, offsetof(api_mode, on_timeout), 0, {0, 0}, false,
     timeout_choices, "fail: answer 504; apply: apply the partial round"},
    {"accumulate", OPTIM_HP_INT, offsetof(api_mode, accumulate), 0, {1, 0}, false, NULL,
     "apply the mean of every K round results"},
};
#define N_ASYNC (sizeof async_specs / sizeof async_specs[0])
#define N_SYNC (sizeof sync_specs / sizeof sync_specs[0])

static void mode_default(api_mode *m)
{
    memset(m, 0, sizeof *m);
    m->type = API_MODE_ASYNC;
    optim_specs_default(async_specs, N_ASYNC, m);
    m->timeout_ms = MODE_DEFAULT_TIMEOUT_MS;
}

static int decode_mode(const cJSON *v, api_mode *m, api_reply *r)
{
    if (!cJSON_IsObject(v))
        return bad(r, NULL, "mode", "must be an object with a \"type\"");
    const char *name = type_of(v, "mode", r);
    if (!name)
        return 400;
    mode_default(m);
    if (strcmp(name, "async") == 0) {
        int st = specs_decode(v, async_specs, N_ASYNC, m, "mode", "async", true, r);
        if (st)
            return st;
        if (m->max_staleness < -1)
            return bad(r, "mode", "max_staleness", "must be >= 0 (or -1 for no bound)");
    } else if (strcmp(name, "sync") == 0) {
        m->type = API_MODE_SYNC;
        optim_specs_default(sync_specs, N_SYNC, m);
        int st = specs_decode(v, sync_specs, N_SYNC, m, "mode", "sync", true, r);
        if (st)
            return st;
        if (m->workers < 1 || m->workers > 1024)
            return bad(r, "mode", "workers", "must be between 1 and 1024");
        if (m->timeout_ms < 1 || m->timeout_ms > 86400000)
            return bad(r, "mode", "timeout_ms", "must be between 1 and 86400000");
    } else {
        return api_problem(r, 400, "mode.type", "unknown mode \"%s\" (async, sync)", name);
    }
    if (m->accumulate < 1 || m->accumulate > 1000000)
        return bad(r, "mode", "accumulate", "must be between 1 and 1000000");
    return 0;
}

static int decode_nonfinite(const cJSON *v, int *out, api_reply *r)
{
    if (cJSON_IsString(v) && strcmp(v->valuestring, "error") == 0)
        *out = API_NONFINITE_ERROR;
    else if (cJSON_IsString(v) && strcmp(v->valuestring, "skip") == 0)
        *out = API_NONFINITE_SKIP;
    else
        return bad(r, NULL, "nonfinite", "must be \"error\" or \"skip\"");
    return 0;
}

static int decode_retain(const cJSON *v, api_retain *out, api_reply *r)
{
    if (cJSON_IsNull(v)) {
        out->every_steps = out->keep = 0;
        return 0;
    }
    if (!cJSON_IsObject(v))
        return bad(r, NULL, "retain", "must be {\"every_steps\": N, \"keep\": K} or null");
    const cJSON *m;
    cJSON_ArrayForEach(m, v)
    {
        if (strcmp(m->string, "every_steps") != 0 && strcmp(m->string, "keep") != 0)
            return api_problem(r, 400, "retain", "unknown field \"retain.%s\" (every_steps, keep)",
                               m->string);
    }
    int64_t n, k;
    if (!json_int(cJSON_GetObjectItemCaseSensitive(v, "every_steps"), &n) || n < 1)
        return bad(r, "retain", "every_steps", "must be a positive integer");
    if (!json_int(cJSON_GetObjectItemCaseSensitive(v, "keep"), &k) || k < 1 ||
        k > API_RETAIN_KEEP_MAX)
        return api_problem(r, 400, "retain.keep", "retain.keep must be an integer from 1 to %d",
                           API_RETAIN_KEEP_MAX);
    out->every_steps = n;
    out->keep = k;
    return 0;
}

static int decode_metadata(const cJSON *v, char **out, api_reply *r)
{
    if (cJSON_IsNull(v)) {
        free(*out);
        *out = NULL;
        return 0;
    }
    if (!cJSON_IsObject(v))
        return bad(r, NULL, "metadata", "must be a JSON object (or null)");
    char *s = cJSON_PrintUnformatted(v);
    if (!s)
        return api_problem(r, 503, NULL, "out of memory");
    if (strlen(s) > 65536) {
        cJSON_free(s);
        return bad(r, NULL, "metadata", "is larger than 64 KiB");
    }
    free(*out);
    *out = dup_str(s);
    cJSON_free(s);
    return *out ? 0 : api_problem(r, 503, NULL, "out of memory");
}

/* Checks that the schedule can drive this optimizer (one-cycle momentum). */
static int check_combination(const api_config *c, api_reply *r)
{
    if (c->sched.kind == OPTIM_SCHED_ONE_CYCLE && c->sched.cycle_momentum) {
        optim_kind k = c->opt.kind;
        bool has = k == OPTIM_SGD || k == OPTIM_RMSPROP || k == OPTIM_ADAM || k == OPTIM_ADAMW ||
                   k == OPTIM_ADAMAX || k == OPTIM_NADAM || k == OPTIM_RADAM || k == OPTIM_LION;
        if (!has)
            return api_problem(r, 400, "schedule.cycle_momentum",
                               "%s has no momentum or betas to cycle; set cycle_momentum false",
                               optim_info_of(k)->name);
    }
    return 0;
}

static void config_default(api_config *c)
{
    memset(c, 0, sizeof *c);
    c->dtype = OPTIM_F32;
    optim_hparams_default(OPTIM_SGD, &c->opt);
    optim_sched_default(OPTIM_SCHED_NONE, &c->sched);
    optim_clip_default(OPTIM_CLIP_NONE, &c->clip);
    mode_default(&c->mode);
    c->nonfinite = API_NONFINITE_ERROR;
}

static const char *const create_keys[] = {"optimizer", "params", "size", "init", "dtype",
                                          "schedule", "clip", "mode", "nonfinite",
                                          "metadata", "tensors", "groups", "retain",
                                          "fork", "replay", NULL};

static bool key_known(const char *k, const char *const *keys)
{
    for (int i = 0; keys[i]; i++)
        if (strcmp(keys[i], k) == 0)
            return true;
    return false;
}

static int decode_init(const cJSON *v, api_init *init, api_reply *r)
{
    if (!cJSON_IsObject(v))
        return bad(r, NULL, "init", "must be an object with a \"type\"");
    const char *name = type_of(v, "init", r);
    if (!name)
        return 400;
    memset(init, 0, sizeof *init);
    init->std = 1.0;
    init->high = 1.0;
    const char *allowed[6] = {"type", NULL};
    if (strcmp(name, "zeros") == 0) {
        init->type = API_INIT_ZEROS;
    } else if (strcmp(name, "normal") == 0) {
        init->type = API_INIT_NORMAL;
        allowed[1] = "mean", allowed[2] = "std", allowed[3] = "seed";
    } else if (strcmp(name, "uniform") == 0) {
        init->type = API_INIT_UNIFORM;
        init->low = -1.0;
        allowed[1] = "low", allowed[2] = "high", allowed[3] = "seed";
    } else {
        return api_problem(r, 400, "init.type", "unknown init \"%s\" (zeros, normal, uniform)",
                           name);
    }
    const cJSON *m;
    cJSON_ArrayForEach(m, v)
    {
        if (!key_known(m->string, allowed))
            return api_problem(r, 400, "init", "unknown field init.%s for %s", m->string, name);
        if (strcmp(m->string, "type") == 0)
            continue;
        if (strcmp(m->string, "seed") == 0) {
            int64_t s;
            if (!json_int(m, &s) || s < 0)
                return bad(r, "init", "seed", "must be a non-negative integer");
            init->seed = (uint64_t)s;
            continue;
        }
        if (!cJSON_IsNumber(m) || !isfinite(m->valuedouble))
            return bad(r, "init", m->string, "must be a finite number");
        double d = m->valuedouble;
        if (strcmp(m->string, "mean") == 0)
            init->mean = d;
        else if (strcmp(m->string, "std") == 0)
            init->std = d;
        else if (strcmp(m->string, "low") == 0)
            init->low = d;
        else
            init->high = d;
    }
    if (init->type == API_INIT_NORMAL && init->std < 0)
        return bad(r, "init", "std", "must be >= 0");
    if (init->type == API_INIT_UNIFORM && !(init->low <= init->high))
        return bad(r, "init", "low", "must be <= init.high");
    return 0;
}

/* Decodes a JSON array of numbers into n elements of dt. */
static int decode_array(const cJSON *arr, optim_dtype dt, size_t n, void *out,
                        const char *field, api_reply *r)
{
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        if (i >= n)
            break;
        if (!cJSON_IsNumber(e))
            return api_problem(r, 400, field, "%s[%zu] is not a number", field, i);
        double d = e->valuedouble;
        if (dt == OPTIM_F32) {
            float f = fabs(d) > 3.4028235677973366e38 ? INFINITY : (float)d;
            if (!isfinite(f))
                return api_problem(r, 422, field, "%s[%zu] is not finite in float32", field, i);
            ((float *)out)[i] = f;
        } else {
            if (!isfinite(d))
                return api_problem(r, 422, field, "%s[%zu] is not finite", field, i);
            ((double *)out)[i] = d;
        }
        i++;
    }
    return 0;
}

/* The shared part of create and of reading a stored config. */

/* ------------------------------------------------------------- layout */

static void specs_encode(cJSON *obj, const optim_hp_spec *specs, size_t n, const void *base);

static bool tensor_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > API_TENSOR_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == ':' || ch == '/' || ch == '-'))
            return false;
    }
    return true;
}

/* One tensor "params" of the whole size, in one group without overrides. */
static int layout_default(api_config *c)
{
    layout_free(c);
    c->layout = false;
    c->tensors = calloc(1, sizeof *c->tensors);
    c->groups = calloc(1, sizeof *c->groups);
    if (!c->tensors || !c->groups)
        return -1;
    c->n_tensors = c->n_groups = 1;
    c->tensors[0].name = dup_str("params");
    c->tensors[0].ndim = 1;
    c->tensors[0].shape[0] = (int64_t)c->size;
    c->tensors[0].size = c->size;
    c->groups[0].tensors = calloc(1, sizeof *c->groups[0].tensors);
    c->groups[0].n_tensors = 1;
    c->groups[0].overrides = dup_str("{}");
    c->groups[0].opt = c->opt;
    return c->tensors[0].name && c->groups[0].tensors && c->groups[0].overrides ? 0 : -1;
}

/* The group's overrides (a JSON object of hyperparameters, no "type") on
 * top of base: *eff gets the result, *canon the canonical text of the
 * members given (every value in its canonical form, in table order). */
static int overrides_apply(const cJSON *obj, const optim_hparams *base, optim_hparams *eff,
                           char **canon, const char *prefix, api_reply *r)
{
    const optim_info *info = optim_info_of(base->kind);
    if (!cJSON_IsObject(obj))
        return api_problem(r, 400, prefix, "%s must be an object", prefix);
    if (cJSON_GetObjectItemCaseSensitive(obj, "type"))
        return bad(r, prefix, "type", "cannot be set per group (every group uses the session's "
                                      "optimizer)");
    *eff = *base;
    int st = specs_decode(obj, info->hps, info->n_hps, eff, prefix, info->name, false, r);
    if (st)
        return st;
    optim_error e;
    if (optim_hparams_validate(eff, &e) != OPTIM_OK)
        return optim_err_reply(r, prefix, &e);
    if (canon) {
        cJSON *all = cJSON_CreateObject(), *out = cJSON_CreateObject();
        specs_encode(all, info->hps, info->n_hps, eff);
        for (size_t i = 0; i < info->n_hps; i++)
            if (cJSON_GetObjectItemCaseSensitive(obj, info->hps[i].name))
                add_item(out, info->hps[i].name,
                                      cJSON_Duplicate(cJSON_GetObjectItem(all, info->hps[i].name),
                                                      1));
        char *t = cJSON_PrintUnformatted(out);
        cJSON_Delete(all);
        cJSON_Delete(out);
        *canon = t ? dup_str(t) : NULL;
        cJSON_free(t);
        if (!*canon)
            return api_problem(r, 503, NULL, "out of memory");
    }
    return 0;
}

int api_config_refresh_groups(api_config *c, api_reply *r)
{
    for (size_t g = 0; g < c->n_groups; g++) {
        char prefix[48];
        snprintf(prefix, sizeof prefix, "groups[%zu]", g);
        cJSON *o = cJSON_Parse(c->groups[g].overrides);
        int st = o ? overrides_apply(o, &c->opt, &c->groups[g].opt, NULL, prefix, r)
                   : api_problem(r, 500, NULL, "a stored group is unreadable");
        cJSON_Delete(o);
        if (st)
            return st;
    }
    return 0;
}

/* "tensors" and "groups" of a create body or a stored config; c->size is
 * 0 when the body gave neither size nor params (the tensors then say). */
static int decode_layout(const cJSON *root, api_config *c, api_reply *r)
{
    const cJSON *jt = cJSON_GetObjectItemCaseSensitive(root, "tensors");
    const cJSON *jg = cJSON_GetObjectItemCaseSensitive(root, "groups");
    if (!jt && !jg)
        return layout_default(c) ? api_problem(r, 503, NULL, "out of memory") : 0;
    if (!jt) {
        /* Groups over the default tensor: only one group makes sense. */
        if (layout_default(c))
            return api_problem(r, 503, NULL, "out of memory");
    } else {
        layout_free(c);
        int nt = cJSON_IsArray(jt) ? cJSON_GetArraySize(jt) : -1;
        if (nt < 1 || nt > API_MAX_TENSORS)
            return api_problem(r, 400, "tensors", "tensors must be an array of 1 to %d "
                                                  "{\"name\", \"shape\"} objects", API_MAX_TENSORS);
        c->tensors = calloc((size_t)nt, sizeof *c->tensors);
        if (!c->tensors)
            return api_problem(r, 503, NULL, "out of memory");
        c->n_tensors = (size_t)nt;
        uint64_t off = 0;
        for (int i = 0; i < nt; i++) {
            const cJSON *t = cJSON_GetArrayItem(jt, i);
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(t, "name");
            const cJSON *sh = cJSON_GetObjectItemCaseSensitive(t, "shape");
            char field[48];
            snprintf(field, sizeof field, "tensors[%d]", i);
            const cJSON *m;
            cJSON_ArrayForEach(m, t)
            {
                if (strcmp(m->string, "name") != 0 && strcmp(m->string, "shape") != 0)
                    return api_problem(r, 400, field, "%s: unknown field \"%s\" (name, shape)",
                                       field, m->string);
            }
            if (!cJSON_IsString(nm) || !tensor_name_ok(nm->valuestring))
                return api_problem(r, 400, field, "%s.name must be 1-%d characters of A-Z a-z "
                                                  "0-9 _ . : / -", field, API_TENSOR_NAME_MAX);
            for (int k = 0; k < i; k++)
                if (strcmp(c->tensors[k].name, nm->valuestring) == 0)
                    return api_problem(r, 400, field, "tensor name \"%s\" appears twice",
                                       nm->valuestring);
            int nd = cJSON_IsArray(sh) ? cJSON_GetArraySize(sh) : -1;
            if (nd < 0 || nd > API_MAX_DIMS)
                return api_problem(r, 400, field, "%s.shape must be an array of at most %d "
                                                  "non-negative integers", field, API_MAX_DIMS);
            api_tensor *T = &c->tensors[i];
            if (!(T->name = dup_str(nm->valuestring)))
                return api_problem(r, 503, NULL, "out of memory");
            T->ndim = nd;
            uint64_t numel = 1;
            for (int d = 0; d < nd; d++) {
                int64_t v;
                if (!json_int(cJSON_GetArrayItem(sh, d), &v) || v < 0)
                    return api_problem(r, 400, field, "%s.shape must hold non-negative integers",
                                       field);
                T->shape[d] = v;
                if (v && numel > UINT64_MAX / (uint64_t)v)
                    return api_problem(r, 413, field, "%s is too large", field);
                numel *= (uint64_t)v;
            }
            T->offset = off;
            T->size = numel;
            if (numel > UINT64_MAX - off)
                return api_problem(r, 413, "tensors", "the tensors are too large");
            off += numel;
        }
        if (c->size == 0)
            c->size = off;
        if (off != c->size || off == 0)
            return api_problem(r, 422, "tensors",
                               "the tensors hold %llu elements; the session has %llu",
                               (unsigned long long)off, (unsigned long long)c->size);
    }
    c->layout = true;
    /* Groups: by default one holding every tensor. */
    int ng = jg ? (cJSON_IsArray(jg) ? cJSON_GetArraySize(jg) : -1) : 0;
    if (jg && (ng < 1 || ng > API_MAX_GROUPS))
        return api_problem(r, 400, "groups", "groups must be an array of 1 to %d objects",
                           API_MAX_GROUPS);
    for (size_t g = 0; g < c->n_groups; g++) {
        free(c->groups[g].tensors);
        free(c->groups[g].overrides);
    }
    free(c->groups);
    c->n_groups = jg ? (size_t)ng : 1;
    c->groups = calloc(c->n_groups, sizeof *c->groups);
    if (!c->groups) {
        c->n_groups = 0;
        return api_problem(r, 503, NULL, "out of memory");
    }
    for (size_t i = 0; i < c->n_tensors; i++)
        c->tensors[i].group = UINT32_MAX;
    if (!jg) {
        api_group *G = &c->groups[0];
        G->tensors = malloc(c->n_tensors * sizeof *G->tensors);
        G->overrides = dup_str("{}");
        if (!G->tensors || !G->overrides)
            return api_problem(r, 503, NULL, "out of memory");
        for (size_t i = 0; i < c->n_tensors; i++) {
            G->tensors[i] = (uint32_t)i;
            c->tensors[i].group = 0;
        }
        G->n_tensors = c->n_tensors;
        G->opt = c->opt;
        return 0;
    }
    for (int g = 0; g < ng; g++) {
        const cJSON *jo = cJSON_GetArrayItem(jg, g);
        char field[48];
        snprintf(field, sizeof field, "groups[%d]", g);
        if (!cJSON_IsObject(jo))
            return api_problem(r, 400, field, "%s must be an object", field);
        const cJSON *names = cJSON_GetObjectItemCaseSensitive(jo, "tensors");
        int nn = cJSON_IsArray(names) ? cJSON_GetArraySize(names) : -1;
        if (nn < 1)
            return api_problem(r, 400, field, "%s.tensors must list the group's tensors by name",
                               field);
        api_group *G = &c->groups[g];
        if (!(G->tensors = malloc((size_t)nn * sizeof *G->tensors)))
            return api_problem(r, 503, NULL, "out of memory");
        G->n_tensors = (size_t)nn;
        for (int k = 0; k < nn; k++) {
            const cJSON *nm = cJSON_GetArrayItem(names, k);
            long ti = cJSON_IsString(nm) ? api_tensor_find(c, nm->valuestring) : -1;
            if (ti < 0)
                return api_problem(r, 400, field, "%s.tensors[%d] is not one of the session's "
                                                  "tensors", field, k);
            if (c->tensors[ti].group != UINT32_MAX)
                return api_problem(r, 400, field, "tensor \"%s\" is in more than one group",
                                   nm->valuestring);
            c->tensors[ti].group = (uint32_t)g;
            G->tensors[k] = (uint32_t)ti;
        }
        cJSON *ov = cJSON_Duplicate(jo, 1);
        cJSON_DeleteItemFromObjectCaseSensitive(ov, "tensors");
        int st = overrides_apply(ov, &c->opt, &G->opt, &G->overrides, field, r);
        cJSON_Delete(ov);
        if (st)
            return st;
    }
    for (size_t i = 0; i < c->n_tensors; i++)
        if (c->tensors[i].group == UINT32_MAX)
            return api_problem(r, 400, "groups", "tensor \"%s\" is in no group (torch: every "
                                                 "parameter belongs to one param group)",
                               c->tensors[i].name);
    return 0;
}

/* PATCH "groups": one object per group, each the hyperparameters to
 * change in it ({} leaves a group alone). */
static int patch_groups(const cJSON *v, api_config *c, api_reply *r)
{
    int ng = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
    if (ng != (int)c->n_groups)
        return api_problem(r, 400, "groups",
                           "groups must be an array of %zu objects (one per group; {} changes "
                           "nothing)", c->n_groups);
    for (int g = 0; g < ng; g++) {
        const cJSON *jo = cJSON_GetArrayItem(v, g);
        char field[48];
        snprintf(field, sizeof field, "groups[%d]", g);
        if (!cJSON_IsObject(jo))
            return api_problem(r, 400, field, "%s must be an object", field);
        if (cJSON_GetObjectItemCaseSensitive(jo, "tensors"))
            return bad(r, field, "tensors", "cannot change after create");
        if (!jo->child)
            continue;
        cJSON *merged = cJSON_Parse(c->groups[g].overrides);
        if (!merged)
            return api_problem(r, 500, NULL, "a stored group is unreadable");
        const cJSON *m;
        cJSON_ArrayForEach(m, jo)
        {
            cJSON_DeleteItemFromObjectCaseSensitive(merged, m->string);
            add_item(merged, m->string, cJSON_Duplicate(m, 1));
        }
        char *canon = NULL;
        int st = overrides_apply(merged, &c->opt, &c->groups[g].opt, &canon, field, r);
        cJSON_Delete(merged);
        if (st)
            return st;
        free(c->groups[g].overrides);
        c->groups[g].overrides = canon;
    }
    c->layout = true;
    return 0;
}

static int decode_config_obj(const cJSON *root, api_config *c, api_reply *r)
{
    const cJSON *v;
    if ((v = cJSON_GetObjectItemCaseSensitive(root, "dtype"))) {
        if (!cJSON_IsString(v) || optim_dtype_parse(v->valuestring, &c->dtype) != OPTIM_OK)
            return bad(r, NULL, "dtype", "must be \"float32\" or \"float64\"");
    }
    v = cJSON_GetObjectItemCaseSensitive(root, "optimizer");
    if (!v)
        return bad(r, NULL, "optimizer", "is required (e.g. {\"type\":\"adam\",\"lr\":0.001})");
    int st = decode_optimizer(v, &c->opt, false, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "schedule")))
        st = decode_schedule(v, &c->sched, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "clip")))
        st = decode_clip(v, &c->clip, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "mode")))
        st = decode_mode(v, &c->mode, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "nonfinite")))
        st = decode_nonfinite(v, &c->nonfinite, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "metadata")))
        st = decode_metadata(v, &c->metadata, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "retain")))
        st = decode_retain(v, &c->retain, r);
    if (!st)
        st = check_combination(c, r);
    return st;
}

int api_decode_create(const char *body, size_t len, size_t max_params, api_config *cfg,
                      api_init *init, void **params, api_reply *r)
{
    config_default(cfg);
    memset(init, 0, sizeof *init);
    *params = NULL;
    cJSON *root = parse_body(body, len, r);
    if (!root)
        return 400;
    int st = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        if (!key_known(m->string, create_keys)) {
            st = api_problem(r, 400, m->string, "unknown field \"%s\"", m->string);
            break;
        }
        if (strcmp(m->string, "replay") == 0 || strcmp(m->string, "fork") == 0) {
            st = api_problem(r, 400, m->string, "\"%s\" goes with a fork: {\"fork\": "
                             "{\"from\": name, \"step\": t}}", m->string);
            break;
        }
    }
    if (!st)
        st = decode_config_obj(root, cfg, r);
    const cJSON *jp = cJSON_GetObjectItemCaseSensitive(root, "params");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(root, "size");
    const cJSON *ji = cJSON_GetObjectItemCaseSensitive(root, "init");
    if (!st && jp && (js || ji))
        st = api_problem(r, 400, "params", "give either params or size + init, not both");
    const cJSON *jt = cJSON_GetObjectItemCaseSensitive(root, "tensors");
    if (!st && !jp && !js && !jt)
        st = api_problem(r, 400, "params", "params (an array), size or tensors is required");
    if (!st && jp) {
        if (!cJSON_IsArray(jp) || cJSON_GetArraySize(jp) < 1)
            st = bad(r, NULL, "params", "must be a non-empty array of numbers");
        else if ((size_t)cJSON_GetArraySize(jp) > max_params)
            st = api_problem(r, 413, "params", "params has %d elements; the limit is %zu",
                             cJSON_GetArraySize(jp), max_params);
        if (!st) {
            cfg->size = (uint64_t)cJSON_GetArraySize(jp);
            *params = malloc(cfg->size * optim_dtype_size(cfg->dtype));
            if (!*params)
                st = api_problem(r, 503, NULL, "out of memory for %llu params",
                                 (unsigned long long)cfg->size);
            else
                st = decode_array(jp, cfg->dtype, cfg->size, *params, "params", r);
        }
        init->type = API_INIT_PARAMS;
    } else if (!st && !js) {
        /* The tensors give the size. */
        if (ji)
            st = decode_init(ji, init, r);
        else
            init->type = API_INIT_ZEROS;
    } else if (!st) {
        int64_t n;
        if (!json_int(js, &n) || n < 1)
            st = bad(r, NULL, "size", "must be a positive integer");
        else if ((uint64_t)n > max_params)
            st = api_problem(r, 413, "size", "size %lld exceeds the limit of %zu params",
                             (long long)n, max_params);
        else
            cfg->size = (uint64_t)n;
        if (!st) {
            if (ji)
                st = decode_init(ji, init, r);
            else
                init->type = API_INIT_ZEROS;
        }
    }
    if (!st)
        st = decode_layout(root, cfg, r);
    if (!st && cfg->size > max_params)
        st = api_problem(r, 413, "tensors", "the tensors hold %llu elements; the limit is %zu",
                         (unsigned long long)cfg->size, max_params);
    cJSON_Delete(root);
    if (st) {
        free(*params);
        *params = NULL;
        api_config_free(cfg);
    }
    return st;
}

static const char *const patch_keys[] = {"optimizer", "schedule", "clip", "mode", "nonfinite",
                                         "metadata", "groups", "retain", NULL};

int api_decode_patch(const char *body, size_t len, api_config *cfg, api_reply *r)
{
    cJSON *root = parse_body(body, len, r);
    if (!root)
        return 400;
    int st = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        if (!key_known(m->string, patch_keys)) {
            st = api_problem(r, 400, m->string,
                             key_known(m->string, create_keys)
                                 ? "\"%s\" cannot change after create"
                                 : "unknown field \"%s\"",
                             m->string);
            break;
        }
    }
    const cJSON *v;
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "optimizer"))) {
        st = decode_optimizer(v, &cfg->opt, true, r);
        if (!st)
            st = api_config_refresh_groups(cfg, r);
    }
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "groups")))
        st = patch_groups(v, cfg, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "schedule")))
        st = decode_schedule(v, &cfg->sched, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "clip")))
        st = decode_clip(v, &cfg->clip, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "mode")))
        st = decode_mode(v, &cfg->mode, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "nonfinite")))
        st = decode_nonfinite(v, &cfg->nonfinite, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "metadata")))
        st = decode_metadata(v, &cfg->metadata, r);
    if (!st && (v = cJSON_GetObjectItemCaseSensitive(root, "retain")))
        st = decode_retain(v, &cfg->retain, r);
    if (!st)
        st = check_combination(cfg, r);
    cJSON_Delete(root);
    return st;
}

/* ----------------------------------------------------------- encoding */

int api_shortest_double(char *out, size_t n, double d)
{
    /* %.17g always reads back exactly; the shorter forms are tried first so
     * that 0.1 prints as 0.1, not 0.10000000000000001. */
    static const char *const forms[] = {"%.15g", "%.16g", "%.17g"};
    int len = 0;
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        len = snprintf(out, n, forms[i], d);
        if (len > 0 && (size_t)len < n && strtod(out, NULL) == d)
            break;
    }
    return len;
}

/* A configuration number as cJSON raw text in its shortest round-trip form
 * (cJSON's own printer is not bit-exact).  Vectors are printed elsewhere
 * (api_buf_vector), always %.9g / %.17g. */
static cJSON *num(double d)
{
    char tmp[40];
    if (isinf(d))
        return cJSON_CreateString(d > 0 ? "inf" : "-inf");
    api_shortest_double(tmp, sizeof tmp, d);
    return cJSON_CreateRaw(tmp);
}

static cJSON *int_num(int64_t v)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    return cJSON_CreateRaw(tmp);
}

/* Adds every field of a table to obj. */
static void specs_encode(cJSON *obj, const optim_hp_spec *specs, size_t n, const void *base)
{
    const char *b = base;
    for (size_t i = 0; i < n; i++) {
        const optim_hp_spec *s = &specs[i];
        cJSON *v = NULL;
        switch (s->type) {
        case OPTIM_HP_NUM:
        case OPTIM_HP_NUM_INF:
            v = num(*(const double *)(b + s->offset));
            break;
        case OPTIM_HP_INT:
            v = int_num(*(const int64_t *)(b + s->offset));
            break;
        case OPTIM_HP_BOOL:
            v = cJSON_CreateBool(*(const bool *)(b + s->offset));
            break;
        case OPTIM_HP_PAIR:
            v = cJSON_CreateArray();
            add_elem(v, num(((const double *)(b + s->offset))[0]));
            add_elem(v, num(((const double *)(b + s->offset))[1]));
            break;
        case OPTIM_HP_ENUM:
            v = cJSON_CreateString(s->choices[*(const int *)(b + s->offset)]);
            break;
        case OPTIM_HP_INT_LIST: {
            v = cJSON_CreateArray();
            size_t cnt = *(const size_t *)(b + s->count_offset);
            for (size_t k = 0; k < cnt; k++)
                add_elem(v, int_num(((const int64_t *)(b + s->offset))[k]));
            break;
        }
        }
        add_item(obj, s->name, v);
    }
}

static cJSON *config_obj(const api_config *c)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "dtype", optim_dtype_name(c->dtype));
    add_item(root, "size", int_num((int64_t)c->size));
    const optim_info *oi = optim_info_of(c->opt.kind);
    cJSON *o = cJSON_AddObjectToObject(root, "optimizer");
    cJSON_AddStringToObject(o, "type", oi->name);
    specs_encode(o, oi->hps, oi->n_hps, &c->opt);
    if (c->sched.kind == OPTIM_SCHED_NONE && c->sched.warmup_steps == 0) {
        cJSON_AddNullToObject(root, "schedule");
    } else {
        const optim_sched_info *si = optim_sched_info_of(c->sched.kind);
        cJSON *s = cJSON_AddObjectToObject(root, "schedule");
        cJSON_AddStringToObject(s, "type", si->name);
        specs_encode(s, si->hps, si->n_hps, &c->sched);
    }
    if (c->clip.kind == OPTIM_CLIP_NONE) {
        cJSON_AddNullToObject(root, "clip");
    } else {
        const optim_clip_info *ci = optim_clip_info_of(c->clip.kind);
        cJSON *s = cJSON_AddObjectToObject(root, "clip");
        cJSON_AddStringToObject(s, "type", ci->name);
        specs_encode(s, ci->hps, ci->n_hps, &c->clip);
    }
    cJSON *m = cJSON_AddObjectToObject(root, "mode");
    if (c->mode.type == API_MODE_SYNC) {
        cJSON_AddStringToObject(m, "type", "sync");
        specs_encode(m, sync_specs, N_SYNC, &c->mode);
    } else {
        cJSON_AddStringToObject(m, "type", "async");
        specs_encode(m, async_specs, N_ASYNC, &c->mode);
    }
    cJSON_AddStringToObject(root, "nonfinite", c->nonfinite == API_NONFINITE_SKIP ? "skip" : "error");
    if (c->layout) {
        cJSON *ts = cJSON_AddArrayToObject(root, "tensors");
        for (size_t i = 0; i < c->n_tensors; i++) {
            cJSON *t = cJSON_CreateObject();
            cJSON_AddStringToObject(t, "name", c->tensors[i].name);
            cJSON *sh = cJSON_AddArrayToObject(t, "shape");
            for (int d = 0; d < c->tensors[i].ndim; d++)
                add_elem(sh, int_num(c->tensors[i].shape[d]));
            add_elem(ts, t);
        }
        cJSON *gs = cJSON_AddArrayToObject(root, "groups");
        for (size_t g = 0; g < c->n_groups; g++) {
            cJSON *o = cJSON_CreateObject();
            cJSON *names = cJSON_AddArrayToObject(o, "tensors");
            for (size_t k = 0; k < c->groups[g].n_tensors; k++)
                add_elem(names,
                                     cJSON_CreateString(c->tensors[c->groups[g].tensors[k]].name));
            cJSON *ov = cJSON_Parse(c->groups[g].overrides);
            for (cJSON *m = ov ? ov->child : NULL; m; m = m->next)
                add_item(o, m->string, cJSON_Duplicate(m, 1));
            cJSON_Delete(ov);
            add_elem(gs, o);
        }
    }
    if (c->metadata)
        add_item(root, "metadata", cJSON_Parse(c->metadata));
    else
        cJSON_AddNullToObject(root, "metadata");
    /* Only when set: configs stored before it existed read back equal. */
    if (c->retain.every_steps > 0) {
        cJSON *rt = cJSON_AddObjectToObject(root, "retain");
        cJSON_AddItemToObject(rt, "every_steps", int_num(c->retain.every_steps));
        cJSON_AddItemToObject(rt, "keep", int_num(c->retain.keep));
    }
    return root;
}

char *api_hparams_to_json(const optim_hparams *hp)
{
    const optim_info *oi = optim_info_of(hp->kind);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", oi->name);
    specs_encode(o, oi->hps, oi->n_hps, hp);
    char *t = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    char *d = t ? dup_str(t) : NULL;
    cJSON_free(t);
    return d;
}

char *api_config_to_json(const api_config *c)
{
    /* Out of memory, a member could be missing without any NULL here: the
     * stored config would then not be the session's. */
    unsigned long failed = api_json_failures();
    cJSON *root = config_obj(c);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (s && api_json_failures() != failed) {
        cJSON_free(s);
        return NULL;
    }
    if (!s)
        return NULL;
    /* Return a malloc'd string so that callers free() it. */
    char *d = dup_str(s);
    cJSON_free(s);
    return d;
}

/* Appends one "path: have (the session) vs want (this request)" line. */
static void diff_put(char *out, size_t n, size_t *l, int *count, const char *path,
                     const cJSON *have, const cJSON *want)
{
    char *h = have ? cJSON_PrintUnformatted(have) : NULL;
    char *w = want ? cJSON_PrintUnformatted(want) : NULL;
    if (*l < n)
        *l += (size_t)snprintf(out + *l, n - *l, "%s%s: %s in the session, %s requested",
                               *count ? "; " : "", path, h ? h : "absent", w ? w : "absent");
    (*count)++;
    cJSON_free(h);
    cJSON_free(w);
}

/* Walks two canonical config objects; nested objects (optimizer, schedule,
 * clip, mode) are compared member by member, other values whole. */
static void diff_walk(const cJSON *a, const cJSON *b, const char *prefix, char *out, size_t n,
                      size_t *l, int *count)
{
    char path[96];
    const cJSON *x;
    cJSON_ArrayForEach(x, a)
    {
        const cJSON *y = cJSON_GetObjectItemCaseSensitive(b, x->string);
        path_of(path, sizeof path, prefix, x->string);
        bool both_obj = cJSON_IsObject(x) && y && cJSON_IsObject(y) && !*prefix &&
                        strcmp(x->string, "metadata") != 0;
        bool same_type = both_obj && cJSON_Compare(cJSON_GetObjectItemCaseSensitive(x, "type"),
                                                   cJSON_GetObjectItemCaseSensitive(y, "type"),
                                                   true);
        if (same_type) {
            diff_walk(x, y, path, out, n, l, count);
        } else if (both_obj) { /* another kind: its type says it all */
            size_t pl = strlen(path);
            snprintf(path + pl, sizeof path - pl, ".type");
            diff_put(out, n, l, count, path, cJSON_GetObjectItemCaseSensitive(x, "type"),
                     cJSON_GetObjectItemCaseSensitive(y, "type"));
        } else if (!y || !cJSON_Compare(x, y, true)) {
            diff_put(out, n, l, count, path, x, y);
        }
    }
    cJSON_ArrayForEach(x, b)
    {
        if (!cJSON_GetObjectItemCaseSensitive(a, x->string)) {
            path_of(path, sizeof path, prefix, x->string);
            diff_put(out, n, l, count, path, NULL, x);
        }
    }
}

int api_config_diff(const api_config *have, const api_config *want, char *out, size_t n)
{
    if (n)
        out[0] = '\0';
    cJSON *a = config_obj(have), *b = config_obj(want);
    int count = -1;
    if (a && b) {
        size_t l = 0;
        count = 0;
        diff_walk(a, b, "", out, n, &l, &count);
        if (l >= n && n > 4)
            memcpy(out + n - 4, "...", 4);
    }
    cJSON_Delete(a);
    cJSON_Delete(b);
    return count;
}

int api_config_conflict(api_reply *r, const char *name, const api_config *have,
                        const api_config *want)
{
    char diff[400];
    if (api_config_diff(have, want, diff, sizeof diff) < 0)
        snprintf(diff, sizeof diff, "(could not compare: out of memory)");
    return api_problem(r, 409, NULL,
                       "session %s exists with a different config: %s. PATCH "
                       "/v1/sessions/%s changes hyperparameters, schedule, clip, mode or "
                       "metadata; DELETE it to start over",
                       name, diff, name);
}

int api_config_from_json(const char *json, api_config *c)
{
    config_default(c);
    api_reply r = {0};
    cJSON *root = parse_body(json, strlen(json), &r);
    int st = root ? decode_config_obj(root, c, &r) : 400;
    if (!st) {
        int64_t n;
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(root, "size");
        if (json_int(js, &n) && n > 0)
            c->size = (uint64_t)n;
        else
            st = 400;
    }
    if (!st)
        st = decode_layout(root, c, &r);
    cJSON_Delete(root);
    api_reply_free(&r);
    if (st)
        api_config_free(c);
    return st ? -1 : 0;
}

/* ---------------------------------------------------------- catalogue */

static const char *type_name(optim_hp_type t)
{
    switch (t) {
    case OPTIM_HP_NUM: return "number";
    case OPTIM_HP_NUM_INF: return "number|\"inf\"";
    case OPTIM_HP_INT: return "integer";
    case OPTIM_HP_BOOL: return "boolean";
    case OPTIM_HP_PAIR: return "[number, number]";
    case OPTIM_HP_ENUM: return "string";
    case OPTIM_HP_INT_LIST: return "[integer]";
    }
    return "?";
}

static cJSON *catalogue_params(const optim_hp_spec *specs, size_t n, const void *defaults)
{
    cJSON *arr = cJSON_CreateArray();
    cJSON *vals = cJSON_CreateObject();
    specs_encode(vals, specs, n, defaults);
    for (size_t i = 0; i < n; i++) {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "name", specs[i].name);
        cJSON_AddStringToObject(p, "type", type_name(specs[i].type));
        if (specs[i].required)
            cJSON_AddTrueToObject(p, "required");
        else
            add_item(p, "default",
                                  cJSON_Duplicate(cJSON_GetObjectItem(vals, specs[i].name), 1));
        if (specs[i].type == OPTIM_HP_ENUM) {
            cJSON *ch = cJSON_AddArrayToObject(p, "choices");
            for (int k = 0; specs[i].choices[k]; k++)
                add_elem(ch, cJSON_CreateString(specs[i].choices[k]));
        }
        cJSON_AddStringToObject(p, "doc", specs[i].doc ? specs[i].doc : "");
        add_elem(arr, p);
    }
    cJSON_Delete(vals);
    return arr;
}

char *api_catalogue_json(void)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *opts = cJSON_AddArrayToObject(root, "optimizers");
    for (int k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *oi = optim_info_of((optim_kind)k);
        optim_hparams hp;
        optim_hparams_default((optim_kind)k, &hp);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", oi->name);
        cJSON_AddStringToObject(o, "doc", oi->doc ? oi->doc : "");
        add_item(o, "hyperparameters", catalogue_params(oi->hps, oi->n_hps, &hp));
        cJSON *bufs = cJSON_AddArrayToObject(o, "state");
        for (unsigned s = 0; optim_buffer_name((optim_kind)k, s); s++)
            add_elem(bufs, cJSON_CreateString(optim_buffer_name((optim_kind)k, s)));
        add_elem(opts, o);
    }
    cJSON *scheds = cJSON_AddArrayToObject(root, "schedules");
    for (int k = 0; k < OPTIM_SCHED_KIND_COUNT; k++) {
        const optim_sched_info *si = optim_sched_info_of((optim_sched_kind)k);
        if (!si)
            continue;
        optim_schedule s;
        optim_sched_default((optim_sched_kind)k, &s);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", si->name);
        cJSON_AddStringToObject(o, "doc", si->doc ? si->doc : "");
        add_item(o, "hyperparameters", catalogue_params(si->hps, si->n_hps, &s));
        add_elem(scheds, o);
    }
    cJSON *clips = cJSON_AddArrayToObject(root, "clips");
    for (int k = 1; k <= 2; k++) {
        const optim_clip_info *ci = optim_clip_info_of((optim_clip_kind)k);
        optim_clip c;
        optim_clip_default((optim_clip_kind)k, &c);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "type", ci->name);
        cJSON_AddStringToObject(o, "doc", ci->doc ? ci->doc : "");
        add_item(o, "hyperparameters", catalogue_params(ci->hps, ci->n_hps, &c));
        add_elem(clips, o);
    }
    api_mode m;
    mode_default(&m);
    cJSON *modes = cJSON_AddArrayToObject(root, "modes");
    cJSON *ma = cJSON_CreateObject();
    cJSON_AddStringToObject(ma, "type", "async");
    cJSON_AddStringToObject(ma, "doc", "each gradient is applied on arrival, serialised per "
                                       "session; optional staleness bound and damping");
    add_item(ma, "hyperparameters", catalogue_params(async_specs, N_ASYNC, &m));
    add_elem(modes, ma);
    optim_specs_default(sync_specs, N_SYNC, &m);
    cJSON *ms = cJSON_CreateObject();
    cJSON_AddStringToObject(ms, "type", "sync");
    cJSON_AddStringToObject(ms, "doc", "round t closes when N distinct workers have sent a "
                                       "gradient for step t; one update with their mean or sum");
    add_item(ms, "hyperparameters", catalogue_params(sync_specs, N_SYNC, &m));
    add_elem(modes, ms);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    char *d = s ? dup_str(s) : NULL;
    cJSON_free(s);
    return d;
}

/* ------------------------------------------------------------ init */

/* splitmix64: small, fast, and the same on every platform, so a seed gives
 * the same parameters everywhere. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double unit(uint64_t *s) /* [0, 1) with 53 bits */
{
    return (double)(splitmix64(s) >> 11) * 0x1.0p-53;
}

void api_init_fill(const api_init *init, optim_dtype dt, void *params, size_t n)
{
    uint64_t s = init->seed;
    for (size_t i = 0; i < n; i++) {
        double x = 0.0;
        if (init->type == API_INIT_UNIFORM) {
            x = init->low + (init->high - init->low) * unit(&s);
        } else if (init->type == API_INIT_NORMAL) {
            /* Box-Muller, one value per pair of draws (simple and exact to
             * reproduce). */
            double u1 = 1.0 - unit(&s), u2 = unit(&s);
            x = init->mean + init->std * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
        }
        if (dt == OPTIM_F32)
            ((float *)params)[i] = (float)x;
        else
            ((double *)params)[i] = x;
    }
}
