/*
 * safetensors.c -- the safetensors container (the layout torch, JAX and
 * Hugging Face use for tensors on disk): an 8-byte little-endian header
 * length, a JSON header naming each tensor's dtype, shape and byte range,
 * then the raw little-endian data.  The header may carry a string-to-string
 * "__metadata__" map.  optd writes and reads session state with it
 * (GET/PUT /v1/sessions/{name}/state; docs/api.md).
 */
#include "api/api.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *dtype_tag(optim_dtype dt)
{
    return dt == OPTIM_F64 ? "F64" : "F32";
}

char *api_st_header(const api_st_tensor *t, size_t n, const char *const *meta, size_t n_meta,
                    size_t *len)
{
    cJSON *h = cJSON_CreateObject();
    if (!h)
        return NULL;
    if (n_meta) {
        cJSON *m = cJSON_AddObjectToObject(h, "__metadata__");
        for (size_t k = 0; k < n_meta; k++)
            cJSON_AddStringToObject(m, meta[2 * k], meta[2 * k + 1]);
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "dtype", dtype_tag(t[i].dtype));
        cJSON *sh = cJSON_AddArrayToObject(o, "shape");
        for (int d = 0; d < t[i].ndim; d++)
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)t[i].shape[d]));
        cJSON *r = cJSON_AddArrayToObject(o, "data_offsets");
        cJSON_AddItemToArray(r, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(r, cJSON_CreateNumber((double)(off + t[i].bytes)));
        off += t[i].bytes;
        cJSON_AddItemToObject(h, t[i].name, o);
    }
    char *json = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!json)
        return NULL;
    /* The JSON is padded with spaces so that the data starts 8-aligned. */
    size_t jl = strlen(json), padded = (jl + 7) / 8 * 8;
    char *out = malloc(8 + padded);
    if (out) {
        uint64_t hl = padded;
        memcpy(out, &hl, 8);
        memcpy(out + 8, json, jl);
        memset(out + 8 + jl, ' ', padded - jl);
        *len = 8 + padded;
    }
    cJSON_free(json);
    return out;
}

int api_st_parse(const char *body, size_t len, api_st_tensor **out, size_t *n, cJSON **meta,
                 api_reply *r)
{
    *out = NULL;
    *n = 0;
    *meta = NULL;
    uint64_t hl;
    if (len < 8)
        return api_problem(r, 400, NULL, "not a safetensors file: %zu bytes", len);
    memcpy(&hl, body, 8);
    if (hl < 2 || hl > len - 8 || hl > (100u << 20))
        return api_problem(r, 400, NULL, "not a safetensors file: a header of %llu bytes in a "
                                         "body of %zu", (unsigned long long)hl, len);
    cJSON *h = cJSON_ParseWithLength(body + 8, (size_t)hl);
    if (!cJSON_IsObject(h)) {
        cJSON_Delete(h);
        return api_problem(r, 400, NULL, "the safetensors header is not a JSON object");
    }
    const char *data = body + 8 + hl;
    size_t dlen = len - 8 - (size_t)hl;
    size_t cnt = 0;
    for (cJSON *e = h->child; e; e = e->next)
        cnt += strcmp(e->string, "__metadata__") != 0;
    api_st_tensor *t = calloc(cnt ? cnt : 1, sizeof *t);
    if (!t) {
        cJSON_Delete(h);
        return api_problem(r, 503, NULL, "out of memory");
    }
    size_t i = 0;
    int st = 0;
    for (cJSON *e = h->child; e && !st; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(e))
                st = api_problem(r, 400, NULL, "__metadata__ must be an object of strings");
            continue;
        }
        cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
        cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        api_st_tensor *T = &t[i];
        T->name = e->string;
        if (!cJSON_IsString(dt) ||
            (strcmp(dt->valuestring, "F32") != 0 && strcmp(dt->valuestring, "F64") != 0)) {
            st = api_problem(r, 422, NULL, "tensor %s: dtype must be F32 or F64", e->string);
            break;
        }
        T->dtype = strcmp(dt->valuestring, "F64") == 0 ? OPTIM_F64 : OPTIM_F32;
        int nd = cJSON_IsArray(sh) ? cJSON_GetArraySize(sh) : -1;
        if (nd < 0 || nd > API_MAX_DIMS || !cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2) {
            st = api_problem(r, 400, NULL, "tensor %s: bad shape or data_offsets", e->string);
            break;
        }
        uint64_t numel = 1;
        for (int d = 0; d < nd; d++) {
            double v = cJSON_GetArrayItem(sh, d)->valuedouble;
            if (!(v >= 0 && v < 9007199254740992.0) || v != (double)(int64_t)v) {
                st = api_problem(r, 400, NULL, "tensor %s: bad shape", e->string);
                break;
            }
            T->shape[d] = (int64_t)v;
            numel *= (uint64_t)v;
        }
        if (st)
            break;
        T->ndim = nd;
        double a = cJSON_GetArrayItem(of, 0)->valuedouble, b = cJSON_GetArrayItem(of, 1)->valuedouble;
        if (!(a >= 0 && b >= a && b <= (double)dlen) ||
            (uint64_t)(b - a) != numel * optim_dtype_size(T->dtype)) {
            st = api_problem(r, 400, NULL, "tensor %s: data_offsets [%.0f, %.0f] do not fit its "
                                           "shape or the %zu data bytes", e->string, a, b, dlen);
            break;
        }
        T->data = data + (size_t)a;
        T->bytes = (size_t)(b - a);
        i++;
    }
    if (st) {
        free(t);
        cJSON_Delete(h);
        return st;
    }
    *out = t;
    *n = i;
    *meta = h; /* owns the names; metadata under "__metadata__" */
    return 0;
}

const api_st_tensor *api_st_find(const api_st_tensor *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0)
            return &t[i];
    return NULL;
}
