/*
 * fuzz_config_json.c -- the config loader (api_config_from_json): the
 * canonical config text stored in SQLite, read back at every load, so a
 * damaged database is input too.  Whatever loads must encode and load
 * again to the same text.
 */
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fuzz_cstr(data, size);
    api_config cfg;
    memset(&cfg, 0, sizeof cfg);
    if (api_config_from_json(s, &cfg) == 0) {
        char *json = api_config_to_json(&cfg);
        FUZZ_REQUIRE(json, "api_config_to_json failed");
        api_config back;
        memset(&back, 0, sizeof back);
        FUZZ_REQUIRE(api_config_from_json(json, &back) == 0, "its own output does not load: %s",
                     json);
        char *again = api_config_to_json(&back);
        FUZZ_REQUIRE(again && strcmp(json, again) == 0, "not stable:\n%s\n%s", json,
                     again ? again : "(null)");
        free(again);
        free(json);
        api_config_free(&back);
    }
    api_config_free(&cfg);
    free(s);
    return 0;
}
