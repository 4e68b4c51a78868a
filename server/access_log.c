/*
 * access_log.c -- request ids and the access log (--access-log FILE: one
 * JSON object a line per request), and the start and stop of the
 * observation module as a whole.
 *
 * A line is written with one write(2) on a descriptor opened O_APPEND, so
 * lines from concurrent requests (and from other processes appending to
 * the same file) never interleave; no lock is taken.
 */
#include "server/observe.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int log_fd = -1;

static bool rid_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-' || c == ':';
}

void obs_request_id(const char *given, char out[OBS_RID_MAX + 1])
{
    if (given) {
        size_t n = strlen(given);
        bool ok = n >= 1 && n <= OBS_RID_MAX;
        for (size_t i = 0; ok && i < n; i++)
            ok = rid_char(given[i]);
        if (ok) {
            memcpy(out, given, n + 1);
            return;
        }
    }
    /* 16 hex digits: a per-thread xorshift seeded from the clock and the
     * thread's stack address, advanced by a process-wide counter. */
    static uint64_t counter;
    static _Thread_local uint64_t state;
    if (!state) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        state = ((uint64_t)ts.tv_sec * 1000000007ULL) ^ (uint64_t)ts.tv_nsec ^
                ((uint64_t)(uintptr_t)&ts << 17) ^ 0x9e3779b97f4a7c15ULL;
    }
    uint64_t x = state ^ (__atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED) * 0xbf58476d1ce4e5b9ULL);
    x ^= x >> 31;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 29;
    state ^= x + (state << 6) + (state >> 2);
    snprintf(out, OBS_RID_MAX + 1, "%016llx", (unsigned long long)x);
}

void obs_access_log(const char *rid, const char *method, const char *route, const char *session,
                    int status, uint64_t bytes_in, uint64_t bytes_out, double seconds)
{
    if (log_fd < 0)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    /* Every string here is from a closed alphabet (methods as libmicrohttpd
     * accepts them are tokens, routes are our patterns, names and ids are
     * validated), so none needs escaping but the method, which we escape
     * by refusing anything outside a token. */
    char m[16];
    size_t k = 0;
    for (const char *p = method; *p && k + 1 < sizeof m; p++)
        m[k++] = (*p >= 'A' && *p <= 'Z') ? *p : '?';
    m[k] = '\0';
    char line[768];
    int n = snprintf(line, sizeof line,
                     "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"request_id\":\"%s\","
                     "\"method\":\"%s\",\"route\":\"%s\",\"session\":%s%s%s,\"status\":%d,"
                     "\"bytes_in\":%llu,\"bytes_out\":%llu,\"latency_ms\":%.3f}\n",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, rid, m, route ? route : "",
                     session && *session ? "\"" : "", session && *session ? session : "null",
                     session && *session ? "\"" : "", status, (unsigned long long)bytes_in,
                     (unsigned long long)bytes_out, seconds * 1e3);
    if (n <= 0 || (size_t)n >= sizeof line)
        return;
    ssize_t w = write(log_fd, line, (size_t)n);
    (void)w; /* a full disk loses log lines, not requests */
}

int obs_init(srv_ctx *ctx)
{
    if (obs_metrics_init(ctx->cfg) != 0) {
        srv_log(SRV_LOG_ERROR, "out of memory for --metrics-sessions");
        return -1;
    }
    if (ctx->cfg->access_log[0]) {
        log_fd = open(ctx->cfg->access_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (log_fd < 0) {
            srv_log(SRV_LOG_ERROR, "cannot open --access-log %s: %s", ctx->cfg->access_log,
                    strerror(errno));
            return -1;
        }
    }
    if (obs_events_init(ctx) != 0) {
        srv_log(SRV_LOG_ERROR, "cannot start the event streams' keepalive thread");
        return -1;
    }
    return 0;
}

void obs_shutdown(void)
{
    obs_events_shutdown();
}

void obs_close(void)
{
    if (log_fd >= 0)
        close(log_fd);
    log_fd = -1;
}
