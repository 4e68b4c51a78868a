/*
 * fuzz_step.c -- step decoding: JSON bodies (api_decode_step_json),
 * binary bodies (api_decode_vector_binary) and the Optd-* headers
 * (api_decode_step_headers).  Byte 0 picks the decoder and the dtype,
 * byte 1 the session's size; the rest is the body (for headers: three
 * values separated by NUL bytes).  The output vector is exactly n
 * elements: a write past it is caught by ASan (the buffer is sized n).
 */
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    int which = data[0] % 3;
    optim_dtype dt = (data[0] & 4) ? OPTIM_F64 : OPTIM_F32;
    size_t n = (size_t)(data[1] % 64) + 1;
    const char *body = (const char *)data + 2;
    size_t len = size - 2;
    size_t es = dt == OPTIM_F64 ? 8 : 4;
    void *out = malloc(n * es);
    if (!out)
        abort();
    api_step_meta meta;
    memset(&meta, 0, sizeof meta);
    api_reply r;
    memset(&r, 0, sizeof r);
    int rc;
    if (which == 0) {
        rc = api_decode_step_json(body, len, dt, n, out, &meta, &r);
        if (rc == 0)
            FUZZ_REQUIRE(strlen(meta.worker) <= API_WORKER_MAX, "worker too long");
    } else if (which == 1) {
        rc = api_decode_vector_binary(body, len, dt, n, out, "grad", &r);
        if (rc == 0)
            FUZZ_REQUIRE(len == n * es, "accepted %zu bytes for %zu elements", len, n);
    } else {
        char *s = fuzz_cstr((const uint8_t *)body, len);
        const char *loss = s, *base = NULL, *worker = NULL;
        size_t a = strlen(s);
        if (a < len) {
            base = s + a + 1;
            size_t b = strlen(base);
            if (a + 1 + b < len)
                worker = base + b + 1;
        }
        rc = api_decode_step_headers(*loss ? loss : NULL, base, worker, &meta, &r);
        if (rc == 0)
            FUZZ_REQUIRE(strlen(meta.worker) <= API_WORKER_MAX, "worker too long");
        free(s);
    }
    if (rc != 0)
        fuzz_check_refusal(rc, &r);
    api_reply_free(&r);
    free(out);
    return 0;
}
