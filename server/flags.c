/*
 * flags.c -- command-line flags and their OPTD_* environment twins, and
 * the log.  One table describes every flag (name, variable, kind, field,
 * bound, help); getopt_long reads argv through an option array built from
 * it, and --help prints it.
 */
#include "server/cors.h"
#include "server/server.h"

#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define OPTD_VERSION "0.1.0"

int srv_log_level = SRV_LOG_INFO;

int64_t srv_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void srv_log(int level, const char *fmt, ...)
{
    if (level > srv_log_level)
        return;
    static const char *const names[] = {"error", "warn", "info", "debug"};
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
            ts.tv_nsec / 1000000, names[level], line);
}

typedef enum { F_STR, F_INT, F_SIZE, F_DUR, F_LOG } flag_kind;

typedef struct {
    const char *flag;
    const char *env;
    flag_kind kind;
    size_t offset;
    size_t size;
    unsigned long long max; /* F_SIZE: largest value accepted */
    const char *help;
} flag_spec;

#define STR(f) offsetof(srv_config, f), sizeof(((srv_config *)0)->f)
static const flag_spec flags[] = {
    {"--bind", "OPTD_BIND", F_STR, STR(bind), 0, "address to listen on (default 127.0.0.1)"},
    {"--port", "OPTD_PORT", F_INT, STR(port), 0, "TCP port; 0 picks a free one and prints it (default 8080)"},
    {"--db", "OPTD_DB", F_STR, STR(db), 0, "SQLite database file, parent created (default ./var/optd.db)"},
    {"--threads", "OPTD_THREADS", F_INT, STR(threads), 0, "HTTP worker threads (default: 2 x cores, at least 4)"},
    {"--kernel-threads", "OPTD_KERNEL_THREADS", F_INT, STR(kernel_threads), 0, "threads sharing one large step's vector (default: the number of cores)"},
    {"--max-body-mb", "OPTD_MAX_BODY_MB", F_SIZE, STR(max_body_mb), SIZE_MAX / 1024 / 1024 - 1, "largest request body in MiB (default 2048; vector bodies are also held to their session's size, JSON documents to 64 MiB)"},
    {"--max-params", "OPTD_MAX_PARAMS", F_SIZE, STR(max_params), SIZE_MAX / 8 / 4, "largest session in parameters (default 100000000)"},
    {"--cache-mb", "OPTD_CACHE_MB", F_SIZE, STR(cache_mb), SIZE_MAX / 1024 / 1024, "memory for hot sessions in MiB; colder ones are evicted (default 1024)"},
    {"--durability", "OPTD_DURABILITY", F_DUR, STR(durability), 0, "normal: survives a process crash; full: survives power loss (default normal)"},
    {"--api-key", "OPTD_API_KEY", F_STR, STR(api_key), 0, "require Authorization: Bearer KEY on every route but /healthz"},
    {"--log-level", "OPTD_LOG_LEVEL", F_LOG, STR(log_level), 0, "error, warn, info or debug (default info)"},
    {"--check-health", "OPTD_CHECK_HEALTH", F_STR, STR(check_health), 0, "probe URL's /healthz, exit 0 when healthy (for container health checks)"},
    {"--max-connections", "OPTD_MAX_CONNECTIONS", F_SIZE, STR(max_connections), 1000000, "open connections in all; more are closed at once (default 1000)"},
    {"--max-connections-per-ip", "OPTD_MAX_CONNECTIONS_PER_IP", F_SIZE, STR(max_connections_per_ip), 1000000, "open connections from one client address (default 128)"},
    {"--access-log", "OPTD_ACCESS_LOG", F_STR, STR(access_log), 0, "append one JSON line per request to FILE (time, request id, method, route, session, status, bytes, latency)"},
    {"--metrics-token", "OPTD_METRICS_TOKEN", F_STR, STR(metrics_token), 0, "token GET /metrics requires (Authorization: Bearer TOKEN) instead of --api-key"},
    {"--token-key", "OPTD_TOKEN_KEY", F_STR, STR(token_key), 0, "file of the key tokens are hashed with (default <db>.token-key, created 0600; optd backup leaves it out: keep a copy apart)"},
    {"--metrics-sessions", "OPTD_METRICS_SESSIONS", F_SIZE, STR(metrics_sessions), 100000, "per-session series on /metrics for at most N sessions (default 0: none)"},
    {"--cors-origin", "OPTD_CORS_ORIGIN", F_STR, STR(cors_origin), 0, "browser pages of these origins may call optd (comma-separated, e.g. https://app.example,http://127.0.0.1:8081; * for any); default none"},
    {"--idle-timeout", "OPTD_IDLE_TIMEOUT", F_SIZE, STR(idle_timeout_s), 86400, "seconds after which an idle or half-closed connection is closed (default 60)"},
    {"--tls-cert", "OPTD_TLS_CERT", F_STR, STR(tls_cert), 0, "serve HTTPS with this PEM certificate (chain); needs --tls-key; reloaded on SIGHUP"},
    {"--tls-key", "OPTD_TLS_KEY", F_STR, STR(tls_key), 0, "the PEM private key of --tls-cert"},
    {"--tls-client-ca", "OPTD_TLS_CLIENT_CA", F_STR, STR(tls_client_ca), 0, "mutual TLS: require a client certificate signed by this PEM CA"},
};
#define N_FLAGS (sizeof flags / sizeof flags[0])

/* getopt_long's val for flags[i]; clear of every short option. */
#define FLAG_VAL(i) (256 + (int)(i))

static void usage(FILE *f)
{
    fprintf(f, "usage: optd [flags]\n\noptd " OPTD_VERSION
               " -- optimizer-as-a-service: torch.optim updates over HTTP, durable in SQLite.\n\n");
    for (size_t i = 0; i < N_FLAGS; i++)
        fprintf(f, "  %-24s %-28s %s\n", flags[i].flag, flags[i].env, flags[i].help);
    fprintf(f, "  %-24s %-28s %s\n  %-24s %-28s %s\n", "--help, -h", "", "this text",
            "--version", "", "print the version");
}

static int set_flag(srv_config *c, const flag_spec *f, const char *v, const char *src)
{
    char *p = (char *)c + f->offset;
    char *end;
    switch (f->kind) {
    case F_STR:
        if (strlen(v) >= f->size) {
            fprintf(stderr, "optd: %s is too long\n", src);
            return -1;
        }
        strcpy(p, v);
        return 0;
    case F_INT: {
        errno = 0;
        long x = strtol(v, &end, 10);
        if (*v == '\0' || *end || errno || x < 0 || x > 65535) {
            fprintf(stderr, "optd: %s must be an integer 0..65535, not \"%s\"\n", src, v);
            return -1;
        }
        *(int *)p = (int)x;
        return 0;
    }
    case F_SIZE: {
        errno = 0;
        unsigned long long x = strtoull(v, &end, 10);
        if (*v == '\0' || *v == '-' || *end || errno || x == 0) {
            fprintf(stderr, "optd: %s must be a positive integer, not \"%s\"\n", src, v);
            return -1;
        }
        if (x > f->max) {
            fprintf(stderr, "optd: %s is too large (at most %llu)\n", src, f->max);
            return -1;
        }
        *(size_t *)p = (size_t)x;
        return 0;
    }
    case F_DUR:
        if (strcmp(v, "normal") == 0)
            *(int *)p = STORAGE_SYNC_NORMAL;
        else if (strcmp(v, "full") == 0)
            *(int *)p = STORAGE_SYNC_FULL;
        else {
            fprintf(stderr, "optd: %s must be normal or full, not \"%s\"\n", src, v);
            return -1;
        }
        return 0;
    case F_LOG: {
        static const char *const names[] = {"error", "warn", "info", "debug"};
        for (int i = 0; i < 4; i++) {
            if (strcmp(v, names[i]) == 0) {
                *(int *)p = i;
                return 0;
            }
        }
        fprintf(stderr, "optd: %s must be error, warn, info or debug\n", src);
        return -1;
    }
    }
    return -1;
}

enum { VAL_HELP = 'h', VAL_VERSION = 1 };

int srv_config_parse(srv_config *c, int argc, char **argv)
{
    memset(c, 0, sizeof *c);
    strcpy(c->bind, "127.0.0.1");
    c->port = 8080;
    strcpy(c->db, "./var/optd.db");
    c->max_body_mb = 2048;
    c->max_params = 100000000;
    c->cache_mb = 1024;
    c->durability = STORAGE_SYNC_NORMAL;
    c->log_level = SRV_LOG_INFO;
    c->max_connections = 1000;
    c->max_connections_per_ip = 128;
    c->idle_timeout_s = 60;
    for (size_t i = 0; i < N_FLAGS; i++) {
        const char *v = getenv(flags[i].env);
        if (v && *v && set_flag(c, &flags[i], v, flags[i].env))
            return -1;
    }

    struct option opts[N_FLAGS + 3];
    for (size_t i = 0; i < N_FLAGS; i++)
        opts[i] = (struct option){flags[i].flag + 2, required_argument, NULL, FLAG_VAL(i)};
    opts[N_FLAGS] = (struct option){"help", no_argument, NULL, VAL_HELP};
    opts[N_FLAGS + 1] = (struct option){"version", no_argument, NULL, VAL_VERSION};
    opts[N_FLAGS + 2] = (struct option){NULL, 0, NULL, 0};

    /* '+': stop at the first operand (there are none); ':': report a
     * missing value as ':' so the message is ours, like every other. */
    opterr = 0;
    optind = 0; /* glibc: start over, whatever parsed argv before */
    int ch;
    while ((ch = getopt_long(argc, argv, "+:h", opts, NULL)) != -1) {
        if (ch == VAL_HELP) {
            usage(stdout);
            return 1;
        }
        if (ch == VAL_VERSION) {
            printf("optd " OPTD_VERSION "\n");
            return 1;
        }
        if (ch == ':') {
            fprintf(stderr, "optd: %s needs a value\n", argv[optind - 1]);
            return -1;
        }
        if (ch == '?' || ch < FLAG_VAL(0) || ch >= FLAG_VAL(N_FLAGS)) {
            fprintf(stderr, "optd: unknown flag %s (see optd --help)\n", argv[optind - 1]);
            return -1;
        }
        const flag_spec *f = &flags[ch - FLAG_VAL(0)];
        if (set_flag(c, f, optarg, f->flag))
            return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "optd: unknown flag %s (see optd --help)\n", argv[optind]);
        return -1;
    }
    if (!c->tls_cert[0] != !c->tls_key[0]) {
        fprintf(stderr, "optd: --tls-cert and --tls-key (OPTD_TLS_CERT, OPTD_TLS_KEY) go "
                        "together: give both or neither\n");
        return -1;
    }
    if (c->tls_client_ca[0] && !c->tls_cert[0]) {
        fprintf(stderr, "optd: --tls-client-ca needs --tls-cert and --tls-key\n");
        return -1;
    }
    srv_log_level = c->log_level;
    if (srv_cors_configure(c->cors_origin, "--cors-origin") != 0)
        return -1;
    return 0;
}
