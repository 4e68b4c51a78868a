/*
 * vector.c -- decoding gradient and parameter bodies (JSON and raw
 * little-endian binary) and the step's metadata headers.  Length and
 * finiteness are checked here, before a session is touched.
 */
#include "api/api.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "optd's binary bodies and BLOBs are little-endian; this port needs byte swapping"
#endif

bool api_vector_finite(optim_dtype dt, const void *v, size_t n)
{
    /* Branch-free accumulation vectorises; x - x is NaN exactly when x is
     * NaN or infinite. */
    if (dt == OPTIM_F32) {
        const float *f = v;
        float acc = 0.0f;
        for (size_t i = 0; i < n; i++)
            acc += f[i] - f[i];
        return acc == 0.0f;
    }
    const double *d = v;
    double acc = 0.0;
    for (size_t i = 0; i < n; i++)
        acc += d[i] - d[i];
    return acc == 0.0;
}

/* double -> float without the undefined behaviour of an out-of-range
 * conversion: too large becomes infinite (and is then refused). */
static float to_f32(double d)
{
    if (d > 3.4028235677973366e38)
        return INFINITY;
    if (d < -3.4028235677973366e38)
        return -INFINITY;
    return (float)d;
}

static int decode_vec(const cJSON *arr, optim_dtype dt, size_t n, void *out, const char *field,
                      api_reply *r)
{
    if (!cJSON_IsArray(arr))
        return api_problem(r, 400, field, "%s must be an array of numbers", field);
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        if (i >= n)
            return api_problem(r, 422, field, "%s has more than the session's %zu elements",
                               field, n);
        if (!cJSON_IsNumber(e))
            return api_problem(r, 400, field, "%s[%zu] is not a number", field, i);
        if (dt == OPTIM_F32)
            ((float *)out)[i] = to_f32(e->valuedouble);
        else
            ((double *)out)[i] = e->valuedouble;
        i++;
    }
    if (i != n)
        return api_problem(r, 422, field, "%s has %zu elements; the session has %zu", field, i,
                           n);
    return 0;
}

static cJSON *parse_obj(const char *body, size_t len, api_reply *r)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!root) {
        api_problem(r, 400, NULL, "malformed JSON near byte %zu",
                    end && end >= body ? (size_t)(end - body) : (size_t)0);
        return NULL;
    }
    while (end && (size_t)(end - body) < len && strchr(" \t\r\n", *end))
        end++;
    if ((end && (size_t)(end - body) < len) || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        api_problem(r, 400, NULL, "the body must be one JSON object");
        return NULL;
    }
    return root;
}

int api_decode_step_json(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                         api_step_meta *meta, api_reply *r)
{
    cJSON *root = parse_obj(body, len, r);
    if (!root)
        return 400;
    int st = 0;
    const cJSON *m;
    const cJSON *grad = NULL;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "grad") == 0) {
            grad = m;
        } else if (strcmp(m->string, "loss") == 0) {
            if (cJSON_IsNull(m))
                continue;
            if (!cJSON_IsNumber(m) || !isfinite(m->valuedouble)) {
                st = api_problem(r, 400, "loss", "loss must be a finite number");
                break;
            }
            meta->loss = m->valuedouble;
        } else if (strcmp(m->string, "base_step") == 0) {
            double d = cJSON_IsNumber(m) ? m->valuedouble : -1;
            if (!cJSON_IsNumber(m) || d < 0 || d != floor(d) || d > 9007199254740992.0) {
                st = api_problem(r, 400, "base_step", "base_step must be a non-negative integer");
                break;
            }
            meta->base_step = (int64_t)d;
        } else if (strcmp(m->string, "worker") == 0) {
            if (!cJSON_IsString(m) || !m->valuestring[0] ||
                strlen(m->valuestring) > API_WORKER_MAX) {
                st = api_problem(r, 400, "worker", "worker must be a string of 1-128 characters");
                break;
            }
            strcpy(meta->worker, m->valuestring);
        } else {
            st = api_problem(r, 400, m->string, "unknown field \"%s\" (grad, loss, base_step, worker)",
                             m->string);
            break;
        }
    }
    if (!st && !grad)
        st = api_problem(r, 400, "grad", "grad (an array of numbers) is required");
    if (!st)
        st = decode_vec(grad, dt, n, out, "grad", r);
    cJSON_Delete(root);
    return st;
}

int api_decode_params_json(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                           api_reply *r)
{
    cJSON *root = parse_obj(body, len, r);
    if (!root)
        return 400;
    int st = 0;
    const cJSON *m;
    const cJSON *params = NULL;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "params") == 0) {
            params = m;
        } else {
            st = api_problem(r, 400, m->string, "unknown field \"%s\" (params)", m->string);
            break;
        }
    }
    if (!st && !params)
        st = api_problem(r, 400, "params", "params (an array of numbers) is required");
    if (!st)
        st = decode_vec(params, dt, n, out, "params", r);
    cJSON_Delete(root);
    return st;
}

int api_decode_vector_binary(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                             const char *what, api_reply *r)
{
    size_t want = n * optim_dtype_size(dt);
    if (len != want)
        return api_problem(r, 422, what,
                           "binary %s has %zu bytes; a %s session of %zu params needs %zu", what,
                           len, optim_dtype_name(dt), n, want);
    memcpy(out, body, len);
    return 0;
}

int api_decode_step_headers(const char *loss, const char *base_step, const char *worker,
                            api_step_meta *meta, api_reply *r)
{
    if (loss) {
        char *end;
        errno = 0;
        double d = strtod(loss, &end);
        if (end == loss || *end || errno || !isfinite(d))
            return api_problem(r, 400, "Optd-Loss", "Optd-Loss must be a finite number");
        meta->loss = d;
    }
    if (base_step) {
        char *end;
        errno = 0;
        long long v = strtoll(base_step, &end, 10);
        if (end == base_step || *end || errno || v < 0)
            return api_problem(r, 400, "Optd-Base-Step",
                               "Optd-Base-Step must be a non-negative integer");
        meta->base_step = v;
    }
    if (worker) {
        size_t l = strlen(worker);
        if (l == 0 || l > API_WORKER_MAX)
            return api_problem(r, 400, "Optd-Worker", "Optd-Worker must have 1-128 characters");
        memcpy(meta->worker, worker, l + 1);
    }
    return 0;
}
