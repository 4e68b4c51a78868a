/*
 * storage.c -- the SQLite side of optd (see storage.h and docs/storage.md).
 *
 * One connection, serialised by a mutex: SQLite has a single writer anyway,
 * and every optd write is a short transaction.  WAL mode; synchronous
 * NORMAL survives a process crash, FULL survives power loss.  Every
 * statement is prepared once at open.
 */
#include "storage/storage.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define SCHEMA_VERSION 3

enum {
    Q_BEGIN,
    Q_COMMIT,
    Q_ROLLBACK,
    Q_SESSION_INSERT,
    Q_CKPT_INSERT,
    Q_SESSION_GET,
    Q_SESSION_LIST,
    Q_SESSION_LIST_AFTER,
    Q_SESSION_DELETE,
    Q_SESSION_TOUCH,
    Q_SESSION_SET_CONFIG,
    Q_CKPT_GET,
    Q_CKPT_REPLACE,
    Q_LOG_AFTER,
    Q_LOG_INSERT,
    Q_LOG_DROP_GRAD,
    Q_IDEM_INSERT,
    Q_IDEM_GET,
    Q_IDEM_PRUNE,
    Q_HISTORY,
    Q_COUNT
};

static const char *const sql_text[Q_COUNT] = {
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SESSION_INSERT] =
        "INSERT INTO sessions(name, config, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?3)",
    [Q_CKPT_INSERT] =
        "INSERT INTO checkpoints(session_id, seq, step, data, crc) VALUES (?1, 0, 0, zeroblob(?2), ?3)",
    [Q_SESSION_GET] =
        "SELECT s.id, s.name, s.config, s.created_ms,"
        " MAX(s.updated_ms, COALESCE((SELECT time_ms FROM steps WHERE session_id = s.id"
        "                             ORDER BY seq DESC LIMIT 1), 0)),"
        " COALESCE((SELECT step FROM steps WHERE session_id = s.id ORDER BY seq DESC LIMIT 1),"
        "          c.step)"
        " FROM sessions s JOIN checkpoints c ON c.session_id = s.id WHERE s.name = ?1",
    [Q_SESSION_LIST] =
        "SELECT s.id, s.name, s.config, s.created_ms,"
        " MAX(s.updated_ms, COALESCE((SELECT time_ms FROM steps WHERE session_id = s.id"
        "                             ORDER BY seq DESC LIMIT 1), 0)),"
        " COALESCE((SELECT step FROM steps WHERE session_id = s.id ORDER BY seq DESC LIMIT 1),"
        "          c.step)"
        " FROM sessions s JOIN checkpoints c ON c.session_id = s.id ORDER BY s.name LIMIT ?1",
    [Q_SESSION_LIST_AFTER] =
        "SELECT s.id, s.name, s.config, s.created_ms,"
        " MAX(s.updated_ms, COALESCE((SELECT time_ms FROM steps WHERE session_id = s.id"
        "                             ORDER BY seq DESC LIMIT 1), 0)),"
        " COALESCE((SELECT step FROM steps WHERE session_id = s.id ORDER BY seq DESC LIMIT 1),"
        "          c.step)"
        " FROM sessions s JOIN checkpoints c ON c.session_id = s.id WHERE s.name > ?2"
        " ORDER BY s.name LIMIT ?1",
    [Q_SESSION_DELETE] = "DELETE FROM sessions WHERE name = ?1",
    [Q_SESSION_TOUCH] = "UPDATE sessions SET updated_ms = ?2 WHERE id = ?1",
    [Q_SESSION_SET_CONFIG] = "UPDATE sessions SET config = ?2, updated_ms = ?3 WHERE id = ?1",
    [Q_CKPT_GET] = "SELECT seq, length(data), crc FROM checkpoints WHERE session_id = ?1",
    [Q_CKPT_REPLACE] = "UPDATE checkpoints SET seq = ?2, step = ?3, data = zeroblob(?4), crc = ?5"
                       " WHERE session_id = ?1",
    [Q_LOG_AFTER] =
        "SELECT seq, kind, step, time_ms, lr, factor, loss, grad_norm, update_norm, worker, grad,"
        " crc FROM steps WHERE session_id = ?1 AND seq > ?2 ORDER BY seq",
    [Q_LOG_INSERT] =
        "INSERT INTO steps(session_id, seq, kind, step, time_ms, lr, factor, loss, grad_norm,"
        " update_norm, worker, grad, crc)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    [Q_LOG_DROP_GRAD] =
        "UPDATE steps SET grad = NULL WHERE session_id = ?1 AND seq <= ?2 AND grad IS NOT NULL"
        " AND seq > (SELECT seq FROM checkpoints WHERE session_id = ?1)",
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
};

struct storage {
    sqlite3 *db;
    pthread_mutex_t mu;
    sqlite3_stmt *q[Q_COUNT];
};

struct storage_reader {
    sqlite3_blob *blob;
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

/* Records the connection's error for a failed SQLite call (the message is
 * read at once, while the lock is still held) and returns its code. */
static int sql_fail(sqlite3 *db, int rc)
{
    int err = rc_to_err(rc);
    if (err == STORAGE_OK)
        return err;
    const char *m = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    if (err == STORAGE_EFULL)
        set_error("disk full (%s)", m);
    else
        set_error("%s (%s)", m, storage_strerror(err));
    return err;
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

static int begin(storage *st)
{
    return exec_stmt(st, stmt(st, Q_BEGIN));
}

static void rollback(storage *st)
{
    if (!sqlite3_get_autocommit(st->db)) {
        sqlite3_stmt *s = stmt(st, Q_ROLLBACK);
        sqlite3_step(s);
        sqlite3_reset(s);
    }
}

static int commit(storage *st)
{
    int err = exec_stmt(st, stmt(st, Q_COMMIT));
    if (err != STORAGE_OK)
        rollback(st);
    return err;
}

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
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", v + 1);
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

int storage_open(const char *path, storage_durability d, storage **out)
{
    clear_error();
    *out = NULL;
    storage *st = calloc(1, sizeof *st);
    if (!st) {
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    int rc = sqlite3_open_v2(path, &st->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    const char *pragmas = d == STORAGE_SYNC_FULL
                              ? "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                                " PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint=16384;"
                                " PRAGMA cache_size=-65536;"
                              : "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                                " PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint=16384;"
                                " PRAGMA cache_size=-65536;";
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(st->db, 5000);
        rc = sqlite3_exec(st->db, pragmas, NULL, NULL, NULL);
    }
    int err = rc == SQLITE_OK ? migrate(st->db) : sql_fail(st->db, rc);
    for (int i = 0; err == STORAGE_OK && i < Q_COUNT; i++) {
        rc = sqlite3_prepare_v3(st->db, sql_text[i], -1, SQLITE_PREPARE_PERSISTENT, &st->q[i],
                                NULL);
        if (rc != SQLITE_OK)
            err = sql_fail(st->db, rc);
    }
    if (err != STORAGE_OK) {
        storage_close(st);
        return err;
    }
    pthread_mutex_init(&st->mu, NULL);
    *out = st;
    return STORAGE_OK;
}

void storage_close(storage *st)
{
    if (!st)
        return;
    for (int i = 0; i < Q_COUNT; i++)
        sqlite3_finalize(st->q[i]);
    if (st->db) {
        /* A clean close checkpoints the WAL into the main file. */
        sqlite3_close(st->db);
        pthread_mutex_destroy(&st->mu);
    }
    free(st);
}

int storage_integrity_ok(storage *st)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s;
    int ok = 0;
    if (sqlite3_prepare_v2(st->db, "PRAGMA integrity_check", -1, &s, NULL) == SQLITE_OK) {
        if (sqlite3_step(s) == SQLITE_ROW) {
            const unsigned char *t = sqlite3_column_text(s, 0);
            ok = t && strcmp((const char *)t, "ok") == 0;
        }
        sqlite3_finalize(s);
    }
    pthread_mutex_unlock(&st->mu);
    return ok;
}

int storage_check(const char *path, void *out)
{
    storage *st;
    int err = storage_open(path, STORAGE_SYNC_NORMAL, &st);
    if (err != STORAGE_OK)
        return err;
    int bad = storage_integrity_ok(st) ? 0 : 1;
    if (bad)
        fprintf(out, "%s: PRAGMA integrity_check failed\n", path);
    storage_close(st);
    return bad;
}

void storage_session_info_free(storage_session_info *info)
{
    if (!info)
        return;
    free(info->name);
    free(info->config);
    info->name = info->config = NULL;
}

static size_t iov_total(const storage_iov *v, int n)
{
    size_t t = 0;
    for (int i = 0; i < n; i++)
        t += v[i].len;
    return t;
}

static uint32_t iov_crc(const storage_iov *v, int n)
{
    uint32_t c = 0;
    for (int i = 0; i < n; i++)
        c = storage_crc32(c, v[i].base, v[i].len);
    return c;
}

/* Writes the pieces into the zeroblob of the checkpoint row of session id
 * (its rowid), without concatenating them. */
static int write_ckpt_blob(storage *st, int64_t id, const storage_iov *v, int n)
{
    sqlite3_blob *b;
    int rc = sqlite3_blob_open(st->db, "main", "checkpoints", "data", id, 1, &b);
    if (rc != SQLITE_OK)
        return sql_fail(st->db, rc);
    size_t off = 0;
    for (int i = 0; i < n && rc == SQLITE_OK; i++) {
        const char *p = v[i].base;
        size_t left = v[i].len;
        while (left > 0 && rc == SQLITE_OK) {
            int chunk = left > (1u << 30) ? (1 << 30) : (int)left;
            rc = sqlite3_blob_write(b, p, chunk, (int)off);
            p += chunk;
            off += (size_t)chunk;
            left -= (size_t)chunk;
        }
    }
    int err = rc == SQLITE_OK ? STORAGE_OK : sql_fail(st->db, rc);
    sqlite3_blob_close(b);
    return err;
}

int storage_session_create(storage *st, const char *name, const char *config, int64_t now_ms,
                           const storage_iov *ckpt, int n_ckpt, int64_t *id_out)
{
    clear_error();
    size_t total = iov_total(ckpt, n_ckpt);
    if (total > INT32_MAX) {
        set_error("a checkpoint of %zu bytes is larger than the store allows", total);
        return STORAGE_EIO;
    }
    pthread_mutex_lock(&st->mu);
    int err = begin(st);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_SESSION_INSERT);
        sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, config, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, now_ms);
        err = exec_stmt(st, s);
    }
    int64_t id = sqlite3_last_insert_rowid(st->db);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_INSERT);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, (sqlite3_int64)total);
        sqlite3_bind_int64(s, 3, iov_crc(ckpt, n_ckpt));
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK)
        err = write_ckpt_blob(st, id, ckpt, n_ckpt);
    if (err == STORAGE_OK)
        err = commit(st);
    else
        rollback(st);
    if (err == STORAGE_OK && id_out)
        *id_out = id;
    pthread_mutex_unlock(&st->mu);
    if (err == STORAGE_EEXIST)
        set_error("a session named %s exists", name);
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
    if (!info->name || !info->config) {
        storage_session_info_free(info);
        set_error("out of memory");
        return STORAGE_ENOMEM;
    }
    return STORAGE_OK;
}

int storage_session_get(storage *st, const char *name, storage_session_info *info)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_SESSION_GET);
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_ROW ? read_info(s, info)
              : rc == SQLITE_DONE ? STORAGE_ENOTFOUND
                                  : sql_fail(st->db, rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->mu);
    if (err == STORAGE_ENOTFOUND)
        set_error("no session named %s", name);
    return err;
}

int storage_session_list(storage *st, const char *after, int limit, storage_session_info *infos)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, after ? Q_SESSION_LIST_AFTER : Q_SESSION_LIST);
    sqlite3_bind_int(s, 1, limit);
    if (after)
        sqlite3_bind_text(s, 2, after, -1, SQLITE_STATIC);
    int n = 0, rc = SQLITE_DONE, err = STORAGE_OK;
    while (n < limit && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        if ((err = read_info(s, &infos[n])) != STORAGE_OK)
            break;
        n++;
    }
    if (err == STORAGE_OK && rc != SQLITE_ROW && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->mu);
    if (err != STORAGE_OK) {
        while (n > 0)
            storage_session_info_free(&infos[--n]);
        return err;
    }
    return n;
}

int storage_session_delete(storage *st, const char *name)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_SESSION_DELETE);
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int err = exec_stmt(st, s);
    if (err == STORAGE_OK && sqlite3_changes(st->db) == 0) {
        err = STORAGE_ENOTFOUND;
        set_error("no session named %s", name);
    }
    pthread_mutex_unlock(&st->mu);
    return err;
}

static double column_double_or_nan(sqlite3_stmt *s, int col)
{
    return sqlite3_column_type(s, col) == SQLITE_NULL ? NAN : sqlite3_column_double(s, col);
}

static void read_entry(sqlite3_stmt *s, storage_log_entry *e, bool with_grad)
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
    if (with_grad) {
        e->grad = sqlite3_column_blob(s, 10);
        e->grad_len = (size_t)sqlite3_column_bytes(s, 10);
    }
}

/* Steps a bound row query, calling fn for each log row; stops on the
 * first non-zero return.  With gradients, each is verified against its
 * checksum before the callback.  Resets the statement. */
static int walk_rows(storage *st, sqlite3_stmt *s, bool with_grad, storage_replay_fn fn, void *ud)
{
    int rc, err = STORAGE_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        storage_log_entry e;
        read_entry(s, &e, with_grad);
        if (with_grad && e.grad && sqlite3_column_type(s, 11) != SQLITE_NULL &&
            storage_crc32(0, e.grad, e.grad_len) != (uint32_t)sqlite3_column_int64(s, 11)) {
            set_error("the gradient of log row %lld fails its checksum", (long long)e.seq);
            err = STORAGE_ECORRUPT;
            break;
        }
        int r = fn(ud, &e);
        if (r != 0) {
            err = r;
            break;
        }
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = sql_fail(st->db, rc);
    sqlite3_reset(s);
    return err;
}

int storage_read(storage_reader *r, void *dst, size_t n)
{
    if (r->err)
        return r->err;
    if (n > r->len - r->off) {
        set_error("a read past the end of the checkpoint (%zu + %zu > %zu bytes)", r->off, n,
                  r->len);
        return r->err = STORAGE_ECORRUPT;
    }
    char *p = dst;
    size_t left = n;
    while (left > 0) {
        int chunk = left > (1u << 30) ? (1 << 30) : (int)left;
        int rc = sqlite3_blob_read(r->blob, p, chunk, (int)r->off);
        if (rc != SQLITE_OK) {
            set_error("reading the checkpoint: %s", sqlite3_errstr(rc));
            return r->err = rc_to_err(rc);
        }
        r->crc = storage_crc32(r->crc, p, (size_t)chunk);
        p += chunk;
        r->off += (size_t)chunk;
        left -= (size_t)chunk;
    }
    return STORAGE_OK;
}

int storage_session_load(storage *st, int64_t id, storage_ckpt_fn ckpt,
                         storage_replay_fn replay, void *ud)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    /* A transaction so that the checkpoint and the log agree. */
    int err = begin(st);
    int64_t seq = 0;
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_GET);
        sqlite3_bind_int64(s, 1, id);
        int rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            seq = sqlite3_column_int64(s, 0);
            size_t len = (size_t)sqlite3_column_int64(s, 1);
            bool has_crc = sqlite3_column_type(s, 2) != SQLITE_NULL;
            uint32_t want = (uint32_t)sqlite3_column_int64(s, 2);
            sqlite3_reset(s);
            storage_reader r = {.len = len};
            rc = sqlite3_blob_open(st->db, "main", "checkpoints", "data", id, 0, &r.blob);
            if (rc != SQLITE_OK) {
                err = sql_fail(st->db, rc);
            } else {
                err = ckpt(ud, &r, len, seq);
                if (err == STORAGE_OK && r.err)
                    err = r.err;
                if (err == STORAGE_OK && (r.off != len || (has_crc && r.crc != want))) {
                    set_error("the checkpoint of session %lld fails its checksum",
                              (long long)id);
                    err = STORAGE_ECORRUPT;
                }
                sqlite3_blob_close(r.blob);
            }
        } else {
            err = rc == SQLITE_DONE ? STORAGE_ENOTFOUND : sql_fail(st->db, rc);
            if (err == STORAGE_ENOTFOUND)
                set_error("session %lld has no checkpoint", (long long)id);
        }
        sqlite3_reset(s);
    }
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_LOG_AFTER);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, seq);
        err = walk_rows(st, s, true, replay, ud);
    }
    rollback(st);
    pthread_mutex_unlock(&st->mu);
    return err;
}

static int replace_ckpt(storage *st, int64_t id, const storage_iov *ckpt, int n_ckpt,
                        int64_t seq, int64_t step)
{
    size_t total = iov_total(ckpt, n_ckpt);
    if (total > INT32_MAX) {
        set_error("a checkpoint of %zu bytes is larger than the store allows", total);
        return STORAGE_EIO;
    }
    /* Drop the replay data the new checkpoint covers: only the rows after
     * the old checkpoint still have any, so the scan stays bounded (run it
     * before the checkpoint row changes). */
    sqlite3_stmt *s = stmt(st, Q_LOG_DROP_GRAD);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, seq);
    int err = exec_stmt(st, s);
    if (err == STORAGE_OK) {
        s = stmt(st, Q_CKPT_REPLACE);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, seq);
        sqlite3_bind_int64(s, 3, step);
        sqlite3_bind_int64(s, 4, (sqlite3_int64)total);
        sqlite3_bind_int64(s, 5, iov_crc(ckpt, n_ckpt));
        err = exec_stmt(st, s);
        if (err == STORAGE_OK && sqlite3_changes(st->db) == 0) {
            set_error("session %lld does not exist", (long long)id);
            err = STORAGE_ENOTFOUND;
        }
    }
    if (err == STORAGE_OK)
        err = write_ckpt_blob(st, id, ckpt, n_ckpt);
    return err;
}

static void bind_double_or_null(sqlite3_stmt *s, int i, double v)
{
    if (isfinite(v))
        sqlite3_bind_double(s, i, v);
    else
        sqlite3_bind_null(s, i);
}

int storage_append(storage *st, int64_t id, const storage_log_entry *e, const storage_iov *ckpt,
                   int n_ckpt)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    int err = begin(st);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_LOG_INSERT);
        sqlite3_bind_int64(s, 1, id);
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
        /* The replay data is not needed when this row is checkpointed at once. */
        if (e->grad && n_ckpt == 0) {
            sqlite3_bind_blob64(s, 12, e->grad, e->grad_len, SQLITE_STATIC);
            sqlite3_bind_int64(s, 13, storage_crc32(0, e->grad, e->grad_len));
        }
        err = exec_stmt(st, s);
    }
    for (size_t k = 0; err == STORAGE_OK && k <= e->n_more_keys; k++) {
        const char *key = k == 0 ? e->idem_key : e->more_keys[k - 1];
        if (!key)
            continue;
        uint64_t fp = k == 0 ? e->idem_fp : e->more_fps ? e->more_fps[k - 1] : 0;
        sqlite3_stmt *s = stmt(st, Q_IDEM_INSERT);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, e->step);
        sqlite3_bind_int64(s, 4, e->time_ms);
        sqlite3_bind_int(s, 5, e->kind);
        sqlite3_bind_int64(s, 6, (sqlite3_int64)fp);
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK && n_ckpt > 0)
        err = replace_ckpt(st, id, ckpt, n_ckpt, e->seq, e->step);
    if (err == STORAGE_OK)
        err = commit(st);
    else
        rollback(st);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_checkpoint(storage *st, int64_t id, const char *config, const storage_iov *ckpt,
                       int n_ckpt, int64_t ckpt_seq, int64_t step, int64_t now_ms)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    int err = begin(st);
    if (err == STORAGE_OK)
        err = replace_ckpt(st, id, ckpt, n_ckpt, ckpt_seq, step);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, config ? Q_SESSION_SET_CONFIG : Q_SESSION_TOUCH);
        sqlite3_bind_int64(s, 1, id);
        if (config) {
            sqlite3_bind_text(s, 2, config, -1, SQLITE_STATIC);
            sqlite3_bind_int64(s, 3, now_ms);
        } else {
            sqlite3_bind_int64(s, 2, now_ms);
        }
        err = exec_stmt(st, s);
    }
    if (err == STORAGE_OK)
        err = commit(st);
    else
        rollback(st);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_idem_lookup(storage *st, int64_t id, const char *key, int64_t *step, double *lr,
                        int *kind, uint64_t *fp)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_IDEM_GET);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_ROW ? STORAGE_OK
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
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_idem_prune(storage *st, int64_t id, int64_t min_ms, int64_t keep)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_IDEM_PRUNE);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, min_ms);
    sqlite3_bind_int64(s, 3, keep);
    int err = exec_stmt(st, s);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_history(storage *st, int64_t id, int64_t after, int limit, storage_replay_fn fn,
                    void *ud)
{
    clear_error();
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_HISTORY);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, after);
    sqlite3_bind_int(s, 3, limit);
    int err = walk_rows(st, s, false, fn, ud);
    pthread_mutex_unlock(&st->mu);
    return err;
}
