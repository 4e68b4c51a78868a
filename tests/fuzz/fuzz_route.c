/*
 * fuzz_route.c -- route matching and session names (api_route_match,
 * api_name_valid).  Input: "METHOD PATH" (the first space splits them;
 * no space: GET).  A matched name must be one the documented pattern
 * allows: 1-128 of A-Z a-z 0-9 . _ -, not "." or "..", so no NUL, '/',
 * '%' or anything percent-decoded can reach a lookup.
 */
#include "tests/fuzz/fuzz.h"

#include <stdbool.h>

static bool name_ok_n(const char *s, size_t n)
{
    if (n < 1 || n > API_NAME_MAX || (n == 1 && s[0] == '.') ||
        (n == 2 && s[0] == '.' && s[1] == '.'))
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool name_ok(const char *s)
{
    return name_ok_n(s, strlen(s));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fuzz_cstr(data, size);
    const char *method = "GET", *path = s;
    char *sp = strchr(s, ' ');
    if (sp) {
        *sp = '\0';
        method = s;
        path = sp + 1;
    }
    const api_route *route = NULL;
    char name[API_NAME_MAX + 1];
    api_reply r;
    memset(&r, 0, sizeof r);
    int rc = api_route_match(method, path, &route, name, &r);
    if (rc == 0) {
        FUZZ_REQUIRE(route != NULL, "matched without a route");
        /* HEAD is served by the GET routes (api.h). */
        const char *want = strcmp(method, "HEAD") == 0 ? "GET" : method;
        FUZZ_REQUIRE(strcmp(route->method, want) == 0, "%s matched a %s route", method,
                     route->method);
        if (strstr(route->pattern, "{name}"))
            FUZZ_REQUIRE(name_ok(name), "route %s took the name \"%s\"", route->pattern, name);
        else
            FUZZ_REQUIRE(name[0] == '\0', "no {name} in %s but name \"%s\"", route->pattern,
                         name);
    } else {
        FUZZ_REQUIRE(rc == 400 || rc == 404 || rc == 405, "status %d", rc);
        fuzz_check_refusal(rc, &r);
    }
    /* api_name_valid agrees with the documented pattern on any bytes
     * (a NUL is not in the pattern, so it is never valid). */
    FUZZ_REQUIRE(api_name_valid((const char *)data, size) == name_ok_n((const char *)data, size),
                 "api_name_valid disagrees on %zu bytes", size);
    api_reply_free(&r);
    free(s);
    return 0;
}
