/*
 * test_api_cache.c -- hot sessions under --cache-mb: colder sessions are
 * evicted (checkpointed, freed) and come back from disk bit-identical to a
 * session that never left memory, and equal to torch's rules (the
 * reference vectors of tests/fixtures/optim/).  Real daemons, real SQLite
 * files.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clients/c/optd_client.h"
#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"
#include "tests/support/fixture.h"

#define N 60000          /* params per session: ~0.5 MB of float64 each */
#define SESSIONS 8
#define STEPS 12

/* One reference case per session (tests/fixtures/optim/, from torch's
 * rules), all float64 and all different, so a session reloaded from
 * another's checkpoint or log cannot pass. */
static const char *const cases[SESSIONS] = {
    "adam_all_f64_n37",        "adamw_amsgrad_f64_n37",   "nadam_wd_f64_n37",
    "radam_wd_f64_n37",        "rmsprop_centered_f64_n37", "adagrad_lr_decay_f64_n37",
    "sgd_nesterov_wd_f64_n37", "lion_wd_f64_n37",
};

/* Steps 8 sessions round-robin with a cache (8 MiB) that holds only a few
 * of them, so every round reloads most sessions from a checkpoint plus the
 * log.  After updates 1-3 the params must equal torch's rules (the
 * fixtures) at every sampled index; after every update, and after a
 * restart, they must equal bit for bit those of a second daemon that
 * never evicts anything. */
static void test_eviction_round_trip(void **state)
{
    (void)state;
    tdaemon d, ref;
    const char *args[] = {"--cache-mb", "8", NULL};
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    assert_int_equal(tdaemon_start(&ref, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, true);
    optd_client *rc = tapi_client(tdaemon_url(&ref), NULL, true);

    static tfix_case fx[SESSIONS];
    double *want[SESSIONS];
    double *g = malloc(N * sizeof *g), *got = malloc(N * sizeof *got);
    assert_true(g && got);
    for (int s = 0; s < SESSIONS; s++) {
        assert_int_equal(tfix_load(cases[s], &fx[s]), 0);
        assert_int_equal(fx[s].dtype, OPTIM_F64);
        char name[32];
        snprintf(name, sizeof name, "cache-%d", s);
        char *params = tfix_params_json(&fx[s], N);
        assert_non_null(params);
        size_t blen = strlen(params) + strlen(fx[s].optimizer) + 64;
        char *body = malloc(blen);
        assert_non_null(body);
        snprintf(body, blen, "{\"optimizer\":%s,\"dtype\":\"float64\",\"params\":%s}",
                 fx[s].optimizer, params);
        tapi_create(c, name, body, 201);
        tapi_create(rc, name, body, 201);
        free(body);
        free(params);
        want[s] = malloc(N * sizeof(double));
        assert_non_null(want[s]);
    }
    for (int t = 1; t <= STEPS; t++) {
        for (int s = 0; s < SESSIONS; s++) {
            char name[32];
            snprintf(name, sizeof name, "cache-%d", s);
            tfix_grad(&fx[s], t, g, N);
            long long step = -1;
            optd_error err;
            if (optd_step_f64(rc, name, g, N, NULL, want[s], &step, &err) != 0)
                fail_msg("step %d of %s (reference daemon): %d %s", t, name, err.status,
                         err.detail);
            if (optd_step_f64(c, name, g, N, NULL, got, &step, &err) != 0)
                fail_msg("step %d of %s: %d %s", t, name, err.status, err.detail);
            assert_int_equal(step, t);
            char why[256];
            if (tfix_check_at(&fx[s], t) && tfix_compare(&fx[s], t, got, N, why, sizeof why))
                fail_msg("%s (%s): %s", name, cases[s], why);
            if (memcmp(got, want[s], N * sizeof(double)) != 0)
                fail_msg("%s differs from the daemon that never evicts after step %d", name, t);
        }
    }
    /* Only a few sessions fit: the daemon must have evicted the rest. */
    optd_response r = tapi_req(c, "GET", "/healthz", NULL, NULL);
    cJSON *h = tapi_json(&r);
    double hot = tapi_num(h, "hot_sessions");
    if (!(hot >= 1 && hot < SESSIONS))
        fail_msg("hot_sessions = %g with --cache-mb 8 and %d sessions of %d doubles", hot,
                 SESSIONS, N);
    cJSON_Delete(h);
    optd_response_free(&r);

    /* And a restart brings every one back identical. */
    optd_client_free(c);
    assert_int_equal(tdaemon_restart(&d), 0);
    c = tapi_client(tdaemon_url(&d), NULL, true);
    for (int s = 0; s < SESSIONS; s++) {
        char name[32];
        snprintf(name, sizeof name, "cache-%d", s);
        long long step = -1;
        optd_error err;
        if (optd_get_params_f64(c, name, got, N, &step, &err) != 0)
            fail_msg("params of %s: %d %s", name, err.status, err.detail);
        assert_int_equal(step, STEPS);
        assert_memory_equal(got, want[s], N * sizeof(double));
        free(want[s]);
        tfix_free(&fx[s]);
    }
    free(g);
    free(got);
    optd_client_free(c);
    optd_client_free(rc);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tdaemon_stop(&ref), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
    tdaemon_cleanup(&ref);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eviction_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
