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
#include "server/auth.h"
#include "server/engine.h"
#include "storage/storage.h"

/* ------------------------------------------------------------- config */

enum { SRV_LOG_ERROR = 0, SRV_LOG_WARN, SRV_LOG_INFO, SRV_LOG_DEBUG };

typedef struct {
    char bind[64];
    int port;
    char db[1024];
    int threads;
    int kernel_threads;     /* 0 = the number of cores */
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
    char access_log[1024];         /* --access-log FILE: JSON lines; "" none */
    char metrics_token[256];       /* /metrics token ("": --api-key's rule)  */
    char token_key[1024];          /* --token-key FILE ("": <db>.token-key)  */
    size_t metrics_sessions;       /* sessions with their own series (0: none) */
    char tls_cert[1024];           /* --tls-cert PEM chain; "" = plain HTTP   */
    char tls_key[1024];            /* --tls-key PEM private key               */
    char tls_client_ca[1024];      /* --tls-client-ca: mutual TLS; "" = none  */
    char cors_origin[2048];        /* --cors-origin: "", "*" or origin,origin */
} srv_config;

/* Parses OPTD_* environment variables, then argv (flags win).  Returns 0,
 * 1 when it printed --help/--version (exit 0), or -1 after printing the
 * error (exit 2). */
int srv_config_parse(srv_config *c, int argc, char **argv);

void srv_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
extern int srv_log_level;
int64_t srv_now_ms(void);

/* ----------------------------------------------------------- registry */

typedef struct srv_registry srv_registry;

srv_registry *srv_registry_new(storage *db, eng_pool *pool, size_t cache_bytes);
/* Checkpoints every hot session that has log rows since its checkpoint,
 * then frees everything. */
void srv_registry_free(srv_registry *r);

/* Finds (loading from storage when cold) and locks the session.  Returns 0,
 * STORAGE_ENOTFOUND, or another STORAGE_E* code. */
int srv_registry_acquire(srv_registry *r, const char *name, eng_session **out);
/* Unlocks and releases; may evict cold sessions. */
void srv_registry_release(srv_registry *r, eng_session *s);
/* Marks a locked, acquired session dead (deleted or failed write): the next
 * acquire reloads from storage. */
void srv_registry_drop(srv_registry *r, eng_session *s);
/* Extra references (an open synchronous round, the reaper). */
void srv_registry_hold(srv_registry *r, eng_session *s);
void srv_registry_unhold(srv_registry *r, eng_session *s);
/* Inserts a freshly created session (not locked). */
void srv_registry_insert(srv_registry *r, eng_session *s);
storage *srv_registry_storage(srv_registry *r);
/* A session's size and dtype without locking it (hot: from the registry;
 * cold: from its stored config).  ENG_OK or STORAGE_ENOTFOUND, ... */
int srv_registry_vector_shape(srv_registry *r, const char *name, uint64_t *n, optim_dtype *dt);
size_t srv_registry_hot_count(srv_registry *r);

/* ----------------------------------------------------------- handlers */

typedef struct srv_sync srv_sync;

typedef struct {
    srv_registry *reg;
    storage *db;
    eng_pool *pool;
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
    const srv_principal *who;   /* the caller (server/auth.h)                */
} srv_request;

int srv_handle(srv_ctx *ctx, const srv_request *req, api_reply *reply);

/* Shared by the step paths (handlers.c, sync.c). */
/* The params answer: binary in wire form `wire` (an optim_wire) or JSON. */
int srv_reply_params(api_reply *r, int status, const eng_session *s, bool want_binary, int wire,
                     double lr, bool with_lr, bool with_params);
/* Maps an engine error to its problem reply (logged); returns the status. */
int srv_engine_fail(api_reply *r, int err, const char *what);
/* The session document (status 200 or 201). */
int srv_reply_session(api_reply *r, int status, const eng_session *s);

/* travel.c: kept checkpoints, rollback, fork.  srv_fork answers a create
 * whose body has "fork" and returns 0 (nothing done) for any other. */
int srv_h_checkpoints_get(srv_ctx *ctx, const srv_request *req, api_reply *r);
int srv_h_checkpoints_post(srv_ctx *ctx, const srv_request *req, api_reply *r);
int srv_h_rollback(srv_ctx *ctx, const srv_request *req, api_reply *r);
int srv_fork(srv_ctx *ctx, const srv_request *req, api_reply *r);
/* travel_cli.c: optd export / import / backup (argv[1] is the command). */
int srv_travel_main(int argc, char **argv);
int srv_h_export_get(srv_ctx *ctx, const srv_request *req, api_reply *r);
int srv_h_export_put(srv_ctx *ctx, const srv_request *req, api_reply *r);
/* The export file of a session (locked), with its log when with_log; a new
 * buffer.  Used by the route and by `optd export`. */
int srv_export_session(storage *db, eng_pool *pool, eng_session *s, bool with_log, char **body,
                       size_t *len);
/* Creates session name from an export file (created_by and quotas: who's,
 * NULL for none) (its log replayed and checked
 * against the exported head), visible only when complete.  0 and *out (a
 * new session, unlocked, not in a registry) or the problem's status. */
int srv_import_session(storage *db, eng_pool *pool, const char *name, const char *body,
                       size_t len, size_t max_params, const srv_principal *who,
                       eng_session **out, api_reply *r);
/* eng_step, and on a failed commit the session is dropped (memory was
 * ahead of disk: the next request reloads it).  0 or the problem's status. */
int srv_commit_update(srv_ctx *ctx, eng_session *s, const eng_step_in *in, eng_step_out *out,
                      api_reply *r);

/* ------------------------------------------------------- sync rounds */

srv_sync *srv_sync_new(srv_ctx *ctx);
/* Answers every waiter 503 and stops the reaper. */
void srv_sync_shutdown(srv_sync *sy);
void srv_sync_free(srv_sync *sy);
/* A gradient for the session's open round (session locked).  Returns an
 * HTTP status with the reply filled, or SRV_SUSPENDED when req->waiter was
 * parked until the round closes.  fp: the keyed request's fingerprint. */
int srv_sync_submit(srv_ctx *ctx, eng_session *s, const srv_request *req, const void *grad,
                    const api_step_meta *meta, const char *key, uint64_t fp,
                    bool with_params, api_reply *r);
/* Drops an open round (PATCH of the mode, DELETE): its waiters get status. */
void srv_sync_abort(srv_ctx *ctx, eng_session *s, int status, const char *why);

/* ---------------------------------------------------------------- tls */

/* tls.c: the certificate, key and client CA loaded with GnuTLS, served to
 * libmicrohttpd's handshakes and reloaded on SIGHUP. */
typedef struct srv_tls srv_tls;
struct MHD_OptionItem;
/* Loads cfg's --tls-* files.  0 and *out (freed by srv_tls_free), or -1
 * after logging why. */
int srv_tls_open(const srv_config *cfg, srv_tls **out);
/* Loads the files again; new handshakes get them, connections in flight
 * keep theirs.  0, or -1 after logging why (the previous files stay). */
int srv_tls_reload(srv_tls *t);
/* After MHD_stop_daemon (no connection left). */
void srv_tls_free(srv_tls *t);
/* Fills opts (room for 3) with the MHD_OPTION_ARRAY items of an HTTPS
 * daemon, MHD_OPTION_END last; returns the count before the end. */
int srv_tls_mhd_options(srv_tls *t, struct MHD_OptionItem *opts);

/* --------------------------------------------------------------- http */

int srv_http_run(srv_ctx *ctx);

#endif /* SERVER_H */
