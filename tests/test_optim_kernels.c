/*
 * test_optim_kernels.c -- every optimizer rule against the reference vectors
 * in tests/fixtures/optim/ (written by tests/ref/gen_optim.py from
 * torch.optim 1.13.1's single-tensor code, per-op rounding in the dtype),
 * plus the plan/run/commit split, buffer and state initialisation, slot
 * names and the slots each flag needs.
 *
 * Run from the repository root.  One cmocka test per fixture case, named
 * after it.  OPTD_VERBOSE=1 prints the largest ulp difference of every case;
 * OPTD_EXACT=1 demands bit-identical results (the kernels reach them; the
 * default tolerance below would let a one-ulp slip in an operation order,
 * e.g. radam's reciprocal-then-multiply, pass).
 *
 * Under valgrind (OPTD_VALGRIND=1) the 1000003-element cases stop after
 * update 3 and compare the reference's check at update 3 (every case still
 * runs; each has that check); 100+ updates of a million elements would take
 * minutes there and exercise no code path the first three do not.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "optim/optim.h"
#include "tests/support/gen.h"

#define FIXTURE_DIR "tests/fixtures/optim/"
/* Agreement required: the reference and the kernels should agree bit for
 * bit; the tolerance only keeps a report readable if they do not. */
#define REL_TOL_F64 1e-12
#define REL_TOL_F32 1e-6
#define ABS_FLOOR_F64 1e-300
#define ABS_FLOOR_F32 1e-37
/* Cases longer than this are "large": valgrind runs them for 3 updates. */
#define LARGE_N 100000
#define VALGRIND_STEPS 3
#define MAX_REPORTED 6

static const char *const tk_kind_names[] = {
    "sgd", "adagrad", "rmsprop", "adam", "adamw", "adamax",
    "adadelta", "nadam", "radam", "asgd", "rprop", "lion",
};
#define N_KINDS (sizeof tk_kind_names / sizeof tk_kind_names[0])

static bool tk_verbose;
static bool tk_valgrind;
static bool tk_exact;

/* ------------------------------------------------------------ fixtures */

typedef struct {
    size_t idx;
    double v;
} tk_val;

typedef struct {
    char name[48];
    tk_val *vals;
    size_t n_vals, cap;
} tk_vec;

typedef struct {
    char name[48];
    double v;
} tk_scalar;

typedef struct {
    uint64_t t;
    uint64_t step;
    tk_scalar sc[OPTIM_MAX_SCALARS];
    size_t n_sc;
    tk_vec vecs[1 + OPTIM_MAX_BUFFERS];
    size_t n_vecs;
} tk_check;

/* A hyperparameter line: t == 0 for "hp", the update number for "set". */
typedef struct {
    uint64_t t;
    char field[48];
    char arg[2][64];
    int n_args;
} tk_set;

typedef struct {
    char name[96];
    char kind_name[16];
    optim_dtype dt;
    size_t n;
    uint64_t steps, seed;
    double pscale, gscale;
    tk_set *sets;
    size_t n_sets, cap_sets;
    tk_check *checks;
    size_t n_checks, cap_checks;
} tk_case;

static tk_case *tk_cases;
static size_t tk_n_cases, tk_cap_cases;
/* Problems met while loading, reported by test_fixtures_load. */
static char tk_load_error[512];

/* Makes room for one more element; aborts on out-of-memory (test code). */
static void *tk_grow(void *p, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap)
        return p;
    size_t nc = *cap ? *cap : 16;
    while (nc <= n)
        nc *= 2;
    void *q = realloc(p, nc * elem);
    if (!q) {
        fprintf(stderr, "out of memory\n");
        abort();
    }
    *cap = nc;
    return q;
}

static void tk_load_fail(const char *file, unsigned line, const char *what)
{
    if (!tk_load_error[0])
        snprintf(tk_load_error, sizeof tk_load_error, "%s:%u: %s", file, line, what);
}

/* Reads a whole file; returns a new buffer (caller frees) or NULL. */
static char *tk_read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        buf = tk_grow(buf, &cap, len + 65536, 1);
        size_t r = fread(buf + len, 1, cap - len - 1, f);
        len += r;
        if (r == 0)
            break;
    }
    fclose(f);
    buf[len] = '\0';
    return buf;
}

static bool tk_parse_u64(const char *s, uint64_t *out)
{
    char *end;
    if (!s)
        return false;
    *out = strtoull(s, &end, 10);
    return end != s && *end == '\0';
}

static bool tk_parse_double(const char *s, double *out)
{
    char *end;
    if (!s)
        return false;
    *out = strtod(s, &end);
    return end != s && *end == '\0';
}

static void tk_load_file(const char *kind)
{
    char path[256];
    snprintf(path, sizeof path, FIXTURE_DIR "%s.txt", kind);
    char *text = tk_read_file(path);
    if (!text) {
        tk_load_fail(path, 0, "cannot read (run from the repository root)");
        return;
    }
    tk_case *c = NULL;
    tk_check *chk = NULL;
    tk_vec *vec = NULL;
    unsigned lineno = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *ts = NULL;
        char *tok[6] = {0};
        int nt = 0;
        for (char *w = strtok_r(line, " \t\r", &ts); w && nt < 6; w = strtok_r(NULL, " \t\r", &ts))
            tok[nt++] = w;
        if (nt == 0)
            continue;
        const char *k = tok[0];
        bool ok = true;
        if (strcmp(k, "case") == 0 && nt == 2) {
            tk_cases = tk_grow(tk_cases, &tk_cap_cases, tk_n_cases, sizeof *tk_cases);
            c = &tk_cases[tk_n_cases++];
            memset(c, 0, sizeof *c);
            snprintf(c->name, sizeof c->name, "%s", tok[1]);
            chk = NULL;
            vec = NULL;
        } else if (!c) {
            ok = false;
        } else if (strcmp(k, "kind") == 0 && nt == 2) {
            snprintf(c->kind_name, sizeof c->kind_name, "%s", tok[1]);
            ok = strcmp(tok[1], kind) == 0;
        } else if (strcmp(k, "dtype") == 0 && nt == 2) {
            ok = optim_dtype_parse(tok[1], &c->dt) == OPTIM_OK;
        } else if (strcmp(k, "n") == 0 && nt == 2) {
            uint64_t n = 0;
            ok = tk_parse_u64(tok[1], &n) && n > 0;
            c->n = (size_t)n;
        } else if (strcmp(k, "steps") == 0 && nt == 2) {
            ok = tk_parse_u64(tok[1], &c->steps);
        } else if (strcmp(k, "seed") == 0 && nt == 2) {
            ok = tk_parse_u64(tok[1], &c->seed);
        } else if (strcmp(k, "pscale") == 0 && nt == 2) {
            ok = tk_parse_double(tok[1], &c->pscale);
        } else if (strcmp(k, "gscale") == 0 && nt == 2) {
            ok = tk_parse_double(tok[1], &c->gscale);
        } else if ((strcmp(k, "hp") == 0 && nt >= 3 && nt <= 4) ||
                   (strcmp(k, "set") == 0 && nt >= 4 && nt <= 5)) {
            int base = k[0] == 'h' ? 1 : 2;
            c->sets = tk_grow(c->sets, &c->cap_sets, c->n_sets, sizeof *c->sets);
            tk_set *s = &c->sets[c->n_sets++];
            memset(s, 0, sizeof *s);
            if (base == 2) {
                ok = tk_parse_u64(tok[1], &s->t) && s->t >= 1;
            }
            snprintf(s->field, sizeof s->field, "%s", tok[base]);
            s->n_args = nt - base - 1;
            for (int i = 0; i < s->n_args; i++)
                snprintf(s->arg[i], sizeof s->arg[i], "%s", tok[base + 1 + i]);
        } else if (strcmp(k, "check") == 0 && nt == 2) {
            c->checks = tk_grow(c->checks, &c->cap_checks, c->n_checks, sizeof *c->checks);
            chk = &c->checks[c->n_checks++];
            memset(chk, 0, sizeof *chk);
            ok = tk_parse_u64(tok[1], &chk->t);
            vec = NULL;
        } else if (!chk) {
            ok = strcmp(k, "end") == 0;
        } else if (strcmp(k, "step") == 0 && nt == 2) {
            ok = tk_parse_u64(tok[1], &chk->step);
        } else if (strcmp(k, "scalar") == 0 && nt == 3 && chk->n_sc < OPTIM_MAX_SCALARS) {
            tk_scalar *s = &chk->sc[chk->n_sc++];
            snprintf(s->name, sizeof s->name, "%s", tok[1]);
            ok = tk_parse_double(tok[2], &s->v);
        } else if (strcmp(k, "vec") == 0 && nt == 2 && chk->n_vecs < 1 + OPTIM_MAX_BUFFERS) {
            vec = &chk->vecs[chk->n_vecs++];
            memset(vec, 0, sizeof *vec);
            snprintf(vec->name, sizeof vec->name, "%s", tok[1]);
        } else if (strcmp(k, "end") == 0 && nt == 1) {
            chk = NULL;
            vec = NULL;
        } else if (vec && nt == 2 && k[0] >= '0' && k[0] <= '9') {
            uint64_t idx = 0;
            vec->vals = tk_grow(vec->vals, &vec->cap, vec->n_vals, sizeof *vec->vals);
            tk_val *v = &vec->vals[vec->n_vals++];
            ok = tk_parse_u64(tok[0], &idx) && idx < c->n && tk_parse_double(tok[1], &v->v);
            v->idx = (size_t)idx;
        } else {
            ok = false;
        }
        if (!ok)
            tk_load_fail(path, lineno, "malformed line");
    }
    free(text);
}

static void tk_load_all(void)
{
    for (size_t k = 0; k < N_KINDS; k++)
        tk_load_file(tk_kind_names[k]);
}

/* ----------------------------------------------------- hyperparameters
 *
 * The test's own map from torch's field names to optim_hparams (not the
 * library's spec tables, which test_optim_validate checks separately).
 */
typedef enum { TK_NUM, TK_PAIR, TK_BOOL, TK_FORM } tk_field_type;

static const struct {
    const char *name;
    tk_field_type type;
    size_t off;
} tk_fields[] = {
    {"lr", TK_NUM, offsetof(optim_hparams, lr)},
    {"momentum", TK_NUM, offsetof(optim_hparams, momentum)},
    {"dampening", TK_NUM, offsetof(optim_hparams, dampening)},
    {"weight_decay", TK_NUM, offsetof(optim_hparams, weight_decay)},
    {"betas", TK_PAIR, offsetof(optim_hparams, betas)},
    {"eps", TK_NUM, offsetof(optim_hparams, eps)},
    {"alpha", TK_NUM, offsetof(optim_hparams, alpha)},
    {"rho", TK_NUM, offsetof(optim_hparams, rho)},
    {"lr_decay", TK_NUM, offsetof(optim_hparams, lr_decay)},
    {"initial_accumulator_value", TK_NUM, offsetof(optim_hparams, initial_accumulator_value)},
    {"momentum_decay", TK_NUM, offsetof(optim_hparams, momentum_decay)},
    {"lambd", TK_NUM, offsetof(optim_hparams, lambd)},
    {"t0", TK_NUM, offsetof(optim_hparams, t0)},
    {"etas", TK_PAIR, offsetof(optim_hparams, etas)},
    {"step_sizes", TK_PAIR, offsetof(optim_hparams, step_sizes)},
    {"nesterov", TK_BOOL, offsetof(optim_hparams, nesterov)},
    {"maximize", TK_BOOL, offsetof(optim_hparams, maximize)},
    {"amsgrad", TK_BOOL, offsetof(optim_hparams, amsgrad)},
    {"centered", TK_BOOL, offsetof(optim_hparams, centered)},
    {"bias_correction", TK_BOOL, offsetof(optim_hparams, bias_correction)},
    {"momentum_form", TK_FORM, offsetof(optim_hparams, momentum_form)},
};

static void tk_apply_set(const tk_case *c, const tk_set *s, optim_hparams *hp)
{
    char *base = (char *)hp;
    for (size_t i = 0; i < sizeof tk_fields / sizeof tk_fields[0]; i++) {
        if (strcmp(tk_fields[i].name, s->field) != 0)
            continue;
        double v[2] = {0, 0};
        int need = tk_fields[i].type == TK_PAIR ? 2 : 1;
        if (s->n_args != need)
            fail_msg("%s: %s takes %d value(s)", c->name, s->field, need);
        switch (tk_fields[i].type) {
        case TK_NUM:
        case TK_PAIR:
            for (int a = 0; a < need; a++)
                if (!tk_parse_double(s->arg[a], &v[a]))
                    fail_msg("%s: bad number %s for %s", c->name, s->arg[a], s->field);
            memcpy(base + tk_fields[i].off, v, (size_t)need * sizeof(double));
            return;
        case TK_BOOL:
            *(bool *)(base + tk_fields[i].off) = strcmp(s->arg[0], "1") == 0;
            return;
        case TK_FORM:
            if (strcmp(s->arg[0], "torch") == 0)
                *(int *)(base + tk_fields[i].off) = OPTIM_MOMENTUM_TORCH;
            else if (strcmp(s->arg[0], "classic") == 0)
                *(int *)(base + tk_fields[i].off) = OPTIM_MOMENTUM_CLASSIC;
            else
                fail_msg("%s: bad momentum_form %s", c->name, s->arg[0]);
            return;
        }
    }
    fail_msg("%s: unknown hyperparameter %s", c->name, s->field);
}

/* ------------------------------------------------------------ comparing */

static double tk_get(optim_dtype dt, const void *v, size_t i)
{
    return dt == OPTIM_F32 ? (double)((const float *)v)[i] : ((const double *)v)[i];
}

/* Ulp distance between got and want in the dtype (UINT64_MAX for NaN). */
static uint64_t tk_ulps(optim_dtype dt, double got, double want)
{
    if (isnan(got) || isnan(want))
        return UINT64_MAX;
    int64_t a, b;
    if (dt == OPTIM_F32) {
        float fg = (float)got, fw = (float)want;
        int32_t ia, ib;
        memcpy(&ia, &fg, 4);
        memcpy(&ib, &fw, 4);
        a = ia < 0 ? -(int64_t)(ia & INT32_MAX) : ia;
        b = ib < 0 ? -(int64_t)(ib & INT32_MAX) : ib;
    } else {
        memcpy(&a, &got, 8);
        memcpy(&b, &want, 8);
        a = a < 0 ? -(a & INT64_MAX) : a;
        b = b < 0 ? -(b & INT64_MAX) : b;
    }
    /* The difference of two values in (-2^63, 2^63) fits in uint64_t. */
    return a > b ? (uint64_t)a - (uint64_t)b : (uint64_t)b - (uint64_t)a;
}

static bool tk_close(optim_dtype dt, double got, double want)
{
    if (!isfinite(got))
        return false;
    if (tk_exact)
        return got == want;
    double rel = dt == OPTIM_F32 ? REL_TOL_F32 : REL_TOL_F64;
    double floor_ = dt == OPTIM_F32 ? ABS_FLOOR_F32 : ABS_FLOOR_F64;
    return fabs(got - want) <= rel * fabs(want) + floor_;
}

typedef struct {
    unsigned failures;
    uint64_t max_ulps;
} tk_tally;

static void tk_mismatch(tk_tally *tl, const char *fmt, ...)
{
    if (tl->failures++ < MAX_REPORTED) {
        char msg[400];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        print_error("%s\n", msg);
    }
}

static void tk_compare_check(const tk_case *c, optim_kind kind, const tk_check *chk,
                             const optim_state *st, const void *params, tk_tally *tl)
{
    if (st->step != chk->step)
        tk_mismatch(tl, "%s after update %" PRIu64 ": step %" PRIu64 ", want %" PRIu64,
                    c->name, chk->t, st->step, chk->step);
    for (size_t s = 0; s < chk->n_sc; s++) {
        const tk_scalar *want = &chk->sc[s];
        int found = -1;
        for (unsigned i = 0; i < OPTIM_MAX_SCALARS; i++) {
            const char *nm = optim_scalar_name(kind, i);
            if (!nm)
                break;
            if (strcmp(nm, want->name) == 0)
                found = (int)i;
        }
        if (found < 0) {
            tk_mismatch(tl, "%s: no state scalar named %s", c->name, want->name);
            continue;
        }
        double got = st->scalars[found];
        if (!tk_close(OPTIM_F64, got, want->v))
            tk_mismatch(tl, "%s after update %" PRIu64 ": scalar %s = %a (%.17g), want %a (%.17g)",
                        c->name, chk->t, want->name, got, got, want->v, want->v);
    }
    for (size_t v = 0; v < chk->n_vecs; v++) {
        const tk_vec *want = &chk->vecs[v];
        const void *data = NULL;
        if (strcmp(want->name, "params") == 0) {
            data = params;
        } else {
            for (unsigned slot = 0; slot < OPTIM_MAX_BUFFERS; slot++) {
                const char *nm = optim_buffer_name(kind, slot);
                if (!nm)
                    break;
                if (strcmp(nm, want->name) == 0)
                    data = st->buf[slot];
            }
        }
        if (!data) {
            tk_mismatch(tl, "%s: no buffer %s in use", c->name, want->name);
            continue;
        }
        for (size_t i = 0; i < want->n_vals; i++) {
            double got = tk_get(c->dt, data, want->vals[i].idx);
            double w = want->vals[i].v;
            uint64_t u = tk_ulps(c->dt, got, w);
            if (u > tl->max_ulps)
                tl->max_ulps = u;
            if (!tk_close(c->dt, got, w))
                tk_mismatch(tl, "%s after update %" PRIu64 ": %s[%zu] = %a (%.17g), want %a (%.17g), %" PRIu64 " ulp",
                            c->name, chk->t, want->name, want->vals[i].idx, got, got, w, w, u);
        }
    }
}

/* ------------------------------------------------------------ the runner */

static void test_case(void **state)
{
    const tk_case *c = *state;
    const optim_info *info = optim_find(c->kind_name);
    assert_non_null(info);
    optim_kind kind = info->kind;
    size_t es = optim_dtype_size(c->dt);
    bool large = c->n > LARGE_N;
    uint64_t last = tk_valgrind && large && c->steps > VALGRIND_STEPS ? VALGRIND_STEPS : c->steps;

    optim_hparams hp;
    optim_hparams_default(kind, &hp);
    assert_int_equal(hp.kind, kind);
    size_t si = 0;
    for (; si < c->n_sets && c->sets[si].t == 0; si++)
        tk_apply_set(c, &c->sets[si], &hp);

    void *params = malloc(c->n * es);
    void *grad = malloc(c->n * es);
    void *grad_copy = malloc(c->n * es);
    assert_true(params && grad && grad_copy);
    tgen_fill(c->dt, params, c->n, c->seed, 0, c->pscale);

    optim_state st;
    memset(&st, 0, sizeof st);
    bool have_state = false;
    tk_tally tl = {0, 0};
    size_t ci = 0, checked = 0;

    for (uint64_t t = 1; t <= last; t++) {
        for (; si < c->n_sets && c->sets[si].t == t; si++)
            tk_apply_set(c, &c->sets[si], &hp);
        assert_int_equal(optim_hparams_validate(&hp, &(optim_error){{0}, {0}}), OPTIM_OK);
        if (!have_state) {
            /* torch creates its state in the first step(), with that
             * step's hyperparameters. */
            optim_state_init(&hp, &st);
            for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
                st.buf[s] = NULL;
            have_state = true;
        }
        /* A slot turned on (first update, or a PATCH) is allocated and
         * initialised before the update; poison first so init must write
         * every element. */
        unsigned need = optim_buffers_needed(&hp);
        for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++) {
            if ((need & (1u << s)) && !st.buf[s]) {
                st.buf[s] = malloc(c->n * es);
                assert_non_null(st.buf[s]);
                memset(st.buf[s], 0xA5, c->n * es);
                optim_buffer_init(&hp, s, c->dt, st.buf[s], c->n);
            }
        }
        tgen_fill(c->dt, grad, c->n, c->seed, t, c->gscale);
        bool check_grad = !large || t <= 3;
        if (check_grad)
            memcpy(grad_copy, grad, c->n * es);
        optim_step(&hp, &st, c->dt, params, grad, c->n);
        if (check_grad && memcmp(grad_copy, grad, c->n * es) != 0)
            tk_mismatch(&tl, "%s: update %" PRIu64 " wrote to grad", c->name, t);
        while (ci < c->n_checks && c->checks[ci].t < t)
            ci++;
        if (ci < c->n_checks && c->checks[ci].t == t) {
            tk_compare_check(c, kind, &c->checks[ci], &st, params, &tl);
            checked++;
        }
    }
    if (tk_verbose)
        print_message("%-48s max %" PRIu64 " ulp over %zu checks%s\n", c->name, tl.max_ulps,
                      checked, last < c->steps ? " (valgrind: 3 updates)" : "");
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        free(st.buf[s]);
    free(params);
    free(grad);
    free(grad_copy);
    if (checked == 0)
        fail_msg("%s: no check at or before update %" PRIu64, c->name, last);
    if (tl.failures)
        fail_msg("%s: %u mismatches (max %" PRIu64 " ulp)", c->name, tl.failures, tl.max_ulps);
}

/* The fixtures are there, parse, and cover every optimizer at every size
 * in both dtypes with 100+ updates. */
static void test_fixtures_load(void **state)
{
    (void)state;
    if (tk_load_error[0])
        fail_msg("%s", tk_load_error);
    static const size_t sizes[] = {1, 7, 37, 1000003};
    for (size_t k = 0; k < N_KINDS; k++) {
        unsigned seen[4][2] = {{0}};
        size_t count = 0;
        for (size_t i = 0; i < tk_n_cases; i++) {
            const tk_case *c = &tk_cases[i];
            if (strcmp(c->kind_name, tk_kind_names[k]) != 0)
                continue;
            count++;
            assert_true(c->steps >= 100);
            assert_true(c->n_checks >= 2);
            assert_int_equal(c->checks[c->n_checks - 1].t, c->steps);
            if (c->n > LARGE_N) {
                bool has3 = false;
                for (size_t j = 0; j < c->n_checks; j++)
                    has3 |= c->checks[j].t == VALGRIND_STEPS;
                assert_true(has3);
            }
            for (size_t s = 0; s < 4; s++)
                if (c->n == sizes[s])
                    seen[s][c->dt == OPTIM_F64]++;
        }
        if (count < 10)
            fail_msg("%s: only %zu reference cases", tk_kind_names[k], count);
        for (size_t s = 0; s < 4; s++)
            if (!seen[s][0] || !seen[s][1])
                fail_msg("%s: no case of size %zu in both dtypes", tk_kind_names[k], sizes[s]);
    }
}

/* ------------------------------------------- plan / run / commit split */

/* A configuration per optimizer with its optional slots in use. */
static void tk_rich_hparams(optim_kind kind, optim_hparams *hp)
{
    optim_hparams_default(kind, hp);
    hp->lr = kind == OPTIM_ADADELTA ? 1.0 : 0.01;
    switch (kind) {
    case OPTIM_SGD:
        hp->momentum = 0.9;
        hp->nesterov = true;
        hp->weight_decay = 1e-3;
        break;
    case OPTIM_RMSPROP:
        hp->momentum = 0.5;
        hp->centered = true;
        break;
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
        hp->amsgrad = true;
        hp->weight_decay = 0.01;
        break;
    case OPTIM_ASGD:
        hp->t0 = 1.0; /* averaging from update 3 on */
        hp->weight_decay = 1e-3;
        break;
    case OPTIM_LION:
        hp->weight_decay = 0.1;
        break;
    case OPTIM_RPROP:
        break;
    default:
        hp->weight_decay = 1e-3;
        break;
    }
    if (kind != OPTIM_NADAM && kind != OPTIM_RADAM && kind != OPTIM_LION)
        hp->maximize = true;
}

typedef struct {
    optim_state st;
    void *params;
} tk_run;

static void tk_run_alloc(tk_run *r, const optim_hparams *hp, optim_dtype dt, size_t n)
{
    size_t es = optim_dtype_size(dt);
    optim_state_init(hp, &r->st);
    unsigned need = optim_buffers_needed(hp);
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++) {
        r->st.buf[s] = NULL;
        if (need & (1u << s)) {
            r->st.buf[s] = malloc(n * es);
            assert_non_null(r->st.buf[s]);
            optim_buffer_init(hp, s, dt, r->st.buf[s], n);
        }
    }
    r->params = malloc(n * es);
    assert_non_null(r->params);
    tgen_fill(dt, r->params, n, 77, 0, 1.0);
}

static void tk_run_free(tk_run *r)
{
    for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++)
        free(r->st.buf[s]);
    free(r->params);
}

static void test_plan_split_matches_step(void **state)
{
    (void)state;
    enum { N = 1003, STEPS = 12 };
    /* Deliberately odd boundaries, run out of order, one empty range. */
    static const size_t ranges[][2] = {{700, N}, {0, 1}, {5, 5}, {1, 17}, {17, 700}};
    for (unsigned k = 0; k < OPTIM_KIND_COUNT; k++) {
        for (int d = 0; d < 2; d++) {
            optim_dtype dt = d ? OPTIM_F64 : OPTIM_F32;
            size_t es = optim_dtype_size(dt);
            optim_hparams hp;
            tk_rich_hparams((optim_kind)k, &hp);
            assert_int_equal(optim_hparams_validate(&hp, &(optim_error){{0}, {0}}), OPTIM_OK);
            tk_run whole, split;
            tk_run_alloc(&whole, &hp, dt, N);
            tk_run_alloc(&split, &hp, dt, N);
            void *grad = malloc(N * es), *grad_copy = malloc(N * es);
            assert_true(grad && grad_copy);
            for (uint64_t t = 1; t <= STEPS; t++) {
                hp.lr = 0.01 * (double)(t % 4 + 1); /* a schedule */
                if (k == OPTIM_ADADELTA)
                    hp.lr *= 100;
                tgen_fill(dt, grad, N, 78, t, 0.5);
                memcpy(grad_copy, grad, N * es);
                optim_step(&hp, &whole.st, dt, whole.params, grad, N);
                optim_plan plan;
                optim_plan_make(&hp, &split.st, &plan);
                assert_int_equal(plan.t, t);
                for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++)
                    optim_plan_run(&plan, &split.st, dt, split.params, grad, ranges[r][0],
                                   ranges[r][1]);
                optim_plan_commit(&plan, &split.st);
                assert_memory_equal(grad, grad_copy, N * es);
                assert_int_equal(split.st.step, t);
                assert_int_equal(whole.st.step, t);
            }
            assert_memory_equal(whole.params, split.params, N * es);
            for (unsigned s = 0; s < OPTIM_MAX_BUFFERS; s++) {
                assert_true((whole.st.buf[s] == NULL) == (split.st.buf[s] == NULL));
                if (whole.st.buf[s])
                    assert_memory_equal(whole.st.buf[s], split.st.buf[s], N * es);
            }
            assert_memory_equal(whole.st.scalars, split.st.scalars, sizeof whole.st.scalars);
            /* And the update did something. */
            void *fresh = malloc(N * es);
            assert_non_null(fresh);
            tgen_fill(dt, fresh, N, 77, 0, 1.0);
            assert_memory_not_equal(fresh, whole.params, N * es);
            free(fresh);
            free(grad);
            free(grad_copy);
            tk_run_free(&whole);
            tk_run_free(&split);
        }
    }
}

/* ----------------------------------------------- slots, scalars, init */

/* optd's slot order and names, from the numerical contract. */
static const char *const tk_slots[OPTIM_KIND_COUNT][OPTIM_MAX_BUFFERS + 1] = {
    [OPTIM_SGD] = {"momentum_buffer", NULL},
    [OPTIM_ADAGRAD] = {"sum", NULL},
    [OPTIM_RMSPROP] = {"square_avg", "momentum_buffer", "grad_avg", NULL},
    [OPTIM_ADAM] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", NULL},
    [OPTIM_ADAMW] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", NULL},
    [OPTIM_ADAMAX] = {"exp_avg", "exp_inf", NULL},
    [OPTIM_ADADELTA] = {"square_avg", "acc_delta", NULL},
    [OPTIM_NADAM] = {"exp_avg", "exp_avg_sq", NULL},
    [OPTIM_RADAM] = {"exp_avg", "exp_avg_sq", NULL},
    [OPTIM_ASGD] = {"ax", NULL},
    [OPTIM_RPROP] = {"prev", "step_size", NULL},
    [OPTIM_LION] = {"exp_avg", NULL},
};

static const char *const tk_scalar_names[OPTIM_KIND_COUNT][OPTIM_MAX_SCALARS + 1] = {
    [OPTIM_SGD] = {"momentum_buffer_initialized", NULL},
    [OPTIM_NADAM] = {"mu_product", NULL},
    [OPTIM_ASGD] = {"eta", "mu", NULL},
};

static void test_slot_and_scalar_names(void **state)
{
    (void)state;
    for (unsigned k = 0; k < OPTIM_KIND_COUNT; k++) {
        unsigned s = 0;
        for (; tk_slots[k][s]; s++) {
            const char *nm = optim_buffer_name((optim_kind)k, s);
            assert_non_null(nm);
            assert_string_equal(nm, tk_slots[k][s]);
        }
        assert_null(optim_buffer_name((optim_kind)k, s));
        assert_null(optim_buffer_name((optim_kind)k, OPTIM_MAX_BUFFERS));
        for (s = 0; tk_scalar_names[k][s]; s++) {
            const char *nm = optim_scalar_name((optim_kind)k, s);
            assert_non_null(nm);
            assert_string_equal(nm, tk_scalar_names[k][s]);
        }
        assert_null(optim_scalar_name((optim_kind)k, s));
    }
}

/* Bit of the slot named name for kind (asserts it exists). */
static unsigned tk_bit(optim_kind kind, const char *name)
{
    for (unsigned s = 0; tk_slots[kind][s]; s++)
        if (strcmp(tk_slots[kind][s], name) == 0)
            return 1u << s;
    fail_msg("no slot %s", name);
    return 0;
}

static void test_buffers_needed(void **state)
{
    (void)state;
    optim_hparams hp;
    optim_hparams_default(OPTIM_SGD, &hp);
    hp.lr = 0.1;
    assert_int_equal(optim_buffers_needed(&hp), 0);
    hp.bias_correction = true; /* ignored without momentum */
    assert_int_equal(optim_buffers_needed(&hp), 0);
    hp.momentum = 0.9;
    assert_int_equal(optim_buffers_needed(&hp), tk_bit(OPTIM_SGD, "momentum_buffer"));

    optim_hparams_default(OPTIM_RMSPROP, &hp);
    unsigned sq = tk_bit(OPTIM_RMSPROP, "square_avg");
    unsigned mb = tk_bit(OPTIM_RMSPROP, "momentum_buffer");
    unsigned ga = tk_bit(OPTIM_RMSPROP, "grad_avg");
    assert_int_equal(optim_buffers_needed(&hp), sq);
    hp.momentum = 0.5;
    assert_int_equal(optim_buffers_needed(&hp), sq | mb);
    hp.centered = true;
    assert_int_equal(optim_buffers_needed(&hp), sq | mb | ga);
    hp.momentum = 0;
    assert_int_equal(optim_buffers_needed(&hp), sq | ga);

    for (int k = OPTIM_ADAM; k <= OPTIM_ADAMW; k++) {
        optim_hparams_default((optim_kind)k, &hp);
        unsigned base = tk_bit((optim_kind)k, "exp_avg") | tk_bit((optim_kind)k, "exp_avg_sq");
        assert_int_equal(optim_buffers_needed(&hp), base);
        hp.amsgrad = true;
        assert_int_equal(optim_buffers_needed(&hp), base | tk_bit((optim_kind)k, "max_exp_avg_sq"));
    }
    /* The rest always use all their slots. */
    static const optim_kind all[] = {OPTIM_ADAGRAD, OPTIM_ADAMAX, OPTIM_ADADELTA, OPTIM_NADAM,
                                     OPTIM_RADAM, OPTIM_ASGD, OPTIM_RPROP, OPTIM_LION};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        optim_hparams_default(all[i], &hp);
        unsigned want = 0;
        for (unsigned s = 0; tk_slots[all[i]][s]; s++)
            want |= 1u << s;
        assert_int_equal(optim_buffers_needed(&hp), want);
    }
}

/* Initial value of a slot by torch: adagrad's sum = initial_accumulator_value,
 * rprop's step_size = lr, everything else zeros. */
static double tk_initial(const optim_hparams *hp, const char *name)
{
    if (hp->kind == OPTIM_ADAGRAD && strcmp(name, "sum") == 0)
        return hp->initial_accumulator_value;
    if (hp->kind == OPTIM_RPROP && strcmp(name, "step_size") == 0)
        return hp->lr;
    return 0.0;
}

static void test_buffer_init(void **state)
{
    (void)state;
    enum { N = 41 };
    for (unsigned k = 0; k < OPTIM_KIND_COUNT; k++) {
        for (int d = 0; d < 2; d++) {
            optim_dtype dt = d ? OPTIM_F64 : OPTIM_F32;
            size_t es = optim_dtype_size(dt);
            optim_hparams hp;
            tk_rich_hparams((optim_kind)k, &hp);
            /* Values that do not round trivially to float. */
            hp.lr = 0.1;
            if (k == OPTIM_ADAGRAD)
                hp.initial_accumulator_value = 0.3;
            unsigned need = optim_buffers_needed(&hp);
            for (unsigned s = 0; tk_slots[k][s]; s++) {
                assert_true(need & (1u << s)); /* the rich config uses every slot */
                unsigned char buf[N * 8];
                memset(buf, 0xA5, sizeof buf);
                optim_buffer_init(&hp, s, dt, buf, N);
                double want = tk_initial(&hp, tk_slots[k][s]);
                if (dt == OPTIM_F32)
                    want = (double)(float)want;
                for (size_t i = 0; i < N; i++) {
                    double got = tk_get(dt, buf, i);
                    if (got != want)
                        fail_msg("%s %s %s[%zu] = %a, want %a", tk_kind_names[k],
                                 optim_dtype_name(dt), tk_slots[k][s], i, got, want);
                }
                /* Nothing past n. */
                for (size_t b = N * es; b < sizeof buf; b++)
                    assert_int_equal(buf[b], 0xA5);
            }
        }
    }
}

static void test_state_init(void **state)
{
    (void)state;
    for (unsigned k = 0; k < OPTIM_KIND_COUNT; k++) {
        optim_hparams hp;
        tk_rich_hparams((optim_kind)k, &hp);
        hp.lr = 0.01;
        optim_state st;
        memset(&st, 0x5A, sizeof st);
        optim_state_init(&hp, &st);
        assert_int_equal(st.step, 0);
        for (unsigned i = 0; tk_scalar_names[k][i]; i++) {
            const char *nm = tk_scalar_names[k][i];
            double want = 1.0; /* mu_product, mu */
            if (strcmp(nm, "momentum_buffer_initialized") == 0)
                want = 0.0;
            else if (strcmp(nm, "eta") == 0)
                /* torch: state['eta'] = torch.tensor(lr), a float32 tensor */
                want = (double)(float)hp.lr;
            if (st.scalars[i] != want)
                fail_msg("%s: initial %s = %a, want %a", tk_kind_names[k], nm, st.scalars[i], want);
        }
    }
}

/* ------------------------------------------------------------ main */

int main(void)
{
    const char *v = getenv("OPTD_VERBOSE");
    tk_verbose = v && strcmp(v, "0") != 0 && v[0];
    v = getenv("OPTD_VALGRIND");
    tk_valgrind = v && strcmp(v, "1") == 0;
    v = getenv("OPTD_EXACT");
    tk_exact = v && strcmp(v, "1") == 0;
    tk_load_all();

    static const struct CMUnitTest fixed[] = {
        cmocka_unit_test(test_fixtures_load),
        cmocka_unit_test(test_slot_and_scalar_names),
        cmocka_unit_test(test_buffers_needed),
        cmocka_unit_test(test_buffer_init),
        cmocka_unit_test(test_state_init),
        cmocka_unit_test(test_plan_split_matches_step),
    };
    size_t n_fixed = sizeof fixed / sizeof fixed[0];
    size_t n = n_fixed + tk_n_cases;
    struct CMUnitTest *tests = calloc(n, sizeof *tests);
    if (!tests)
        return 1;
    memcpy(tests, fixed, sizeof fixed);
    for (size_t i = 0; i < tk_n_cases; i++) {
        tests[n_fixed + i].name = tk_cases[i].name;
        tests[n_fixed + i].test_func = test_case;
        tests[n_fixed + i].initial_state = &tk_cases[i];
    }
    int rc = _cmocka_run_group_tests("optim_kernels", tests, n, NULL, NULL);
    free(tests);
    for (size_t i = 0; i < tk_n_cases; i++) {
        for (size_t j = 0; j < tk_cases[i].n_checks; j++)
            for (size_t k = 0; k < tk_cases[i].checks[j].n_vecs; k++)
                free(tk_cases[i].checks[j].vecs[k].vals);
        free(tk_cases[i].checks);
        free(tk_cases[i].sets);
    }
    free(tk_cases);
    return rc;
}
