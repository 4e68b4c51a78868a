/*
 * travel_cli.c -- `optd export`, `optd import` and `optd backup`: a
 * session's export file to or from a database file (the daemon stopped:
 * they take its lock), and an online backup of a database a daemon may be
 * serving.  docs/api.md "Time travel", docs/durability.md "Backup and
 * restore".
 */
#include "server/server.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int usage(void)
{
    fprintf(stderr, "usage: optd export --db FILE [--log] NAME OUT\n"
                    "       optd import --db FILE NAME IN\n"
                    "       optd backup --db FILE OUT\n");
    return 2;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *b = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? 2 * cap : 1 << 20;
            char *nb = realloc(b, cap + 1);
            if (!nb) {
                free(b);
                fclose(f);
                errno = ENOMEM;
                return NULL;
            }
            b = nb;
        }
        size_t k = fread(b + n, 1, cap - n, f);
        n += k;
        if (k == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return NULL;
    }
    b[n] = '\0';
    *len = n;
    return b;
}

static int write_file(const char *path, const char *b, size_t len)
{
    FILE *f = fopen(path, "wbx");
    if (!f)
        return -1;
    size_t k = fwrite(b, 1, len, f);
    int bad = k != len || fflush(f) != 0 || fsync(fileno(f)) != 0;
    if (fclose(f) != 0)
        bad = 1;
    return bad ? -1 : 0;
}

int srv_travel_main(int argc, char **argv)
{
    const char *cmd = argv[1], *db = NULL, *pos[2] = {NULL, NULL};
    bool with_log = false;
    int np = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--db") == 0 && i + 1 < argc)
            db = argv[++i];
        else if (strncmp(argv[i], "--db=", 5) == 0)
            db = argv[i] + 5;
        else if (strcmp(argv[i], "--log") == 0 && strcmp(cmd, "export") == 0)
            with_log = true;
        else if (argv[i][0] != '-' && np < 2)
            pos[np++] = argv[i];
        else
            return usage();
    }
    bool backup = strcmp(cmd, "backup") == 0;
    if (!db || np != (backup ? 1 : 2))
        return usage();
    if (backup) {
        int64_t bytes = 0;
        int err = storage_backup(db, pos[0], &bytes);
        if (err != STORAGE_OK) {
            fprintf(stderr, "optd backup: %s (%s)\n", storage_last_error(),
                    storage_strerror(err));
            return 1;
        }
        fprintf(stderr, "optd backup: %s -> %s (+ %s.d): %lld bytes\n", db, pos[0], pos[0],
                (long long)bytes);
        return 0;
    }
    storage *st;
    int err = storage_open(db, STORAGE_SYNC_FULL, &st);
    if (err != STORAGE_OK) {
        fprintf(stderr, "optd %s: cannot open %s: %s (%s)\n", cmd, db, storage_last_error(),
                storage_strerror(err));
        return 1;
    }
    eng_pool *pool = eng_pool_new(1);
    int rc = 1;
    if (!pool) {
        fprintf(stderr, "optd %s: out of memory\n", cmd);
    } else if (strcmp(cmd, "export") == 0) {
        eng_session *s = eng_session_shell(pos[0]);
        if (s) {
            eng_lock(s);
            err = eng_session_load(st, pool, s);
            char *body = NULL;
            size_t len = 0;
            if (err == ENG_OK)
                err = srv_export_session(st, pool, s, with_log, &body, &len);
            if (err != ENG_OK)
                fprintf(stderr, "optd export: session %s: %s (%s)\n", pos[0],
                        storage_last_error(), eng_strerror(err));
            else if (write_file(pos[1], body, len) != 0)
                fprintf(stderr, "optd export: writing %s: %s\n", pos[1], strerror(errno));
            else {
                fprintf(stderr, "optd export: %s at step %llu -> %s (%zu bytes)\n", pos[0],
                        (unsigned long long)s->st.step, pos[1], len);
                rc = 0;
            }
            free(body);
            eng_unlock(s);
            eng_session_free(s);
        }
    } else {
        size_t len = 0;
        char *body = read_file(pos[1], &len);
        if (!body) {
            fprintf(stderr, "optd import: reading %s: %s\n", pos[1], strerror(errno));
        } else {
            api_reply r = {0};
            eng_session *s = NULL;
            int hs = srv_import_session(st, pool, pos[0], body, len, SIZE_MAX, NULL, &s, &r);
            if (hs) {
                fprintf(stderr, "optd import: %d %.*s\n", hs, (int)r.len, r.body ? r.body : "");
            } else {
                fprintf(stderr, "optd import: %s -> session %s at step %llu\n", pos[1], pos[0],
                        (unsigned long long)s->st.step);
                eng_session_free(s);
                rc = 0;
            }
            api_reply_free(&r);
            free(body);
        }
    }
    eng_pool_free(pool);
    storage_close(st);
    return rc;
}
