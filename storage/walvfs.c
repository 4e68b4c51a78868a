/*
 * walvfs.c -- a VFS over the default one that hands a transaction's WAL
 * frames to the kernel in one write.
 *
 * SQLite writes each WAL frame as two calls (the 24-byte frame header, then
 * the page), so a small step's commit of five pages was ten pwrite()s.
 * Here the writes to a WAL file that follow each other in the file are
 * gathered in a buffer and written as one call when the commit frame's page
 * has arrived (a frame header whose "database size" field is not zero marks
 * the commit frame), and before anything else touches the file (a read,
 * sync, truncate, size query, file control, close) or a write lands
 * elsewhere.  So every committed transaction is in the kernel before
 * sqlite3_step() returns, as it was: an acknowledged step survives kill -9,
 * and --durability full still syncs after the commit frame (xSync writes
 * the buffer first).  A transaction larger than the buffer (64 KiB) goes
 * out in several such writes.  A failed gathered write fails the call that
 * triggered it, which fails the transaction; the buffer is dropped.
 * Files other than WAL files pass straight through.
 */
#include "storage/internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Gathered writes stay below 128 KiB: the unix VFS writes at most that much
 * in one call (and answers a longer write as a full disk). */
enum { WAL_HDR = 24, GATHER_MAX = 64 << 10 };

typedef struct {
    sqlite3_file base;
    sqlite3_file *real; /* the wrapped VFS's file, allocated right after */
    bool wal;
    bool commit_seen;   /* the buffer holds a commit frame's header       */
    bool after_read;    /* the last call was a read, at read_off          */
    sqlite3_int64 read_off;
    unsigned char *buf;
    size_t len, cap;
    sqlite3_int64 off;  /* file offset of buf[0]                          */
} wal_file;

static sqlite3_vfs *base_vfs;
static sqlite3_vfs wal_vfs;

#define WF(f) ((wal_file *)(f))
#define REAL(f) (WF(f)->real)

static int flush(sqlite3_file *f)
{
    wal_file *w = WF(f);
    if (w->len == 0)
        return SQLITE_OK;
    int rc = w->real->pMethods->xWrite(w->real, w->buf, (int)w->len, w->off);
    w->len = 0;
    w->commit_seen = false;
    return rc;
}

static int wal_close(sqlite3_file *f)
{
    int rc = flush(f);
    free(WF(f)->buf);
    WF(f)->buf = NULL;
    int rc2 = REAL(f)->pMethods->xClose(REAL(f));
    return rc != SQLITE_OK ? rc : rc2;
}

static int wal_read(sqlite3_file *f, void *p, int n, sqlite3_int64 off)
{
    WF(f)->after_read = true;
    WF(f)->read_off = off;
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xRead(REAL(f), p, n, off);
}

static int wal_write(sqlite3_file *f, const void *p, int n, sqlite3_int64 off)
{
    wal_file *w = WF(f);
    bool rewrite = w->after_read && off == w->read_off && n == WAL_HDR;
    w->after_read = false;
    /* A frame header written over the frame just read is SQLite rewriting
     * the checksums of frames it overwrote in this transaction; no page
     * follows it, and the last one is the commit frame's: written at once
     * (the read before it wrote out the buffer). */
    if (!w->wal || n <= 0 || rewrite)
        return REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
    /* Taken before a flush below clears it: the commit frame's page must
     * go out even when the buffer was written to make room for it. */
    bool was_commit = w->commit_seen;
    if (w->len && (off != w->off + (sqlite3_int64)w->len || w->len + (size_t)n > GATHER_MAX)) {
        int rc = flush(f);
        if (rc != SQLITE_OK)
            return rc;
    }
    if ((size_t)n > GATHER_MAX)
        return REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
    if (w->len + (size_t)n > w->cap) {
        size_t cap = GATHER_MAX;
        unsigned char *nb = realloc(w->buf, cap);
        if (!nb) {
            /* No room to gather: write what is held and this one as is. */
            int rc = flush(f);
            return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
        }
        w->buf = nb;
        w->cap = cap;
    }
    if (w->len == 0)
        w->off = off;
    memcpy(w->buf + w->len, p, (size_t)n);
    w->len += (size_t)n;
    if (n == WAL_HDR) {
        const unsigned char *h = p;
        /* Bytes 4..7 of a frame header: the database size after a commit,
         * zero in every other frame. */
        if (h[4] | h[5] | h[6] | h[7])
            w->commit_seen = true;
        return SQLITE_OK;
    }
    /* The commit frame's page is in: the transaction goes out now. */
    return was_commit ? flush(f) : SQLITE_OK;
}

static int wal_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xTruncate(REAL(f), size);
}

static int wal_sync(sqlite3_file *f, int flags)
{
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xSync(REAL(f), flags);
}

static int wal_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xFileSize(REAL(f), size);
}

static int wal_lock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xLock(REAL(f), l);
}

static int wal_unlock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xUnlock(REAL(f), l);
}

static int wal_check_reserved(sqlite3_file *f, int *out)
{
    return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}

static int wal_file_control(sqlite3_file *f, int op, void *arg)
{
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}

static int wal_sector_size(sqlite3_file *f)
{
    return REAL(f)->pMethods->xSectorSize(REAL(f));
}

static int wal_device_chars(sqlite3_file *f)
{
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}

static int wal_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    return REAL(f)->pMethods->xShmMap(REAL(f), pg, pgsz, extend, pp);
}

static int wal_shm_lock(sqlite3_file *f, int off, int n, int flags)
{
    return REAL(f)->pMethods->xShmLock(REAL(f), off, n, flags);
}

static void wal_shm_barrier(sqlite3_file *f)
{
    REAL(f)->pMethods->xShmBarrier(REAL(f));
}

static int wal_shm_unmap(sqlite3_file *f, int del)
{
    return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}

static int wal_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **pp)
{
    int rc = flush(f);
    return rc != SQLITE_OK ? rc : REAL(f)->pMethods->xFetch(REAL(f), off, n, pp);
}

static int wal_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p)
{
    return REAL(f)->pMethods->xUnfetch(REAL(f), off, p);
}

static const sqlite3_io_methods wal_methods = {
    .iVersion = 3,
    .xClose = wal_close,
    .xRead = wal_read,
    .xWrite = wal_write,
    .xTruncate = wal_truncate,
    .xSync = wal_sync,
    .xFileSize = wal_file_size,
    .xLock = wal_lock,
    .xUnlock = wal_unlock,
    .xCheckReservedLock = wal_check_reserved,
    .xFileControl = wal_file_control,
    .xSectorSize = wal_sector_size,
    .xDeviceCharacteristics = wal_device_chars,
    .xShmMap = wal_shm_map,
    .xShmLock = wal_shm_lock,
    .xShmBarrier = wal_shm_barrier,
    .xShmUnmap = wal_shm_unmap,
    .xFetch = wal_fetch,
    .xUnfetch = wal_unfetch,
};

static int wal_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out)
{
    (void)vfs;
    wal_file *w = WF(f);
    memset(w, 0, sizeof *w);
    w->real = (sqlite3_file *)(w + 1);
    w->wal = (flags & SQLITE_OPEN_WAL) != 0;
    int rc = base_vfs->xOpen(base_vfs, name, w->real, flags, out);
    /* SQLite calls xClose only when pMethods is set. */
    w->base.pMethods = rc == SQLITE_OK && w->real->pMethods ? &wal_methods : NULL;
    return rc;
}

static void register_wal_vfs(void)
{
    base_vfs = sqlite3_vfs_find(NULL);
    wal_vfs = *base_vfs;
    wal_vfs.zName = "optd-wal";
    wal_vfs.szOsFile = (int)sizeof(wal_file) + base_vfs->szOsFile;
    wal_vfs.xOpen = wal_open;
    wal_vfs.pNext = NULL;
    sqlite3_vfs_register(&wal_vfs, 0);
}

const char *wal_vfs_name(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_wal_vfs);
    return sqlite3_vfs_find("optd-wal") ? "optd-wal" : NULL;
}
