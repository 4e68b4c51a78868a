/*
 * dashboard.c -- GET / (the dashboard's page) and GET /assets/{name} (its
 * script, style and the vendored chart library), served from the files of
 * web/ that the build embeds into web_assets.c (tools/embed.c).  Nothing is
 * read from disk at run time.
 */
#include "server/observe.h"

#include <stdlib.h>
#include <string.h>

static const obs_asset *find_asset(const char *name)
{
    for (size_t i = 0; i < obs_asset_count; i++)
        if (strcmp(obs_assets[i].name, name) == 0)
            return &obs_assets[i];
    return NULL;
}

static int reply_asset(api_reply *r, const obs_asset *a)
{
    char *body = malloc(a->len ? a->len : 1);
    if (!body)
        return api_problem(r, 503, NULL, "out of memory");
    memcpy(body, a->data, a->len);
    api_reply_body(r, 200, a->type, body, a->len);
    /* The files change only with the binary. */
    api_reply_header(r, "Cache-Control", "no-cache");
    api_reply_header(r, "X-Content-Type-Options", "nosniff");
    return 200;
}

int obs_h_dashboard(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)ctx;
    (void)req;
    const obs_asset *a = find_asset("index.html");
    if (!a)
        return api_problem(r, 404, NULL, "this build has no dashboard");
    int st = reply_asset(r, a);
    if (st == 200)
        api_reply_header(r, "Content-Security-Policy",
                         "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:");
    return st;
}

int obs_h_asset(srv_ctx *ctx, const srv_request *req, api_reply *r)
{
    (void)ctx;
    const obs_asset *a = find_asset(req->name);
    if (!a || strcmp(req->name, "index.html") == 0)
        return api_problem(r, 404, "name", "no dashboard file named %s", req->name);
    return reply_asset(r, a);
}
