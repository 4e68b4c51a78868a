/*
 * fixture.h -- the optimizer reference vectors of tests/fixtures/optim/
 * (written by tests/ref/gen_optim.py from torch.optim's rules, never by
 * optd's kernels), for tests that check the daemon's answers rather than
 * the kernels: a session is created from a case's hyperparameters and
 * inputs, stepped with its gradients, and its params compared, bit for
 * bit, with the case's checks.
 *
 * Every rule is elementwise and the inputs are index-addressable
 * (tests/support/gen.h), so a session of any size n can follow a case:
 * element i only depends on (seed, stream, i); the checks cover the
 * case's sampled indices below n.  Cases with "set" lines (schedules,
 * PATCH) are refused.
 */
#ifndef TFIX_H
#define TFIX_H

#include <stddef.h>
#include <stdint.h>

#include "optim/optim.h"

typedef struct {
    int t;          /* the update after which the params are checked */
    size_t count;
    size_t *index;  /* sampled indices, ascending */
    double *value;  /* params[index[k]] after update t (exact) */
} tfix_check;

typedef struct {
    char name[96];
    char kind[16];
    optim_dtype dtype;
    size_t n;                /* the case's own size */
    int steps;
    uint64_t seed;
    double pscale, gscale;
    char optimizer[512];     /* {"type":KIND, every hp of the case} (JSON) */
    int n_checks;
    tfix_check checks[8];
} tfix_case;

/* Loads case `name` of tests/fixtures/optim/KIND.txt (KIND: name up to the
 * first '_').  0, or -1 after printing why. */
int tfix_load(const char *name, tfix_case *c);
void tfix_free(tfix_case *c);

/* The initial params / the gradient of update t (1-based) for a session of
 * n elements, in the case's dtype. */
void tfix_params(const tfix_case *c, void *out, size_t n);
void tfix_grad(const tfix_case *c, int t, void *out, size_t n);

/* The check after update t, or NULL. */
const tfix_check *tfix_check_at(const tfix_case *c, int t);

/* Compares params got (n elements, the case's dtype) after update t with
 * the check at t at its indices below n.  0 when all are bit-equal (and at
 * least one was compared); else -1 with the first difference in why. */
int tfix_compare(const tfix_case *c, int t, const void *got, size_t n, char *why,
                 size_t why_len);

/* "%.9g" / "%.17g" JSON array of n params of the case (a new string;
 * caller frees). */
char *tfix_params_json(const tfix_case *c, size_t n);

#endif /* TFIX_H */
