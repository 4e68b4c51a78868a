/*
 * main.c -- optd: parse the configuration, open the database, serve until
 * SIGTERM/SIGINT, then checkpoint hot sessions and close cleanly.
 */
#include "server/server.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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

int main(int argc, char **argv)
{
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
    if (storage_open(cfg.db, (storage_durability)cfg.durability, &db) != STORAGE_OK) {
        srv_log(SRV_LOG_ERROR, "cannot open %s: %s", cfg.db, storage_last_error());
        return 1;
    }
    /* SIGTERM/SIGINT reach the main thread only (sigwait in srv_http_run):
     * block them before any thread exists, since threads inherit the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    srv_registry *reg = srv_registry_new(db, cfg.cache_mb * 1024 * 1024);
    srv_ctx ctx = {.reg = reg, .db = db, .cfg = &cfg};
    ctx.sync = reg ? srv_sync_new(&ctx) : NULL;
    rc = ctx.sync ? srv_http_run(&ctx) : -1;
    srv_sync_free(ctx.sync);
    srv_registry_free(reg); /* checkpoints every session with a log tail */
    storage_close(db);
    srv_log(SRV_LOG_INFO, "stopped");
    return rc == 0 ? 0 : 1;
}
