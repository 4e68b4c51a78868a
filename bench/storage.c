/*
 * bench/storage.c -- where should large vectors live?  Appends float32
 * gradients of 1e6 and 1e7 elements and writes checkpoints of three times
 * that, in three ways, and prints p50 / mean / p99 per operation:
 *
 *   floor   the same bytes with plain write() to one file (fdatasync'd
 *           under full): what the disk costs, the same run
 *   sqlite  SQLite only, tuned: secure_delete=OFF, 64 KiB pages, WAL with
 *           automatic checkpoints off and a background connection
 *           checkpointing, vectors written by incremental blob I/O into a
 *           zeroblob (no copy of the vector)
 *   files   gradients appended to a segment file and checkpoints written to
 *           a new file then renamed (fdatasync'd, and the directory synced,
 *           under full); SQLite holds one small row per operation with the
 *           reference (file, offset, length, crc32)
 *   optd    storage_append() itself, as the daemon calls it (inline up to
 *           256 KiB, files above), checkpoint with every 6th append
 *
 * Last, a small session's appends alone and beside another session writing
 * 1e7-element gradients, through storage_append().
 *
 * Usage: bench/storage [DIR] (default ./build/bench-storage).  Each size
 * runs under synchronous NORMAL and FULL.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "storage/storage.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "bench/storage: %s: %s\n", what, why);
    exit(1);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *what, double *t, int n)
{
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += t[i];
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    int p99 = (int)((double)(n - 1) * 0.99 + 0.5);
    printf("  %-28s n=%3d  p50 %9.2f ms  mean %9.2f ms  p99 %9.2f ms\n", what, n,
           t[n / 2] * 1e3, sum / n * 1e3, t[p99] * 1e3);
}

static void write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write", strerror(errno));
        }
        c += w;
        n -= (size_t)w;
    }
}

static void exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK)
        die(sql, msg ? msg : "?");
}

/* ------------------------------------------------------------ floor */

static void run_floor(const char *dir, const float *v, size_t n, bool full, int reps,
                      double *t)
{
    char path[512];
    snprintf(path, sizeof path, "%s/floor.bin", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (fd < 0)
        die(path, strerror(errno));
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        write_all(fd, v, n * sizeof *v);
        if (full)
            fdatasync(fd);
        t[i] = now_s() - t0;
    }
    close(fd);
    unlink(path);
}

/* ------------------------------------------------------------ sqlite */

typedef struct {
    const char *path;
    volatile int stop;
} ckpt_thread;

/* The background connection: moves WAL frames into the database file and
 * restarts the WAL, outside the writers' transactions. */
static void *wal_checkpointer(void *arg)
{
    ckpt_thread *c = arg;
    sqlite3 *db;
    if (sqlite3_open(c->path, &db) != SQLITE_OK)
        return NULL;
    sqlite3_busy_timeout(db, 100);
    while (!c->stop) {
        sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        usleep(20000);
    }
    sqlite3_close(db);
    return NULL;
}

/* Writes v into the zeroblob of (table).data at rowid, without a copy. */
static void blob_write(sqlite3 *db, const char *table, int64_t rowid, const void *v, size_t n)
{
    sqlite3_blob *b;
    if (sqlite3_blob_open(db, "main", table, "data", rowid, 1, &b) != SQLITE_OK)
        die("blob_open", sqlite3_errmsg(db));
    if (sqlite3_blob_write(b, v, (int)n, 0) != SQLITE_OK)
        die("blob_write", sqlite3_errmsg(db));
    sqlite3_blob_close(b);
}

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *ins_grad, *drop_grads, *ckpt;
    pthread_t thr;
    ckpt_thread bg;
    char path[512];
} sql_side;

static void sql_open(sql_side *s, const char *dir, bool full, bool with_bg)
{
    snprintf(s->path, sizeof s->path, "%s/bench.db", dir);
    char tmp[600];
    unlink(s->path);
    snprintf(tmp, sizeof tmp, "%s-wal", s->path);
    unlink(tmp);
    snprintf(tmp, sizeof tmp, "%s-shm", s->path);
    unlink(tmp);
    if (sqlite3_open(s->path, &s->db) != SQLITE_OK)
        die("open", sqlite3_errmsg(s->db));
    sqlite3_busy_timeout(s->db, 5000);
    exec(s->db, "PRAGMA page_size=65536");
    exec(s->db, "PRAGMA journal_mode=WAL");
    exec(s->db, full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
    exec(s->db, "PRAGMA secure_delete=OFF");
    exec(s->db, with_bg ? "PRAGMA wal_autocheckpoint=0" : "PRAGMA wal_autocheckpoint=16384");
    exec(s->db, "CREATE TABLE grads(seq INTEGER PRIMARY KEY, crc INTEGER, data BLOB);"
                "CREATE TABLE ckpt(id INTEGER PRIMARY KEY, seq INTEGER, crc INTEGER, data BLOB);"
                "CREATE TABLE refs(seq INTEGER PRIMARY KEY, kind INTEGER, file TEXT, off INTEGER,"
                "                  len INTEGER, crc INTEGER);"
                "INSERT INTO ckpt VALUES (1, 0, 0, NULL);");
    sqlite3_prepare_v2(s->db, "INSERT INTO grads(seq, crc, data) VALUES (?1, ?2, zeroblob(?3))",
                       -1, &s->ins_grad, NULL);
    sqlite3_prepare_v2(s->db, "DELETE FROM grads WHERE seq <= ?1", -1, &s->drop_grads, NULL);
    sqlite3_prepare_v2(s->db,
                       "UPDATE ckpt SET seq = ?1, crc = ?2, data = zeroblob(?3) WHERE id = 1", -1,
                       &s->ckpt, NULL);
    if (with_bg) {
        s->bg.path = s->path;
        s->bg.stop = 0;
        pthread_create(&s->thr, NULL, wal_checkpointer, &s->bg);
    }
}

static void sql_close(sql_side *s, bool with_bg)
{
    if (with_bg) {
        s->bg.stop = 1;
        pthread_join(s->thr, NULL);
    }
    sqlite3_finalize(s->ins_grad);
    sqlite3_finalize(s->drop_grads);
    sqlite3_finalize(s->ckpt);
    sqlite3_close(s->db);
    char tmp[600];
    unlink(s->path);
    snprintf(tmp, sizeof tmp, "%s-wal", s->path);
    unlink(tmp);
    snprintf(tmp, sizeof tmp, "%s-shm", s->path);
    unlink(tmp);
}

static void step_done(sqlite3_stmt *q, sqlite3 *db)
{
    if (sqlite3_step(q) != SQLITE_DONE)
        die("step", sqlite3_errmsg(db));
    sqlite3_reset(q);
}

static void run_sqlite(const char *dir, const float *g, size_t n, const float *ck, bool full,
                       bool with_bg, int reps, int every, double *ta, double *tc, int *nc)
{
    sql_side s;
    sql_open(&s, dir, full, with_bg);
    *nc = 0;
    for (int i = 1; i <= reps; i++) {
        double t0 = now_s();
        exec(s.db, "BEGIN IMMEDIATE");
        sqlite3_bind_int64(s.ins_grad, 1, i);
        sqlite3_bind_int64(s.ins_grad, 2, (int64_t)crc32(0, (const void *)g, (uInt)(n * 4)));
        sqlite3_bind_int64(s.ins_grad, 3, (int64_t)(n * 4));
        step_done(s.ins_grad, s.db);
        blob_write(s.db, "grads", i, g, n * 4);
        exec(s.db, "COMMIT");
        ta[i - 1] = now_s() - t0;
        if (i % every == 0) {
            t0 = now_s();
            exec(s.db, "BEGIN IMMEDIATE");
            sqlite3_bind_int64(s.drop_grads, 1, i);
            step_done(s.drop_grads, s.db);
            sqlite3_bind_int64(s.ckpt, 1, i);
            sqlite3_bind_int64(s.ckpt, 2, (int64_t)crc32(0, (const void *)ck, (uInt)(n * 12)));
            sqlite3_bind_int64(s.ckpt, 3, (int64_t)(n * 12));
            step_done(s.ckpt, s.db);
            blob_write(s.db, "ckpt", 1, ck, n * 12);
            exec(s.db, "COMMIT");
            tc[(*nc)++] = now_s() - t0;
        }
    }
    sql_close(&s, with_bg);
}

/* ------------------------------------------------------------ files */

static void sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static void run_files(const char *dir, const float *g, size_t n, const float *ck, bool full,
                      int reps, int every, double *ta, double *tc, int *nc)
{
    sql_side s;
    sql_open(&s, dir, full, false);
    sqlite3_stmt *ins;
    sqlite3_prepare_v2(s.db, "INSERT INTO refs VALUES (?1, ?2, ?3, ?4, ?5, ?6)", -1, &ins, NULL);
    char seg[600], tmp[600], ckf[600];
    snprintf(seg, sizeof seg, "%s/seg-1", dir);
    int fd = open(seg, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die(seg, strerror(errno));
    off_t off = 0;
    *nc = 0;
    for (int i = 1; i <= reps; i++) {
        double t0 = now_s();
        uint32_t c = (uint32_t)crc32(0, (const void *)g, (uInt)(n * 4));
        write_all(fd, g, n * 4);
        if (full)
            fdatasync(fd);
        exec(s.db, "BEGIN IMMEDIATE");
        sqlite3_bind_int64(ins, 1, i);
        sqlite3_bind_int(ins, 2, 0);
        sqlite3_bind_text(ins, 3, "seg-1", -1, SQLITE_STATIC);
        sqlite3_bind_int64(ins, 4, off);
        sqlite3_bind_int64(ins, 5, (int64_t)(n * 4));
        sqlite3_bind_int64(ins, 6, c);
        step_done(ins, s.db);
        exec(s.db, "COMMIT");
        off += (off_t)(n * 4);
        ta[i - 1] = now_s() - t0;
        if (i % every == 0) {
            t0 = now_s();
            snprintf(tmp, sizeof tmp, "%s/ckpt-%d.tmp", dir, i);
            snprintf(ckf, sizeof ckf, "%s/ckpt-%d", dir, i);
            int cfd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (cfd < 0)
                die(tmp, strerror(errno));
            uint32_t cc = (uint32_t)crc32(0, (const void *)ck, (uInt)(n * 12));
            write_all(cfd, ck, n * 12);
            if (full)
                fdatasync(cfd);
            close(cfd);
            rename(tmp, ckf);
            if (full)
                sync_dir(dir);
            exec(s.db, "BEGIN IMMEDIATE");
            sqlite3_bind_int64(ins, 1, -i);
            sqlite3_bind_int(ins, 2, 1);
            sqlite3_bind_text(ins, 3, ckf, -1, SQLITE_STATIC);
            sqlite3_bind_int64(ins, 4, 0);
            sqlite3_bind_int64(ins, 5, (int64_t)(n * 12));
            sqlite3_bind_int64(ins, 6, cc);
            step_done(ins, s.db);
            exec(s.db, "COMMIT");
            /* The old checkpoint and the covered segment go after the commit. */
            if (i > every) {
                snprintf(ckf, sizeof ckf, "%s/ckpt-%d", dir, i - every);
                unlink(ckf);
            }
            tc[(*nc)++] = now_s() - t0;
        }
    }
    close(fd);
    unlink(seg);
    snprintf(ckf, sizeof ckf, "%s/ckpt-%d", dir, reps - reps % every);
    unlink(ckf);
    sqlite3_finalize(ins);
    sql_close(&s, false);
}

/* ------------------------------------------------------------ optd */

static void run_optd(const char *dir, const float *g, size_t n, const float *ck, bool full,
                     int reps, int every, double *ta, double *tc, int *nc)
{
    char path[512], cmd[2200];
    snprintf(path, sizeof path, "%s/optd.db", dir);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s-wal' '%s-shm' '%s.d'", path, path, path, path);
    if (system(cmd) != 0)
        die("rm", cmd);
    storage *st;
    if (storage_open(path, full ? STORAGE_SYNC_FULL : STORAGE_SYNC_NORMAL, &st) != STORAGE_OK)
        die("storage_open", storage_last_error());
    storage_iov iov[3] = {{ck, n * 4}, {ck + n, n * 4}, {ck + 2 * n, n * 4}};
    int64_t id;
    if (storage_session_create(st, "bench", "{}", 0, iov, 3, &id) != STORAGE_OK)
        die("create", storage_last_error());
    *nc = 0;
    int na = 0;
    for (int i = 1; i <= reps; i++) {
        storage_log_entry e = {.seq = i, .step = i, .time_ms = i, .lr = 0.1, .factor = 1,
                               .loss = 0, .grad = g, .grad_len = n * 4};
        bool with_ckpt = i % every == 0;
        double t0 = now_s();
        if (storage_append(st, id, &e, iov, with_ckpt ? 3 : 0) != STORAGE_OK)
            die("append", storage_last_error());
        double t = now_s() - t0;
        if (with_ckpt)
            tc[(*nc)++] = t;
        else
            ta[na++] = t;
    }
    storage_close(st);
    if (system(cmd) != 0)
        die("rm", cmd);
    report("optd: append", ta, na);
    report("optd: append + checkpoint", tc, *nc);
}

/* --------------------------------------------------- two sessions */

typedef struct {
    storage *st;
    int64_t id;
    const float *g;
    size_t n;
    volatile int *stop;
    int count;
} big_writer;

static void *big_loop(void *arg)
{
    big_writer *b = arg;
    int64_t seq = 0;
    while (!*b->stop) {
        seq++;
        storage_log_entry e = {.seq = seq, .step = seq, .time_ms = seq, .lr = 0.1,
                               .factor = 1, .loss = 0, .grad = b->g, .grad_len = b->n * 4};
        if (storage_append(b->st, b->id, &e, NULL, 0) != STORAGE_OK)
            die("big append", storage_last_error());
        b->count++;
    }
    return NULL;
}

/* A small session's appends (1e3 float32), alone and while another session
 * appends 1e7-element gradients in another thread: does one slow the
 * other through storage? */
static void run_two_sessions(const char *dir, const float *big, bool full)
{
    char path[512], cmd[2200];
    snprintf(path, sizeof path, "%s/two.db", dir);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s-wal' '%s-shm' '%s.d'", path, path, path, path);
    if (system(cmd) != 0)
        die("rm", cmd);
    storage *st;
    if (storage_open(path, full ? STORAGE_SYNC_FULL : STORAGE_SYNC_NORMAL, &st) != STORAGE_OK)
        die("storage_open", storage_last_error());
    float small[1000] = {0};
    storage_iov iov = {small, sizeof small};
    storage_iov biov = {big, 10000000 * 4};
    int64_t id_small, id_big;
    if (storage_session_create(st, "small", "{}", 0, &iov, 1, &id_small) != STORAGE_OK ||
        storage_session_create(st, "big", "{}", 0, &biov, 1, &id_big) != STORAGE_OK)
        die("create", storage_last_error());
    enum { N = 200 };
    double t[N];
    int64_t seq = 0;
    for (int round = 0; round < 2; round++) {
        volatile int stop = 0;
        big_writer b = {.st = st, .id = id_big, .g = big, .n = 10000000, .stop = &stop};
        pthread_t th;
        if (round == 1)
            pthread_create(&th, NULL, big_loop, &b);
        for (int i = 0; i < N; i++) {
            seq++;
            storage_log_entry e = {.seq = seq, .step = seq, .time_ms = seq, .lr = 0.1,
                                   .factor = 1, .loss = 0, .grad = small,
                                   .grad_len = sizeof small};
            double t0 = now_s();
            if (storage_append(st, id_small, &e, NULL, 0) != STORAGE_OK)
                die("small append", storage_last_error());
            t[i] = now_s() - t0;
            usleep(2000);
        }
        if (round == 1) {
            stop = 1;
            pthread_join(th, NULL);
            char what[96];
            snprintf(what, sizeof what, "small, beside 1e7 (%d big)", b.count);
            report(what, t, N);
        } else {
            report("small append, alone", t, N);
        }
    }
    storage_close(st);
    if (system(cmd) != 0)
        die("rm", cmd);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "build/bench-storage";
    mkdir(dir, 0755);
    const size_t sizes[] = {10000, 100000, 1000000, 10000000};
    const int reps_for[] = {300, 120, 60, 18};
    const int every = 6; /* a checkpoint every 6th append, as optd does */
    printf("bench/storage: float32 gradients, checkpoints of 3x, one every %d appends, in %s\n",
           every, dir);
    for (int si = 0; si < 4; si++) {
        size_t n = sizes[si];
        int reps = reps_for[si];
        float *g = malloc(n * sizeof *g), *ck = malloc(3 * n * sizeof *ck);
        if (!g || !ck)
            die("malloc", "out of memory");
        for (size_t i = 0; i < n; i++)
            g[i] = (float)(i % 1000) * 1e-3f;
        for (size_t i = 0; i < 3 * n; i++)
            ck[i] = (float)(i % 777) * 1e-2f;
        double *ta = calloc((size_t)reps, sizeof *ta), *tc = calloc((size_t)reps, sizeof *tc);
        int nc;
        for (int full = 0; full <= 1; full++) {
            printf("\n%zu params (%.2f MB gradient, %.2f MB checkpoint), synchronous %s\n", n,
                   n * 4 / 1e6, n * 12 / 1e6, full ? "FULL" : "NORMAL");
            run_floor(dir, g, n, full, reps, ta);
            report("floor: write() gradient", ta, reps);
            run_floor(dir, ck, 3 * n, full, reps / every, tc);
            report("floor: write() checkpoint", tc, reps / every);
            run_sqlite(dir, g, n, ck, full, false, reps, every, ta, tc, &nc);
            report("sqlite autockpt: append", ta, reps);
            report("sqlite autockpt: checkpoint", tc, nc);
            run_sqlite(dir, g, n, ck, full, true, reps, every, ta, tc, &nc);
            report("sqlite bg-ckpt: append", ta, reps);
            report("sqlite bg-ckpt: checkpoint", tc, nc);
            run_files(dir, g, n, ck, full, reps, every, ta, tc, &nc);
            report("files: append", ta, reps);
            report("files: checkpoint", tc, nc);
            run_optd(dir, g, n, ck, full, reps, every, ta, tc, &nc);
        }
        if (n == 10000000)
            for (int full = 0; full <= 1; full++) {
                printf("\ntwo sessions, synchronous %s\n", full ? "FULL" : "NORMAL");
                run_two_sessions(dir, g, full);
            }
        free(ta);
        free(tc);
        free(g);
        free(ck);
    }
    return 0;
}
