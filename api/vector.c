/*
 * vector.c -- decoding gradient and parameter bodies (JSON and raw
 * little-endian binary) and the step's metadata headers.  Length and
 * finiteness are checked here, before a session is touched.
 *
 * JSON vectors take a fast path: a scanner walks the top-level object,
 * parses the elements of `grad` (or `params`) straight into the caller's
 * buffer, and hands cJSON a copy of the body with that array's span
 * replaced by [] for the other members -- no node per number.  It accepts
 * only what it is sure of: RFC 8259 numbers (cJSON also takes "01" and
 * "1."; those go its way), unescaped member names, the vector member
 * once, and the exact element count.  Anything else, and any error the copy
 * meets, reruns the body through the plain cJSON path, which says what is
 * wrong exactly as before.
 */
#include "api/api.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <float.h>
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

/* ------------------------------------------------ the scanner */

static const char *skip_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* p at '"': the position after the closing quote, NULL if unterminated;
 * *esc set when the string holds a backslash. */
static const char *skip_string(const char *p, const char *e, bool *esc)
{
    for (p++; p < e; p++) {
        if (*p == '"')
            return p + 1;
        if (*p == '\\') {
            *esc = true;
            if (++p >= e)
                return NULL;
        }
    }
    return NULL;
}

/* Skips one member value (not validated: cJSON reads it from the copy);
 * returns the position after it, NULL at the end of the input. */
static const char *skip_value(const char *p, const char *e)
{
    size_t depth = 0;
    while (p < e) {
        char c = *p;
        if (c == '"') {
            bool esc = false;
            p = skip_string(p, e, &esc);
            if (!p)
                return NULL;
            if (depth == 0)
                return p;
            continue;
        }
        if (c == '[' || c == '{') {
            depth++;
        } else if (c == ']' || c == '}') {
            if (depth == 0)
                return p;
            if (--depth == 0)
                return p + 1;
        } else if (c == ',' && depth == 0) {
            return p;
        }
        p++;
    }
    return NULL;
}

/* Exact powers of ten as doubles (10^22 is the last one). */
static const double EXACT10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

#if LDBL_MANT_DIG == 64
/* ... and as long doubles (10^27 is the last one with 5^k < 2^64). */
static const long double EXACT10L[] = {
    1e0L,  1e1L,  1e2L,  1e3L,  1e4L,  1e5L,  1e6L,  1e7L,  1e8L,  1e9L,
    1e10L, 1e11L, 1e12L, 1e13L, 1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L,
    1e20L, 1e21L, 1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L};
#endif

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* One RFC 8259 number at p, followed by at least one more byte before e;
 * *v = the double strtod (and so cJSON) reads from it.  NULL when the
 * token is not such a number.
 *
 * With at most 19 significant digits m and a scale 10^s the value is
 * m * 10^s (s >= 0) or m / 10^s (s < 0), computed exactly once:
 *   m <= 2^53, |s| <= 22: both operands exact doubles, one correctly
 *     rounded IEEE operation -- the double strtod rounds to.
 *   else |s| <= 27, x87 long double: m and 10^s exact (64-bit
 *     significands), one rounding, |y - v| <= |y| 2^-64.  y rounded to
 *     double is strtod's double unless y lies within that error of the
 *     rounding boundary of the double (half an ulp from it, a quarter
 *     below a power of two); then strtod decides (about 1 in 500).
 * Everything else goes to strtod. */
static const char *parse_number(const char *p, const char *e, double *v)
{
    const char *s = p;
    bool neg = false;
    if (p < e && *p == '-') {
        neg = true;
        p++;
    }
    if (p >= e)
        return NULL;
    uint64_t m = 0;
    int nd = 0, scale = 0;
    bool simple = true;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        for (; p < e && is_digit(*p); p++) {
            if (nd < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                nd++;
            } else {
                simple = false;
            }
        }
    } else {
        return NULL;
    }
    if (p < e && *p == '.') {
        p++;
        if (p >= e || !is_digit(*p))
            return NULL;
        for (; p < e && is_digit(*p); p++) {
            if (m == 0 && *p == '0') {
                scale--;
            } else if (nd < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                nd++;
                scale--;
            } else {
                simple = false;
            }
        }
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        bool eneg = false;
        if (p < e && (*p == '+' || *p == '-'))
            eneg = *p++ == '-';
        if (p >= e || !is_digit(*p))
            return NULL;
        int x = 0;
        for (; p < e && is_digit(*p); p++)
            if (x < 100000)
                x = x * 10 + (*p - '0');
        scale += eneg ? -x : x;
    }
    if (p >= e)
        return NULL;
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
    if (simple && m <= (UINT64_C(1) << 53) && scale >= -22 && scale <= 22) {
        double d = (double)m;
        d = scale < 0 ? d / EXACT10[-scale] : d * EXACT10[scale];
        *v = neg ? -d : d;
        return p;
    }
#if LDBL_MANT_DIG == 64
    if (simple && m != 0 && scale >= -27 && scale <= 27 && api_ld64_exact()) {
        long double y = (long double)m, t = EXACT10L[scale < 0 ? -scale : scale];
        y = scale < 0 ? y / t : y * t;
        double d = (double)y;
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        int be = (int)(bits >> 52 & 0x7ff); /* d in [1e-27, 2e46]: normal */
        if (be > 54 && be < 2047) {
            /* half an ulp of d, 2^(be-1076); a quarter below a power of two */
            uint64_t hb = (uint64_t)(be - 53) << 52;
            if ((bits & 0xfffffffffffffu) == 0 && y < (long double)d)
                hb -= UINT64_C(1) << 52;
            double half;
            memcpy(&half, &hb, sizeof half);
            long double r = y - (long double)d;
            if (fabsl(r) + y * 0x1p-63L < (long double)half) {
                *v = neg ? -d : d;
                return p;
            }
        }
    }
#endif
#else
    (void)simple;
    (void)EXACT10;
#if LDBL_MANT_DIG == 64
    (void)EXACT10L;
#endif
#endif
    char *end;
    *v = strtod(s, &end);
    return end == p ? p : NULL;
}

/* p at '[': parses exactly n numbers into out; the position after ']',
 * or NULL for anything else. */
static const char *parse_array(const char *p, const char *e, optim_dtype dt, size_t n,
                               void *out)
{
    p = skip_ws(p + 1, e);
    if (p < e && *p == ']')
        return n == 0 ? p + 1 : NULL;
    float *f = dt == OPTIM_F32 ? out : NULL;
    double *d = dt == OPTIM_F32 ? NULL : out;
    for (size_t i = 0;; i++) {
        double x;
        if (i >= n || !(p = parse_number(p, e, &x)))
            return NULL;
        if (f)
            f[i] = to_f32(x);
        else
            d[i] = x;
        p = skip_ws(p, e);
        if (p >= e)
            return NULL;
        if (*p == ']')
            return i + 1 == n ? p + 1 : NULL;
        if (*p != ',')
            return NULL;
        p = skip_ws(p + 1, e);
    }
}

/* The fast path's first half: finds the one top-level member `field`,
 * decodes its array into out and returns the array's span [*a0, *a1).
 * false: take the cJSON path. */
static bool scan_vector(const char *body, size_t len, const char *field, optim_dtype dt,
                        size_t n, void *out, size_t *a0, size_t *a1)
{
    const char *e = body + len, *p = skip_ws(body, e);
    size_t flen = strlen(field);
    bool found = false;
    if (p >= e || *p != '{')
        return false;
    p++;
    for (;;) {
        p = skip_ws(p, e);
        if (p >= e || *p != '"')
            return false;
        bool esc = false;
        const char *key = p + 1, *q = skip_string(p, e, &esc);
        if (!q || esc)
            return false;
        bool is_field = (size_t)(q - 1 - key) == flen && memcmp(key, field, flen) == 0;
        p = skip_ws(q, e);
        if (p >= e || *p != ':')
            return false;
        p = skip_ws(p + 1, e);
        if (is_field) {
            if (found || p >= e || *p != '[')
                return false;
            found = true;
            *a0 = (size_t)(p - body);
            if (!(p = parse_array(p, e, dt, n, out)))
                return false;
            *a1 = (size_t)(p - body);
        } else if (!(p = skip_value(p, e))) {
            return false;
        }
        p = skip_ws(p, e);
        if (p >= e)
            return false;
        if (*p == '}')
            return found;
        if (*p != ',')
            return false;
        p++;
    }
}

/* The fast path's second half: the body with [a0, a1) replaced by "[]",
 * parsed by cJSON.  NULL when out of memory or the copy does not parse
 * (the cJSON path then answers). */
static cJSON *parse_rest(const char *body, size_t len, size_t a0, size_t a1)
{
    size_t rl = len - (a1 - a0) + 2;
    char *copy = malloc(rl + 1);
    if (!copy)
        return NULL;
    memcpy(copy, body, a0);
    memcpy(copy + a0, "[]", 2);
    memcpy(copy + a0 + 2, body + a1, len - a1);
    copy[rl] = '\0';
    api_reply scratch = {0};
    cJSON *root = parse_obj(copy, rl, &scratch);
    api_reply_free(&scratch);
    free(copy);
    return root;
}

/* The members of a step body other than grad (found in *grad). */
static int step_members(const cJSON *root, const cJSON **grad, api_step_meta *meta,
                        api_reply *r)
{
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "grad") == 0) {
            if (*grad)
                return api_problem(r, 400, "grad", "grad appears more than once");
            *grad = m;
        } else if (strcmp(m->string, "loss") == 0) {
            if (cJSON_IsNull(m))
                continue;
            if (!cJSON_IsNumber(m) || !isfinite(m->valuedouble))
                return api_problem(r, 400, "loss", "loss must be a finite number");
            meta->loss = m->valuedouble;
        } else if (strcmp(m->string, "base_step") == 0) {
            double d = cJSON_IsNumber(m) ? m->valuedouble : -1;
            if (!cJSON_IsNumber(m) || d < 0 || d != floor(d) || d > 9007199254740992.0)
                return api_problem(r, 400, "base_step", "base_step must be a non-negative integer");
            meta->base_step = (int64_t)d;
        } else if (strcmp(m->string, "worker") == 0) {
            if (!cJSON_IsString(m) || !m->valuestring[0] ||
                strlen(m->valuestring) > API_WORKER_MAX)
                return api_problem(r, 400, "worker", "worker must be a string of 1-128 characters");
            strcpy(meta->worker, m->valuestring);
        } else {
            return api_problem(r, 400, m->string,
                               "unknown field \"%s\" (grad, loss, base_step, worker)", m->string);
        }
    }
    if (!*grad)
        return api_problem(r, 400, "grad", "grad (an array of numbers) is required");
    return 0;
}

static int params_members(const cJSON *root, const cJSON **params, api_reply *r)
{
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        if (strcmp(m->string, "params") != 0)
            return api_problem(r, 400, m->string, "unknown field \"%s\" (params)", m->string);
        if (*params)
            return api_problem(r, 400, "params", "params appears more than once");
        *params = m;
    }
    if (!*params)
        return api_problem(r, 400, "params", "params (an array of numbers) is required");
    return 0;
}

int api_decode_step_json(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                         api_step_meta *meta, api_reply *r)
{
    size_t a0, a1;
    const cJSON *grad = NULL;
    if (scan_vector(body, len, "grad", dt, n, out, &a0, &a1)) {
        cJSON *rest = parse_rest(body, len, a0, a1);
        if (rest) {
            api_reply scratch = {0};
            int st = step_members(rest, &grad, meta, &scratch);
            api_reply_free(&scratch);
            cJSON_Delete(rest);
            if (!st)
                return 0;
            grad = NULL;
        }
    }
    cJSON *root = parse_obj(body, len, r);
    if (!root)
        return 400;
    int st = step_members(root, &grad, meta, r);
    if (!st)
        st = decode_vec(grad, dt, n, out, "grad", r);
    cJSON_Delete(root);
    return st;
}

int api_decode_params_json(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                           api_reply *r)
{
    size_t a0, a1;
    const cJSON *params = NULL;
    if (scan_vector(body, len, "params", dt, n, out, &a0, &a1)) {
        cJSON *rest = parse_rest(body, len, a0, a1);
        if (rest) {
            api_reply scratch = {0};
            int st = params_members(rest, &params, &scratch);
            api_reply_free(&scratch);
            cJSON_Delete(rest);
            if (!st)
                return 0;
            params = NULL;
        }
    }
    cJSON *root = parse_obj(body, len, r);
    if (!root)
        return 400;
    int st = params_members(root, &params, r);
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
