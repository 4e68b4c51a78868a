/*
 * fuzz_session_config.c -- the session-config decoder: PUT bodies
 * (api_decode_create) and PATCH bodies (api_decode_patch) applied onto a
 * valid config.  The first byte picks which; the rest is the body.
 * Whatever is accepted must encode to canonical JSON that loads back
 * (api_config_from_json) and encodes to the same text.
 */
#include "tests/fuzz/fuzz.h"

static void round_trip(const api_config *cfg)
{
    char *json = api_config_to_json(cfg);
    FUZZ_REQUIRE(json, "api_config_to_json failed");
    api_config back;
    memset(&back, 0, sizeof back);
    FUZZ_REQUIRE(api_config_from_json(json, &back) == 0, "canonical config does not load: %s",
                 json);
    char *again = api_config_to_json(&back);
    FUZZ_REQUIRE(again && strcmp(json, again) == 0, "canonical config changed on reload:\n%s\n%s",
                 json, again ? again : "(null)");
    free(again);
    free(json);
    api_config_free(&back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    int patch = data[0] & 1;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    api_reply r;
    memset(&r, 0, sizeof r);
    if (!patch) {
        api_config cfg;
        api_init init;
        void *params = NULL;
        memset(&cfg, 0, sizeof cfg);
        int rc = api_decode_create(body, len, 4096, &cfg, &init, &params, &r);
        if (rc == 0) {
            FUZZ_REQUIRE(cfg.size >= 1 && cfg.size <= 4096, "size %llu",
                         (unsigned long long)cfg.size);
            round_trip(&cfg);
        } else {
            fuzz_check_refusal(rc, &r);
        }
        free(params);
        api_config_free(&cfg);
    } else {
        static const char base[] = "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.001},"
                                   "\"size\":8,\"schedule\":{\"type\":\"cosine\",\"T_max\":100}}";
        api_config cfg;
        api_init init;
        void *params = NULL;
        memset(&cfg, 0, sizeof cfg);
        api_reply r0;
        memset(&r0, 0, sizeof r0);
        FUZZ_REQUIRE(api_decode_create(base, sizeof base - 1, 4096, &cfg, &init, &params, &r0) == 0,
                     "the base config is refused: %.*s", (int)r0.len, r0.body ? r0.body : "");
        api_reply_free(&r0);
        int rc = api_decode_patch(body, len, &cfg, &r);
        if (rc == 0)
            round_trip(&cfg);
        else
            fuzz_check_refusal(rc, &r);
        free(params);
        api_config_free(&cfg);
    }
    api_reply_free(&r);
    return 0;
}
