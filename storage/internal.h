/*
 * internal.h -- what storage's files share and nobody else sees: the
 * fault-injection hooks around every file operation storage makes itself.
 * Each returns 0 or a negative errno.
 */
#ifndef STORAGE_INTERNAL_H
#define STORAGE_INTERNAL_H

#include "storage/storage.h"

#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/types.h>

void fault_init_from_env(void);
bool fault_active(void);
/* The shim VFS's name when faults are on (registering it), else NULL. */
const char *fault_vfs_name(void);
/* The VFS that writes a transaction's WAL frames in one call (walvfs.c);
 * the fault shim wraps it. */
const char *wal_vfs_name(void);

/* Whole-buffer pwrite/pread (a short file is -ENODATA), fdatasync, fsync,
 * ftruncate, each counted and possibly failed. */
int fault_pwrite(int fd, const void *p, size_t n, off_t off);
int fault_pread(int fd, void *p, size_t n, off_t off);
int fault_fdatasync(int fd);
int fault_fsync(int fd);
int fault_ftruncate(int fd, off_t len);

#endif /* STORAGE_INTERNAL_H */
