/*
 * jsonmem.c -- cJSON's allocations, tracked.  cJSON answers a failed
 * allocation with NULL, which its callers cannot tell from a syntax error
 * (a parse) or which they do not check at all (building a document member
 * by member): a document built while memory ran out can silently lack a
 * member.  With these hooks installed, every failed cJSON allocation is
 * counted on the thread that made it, so that a caller can tell.
 */
#include "api/api.h"

#include <cjson/cJSON.h>
#include <stdlib.h>

static _Thread_local unsigned long failures;

static void *tracked_malloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        failures++;
    return p;
}

void api_json_track_allocations(void)
{
    cJSON_Hooks hooks = {.malloc_fn = tracked_malloc, .free_fn = free};
    cJSON_InitHooks(&hooks);
}

unsigned long api_json_failures(void)
{
    return failures;
}
