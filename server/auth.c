/*
 * auth.c -- the admin key, scoped tokens, their quotas and step rates.
 *
 * A token is "optd_<id>_<secret>": a 16-hex-digit id (64 random bits) and
 * a 64-hex-digit secret (256 bits from gnutls_rnd).  The database keeps
 * HMAC-SHA256(key, whole token) only; the key lives in a 0600 file beside
 * the database (--token-key, default <db>.token-key), never in it, so a
 * copy of the database alone (a backup, a stolen file) cannot be used to
 * check guesses offline.  Digests are compared in constant time.
 *
 * Every token is held in memory (loaded at start, written through on mint
 * and revoke): checking one costs a scan of a small array and one HMAC,
 * with no SQLite read on the request path, and a revocation is seen by the
 * very next request.  The step rate of each token is a token bucket kept
 * in the same entry (not persisted: a restart refills it).
 *
 * Scopes nest, read < step < admin; the admin key holds every scope and is
 * the only credential that manages tokens.  A token's prefix bounds the
 * session names it may touch; a name outside it is 403 whether or not the
 * session exists (nothing about other sessions leaks).
 */
#include "server/auth.h"
#include "server/server.h"

#include <cjson/cJSON.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define KEY_BYTES 32
#define SECRET_BYTES 32
#define TOKEN_PREFIX "optd_"
#define TOKEN_LEN (5 + SRV_TOKEN_ID_LEN + 1 + 2 * SECRET_BYTES)
#define LABEL_MAX 128
/* The longest Retry-After a quota answer names (sessions and params do not
 * come back by waiting: the client should give up soon). */
#define QUOTA_RETRY_S 60

typedef struct {
    char id[SRV_TOKEN_ID_LEN + 1];
    unsigned char hash[STORAGE_TOKEN_HASH];
    int scope;
    char prefix[API_NAME_MAX + 1];
    char label[LABEL_MAX + 1];
    int64_t created_ms, expires_ms, revoked_ms;
    int64_t max_sessions, max_params;
    double rate, burst;  /* steps per second (0: none), bucket size     */
    double level;        /* steps in the bucket now                      */
    double level_t;      /* when level was computed (monotonic seconds) */
} token;

static struct {
    pthread_mutex_t mu; /* guards n, cap, t (entries and their buckets) */
    pthread_mutex_t quota_mu; /* held across a quota check and its create */
    bool on;
    unsigned char key[KEY_BYTES];
    token *t;
    size_t n, cap;
} A = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, false, {0}, NULL, 0, 0};

static const char *const scope_names[] = {"", "read", "step", "admin"};

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int scope_from_name(const char *s)
{
    for (int i = API_SCOPE_READ; i <= API_SCOPE_ADMIN; i++)
        if (strcmp(s, scope_names[i]) == 0)
            return i;
    return -1;
}

/* Constant-time: the time taken depends on the lengths only. */
static bool bytes_equal(const unsigned char *a, const unsigned char *b, size_t n)
{
    unsigned char d = 0;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

/* Constant-time comparison of the admin key: the time taken does not
 * depend on where the keys differ. */
static bool key_equal(const char *given, const char *want)
{
    size_t lg = strlen(given), lw = strlen(want);
    unsigned char d = (unsigned char)(lg != lw);
    for (size_t i = 0; i < lw; i++)
        d |= (unsigned char)(want[i] ^ (i < lg ? given[i] : 0));
    return d == 0;
}

static int token_hash(const char *tok, unsigned char out[STORAGE_TOKEN_HASH])
{
    return gnutls_hmac_fast(GNUTLS_MAC_SHA256, A.key, KEY_BYTES, tok, strlen(tok), out) == 0
               ? 0
               : -1;
}

static void hex(const unsigned char *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

static bool is_hex(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
            return false;
    return true;
}

/* ------------------------------------------------------------ the key */

/* Reads the key file, or creates it (0600, O_EXCL) when absent.  0 or -1
 * (logged). */
static int load_key(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        unsigned char k[KEY_BYTES];
        if (gnutls_rnd(GNUTLS_RND_KEY, k, sizeof k) != 0) {
            srv_log(SRV_LOG_ERROR, "no random bytes for the token key");
            return -1;
        }
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0) {
            srv_log(SRV_LOG_ERROR, "cannot create the token key %s: %s", path, strerror(errno));
            return -1;
        }
        ssize_t w = write(fd, k, sizeof k);
        int sync = fsync(fd);
        close(fd);
        if (w != (ssize_t)sizeof k || sync != 0) {
            srv_log(SRV_LOG_ERROR, "cannot write the token key %s: %s", path, strerror(errno));
            unlink(path);
            return -1;
        }
        memcpy(A.key, k, sizeof k);
        srv_log(SRV_LOG_INFO, "created the token key %s (back it up with the database)", path);
        return 0;
    }
    if (fd < 0) {
        srv_log(SRV_LOG_ERROR, "cannot open the token key %s: %s", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || (sb.st_mode & 077) != 0) {
        srv_log(SRV_LOG_ERROR,
                "the token key %s is readable by others (mode %03o): chmod 600 it first", path,
                (unsigned)(sb.st_mode & 0777));
        close(fd);
        return -1;
    }
    unsigned char extra;
    ssize_t n = read(fd, A.key, KEY_BYTES);
    ssize_t more = read(fd, &extra, 1);
    close(fd);
    if (n != KEY_BYTES || more != 0) {
        srv_log(SRV_LOG_ERROR, "the token key %s is not %d bytes", path, KEY_BYTES);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------- the tokens */

/* Under A.mu: room for one more entry.  NULL when out of memory. */
static token *append_slot(void)
{
    if (A.n == A.cap) {
        size_t cap = A.cap ? 2 * A.cap : 16;
        token *t = realloc(A.t, cap * sizeof *t);
        if (!t)
            return NULL;
        A.t = t;
        A.cap = cap;
    }
    return &A.t[A.n];
}

static int load_one(void *ud, const storage_token *st)
{
    (void)ud;
    token *t = append_slot();
    if (!t)
        return STORAGE_ENOMEM;
    memset(t, 0, sizeof *t);
    snprintf(t->id, sizeof t->id, "%s", st->id);
    memcpy(t->hash, st->hash, STORAGE_TOKEN_HASH);
    t->scope = scope_from_name(st->scope);
    if (t->scope < 0)
        t->scope = API_SCOPE_READ;
    snprintf(t->prefix, sizeof t->prefix, "%s", st->prefix);
    snprintf(t->label, sizeof t->label, "%s", st->label ? st->label : "");
    t->created_ms = st->created_ms;
    t->expires_ms = st->expires_ms;
    t->revoked_ms = st->revoked_ms;
    t->max_sessions = st->max_sessions;
    t->max_params = st->max_params;
    t->rate = st->steps_per_second;
    t->burst = st->burst;
    t->level = t->burst;
    t->level_t = mono_s();
    A.n++;
    return 0;
}

int srv_auth_open(storage *db, const char *api_key, const char *key_path)
{
    if (!api_key[0])
        return 0; /* authentication off: tokens are not used */
    if (load_key(key_path) != 0)
        return -1;
    pthread_mutex_lock(&A.mu);
    A.n = 0;
    int err = storage_token_each(db, load_one, NULL);
    A.on = err == STORAGE_OK;
    size_t n = A.n;
    pthread_mutex_unlock(&A.mu);
    if (err != STORAGE_OK) {
        srv_log(SRV_LOG_ERROR, "cannot read the tokens: %s (%s)", storage_last_error(),
                storage_strerror(err));
        return -1;
    }
    srv_log(SRV_LOG_INFO, "%zu token%s loaded", n, n == 1 ? "" : "s");
    return 0;
}

void srv_auth_close(void)
{
    pthread_mutex_lock(&A.mu);
    free(A.t);
    A.t = NULL;
    A.n = A.cap = 0;
    A.on = false;
    memset(A.key, 0, sizeof A.key);
    pthread_mutex_unlock(&A.mu);
}

/* Under A.mu. */
static token *find(const char *id)
{
    for (size_t i = 0; i < A.n; i++)
        if (strcmp(A.t[i].id, id) == 0)
            return &A.t[i];
    return NULL;
}

/* ---------------------------------------------------------- checking */

/* The credential of "Authorization: Bearer X" (scheme in any case, one or
 * more blanks), or NULL. */
static const char *bearer(const char *a)
{
    if (!a || strncasecmp(a, "Bearer", 6) != 0 || (a[6] != ' ' && a[6] != '\t'))
        return NULL;
    a += 6;
    while (*a == ' ' || *a == '\t')
        a++;
    return *a ? a : NULL;
}

static int unauthorized(api_reply *r, const char *why)
{
    api_problem(r, 401, NULL, "%s", why);
    api_reply_header(r, "WWW-Authenticate", "Bearer realm=\"optd\"");
    return 401;
}

bool srv_auth_name_ok(const srv_principal *who, const char *name)
{
    return !who || who->kind != SRV_WHO_TOKEN ||
           strncmp(name, who->prefix, strlen(who->prefix)) == 0;
}

/* Under A.mu: takes one step from t's bucket.  0, or the seconds to wait
 * (>= 1) until one is there. */
static int bucket_take(token *t)
{
    double now = mono_s();
    t->level += (now - t->level_t) * t->rate;
    if (t->level > t->burst)
        t->level = t->burst;
    t->level_t = now;
    if (t->level >= 1.0) {
        t->level -= 1.0;
        return 0;
    }
    double wait = ceil((1.0 - t->level) / t->rate);
    return wait < 1 ? 1 : wait > 86400 ? 86400 : (int)wait;
}

/* The token credential tok: fills who, or the 401. */
static int check_token(const char *tok, srv_principal *who, api_reply *r)
{
    if (strlen(tok) != TOKEN_LEN || strncmp(tok, TOKEN_PREFIX, 5) != 0 ||
        tok[5 + SRV_TOKEN_ID_LEN] != '_' || !is_hex(tok + 5, SRV_TOKEN_ID_LEN) ||
        !is_hex(tok + 6 + SRV_TOKEN_ID_LEN, 2 * SECRET_BYTES))
        return unauthorized(r, "wrong API key or token (Authorization: Bearer KEY-or-TOKEN)");
    unsigned char h[STORAGE_TOKEN_HASH];
    if (token_hash(tok, h) != 0)
        return api_problem(r, 503, NULL, "cannot hash the token");
    char id[SRV_TOKEN_ID_LEN + 1];
    memcpy(id, tok + 5, SRV_TOKEN_ID_LEN);
    id[SRV_TOKEN_ID_LEN] = '\0';
    int64_t now = srv_now_ms();
    pthread_mutex_lock(&A.mu);
    token *t = A.on ? find(id) : NULL;
    /* The hash first: what a token's state is (revoked, expired) is told
     * to its holder only. */
    bool ok = t && bytes_equal(t->hash, h, sizeof h);
    const char *why = !ok             ? "wrong API key or token (Authorization: Bearer "
                                        "KEY-or-TOKEN)"
                      : t->revoked_ms ? "this token was revoked"
                      : t->expires_ms && now >= t->expires_ms ? "this token has expired"
                                                              : NULL;
    if (!why) {
        who->kind = SRV_WHO_TOKEN;
        who->scope = t->scope;
        memcpy(who->id, t->id, sizeof who->id);
        memcpy(who->prefix, t->prefix, sizeof who->prefix);
    }
    pthread_mutex_unlock(&A.mu);
    return why ? unauthorized(r, why) : 0;
}

int srv_auth_check(const char *api_key, const char *metrics_token, const api_route *route,
                   const char *name, const char *authorization, srv_principal *who,
                   api_reply *r)
{
    memset(who, 0, sizeof *who);
    if (route->scope == API_SCOPE_PUBLIC)
        return 0;
    const char *cred = bearer(authorization);
    if (route->id == API_R_METRICS) {
        /* --metrics-token when set, else the admin key (when set). */
        const char *key = metrics_token[0] ? metrics_token : api_key;
        if (key[0] && !(cred && key_equal(cred, key)))
            return unauthorized(r, "missing or wrong metrics token or API key "
                                   "(Authorization: Bearer KEY)");
        who->kind = key[0] ? SRV_WHO_ADMIN : SRV_WHO_NONE;
        who->scope = API_SCOPE_KEY;
        return 0;
    }
    if (!api_key[0]) {
        if (route->scope == API_SCOPE_KEY)
            return api_problem(r, 409, NULL,
                               "tokens need an admin key: start optd with --api-key "
                               "(authentication is off without one)");
        who->scope = API_SCOPE_KEY;
        return 0;
    }
    if (!cred)
        return unauthorized(r, "missing API key or token (Authorization: Bearer "
                               "KEY-or-TOKEN)");
    if (key_equal(cred, api_key)) {
        who->kind = SRV_WHO_ADMIN;
        who->scope = API_SCOPE_KEY;
        return 0;
    }
    /* Scope and prefix before the rate: a refused request takes no step
     * from the bucket. */
    int st = check_token(cred, who, r);
    if (st)
        return st;
    if (route->scope == API_SCOPE_KEY)
        return api_problem(r, 403, "scope", "%s %s needs the admin key: tokens do not manage "
                                            "tokens",
                           route->method, route->pattern);
    if (who->scope < route->scope)
        return api_problem(r, 403, "scope", "%s %s needs scope \"%s\"; this token has \"%s\"",
                           route->method, route->pattern, scope_names[route->scope],
                           scope_names[who->scope]);
    if (name[0] && !srv_auth_name_ok(who, name))
        return api_problem(r, 403, "prefix",
                           "session %s is outside this token's prefix \"%s\"", name,
                           who->prefix);
    if (route->id != API_R_STEP)
        return 0;
    pthread_mutex_lock(&A.mu);
    token *t = find(who->id);
    int wait = t && t->rate > 0 ? bucket_take(t) : 0;
    double rate = t ? t->rate : 0, burst = t ? t->burst : 0;
    pthread_mutex_unlock(&A.mu);
    if (wait) {
        api_problem(r, 429, NULL,
                    "token %s is past its rate of %g steps per second (burst %g); retry in %d s",
                    who->id, rate, burst, wait);
        api_reply_header(r, "Retry-After", "%d", wait);
        return 429;
    }
    return 0;
}

/* ------------------------------------------------------------ quotas */

int srv_auth_create(storage *db, const srv_principal *who, eng_session *s, int64_t now_ms,
                    api_reply *r)
{
    const char *owner = !who || who->kind == SRV_WHO_NONE ? ""
                        : who->kind == SRV_WHO_ADMIN      ? "admin"
                                                          : who->id;
    snprintf(s->created_by, sizeof s->created_by, "%s", owner);
    int64_t max_sessions = 0, max_params = 0;
    if (who && who->kind == SRV_WHO_TOKEN) {
        pthread_mutex_lock(&A.mu);
        token *t = find(who->id);
        if (t) {
            max_sessions = t->max_sessions;
            max_params = t->max_params;
        }
        pthread_mutex_unlock(&A.mu);
    }
    if (!max_sessions && !max_params)
        return eng_session_create(db, s, now_ms);
    pthread_mutex_lock(&A.quota_mu);
    int64_t n = 0, p = 0;
    int err = storage_owner_usage(db, who->id, &n, &p);
    if (err == STORAGE_OK && max_sessions && n + 1 > max_sessions) {
        api_problem(r, 429, "max_sessions",
                    "token %s has created %lld of its %lld sessions: delete one first",
                    who->id, (long long)n, (long long)max_sessions);
        api_reply_header(r, "Retry-After", "%d", QUOTA_RETRY_S);
        err = SRV_EQUOTA;
    } else if (err == STORAGE_OK && max_params && p + (int64_t)s->cfg.size > max_params) {
        api_problem(r, 429, "max_params",
                    "token %s's sessions hold %lld params; %llu more would pass its quota of "
                    "%lld",
                    who->id, (long long)p, (unsigned long long)s->cfg.size,
                    (long long)max_params);
        api_reply_header(r, "Retry-After", "%d", QUOTA_RETRY_S);
        err = SRV_EQUOTA;
    } else if (err == STORAGE_OK) {
        err = eng_session_create(db, s, now_ms);
    }
    pthread_mutex_unlock(&A.quota_mu);
    return err;
}

/* ------------------------------------------------------ the routes */

static cJSON *timestamp(int64_t ms)
{
    char tmp[64];
    time_t sec = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    snprintf(tmp, sizeof tmp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    return cJSON_CreateString(tmp);
}

static int reply_doc(api_reply *r, int status, cJSON *doc)
{
    char *s = doc ? cJSON_PrintUnformatted(doc) : NULL;
    cJSON_Delete(doc);
    if (!s)
        return api_problem(r, 503, NULL, "out of memory");
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d)
        memcpy(d, s, n + 1);
    cJSON_free(s);
    if (!d)
        return api_problem(r, 503, NULL, "out of memory");
    api_reply_body(r, status, "application/json", d, n);
    return status;
}

/* The token's document (never its secret nor its hash). */
static cJSON *token_doc(const token *t)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    cJSON_AddStringToObject(o, "id", t->id);
    cJSON *sc = cJSON_AddArrayToObject(o, "scopes");
    for (int i = API_SCOPE_READ; sc && i <= t->scope; i++)
        cJSON_AddItemToArray(sc, cJSON_CreateString(scope_names[i]));
    cJSON_AddStringToObject(o, "prefix", t->prefix);
    if (t->label[0])
        cJSON_AddStringToObject(o, "label", t->label);
    cJSON_AddItemToObject(o, "created_at", timestamp(t->created_ms));
    if (t->expires_ms)
        cJSON_AddItemToObject(o, "expires_at", timestamp(t->expires_ms));
    if (t->revoked_ms)
        cJSON_AddItemToObject(o, "revoked_at", timestamp(t->revoked_ms));
    cJSON *q = cJSON_AddObjectToObject(o, "quotas");
    if (q && t->max_sessions)
        cJSON_AddNumberToObject(q, "max_sessions", (double)t->max_sessions);
    if (q && t->max_params)
        cJSON_AddNumberToObject(q, "max_params", (double)t->max_params);
    if (q && t->rate > 0) {
        cJSON_AddNumberToObject(q, "steps_per_second", t->rate);
        cJSON_AddNumberToObject(q, "burst", t->burst);
    }
    return o;
}

static int tokens_off(api_reply *r)
{
    return api_problem(r, 409, NULL, "tokens need an admin key: start optd with --api-key");
}

int srv_auth_tokens_list(storage *db, api_reply *r)
{
    (void)db;
    cJSON *doc = cJSON_CreateObject();
    cJSON *arr = doc ? cJSON_AddArrayToObject(doc, "tokens") : NULL;
    if (!arr) {
        cJSON_Delete(doc);
        return api_problem(r, 503, NULL, "out of memory");
    }
    pthread_mutex_lock(&A.mu);
    if (!A.on) {
        pthread_mutex_unlock(&A.mu);
        cJSON_Delete(doc);
        return tokens_off(r);
    }
    for (size_t i = 0; i < A.n; i++)
        cJSON_AddItemToArray(arr, token_doc(&A.t[i]));
    pthread_mutex_unlock(&A.mu);
    return reply_doc(r, 200, doc);
}

int srv_auth_token_get(storage *db, const char *id, api_reply *r)
{
    pthread_mutex_lock(&A.mu);
    token *t = A.on ? find(id) : NULL;
    token copy;
    if (t)
        copy = *t;
    bool on = A.on;
    pthread_mutex_unlock(&A.mu);
    if (!on)
        return tokens_off(r);
    if (!t)
        return api_problem(r, 404, NULL, "no token %s", id);
    cJSON *doc = token_doc(&copy);
    int64_t n = 0, p = 0;
    int err = storage_owner_usage(db, copy.id, &n, &p);
    if (err != STORAGE_OK) {
        cJSON_Delete(doc);
        return srv_engine_fail(r, err, "counting the token's sessions");
    }
    cJSON *u = doc ? cJSON_AddObjectToObject(doc, "usage") : NULL;
    if (u) {
        cJSON_AddNumberToObject(u, "sessions", (double)n);
        cJSON_AddNumberToObject(u, "params", (double)p);
    }
    return reply_doc(r, 200, doc);
}

int srv_auth_token_delete(storage *db, const char *id, api_reply *r)
{
    pthread_mutex_lock(&A.mu);
    token *t = A.on ? find(id) : NULL;
    bool on = A.on;
    pthread_mutex_unlock(&A.mu);
    if (!on)
        return tokens_off(r);
    if (!t)
        return api_problem(r, 404, NULL, "no token %s", id);
    int64_t now = srv_now_ms();
    int err = storage_token_revoke(db, id, now);
    if (err != STORAGE_OK)
        return srv_engine_fail(r, err, "revoking the token");
    pthread_mutex_lock(&A.mu);
    t = find(id);
    if (t && !t->revoked_ms)
        t->revoked_ms = now;
    pthread_mutex_unlock(&A.mu);
    srv_log(SRV_LOG_INFO, "token %s revoked", id);
    api_reply_body(r, 204, "application/json", NULL, 0);
    return 204;
}

/* An integer member >= 1 (and <= max), or the 400 naming it. */
static int positive_int(const cJSON *v, const char *field, int64_t max, int64_t *out,
                        api_reply *r)
{
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 ||
        v->valuedouble > (double)max)
        return api_problem(r, 400, field, "%s must be an integer from 1 to %lld", field,
                           (long long)max);
    *out = (int64_t)v->valuedouble;
    return 0;
}

/* "2026-12-01T00:00:00Z" or with a fraction ".123Z": milliseconds since
 * the epoch, or -1. */
static int64_t parse_rfc3339(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    int used = 0;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
               &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &used) != 6 || used != 19)
        return -1;
    const char *p = s + used;
    int ms = 0, digits = 0;
    if (*p == '.') {
        for (p++; *p >= '0' && *p <= '9'; p++, digits++)
            if (digits < 3)
                ms = ms * 10 + (*p - '0');
        if (digits == 0)
            return -1;
        for (int d = digits; d < 3; d++)
            ms *= 10;
    }
    if ((p[0] != 'Z' && p[0] != 'z') || p[1] != '\0')
        return -1;
    if (tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 || tm.tm_mday > 31 ||
        tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    return t < 0 ? -1 : (int64_t)t * 1000 + ms;
}

static bool prefix_valid(const char *p)
{
    for (; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

/* Decodes a mint request into t (its limits and metadata).  0 or the
 * 400. */
static int decode_mint(const cJSON *root, token *t, api_reply *r)
{
    static const char *const known[] = {"scopes", "prefix", "label", "expires_in", "expires_at",
                                        "quotas", NULL};
    static const char *const known_q[] = {"max_sessions", "max_params", "steps_per_second",
                                          "burst", NULL};
    if (!cJSON_IsObject(root))
        return api_problem(r, 400, NULL, "the body must be a JSON object");
    const cJSON *m;
    cJSON_ArrayForEach(m, root)
    {
        int i = 0;
        while (known[i] && strcmp(known[i], m->string) != 0)
            i++;
        if (!known[i])
            return api_problem(r, 400, m->string,
                               "unknown field \"%s\" (scopes, prefix, label, expires_in, "
                               "expires_at, quotas)",
                               m->string);
    }
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(root, "scopes");
    if (!cJSON_IsArray(sc) || cJSON_GetArraySize(sc) == 0)
        return api_problem(r, 400, "scopes",
                           "scopes must be a non-empty array of \"read\", \"step\", \"admin\"");
    t->scope = 0;
    cJSON_ArrayForEach(m, sc)
    {
        int s = cJSON_IsString(m) ? scope_from_name(m->valuestring) : -1;
        if (s < 0)
            return api_problem(r, 400, "scopes",
                               "unknown scope (use \"read\", \"step\" or \"admin\"; each holds "
                               "the ones before it)");
        if (s > t->scope)
            t->scope = s;
    }
    const cJSON *px = cJSON_GetObjectItemCaseSensitive(root, "prefix");
    if (px) {
        if (!cJSON_IsString(px) || strlen(px->valuestring) > API_NAME_MAX ||
            !prefix_valid(px->valuestring))
            return api_problem(r, 400, "prefix",
                               "prefix must be a session-name prefix: up to %d characters of "
                               "A-Z a-z 0-9 . _ - (names hold no '/': write run42- or run42.)",
                               API_NAME_MAX);
        snprintf(t->prefix, sizeof t->prefix, "%s", px->valuestring);
    }
    const cJSON *lb = cJSON_GetObjectItemCaseSensitive(root, "label");
    if (lb) {
        if (!cJSON_IsString(lb) || strlen(lb->valuestring) > LABEL_MAX)
            return api_problem(r, 400, "label", "label must be a string of at most %d bytes",
                               LABEL_MAX);
        snprintf(t->label, sizeof t->label, "%s", lb->valuestring);
    }
    const cJSON *ein = cJSON_GetObjectItemCaseSensitive(root, "expires_in");
    const cJSON *eat = cJSON_GetObjectItemCaseSensitive(root, "expires_at");
    if (ein && eat)
        return api_problem(r, 400, "expires_at", "give expires_in or expires_at, not both");
    if (ein) {
        int64_t s;
        if (positive_int(ein, "expires_in", (int64_t)100 * 365 * 86400, &s, r))
            return 400;
        t->expires_ms = t->created_ms + s * 1000;
    }
    if (eat) {
        int64_t ms = cJSON_IsString(eat) ? parse_rfc3339(eat->valuestring) : -1;
        if (ms < 0)
            return api_problem(r, 400, "expires_at",
                               "expires_at must be an RFC 3339 UTC time like "
                               "\"2026-12-01T00:00:00Z\"");
        if (ms <= t->created_ms)
            return api_problem(r, 400, "expires_at", "expires_at is in the past");
        t->expires_ms = ms;
    }
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "quotas");
    if (q) {
        if (!cJSON_IsObject(q))
            return api_problem(r, 400, "quotas", "quotas must be an object");
        cJSON_ArrayForEach(m, q)
        {
            int i = 0;
            while (known_q[i] && strcmp(known_q[i], m->string) != 0)
                i++;
            if (!known_q[i])
                return api_problem(r, 400, "quotas",
                                   "unknown quota \"%s\" (max_sessions, max_params, "
                                   "steps_per_second, burst)",
                                   m->string);
        }
        const cJSON *v;
        if ((v = cJSON_GetObjectItemCaseSensitive(q, "max_sessions")) &&
            positive_int(v, "quotas.max_sessions", INT64_C(1) << 40, &t->max_sessions, r))
            return 400;
        if ((v = cJSON_GetObjectItemCaseSensitive(q, "max_params")) &&
            positive_int(v, "quotas.max_params", INT64_C(1) << 52, &t->max_params, r))
            return 400;
        const cJSON *rate = cJSON_GetObjectItemCaseSensitive(q, "steps_per_second");
        const cJSON *burst = cJSON_GetObjectItemCaseSensitive(q, "burst");
        if (rate) {
            if (!cJSON_IsNumber(rate) || !(rate->valuedouble > 0) || rate->valuedouble > 1e6)
                return api_problem(r, 400, "quotas.steps_per_second",
                                   "quotas.steps_per_second must be a number > 0 and <= 1e6");
            t->rate = rate->valuedouble;
            t->burst = t->rate < 1 ? 1 : t->rate;
        }
        if (burst) {
            if (!rate)
                return api_problem(r, 400, "quotas.burst",
                                   "quotas.burst needs quotas.steps_per_second");
            if (!cJSON_IsNumber(burst) || !(burst->valuedouble >= 1) ||
                burst->valuedouble > 1e6)
                return api_problem(r, 400, "quotas.burst",
                                   "quotas.burst must be a number >= 1 and <= 1e6");
            t->burst = burst->valuedouble;
        }
    }
    return 0;
}

int srv_auth_tokens_post(storage *db, const char *body, size_t len, api_reply *r)
{
    pthread_mutex_lock(&A.mu);
    bool on = A.on;
    pthread_mutex_unlock(&A.mu);
    if (!on)
        return tokens_off(r);
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root)
        return api_problem(r, 400, NULL, "the body is not valid JSON");
    token t;
    memset(&t, 0, sizeof t);
    t.created_ms = srv_now_ms();
    int st = decode_mint(root, &t, r);
    cJSON_Delete(root);
    if (st)
        return st;
    unsigned char idb[SRV_TOKEN_ID_LEN / 2], secret[SECRET_BYTES];
    char secret_hex[2 * SECRET_BYTES + 1], tok[TOKEN_LEN + 1];
    int err = STORAGE_EEXIST;
    for (int tries = 0; tries < 4 && err == STORAGE_EEXIST; tries++) {
        if (gnutls_rnd(GNUTLS_RND_NONCE, idb, sizeof idb) != 0 ||
            gnutls_rnd(GNUTLS_RND_KEY, secret, sizeof secret) != 0)
            return api_problem(r, 503, NULL, "no random bytes for a token");
        hex(idb, sizeof idb, t.id);
        hex(secret, sizeof secret, secret_hex);
        snprintf(tok, sizeof tok, TOKEN_PREFIX "%s_%s", t.id, secret_hex);
        if (token_hash(tok, t.hash) != 0)
            return api_problem(r, 503, NULL, "cannot hash the token");
        storage_token row = {
            .id = t.id, .hash = t.hash, .scope = scope_names[t.scope], .prefix = t.prefix,
            .label = t.label[0] ? t.label : NULL, .created_ms = t.created_ms,
            .expires_ms = t.expires_ms, .max_sessions = t.max_sessions,
            .max_params = t.max_params, .steps_per_second = t.rate, .burst = t.burst,
        };
        err = storage_token_put(db, &row);
    }
    memset(secret, 0, sizeof secret);
    memset(secret_hex, 0, sizeof secret_hex);
    if (err != STORAGE_OK) {
        memset(tok, 0, sizeof tok);
        return srv_engine_fail(r, err, "storing the token");
    }
    t.level = t.burst;
    t.level_t = mono_s();
    pthread_mutex_lock(&A.mu);
    token *slot = append_slot();
    if (slot) {
        *slot = t;
        A.n++;
    }
    pthread_mutex_unlock(&A.mu);
    if (!slot) {
        /* Stored but not usable until a restart: revoke it rather than
         * leave a secret nobody was shown. */
        storage_token_revoke(db, t.id, srv_now_ms());
        memset(tok, 0, sizeof tok);
        return api_problem(r, 503, NULL, "out of memory for the token; nothing was minted");
    }
    cJSON *doc = token_doc(&t);
    if (doc)
        cJSON_AddStringToObject(doc, "token", tok);
    memset(tok, 0, sizeof tok);
    srv_log(SRV_LOG_INFO, "token %s minted (scope %s, prefix \"%s\")", t.id,
            scope_names[t.scope], t.prefix);
    st = reply_doc(r, 201, doc);
    if (st == 201)
        api_reply_header(r, "Location", "/v1/tokens/%s", t.id);
    return st;
}
