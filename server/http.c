/*
 * http.c -- libmicrohttpd glue: routing on the raw (still percent-encoded)
 * path, refusal of ambiguous framing (request smuggling), authentication,
 * content negotiation, body accumulation into one buffer presized from
 * Content-Length, dispatch to the handlers, one log line per request,
 * connection limits and timeouts, and the graceful stop.
 *
 * libmicrohttpd percent-decodes the path before the request callback sees
 * it, so "/v1/sessions/a%00b" would arrive as "a" and "x%2Fstep" as a
 * different route.  The URI log callback sees the request line as sent:
 * it allocates the per-request context and keeps the raw path, and routing
 * matches that exactly (a '%' is not a name character, so any escape in a
 * name is a 400).  Query arguments stay decoded by libmicrohttpd.
 */
#include "server/cors.h"
#include "server/observe.h"
#include "server/server.h"

#include <cjson/cJSON.h>

#include <arpa/inet.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Alignment of the body buffer: a binary vector can be read in place as
 * float32 or float64 (and by vector loads). */
#define BODY_ALIGN 64
/* First capacity of a chunked body (no Content-Length); it then doubles. */
#define BODY_CHUNKED_START (64 * 1024)

typedef struct {
    const api_route *route;
    char name[API_NAME_MAX + 1];
    char *body;          /* BODY_ALIGN-aligned, NUL after len             */
    size_t len, cap, limit;
    long long content_length; /* -1: none (chunked)                        */
    bool started;        /* the request callback has seen this request    */
    bool body_binary, want_binary;
    bool responded;      /* a reply was queued before the body was read */
    bool too_large;      /* chunked body went past the limit            */
    bool parked;         /* suspended, waiting for its round              */
    srv_waiter waiter;
    int status;
    struct timespec t0;
    char method[8];
    char *path;          /* the raw path (no query), as sent; owned       */
    char rid[OBS_RID_MAX + 1]; /* X-Request-Id, the client's or ours     */
    uint64_t bytes_out;  /* body bytes of the reply queued               */
    srv_principal who;   /* the caller, from the auth step                */
} conn_ctx;

/* Requests parked in synchronous rounds right now (for the drain at stop). */
static int parked_now;

static void suspend_conn(void *conn)
{
    MHD_suspend_connection(conn);
}

static void resume_conn(void *conn)
{
    MHD_resume_connection(conn);
}

static const char *hdr(void *conn, const char *name)
{
    return MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
}

static const char *qry(void *conn, const char *name)
{
    return MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, name);
}

/* A streamed body (api_reply.stream_*): the context is a stream_box. */
typedef struct {
    size_t (*read)(void *ctx, uint64_t pos, char *buf, size_t max);
    void (*done)(void *ctx);
    void *ctx;
} stream_box;

static ssize_t stream_cb(void *cls, uint64_t pos, char *buf, size_t max)
{
    stream_box *b = cls;
    size_t n = b->read(b->ctx, pos, buf, max);
    return n ? (ssize_t)n : MHD_CONTENT_READER_END_OF_STREAM;
}

static void stream_free_cb(void *cls)
{
    stream_box *b = cls;
    b->done(b->ctx);
    free(b);
}

/* A problem built on another thread (a parked request's, answered by
 * whoever closed its round) names that thread's request: name ours. */
static void problem_own_id(conn_ctx *x, api_reply *r)
{
    if (!r->body || !r->content_type || strcmp(r->content_type, "application/problem+json") != 0)
        return;
    cJSON *doc = cJSON_ParseWithLength(r->body, r->len);
    if (!doc)
        return;
    cJSON_DeleteItemFromObject(doc, "request_id");
    cJSON_AddStringToObject(doc, "request_id", x->rid);
    char *txt = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    char *body = txt ? strdup(txt) : NULL;
    cJSON_free(txt);
    if (body) {
        free(r->body);
        r->body = body;
        r->len = strlen(body);
    }
}

static enum MHD_Result queue(struct MHD_Connection *c, conn_ctx *x, api_reply *r)
{
    struct MHD_Response *resp;
    if (x->parked)
        problem_own_id(x, r);
    x->bytes_out = r->stream_read ? (size_t)r->stream_len : r->body ? r->len : 0;
    if (r->stream_read) {
        stream_box *b = malloc(sizeof *b);
        resp = b ? MHD_create_response_from_callback(r->stream_len, 256 * 1024, stream_cb, b,
                                                     stream_free_cb)
                 : NULL;
        if (resp) {
            /* MHD owns the stream now and releases it through the free
             * callback. */
            *b = (stream_box){r->stream_read, r->stream_done, r->stream_ctx};
            r->stream_read = NULL;
            r->stream_done = NULL;
            r->stream_ctx = NULL;
        } else {
            free(b);
        }
    } else if (r->body && r->len)
        resp = MHD_create_response_from_buffer(r->len, r->body, MHD_RESPMEM_MUST_FREE);
    else
        resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp) {
        api_reply_free(r);
        return MHD_NO;
    }
    if (!(r->body && r->len))
        api_reply_free(r);
    r->body = NULL; /* MHD owns it now */
    if (r->content_type && r->status != 204)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->content_type);
    for (int i = 0; i < r->n_headers; i++)
        MHD_add_response_header(resp, r->headers[i].name, r->headers[i].value);
    MHD_add_response_header(resp, "X-Request-Id", x->rid);
    srv_cors_decorate(c, x->method, x->path, r->status, resp);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    x->status = r->status;
    return ok;
}

/* Returns a new buffer of at least n bytes aligned to BODY_ALIGN, its size
 * in *cap; caller frees.  NULL when out of memory. */
static char *body_alloc(size_t n, size_t *cap)
{
    size_t c = (n + BODY_ALIGN - 1) / BODY_ALIGN * BODY_ALIGN;
    char *b = aligned_alloc(BODY_ALIGN, c);
    if (b)
        *cap = c;
    return b;
}

/* The headers that frame a body, counted over every occurrence (the
 * lookup functions only see the first). */
typedef struct {
    int n_length, n_encoding;
    const char *length, *encoding;
} framing;

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
    (void)kind;
    framing *f = cls;
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
        f->n_length++;
        f->length = value;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        f->n_encoding++;
        f->encoding = value;
    }
    return MHD_YES;
}

/* Refuses a body whose length two parties could read differently (request
 * smuggling, RFC 9112 section 6.3): Content-Length twice, Transfer-Encoding
 * with Content-Length, a coding other than chunked, a length that is not
 * plain digits.  On success x->content_length is the length or -1. */
static int framing_or_reply(struct MHD_Connection *c, conn_ctx *x, api_reply *r)
{
    framing f = {0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, count_framing, &f);
    x->content_length = -1;
    if (f.n_length > 1)
        return api_problem(r, 400, "Content-Length", "more than one Content-Length header");
    if (f.n_encoding && f.n_length)
        return api_problem(r, 400, "Transfer-Encoding",
                           "Transfer-Encoding and Content-Length together");
    if (f.n_encoding > 1 || (f.n_encoding && strcasecmp(f.encoding, "chunked") != 0))
        return api_problem(r, 400, "Transfer-Encoding",
                           "the only transfer coding accepted is chunked");
    if (f.length) {
        const char *p = f.length;
        unsigned long long n = 0;
        bool ok = *p != '\0';
        for (; *p && ok; p++) {
            if (*p < '0' || *p > '9' || n > (ULLONG_MAX - 9) / 10)
                ok = false;
            else
                n = n * 10 + (unsigned)(*p - '0');
        }
        if (!ok || n > LLONG_MAX)
            return api_problem(r, 400, "Content-Length", "Content-Length is not a byte count");
        x->content_length = (long long)n;
    }
    return 0;
}

/* A vector body cannot need more than the session's size allows: 8 bytes
 * an element binary (the widest element type; a body of the wrong length
 * within the bound is read and answered 422, naming the lengths), or
 * JSON_BYTES_PER_ELEMENT a number (a
 * float64's longest form is 24 characters; the rest leaves room for
 * separators and indentation) plus JSON_SLACK for the other members.  A
 * longer body is 413 before a byte of it is read or parsed, and the
 * session's bound caps a chunked body too.  A session that does not exist
 * is 404 at once. */
#define JSON_BYTES_PER_ELEMENT 40
#define JSON_DOC_LIMIT (64u << 20)
#define JSON_SLACK (64 * 1024)

static int session_bound(srv_ctx *ctx, conn_ctx *x, api_reply *r)
{
    uint64_t n;
    optim_dtype dt;
    int err = srv_registry_vector_shape(ctx->reg, x->name, &n, &dt);
    if (err == STORAGE_ENOTFOUND)
        return api_problem(r, 404, "name", "no session named %s", x->name);
    if (err != ENG_OK)
        return 0; /* the handler reports it */
    (void)dt;
    uint64_t bound = x->body_binary ? n * 8 + JSON_SLACK
                                    : n * JSON_BYTES_PER_ELEMENT + JSON_SLACK;
    if (x->content_length >= 0 && (uint64_t)x->content_length > bound)
        return api_problem(r, 413, NULL,
                           "a %s body for session %s (%llu %s params) takes at most %llu bytes; "
                           "this one has %lld",
                           x->body_binary ? "binary" : "JSON", x->name, (unsigned long long)n,
                           optim_dtype_name(dt), (unsigned long long)bound, x->content_length);
    if (bound < x->limit)
        x->limit = (size_t)bound;
    return 0;
}

/* Checks that can answer before any body byte is read; presizes the body. */
static int precheck(srv_ctx *ctx, struct MHD_Connection *c, conn_ctx *x, const char *method,
                    api_reply *r)
{
    int st = framing_or_reply(c, x, r);
    if (st) {
        /* The rest of the stream cannot be trusted to start a request. */
        api_reply_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
        return st;
    }
    /* OPTIONS (a CORS preflight among them) answers before authentication. */
    if (strcmp(method, "OPTIONS") == 0)
        return srv_cors_options(c, x->path, r);
    st = api_route_match(method, x->path, &x->route, x->name, r);
    if (st)
        return st;
    /* A JSON document (create, PATCH) is parsed into a tree of about 50
     * times its size: it is held to JSON_DOC_LIMIT (vectors go through the
     * step and params routes, bounded by their session, or PUT params in
     * binary). */
    if (x->route->body == API_BODY_JSON && x->limit > JSON_DOC_LIMIT)
        x->limit = JSON_DOC_LIMIT;
    /* Whatever the route: a body of no use is discarded, not read for long. */
    if (x->content_length > (long long)x->limit)
        return api_problem(r, 413, NULL, "body of %lld bytes exceeds the limit of %zu",
                           x->content_length, x->limit);
    /* The admin key or a token, its scope, prefix and step rate
     * (server/auth.c); /metrics takes --metrics-token when one is set. */
    st = srv_auth_check(ctx->cfg->api_key, ctx->cfg->metrics_token, x->route, x->name,
                        hdr(c, MHD_HTTP_HEADER_AUTHORIZATION), &x->who, r);
    if (st)
        return st;
    bool file_get = x->route->id == API_R_STATE_GET || x->route->id == API_R_EXPORT_GET;
    bool binary_ok = x->route->body == API_BODY_VECTOR || x->route->id == API_R_PARAMS_GET ||
                     x->route->id == API_R_STATE_GET || file_get;
    /* /healthz answers any prober, whatever it accepts; /metrics, the event
     * stream and the dashboard answer their one type. */
    bool any_accept = x->route->id == API_R_HEALTHZ || x->route->id == API_R_METRICS ||
                      x->route->id == API_R_EVENTS || x->route->id == API_R_DASHBOARD ||
                      x->route->id == API_R_ASSET;
    int acc = any_accept ? 0 : api_accept(hdr(c, MHD_HTTP_HEADER_ACCEPT), binary_ok);
    if (acc < 0)
        return api_problem(r, 406, "Accept",
                           binary_ok ? "this route answers application/json or "
                                       "application/octet-stream"
                                     : "this route answers application/json");
    x->want_binary = acc == 1;
    if (file_get) {
        /* The state is a safetensors file, whatever else is accepted. */
        const char *a = hdr(c, MHD_HTTP_HEADER_ACCEPT);
        if (a && *a && api_accept(a, true) != 1 && !strstr(a, "*/*") &&
            !strstr(a, "application/*"))
            return api_problem(r, 406, "Accept", "this route answers application/octet-stream "
                                                 "(a safetensors file)");
        x->want_binary = true;
    }
    if (x->route->body == API_BODY_BINARY) {
        if (api_content_type(hdr(c, MHD_HTTP_HEADER_CONTENT_TYPE), true) != 1)
            return api_problem(r, 415, "Content-Type",
                               "send application/octet-stream (a safetensors file)");
        x->body_binary = true;
    } else if (x->route->body != API_BODY_NONE) {
        int ct = api_content_type(hdr(c, MHD_HTTP_HEADER_CONTENT_TYPE),
                                  x->route->body == API_BODY_VECTOR);
        if (ct < 0)
            return api_problem(r, 415, "Content-Type",
                               x->route->body == API_BODY_VECTOR
                                   ? "send application/json or application/octet-stream"
                                   : "send application/json");
        x->body_binary = ct == 1;
        if (x->route->body == API_BODY_VECTOR) {
            st = session_bound(ctx, x, r);
            if (st)
                return st;
        }
    }
    /* One allocation for a body of known length (+1 for the NUL). */
    if (x->route->body != API_BODY_NONE && x->content_length > 0) {
        x->body = body_alloc((size_t)x->content_length + 1, &x->cap);
        if (!x->body)
            return api_problem(r, 503, NULL, "out of memory for a body of %lld bytes",
                               x->content_length);
    }
    return 0;
}

/* Appends n body bytes.  0, or -1 when out of memory.  Only a chunked
 * body (length unknown) ever grows: by doubling, up to the limit. */
static int body_append(conn_ctx *x, const char *data, size_t n)
{
    if (x->len + n + 1 > x->cap) {
        size_t want = x->cap ? x->cap : BODY_CHUNKED_START;
        while (want < x->len + n + 1)
            want *= 2;
        if (want > x->limit + 1)
            want = x->limit + 1; /* len + n <= limit was checked */
        size_t cap;
        char *b = body_alloc(want, &cap);
        if (!b)
            return -1;
        if (x->len)
            memcpy(b, x->body, x->len);
        free(x->body);
        x->body = b;
        x->cap = cap;
    }
    memcpy(x->body + x->len, data, n);
    x->len += n;
    x->body[x->len] = '\0';
    return 0;
}

/* MHD_OPTION_URI_LOG_CALLBACK: runs once per request with the request
 * target as sent, before libmicrohttpd decodes it.  Returns the request's
 * context (a new conn_ctx, freed in on_completed), NULL when out of
 * memory. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c)
{
    (void)cls;
    (void)c;
    conn_ctx *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->path = strndup(uri, strcspn(uri, "?#"));
    if (!x->path) {
        free(x);
        return NULL;
    }
    x->content_length = -1;
    clock_gettime(CLOCK_MONOTONIC, &x->t0);
    return x;
}

static enum MHD_Result handle_request(void *cls, struct MHD_Connection *c, const char *url,
                                      const char *method, const char *version,
                                      const char *upload_data, size_t *upload_size,
                                      void **con_cls)
{
    (void)url; /* decoded: routing uses the raw x->path */
    (void)version;
    srv_ctx *ctx = cls;
    conn_ctx *x = *con_cls;
    if (!x)
        return MHD_NO; /* on_uri ran out of memory */
    if (!x->started) {
        x->started = true;
        snprintf(x->method, sizeof x->method, "%s", method);
        x->limit = ctx->cfg->max_body_mb * 1024 * 1024;
        api_reply r = {0};
        if (precheck(ctx, c, x, method, &r)) {
            x->responded = true;
            return queue(c, x, &r);
        }
        return MHD_YES;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (x->responded || x->too_large || x->route->body == API_BODY_NONE)
            return MHD_YES;
        if (n > x->limit - x->len) {
            x->too_large = true;
            free(x->body);
            x->body = NULL;
            x->len = x->cap = 0;
            return MHD_YES;
        }
        return body_append(x, upload_data, n) == 0 ? MHD_YES : MHD_NO;
    }
    if (x->responded)
        return MHD_YES;
    if (x->parked) {
        if (!x->waiter.done)
            return MHD_YES;
        x->responded = true;
        return queue(c, x, &x->waiter.reply);
    }
    api_reply r = {0};
    if (x->too_large) {
        api_problem(&r, 413, NULL, "body exceeds the limit of %zu bytes", x->limit);
        return queue(c, x, &r);
    }
    if (x->route->body == API_BODY_JSON || (x->route->body == API_BODY_VECTOR && !x->body_binary)) {
        if (x->len == 0) {
            api_problem(&r, 400, NULL, "a JSON body is required");
            return queue(c, x, &r);
        }
    }
    if (x->route->id == API_R_EVENTS) {
        int ok = 0;
        if (obs_events_open(ctx, c, x->name, hdr(c, "Last-Event-ID"), qry(c, "after"),
                            qry(c, "live"), x->rid, &ok, &r) == 0) {
            x->status = 200;
            x->responded = true;
            return ok ? MHD_YES : MHD_NO;
        }
        return queue(c, x, &r);
    }
    srv_request req = {
        .route = x->route,
        .name = x->name,
        .body = x->body ? x->body : "",
        .body_len = x->len,
        .content_length = x->content_length,
        .body_binary = x->body_binary,
        .want_binary = x->want_binary,
        .header = hdr,
        .query = qry,
        .conn = c,
        .waiter = &x->waiter,
        .who = &x->who,
    };
    double t_handle = obs_now();
    int handled = srv_handle(ctx, &req, &r);
    if (x->route->id == API_R_STEP)
        obs_step_request(t_handle, obs_now());
    if (handled == SRV_SUSPENDED) {
        x->parked = true;
        __atomic_add_fetch(&parked_now, 1, __ATOMIC_SEQ_CST);
        return MHD_YES;
    }
    return queue(c, x, &r);
}

/* The request callback: problems built while it runs name the request's id
 * (a thread-local that does not outlive the call). */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_size, void **con_cls)
{
    conn_ctx *x = *con_cls;
    if (x && !x->started)
        obs_request_id(hdr(c, "X-Request-Id"), x->rid);
    api_request_id_set(x ? x->rid : NULL);
    enum MHD_Result res =
        handle_request(cls, c, url, method, version, upload_data, upload_size, con_cls);
    api_request_id_set(NULL);
    return res;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    conn_ctx *x = *con_cls;
    if (!x)
        return;
    if (x->parked)
        __atomic_sub_fetch(&parked_now, 1, __ATOMIC_SEQ_CST);
    api_reply_free(&x->waiter.reply);
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - x->t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - x->t0.tv_nsec) / 1e6;
    int route = x->route ? (int)x->route->id : API_R_COUNT;
    uint64_t bytes_in = x->content_length > 0 ? (uint64_t)x->content_length : x->len;
    obs_request_done(route, x->status, bytes_in, x->bytes_out, ms / 1e3);
    obs_access_log(x->rid[0] ? x->rid : "-", x->method[0] ? x->method : "-",
                   x->route ? x->route->pattern : NULL, x->route ? x->name : NULL, x->status,
                   bytes_in, x->bytes_out, ms / 1e3);
    if (!x->started)
        srv_log(SRV_LOG_WARN, "- %s refused by libmicrohttpd before routing (%.3fms)", x->path, ms);
    else
        srv_log(x->status >= 500 || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK ? SRV_LOG_WARN
                                                                               : SRV_LOG_DEBUG,
                "%s %s %d %.3fms%s", x->method, x->path, x->status, ms,
                toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (connection ended early)");
    free(x->body);
    free(x->path);
    free(x);
    *con_cls = NULL;
}

int srv_http_run(srv_ctx *ctx)
{
    const srv_config *cfg = ctx->cfg;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG | MHD_ALLOW_SUSPEND_RESUME;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, cfg->bind, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)cfg->port);
    } else if (inet_pton(AF_INET6, cfg->bind, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)cfg->port);
        flags |= MHD_USE_IPv6;
    } else {
        srv_log(SRV_LOG_ERROR, "--bind %s is not an IPv4 or IPv6 address", cfg->bind);
        return -1;
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned threads = cfg->threads > 0 ? (unsigned)cfg->threads
                                        : (unsigned)(cores > 2 ? 2 * cores : 4);
    /* libmicrohttpd splits the connection limit across its threads. */
    if (threads > cfg->max_connections)
        threads = (unsigned)cfg->max_connections;

    /* Signals go to the main thread only, through sigwait. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    ctx->suspend = suspend_conn;
    ctx->resume = resume_conn;
    /* HTTPS when --tls-cert is given (server/tls.c). */
    srv_tls *tls = NULL;
    struct MHD_OptionItem tls_opts[3] = {{MHD_OPTION_END, 0, NULL}};
    if (cfg->tls_cert[0]) {
        if (srv_tls_open(cfg, &tls) != 0)
            return -1;
        srv_tls_mhd_options(tls, tls_opts);
        flags |= MHD_USE_TLS;
    }
    if (obs_init(ctx) != 0) {
        srv_tls_free(tls);
        return -1;
    }
    obs_set_waiting_source(&parked_now);
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)cfg->port, NULL, NULL, on_request, ctx, MHD_OPTION_SOCK_ADDR, &ss,
        MHD_OPTION_THREAD_POOL_SIZE, threads, MHD_OPTION_URI_LOG_CALLBACK, on_uri, ctx,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, ctx, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)cfg->idle_timeout_s, MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->max_connections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)cfg->max_connections_per_ip,
        MHD_OPTION_ARRAY, tls_opts, MHD_OPTION_END);
    if (!d) {
        srv_log(SRV_LOG_ERROR, "cannot listen on %s:%d", cfg->bind, cfg->port);
        obs_shutdown();
        obs_close();
        srv_tls_free(tls);
        return -1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    int port = info ? info->port : cfg->port;
    printf("optd listening on %s://%s%s%s:%d\n", tls ? "https" : "http",
           v6->sin6_family == AF_INET6 ? "[" : "",
           cfg->bind, v6->sin6_family == AF_INET6 ? "]" : "", port);
    fflush(stdout);
    srv_log(SRV_LOG_INFO,
            "listening on %s:%d with %u threads, db %s; at most %zu connections, %zu per "
            "address, idle ones closed after %zu s",
            cfg->bind, port, threads, cfg->db, cfg->max_connections, cfg->max_connections_per_ip,
            cfg->idle_timeout_s);

    /* SIGHUP reloads the TLS files and serving goes on; SIGTERM and
     * SIGINT stop. */
    int sig = 0;
    while (sigwait(&set, &sig) == 0 && sig == SIGHUP) {
        if (tls)
            srv_tls_reload(tls);
        else
            srv_log(SRV_LOG_INFO, "SIGHUP: TLS is off, nothing to reload; still serving");
    }
    srv_log(SRV_LOG_INFO, "signal %d: stopping (in-flight requests finish)", sig);
    /* No MHD_quiesce_daemon here: in libmicrohttpd 0.9.75 with epoll and a
     * thread pool it races a worker removing the listening socket from its
     * epoll set, and one of them aborts ("Failed to remove listen FD from
     * epoll set"); MHD_stop_daemon closes the socket below. */
    obs_shutdown(); /* event streams end */
    /* Waiters of open rounds get 503; give their answers time to go out. */
    srv_sync_shutdown(ctx->sync);
    for (int i = 0; i < 200 && __atomic_load_n(&parked_now, __ATOMIC_SEQ_CST) > 0; i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    /* A request that raced the first sweep was refused (stopping flag);
     * sweep once more so that no connection stays suspended. */
    srv_sync_shutdown(ctx->sync);
    MHD_stop_daemon(d); /* waits for handlers to return */
    srv_tls_free(tls);
    obs_close();
    return 0;
}
