/*
 * storage.h -- optd's store: SQLite for metadata, the step log's small
 * columns, idempotency keys and references; large vectors (logged
 * gradients, checkpoints) in files beside the database (<db>.d/), written
 * without copies from the caller's buffers.  Knows nothing of HTTP.
 *
 * Model (docs/storage.md): a session's full state (params, optimizer
 * buffers, counters) is written as a checkpoint now and then; every update
 * in between appends one log row carrying what is needed to replay it (the
 * gradient actually applied, its lr factor, loss, ...).  Recovery = the
 * newest checkpoint + replay of the log rows after it.  A log row and its
 * idempotency keys are committed in one SQLite transaction; a gradient's
 * bytes reach their segment file before the row that references them
 * (fdatasync first under STORAGE_SYNC_FULL); recovery ignores unreferenced
 * tails.  Every stored vector carries a checksum, verified when read: a
 * damaged one is STORAGE_ECORRUPT, never served.
 *
 * Threads: every function may be called from any thread.  Appends of
 * different sessions arriving together share one SQLite commit (group
 * commit) without delaying a lone append.  Calls for one session are
 * serialised by the caller (the session lock).
 *
 * Errors: functions return 0 or a negative STORAGE_E* code; the text of the
 * calling thread's last failure is storage_last_error() (thread-local, so
 * it is valid after any lock is released).
 */
#ifndef STORAGE_H
#define STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STORAGE_OK 0
#define STORAGE_ENOTFOUND (-1)
#define STORAGE_EEXIST (-2)
#define STORAGE_EIO (-3)      /* an I/O error (the message names it)      */
#define STORAGE_ECORRUPT (-4) /* a checksum or format check failed        */
#define STORAGE_ENOMEM (-5)
#define STORAGE_EFULL (-6)    /* the disk is full (ENOSPC, SQLITE_FULL)   */
#define STORAGE_EGONE (-7)    /* the database file was deleted or replaced
                                 under the daemon: no write is acknowledged
                                 any more                                 */
#define STORAGE_ELOCKED (-8)  /* another process holds the database       */
#define STORAGE_EFOREIGN (-9) /* not an optd database (application_id), or
                                 a newer schema                           */
#define STORAGE_EMISMATCH (-10) /* idempotency key reused with another body */
#define STORAGE_ERANGE (-11)  /* a step outside the kept history (never
                                 logged, rolled back, or compacted)      */

typedef struct storage storage;

typedef enum { STORAGE_SYNC_NORMAL = 0, STORAGE_SYNC_FULL = 1 } storage_durability;

/* The calling thread's last error text ("" when none). */
const char *storage_last_error(void);
/* A short name for a code ("disk full", "I/O error", ...). */
const char *storage_strerror(int err);

/* Opens (creating and migrating) the database at path and takes an
 * exclusive lock held until storage_close (a second daemon gets
 * STORAGE_ELOCKED and a message naming the other process's pid when it can
 * be known).  A 0-byte or missing file becomes a new optd database; a
 * foreign SQLite file is STORAGE_EFOREIGN.  On failure the message is
 * storage_last_error(). */
int storage_open(const char *path, storage_durability d, storage **out);
void storage_close(storage *st);
/* PRAGMA integrity_check == "ok" (and the files it references exist). */
int storage_integrity_ok(storage *st);

/* Offline check of a whole database (optd check --db FILE): SQLite's
 * integrity_check, every checkpoint's and logged gradient's checksum, every
 * reference.  Prints one line per problem to out (a FILE *), returns the
 * number of problems, or a negative STORAGE_E* when it cannot open it. */
int storage_check(const char *path, void *out);

/* A piece of a vector write: storage writes the pieces in order, without
 * copying them into one buffer first. */
typedef struct {
    const void *base;
    size_t len;
} storage_iov;

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
    const void *extra;      /* opaque replay inputs beside the gradient
                               (per-group lr, absent tensors, ...); NULL   */
    size_t extra_len;
    const char *idem_key;   /* NULL when none                               */
    uint64_t idem_fp;       /* fingerprint of the keyed request's body      */
    const char *const *more_keys; /* further keys of the same update (a
                                     synchronous round), n_more_keys of them */
    const uint64_t *more_fps;     /* their fingerprints                      */
    size_t n_more_keys;
    const char *worker;     /* NULL when none                               */
} storage_log_entry;

/* ------------------------------------------------------------ sessions */

typedef struct {
    int64_t id;             /* storage's id; changes when a name is re-created */
    char *name;
    char *config;           /* canonical JSON config                         */
    int64_t created_ms;
    int64_t updated_ms;     /* time of the last change (step, PATCH, ...)    */
    int64_t step;           /* step of the newest row or checkpoint          */
    char *created_by;       /* token id, "admin", or NULL (auth off, or made
                               before optd recorded it)                      */
} storage_session_info;

void storage_session_info_free(storage_session_info *info);

/* Creates the session with its step-0 checkpoint (the pieces of ckpt), in
 * one transaction.  STORAGE_EEXIST if the name exists. */
int storage_session_create(storage *st, const char *name, const char *config,
                           int64_t now_ms, const storage_iov *ckpt, int n_ckpt,
                           int64_t *id_out);

/* The same for a session whose first state is at step (a fork, an
 * import). */
int storage_session_create_at(storage *st, const char *name, const char *config, int64_t now_ms,
                              const storage_iov *ckpt, int n_ckpt, int64_t step,
                              int64_t *id_out);

/* The same, recording who created it (owner: a token id or "admin"; NULL
 * when none) and its size in params (the token quotas count them). */
int storage_session_create_owned(storage *st, const char *name, const char *config,
                                 int64_t now_ms, const storage_iov *ckpt, int n_ckpt,
                                 int64_t step, const char *owner, int64_t params,
                                 int64_t *id_out);

/* Renames a session (a fork or import made under a temporary name starting
 * with '~' becomes visible in one commit; storage_open deletes sessions
 * left with such a name by a crash).  STORAGE_EEXIST if name is taken. */
int storage_session_rename(storage *st, int64_t id, const char *name);

/* Fills info (new strings; free with storage_session_info_free). */
int storage_session_get(storage *st, const char *name, storage_session_info *info);

/* Up to limit sessions with name > after (NULL: from the start), by name.
 * Returns the number written to infos (each to be freed) or an error. */
int storage_session_list(storage *st, const char *after, int limit,
                         storage_session_info *infos);

/* storage_session_list over the names that start with prefix only. */
int storage_session_list_prefix(storage *st, const char *prefix, const char *after, int limit,
                                storage_session_info *infos);

/* Sessions created by owner and their params in all. */
int storage_owner_usage(storage *st, const char *owner, int64_t *sessions, int64_t *params);

int storage_session_delete(storage *st, const char *name);

/* ------------------------------------------------------------- tokens
 *
 * Bearer tokens (server/auth.c).  The table keeps a keyed hash of each
 * secret, never the secret; the key is not in the database. */
#define STORAGE_TOKEN_HASH 32

typedef struct {
    const char *id;
    const unsigned char *hash;  /* STORAGE_TOKEN_HASH bytes                  */
    const char *scope;          /* "read", "step" or "admin"                  */
    const char *prefix;         /* session-name prefix ("" = every name)      */
    const char *label;          /* NULL when none                             */
    int64_t created_ms;
    int64_t expires_ms;         /* 0: never                                   */
    int64_t revoked_ms;         /* 0: not revoked                             */
    int64_t max_sessions;       /* 0: no quota                                */
    int64_t max_params;         /* 0: no quota                                */
    double steps_per_second;    /* 0: no rate limit                           */
    double burst;
} storage_token;

/* Inserts a token (STORAGE_EEXIST when its id is taken). */
int storage_token_put(storage *st, const storage_token *t);
/* Marks it revoked at now_ms (kept: sessions name it as their creator);
 * STORAGE_ENOTFOUND when no such id. */
int storage_token_revoke(storage *st, const char *id, int64_t now_ms);
/* Calls fn for every token, oldest first; the strings are valid during the
 * call.  A non-zero return stops the walk with that value. */
typedef int (*storage_token_fn)(void *ud, const storage_token *t);
int storage_token_each(storage *st, storage_token_fn fn, void *ud);

/* Loading: the newest checkpoint, then every log row after it, in order.
 * ckpt is called with a reader over the checkpoint's bytes (len of them);
 * it pulls them with storage_read into its own buffers.  The checksum is
 * verified when the callback returns (a mismatch: STORAGE_ECORRUPT).
 * replay is called for each later row, e->grad pointing at the row's
 * verified gradient (valid during the call).  A callback returning
 * non-zero stops the load with that value. */
typedef struct storage_reader storage_reader;
int storage_read(storage_reader *r, void *dst, size_t n);

typedef int (*storage_replay_fn)(void *ud, const storage_log_entry *e);
typedef int (*storage_ckpt_fn)(void *ud, storage_reader *r, size_t len, int64_t seq);
int storage_session_load(storage *st, int64_t id, storage_ckpt_fn ckpt,
                         storage_replay_fn replay, void *ud);

/* The same as of log row upto: the newest checkpoint at or before it and
 * the rows after it up to upto.  *config (when not NULL) is a new string
 * of the config that checkpoint was taken under, or NULL when it was
 * written before optd recorded that (then the session's current one). */
int storage_session_load_at(storage *st, int64_t id, int64_t upto, storage_ckpt_fn ckpt,
                            storage_replay_fn replay, void *ud, char **config);

/* The log row (seq) after which the session was at step, and the config
 * of the nearest kept checkpoint at or before it (a new string, or NULL
 * when it predates that record).  STORAGE_ERANGE when either is missing.
 * With step < 0, *seq is the given row. */
int storage_locate(storage *st, int64_t id, int64_t step, int64_t *seq, char **config);

/* Calls fn for each log row with after < seq <= upto, in order, with its
 * verified gradient; reads in batches (bounded memory).  A row whose
 * replay data is gone (compacted) is STORAGE_ERANGE. */
int storage_log_read(storage *st, int64_t id, int64_t after, int64_t upto, storage_replay_fn fn,
                     void *ud);

/* ------------------------------------------------- kept checkpoints
 *
 * Every checkpoint row says what it is.  A new checkpoint keeps every
 * labelled one, the `keep` newest periodic ones, and the anchors from the
 * oldest of those on; automatic ones go once superseded.  The log's replay
 * data is kept back to the oldest checkpoint left and dropped behind it. */
enum {
    STORAGE_CKPT_AUTO = 0,     /* written to bound the log (or at eviction) */
    STORAGE_CKPT_ANCHOR = 1,   /* a state no replay rebuilds: create, PATCH,
                                  PUT params/state, fork, import           */
    STORAGE_CKPT_PERIODIC = 2, /* the retention policy's every_steps        */
    STORAGE_CKPT_LABEL = 3     /* asked for by name; kept until rolled back
                                  past or the session goes                 */
};

typedef struct {
    int kind;                  /* STORAGE_CKPT_*                             */
    const char *label;         /* NULL when none                             */
    const char *config;        /* canonical config in force, or NULL         */
    int64_t keep;              /* periodic checkpoints to keep (0: none)     */
} storage_ckpt_meta;

typedef struct {
    int64_t seq, step, time_ms, bytes;
    int kind;
    const char *label;         /* NULL when none; valid during the call      */
} storage_ckpt_info;
typedef int (*storage_ckpt_list_fn)(void *ud, const storage_ckpt_info *c);

/* The step of the checkpoint labelled label, or STORAGE_ENOTFOUND (or
 * another negative code). */
int64_t storage_ckpt_step(storage *st, int64_t id, const char *label);

/* Calls fn for each of the session's checkpoints, oldest first. */
int storage_ckpt_list(storage *st, int64_t id, storage_ckpt_list_fn fn, void *ud);

/* storage_append / storage_checkpoint with the checkpoint's meta (NULL:
 * automatic, keep 0).  A label already used is STORAGE_EEXIST. */
int storage_append_kept(storage *st, int64_t id, const storage_log_entry *e,
                        const storage_iov *ckpt, int n_ckpt, const storage_ckpt_meta *m);
int storage_checkpoint_kept(storage *st, int64_t id, const char *config, const storage_iov *ckpt,
                            int n_ckpt, int64_t ckpt_seq, int64_t step, int64_t now_ms,
                            const storage_ckpt_meta *m);

/* Returns the session to the state after step: the log rows, checkpoints
 * and idempotency keys after that step's row go, in one commit; the
 * nearest kept checkpoint at or before it, and its config, stay (a load
 * then replays to it).  *seq gets the row's seq.  STORAGE_ERANGE when no
 * kept checkpoint lies at or before it or no row has that step. */
int storage_rollback(storage *st, int64_t id, int64_t step, int64_t now_ms, int64_t *seq);

/* ------------------------------------------------------- step log */

/* Appends one log row (and its idempotency keys) in one transaction,
 * possibly shared with other sessions' appends.  If ckpt is given (n_ckpt >
 * 0), the same commit also makes it the session's newest checkpoint (the
 * state *after* this row; the row then needs no gradient bytes) and the
 * log's replay data behind it may be dropped.  e->seq must be the next
 * sequence number.  On an error nothing of it is visible after a reload. */
int storage_append(storage *st, int64_t id, const storage_log_entry *e,
                   const storage_iov *ckpt, int n_ckpt);

/* Writes a checkpoint (state after log row ckpt_seq) and optionally the
 * config (NULL keeps it), in one commit. */
int storage_checkpoint(storage *st, int64_t id, const char *config,
                       const storage_iov *ckpt, int n_ckpt, int64_t ckpt_seq,
                       int64_t step, int64_t now_ms);

/* The step recorded with this idempotency key, the lr that update used
 * (NAN when the key's request applied no update, e.g. an accumulation), the
 * log row's kind (STORAGE_LOG_*) and the request's fingerprint.  Any output
 * may be NULL. */
int storage_idem_lookup(storage *st, int64_t id, const char *key, int64_t *step, double *lr,
                        int *kind, uint64_t *fp);

/* Drops idempotency keys older than min_ms that are not among the newest
 * keep keys of the session. */
int storage_idem_prune(storage *st, int64_t id, int64_t min_ms, int64_t keep);

/* History rows (no gradients) with step > after, oldest first, at most limit;
 * calls fn for each. */
int storage_history(storage *st, int64_t id, int64_t after, int limit,
                    storage_replay_fn fn, void *ud);

/* Online backup (optd backup): copies the database at path, while a
 * daemon may be serving it, to out (a new file) and the vector files its
 * rows reference to out.d/ -- one consistent snapshot: SQLite's backup API
 * inside one read transaction, whose referenced files are all opened
 * before the copy (a file superseded and removed meanwhile stays readable
 * through its descriptor; one removed before it could be opened restarts
 * with a newer snapshot).  out appears last (renamed from out.tmp).
 * *bytes (may be NULL) gets the bytes written. */
int storage_backup(const char *path, const char *out, int64_t *bytes);

/* zlib's CRC-32 of n bytes, continuing from crc (0 to start): the checksum
 * of every stored vector, and the params digest on the wire (every client
 * language has it: Python zlib.crc32, Go hash/crc32, Node zlib.crc32). */
uint32_t storage_crc32(uint32_t crc, const void *p, size_t n);

/* ------------------------------------------------- fault injection */

/* Counters of the file operations storage made (its own and, when the
 * shim VFS is on, SQLite's) since the process started, while injection or
 * counting was on. */
typedef struct {
    uint64_t reads, writes, syncs, truncates;
    uint64_t injected; /* operations failed on purpose */
} storage_fault_counts;

/* Sets fault injection (docs/storage.md, "Fault injection"):
 * "op:N:ERR[:persist]" fails the Nth op (read, write, sync, truncate, any)
 * from now on with ERR (EIO or ENOSPC), once or from then on; "count" only
 * counts; NULL or "" turns it off.  The environment's OPTD_FAULT and
 * OPTD_FAULT_COUNT_SYNCS=1 do the same at the first storage_open.  A
 * database uses the shim VFS when it was opened while this was on.
 * Returns -1 for a malformed spec. */
int storage_fault_config(const char *spec);
void storage_fault_stats(storage_fault_counts *out);

#endif /* STORAGE_H */
