/*
 * storage.h -- optd's SQLite store: sessions, state checkpoints, the step
 * log, idempotency keys.  Knows nothing of HTTP.
 *
 * Model (docs/storage.md): a session's full state (params, optimizer
 * buffers, counters) is written as a checkpoint now and then; every update
 * in between appends one row to the step log carrying what is needed to
 * replay it (the gradient actually applied, its lr factor, loss, ...).
 * Recovery = last checkpoint + replay of the log rows after it.  A log row
 * and its idempotency key are written in one transaction.
 *
 * One storage handle is shared by every thread; calls are serialised by an
 * internal mutex.  Functions return 0 or a negative STORAGE_E* code.
 */
#ifndef STORAGE_H
#define STORAGE_H

#include <stddef.h>
#include <stdint.h>

#define STORAGE_OK 0
#define STORAGE_ENOTFOUND (-1)
#define STORAGE_EEXIST (-2)
#define STORAGE_EIO (-3)      /* SQLite failed: disk full, I/O error, ... */
#define STORAGE_ECORRUPT (-4) /* unexpected content                       */
#define STORAGE_ENOMEM (-5)

typedef struct storage storage;

typedef enum { STORAGE_SYNC_NORMAL = 0, STORAGE_SYNC_FULL = 1 } storage_durability;

/* Opens (creating and migrating) the database at path.  On failure *errmsg
 * (if given) receives a new string; caller frees. */
int storage_open(const char *path, storage_durability d, storage **out, char **errmsg);
void storage_close(storage *st);
/* The last SQLite error text of this handle (valid until the next call). */
const char *storage_errmsg(storage *st);
/* PRAGMA integrity_check == "ok" */
int storage_integrity_ok(storage *st);

/* Log row kinds. */
enum {
    STORAGE_LOG_STEP = 0,   /* an applied update                          */
    STORAGE_LOG_ACCUM = 1,  /* a micro-batch gradient added to the pending
                               accumulation (answered 202)                */
    STORAGE_LOG_SKIP = 2    /* a non-finite gradient skipped (nonfinite=skip) */
};

typedef struct {
    int64_t seq;            /* log sequence number within the session (1, 2, ...) */
    int kind;               /* STORAGE_LOG_*                                */
    int64_t step;           /* session step after this row                  */
    int64_t time_ms;
    double lr;              /* lr used (NAN when not applied)               */
    double factor;          /* lr factor (stale damping), 1 otherwise       */
    double loss;            /* NAN when not reported                        */
    double grad_norm;       /* before clipping                              */
    double update_norm;
    const void *grad;       /* the gradient to replay; NULL in history rows */
    size_t grad_len;        /* bytes                                        */
    const char *idem_key;   /* NULL when none                               */
    const char *const *more_keys; /* further keys of the same update (a
                                     synchronous round), n_more_keys of them */
    size_t n_more_keys;
    const char *worker;     /* NULL when none                               */
} storage_log_entry;

/* ------------------------------------------------------------ sessions */

typedef struct {
    int64_t id;             /* storage's id; changes when a name is re-created */
    char *name;
    char *config;           /* canonical JSON config                         */
    int64_t created_ms;
    int64_t updated_ms;
    int64_t step;           /* step of the newest row or checkpoint          */
} storage_session_info;

void storage_session_info_free(storage_session_info *info);

/* Creates the session with its step-0 checkpoint, in one transaction.
 * STORAGE_EEXIST if the name exists (*id_out is then left alone). */
int storage_session_create(storage *st, const char *name, const char *config,
                           int64_t now_ms, const void *ckpt, size_t ckpt_len,
                           int64_t *id_out);

/* Fills info (new strings; free with storage_session_info_free). */
int storage_session_get(storage *st, const char *name, storage_session_info *info);

/* Up to limit sessions with name > after (NULL: from the start), by name.
 * Returns the number written to infos (each to be freed) or an error. */
int storage_session_list(storage *st, const char *after, int limit,
                         storage_session_info *infos);

int storage_session_delete(storage *st, const char *name);

/* In one read transaction: calls ckpt with the checkpoint (the blob is
 * valid during the call), then replay for each log row after it, in order.
 * A callback returning non-zero stops the load with that value. */
typedef int (*storage_replay_fn)(void *ud, const storage_log_entry *e);
typedef int (*storage_ckpt_fn)(void *ud, const void *blob, size_t len, int64_t seq);
int storage_session_load(storage *st, int64_t id, storage_ckpt_fn ckpt,
                         storage_replay_fn replay, void *ud);

/* ------------------------------------------------------- step log */

/* Appends one log row (and its idempotency key) in one transaction.  If
 * ckpt is given, the same transaction also replaces the checkpoint with
 * ckpt (the state *after* this row) and drops the replay data of every row
 * it covers.  e->seq must be the next sequence number. */
int storage_append(storage *st, int64_t id, const storage_log_entry *e,
                   const void *ckpt, size_t ckpt_len);

/* Replaces the checkpoint (state after log row ckpt_seq) and optionally the
 * config (NULL keeps it), dropping the replay data it covers. */
int storage_checkpoint(storage *st, int64_t id, const char *config,
                       const void *ckpt, size_t ckpt_len, int64_t ckpt_seq,
                       int64_t step, int64_t now_ms);

/* The step recorded with this idempotency key, the lr that update used
 * (NAN when the key's request applied no update, e.g. an accumulation) and
 * the log row's kind (STORAGE_LOG_*).  lr and kind may be NULL. */
int storage_idem_lookup(storage *st, int64_t id, const char *key, int64_t *step, double *lr,
                        int *kind);

/* Drops idempotency keys older than min_ms that are not among the newest
 * keep keys of the session. */
int storage_idem_prune(storage *st, int64_t id, int64_t min_ms, int64_t keep);

/* History rows (no gradients) with step > after, oldest first, at most limit;
 * calls fn for each. */
int storage_history(storage *st, int64_t id, int64_t after, int limit,
                    storage_replay_fn fn, void *ud);

#endif /* STORAGE_H */
