/*
 * test_layout.c -- sessions made of named tensors and param groups, through
 * a real daemon: per-group hyperparameters, tensors without a gradient
 * (torch: grad None -- params, buffers and the tensor's own step count stay
 * untouched), client-driven group values (a torch scheduler), all equal to
 * per-tensor runs of the optim/ kernels bit for bit, before and after a
 * kill -9; the refusals that protect it.
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
#include "tests/support/gen.h"

/* Three tensors: a weight large enough for several blocks, a bias, a head. */
#define NT 3
static const size_t tsize[NT] = {3 * OPTIM_VEC_BLOCK + 100, 37, 500};
static const int tgroup[NT] = {0, 1, 1};
#define TOTAL (3 * OPTIM_VEC_BLOCK + 100 + 37 + 500)

typedef struct {
    optim_hparams hp[2];        /* per group                                  */
    optim_state st[NT];
    float *buf[NT][OPTIM_MAX_BUFFERS];
    float *p;                   /* the whole vector                           */
} reference;

static size_t toff(int t)
{
    size_t o = 0;
    for (int k = 0; k < t; k++)
        o += tsize[k];
    return o;
}

static void ref_init(reference *r, const float *p0)
{
    memset(r, 0, sizeof *r);
    r->p = malloc(TOTAL * sizeof(float));
    memcpy(r->p, p0, TOTAL * sizeof(float));
}

/* One step of tensor t with its group's hyperparameters (lr given), as
 * torch does it: the state is created at the tensor's first step. */
static void ref_step(reference *r, int t, double lr, const float *g)
{
    optim_hparams hp = r->hp[tgroup[t]];
    hp.lr = lr;
    if (r->st[t].step == 0 && !r->buf[t][0] && !r->buf[t][1] && !r->buf[t][2]) {
        optim_state_init(&hp, &r->st[t]);
        unsigned need = optim_buffers_needed(&hp);
        for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
            if (need & (1u << i)) {
                r->buf[t][i] = malloc(tsize[t] * sizeof(float));
                optim_buffer_init(&hp, i, OPTIM_F32, r->buf[t][i], tsize[t]);
                r->st[t].buf[i] = r->buf[t][i];
            }
    }
    optim_step(&hp, &r->st[t], OPTIM_F32, r->p + toff(t), g, tsize[t]);
}

static void ref_free(reference *r)
{
    for (int t = 0; t < NT; t++)
        for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
            free(r->buf[t][i]);
    free(r->p);
}

static void create_body(char *out, size_t n, const char *optimizer, const char *g0,
                        const char *g1, const char *extra)
{
    snprintf(out, n,
             "{\"optimizer\":%s,\"init\":{\"type\":\"normal\",\"std\":0.3,\"seed\":5},"
             "\"tensors\":[{\"name\":\"body.weight\",\"shape\":[%zu]},"
             "{\"name\":\"body.bias\",\"shape\":[37]},{\"name\":\"head.weight\",\"shape\":[5,100]}],"
             "\"groups\":[{\"tensors\":[\"body.weight\"]%s},"
             "{\"tensors\":[\"body.bias\",\"head.weight\"]%s}]%s}",
             optimizer, tsize[0], g0, g1, extra);
}

static void get_all(optd_client *c, const char *name, float *out, long long step)
{
    const char *h[] = {"Accept: application/octet-stream", NULL};
    char path[128];
    snprintf(path, sizeof path, "/v1/sessions/%s/params", name);
    optd_response r = tapi_req(c, "GET", path, h, NULL);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, TOTAL * sizeof(float));
    memcpy(out, r.body, r.len);
    assert_int_equal(atoll(optd_response_header(&r, "Optd-Step")), step);
    optd_response_free(&r);
}

/* POSTs the present tensors' gradients (g is the whole vector; absent
 * tensors' parts are left out of the body). */
static void step_layout(optd_client *c, const char *name, const float *g, const bool *present,
                        const char *lr_header, int status)
{
    float *body = malloc(TOTAL * sizeof(float));
    size_t k = 0;
    char absent[64] = "";
    for (int t = 0; t < NT; t++) {
        if (present[t]) {
            memcpy(body + k, g + toff(t), tsize[t] * sizeof(float));
            k += tsize[t];
        } else {
            char one[16];
            snprintf(one, sizeof one, "%s%d", absent[0] ? "," : "", t);
            strcat(absent, one);
        }
    }
    char ah[96];
    snprintf(ah, sizeof ah, "Optd-Absent: %s", absent);
    const char *h[5];
    int nh = 0;
    h[nh++] = "Content-Type: application/octet-stream";
    if (absent[0])
        h[nh++] = ah;
    if (lr_header)
        h[nh++] = lr_header;
    h[nh] = NULL;
    char path[128];
    snprintf(path, sizeof path, "/v1/sessions/%s/step?params=false", name);
    optd_response r = tapi_req_bin(c, "POST", path, h, body, k * sizeof(float));
    if (r.status != status)
        fail_msg("step: %d %.*s", r.status, (int)r.len, r.body);
    optd_response_free(&r);
    free(body);
}

/* AdamW, no weight decay and 10x lr on group 1; the head frozen for the
 * first 4 steps; group lrs set by the client at every step (a scheduler);
 * then a crash and a reload. */
static void test_groups_absent_client_lr(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    char body[2048];
    create_body(body, sizeof body, "{\"type\":\"adamw\",\"lr\":0.001,\"weight_decay\":0.01}", "",
                ",\"lr\":0.01,\"weight_decay\":0", "");
    tapi_create(c, "net", body, 201);

    /* The document shows the layout and each group's hyperparameters. */
    optd_response r = tapi_req(c, "GET", "/v1/sessions/net", NULL, NULL);
    cJSON *doc = tapi_json(&r);
    cJSON *ts = cJSON_GetObjectItem(doc, "tensors"), *gs = cJSON_GetObjectItem(doc, "groups");
    assert_int_equal(cJSON_GetArraySize(ts), 3);
    assert_int_equal(tapi_num(cJSON_GetArrayItem(ts, 2), "offset"), toff(2));
    assert_int_equal(cJSON_GetArraySize(gs), 2);
    cJSON *o1 = cJSON_GetObjectItem(cJSON_GetArrayItem(gs, 1), "optimizer");
    assert_true(tapi_num(o1, "weight_decay") == 0);
    assert_true(tapi_num(o1, "lr") == 0.01);
    assert_int_equal(tapi_num(doc, "size"), TOTAL);
    cJSON_Delete(doc);
    optd_response_free(&r);

    float *p = malloc(TOTAL * sizeof *p), *g = malloc(TOTAL * sizeof *g);
    get_all(c, "net", p, 0);
    reference ref;
    ref_init(&ref, p);
    optim_hparams_default(OPTIM_ADAMW, &ref.hp[0]);
    ref.hp[0].weight_decay = 0.01;
    ref.hp[1] = ref.hp[0];
    ref.hp[1].weight_decay = 0;

    const int steps = 10;
    for (int s = 0; s < steps; s++) {
        tgen_fill(OPTIM_F32, g, TOTAL, 77 + (uint64_t)s, 0, 1.0);
        bool present[NT] = {true, true, s >= 4};
        double lr0 = 0.001 * (1.0 - 0.05 * s), lr1 = 0.01 * (1.0 - 0.05 * s);
        char lrh[128];
        snprintf(lrh, sizeof lrh, "Optd-Group-Lr: %.17g,%.17g", lr0, lr1);
        step_layout(c, "net", g, present, lrh, 200);
        for (int t = 0; t < NT; t++)
            if (present[t])
                ref_step(&ref, t, tgroup[t] ? lr1 : lr0, g + toff(t));
    }
    get_all(c, "net", p, steps);
    assert_memory_equal(p, ref.p, TOTAL * sizeof *p);

    /* The frozen head's own step count is 6 of the session's 10. */
    r = tapi_req(c, "GET", "/v1/sessions/net", NULL, NULL);
    doc = tapi_json(&r);
    ts = cJSON_GetObjectItem(doc, "tensors");
    assert_int_equal(tapi_num(cJSON_GetArrayItem(ts, 0), "step"), steps);
    assert_int_equal(tapi_num(cJSON_GetArrayItem(ts, 2), "step"), steps - 4);
    gs = cJSON_GetObjectItem(doc, "groups");
    assert_true(tapi_num(cJSON_GetArrayItem(gs, 1), "lr") == 0.01 * (1.0 - 0.05 * (steps - 1)));
    cJSON_Delete(doc);
    optd_response_free(&r);

    /* A crash: the log's replay inputs (absent tensors, group lrs) give the
     * same state back. */
    optd_client_free(c);
    assert_int_equal(tdaemon_kill9(&d), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    get_all(c, "net", p, steps);
    assert_memory_equal(p, ref.p, TOTAL * sizeof *p);
    /* ... and it goes on from there exactly. */
    tgen_fill(OPTIM_F32, g, TOTAL, 999, 0, 1.0);
    bool all[NT] = {true, true, true};
    step_layout(c, "net", g, all, NULL, 200);
    double lr0 = 0.001 * (1.0 - 0.05 * (steps - 1)), lr1 = 0.01 * (1.0 - 0.05 * (steps - 1));
    for (int t = 0; t < NT; t++)
        ref_step(&ref, t, tgroup[t] ? lr1 : lr0, g + toff(t));
    get_all(c, "net", p, steps + 1);
    assert_memory_equal(p, ref.p, TOTAL * sizeof *p);

    /* PATCH one group's lr: the config wins over the client's value. */
    r = tapi_req(c, "PATCH", "/v1/sessions/net", NULL, "{\"groups\":[{},{\"lr\":0.5}]}");
    assert_int_equal(r.status, 200);
    doc = tapi_json(&r);
    gs = cJSON_GetObjectItem(doc, "groups");
    assert_true(tapi_num(cJSON_GetArrayItem(gs, 1), "lr") == 0.5);
    assert_true(tapi_num(cJSON_GetArrayItem(gs, 0), "lr") == 0.001);
    cJSON_Delete(doc);
    optd_response_free(&r);
    /* A client that sets group values cannot also get a server schedule. */
    r = tapi_req(c, "PATCH", "/v1/sessions/net", NULL,
                 "{\"schedule\":{\"type\":\"exponential\",\"gamma\":0.9}}");
    tapi_assert_problem(&r, 409, "schedule");
    optd_response_free(&r);

    ref_free(&ref);
    free(p);
    free(g);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

/* SGD with momentum: torch makes a tensor's momentum buffer at its first
 * step with a gradient (buf = grad), however late; a server-side schedule
 * scales each group from its own lr. */
static void test_sgd_late_tensor_and_schedule(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    char body[2048];
    create_body(body, sizeof body,
                "{\"type\":\"sgd\",\"lr\":0.1,\"momentum\":0.9,\"nesterov\":true}", "",
                ",\"lr\":0.02,\"momentum\":0.5",
                ",\"schedule\":{\"type\":\"step\",\"step_size\":3,\"gamma\":0.5}");
    tapi_create(c, "sgd", body, 201);
    float *p = malloc(TOTAL * sizeof *p), *g = malloc(TOTAL * sizeof *g);
    get_all(c, "sgd", p, 0);
    reference ref;
    ref_init(&ref, p);
    optim_hparams_default(OPTIM_SGD, &ref.hp[0]);
    ref.hp[0].momentum = 0.9;
    ref.hp[0].nesterov = true;
    ref.hp[1] = ref.hp[0];
    ref.hp[1].momentum = 0.5;
    const double base[2] = {0.1, 0.02};
    for (int s = 0; s < 8; s++) {
        tgen_fill(OPTIM_F32, g, TOTAL, 300 + (uint64_t)s, 0, 1.0);
        bool present[NT] = {s >= 5, true, s % 2 == 0};
        step_layout(c, "sgd", g, present, NULL, 200);
        for (int t = 0; t < NT; t++) {
            if (!present[t])
                continue;
            optim_schedule sc;
            optim_sched_default(OPTIM_SCHED_STEP, &sc);
            sc.step_size = 3;
            sc.gamma = 0.5;
            optim_sched_value v;
            optim_sched_eval(&sc, NULL, base[tgroup[t]], (uint64_t)s, &v);
            ref_step(&ref, t, v.lr, g + toff(t));
        }
    }
    get_all(c, "sgd", p, 8);
    assert_memory_equal(p, ref.p, TOTAL * sizeof *p);
    /* With a server schedule, a client lr is refused and changes nothing. */
    tapi_snap before = tapi_snapshot(c, "sgd");
    bool all[NT] = {true, true, true};
    step_layout(c, "sgd", g, all, "Optd-Group-Lr: 0.1,0.1", 409);
    tapi_snap after = tapi_snapshot(c, "sgd");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    ref_free(&ref);
    free(p);
    free(g);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* Bad layouts and bad steps: clear 4xx naming the field, nothing changed. */
static void test_refusals(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    static const struct {
        const char *body;
        int status;
        const char *field;
    } bad[] = {
        {"{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a\",\"shape\":[2]},"
         "{\"name\":\"a\",\"shape\":[3]}]}", 400, "tensors[1]"},
        {"{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a b\",\"shape\":[2]}]}", 400,
         "tensors[0]"},
        {"{\"optimizer\":\"adam\",\"size\":5,\"tensors\":[{\"name\":\"a\",\"shape\":[2]}]}", 422,
         "tensors"},
        {"{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a\",\"shape\":[2]},"
         "{\"name\":\"b\",\"shape\":[2]}],\"groups\":[{\"tensors\":[\"a\"]}]}", 400, "groups"},
        {"{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a\",\"shape\":[2]}],"
         "\"groups\":[{\"tensors\":[\"a\"],\"betas\":[0.9,2]}]}", 400, "groups[0].betas"},
        {"{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a\",\"shape\":[2]}],"
         "\"groups\":[{\"tensors\":[\"a\"],\"momentum\":0.9}]}", 400, "groups[0].momentum"},
        {"{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a\",\"shape\":[2]}],"
         "\"groups\":[{\"tensors\":[\"zz\"]}]}", 400, "groups[0]"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        optd_response r = tapi_req(c, "PUT", "/v1/sessions/bad", NULL, bad[i].body);
        tapi_assert_problem(&r, bad[i].status, bad[i].field);
        optd_response_free(&r);
    }
    tapi_create(c, "ok", "{\"optimizer\":\"adam\",\"tensors\":[{\"name\":\"a\",\"shape\":[2]},"
                         "{\"name\":\"b\",\"shape\":[3]}]}", 201);
    tapi_snap before = tapi_snapshot(c, "ok");
    float g[5] = {1, 2, 3, 4, 5};
    const char *h1[] = {"Content-Type: application/octet-stream", "Optd-Absent: 2", NULL};
    optd_response r = tapi_req_bin(c, "POST", "/v1/sessions/ok/step", h1, g, sizeof g);
    tapi_assert_problem(&r, 400, "Optd-Absent");
    optd_response_free(&r);
    const char *h2[] = {"Content-Type: application/octet-stream", "Optd-Absent: 0", NULL};
    r = tapi_req_bin(c, "POST", "/v1/sessions/ok/step", h2, g, sizeof g); /* 5, wants 3 */
    tapi_assert_problem(&r, 422, "grad");
    optd_response_free(&r);
    const char *h3[] = {"Content-Type: application/octet-stream", "Optd-Group-Lr: 0.1,0.2", NULL};
    r = tapi_req_bin(c, "POST", "/v1/sessions/ok/step", h3, g, sizeof g); /* one group */
    tapi_assert_problem(&r, 400, "Optd-Group-Lr");
    optd_response_free(&r);
    const char *h4[] = {"Content-Type: application/octet-stream", "Optd-Group-Lr: -1", NULL};
    r = tapi_req_bin(c, "POST", "/v1/sessions/ok/step", h4, g, sizeof g);
    tapi_assert_problem(&r, 400, "lr");
    optd_response_free(&r);
    r = tapi_req(c, "PATCH", "/v1/sessions/ok", NULL, "{\"groups\":[{},{}]}");
    tapi_assert_problem(&r, 400, "groups");
    optd_response_free(&r);
    r = tapi_req(c, "PATCH", "/v1/sessions/ok", NULL, "{\"groups\":[{\"eps\":-1}]}");
    tapi_assert_problem(&r, 400, "groups[0].eps");
    optd_response_free(&r);
    tapi_snap after = tapi_snapshot(c, "ok");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* A state file exported from one daemon creates the session in another,
 * which then goes on bit-exactly; PUT over an existing session replaces
 * its state; bad files are refused and change nothing. */
static void test_state_export_import(void **state)
{
    (void)state;
    tdaemon d1, d2;
    assert_int_equal(tdaemon_start(&d1, NULL, NULL), 0);
    assert_int_equal(tdaemon_start(&d2, NULL, NULL), 0);
    optd_client *c1 = tapi_client(tdaemon_url(&d1), NULL, false);
    optd_client *c2 = tapi_client(tdaemon_url(&d2), NULL, false);
    char body[2048];
    create_body(body, sizeof body, "{\"type\":\"nadam\",\"lr\":0.002}", "",
                ",\"lr\":0.01,\"weight_decay\":0.1", "");
    tapi_create(c1, "src", body, 201);
    float *g = malloc(TOTAL * sizeof *g), *p1 = malloc(TOTAL * sizeof *p1),
          *p2 = malloc(TOTAL * sizeof *p2);
    for (int k = 0; k < 5; k++) {
        tgen_fill(OPTIM_F32, g, TOTAL, 500 + (uint64_t)k, 0, 1.0);
        bool present[NT] = {true, k != 2, k >= 1};
        step_layout(c1, "src", g, present, NULL, 200);
    }
    const char *acc[] = {"Accept: application/octet-stream", NULL};
    optd_response file = tapi_req(c1, "GET", "/v1/sessions/src/state", acc, NULL);
    assert_int_equal(file.status, 200);
    assert_string_equal(file.content_type, "application/octet-stream");
    const char *ct[] = {"Content-Type: application/octet-stream", NULL};
    optd_response r = tapi_req_bin(c2, "PUT", "/v1/sessions/copy/state", ct, file.body, file.len);
    assert_int_equal(r.status, 201);
    optd_response_free(&r);
    /* The same file read back from the copy is the same bytes. */
    optd_response again = tapi_req(c2, "GET", "/v1/sessions/copy/state", acc, NULL);
    assert_int_equal(again.len, file.len);
    assert_memory_equal(again.body, file.body, file.len);
    optd_response_free(&again);
    for (int k = 5; k < 9; k++) {
        tgen_fill(OPTIM_F32, g, TOTAL, 500 + (uint64_t)k, 0, 1.0);
        bool present[NT] = {k != 6, true, true};
        step_layout(c1, "src", g, present, NULL, 200);
        step_layout(c2, "copy", g, present, NULL, 200);
    }
    get_all(c1, "src", p1, 9);
    get_all(c2, "copy", p2, 9);
    assert_memory_equal(p1, p2, TOTAL * sizeof *p1);

    /* Over an existing session: the state is replaced (step included). */
    r = tapi_req_bin(c2, "PUT", "/v1/sessions/copy/state", ct, file.body, file.len);
    assert_int_equal(r.status, 200);
    cJSON *doc = tapi_json(&r);
    assert_int_equal(tapi_num(doc, "step"), 5);
    cJSON_Delete(doc);
    optd_response_free(&r);

    /* Refusals: not safetensors, another layout, a wrong content type. */
    tapi_snap before = tapi_snapshot(c2, "copy");
    r = tapi_req_bin(c2, "PUT", "/v1/sessions/copy/state", ct, "garbage!", 8);
    tapi_assert_problem(&r, 400, NULL);
    optd_response_free(&r);
    tapi_create(c1, "other", "{\"optimizer\":\"nadam\",\"tensors\":[{\"name\":\"x\",\"shape\":[3]}]}",
                201);
    optd_response of = tapi_req(c1, "GET", "/v1/sessions/other/state", acc, NULL);
    r = tapi_req_bin(c2, "PUT", "/v1/sessions/copy/state", ct, of.body, of.len);
    tapi_assert_problem(&r, 422, NULL);
    optd_response_free(&r);
    optd_response_free(&of);
    r = tapi_req_bin(c2, "PUT", "/v1/sessions/copy/state", NULL, file.body, file.len);
    tapi_assert_problem(&r, 415, "Content-Type");
    optd_response_free(&r);
    /* A flipped byte in the header's JSON. */
    char *bad = malloc(file.len);
    memcpy(bad, file.body, file.len);
    bad[9] = '[';
    r = tapi_req_bin(c2, "PUT", "/v1/sessions/copy/state", ct, bad, file.len);
    tapi_assert_problem(&r, 400, NULL);
    optd_response_free(&r);
    free(bad);
    tapi_snap after = tapi_snapshot(c2, "copy");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);

    /* It survives a restart of the importing daemon. */
    optd_client_free(c2);
    assert_int_equal(tdaemon_kill9(&d2), 0);
    assert_int_equal(tdaemon_restart(&d2), 0);
    c2 = tapi_client(tdaemon_url(&d2), NULL, false);
    again = tapi_req(c2, "GET", "/v1/sessions/copy/state", acc, NULL);
    assert_int_equal(again.len, file.len);
    assert_memory_equal(again.body, file.body, file.len);
    optd_response_free(&again);

    optd_response_free(&file);
    free(g);
    free(p1);
    free(p2);
    optd_client_free(c1);
    optd_client_free(c2);
    assert_int_equal(tdaemon_stop(&d1), 0);
    assert_int_equal(tdaemon_stop(&d2), 0);
    tdaemon_cleanup(&d1);
    tdaemon_cleanup(&d2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_groups_absent_client_lr),
        cmocka_unit_test(test_sgd_late_tensor_and_schedule),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_state_export_import),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
