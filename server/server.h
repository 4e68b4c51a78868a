/*
 * server.h -- the daemon's internals: configuration, sessions (the step
 * engine: clip, schedule, kernel, log, checkpoint, replay), the registry of
 * hot sessions, and the HTTP handlers.
 */
#ifndef SERVER_H
#define SERVER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "api/api.h"
#include "optim/optim.h"
#include "storage/storage.h"

/* ------------------------------------------------------------- config */

enum { SRV_LOG_ERROR = 0, SRV_LOG_WARN, SRV_LOG_INFO, SRV_LOG_DEBUG };

typedef struct {
    char bind[64];
    int port;
    char db[1024];
    int threads;
    size_t max_body_mb;
    size_t max_params;
    size_t cache_mb;
    int durability;         /* STORAGE_SYNC_* */
    char api_key[256];      /* "" = none */
    int log_level;
    char check_health[512]; /* --check-health URL: probe and exit */
    size_t max_connections;        /* open connections in all               */
    size_t max_connections_per_ip; /* open connections from one address     */
    size_t idle_timeout_s;         /* a connection idle this long is closed */
} srv_config;

/* Parses OPTD_* environment variables, then argv (flags win).  Returns 0,
 * 1 when it printed --help/--version (exit 0), or -1 after printing the
 * error (exit 2). */
int srv_config_parse(srv_config *c, int argc, char **argv);

void srv_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
extern int srv_log_level;
int64_t srv_now_ms(void);

/* ------------------------------------------------------------ session */

typedef struct srv_session srv_session;
typedef struct srv_waiter srv_waiter;

/* A request waiting for its synchronous round to close.  Lives in the
 * HTTP layer's per-connection context; linked into the session's round
 * while suspended, answered (reply filled, done set) before it is resumed. */
struct srv_waiter {
    srv_waiter *next;
    void *conn;                 /* the suspended MHD connection              */
    api_reply reply;
    bool done;
    bool want_binary;
    bool with_params;
    char worker[API_WORKER_MAX + 1];
    char key[API_IDEM_MAX + 1]; /* "" when none                              */
};

struct srv_session {
    char name[API_NAME_MAX + 1];
    int64_t id;                 /* storage id                                  */
    api_config cfg;
    optim_state st;
    optim_plateau plateau;
    void *params;
    void *accum;                /* pending accumulation (mode.accumulate > 1)  */
    int64_t accum_count;
    void *scratch;              /* gradient work copy                          */
    void *snap;                 /* params before the update (update norm)      */
    int64_t seq;                /* last log row                                */
    size_t log_bytes;           /* replay bytes logged since the checkpoint    */
    int64_t created_ms, updated_ms;
    double last_lr;
    double last_loss;
    int64_t n_applied, n_stale, n_timeout, n_skipped;

    /* the open synchronous round (mode sync); not persisted: nothing in it
     * has been acknowledged */
    void *round_sum;            /* sum of the round's gradients              */
    int64_t round_count;        /* gradients received                        */
    int64_t round_step;         /* the step the round is for                 */
    int64_t round_deadline_ms;
    double round_loss_sum;
    int64_t round_loss_n;
    char (*round_workers)[API_WORKER_MAX + 1];
    char (*round_keys)[API_IDEM_MAX + 1];
    srv_waiter *waiters;
    bool round_listed;          /* on the reaper's list                       */
    srv_session *round_next;

    /* registry bookkeeping (registry lock) */
    pthread_mutex_t mu;         /* serialises every operation on the session  */
    int refs;
    size_t acct_bytes;          /* bytes counted against --cache-mb         */
    bool dead;                  /* removed from the registry; reload to use    */
    srv_session *hnext;         /* hash chain                                  */
    srv_session *lru_prev, *lru_next;
};

size_t srv_session_bytes(const srv_session *s);

/* Creates an in-memory session at step 0 from cfg (deep-copied) and params
 * (copied; NULL: filled per init).  Returns NULL when out of memory. */
srv_session *srv_session_new(const char *name, const api_config *cfg, const void *params,
                             const api_init *init);
void srv_session_free(srv_session *s);

/* The full state as a checkpoint blob; new buffer, caller frees. */
void *srv_session_checkpoint(const srv_session *s, size_t *len);
/* Rebuilds a session from its stored config, checkpoint and log. */
int srv_session_load(storage *db, const storage_session_info *info, srv_session **out);

/* The lr the next update would use. */
double srv_session_next_lr(const srv_session *s);

/* Outcome of feeding one gradient. */
typedef struct {
    int kind;                   /* STORAGE_LOG_STEP / ACCUM / SKIP             */
    double lr;
    double grad_norm;
    double update_norm;
} srv_apply_result;

/* Feeds one gradient (n elements of the session's dtype) through the
 * pipeline: non-finite policy, accumulation, clipping, schedule, kernel.
 * The live path and replay both call this, so replay is bit-identical.
 * factor scales this update's lr (stale damping).  Never fails. */
void srv_session_apply(srv_session *s, const void *grad, double loss, double factor,
                       srv_apply_result *res);

/* Makes the buffers this config needs exist (after PATCH). 0 or -1 (OOM). */
int srv_session_ensure_buffers(srv_session *s);

/* ----------------------------------------------------------- registry */

typedef struct srv_registry srv_registry;

srv_registry *srv_registry_new(storage *db, size_t cache_bytes);
/* Checkpoints every hot session that has log rows since its checkpoint,
 * then frees everything. */
void srv_registry_free(srv_registry *r);

/* Finds (loading from storage when cold) and locks the session.  Returns 0,
 * STORAGE_ENOTFOUND, or another STORAGE_E* code. */
int srv_registry_acquire(srv_registry *r, const char *name, srv_session **out);
/* Unlocks and releases; may evict cold sessions. */
void srv_registry_release(srv_registry *r, srv_session *s);
/* Marks a locked, acquired session dead (deleted or failed write): the next
 * acquire reloads from storage. */
void srv_registry_drop(srv_registry *r, srv_session *s);
/* Extra references (an open synchronous round, the reaper). */
void srv_registry_hold(srv_registry *r, srv_session *s);
void srv_registry_unhold(srv_registry *r, srv_session *s);
/* Inserts a freshly created session (not locked). */
void srv_registry_insert(srv_registry *r, srv_session *s);
storage *srv_registry_storage(srv_registry *r);
size_t srv_registry_hot_count(srv_registry *r);

/* ----------------------------------------------------------- handlers */

typedef struct srv_sync srv_sync;

typedef struct {
    srv_registry *reg;
    storage *db;
    const srv_config *cfg;
    srv_sync *sync;
    void (*suspend)(void *conn); /* parks the connection of this request    */
    void (*resume)(void *conn); /* resumes a suspended connection           */
} srv_ctx;

/* Returned by a handler that parked its request (a synchronous round). */
#define SRV_SUSPENDED 1

/* What a handler gets from the HTTP layer. */
typedef struct {
    const api_route *route;
    const char *name;
    const char *body;           /* aligned to 64 bytes when body_len > 0, so a
                                   binary vector can be read in place; NUL
                                   after body_len                              */
    size_t body_len;
    long long content_length;   /* announced before the body was read (equal
                                   to body_len); -1: chunked, length unknown  */
    bool body_binary;           /* Content-Type application/octet-stream       */
    bool want_binary;           /* Accept chose application/octet-stream       */
    const char *(*header)(void *conn, const char *name);
    const char *(*query)(void *conn, const char *name);
    void *conn;
    srv_waiter *waiter;         /* where a parked request's answer goes      */
} srv_request;

int srv_handle(srv_ctx *ctx, const srv_request *req, api_reply *reply);

/* Shared by the step paths (handlers.c, sync.c). */
int srv_reply_params(api_reply *r, int status, const srv_session *s, bool want_binary,
                     double lr, bool with_lr, bool with_params);
int srv_storage_fail(api_reply *r, storage *db, int err, const char *what);
int srv_commit_update(srv_ctx *ctx, srv_session *s, const void *grad, double loss, double factor,
                      const char *key, const char *const *more_keys, size_t n_more_keys,
                      const char *worker, srv_apply_result *res, api_reply *r);

/* ------------------------------------------------------- sync rounds */

srv_sync *srv_sync_new(srv_ctx *ctx);
/* Answers every waiter 503 and stops the reaper. */
void srv_sync_shutdown(srv_sync *sy);
void srv_sync_free(srv_sync *sy);
/* A gradient for the session's open round (session locked).  Returns an
 * HTTP status with the reply filled, or SRV_SUSPENDED when req->waiter was
 * parked until the round closes. */
int srv_sync_submit(srv_ctx *ctx, srv_session *s, const srv_request *req, const void *grad,
                    const api_step_meta *meta, const char *key, bool with_params,
                    api_reply *r);
/* Drops an open round (PATCH of the mode, DELETE): its waiters get status. */
void srv_sync_abort(srv_ctx *ctx, srv_session *s, int status, const char *why);

/* --------------------------------------------------------------- http */

int srv_http_run(srv_ctx *ctx);

#endif /* SERVER_H */
