/*
 * cors.c -- Cross-Origin Resource Sharing (the Fetch standard's CORS
 * protocol) for pages that call optd from another origin.
 *
 * Off by default: without --cors-origin no answer carries a CORS header and
 * browsers keep cross-origin pages out.  With it:
 *   - a preflight (OPTIONS with Origin and Access-Control-Request-Method) is
 *     answered before authentication (browsers never send credentials on
 *     one): 204 with the allowed origin, the path's methods, the request
 *     headers optd reads and a max age; 403 without CORS headers for an
 *     origin or a method that is not allowed;
 *   - every other answer to an allowed Origin -- successes, problems,
 *     streamed bodies, the event stream -- names the origin and exposes the
 *     response headers clients read;
 *   - every answer says Vary: Origin, so that a cache never hands one
 *     origin's answer to another.
 * "*" allows any origin and is sent as "*".  No answer carries
 * Access-Control-Allow-Credentials: optd uses no cookies, and the API key
 * travels in an Authorization header the page sets itself, which needs no
 * credentials mode.
 */
#include "server/cors.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

/* Request headers optd reads (api/openapi.yaml's header parameters,
 * server/handlers.c, server/http.c).  A browser preflights any of them
 * that is not CORS-safelisted. */
static const char REQUEST_HEADERS[] =
    "Authorization, Content-Type, Accept, Idempotency-Key, X-Request-Id, Last-Event-ID, "
    "Optd-Loss, Optd-Base-Step, Optd-Worker, Optd-Dtype, Optd-Absent, Optd-Params-Dtype, "
    "Optd-Group-Lr, Optd-Group-Momentum, Optd-Group-Beta1, Optd-Grad-Norm";

/* Response headers clients read; a page sees only the safelisted ones
 * (Content-Type, Content-Length, Cache-Control, ...) and these. */
static const char EXPOSE_HEADERS[] =
    "Optd-Step, Optd-Lr, Optd-Replayed, Optd-Skipped, Optd-Pending, Optd-Round-Size, "
    "Optd-Params-Crc32, Optd-Dtype, Optd-Fault-Counts, X-Request-Id, Location, Retry-After, "
    "WWW-Authenticate, Allow";

static struct {
    bool on;  /* --cors-origin given */
    bool any; /* "*" */
    int n;
    char list[SRV_CORS_LIST_MAX];              /* the entries, NUL-separated */
    const char *origin[SRV_CORS_ORIGINS_MAX];  /* into list                  */
} cors;

/* Checks one origin "scheme://host[:port]" and folds scheme and host to
 * lower case in place.  NULL when it is one, else what is wrong. */
static const char *origin_check(char *o)
{
    if (strcmp(o, "null") == 0)
        return "\"null\" (the origin of files and sandboxed pages) cannot be allowed";
    if (strchr(o, '*'))
        return "no wildcards in an origin: list each one, or \"*\" alone for any";
    char *p = o;
    if (!isalpha((unsigned char)*p))
        return "an origin is scheme://host[:port], e.g. https://app.example";
    for (; isalnum((unsigned char)*p) || *p == '+' || *p == '-' || *p == '.'; p++)
        *p = (char)tolower((unsigned char)*p);
    if (strncmp(p, "://", 3) != 0)
        return "an origin is scheme://host[:port], e.g. https://app.example";
    p += 3;
    char *host = p;
    if (*p == '[') {
        /* An IPv6 literal. */
        for (p++; isxdigit((unsigned char)*p) || *p == ':' || *p == '.'; p++)
            *p = (char)tolower((unsigned char)*p);
        if (*p != ']' || p == host + 1)
            return "an IPv6 host is written [address]";
        p++;
    } else {
        for (; isalnum((unsigned char)*p) || *p == '-' || *p == '.' || *p == '_'; p++)
            *p = (char)tolower((unsigned char)*p);
        if (p == host)
            return "an origin needs a host";
    }
    if (*p == ':') {
        char *digits = ++p;
        long port = 0;
        for (; isdigit((unsigned char)*p) && port <= 65535; p++)
            port = port * 10 + (*p - '0');
        if (p == digits || port < 1 || port > 65535 || (*p && isdigit((unsigned char)*p)))
            return "the port must be 1..65535";
    }
    if (*p == '/')
        return "an origin has no path, not even a trailing /";
    if (*p)
        return "an origin is scheme://host[:port], e.g. https://app.example";
    return NULL;
}

int srv_cors_configure(const char *list, const char *src)
{
    memset(&cors, 0, sizeof cors);
    if (!list || !*list)
        return 0;
    if (strlen(list) >= sizeof cors.list) {
        fprintf(stderr, "optd: %s is too long\n", src);
        return -1;
    }
    /* Split on commas, trimming blanks. */
    const char *p = list;
    char *out = cors.list;
    for (;;) {
        while (*p == ' ' || *p == '\t')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m && (p[m - 1] == ' ' || p[m - 1] == '\t'))
            m--;
        if (m == 0) {
            fprintf(stderr, "optd: %s has an empty entry (a list is origin,origin,...)\n", src);
            return -1;
        }
        if (cors.n == SRV_CORS_ORIGINS_MAX) {
            fprintf(stderr, "optd: %s lists more than %d origins\n", src, SRV_CORS_ORIGINS_MAX);
            return -1;
        }
        memcpy(out, p, m);
        out[m] = '\0';
        if (strcmp(out, "*") == 0) {
            cors.any = true;
        } else {
            const char *why = origin_check(out);
            if (why) {
                fprintf(stderr, "optd: %s: \"%s\": %s\n", src, out, why);
                return -1;
            }
        }
        cors.origin[cors.n++] = out;
        out += m + 1;
        p += n;
        if (*p != ',')
            break;
        p++;
    }
    if (cors.any && cors.n > 1) {
        fprintf(stderr, "optd: %s: \"*\" allows every origin; list no others with it\n", src);
        return -1;
    }
    cors.on = true;
    return 0;
}

/* The request's Origin when it is allowed, else NULL. */
static const char *allowed_origin(struct MHD_Connection *c)
{
    if (!cors.on)
        return NULL;
    const char *o = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    if (!o || !*o)
        return NULL;
    if (cors.any)
        return o;
    for (int i = 0; i < cors.n; i++)
        if (strcmp(o, cors.origin[i]) == 0)
            return o;
    return NULL;
}

/* Is method one of the comma-separated list? */
static bool listed(const char *list, const char *method)
{
    size_t n = strlen(method);
    for (const char *p = list; *p;) {
        size_t k = strcspn(p, ",");
        if (k == n && strncmp(p, method, n) == 0)
            return true;
        p += k;
        while (*p == ',' || *p == ' ')
            p++;
    }
    return false;
}

static bool is_preflight(struct MHD_Connection *c)
{
    return MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin") &&
           MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Method");
}

int srv_cors_options(struct MHD_Connection *c, const char *path, api_reply *r)
{
    char methods[64];
    if (!api_path_methods(path, methods, sizeof methods))
        return api_problem(r, 404, NULL, "no route for %s", path);
    if (!is_preflight(c)) {
        api_reply_header(r, "Allow", "%s, OPTIONS", methods);
        api_reply_body(r, 204, NULL, NULL, 0);
        return 204;
    }
    const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    const char *want =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Method");
    if (!allowed_origin(c))
        return api_problem(r, 403, "Origin",
                           cors.on ? "origin %s is not allowed (see --cors-origin)"
                                   : "origin %s is not allowed: optd runs without --cors-origin",
                           origin);
    if (!listed(methods, want))
        return api_problem(r, 403, "Access-Control-Request-Method",
                           "%s is not allowed on %s (allowed: %s)", want, path, methods);
    api_reply_body(r, 204, NULL, NULL, 0);
    return 204;
}

void srv_cors_decorate(struct MHD_Connection *c, const char *method, const char *path,
                       int status, struct MHD_Response *resp)
{
    if (!cors.on)
        return;
    MHD_add_response_header(resp, "Vary", "Origin");
    const char *origin = allowed_origin(c);
    if (!origin)
        return;
    bool options = strcmp(method, "OPTIONS") == 0;
    if (options && is_preflight(c)) {
        /* Only a preflight that passed names the origin. */
        char methods[64];
        if (status != 204 || !api_path_methods(path, methods, sizeof methods))
            return;
        MHD_add_response_header(resp, "Access-Control-Allow-Origin", cors.any ? "*" : origin);
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", methods);
        MHD_add_response_header(resp, "Access-Control-Allow-Headers", REQUEST_HEADERS);
        char age[16];
        snprintf(age, sizeof age, "%d", SRV_CORS_MAX_AGE);
        MHD_add_response_header(resp, "Access-Control-Max-Age", age);
        return;
    }
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", cors.any ? "*" : origin);
    MHD_add_response_header(resp, "Access-Control-Expose-Headers", EXPOSE_HEADERS);
}
