/*
 * test_api_cache.c -- hot sessions under --cache-mb: colder sessions are
 * evicted (checkpointed, freed) and come back from disk bit-identical to a
 * session that never left memory.  Real daemon, real SQLite file.
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

#define N 60000          /* params per session: ~0.5 MB of float64 each */
#define SESSIONS 8
#define STEPS 12

static double grad_at(int sess, int t, size_t i)
{
    return (double)((int)((7 * (size_t)t + 13 * i + 3 * (size_t)sess) % 17) - 8) / 8.0;
}

/* Steps 8 Adam sessions round-robin with a cache (8 MiB, about 2.9 MB a session) that holds two of
 * them, so every round reloads most sessions from a checkpoint plus the
 * log; the params must equal local optim_step runs bit for bit. */
static void test_eviction_round_trip(void **state)
{
    (void)state;
    tdaemon d;
    const char *args[] = {"--cache-mb", "8", NULL};
    assert_int_equal(tdaemon_start(&d, NULL, args), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, true);

    double *local[SESSIONS], *buf[SESSIONS][OPTIM_MAX_BUFFERS];
    optim_state st[SESSIONS];
    optim_hparams hp;
    optim_hparams_default(OPTIM_ADAM, &hp);
    hp.lr = 0.01;
    double *g = malloc(N * sizeof *g), *got = malloc(N * sizeof *got);
    for (int s = 0; s < SESSIONS; s++) {
        char name[32];
        snprintf(name, sizeof name, "cache-%d", s);
        tapi_create(c, name,
                    "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":60000,"
                    "\"dtype\":\"float64\"}",
                    201);
        local[s] = calloc(N, sizeof(double));
        memset(&st[s], 0, sizeof st[s]);
        unsigned need = optim_buffers_needed(&hp);
        for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++) {
            buf[s][b] = NULL;
            if (need & (1u << b)) {
                buf[s][b] = malloc(N * sizeof(double));
                optim_buffer_init(&hp, b, OPTIM_F64, buf[s][b], N);
            }
            st[s].buf[b] = buf[s][b];
        }
        optim_state_init(&hp, &st[s]);
    }
    for (int t = 0; t < STEPS; t++) {
        for (int s = 0; s < SESSIONS; s++) {
            char name[32];
            snprintf(name, sizeof name, "cache-%d", s);
            for (size_t i = 0; i < N; i++)
                g[i] = grad_at(s, t, i);
            long long step = -1;
            optd_error err;
            if (optd_step_f64(c, name, g, N, NULL, got, &step, &err) != 0)
                fail_msg("step %d of %s: %d %s", t, name, err.status, err.detail);
            assert_int_equal(step, t + 1);
            optim_step(&hp, &st[s], OPTIM_F64, local[s], g, N);
            if (memcmp(got, local[s], N * sizeof(double)) != 0)
                fail_msg("%s differs from the local run after step %d", name, t + 1);
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
        assert_memory_equal(got, local[s], N * sizeof(double));
        free(local[s]);
        for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++)
            free(buf[s][b]);
    }
    free(g);
    free(got);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eviction_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
