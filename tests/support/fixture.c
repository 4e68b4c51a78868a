/*
 * fixture.c -- reads one case of tests/fixtures/optim/ (see fixture.h and
 * the format in tests/ref/gen_optim.py's docstring).
 */
#include "tests/support/fixture.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/support/gen.h"

static int add_hp(tfix_case *c, char *rest)
{
    /* rest: "<field> <v1> [<v2>]  # comment" */
    char *hash = strchr(rest, '#');
    if (hash)
        *hash = '\0';
    char *field = strtok(rest, " \t\n");
    char *v1 = strtok(NULL, " \t\n");
    char *v2 = strtok(NULL, " \t\n");
    if (!field || !v1)
        return -1;
    char val[128];
    if (v2)
        snprintf(val, sizeof val, "[%.17g,%.17g]", strtod(v1, NULL), strtod(v2, NULL));
    else if (strcmp(field, "momentum_form") == 0)
        snprintf(val, sizeof val, "\"%s\"", v1);
    else if (strcmp(v1, "0") == 0 || strcmp(v1, "1") == 0)
        snprintf(val, sizeof val, "%s", v1[0] == '1' ? "true" : "false");
    else
        snprintf(val, sizeof val, "%.17g", strtod(v1, NULL));
    size_t len = strlen(c->optimizer);
    int w = snprintf(c->optimizer + len, sizeof c->optimizer - len, ",\"%s\":%s", field, val);
    return w < 0 || (size_t)w >= sizeof c->optimizer - len ? -1 : 0;
}

int tfix_load(const char *name, tfix_case *c)
{
    memset(c, 0, sizeof *c);
    char kind[16], path[256];
    size_t k = strcspn(name, "_");
    if (k == 0 || k >= sizeof kind)
        return -1;
    memcpy(kind, name, k);
    kind[k] = '\0';
    snprintf(path, sizeof path, "tests/fixtures/optim/%s.txt", kind);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "tfix: cannot open %s (run from the repository root)\n", path);
        return -1;
    }
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->kind, sizeof c->kind, "%s", kind);
    snprintf(c->optimizer, sizeof c->optimizer, "{\"type\":\"%s\"", kind);
    char line[512];
    bool in = false, found = false, in_params = false, bad = false;
    tfix_check *chk = NULL;
    size_t cap = 0;
    while (fgets(line, sizeof line, f)) {
        if (!in) {
            char cname[128];
            if (sscanf(line, "case %127s", cname) == 1 && strcmp(cname, name) == 0)
                in = found = true;
            continue;
        }
        if (strncmp(line, "end", 3) == 0)
            break;
        char word[32];
        if (sscanf(line, "%31s", word) != 1 || word[0] == '#')
            continue;
        if (strcmp(word, "dtype") == 0) {
            c->dtype = strstr(line, "float64") ? OPTIM_F64 : OPTIM_F32;
        } else if (strcmp(word, "n") == 0) {
            c->n = (size_t)strtoull(line + 2, NULL, 10);
        } else if (strcmp(word, "steps") == 0) {
            c->steps = atoi(line + 6);
        } else if (strcmp(word, "seed") == 0) {
            c->seed = strtoull(line + 5, NULL, 10);
        } else if (strcmp(word, "pscale") == 0) {
            c->pscale = strtod(line + 7, NULL);
        } else if (strcmp(word, "gscale") == 0) {
            c->gscale = strtod(line + 7, NULL);
        } else if (strcmp(word, "hp") == 0) {
            bad |= add_hp(c, line + 3) != 0;
        } else if (strcmp(word, "set") == 0) {
            fprintf(stderr, "tfix: case %s changes hyperparameters mid-run\n", name);
            bad = true;
        } else if (strcmp(word, "check") == 0) {
            if (c->n_checks == (int)(sizeof c->checks / sizeof c->checks[0])) {
                bad = true;
                break;
            }
            chk = &c->checks[c->n_checks++];
            chk->t = atoi(line + 6);
            cap = 0;
            in_params = false;
        } else if (strcmp(word, "vec") == 0) {
            in_params = chk && strstr(line, "params") != NULL;
        } else if (strcmp(word, "step") == 0 || strcmp(word, "scalar") == 0) {
            in_params = false;
        } else if (in_params && (word[0] >= '0' && word[0] <= '9')) {
            if (chk->count == cap) {
                cap = cap ? cap * 2 : 64;
                size_t *ni = realloc(chk->index, cap * sizeof *ni);
                double *nv = ni ? realloc(chk->value, cap * sizeof *nv) : NULL;
                if (ni)
                    chk->index = ni;
                if (!nv) {
                    bad = true;
                    break;
                }
                chk->value = nv;
            }
            char *end;
            chk->index[chk->count] = (size_t)strtoull(line, &end, 10);
            chk->value[chk->count] = strtod(end, NULL);
            chk->count++;
        }
    }
    fclose(f);
    size_t len = strlen(c->optimizer);
    if (len + 2 > sizeof c->optimizer)
        bad = true;
    else
        strcat(c->optimizer, "}");
    if (!found || bad || c->n == 0 || c->n_checks == 0) {
        fprintf(stderr, "tfix: case %s of %s: %s\n", name, path,
                found ? "unusable" : "not found");
        tfix_free(c);
        return -1;
    }
    return 0;
}

void tfix_free(tfix_case *c)
{
    for (int i = 0; i < c->n_checks; i++) {
        free(c->checks[i].index);
        free(c->checks[i].value);
    }
    c->n_checks = 0;
}

void tfix_params(const tfix_case *c, void *out, size_t n)
{
    tgen_fill(c->dtype, out, n, c->seed, 0, c->pscale);
}

void tfix_grad(const tfix_case *c, int t, void *out, size_t n)
{
    tgen_fill(c->dtype, out, n, c->seed, (uint64_t)t, c->gscale);
}

const tfix_check *tfix_check_at(const tfix_case *c, int t)
{
    for (int i = 0; i < c->n_checks; i++)
        if (c->checks[i].t == t)
            return &c->checks[i];
    return NULL;
}

int tfix_compare(const tfix_case *c, int t, const void *got, size_t n, char *why,
                 size_t why_len)
{
    const tfix_check *chk = tfix_check_at(c, t);
    if (!chk) {
        snprintf(why, why_len, "%s has no check after update %d", c->name, t);
        return -1;
    }
    size_t compared = 0;
    for (size_t k = 0; k < chk->count && chk->index[k] < n; k++) {
        size_t i = chk->index[k];
        double g = c->dtype == OPTIM_F64 ? ((const double *)got)[i]
                                         : (double)((const float *)got)[i];
        double w = chk->value[k];
        if (memcmp(&g, &w, sizeof g) != 0) {
            snprintf(why, why_len, "%s: param %zu after update %d is %.17g, torch's rule says %.17g",
                     c->name, i, t, g, w);
            return -1;
        }
        compared++;
    }
    if (compared == 0) {
        snprintf(why, why_len, "%s: no sampled index below %zu", c->name, n);
        return -1;
    }
    return 0;
}

char *tfix_params_json(const tfix_case *c, size_t n)
{
    size_t es = c->dtype == OPTIM_F64 ? 8 : 4;
    void *p = malloc(n * es);
    char *s = malloc(n * 26 + 3);
    if (!p || !s) {
        free(p);
        free(s);
        return NULL;
    }
    tfix_params(c, p, n);
    size_t len = 0;
    s[len++] = '[';
    for (size_t i = 0; i < n; i++) {
        if (c->dtype == OPTIM_F64)
            len += (size_t)sprintf(s + len, "%s%.17g", i ? "," : "", ((double *)p)[i]);
        else
            len += (size_t)sprintf(s + len, "%s%.9g", i ? "," : "", (double)((float *)p)[i]);
    }
    s[len++] = ']';
    s[len] = '\0';
    free(p);
    return s;
}
