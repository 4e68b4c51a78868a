/*
 * fuzz.h -- shared bits of the libFuzzer targets in tests/fuzz/.
 *
 * Each target feeds one api/ parser and checks what must hold for any
 * input: no crash or sanitizer report, an answer that is either success
 * or a problem reply with a 4xx status, and for what is accepted, the
 * round trips documented in api/api.h.  A broken property aborts, which
 * libFuzzer reports as a crash with the input saved.
 */
#ifndef FUZZ_H
#define FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"

/* A NUL-terminated copy of data (libFuzzer's input is not); caller frees. */
static inline char *fuzz_cstr(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        abort();
    memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

#define FUZZ_REQUIRE(cond, ...)                                                              \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz: %s:%d: %s: ", __FILE__, __LINE__, #cond);                 \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fputc('\n', stderr);                                                             \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

/* A refused input must come with a problem reply of a 4xx status. */
static inline void fuzz_check_refusal(int rc, const api_reply *r)
{
    FUZZ_REQUIRE(rc == r->status, "returned %d, reply status %d", rc, r->status);
    FUZZ_REQUIRE(r->status >= 400 && r->status < 500, "status %d", r->status);
    FUZZ_REQUIRE(r->body && r->len > 0, "a problem without a body");
}

#endif /* FUZZ_H */
