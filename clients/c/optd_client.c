/*
 * optd_client.c -- the C client: one libcurl easy handle per client (so
 * requests reuse a keep-alive connection), retries with backoff for
 * transient failures, binary step and params bodies, problem+json errors.
 */
#include "clients/c/optd_client.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <sys/random.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "optd's binary bodies are little-endian; this port needs byte swapping"
#endif

#define MAX_EXTRA_HEADERS 16
#define KEY_BUF 201 /* the daemon takes keys of up to 200 characters */

struct optd_client {
    CURL *h;
    char *base;               /* without a trailing slash */
    char *auth;               /* "Authorization: Bearer KEY" or NULL */
    int max_attempts;
    long backoff0_ms, backoff_max_ms;
    long connect_ms, request_ms;
    bool no_params_check;
    optd_wire wire;           /* never OPTD_WIRE_DEFAULT */
    char *tls_ca, *tls_cert, *tls_key; /* PEM files for https://, or NULL */
    char *ca_default;         /* libcurl's own CA bundle (NULL: none built in) */
    bool ca_changed;          /* CURLOPT_CAINFO was set once */
    char errbuf[CURL_ERROR_SIZE];
};

/* curl_global_init is not safe to race; every client goes through here. */
static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_OK;

static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

optd_client *optd_client_new(const char *base_url, const char *api_key)
{
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK || !base_url)
        return NULL;
    optd_client *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->base = strdup(base_url);
    c->h = curl_easy_init();
    if (api_key && *api_key) {
        size_t n = strlen(api_key) + 32;
        c->auth = malloc(n);
        if (c->auth)
            snprintf(c->auth, n, "Authorization: Bearer %s", api_key);
    }
    if (!c->base || !c->h || (api_key && *api_key && !c->auth)) {
        optd_client_free(c);
        return NULL;
    }
    size_t bl = strlen(c->base);
    while (bl > 0 && c->base[bl - 1] == '/')
        c->base[--bl] = '\0';
    c->max_attempts = OPTD_DEFAULT_RETRIES + 1;
    c->backoff0_ms = OPTD_DEFAULT_BACKOFF_MS;
    c->backoff_max_ms = OPTD_DEFAULT_MAX_BACKOFF_MS;
    c->connect_ms = 5000;
    c->request_ms = 60000;
    c->wire = OPTD_WIRE_FULL;
    return c;
}

void optd_client_free(optd_client *c)
{
    if (!c)
        return;
    if (c->h)
        curl_easy_cleanup(c->h);
    free(c->base);
    free(c->auth);
    free(c->tls_ca);
    free(c->tls_cert);
    free(c->tls_key);
    free(c->ca_default);
    free(c);
}

/* A copy of s, or NULL for NULL or "" (*ok false when out of memory). */
static char *dup_opt(const char *s, bool *ok)
{
    if (!s || !*s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *ok = false;
    return d;
}

int optd_client_set_tls(optd_client *c, const char *ca_file, const char *cert_file,
                        const char *key_file)
{
    if (!cert_file != !key_file || (cert_file && !*cert_file) || (key_file && !*key_file))
        return -1;
    bool ok = true;
    char *ca = dup_opt(ca_file, &ok), *cert = dup_opt(cert_file, &ok), *key = dup_opt(key_file, &ok);
    if (!ok) {
        free(ca);
        free(cert);
        free(key);
        return -1;
    }
    if (ca && !c->ca_changed) {
        /* The bundle libcurl uses by default, to go back to when ca_file
         * is NULL again. */
        char *def = NULL;
#if LIBCURL_VERSION_NUM >= 0x075400
        curl_easy_getinfo(c->h, CURLINFO_CAINFO, &def);
#endif
        c->ca_default = def ? strdup(def) : NULL;
        c->ca_changed = true;
    }
    free(c->tls_ca);
    free(c->tls_cert);
    free(c->tls_key);
    c->tls_ca = ca;
    c->tls_cert = cert;
    c->tls_key = key;
    return 0;
}

void optd_client_set_retry(optd_client *c, int max_attempts, long initial_backoff_ms,
                           long max_backoff_ms)
{
    c->max_attempts = max_attempts < 1 ? 1 : max_attempts;
    c->backoff0_ms = initial_backoff_ms < 0 ? 0 : initial_backoff_ms;
    c->backoff_max_ms = max_backoff_ms < c->backoff0_ms ? c->backoff0_ms : max_backoff_ms;
}

void optd_client_set_timeouts(optd_client *c, long connect_ms, long request_ms)
{
    c->connect_ms = connect_ms > 0 ? connect_ms : 5000;
    c->request_ms = request_ms > 0 ? request_ms : 60000;
}

int optd_client_set_wire(optd_client *c, optd_wire wire)
{
    if ((unsigned)wire > OPTD_WIRE_FLOAT16)
        return -1;
    c->wire = wire == OPTD_WIRE_DEFAULT ? OPTD_WIRE_FULL : wire;
    return 0;
}

/* ------------------------------------------------- 16-bit wire forms
 *
 * bfloat16 is the top half of a float32; float16 is IEEE binary16.  The
 * rounding is the daemon's: from float32 (a double is rounded to float
 * first), to nearest with ties to even; NaN stays a quiet NaN with its sign
 * and top payload bits; past float16's range is Inf.  Widening is exact.
 */

static uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

uint16_t optd_f32_to_bf16(float x)
{
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float optd_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t optd_f32_to_f16(float x)
{
    uint32_t u = f32_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* rounds to 65520 or more */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {
        /* Below 2^-14: a subnormal float16 or zero; value * 2^24 is the
         * significand shifted right by 126 - exponent. */
        uint32_t e = a >> 23;
        if (e < 102) /* below 2^-25, or a float32 subnormal */
            return (uint16_t)sign;
        uint32_t sig = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;
        uint32_t q = sig >> shift;
        uint32_t r = sig & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (r > half || (r == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ffu);
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

float optd_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0) {
        if (m == 0)
            return bits_f32(sign);
        e = 113; /* normalise the subnormal */
        while (!(m & 0x400u)) {
            m <<= 1;
            e--;
        }
        return bits_f32(sign | (e << 23) | ((m & 0x3ffu) << 13));
    }
    if (e == 31)
        return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static bool wire_half(optd_wire w)
{
    return w == OPTD_WIRE_BFLOAT16 || w == OPTD_WIRE_FLOAT16;
}

/* A call's form: its own, else the client's.  -1 for a bad value. */
static int wire_for(const optd_client *c, optd_wire w)
{
    if ((unsigned)w > OPTD_WIRE_FLOAT16)
        return -1;
    return w == OPTD_WIRE_DEFAULT ? (int)c->wire : (int)w;
}

/* n values (esize 4: float, 8: double) narrowed to w.  Returns a new
 * buffer of 2n bytes (caller frees), or NULL when out of memory. */
static unsigned char *narrow_vec(const void *v, size_t n, size_t esize, optd_wire w)
{
    unsigned char *out = malloc(n ? 2 * n : 1);
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        float f = esize == 4 ? ((const float *)v)[i] : (float)((const double *)v)[i];
        uint16_t h = w == OPTD_WIRE_BFLOAT16 ? optd_f32_to_bf16(f) : optd_f32_to_f16(f);
        memcpy(out + 2 * i, &h, 2);
    }
    return out;
}

/* Copies a binary params answer of n elements into out (esize 4 or 8),
 * widened when the answer's Optd-Dtype names a 16-bit form.  0, or -1 when
 * its length is not n elements. */
static int answer_params(const optd_response *r, void *out, size_t n, size_t esize)
{
    const char *form = optd_response_header(r, OPTD_HEADER_DTYPE);
    optd_wire w = OPTD_WIRE_FULL;
    if (form && strcmp(form, "bfloat16") == 0)
        w = OPTD_WIRE_BFLOAT16;
    else if (form && strcmp(form, "float16") == 0)
        w = OPTD_WIRE_FLOAT16;
    if (!wire_half(w)) {
        if (r->len != n * esize)
            return -1;
        memcpy(out, r->body, r->len);
        return 0;
    }
    if (r->len != 2 * n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, r->body + 2 * i, 2);
        float f = w == OPTD_WIRE_BFLOAT16 ? optd_bf16_to_f32(h) : optd_f16_to_f32(h);
        if (esize == 4)
            ((float *)out)[i] = f;
        else
            ((double *)out)[i] = f;
    }
    return 0;
}

/* ------------------------------------------------------------ errors */

static void err_clear(optd_error *err)
{
    if (!err)
        return;
    memset(err, 0, sizeof *err);
    err->step = -1;
}

static void err_set(optd_error *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void err_set(optd_error *err, int status, const char *fmt, ...)
{
    if (!err)
        return;
    err_clear(err);
    err->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->detail, sizeof err->detail, fmt, ap);
    va_end(ap);
}

static void copy_str(char *dst, size_t cap, const cJSON *item)
{
    if (cJSON_IsString(item) && item->valuestring)
        snprintf(dst, cap, "%s", item->valuestring);
}

/* The answer's Retry-After as delta-seconds (capped at a day), or -1 when it
 * has none or not in that form. */
static long retry_after_s(const optd_response *r)
{
    const char *v = optd_response_header(r, "Retry-After");
    if (!v)
        return -1;
    while (*v == ' ' || *v == '\t')
        v++;
    if (!isdigit((unsigned char)*v))
        return -1;
    long s = 0;
    for (; isdigit((unsigned char)*v); v++)
        s = s >= 86400 ? 86400 : s * 10 + (*v - '0');
    while (*v == ' ' || *v == '\t')
        v++;
    if (*v)
        return -1;
    return s > 86400 ? 86400 : s;
}

void optd_error_from_response(const optd_response *r, optd_error *err)
{
    if (!err)
        return;
    err_clear(err);
    err->status = r->status;
    cJSON *root = NULL;
    if (r->body && r->len && strstr(r->content_type, "json"))
        root = cJSON_ParseWithLength(r->body, r->len);
    if (cJSON_IsObject(root)) {
        copy_str(err->type, sizeof err->type, cJSON_GetObjectItemCaseSensitive(root, "type"));
        copy_str(err->title, sizeof err->title, cJSON_GetObjectItemCaseSensitive(root, "title"));
        copy_str(err->detail, sizeof err->detail,
                 cJSON_GetObjectItemCaseSensitive(root, "detail"));
        copy_str(err->field, sizeof err->field, cJSON_GetObjectItemCaseSensitive(root, "field"));
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "step");
        if (cJSON_IsNumber(st))
            err->step = (long long)st->valuedouble;
    } else if (r->body && r->len) {
        snprintf(err->detail, sizeof err->detail, "%.*s",
                 (int)(r->len < sizeof err->detail ? r->len : sizeof err->detail - 1), r->body);
    }
    cJSON_Delete(root);
    long ra = retry_after_s(r);
    err->retry_after = ra > 0 ? (int)ra : 0;
}

/* ---------------------------------------------------------- responses */

typedef struct {
    char *data;
    size_t len, cap;
    int oom;
} growbuf;

static int grow_put(growbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1) {
            if (cap > SIZE_MAX / 2)
                return -1;
            cap *= 2;
        }
        char *d = realloc(b->data, cap);
        if (!d)
            return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *ud)
{
    growbuf *b = ud;
    size_t n = size * nmemb;
    if (grow_put(b, ptr, n)) {
        b->oom = 1;
        return 0; /* aborts the transfer */
    }
    return n;
}

static void headers_free(optd_response *r)
{
    for (size_t i = 0; i < r->n_headers; i++) {
        free(r->headers[i].name);
        free(r->headers[i].value);
    }
    free(r->headers);
    r->headers = NULL;
    r->n_headers = 0;
}

/* The final response's headers as libcurl parsed them (curl_easy_nextheader
 * walks the last request's, after any "100 Continue"), copied into r so
 * that they outlive the handle's next transfer.  0, or -1 out of memory. */
static int copy_headers(CURL *h, optd_response *r)
{
    struct curl_header *prev = NULL, *hd;
    while ((hd = curl_easy_nextheader(h, CURLH_HEADER, -1, prev))) {
        prev = hd;
        optd_header *hs = realloc(r->headers, (r->n_headers + 1) * sizeof *hs);
        if (!hs)
            return -1;
        r->headers = hs;
        char *name = strdup(hd->name);
        char *value = strdup(hd->value ? hd->value : "");
        if (!name || !value) {
            free(name);
            free(value);
            return -1;
        }
        hs[r->n_headers].name = name;
        hs[r->n_headers].value = value;
        r->n_headers++;
    }
    return 0;
}

const char *optd_response_header(const optd_response *r, const char *name)
{
    for (size_t i = 0; i < r->n_headers; i++)
        if (strcasecmp(r->headers[i].name, name) == 0)
            return r->headers[i].value;
    return NULL;
}

void optd_response_free(optd_response *r)
{
    if (!r)
        return;
    free(r->body);
    r->body = NULL;
    r->len = 0;
    headers_free(r);
}

/* ------------------------------------------------------------ requests */

static bool has_header(const char *const *headers, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; headers && headers[i]; i++)
        if (strncasecmp(headers[i], name, n) == 0 && headers[i][n] == ':')
            return true;
    return false;
}

/* One attempt.  Returns 0 with *out filled when an answer came, else the
 * CURLcode (> 0) with err filled. */
static int perform(optd_client *c, const char *method, const char *path,
                   const char *const *headers, const void *body, size_t len, optd_response *out,
                   optd_error *err)
{
    memset(out, 0, sizeof *out);
    CURL *h = c->h;
    /* reset keeps the connection cache: the next request reuses the socket. */
    curl_easy_reset(h);

    size_t ul = strlen(c->base) + strlen(path) + 1;
    char *url = malloc(ul);
    if (!url) {
        err_set(err, 0, "out of memory");
        return CURLE_OUT_OF_MEMORY;
    }
    snprintf(url, ul, "%s%s", c->base, path);

    struct curl_slist *list = NULL, *tmp;
    bool oom = false;
    for (size_t i = 0; headers && headers[i]; i++) {
        if (!(tmp = curl_slist_append(list, headers[i])))
            oom = true;
        else
            list = tmp;
    }
    if (c->auth && !has_header(headers, "Authorization")) {
        if (!(tmp = curl_slist_append(list, c->auth)))
            oom = true;
        else
            list = tmp;
    }
    /* libcurl would wait for "100 Continue" before larger bodies: a round
     * trip for nothing on a daemon that answers at once. */
    if (!has_header(headers, "Expect")) {
        if (!(tmp = curl_slist_append(list, "Expect:")))
            oom = true;
        else
            list = tmp;
    }
    if (body && !has_header(headers, "Content-Type")) {
        if (!(tmp = curl_slist_append(list, "Content-Type: application/json")))
            oom = true;
        else
            list = tmp;
    }
    if (oom) {
        curl_slist_free_all(list);
        free(url);
        err_set(err, 0, "out of memory");
        return CURLE_OUT_OF_MEMORY;
    }

    growbuf b = {0};
    c->errbuf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, c->connect_ms);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, c->request_ms);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, c->errbuf);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, list);
    /* https://: the CA bundle the daemon's certificate must verify against
     * (NULL: the system's) and the client certificate for mutual TLS. */
    if (c->tls_ca || c->ca_changed)
        curl_easy_setopt(h, CURLOPT_CAINFO, c->tls_ca ? c->tls_ca : c->ca_default);
    curl_easy_setopt(h, CURLOPT_SSLCERT, c->tls_cert);
    curl_easy_setopt(h, CURLOPT_SSLKEY, c->tls_key);
    if (strcmp(method, "GET") == 0 && !body) {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
        if (body || strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 ||
            strcmp(method, "PATCH") == 0) {
            curl_easy_setopt(h, CURLOPT_POSTFIELDS, body ? (const char *)body : "");
            curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)(body ? len : 0));
        }
    }

    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    if (rc == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(list);
    free(url);
    if (rc != CURLE_OK || b.oom) {
        if (b.oom)
            err_set(err, 0, "out of memory for the response body");
        else
            err_set(err, 0, "%s", c->errbuf[0] ? c->errbuf : curl_easy_strerror(rc));
        free(b.data);
        headers_free(out);
        return rc != CURLE_OK ? (int)rc : CURLE_OUT_OF_MEMORY;
    }
    out->status = (int)status;
    if (copy_headers(h, out) != 0 || (!b.data && !(b.data = calloc(1, 1)))) {
        free(b.data);
        headers_free(out);
        err_set(err, 0, "out of memory");
        return CURLE_OUT_OF_MEMORY;
    }
    out->body = b.data;
    out->len = b.len;
    const char *ct = optd_response_header(out, "Content-Type");
    snprintf(out->content_type, sizeof out->content_type, "%s", ct ? ct : "");
    return 0;
}

int optd_request_err(optd_client *c, const char *method, const char *path,
                     const char *const *headers, const void *body, size_t len,
                     optd_response *out, optd_error *err)
{
    err_clear(err);
    return perform(c, method, path, headers, body, len, out, err) ? -1 : 0;
}

int optd_request(optd_client *c, const char *method, const char *path,
                 const char *const *headers, const void *body, size_t len, optd_response *out)
{
    return optd_request_err(c, method, path, headers, body, len, out, NULL);
}

/* Failures worth another try: the daemon was unreachable, went away
 * mid-request or is restarting (503).  A retried step carries the same
 * Idempotency-Key, so it is applied at most once. */
static bool transient(int curl_rc)
{
    switch (curl_rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        return true;
    default:
        return false;
    }
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* perform() with the client's retry policy.  Returns 0 when an answer
 * came that is not retried (or the last attempt's), -1 on a transport
 * failure after the last attempt.  A 503 is retried, after its Retry-After
 * (at most OPTD_RETRY_AFTER_MAX_S) when it names one, else after the
 * backoff; a 429 only when its Retry-After names a wait of at most
 * OPTD_RETRY_AFTER_MAX_S (a token's step rate: a session quota's longer one
 * is answered at once).  *retried says whether an earlier attempt may have
 * reached the daemon. */
static int call(optd_client *c, const char *method, const char *path,
                const char *const *headers, const void *body, size_t len, optd_response *out,
                optd_error *err, bool *retried)
{
    long wait = c->backoff0_ms;
    if (retried)
        *retried = false;
    for (int attempt = 1;; attempt++) {
        int rc = perform(c, method, path, headers, body, len, out, err);
        bool last = attempt >= c->max_attempts;
        long ra = -1;
        if (rc == 0) {
            if (out->status != 503 && out->status != 429)
                return 0;
            ra = retry_after_s(out);
            if (out->status == 429 && (ra < 0 || ra > OPTD_RETRY_AFTER_MAX_S))
                return 0;
            if (last)
                return 0;
        }
        if (rc != 0 && (!transient(rc) || last))
            return -1;
        if (rc == 0)
            optd_response_free(out);
        if (retried)
            *retried = true;
        if (ra >= 0)
            sleep_ms((ra > OPTD_RETRY_AFTER_MAX_S ? OPTD_RETRY_AFTER_MAX_S : ra) * 1000L);
        else
            sleep_ms(wait);
        wait = wait > c->backoff_max_ms / 2 ? c->backoff_max_ms : wait * 2;
    }
}

/* Sets err from a non-2xx answer and frees it; returns -1. */
static int fail_with(optd_response *r, optd_error *err)
{
    optd_error_from_response(r, err);
    optd_response_free(r);
    return -1;
}

/* "/v1/sessions/NAME" + suffix, the name percent-encoded.  New string. */
static char *session_path(optd_client *c, const char *name, const char *suffix, optd_error *err)
{
    if (!name) {
        err_set(err, 0, "no session name");
        return NULL;
    }
    char *esc = curl_easy_escape(c->h, name, 0);
    if (!esc) {
        err_set(err, 0, "out of memory");
        return NULL;
    }
    size_t n = strlen(esc) + strlen(suffix) + 16;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "/v1/sessions/%s%s", esc, suffix);
    else
        err_set(err, 0, "out of memory");
    curl_free(esc);
    return p;
}

static bool parse_ll(const char *s, long long *out)
{
    if (!s || !*s)
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

/* ------------------------------------------------------------ sessions */

int optd_create_session(optd_client *c, const char *name, const char *config_json,
                        optd_error *err)
{
    err_clear(err);
    char *path = session_path(c, name, "", err);
    if (!path)
        return -1;
    optd_response r;
    int rc = call(c, "PUT", path, NULL, config_json, config_json ? strlen(config_json) : 0, &r,
                  err, NULL);
    free(path);
    if (rc)
        return -1;
    if (r.status != 201 && r.status != 200)
        return fail_with(&r, err);
    int created = r.status == 201;
    optd_response_free(&r);
    return created;
}

char *optd_get_session(optd_client *c, const char *name, optd_error *err)
{
    err_clear(err);
    char *path = session_path(c, name, "", err);
    if (!path)
        return NULL;
    optd_response r;
    int rc = call(c, "GET", path, NULL, NULL, 0, &r, err, NULL);
    free(path);
    if (rc)
        return NULL;
    if (r.status != 200) {
        fail_with(&r, err);
        return NULL;
    }
    char *body = r.body;
    r.body = NULL;
    optd_response_free(&r);
    return body;
}

int optd_update(optd_client *c, const char *name, const char *patch_json, optd_error *err)
{
    err_clear(err);
    char *path = session_path(c, name, "", err);
    if (!path)
        return -1;
    optd_response r;
    int rc = call(c, "PATCH", path, NULL, patch_json, patch_json ? strlen(patch_json) : 0, &r,
                  err, NULL);
    free(path);
    if (rc)
        return -1;
    if (r.status < 200 || r.status > 299)
        return fail_with(&r, err);
    optd_response_free(&r);
    return 0;
}

int optd_delete(optd_client *c, const char *name, optd_error *err)
{
    err_clear(err);
    char *path = session_path(c, name, "", err);
    if (!path)
        return -1;
    optd_response r;
    bool retried;
    int rc = call(c, "DELETE", path, NULL, NULL, 0, &r, err, &retried);
    free(path);
    if (rc)
        return -1;
    /* A 404 after a lost answer means our first attempt deleted it. */
    if ((r.status < 200 || r.status > 299) && !(r.status == 404 && retried))
        return fail_with(&r, err);
    optd_response_free(&r);
    return 0;
}

/* -------------------------------------------------------------- tokens */

/* "/v1/tokens" or "/v1/tokens/ID", the id percent-encoded.  New string. */
static char *token_path(optd_client *c, const char *id, optd_error *err)
{
    char *esc = id ? curl_easy_escape(c->h, id, 0) : NULL;
    if (id && !esc) {
        err_set(err, 0, "out of memory");
        return NULL;
    }
    size_t n = (esc ? strlen(esc) : 0) + 16;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "/v1/tokens%s%s", esc ? "/" : "", esc ? esc : "");
    else
        err_set(err, 0, "out of memory");
    curl_free(esc);
    return p;
}

/* method on path (owned: freed here) with an optional JSON body: the
 * answer's body on a 2xx (*body_out, a new string, when asked for), else
 * err.  0 or -1. */
static int json_call(optd_client *c, const char *method, char *path, const char *json,
                     char **body_out, optd_error *err)
{
    optd_response r;
    int rc = call(c, method, path, NULL, json, json ? strlen(json) : 0, &r, err, NULL);
    free(path);
    if (rc)
        return -1;
    if (r.status < 200 || r.status > 299)
        return fail_with(&r, err);
    if (body_out) {
        *body_out = r.body;
        r.body = NULL;
    }
    optd_response_free(&r);
    return 0;
}

/* One token call: the answer's body on 2xx (*body_out, new string, when
 * asked for), else err.  0 or -1. */
static int token_call(optd_client *c, const char *method, const char *id, const char *json,
                      char **body_out, optd_error *err)
{
    err_clear(err);
    if (body_out)
        *body_out = NULL;
    char *path = token_path(c, id, err);
    return path ? json_call(c, method, path, json, body_out, err) : -1;
}

int optd_create_token(optd_client *c, const char *request_json, char id[OPTD_TOKEN_ID_SIZE],
                      char secret[OPTD_TOKEN_SIZE], optd_error *err)
{
    if (!request_json) {
        err_clear(err);
        err_set(err, 0, "no token request");
        return -1;
    }
    char *body;
    if (token_call(c, "POST", NULL, request_json, &body, err))
        return -1;
    cJSON *doc = cJSON_Parse(body);
    free(body);
    const cJSON *ji = cJSON_GetObjectItemCaseSensitive(doc, "id");
    const cJSON *jt = cJSON_GetObjectItemCaseSensitive(doc, "token");
    int rc = -1;
    if (cJSON_IsString(ji) && cJSON_IsString(jt) && strlen(ji->valuestring) < OPTD_TOKEN_ID_SIZE &&
        strlen(jt->valuestring) < OPTD_TOKEN_SIZE) {
        snprintf(id, OPTD_TOKEN_ID_SIZE, "%s", ji->valuestring);
        snprintf(secret, OPTD_TOKEN_SIZE, "%s", jt->valuestring);
        rc = 0;
    } else {
        err_set(err, 201, "the answer holds no token id and secret");
    }
    cJSON_Delete(doc);
    return rc;
}

char *optd_tokens(optd_client *c, const char *id, optd_error *err)
{
    char *out = NULL;
    token_call(c, "GET", id, NULL, &out, err);
    return out;
}

int optd_revoke_token(optd_client *c, const char *id, optd_error *err)
{
    if (!id || !*id) {
        err_clear(err);
        err_set(err, 0, "no token id");
        return -1;
    }
    return token_call(c, "DELETE", id, NULL, NULL, err);
}

/* --------------------------------------------------------- time travel */

/* POST or PUT a JSON body to the session's path + suffix; the answer's
 * body (a new string) on a 2xx when want_body, else NULL with 0. */
static int post_json(optd_client *c, const char *method, const char *name, const char *suffix,
                     const char *json, char **body_out, optd_error *err)
{
    err_clear(err);
    if (body_out)
        *body_out = NULL;
    char *path = session_path(c, name, suffix, err);
    return path ? json_call(c, method, path, json, body_out, err) : -1;
}

int optd_rollback(optd_client *c, const char *name, long long step, optd_error *err)
{
    char body[48];
    snprintf(body, sizeof body, "{\"step\":%lld}", step);
    return post_json(c, "POST", name, "/rollback", body, NULL, err);
}

static int label_ok(const char *label, optd_error *err)
{
    size_t n = label ? strlen(label) : 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)label[i]) || label[i] == '.' || label[i] == '_' ||
              label[i] == '-'))
            n = 0;
    if (n < 1 || n > 128) {
        err_set(err, 0, "a label is 1-128 characters of A-Z a-z 0-9 . _ -");
        return -1;
    }
    return 0;
}

int optd_rollback_to(optd_client *c, const char *name, const char *label, optd_error *err)
{
    err_clear(err);
    if (label_ok(label, err))
        return -1;
    char body[200];
    snprintf(body, sizeof body, "{\"label\":\"%s\"}", label);
    return post_json(c, "POST", name, "/rollback", body, NULL, err);
}

int optd_checkpoint(optd_client *c, const char *name, const char *label, optd_error *err)
{
    err_clear(err);
    if (label_ok(label, err))
        return -1;
    char body[200];
    snprintf(body, sizeof body, "{\"label\":\"%s\"}", label);
    return post_json(c, "POST", name, "/checkpoints", body, NULL, err);
}

char *optd_checkpoints(optd_client *c, const char *name, optd_error *err)
{
    char *out = NULL;
    post_json(c, "GET", name, "/checkpoints", NULL, &out, err);
    return out;
}

int optd_fork(optd_client *c, const char *name, const char *from, long long step, int replay,
              const char *changes_json, optd_error *err)
{
    err_clear(err);
    if (!from || !*from || strchr(from, '"') || strchr(from, '\\')) {
        err_set(err, 0, "no parent session name");
        return -1;
    }
    /* changes_json is an object: its members go beside "fork". */
    const char *rest = "";
    if (changes_json) {
        const char *p = changes_json;
        while (*p == ' ' || *p == '\n' || *p == '\t')
            p++;
        if (*p != '{') {
            err_set(err, 0, "changes_json must be a JSON object");
            return -1;
        }
        rest = p + 1;
        while (*rest == ' ' || *rest == '\n' || *rest == '\t')
            rest++;
        if (*rest == '}')
            rest = "";
        else
            rest = p + 1;
    }
    size_t n = strlen(from) + strlen(changes_json ? changes_json : "") + 96;
    char *body = malloc(n);
    if (!body) {
        err_set(err, 0, "out of memory");
        return -1;
    }
    int k = snprintf(body, n, "{\"fork\":{\"from\":\"%s\"", from);
    if (step >= 0)
        k += snprintf(body + k, n - (size_t)k, ",\"step\":%lld", step);
    k += snprintf(body + k, n - (size_t)k, "}%s", replay ? ",\"replay\":true" : "");
    if (*rest)
        snprintf(body + k, n - (size_t)k, ",%s", rest);
    else
        snprintf(body + k, n - (size_t)k, "}");
    int rc = post_json(c, "PUT", name, "", body, NULL, err);
    free(body);
    return rc;
}

int optd_export(optd_client *c, const char *name, int with_log, void **out, size_t *len,
                optd_error *err)
{
    err_clear(err);
    *out = NULL;
    *len = 0;
    char *path = session_path(c, name, with_log ? "/export?log=true" : "/export", err);
    if (!path)
        return -1;
    const char *h[] = {"Accept: application/octet-stream", NULL};
    optd_response r;
    int rc = call(c, "GET", path, h, NULL, 0, &r, err, NULL);
    free(path);
    if (rc)
        return -1;
    if (r.status != 200)
        return fail_with(&r, err);
    *out = r.body;
    *len = r.len;
    r.body = NULL;
    optd_response_free(&r);
    return 0;
}

int optd_import(optd_client *c, const char *name, const void *file, size_t len, optd_error *err)
{
    err_clear(err);
    char *path = session_path(c, name, "/export", err);
    if (!path)
        return -1;
    const char *h[] = {"Content-Type: application/octet-stream", NULL};
    optd_response r;
    int rc = call(c, "PUT", path, h, file, len, &r, err, NULL);
    free(path);
    if (rc)
        return -1;
    if (r.status != 201)
        return fail_with(&r, err);
    optd_response_free(&r);
    return 0;
}

/* --------------------------------------------------------------- steps */

optd_step_opts optd_step_opts_default(void)
{
    optd_step_opts o = {.base_step = -1, .worker = NULL, .json = 0, .idempotency_key = NULL,
                        .wire = OPTD_WIRE_DEFAULT};
    return o;
}

int optd_new_idempotency_key(char key[33])
{
    unsigned char raw[16];
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t n = getrandom(raw + got, sizeof raw - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof raw; i++) {
        key[2 * i] = hex[raw[i] >> 4];
        key[2 * i + 1] = hex[raw[i] & 15];
    }
    key[32] = '\0';
    return 0;
}

/* A JSON array of n elements, bit-exact (%.9g float32, %.17g float64),
 * into b after prefix.  0 or -1 (no memory). */
static int json_vector(growbuf *b, const void *v, size_t n, size_t esize)
{
    if (grow_put(b, "[", 1))
        return -1;
    char tmp[40];
    for (size_t i = 0; i < n; i++) {
        int k = esize == 4 ? snprintf(tmp, sizeof tmp, "%s%.9g", i ? "," : "",
                                      (double)((const float *)v)[i])
                           : snprintf(tmp, sizeof tmp, "%s%.17g", i ? "," : "",
                                      ((const double *)v)[i]);
        if (grow_put(b, tmp, (size_t)k))
            return -1;
    }
    return grow_put(b, "]", 1);
}

/* A JSON string, escaped by cJSON. */
static int json_string(growbuf *b, const char *s)
{
    cJSON *str = cJSON_CreateString(s);
    char *txt = str ? cJSON_PrintUnformatted(str) : NULL;
    int rc = txt ? grow_put(b, txt, strlen(txt)) : -1;
    cJSON_free(txt);
    cJSON_Delete(str);
    return rc;
}

/* Copies a JSON array of numbers into out (n elements of esize bytes).
 * strtod in cJSON rounds correctly, so %.17g text comes back bit-exact. */
static int json_to_vector(const cJSON *arr, void *out, size_t n, size_t esize)
{
    if (!cJSON_IsArray(arr))
        return -1;
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        if (i >= n || !cJSON_IsNumber(e))
            return -1;
        if (esize == 4)
            ((float *)out)[i] = (float)e->valuedouble;
        else
            ((double *)out)[i] = e->valuedouble;
        i++;
    }
    return i == n ? 0 : -1;
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* Appends tensor indices as "0-57,60" (sorted, runs folded). */
static int put_ranges(growbuf *b, const size_t *idx, size_t n)
{
    size_t *v = malloc(n * sizeof *v);
    if (!v)
        return -1;
    memcpy(v, idx, n * sizeof *v);
    qsort(v, n, sizeof *v, cmp_size);
    int bad = 0;
    char tmp[48];
    for (size_t i = 0; i < n && !bad;) {
        size_t j = i;
        while (j + 1 < n && v[j + 1] <= v[j] + 1)
            j++;
        int k = v[j] == v[i] ? snprintf(tmp, sizeof tmp, "%s%zu", i ? "," : "", v[i])
                             : snprintf(tmp, sizeof tmp, "%s%zu-%zu", i ? "," : "", v[i], v[j]);
        bad = grow_put(b, tmp, (size_t)k);
        i = j + 1;
    }
    free(v);
    return bad;
}

/* Appends "prefix: v0,v1,..." with 17 significant digits (exact doubles). */
static int put_group_header(growbuf *b, const char *prefix, const double *v, size_t n)
{
    if (grow_put(b, prefix, strlen(prefix)))
        return -1;
    char tmp[40];
    for (size_t i = 0; i < n; i++) {
        int k = snprintf(tmp, sizeof tmp, "%s%.17g", i ? "," : "", v[i]);
        if (grow_put(b, tmp, (size_t)k))
            return -1;
    }
    return 0;
}

void optd_client_set_params_check(optd_client *c, int on)
{
    c->no_params_check = !on;
}

/* zlib's CRC-32 (reflected, polynomial 0xEDB88320), bit by bit: params
 * answers are small next to the network. */
static uint32_t crc32_of(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= b[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

/* 0, or -1 with err filled when the params (little-endian, the session's
 * dtype) do not match the answer's Optd-Params-Crc32. */
static int check_digest(optd_client *c, const optd_response *r, const void *params, size_t len,
                        optd_error *err)
{
    const char *want = optd_response_header(r, OPTD_HEADER_PARAMS_CRC32);
    if (c->no_params_check || !want)
        return 0;
    char got[16];
    snprintf(got, sizeof got, "%08x", (unsigned)crc32_of(params, len));
    if (strcasecmp(got, want) == 0)
        return 0;
    err_set(err, r->status, "the params received have CRC-32 %s, the daemon sent %s", got, want);
    if (err) {
        snprintf(err->type, sizeof err->type, "%s", OPTD_ERROR_DIGEST_MISMATCH);
        snprintf(err->title, sizeof err->title, "params digest mismatch");
    }
    return -1;
}

static int step_common(optd_client *c, const char *name, const void *grad, size_t n,
                       size_t esize, const double *loss, const optd_step_opts *opts,
                       void *params_out, long long *step_out, int *replayed, optd_error *err)
{
    err_clear(err);
    if (replayed)
        *replayed = 0;
    optd_step_opts o = opts ? *opts : optd_step_opts_default();
    if (n > SIZE_MAX / esize) {
        err_set(err, 0, "gradient too large");
        return -1;
    }
    int wire = wire_for(c, o.wire);
    if (wire < 0 || (wire_half((optd_wire)wire) && o.json)) {
        err_set(err, 0, wire < 0 ? "unknown wire form %d"
                                 : "a 16-bit wire form travels only as a binary body, not JSON",
                (int)o.wire);
        return -1;
    }
    char key[KEY_BUF];
    if (o.idempotency_key) {
        snprintf(key, sizeof key, "%s", o.idempotency_key);
    } else if (optd_new_idempotency_key(key)) {
        err_set(err, 0, "getrandom failed: no idempotency key");
        return -1;
    }
    if (o.n_absent && !o.absent) {
        err_set(err, 0, "n_absent without absent indices");
        return -1;
    }
    if (o.grad_norm && !(isfinite(*o.grad_norm) && *o.grad_norm >= 0)) {
        err_set(err, 0, "grad_norm must be a finite number >= 0");
        return -1;
    }
    for (size_t i = 0; i < o.n_groups; i++) {
        const double *vs[] = {o.group_lr, o.group_momentum, o.group_beta1};
        for (size_t k = 0; k < sizeof vs / sizeof vs[0]; k++) {
            if (vs[k] && !isfinite(vs[k][i])) {
                err_set(err, 0, "group %zu: a hyperparameter is not finite", i);
                return -1;
            }
        }
    }
    size_t pn = o.params_len ? o.params_len : n;
    char *path = session_path(c, name, params_out ? "/step" : "/step?params=false", err);
    if (!path)
        return -1;

    growbuf h_absent = {0}, h_glr = {0}, h_gmom = {0}, h_gb1 = {0};
    char h_key[KEY_BUF + 32], h_loss[64], h_norm[64], h_base[64], h_worker[200], h_dt[48], h_pdt[48];
    unsigned char *half = NULL;
    const char *hdrs[MAX_EXTRA_HEADERS];
    size_t nh = 0;
    snprintf(h_key, sizeof h_key, OPTD_HEADER_IDEMPOTENCY_KEY ": %s", key);
    hdrs[nh++] = h_key;
    growbuf jb = {0};
    const void *body = grad;
    size_t blen = n * esize;
    if (o.json) {
        hdrs[nh++] = "Content-Type: application/json";
        hdrs[nh++] = "Accept: application/json";
        int bad = grow_put(&jb, "{\"grad\":", 8) || json_vector(&jb, grad, n, esize);
        char tmp[64];
        if (!bad && loss) {
            snprintf(tmp, sizeof tmp, ",\"loss\":%.17g", *loss);
            bad = grow_put(&jb, tmp, strlen(tmp));
        }
        if (!bad && o.base_step >= 0) {
            snprintf(tmp, sizeof tmp, ",\"base_step\":%lld", o.base_step);
            bad = grow_put(&jb, tmp, strlen(tmp));
        }
        if (!bad && o.worker)
            bad = grow_put(&jb, ",\"worker\":", 10) || json_string(&jb, o.worker);
        if (bad || grow_put(&jb, "}", 1)) {
            free(jb.data);
            free(path);
            err_set(err, 0, "out of memory");
            return -1;
        }
        body = jb.data;
        blen = jb.len;
    } else {
        hdrs[nh++] = "Content-Type: application/octet-stream";
        hdrs[nh++] = "Accept: application/octet-stream";
        /* The daemon refuses a body declared in the session's other dtype
         * (422), which byte counts alone cannot always tell. */
        hdrs[nh++] = esize == 4 ? OPTD_HEADER_DTYPE ": float32" : OPTD_HEADER_DTYPE ": float64";
        if (wire_half((optd_wire)wire)) {
            if (!(half = narrow_vec(grad, n, esize, (optd_wire)wire))) {
                free(path);
                err_set(err, 0, "out of memory");
                return -1;
            }
            const char *form = wire == OPTD_WIRE_BFLOAT16 ? "bfloat16" : "float16";
            snprintf(h_dt, sizeof h_dt, OPTD_HEADER_DTYPE ": %s", form);
            snprintf(h_pdt, sizeof h_pdt, OPTD_HEADER_PARAMS_DTYPE ": %s", form);
            hdrs[nh - 1] = h_dt;
            hdrs[nh++] = h_pdt;
            body = half;
            blen = 2 * n;
        }
        if (loss) {
            snprintf(h_loss, sizeof h_loss, OPTD_HEADER_LOSS ": %.17g", *loss);
            hdrs[nh++] = h_loss;
        }
        if (o.base_step >= 0) {
            snprintf(h_base, sizeof h_base, OPTD_HEADER_BASE_STEP ": %lld", o.base_step);
            hdrs[nh++] = h_base;
        }
        if (o.worker) {
            snprintf(h_worker, sizeof h_worker, OPTD_HEADER_WORKER ": %s", o.worker);
            hdrs[nh++] = h_worker;
        }
    }
    if (o.grad_norm) {
        snprintf(h_norm, sizeof h_norm, OPTD_HEADER_GRAD_NORM ": %.17g", *o.grad_norm);
        hdrs[nh++] = h_norm;
    }
    /* Absent tensors and group values travel in headers, whichever the body. */
    int bad = 0;
    if (o.n_absent) {
        bad = grow_put(&h_absent, "Optd-Absent: ", 13) ||
              put_ranges(&h_absent, o.absent, o.n_absent);
        hdrs[nh++] = h_absent.data;
    }
    if (!bad && o.n_groups && o.group_lr) {
        bad = put_group_header(&h_glr, "Optd-Group-Lr: ", o.group_lr, o.n_groups);
        hdrs[nh++] = h_glr.data;
    }
    if (!bad && o.n_groups && o.group_momentum) {
        bad = put_group_header(&h_gmom, "Optd-Group-Momentum: ", o.group_momentum,
                               o.n_groups);
        hdrs[nh++] = h_gmom.data;
    }
    if (!bad && o.n_groups && o.group_beta1) {
        bad = put_group_header(&h_gb1, "Optd-Group-Beta1: ", o.group_beta1, o.n_groups);
        hdrs[nh++] = h_gb1.data;
    }
    if (bad) {
        free(h_absent.data);
        free(h_glr.data);
        free(h_gmom.data);
        free(h_gb1.data);
        free(jb.data);
        free(half);
        free(path);
        err_set(err, 0, "out of memory");
        return -1;
    }
    hdrs[nh] = NULL;

    optd_response r;
    int rc = call(c, "POST", path, hdrs, body ? body : "", blen, &r, err, NULL);
    free(path);
    free(jb.data);
    free(half);
    free(h_absent.data);
    free(h_glr.data);
    free(h_gmom.data);
    free(h_gb1.data);
    if (rc)
        return -1;
    if (r.status != 200 && r.status != 202)
        return fail_with(&r, err);

    const char *rep = optd_response_header(&r, OPTD_HEADER_REPLAYED);
    if (replayed && rep && strcasecmp(rep, "true") == 0)
        *replayed = 1;
    long long step = -1;
    bool have_step = parse_ll(optd_response_header(&r, OPTD_HEADER_STEP), &step);
    bool is_json = strstr(r.content_type, "json") != NULL;
    cJSON *root = is_json ? cJSON_ParseWithLength(r.body, r.len) : NULL;
    if (root && !have_step) {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "step");
        if (cJSON_IsNumber(st)) {
            step = (long long)st->valuedouble;
            have_step = true;
        }
    }
    int ret = r.status == 202 ? 1 : 0;
    if (ret == 0 && params_out) {
        if (is_json) {
            if (!root ||
                json_to_vector(cJSON_GetObjectItemCaseSensitive(root, "params"), params_out, pn,
                               esize)) {
                err_set(err, r.status, "the step answer has no params array of %zu numbers", pn);
                ret = -1;
            }
        } else if (pn > SIZE_MAX / esize || answer_params(&r, params_out, pn, esize)) {
            err_set(err, r.status, "the step answer has %zu bytes; expected %zu values", r.len,
                    pn);
            ret = -1;
        }
        /* The digest covers the params in the session's dtype: a 16-bit
         * answer is a rounding of them and is not checked. */
        if (ret == 0 && !wire_half((optd_wire)wire) &&
            check_digest(c, &r, params_out, pn * esize, err))
            ret = -1;
    }
    if (ret >= 0 && !have_step && ret == 0) {
        err_set(err, r.status, "the step answer carries no step");
        ret = -1;
    }
    if (ret >= 0 && step_out)
        *step_out = step;
    cJSON_Delete(root);
    optd_response_free(&r);
    return ret;
}

int optd_step_f32_opts(optd_client *c, const char *name, const float *grad, size_t n,
                       const double *loss, const optd_step_opts *opts, float *params_out,
                       long long *step_out, int *replayed, optd_error *err)
{
    return step_common(c, name, grad, n, sizeof(float), loss, opts, params_out, step_out,
                       replayed, err);
}

int optd_step_f64_opts(optd_client *c, const char *name, const double *grad, size_t n,
                       const double *loss, const optd_step_opts *opts, double *params_out,
                       long long *step_out, int *replayed, optd_error *err)
{
    return step_common(c, name, grad, n, sizeof(double), loss, opts, params_out, step_out,
                       replayed, err);
}

int optd_step_f32(optd_client *c, const char *name, const float *grad, size_t n,
                  const double *loss, float *params_out, long long *step_out, optd_error *err)
{
    return step_common(c, name, grad, n, sizeof(float), loss, NULL, params_out, step_out, NULL,
                       err);
}

int optd_step_f64(optd_client *c, const char *name, const double *grad, size_t n,
                  const double *loss, double *params_out, long long *step_out, optd_error *err)
{
    return step_common(c, name, grad, n, sizeof(double), loss, NULL, params_out, step_out, NULL,
                       err);
}

/* -------------------------------------------------------------- params */

static int get_params(optd_client *c, const char *name, void *out, size_t n, size_t esize,
                      optd_wire w, long long *step_out, optd_error *err)
{
    err_clear(err);
    int wire = wire_for(c, w);
    if (wire < 0) {
        err_set(err, 0, "unknown wire form %d", (int)w);
        return -1;
    }
    char *path = session_path(c, name, "/params", err);
    if (!path)
        return -1;
    const char *hdrs[] = {"Accept: application/octet-stream",
                          wire == OPTD_WIRE_BFLOAT16  ? OPTD_HEADER_PARAMS_DTYPE ": bfloat16"
                          : wire == OPTD_WIRE_FLOAT16 ? OPTD_HEADER_PARAMS_DTYPE ": float16"
                                                      : NULL,
                          NULL};
    optd_response r;
    int rc = call(c, "GET", path, hdrs, NULL, 0, &r, err, NULL);
    free(path);
    if (rc)
        return -1;
    if (r.status != 200)
        return fail_with(&r, err);
    long long step = -1;
    if (n > SIZE_MAX / esize || answer_params(&r, out, n, esize)) {
        err_set(err, r.status, "the params answer has %zu bytes; expected %zu elements", r.len,
                n);
        optd_response_free(&r);
        return -1;
    }
    if (!parse_ll(optd_response_header(&r, OPTD_HEADER_STEP), &step)) {
        err_set(err, r.status, "the params answer carries no Optd-Step");
        optd_response_free(&r);
        return -1;
    }
    /* The digest covers the params in the session's dtype: a 16-bit answer
     * is a rounding of them and is not checked. */
    if (!wire_half((optd_wire)wire) && check_digest(c, &r, r.body, r.len, err)) {
        optd_response_free(&r);
        return -1;
    }
    if (step_out)
        *step_out = step;
    optd_response_free(&r);
    return 0;
}

static int set_params(optd_client *c, const char *name, const void *params, size_t n,
                      size_t esize, optd_wire w, optd_error *err)
{
    err_clear(err);
    if (n > SIZE_MAX / esize) {
        err_set(err, 0, "params too large");
        return -1;
    }
    int wire = wire_for(c, w);
    if (wire < 0) {
        err_set(err, 0, "unknown wire form %d", (int)w);
        return -1;
    }
    unsigned char *half = NULL;
    if (wire_half((optd_wire)wire) && !(half = narrow_vec(params, n, esize, (optd_wire)wire))) {
        err_set(err, 0, "out of memory");
        return -1;
    }
    char *path = session_path(c, name, "/params", err);
    if (!path) {
        free(half);
        return -1;
    }
    const char *hdrs[] = {"Content-Type: application/octet-stream",
                          wire == OPTD_WIRE_BFLOAT16  ? OPTD_HEADER_DTYPE ": bfloat16"
                          : wire == OPTD_WIRE_FLOAT16 ? OPTD_HEADER_DTYPE ": float16"
                          : esize == 4                ? OPTD_HEADER_DTYPE ": float32"
                                                      : OPTD_HEADER_DTYPE ": float64",
                          NULL};
    optd_response r;
    int rc = half ? call(c, "PUT", path, hdrs, half, 2 * n, &r, err, NULL)
                  : call(c, "PUT", path, hdrs, params ? params : "", n * esize, &r, err, NULL);
    free(path);
    free(half);
    if (rc)
        return -1;
    if (r.status < 200 || r.status > 299)
        return fail_with(&r, err);
    optd_response_free(&r);
    return 0;
}

int optd_get_params_f32(optd_client *c, const char *name, float *out, size_t n,
                        long long *step_out, optd_error *err)
{
    return get_params(c, name, out, n, sizeof(float), OPTD_WIRE_DEFAULT, step_out, err);
}

int optd_get_params_f64(optd_client *c, const char *name, double *out, size_t n,
                        long long *step_out, optd_error *err)
{
    return get_params(c, name, out, n, sizeof(double), OPTD_WIRE_DEFAULT, step_out, err);
}

int optd_set_params_f32(optd_client *c, const char *name, const float *params, size_t n,
                        optd_error *err)
{
    return set_params(c, name, params, n, sizeof(float), OPTD_WIRE_DEFAULT, err);
}

int optd_set_params_f64(optd_client *c, const char *name, const double *params, size_t n,
                        optd_error *err)
{
    return set_params(c, name, params, n, sizeof(double), OPTD_WIRE_DEFAULT, err);
}

int optd_get_params_f32_wire(optd_client *c, const char *name, float *out, size_t n,
                             optd_wire wire, long long *step_out, optd_error *err)
{
    return get_params(c, name, out, n, sizeof(float), wire, step_out, err);
}

int optd_get_params_f64_wire(optd_client *c, const char *name, double *out, size_t n,
                             optd_wire wire, long long *step_out, optd_error *err)
{
    return get_params(c, name, out, n, sizeof(double), wire, step_out, err);
}

int optd_set_params_f32_wire(optd_client *c, const char *name, const float *params, size_t n,
                             optd_wire wire, optd_error *err)
{
    return set_params(c, name, params, n, sizeof(float), wire, err);
}

int optd_set_params_f64_wire(optd_client *c, const char *name, const double *params,
                             size_t n, optd_wire wire, optd_error *err)
{
    return set_params(c, name, params, n, sizeof(double), wire, err);
}

const char *optd_error_kind(const optd_error *err)
{
    int st = err ? err->status : 0;
    if (err && strcmp(err->type, OPTD_ERROR_DIGEST_MISMATCH) == 0)
        return "digest_mismatch";
    switch (st) {
    case 0: return "connection_failed";
    case 401: return "unauthorized";
    case 404: return "not_found";
    case 409: return strcmp(err->field, "base_step") == 0 ? "stale_gradient" : "conflict";
    case 422: return "unprocessable";
    case 503: return "unavailable";
    case 504: return "round_timeout";
    default: return st >= 500 ? "server_error" : "invalid_request";
    }
}
