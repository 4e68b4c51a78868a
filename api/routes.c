/*
 * routes.c -- the route table (data, not an if-chain), path matching, and
 * content negotiation.
 */
#include "api/api.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

const api_route api_routes[] = {
    {"GET", "/healthz", API_R_HEALTHZ, API_BODY_NONE, API_SCOPE_PUBLIC},
    {"GET", "/v1/optimizers", API_R_OPTIMIZERS, API_BODY_NONE, API_SCOPE_READ},
    {"GET", "/v1/sessions", API_R_SESSIONS_LIST, API_BODY_NONE, API_SCOPE_READ},
    {"PUT", "/v1/sessions/{name}", API_R_SESSION_PUT, API_BODY_JSON, API_SCOPE_ADMIN},
    {"GET", "/v1/sessions/{name}", API_R_SESSION_GET, API_BODY_NONE, API_SCOPE_READ},
    {"PATCH", "/v1/sessions/{name}", API_R_SESSION_PATCH, API_BODY_JSON, API_SCOPE_ADMIN},
    {"DELETE", "/v1/sessions/{name}", API_R_SESSION_DELETE, API_BODY_NONE, API_SCOPE_ADMIN},
    {"POST", "/v1/sessions/{name}/step", API_R_STEP, API_BODY_VECTOR, API_SCOPE_STEP},
    {"GET", "/v1/sessions/{name}/params", API_R_PARAMS_GET, API_BODY_NONE, API_SCOPE_READ},
    {"PUT", "/v1/sessions/{name}/params", API_R_PARAMS_PUT, API_BODY_VECTOR, API_SCOPE_ADMIN},
    {"GET", "/v1/sessions/{name}/history", API_R_HISTORY, API_BODY_NONE, API_SCOPE_READ},
    {"GET", "/v1/sessions/{name}/state", API_R_STATE_GET, API_BODY_NONE, API_SCOPE_READ},
    {"PUT", "/v1/sessions/{name}/state", API_R_STATE_PUT, API_BODY_BINARY, API_SCOPE_ADMIN},
    {"GET", "/v1/sessions/{name}/events", API_R_EVENTS, API_BODY_NONE, API_SCOPE_READ},
    /* /metrics: --metrics-token when set, else the admin key.  The
     * dashboard's files are public (the page asks for the key). */
    {"GET", "/metrics", API_R_METRICS, API_BODY_NONE, API_SCOPE_KEY},
    {"GET", "/", API_R_DASHBOARD, API_BODY_NONE, API_SCOPE_PUBLIC},
    {"GET", "/assets/{name}", API_R_ASSET, API_BODY_NONE, API_SCOPE_PUBLIC},
    {"GET", "/v1/sessions/{name}/checkpoints", API_R_CHECKPOINTS_GET, API_BODY_NONE, API_SCOPE_READ},
    {"POST", "/v1/sessions/{name}/checkpoints", API_R_CHECKPOINTS_POST, API_BODY_JSON, API_SCOPE_ADMIN},
    {"POST", "/v1/sessions/{name}/rollback", API_R_ROLLBACK, API_BODY_JSON, API_SCOPE_ADMIN},
    {"GET", "/v1/sessions/{name}/export", API_R_EXPORT_GET, API_BODY_NONE, API_SCOPE_READ},
    {"PUT", "/v1/sessions/{name}/export", API_R_EXPORT_PUT, API_BODY_BINARY, API_SCOPE_ADMIN},
    /* Tokens: the admin key only (a token never mints or revokes one). */
    {"GET", "/v1/tokens", API_R_TOKENS_LIST, API_BODY_NONE, API_SCOPE_KEY},
    {"POST", "/v1/tokens", API_R_TOKENS_POST, API_BODY_JSON, API_SCOPE_KEY},
    {"GET", "/v1/tokens/{id}", API_R_TOKEN_GET, API_BODY_NONE, API_SCOPE_KEY},
    {"DELETE", "/v1/tokens/{id}", API_R_TOKEN_DELETE, API_BODY_NONE, API_SCOPE_KEY},
};
const size_t api_route_count = sizeof api_routes / sizeof api_routes[0];

bool api_name_valid(const char *name, size_t len)
{
    if (len < 1 || len > API_NAME_MAX)
        return false;
    /* "." and ".." would be folded away by URL normalisation in clients. */
    if ((len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.'))
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!(isalnum(c) || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

/* Matches path against pattern; the one "{name}" segment is captured into
 * *seg / *seg_len.  Returns true on a match. */
static bool match(const char *pattern, const char *path, const char **seg, size_t *seg_len)
{
    *seg = NULL;
    *seg_len = 0;
    while (*pattern && *path) {
        if (*pattern == '{') {
            const char *end = strchr(path, '/');
            size_t n = end ? (size_t)(end - path) : strlen(path);
            *seg = path;
            *seg_len = n;
            path += n;
            pattern = strchr(pattern, '}') + 1;
            continue;
        }
        if (*pattern != *path)
            return false;
        pattern++;
        path++;
    }
    return *pattern == '\0' && *path == '\0';
}

size_t api_path_methods(const char *path, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    const char *seg;
    size_t seg_len;
    for (size_t i = 0; i < api_route_count; i++) {
        const api_route *rt = &api_routes[i];
        if (!match(rt->pattern, path, &seg, &seg_len))
            continue;
        bool get = strcmp(rt->method, "GET") == 0;
        int n = snprintf(buf + len, size - len, "%s%s", len ? ", " : "",
                         get ? "GET, HEAD" : rt->method);
        if (n < 0 || (size_t)n >= size - len) {
            buf[len] = '\0';
            break;
        }
        len += (size_t)n;
    }
    return len;
}

int api_route_match(const char *method, const char *path, const api_route **route,
                    char name[API_NAME_MAX + 1], api_reply *r)
{
    /* HEAD is GET without the body (libmicrohttpd leaves the body out). */
    const char *as = strcmp(method, "HEAD") == 0 ? "GET" : method;
    const char *seg = NULL;
    size_t seg_len = 0;
    for (size_t i = 0; i < api_route_count; i++) {
        const api_route *rt = &api_routes[i];
        if (strcmp(rt->method, as) != 0 || !match(rt->pattern, path, &seg, &seg_len))
            continue;
        if (seg) {
            if (!api_name_valid(seg, seg_len))
                return api_problem(r, 400, "name",
                                   "invalid session name: use 1-128 characters of A-Z a-z 0-9 . _ - (not \".\" or \"..\")");
            memcpy(name, seg, seg_len);
            name[seg_len] = '\0';
        } else {
            name[0] = '\0';
        }
        *route = rt;
        return 0;
    }
    char allowed[64];
    if (api_path_methods(path, allowed, sizeof allowed)) {
        /* Every path answers OPTIONS too (server/cors.c). */
        if (strlen(allowed) + 9 < sizeof allowed)
            strcat(allowed, ", OPTIONS");
        api_problem(r, 405, NULL, "%s is not allowed on %s (allowed: %s)", method, path, allowed);
        api_reply_header(r, "Allow", "%s", allowed);
        return 405;
    }
    return api_problem(r, 404, NULL, "no route for %s", path);
}

/* True when a "q=..." parameter list (between ';' and the range's end)
 * carries q=0 (or 0.0, 0.00, ...), i.e. refuses the range. */
static bool refused(const char *p, const char *end)
{
    while (p < end) {
        while (p < end && (*p == ';' || *p == ' '))
            p++;
        if (end - p >= 2 && (p[0] == 'q' || p[0] == 'Q') && p[1] == '=') {
            bool zero = p + 2 < end && p[2] == '0';
            for (const char *d = p + 3; zero && d < end && *d != ';'; d++)
                if (*d != '.' && *d != '0')
                    zero = false;
            return zero;
        }
        while (p < end && *p != ';')
            p++;
    }
    return false;
}

/* Does the media-range list accept this type?  A minimal reading of RFC
 * 9110: ranges separated by commas, parameters after ';', q=0 refuses. */
static bool accepts(const char *header, const char *type)
{
    size_t tlen = strlen(type);
    size_t major = (size_t)(strchr(type, '/') - type);
    for (const char *p = header; *p;) {
        while (*p == ' ' || *p == ',')
            p++;
        const char *end = p + strcspn(p, ",");
        const char *semi = memchr(p, ';', (size_t)(end - p));
        const char *rend = semi ? semi : end;
        while (rend > p && rend[-1] == ' ')
            rend--;
        size_t rlen = (size_t)(rend - p);
        bool match = (rlen == 3 && strncmp(p, "*/*", 3) == 0) ||
                     (rlen == tlen && strncasecmp(p, type, tlen) == 0) ||
                     (rlen == major + 2 && strncasecmp(p, type, major + 1) == 0 &&
                      p[major + 1] == '*');
        if (match && !(semi && refused(semi, end)))
            return true;
        p = end;
    }
    return false;
}

int api_accept(const char *h, bool binary_ok)
{
    if (!h || !*h)
        return 0;
    /* An explicit binary request wins when the route can produce it. */
    if (binary_ok && strstr(h, "application/octet-stream") &&
        accepts(h, "application/octet-stream"))
        return 1;
    if (accepts(h, "application/json"))
        return 0;
    if (binary_ok && accepts(h, "application/octet-stream"))
        return 1;
    return -1;
}

int api_content_type(const char *ct, bool binary_ok)
{
    if (!ct || !*ct)
        return 0; /* no Content-Type: read it as JSON */
    size_t n = strcspn(ct, "; ");
    if (n == 16 && strncasecmp(ct, "application/json", 16) == 0)
        return 0;
    if (binary_ok && n == 24 && strncasecmp(ct, "application/octet-stream", 24) == 0)
        return 1;
    return -1;
}
