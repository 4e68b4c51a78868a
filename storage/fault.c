/*
 * fault.c -- fault injection for storage's tests, in the style of SQLite's
 * own: a shim VFS wrapping the default one, and the same countdown on
 * storage's own file I/O (segments, checkpoint files).  The Nth read,
 * write, sync or truncate (counted from the moment the fault is set) fails
 * with EIO or ENOSPC, once or from then on ("persist").  Every operation is
 * counted while injection or counting is on, so a test can prove that an
 * acknowledged write under STORAGE_SYNC_FULL was synced before its answer.
 *
 * Inert unless configured: OPTD_FAULT=op:N:ERR[:persist] (op: read, write,
 * sync, truncate or any; ERR: EIO or ENOSPC) and OPTD_FAULT_COUNT_SYNCS=1
 * are read by the first storage_open; storage_fault_config() sets it from a
 * test.  The shim VFS is only used by databases opened while it is on.
 */
#include "storage/internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { OP_READ, OP_WRITE, OP_SYNC, OP_TRUNCATE, OP_ANY, OP_COUNT };

static atomic_int fault_on;      /* counting (and maybe injecting)       */
static atomic_int fault_op = -1; /* which op kind fails, -1 none          */
static atomic_llong fault_at;    /* the countdown's N (1 = the next one)  */
static atomic_int fault_errno;
static atomic_int fault_persist;
static atomic_llong op_seen;     /* ops of fault_op's kind since set      */
static atomic_ullong counts[OP_COUNT];
static atomic_ullong injected;
static atomic_int env_read;

int storage_fault_config(const char *spec)
{
    atomic_store(&fault_op, -1);
    atomic_store(&op_seen, 0);
    if (!spec || !*spec) {
        atomic_store(&fault_on, 0);
        return 0;
    }
    if (strcmp(spec, "count") == 0) {
        atomic_store(&fault_on, 1);
        return 0;
    }
    char buf[96];
    snprintf(buf, sizeof buf, "%s", spec);
    char *save = NULL;
    char *op = strtok_r(buf, ":", &save), *n = strtok_r(NULL, ":", &save),
         *err = strtok_r(NULL, ":", &save), *persist = strtok_r(NULL, ":", &save);
    static const char *const names[] = {"read", "write", "sync", "truncate", "any"};
    int which = -1;
    for (int i = 0; op && i < OP_COUNT; i++)
        if (strcmp(op, names[i]) == 0)
            which = i;
    long long at = n ? atoll(n) : 0;
    int e = !err || strcmp(err, "EIO") == 0 ? EIO : strcmp(err, "ENOSPC") == 0 ? ENOSPC : -1;
    if (which < 0 || at < 1 || e < 0 || (persist && strcmp(persist, "persist") != 0))
        return -1;
    atomic_store(&fault_at, at);
    atomic_store(&fault_errno, e);
    atomic_store(&fault_persist, persist != NULL);
    atomic_store(&fault_op, which);
    atomic_store(&fault_on, 1);
    return 0;
}

void storage_fault_stats(storage_fault_counts *out)
{
    out->reads = atomic_load(&counts[OP_READ]);
    out->writes = atomic_load(&counts[OP_WRITE]);
    out->syncs = atomic_load(&counts[OP_SYNC]);
    out->truncates = atomic_load(&counts[OP_TRUNCATE]);
    out->injected = atomic_load(&injected);
}

void fault_init_from_env(void)
{
    if (atomic_exchange(&env_read, 1))
        return;
    const char *spec = getenv("OPTD_FAULT");
    const char *count = getenv("OPTD_FAULT_COUNT_SYNCS");
    if (spec && *spec)
        storage_fault_config(spec);
    else if (count && strcmp(count, "1") == 0)
        storage_fault_config("count");
}

bool fault_active(void)
{
    return atomic_load(&fault_on) != 0;
}

/* Counts one operation of kind op; returns the errno to fail it with, or 0. */
static int fault_hit(int op)
{
    if (!atomic_load(&fault_on))
        return 0;
    atomic_fetch_add(&counts[op], 1);
    int which = atomic_load(&fault_op);
    if (which < 0 || (which != op && which != OP_ANY))
        return 0;
    long long seen = atomic_fetch_add(&op_seen, 1) + 1;
    long long at = atomic_load(&fault_at);
    if (seen == at || (seen > at && atomic_load(&fault_persist))) {
        atomic_fetch_add(&injected, 1);
        return atomic_load(&fault_errno);
    }
    return 0;
}

/* ------------------------------------------------- storage's own I/O */

int fault_pwrite(int fd, const void *p, size_t n, off_t off)
{
    const char *c = p;
    while (n > 0) {
        int e = fault_hit(OP_WRITE);
        if (e)
            return -e;
        size_t chunk = n > ((size_t)1 << 30) ? (size_t)1 << 30 : n;
        ssize_t w = pwrite(fd, c, chunk, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        c += w;
        off += w;
        n -= (size_t)w;
    }
    return 0;
}

int fault_pread(int fd, void *p, size_t n, off_t off)
{
    char *c = p;
    while (n > 0) {
        int e = fault_hit(OP_READ);
        if (e)
            return -e;
        size_t chunk = n > ((size_t)1 << 30) ? (size_t)1 << 30 : n;
        ssize_t r = pread(fd, c, chunk, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -ENODATA; /* the file is shorter than its reference */
        c += r;
        off += r;
        n -= (size_t)r;
    }
    return 0;
}

int fault_fdatasync(int fd)
{
    int e = fault_hit(OP_SYNC);
    if (e)
        return -e;
    return fdatasync(fd) == 0 ? 0 : -errno;
}

int fault_fsync(int fd)
{
    int e = fault_hit(OP_SYNC);
    if (e)
        return -e;
    return fsync(fd) == 0 ? 0 : -errno;
}

int fault_ftruncate(int fd, off_t len)
{
    int e = fault_hit(OP_TRUNCATE);
    if (e)
        return -e;
    return ftruncate(fd, len) == 0 ? 0 : -errno;
}

/* ------------------------------------------------------ the shim VFS */

typedef struct {
    sqlite3_file base;
    sqlite3_file *real; /* the default VFS's file, allocated right after */
} shim_file;

static sqlite3_vfs *real_vfs;
static sqlite3_vfs shim_vfs;

#define REAL(f) (((shim_file *)(f))->real)

static int shim_close(sqlite3_file *f)
{
    return REAL(f)->pMethods->xClose(REAL(f));
}

static int shim_read(sqlite3_file *f, void *p, int n, sqlite3_int64 off)
{
    if (fault_hit(OP_READ))
        return SQLITE_IOERR_READ;
    return REAL(f)->pMethods->xRead(REAL(f), p, n, off);
}

static int shim_write(sqlite3_file *f, const void *p, int n, sqlite3_int64 off)
{
    int e = fault_hit(OP_WRITE);
    if (e)
        return e == ENOSPC ? SQLITE_FULL : SQLITE_IOERR_WRITE;
    return REAL(f)->pMethods->xWrite(REAL(f), p, n, off);
}

static int shim_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    int e = fault_hit(OP_TRUNCATE);
    if (e)
        return e == ENOSPC ? SQLITE_FULL : SQLITE_IOERR_TRUNCATE;
    return REAL(f)->pMethods->xTruncate(REAL(f), size);
}

static int shim_sync(sqlite3_file *f, int flags)
{
    if (fault_hit(OP_SYNC))
        return SQLITE_IOERR_FSYNC;
    return REAL(f)->pMethods->xSync(REAL(f), flags);
}

static int shim_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return REAL(f)->pMethods->xFileSize(REAL(f), size);
}

static int shim_lock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xLock(REAL(f), l);
}

static int shim_unlock(sqlite3_file *f, int l)
{
    return REAL(f)->pMethods->xUnlock(REAL(f), l);
}

static int shim_check_reserved(sqlite3_file *f, int *out)
{
    return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}

static int shim_file_control(sqlite3_file *f, int op, void *arg)
{
    return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}

static int shim_sector_size(sqlite3_file *f)
{
    return REAL(f)->pMethods->xSectorSize(REAL(f));
}

static int shim_device_chars(sqlite3_file *f)
{
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}

static int shim_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    return REAL(f)->pMethods->xShmMap(REAL(f), pg, pgsz, extend, pp);
}

static int shim_shm_lock(sqlite3_file *f, int off, int n, int flags)
{
    return REAL(f)->pMethods->xShmLock(REAL(f), off, n, flags);
}

static void shim_shm_barrier(sqlite3_file *f)
{
    REAL(f)->pMethods->xShmBarrier(REAL(f));
}

static int shim_shm_unmap(sqlite3_file *f, int del)
{
    return REAL(f)->pMethods->xShmUnmap(REAL(f), del);
}

static int shim_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **pp)
{
    return REAL(f)->pMethods->xFetch(REAL(f), off, n, pp);
}

static int shim_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p)
{
    return REAL(f)->pMethods->xUnfetch(REAL(f), off, p);
}

static const sqlite3_io_methods shim_methods = {
    .iVersion = 3,
    .xClose = shim_close,
    .xRead = shim_read,
    .xWrite = shim_write,
    .xTruncate = shim_truncate,
    .xSync = shim_sync,
    .xFileSize = shim_file_size,
    .xLock = shim_lock,
    .xUnlock = shim_unlock,
    .xCheckReservedLock = shim_check_reserved,
    .xFileControl = shim_file_control,
    .xSectorSize = shim_sector_size,
    .xDeviceCharacteristics = shim_device_chars,
    .xShmMap = shim_shm_map,
    .xShmLock = shim_shm_lock,
    .xShmBarrier = shim_shm_barrier,
    .xShmUnmap = shim_shm_unmap,
    .xFetch = shim_fetch,
    .xUnfetch = shim_unfetch,
};

static int shim_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out)
{
    (void)vfs;
    shim_file *sf = (shim_file *)f;
    sf->real = (sqlite3_file *)(sf + 1);
    int rc = real_vfs->xOpen(real_vfs, name, sf->real, flags, out);
    /* SQLite calls xClose only when pMethods is set. */
    sf->base.pMethods = rc == SQLITE_OK && sf->real->pMethods ? &shim_methods : NULL;
    return rc;
}

static void register_shim(void)
{
    real_vfs = sqlite3_vfs_find(wal_vfs_name());
    shim_vfs = *real_vfs;
    shim_vfs.zName = "optd-fault";
    shim_vfs.szOsFile = (int)sizeof(shim_file) + real_vfs->szOsFile;
    shim_vfs.xOpen = shim_open;
    shim_vfs.pNext = NULL;
    sqlite3_vfs_register(&shim_vfs, 0);
}

const char *fault_vfs_name(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (!fault_active())
        return NULL;
    pthread_once(&once, register_shim);
    return "optd-fault";
}
