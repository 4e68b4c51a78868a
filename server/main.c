/*
 * main.c -- optd: parse the configuration, open the database, serve until
 * SIGTERM/SIGINT (SIGHUP reloads the TLS files), then checkpoint hot
 * sessions and close cleanly.
 */
#include "server/server.h"

#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int srv_check_health(const char *url);

/* mkdir -p of path's parent directory. */
static int make_parent(const char *path)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = '\0';
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(dir, 0755) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* optd check --db FILE: verifies a database offline (SQLite's integrity
 * check, every stored vector against its checksum, every file reference).
 * Exit 0 when clean; 1 with one line per problem (or why it could not be
 * checked); 2 for a usage error. */
static int check_main(int argc, char **argv)
{
    const char *db = NULL;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--db") == 0 && i + 1 < argc)
            db = argv[++i];
        else if (strncmp(argv[i], "--db=", 5) == 0)
            db = argv[i] + 5;
        else {
            fprintf(stderr, "usage: optd check --db FILE\n");
            return 2;
        }
    }
    if (!db) {
        fprintf(stderr, "usage: optd check --db FILE\n");
        return 2;
    }
    int n = storage_check(db, stdout);
    if (n < 0) {
        printf("%s: cannot be checked: %s (%s)\n", db, storage_last_error(),
               storage_strerror(n));
        return 1;
    }
    if (n > 0) {
        fprintf(stderr, "%s: %d problem%s\n", db, n, n == 1 ? "" : "s");
        return 1;
    }
    fprintf(stderr, "%s: ok\n", db);
    return 0;
}

int main(int argc, char **argv)
{
    /* glibc returns freed heap to the kernel (madvise, trim) as soon as
     * 128 KiB sit free at the top: with SQLite's allocations that was a
     * sixth of a small step's CPU (bench/ENGINE.md).  Keep 64 MiB. */
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    mallopt(M_TOP_PAD, 4 << 20);
    if (argc > 1 && strcmp(argv[1], "check") == 0)
        return check_main(argc, argv);
    if (argc > 1 && (strcmp(argv[1], "export") == 0 || strcmp(argv[1], "import") == 0 ||
                     strcmp(argv[1], "backup") == 0))
        return srv_travel_main(argc, argv);
    srv_config cfg;
    int rc = srv_config_parse(&cfg, argc, argv);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    if (cfg.check_health[0])
        return srv_check_health(cfg.check_health);
    if (make_parent(cfg.db) != 0) {
        srv_log(SRV_LOG_ERROR, "cannot create the directory of %s: %s", cfg.db, strerror(errno));
        return 1;
    }
    storage *db;
    int err = storage_open(cfg.db, (storage_durability)cfg.durability, &db);
    if (err != STORAGE_OK) {
        srv_log(SRV_LOG_ERROR, "cannot open %s: %s (%s)", cfg.db, storage_last_error(),
                storage_strerror(err));
        return 1;
    }
    /* SIGTERM/SIGINT/SIGHUP reach the main thread only (sigwait in srv_http_run):
     * block them before any thread exists, since threads inherit the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    eng_pool *pool = eng_pool_new(cfg.kernel_threads > 0 ? cfg.kernel_threads
                                                         : (int)(cores > 0 ? cores : 1));
    srv_registry *reg = pool ? srv_registry_new(db, pool, cfg.cache_mb * 1024 * 1024) : NULL;
    srv_ctx ctx = {.reg = reg, .db = db, .pool = pool, .cfg = &cfg};
    char key_path[sizeof cfg.db + 16];
    snprintf(key_path, sizeof key_path, "%s", cfg.token_key[0] ? cfg.token_key : cfg.db);
    if (!cfg.token_key[0])
        strcat(key_path, ".token-key");
    ctx.sync = reg && srv_auth_open(db, cfg.api_key, key_path) == 0 ? srv_sync_new(&ctx) : NULL;
    rc = ctx.sync ? srv_http_run(&ctx) : -1;
    srv_auth_close();
    srv_sync_free(ctx.sync);
    srv_registry_free(reg); /* checkpoints every session with a log tail */
    eng_pool_free(pool);
    storage_close(db);
    srv_log(SRV_LOG_INFO, "stopped");
    return rc == 0 ? 0 : 1;
}
