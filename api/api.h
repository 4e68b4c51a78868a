/*
 * api.h -- optd's HTTP contract without sockets: the route table, request
 * decoding (JSON and binary) with validation, problem+json errors and
 * response encoding.  api/openapi.yaml is the contract's source of truth.
 *
 * Replies are built in an api_reply; the server turns it into an HTTP
 * response.  Decoders return 0 on success, or an HTTP status after having
 * already filled the reply with the problem (the "_or_reply" contract).
 */
#ifndef API_H
#define API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "optim/optim.h"

typedef struct cJSON cJSON;

#define API_NAME_MAX 128
#define API_WORKER_MAX 128
#define API_IDEM_MAX 200

/* ------------------------------------------------------------- replies */

#define API_MAX_HEADERS 8

typedef struct {
    int status;
    const char *content_type;          /* static string */
    char *body;                        /* malloc'd; the server frees it */
    size_t len;
    int n_headers;
    struct {
        char name[32];
        char value[96];
    } headers[API_MAX_HEADERS];
    /* A body produced while it is sent (large binary params), instead of
     * body: stream_read fills buf from byte pos (returns the bytes written),
     * stream_done releases stream_ctx once (sent, failed or never sent). */
    size_t (*stream_read)(void *ctx, uint64_t pos, char *buf, size_t max);
    void (*stream_done)(void *ctx);
    void *stream_ctx;
    uint64_t stream_len;
} api_reply;

void api_reply_free(api_reply *r);
void api_reply_header(api_reply *r, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Takes ownership of body (malloc'd, len bytes). */
void api_reply_body(api_reply *r, int status, const char *content_type, char *body, size_t len);
/* An application/problem+json reply (RFC 9457).  field may be NULL.
 * Returns status, so handlers can `return api_problem(...)`. */
int api_problem(api_reply *r, int status, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The same with one extra integer member (e.g. "step": current step). */
int api_problem_with(api_reply *r, int status, const char *field, const char *extra_name,
                     int64_t extra_value, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
/* The id of the request this thread is answering (NULL: none); every
 * problem built on the thread carries it as "request_id".  The string must
 * outlive the request's handling. */
void api_request_id_set(const char *rid);
/* The problem type URI for a status and field. */
const char *api_problem_type(int status);

/* -------------------------------------------------------------- routes */

typedef enum {
    API_R_HEALTHZ,
    API_R_OPTIMIZERS,
    API_R_SESSIONS_LIST,
    API_R_SESSION_PUT,
    API_R_SESSION_GET,
    API_R_SESSION_PATCH,
    API_R_SESSION_DELETE,
    API_R_STEP,
    API_R_PARAMS_GET,
    API_R_PARAMS_PUT,
    API_R_HISTORY,
    API_R_STATE_GET,
    API_R_STATE_PUT,
    API_R_EVENTS,
    API_R_METRICS,
    API_R_DASHBOARD,
    API_R_ASSET,
    API_R_CHECKPOINTS_GET,
    API_R_CHECKPOINTS_POST,
    API_R_ROLLBACK,
    API_R_EXPORT_GET,
    API_R_EXPORT_PUT,
    API_R_TOKENS_LIST,
    API_R_TOKENS_POST,
    API_R_TOKEN_GET,
    API_R_TOKEN_DELETE,
    API_R_COUNT
} api_route_id;

enum {
    API_BODY_NONE = 0,
    API_BODY_JSON = 1,
    API_BODY_VECTOR = 2, /* JSON or binary */
    API_BODY_BINARY = 3  /* application/octet-stream only */
};

/* What a route asks of its caller (docs/security.md).  The token scopes
 * nest: read < step < admin; the admin key holds them all. */
enum {
    API_SCOPE_PUBLIC = 0, /* anyone (/healthz, the dashboard's files)       */
    API_SCOPE_READ = 1,
    API_SCOPE_STEP = 2,
    API_SCOPE_ADMIN = 3,
    API_SCOPE_KEY = 4     /* the admin key itself (tokens; /metrics also
                             takes --metrics-token)                        */
};

typedef struct {
    const char *method;
    const char *pattern;   /* "/v1/sessions/{name}/step" */
    api_route_id id;
    int body;              /* API_BODY_* */
    int scope;             /* API_SCOPE_*: what the caller needs         */
} api_route;

extern const api_route api_routes[];
extern const size_t api_route_count;

/* Finds the route for a raw (not percent-decoded) path: 0 and *route (+
 * the {name} segment, validated) on a match; otherwise fills reply with
 * 404 / 405 / 400 (bad name, including any %-escape in it) and returns
 * that status.  HEAD matches the GET routes. */
/* The methods that path (raw, as sent) has in the route table, in its
 * order, ", "-separated, GET followed by HEAD, into buf; their length (0:
 * no route has that path). */
size_t api_path_methods(const char *path, char *buf, size_t size);
int api_route_match(const char *method, const char *path, const api_route **route,
                    char name[API_NAME_MAX + 1], api_reply *r);
bool api_name_valid(const char *name, size_t len);

/* ------------------------------------------------------ session config */

enum { API_MODE_ASYNC = 0, API_MODE_SYNC = 1 };
enum { API_STALE_REJECT = 0, API_STALE_DAMP = 1 };
enum { API_REDUCE_MEAN = 0, API_REDUCE_SUM = 1 };
enum { API_TIMEOUT_FAIL = 0, API_TIMEOUT_APPLY = 1 };
enum { API_NONFINITE_ERROR = 0, API_NONFINITE_SKIP = 1 };

typedef struct {
    int type;               /* API_MODE_*                                  */
    int64_t max_staleness;  /* async: -1 = unbounded                        */
    int stale_policy;       /* async: API_STALE_*                           */
    int64_t workers;        /* sync: N                                      */
    int64_t timeout_ms;     /* sync                                         */
    int reduce;             /* sync: API_REDUCE_*                           */
    int on_timeout;         /* sync: API_TIMEOUT_*                          */
    int64_t accumulate;     /* K >= 1 (1: apply every gradient)            */
} api_mode;

/* The layout of a session's vector: named tensors (the vector is their
 * concatenation, in order) and torch's param groups (each holds some
 * tensors and may override any hyperparameter of the session's
 * optimizer).  A session created without one has one tensor "params" and
 * one group holding it. */
#define API_TENSOR_NAME_MAX 200
#define API_MAX_DIMS 8
#define API_MAX_TENSORS 100000
#define API_MAX_GROUPS 1024

typedef struct {
    char *name;
    int ndim;
    int64_t shape[API_MAX_DIMS];
    uint64_t offset;        /* first element in the flat vector             */
    uint64_t size;          /* elements (product of the shape)              */
    uint32_t group;         /* the group that holds it                      */
} api_tensor;

typedef struct {
    uint32_t *tensors;      /* indices into api_config.tensors, in order    */
    size_t n_tensors;
    char *overrides;        /* canonical JSON object of the hyperparameters
                               this group sets itself ("{}": none)        */
    optim_hparams opt;      /* effective: the session's optimizer with the
                               overrides applied                           */
} api_group;

/* Kept checkpoints: one every every_steps updates, the keep newest of them
 * kept (0, 0: none; docs/api.md "Time travel"). */
#define API_RETAIN_KEEP_MAX 10000
typedef struct {
    int64_t every_steps;
    int64_t keep;
} api_retain;

typedef struct {
    optim_dtype dtype;
    uint64_t size;
    optim_hparams opt;      /* the session's optimizer (torch's defaults)   */
    optim_schedule sched;
    optim_clip clip;
    api_mode mode;
    int nonfinite;          /* API_NONFINITE_*                               */
    api_retain retain;
    char *metadata;         /* canonical JSON object text or NULL; owned    */
    bool layout;            /* tensors/groups were given (kept in the
                               canonical config)                           */
    size_t n_tensors;
    api_tensor *tensors;    /* owned                                        */
    size_t n_groups;
    api_group *groups;      /* owned                                        */
} api_config;

enum { API_INIT_PARAMS = 0, API_INIT_ZEROS, API_INIT_NORMAL, API_INIT_UNIFORM };

typedef struct {
    int type;               /* API_INIT_*                                    */
    double mean, std;       /* normal                                       */
    double low, high;       /* uniform                                      */
    uint64_t seed;
} api_init;

void api_config_free(api_config *c);
/* Deep copy (metadata duplicated). */
int api_config_copy(api_config *dst, const api_config *src);
/* Canonical JSON of the config, every default filled in; new string. */
char *api_config_to_json(const api_config *c);
/* Parses a canonical config (as stored); 0 or -1. */
int api_config_from_json(const char *json, api_config *c);
/* Recomputes every group's effective hyperparameters from the session's
 * optimizer and the group's overrides (after a PATCH of "optimizer").
 * 0, or 400 with the reply naming groups[i].field. */
int api_config_refresh_groups(api_config *c, api_reply *r);
/* The canonical JSON object of one set of hyperparameters ({"type": ...,
 * every value}); new string. */
char *api_hparams_to_json(const optim_hparams *hp);
/* The index of a tensor by name, or -1. */
long api_tensor_find(const api_config *c, const char *name);
/* Names each field where want differs from have, with both values, as
 * "optimizer.lr: 0.001 in the session, 0.01 requested; ..." into out
 * (truncated with "..." when longer than n).  Returns the number of
 * differing fields (0: the same config), or -1 when out of memory. */
int api_config_diff(const api_config *have, const api_config *want, char *out, size_t n);
/* The 409 for a create whose config differs from session name's: every
 * differing field with both values, and PATCH as the way to change it.
 * Returns 409. */
int api_config_conflict(api_reply *r, const char *name, const api_config *have,
                        const api_config *want);
/* Prints d in the shortest of %.15g, %.16g, %.17g that reads back exactly
 * (0.1 -> "0.1").  Returns snprintf's count. */
int api_shortest_double(char *out, size_t n, double d);
/* The name of names closest to given ("Adam" -> "adam", "cosin" ->
 * "cosine"), or NULL when none is within two edits. */
const char *api_closest_name(const char *given, const char *const *names, size_t n);

/* PUT /v1/sessions/{name}.  On success *params is a new buffer of
 * cfg->size elements of cfg->dtype when the body gave "params", else NULL
 * and *init says how to fill them.  Caller frees both with api_config_free
 * and free(). */
int api_decode_create(const char *body, size_t len, size_t max_params, api_config *cfg,
                      api_init *init, void **params, api_reply *r);
/* PATCH: applies the body's changes onto cfg (a copy the caller owns). */
int api_decode_patch(const char *body, size_t len, api_config *cfg, api_reply *r);
/* Fills params per init (deterministic for a seed). */
void api_init_fill(const api_init *init, optim_dtype dt, void *params, size_t n);

/* ------------------------------------------------------------ vectors */

typedef struct {
    double loss;            /* NAN when absent                              */
    int64_t base_step;      /* -1 when absent                               */
    char worker[API_WORKER_MAX + 1]; /* "" when absent                      */
} api_step_meta;

/* Step / params bodies: JSON, or the raw little-endian binary body.  The
 * vector goes into out (n elements of dt); length and types are checked
 * here (422 / 400), finiteness is the caller's policy (api_vector_finite). */
int api_decode_step_json(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                         api_step_meta *meta, api_reply *r);
int api_decode_params_json(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                           api_reply *r);
int api_decode_vector_binary(const char *body, size_t len, optim_dtype dt, size_t n, void *out,
                             const char *what, api_reply *r);
/* Header values: Optd-Loss, Optd-Base-Step, Optd-Worker.  NULL = absent. */
int api_decode_step_headers(const char *loss, const char *base_step, const char *worker,
                            api_step_meta *meta, api_reply *r);

/* True when every element is finite. */
bool api_vector_finite(optim_dtype dt, const void *v, size_t n);

/* Prints v as a JSON array, bit-exact (%.9g float32, %.17g float64) into a
 * growing buffer.  Returns 0 or -1 (no memory). */
typedef struct {
    char *data;
    size_t len, cap;
} api_buf;
int api_buf_printf(api_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int api_buf_put(api_buf *b, const char *s, size_t n);
int api_buf_vector(api_buf *b, optim_dtype dt, const void *v, size_t n);
/* %.17g for a double, "null" when not finite. */
int api_buf_double(api_buf *b, double x);
/* One number as snprintf's "%.9g" of (double)f / "%.17g" of x would print
 * it, byte for byte (api/numfmt.c); out has room for 32 bytes.  Returns the
 * length; no NUL is written. */
size_t api_fmt_f32(char *out, float f);
size_t api_fmt_f64(char *out, double x);
/* The same without the printf fallback: 0 where the fast path cannot
 * decide the rounding (bench/json.c counts those). */
size_t api_fmt_f32_fast(char *out, float f);
size_t api_fmt_f64_fast(char *out, double x);
/* Whether long double arithmetic really has x87's 64-bit significand here
 * (not under an emulator that computes it in double, such as valgrind):
 * the fast paths of the float64 printer and of the JSON number reader use
 * it only then. */
bool api_ld64_exact(void);

/* ------------------------------------------------------- safetensors */

typedef struct {
    const char *name;
    optim_dtype dtype;
    int ndim;
    int64_t shape[API_MAX_DIMS];
    const void *data;       /* encode: the source; parse: into the body     */
    size_t bytes;
} api_st_tensor;

/* The header of a safetensors file holding tensors t (in this order, their
 * data to follow back to back) and metadata pairs (key, value, key, ...).
 * New buffer of *len bytes (the data then starts 8-aligned). */
char *api_st_header(const api_st_tensor *t, size_t n, const char *const *meta, size_t n_meta,
                    size_t *len);
/* Parses a safetensors body: *out a new array of n tensors whose names and
 * data point into *doc / body (free *out, cJSON_Delete *doc after use);
 * the metadata is *doc's "__metadata__".  0 or the problem's status. */
int api_st_parse(const char *body, size_t len, api_st_tensor **out, size_t *n, cJSON **doc,
                 api_reply *r);
const api_st_tensor *api_st_find(const api_st_tensor *t, size_t n, const char *name);

/* --------------------------------------------------------- catalogue */

/* GET /v1/optimizers body: every optimizer, schedule, clip kind with its
 * hyperparameters and defaults.  New string. */
char *api_catalogue_json(void);

/* ------------------------------------------------------- negotiation */

/* 0 = JSON, 1 = binary (application/octet-stream); -1 when nothing we can
 * produce is acceptable (406). */
int api_accept(const char *accept_header, bool binary_ok);
/* Content-Type check for bodies: 0 JSON, 1 binary, -1 unsupported (415). */
int api_content_type(const char *ct, bool binary_ok);

/* cJSON's allocations through a hook that counts the failed ones per
 * thread (api/jsonmem.c): install once before serving; a caller compares
 * api_json_failures() before and after building or parsing a document. */
void api_json_track_allocations(void);
unsigned long api_json_failures(void);

#endif /* API_H */
