/*
 * daemon.h -- the integration-test harness: runs the real optd ($OPTD_BIN)
 * on a free port with its own SQLite file, and stops it by PID.
 *
 * The daemon is started with --bind 127.0.0.1 --port 0 --db PATH; the port
 * it bound is read back from its "optd listening on http://127.0.0.1:PORT"
 * line (https:// when started with --tls-cert).  When $OPTD_VALGRIND_DAEMON is set, the daemon runs under that
 * command (split on spaces) -- unless the test itself runs under valgrind,
 * whose --trace-children already covers the daemon.  The daemon's stderr and the rest of its
 * stdout go to DIR/optd.log, printed when a start fails or the daemon
 * exits badly.
 */
#ifndef TESTS_SUPPORT_DAEMON_H
#define TESTS_SUPPORT_DAEMON_H

#include <pthread.h>
#include <stdbool.h>
#include <sys/types.h>

#define TDAEMON_MAX_ARGS 32

typedef struct {
    pid_t pid;                 /* 0 when not running                         */
    int port;
    char url[64];              /* "http://127.0.0.1:PORT" (https:// with TLS) */
    char dir[256];             /* the harness's temp dir (mkdtemp, removed)  */
    char db[512];              /* the SQLite file                            */
    char log[512];             /* daemon stderr + stdout                     */
    char *extra[TDAEMON_MAX_ARGS + 1]; /* copies of the extra arguments      */
    int out_fd;                /* the daemon's stdout (drained by a thread)  */
    pthread_t drain;
    bool drain_running;
    int last_status;           /* wait status of the last exit               */
} tdaemon;

/* Starts the daemon on db_path (NULL: DIR/optd.db in a fresh temp dir)
 * with extra_args (NULL-terminated, may be NULL).  Waits until it listens.
 * 0 or -1 (after printing why and the daemon's log). */
int tdaemon_start(tdaemon *d, const char *db_path, const char *const *extra_args);
const char *tdaemon_url(const tdaemon *d);
const char *tdaemon_db(const tdaemon *d);
/* SIGTERM, wait (SIGKILL after a timeout).  Returns the exit code (0 on a
 * clean exit), or -1 when it had to be killed or died of a signal.  The
 * temp dir stays until tdaemon_cleanup. */
int tdaemon_stop(tdaemon *d);
/* SIGKILL now (a crash) and reap.  0 or -1. */
int tdaemon_kill9(tdaemon *d);
/* Starts it again on the same db with the same extra arguments.  Asks for
 * the previous port first so clients keep their URL; falls back to a fresh
 * port if that one is taken.  0 or -1. */
int tdaemon_restart(tdaemon *d);
/* Stops the daemon if running and removes the temp dir. */
void tdaemon_cleanup(tdaemon *d);
/* Prints the daemon's log to stderr (for failing tests). */
void tdaemon_dump_log(const tdaemon *d);

#endif /* TESTS_SUPPORT_DAEMON_H */
