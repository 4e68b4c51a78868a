/*
 * storage.c -- optd's store (see storage.h and docs/storage.md).
 *
 * SQLite (WAL) holds sessions, log rows, idempotency keys, checkpoint rows
 * and small vectors inline; a vector larger than INLINE_MAX lives in a file
 * in <db>.d/: logged gradients are appended to the session's segment
 * (s<id>.seg), a checkpoint is written to a new file (k<gen>.ckpt) under a
 * temporary name, synced (FULL), renamed, the directory synced (FULL).
 * The bytes reach their file before the SQLite row that references them is
 * committed; a file no committed row references is garbage that
 * storage_open sweeps.  Every vector carries a CRC-32, verified on read.
 *
 * Writes go through one queue (group commit): the first thread to arrive
 * becomes the leader, takes everything queued, runs each job inside its own
 * savepoint of one transaction, commits once (one fsync under FULL), checks
 * that the database file is still the one it opened, and wakes the others
 * with their own results.  A lone write is never delayed.  Large vector I/O
 * happens in the caller's thread before it queues, outside every lock.
 *
 * Locks, in order: q_mu (the queue) is never held while taking db_mu;
 * db_mu guards the connection (the leader holds it for a group, readers
 * for one query or a load's read transaction).
 */
#define _GNU_SOURCE
#include "storage/internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define SCHEMA_VERSION 6
#define OPTD_APPLICATION_ID 0x6f707464 /* "optd" */
/* Vectors up to this size stay inline in SQLite: a small step costs one
 * commit (bench/storage.c; docs/storage.md has the figures). */
#define INLINE_MAX ((size_t)256 * 1024)

enum {
    Q_BEGIN,
    Q_BEGIN_READ,
    Q_COMMIT,
    Q_ROLLBACK,
    Q_SAVEPOINT,
    Q_RELEASE,
    Q_ROLLBACK_TO,
    Q_SESSION_INSERT,
    Q_SESSION_GET,
    Q_SESSION_LIST,
    Q_SESSION_LIST_AFTER,
    Q_SESSION_ID,
    Q_SESSION_DELETE,
    Q_SESSION_TOUCH,
    Q_SESSION_SET_CONFIG,
    Q_CKPT_NEWEST,
    Q_CKPT_FILES,
    Q_CKPT_INSERT,
    Q_CKPT_OLDEST,
    Q_CKPT_DOOMED_FILES,
    Q_CKPT_PRUNE,
    Q_CKPT_FILES_AFTER,
    Q_CKPT_DELETE_AFTER,
    Q_CKPT_LIST,
    Q_CKPT_STEP_SEQ,
    Q_LOG_STEP_SEQ,
    Q_LOG_DROP_FILES,
    Q_LOG_FILES_AFTER,
    Q_LOG_DELETE_AFTER,
    Q_FILE_USED,
    Q_IDEM_DELETE_AFTER,
    Q_SESSION_RENAME,
    Q_CKPT_AT,
    Q_CKPT_LABEL_STEP,
    Q_LOG_AFTER,
    Q_LOG_INSERT,
    Q_LOG_DROP_GRAD,
    Q_LOG_DROP_ROWS,
    Q_IDEM_INSERT,
    Q_IDEM_GET,
    Q_IDEM_PRUNE,
    Q_HISTORY,
    Q_COUNT
};

#define INFO_COLS                                                                         \
    "SELECT s.id, s.name, s.config, s.created_ms,"                                        \
    " MAX(s.updated_ms, COALESCE((SELECT time_ms FROM steps WHERE session_id = s.id"      \
    "                             ORDER BY seq DESC LIMIT 1), 0)),"                       \
    " COALESCE((SELECT step FROM steps WHERE session_id = s.id ORDER BY seq DESC LIMIT 1)," \
    "          (SELECT step FROM checkpoints WHERE session_id = s.id"                     \
    "           ORDER BY seq DESC LIMIT 1), 0),"                                         \
    " s.created_by"                                                                       \
    " FROM sessions s"

#define TOP_PERIODIC                                                                      \
    "(SELECT seq FROM checkpoints WHERE session_id = ?1 AND kind = 2 ORDER BY seq DESC LIMIT ?3)"
#define DOOMED                                                                            \
    "session_id = ?1 AND seq <> ?2 AND label IS NULL"                                     \
    " AND NOT (kind = 2 AND seq IN " TOP_PERIODIC ")"                                     \
    " AND NOT (kind = 1 AND seq >= (SELECT MIN(seq) FROM checkpoints WHERE session_id = ?1" \
    " AND (seq = ?2 OR label IS NOT NULL OR (kind = 2 AND seq IN " TOP_PERIODIC "))))"
#define OLDEST "(SELECT MIN(seq) FROM checkpoints WHERE session_id = ?1)"

static const char *const sql_text[Q_COUNT] = {
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_BEGIN_READ] = "BEGIN",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SAVEPOINT] = "SAVEPOINT job",
    [Q_RELEASE] = "RELEASE job",
    [Q_ROLLBACK_TO] = "ROLLBACK TO job",
    [Q_SESSION_INSERT] =
        "INSERT INTO sessions(name, config, created_ms, updated_ms, created_by, params)"
        " VALUES (?1, ?2, ?3, ?3, ?4, ?5)",
    [Q_SESSION_GET] = INFO_COLS " WHERE s.name = ?1",
    [Q_SESSION_LIST] = INFO_COLS " ORDER BY s.name LIMIT ?1",
    [Q_SESSION_LIST_AFTER] = INFO_COLS " WHERE s.name > ?2 ORDER BY s.name LIMIT ?1",
    [Q_SESSION_ID] = "SELECT id FROM sessions WHERE name = ?1",
    [Q_SESSION_DELETE] = "DELETE FROM sessions WHERE id = ?1",
    [Q_SESSION_TOUCH] = "UPDATE sessions SET updated_ms = ?2 WHERE id = ?1",
    [Q_SESSION_SET_CONFIG] = "UPDATE sessions SET config = ?2, updated_ms = ?3 WHERE id = ?1",
    [Q_CKPT_NEWEST] = "SELECT seq, len, crc, file, data, config FROM checkpoints"
                      " WHERE session_id = ?1 AND seq <= ?2 ORDER BY seq DESC LIMIT 1",
    [Q_CKPT_FILES] = "SELECT file FROM checkpoints WHERE session_id = ?1 AND file IS NOT NULL",
    [Q_CKPT_INSERT] =
        "INSERT INTO checkpoints(session_id, seq, step, len, crc, file, data, kind, label,"
        " time_ms, config) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        " ON CONFLICT(session_id, seq) DO UPDATE SET step = excluded.step, len = excluded.len,"
        " crc = excluded.crc, file = excluded.file, data = excluded.data,"
        " kind = MAX(kind, excluded.kind), label = COALESCE(excluded.label, label),"
        " time_ms = excluded.time_ms, config = COALESCE(excluded.config, config)",
    [Q_CKPT_OLDEST] = "SELECT COALESCE(MIN(seq), -1) FROM checkpoints WHERE session_id = ?1",
    /* Retention (docs/storage.md, "Kept checkpoints"): a new checkpoint
     * (?2) keeps every labelled one, the ?3 newest periodic ones, and the
     * anchors (states a replay cannot rebuild) from the oldest of those on;
     * automatic ones go once superseded. */
    [Q_CKPT_DOOMED_FILES] = "SELECT file FROM checkpoints WHERE file IS NOT NULL AND " DOOMED,
    [Q_CKPT_PRUNE] = "DELETE FROM checkpoints WHERE " DOOMED,
    [Q_CKPT_FILES_AFTER] = "SELECT file FROM checkpoints WHERE session_id = ?1 AND seq > ?2"
                           " AND file IS NOT NULL",
    [Q_CKPT_DELETE_AFTER] = "DELETE FROM checkpoints WHERE session_id = ?1 AND seq > ?2",
    [Q_CKPT_LIST] = "SELECT seq, step, time_ms, kind, label, len FROM checkpoints"
                    " WHERE session_id = ?1 ORDER BY seq",
    [Q_CKPT_STEP_SEQ] = "SELECT MIN(seq) FROM checkpoints WHERE session_id = ?1 AND step = ?2",
    [Q_LOG_STEP_SEQ] = "SELECT seq FROM steps WHERE session_id = ?1 AND kind = 0 AND step = ?2",
    /* The log keeps its replay data back to the oldest checkpoint; only
     * rows after the previous oldest one (?2) can still hold any. */
    [Q_LOG_DROP_FILES] = "SELECT DISTINCT file FROM steps WHERE session_id = ?1 AND seq > ?2"
                         " AND seq <= " OLDEST " AND file IS NOT NULL",
    [Q_LOG_FILES_AFTER] = "SELECT DISTINCT file FROM steps WHERE session_id = ?1 AND seq > ?2"
                          " AND file IS NOT NULL",
    [Q_LOG_DELETE_AFTER] = "DELETE FROM steps WHERE session_id = ?1 AND seq > ?2",
    /* Rows at or behind the oldest checkpoint hold no file: the scan covers
     * the kept window only, not the whole history. */
    [Q_FILE_USED] = "SELECT 1 FROM steps WHERE session_id = ?1 AND seq > " OLDEST
                    " AND file = ?2 LIMIT 1",
    [Q_IDEM_DELETE_AFTER] =
        "DELETE FROM idem WHERE session_id = ?1 AND (step > ?2 OR (step = ?2 AND kind <> 0))",
    [Q_SESSION_RENAME] = "UPDATE sessions SET name = ?2 WHERE id = ?1",
    [Q_CKPT_LABEL_STEP] = "SELECT step FROM checkpoints WHERE session_id = ?1 AND label = ?2",
    [Q_CKPT_AT] = "SELECT file, label FROM checkpoints WHERE session_id = ?1 AND seq = ?2",
    [Q_LOG_AFTER] =
        "SELECT seq, kind, step, time_ms, lr, factor, loss, grad_norm, update_norm, worker,"
        " grad, crc, len, file, off, extra FROM steps WHERE session_id = ?1 AND seq > ?2"
        " AND seq <= ?3 ORDER BY seq LIMIT ?4",
    [Q_LOG_INSERT] =
        "INSERT INTO steps(session_id, seq, kind, step, time_ms, lr, factor, loss, grad_norm,"
        " update_norm, worker, grad, crc, len, file, off, extra)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    [Q_LOG_DROP_GRAD] =
        "UPDATE steps SET grad = NULL, file = NULL, off = NULL, extra = NULL, crc = NULL"
        " WHERE session_id = ?1 AND seq > ?2 AND seq <= " OLDEST
        " AND (grad IS NOT NULL OR file IS NOT NULL OR extra IS NOT NULL)",
    /* With a retention policy the rows behind the oldest checkpoint go
     * (history included): the file stays bounded. */
    [Q_LOG_DROP_ROWS] = "DELETE FROM steps WHERE session_id = ?1 AND seq < " OLDEST,
    [Q_IDEM_INSERT] = "INSERT OR IGNORE INTO idem(session_id, key, step, time_ms, kind, fp)"
                      " VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    [Q_IDEM_GET] =
        "SELECT i.step, (SELECT lr FROM steps WHERE session_id = i.session_id AND step = i.step"
        "                AND kind = 0), i.kind, i.fp"
        " FROM idem i WHERE i.session_id = ?1 AND i.key = ?2",
    [Q_IDEM_PRUNE] =
        "DELETE FROM idem WHERE session_id = ?1 AND time_ms < ?2 AND key NOT IN"
        " (SELECT key FROM idem WHERE session_id = ?1 ORDER BY time_ms DESC LIMIT ?3)",
    [Q_HISTORY] =
        "SELECT seq, kind, step, time_ms, lr, factor, loss, grad_norm, update_norm, worker"
        " FROM steps WHERE session_id = ?1 AND step > ?2 AND kind = 0 ORDER BY seq LIMIT ?3",
};

/* Forward migrations, one per schema version; index i upgrades i -> i+1. */
static const char *const migrations[] = {
    "CREATE TABLE sessions ("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  name TEXT NOT NULL UNIQUE,"
    "  config TEXT NOT NULL,"
    "  created_ms INTEGER NOT NULL,"
    "  updated_ms INTEGER NOT NULL);"
    "CREATE TABLE checkpoints ("
    "  session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,"
    "  seq INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  data BLOB NOT NULL);"
    "CREATE TABLE steps ("
    "  session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,"
    "  seq INTEGER NOT NULL,"
    "  kind INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  time_ms INTEGER NOT NULL,"
    "  lr REAL, factor REAL, loss REAL, grad_norm REAL, update_norm REAL,"
    "  worker TEXT,"
    "  grad BLOB,"
    "  PRIMARY KEY (session_id, seq)) WITHOUT ROWID;"
    "CREATE TABLE idem ("
    "  session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,"
    "  key TEXT NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  time_ms INTEGER NOT NULL,"
    "  PRIMARY KEY (session_id, key)) WITHOUT ROWID;"
    "CREATE INDEX idem_by_time ON idem(session_id, time_ms);",
    /* 1 -> 2: what the keyed request did (STORAGE_LOG_*), so that a replay
     * of an accumulated gradient answers like the original 202. */
    "ALTER TABLE idem ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;",
    /* 2 -> 3: the keyed request's body fingerprint (a reuse with another
     * body is refused), and a CRC-32 of every stored vector. */
    "ALTER TABLE idem ADD COLUMN fp INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE checkpoints ADD COLUMN crc INTEGER;"
    "ALTER TABLE steps ADD COLUMN crc INTEGER;",
    /* 3 -> 4: large vectors in files beside the database; several
     * checkpoints per session possible (keyed by seq, the newest used). */
    "CREATE TABLE checkpoints4 ("
    "  session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,"
    "  seq INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  len INTEGER NOT NULL,"
    "  crc INTEGER,"
    "  file TEXT,"
    "  data BLOB,"
    "  PRIMARY KEY (session_id, seq)) WITHOUT ROWID;"
    "INSERT INTO checkpoints4 SELECT session_id, seq, step, length(data), crc, NULL, data"
    "  FROM checkpoints;"
    "DROP TABLE checkpoints;"
    "ALTER TABLE checkpoints4 RENAME TO checkpoints;"
    "ALTER TABLE steps ADD COLUMN len INTEGER;"
    "ALTER TABLE steps ADD COLUMN file TEXT;"
    "ALTER TABLE steps ADD COLUMN off INTEGER;"
    "ALTER TABLE steps ADD COLUMN extra BLOB;",
    /* 4 -> 5: kept checkpoints: what each one is (STORAGE_CKPT_*), its
     * label, time and the config it was taken under. */
    "ALTER TABLE checkpoints ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE checkpoints ADD COLUMN label TEXT;"
    "ALTER TABLE checkpoints ADD COLUMN time_ms INTEGER;"
    "ALTER TABLE checkpoints ADD COLUMN config TEXT;"
    "CREATE UNIQUE INDEX checkpoints_label ON checkpoints(session_id, label)"
    "  WHERE label IS NOT NULL;",
    /* 5 -> 6: scoped tokens (only a keyed hash of each secret), and who
     * created each session with its size (the token quotas count them). */
    "ALTER TABLE sessions ADD COLUMN created_by TEXT;"
    "ALTER TABLE sessions ADD COLUMN params INTEGER;"
    "CREATE INDEX sessions_created_by ON sessions(created_by) WHERE created_by IS NOT NULL;"
    "CREATE TABLE tokens ("
    "  id TEXT PRIMARY KEY,"
    "  hash BLOB NOT NULL,"
    "  scope TEXT NOT NULL,"
    "  prefix TEXT NOT NULL,"
    "  label TEXT,"
    "  created_ms INTEGER NOT NULL,"
    "  expires_ms INTEGER,"
    "  revoked_ms INTEGER,"
    "  max_sessions INTEGER,"
    "  max_params INTEGER,"
    "  steps_per_second REAL,"
    "  burst REAL) WITHOUT ROWID;",
};

/* ------------------------------------------------------- write jobs */

enum { J_CREATE, J_APPEND, J_CHECKPOINT, J_DELETE, J_PRUNE, J_ROLLBACK, J_RENAME };

/* A new checkpoint, already in its file (or inline). */
typedef struct {
    bool present;
    int64_t seq, step;
    size_t len;
    uint32_t crc;
    char file[32];     /* "" when inline */
    void *inline_data; /* owned */
    int kind;          /* STORAGE_CKPT_*                         */
    const char *label; /* NULL when none (not owned)             */
    const char *config; /* the config it was taken under, or NULL */
} ckpt_ref;

typedef struct job {
    int kind;
    int64_t id;
    /* inputs */
    const char *name, *config;
    const char *owner;  /* create: created_by, NULL when none */
    int64_t params;     /* create: the session's size */
    int64_t now_ms;
    const storage_log_entry *e;
    ckpt_ref ck;
    bool grad_in_file;
    int64_t grad_off;
    uint32_t grad_crc;
    int64_t min_ms, keep;
    char seg[48];       /* the segment the gradient went to */
    int64_t step;       /* rollback: the step to return to */
    /* outputs */
    int64_t seq;        /* rollback: the log row it returned to */
    int err;
    char msg[512]; /* the failure's text, for the thread that queued it */
    char **old_files; /* files to unlink after the commit (owned) */
    int n_old;
    bool seg_reset; /* the session's next gradient starts a new segment */
    struct job *next;
    bool done;
} job;

struct storage {
    sqlite3 *db;
    pthread_mutex_t db_mu;
    sqlite3_stmt *q[Q_COUNT];
    storage_durability dur;
    char *path, *dir; /* the database, and <db>.d */
    int lock_fd;
    int db_fd;        /* the database file as opened, to notice a replacement */
    dev_t dev;
    ino_t ino;
    atomic_int gone;
    bool wal_trim; /* a write failed for space: truncate the WAL when one succeeds */
    atomic_ullong gen; /* next checkpoint or segment file number */
    /* per session, the segment its gradients go to now: a new one after
     * each checkpoint, so that a segment goes once no kept row uses it */
    pthread_mutex_t seg_mu;
    struct {
        int64_t id;
        unsigned long long gen;
    } *segs;
    size_t n_segs, cap_segs;
    /* the group-commit queue */
    pthread_mutex_t q_mu;
    pthread_cond_t q_cv;
    job *queue, **queue_tail;
    bool leading;
};

struct storage_reader {
    int fd;                    /* -1 when in memory */
    const unsigned char *mem;
    int64_t base;
    size_t off, len;
    uint32_t crc;
    int err;
};

/* ------------------------------------------------------------ errors */

static _Thread_local char last_error[512];

const char *storage_last_error(void)
{
    return last_error;
}

static void clear_error(void)
{
    last_error[0] = '\0';
}

static void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

const char *storage_strerror(int err)
{
    switch (err) {
    case STORAGE_OK: return "ok";
    case STORAGE_ENOTFOUND: return "not found";
    case STORAGE_EEXIST: return "already exists";
    case STORAGE_EIO: return "I/O error";
    case STORAGE_ECORRUPT: return "damaged data";
    case STORAGE_ENOMEM: return "out of memory";
    case STORAGE_EFULL: return "disk full";
    case STORAGE_EGONE: return "database file deleted or replaced";
    case STORAGE_ELOCKED: return "database in use by another process";
    case STORAGE_EFOREIGN: return "not an optd database";
    case STORAGE_EMISMATCH: return "idempotency key reused with another body";
    case STORAGE_ERANGE: return "not in the kept history";
    default: return "unknown storage error";
    }
}

static int rc_to_err(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_DONE:
    case SQLITE_ROW:
        return STORAGE_OK;
    case SQLITE_NOMEM:
        return STORAGE_ENOMEM;
    case SQLITE_CORRUPT:
        return STORAGE_ECORRUPT;
    case SQLITE_NOTADB:
        return STORAGE_EFOREIGN;
    case SQLITE_FULL:
        return STORAGE_EFULL;
    case SQLITE_CONSTRAINT:
        return STORAGE_EEXIST;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return STORAGE_ELOCKED;
    default:
        return STORAGE_EIO;
    }
}

/* Records the connection's error for a failed SQLite call (read at once,
 * under the connection's lock) and returns its code. */
static int sql_fail(sqlite3 *db, int rc)
{
    int err = rc_to_err(rc);
    if (err == STORAGE_OK)
        return err;
    const char *m = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    if (err == STORAGE_EFULL)
        set_error("disk full (SQLite: %s)", m);
    else
        set_error("SQLite: %s (%s)", m, storage_strerror(err));
    return err;
}

/* Records a failed file operation (-errno) on path and returns its code. */
static int io_fail(int neg_errno, const char *what, const char *path)
{
    int e = -neg_errno;
    if (e == ENOSPC || e == EDQUOT || e == EFBIG) {
        set_error("disk full (%s %s: %s)", what, path, strerror(e));
        return STORAGE_EFULL;
    }
    if (e == ENOMEM) {
        set_error("out of memory (%s %s)", what, path);
        return STORAGE_ENOMEM;
    }
    if (e == ENODATA || e == ENOENT) {
        set_error("%s %s: %s (a referenced vector file is missing or short)", what, path,
                  e == ENODATA ? "file too short" : strerror(e));
        return STORAGE_ECORRUPT;
    }
    set_error("I/O error (%s %s: %s)", what, path, strerror(e));
    return STORAGE_EIO;
}

uint32_t storage_crc32(uint32_t crc, const void *p, size_t n)
{
    const unsigned char *b = p;
    while (n > 0) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = (uint32_t)crc32(crc, b, chunk);
        b += chunk;
        n -= chunk;
    }
    return crc;
}

static char *dup_str(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* ---------------------------------------------------------- SQL glue */

/* Resets a statement for reuse; clears bindings so that large blobs are not
 * kept alive between calls. */
static sqlite3_stmt *stmt(storage *st, int which)
{
    sqlite3_stmt *s = st->q[which];
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return s;
}

/* Runs a statement that returns no rows. */
static int exec_stmt(storage *st, sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_DONE ? STORAGE_OK : sql_fail(st->db, rc);
    sqlite3_reset(s);
    return err;
}

static int exec_q(storage *st, int which)
{
    return exec_stmt(st, stmt(st, which));
}

static void rollback(storage *st)
{
    if (!sqlite3_get_autocommit(st->db)) {
        sqlite3_stmt *s = stmt(st, Q_ROLLBACK);
        sqlite3_step(s);
        sqlite3_reset(s);
    }
}

static void bind_double_or_null(sqlite3_stmt *s, int i, double v)
{
    if (isfinite(v))
        sqlite3_bind_double(s, i, v);
    else
        sqlite3_bind_null(s, i);
}

static double column_double_or_nan(sqlite3_stmt *s, int col)
{
    return sqlite3_column_type(s, col) == SQLITE_NULL ? NAN : sqlite3_column_double(s, col);
}

/* -------------------------------------------------------- file side */

static int sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return io_fail(-errno, "opening the directory", dir);
    int r = fault_fsync(fd);
    close(fd);
    return r ? io_fail(r, "syncing the directory", dir) : STORAGE_OK;
}

static size_t iov_total(const storage_iov *v, int n)
{
    size_t t = 0;
    for (int i = 0; i < n; i++)
        t += v[i].len;
    return t;
}

/* Fills ck with the checkpoint's pieces: inline (one copy, small) or a new
 * file written under a temporary name, synced (FULL), renamed, the
 * directory synced (FULL).  Outside every lock. */
static int write_ckpt(storage *st, const storage_iov *v, int n, ckpt_ref *ck)
{
    size_t total = iov_total(v, n);
    uint32_t crc = 0;
    for (int i = 0; i < n; i++)
        crc = storage_crc32(crc, v[i].base, v[i].len);
    ck->present = true;
    ck->len = total;
    ck->crc = crc;
    ck->file[0] = '\0';
    if (total <= INLINE_MAX) {
        unsigned char *d = malloc(total ? total : 1);
        if (!d) {
            set_error("out of memory for a checkpoint of %zu bytes", total);
            return STORAGE_ENOMEM;
        }
        size_t off = 0;
        for (int i = 0; i < n; i++) {
            if (v[i].len)
                memcpy(d + off, v[i].base, v[i].len);
            off += v[i].len;
        }
        ck->inline_data = d;
        return STORAGE_OK;
    }
    unsigned long long g = atomic_fetch_add(&st->gen, 1);
    snprintf(ck->file, sizeof ck->file, "k%016llx.ckpt", g);
    char tmpname[48];
    snprintf(tmpname, sizeof tmpname, "%s.tmp", ck->file);
    char *tmp = path_join(st->dir, tmpname), *fin = path_join(st->dir, ck->file);
    int err = STORAGE_OK;
    int fd = -1;
    if (!tmp || !fin) {
        set_error("out of memory");
        err = STORAGE_ENOMEM;
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        err = io_fail(-errno, "creating", tmp);
        goto out;
    }
    off_t off = 0;
    for (int i = 0; i < n && err == STORAGE_OK; i++) {
        int r = fault_pwrite(fd, v[i].base, v[i].len, off);
        if (r)
            err = io_fail(r, "writing", tmp);
        off += (off_t)v[i].len;
    }
    if (err == STORAGE_OK && st->dur == STORAGE_SYNC_FULL) {
        int r = fault_fdatasync(fd);
        if (r)
            err = io_fail(r, "syncing", tmp);
    }
    close(fd);
    fd = -1;
    if (err == STORAGE_OK && rename(tmp, fin) != 0)
        err = io_fail(-errno, "renaming", tmp);
    if (err == STORAGE_OK && st->dur == STORAGE_SYNC_FULL)
        err = sync_dir(st->dir);
    if (err != STORAGE_OK) {
        unlink(tmp);
        unlink(fin);
    }
out:
    free(tmp);
    free(fin);
    return err;
}

static void ckpt_ref_free(ckpt_ref *ck)
{
    free(ck->inline_data);
    ck->inline_data = NULL;
}

/* The name of the segment session id's gradients go to now. */
static int segment_name(storage *st, int64_t id, char *buf, size_t n)
{
    pthread_mutex_lock(&st->seg_mu);
    size_t i = 0;
    while (i < st->n_segs && st->segs[i].id != id)
        i++;
    if (i == st->n_segs) {
        if (st->n_segs == st->cap_segs) {
            size_t cap = st->cap_segs ? 2 * st->cap_segs : 16;
            void *ns = realloc(st->segs, cap * sizeof *st->segs);
            if (!ns) {
                pthread_mutex_unlock(&st->seg_mu);
                set_error("out of memory");
                return STORAGE_ENOMEM;
            }
            st->segs = ns;
            st->cap_segs = cap;
        }
        st->segs[i].id = id;
        st->segs[i].gen = atomic_fetch_add(&st->gen, 1);
        st->n_segs++;
    }
    snprintf(buf, n, "s%" PRId64 "-%016llx.seg", id, st->segs[i].gen);
    pthread_mutex_unlock(&st->seg_mu);
    return STORAGE_OK;
}

/* The session's next gradient goes to a new segment. */
static void segment_forget(storage *st, int64_t id)
{
    pthread_mutex_lock(&st->seg_mu);
    for (size_t i = 0; i < st->n_segs; i++)
        if (st->segs[i].id == id) {
            st->segs[i] = st->segs[--st->n_segs];
            break;
        }
    pthread_mutex_unlock(&st->seg_mu);
}

/* Appends a gradient to the session's segment (creating it: the directory
 * is then synced under FULL), fdatasync'd under FULL.  The caller holds the
 * session, so nobody else appends to this segment. */
static int append_segment(storage *st, int64_t id, const void *p, size_t n, char *name,
                          size_t name_n, int64_t *off_out)
{
    int serr = segment_name(st, id, name, name_n);
    if (serr != STORAGE_OK)
        return serr;
    char *path = path_join(st->dir, name);
    if (!path) {
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    int err = STORAGE_OK;
    bool created = false;
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0)
        created = true;
    else if (errno == EEXIST)
        fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        err = io_fail(-errno, "opening", path);
        free(path);
        return err;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        err = io_fail(-errno, "reading the size of", path);
    } else {
        int r = fault_pwrite(fd, p, n, sb.st_size);
        if (r == 0 && st->dur == STORAGE_SYNC_FULL)
            r = fault_fdatasync(fd);
        if (r)
            err = io_fail(r, "appending to", path);
        *off_out = (int64_t)sb.st_size;
    }
    close(fd);
    if (err == STORAGE_OK && created && st->dur == STORAGE_SYNC_FULL)
        err = sync_dir(st->dir);
    free(path);
    return err;
}

static void unlink_in_dir(storage *st, const char *name)
{
    char *p = path_join(st->dir, name);
    if (p) {
        unlink(p);
        free(p);
    }
}

/* ------------------------------------------------- the lock, the file */

static int take_lock(storage *st)
{
    size_t n = strlen(st->path) + 6;
    char *lp = malloc(n);
    if (!lp) {
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    snprintf(lp, n, "%s.lock", st->path);
    st->lock_fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (st->lock_fd < 0) {
        int err = io_fail(-errno, "opening the lock file", lp);
        free(lp);
        return err;
    }
    /* An open-file-description lock: it conflicts within one process too,
     * and no close() of another descriptor releases it. */
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(st->lock_fd, F_OFD_SETLK, &fl) != 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t r = pread(st->lock_fd, pid, sizeof pid - 1, 0);
        pid[r > 0 ? r : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (e == EAGAIN || e == EACCES) {
            if (pid[0])
                set_error("the database %s is in use by another optd (pid %s)", st->path, pid);
            else
                set_error("the database %s is in use by another process", st->path);
            free(lp);
            return STORAGE_ELOCKED;
        }
        int err = io_fail(-e, "locking", lp);
        free(lp);
        return err;
    }
    free(lp);
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(st->lock_fd, 0) == 0 && pwrite(st->lock_fd, pid, (size_t)len, 0) < 0) {
        /* the pid is only a courtesy for the next one's message */
    }
    return STORAGE_OK;
}

/* True when the file at st->path is no longer the database this handle
 * opened (deleted, or replaced by another file). */
static bool db_file_gone(storage *st)
{
    struct stat now, mine;
    if (stat(st->path, &now) != 0)
        return true;
    if (now.st_dev != st->dev || now.st_ino != st->ino)
        return true;
    return fstat(st->db_fd, &mine) == 0 && mine.st_nlink == 0;
}

static int gone_error(storage *st)
{
    set_error("the database file %s was deleted or replaced while optd ran; no write is "
              "acknowledged any more (restart optd)",
              st->path);
    return STORAGE_EGONE;
}

/* ------------------------------------------------------- open / close */

static int migrate(sqlite3 *db)
{
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &s, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(db, rc);
    int version = 0;
    if (sqlite3_step(s) == SQLITE_ROW)
        version = sqlite3_column_int(s, 0);
    sqlite3_finalize(s);
    if (version > SCHEMA_VERSION) {
        set_error("the database's schema (version %d) is newer than this optd's (%d)", version,
                  SCHEMA_VERSION);
        return STORAGE_EFOREIGN;
    }
    for (int v = version; v < SCHEMA_VERSION; v++) {
        char pragma[96];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d; PRAGMA application_id = %d",
                 v + 1, OPTD_APPLICATION_ID);
        if ((rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL)) != SQLITE_OK)
            return sql_fail(db, rc);
        if ((rc = sqlite3_exec(db, migrations[v], NULL, NULL, NULL)) != SQLITE_OK ||
            (rc = sqlite3_exec(db, pragma, NULL, NULL, NULL)) != SQLITE_OK ||
            (rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL)) != SQLITE_OK) {
            int err = sql_fail(db, rc);
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return err;
        }
    }
    return STORAGE_OK;
}

static int query_int(sqlite3 *db, const char *sql, int64_t *out)
{
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(db, sql, -1, &s, NULL);
    if (rc != SQLITE_OK)
        return rc;
    rc = sqlite3_step(s);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(s, 0) : 0;
    sqlite3_finalize(s);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* Refuses a file that is not optd's: another application's id, or tables
 * of someone else's.  An empty database (no tables) is optd's to take. */
static int check_foreign(storage *st)
{
    int64_t app, version, tables, ours;
    int rc = query_int(st->db, "PRAGMA application_id", &app);
    if (rc == SQLITE_OK)
        rc = query_int(st->db, "PRAGMA user_version", &version);
    if (rc == SQLITE_OK)
        rc = query_int(st->db, "SELECT count(*) FROM sqlite_schema", &tables);
    if (rc == SQLITE_OK)
        rc = query_int(st->db,
                       "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN"
                       " ('sessions', 'checkpoints', 'steps', 'idem')",
                       &ours);
    if (rc != SQLITE_OK) {
        int err = sql_fail(st->db, rc);
        if (err == STORAGE_EFOREIGN)
            set_error("%s is not an SQLite database (refusing to touch it)", st->path);
        return err;
    }
    if (app == OPTD_APPLICATION_ID || tables == 0)
        return STORAGE_OK;
    /* optd before schema 4 did not mark its files */
    if (app == 0 && version >= 1 && version <= 3 && ours == 4)
        return STORAGE_OK;
    set_error("%s is an SQLite database of another application (application_id %" PRId64
              ", %" PRId64 " tables); refusing to touch it",
              st->path, app, tables);
    return STORAGE_EFOREIGN;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Removes the files of <db>.d that no committed row references (a crash
 * between a file's write and its row's commit, or between a commit and the
 * deletion of what it superseded), and sets the next checkpoint number
 * past every existing one. */
static int sweep(storage *st)
{
    char **refs = NULL;
    size_t n = 0, cap = 0;
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(st->db,
                                "SELECT file FROM checkpoints WHERE file IS NOT NULL"
                                " UNION SELECT file FROM steps WHERE file IS NOT NULL",
                                -1, &s, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(st->db, rc);
    int err = STORAGE_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nr = realloc(refs, cap * sizeof *refs);
            if (!nr) {
                err = STORAGE_ENOMEM;
                break;
            }
            refs = nr;
        }
        if (!(refs[n] = dup_str((const char *)sqlite3_column_text(s, 0)))) {
            err = STORAGE_ENOMEM;
            break;
        }
        n++;
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_finalize(s);
    if (err == STORAGE_ENOMEM)
        set_error("out of memory sweeping %s", st->dir);
    DIR *d = err == STORAGE_OK ? opendir(st->dir) : NULL;
    if (err == STORAGE_OK && !d)
        err = io_fail(-errno, "listing", st->dir);
    if (d) {
        if (n > 1)
            qsort(refs, n, sizeof *refs, cmp_str);
        unsigned long long next = 1;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.')
                continue;
            unsigned long long g;
            if ((sscanf(de->d_name, "k%16llx", &g) == 1 ||
                 sscanf(de->d_name, "s%*[0-9]-%16llx", &g) == 1) &&
                g + 1 > next)
                next = g + 1;
            const char *key = de->d_name;
            if (n == 0 || !bsearch(&key, refs, n, sizeof *refs, cmp_str))
                unlink_in_dir(st, de->d_name);
        }
        closedir(d);
        if (atomic_load(&st->gen) < next)
            atomic_store(&st->gen, next);
    }
    for (size_t i = 0; i < n; i++)
        free(refs[i]);
    free(refs);
    return err;
}

/* for_check: an offline check changes nothing it can avoid (no sweep). */
static int open_impl(const char *path, storage_durability d, bool for_check, storage **out)
{
    clear_error();
    fault_init_from_env();
    *out = NULL;
    storage *st = calloc(1, sizeof *st);
    if (!st) {
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    st->lock_fd = st->db_fd = -1;
    st->dur = d;
    atomic_init(&st->gen, 1);
    pthread_mutex_init(&st->db_mu, NULL);
    pthread_mutex_init(&st->q_mu, NULL);
    pthread_mutex_init(&st->seg_mu, NULL);
    pthread_cond_init(&st->q_cv, NULL);
    st->queue_tail = &st->queue;
    st->path = dup_str(path);
    size_t dn = strlen(path) + 3;
    st->dir = malloc(dn);
    if (!st->path || !st->dir) {
        storage_close(st);
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    snprintf(st->dir, dn, "%s.d", path);
    int err = take_lock(st);
    int rc = SQLITE_OK;
    if (err == STORAGE_OK) {
        rc = sqlite3_open_v2(path, &st->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             fault_vfs_name() ? fault_vfs_name() : wal_vfs_name());
        err = rc == SQLITE_OK ? STORAGE_OK : sql_fail(st->db, rc);
    }
    if (err == STORAGE_OK) {
        sqlite3_busy_timeout(st->db, 5000);
        err = check_foreign(st);
    }
    if (err == STORAGE_OK) {
        /* secure_delete: Debian builds SQLite zero-filling freed pages;
         * optd's deleted rows hold nothing secret, and it costs a write of
         * every freed page.  The WAL stays small (vectors live in files),
         * so SQLite's own auto-checkpoint (1000 pages) is cheap. */
        const char *pragmas = d == STORAGE_SYNC_FULL
                                  ? "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                                    " PRAGMA foreign_keys=ON; PRAGMA secure_delete=OFF;"
                                    " PRAGMA cache_size=-16384;"
                                  : "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                                    " PRAGMA foreign_keys=ON; PRAGMA secure_delete=OFF;"
                                    " PRAGMA cache_size=-16384;";
        rc = sqlite3_exec(st->db, pragmas, NULL, NULL, NULL);
        err = rc == SQLITE_OK ? migrate(st->db) : sql_fail(st->db, rc);
    }
    for (int i = 0; err == STORAGE_OK && i < Q_COUNT; i++) {
        rc = sqlite3_prepare_v3(st->db, sql_text[i], -1, SQLITE_PREPARE_PERSISTENT, &st->q[i],
                                NULL);
        if (rc != SQLITE_OK)
            err = sql_fail(st->db, rc);
    }
    if (err == STORAGE_OK) {
        /* Kept open until after sqlite3_close: closing a descriptor of the
         * database would drop SQLite's own POSIX locks on it. */
        struct stat sb;
        st->db_fd = open(path, O_RDONLY | O_CLOEXEC);
        if (st->db_fd < 0 || fstat(st->db_fd, &sb) != 0) {
            err = io_fail(-errno, "opening", path);
        } else {
            st->dev = sb.st_dev;
            st->ino = sb.st_ino;
        }
    }
    if (err == STORAGE_OK && mkdir(st->dir, 0755) != 0 && errno != EEXIST)
        err = io_fail(-errno, "creating the directory", st->dir);
    if (err == STORAGE_OK && !for_check) {
        /* A fork or import that a crash interrupted (under its temporary
         * name) never happened; its files go with the sweep. */
        rc = sqlite3_exec(st->db, "DELETE FROM sessions WHERE substr(name, 1, 1) = '~'", NULL,
                          NULL, NULL);
        err = rc == SQLITE_OK ? sweep(st) : sql_fail(st->db, rc);
    }
    if (err != STORAGE_OK) {
        char keep[sizeof last_error];
        memcpy(keep, last_error, sizeof keep);
        storage_close(st);
        memcpy(last_error, keep, sizeof keep);
        return err;
    }
    *out = st;
    return STORAGE_OK;
}

int storage_open(const char *path, storage_durability d, storage **out)
{
    return open_impl(path, d, false, out);
}

void storage_close(storage *st)
{
    if (!st)
        return;
    for (int i = 0; i < Q_COUNT; i++)
        sqlite3_finalize(st->q[i]);
    /* A clean close checkpoints the WAL into the main file. */
    sqlite3_close(st->db);
    if (st->db_fd >= 0)
        close(st->db_fd);
    if (st->lock_fd >= 0)
        close(st->lock_fd); /* releases the lock */
    pthread_mutex_destroy(&st->db_mu);
    pthread_mutex_destroy(&st->q_mu);
    pthread_mutex_destroy(&st->seg_mu);
    free(st->segs);
    pthread_cond_destroy(&st->q_cv);
    free(st->path);
    free(st->dir);
    free(st);
}

/* ------------------------------------------------------ group commit */

static int add_old_file(job *j, const char *name)
{
    char **n = realloc(j->old_files, (size_t)(j->n_old + 1) * sizeof *n);
    if (!n)
        return STORAGE_ENOMEM;
    j->old_files = n;
    if (!(n[j->n_old] = dup_str(name)))
        return STORAGE_ENOMEM;
    j->n_old++;
    return STORAGE_OK;
}

/* Runs s (bound) and adds each row's first column (a file name) to
 * j's list of files to unlink after the commit. */
static int collect_files(storage *st, job *j, sqlite3_stmt *s)
{
    int rc, err = STORAGE_OK;
    while (err == STORAGE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW)
        if (add_old_file(j, (const char *)sqlite3_column_text(s, 0)) != STORAGE_OK) {
            set_error("out of memory");
            err = STORAGE_ENOMEM;
        }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_reset(s);
    return err;
}

/* Of the segment files in j->old_files from index first on, keeps in the
 * list (to be unlinked) only those no log row of session id uses any
 * more. */
static int keep_unused_segments(storage *st, job *j, int64_t id, int first)
{
    int w = first, err = STORAGE_OK;
    for (int i = first; i < j->n_old; i++) {
        sqlite3_stmt *s = stmt(st, Q_FILE_USED);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_text(s, 2, j->old_files[i], -1, SQLITE_STATIC);
        int rc = sqlite3_step(s);
        sqlite3_reset(s);
        if (rc == SQLITE_DONE) {
            j->old_files[w++] = j->old_files[i];
            continue;
        }
        if (rc != SQLITE_ROW && err == STORAGE_OK)
            err = sql_fail(st->db, rc);
        free(j->old_files[i]);
    }
    j->n_old = w;
    return err;
}

static int query_i64(storage *st, int which, int64_t a, int64_t b, int64_t *out, bool *null)
{
    sqlite3_stmt *s = stmt(st, which);
    sqlite3_bind_int64(s, 1, a);
    sqlite3_bind_int64(s, 2, b);
    int rc = sqlite3_step(s);
    int err = STORAGE_OK;
    *null = true;
    if (rc == SQLITE_ROW) {
        *null = sqlite3_column_type(s, 0) == SQLITE_NULL;
        *out = sqlite3_column_int64(s, 0);
    } else if (rc != SQLITE_DONE) {
        err = sql_fail(st->db, rc);
    }
    sqlite3_reset(s);
    return err;
}

/* Inside a job: adds ck to the session's checkpoints, prunes what the
 * retention (j->keep periodic ones) no longer keeps, drops the log's
 * replay data behind the oldest checkpoint left, and remembers the files
 * all this supersedes. */
static int put_ckpt(storage *st, job *j, int64_t id, const ckpt_ref *ck)
{
    int64_t prev_oldest = -1;
    bool null;
    int err = query_i64(st, Q_CKPT_OLDEST, id, 0, &prev_oldest, &null);
    if (err == STORAGE_OK) {
        /* One at the same seq is replaced (its file goes). */
        sqlite3_stmt *s = stmt(st, Q_CKPT_AT);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, ck->seq);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            if (ck->label && sqlite3_column_type(s, 1) != SQLITE_NULL) {
                set_error("step %" PRId64 " has a checkpoint labelled \"%s\" already", ck->step,
                          (const char *)sqlite3_column_text(s, 1));
                err = STORAGE_EEXIST;
            } else if (sqlite3_column_type(s, 0) != SQLITE_NULL &&
                       add_old_file(j, (const char *)sqlite3_column_text(s, 0)) != STORAGE_OK) {
                set_error("out of memory");
                err = STORAGE_ENOMEM;
            }
        } else if (rc != SQLITE_DONE) {
            err = sql_fail(st->db, rc);
        }
        sqlite3_reset(s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_INSERT);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, ck->seq);
        sqlite3_bind_int64(s, 3, ck->step);
        sqlite3_bind_int64(s, 4, (sqlite3_int64)ck->len);
        sqlite3_bind_int64(s, 5, ck->crc);
        if (ck->file[0])
            sqlite3_bind_text(s, 6, ck->file, -1, SQLITE_STATIC);
        else
            sqlite3_bind_blob64(s, 7, ck->inline_data, ck->len, SQLITE_STATIC);
        sqlite3_bind_int(s, 8, ck->kind);
        if (ck->label)
            sqlite3_bind_text(s, 9, ck->label, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 10, j->now_ms);
        if (ck->config)
            sqlite3_bind_text(s, 11, ck->config, -1, SQLITE_STATIC);
        err = exec_stmt(st, s);
        if (err == STORAGE_EEXIST) {
            if (ck->label)
                set_error("a checkpoint labelled \"%s\" exists", ck->label);
            else
                set_error("session %" PRId64 " does not exist", id);
            err = ck->label ? STORAGE_EEXIST : STORAGE_ENOTFOUND;
        }
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_DOOMED_FILES);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, ck->seq);
        sqlite3_bind_int64(s, 3, j->keep);
        err = collect_files(st, j, s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_PRUNE);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, ck->seq);
        sqlite3_bind_int64(s, 3, j->keep);
        err = exec_stmt(st, s);
    }
    int first = j->n_old;
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_LOG_DROP_FILES);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, prev_oldest);
        err = collect_files(st, j, s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_LOG_DROP_GRAD);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, prev_oldest);
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK && j->keep > 0) {
        sqlite3_stmt *s = stmt(st, Q_LOG_DROP_ROWS);
        sqlite3_bind_int64(s, 1, id);
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK)
        err = keep_unused_segments(st, j, id, first);
    j->seg_reset = true;
    return err;
}

static int step_seq(storage *st, int64_t id, int64_t step, int64_t *seq);

/* Inside a job: the session returns to the state after step j->step:
 * every log row, checkpoint and idempotency key after that step's row
 * goes; the nearest checkpoint at or before it stays, and its config
 * becomes the session's. */
static int run_rollback(storage *st, job *j)
{
    int64_t target = -1, c_seq = 0;
    int err = step_seq(st, j->id, j->step, &target);
    char *config = NULL;
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_NEWEST);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, target);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            c_seq = sqlite3_column_int64(s, 0);
            if (sqlite3_column_type(s, 5) != SQLITE_NULL &&
                !(config = dup_str((const char *)sqlite3_column_text(s, 5)))) {
                set_error("out of memory");
                err = STORAGE_ENOMEM;
            }
        } else if (rc == SQLITE_DONE) {
            set_error("no checkpoint at or before step %" PRId64 " is kept: the log behind "
                      "the oldest kept checkpoint is compacted",
                      j->step);
            err = STORAGE_ERANGE;
        } else {
            err = sql_fail(st->db, rc);
        }
        sqlite3_reset(s);
    }
    (void)c_seq;
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_FILES_AFTER);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, target);
        err = collect_files(st, j, s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_DELETE_AFTER);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, target);
        err = exec_stmt(st, s);
    }
    int first = j->n_old;
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_LOG_FILES_AFTER);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, target);
        err = collect_files(st, j, s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_LOG_DELETE_AFTER);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, target);
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK)
        err = keep_unused_segments(st, j, j->id, first);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_IDEM_DELETE_AFTER);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, j->step);
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, config ? Q_SESSION_SET_CONFIG : Q_SESSION_TOUCH);
        sqlite3_bind_int64(s, 1, j->id);
        if (config) {
            sqlite3_bind_text(s, 2, config, -1, SQLITE_STATIC);
            sqlite3_bind_int64(s, 3, j->now_ms);
        } else {
            sqlite3_bind_int64(s, 2, j->now_ms);
        }
        err = exec_stmt(st, s);
    }
    free(config);
    j->seq = target;
    j->seg_reset = true;
    return err;
}

static int run_append(storage *st, job *j)
{
    const storage_log_entry *e = j->e;
    sqlite3_stmt *s = stmt(st, Q_LOG_INSERT);
    sqlite3_bind_int64(s, 1, j->id);
    sqlite3_bind_int64(s, 2, e->seq);
    sqlite3_bind_int(s, 3, e->kind);
    sqlite3_bind_int64(s, 4, e->step);
    sqlite3_bind_int64(s, 5, e->time_ms);
    bind_double_or_null(s, 6, e->lr);
    bind_double_or_null(s, 7, e->factor);
    bind_double_or_null(s, 8, e->loss);
    bind_double_or_null(s, 9, e->grad_norm);
    bind_double_or_null(s, 10, e->update_norm);
    if (e->worker)
        sqlite3_bind_text(s, 11, e->worker, -1, SQLITE_STATIC);
    /* A row checkpointed at once keeps its replay data too: a rollback or
     * fork from an older kept checkpoint replays it (put_ckpt drops it when
     * nothing older is kept). */
    if (e->grad) {
        if (!j->grad_in_file)
            sqlite3_bind_blob64(s, 12, e->grad, e->grad_len, SQLITE_STATIC);
        sqlite3_bind_int64(s, 13, j->grad_crc);
        sqlite3_bind_int64(s, 14, (sqlite3_int64)e->grad_len);
        if (j->grad_in_file) {
            sqlite3_bind_text(s, 15, j->seg, -1, SQLITE_STATIC);
            sqlite3_bind_int64(s, 16, j->grad_off);
        }
    }
    if (e->extra)
        sqlite3_bind_blob64(s, 17, e->extra, e->extra_len, SQLITE_STATIC);
    int err = exec_stmt(st, s);
    if (err == STORAGE_EEXIST)
        set_error("log row %" PRId64 " of session %" PRId64 " exists already, or the session "
                  "does not exist",
                  e->seq, j->id);
    for (size_t k = 0; err == STORAGE_OK && k <= e->n_more_keys; k++) {
        const char *key = k == 0 ? e->idem_key : e->more_keys[k - 1];
        if (!key)
            continue;
        uint64_t fp = k == 0 ? e->idem_fp : e->more_fps ? e->more_fps[k - 1] : 0;
        s = stmt(st, Q_IDEM_INSERT);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, e->step);
        sqlite3_bind_int64(s, 4, e->time_ms);
        sqlite3_bind_int(s, 5, e->kind);
        sqlite3_bind_int64(s, 6, (sqlite3_int64)fp);
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK && j->ck.present)
        err = put_ckpt(st, j, j->id, &j->ck);
    return err;
}

static int run_job(storage *st, job *j)
{
    sqlite3_stmt *s;
    int err;
    switch (j->kind) {
    case J_CREATE:
        s = stmt(st, Q_SESSION_INSERT);
        sqlite3_bind_text(s, 1, j->name, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, j->config, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, j->now_ms);
        if (j->owner)
            sqlite3_bind_text(s, 4, j->owner, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 5, j->params);
        err = exec_stmt(st, s);
        if (err == STORAGE_EEXIST)
            set_error("a session named %s exists", j->name);
        if (err == STORAGE_OK) {
            j->id = sqlite3_last_insert_rowid(st->db);
            err = put_ckpt(st, j, j->id, &j->ck);
        }
        return err;
    case J_APPEND:
        return run_append(st, j);
    case J_CHECKPOINT:
        err = put_ckpt(st, j, j->id, &j->ck);
        if (err == STORAGE_OK) {
            s = stmt(st, j->config ? Q_SESSION_SET_CONFIG : Q_SESSION_TOUCH);
            sqlite3_bind_int64(s, 1, j->id);
            if (j->config) {
                sqlite3_bind_text(s, 2, j->config, -1, SQLITE_STATIC);
                sqlite3_bind_int64(s, 3, j->now_ms);
            } else {
                sqlite3_bind_int64(s, 2, j->now_ms);
            }
            err = exec_stmt(st, s);
        }
        return err;
    case J_DELETE: {
        s = stmt(st, Q_SESSION_ID);
        sqlite3_bind_text(s, 1, j->name, -1, SQLITE_STATIC);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW)
            j->id = sqlite3_column_int64(s, 0);
        sqlite3_reset(s);
        if (rc == SQLITE_DONE) {
            set_error("no session named %s", j->name);
            return STORAGE_ENOTFOUND;
        }
        if (rc != SQLITE_ROW)
            return sql_fail(st->db, rc);
        s = stmt(st, Q_CKPT_FILES);
        sqlite3_bind_int64(s, 1, j->id);
        err = collect_files(st, j, s);
        if (err == STORAGE_OK) {
            s = stmt(st, Q_LOG_FILES_AFTER);
            sqlite3_bind_int64(s, 1, j->id);
            sqlite3_bind_int64(s, 2, -1);
            err = collect_files(st, j, s);
        }
        if (err == STORAGE_OK) {
            s = stmt(st, Q_SESSION_DELETE);
            sqlite3_bind_int64(s, 1, j->id);
            err = exec_stmt(st, s);
        }
        j->seg_reset = true;
        return err;
    }
    case J_ROLLBACK:
        return run_rollback(st, j);
    case J_RENAME:
        s = stmt(st, Q_SESSION_RENAME);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_text(s, 2, j->name, -1, SQLITE_STATIC);
        err = exec_stmt(st, s);
        if (err == STORAGE_EEXIST)
            set_error("a session named %s exists", j->name);
        return err;
    case J_PRUNE:
        s = stmt(st, Q_IDEM_PRUNE);
        sqlite3_bind_int64(s, 1, j->id);
        sqlite3_bind_int64(s, 2, j->min_ms);
        sqlite3_bind_int64(s, 3, j->keep);
        return exec_stmt(st, s);
    }
    return STORAGE_EIO;
}

static void job_fail(job *j, int err)
{
    j->err = err;
    _Static_assert(sizeof j->msg == sizeof last_error, "one size for error texts");
    memcpy(j->msg, last_error, sizeof j->msg);
}

/* The leader's work: one transaction for the whole batch, one savepoint
 * per job (a failing job rolls back only itself), one commit.  A batch of
 * one job -- every step of a lone client -- needs no savepoint: its
 * failure rolls the transaction back (the savepoints were a sixth of a
 * small step's CPU, bench/ENGINE.md). */
static void run_batch(storage *st, job *batch)
{
    pthread_mutex_lock(&st->db_mu);
    int err = atomic_load(&st->gone) ? gone_error(st) : exec_q(st, Q_BEGIN);
    bool solo = batch && !batch->next;
    if (err == STORAGE_OK) {
        for (job *j = batch; j; j = j->next) {
            clear_error();
            int e = solo ? STORAGE_OK : exec_q(st, Q_SAVEPOINT);
            if (e == STORAGE_OK)
                e = run_job(st, j);
            if (e != STORAGE_OK) {
                job_fail(j, e);
                if (solo || sqlite3_get_autocommit(st->db)) {
                    /* The only job failed, or SQLite rolled the whole
                     * transaction back (an I/O error, a full disk): the
                     * batch fails as one, and no later job may run
                     * outside it. */
                    err = e;
                    break;
                }
                exec_q(st, Q_ROLLBACK_TO);
            }
            if (!solo)
                exec_q(st, Q_RELEASE);
        }
        if (err != STORAGE_OK && !sqlite3_get_autocommit(st->db))
            rollback(st);
        if (err == STORAGE_OK) {
            clear_error();
            err = exec_q(st, Q_COMMIT);
            if (err != STORAGE_OK)
                rollback(st);
        }
    }
    if (err == STORAGE_OK && db_file_gone(st)) {
        atomic_store(&st->gone, 1);
        err = gone_error(st);
    }
    bool full = err == STORAGE_EFULL;
    for (job *j = batch; j && !full; j = j->next)
        full = j->err == STORAGE_EFULL;
    if (full || (err == STORAGE_OK && st->wal_trim)) {
        /* Give the WAL back: at once (it may fail while the disk is still
         * full), and again after the next commit that succeeds. */
        char keep[sizeof last_error];
        memcpy(keep, last_error, sizeof keep);
        int rc = sqlite3_wal_checkpoint_v2(st->db, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL);
        st->wal_trim = full || rc != SQLITE_OK;
        memcpy(last_error, keep, sizeof keep);
    }
    if (err != STORAGE_OK)
        for (job *j = batch; j; j = j->next)
            if (j->err == STORAGE_OK)
                job_fail(j, err);
    pthread_mutex_unlock(&st->db_mu);
}

/* Queues j and returns once it is committed (or failed); the error text is
 * then the calling thread's. */
static int group_run(storage *st, job *j)
{
    j->done = false;
    j->err = STORAGE_OK;
    j->next = NULL;
    pthread_mutex_lock(&st->q_mu);
    *st->queue_tail = j;
    st->queue_tail = &j->next;
    while (!j->done) {
        if (!st->leading) {
            st->leading = true;
            job *batch = st->queue;
            st->queue = NULL;
            st->queue_tail = &st->queue;
            pthread_mutex_unlock(&st->q_mu);
            run_batch(st, batch);
            pthread_mutex_lock(&st->q_mu);
            for (job *b = batch, *next; b; b = next) {
                next = b->next;
                b->done = true;
            }
            st->leading = false;
            pthread_cond_broadcast(&st->q_cv);
        } else {
            pthread_cond_wait(&st->q_cv, &st->q_mu);
        }
    }
    pthread_mutex_unlock(&st->q_mu);
    if (j->err != STORAGE_OK)
        memcpy(last_error, j->msg, sizeof last_error);
    else
        clear_error();
    return j->err;
}

/* After a job: on success removes what it superseded; on failure the new
 * checkpoint file nobody references. */
static void job_finish(storage *st, job *j, int err)
{
    if (err == STORAGE_OK) {
        for (int i = 0; i < j->n_old; i++)
            if (strcmp(j->old_files[i], j->ck.file) != 0)
                unlink_in_dir(st, j->old_files[i]);
        if (j->seg_reset) {
            /* Its current segment, when no row uses it, is a tail that
             * nothing reads. */
            if (j->kind == J_DELETE) {
                char name[48];
                if (segment_name(st, j->id, name, sizeof name) == STORAGE_OK)
                    unlink_in_dir(st, name);
            }
            segment_forget(st, j->id);
        }
    } else if (j->ck.present && j->ck.file[0]) {
        unlink_in_dir(st, j->ck.file);
    }
    for (int i = 0; i < j->n_old; i++)
        free(j->old_files[i]);
    free(j->old_files);
    ckpt_ref_free(&j->ck);
}

static int check_writable(storage *st)
{
    clear_error();
    return atomic_load(&st->gone) ? gone_error(st) : STORAGE_OK;
}

/* ----------------------------------------------------------- sessions */

void storage_session_info_free(storage_session_info *info)
{
    if (!info)
        return;
    free(info->name);
    free(info->config);
    free(info->created_by);
    info->name = info->config = info->created_by = NULL;
}

int storage_session_create(storage *st, const char *name, const char *config, int64_t now_ms,
                           const storage_iov *ckpt, int n_ckpt, int64_t *id_out)
{
    return storage_session_create_at(st, name, config, now_ms, ckpt, n_ckpt, 0, id_out);
}

int storage_session_create_at(storage *st, const char *name, const char *config, int64_t now_ms,
                              const storage_iov *ckpt, int n_ckpt, int64_t step, int64_t *id_out)
{
    return storage_session_create_owned(st, name, config, now_ms, ckpt, n_ckpt, step, NULL, 0,
                                        id_out);
}

int storage_session_create_owned(storage *st, const char *name, const char *config,
                                 int64_t now_ms, const storage_iov *ckpt, int n_ckpt,
                                 int64_t step, const char *owner, int64_t params, int64_t *id_out)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_CREATE, .name = name, .config = config, .now_ms = now_ms,
             .owner = owner, .params = params};
    err = write_ckpt(st, ckpt, n_ckpt, &j.ck);
    j.ck.kind = STORAGE_CKPT_ANCHOR;
    j.ck.config = config;
    j.ck.step = step;
    if (err == STORAGE_OK)
        err = group_run(st, &j);
    if (err == STORAGE_OK && id_out)
        *id_out = j.id;
    job_finish(st, &j, err);
    return err;
}

static int read_info(sqlite3_stmt *s, storage_session_info *info)
{
    info->id = sqlite3_column_int64(s, 0);
    info->name = dup_str((const char *)sqlite3_column_text(s, 1));
    info->config = dup_str((const char *)sqlite3_column_text(s, 2));
    info->created_ms = sqlite3_column_int64(s, 3);
    info->updated_ms = sqlite3_column_int64(s, 4);
    info->step = sqlite3_column_int64(s, 5);
    const char *by = (const char *)sqlite3_column_text(s, 6);
    info->created_by = by ? dup_str(by) : NULL;
    if (!info->name || !info->config || (by && !info->created_by)) {
        storage_session_info_free(info);
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    return STORAGE_OK;
}

int storage_session_get(storage *st, const char *name, storage_session_info *info)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = stmt(st, Q_SESSION_GET);
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_ROW    ? read_info(s, info)
              : rc == SQLITE_DONE ? STORAGE_ENOTFOUND
                                  : sql_fail(st->db, rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->db_mu);
    if (err == STORAGE_ENOTFOUND)
        set_error("no session named %s", name);
    return err;
}

/* Under db_mu: the rows of a session-list statement s, at most limit,
 * into infos.  Their number, or an error with none of them kept. */
static int read_infos(storage *st, sqlite3_stmt *s, int limit, storage_session_info *infos)
{
    int n = 0, rc = SQLITE_DONE, err = STORAGE_OK;
    while (n < limit && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        if ((err = read_info(s, &infos[n])) != STORAGE_OK)
            break;
        n++;
    }
    if (err == STORAGE_OK && rc != SQLITE_ROW && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    if (err != STORAGE_OK) {
        while (n > 0)
            storage_session_info_free(&infos[--n]);
        return err;
    }
    return n;
}

int storage_session_list(storage *st, const char *after, int limit, storage_session_info *infos)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = stmt(st, after ? Q_SESSION_LIST_AFTER : Q_SESSION_LIST);
    sqlite3_bind_int(s, 1, limit);
    if (after)
        sqlite3_bind_text(s, 2, after, -1, SQLITE_STATIC);
    int n = read_infos(st, s, limit, infos);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->db_mu);
    return n;
}

int storage_session_delete(storage *st, const char *name)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_DELETE, .name = name};
    err = group_run(st, &j);
    job_finish(st, &j, err);
    return err;
}

/* -------------------------------------------------------------- load */

int storage_read(storage_reader *r, void *dst, size_t n)
{
    if (r->err)
        return r->err;
    if (n == 0)
        return STORAGE_OK;
    if (n > r->len - r->off) {
        set_error("a read past the end of the checkpoint (%zu + %zu > %zu bytes)", r->off, n,
                  r->len);
        return r->err = STORAGE_ECORRUPT;
    }
    if (r->fd < 0) {
        memcpy(dst, r->mem + r->off, n);
    } else {
        int e = fault_pread(r->fd, dst, n, (off_t)(r->base + (int64_t)r->off));
        if (e)
            return r->err = io_fail(e, "reading", "a checkpoint file");
    }
    r->crc = storage_crc32(r->crc, dst, n);
    r->off += n;
    return STORAGE_OK;
}

/* A log row after the newest checkpoint, copied out of SQLite so that
 * replay runs without the connection's lock. */
typedef struct {
    storage_log_entry e;
    char *worker;
    void *inline_grad, *extra;
    char *file;
    int64_t off;
    size_t len;
    bool has_crc, has_grad;
    uint32_t crc;
} load_row;

static void rows_free(load_row *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(rows[i].worker);
        free(rows[i].inline_grad);
        free(rows[i].extra);
        free(rows[i].file);
    }
    free(rows);
}

static void *dup_mem(const void *p, size_t n)
{
    void *d = malloc(n ? n : 1);
    if (d && n)
        memcpy(d, p, n);
    return d;
}

static void read_entry(sqlite3_stmt *s, storage_log_entry *e)
{
    memset(e, 0, sizeof *e);
    e->seq = sqlite3_column_int64(s, 0);
    e->kind = sqlite3_column_int(s, 1);
    e->step = sqlite3_column_int64(s, 2);
    e->time_ms = sqlite3_column_int64(s, 3);
    e->lr = column_double_or_nan(s, 4);
    e->factor = column_double_or_nan(s, 5);
    e->loss = column_double_or_nan(s, 6);
    e->grad_norm = column_double_or_nan(s, 7);
    e->update_norm = column_double_or_nan(s, 8);
    e->worker = (const char *)sqlite3_column_text(s, 9);
}

/* Under db_mu inside a read transaction: the rows after seq. */
static int fetch_rows(storage *st, int64_t id, int64_t seq, int64_t upto, int limit,
                      load_row **out, size_t *n_out)
{
    load_row *rows = NULL;
    size_t n = 0, cap = 0;
    sqlite3_stmt *s = stmt(st, Q_LOG_AFTER);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, seq);
    sqlite3_bind_int64(s, 3, upto);
    sqlite3_bind_int(s, 4, limit);
    int rc, err = STORAGE_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            load_row *nr = realloc(rows, cap * sizeof *rows);
            if (!nr) {
                err = STORAGE_ENOMEM;
                break;
            }
            rows = nr;
        }
        load_row *r = &rows[n++];
        memset(r, 0, sizeof *r);
        read_entry(s, &r->e);
        if (r->e.worker && !(r->worker = dup_str(r->e.worker)))
            err = STORAGE_ENOMEM;
        r->e.worker = r->worker;
        r->has_crc = sqlite3_column_type(s, 11) != SQLITE_NULL;
        r->crc = (uint32_t)sqlite3_column_int64(s, 11);
        if (sqlite3_column_type(s, 10) != SQLITE_NULL) {
            r->has_grad = true;
            r->len = (size_t)sqlite3_column_bytes(s, 10);
            if (!(r->inline_grad = dup_mem(sqlite3_column_blob(s, 10), r->len)))
                err = STORAGE_ENOMEM;
        } else if (sqlite3_column_type(s, 13) != SQLITE_NULL) {
            r->has_grad = true;
            r->len = (size_t)sqlite3_column_int64(s, 12);
            r->off = sqlite3_column_int64(s, 14);
            if (!(r->file = dup_str((const char *)sqlite3_column_text(s, 13))))
                err = STORAGE_ENOMEM;
        }
        if (sqlite3_column_type(s, 15) != SQLITE_NULL) {
            r->e.extra_len = (size_t)sqlite3_column_bytes(s, 15);
            if (!(r->extra = dup_mem(sqlite3_column_blob(s, 15), r->e.extra_len)))
                err = STORAGE_ENOMEM;
            r->e.extra = r->extra;
        }
        if (err != STORAGE_OK)
            break;
    }
    if (err == STORAGE_ENOMEM)
        set_error("out of memory reading the log");
    else if (rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_reset(s);
    if (err != STORAGE_OK) {
        rows_free(rows, n);
        return err;
    }
    *out = rows;
    *n_out = n;
    return STORAGE_OK;
}

/* Replays rows in order, reading each file gradient into one buffer and
 * verifying every checksum before the callback. */
static int replay_rows(storage *st, load_row *rows, size_t n, storage_replay_fn fn, void *ud)
{
    void *buf = NULL;
    size_t cap = 0;
    int fd = -1;
    char *fd_file = NULL;
    int err = STORAGE_OK;
    for (size_t i = 0; i < n && err == STORAGE_OK; i++) {
        load_row *r = &rows[i];
        if (r->file) {
            if (!fd_file || strcmp(fd_file, r->file) != 0) {
                if (fd >= 0)
                    close(fd);
                free(fd_file);
                fd_file = dup_str(r->file);
                char *p = path_join(st->dir, r->file);
                fd = p ? open(p, O_RDONLY | O_CLOEXEC) : -1;
                if (fd < 0) {
                    err = p ? io_fail(-errno, "opening", p) : STORAGE_ENOMEM;
                    free(p);
                    break;
                }
                free(p);
            }
            if (r->len > cap) {
                void *nb = realloc(buf, r->len);
                if (!nb) {
                    set_error("out of memory for a gradient of %zu bytes", r->len);
                    err = STORAGE_ENOMEM;
                    break;
                }
                buf = nb;
                cap = r->len;
            }
            int e = fault_pread(fd, buf, r->len, (off_t)r->off);
            if (e) {
                err = io_fail(e, "reading the gradient of a log row from", r->file);
                break;
            }
            r->e.grad = buf;
        } else if (r->has_grad) {
            r->e.grad = r->inline_grad;
        }
        if (r->has_grad) {
            r->e.grad_len = r->len;
            if (r->has_crc && storage_crc32(0, r->e.grad, r->len) != r->crc) {
                set_error("the gradient of log row %" PRId64 " fails its checksum (damaged)",
                          r->e.seq);
                err = STORAGE_ECORRUPT;
                break;
            }
        }
        int cb = fn(ud, &r->e);
        if (cb != 0)
            err = cb;
    }
    if (fd >= 0)
        close(fd);
    free(fd_file);
    free(buf);
    return err;
}

int storage_session_load(storage *st, int64_t id, storage_ckpt_fn ckpt,
                         storage_replay_fn replay, void *ud)
{
    return storage_session_load_at(st, id, INT64_MAX, ckpt, replay, ud, NULL);
}

int storage_session_load_at(storage *st, int64_t id, int64_t upto, storage_ckpt_fn ckpt,
                            storage_replay_fn replay, void *ud, char **config)
{
    clear_error();
    if (config)
        *config = NULL;
    storage_reader r = {.fd = -1};
    void *mem = NULL;
    bool has_crc = false;
    uint32_t want = 0;
    int64_t seq = 0;
    load_row *rows = NULL;
    size_t n_rows = 0;
    char *fpath = NULL;

    /* Under the lock, in one read transaction: the newest checkpoint (its
     * file opened) and the rows after it.  Replay runs without the lock. */
    pthread_mutex_lock(&st->db_mu);
    int err = exec_q(st, Q_BEGIN_READ);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_NEWEST);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, upto);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            seq = sqlite3_column_int64(s, 0);
            if (config && sqlite3_column_type(s, 5) != SQLITE_NULL &&
                !(*config = dup_str((const char *)sqlite3_column_text(s, 5)))) {
                set_error("out of memory");
                err = STORAGE_ENOMEM;
            }
            r.len = (size_t)sqlite3_column_int64(s, 1);
            has_crc = sqlite3_column_type(s, 2) != SQLITE_NULL;
            want = (uint32_t)sqlite3_column_int64(s, 2);
            if (sqlite3_column_type(s, 3) != SQLITE_NULL) {
                fpath = path_join(st->dir, (const char *)sqlite3_column_text(s, 3));
                r.fd = fpath ? open(fpath, O_RDONLY | O_CLOEXEC) : -1;
                if (r.fd < 0)
                    err = fpath ? io_fail(-errno, "opening the checkpoint", fpath)
                                : STORAGE_ENOMEM;
            } else {
                size_t blen = (size_t)sqlite3_column_bytes(s, 4);
                mem = dup_mem(sqlite3_column_blob(s, 4), blen);
                if (!mem) {
                    set_error("out of memory");
                    err = STORAGE_ENOMEM;
                } else if (blen != r.len) {
                    set_error("the checkpoint of session %" PRId64 " has %zu bytes, not %zu",
                              id, blen, r.len);
                    err = STORAGE_ECORRUPT;
                }
                r.mem = mem;
            }
        } else if (rc == SQLITE_DONE) {
            set_error("session %" PRId64 " has no checkpoint", id);
            err = STORAGE_ENOTFOUND;
        } else {
            err = sql_fail(st->db, rc);
        }
        sqlite3_reset(s);
    }
    if (err == STORAGE_OK)
        err = fetch_rows(st, id, seq, upto, -1, &rows, &n_rows);
    rollback(st);
    pthread_mutex_unlock(&st->db_mu);

    if (err == STORAGE_OK) {
        err = ckpt(ud, &r, r.len, seq);
        if (err == STORAGE_OK && r.err)
            err = r.err;
        if (err == STORAGE_OK && r.off != r.len) {
            /* verify the bytes the callback did not pull */
            unsigned char tmp[65536];
            while (err == STORAGE_OK && r.off < r.len) {
                size_t k = r.len - r.off < sizeof tmp ? r.len - r.off : sizeof tmp;
                err = storage_read(&r, tmp, k);
            }
        }
        if (err == STORAGE_OK && has_crc && r.crc != want) {
            set_error("the checkpoint of session %" PRId64 " (seq %" PRId64
                      ") fails its checksum (damaged)",
                      id, seq);
            err = STORAGE_ECORRUPT;
        }
    }
    if (r.fd >= 0)
        close(r.fd);
    free(mem);
    free(fpath);
    if (err == STORAGE_OK)
        err = replay_rows(st, rows, n_rows, replay, ud);
    rows_free(rows, n_rows);
    return err;
}

#define LOG_BATCH 256

int storage_log_read(storage *st, int64_t id, int64_t after, int64_t upto, storage_replay_fn fn,
                     void *ud)
{
    clear_error();
    int err = STORAGE_OK;
    while (err == STORAGE_OK && after < upto) {
        load_row *rows = NULL;
        size_t n = 0;
        pthread_mutex_lock(&st->db_mu);
        err = exec_q(st, Q_BEGIN_READ);
        if (err == STORAGE_OK)
            err = fetch_rows(st, id, after, upto, LOG_BATCH, &rows, &n);
        rollback(st);
        pthread_mutex_unlock(&st->db_mu);
        if (err != STORAGE_OK || n == 0)
            break;
        after = rows[n - 1].e.seq;
        for (size_t i = 0; i < n && err == STORAGE_OK; i++)
            if (rows[i].e.kind != STORAGE_LOG_SKIP && !rows[i].has_grad) {
                set_error("log row %" PRId64 " has no gradient any more (compacted)",
                          rows[i].e.seq);
                err = STORAGE_ERANGE;
            }
        if (err == STORAGE_OK)
            err = replay_rows(st, rows, n, fn, ud);
        rows_free(rows, n);
    }
    return err;
}

int storage_ckpt_list(storage *st, int64_t id, storage_ckpt_list_fn fn, void *ud)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = stmt(st, Q_CKPT_LIST);
    sqlite3_bind_int64(s, 1, id);
    int rc, err = STORAGE_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        storage_ckpt_info c = {
            .seq = sqlite3_column_int64(s, 0),
            .step = sqlite3_column_int64(s, 1),
            .time_ms = sqlite3_column_int64(s, 2),
            .kind = sqlite3_column_int(s, 3),
            .label = (const char *)sqlite3_column_text(s, 4),
            .bytes = sqlite3_column_int64(s, 5),
        };
        int r = fn(ud, &c);
        if (r != 0) {
            err = r;
            break;
        }
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

/* Under db_mu: the log row a step ends at (the update's row; for the
 * first state of a session, its first checkpoint). */
static int step_seq(storage *st, int64_t id, int64_t step, int64_t *seq)
{
    bool null = true;
    int err = query_i64(st, Q_LOG_STEP_SEQ, id, step, seq, &null);
    if (err == STORAGE_OK && null)
        err = query_i64(st, Q_CKPT_STEP_SEQ, id, step, seq, &null);
    if (err == STORAGE_OK && null) {
        set_error("step %" PRId64 " is not in the session's log", step);
        err = STORAGE_ERANGE;
    }
    return err;
}

int64_t storage_ckpt_step(storage *st, int64_t id, const char *label)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = stmt(st, Q_CKPT_LABEL_STEP);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_text(s, 2, label, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int64_t out = rc == SQLITE_ROW    ? sqlite3_column_int64(s, 0)
                  : rc == SQLITE_DONE ? STORAGE_ENOTFOUND
                                      : sql_fail(st->db, rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->db_mu);
    return out;
}

int storage_locate(storage *st, int64_t id, int64_t step, int64_t *seq, char **config)
{
    clear_error();
    *config = NULL;
    pthread_mutex_lock(&st->db_mu);
    int err = exec_q(st, Q_BEGIN_READ);
    if (err == STORAGE_OK && step >= 0)
        err = step_seq(st, id, step, seq);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_NEWEST);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, *seq);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            if (sqlite3_column_type(s, 5) != SQLITE_NULL &&
                !(*config = dup_str((const char *)sqlite3_column_text(s, 5)))) {
                set_error("out of memory");
                err = STORAGE_ENOMEM;
            }
        } else if (rc == SQLITE_DONE) {
            set_error("no checkpoint at or before step %" PRId64 " is kept (the log behind the "
                      "oldest kept checkpoint is compacted)",
                      step);
            err = STORAGE_ERANGE;
        } else {
            err = sql_fail(st->db, rc);
        }
        sqlite3_reset(s);
    }
    rollback(st);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

int storage_rollback(storage *st, int64_t id, int64_t step, int64_t now_ms, int64_t *seq_out)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_ROLLBACK, .id = id, .step = step, .now_ms = now_ms};
    err = group_run(st, &j);
    if (err == STORAGE_OK && seq_out)
        *seq_out = j.seq;
    job_finish(st, &j, err);
    return err;
}

int storage_session_rename(storage *st, int64_t id, const char *name)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_RENAME, .id = id, .name = name};
    err = group_run(st, &j);
    job_finish(st, &j, err);
    return err;
}

/* ---------------------------------------------------------- step log */

int storage_append(storage *st, int64_t id, const storage_log_entry *e, const storage_iov *ckpt,
                   int n_ckpt)
{
    return storage_append_kept(st, id, e, ckpt, n_ckpt, NULL);
}

static void ckpt_meta(job *j, const storage_ckpt_meta *m)
{
    if (!m)
        return;
    j->ck.kind = m->kind;
    j->ck.label = m->label;
    j->ck.config = m->config;
    j->keep = m->keep;
}

int storage_append_kept(storage *st, int64_t id, const storage_log_entry *e,
                        const storage_iov *ckpt, int n_ckpt, const storage_ckpt_meta *m)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_APPEND, .id = id, .e = e, .now_ms = e->time_ms};
    if (n_ckpt > 0) {
        err = write_ckpt(st, ckpt, n_ckpt, &j.ck);
        ckpt_meta(&j, m);
        j.ck.seq = e->seq;
        j.ck.step = e->step;
    }
    if (err == STORAGE_OK && e->grad) {
        j.grad_crc = storage_crc32(0, e->grad, e->grad_len);
        if (e->grad_len > INLINE_MAX) {
            /* The bytes reach the segment before the row exists; a failed
             * commit leaves an unreferenced tail that nothing reads. */
            j.grad_in_file = true;
            err = append_segment(st, id, e->grad, e->grad_len, j.seg, sizeof j.seg, &j.grad_off);
        }
    }
    if (err == STORAGE_OK)
        err = group_run(st, &j);
    job_finish(st, &j, err);
    return err;
}

int storage_checkpoint(storage *st, int64_t id, const char *config, const storage_iov *ckpt,
                       int n_ckpt, int64_t ckpt_seq, int64_t step, int64_t now_ms)
{
    storage_ckpt_meta m = {.kind = config ? STORAGE_CKPT_ANCHOR : STORAGE_CKPT_AUTO,
                           .config = config};
    return storage_checkpoint_kept(st, id, config, ckpt, n_ckpt, ckpt_seq, step, now_ms, &m);
}

int storage_checkpoint_kept(storage *st, int64_t id, const char *config, const storage_iov *ckpt,
                            int n_ckpt, int64_t ckpt_seq, int64_t step, int64_t now_ms,
                            const storage_ckpt_meta *m)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_CHECKPOINT, .id = id, .config = config, .now_ms = now_ms};
    err = write_ckpt(st, ckpt, n_ckpt, &j.ck);
    ckpt_meta(&j, m);
    j.ck.seq = ckpt_seq;
    j.ck.step = step;
    if (err == STORAGE_OK)
        err = group_run(st, &j);
    job_finish(st, &j, err);
    return err;
}

int storage_idem_lookup(storage *st, int64_t id, const char *key, int64_t *step, double *lr,
                        int *kind, uint64_t *fp)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = stmt(st, Q_IDEM_GET);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_ROW    ? STORAGE_OK
              : rc == SQLITE_DONE ? STORAGE_ENOTFOUND
                                  : sql_fail(st->db, rc);
    if (rc == SQLITE_ROW) {
        if (step)
            *step = sqlite3_column_int64(s, 0);
        if (lr)
            *lr = column_double_or_nan(s, 1);
        if (kind)
            *kind = sqlite3_column_int(s, 2);
        if (fp)
            *fp = (uint64_t)sqlite3_column_int64(s, 3);
    }
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

int storage_idem_prune(storage *st, int64_t id, int64_t min_ms, int64_t keep)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    job j = {.kind = J_PRUNE, .id = id, .min_ms = min_ms, .keep = keep};
    err = group_run(st, &j);
    job_finish(st, &j, err);
    return err;
}

int storage_history(storage *st, int64_t id, int64_t after, int limit, storage_replay_fn fn,
                    void *ud)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = stmt(st, Q_HISTORY);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, after);
    sqlite3_bind_int(s, 3, limit);
    int rc, err = STORAGE_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        storage_log_entry e;
        read_entry(s, &e);
        int r = fn(ud, &e);
        if (r != 0) {
            err = r;
            break;
        }
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

/* ------------------------------------------------------------- checks */

int storage_integrity_ok(storage *st)
{
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s;
    int ok = 0;
    if (sqlite3_prepare_v2(st->db, "PRAGMA integrity_check", -1, &s, NULL) == SQLITE_OK) {
        if (sqlite3_step(s) == SQLITE_ROW) {
            const unsigned char *t = sqlite3_column_text(s, 0);
            ok = t && strcmp((const char *)t, "ok") == 0;
        }
        sqlite3_finalize(s);
    }
    /* every referenced file exists and is long enough */
    if (ok && sqlite3_prepare_v2(st->db,
                                 "SELECT file, len FROM checkpoints WHERE file IS NOT NULL"
                                 " UNION ALL SELECT file, off + len FROM steps"
                                 " WHERE file IS NOT NULL",
                                 -1, &s, NULL) == SQLITE_OK) {
        while (ok && sqlite3_step(s) == SQLITE_ROW) {
            char *p = path_join(st->dir, (const char *)sqlite3_column_text(s, 0));
            struct stat sb;
            ok = p && stat(p, &sb) == 0 && sb.st_size >= sqlite3_column_int64(s, 1);
            free(p);
        }
        sqlite3_finalize(s);
    }
    pthread_mutex_unlock(&st->db_mu);
    return ok;
}

/* The CRC-32 of len bytes of dir/file at off, or a negative code. */
static int crc_of_file(const char *dir, const char *file, int64_t off, size_t len,
                       uint32_t *crc)
{
    char *p = path_join(dir, file);
    int fd = p ? open(p, O_RDONLY | O_CLOEXEC) : -1;
    free(p);
    if (fd < 0)
        return -errno;
    unsigned char *buf = malloc(1 << 20);
    uint32_t c = 0;
    int r = buf ? 0 : -ENOMEM;
    while (r == 0 && len > 0) {
        size_t k = len < (1u << 20) ? len : (1u << 20);
        r = fault_pread(fd, buf, k, (off_t)off);
        c = storage_crc32(c, buf, k);
        off += (int64_t)k;
        len -= k;
    }
    free(buf);
    close(fd);
    *crc = c;
    return r;
}

int storage_check(const char *path, void *out_v)
{
    FILE *out = out_v;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        set_error("%s: %s", path, strerror(errno));
        return STORAGE_ENOTFOUND;
    }
    storage *st;
    int err = open_impl(path, STORAGE_SYNC_NORMAL, true, &st);
    if (err != STORAGE_OK)
        return err;
    int problems = 0;
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(st->db, "PRAGMA integrity_check", -1, &s, NULL) == SQLITE_OK) {
        while (sqlite3_step(s) == SQLITE_ROW) {
            const char *t = (const char *)sqlite3_column_text(s, 0);
            if (t && strcmp(t, "ok") != 0) {
                fprintf(out, "sqlite: %s\n", t);
                problems++;
            }
        }
        sqlite3_finalize(s);
    }
    /* sessions without a checkpoint */
    if (sqlite3_prepare_v2(st->db,
                           "SELECT name FROM sessions s WHERE NOT EXISTS"
                           " (SELECT 1 FROM checkpoints WHERE session_id = s.id)",
                           -1, &s, NULL) == SQLITE_OK) {
        while (sqlite3_step(s) == SQLITE_ROW) {
            fprintf(out, "session %s: no checkpoint\n", sqlite3_column_text(s, 0));
            problems++;
        }
        sqlite3_finalize(s);
    }
    /* every vector against its checksum */
    static const char *const vec_sql =
        "SELECT s.name, 'checkpoint', c.seq, c.len, c.crc, c.file, 0, c.data"
        " FROM checkpoints c JOIN sessions s ON s.id = c.session_id"
        " UNION ALL SELECT s.name, 'log row', l.seq, COALESCE(l.len, length(l.grad)), l.crc,"
        " l.file, l.off, l.grad FROM steps l JOIN sessions s ON s.id = l.session_id"
        " WHERE l.grad IS NOT NULL OR l.file IS NOT NULL";
    if (sqlite3_prepare_v2(st->db, vec_sql, -1, &s, NULL) == SQLITE_OK) {
        while (sqlite3_step(s) == SQLITE_ROW) {
            const char *name = (const char *)sqlite3_column_text(s, 0);
            const char *what = (const char *)sqlite3_column_text(s, 1);
            int64_t seq = sqlite3_column_int64(s, 2);
            size_t len = (size_t)sqlite3_column_int64(s, 3);
            bool has_crc = sqlite3_column_type(s, 4) != SQLITE_NULL;
            uint32_t want = (uint32_t)sqlite3_column_int64(s, 4);
            uint32_t got = 0;
            if (sqlite3_column_type(s, 5) != SQLITE_NULL) {
                const char *file = (const char *)sqlite3_column_text(s, 5);
                int r = crc_of_file(st->dir, file, sqlite3_column_int64(s, 6), len, &got);
                if (r) {
                    fprintf(out, "session %s: %s %" PRId64 ": file %s/%s: %s\n", name, what, seq,
                            st->dir, file, r == -ENODATA ? "too short" : strerror(-r));
                    problems++;
                    continue;
                }
            } else {
                size_t blen = (size_t)sqlite3_column_bytes(s, 7);
                if (blen != len) {
                    fprintf(out, "session %s: %s %" PRId64 ": %zu bytes, %zu expected\n", name,
                            what, seq, blen, len);
                    problems++;
                    continue;
                }
                got = storage_crc32(0, sqlite3_column_blob(s, 7), blen);
            }
            if (has_crc && got != want) {
                fprintf(out, "session %s: %s %" PRId64 ": checksum mismatch (stored %08x, "
                             "computed %08x)\n",
                        name, what, seq, want, got);
                problems++;
            }
        }
        sqlite3_finalize(s);
    }
    storage_close(st);
    return problems;
}

/* ------------------------------------------------------------ backup */

typedef struct {
    char *name;
    int fd;
} backup_file;

static void backup_files_close(backup_file *f, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (f[i].fd >= 0)
            close(f[i].fd);
        free(f[i].name);
    }
    free(f);
}

/* Under a read transaction of src: opens every file the snapshot
 * references.  STORAGE_ENOTFOUND when one was removed meanwhile (a newer
 * commit superseded it: the caller starts again). */
static int backup_open_files(sqlite3 *src, const char *dir, backup_file **out, size_t *n_out)
{
    sqlite3_stmt *s;
    int rc = sqlite3_prepare_v2(src,
                                "SELECT file FROM checkpoints WHERE file IS NOT NULL"
                                " UNION SELECT file FROM steps WHERE file IS NOT NULL",
                                -1, &s, NULL);
    if (rc != SQLITE_OK)
        return sql_fail(src, rc);
    backup_file *f = NULL;
    size_t n = 0, cap = 0;
    int err = STORAGE_OK;
    while (err == STORAGE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            backup_file *nf = realloc(f, cap * sizeof *f);
            if (!nf) {
                set_error("out of memory");
                err = STORAGE_ENOMEM;
                break;
            }
            f = nf;
        }
        f[n].name = dup_str((const char *)sqlite3_column_text(s, 0));
        char *p = f[n].name ? path_join(dir, f[n].name) : NULL;
        f[n].fd = p ? open(p, O_RDONLY | O_CLOEXEC) : -1;
        n++;
        if (!p) {
            set_error("out of memory");
            err = STORAGE_ENOMEM;
        } else if (f[n - 1].fd < 0) {
            err = errno == ENOENT ? STORAGE_ENOTFOUND : io_fail(-errno, "opening", p);
        }
        free(p);
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(src, rc);
    sqlite3_finalize(s);
    if (err != STORAGE_OK) {
        backup_files_close(f, n);
        return err;
    }
    *out = f;
    *n_out = n;
    return STORAGE_OK;
}

static int copy_fd(int in, const char *to)
{
    int out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0)
        return io_fail(-errno, "creating", to);
    static _Thread_local char buf[1 << 16];
    off_t off = 0;
    int err = STORAGE_OK;
    for (;;) {
        ssize_t k = pread(in, buf, sizeof buf, off);
        if (k < 0) {
            err = io_fail(-errno, "reading a file for", to);
            break;
        }
        if (k == 0)
            break;
        int r = fault_pwrite(out, buf, (size_t)k, off);
        if (r) {
            err = io_fail(r, "writing", to);
            break;
        }
        off += k;
    }
    if (err == STORAGE_OK && fault_fsync(out) != 0)
        err = io_fail(-errno, "syncing", to);
    close(out);
    return err;
}

int storage_backup(const char *path, const char *out, int64_t *bytes)
{
    clear_error();
    struct stat sb;
    size_t ol = strlen(out);
    char *tmp = malloc(ol + 8), *odir = malloc(ol + 8), *dir = malloc(strlen(path) + 3);
    if (!tmp || !odir || !dir) {
        free(tmp);
        free(odir);
        free(dir);
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    snprintf(tmp, ol + 8, "%s.tmp", out);
    snprintf(odir, ol + 8, "%s.d", out);
    snprintf(dir, strlen(path) + 3, "%s.d", path);
    int err = STORAGE_OK;
    if (stat(out, &sb) == 0 || stat(odir, &sb) == 0) {
        set_error("%s (or %s) exists; a backup writes a new file", out, odir);
        err = STORAGE_EEXIST;
    }
    sqlite3 *src = NULL, *dst = NULL;
    backup_file *files = NULL;
    size_t n_files = 0;
    int64_t total = 0;
    /* A file the snapshot references may be superseded and removed before
     * it is opened: then start again with a newer snapshot. */
    for (int attempt = 0; err == STORAGE_OK; attempt++) {
        int rc = sqlite3_open_v2(path, &src, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
        if (rc != SQLITE_OK) {
            err = sql_fail(src, rc);
            break;
        }
        sqlite3_busy_timeout(src, 10000);
        int64_t app = 0;
        if ((err = query_int(src, "PRAGMA application_id", &app)) != STORAGE_OK)
            break;
        if (app != OPTD_APPLICATION_ID) {
            set_error("%s is not an optd database", path);
            err = STORAGE_EFOREIGN;
            break;
        }
        rc = sqlite3_exec(src, "BEGIN; SELECT count(*) FROM sessions;", NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
            err = sql_fail(src, rc);
            break;
        }
        err = backup_open_files(src, dir, &files, &n_files);
        if (err == STORAGE_ENOTFOUND && attempt < 20) {
            sqlite3_exec(src, "ROLLBACK", NULL, NULL, NULL);
            sqlite3_close(src);
            src = NULL;
            err = STORAGE_OK;
            continue;
        }
        if (err != STORAGE_OK)
            break;
        unlink(tmp);
        rc = sqlite3_open_v2(tmp, &dst, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
        if (rc != SQLITE_OK) {
            err = sql_fail(dst, rc);
            break;
        }
        /* The copy is of the read transaction's snapshot: the same one
         * whose files are open. */
        sqlite3_backup *b = sqlite3_backup_init(dst, "main", src, "main");
        if (!b) {
            err = sql_fail(dst, sqlite3_errcode(dst));
            break;
        }
        rc = sqlite3_backup_step(b, -1);
        sqlite3_backup_finish(b);
        if (rc != SQLITE_DONE) {
            err = sql_fail(dst, rc);
            break;
        }
        break;
    }
    if (src) {
        sqlite3_exec(src, "ROLLBACK", NULL, NULL, NULL);
        sqlite3_close(src);
    }
    if (dst) {
        if (err == STORAGE_OK && sqlite3_exec(dst, "PRAGMA journal_mode=DELETE", NULL, NULL,
                                              NULL) != SQLITE_OK)
            err = sql_fail(dst, sqlite3_errcode(dst));
        sqlite3_close(dst);
    }
    if (err == STORAGE_OK && mkdir(odir, 0755) != 0)
        err = io_fail(-errno, "creating the directory", odir);
    for (size_t i = 0; err == STORAGE_OK && i < n_files; i++) {
        char *to = path_join(odir, files[i].name);
        err = to ? copy_fd(files[i].fd, to) : STORAGE_ENOMEM;
        if (to && stat(to, &sb) == 0)
            total += sb.st_size;
        free(to);
    }
    if (err == STORAGE_OK)
        err = sync_dir(odir);
    if (err == STORAGE_OK) {
        int fd = open(tmp, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fault_fsync(fd) != 0)
            err = io_fail(-errno, "syncing", tmp);
        if (fd >= 0)
            close(fd);
        if (stat(tmp, &sb) == 0)
            total += sb.st_size;
    }
    /* The database file appears last: a backup interrupted before this
     * has no OUT, only OUT.tmp and a partial OUT.d. */
    if (err == STORAGE_OK && rename(tmp, out) != 0)
        err = io_fail(-errno, "renaming", tmp);
    if (err != STORAGE_OK && err != STORAGE_EEXIST)
        unlink(tmp);
    backup_files_close(files, n_files);
    if (err == STORAGE_OK && bytes)
        *bytes = total;
    free(tmp);
    free(odir);
    free(dir);
    return err;
}

/* ------------------------------------------------------------- tokens */

/* The tokens table is small and written rarely (mint, revoke): each call
 * prepares its statement, runs it under db_mu in its own transaction. */
static int token_exec(storage *st, const char *sql, sqlite3_stmt **out)
{
    int rc = sqlite3_prepare_v2(st->db, sql, -1, out, NULL);
    return rc == SQLITE_OK ? STORAGE_OK : sql_fail(st->db, rc);
}

int storage_token_put(storage *st, const storage_token *t)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = NULL;
    err = token_exec(st,
                     "INSERT INTO tokens(id, hash, scope, prefix, label, created_ms, expires_ms,"
                     " revoked_ms, max_sessions, max_params, steps_per_second, burst)"
                     " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                     &s);
    if (err == STORAGE_OK) {
        sqlite3_bind_text(s, 1, t->id, -1, SQLITE_STATIC);
        sqlite3_bind_blob(s, 2, t->hash, STORAGE_TOKEN_HASH, SQLITE_STATIC);
        sqlite3_bind_text(s, 3, t->scope, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 4, t->prefix, -1, SQLITE_STATIC);
        if (t->label)
            sqlite3_bind_text(s, 5, t->label, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 6, t->created_ms);
        if (t->expires_ms)
            sqlite3_bind_int64(s, 7, t->expires_ms);
        if (t->revoked_ms)
            sqlite3_bind_int64(s, 8, t->revoked_ms);
        if (t->max_sessions)
            sqlite3_bind_int64(s, 9, t->max_sessions);
        if (t->max_params)
            sqlite3_bind_int64(s, 10, t->max_params);
        if (t->steps_per_second > 0) {
            sqlite3_bind_double(s, 11, t->steps_per_second);
            sqlite3_bind_double(s, 12, t->burst);
        }
        err = exec_stmt(st, s);
    }
    sqlite3_finalize(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

int storage_token_revoke(storage *st, const char *id, int64_t now_ms)
{
    int err = check_writable(st);
    if (err != STORAGE_OK)
        return err;
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = NULL;
    err = token_exec(st,
                     "UPDATE tokens SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE id = ?1", &s);
    if (err == STORAGE_OK) {
        sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 2, now_ms);
        err = exec_stmt(st, s);
        if (err == STORAGE_OK && sqlite3_changes(st->db) == 0) {
            set_error("no token %s", id);
            err = STORAGE_ENOTFOUND;
        }
    }
    sqlite3_finalize(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

int storage_token_each(storage *st, storage_token_fn fn, void *ud)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = NULL;
    int err = token_exec(st,
                         "SELECT id, hash, scope, prefix, label, created_ms, expires_ms,"
                         " revoked_ms, max_sessions, max_params, steps_per_second, burst"
                         " FROM tokens ORDER BY created_ms, id",
                         &s);
    int rc = SQLITE_DONE;
    while (err == STORAGE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        if (sqlite3_column_bytes(s, 1) != STORAGE_TOKEN_HASH) {
            set_error("token %s has a hash of %d bytes", sqlite3_column_text(s, 0),
                      sqlite3_column_bytes(s, 1));
            err = STORAGE_ECORRUPT;
            break;
        }
        storage_token t = {
            .id = (const char *)sqlite3_column_text(s, 0),
            .hash = sqlite3_column_blob(s, 1),
            .scope = (const char *)sqlite3_column_text(s, 2),
            .prefix = (const char *)sqlite3_column_text(s, 3),
            .label = (const char *)sqlite3_column_text(s, 4),
            .created_ms = sqlite3_column_int64(s, 5),
            .expires_ms = sqlite3_column_int64(s, 6),
            .revoked_ms = sqlite3_column_int64(s, 7),
            .max_sessions = sqlite3_column_int64(s, 8),
            .max_params = sqlite3_column_int64(s, 9),
            .steps_per_second = sqlite3_column_double(s, 10),
            .burst = sqlite3_column_double(s, 11),
        };
        err = fn(ud, &t);
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_finalize(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

int storage_owner_usage(storage *st, const char *owner, int64_t *sessions, int64_t *params)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = NULL;
    int err = token_exec(st,
                         "SELECT COUNT(*), COALESCE(SUM(params), 0) FROM sessions"
                         " WHERE created_by = ?1",
                         &s);
    if (err == STORAGE_OK) {
        sqlite3_bind_text(s, 1, owner, -1, SQLITE_STATIC);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            *sessions = sqlite3_column_int64(s, 0);
            *params = sqlite3_column_int64(s, 1);
        } else {
            err = sql_fail(st->db, rc);
        }
    }
    sqlite3_finalize(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}

int storage_session_list_prefix(storage *st, const char *prefix, const char *after, int limit,
                                 storage_session_info *infos)
{
    clear_error();
    pthread_mutex_lock(&st->db_mu);
    /* Names are ASCII below 0x7f: [prefix, prefix || 0x7f) is exactly the
     * names that start with prefix, one range of the name index. */
    sqlite3_stmt *s = NULL;
    int err = token_exec(st,
                         INFO_COLS " WHERE s.name > ?2 AND s.name >= ?3 AND s.name < ?3 ||"
                                   " char(127) ORDER BY s.name LIMIT ?1",
                         &s);
    if (err == STORAGE_OK) {
        sqlite3_bind_int(s, 1, limit);
        sqlite3_bind_text(s, 2, after ? after : "", -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 3, prefix, -1, SQLITE_STATIC);
        err = read_infos(st, s, limit, infos);
    }
    sqlite3_finalize(s);
    pthread_mutex_unlock(&st->db_mu);
    return err;
}
