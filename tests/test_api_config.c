/*
 * test_api_config.c -- session configuration answers that read well, at
 * the api/ level: the canonical config prints numbers in their shortest
 * round-trip form, "optimizer": "adam" decodes as {"type": "adam"}, an
 * unknown optimizer, schedule, clip or hyperparameter lists the valid names
 * and suggests the closest one, and api_config_diff / api_config_conflict
 * name each differing field with both values.  And api/client_constants.json,
 * the constants every client shares, against the daemon's problem types and
 * name rule and the C client's defaults, header names and error kinds.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"
#include "clients/c/optd_client.h"

/* Decodes a create body; the test fails unless it is accepted. */
static void create_ok(const char *body, api_config *cfg)
{
    api_init init;
    void *params = NULL;
    api_reply r = {0};
    int st = api_decode_create(body, strlen(body), 1000, cfg, &init, &params, &r);
    if (st)
        fail_msg("rejected %s: %d %.*s", body, st, (int)r.len, r.body ? r.body : "");
    free(params);
    api_reply_free(&r);
}

/* Decodes a create body that must be refused with 400; returns the
 * problem's detail (caller frees) and checks its field. */
static char *create_bad(const char *body, const char *field)
{
    api_config cfg;
    api_init init;
    void *params = NULL;
    api_reply r = {0};
    int st = api_decode_create(body, strlen(body), 1000, &cfg, &init, &params, &r);
    assert_int_equal(st, 400);
    assert_null(params);
    cJSON *doc = cJSON_ParseWithLength(r.body, r.len);
    assert_non_null(doc);
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(doc, "field");
    assert_true(cJSON_IsString(f));
    assert_string_equal(f->valuestring, field);
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(doc, "detail");
    assert_true(cJSON_IsString(d));
    char *detail = strdup(d->valuestring);
    cJSON_Delete(doc);
    api_reply_free(&r);
    return detail;
}

static void assert_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle))
        fail_msg("\"%s\" does not contain \"%s\"", hay, needle);
}

/* ------------------------------------------------------------ numbers */

static void test_shortest_double(void **state)
{
    (void)state;
    static const struct {
        double d;
        const char *want;
    } cases[] = {
        {0.1, "0.1"},         {0.001, "0.001"},   {0.9, "0.9"},     {0.999, "0.999"},
        {1e-8, "1e-08"},      {3.0, "3"},         {-2.5, "-2.5"},   {0.0, "0"},
        {1.0 / 3.0, "0.3333333333333333"},        {0.1 + 0.2, "0.30000000000000004"},
        {5e-324, "4.94065645841247e-324"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[40];
        api_shortest_double(buf, sizeof buf, cases[i].d);
        assert_string_equal(buf, cases[i].want);
        assert_true(strtod(buf, NULL) == cases[i].d);
    }
    /* Every printed form reads back exactly, over many doubles. */
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < 20000; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double d;
        memcpy(&d, &s, sizeof d);
        if (d != d || d - d != 0)
            continue;
        char buf[40];
        api_shortest_double(buf, sizeof buf, d);
        assert_true(strtod(buf, NULL) == d);
    }
}

static void test_config_json_shortest(void **state)
{
    (void)state;
    api_config cfg;
    create_ok("{\"size\":3,\"optimizer\":{\"type\":\"adam\",\"lr\":0.1,\"weight_decay\":0.01},"
              "\"schedule\":{\"type\":\"step\",\"step_size\":10,\"gamma\":0.3}}",
              &cfg);
    char *json = api_config_to_json(&cfg);
    assert_non_null(json);
    assert_contains(json, "\"lr\":0.1,");
    assert_contains(json, "\"betas\":[0.9,0.999]");
    assert_contains(json, "\"eps\":1e-08");
    assert_contains(json, "\"weight_decay\":0.01");
    assert_contains(json, "\"gamma\":0.3");
    assert_null(strstr(json, "0000000"));
    /* and it reads back to the same config */
    api_config back;
    assert_int_equal(api_config_from_json(json, &back), 0);
    char *again = api_config_to_json(&back);
    assert_string_equal(json, again);
    free(again);
    free(json);
    api_config_free(&back);
    api_config_free(&cfg);
}

static void test_vectors_stay_exact(void **state)
{
    (void)state;
    api_buf b = {0};
    float f[2] = {0.1f, 1.0f / 3.0f};
    assert_int_equal(api_buf_vector(&b, OPTIM_F32, f, 2), 0);
    assert_int_equal(api_buf_put(&b, "", 1), 0);
    assert_string_equal(b.data, "[0.100000001,0.333333343]");
    free(b.data);
    api_buf c = {0};
    double d[1] = {0.1};
    assert_int_equal(api_buf_vector(&c, OPTIM_F64, d, 1), 0);
    assert_int_equal(api_buf_put(&c, "", 1), 0);
    assert_string_equal(c.data, "[0.10000000000000001]");
    free(c.data);
}

/* ------------------------------------------------------- string form */

static void test_optimizer_string_form(void **state)
{
    (void)state;
    api_config a, b;
    create_ok("{\"size\":2,\"optimizer\":\"adam\"}", &a);
    create_ok("{\"size\":2,\"optimizer\":{\"type\":\"adam\"}}", &b);
    char *ja = api_config_to_json(&a), *jb = api_config_to_json(&b);
    assert_string_equal(ja, jb);
    free(ja);
    free(jb);
    /* PATCH takes the same form, and still refuses a change of type. */
    api_reply r = {0};
    const char *p = "{\"optimizer\":\"adam\"}";
    assert_int_equal(api_decode_patch(p, strlen(p), &a, &r), 0);
    p = "{\"optimizer\":\"sgd\"}";
    assert_int_equal(api_decode_patch(p, strlen(p), &a, &r), 400);
    api_reply_free(&r);
    api_config_free(&a);
    api_config_free(&b);

    /* sgd's lr is required, in either form */
    char *d = create_bad("{\"size\":2,\"optimizer\":\"sgd\"}", "optimizer.lr");
    free(d);
    d = create_bad("{\"size\":2,\"optimizer\":7}", "optimizer");
    assert_contains(d, "a name or an object");
    free(d);
}

/* -------------------------------------------------------- valid names */

static void test_closest_name(void **state)
{
    (void)state;
    const char *names[] = {"sgd", "adam", "adamw", "adamax", "cosine", "step"};
    size_t n = sizeof names / sizeof names[0];
    assert_string_equal(api_closest_name("Adam", names, n), "adam");
    assert_string_equal(api_closest_name("ADAMW", names, n), "adamw");
    assert_string_equal(api_closest_name("cosin", names, n), "cosine");
    assert_string_equal(api_closest_name("sdg", names, n), "sgd");
    assert_null(api_closest_name("lbfgs", names, n));
    assert_null(api_closest_name("x", names, n));
}

static void test_unknown_names_list_the_valid_ones(void **state)
{
    (void)state;
    char *d = create_bad("{\"size\":2,\"optimizer\":{\"type\":\"Adam\"}}", "optimizer.type");
    assert_contains(d, "unknown optimizer \"Adam\"; did you mean \"adam\"?");
    assert_contains(d, "(valid: sgd, ");
    assert_contains(d, "adamw");
    assert_contains(d, "lion)");
    free(d);

    d = create_bad("{\"size\":2,\"optimizer\":\"nonsense\"}", "optimizer.type");
    assert_null(strstr(d, "did you mean"));
    assert_contains(d, "valid: sgd");
    free(d);

    d = create_bad("{\"size\":2,\"optimizer\":\"adam\",\"schedule\":{\"type\":\"cosin\"}}",
                   "schedule.type");
    assert_contains(d, "did you mean \"cosine\"?");
    assert_contains(d, "none, constant, step");
    assert_contains(d, "reduce_on_plateau)");
    free(d);

    d = create_bad("{\"size\":2,\"optimizer\":\"adam\",\"clip\":{\"type\":\"nrom\",\"max_norm\":1}}",
                   "clip.type");
    assert_contains(d, "did you mean \"norm\"? (valid: norm, value)");
    free(d);

    d = create_bad("{\"size\":2,\"optimizer\":{\"type\":\"adam\",\"beta\":[0.9,0.99]}}",
                   "optimizer.beta");
    assert_contains(d, "unknown hyperparameter \"beta\" for adam; did you mean \"betas\"?");
    assert_contains(d, "(valid: lr, betas, eps, weight_decay, amsgrad, maximize");
    free(d);
}

/* --------------------------------------------------------------- diff */

static void test_config_diff(void **state)
{
    (void)state;
    api_config a, b, c, d;
    create_ok("{\"size\":4,\"optimizer\":{\"type\":\"adam\",\"lr\":0.001}}", &a);
    create_ok("{\"size\":4,\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"betas\":[0.8,0.999]},"
              "\"clip\":{\"type\":\"norm\",\"max_norm\":1}}",
              &b);
    create_ok("{\"size\":4,\"optimizer\":{\"type\":\"sgd\",\"lr\":0.001},\"dtype\":\"float64\"}",
              &c);
    create_ok("{\"size\":4,\"optimizer\":\"adam\",\"metadata\":{\"run\":1}}", &d);
    char out[400];

    assert_int_equal(api_config_diff(&a, &a, out, sizeof out), 0);
    assert_string_equal(out, "");

    assert_int_equal(api_config_diff(&a, &b, out, sizeof out), 3);
    assert_contains(out, "optimizer.lr: 0.001 in the session, 0.01 requested");
    assert_contains(out, "optimizer.betas: [0.9,0.999] in the session, [0.8,0.999] requested");
    assert_contains(out, "clip: null in the session, {\"type\":\"norm\"");

    assert_int_equal(api_config_diff(&a, &c, out, sizeof out), 2);
    assert_contains(out, "dtype: \"float32\" in the session, \"float64\" requested");
    assert_contains(out, "optimizer.type: \"adam\" in the session, \"sgd\" requested");

    assert_int_equal(api_config_diff(&a, &d, out, sizeof out), 1);
    assert_string_equal(out, "metadata: null in the session, {\"run\":1} requested");

    /* a short buffer is cut with "..." and still says how many differ */
    char small[24];
    assert_int_equal(api_config_diff(&a, &b, small, sizeof small), 3);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_string_equal(small + sizeof small - 4, "...");

    api_reply r = {0};
    assert_int_equal(api_config_conflict(&r, "run-1", &a, &b), 409);
    cJSON *doc = cJSON_ParseWithLength(r.body, r.len);
    assert_non_null(doc);
    const char *detail = cJSON_GetObjectItemCaseSensitive(doc, "detail")->valuestring;
    assert_contains(detail, "session run-1 exists with a different config: optimizer.lr: 0.001");
    assert_contains(detail, "PATCH /v1/sessions/run-1");
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(doc, "status")->valueint, 409);
    cJSON_Delete(doc);
    api_reply_free(&r);

    api_config_free(&a);
    api_config_free(&b);
    api_config_free(&c);
    api_config_free(&d);
}

/* ---------------------------------------------------- client constants */

static cJSON *read_constants(void)
{
    FILE *f = fopen("api/client_constants.json", "rb");
    if (!f)
        fail_msg("api/client_constants.json: run from the repository root");
    static char buf[16384];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    assert_true(n > 0 && n < sizeof buf);
    cJSON *doc = cJSON_ParseWithLength(buf, n);
    assert_non_null(doc);
    return doc;
}

static double num_of(const cJSON *doc, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(doc, name);
    if (!cJSON_IsNumber(v))
        fail_msg("client_constants.json: %s is not a number", name);
    return v->valuedouble;
}

static void test_client_constants(void **state)
{
    (void)state;
    cJSON *doc = read_constants();
    assert_int_equal((int)num_of(doc, "retries"), OPTD_DEFAULT_RETRIES);
    assert_int_equal((int)num_of(doc, "backoff_initial_ms"), OPTD_DEFAULT_BACKOFF_MS);
    assert_int_equal((int)num_of(doc, "backoff_max_ms"), OPTD_DEFAULT_MAX_BACKOFF_MS);
    assert_int_equal((int)num_of(doc, "retry_after_max_s"), OPTD_RETRY_AFTER_MAX_S);

    /* The name rule: the C client's pattern is the file's, and the daemon's
     * api_name_valid agrees with it on its edges. */
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(doc, "name_pattern");
    assert_true(cJSON_IsString(pat));
    assert_string_equal(pat->valuestring, OPTD_NAME_PATTERN);
    assert_string_equal(pat->valuestring, "^[A-Za-z0-9._-]{1,128}$");
    char longest[130];
    memset(longest, 'x', sizeof longest);
    assert_true(api_name_valid(longest, 128));
    assert_false(api_name_valid(longest, 129));
    assert_false(api_name_valid("", 0));
    assert_true(api_name_valid("Az09._-", 7));
    assert_false(api_name_valid("a b", 3));
    assert_false(api_name_valid("a/b", 3));

    static const struct {
        const char *key, *value;
    } mine[] = {
        {"idempotency_key", OPTD_HEADER_IDEMPOTENCY_KEY}, {"loss", OPTD_HEADER_LOSS},
        {"base_step", OPTD_HEADER_BASE_STEP},             {"worker", OPTD_HEADER_WORKER},
        {"dtype", OPTD_HEADER_DTYPE},                     {"step", OPTD_HEADER_STEP},
        {"lr", OPTD_HEADER_LR},                           {"pending", OPTD_HEADER_PENDING},
        {"replayed", OPTD_HEADER_REPLAYED},               {"skipped", OPTD_HEADER_SKIPPED},
        {"params_crc32", OPTD_HEADER_PARAMS_CRC32},
    };
    const cJSON *headers = cJSON_GetObjectItemCaseSensitive(doc, "headers");
    assert_int_equal(cJSON_GetArraySize(headers), sizeof mine / sizeof mine[0]);
    for (size_t i = 0; i < sizeof mine / sizeof mine[0]; i++) {
        const cJSON *h = cJSON_GetObjectItemCaseSensitive(headers, mine[i].key);
        assert_true(cJSON_IsString(h));
        assert_string_equal(h->valuestring, mine[i].value);
    }

    const cJSON *p;
    int n = 0;
    cJSON_ArrayForEach(p, cJSON_GetObjectItemCaseSensitive(doc, "problems"))
    {
        int status = (int)num_of(p, "status");
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(p, "type");
        const cJSON *kind = cJSON_GetObjectItemCaseSensitive(p, "kind");
        const cJSON *field = cJSON_GetObjectItemCaseSensitive(p, "field");
        assert_true(cJSON_IsString(type) && cJSON_IsString(kind));
        /* the daemon's problem type for the status */
        assert_string_equal(api_problem_type(status), type->valuestring);
        /* the C client's kind */
        optd_error e = {.status = status, .step = -1};
        snprintf(e.type, sizeof e.type, "%s", type->valuestring);
        if (cJSON_IsString(field))
            snprintf(e.field, sizeof e.field, "%s", field->valuestring);
        assert_string_equal(optd_error_kind(&e), kind->valuestring);
        n++;
    }
    assert_true(n >= 10);
    optd_error none = {.status = 0};
    assert_string_equal(optd_error_kind(&none), "connection_failed");
    cJSON_Delete(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shortest_double),
        cmocka_unit_test(test_config_json_shortest),
        cmocka_unit_test(test_vectors_stay_exact),
        cmocka_unit_test(test_optimizer_string_form),
        cmocka_unit_test(test_closest_name),
        cmocka_unit_test(test_unknown_names_list_the_valid_ones),
        cmocka_unit_test(test_config_diff),
        cmocka_unit_test(test_client_constants),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
