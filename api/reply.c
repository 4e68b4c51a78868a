/*
 * reply.c -- building replies: bodies, headers, problem+json (RFC 9457),
 * and the growing text buffer the encoders print into.
 */
#include "api/api.h"

#include <cjson/cJSON.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void api_reply_free(api_reply *r)
{
    free(r->body);
    r->body = NULL;
    r->len = 0;
    if (r->stream_done)
        r->stream_done(r->stream_ctx);
    r->stream_read = NULL;
    r->stream_done = NULL;
    r->stream_ctx = NULL;
}

void api_reply_header(api_reply *r, const char *name, const char *fmt, ...)
{
    if (r->n_headers >= API_MAX_HEADERS)
        return;
    int i = r->n_headers++;
    snprintf(r->headers[i].name, sizeof r->headers[i].name, "%s", name);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->headers[i].value, sizeof r->headers[i].value, fmt, ap);
    va_end(ap);
}

void api_reply_body(api_reply *r, int status, const char *content_type, char *body, size_t len)
{
    free(r->body);
    r->status = status;
    r->content_type = content_type;
    r->body = body;
    r->len = len;
}

/* Problem types are URNs; docs/errors.md explains each one. */
const char *api_problem_type(int status)
{
    switch (status) {
    case 400: return "urn:optd:problem:bad-request";
    case 401: return "urn:optd:problem:unauthorized";
    case 403: return "urn:optd:problem:forbidden";
    case 404: return "urn:optd:problem:not-found";
    case 405: return "urn:optd:problem:method-not-allowed";
    case 406: return "urn:optd:problem:not-acceptable";
    case 409: return "urn:optd:problem:conflict";
    case 413: return "urn:optd:problem:body-too-large";
    case 415: return "urn:optd:problem:unsupported-media-type";
    case 422: return "urn:optd:problem:unprocessable";
    case 429: return "urn:optd:problem:too-many-requests";
    case 503: return "urn:optd:problem:unavailable";
    case 504: return "urn:optd:problem:round-timeout";
    default: return status >= 500 ? "urn:optd:problem:internal" : "urn:optd:problem:client-error";
    }
}

static const char *status_title(int status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Error";
    }
}

/* A JSON string for the few members printed by hand, escaped by cJSON (the
 * problem body is printed by hand only to keep its member order and its
 * exact integers). */
static int buf_json_string(api_buf *b, const char *s)
{
    cJSON *str = cJSON_CreateString(s);
    char *txt = str ? cJSON_PrintUnformatted(str) : NULL;
    int rc = txt ? api_buf_put(b, txt, strlen(txt)) : -1;
    cJSON_free(txt);
    cJSON_Delete(str);
    return rc;
}

static _Thread_local const char *request_id;

void api_request_id_set(const char *rid)
{
    request_id = rid;
}

static int problem_v(api_reply *r, int status, const char *field, const char *extra_name,
                     int64_t extra_value, const char *fmt, va_list ap)
{
    char detail[600];
    vsnprintf(detail, sizeof detail, fmt, ap);
    api_buf b = {0};
    int rc = api_buf_printf(&b, "{\"type\":\"%s\",\"title\":\"%s\",\"status\":%d,\"detail\":",
                            api_problem_type(status), status_title(status), status);
    rc |= buf_json_string(&b, detail);
    if (field) {
        rc |= api_buf_put(&b, ",\"field\":", 9);
        rc |= buf_json_string(&b, field);
    }
    if (extra_name)
        rc |= api_buf_printf(&b, ",\"%s\":%lld", extra_name, (long long)extra_value);
    if (request_id) {
        rc |= api_buf_put(&b, ",\"request_id\":", 14);
        rc |= buf_json_string(&b, request_id);
    }
    rc |= api_buf_put(&b, "}", 1);
    if (rc) {
        free(b.data);
        /* Out of memory: an empty 503 is still an answer. */
        api_reply_body(r, 503, "application/problem+json", NULL, 0);
        return status;
    }
    api_reply_body(r, status, "application/problem+json", b.data, b.len);
    return status;
}

int api_problem(api_reply *r, int status, const char *field, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    problem_v(r, status, field, NULL, 0, fmt, ap);
    va_end(ap);
    return status;
}

int api_problem_with(api_reply *r, int status, const char *field, const char *extra_name,
                     int64_t extra_value, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    problem_v(r, status, field, extra_name, extra_value, fmt, ap);
    va_end(ap);
    return status;
}

/* ------------------------------------------------------------ buffers */

static int buf_reserve(api_buf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) {
        if (cap > SIZE_MAX / 2)
            return -1;
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (!d)
        return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

int api_buf_put(api_buf *b, const char *s, size_t n)
{
    if (buf_reserve(b, n))
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int api_buf_printf(api_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    if ((size_t)n < sizeof tmp)
        return api_buf_put(b, tmp, (size_t)n);
    if (buf_reserve(b, (size_t)n))
        return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int api_buf_double(api_buf *b, double x)
{
    if (!isfinite(x))
        return api_buf_put(b, "null", 4);
    return api_buf_printf(b, "%.17g", x);
}

/* %.9g round-trips every float32 and %.17g every float64 exactly;
 * api_fmt_f32/f64 print the same bytes without printf's cost. */
int api_buf_vector(api_buf *b, optim_dtype dt, const void *v, size_t n)
{
    /* Worst case per element: "-1.23456789e-38," is 16 chars (float32),
     * 25 for float64; reserve once (plus the 32 a formatter may touch),
     * print in place. */
    size_t per = dt == OPTIM_F32 ? 17 : 26;
    if (n > (SIZE_MAX - 64) / per || buf_reserve(b, n * per + 34))
        return -1;
    char *p = b->data + b->len;
    *p++ = '[';
    if (dt == OPTIM_F32) {
        const float *f = v;
        for (size_t i = 0; i < n; i++) {
            if (isfinite(f[i])) {
                p += api_fmt_f32(p, f[i]);
            } else {
                memcpy(p, "null", 4);
                p += 4;
            }
            *p++ = ',';
        }
    } else {
        const double *d = v;
        for (size_t i = 0; i < n; i++) {
            if (isfinite(d[i])) {
                p += api_fmt_f64(p, d[i]);
            } else {
                memcpy(p, "null", 4);
                p += 4;
            }
            *p++ = ',';
        }
    }
    if (n)
        p--; /* the last comma */
    *p++ = ']';
    *p = '\0';
    b->len = (size_t)(p - b->data);
    return 0;
}
