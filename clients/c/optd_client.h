/*
 * optd_client.h -- a C client for optd's HTTP API (v1), on libcurl.
 *
 * A client owns one libcurl easy handle, so consecutive requests reuse one
 * keep-alive connection.  A client is NOT thread-safe: give every thread
 * its own (they are cheap).  Link build/liboptdclient.a and -lcurl.
 *
 * Conventions: functions return 0 on success and -1 on failure; when an
 * optd_error pointer is given (it may be NULL) it then says why: the HTTP
 * status and the problem+json members, or status 0 with detail set when
 * no answer came at all (connection refused, timeout, ...).
 *
 * Retries: connection failures, timeouts and 503 answers are retried with
 * exponential backoff (optd_client_set_retry), or after the answer's
 * Retry-After when it names one (at most OPTD_RETRY_AFTER_MAX_S).  A 429
 * whose Retry-After is at most OPTD_RETRY_AFTER_MAX_S (a token past its step
 * rate) is waited out and retried the same way; a longer one (a session or
 * params quota) fails at once, with optd_error.retry_after set.  A step carries an
 * Idempotency-Key generated once per logical step and reused by every retry,
 * so a retry never applies a gradient twice.
 */
#ifndef OPTD_CLIENT_H
#define OPTD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct optd_client optd_client;

/* The constants every optd client shares (api/client_constants.json;
 * tests/test_api_config.c checks these against it).  Retries count the
 * attempts after the first. */
#define OPTD_DEFAULT_RETRIES 4
#define OPTD_DEFAULT_BACKOFF_MS 50
#define OPTD_DEFAULT_MAX_BACKOFF_MS 2000
/* The longest Retry-After (seconds) the retries wait out. */
#define OPTD_RETRY_AFTER_MAX_S 30
#define OPTD_NAME_PATTERN "^[A-Za-z0-9._-]{1,128}$"
#define OPTD_HEADER_IDEMPOTENCY_KEY "Idempotency-Key"
#define OPTD_HEADER_LOSS "Optd-Loss"
#define OPTD_HEADER_BASE_STEP "Optd-Base-Step"
#define OPTD_HEADER_WORKER "Optd-Worker"
#define OPTD_HEADER_DTYPE "Optd-Dtype"
#define OPTD_HEADER_STEP "Optd-Step"
#define OPTD_HEADER_LR "Optd-Lr"
#define OPTD_HEADER_PENDING "Optd-Pending"
#define OPTD_HEADER_REPLAYED "Optd-Replayed"
#define OPTD_HEADER_SKIPPED "Optd-Skipped"
#define OPTD_HEADER_PARAMS_CRC32 "Optd-Params-Crc32"
#define OPTD_HEADER_GRAD_NORM "Optd-Grad-Norm"
/* optd_error.type when an answer's params do not match its
 * Optd-Params-Crc32 (optd_error_kind: "digest_mismatch"). */
#define OPTD_ERROR_DIGEST_MISMATCH "urn:optd:client:params-digest-mismatch"

typedef struct {
    int status;          /* HTTP status; 0 when no answer came             */
    char type[128];      /* problem type URN ("urn:optd:problem:...")      */
    char title[128];
    char detail[512];
    char field[96];      /* the field at fault, "" when none                */
    long long step;      /* "step" member of the problem, else -1          */
    int retry_after;     /* the answer's Retry-After in seconds, 0 when none */
} optd_error;

/* Returns a new client for base_url ("http://127.0.0.1:8080"; a trailing
 * slash is ignored).  api_key (may be NULL) is sent as
 * "Authorization: Bearer KEY".  NULL when out of memory.  Free with
 * optd_client_free. */
optd_client *optd_client_new(const char *base_url, const char *api_key);
void optd_client_free(optd_client *c);

/* Retry policy: at most max_attempts tries in all (>= 1; default
 * OPTD_DEFAULT_RETRIES + 1 = 5), the first wait initial_backoff_ms (default
 * 50), doubled after each failure up to max_backoff_ms (default 2000). */
void optd_client_set_retry(optd_client *c, int max_attempts, long initial_backoff_ms,
                           long max_backoff_ms);
/* Checks the params of every answer against its Optd-Params-Crc32 (the
 * CRC-32 of the params in the session's dtype) when on (the default): a
 * mismatch fails the call with err->type OPTD_ERROR_DIGEST_MISMATCH and
 * err->status the answer's status; the params were written to the caller's
 * buffer all the same. */
void optd_client_set_params_check(optd_client *c, int on);
/* Per-attempt timeouts in milliseconds (defaults: connect 5000, whole
 * request 60000). */
void optd_client_set_timeouts(optd_client *c, long connect_ms, long request_ms);
/* TLS for an https:// base URL: ca_file, a PEM bundle the daemon's
 * certificate must verify against (NULL: the system's CAs); cert_file and
 * key_file, a PEM client certificate and its key for a daemon that
 * requires one (--tls-client-ca), both or neither.  The files are read at
 * each new connection.  0, or -1 (one of cert/key without the other, out of
 * memory; nothing changed). */
int optd_client_set_tls(optd_client *c, const char *ca_file, const char *cert_file,
                        const char *key_file);

/* The form binary vectors travel in.  bfloat16 and float16 take half of
 * float32's bytes: a gradient is narrowed by the client (first to float32,
 * then to nearest with ties to even; NaN stays a quiet NaN; float16 keeps
 * subnormals and turns values from 65520 on into Inf) and widened exactly
 * by the daemon to the session's dtype; params come back narrowed the same
 * way and are widened exactly into the caller's floats or doubles.  A 16-bit
 * body does not say the session's dtype, so a call of either width works on
 * a session of either dtype. */
typedef enum {
    OPTD_WIRE_DEFAULT = 0, /* per call: the client's choice (set_wire)     */
    OPTD_WIRE_FULL,        /* the session's dtype: the client's default    */
    OPTD_WIRE_BFLOAT16,
    OPTD_WIRE_FLOAT16,
} optd_wire;
#define OPTD_HEADER_PARAMS_DTYPE "Optd-Params-Dtype"

/* The form every step and params call of c uses unless it names its own.
 * 0, or -1 for a value outside optd_wire (nothing changes). */
int optd_client_set_wire(optd_client *c, optd_wire wire);

/* One value in a 16-bit form, as bit patterns; narrowing rounds to nearest,
 * ties to even, widening is exact. */
uint16_t optd_f32_to_bf16(float x);
float optd_bf16_to_f32(uint16_t h);
uint16_t optd_f32_to_f16(float x);
float optd_f16_to_f32(uint16_t h);

/* ------------------------------------------------------------- sessions */

/* PUT /v1/sessions/{name} with config_json as the body.  Create-or-verify:
 * 201 (created: returns 1) and 200 (the same config already exists:
 * returns 0) both succeed; 409 (a different config exists) is an error. */
int optd_create_session(optd_client *c, const char *name, const char *config_json,
                        optd_error *err);
/* GET /v1/sessions/{name}.  Returns a new JSON string (caller frees) or
 * NULL. */
char *optd_get_session(optd_client *c, const char *name, optd_error *err);
/* PATCH /v1/sessions/{name} with patch_json (hyperparameters, schedule,
 * clip, metadata). */
int optd_update(optd_client *c, const char *name, const char *patch_json, optd_error *err);
/* DELETE /v1/sessions/{name}. */
int optd_delete(optd_client *c, const char *name, optd_error *err);

/* ----------------------------------------------------------------- steps */

typedef struct {
    long long base_step;         /* Optd-Base-Step; < 0: not sent          */
    const char *worker;          /* Optd-Worker; NULL: not sent            */
    int json;                    /* non-zero: send and receive JSON        */
    const char *idempotency_key; /* NULL: a fresh random key              */
    optd_wire wire;              /* OPTD_WIRE_DEFAULT: the client's form  */
    /* Tensors without a gradient (torch: p.grad is None), by index: their
     * params, buffers and step counts stay as they are, and grad holds the
     * other tensors' gradients only, in tensor order.  NULL/0: none. */
    const size_t *absent;
    size_t n_absent;
    /* Client-driven hyperparameters, n_groups values each, in group order:
     * they become the groups' values from this step on.  NULL: not sent.
     * They travel in headers (Optd-Group-Lr, -Momentum, -Beta1), as the
     * absent tensors do (Optd-Absent), whichever the body's form. */
    size_t n_groups;
    const double *group_lr;
    const double *group_momentum;
    const double *group_beta1; /* betas[0] */
    /* Elements params_out holds, 0: n.  A step with absent tensors answers
     * every tensor's params: give the session's size here. */
    size_t params_len;
    /* When this session is one shard of a larger vector: the whole
     * vector's gradient norm (Optd-Grad-Norm, a finite number >= 0), which
     * clipping by norm uses in place of the norm of this session's part.
     * NULL: not sent.  optd_sharded sets it (optd_grad_norm_f32). */
    const double *grad_norm;
} optd_step_opts;

/* The options that send nothing extra (base_step -1, random key). */
optd_step_opts optd_step_opts_default(void);

/* POST /v1/sessions/{name}/step with n gradient elements in the session's
 * dtype (float32 for _f32, float64 for _f64).  loss (may be NULL) is sent
 * as Optd-Loss.  params_out (n elements, may be NULL) receives the new
 * parameters; when NULL the request says ?params=false.  *step_out (may be
 * NULL) receives the step count after the update (Optd-Step).
 * Returns 0 when applied (200), 1 when accepted but not yet applied (202:
 * a pending accumulation or synchronous round; params_out is not written),
 * -1 on error. */
int optd_step_f32(optd_client *c, const char *name, const float *grad, size_t n,
                  const double *loss, float *params_out, long long *step_out, optd_error *err);
int optd_step_f64(optd_client *c, const char *name, const double *grad, size_t n,
                  const double *loss, double *params_out, long long *step_out, optd_error *err);
/* The same with options (opts may be NULL).  *replayed (may be NULL) is set
 * to 1 when the daemon answered from its idempotency record (nothing was
 * applied by this call). */
int optd_step_f32_opts(optd_client *c, const char *name, const float *grad, size_t n,
                       const double *loss, const optd_step_opts *opts, float *params_out,
                       long long *step_out, int *replayed, optd_error *err);
int optd_step_f64_opts(optd_client *c, const char *name, const double *grad, size_t n,
                       const double *loss, const optd_step_opts *opts, double *params_out,
                       long long *step_out, int *replayed, optd_error *err);

/* Writes a fresh random 128-bit key as 32 hex digits + NUL into key[33].
 * 0, or -1 when getrandom(2) fails. */
int optd_new_idempotency_key(char key[33]);

/* ---------------------------------------------------------------- params */

/* GET /v1/sessions/{name}/params (binary): n elements into out; *step_out
 * (may be NULL) receives the step.  A size mismatch is an error. */
int optd_get_params_f32(optd_client *c, const char *name, float *out, size_t n,
                        long long *step_out, optd_error *err);
int optd_get_params_f64(optd_client *c, const char *name, double *out, size_t n,
                        long long *step_out, optd_error *err);
/* PUT /v1/sessions/{name}/params (binary). */
int optd_set_params_f32(optd_client *c, const char *name, const float *params, size_t n,
                        optd_error *err);
int optd_set_params_f64(optd_client *c, const char *name, const double *params, size_t n,
                        optd_error *err);
/* The same in a given form (OPTD_WIRE_DEFAULT: the client's). */
int optd_get_params_f32_wire(optd_client *c, const char *name, float *out, size_t n,
                             optd_wire wire, long long *step_out, optd_error *err);
int optd_get_params_f64_wire(optd_client *c, const char *name, double *out, size_t n,
                             optd_wire wire, long long *step_out, optd_error *err);
int optd_set_params_f32_wire(optd_client *c, const char *name, const float *params, size_t n,
                             optd_wire wire, optd_error *err);
int optd_set_params_f64_wire(optd_client *c, const char *name, const double *params,
                             size_t n, optd_wire wire, optd_error *err);

/* --------------------------------------------------------- time travel */

/* POST /v1/sessions/{name}/rollback: the session returns to what it was
 * after step (or at its checkpoint labelled label).  0 or -1. */
int optd_rollback(optd_client *c, const char *name, long long step, optd_error *err);
int optd_rollback_to(optd_client *c, const char *name, const char *label, optd_error *err);
/* Keeps the current state as a checkpoint labelled label.  0 or -1. */
int optd_checkpoint(optd_client *c, const char *name, const char *label, optd_error *err);
/* GET /v1/sessions/{name}/checkpoints: the JSON document (caller frees),
 * or NULL. */
char *optd_checkpoints(optd_client *c, const char *name, optd_error *err);
/* Creates session name from session from as it was after step (< 0: its
 * current step), with the members of changes_json (a JSON object of what
 * PATCH takes, or NULL) and, when replay is non-zero, a replay of from's
 * logged gradients after step under the new config.  0 or -1. */
int optd_fork(optd_client *c, const char *name, const char *from, long long step, int replay,
              const char *changes_json, optd_error *err);
/* The whole session as one file (with its log when with_log): *out is a
 * new buffer of *len bytes (caller frees).  0 or -1. */
int optd_export(optd_client *c, const char *name, int with_log, void **out, size_t *len,
                optd_error *err);
/* Creates session name from an export file.  0 or -1. */
int optd_import(optd_client *c, const char *name, const void *file, size_t len, optd_error *err);

/* ------------------------------------------------------ sharded sessions
 *
 * One logical vector split by ranges over k sessions on k daemons, shard i
 * named "NAME.shard<i>" on clients[i]'s daemon.  Each step computes the
 * whole gradient's norm here, exactly as a single session's daemon would
 * (optd_grad_norm_f32), refuses a gradient with NaN or Inf before sending
 * anything, and sends every shard its slice with that norm at once (one
 * thread per shard), with the Idempotency-Key "KEY.<i>" derived from the
 * step's key KEY.  The joined params equal a single session's bit for bit.
 * The Go and Python clients name, split and key shards the same way, so a
 * sharded session made by one can be stepped by another.
 *
 * An optd_sharded borrows its clients (they must outlive it) and uses each
 * from one thread at a time; it is not thread-safe itself. */
typedef struct optd_sharded optd_sharded;

/* The metadata member every shard keeps its place in (as the Python
 * client writes it): {"index", "count", "offset", "size" (the whole
 * vector's), "groups" (the indices of the whole model's groups the shard
 * holds), "layout" (whether the model has tensors)}.  Other members of a
 * create body's "metadata" object go to every shard as they are. */
#define OPTD_SHARD_META "optd_shard"

/* The norm (norm_type 1, 2 or INFINITY) of a gradient made of n_sizes
 * tensors of sizes[] elements in order, as the daemon computes it: each
 * tensor cut into blocks of 8192 elements, each block reduced in double
 * over 16 lanes, the lanes combined in a fixed order, the blocks combined
 * in order, the square root taken for norm 2.  A session without a layout
 * is one tensor.  *finite (may be NULL) is 0 when an element is NaN or Inf. */
double optd_grad_norm_f32(const float *grad, const size_t *sizes, size_t n_sizes,
                          double norm_type, int *finite);
double optd_grad_norm_f64(const double *grad, const size_t *sizes, size_t n_sizes,
                          double norm_type, int *finite);

/* Creates (or verifies, as optd_create_session does) the sharded session
 * name over k daemons from a create body: "params" (or "size" with a zeros
 * init) are split into k ranges, the first size%k one element longer; with
 * "tensors" the split falls on tensor boundaries (shard i ends at the first
 * boundary at or past (i+1)/k of the elements, every shard keeping at least
 * one tensor), each shard gets its tensors and "groups" restricted to them
 * (a group with none of them is left out).  Returns a new handle (free with
 * optd_sharded_free) or NULL. */
optd_sharded *optd_sharded_create(optd_client *const *clients, size_t k, const char *name,
                                  const char *config_json, optd_error *err);
/* A handle on an existing sharded session, from what its daemons say.
 * NULL on error. */
optd_sharded *optd_sharded_open(optd_client *const *clients, size_t k, const char *name,
                                optd_error *err);
void optd_sharded_free(optd_sharded *s);
/* Elements of the whole vector; where shard i starts (i == k: the size). */
size_t optd_sharded_size(const optd_sharded *s);
size_t optd_sharded_offset(const optd_sharded *s, size_t i);

/* One step of the whole vector (n == optd_sharded_size).  key: the step's
 * Idempotency-Key (NULL: a fresh one).  params_out (n, may be NULL) gets
 * the joined params, *step_out (may be NULL) the shards' common step.
 * 0, or -1 with err set.  When some shards failed (after their client's
 * retries and the retry window, optd_sharded_set_retry_for), the others
 * have applied the step: optd_sharded_pending_key
 * then gives its key, and a step with that key and the same gradient sends
 * it to the failed shards alone; a step with another key is refused until
 * then.  A gradient with NaN or Inf fails with err->field "grad" and sends
 * nothing. */
int optd_sharded_step_f32(optd_sharded *s, const float *grad, size_t n, const double *loss,
                          const char *key, float *params_out, long long *step_out,
                          optd_error *err);
int optd_sharded_step_f64(optd_sharded *s, const double *grad, size_t n, const double *loss,
                          const char *key, double *params_out, long long *step_out,
                          optd_error *err);
/* The same with options (opts may be NULL): idempotency_key, base_step
 * and worker (sent to every shard) and group values (n_groups: the whole
 * model's groups; each shard is sent the values of the groups it holds).
 * json, absent tensors, a 16-bit wire, grad_norm and params_len are
 * refused. */
int optd_sharded_step_f32_opts(optd_sharded *s, const float *grad, size_t n,
                               const double *loss, const optd_step_opts *opts,
                               float *params_out, long long *step_out, optd_error *err);
int optd_sharded_step_f64_opts(optd_sharded *s, const double *grad, size_t n,
                               const double *loss, const optd_step_opts *opts,
                               double *params_out, long long *step_out, optd_error *err);
/* How long a step keeps retrying the shards that failed transiently (no
 * answer, 502, 503, 504), each alone with its key, before it fails and
 * leaves the step pending (default OPTD_SHARD_RETRY_FOR_MS; 0: give up
 * after the clients' own retries). */
#define OPTD_SHARD_RETRY_FOR_MS 60000
void optd_sharded_set_retry_for(optd_sharded *s, long ms);
/* The key of the unfinished step, or NULL.  The string belongs to s. */
const char *optd_sharded_pending_key(const optd_sharded *s);
/* Whether shard i has the unfinished step (1), has not (0). */
int optd_sharded_shard_done(const optd_sharded *s, size_t i);
/* The same PATCH (optd_update) on every shard; a patch with "metadata" is
 * refused (each shard's metadata keeps its place).  0 or -1. */
int optd_sharded_update(optd_sharded *s, const char *patch_json, optd_error *err);
/* Overwrites the whole vector (n == size), each shard its range; the
 * optimizer state and step counts stay.  0 or -1. */
int optd_sharded_set_params_f32(optd_sharded *s, const float *params, size_t n, optd_error *err);
int optd_sharded_set_params_f64(optd_sharded *s, const double *params, size_t n,
                                optd_error *err);
/* Deletes every shard.  0 or -1.  The handle is still to be freed. */
int optd_sharded_delete(optd_sharded *s, optd_error *err);
/* The joined params (n == size); steps_out (k entries, may be NULL) gets
 * each shard's step.  0 or -1. */
int optd_sharded_params_f32(optd_sharded *s, float *out, size_t n, long long *steps_out,
                            optd_error *err);
int optd_sharded_params_f64(optd_sharded *s, double *out, size_t n, long long *steps_out,
                            optd_error *err);

/* --------------------------------------------------------------- tokens */

/* Scoped tokens, managed with the admin key only (docs/security.md). */
#define OPTD_TOKEN_ID_SIZE 17   /* 16 hex digits and the NUL            */
#define OPTD_TOKEN_SIZE 96      /* "optd_<id>_<64 hex>" and the NUL    */
/* POST /v1/tokens with request_json ({"scopes":["step"],"prefix":"run42-",
 * "expires_in":..., "quotas":{...}}): the new token's id and its secret
 * (the bearer token, shown this once).  0 or -1. */
int optd_create_token(optd_client *c, const char *request_json, char id[OPTD_TOKEN_ID_SIZE],
                      char secret[OPTD_TOKEN_SIZE], optd_error *err);
/* GET /v1/tokens (id NULL: every token) or GET /v1/tokens/{id}: the JSON
 * document (never a secret; caller frees), or NULL. */
char *optd_tokens(optd_client *c, const char *id, optd_error *err);
/* DELETE /v1/tokens/{id}: the next request that carries it is refused.
 * 0 or -1. */
int optd_revoke_token(optd_client *c, const char *id, optd_error *err);

/* ------------------------------------------------------------ raw calls */

typedef struct {
    char *name;
    char *value;
} optd_header;

typedef struct {
    int status;               /* HTTP status                                */
    char *body;               /* malloc'd, NUL-terminated (len excludes it) */
    size_t len;
    optd_header *headers;     /* of the final response, in order           */
    size_t n_headers;
    char content_type[128];   /* "" when absent                            */
} optd_response;

/* One request, no retries: method ("GET", "PUT", ...), path ("/v1/...",
 * query included), extra headers as a NULL-terminated array of
 * "Name: value" strings (NULL for none; "Name:" removes a default header),
 * and an optional body (len bytes; sent as application/json unless a
 * Content-Type is given).  Returns 0 when any HTTP answer came (out filled;
 * free with optd_response_free), -1 on a transport failure (out->status 0,
 * *err filled when err is given). */
int optd_request(optd_client *c, const char *method, const char *path,
                 const char *const *headers, const void *body, size_t len, optd_response *out);
/* The same, reporting a transport failure in err (may be NULL). */
int optd_request_err(optd_client *c, const char *method, const char *path,
                     const char *const *headers, const void *body, size_t len,
                     optd_response *out, optd_error *err);
/* The value of a response header (case-insensitive name), or NULL.  The
 * string belongs to the response. */
const char *optd_response_header(const optd_response *r, const char *name);
void optd_response_free(optd_response *r);

/* Fills err from a response: status, and the problem+json members when the
 * body is one. */
void optd_error_from_response(const optd_response *r, optd_error *err);

/* The family of err's status in the words every optd client uses:
 * "invalid_request", "unauthorized", "not_found", "conflict",
 * "stale_gradient" (409 on base_step), "unprocessable", "unavailable",
 * "round_timeout", "server_error", "connection_failed" (status 0), or
 * "digest_mismatch" (OPTD_ERROR_DIGEST_MISMATCH).
 * A static string. */
const char *optd_error_kind(const optd_error *err);

#ifdef __cplusplus
}
#endif

#endif /* OPTD_CLIENT_H */
