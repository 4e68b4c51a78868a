/*
 * test_travel.c -- a session's history, used: rollback to a step equals an
 * uninterrupted run stopped there, bit for bit, for every optimizer family
 * (with schedules, accumulation and sync mode), and continuing from it
 * gives the original end state; a rollback forgets the later idempotency
 * keys; a fork equals its parent (fed the same gradients, or replaying the
 * parent's log); a replay under another lr equals a local run of the
 * optim/ kernels on the logged gradients; forks share nothing with their
 * parent; retention keeps `keep` checkpoints and compacts the log behind
 * them (measured); an export with its log imports bit for bit; optd backup
 * of a served database opens elsewhere as a consistent snapshot; kill -9
 * during rollback, fork with replay, import and compacting steps loses
 * nothing acknowledged and shows nothing half-done.  All against the real
 * daemon.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clients/c/optd_client.h"
#include "optim/optim.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

static tapi_suite *S;

static int setup(void **state)
{
    (void)state;
    S = tapi_suite_open(NULL);
    return S ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return tapi_suite_close(S);
}

enum { N = 16 };

static void grad_of(int i, float *g, size_t n)
{
    for (size_t j = 0; j < n; j++)
        g[j] = (float)(sin(i * 1.7 + (double)j * 0.31) + 0.02 * (i % 5) - 0.01 * (double)j);
}

/* One gradient (micro-batch i); any 2xx is fine. */
static void send(optd_client *c, const char *name, int i)
{
    float g[N];
    grad_of(i, g, N);
    long long step;
    optd_error e;
    optd_step_opts o = optd_step_opts_default();
    o.worker = "w0"; /* sync sessions need it, the others ignore it */
    double loss = 1.0 / (1 + i); /* drives a plateau schedule */
    if (optd_step_f32_opts(c, name, g, N, &loss, &o, NULL, &step, NULL, &e) < 0) /* 1: 202 */
        fail_msg("step %s #%d: %d %s", name, i, e.status, e.detail);
}

static void send_range(optd_client *c, const char *name, int from, int to)
{
    for (int i = from; i < to; i++)
        send(c, name, i);
}

static int post(optd_client *c, const char *name, const char *what, const char *body,
                cJSON **doc)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s/%s", name, what);
    optd_response r = tapi_req(c, "POST", path, NULL, body);
    int st = r.status;
    if (doc)
        *doc = st < 300 ? tapi_json(&r) : NULL;
    if (st >= 400 && st != 409 && st != 422 && st != 404 && st != 400)
        fail_msg("POST %s: %d %.*s", path, st, (int)r.len, r.body);
    optd_response_free(&r);
    return st;
}

static int rollback(optd_client *c, const char *name, long long t)
{
    char body[64];
    snprintf(body, sizeof body, "{\"step\":%lld}", t);
    return post(c, name, "rollback", body, NULL);
}

static void del(optd_client *c, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/sessions/%s", name);
    optd_response r = tapi_req(c, "DELETE", path, NULL, NULL);
    optd_response_free(&r);
}

static void assert_same_as(optd_client *c, const char *a, const char *b)
{
    tapi_snap x = tapi_snapshot(c, a), y = tapi_snapshot(c, b);
    tapi_assert_same(&x, &y);
    tapi_snap_free(&x);
    tapi_snap_free(&y);
}

/* ------------------------------------------------------------ rollback */

typedef struct {
    const char *tag;
    const char *cfg;  /* the config without params/retain */
    int per_update;   /* gradients per update (accumulate) */
} family;

static const family families[] = {
    {"sgd", "\"optimizer\":{\"type\":\"sgd\",\"lr\":0.05,\"momentum\":0.9,\"nesterov\":true}", 1},
    {"adagrad", "\"optimizer\":{\"type\":\"adagrad\",\"lr\":0.1}", 1},
    {"rmsprop", "\"optimizer\":{\"type\":\"rmsprop\",\"lr\":0.01,\"centered\":true,"
                "\"momentum\":0.5}", 1},
    {"adam", "\"optimizer\":{\"type\":\"adam\",\"lr\":0.01,\"amsgrad\":true},"
             "\"schedule\":{\"type\":\"cosine\",\"T_max\":15}", 1},
    {"adamw", "\"optimizer\":{\"type\":\"adamw\",\"lr\":0.02},"
              "\"schedule\":{\"type\":\"step\",\"step_size\":5,\"gamma\":0.5},"
              "\"clip\":{\"type\":\"norm\",\"max_norm\":1.0}", 1},
    {"adamax", "\"optimizer\":{\"type\":\"adamax\",\"lr\":0.01}", 1},
    {"adadelta", "\"optimizer\":{\"type\":\"adadelta\"}", 1},
    {"nadam", "\"optimizer\":{\"type\":\"nadam\",\"lr\":0.01}", 1},
    {"radam", "\"optimizer\":{\"type\":\"radam\",\"lr\":0.01}", 1},
    {"asgd", "\"optimizer\":{\"type\":\"asgd\",\"lr\":0.01}", 1},
    {"rprop", "\"optimizer\":{\"type\":\"rprop\",\"lr\":0.01}", 1},
    {"lion", "\"optimizer\":{\"type\":\"lion\",\"lr\":0.001}", 1},
    {"accum", "\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"mode\":{\"type\":\"async\","
              "\"accumulate\":3}", 3},
    {"sync", "\"optimizer\":{\"type\":\"sgd\",\"lr\":0.05,\"momentum\":0.5},"
             "\"mode\":{\"type\":\"sync\",\"workers\":1}", 1},
};

static void create_family(optd_client *c, const char *name, const family *f, bool retain)
{
    char body[1024];
    snprintf(body, sizeof body,
             "{%s,\"size\":%d,\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":7}%s}", f->cfg,
             N, retain ? ",\"retain\":{\"every_steps\":4,\"keep\":3}" : "");
    tapi_create(c, name, body, 201);
}

/* Updates 1..20 (each of per_update gradients), rollback to 13, compare
 * with a run of 13, continue to 20, compare with the first run at 20. */
static void test_rollback_every_family(void **state)
{
    (void)state;
    optd_client *c = S->c;
    for (size_t k = 0; k < sizeof families / sizeof families[0]; k++) {
        const family *f = &families[k];
        char p[64], ref[64], end[64];
        snprintf(p, sizeof p, "rb-%s", f->tag);
        snprintf(ref, sizeof ref, "rb-%s-ref", f->tag);
        snprintf(end, sizeof end, "rb-%s-end", f->tag);
        int m = f->per_update;
        create_family(c, p, f, true);
        create_family(c, ref, f, false);
        create_family(c, end, f, false);
        send_range(c, p, 0, 20 * m);
        send_range(c, ref, 0, 13 * m);
        send_range(c, end, 0, 20 * m);
        assert_same_as(c, p, end);
        /* 13: kept checkpoints at 12, 16, 20; replay of one update. */
        assert_int_equal(rollback(c, p, 13), 200);
        assert_same_as(c, p, ref);
        send_range(c, p, 13 * m, 20 * m);
        assert_same_as(c, p, end);
        /* 12: the checkpoint itself; 8 is behind the oldest kept one. */
        assert_int_equal(rollback(c, p, 12), 200);
        assert_int_equal(rollback(c, p, 7), 409);
        send_range(c, p, 12 * m, 20 * m);
        assert_same_as(c, p, end);
        /* No retention: the log after the newest checkpoint is enough. */
        assert_int_equal(rollback(c, end, 13), 200);
        assert_same_as(c, end, ref);
        del(c, p);
        del(c, ref);
        del(c, end);
    }
}

static void test_rollback_keys_and_staleness(void **state)
{
    (void)state;
    optd_client *c = S->c;
    tapi_create(c, "rk", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3]}", 201);
    const char *k5[] = {"Idempotency-Key: key-at-5", NULL};
    for (int i = 0; i < 4; i++) {
        optd_response r = tapi_req(c, "POST", "/v1/sessions/rk/step", NULL, "{\"grad\":[1,1,1]}");
        assert_int_equal(r.status, 200);
        optd_response_free(&r);
    }
    optd_response r = tapi_req(c, "POST", "/v1/sessions/rk/step", k5, "{\"grad\":[1,1,1]}");
    assert_int_equal(r.status, 200);
    optd_response_free(&r);
    /* rolled back past the key: the key is forgotten, so the same key with
     * another body is a new update (not a 422 mismatch, not a replay) */
    assert_int_equal(rollback(c, "rk", 3), 200);
    r = tapi_req(c, "POST", "/v1/sessions/rk/step", k5, "{\"grad\":[2,2,2]}");
    assert_int_equal(r.status, 200);
    assert_null(optd_response_header(&r, "Optd-Replayed"));
    cJSON *j = tapi_json(&r);
    assert_int_equal((int)tapi_num(j, "step"), 4);
    cJSON_Delete(j);
    optd_response_free(&r);
    /* a worker still at step 5 is ahead of the session now */
    const char *stale[] = {"Optd-Base-Step: 5", NULL};
    r = tapi_req(c, "POST", "/v1/sessions/rk/step", stale, "{\"grad\":[1,1,1]}");
    tapi_assert_problem(&r, 409, "base_step");
    optd_response_free(&r);
    /* bad requests change nothing */
    tapi_snap before = tapi_snapshot(c, "rk");
    assert_int_equal(rollback(c, "rk", 99), 422);
    assert_int_equal(post(c, "rk", "rollback", "{\"step\":-1}", NULL), 400);
    assert_int_equal(post(c, "rk", "rollback", "{\"stp\":1}", NULL), 400);
    assert_int_equal(post(c, "rk", "rollback", "{\"label\":\"nope\"}", NULL), 404);
    assert_int_equal(post(c, "nosuch", "rollback", "{\"step\":1}", NULL), 404);
    tapi_snap after = tapi_snapshot(c, "rk");
    tapi_assert_same(&before, &after);
    tapi_snap_free(&before);
    tapi_snap_free(&after);
    del(c, "rk");
}

static void test_labels(void **state)
{
    (void)state;
    optd_client *c = S->c;
    tapi_create(c, "lb", "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.1},\"size\":16}", 201);
    send_range(c, "lb", 0, 5);
    cJSON *doc;
    assert_int_equal(post(c, "lb", "checkpoints", "{\"label\":\"good\"}", &doc), 201);
    assert_int_equal((int)tapi_num(doc, "step"), 5);
    cJSON_Delete(doc);
    tapi_snap at5 = tapi_snapshot(c, "lb");
    assert_int_equal(post(c, "lb", "checkpoints", "{\"label\":\"good\"}", NULL), 409);
    assert_int_equal(post(c, "lb", "checkpoints", "{\"label\":\"a b\"}", NULL), 400);
    assert_int_equal(post(c, "lb", "checkpoints", "{}", NULL), 400);
    send_range(c, "lb", 5, 40);
    optd_response r = tapi_req(c, "GET", "/v1/sessions/lb/checkpoints", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    const cJSON *arr = cJSON_GetObjectItem(j, "checkpoints"), *it;
    int labelled = 0;
    cJSON_ArrayForEach(it, arr)
    {
        const cJSON *l = cJSON_GetObjectItem(it, "label");
        if (cJSON_IsString(l) && strcmp(l->valuestring, "good") == 0) {
            labelled++;
            assert_int_equal((int)tapi_num(it, "step"), 5);
            assert_string_equal(tapi_str(it, "kind"), "label");
            assert_true(tapi_num(it, "bytes") > 16 * 4);
        }
    }
    assert_int_equal(labelled, 1);
    cJSON_Delete(j);
    assert_int_equal(post(c, "lb", "rollback", "{\"label\":\"good\"}", NULL), 200);
    tapi_snap now = tapi_snapshot(c, "lb");
    tapi_assert_same(&at5, &now);
    tapi_snap_free(&now);
    tapi_snap_free(&at5);
    del(c, "lb");
}

/* ---------------------------------------------------------------- fork */

static void test_fork(void **state)
{
    (void)state;
    optd_client *c = S->c;
    const char *cfg = "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":16,"
                      "\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":3},"
                      "\"retain\":{\"every_steps\":5,\"keep\":4}}";
    tapi_create(c, "fp", cfg, 201);
    send_range(c, "fp", 0, 20);
    tapi_snap head = tapi_snapshot(c, "fp");
    /* fork at 8 + the same gradients = the parent */
    tapi_create(c, "ff", "{\"fork\":{\"from\":\"fp\",\"step\":8}}", 201);
    tapi_snap f8 = tapi_snapshot(c, "ff");
    assert_int_equal(f8.session_step, 8);
    tapi_snap_free(&f8);
    send_range(c, "ff", 8, 20);
    assert_same_as(c, "ff", "fp");
    /* fork + replay under the same config = the parent's head */
    tapi_create(c, "fr", "{\"fork\":{\"from\":\"fp\",\"step\":8},\"replay\":true}", 201);
    assert_same_as(c, "fr", "fp");
    /* the fork is its own: deleting the parent leaves it whole, and it
     * survives a restart */
    tapi_create(c, "fz", "{\"fork\":{\"from\":\"fp\",\"step\":11},\"replay\":true}", 201);
    del(c, "fp");
    tapi_snap z = tapi_snapshot(c, "fz");
    tapi_assert_same(&head, &z);
    tapi_snap_free(&z);
    assert_int_equal(tdaemon_stop(&S->d), 0);
    assert_int_equal(tdaemon_restart(&S->d), 0);
    z = tapi_snapshot(c, "fz");
    tapi_assert_same(&head, &z);
    tapi_snap_free(&z);
    /* bad forks create nothing */
    tapi_create(c, "fx", "{\"fork\":{\"from\":\"nosuch\"}}", 404);
    tapi_create(c, "fx", "{\"fork\":{\"from\":\"fz\",\"step\":99}}", 422);
    tapi_create(c, "fx", "{\"fork\":{\"from\":\"fz\",\"step\":1}}", 409);
    tapi_create(c, "fx", "{\"fork\":{\"from\":\"fz\"},\"size\":3}", 400);
    tapi_create(c, "fx", "{\"fork\":{\"from\":\"fz\"},\"optimizer\":{\"type\":\"sgd\"}}", 400);
    tapi_create(c, "fx", "{\"optimizer\":\"sgd\",\"size\":3,\"replay\":true}", 400);
    tapi_create(c, "fz", "{\"fork\":{\"from\":\"ff\"}}", 409);
    optd_response r = tapi_req(c, "GET", "/v1/sessions/fx", NULL, NULL);
    assert_int_equal(r.status, 404);
    optd_response_free(&r);
    tapi_snap_free(&head);
    del(c, "ff");
    del(c, "fr");
    del(c, "fz");
}

/* Replay under another lr = optim/'s kernels run here on the same
 * gradients from the fork point's state (step 0: the init). */
static void test_replay_other_lr(void **state)
{
    (void)state;
    optd_client *c = S->c;
    tapi_create(c, "cp", "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"params\":"
                         "[0.5,-1,2,0.25,3,-0.5,1,1.5,-2,0,0.75,-0.25,1,2,-3,0.1]}",
                201);
    send_range(c, "cp", 0, 25);
    tapi_create(c, "cf", "{\"fork\":{\"from\":\"cp\",\"step\":0},\"replay\":true,"
                         "\"optimizer\":{\"lr\":0.003,\"weight_decay\":0.01}}",
                201);
    float params[N] = {0.5f, -1, 2, 0.25f, 3, -0.5f, 1, 1.5f, -2, 0, 0.75f, -0.25f, 1, 2, -3, 0.1f};
    optim_hparams hp;
    optim_hparams_default(OPTIM_ADAM, &hp);
    hp.lr = 0.003;
    hp.weight_decay = 0.01;
    optim_state st;
    memset(&st, 0, sizeof st);
    optim_state_init(&hp, &st);
    unsigned need = optim_buffers_needed(&hp);
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        if (need & (1u << s)) {
            st.buf[s] = malloc(sizeof params);
            optim_buffer_init(&hp, s, OPTIM_F32, st.buf[s], N);
        }
    for (int i = 0; i < 25; i++) {
        float g[N];
        grad_of(i, g, N);
        optim_step(&hp, &st, OPTIM_F32, params, g, N);
    }
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        free(st.buf[s]);
    tapi_snap f = tapi_snapshot(c, "cf");
    assert_int_equal(f.session_step, 25);
    assert_int_equal(f.len, sizeof params);
    assert_memory_equal(f.params, params, sizeof params);
    /* and it is not the parent */
    tapi_snap p = tapi_snapshot(c, "cp");
    assert_memory_not_equal(p.params, params, sizeof params);
    tapi_snap_free(&p);
    tapi_snap_free(&f);
    /* another optimizer on the same gradients, from step 10 on: the
     * parent's params at 10, a fresh SGD state */
    tapi_create(c, "c10", "{\"fork\":{\"from\":\"cp\",\"step\":10}}", 201);
    tapi_snap at10 = tapi_snapshot(c, "c10");
    tapi_create(c, "cs", "{\"fork\":{\"from\":\"cp\",\"step\":10},\"replay\":true,"
                         "\"optimizer\":{\"type\":\"sgd\",\"lr\":0.05,\"momentum\":0.9}}",
                201);
    float sp[N];
    memcpy(sp, at10.params, sizeof sp);
    optim_hparams sh;
    optim_hparams_default(OPTIM_SGD, &sh);
    sh.lr = 0.05;
    sh.momentum = 0.9;
    optim_state ss;
    memset(&ss, 0, sizeof ss);
    optim_state_init(&sh, &ss);
    unsigned sneed = optim_buffers_needed(&sh);
    for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++)
        if (sneed & (1u << b)) {
            ss.buf[b] = malloc(sizeof sp);
            optim_buffer_init(&sh, b, OPTIM_F32, ss.buf[b], N);
        }
    for (int i = 10; i < 25; i++) {
        float g[N];
        grad_of(i, g, N);
        optim_step(&sh, &ss, OPTIM_F32, sp, g, N);
    }
    for (unsigned b = 0; b < OPTIM_MAX_BUFFERS; b++)
        free(ss.buf[b]);
    tapi_snap cs = tapi_snapshot(c, "cs");
    assert_int_equal(cs.session_step, 25);
    assert_memory_equal(cs.params, sp, sizeof sp);
    tapi_snap_free(&cs);
    tapi_snap_free(&at10);
    /* a type whose hyperparameters do not fit is refused, naming them */
    optd_response r = tapi_req(c, "PUT", "/v1/sessions/cx", NULL,
                               "{\"fork\":{\"from\":\"cp\"},\"optimizer\":{\"type\":\"sgd\","
                               "\"lr\":0.1,\"betas\":[0.9,0.99]}}");
    tapi_assert_problem(&r, 400, NULL);
    optd_response_free(&r);
    del(c, "cp");
    del(c, "cf");
    del(c, "c10");
    del(c, "cs");
}

/* ------------------------------------------------------------ retention */

static long long dir_bytes(const char *dir, int *files)
{
    long long t = 0;
    *files = 0;
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        struct stat sb;
        if (stat(p, &sb) == 0) {
            t += sb.st_size;
            (*files)++;
        }
    }
    closedir(d);
    return t;
}

static long long sql_count(const char *db, const char *q)
{
    sqlite3 *h;
    assert_int_equal(sqlite3_open_v2(db, &h, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *s;
    assert_int_equal(sqlite3_prepare_v2(h, q, -1, &s, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    long long v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(h);
    return v;
}

static long long file_size(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 ? (long long)sb.st_size : 0;
}

/* 10,000 steps of 1,000 floats (40 MB of gradients) with keep 5: five
 * periodic checkpoints, no replay data behind the oldest, and a database
 * whose size does not grow with the gradients: the second 5,000 steps add
 * only their history rows.  Beside it a session of 100,000 floats (its
 * vectors in files) keeps 2 checkpoints and the segments after them. */
static void run_steps(optd_client *c, float *g, int from, int to, int size)
{
    for (int i = from; i < to; i++) {
        g[i % size] += 0.5f;
        long long step;
        optd_error e;
        if (optd_step_f32(c, "ret", g, (size_t)size, NULL, NULL, &step, &e) != 0)
            fail_msg("step %d: %s", i, e.detail);
        if (i < 200 && optd_step_f32(c, "big", g, 100000, NULL, NULL, &step, &e) != 0)
            fail_msg("big step %d: %s", i, e.detail);
    }
}

static void test_retention_10k(void **state)
{
    (void)state;
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    enum { SIZE = 1000, STEPS = 10000, EVERY = 100, KEEP = 5 };
    char body[256];
    snprintf(body, sizeof body,
             "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.001},\"size\":%d,"
             "\"retain\":{\"every_steps\":%d,\"keep\":%d}}",
             SIZE, EVERY, KEEP);
    tapi_create(c, "ret", body, 201);
    tapi_create(c, "big", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.001},\"size\":100000,"
                          "\"retain\":{\"every_steps\":20,\"keep\":2}}",
                201);
    float *g = calloc(100000, sizeof *g);
    for (int i = 0; i < 100000; i++)
        g[i] = (float)((i % 7) - 3) * 0.01f;
    const char *db = tdaemon_db(&d);
    char dir[600];
    snprintf(dir, sizeof dir, "%s.d", db);
    long long t0 = tapi_now_ms();
    run_steps(c, g, 0, STEPS / 2, SIZE);
    assert_int_equal(tdaemon_stop(&d), 0); /* folds the WAL into the file */
    long long half = file_size(db);
    assert_int_equal(tdaemon_restart(&d), 0);
    run_steps(c, g, STEPS / 2, STEPS, SIZE);
    long long t1 = tapi_now_ms();
    optd_response r = tapi_req(c, "GET", "/v1/sessions/ret/checkpoints", NULL, NULL);
    cJSON *j = tapi_json(&r);
    optd_response_free(&r);
    int periodic = 0, total = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(j, "checkpoints"))
    {
        total++;
        if (strcmp(tapi_str(it, "kind"), "periodic") == 0) {
            periodic++;
            assert_true((long long)tapi_num(it, "step") >= STEPS - (KEEP - 1) * EVERY);
        }
    }
    cJSON_Delete(j);
    assert_int_equal(periodic, KEEP);
    assert_true(total <= KEEP + 1); /* + the newest automatic one, if any */
    assert_int_equal(tdaemon_stop(&d), 0);
    long long full = file_size(db);
    long long with_data = sql_count(db, "SELECT count(*) FROM steps s JOIN sessions n ON"
                                        " n.id = s.session_id WHERE n.name = 'ret' AND"
                                        " (s.grad IS NOT NULL OR s.file IS NOT NULL)");
    long long ckpts = sql_count(db, "SELECT count(*) FROM checkpoints c JOIN sessions n ON"
                                    " n.id = c.session_id WHERE n.name = 'ret'");
    int files;
    long long dbytes = dir_bytes(dir, &files);
    fprintf(stderr,
            "[ retain   ] %d steps of %d floats (%lld bytes of gradients) in %lld ms: %lld "
            "checkpoints, %lld rows with replay data; database %lld bytes after %d steps, "
            "%lld after %d; beside it %lld bytes in %d files\n",
            STEPS, SIZE, (long long)STEPS * SIZE * 4, t1 - t0, ckpts, with_data, half,
            STEPS / 2, full, STEPS, dbytes, files);
    assert_true(ckpts <= KEEP + 1);
    assert_true(with_data <= (KEEP - 1) * EVERY + 10);
    /* the second half added its history rows (~100 bytes a step), not its
     * 20 MB of gradients */
    assert_true(full - half < 1500 * 1000);
    assert_true(full < 10 * 1000 * 1000);
    /* big: 2 checkpoints of 400 KB and at most 40 gradients after them */
    assert_true(dbytes <= 2 * 400000 + 40 * 400000);
    assert_int_equal(tapi_integrity_check(db), 0);
    assert_int_equal(tdaemon_restart(&d), 0);
    optd_client_free(c);
    c = tapi_client(tdaemon_url(&d), NULL, false);
    /* rolling back to the oldest kept one works; behind it is gone */
    assert_int_equal(rollback(c, "ret", STEPS - (KEEP - 1) * EVERY + 3), 200);
    assert_int_equal(rollback(c, "ret", STEPS - KEEP * EVERY), 409);
    assert_int_equal(rollback(c, "big", 185), 200);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(db), 0);
    free(g);
    tdaemon_cleanup(&d);
}

/* --------------------------------------------------------- export */

static optd_response get_raw(optd_client *c, const char *path)
{
    const char *acc[] = {"Accept: application/octet-stream", NULL};
    return tapi_req(c, "GET", path, acc, NULL);
}

static int put_file(optd_client *c, const char *path, const void *b, size_t n)
{
    const char *ct[] = {"Content-Type: application/octet-stream", NULL};
    optd_response r = tapi_req_bin(c, "PUT", path, ct, b, n);
    int st = r.status;
    if (st != 201 && st != 409 && st != 422 && st != 400)
        fail_msg("PUT %s: %d %.*s", path, st, (int)r.len, r.body);
    optd_response_free(&r);
    return st;
}

/* An export with its log, imported, is the session bit for bit, and can
 * be rolled back like it; without the log, the state alone.  A damaged or
 * foreign file creates nothing. */
static void test_export_import(void **state)
{
    (void)state;
    optd_client *c = S->c;
    tapi_create(c, "ex", "{\"optimizer\":{\"type\":\"adamw\",\"lr\":0.01},\"size\":16,"
                         "\"init\":{\"type\":\"uniform\",\"seed\":5},"
                         "\"schedule\":{\"type\":\"cosine\",\"T_max\":30},"
                         "\"retain\":{\"every_steps\":6,\"keep\":3}}",
                201);
    send_range(c, "ex", 0, 23);
    optd_response full = get_raw(c, "/v1/sessions/ex/export?log=true");
    assert_int_equal(full.status, 200);
    optd_response bare = get_raw(c, "/v1/sessions/ex/export");
    assert_int_equal(bare.status, 200);
    assert_true(full.len > bare.len);
    assert_int_equal(put_file(c, "/v1/sessions/ex2/export", full.body, full.len), 201);
    assert_int_equal(put_file(c, "/v1/sessions/ex3/export", bare.body, bare.len), 201);
    assert_same_as(c, "ex", "ex2");
    assert_same_as(c, "ex", "ex3");
    /* the imported log is a history: both roll back to 20 alike */
    assert_int_equal(rollback(c, "ex", 20), 200);
    assert_int_equal(rollback(c, "ex2", 20), 200);
    assert_same_as(c, "ex", "ex2");
    /* and continue alike */
    send_range(c, "ex", 20, 26);
    send_range(c, "ex2", 20, 26);
    assert_same_as(c, "ex", "ex2");
    /* refusals: the name taken, a damaged log, not an export */
    assert_int_equal(put_file(c, "/v1/sessions/ex2/export", full.body, full.len), 409);
    char *bad = malloc(full.len);
    memcpy(bad, full.body, full.len);
    bad[full.len - 3] ^= 0x40; /* the last logged gradient */
    assert_int_equal(put_file(c, "/v1/sessions/ex4/export", bad, full.len), 422);
    assert_int_equal(put_file(c, "/v1/sessions/ex4/export", "garbage!", 8), 400);
    free(bad);
    optd_response r = tapi_req(c, "GET", "/v1/sessions/ex4", NULL, NULL);
    assert_int_equal(r.status, 404);
    optd_response_free(&r);
    r = tapi_req(c, "GET", "/v1/sessions", NULL, NULL);
    assert_null(memmem(r.body, r.len, "~", 1));
    optd_response_free(&r);
    optd_response_free(&full);
    optd_response_free(&bare);
    del(c, "ex");
    del(c, "ex2");
    del(c, "ex3");
}

/* --------------------------------------------------------- backup */

typedef struct {
    char url[64];
    volatile int stop;
    int steps;
} stepper;

static void *step_loop(void *p)
{
    stepper *a = p;
    optd_client *c = optd_client_new(a->url, NULL);
    float *g = malloc(70000 * sizeof *g);
    while (!a->stop) {
        for (int k = 0; k < 70000; k++)
            g[k] = (float)cos(a->steps * 0.3 + k * 0.01);
        long long step;
        optd_error e;
        if (optd_step_f32(c, "bk", g, 70000, NULL, NULL, &step, &e) != 0)
            break;
        a->steps++;
    }
    free(g);
    optd_client_free(c);
    return NULL;
}

/* `optd backup` while steps are served: the copy opens in a daemon of its
 * own, passes optd check, and holds the session exactly as it was at the
 * step it has (compared with a fork of the live session at that step). */
static void test_backup_online(void **state)
{
    (void)state;
    optd_client *c = S->c;
    tapi_create(c, "bk", "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":70000,"
                         "\"retain\":{\"every_steps\":5,\"keep\":2000}}",
                201);
    stepper a = {.stop = 0, .steps = 0};
    snprintf(a.url, sizeof a.url, "%s", tdaemon_url(&S->d));
    pthread_t th;
    pthread_create(&th, NULL, step_loop, &a);
    while (a.steps < 12)
        usleep(2000);
    char out[700], cmd[2000];
    snprintf(out, sizeof out, "%s/backup.db", S->d.dir);
    const char *bin = getenv("OPTD_BIN");
    snprintf(cmd, sizeof cmd, "%s backup --db %s %s", bin ? bin : "build/optd",
             tdaemon_db(&S->d), out);
    int rc = system(cmd);
    int during = a.steps;
    while (a.steps < during + 3)
        usleep(2000);
    a.stop = 1;
    pthread_join(th, NULL);
    assert_int_equal(rc, 0);
    snprintf(cmd, sizeof cmd, "%s check --db %s", bin ? bin : "build/optd", out);
    assert_int_equal(system(cmd), 0);
    tdaemon b;
    assert_int_equal(tdaemon_start(&b, out, NULL), 0);
    optd_client *cb = tapi_client(tdaemon_url(&b), NULL, false);
    tapi_snap x = tapi_snapshot(cb, "bk");
    fprintf(stderr, "[ backup   ] copied at step %lld while %d steps were served\n",
            x.session_step, a.steps);
    assert_true(x.session_step >= 12);
    char body[128];
    snprintf(body, sizeof body, "{\"fork\":{\"from\":\"bk\",\"step\":%lld}}", x.session_step);
    tapi_create(c, "bk-at", body, 201);
    tapi_snap y = tapi_snapshot(c, "bk-at");
    tapi_assert_same(&x, &y);
    tapi_snap_free(&x);
    tapi_snap_free(&y);
    optd_client_free(cb);
    assert_int_equal(tdaemon_stop(&b), 0);
    tdaemon_cleanup(&b);
    del(c, "bk");
    del(c, "bk-at");
}

/* ------------------------------------------------------------ kill -9 */

enum { KN = 70000 };

static void kgrad(int i, float *g)
{
    for (int k = 0; k < KN; k++)
        g[k] = (float)sin(i * 0.9 + k * 0.001);
}

typedef struct {
    char url[64];
    int which;   /* 0 rollback, 1 fork + replay, 2 import with log, 3 steps */
    void *file;  /* 2: the export to import */
    size_t len;
    int acked;   /* 3: steps acknowledged */
} crash_arg;

static void *crash_worker(void *p)
{
    crash_arg *a = p;
    optd_client *c = optd_client_new(a->url, NULL);
    optd_client_set_retry(c, 1, 0, 0);
    optd_response r;
    memset(&r, 0, sizeof r);
    const char *rb = "{\"step\":10}", *fk = "{\"fork\":{\"from\":\"k\",\"step\":10},\"replay\":true}";
    const char *ct[] = {"Content-Type: application/octet-stream", NULL};
    if (a->which == 0) {
        optd_request(c, "POST", "/v1/sessions/k/rollback", NULL, rb, strlen(rb), &r);
    } else if (a->which == 1) {
        optd_request(c, "PUT", "/v1/sessions/kf", NULL, fk, strlen(fk), &r);
    } else if (a->which == 2) {
        optd_request(c, "PUT", "/v1/sessions/kf/export", ct, a->file, a->len, &r);
    } else {
        /* a stream of steps: each tenth one writes a kept checkpoint and
         * compacts the log behind the oldest */
        float *g = malloc(KN * sizeof *g);
        for (int i = 30; i < 60; i++) {
            kgrad(i, g);
            long long step;
            optd_error e;
            if (optd_step_f32(c, "k", g, KN, NULL, NULL, &step, &e) != 0)
                break;
            a->acked = (int)step;
        }
        free(g);
    }
    optd_response_free(&r);
    optd_client_free(c);
    return NULL;
}

/* kill -9 at random moments during rollbacks, forks with replay, imports
 * and steps that compact the log: after a restart the session is exactly
 * at step 10 or at its head (or, under steps, at the last acknowledged one
 * or later, equal to an uninterrupted run), the fork or import is whole or
 * absent, nothing is listed under a temporary name, and the database is
 * sound. */
static void test_kill9_travel(void **state)
{
    (void)state;
    unsigned seed = (unsigned)time(NULL);
    fprintf(stderr, "[ kill9    ] seed %u\n", seed);
    tdaemon d;
    assert_int_equal(tdaemon_start(&d, NULL, NULL), 0);
    optd_client *c = tapi_client(tdaemon_url(&d), NULL, false);
    const char *cfg = "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":70000,"
                      "\"retain\":{\"every_steps\":10,\"keep\":2}}";
    const char *plain = "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":70000}";
    float *g = malloc(KN * sizeof *g);
    for (int round = 0; round < 8; round++) {
        del(c, "k");
        del(c, "kf");
        tapi_create(c, "k", cfg, 201);
        for (int i = 0; i < 30; i++) {
            kgrad(i, g);
            long long step;
            optd_error e;
            if (optd_step_f32(c, "k", g, KN, NULL, NULL, &step, &e) != 0)
                fail_msg("step: %s", e.detail);
        }
        tapi_snap head = tapi_snapshot(c, "k");
        crash_arg a = {.which = round % 4};
        snprintf(a.url, sizeof a.url, "%s", tdaemon_url(&d));
        optd_response ex = {0};
        if (a.which == 2) {
            ex = get_raw(c, "/v1/sessions/k/export?log=true");
            assert_int_equal(ex.status, 200);
            a.file = ex.body;
            a.len = ex.len;
        }
        pthread_t th;
        pthread_create(&th, NULL, crash_worker, &a);
        usleep((useconds_t)(rand_r(&seed) % (a.which == 3 ? 150000 : 40000)));
        assert_int_equal(tdaemon_kill9(&d), 0);
        pthread_join(th, NULL);
        optd_response_free(&ex);
        assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
        assert_int_equal(tdaemon_restart(&d), 0);
        optd_client_free(c);
        c = tapi_client(tdaemon_url(&d), NULL, false);
        tapi_snap now = tapi_snapshot(c, "k");
        if (a.which == 3 || now.session_step == 10) {
            /* the same as a run that never stopped, up to where it is */
            long long upto = now.session_step;
            assert_true(upto >= (a.which == 3 ? (a.acked > 30 ? a.acked : 30) : 10));
            tapi_create(c, "kref", plain, 201);
            for (int i = 0; i < upto; i++) {
                kgrad(i, g);
                long long step;
                optd_error e;
                if (optd_step_f32(c, "kref", g, KN, NULL, NULL, &step, &e) != 0)
                    fail_msg("step: %s", e.detail);
            }
            tapi_snap ref = tapi_snapshot(c, "kref");
            tapi_assert_same(&ref, &now);
            tapi_snap_free(&ref);
            del(c, "kref");
        } else {
            tapi_assert_same(&head, &now);
        }
        optd_response r = tapi_req(c, "GET", "/v1/sessions/kf", NULL, NULL);
        if (r.status == 200) {
            tapi_snap f = tapi_snapshot(c, "kf");
            tapi_assert_same(&head, &f);
            tapi_snap_free(&f);
        } else {
            assert_int_equal(r.status, 404);
        }
        optd_response_free(&r);
        r = tapi_req(c, "GET", "/v1/sessions", NULL, NULL);
        assert_null(memmem(r.body, r.len, "~", 1));
        optd_response_free(&r);
        tapi_snap_free(&now);
        tapi_snap_free(&head);
    }
    free(g);
    optd_client_free(c);
    assert_int_equal(tdaemon_stop(&d), 0);
    assert_int_equal(tapi_integrity_check(tdaemon_db(&d)), 0);
    tdaemon_cleanup(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rollback_every_family),
        cmocka_unit_test(test_rollback_keys_and_staleness),
        cmocka_unit_test(test_labels),
        cmocka_unit_test(test_fork),
        cmocka_unit_test(test_replay_other_lr),
        cmocka_unit_test(test_export_import),
        cmocka_unit_test(test_backup_online),
        cmocka_unit_test(test_retention_10k),
        cmocka_unit_test(test_kill9_travel),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
