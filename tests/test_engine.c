/*
 * test_engine.c -- the step engine through a real daemon: a step split over
 * kernel threads equals one thread and a local run of the optim/ kernels
 * bit for bit (clipping, accumulation included), before and after a
 * kill -9 and replay; 16-bit wire forms in both directions; a binary body
 * read in place.
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

#include <curl/curl.h>
#include <pthread.h>
#include <time.h>

/* More blocks than the pool's threshold, and a tail block. */
#define N (9 * OPTIM_VEC_BLOCK + 1234)
#define STEPS 7

static void get_params(optd_client *c, const char *name, float *out, size_t n, long long step)
{
    const char *h[] = {"Accept: application/octet-stream", NULL};
    char path[128];
    snprintf(path, sizeof path, "/v1/sessions/%s/params", name);
    optd_response r = tapi_req(c, "GET", path, h, NULL);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, n * sizeof(float));
    memcpy(out, r.body, n * sizeof(float));
    const char *st = optd_response_header(&r, "Optd-Step");
    assert_non_null(st);
    assert_int_equal(atoll(st), step);
    optd_response_free(&r);
}

static void step_bin(optd_client *c, const char *name, const void *g, size_t len,
                     const char *dtype, int status)
{
    char dt[64], path[128];
    snprintf(dt, sizeof dt, "Optd-Dtype: %s", dtype);
    const char *h[] = {"Content-Type: application/octet-stream", dt, NULL};
    snprintf(path, sizeof path, "/v1/sessions/%s/step?params=false", name);
    optd_response r = tapi_req_bin(c, "POST", path, h, g, len);
    if (r.status != status)
        fail_msg("step %s: %d %.*s", name, r.status, (int)r.len, r.body);
    optd_response_free(&r);
}

/* The same gradients on --kernel-threads 1 and 2, against local kernels:
 * AdamW with clip by norm (scaled in the blocked pass), then SGD momentum
 * with accumulation of 3 and clip by value. */
static void run_case(const char *create, optim_kind kind, int accumulate, optim_clip clip)
{
    tdaemon d1, d2;
    const char *a1[] = {"--kernel-threads", "1", NULL};
    const char *a2[] = {"--kernel-threads", "2", NULL};
    assert_int_equal(tdaemon_start(&d1, NULL, a1), 0);
    assert_int_equal(tdaemon_start(&d2, NULL, a2), 0);
    optd_client *c1 = tapi_client(tdaemon_url(&d1), NULL, false);
    optd_client *c2 = tapi_client(tdaemon_url(&d2), NULL, false);
    tapi_create(c1, "e", create, 201);
    tapi_create(c2, "e", create, 201);

    float *p = malloc(N * sizeof *p), *got = malloc(N * sizeof *got);
    float *g = malloc(N * sizeof *g), *acc = calloc(N, sizeof *acc), *work = malloc(N * sizeof *work);
    float *buf[OPTIM_MAX_BUFFERS] = {0};
    get_params(c1, "e", p, N, 0);
    get_params(c2, "e", got, N, 0);
    assert_memory_equal(p, got, N * sizeof *p);

    optim_hparams hp;
    optim_hparams_default(kind, &hp);
    hp.lr = 0.01;
    if (kind == OPTIM_SGD)
        hp.momentum = 0.9;
    else
        hp.weight_decay = 0.05;
    optim_state st;
    optim_state_init(&hp, &st);
    unsigned need = optim_buffers_needed(&hp);
    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (need & (1u << i)) {
            buf[i] = malloc(N * sizeof(float));
            optim_buffer_init(&hp, i, OPTIM_F32, buf[i], N);
            st.buf[i] = buf[i];
        }

    long long applied = 0;
    for (int t = 0; t < STEPS * accumulate; t++) {
        tgen_fill(OPTIM_F32, g, N, 1000 + (uint64_t)t, 0, 3.0);
        int last = (t + 1) % accumulate == 0;
        step_bin(c1, "e", g, N * sizeof *g, "float32", last ? 200 : 202);
        step_bin(c2, "e", g, N * sizeof *g, "float32", last ? 200 : 202);
        optim_vec_add(OPTIM_F32, acc, g, N);
        if (!last)
            continue;
        memcpy(work, acc, N * sizeof *acc);
        if (accumulate > 1)
            optim_vec_div(OPTIM_F32, work, N, accumulate);
        memset(acc, 0, N * sizeof *acc);
        if (clip.kind != OPTIM_CLIP_NONE)
            optim_clip_apply(&clip, OPTIM_F32, work, N);
        optim_step(&hp, &st, OPTIM_F32, p, work, N);
        applied++;
    }
    get_params(c1, "e", got, N, applied);
    assert_memory_equal(got, p, N * sizeof *p);
    get_params(c2, "e", got, N, applied);
    assert_memory_equal(got, p, N * sizeof *p);

    /* A crash: the two-thread daemon replays the log on two threads. */
    optd_client_free(c2);
    assert_int_equal(tdaemon_kill9(&d2), 0);
    assert_int_equal(tdaemon_restart(&d2), 0);
    c2 = tapi_client(tdaemon_url(&d2), NULL, false);
    get_params(c2, "e", got, N, applied);
    assert_memory_equal(got, p, N * sizeof *p);

    for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(buf[i]);
    free(p);
    free(got);
    free(g);
    free(acc);
    free(work);
    optd_client_free(c1);
    optd_client_free(c2);
    assert_int_equal(tdaemon_stop(&d1), 0);
    assert_int_equal(tdaemon_stop(&d2), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d2)), 0);
    tdaemon_cleanup(&d1);
    tdaemon_cleanup(&d2);
}

static void test_threads_adamw_clip_norm(void **state)
{
    (void)state;
    char body[512];
    snprintf(body, sizeof body,
             "{\"optimizer\":{\"type\":\"adamw\",\"lr\":0.01,\"weight_decay\":0.05},"
             "\"size\":%d,\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":7},"
             "\"clip\":{\"type\":\"norm\",\"max_norm\":2.5}}",
             N);
    optim_clip clip;
    optim_clip_default(OPTIM_CLIP_NORM, &clip);
    clip.max_norm = 2.5;
    run_case(body, OPTIM_ADAMW, 1, clip);
}

static void test_threads_sgd_accumulate_clip_value(void **state)
{
    (void)state;
    char body[512];
    snprintf(body, sizeof body,
             "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.01,\"momentum\":0.9},"
             "\"size\":%d,\"init\":{\"type\":\"uniform\",\"low\":-1,\"high\":1,\"seed\":3},"
             "\"clip\":{\"type\":\"value\",\"max_value\":0.7},"
             "\"mode\":{\"type\":\"async\",\"accumulate\":3}}",
             N);
    optim_clip clip;
    optim_clip_default(OPTIM_CLIP_VALUE, &clip);
    clip.max_value = 0.7;
    run_case(body, OPTIM_SGD, 3, clip);
}

/* Steps whose commit is larger than storage's gathered WAL write (64 KiB)
 * but whose gradient still lives in SQLite (under 256 KiB): sessions of
 * 30,000 float32 params and 16 sizes above, one 1,024-param page apart, so
 * that the commit frame falls at every place of a 64 KiB gathering (a
 * frame is a 4 KiB page and its header), MID_STEPS steps each (the first
 * ones also write checkpoints, whose transactions would flush a page left
 * behind).  After each session's last acknowledged step the daemon is
 * killed (kill -9): the step survives and the replayed params equal local
 * kernels.  A commit frame's page held back by the gathering when it had
 * to flush to make room for it fails this test. */
#define MID 30000
#define MID_STEPS 12
static void test_midsize_commit_survives_kill9(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    size_t most = MID + 16 * 1024;
    float *p = malloc(most * sizeof *p), *got = malloc(most * sizeof *got);
    float *g = malloc(most * sizeof *g);
    for (int k = 0; k < 16; k++) {
        size_t n = MID + (size_t)k * 1024;
        char body[256], name[32];
        snprintf(name, sizeof name, "mid%d", k);
        snprintf(body, sizeof body,
                 "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":%zu,"
                 "\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":%d}}",
                 n, 11 + k);
        tapi_create(c, name, body, 201);
        get_params(c, name, p, n, 0);
        optim_hparams hp;
        optim_hparams_default(OPTIM_ADAM, &hp);
        hp.lr = 0.01;
        optim_state st;
        optim_state_init(&hp, &st);
        float *buf[OPTIM_MAX_BUFFERS] = {0};
        unsigned need = optim_buffers_needed(&hp);
        for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
            if (need & (1u << i)) {
                buf[i] = malloc(n * sizeof(float));
                optim_buffer_init(&hp, i, OPTIM_F32, buf[i], n);
                st.buf[i] = buf[i];
            }
        for (int t = 0; t < MID_STEPS; t++) {
            tgen_fill(OPTIM_F32, g, n, 500 + (uint64_t)(k * MID_STEPS + t), 0, 2.0);
            step_bin(c, name, g, n * sizeof *g, "float32", 200);
            optim_step(&hp, &st, OPTIM_F32, p, g, n);
        }
        /* Killed right after the last acknowledged step. */
        optd_client_free(c);
        assert_int_equal(tdaemon_kill9(&d), 0);
        assert_int_equal(tdaemon_restart(&d), 0);
        c = tapi_client(tdaemon_url(&d), NULL, false);
        get_params(c, name, got, n, MID_STEPS);
        assert_memory_equal(got, p, n * sizeof *p);
        for (unsigned i = 0; i < OPTIM_MAX_BUFFERS; i++)
            free(buf[i]);
    }
    free(p);
    free(got);
    free(g);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

/* bfloat16 and float16 gradients are widened exactly; answers narrow as
 * asked; the other full-width dtype and unknown names are refused. */
static void test_wire_half(void **state)
{
    (void)state;
    enum { M = 1000 };
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    char body[256];
    snprintf(body, sizeof body,
             "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"size\":%d,"
             "\"init\":{\"type\":\"normal\",\"std\":1,\"seed\":11}}", M);
    tapi_create(c, "w", body, 201);
    float p[M], got[M], gw[M];
    get_params(c, "w", p, M, 0);
    uint16_t h[M];
    const char *names[] = {"bfloat16", "float16"};
    const optim_wire wires[] = {OPTIM_WIRE_BF16, OPTIM_WIRE_F16};
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < M; i++)
            gw[i] = (float)((i % 29) - 14) / 7.0f;
        optim_vec_to_wire(OPTIM_F32, gw, wires[k], h, M);
        optim_vec_from_wire(wires[k], h, OPTIM_F32, gw, M); /* what the daemon sees */
        step_bin(c, "w", h, sizeof h, names[k], 200);
        for (int i = 0; i < M; i++)
            p[i] = p[i] + -1.0f * gw[i]; /* torch: p.add_(g, alpha=-lr) */
        get_params(c, "w", got, M, k + 1);
        assert_memory_equal(got, p, sizeof p);

        /* The answer in the 16-bit form. */
        char ask[64];
        snprintf(ask, sizeof ask, "Optd-Params-Dtype: %s", names[k]);
        const char *hh[] = {"Accept: application/octet-stream", ask, NULL};
        optd_response r = tapi_req(c, "GET", "/v1/sessions/w/params", hh, NULL);
        assert_int_equal(r.status, 200);
        assert_string_equal(optd_response_header(&r, "Optd-Dtype"), names[k]);
        assert_int_equal(r.len, M * 2);
        uint16_t want[M];
        optim_vec_to_wire(OPTIM_F32, p, wires[k], want, M);
        assert_memory_equal(r.body, want, sizeof want);
        optd_response_free(&r);
    }
    /* float64 into a float32 session: 422; an unknown dtype: 400; nothing
     * changed. */
    tapi_snap before = tapi_snapshot(c, "w");
    double g64[M] = {0};
    {
        const char *hd[] = {"Content-Type: application/octet-stream", "Optd-Dtype: float64", NULL};
        optd_response r = tapi_req_bin(c, "POST", "/v1/sessions/w/step", hd, g64, sizeof g64);
        tapi_assert_problem(&r, 422, "Optd-Dtype");
        optd_response_free(&r);
    }
    {
        const char *hd[] = {"Content-Type: application/octet-stream", "Optd-Dtype: half", NULL};
        optd_response r = tapi_req_bin(c, "POST", "/v1/sessions/w/step", hd, h, sizeof h);
        tapi_assert_problem(&r, 400, "Optd-Dtype");
        optd_response_free(&r);
    }
    {
        /* A 16-bit body of the wrong length. */
        const char *hd[] = {"Content-Type: application/octet-stream", "Optd-Dtype: float16", NULL};
        optd_response r = tapi_req_bin(c, "POST", "/v1/sessions/w/step", hd, h, sizeof h - 2);
        tapi_assert_problem(&r, 422, "grad");
        optd_response_free(&r);
    }
    {
        const char *hd[] = {"Accept: application/octet-stream", "Optd-Params-Dtype: int8", NULL};
        optd_response r = tapi_req(c, "GET", "/v1/sessions/w/params", hd, NULL);
        tapi_assert_problem(&r, 400, "Optd-Params-Dtype");
        optd_response_free(&r);
    }
    tapi_snap after = tapi_snapshot(c, "w");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* A body longer than its session can need is 413 before it is read (JSON
 * and binary, known length and chunked); an unknown session is 404 before
 * its body; the session is unchanged. */
static void test_body_bound(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    tapi_create(c, "small", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":10,"
                            "\"init\":{\"type\":\"zeros\"}}", 201);
    tapi_snap before = tapi_snapshot(c, "small");
    /* 32 MiB of JSON for 10 params. */
    size_t big = 32u << 20;
    char *body = malloc(big + 1);
    memset(body, ' ', big);
    memcpy(body, "{\"grad\":[", 9);
    memcpy(body + big - 2, "]}", 2);
    body[big] = '\0';
    /* Expect: 100-continue, so that the client waits for the early answer
     * instead of racing it with the whole body. */
    const char *json[] = {"Expect: 100-continue", NULL};
    optd_response r = tapi_req(c, "POST", "/v1/sessions/small/step", json, body);
    tapi_assert_problem(&r, 413, NULL);
    optd_response_free(&r);
    const char *chunked[] = {"Transfer-Encoding: chunked", "Expect: 100-continue", NULL};
    r = tapi_req(c, "POST", "/v1/sessions/small/step", chunked, body);
    tapi_assert_problem(&r, 413, NULL);
    optd_response_free(&r);
    const char *bin[] = {"Content-Type: application/octet-stream", "Expect: 100-continue", NULL};
    r = tapi_req_bin(c, "POST", "/v1/sessions/small/step", bin, body, 1u << 20);
    tapi_assert_problem(&r, 413, NULL);
    optd_response_free(&r);
    r = tapi_req_bin(c, "POST", "/v1/sessions/nosuch/step", bin, body, 1u << 20);
    tapi_assert_problem(&r, 404, "name");
    optd_response_free(&r);
    /* Within the bound a wrong length is still 422, naming the field. */
    r = tapi_req_bin(c, "POST", "/v1/sessions/small/step", bin, body, 44);
    tapi_assert_problem(&r, 422, "grad");
    optd_response_free(&r);
    free(body);
    tapi_snap after = tapi_snapshot(c, "small");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct {
    char url[256];
    char *buf;
    size_t len, cap;
    long status;
    double done_at;
} slow_get;

static size_t slow_write(char *p, size_t sz, size_t n, void *ud)
{
    slow_get *g = ud;
    size_t k = sz * n;
    if (g->len + k > g->cap)
        return 0;
    memcpy(g->buf + g->len, p, k);
    g->len += k;
    return k;
}

/* A client that reads an answer slowly (2 MB/s). */
static void *slow_reader(void *arg)
{
    slow_get *g = arg;
    CURL *h = curl_easy_init();
    struct curl_slist *hd = curl_slist_append(NULL, "Accept: application/octet-stream");
    curl_easy_setopt(h, CURLOPT_URL, g->url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hd);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, slow_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, g);
    curl_easy_setopt(h, CURLOPT_MAX_RECV_SPEED_LARGE, (curl_off_t)2000000);
    curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 16384L);
    curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &g->status);
    g->done_at = now_s();
    curl_slist_free_all(hd);
    curl_easy_cleanup(h);
    return NULL;
}

/* Answers past 4 MiB stream from the session's buffer: they equal local
 * kernels, in every wire form, and a step taken while an answer still
 * holds the old params (copy on write) changes neither. */
static void test_streamed_answers(void **state)
{
    (void)state;
    enum { M = 1500000 };
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    char body[256];
    snprintf(body, sizeof body,
             "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":%d,"
             "\"init\":{\"type\":\"normal\",\"std\":1,\"seed\":9}}", M);
    tapi_create(c, "big", body, 201);
    float *p = malloc(M * sizeof *p), *g = malloc(M * sizeof *g), *got = malloc(M * sizeof *got);
    get_params(c, "big", p, M, 0);
    optim_hparams hp;
    optim_hparams_default(OPTIM_ADAM, &hp);
    hp.lr = 0.01;
    optim_state st;
    optim_state_init(&hp, &st);
    float *b0 = calloc(M, sizeof *b0), *b1 = calloc(M, sizeof *b1);
    st.buf[0] = b0;
    st.buf[1] = b1;
    for (int k = 0; k < 3; k++) {
        tgen_fill(OPTIM_F32, g, M, 40 + (uint64_t)k, 0, 1.0);
        const char *h[] = {"Content-Type: application/octet-stream",
                           "Accept: application/octet-stream", NULL};
        optd_response r = tapi_req_bin(c, "POST", "/v1/sessions/big/step", h, g, M * sizeof *g);
        assert_int_equal(r.status, 200);
        optim_step(&hp, &st, OPTIM_F32, p, g, M);
        assert_int_equal(r.len, M * sizeof(float));
        assert_memory_equal(r.body, p, M * sizeof(float));
        optd_response_free(&r);
    }
    /* A 16-bit streamed answer converts chunk by chunk. */
    const char *h16[] = {"Accept: application/octet-stream", "Optd-Params-Dtype: float16", NULL};
    optd_response r = tapi_req(c, "GET", "/v1/sessions/big/params", h16, NULL);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, M * 2);
    uint16_t *want = malloc(M * 2);
    optim_vec_to_wire(OPTIM_F32, p, OPTIM_WIRE_F16, want, M);
    assert_memory_equal(r.body, want, M * 2);
    optd_response_free(&r);
    free(want);
    get_params(c, "big", got, M, 3);
    assert_memory_equal(got, p, M * sizeof *p);

    /* A slow reader holds the params of step 3 while a step goes on: the
     * step does not wait for it (copy on write) and the reader gets step
     * 3's params, whole. */
    slow_get sg = {.cap = M * sizeof(float)};
    sg.buf = malloc(sg.cap);
    snprintf(sg.url, sizeof sg.url, "%s/v1/sessions/big/params", tdaemon_url(&d));
    pthread_t th;
    pthread_create(&th, NULL, slow_reader, &sg);
    struct timespec pause = {0, 300 * 1000000L};
    nanosleep(&pause, NULL); /* the answer is under way */
    tgen_fill(OPTIM_F32, g, M, 77, 0, 1.0);
    const char *hb[] = {"Content-Type: application/octet-stream", NULL};
    r = tapi_req_bin(c, "POST", "/v1/sessions/big/step?params=false", hb, g, M * sizeof *g);
    double step_done = now_s();
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    pthread_join(th, NULL);
    assert_int_equal(sg.status, 200);
    assert_int_equal(sg.len, M * sizeof(float));
    assert_memory_equal(sg.buf, p, M * sizeof(float));
    /* The step was answered while the reader was still reading. */
    assert_true(step_done < sg.done_at);
    optim_step(&hp, &st, OPTIM_F32, p, g, M);
    get_params(c, "big", got, M, 4);
    assert_memory_equal(got, p, M * sizeof *p);
    free(sg.buf);
    free(p);
    free(g);
    free(got);
    free(b0);
    free(b1);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

/* updated_at is the time of the last change: the checkpoint a clean stop
 * writes does not move it; a PATCH does. */
static void test_updated_at(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    tapi_create(c, "u", "{\"optimizer\":\"adam\",\"size\":4}", 201);
    optd_response r = tapi_req(c, "POST", "/v1/sessions/u/step", NULL, "{\"grad\":[1,2,3,4]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    r = tapi_req(c, "GET", "/v1/sessions/u", NULL, NULL);
    cJSON *doc = tapi_json(&r);
    char before[64];
    snprintf(before, sizeof before, "%s", tapi_str(doc, "updated_at"));
    cJSON_Delete(doc);
    optd_response_free(&r);
    struct timespec pause = {0, 50 * 1000000L};
    nanosleep(&pause, NULL);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0); /* checkpoints the step */
    assert_int_equal(tdaemon_restart(&d), 0);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    r = tapi_req(c, "GET", "/v1/sessions/u", NULL, NULL);
    doc = tapi_json(&r);
    assert_string_equal(tapi_str(doc, "updated_at"), before);
    cJSON_Delete(doc);
    optd_response_free(&r);
    nanosleep(&pause, NULL);
    r = tapi_req(c, "PATCH", "/v1/sessions/u", NULL, "{\"optimizer\":{\"lr\":0.5}}");
    assert_int_equal(r.status, 200);
    doc = tapi_json(&r);
    assert_true(strcmp(tapi_str(doc, "updated_at"), before) > 0);
    cJSON_Delete(doc);
    optd_response_free(&r);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    tdaemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads_adamw_clip_norm),
        cmocka_unit_test(test_threads_sgd_accumulate_clip_value),
        cmocka_unit_test(test_midsize_commit_survives_kill9),
        cmocka_unit_test(test_wire_half),
        cmocka_unit_test(test_body_bound),
        cmocka_unit_test(test_streamed_answers),
        cmocka_unit_test(test_updated_at),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
