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
#include <stdlib.h>
#include <string.h>

#define SCHEMA_VERSION 2

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
    [Q_CKPT_INSERT] = "INSERT INTO checkpoints(session_id, seq, step, data) VALUES (?1, 0, 0, ?2)",
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
    [Q_CKPT_GET] = "SELECT seq, data FROM checkpoints WHERE session_id = ?1",
    [Q_CKPT_REPLACE] = "UPDATE checkpoints SET seq = ?2, step = ?3, data = ?4 WHERE session_id = ?1",
    [Q_LOG_AFTER] =
        "SELECT seq, kind, step, time_ms, lr, factor, loss, grad_norm, update_norm, worker, grad"
        " FROM steps WHERE session_id = ?1 AND seq > ?2 ORDER BY seq",
    [Q_LOG_INSERT] =
        "INSERT INTO steps(session_id, seq, kind, step, time_ms, lr, factor, loss, grad_norm,"
        " update_norm, worker, grad) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    [Q_LOG_DROP_GRAD] =
        "UPDATE steps SET grad = NULL WHERE session_id = ?1 AND seq <= ?2 AND grad IS NOT NULL"
        " AND seq > (SELECT seq FROM checkpoints WHERE session_id = ?1)",
    [Q_IDEM_INSERT] = "INSERT OR IGNORE INTO idem(session_id, key, step, time_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
    [Q_IDEM_GET] =
        "SELECT i.step, (SELECT lr FROM steps WHERE session_id = i.session_id AND step = i.step"
        "                AND kind = 0), i.kind"
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
};

struct storage {
    sqlite3 *db;
    pthread_mutex_t mu;
    sqlite3_stmt *q[Q_COUNT];
};

static int rc_to_err(int rc)
{
    switch (rc) {
    case SQLITE_OK:
    case SQLITE_DONE:
    case SQLITE_ROW:
        return STORAGE_OK;
    case SQLITE_NOMEM:
        return STORAGE_ENOMEM;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return STORAGE_ECORRUPT;
    case SQLITE_CONSTRAINT:
        return STORAGE_EEXIST;
    default:
        return STORAGE_EIO;
    }
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
static int exec_stmt(sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    return rc == SQLITE_DONE ? STORAGE_OK : rc_to_err(rc);
}

static int begin(storage *st)
{
    return exec_stmt(stmt(st, Q_BEGIN));
}

static int commit(storage *st)
{
    int rc = exec_stmt(stmt(st, Q_COMMIT));
    if (rc != STORAGE_OK)
        exec_stmt(stmt(st, Q_ROLLBACK));
    return rc;
}

static void rollback(storage *st)
{
    if (!sqlite3_get_autocommit(st->db))
        exec_stmt(stmt(st, Q_ROLLBACK));
}

static int migrate(sqlite3 *db)
{
    sqlite3_stmt *s;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &s, NULL) != SQLITE_OK)
        return STORAGE_EIO;
    int version = 0;
    if (sqlite3_step(s) == SQLITE_ROW)
        version = sqlite3_column_int(s, 0);
    sqlite3_finalize(s);
    if (version > SCHEMA_VERSION)
        return STORAGE_ECORRUPT; /* written by a newer optd */
    for (int v = version; v < SCHEMA_VERSION; v++) {
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", v + 1);
        if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
            return STORAGE_EIO;
        if (sqlite3_exec(db, migrations[v], NULL, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(db, pragma, NULL, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return STORAGE_EIO;
        }
    }
    return STORAGE_OK;
}

int storage_open(const char *path, storage_durability d, storage **out, char **errmsg)
{
    *out = NULL;
    if (errmsg)
        *errmsg = NULL;
    storage *st = calloc(1, sizeof *st);
    if (!st)
        return STORAGE_ENOMEM;
    int rc = sqlite3_open_v2(path, &st->db,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             NULL);
    /* WAL checkpoints run inside a commit, under the storage lock: with
     * SQLite's default (every 1000 pages) they stall a step every ~140
     * steps.  Every 16384 pages (64 MiB at 4 KiB) they are rarer; the page
     * cache (64 MiB) keeps large sessions' rows from spilling mid-insert.
     * bench/HTTP.md has the measurements. */
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
    int err = rc == SQLITE_OK ? migrate(st->db) : rc_to_err(rc);
    for (int i = 0; err == STORAGE_OK && i < Q_COUNT; i++) {
        if (sqlite3_prepare_v3(st->db, sql_text[i], -1, SQLITE_PREPARE_PERSISTENT, &st->q[i],
                               NULL) != SQLITE_OK)
            err = STORAGE_EIO;
    }
    if (err != STORAGE_OK) {
        if (errmsg && err == STORAGE_ECORRUPT && rc == SQLITE_OK)
            *errmsg = dup_str("the database's schema is newer than this optd (or not optd's)");
        else if (errmsg)
            *errmsg = dup_str(st->db ? sqlite3_errmsg(st->db) : "out of memory");
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

const char *storage_errmsg(storage *st)
{
    return sqlite3_errmsg(st->db);
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

void storage_session_info_free(storage_session_info *info)
{
    if (!info)
        return;
    free(info->name);
    free(info->config);
    info->name = info->config = NULL;
}

int storage_session_create(storage *st, const char *name, const char *config, int64_t now_ms,
                           const void *ckpt, size_t ckpt_len, int64_t *id_out)
{
    pthread_mutex_lock(&st->mu);
    int err = begin(st);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_SESSION_INSERT);
        sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, config, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, now_ms);
        err = exec_stmt(s);
    }
    int64_t id = sqlite3_last_insert_rowid(st->db);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, Q_CKPT_INSERT);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_blob64(s, 2, ckpt, ckpt_len, SQLITE_STATIC);
        err = exec_stmt(s);
    }
    if (err == STORAGE_OK)
        err = commit(st);
    else
        rollback(st);
    if (err == STORAGE_OK && id_out)
        *id_out = id;
    pthread_mutex_unlock(&st->mu);
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
        return STORAGE_ENOMEM;
    }
    return STORAGE_OK;
}

int storage_session_get(storage *st, const char *name, storage_session_info *info)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_SESSION_GET);
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_ROW ? read_info(s, info)
              : rc == SQLITE_DONE ? STORAGE_ENOTFOUND
                                  : rc_to_err(rc);
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_session_list(storage *st, const char *after, int limit, storage_session_info *infos)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, after ? Q_SESSION_LIST_AFTER : Q_SESSION_LIST);
    sqlite3_bind_int(s, 1, limit);
    if (after)
        sqlite3_bind_text(s, 2, after, -1, SQLITE_STATIC);
    int n = 0, rc;
    while (n < limit && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        int err = read_info(s, &infos[n]);
        if (err != STORAGE_OK) {
            while (n > 0)
                storage_session_info_free(&infos[--n]);
            sqlite3_reset(s);
            pthread_mutex_unlock(&st->mu);
            return err;
        }
        n++;
    }
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->mu);
    return n;
}

int storage_session_delete(storage *st, const char *name)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_SESSION_DELETE);
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    int err = exec_stmt(s);
    if (err == STORAGE_OK && sqlite3_changes(st->db) == 0)
        err = STORAGE_ENOTFOUND;
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
 * first non-zero return.  Resets the statement. */
static int walk_rows(sqlite3_stmt *s, bool with_grad, storage_replay_fn fn, void *ud)
{
    int rc, err = STORAGE_OK;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        storage_log_entry e;
        read_entry(s, &e, with_grad);
        int r = fn(ud, &e);
        if (r != 0) {
            err = r;
            break;
        }
    }
    if (err == STORAGE_OK && rc != SQLITE_DONE)
        err = rc_to_err(rc);
    sqlite3_reset(s);
    return err;
}

int storage_session_load(storage *st, int64_t id, storage_ckpt_fn ckpt,
                         storage_replay_fn replay, void *ud)
{
    pthread_mutex_lock(&st->mu);
    /* A transaction so that the checkpoint and the log agree. */
    int err = exec_stmt(stmt(st, Q_BEGIN));
    int64_t seq = 0;
    sqlite3_stmt *s = stmt(st, Q_CKPT_GET);
    sqlite3_bind_int64(s, 1, id);
    int rc = err == STORAGE_OK ? sqlite3_step(s) : SQLITE_ERROR;
    if (rc == SQLITE_ROW) {
        seq = sqlite3_column_int64(s, 0);
        const void *blob = sqlite3_column_blob(s, 1);
        size_t n = (size_t)sqlite3_column_bytes(s, 1);
        err = ckpt(ud, blob, n, seq);
    } else if (err == STORAGE_OK) {
        err = rc == SQLITE_DONE ? STORAGE_ENOTFOUND : rc_to_err(rc);
    }
    sqlite3_reset(s);
    if (err == STORAGE_OK) {
        s = stmt(st, Q_LOG_AFTER);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, seq);
        err = walk_rows(s, true, replay, ud);
    }
    rollback(st);
    pthread_mutex_unlock(&st->mu);
    return err;
}

static int replace_ckpt(storage *st, int64_t id, const void *ckpt, size_t len, int64_t seq,
                        int64_t step)
{
    /* Drop the replay data the new checkpoint covers: only the rows after
     * the old checkpoint still have any, so the scan stays bounded (run it
     * before the checkpoint row changes). */
    sqlite3_stmt *s = stmt(st, Q_LOG_DROP_GRAD);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, seq);
    int err = exec_stmt(s);
    if (err == STORAGE_OK) {
        s = stmt(st, Q_CKPT_REPLACE);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_int64(s, 2, seq);
        sqlite3_bind_int64(s, 3, step);
        sqlite3_bind_blob64(s, 4, ckpt, len, SQLITE_STATIC);
        err = exec_stmt(s);
        if (err == STORAGE_OK && sqlite3_changes(st->db) == 0)
            err = STORAGE_ENOTFOUND;
    }
    return err;
}

static void bind_double_or_null(sqlite3_stmt *s, int i, double v)
{
    if (isfinite(v))
        sqlite3_bind_double(s, i, v);
    else
        sqlite3_bind_null(s, i);
}

int storage_append(storage *st, int64_t id, const storage_log_entry *e, const void *ckpt,
                   size_t ckpt_len)
{
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
        if (e->grad && !ckpt)
            sqlite3_bind_blob64(s, 12, e->grad, e->grad_len, SQLITE_STATIC);
        err = exec_stmt(s);
    }
    for (size_t k = 0; err == STORAGE_OK && k <= e->n_more_keys; k++) {
        const char *key = k == 0 ? e->idem_key : e->more_keys[k - 1];
        if (!key)
            continue;
        sqlite3_stmt *s = stmt(st, Q_IDEM_INSERT);
        sqlite3_bind_int64(s, 1, id);
        sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, e->step);
        sqlite3_bind_int64(s, 4, e->time_ms);
        sqlite3_bind_int(s, 5, e->kind);
        err = exec_stmt(s);
    }
    if (err == STORAGE_OK && ckpt)
        err = replace_ckpt(st, id, ckpt, ckpt_len, e->seq, e->step);
    if (err == STORAGE_OK)
        err = commit(st);
    else
        rollback(st);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_checkpoint(storage *st, int64_t id, const char *config, const void *ckpt,
                       size_t ckpt_len, int64_t ckpt_seq, int64_t step, int64_t now_ms)
{
    pthread_mutex_lock(&st->mu);
    int err = begin(st);
    if (err == STORAGE_OK)
        err = replace_ckpt(st, id, ckpt, ckpt_len, ckpt_seq, step);
    if (err == STORAGE_OK) {
        sqlite3_stmt *s = stmt(st, config ? Q_SESSION_SET_CONFIG : Q_SESSION_TOUCH);
        sqlite3_bind_int64(s, 1, id);
        if (config) {
            sqlite3_bind_text(s, 2, config, -1, SQLITE_STATIC);
            sqlite3_bind_int64(s, 3, now_ms);
        } else {
            sqlite3_bind_int64(s, 2, now_ms);
        }
        err = exec_stmt(s);
    }
    if (err == STORAGE_OK)
        err = commit(st);
    else
        rollback(st);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_idem_lookup(storage *st, int64_t id, const char *key, int64_t *step, double *lr,
                        int *kind)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_IDEM_GET);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_text(s, 2, key, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    int err = rc == SQLITE_ROW ? STORAGE_OK : rc == SQLITE_DONE ? STORAGE_ENOTFOUND : rc_to_err(rc);
    if (rc == SQLITE_ROW) {
        *step = sqlite3_column_int64(s, 0);
        if (lr)
            *lr = column_double_or_nan(s, 1);
        if (kind)
            *kind = sqlite3_column_int(s, 2);
    }
    sqlite3_reset(s);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_idem_prune(storage *st, int64_t id, int64_t min_ms, int64_t keep)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_IDEM_PRUNE);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, min_ms);
    sqlite3_bind_int64(s, 3, keep);
    int err = exec_stmt(s);
    pthread_mutex_unlock(&st->mu);
    return err;
}

int storage_history(storage *st, int64_t id, int64_t after, int limit, storage_replay_fn fn,
                    void *ud)
{
    pthread_mutex_lock(&st->mu);
    sqlite3_stmt *s = stmt(st, Q_HISTORY);
    sqlite3_bind_int64(s, 1, id);
    sqlite3_bind_int64(s, 2, after);
    sqlite3_bind_int(s, 3, limit);
    int err = walk_rows(s, false, fn, ud);
    pthread_mutex_unlock(&st->mu);
    return err;
}
