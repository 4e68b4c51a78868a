/*
 * cors.h -- cross-origin access for browser pages (--cors-origin): which
 * origins may call optd, the preflight answer to OPTIONS, and the CORS
 * headers every other answer carries for an allowed origin.
 */
#ifndef SERVER_CORS_H
#define SERVER_CORS_H

#include <stdbool.h>

#include <microhttpd.h>

#include "api/api.h"

/* Longest --cors-origin value, and most origins in it. */
#define SRV_CORS_LIST_MAX 2048
#define SRV_CORS_ORIGINS_MAX 32
/* How long a browser may keep a preflight's answer (seconds). */
#define SRV_CORS_MAX_AGE 600

/* Reads --cors-origin: "" (no CORS at all), "*" (any origin), or a
 * comma-separated list of exact origins ("https://a.example,
 * http://127.0.0.1:8080").  Scheme and host are folded to lower case, as
 * browsers send them.  Returns 0, or -1 after printing what is wrong (src
 * names the flag or variable).  Called once at startup, before any
 * request. */
int srv_cors_configure(const char *list, const char *src);

/* Answers OPTIONS on a raw path, before authentication: 204 with Allow for
 * a plain OPTIONS; for a preflight (Origin + Access-Control-Request-Method)
 * 204 when the origin and the method are allowed, else 403; 404 for an
 * unknown path.  Fills r (the CORS headers are added by
 * srv_cors_decorate); returns the status. */
int srv_cors_options(struct MHD_Connection *c, const char *path, api_reply *r);

/* Adds the CORS headers to an answer about to be queued: Vary: Origin
 * whenever --cors-origin is set and, for an allowed Origin,
 * Access-Control-Allow-Origin with Access-Control-Expose-Headers (or, on a
 * successful preflight, the Allow-Methods/-Headers and Max-Age).  method
 * and path are the request's (path raw, as routed). */
void srv_cors_decorate(struct MHD_Connection *c, const char *method, const char *path,
                       int status, struct MHD_Response *resp);

#endif /* SERVER_CORS_H */
