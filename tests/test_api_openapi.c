/*
 * test_api_openapi.c -- api/openapi.yaml is the contract: this suite holds
 * the route table and the real daemon to it.
 *
 *   - the spec's (method, path) pairs equal api_routes[] both ways, with
 *     the same auth needs and body media types;
 *   - every documented operation, driven against a real daemon with valid
 *     and invalid requests, answers a status the spec documents for it,
 *     with a documented media type, a body valid against the documented
 *     JSON schema, every required header and no undocumented Optd-*
 *     header; errors are problem+json with the Problem schema's members;
 *   - every Optd-* header the spec names for the step operation shows up
 *     in real step answers, and its header parameters are the ones the
 *     daemon reads;
 *   - GET /v1/optimizers (the authoritative catalogue) agrees with the
 *     spec's per-type hyperparameter schemas;
 *   - every problem type URN the daemon can emit is in the spec and has a
 *     section in docs/errors.md.
 *
 * The spec is read with a small reader for the YAML subset the spec's
 * header comment allows (block style, 2-space indents, flow lists of
 * scalars), and bodies are checked with a JSON Schema subset validator
 * that refuses keywords it does not know, so the spec cannot lean on a
 * rule this suite would silently skip.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ctype.h>
#include <libgen.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api/api.h"
#include "clients/c/optd_client.h"
#include "tests/support/apitest.h"
#include "tests/support/daemon.h"

#define SPEC_PATH "api/openapi.yaml"
#define ERRORS_DOC "docs/errors.md"
#define API_KEY "openapi-test-key"
#define MAX_PARAMS_ARG "100000"
#define MAX_BODY_MB 1

/* ================================================== YAML subset reader */

typedef enum { Y_NULL, Y_SCALAR, Y_MAP, Y_SEQ } ykind;

typedef struct ynode {
    ykind kind;
    char *key;           /* member name when in a map                   */
    char *val;           /* scalar text (unquoted)                      */
    bool quoted;         /* the scalar was quoted: always a string      */
    int line;
    struct ynode *child; /* members / items                             */
    struct ynode *next;
} ynode;

typedef struct {
    int indent;          /* -1: blank or comment                        */
    char *text;          /* after the indentation, right-trimmed        */
    int line;
} yline;

typedef struct {
    yline *l;
    size_t n, i;
    char err[256];
} yreader;

static ynode *ynew(ykind k, int line)
{
    ynode *n = calloc(1, sizeof *n);
    assert_non_null(n);
    n->kind = k;
    n->line = line;
    return n;
}

static void yfree(ynode *n)
{
    while (n) {
        ynode *next = n->next;
        yfree(n->child);
        free(n->key);
        free(n->val);
        free(n);
        n = next;
    }
}

static char *dupn(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    assert_non_null(d);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static void yappend(ynode *parent, ynode *c)
{
    ynode **pp = &parent->child;
    while (*pp)
        pp = &(*pp)->next;
    *pp = c;
}

static bool yfail(yreader *r, int line, const char *what)
{
    if (!r->err[0])
        snprintf(r->err, sizeof r->err, "%s:%d: %s", SPEC_PATH, line, what);
    return false;
}

/* Length of a quoted scalar at s (quote included at both ends), or 0 when
 * it does not close. */
static size_t quoted_len(const char *s)
{
    char q = s[0];
    for (size_t i = 1; s[i]; i++) {
        if (q == '\'' && s[i] == '\'') {
            if (s[i + 1] == '\'') {
                i++;
                continue;
            }
            return i + 1;
        }
        if (q == '"' && s[i] == '\\' && s[i + 1]) {
            i++;
            continue;
        }
        if (q == '"' && s[i] == '"')
            return i + 1;
    }
    return 0;
}

/* The text of a quoted scalar of n bytes (quotes included). */
static char *unquote(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    assert_non_null(d);
    size_t k = 0;
    for (size_t i = 1; i + 1 < n; i++) {
        if (s[0] == '\'' && s[i] == '\'' && s[i + 1] == '\'') {
            d[k++] = '\'';
            i++;
        } else if (s[0] == '"' && s[i] == '\\') {
            i++;
            d[k++] = s[i] == 'n' ? '\n' : s[i] == 't' ? '\t' : s[i];
        } else {
            d[k++] = s[i];
        }
    }
    d[k] = '\0';
    return d;
}

/* A scalar value: quoted, or plain up to a " #" comment. */
static bool yscalar(yreader *r, int line, const char *s, ynode *out)
{
    out->kind = Y_SCALAR;
    if (*s == '\'' || *s == '"') {
        size_t n = quoted_len(s);
        if (!n)
            return yfail(r, line, "unterminated quoted scalar");
        const char *rest = s + n;
        while (*rest == ' ')
            rest++;
        if (*rest && *rest != '#')
            return yfail(r, line, "text after a quoted scalar");
        out->val = unquote(s, n);
        out->quoted = true;
        return true;
    }
    if (strchr("&*!%@`{|>", *s))
        return yfail(r, line, "unsupported YAML (anchor, alias, tag, flow map or indicator)");
    const char *c = strstr(s, " #");
    size_t n = c ? (size_t)(c - s) : strlen(s);
    while (n && s[n - 1] == ' ')
        n--;
    bool colon_space = false;
    for (size_t i = 0; i + 1 < n; i++)
        colon_space |= s[i] == ':' && s[i + 1] == ' ';
    if (colon_space || (n && s[n - 1] == ':'))
        return yfail(r, line, "\": \" in a plain scalar (quote it)");
    out->val = dupn(s, n);
    return true;
}

/* Splits "key: rest" / "key:"; false when the text is not a member. */
static bool split_key(const char *t, char **key, const char **rest)
{
    const char *after;
    if (*t == '\'' || *t == '"') {
        size_t n = quoted_len(t);
        if (!n || t[n] != ':' || (t[n + 1] && t[n + 1] != ' '))
            return false;
        *key = unquote(t, n);
        after = t + n + 1;
    } else {
        if (*t == '-' || *t == '[' || *t == '{' || *t == '#')
            return false;
        const char *c = t;
        for (;;) {
            c = strchr(c, ':');
            if (!c)
                return false;
            if (c[1] == ' ' || c[1] == '\0')
                break;
            c++;
        }
        *key = dupn(t, (size_t)(c - t));
        after = c + 1;
    }
    while (*after == ' ')
        after++;
    *rest = after;
    return true;
}

static const yline *ypeek(yreader *r)
{
    while (r->i < r->n && r->l[r->i].indent < 0)
        r->i++;
    return r->i < r->n ? &r->l[r->i] : NULL;
}

static ynode *yblock(yreader *r, int indent);

/* The value after "key:" on line `line` (already consumed), whose own
 * block would be indented deeper than `indent`. */
static ynode *yvalue(yreader *r, int indent, const char *rest, int line)
{
    ynode *v = ynew(Y_NULL, line);
    if (!*rest || *rest == '#') {
        const yline *nx = ypeek(r);
        if (nx && nx->indent > indent) {
            free(v);
            return yblock(r, nx->indent);
        }
        return v; /* an empty value is null */
    }
    if (*rest == '|' || *rest == '>') {
        /* A block scalar: every following line that is blank or deeper. */
        v->kind = Y_SCALAR;
        size_t cap = 64, len = 0;
        char *buf = malloc(cap);
        assert_non_null(buf);
        buf[0] = '\0';
        while (r->i < r->n && (r->l[r->i].indent < 0 || r->l[r->i].indent > indent)) {
            const char *t = r->l[r->i].indent < 0 ? "" : r->l[r->i].text;
            size_t tl = strlen(t);
            if (len + tl + 2 > cap) {
                while (len + tl + 2 > cap)
                    cap *= 2;
                buf = realloc(buf, cap);
                assert_non_null(buf);
            }
            memcpy(buf + len, t, tl);
            len += tl;
            buf[len++] = '\n';
            buf[len] = '\0';
            r->i++;
        }
        v->val = buf;
        return v;
    }
    if (*rest == '[') {
        v->kind = Y_SEQ;
        const char *p = rest + 1;
        for (;;) {
            while (*p == ' ')
                p++;
            if (*p == ']')
                break;
            if (!*p) {
                yfail(r, line, "unterminated flow list");
                return v;
            }
            ynode *it = ynew(Y_SCALAR, line);
            yappend(v, it);
            if (*p == '\'' || *p == '"') {
                size_t n = quoted_len(p);
                if (!n) {
                    yfail(r, line, "unterminated quoted scalar in a flow list");
                    return v;
                }
                it->val = unquote(p, n);
                it->quoted = true;
                p += n;
            } else {
                size_t n = strcspn(p, ",]");
                size_t m = n;
                while (m && p[m - 1] == ' ')
                    m--;
                if (!m || strchr("[{&*!", *p)) {
                    yfail(r, line, "only plain or quoted scalars in a flow list");
                    return v;
                }
                it->val = dupn(p, m);
                p += n;
            }
            while (*p == ' ')
                p++;
            if (*p == ',')
                p++;
            else if (*p != ']') {
                yfail(r, line, "expected , or ] in a flow list");
                return v;
            }
        }
        const char *tail = p + 1;
        while (*tail == ' ')
            tail++;
        if (*tail && *tail != '#')
            yfail(r, line, "text after a flow list");
        return v;
    }
    if (*rest == '{') {
        if (strncmp(rest, "{}", 2) != 0)
            yfail(r, line, "flow maps other than {} are outside the spec's subset");
        v->kind = Y_MAP;
        return v;
    }
    yscalar(r, line, rest, v);
    return v;
}

static ynode *ymap(yreader *r, int indent)
{
    const yline *first = ypeek(r);
    ynode *m = ynew(Y_MAP, first ? first->line : 0);
    const yline *l;
    while ((l = ypeek(r)) && l->indent >= indent && !r->err[0]) {
        if (l->indent > indent) {
            yfail(r, l->line, "unexpected indentation");
            break;
        }
        char *key;
        const char *rest;
        if (!split_key(l->text, &key, &rest)) {
            yfail(r, l->line, "expected \"key: value\"");
            break;
        }
        for (ynode *c = m->child; c; c = c->next)
            if (strcmp(c->key, key) == 0)
                yfail(r, l->line, "duplicate key");
        int line = l->line;
        r->i++;
        ynode *v = yvalue(r, indent, rest, line);
        v->key = key;
        yappend(m, v);
    }
    return m;
}

static ynode *yseq(yreader *r, int indent)
{
    const yline *first = ypeek(r);
    ynode *s = ynew(Y_SEQ, first ? first->line : 0);
    yline *l;
    while ((l = (yline *)ypeek(r)) && l->indent == indent && !r->err[0] && l->text[0] == '-') {
        if (l->text[1] && l->text[1] != ' ') {
            yfail(r, l->line, "expected \"- \"");
            break;
        }
        const char *rest = l->text[1] ? l->text + 2 : "";
        char *key;
        const char *krest;
        if (*rest && split_key(rest, &key, &krest)) {
            /* "- key: value" opens a map whose lines sit 2 deeper. */
            free(key);
            l->indent = indent + 2;
            l->text += 2;
            yappend(s, ymap(r, indent + 2));
            continue;
        }
        int line = l->line;
        r->i++;
        yappend(s, yvalue(r, indent, rest, line));
    }
    return s;
}

static ynode *yblock(yreader *r, int indent)
{
    const yline *l = ypeek(r);
    if (l && l->text[0] == '-' && (l->text[1] == ' ' || !l->text[1]))
        return yseq(r, indent);
    return ymap(r, indent);
}

/* Reads the file into a tree; fails the test with the reader's error. */
static ynode *yload(const char *path, char **text_out)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s (run from the repository root)", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)len + 1);
    assert_non_null(text);
    assert_int_equal(fread(text, 1, (size_t)len, f), (size_t)len);
    text[len] = '\0';

    yreader r = {0};
    size_t cap = 256;
    r.l = malloc(cap * sizeof *r.l);
    assert_non_null(r.l);
    int lineno = 0;
    for (char *p = text; *p;) {
        char *eol = strchr(p, '\n');
        if (eol)
            *eol = '\0';
        lineno++;
        if (strchr(p, '\t'))
            fail_msg("%s:%d: tab character (the layout is spaces only)", path, lineno);
        if (r.n == cap) {
            cap *= 2;
            r.l = realloc(r.l, cap * sizeof *r.l);
            assert_non_null(r.l);
        }
        int ind = 0;
        while (p[ind] == ' ')
            ind++;
        size_t tl = strlen(p);
        while (tl > (size_t)ind && (p[tl - 1] == ' ' || p[tl - 1] == '\r'))
            p[--tl] = '\0';
        bool blank = p[ind] == '\0' || p[ind] == '#';
        if (!blank && ind % 2 != 0)
            fail_msg("%s:%d: indentation of %d (the layout uses 2-space steps)", path, lineno,
                     ind);
        r.l[r.n++] = (yline){blank ? -1 : ind, p + ind, lineno};
        p = eol ? eol + 1 : p + tl;
    }
    ynode *root = yblock(&r, 0);
    if (!r.err[0] && ypeek(&r))
        yfail(&r, r.l[r.i].line, "text after the document");
    if (r.err[0])
        fail_msg("%s", r.err);
    free(r.l);
    /* The lines were cut in place; give the caller the file as it is. */
    fseek(f, 0, SEEK_SET);
    assert_int_equal(fread(text, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *text_out = text;
    return root;
}

static const ynode *yget(const ynode *m, const char *key)
{
    if (!m || m->kind != Y_MAP)
        return NULL;
    for (const ynode *c = m->child; c; c = c->next)
        if (strcmp(c->key, key) == 0)
            return c;
    return NULL;
}

static const char *ystr(const ynode *n)
{
    return n && n->kind == Y_SCALAR ? n->val : NULL;
}

static bool yis_true(const ynode *n)
{
    return n && n->kind == Y_SCALAR && !n->quoted && strcmp(n->val, "true") == 0;
}

/* ================================================================ spec */

static ynode *g_spec;
static char *g_spec_text;

/* "#/components/schemas/X" -> the node; NULL when it does not resolve. */
static const ynode *yref(const char *ref)
{
    if (strncmp(ref, "#/", 2) != 0)
        return NULL;
    const ynode *n = g_spec;
    char part[256];
    const char *p = ref + 2;
    while (*p && n) {
        size_t k = 0;
        while (*p && *p != '/' && k + 1 < sizeof part) {
            if (p[0] == '~' && p[1] == '1') {
                part[k++] = '/';
                p += 2;
            } else if (p[0] == '~' && p[1] == '0') {
                part[k++] = '~';
                p += 2;
            } else {
                part[k++] = *p++;
            }
        }
        part[k] = '\0';
        if (*p == '/')
            p++;
        n = yget(n, part);
    }
    return n;
}

/* Follows $ref until a node without one. */
static const ynode *yderef(const ynode *n)
{
    for (int hops = 0; n && hops < 16; hops++) {
        const char *ref = ystr(yget(n, "$ref"));
        if (!ref)
            return n;
        const ynode *t = yref(ref);
        if (!t)
            fail_msg("unresolved $ref %s (line %d)", ref, n->line);
        n = t;
    }
    fail_msg("$ref chain too long");
    return NULL;
}

static const char *const METHODS[] = {"get", "put", "post", "patch", "delete", "head",
                                      "options", "trace", NULL};

typedef struct {
    char method[8];          /* upper case */
    const char *path;        /* "/v1/sessions/{name}" */
    const ynode *item;       /* the path item */
    const ynode *op;
} spec_op;

#define MAX_OPS 64
static spec_op g_ops[MAX_OPS];
static size_t g_n_ops;

/* A repository file: relative to the working directory (the runner's is
 * the repository root), else beside $OPTD_BIN's build directory. */
static void repo_file(const char *rel, char *out, size_t n)
{
    snprintf(out, n, "%s", rel);
    FILE *f = fopen(out, "rb");
    if (f) {
        fclose(f);
        return;
    }
    const char *bin = getenv("OPTD_BIN"); /* ROOT/build/optd */
    if (bin) {
        char tmp[900];
        snprintf(tmp, sizeof tmp, "%s", bin);
        snprintf(out, n, "%s/../%s", dirname(tmp), rel);
    }
}

static void spec_load(void)
{
    if (g_spec)
        return;
    char path[1024];
    repo_file(SPEC_PATH, path, sizeof path);
    g_spec = yload(path, &g_spec_text);
    const ynode *paths = yget(g_spec, "paths");
    if (!paths || paths->kind != Y_MAP)
        fail_msg("%s has no paths: map", path);
    for (const ynode *p = paths->child; p; p = p->next) {
        if (p->key[0] != '/')
            fail_msg("paths: member \"%s\" is not a path", p->key);
        for (const ynode *m = p->child; m; m = m->next) {
            bool is_method = false;
            for (int k = 0; METHODS[k]; k++)
                is_method |= strcmp(m->key, METHODS[k]) == 0;
            if (!is_method)
                continue;
            assert_true(g_n_ops < MAX_OPS);
            spec_op *o = &g_ops[g_n_ops++];
            for (size_t k = 0; k <= strlen(m->key); k++)
                o->method[k] = (char)toupper((unsigned char)m->key[k]);
            o->path = p->key;
            o->item = p;
            o->op = m;
        }
    }
}

static const spec_op *spec_find(const char *method, const char *path)
{
    for (size_t i = 0; i < g_n_ops; i++)
        if (strcmp(g_ops[i].method, method) == 0 && strcmp(g_ops[i].path, path) == 0)
            return &g_ops[i];
    return NULL;
}

/* Does a concrete path (query stripped) fit a template's segments? */
static bool path_fits(const char *tmpl, const char *path)
{
    while (*tmpl && *path) {
        if (*tmpl == '{') {
            size_t n = strcspn(path, "/?");
            if (n == 0)
                return false;
            path += n;
            tmpl = strchr(tmpl, '}') + 1;
            continue;
        }
        if (*tmpl != *path)
            return false;
        tmpl++;
        path++;
    }
    return *tmpl == '\0' && (*path == '\0' || *path == '?');
}

static const spec_op *spec_match(const char *method, const char *path)
{
    for (size_t i = 0; i < g_n_ops; i++)
        if (strcmp(g_ops[i].method, method) == 0 && path_fits(g_ops[i].path, path))
            return &g_ops[i];
    return NULL;
}

/* The response object for a status, $refs followed; NULL when the status
 * is not documented for the operation. */
static const ynode *spec_response(const spec_op *o, int status)
{
    char code[8];
    snprintf(code, sizeof code, "%d", status);
    const ynode *r = yget(yget(o->op, "responses"), code);
    return r ? yderef(r) : NULL;
}

/* ==================================================== schema validator */

typedef struct {
    char msg[1024];
} verr;

static bool vfail(verr *e, const char *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool vfail(verr *e, const char *at, const char *fmt, ...)
{
    char tmp[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    snprintf(e->msg, sizeof e->msg, "%s: %s", at, tmp);
    return false;
}

/* A plain scalar that YAML reads as a number ("inf" is a string here). */
static bool num_of(const ynode *n, double *out)
{
    if (!n || n->kind != Y_SCALAR || n->quoted || !n->val[0] ||
        n->val[strspn(n->val, "0123456789+-.eE")] != '\0')
        return false;
    char *end;
    *out = strtod(n->val, &end);
    return end != n->val && *end == '\0';
}

/* Does a YAML scalar equal a JSON value (const / enum)? */
static bool scalar_equals(const ynode *s, const cJSON *v)
{
    if (!s || s->kind != Y_SCALAR)
        return false;
    double d;
    if (cJSON_IsString(v))
        return strcmp(s->val, v->valuestring) == 0 &&
               (s->quoted || !(num_of(s, &d) || !strcmp(s->val, "true") ||
                               !strcmp(s->val, "false") || !strcmp(s->val, "null")));
    if (cJSON_IsNumber(v))
        return num_of(s, &d) && d == v->valuedouble;
    if (cJSON_IsBool(v))
        return !s->quoted && strcmp(s->val, cJSON_IsTrue(v) ? "true" : "false") == 0;
    if (cJSON_IsNull(v))
        return !s->quoted && (strcmp(s->val, "null") == 0 || strcmp(s->val, "~") == 0);
    return false;
}

static bool type_is(const char *t, const cJSON *v)
{
    if (!strcmp(t, "object"))
        return cJSON_IsObject(v);
    if (!strcmp(t, "array"))
        return cJSON_IsArray(v);
    if (!strcmp(t, "string"))
        return cJSON_IsString(v);
    if (!strcmp(t, "number"))
        return cJSON_IsNumber(v);
    if (!strcmp(t, "integer"))
        return cJSON_IsNumber(v) && isfinite(v->valuedouble) &&
               v->valuedouble == floor(v->valuedouble);
    if (!strcmp(t, "boolean"))
        return cJSON_IsBool(v);
    if (!strcmp(t, "null"))
        return cJSON_IsNull(v);
    fail_msg("schema type \"%s\" is not a JSON Schema type", t);
    return false;
}

static bool regex_full(const char *pattern, const char *s)
{
    regex_t re;
    if (regcomp(&re, pattern, REG_EXTENDED | REG_NOSUB) != 0)
        fail_msg("pattern %s does not compile as a POSIX ERE", pattern);
    bool ok = regexec(&re, s, 0, NULL, 0) == 0;
    regfree(&re);
    return ok;
}

static bool validate(const ynode *schema, const cJSON *v, const char *at, verr *e);

static bool validate_kw(const ynode *kw, const ynode *schema, const cJSON *v, const char *at,
                        verr *e)
{
    const char *k = kw->key;
    char sub[512];
    double lim;
    if (!strcmp(k, "$ref")) {
        const ynode *t = yref(kw->val);
        if (!t)
            fail_msg("unresolved $ref %s", kw->val);
        return validate(t, v, at, e);
    }
    if (!strcmp(k, "type")) {
        if (kw->kind == Y_SCALAR)
            return type_is(kw->val, v) || vfail(e, at, "is not of type %s", kw->val);
        for (const ynode *t = kw->child; t; t = t->next)
            if (type_is(t->val, v))
                return true;
        return vfail(e, at, "is of none of the schema's types");
    }
    if (!strcmp(k, "const"))
        return scalar_equals(kw, v) || vfail(e, at, "is not the constant %s", kw->val);
    if (!strcmp(k, "enum")) {
        for (const ynode *t = kw->child; t; t = t->next)
            if (scalar_equals(t, v))
                return true;
        char *txt = cJSON_PrintUnformatted(v);
        vfail(e, at, "value %s is not in the enum (line %d)", txt ? txt : "?", kw->line);
        cJSON_free(txt);
        return false;
    }
    if (!strcmp(k, "required")) {
        if (!cJSON_IsObject(v))
            return true;
        for (const ynode *t = kw->child; t; t = t->next)
            if (!cJSON_GetObjectItemCaseSensitive(v, t->val))
                return vfail(e, at, "lacks the required member \"%s\"", t->val);
        return true;
    }
    if (!strcmp(k, "properties")) {
        if (!cJSON_IsObject(v))
            return true;
        const cJSON *m;
        cJSON_ArrayForEach(m, v)
        {
            const ynode *ps = yget(kw, m->string);
            snprintf(sub, sizeof sub, "%s.%s", at, m->string);
            if (ps && !validate(ps, m, sub, e))
                return false;
        }
        return true;
    }
    if (!strcmp(k, "additionalProperties")) {
        if (!cJSON_IsObject(v) || yis_true(kw))
            return true;
        const ynode *props = yget(schema, "properties");
        const cJSON *m;
        cJSON_ArrayForEach(m, v)
        {
            if (yget(props, m->string))
                continue;
            snprintf(sub, sizeof sub, "%s.%s", at, m->string);
            if (kw->kind == Y_SCALAR)
                return vfail(e, sub, "is not in the schema (additionalProperties: false, line %d)",
                             kw->line);
            if (!validate(kw, m, sub, e))
                return false;
        }
        return true;
    }
    if (!strcmp(k, "items")) {
        if (!cJSON_IsArray(v))
            return true;
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, v)
        {
            snprintf(sub, sizeof sub, "%s[%d]", at, i++);
            if (!validate(kw, it, sub, e))
                return false;
        }
        return true;
    }
    if (!strcmp(k, "minItems") || !strcmp(k, "maxItems")) {
        if (!cJSON_IsArray(v) || !num_of(kw, &lim))
            return true;
        int n = cJSON_GetArraySize(v);
        bool ok = k[1] == 'i' ? n >= lim : n <= lim;
        return ok || vfail(e, at, "has %d items (%s %g)", n, k, lim);
    }
    if (!strcmp(k, "minLength") || !strcmp(k, "maxLength")) {
        if (!cJSON_IsString(v) || !num_of(kw, &lim))
            return true;
        size_t n = strlen(v->valuestring);
        bool ok = k[1] == 'i' ? (double)n >= lim : (double)n <= lim;
        return ok || vfail(e, at, "has %zu characters (%s %g)", n, k, lim);
    }
    if (!strcmp(k, "minimum") || !strcmp(k, "maximum") || !strcmp(k, "exclusiveMinimum") ||
        !strcmp(k, "exclusiveMaximum")) {
        if (!cJSON_IsNumber(v) || !num_of(kw, &lim))
            return true;
        double x = v->valuedouble;
        bool ok = !strcmp(k, "minimum")   ? x >= lim
                  : !strcmp(k, "maximum") ? x <= lim
                  : k[9] == 'M' && k[10] == 'i' ? x > lim
                                                : x < lim;
        return ok || vfail(e, at, "%.17g breaks %s %g", x, k, lim);
    }
    if (!strcmp(k, "pattern")) {
        if (!cJSON_IsString(v))
            return true;
        return regex_full(kw->val, v->valuestring) ||
               vfail(e, at, "\"%s\" does not match %s", v->valuestring, kw->val);
    }
    if (!strcmp(k, "format")) {
        if (!cJSON_IsString(v) || strcmp(kw->val, "date-time") != 0)
            return true;
        return regex_full("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?"
                          "(Z|[+-][0-9]{2}:[0-9]{2})$",
                          v->valuestring) ||
               vfail(e, at, "\"%s\" is not an RFC 3339 date-time", v->valuestring);
    }
    if (!strcmp(k, "oneOf") || !strcmp(k, "anyOf") || !strcmp(k, "allOf")) {
        int ok = 0, n = 0;
        verr first = {{0}};
        for (const ynode *b = kw->child; b; b = b->next, n++) {
            verr be = {{0}};
            if (validate(b, v, at, &be))
                ok++;
            else if (!first.msg[0] || (yget(b, "$ref") && strstr(be.msg, "constant") == NULL))
                first = be; /* keep the most telling branch failure */
        }
        if (k[0] == 'o' && ok == 1)
            return true;
        if (k[1] == 'n' && ok >= 1)
            return true;
        if (k[1] == 'l' && ok == n)
            return true;
        return vfail(e, at, "matches %d of the %d branches of %s (line %d); %s", ok, n, k,
                     kw->line, first.msg);
    }
    /* Annotations that constrain nothing. */
    static const char *const annotations[] = {"description", "default", "example", "examples",
                                              "title", "discriminator", "contentMediaType",
                                              "deprecated", "readOnly", "writeOnly", NULL};
    for (int i = 0; annotations[i]; i++)
        if (!strcmp(k, annotations[i]))
            return true;
    fail_msg("schema keyword \"%s\" (line %d) is unknown to this validator: teach it, or do "
             "not use it",
             k, kw->line);
    return false;
}

static bool validate(const ynode *schema, const cJSON *v, const char *at, verr *e)
{
    if (!schema || schema->kind != Y_MAP)
        fail_msg("%s: the schema is not a map (line %d)", at, schema ? schema->line : 0);
    for (const ynode *kw = schema->child; kw; kw = kw->next)
        if (!validate_kw(kw, schema, v, at, e))
            return false;
    return true;
}

static void assert_valid(const ynode *schema, const cJSON *v, const char *what)
{
    verr e = {{0}};
    if (!validate(schema, v, "$", &e)) {
        char *txt = cJSON_PrintUnformatted(v);
        fail_msg("%s: %s\n  body: %.600s", what, e.msg, txt ? txt : "?");
    }
}

/* ========================================== 0: the validator bites */

static void test_validator_refuses_what_the_spec_forbids(void **state)
{
    (void)state;
    spec_load();
    static const struct {
        const char *schema;
        const char *json;
        bool ok;
    } cases[] = {
        {"Problem", "{\"type\":\"urn:optd:problem:conflict\",\"title\":\"Conflict\","
                    "\"status\":409,\"detail\":\"x\",\"field\":\"base_step\",\"step\":3}",
         true},
        {"Problem", "{\"type\":\"urn:optd:problem:conflict\",\"title\":\"C\",\"status\":409}",
         false},
        {"Problem", "{\"type\":\"urn:optd:problem:nope\",\"title\":\"C\",\"status\":409,"
                    "\"detail\":\"x\"}",
         false},
        {"Problem", "{\"type\":\"urn:optd:problem:conflict\",\"title\":\"C\",\"status\":409,"
                    "\"detail\":\"x\",\"extra\":1}",
         false},
        {"Problem", "{\"type\":\"urn:optd:problem:conflict\",\"title\":\"C\",\"status\":200,"
                    "\"detail\":\"x\"}",
         false},
        {"StepResult", "{\"step\":1,\"lr\":0.1,\"params\":[1,null]}", true},
        {"StepResult", "{\"step\":-1}", false},
        {"StepResult", "{\"step\":1.5}", false},
        {"StepResult", "{\"step\":1,\"replayed\":false}", false},
        {"StepResult", "{\"step\":1,\"params\":[\"1\"]}", false},
        {"HistoryEntry", "{\"step\":1,\"time\":\"2026-01-31T12:00:00.000Z\",\"lr\":0.1,"
                         "\"loss\":null,\"grad_norm\":1,\"update_norm\":0.1}",
         true},
        {"HistoryEntry", "{\"step\":1,\"time\":\"yesterday\",\"lr\":0.1,\"loss\":null,"
                         "\"grad_norm\":1,\"update_norm\":0.1}",
         false},
        {"SessionSummary", "{\"name\":\"bad name\",\"step\":0,\"optimizer\":\"sgd\","
                           "\"dtype\":\"float32\",\"size\":1,"
                           "\"created_at\":\"2026-01-31T12:00:00.000Z\","
                           "\"updated_at\":\"2026-01-31T12:00:00.000Z\"}",
         false},
        {"Clip", "{\"type\":\"norm\",\"max_norm\":1,\"norm_type\":\"inf\"}", true},
        {"Clip", "{\"type\":\"norm\",\"max_norm\":1,\"norm_type\":2}", true},
        {"Clip", "{\"type\":\"norm\",\"max_norm\":1,\"norm_type\":3}", false},
        {"Clip", "{\"type\":\"value\",\"max_value\":0}", false},
        {"Optimizer", "{\"type\":\"sgd\",\"lr\":0.1}", true},
        {"Optimizer", "{\"type\":\"sgd\"}", false},
        {"Optimizer", "{\"type\":\"adam\",\"momentum\":0.9}", false},
        {"Optimizer", "{\"type\":\"adam\",\"betas\":[0.9,1.0]}", false},
        {"Optimizer", "{\"type\":\"adamx\"}", false},
        {"Schedule", "{\"type\":\"cosine\",\"T_max\":10}", true},
        {"Schedule", "{\"type\":\"cosine\"}", false},
        {"Mode", "{\"type\":\"async\",\"accumulate\":0}", false},
        {"Mode", "{\"type\":\"sync\",\"workers\":4,\"reduce\":\"sum\"}", true},
        {"Health", "{\"status\":\"ok\",\"hot_sessions\":0}", true},
        {"Health", "{\"status\":\"bad\",\"hot_sessions\":0}", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char ref[128];
        snprintf(ref, sizeof ref, "#/components/schemas/%s", cases[i].schema);
        const ynode *schema = yref(ref);
        if (!schema)
            fail_msg("no schema %s", cases[i].schema);
        cJSON *j = cJSON_Parse(cases[i].json);
        assert_non_null(j);
        verr e = {{0}};
        bool ok = validate(schema, j, "$", &e);
        if (ok != cases[i].ok)
            fail_msg("%s %s: the validator says %s (%s)", cases[i].schema, cases[i].json,
                     ok ? "valid" : "invalid", e.msg);
        cJSON_Delete(j);
    }
}

/* ============================================================ harness */

typedef struct {
    tdaemon d;
    optd_client *c;     /* with the API key */
    optd_client *anon;  /* without */
} suite;

static int suite_setup(void **state)
{
    *state = NULL;
    suite *s = calloc(1, sizeof *s);
    if (!s)
        return -1;
    const char *args[] = {"--api-key", API_KEY, "--max-body-mb", "1", "--max-params",
                          MAX_PARAMS_ARG, NULL};
    if (tdaemon_start(&s->d, NULL, args) != 0) {
        tdaemon_cleanup(&s->d);
        free(s);
        return -1;
    }
    s->c = tapi_client(tdaemon_url(&s->d), API_KEY, false);
    s->anon = tapi_client(tdaemon_url(&s->d), NULL, false);
    *state = s;
    return 0;
}

static int suite_teardown(void **state)
{
    suite *s = *state;
    if (!s)
        return -1;
    optd_client_free(s->c);
    optd_client_free(s->anon);
    int rc = tdaemon_stop(&s->d);
    tdaemon_cleanup(&s->d);
    free(s);
    yfree(g_spec);
    free(g_spec_text);
    g_spec = NULL;
    return rc == 0 ? 0 : -1;
}

/* The media type of a Content-Type value, without parameters. */
static void media_type(const char *ct, char *out, size_t n)
{
    size_t k = strcspn(ct, "; ");
    snprintf(out, n, "%.*s", (int)k, ct);
}

/* Every check of one real answer against what the spec says of
 * (operation, status).  Returns the response object. */
static const ynode *check_answer(const spec_op *o, const char *label, const optd_response *r)
{
    const ynode *resp = spec_response(o, r->status);
    if (!resp) {
        char codes[200] = "";
        for (const ynode *c = yget(o->op, "responses")->child; c; c = c->next)
            snprintf(codes + strlen(codes), sizeof codes - strlen(codes), " %s", c->key);
        fail_msg("%s: %s %s answered %d, which the spec does not document (it has:%s): %.300s",
                 label, o->method, o->path, r->status, codes, r->body);
    }
    const ynode *content = yget(resp, "content");
    if (!content) {
        if (r->len != 0)
            fail_msg("%s: %d has a body, the spec documents none", label, r->status);
    } else {
        char mt[128];
        media_type(r->content_type, mt, sizeof mt);
        const ynode *media = yget(content, mt);
        if (!media)
            fail_msg("%s: Content-Type \"%s\" is not documented for %s %s %d", label,
                     r->content_type, o->method, o->path, r->status);
        if (!strcmp(mt, "application/json") || !strcmp(mt, "application/problem+json")) {
            cJSON *j = tapi_json(r);
            char what[300];
            snprintf(what, sizeof what, "%s (%s %s %d)", label, o->method, o->path, r->status);
            assert_valid(yget(media, "schema"), j, what);
            cJSON_Delete(j);
        }
    }
    if (r->status >= 400) {
        /* The shared Problem schema, and the one type per status. */
        if (strncmp(r->content_type, "application/problem+json", 24) != 0)
            fail_msg("%s: error %d is %s, not application/problem+json", label, r->status,
                     r->content_type);
        cJSON *j = tapi_json(r);
        assert_valid(yref("#/components/schemas/Problem"), j, label);
        assert_int_equal((int)tapi_num(j, "status"), r->status);
        assert_string_equal(tapi_str(j, "type"), api_problem_type(r->status));
        cJSON_Delete(j);
    }
    const ynode *hdrs = yget(resp, "headers");
    for (const ynode *h = hdrs ? hdrs->child : NULL; h; h = h->next)
        if (yis_true(yget(yderef(h), "required")) && !optd_response_header(r, h->key))
            fail_msg("%s: %d lacks the required header %s", label, r->status, h->key);
    for (size_t i = 0; i < r->n_headers; i++)
        if (!strncasecmp(r->headers[i].name, "Optd-", 5)) {
            bool named = false;
            for (const ynode *h = hdrs ? hdrs->child : NULL; h; h = h->next)
                named |= strcasecmp(h->key, r->headers[i].name) == 0;
            if (!named)
                fail_msg("%s: %d carries %s, which the spec does not name for %s %s %d", label,
                         r->status, r->headers[i].name, o->method, o->path, r->status);
        }
    return resp;
}

/* ================================================== 1: the spec alone */

static void walk_refs(const ynode *n)
{
    for (; n; n = n->next) {
        if (n->key && !strcmp(n->key, "$ref")) {
            if (!ystr(n) || !yref(n->val))
                fail_msg("line %d: $ref %s does not resolve", n->line, n->val ? n->val : "");
        }
        walk_refs(n->child);
    }
}

static void test_spec_reads_and_is_regular(void **state)
{
    (void)state;
    spec_load();
    assert_string_equal(ystr(yget(g_spec, "openapi")), "3.1.0");
    assert_non_null(ystr(yget(yget(g_spec, "info"), "version")));
    walk_refs(g_spec);

    /* The layout the brief promises small parsers: "  /v1/...:" path lines
     * and "    get:" method lines, and nothing else at those depths under
     * paths: but path-item members. */
    size_t path_lines = 0, method_lines = 0;
    bool in_paths = false;
    for (const char *p = g_spec_text; p && *p;) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        if (n && p[0] != ' ' && p[0] != '#')
            in_paths = n == 6 && !strncmp(p, "paths:", 6);
        else if (in_paths && n > 3 && !strncmp(p, "  /", 3) && p[n - 1] == ':')
            path_lines++;
        else if (in_paths && n > 5 && !strncmp(p, "    ", 4) && p[4] != ' ' && p[n - 1] == ':')
            for (int k = 0; METHODS[k]; k++)
                method_lines += strlen(METHODS[k]) + 5 == n && !strncmp(p + 4, METHODS[k], n - 5);
        p = eol ? eol + 1 : NULL;
    }
    size_t n_paths = 0;
    for (const ynode *c = yget(g_spec, "paths")->child; c; c = c->next)
        n_paths++;
    assert_int_equal(path_lines, n_paths);
    assert_int_equal(method_lines, g_n_ops);

    const ynode *problem = yref("#/components/schemas/Problem");
    assert_non_null(problem);
    for (size_t i = 0; i < g_n_ops; i++) {
        const spec_op *o = &g_ops[i];
        const char *id = ystr(yget(o->op, "operationId"));
        if (!id)
            fail_msg("%s %s has no operationId", o->method, o->path);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(ystr(yget(g_ops[j].op, "operationId")), id))
                fail_msg("operationId %s is used twice", id);
        /* every {param} of the path is a declared path parameter */
        for (const char *b = strchr(o->path, '{'); b; b = strchr(b + 1, '{')) {
            size_t n = strcspn(b + 1, "}");
            bool declared = false;
            const ynode *lists[2] = {yget(o->op, "parameters"), yget(o->item, "parameters")};
            for (int l = 0; l < 2; l++)
                for (const ynode *p = lists[l] ? lists[l]->child : NULL; p; p = p->next) {
                    const ynode *pd = yderef(p);
                    const char *nm = ystr(yget(pd, "name"));
                    declared |= nm && strlen(nm) == n && !strncmp(nm, b + 1, n) &&
                                !strcmp(ystr(yget(pd, "in")), "path") &&
                                yis_true(yget(pd, "required"));
                }
            if (!declared)
                fail_msg("%s %s: path parameter %.*s is not declared (in: path, required)",
                         o->method, o->path, (int)n, b + 1);
        }
        const ynode *responses = yget(o->op, "responses");
        if (!responses || !responses->child)
            fail_msg("%s %s documents no responses", o->method, o->path);
        bool has_2xx = false;
        for (const ynode *c = responses->child; c; c = c->next) {
            if (strlen(c->key) != 3 || !isdigit((unsigned char)c->key[0]) ||
                !isdigit((unsigned char)c->key[1]) || !isdigit((unsigned char)c->key[2]))
                fail_msg("%s %s: response key \"%s\" is not an HTTP status", o->method, o->path,
                         c->key);
            const ynode *resp = yderef(c);
            if (!ystr(yget(resp, "description")))
                fail_msg("%s %s %s: no description", o->method, o->path, c->key);
            has_2xx |= c->key[0] == '2';
            if (c->key[0] == '4' || c->key[0] == '5') {
                const ynode *content = yget(resp, "content");
                const ynode *pj = yget(content, "application/problem+json");
                if (!pj || content->child->next)
                    fail_msg("%s %s %s: an error must be application/problem+json only",
                             o->method, o->path, c->key);
                if (yderef(yget(pj, "schema")) != problem)
                    fail_msg("%s %s %s: an error's schema must be Problem", o->method, o->path,
                             c->key);
            }
        }
        if (!has_2xx)
            fail_msg("%s %s documents no success", o->method, o->path);
    }
}

static void test_spec_paths_equal_route_table(void **state)
{
    (void)state;
    spec_load();
    /* every route documented, with its auth and body kinds */
    for (size_t i = 0; i < api_route_count; i++) {
        const api_route *rt = &api_routes[i];
        const spec_op *o = spec_find(rt->method, rt->pattern);
        if (!o)
            fail_msg("route %s %s is served but not in %s", rt->method, rt->pattern, SPEC_PATH);
        const ynode *sec = yget(o->op, "security");
        if (!sec)
            sec = yget(g_spec, "security");
        bool spec_auth = sec && sec->kind == Y_SEQ && sec->child;
        if (spec_auth != rt->needs_auth)
            fail_msg("%s %s: the spec says auth %s, the route table %s", rt->method, rt->pattern,
                     spec_auth ? "needed" : "not needed", rt->needs_auth ? "needs it" : "not");
        const ynode *body = yget(o->op, "requestBody");
        const ynode *content = body ? yget(yderef(body), "content") : NULL;
        bool json = yget(content, "application/json") != NULL;
        bool bin = yget(content, "application/octet-stream") != NULL;
        size_t n_media = 0;
        for (const ynode *m = content ? content->child : NULL; m; m = m->next)
            n_media++;
        switch (rt->body) {
        case API_BODY_NONE:
            if (body)
                fail_msg("%s %s takes no body; the spec documents one", rt->method, rt->pattern);
            break;
        case API_BODY_JSON:
            if (!json || n_media != 1)
                fail_msg("%s %s reads JSON only; the spec says otherwise", rt->method,
                         rt->pattern);
            break;
        case API_BODY_VECTOR:
            if (!json || !bin || n_media != 2)
                fail_msg("%s %s reads JSON or octet-stream; the spec says otherwise", rt->method,
                         rt->pattern);
            break;
        }
        if (body && !yis_true(yget(yderef(body), "required")))
            fail_msg("%s %s: the body is required (400 without one)", rt->method, rt->pattern);
    }
    /* every documented route served, once */
    for (size_t i = 0; i < g_n_ops; i++) {
        bool served = false;
        for (size_t k = 0; k < api_route_count; k++)
            served |= !strcmp(api_routes[k].method, g_ops[i].method) &&
                      !strcmp(api_routes[k].pattern, g_ops[i].path);
        if (!served)
            fail_msg("%s %s is in the spec but api_routes[] does not serve it", g_ops[i].method,
                     g_ops[i].path);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(g_ops[i].method, g_ops[j].method) && !strcmp(g_ops[i].path, g_ops[j].path))
                fail_msg("%s %s is documented twice", g_ops[i].method, g_ops[i].path);
    }
    assert_int_equal(g_n_ops, api_route_count);
}

/* ====================================== 2: the daemon against the spec */

enum { WHO_KEY = 0, WHO_ANON = 1 };

typedef struct {
    const char *label;
    int who;
    const char *method;
    const char *path;
    const char *headers[6];
    const char *body;         /* JSON text, or NULL                           */
    int bin;                  /* 0: body is text; else a binary body kind     */
    int expect;
} scenario;

enum { BIN_NONE, BIN_GRAD3_F32, BIN_NAN3_F32, BIN_GRAD2_F32, BIN_NAN2_F32, BIN_BIG };

static const char JSONCT[] = "Content-Type: application/json";
static const char BINCT[] = "Content-Type: application/octet-stream";
static const char BINACC[] = "Accept: application/octet-stream";
static const char TEXTACC[] = "Accept: text/plain";
static const char TEXTCT[] = "Content-Type: text/plain";
static const char EXPECT100[] = "Expect: 100-continue";

#define SGD3 "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"params\":[1,2,3]}"

static const scenario SCENARIOS[] = {
    {"healthz", WHO_ANON, "GET", "/healthz", {0}, NULL, 0, 200},
    {"healthz any Accept", WHO_ANON, "GET", "/healthz", {"Accept: text/html"}, NULL, 0, 200},
    {"catalogue", WHO_KEY, "GET", "/v1/optimizers", {0}, NULL, 0, 200},
    {"catalogue 401", WHO_ANON, "GET", "/v1/optimizers", {0}, NULL, 0, 401},
    {"catalogue 406", WHO_KEY, "GET", "/v1/optimizers", {BINACC}, NULL, 0, 406},

    {"create", WHO_KEY, "PUT", "/v1/sessions/t", {JSONCT}, SGD3, 0, 201},
    {"create again", WHO_KEY, "PUT", "/v1/sessions/t", {JSONCT}, SGD3, 0, 200},
    {"create differently", WHO_KEY, "PUT", "/v1/sessions/t", {JSONCT},
     "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.2},\"params\":[1,2,3]}", 0, 409},
    {"create full", WHO_KEY, "PUT", "/v1/sessions/full", {JSONCT},
     "{\"optimizer\":{\"type\":\"adamw\",\"lr\":0.01,\"betas\":[0.8,0.9]},\"size\":4,"
     "\"init\":{\"type\":\"normal\",\"std\":0.5,\"seed\":7},\"dtype\":\"float64\","
     "\"schedule\":{\"type\":\"cosine\",\"T_max\":100,\"warmup_steps\":3},"
     "\"clip\":{\"type\":\"norm\",\"max_norm\":1,\"norm_type\":\"inf\"},"
     "\"mode\":{\"type\":\"async\",\"max_staleness\":5,\"stale_policy\":\"damp\"},"
     "\"nonfinite\":\"skip\",\"metadata\":{\"run\":\"r1\",\"tags\":[1,2]}}",
     0, 201},
    {"create plateau", WHO_KEY, "PUT", "/v1/sessions/plateau", {JSONCT},
     "{\"optimizer\":{\"type\":\"rprop\"},\"size\":2,\"init\":{\"type\":\"uniform\",\"seed\":1},"
     "\"schedule\":{\"type\":\"reduce_on_plateau\",\"patience\":2},"
     "\"clip\":{\"type\":\"value\",\"max_value\":0.5}}",
     0, 201},
    {"create malformed", WHO_KEY, "PUT", "/v1/sessions/t2", {JSONCT}, "{\"optimizer\":", 0, 400},
    {"create bad name", WHO_KEY, "PUT", "/v1/sessions/bad!name", {JSONCT}, SGD3, 0, 400},
    {"create 415", WHO_KEY, "PUT", "/v1/sessions/t2", {TEXTCT}, SGD3, 0, 415},
    {"create 406", WHO_KEY, "PUT", "/v1/sessions/t2", {JSONCT, BINACC}, SGD3, 0, 406},
    {"create too many params", WHO_KEY, "PUT", "/v1/sessions/t2", {JSONCT},
     "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"size\":1000000}", 0, 413},
    {"create huge body", WHO_KEY, "PUT", "/v1/sessions/t2", {JSONCT, EXPECT100}, NULL, BIN_BIG,
     413},
    {"create non-finite", WHO_KEY, "PUT", "/v1/sessions/t2", {JSONCT},
     "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"params\":[1e39]}", 0, 422},
    {"create 401", WHO_ANON, "PUT", "/v1/sessions/t2", {JSONCT}, SGD3, 0, 401},

    {"list", WHO_KEY, "GET", "/v1/sessions", {0}, NULL, 0, 200},
    {"list page", WHO_KEY, "GET", "/v1/sessions?limit=1&after=full", {0}, NULL, 0, 200},
    {"list bad limit", WHO_KEY, "GET", "/v1/sessions?limit=0", {0}, NULL, 0, 400},
    {"list bad after", WHO_KEY, "GET", "/v1/sessions?after=a!b", {0}, NULL, 0, 400},
    {"list 401", WHO_ANON, "GET", "/v1/sessions", {0}, NULL, 0, 401},
    {"list 406", WHO_KEY, "GET", "/v1/sessions", {TEXTACC}, NULL, 0, 406},

    {"get", WHO_KEY, "GET", "/v1/sessions/t", {0}, NULL, 0, 200},
    {"get full", WHO_KEY, "GET", "/v1/sessions/full", {0}, NULL, 0, 200},
    {"get 404", WHO_KEY, "GET", "/v1/sessions/nope", {0}, NULL, 0, 404},
    {"get bad name", WHO_KEY, "GET", "/v1/sessions/bad!name", {0}, NULL, 0, 400},
    {"get 406", WHO_KEY, "GET", "/v1/sessions/t", {BINACC}, NULL, 0, 406},
    {"get 401", WHO_ANON, "GET", "/v1/sessions/t", {0}, NULL, 0, 401},

    {"step json", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT, "Idempotency-Key: k-1"},
     "{\"grad\":[1,1,1],\"loss\":0.5,\"worker\":\"w0\"}", 0, 200},
    {"step replay", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT, "Idempotency-Key: k-1"},
     "{\"grad\":[1,1,1],\"loss\":0.5,\"worker\":\"w0\"}", 0, 200},
    {"step binary", WHO_KEY, "POST", "/v1/sessions/t/step",
     {BINCT, BINACC, "Optd-Loss: 0.25", "Optd-Base-Step: 1", "Optd-Worker: w1"}, NULL,
     BIN_GRAD3_F32, 200},
    {"step no params", WHO_KEY, "POST", "/v1/sessions/t/step?params=false", {JSONCT},
     "{\"grad\":[0.5,0.5,0.5],\"base_step\":2}", 0, 200},
    {"step binary no params", WHO_KEY, "POST", "/v1/sessions/t/step?params=false",
     {BINCT, BINACC}, NULL, BIN_GRAD3_F32, 200},
    {"step full", WHO_KEY, "POST", "/v1/sessions/full/step", {JSONCT},
     "{\"grad\":[1,2,3,4],\"loss\":null,\"base_step\":0}", 0, 200},
    {"step wrong length", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT}, "{\"grad\":[1,1]}",
     0, 422},
    {"step binary wrong length", WHO_KEY, "POST", "/v1/sessions/t/step", {BINCT}, NULL,
     BIN_GRAD2_F32, 422},
    {"step nan", WHO_KEY, "POST", "/v1/sessions/t/step", {BINCT}, NULL, BIN_NAN3_F32, 422},
    {"step not a number", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT},
     "{\"grad\":[1,\"x\",1]}", 0, 400},
    {"step bad header", WHO_KEY, "POST", "/v1/sessions/t/step", {BINCT, "Optd-Loss: many"},
     NULL, BIN_GRAD3_F32, 400},
    {"step ahead", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT},
     "{\"grad\":[1,1,1],\"base_step\":99}", 0, 409},
    {"step 415", WHO_KEY, "POST", "/v1/sessions/t/step", {TEXTCT}, "{\"grad\":[1,1,1]}", 0, 415},
    {"step 406", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT, TEXTACC}, "{\"grad\":[1,1,1]}",
     0, 406},
    {"step huge body", WHO_KEY, "POST", "/v1/sessions/t/step", {BINCT, EXPECT100}, NULL, BIN_BIG,
     413},
    {"step 404", WHO_KEY, "POST", "/v1/sessions/nope/step", {JSONCT}, "{\"grad\":[1]}", 0, 404},
    {"step 401", WHO_ANON, "POST", "/v1/sessions/t/step", {JSONCT}, "{\"grad\":[1,1,1]}", 0, 401},
    {"step no body", WHO_KEY, "POST", "/v1/sessions/t/step", {JSONCT}, "", 0, 400},

    {"create acc", WHO_KEY, "PUT", "/v1/sessions/acc", {JSONCT},
     "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.1},\"params\":[1,2],"
     "\"mode\":{\"type\":\"async\",\"accumulate\":2},\"nonfinite\":\"skip\"}",
     0, 201},
    {"step accumulated", WHO_KEY, "POST", "/v1/sessions/acc/step", {JSONCT}, "{\"grad\":[1,1]}",
     0, 202},
    {"patch accumulate while pending", WHO_KEY, "PATCH", "/v1/sessions/acc", {JSONCT},
     "{\"mode\":{\"type\":\"async\",\"accumulate\":3}}", 0, 409},
    {"step accumulated binary", WHO_KEY, "POST", "/v1/sessions/acc/step", {BINCT, BINACC}, NULL,
     BIN_GRAD2_F32, 200},
    {"step skipped", WHO_KEY, "POST", "/v1/sessions/acc/step", {BINCT}, NULL, BIN_NAN2_F32, 200},

    {"create sync", WHO_KEY, "PUT", "/v1/sessions/sy", {JSONCT},
     "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":2,"
     "\"mode\":{\"type\":\"sync\",\"workers\":1}}",
     0, 201},
    {"step sync", WHO_KEY, "POST", "/v1/sessions/sy/step", {JSONCT},
     "{\"grad\":[1,1],\"worker\":\"a\"}", 0, 200},
    {"step sync no worker", WHO_KEY, "POST", "/v1/sessions/sy/step", {JSONCT},
     "{\"grad\":[1,1]}", 0, 400},
    {"step sync wrong round", WHO_KEY, "POST", "/v1/sessions/sy/step", {JSONCT},
     "{\"grad\":[1,1],\"worker\":\"a\",\"base_step\":0}", 0, 409},
    {"create sync pair", WHO_KEY, "PUT", "/v1/sessions/sy2", {JSONCT},
     "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":2,"
     "\"mode\":{\"type\":\"sync\",\"workers\":2,\"timeout_ms\":150}}",
     0, 201},
    {"step sync timeout", WHO_KEY, "POST", "/v1/sessions/sy2/step", {JSONCT},
     "{\"grad\":[1,1],\"worker\":\"lonely\"}", 0, 504},

    {"params", WHO_KEY, "GET", "/v1/sessions/t/params", {0}, NULL, 0, 200},
    {"params binary", WHO_KEY, "GET", "/v1/sessions/t/params", {BINACC}, NULL, 0, 200},
    {"params 404", WHO_KEY, "GET", "/v1/sessions/nope/params", {0}, NULL, 0, 404},
    {"params bad name", WHO_KEY, "GET", "/v1/sessions/bad!name/params", {0}, NULL, 0, 400},
    {"params 406", WHO_KEY, "GET", "/v1/sessions/t/params", {TEXTACC}, NULL, 0, 406},
    {"params 401", WHO_ANON, "GET", "/v1/sessions/t/params", {0}, NULL, 0, 401},

    {"set params", WHO_KEY, "PUT", "/v1/sessions/t/params", {JSONCT}, "{\"params\":[3,2,1]}", 0,
     200},
    {"set params binary", WHO_KEY, "PUT", "/v1/sessions/t/params", {BINCT, BINACC}, NULL,
     BIN_GRAD3_F32, 200},
    {"set params wrong length", WHO_KEY, "PUT", "/v1/sessions/t/params", {JSONCT},
     "{\"params\":[1]}", 0, 422},
    {"set params nan", WHO_KEY, "PUT", "/v1/sessions/t/params", {BINCT}, NULL, BIN_NAN3_F32, 422},
    {"set params unknown member", WHO_KEY, "PUT", "/v1/sessions/t/params", {JSONCT},
     "{\"params\":[1,2,3],\"step\":4}", 0, 400},
    {"set params 415", WHO_KEY, "PUT", "/v1/sessions/t/params", {TEXTCT}, "{\"params\":[1,2,3]}",
     0, 415},
    {"set params 406", WHO_KEY, "PUT", "/v1/sessions/t/params", {JSONCT, TEXTACC},
     "{\"params\":[1,2,3]}", 0, 406},
    {"set params huge body", WHO_KEY, "PUT", "/v1/sessions/t/params", {BINCT, EXPECT100}, NULL,
     BIN_BIG, 413},
    {"set params 404", WHO_KEY, "PUT", "/v1/sessions/nope/params", {JSONCT}, "{\"params\":[1]}",
     0, 404},
    {"set params 401", WHO_ANON, "PUT", "/v1/sessions/t/params", {JSONCT}, "{\"params\":[1,2,3]}",
     0, 401},

    {"history", WHO_KEY, "GET", "/v1/sessions/t/history", {0}, NULL, 0, 200},
    {"history page", WHO_KEY, "GET", "/v1/sessions/t/history?after=1&limit=1", {0}, NULL, 0,
     200},
    {"history bad limit", WHO_KEY, "GET", "/v1/sessions/t/history?limit=0", {0}, NULL, 0, 400},
    {"history 404", WHO_KEY, "GET", "/v1/sessions/nope/history", {0}, NULL, 0, 404},
    {"history 406", WHO_KEY, "GET", "/v1/sessions/t/history", {BINACC}, NULL, 0, 406},
    {"history 401", WHO_ANON, "GET", "/v1/sessions/t/history", {0}, NULL, 0, 401},

    {"patch", WHO_KEY, "PATCH", "/v1/sessions/t", {JSONCT},
     "{\"optimizer\":{\"lr\":0.05,\"momentum\":0.9},\"schedule\":{\"type\":\"step\","
     "\"step_size\":10},\"clip\":null,\"metadata\":{\"k\":\"v\"},\"nonfinite\":\"skip\"}",
     0, 200},
    {"patch to sync", WHO_KEY, "PATCH", "/v1/sessions/plateau", {JSONCT},
     "{\"mode\":{\"type\":\"sync\",\"workers\":3,\"reduce\":\"sum\",\"on_timeout\":\"apply\"}}",
     0, 200},
    {"patch dtype", WHO_KEY, "PATCH", "/v1/sessions/t", {JSONCT}, "{\"dtype\":\"float64\"}", 0,
     400},
    {"patch 415", WHO_KEY, "PATCH", "/v1/sessions/t", {TEXTCT}, "{}", 0, 415},
    {"patch 406", WHO_KEY, "PATCH", "/v1/sessions/t", {JSONCT, BINACC}, "{}", 0, 406},
    {"patch huge body", WHO_KEY, "PATCH", "/v1/sessions/t", {JSONCT, EXPECT100}, NULL, BIN_BIG,
     413},
    {"patch 404", WHO_KEY, "PATCH", "/v1/sessions/nope", {JSONCT}, "{}", 0, 404},
    {"patch 401", WHO_ANON, "PATCH", "/v1/sessions/t", {JSONCT}, "{}", 0, 401},

    {"delete 406", WHO_KEY, "DELETE", "/v1/sessions/t", {TEXTACC}, NULL, 0, 406},
    {"delete 401", WHO_ANON, "DELETE", "/v1/sessions/t", {0}, NULL, 0, 401},
    {"delete bad name", WHO_KEY, "DELETE", "/v1/sessions/bad!name", {0}, NULL, 0, 400},
    {"delete", WHO_KEY, "DELETE", "/v1/sessions/t", {0}, NULL, 0, 204},
    {"delete again", WHO_KEY, "DELETE", "/v1/sessions/t", {0}, NULL, 0, 404},
};

/* A binary body; *len set.  Caller frees. */
static void *make_bin(int kind, size_t *len)
{
    float g3[3] = {0.5f, -0.25f, 1.0f}, g2[2] = {0.5f, 0.5f};
    void *b = NULL;
    switch (kind) {
    case BIN_GRAD3_F32:
    case BIN_NAN3_F32:
        *len = sizeof g3;
        if (kind == BIN_NAN3_F32)
            g3[1] = NAN;
        b = malloc(*len);
        assert_non_null(b);
        memcpy(b, g3, *len);
        break;
    case BIN_GRAD2_F32:
    case BIN_NAN2_F32:
        *len = sizeof g2;
        if (kind == BIN_NAN2_F32)
            g2[0] = INFINITY;
        b = malloc(*len);
        assert_non_null(b);
        memcpy(b, g2, *len);
        break;
    case BIN_BIG:
        /* Past --max-body-mb: refused from Content-Length. */
        *len = (size_t)MAX_BODY_MB * 1024 * 1024 + 4096;
        b = malloc(*len);
        assert_non_null(b);
        memset(b, ' ', *len);
        ((char *)b)[0] = '{';
        ((char *)b)[*len - 1] = '}';
        break;
    default:
        fail_msg("unknown binary body kind %d", kind);
    }
    return b;
}

static optd_response run_scenario(suite *s, const scenario *sc)
{
    optd_client *c = sc->who == WHO_ANON ? s->anon : s->c;
    if (sc->bin) {
        size_t len = 0;
        void *b = make_bin(sc->bin, &len);
        optd_response r = tapi_req_bin(c, sc->method, sc->path, sc->headers, b, len);
        free(b);
        return r;
    }
    return tapi_req(c, sc->method, sc->path, sc->headers, sc->body);
}

/* The JSON request body of a valid request must satisfy the spec's
 * request schema: the spec accepts what the daemon accepts. */
static void check_request_body(const spec_op *o, const scenario *sc)
{
    if (!sc->body || !*sc->body || sc->bin)
        return;
    const ynode *rb = yget(o->op, "requestBody");
    const ynode *media = yget(yget(rb ? yderef(rb) : NULL, "content"), "application/json");
    if (!media)
        fail_msg("%s: a JSON body for %s %s, which documents none", sc->label, o->method,
                 o->path);
    cJSON *j = cJSON_Parse(sc->body);
    assert_non_null(j);
    char what[200];
    snprintf(what, sizeof what, "%s: request body against the spec", sc->label);
    assert_valid(yget(media, "schema"), j, what);
    cJSON_Delete(j);
}

static void test_operations_answer_documented_statuses(void **state)
{
    suite *s = *state;
    spec_load();
    size_t n = sizeof SCENARIOS / sizeof SCENARIOS[0];
    bool driven_ok[MAX_OPS] = {false};
    /* documented (operation, status) pairs seen */
    bool seen[MAX_OPS][600];
    memset(seen, 0, sizeof seen);
    for (size_t i = 0; i < n; i++) {
        const scenario *sc = &SCENARIOS[i];
        const spec_op *o = spec_match(sc->method, sc->path);
        if (!o)
            fail_msg("%s: %s %s matches no operation of the spec", sc->label, sc->method,
                     sc->path);
        optd_response r = run_scenario(s, sc);
        if (r.status != sc->expect)
            fail_msg("%s: %s %s answered %d, expected %d: %.400s", sc->label, sc->method,
                     sc->path, r.status, sc->expect, r.body);
        check_answer(o, sc->label, &r);
        size_t oi = (size_t)(o - g_ops);
        seen[oi][r.status] = true;
        if (r.status < 300) {
            driven_ok[oi] = true;
            check_request_body(o, sc);
        }
        optd_response_free(&r);
    }
    size_t pairs = 0, exercised = 0;
    char missed[2048] = "";
    for (size_t i = 0; i < g_n_ops; i++) {
        if (!driven_ok[i])
            fail_msg("%s %s was never driven with a valid request", g_ops[i].method,
                     g_ops[i].path);
        for (const ynode *c = yget(g_ops[i].op, "responses")->child; c; c = c->next) {
            pairs++;
            int st = atoi(c->key);
            size_t l = strlen(missed);
            if (st > 0 && st < 600 && seen[i][st])
                exercised++;
            else if (st != 503 && l + 200 < sizeof missed) /* 503 needs a storage fault */
                l += (size_t)snprintf(missed + l, 200, " %.7s %.80s %.3s;", g_ops[i].method,
                                      g_ops[i].path, c->key);
        }
    }
    print_message("  %zu requests; %zu of %zu documented (operation, status) pairs driven\n", n,
                  exercised, pairs);
    /* Everything but 503 (a storage failure) is driven above. */
    if (missed[0])
        fail_msg("documented but not driven:%s", missed);
}

static bool method_listed(const char *allow, const char *m)
{
    size_t n = strlen(m);
    for (const char *p = allow; (p = strstr(p, m)); p += n)
        if ((p == allow || p[-1] == ' ' || p[-1] == ',') && (p[n] == '\0' || p[n] == ',' ||
                                                             p[n] == ' '))
            return true;
    return false;
}

static void test_other_methods_answer_405_with_allow(void **state)
{
    suite *s = *state;
    spec_load();
    const ynode *m405 = yref("#/components/responses/MethodNotAllowed");
    assert_non_null(m405);
    tapi_create(s->c, "allow", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":1},\"params\":[1]}", 201);
    for (const ynode *p = yget(g_spec, "paths")->child; p; p = p->next) {
        /* The path with {name} filled in by the session made above. */
        char path[256];
        const char *b = strstr(p->key, "{name}");
        if (b)
            snprintf(path, sizeof path, "%.*sallow%s", (int)(b - p->key), p->key, b + 6);
        else
            snprintf(path, sizeof path, "%s", p->key);
        /* Methods a path does not list (OPTIONS is listed nowhere). */
        const char *probe[] = {"OPTIONS", "POST", "DELETE", "PATCH"};
        for (int k = 0; k < 4; k++) {
            if (spec_find(probe[k], p->key))
                continue;
            optd_response r = tapi_req(s->c, probe[k], path, NULL, NULL);
            if (r.status != 405)
                fail_msg("%s %s: expected 405, got %d", probe[k], path, r.status);
            const char *allow = optd_response_header(&r, "Allow");
            if (!allow)
                fail_msg("%s %s: 405 without Allow", probe[k], path);
            size_t listed = 0;
            for (int mi = 0; METHODS[mi]; mi++) {
                char up[8];
                for (size_t c = 0; c <= strlen(METHODS[mi]); c++)
                    up[c] = (char)toupper((unsigned char)METHODS[mi][c]);
                /* HEAD is served wherever GET is (info.description). */
                bool doc = spec_find(up, p->key) != NULL ||
                           (strcmp(up, "HEAD") == 0 && spec_find("GET", p->key) != NULL);
                if (doc != method_listed(allow, up))
                    fail_msg("%s: Allow \"%s\" and the spec disagree on %s", p->key, allow, up);
                listed += doc;
            }
            assert_true(listed > 0);
            for (const ynode *h = yget(m405, "headers")->child; h; h = h->next)
                assert_non_null(optd_response_header(&r, h->key));
            tapi_assert_problem(&r, 405, "");
            cJSON *j = tapi_json(&r);
            assert_valid(yderef(yget(yget(yget(m405, "content"), "application/problem+json"),
                                     "schema")),
                         j, "405");
            cJSON_Delete(j);
            optd_response_free(&r);
        }
    }
    /* and an unknown path is a 404 problem */
    optd_response r = tapi_req(s->c, "GET", "/v1/nowhere", NULL, NULL);
    tapi_assert_problem(&r, 404, "");
    cJSON *j = tapi_json(&r);
    assert_valid(yref("#/components/schemas/Problem"), j, "404 unknown path");
    cJSON_Delete(j);
    optd_response_free(&r);
}

/* =========================================== 3: step headers, both ways */

static bool has_header(const optd_response *r, const char *name)
{
    return optd_response_header(r, name) != NULL;
}

static void test_step_response_headers(void **state)
{
    suite *s = *state;
    spec_load();
    const spec_op *o = spec_find("POST", "/v1/sessions/{name}/step");
    assert_non_null(o);
    tapi_create(s->c, "h", "{\"optimizer\":{\"type\":\"adam\",\"lr\":0.01},\"size\":3}", 201);
    tapi_create(s->c, "hacc",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":3,"
                "\"mode\":{\"type\":\"async\",\"accumulate\":2},\"nonfinite\":\"skip\"}",
                201);
    tapi_create(s->c, "hsync",
                "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.1},\"size\":3,"
                "\"mode\":{\"type\":\"sync\",\"workers\":1,\"accumulate\":2}}",
                201);

    /* Real step answers of every kind the step operation has. */
    const float g[3] = {0.1f, 0.2f, -0.3f};
    const float bad[3] = {0.1f, NAN, 0.0f};
    const char *hj[] = {JSONCT, "Idempotency-Key: hk-1", NULL};
    const char *hb[] = {BINCT, BINACC, NULL};
    enum { N_ANS = 8 };
    optd_response ans[N_ANS];
    const char *what[N_ANS] = {"applied (JSON)", "applied (binary)", "replayed",
                               "accumulated",    "accumulated to an update",
                               "skipped",        "sync round accumulated",
                               "sync round applied"};
    ans[0] = tapi_req(s->c, "POST", "/v1/sessions/h/step", hj, "{\"grad\":[0.1,0.2,-0.3]}");
    ans[1] = tapi_req_bin(s->c, "POST", "/v1/sessions/h/step", hb, g, sizeof g);
    ans[2] = tapi_req(s->c, "POST", "/v1/sessions/h/step", hj, "{\"grad\":[0.1,0.2,-0.3]}");
    ans[3] = tapi_req_bin(s->c, "POST", "/v1/sessions/hacc/step", hb, g, sizeof g);
    ans[4] = tapi_req_bin(s->c, "POST", "/v1/sessions/hacc/step", hb, g, sizeof g);
    ans[5] = tapi_req_bin(s->c, "POST", "/v1/sessions/hacc/step", hb, bad, sizeof bad);
    const char *hs[] = {BINCT, BINACC, "Optd-Worker: w", NULL};
    ans[6] = tapi_req_bin(s->c, "POST", "/v1/sessions/hsync/step", hs, g, sizeof g);
    ans[7] = tapi_req_bin(s->c, "POST", "/v1/sessions/hsync/step", hs, g, sizeof g);
    const int want[N_ANS] = {200, 200, 200, 202, 200, 200, 202, 200};
    for (int i = 0; i < N_ANS; i++) {
        if (ans[i].status != want[i])
            fail_msg("%s: expected %d, got %d: %.300s", what[i], want[i], ans[i].status,
                     ans[i].body);
        check_answer(o, what[i], &ans[i]);
    }

    /* The plain applied step carries Optd-Step and Optd-Lr, equal to the
     * body's numbers; the binary one the same headers. */
    for (int i = 0; i < 2; i++) {
        assert_true(has_header(&ans[i], "Optd-Step"));
        assert_true(has_header(&ans[i], "Optd-Lr"));
    }
    cJSON *j = tapi_json(&ans[0]);
    assert_int_equal(atoll(optd_response_header(&ans[0], "Optd-Step")),
                     (long long)tapi_num(j, "step"));
    assert_true(strtod(optd_response_header(&ans[0], "Optd-Lr"), NULL) == tapi_num(j, "lr"));
    cJSON_Delete(j);
    assert_int_equal(atoll(optd_response_header(&ans[1], "Optd-Step")), 2);
    assert_int_equal(ans[1].len, sizeof g);
    assert_true(has_header(&ans[2], "Optd-Replayed"));
    assert_int_equal(atoll(optd_response_header(&ans[2], "Optd-Step")), 1);
    assert_true(has_header(&ans[3], "Optd-Pending"));
    assert_true(has_header(&ans[5], "Optd-Skipped"));
    assert_false(has_header(&ans[5], "Optd-Lr"));
    assert_true(has_header(&ans[6], "Optd-Round-Size"));
    assert_true(has_header(&ans[7], "Optd-Round-Size"));
    assert_true(has_header(&ans[7], "Optd-Lr"));

    /* Every Optd-* header the spec names for step shows up in a real step
     * answer of that status (check_answer did the converse). */
    size_t named = 0;
    for (const ynode *c = yget(o->op, "responses")->child; c; c = c->next) {
        int st = atoi(c->key);
        const ynode *hdrs = yget(yderef(c), "headers");
        for (const ynode *h = hdrs ? hdrs->child : NULL; h; h = h->next) {
            if (strncasecmp(h->key, "Optd-", 5) != 0)
                continue;
            named++;
            bool shown = false;
            for (int i = 0; i < N_ANS; i++)
                shown |= ans[i].status == st && has_header(&ans[i], h->key);
            if (!shown)
                fail_msg("the spec names %s for step %d; no real %d step answer carried it",
                         h->key, st, st);
        }
    }
    assert_true(named >= 6);
    for (int i = 0; i < N_ANS; i++)
        optd_response_free(&ans[i]);
}

/* The step's header parameters are the ones the daemon reads: each
 * example is accepted and lands where it should, and a value outside each
 * schema is refused naming that header. */
static void test_step_header_parameters(void **state)
{
    suite *s = *state;
    spec_load();
    const spec_op *o = spec_find("POST", "/v1/sessions/{name}/step");
    tapi_create(s->c, "hp", "{\"optimizer\":{\"type\":\"sgd\",\"lr\":0.5},\"size\":2}", 201);
    const float g[2] = {1.0f, -1.0f};
    char lines[8][300];
    const char *hdrs[10];
    size_t nh = 0;
    hdrs[nh++] = BINCT;
    const char *ex_loss = NULL, *ex_worker = NULL, *ex_key = NULL;
    for (const ynode *p = yget(o->op, "parameters")->child; p; p = p->next) {
        const ynode *pd = yderef(p);
        if (strcmp(ystr(yget(pd, "in")), "header") != 0)
            continue;
        const char *name = ystr(yget(pd, "name"));
        const char *ex = ystr(yget(pd, "example"));
        if (!name || !ex)
            fail_msg("header parameter %s has no name or no example", name ? name : "?");
        assert_true(nh < 9);
        snprintf(lines[nh], sizeof lines[nh], "%s: %s", name, ex);
        hdrs[nh] = lines[nh];
        nh++;
        if (!strcmp(name, "Optd-Loss"))
            ex_loss = ex;
        else if (!strcmp(name, "Optd-Worker"))
            ex_worker = ex;
        else if (!strcmp(name, "Idempotency-Key"))
            ex_key = ex;

        /* A value the schema refuses must be refused by the daemon. */
        const ynode *sc = yderef(yget(pd, "schema"));
        const char *type = ystr(yget(sc, "type"));
        double lim;
        char badv[300];
        if (num_of(yget(sc, "maxLength"), &lim)) {
            size_t n = (size_t)lim + 1;
            assert_true(n < 280);
            memset(badv, 'k', n);
            badv[n] = '\0';
        } else if (!strcmp(type, "integer") && num_of(yget(sc, "minimum"), &lim)) {
            snprintf(badv, sizeof badv, "%g", lim - 1);
        } else if (!strcmp(type, "number")) {
            snprintf(badv, sizeof badv, "not-a-number");
        } else if (!strcmp(type, "string") && yget(sc, "enum")) {
            snprintf(badv, sizeof badv, "not-one-of-the-enum");
        } else {
            fail_msg("header parameter %s: no way to make a value its schema refuses", name);
        }
        char line[320];
        snprintf(line, sizeof line, "%s: %s", name, badv);
        const char *h1[] = {BINCT, line, NULL};
        tapi_snap before = tapi_snapshot(s->c, "hp");
        optd_response r = tapi_req_bin(s->c, "POST", "/v1/sessions/hp/step", h1, g, sizeof g);
        if (r.status != 400)
            fail_msg("%s: %.40s... answered %d, expected 400", name, badv, r.status);
        tapi_assert_problem(&r, 400, name);
        check_answer(o, name, &r);
        optd_response_free(&r);
        tapi_snap after = tapi_snapshot(s->c, "hp");
        tapi_assert_same(&before, &after);
        tapi_snap_free(&before);
        tapi_snap_free(&after);
    }
    hdrs[nh] = NULL;
    assert_non_null(ex_loss);
    assert_non_null(ex_worker);
    assert_non_null(ex_key);
    optd_response r = tapi_req_bin(s->c, "POST", "/v1/sessions/hp/step", hdrs, g, sizeof g);
    if (r.status != 200)
        fail_msg("step with every documented header at its example: %d %.300s", r.status, r.body);
    check_answer(o, "header examples", &r);
    optd_response_free(&r);
    r = tapi_req_bin(s->c, "POST", "/v1/sessions/hp/step", hdrs, g, sizeof g);
    assert_int_equal(r.status, 200);
    assert_true(has_header(&r, "Optd-Replayed")); /* the key was read */
    optd_response_free(&r);
    r = tapi_req(s->c, "GET", "/v1/sessions/hp/history", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *j = tapi_json(&r);
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(j, "steps");
    assert_int_equal(cJSON_GetArraySize(steps), 1);
    const cJSON *e = cJSON_GetArrayItem(steps, 0);
    assert_string_equal(tapi_str(e, "worker"), ex_worker);
    assert_true(tapi_num(e, "loss") == strtod(ex_loss, NULL));
    cJSON_Delete(j);
    optd_response_free(&r);
}

/* ================================ 4: the catalogue against the schemas */

static bool json_equals_yaml(const cJSON *v, const ynode *y)
{
    if (!y)
        return false;
    if (cJSON_IsArray(v)) {
        if (y->kind != Y_SEQ)
            return false;
        const ynode *it = y->child;
        const cJSON *e;
        cJSON_ArrayForEach(e, v)
        {
            if (!it || !scalar_equals(it, e))
                return false;
            it = it->next;
        }
        return it == NULL;
    }
    return scalar_equals(y, v);
}

/* The default of a property, through a $ref when it has none itself. */
static const ynode *prop_default(const ynode *prop)
{
    const ynode *d = yget(prop, "default");
    return d ? d : yget(yderef(prop), "default");
}

static void check_kind(const char *family, const cJSON *entry, const ynode *schema)
{
    const char *type = tapi_str(entry, "type");
    const ynode *props = yget(schema, "properties");
    const ynode *req = yget(schema, "required");
    if (!props)
        fail_msg("%s %s: the schema has no properties", family, type);
    if (!scalar_equals(yget(yget(props, "type"), "const"), cJSON_GetObjectItem(entry, "type")))
        fail_msg("%s %s: the schema's type const differs", family, type);
    if (!yget(schema, "additionalProperties") || yis_true(yget(schema, "additionalProperties")))
        fail_msg("%s %s: the schema must refuse unknown members, as the daemon does", family,
                 type);
    size_t n_cat = 0;
    const cJSON *hp;
    cJSON_ArrayForEach(hp, cJSON_GetObjectItem(entry, "hyperparameters"))
    {
        n_cat++;
        const char *name = tapi_str(hp, "name");
        const ynode *prop = yget(props, name);
        if (!prop)
            fail_msg("%s %s: the catalogue has %s, the spec's schema does not", family, type,
                     name);
        bool cat_req = cJSON_IsTrue(cJSON_GetObjectItem(hp, "required"));
        bool spec_req = false;
        for (const ynode *r = req ? req->child : NULL; r; r = r->next)
            spec_req |= !strcmp(r->val, name);
        if (cat_req != spec_req)
            fail_msg("%s %s.%s: required in the %s only", family, type, name,
                     cat_req ? "catalogue" : "spec");
        const cJSON *def = cJSON_GetObjectItem(hp, "default");
        if (def && !json_equals_yaml(def, prop_default(prop))) {
            char *t = cJSON_PrintUnformatted(def);
            fail_msg("%s %s.%s: the catalogue's default %s differs from the spec's (line %d)",
                     family, type, name, t, prop->line);
        }
        const cJSON *choices = cJSON_GetObjectItem(hp, "choices");
        if (choices && !json_equals_yaml(choices, yget(yderef(prop), "enum")))
            fail_msg("%s %s.%s: choices differ from the spec's enum", family, type, name);
        /* Validate the default against the property's schema too. */
        if (def) {
            char what[200];
            snprintf(what, sizeof what, "%s %s.%s default", family, type, name);
            assert_valid(prop, def, what);
        }
    }
    size_t n_spec = 0;
    for (const ynode *p = props->child; p; p = p->next)
        n_spec += strcmp(p->key, "type") != 0;
    if (n_spec != n_cat)
        fail_msg("%s %s: the spec lists %zu hyperparameters, the catalogue %zu", family, type,
                 n_spec, n_cat);
}

/* Each catalogue entry of a family against the schema its discriminator
 * maps it to; returns how many there were. */
static size_t check_family(const cJSON *cat, const char *member, const char *schema_name,
                           const char *type_enum)
{
    char ref[128];
    snprintf(ref, sizeof ref, "#/components/schemas/%s", schema_name);
    const ynode *mapping = yget(yget(yref(ref), "discriminator"), "mapping");
    assert_non_null(mapping);
    const ynode *en = NULL;
    if (type_enum) {
        snprintf(ref, sizeof ref, "#/components/schemas/%s", type_enum);
        en = yget(yref(ref), "enum");
        assert_non_null(en);
    }
    size_t n = 0;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, cJSON_GetObjectItem(cat, member))
    {
        const char *type = tapi_str(entry, "type");
        const ynode *target = yget(mapping, type);
        if (!target)
            fail_msg("%s %s is in the catalogue, not in the spec's %s", member, type, schema_name);
        check_kind(member, entry, yref(target->val));
        bool in_enum = !en;
        for (const ynode *e = en ? en->child : NULL; e; e = e->next)
            in_enum |= !strcmp(e->val, type);
        if (!in_enum)
            fail_msg("%s %s is missing from the spec's %s", member, type, type_enum);
        n++;
    }
    return n;
}

static size_t count_children(const ynode *n)
{
    size_t k = 0;
    for (const ynode *c = n ? n->child : NULL; c; c = c->next)
        k++;
    return k;
}

static void test_catalogue_matches_schemas(void **state)
{
    suite *s = *state;
    spec_load();
    optd_response r = tapi_req(s->c, "GET", "/v1/optimizers", NULL, NULL);
    assert_int_equal(r.status, 200);
    cJSON *cat = tapi_json(&r);
    size_t n_opt = check_family(cat, "optimizers", "Optimizer", "OptimizerType");
    /* the optimizer enum is exactly the catalogue's list */
    assert_int_equal(n_opt, count_children(yget(yref("#/components/schemas/OptimizerType"),
                                                "enum")));
    assert_int_equal(n_opt, count_children(yget(yget(yref("#/components/schemas/Optimizer"),
                                                     "discriminator"),
                                                "mapping")));
    check_family(cat, "schedules", "Schedule", "ScheduleType");
    size_t n_clip = check_family(cat, "clips", "Clip", "ClipType");
    assert_int_equal(n_clip,
                     count_children(yget(yref("#/components/schemas/ClipType"), "enum")));
    size_t n_mode = check_family(cat, "modes", "Mode", NULL);
    assert_int_equal(n_mode, 2);
    cJSON_Delete(cat);
    optd_response_free(&r);
}

/* ================================= 5: problem types and docs/errors.md */

static void test_problem_types_documented(void **state)
{
    (void)state;
    spec_load();
    const ynode *en = yget(yget(yget(yref("#/components/schemas/Problem"), "properties"), "type"),
                           "enum");
    assert_non_null(en);
    /* Every error status the spec documents anywhere, and 405, maps to a
     * URN of the enum. */
    bool status_seen[600] = {false};
    status_seen[405] = true;
    for (size_t i = 0; i < g_n_ops; i++)
        for (const ynode *c = yget(g_ops[i].op, "responses")->child; c; c = c->next)
            if (atoi(c->key) >= 400 && atoi(c->key) < 600)
                status_seen[atoi(c->key)] = true;
    for (int st = 400; st < 600; st++) {
        if (!status_seen[st])
            continue;
        const char *urn = api_problem_type(st);
        bool in = false;
        for (const ynode *e = en->child; e; e = e->next)
            in |= !strcmp(e->val, urn);
        if (!in)
            fail_msg("status %d answers %s, which Problem.type does not list", st, urn);
    }
    /* Every URN has its own section in docs/errors.md. */
    char path[1024];
    repo_file(ERRORS_DOC, path, sizeof path);
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    static char doc[200000];
    size_t n = fread(doc, 1, sizeof doc - 1, f);
    doc[n] = '\0';
    fclose(f);
    for (const ynode *e = en->child; e; e = e->next) {
        char heading[200];
        snprintf(heading, sizeof heading, "\n## `%s`", e->val);
        if (!strstr(doc, heading))
            fail_msg("%s has no section \"## `%s`\"", ERRORS_DOC, e->val);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_reads_and_is_regular),
        cmocka_unit_test(test_validator_refuses_what_the_spec_forbids),
        cmocka_unit_test(test_spec_paths_equal_route_table),
        cmocka_unit_test(test_problem_types_documented),
        cmocka_unit_test(test_operations_answer_documented_statuses),
        cmocka_unit_test(test_other_methods_answer_405_with_allow),
        cmocka_unit_test(test_step_response_headers),
        cmocka_unit_test(test_step_header_parameters),
        cmocka_unit_test(test_catalogue_matches_schemas),
    };
    return cmocka_run_group_tests(tests, suite_setup, suite_teardown);
}
