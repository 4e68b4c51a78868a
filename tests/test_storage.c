/*
 * test_storage.c -- storage against a real SQLite file (and its vector
 * files) in a temporary directory: round trips inline and in files,
 * checksums, the process lock, foreign and vanished databases, disk full,
 * group commit across threads, and a fault loop (fail the Nth file
 * operation of a scenario, for every N, and check what remains).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "storage/storage.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define SMALL 1000     /* floats: stays inline in SQLite */
#define LARGE 100000   /* floats: 400 KB, goes to files  */

static char tmpdir[256];
static char dbpath[300];
static int db_counter;

static void new_db_path(void)
{
    snprintf(dbpath, sizeof dbpath, "%s/db%d.sqlite", tmpdir, ++db_counter);
}

static int setup_dir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/optd-test-storage-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static float *vec(size_t n, float seed)
{
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = seed + (float)i * 0.25f;
    return v;
}

/* A checkpoint in two pieces, as the engine writes it. */
typedef struct {
    float *a, *b;
    size_t n;
    storage_iov iov[2];
} ckpt;

static void ckpt_make(ckpt *c, size_t n, float seed)
{
    c->n = n;
    c->a = vec(n, seed);
    c->b = vec(n, seed + 1000.0f);
    c->iov[0] = (storage_iov){c->a, n * sizeof(float)};
    c->iov[1] = (storage_iov){c->b, n * sizeof(float)};
}

static void ckpt_free(ckpt *c)
{
    free(c->a);
    free(c->b);
}

/* What a load delivered. */
typedef struct {
    unsigned char *ck;
    size_t ck_len;
    int64_t ck_seq;
    int64_t seqs[64];
    float first[64]; /* first element of each replayed gradient */
    size_t grad_len[64];
    int n_rows;
    int pull; /* 0: all; 1: half of the checkpoint only */
} loaded;

static int on_ckpt(void *ud, storage_reader *r, size_t len, int64_t seq)
{
    loaded *l = ud;
    free(l->ck);
    l->ck = malloc(len ? len : 1);
    l->ck_len = len;
    l->ck_seq = seq;
    size_t want = l->pull ? len / 2 : len;
    /* in two pulls, to cross piece boundaries */
    int err = storage_read(r, l->ck, want / 3);
    if (err == 0)
        err = storage_read(r, l->ck + want / 3, want - want / 3);
    return err;
}

static int on_row(void *ud, const storage_log_entry *e)
{
    loaded *l = ud;
    if (l->n_rows >= 64)
        return -100;
    l->seqs[l->n_rows] = e->seq;
    l->grad_len[l->n_rows] = e->grad_len;
    l->first[l->n_rows] = e->grad ? ((const float *)e->grad)[0] : NAN;
    l->n_rows++;
    return 0;
}

static int load(storage *st, int64_t id, loaded *l)
{
    free(l->ck);
    memset(l, 0, sizeof *l);
    return storage_session_load(st, id, on_ckpt, on_row, l);
}

static storage_log_entry entry(int64_t seq, const float *g, size_t n)
{
    storage_log_entry e = {
        .seq = seq,
        .kind = STORAGE_LOG_STEP,
        .step = seq,
        .time_ms = 1000 + seq,
        .lr = 0.1,
        .factor = 1.0,
        .loss = NAN,
        .grad_norm = 1.0,
        .update_norm = 0.5,
        .grad = g,
        .grad_len = n * sizeof(float),
    };
    return e;
}

static int count_files(const char *suffix)
{
    char dir[320];
    snprintf(dir, sizeof dir, "%s.d", dbpath);
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *de;
    size_t sl = strlen(suffix);
    while ((de = readdir(d))) {
        size_t l = strlen(de->d_name);
        if (l > sl && strcmp(de->d_name + l - sl, suffix) == 0)
            n++;
    }
    closedir(d);
    return n;
}

/* Flips one byte at offset off of the first file in <db>.d ending in suffix. */
static void flip_file_byte(const char *suffix, off_t off)
{
    char dir[320];
    snprintf(dir, sizeof dir, "%s.d", dbpath);
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *de;
    size_t sl = strlen(suffix);
    char path[700] = "";
    while ((de = readdir(d))) {
        size_t l = strlen(de->d_name);
        if (l > sl && strcmp(de->d_name + l - sl, suffix) == 0) {
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            break;
        }
    }
    closedir(d);
    assert_true(path[0]);
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    unsigned char b;
    assert_int_equal(pread(fd, &b, 1, off), 1);
    b ^= 0x5a;
    assert_int_equal(pwrite(fd, &b, 1, off), 1);
    close(fd);
}

/* ------------------------------------------------------------- tests */

static void round_trip(size_t n)
{
    new_db_path();
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, n, 1.0f);
    int64_t id;
    assert_int_equal(storage_session_create(st, "s", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    assert_int_equal(storage_session_create(st, "s", "{}", 5, c.iov, 2, &id), STORAGE_EEXIST);
    assert_non_null(strstr(storage_last_error(), "exists"));
    for (int i = 1; i <= 3; i++) {
        float *g = vec(n, (float)i * 10.0f);
        storage_log_entry e = entry(i, g, n);
        e.idem_key = i == 2 ? "key-2" : NULL;
        e.idem_fp = 0xfeedfacecafebeefULL;
        assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_OK);
        free(g);
    }
    loaded l = {0};
    assert_int_equal(load(st, id, &l), STORAGE_OK);
    assert_int_equal(l.ck_len, 2 * n * sizeof(float));
    assert_int_equal(l.ck_seq, 0);
    assert_memory_equal(l.ck, c.a, n * sizeof(float));
    assert_memory_equal(l.ck + n * sizeof(float), c.b, n * sizeof(float));
    assert_int_equal(l.n_rows, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(l.seqs[i], i + 1);
        assert_int_equal(l.grad_len[i], n * sizeof(float));
        assert_true(l.first[i] == (float)(i + 1) * 10.0f);
    }
    int64_t step;
    int kind;
    uint64_t fp;
    assert_int_equal(storage_idem_lookup(st, id, "key-2", &step, NULL, &kind, &fp), STORAGE_OK);
    assert_int_equal(step, 2);
    assert_true(fp == 0xfeedfacecafebeefULL);
    assert_int_equal(storage_idem_lookup(st, id, "nope", &step, NULL, NULL, NULL),
                     STORAGE_ENOTFOUND);

    /* A checkpoint with the 4th row: the log behind it is no longer replayed. */
    ckpt c2;
    ckpt_make(&c2, n, 7.0f);
    float *g = vec(n, 40.0f);
    storage_log_entry e = entry(4, g, n);
    assert_int_equal(storage_append(st, id, &e, c2.iov, 2), STORAGE_OK);
    free(g);
    assert_int_equal(load(st, id, &l), STORAGE_OK);
    assert_int_equal(l.ck_seq, 4);
    assert_int_equal(l.n_rows, 0);
    assert_memory_equal(l.ck, c2.a, n * sizeof(float));
    if (n > SMALL) {
        assert_int_equal(count_files(".ckpt"), 1); /* the old one is gone */
        assert_int_equal(count_files(".seg"), 0);  /* covered by the checkpoint */
    }
    storage_session_info info;
    assert_int_equal(storage_session_get(st, "s", &info), STORAGE_OK);
    assert_int_equal(info.step, 4);
    storage_session_info_free(&info);
    assert_true(storage_integrity_ok(st));
    assert_int_equal(storage_session_delete(st, "s"), STORAGE_OK);
    assert_int_equal(storage_session_delete(st, "s"), STORAGE_ENOTFOUND);
    assert_int_equal(count_files(".ckpt") + count_files(".seg"), 0);
    storage_close(st);
    free(l.ck);
    ckpt_free(&c);
    ckpt_free(&c2);
}

static void test_round_trip_inline(void **state)
{
    (void)state;
    round_trip(SMALL);
}

static void test_round_trip_files(void **state)
{
    (void)state;
    round_trip(LARGE);
}

/* A reader that pulls only part of the checkpoint still gets it verified. */
static void test_partial_pull_verified(void **state)
{
    (void)state;
    new_db_path();
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, LARGE, 1.0f);
    int64_t id;
    assert_int_equal(storage_session_create(st, "p", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    flip_file_byte(".ckpt", (off_t)(c.n * 4 * 2 - 3)); /* in the part not pulled */
    loaded l = {.pull = 1};
    assert_int_equal(storage_session_load(st, id, on_ckpt, on_row, &l), STORAGE_ECORRUPT);
    assert_non_null(strstr(storage_last_error(), "checksum"));
    free(l.ck);
    storage_close(st);
    ckpt_free(&c);
}

static void test_checksums(void **state)
{
    (void)state;
    new_db_path();
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, LARGE, 1.0f);
    int64_t id_big, id_small, id_other;
    assert_int_equal(storage_session_create(st, "big", "{}", 5, c.iov, 2, &id_big), STORAGE_OK);
    ckpt cs;
    ckpt_make(&cs, SMALL, 2.0f);
    assert_int_equal(storage_session_create(st, "small", "{}", 5, cs.iov, 2, &id_small),
                     STORAGE_OK);
    assert_int_equal(storage_session_create(st, "other", "{}", 5, cs.iov, 2, &id_other),
                     STORAGE_OK);
    float *g = vec(LARGE, 3.0f);
    storage_log_entry e = entry(1, g, LARGE);
    assert_int_equal(storage_append(st, id_big, &e, NULL, 0), STORAGE_OK);
    e = entry(1, g, SMALL);
    assert_int_equal(storage_append(st, id_small, &e, NULL, 0), STORAGE_OK);
    free(g);
    storage_close(st);
    assert_int_equal(storage_check(dbpath, stderr), 0);

    /* a flipped byte in the segment: that session is damaged */
    flip_file_byte(".seg", 1000);
    /* a flipped byte inside the small session's inline gradient */
    sqlite3 *db;
    assert_int_equal(sqlite3_open(dbpath, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db,
                                  "UPDATE steps SET grad = substr(grad, 1, 10) ||"
                                  " x'00' || substr(grad, 12) WHERE session_id = 2",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);

    char out[4096] = "";
    FILE *f = fmemopen(out, sizeof out, "w");
    assert_int_equal(storage_check(dbpath, f), 2);
    fclose(f);
    assert_non_null(strstr(out, "session big: log row 1"));
    assert_non_null(strstr(out, "session small: log row 1"));

    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    loaded l = {0};
    assert_int_equal(load(st, id_big, &l), STORAGE_ECORRUPT);
    assert_int_equal(l.n_rows, 0); /* never served */
    assert_int_equal(load(st, id_small, &l), STORAGE_ECORRUPT);
    assert_int_equal(load(st, id_other, &l), STORAGE_OK); /* the others keep working */
    free(l.ck);
    storage_close(st);
    ckpt_free(&c);
    ckpt_free(&cs);
}

/* optd check --db FILE, the daemon binary's offline check. */
static int run_check(char *out, size_t cap)
{
    const char *bin = getenv("OPTD_BIN");
    char cmd[800];
    snprintf(cmd, sizeof cmd, "'%s' check --db '%s' 2>/dev/null", bin ? bin : "build/optd",
             dbpath);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int status = pclose(p);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

static void test_optd_check(void **state)
{
    (void)state;
    new_db_path();
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, LARGE, 1.0f);
    int64_t id;
    assert_int_equal(storage_session_create(st, "c", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    char out[2048];
    /* held by a running process: cannot be checked */
    assert_int_equal(run_check(out, sizeof out), 1);
    assert_non_null(strstr(out, "in use"));
    storage_close(st);
    assert_int_equal(run_check(out, sizeof out), 0);
    assert_string_equal(out, "");
    flip_file_byte(".ckpt", 17);
    assert_int_equal(run_check(out, sizeof out), 1);
    assert_non_null(strstr(out, "session c: checkpoint 0: checksum mismatch"));
    ckpt_free(&c);
}

/* A database written by optd before schema 4 (vectors inline, no
 * application_id) is recognised, migrated, and reads back. */
static void test_migrate_from_v3(void **state)
{
    (void)state;
    new_db_path();
    sqlite3 *db;
    assert_int_equal(sqlite3_open(dbpath, &db), SQLITE_OK);
    const char *v3 =
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL"
        " UNIQUE, config TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT"
        " NULL);"
        "CREATE TABLE checkpoints (session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON"
        " DELETE CASCADE, seq INTEGER NOT NULL, step INTEGER NOT NULL, data BLOB NOT NULL,"
        " crc INTEGER);"
        "CREATE TABLE steps (session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE"
        " CASCADE, seq INTEGER NOT NULL, kind INTEGER NOT NULL, step INTEGER NOT NULL,"
        " time_ms INTEGER NOT NULL, lr REAL, factor REAL, loss REAL, grad_norm REAL,"
        " update_norm REAL, worker TEXT, grad BLOB, crc INTEGER,"
        " PRIMARY KEY (session_id, seq)) WITHOUT ROWID;"
        "CREATE TABLE idem (session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE"
        " CASCADE, key TEXT NOT NULL, step INTEGER NOT NULL, time_ms INTEGER NOT NULL,"
        " kind INTEGER NOT NULL DEFAULT 0, fp INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (session_id, key)) WITHOUT ROWID;"
        "INSERT INTO sessions VALUES (1, 'old', '{}', 1, 1);"
        "INSERT INTO checkpoints VALUES (1, 0, 0, x'0102030405060708', NULL);"
        "INSERT INTO steps VALUES (1, 1, 0, 1, 5, 0.1, 1, NULL, 1, 1, NULL,"
        " x'0000803f00000040', NULL);"
        "INSERT INTO idem VALUES (1, 'k', 1, 5, 0, 0);"
        "PRAGMA user_version = 3;";
    assert_int_equal(sqlite3_exec(db, v3, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    storage_session_info info;
    assert_int_equal(storage_session_get(st, "old", &info), STORAGE_OK);
    assert_int_equal(info.step, 1);
    loaded l = {0};
    assert_int_equal(storage_session_load(st, info.id, on_ckpt, on_row, &l), STORAGE_OK);
    assert_int_equal(l.ck_len, 8);
    assert_int_equal(l.ck[7], 8);
    assert_int_equal(l.n_rows, 1);
    assert_true(l.first[0] == 1.0f);
    /* and it goes on from there */
    float *g = vec(SMALL, 1.0f);
    storage_log_entry e = entry(2, g, SMALL);
    assert_int_equal(storage_append(st, info.id, &e, NULL, 0), STORAGE_OK);
    free(g);
    storage_session_info_free(&info);
    free(l.ck);
    storage_close(st);
    assert_int_equal(sqlite3_open(dbpath, &db), SQLITE_OK);
    sqlite3_stmt *s;
    sqlite3_prepare_v2(db, "PRAGMA application_id", -1, &s, NULL);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(s, 0), 0x6f707464);
    sqlite3_finalize(s);
    sqlite3_close(db);
    assert_int_equal(storage_check(dbpath, stderr), 0);
}

/* A second daemon on a database in use refuses to start, naming the pid. */
static void test_second_daemon_refused(void **state)
{
    (void)state;
    new_db_path();
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    const char *bin = getenv("OPTD_BIN");
    char cmd[800];
    snprintf(cmd, sizeof cmd,
             "timeout 20 '%s' --bind 127.0.0.1 --port 0 --db '%s' </dev/null 2>&1",
             bin ? bin : "build/optd", dbpath);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char out[2048];
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    int status = pclose(p);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 1);
    char pid[32];
    snprintf(pid, sizeof pid, "pid %ld", (long)getpid());
    assert_non_null(strstr(out, pid));
    storage_close(st);
}

static void test_lock(void **state)
{
    (void)state;
    new_db_path();
    storage *a, *b;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &a), STORAGE_OK);
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &b), STORAGE_ELOCKED);
    char pid[32];
    snprintf(pid, sizeof pid, "pid %ld", (long)getpid());
    assert_non_null(strstr(storage_last_error(), pid));
    assert_int_equal(storage_check(dbpath, stderr), STORAGE_ELOCKED);
    storage_close(a);
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &b), STORAGE_OK);
    storage_close(b);
}

static void test_foreign_and_empty(void **state)
{
    (void)state;
    /* a 0-byte file becomes a new database */
    new_db_path();
    int fd = open(dbpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    close(fd);
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    storage_close(st);

    /* another application's SQLite file is refused and left untouched */
    new_db_path();
    sqlite3 *db;
    assert_int_equal(sqlite3_open(dbpath, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "CREATE TABLE t(x); INSERT INTO t VALUES (1);", NULL, NULL,
                                  NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    struct stat before, after;
    stat(dbpath, &before);
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_EFOREIGN);
    assert_non_null(strstr(storage_last_error(), "another application"));
    stat(dbpath, &after);
    assert_int_equal(before.st_size, after.st_size);
    assert_int_equal(sqlite3_open(dbpath, &db), SQLITE_OK);
    sqlite3_stmt *s;
    sqlite3_prepare_v2(db, "SELECT count(*) FROM sqlite_schema", -1, &s, NULL);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(s, 0), 1); /* no optd tables added */
    sqlite3_finalize(s);
    sqlite3_close(db);

    /* a file that is not SQLite at all */
    new_db_path();
    FILE *f = fopen(dbpath, "w");
    for (int i = 0; i < 200; i++)
        fputs("this is not a database\n", f);
    fclose(f);
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_EFOREIGN);
    assert_non_null(strstr(storage_last_error(), "not an SQLite database"));
}

static void gone_case(bool replace)
{
    new_db_path();
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, SMALL, 1.0f);
    int64_t id;
    assert_int_equal(storage_session_create(st, "g", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    if (replace) {
        char other[320];
        snprintf(other, sizeof other, "%s.other", dbpath);
        FILE *f = fopen(other, "w");
        fclose(f);
        assert_int_equal(rename(other, dbpath), 0);
    } else {
        assert_int_equal(unlink(dbpath), 0);
    }
    float *g = vec(SMALL, 1.0f);
    storage_log_entry e = entry(1, g, SMALL);
    assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_EGONE);
    assert_non_null(strstr(storage_last_error(), "deleted or replaced"));
    e = entry(2, g, SMALL);
    assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_EGONE); /* from then on */
    assert_int_equal(storage_session_delete(st, "g"), STORAGE_EGONE);
    free(g);
    storage_close(st);
    ckpt_free(&c);
}

static void test_gone_deleted(void **state)
{
    (void)state;
    gone_case(false);
}

static void test_gone_replaced(void **state)
{
    (void)state;
    gone_case(true);
}

static void test_disk_full(void **state)
{
    (void)state;
    new_db_path();
    storage_fault_config("count");
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, SMALL, 1.0f);
    int64_t id;
    assert_int_equal(storage_session_create(st, "f", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    float *g = vec(LARGE, 1.0f);
    for (int which = 0; which < 2; which++) {
        /* which 0: the segment write fails; 1: SQLite's write fails */
        storage_fault_config(which == 0 ? "write:1:ENOSPC:persist" : "write:2:ENOSPC:persist");
        storage_log_entry e = entry(1, g, which == 0 ? LARGE : SMALL);
        assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_EFULL);
        assert_non_null(strstr(storage_last_error(), "disk full"));
        storage_fault_counts fc;
        storage_fault_stats(&fc);
        assert_true(fc.injected > 0);
    }
    /* space is back: writes work again, nothing of the failed ones shows,
     * and the WAL was given back */
    storage_fault_config("count");
    storage_log_entry e = entry(1, g, LARGE);
    assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_OK);
    char wal[320];
    snprintf(wal, sizeof wal, "%s-wal", dbpath);
    struct stat sb;
    assert_int_equal(stat(wal, &sb), 0);
    assert_int_equal(sb.st_size, 0);
    loaded l = {0};
    assert_int_equal(load(st, id, &l), STORAGE_OK);
    assert_int_equal(l.n_rows, 1);
    assert_true(storage_integrity_ok(st));
    free(l.ck);
    storage_close(st);
    storage_fault_config(NULL);
    free(g);
    ckpt_free(&c);
}

/* Real ENOSPC-like failure without the hooks: a file-size limit in a
 * child process (EFBIG), reported as disk full. */
static void test_file_size_limit(void **state)
{
    (void)state;
    new_db_path();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        storage *st;
        if (storage_open(dbpath, STORAGE_SYNC_NORMAL, &st) != STORAGE_OK)
            _exit(10);
        ckpt c;
        ckpt_make(&c, SMALL, 1.0f);
        int64_t id;
        if (storage_session_create(st, "z", "{}", 5, c.iov, 2, &id) != STORAGE_OK)
            _exit(11);
        struct rlimit rl = {.rlim_cur = 200000, .rlim_max = RLIM_INFINITY};
        setrlimit(RLIMIT_FSIZE, &rl);
        float *g = vec(LARGE, 1.0f);
        storage_log_entry e = entry(1, g, LARGE);
        int err = storage_append(st, id, &e, NULL, 0);
        if (err != STORAGE_EFULL || !strstr(storage_last_error(), "disk full"))
            _exit(12);
        rl.rlim_cur = RLIM_INFINITY;
        setrlimit(RLIMIT_FSIZE, &rl);
        if (storage_append(st, id, &e, NULL, 0) != STORAGE_OK)
            _exit(13);
        storage_close(st);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(storage_check(dbpath, stderr), 0);
}

/* Under FULL every acknowledged write was synced before its answer. */
static void test_full_syncs_before_ack(void **state)
{
    (void)state;
    new_db_path();
    storage_fault_config("count");
    storage *st;
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_FULL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, LARGE, 1.0f);
    int64_t id;
    storage_fault_counts a, b;
    storage_fault_stats(&a);
    assert_int_equal(storage_session_create(st, "y", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    storage_fault_stats(&b);
    assert_true(b.syncs >= a.syncs + 3); /* file, directory, WAL */
    float *g = vec(LARGE, 1.0f);
    for (int i = 1; i <= 3; i++) {
        storage_fault_stats(&a);
        storage_log_entry e = entry(i, g, i == 2 ? SMALL : LARGE);
        if (i == 2)
            e.kind = STORAGE_LOG_ACCUM;
        assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_OK);
        storage_fault_stats(&b);
        assert_true(b.syncs >= a.syncs + (i == 2 ? 1 : 2)); /* (segment +) WAL */
    }
    storage_close(st);

    /* and NORMAL does not sync per write */
    new_db_path();
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
    assert_int_equal(storage_session_create(st, "y", "{}", 5, c.iov, 2, &id), STORAGE_OK);
    storage_fault_stats(&a);
    storage_log_entry e = entry(1, g, LARGE);
    assert_int_equal(storage_append(st, id, &e, NULL, 0), STORAGE_OK);
    storage_fault_stats(&b);
    assert_int_equal(b.syncs, a.syncs);
    storage_close(st);
    storage_fault_config(NULL);
    free(g);
    ckpt_free(&c);
}

/* ------------------------------------------------------ group commit */

typedef struct {
    storage *st;
    int64_t id;
    int n;
    int bad_at; /* this thread sends a duplicate seq at this step, or 0 */
    int ok, failed;
} appender;

static void *append_thread(void *arg)
{
    appender *a = arg;
    float *g = vec(SMALL, 1.0f);
    int64_t seq = 1;
    for (int i = 1; i <= a->n; i++) {
        storage_log_entry e = entry(i == a->bad_at ? seq - 1 : seq, g, SMALL);
        int err = storage_append(a->st, a->id, &e, NULL, 0);
        if (err == STORAGE_OK) {
            a->ok++;
            seq++;
        } else {
            a->failed++;
        }
    }
    free(g);
    return NULL;
}

static void test_group_commit_threads(void **state)
{
    (void)state;
    new_db_path();
    storage *st;
    storage_fault_config("count"); /* before open: the shim VFS counts SQLite's syncs */
    assert_int_equal(storage_open(dbpath, STORAGE_SYNC_FULL, &st), STORAGE_OK);
    ckpt c;
    ckpt_make(&c, SMALL, 1.0f);
    enum { T = 6, N = 30 };
    appender ap[T];
    pthread_t th[T];
    for (int t = 0; t < T; t++) {
        char name[16];
        snprintf(name, sizeof name, "t%d", t);
        ap[t] = (appender){.st = st, .n = N, .bad_at = t == 0 ? 10 : 0};
        assert_int_equal(storage_session_create(st, name, "{}", 5, c.iov, 2, &ap[t].id),
                         STORAGE_OK);
    }
    storage_fault_counts a, b;
    storage_fault_stats(&a);
    for (int t = 0; t < T; t++)
        pthread_create(&th[t], NULL, append_thread, &ap[t]);
    for (int t = 0; t < T; t++)
        pthread_join(th[t], NULL);
    storage_fault_stats(&b);
    storage_fault_config(NULL);
    /* a measurement, not a promise: how many appends shared a commit */
    printf("[ group    ] %d appends from %d threads, %llu syncs\n", T * N, T,
           (unsigned long long)(b.syncs - a.syncs));
    /* one session's constraint failure fails nobody else */
    assert_int_equal(ap[0].failed, 1);
    assert_int_equal(ap[0].ok, N - 1);
    for (int t = 1; t < T; t++) {
        assert_int_equal(ap[t].failed, 0);
        assert_int_equal(ap[t].ok, N);
    }
    for (int t = 0; t < T; t++) {
        loaded l = {0};
        assert_int_equal(storage_session_load(st, ap[t].id, on_ckpt, on_row, &l), STORAGE_OK);
        assert_int_equal(l.n_rows, ap[t].ok);
        for (int i = 0; i < l.n_rows; i++)
            assert_int_equal(l.seqs[i], i + 1);
        free(l.ck);
    }
    assert_true(storage_integrity_ok(st));
    storage_close(st);
    ckpt_free(&c);
}

/* Faults while several threads' appends share commits: whatever batches
 * form, each thread's acknowledged appends are on disk and its failed
 * ones are not (a job that makes SQLite roll the whole transaction back
 * fails its batch as one). */
typedef struct {
    storage *st;
    int64_t id;
    int64_t acked; /* last acknowledged seq */
    size_t n;      /* gradient size */
} fault_appender;

static void *fault_append_thread(void *arg)
{
    fault_appender *a = arg;
    float *g = vec(a->n, 2.0f);
    for (int i = 0; i < 12; i++) {
        storage_log_entry e = entry(a->acked + 1, g, a->n);
        if (storage_append(a->st, a->id, &e, NULL, 0) == STORAGE_OK)
            a->acked++;
    }
    free(g);
    return NULL;
}

static void test_fault_group_commit(void **state)
{
    (void)state;
    enum { T = 4 };
    static const char *const kinds[] = {"write", "sync", "read"};
    for (int n = 1; n <= 60; n += 2) {
        new_db_path();
        storage_fault_config("count");
        storage *st;
        storage_durability dur = n % 3 == 1 ? STORAGE_SYNC_FULL : STORAGE_SYNC_NORMAL;
        assert_int_equal(storage_open(dbpath, dur, &st), STORAGE_OK);
        ckpt c;
        ckpt_make(&c, SMALL, 1.0f);
        fault_appender fa[T];
        pthread_t th[T];
        for (int t = 0; t < T; t++) {
            char name[16];
            snprintf(name, sizeof name, "f%d", t);
            fa[t] = (fault_appender){.st = st, .n = t % 2 ? LARGE : SMALL};
            assert_int_equal(storage_session_create(st, name, "{}", 5, c.iov, 2, &fa[t].id),
                             STORAGE_OK);
        }
        char spec[48];
        snprintf(spec, sizeof spec, "%s:%d:%s", kinds[n % 3], n, n % 4 == 1 ? "ENOSPC" : "EIO");
        storage_fault_config(spec);
        for (int t = 0; t < T; t++)
            pthread_create(&th[t], NULL, fault_append_thread, &fa[t]);
        for (int t = 0; t < T; t++)
            pthread_join(th[t], NULL);
        storage_fault_config(NULL);
        storage_close(st);
        assert_int_equal(storage_open(dbpath, STORAGE_SYNC_FULL, &st), STORAGE_OK);
        assert_true(storage_integrity_ok(st));
        for (int t = 0; t < T; t++) {
            loaded l = {0};
            assert_int_equal(storage_session_load(st, fa[t].id, on_ckpt, on_row, &l),
                             STORAGE_OK);
            assert_int_equal(l.n_rows, fa[t].acked);
            free(l.ck);
        }
        storage_close(st);
        ckpt_free(&c);
    }
}

/* kill -9 of a process appending large vectors (files) at a random moment:
 * every acknowledged append is there after a restart, in order, with its
 * own bytes, and the database checks clean.  Five rounds on one database. */
static void test_kill9_files(void **state)
{
    (void)state;
    new_db_path();
    unsigned seed = (unsigned)getpid();
    int64_t acked_total = 0;
    for (int round = 0; round < 5; round++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(fds[0]);
            storage *st;
            if (storage_open(dbpath, STORAGE_SYNC_NORMAL, &st) != STORAGE_OK)
                _exit(10);
            storage_session_info info;
            int64_t id, seq = 0;
            ckpt c;
            ckpt_make(&c, LARGE, 1.0f);
            if (storage_session_get(st, "k", &info) == STORAGE_OK) {
                id = info.id;
                seq = info.step;
                storage_session_info_free(&info);
            } else if (storage_session_create(st, "k", "{}", 5, c.iov, 2, &id) != STORAGE_OK) {
                _exit(11);
            }
            float *g = vec(LARGE, 0.0f);
            for (;;) {
                seq++;
                g[0] = (float)seq;
                storage_log_entry e = entry(seq, g, LARGE);
                bool ck = seq % 6 == 0;
                if (storage_append(st, id, &e, ck ? c.iov : NULL, ck ? 2 : 0) != STORAGE_OK)
                    _exit(12);
                if (write(fds[1], &seq, sizeof seq) != (ssize_t)sizeof seq)
                    _exit(13);
            }
        }
        close(fds[1]);
        /* Kill at a random moment after the child's first acknowledged
         * append of this round (a slow machine or a sanitizer build must
         * not turn the round into a kill before any work). */
        int64_t v;
        if (read(fds[0], &v, sizeof v) == (ssize_t)sizeof v)
            acked_total = v;
        usleep(30000 + (unsigned)(rand_r(&seed) % 200000));
        kill(pid, SIGKILL);
        int status;
        waitpid(pid, &status, 0);
        assert_true(WIFSIGNALED(status));
        while (read(fds[0], &v, sizeof v) == (ssize_t)sizeof v)
            acked_total = v;
        close(fds[0]);

        storage *st;
        assert_int_equal(storage_open(dbpath, STORAGE_SYNC_NORMAL, &st), STORAGE_OK);
        storage_session_info info;
        int err = storage_session_get(st, "k", &info);
        if (err == STORAGE_ENOTFOUND && acked_total == 0) {
            storage_close(st); /* killed before its create was committed */
            continue;
        }
        assert_int_equal(err, STORAGE_OK);
        /* every acknowledged append, and at most the one in flight */
        assert_true(info.step >= acked_total && info.step <= acked_total + 1);
        loaded l = {0};
        assert_int_equal(storage_session_load(st, info.id, on_ckpt, on_row, &l), STORAGE_OK);
        assert_int_equal(l.ck_seq + l.n_rows, info.step);
        for (int i = 0; i < l.n_rows; i++) {
            assert_int_equal(l.seqs[i], l.ck_seq + 1 + i);
            assert_true(l.first[i] == (float)l.seqs[i]);
        }
        acked_total = info.step;
        storage_session_info_free(&info);
        free(l.ck);
        storage_close(st);
        assert_int_equal(storage_check(dbpath, stderr), 0);
    }
    assert_true(acked_total > 5);
}

/* ------------------------------------------------------- fault loop */

/* The scenario: create two sessions (one large), append to both, a
 * checkpoint, more appends, a delete.  Returns how many operations
 * succeeded; stops at the first failure (as a caller would drop the
 * session).  expect[] receives, per session, the seq it must load at. */
static int scenario(storage *st, int64_t ids[2], int64_t last_seq[2], bool ok_ops[16])
{
    ckpt big, small;
    ckpt_make(&big, LARGE, 1.0f);
    ckpt_make(&small, SMALL, 2.0f);
    float *g = vec(LARGE, 5.0f);
    int n_ok = 0, op = 0;
    int err = storage_session_create(st, "big", "{}", 5, big.iov, 2, &ids[0]);
    ok_ops[op++] = err == STORAGE_OK;
    if (err == STORAGE_OK)
        err = storage_session_create(st, "small", "{}", 5, small.iov, 2, &ids[1]);
    ok_ops[op++] = err == STORAGE_OK;
    for (int i = 1; i <= 4 && err == STORAGE_OK; i++) {
        storage_log_entry e = entry(i, g, LARGE);
        err = storage_append(st, ids[0], &e, i == 3 ? big.iov : NULL, i == 3 ? 2 : 0);
        ok_ops[op++] = err == STORAGE_OK;
        if (err == STORAGE_OK) {
            last_seq[0] = i;
            e = entry(i, g, SMALL);
            err = storage_append(st, ids[1], &e, NULL, 0);
            ok_ops[op++] = err == STORAGE_OK;
            if (err == STORAGE_OK)
                last_seq[1] = i;
        }
    }
    if (err == STORAGE_OK) {
        err = storage_checkpoint(st, ids[1], "{\"x\":1}", small.iov, 2, last_seq[1], 4, 9);
        ok_ops[op++] = err == STORAGE_OK;
    }
    if (err == STORAGE_OK) {
        /* a load reads the checkpoint file and the segment */
        loaded l = {0};
        err = storage_session_load(st, ids[0], on_ckpt, on_row, &l);
        free(l.ck);
    }
    for (int i = 0; i < op; i++)
        n_ok += ok_ops[i];
    free(g);
    ckpt_free(&big);
    ckpt_free(&small);
    return err == STORAGE_OK ? -1 : n_ok;
}

static void test_fault_loop(void **state)
{
    (void)state;
    static const char *const kinds[] = {"write", "sync", "read", "any"};
    for (int k = 0; k < 4; k++) {
        for (int n = 1; n < 400; n++) {
            new_db_path();
            storage_fault_config("count");
            storage *st;
            /* FULL where syncs are the subject; NORMAL keeps the others quick */
            storage_durability dur = k == 1 ? STORAGE_SYNC_FULL : STORAGE_SYNC_NORMAL;
            assert_int_equal(storage_open(dbpath, dur, &st), STORAGE_OK);
            char spec[64];
            snprintf(spec, sizeof spec, "%s:%d:%s", kinds[k], n, n % 2 ? "EIO" : "ENOSPC");
            assert_int_equal(storage_fault_config(spec), 0);
            int64_t ids[2] = {0, 0}, last[2] = {0, 0};
            bool ok_ops[16] = {0};
            int r = scenario(st, ids, last, ok_ops);
            storage_fault_counts fc;
            storage_fault_stats(&fc);
            storage_fault_config(NULL);
            storage_close(st);
            /* reopened without faults: sound, and what was acknowledged is
             * there, and nothing else */
            assert_int_equal(storage_check(dbpath, stderr), 0);
            assert_int_equal(storage_open(dbpath, dur, &st), STORAGE_OK);
            assert_true(storage_integrity_ok(st));
            for (int s = 0; s < 2; s++) {
                storage_session_info info;
                int err = storage_session_get(st, s == 0 ? "big" : "small", &info);
                if (!ok_ops[s]) {
                    assert_int_equal(err, STORAGE_ENOTFOUND);
                    continue;
                }
                assert_int_equal(err, STORAGE_OK);
                loaded l = {0};
                assert_int_equal(storage_session_load(st, info.id, on_ckpt, on_row, &l),
                                 STORAGE_OK);
                int64_t top = l.n_rows ? l.seqs[l.n_rows - 1] : l.ck_seq;
                assert_int_equal(top, last[s]);
                assert_int_equal(info.step, last[s]);
                storage_session_info_free(&info);
                free(l.ck);
            }
            storage_close(st);
            if (r < 0) {
                /* the scenario ran through: every N was tried */
                printf("[ faults   ] %s: the scenario fails at each of its %d operations\n",
                       kinds[k], n - 1);
                break;
            }
            assert_true(fc.injected >= 1);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_inline),
        cmocka_unit_test(test_round_trip_files),
        cmocka_unit_test(test_partial_pull_verified),
        cmocka_unit_test(test_checksums),
        cmocka_unit_test(test_migrate_from_v3),
        cmocka_unit_test(test_lock),
        cmocka_unit_test(test_second_daemon_refused),
        cmocka_unit_test(test_optd_check),
        cmocka_unit_test(test_foreign_and_empty),
        cmocka_unit_test(test_gone_deleted),
        cmocka_unit_test(test_gone_replaced),
        cmocka_unit_test(test_disk_full),
        cmocka_unit_test(test_file_size_limit),
        cmocka_unit_test(test_full_syncs_before_ack),
        cmocka_unit_test(test_group_commit_threads),
        cmocka_unit_test(test_kill9_files),
        cmocka_unit_test(test_fault_group_commit),
        cmocka_unit_test(test_fault_loop),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
