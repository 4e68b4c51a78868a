/*
 * tls.c -- HTTPS with libmicrohttpd's GnuTLS: the server certificate and
 * key (--tls-cert, --tls-key), the CA client certificates must verify
 * against (--tls-client-ca, mutual TLS), and their reload on SIGHUP.
 *
 * The files are loaded with GnuTLS into a generation (a certificate chain,
 * its private key and, for mutual TLS, a trust list).  libmicrohttpd asks
 * for the certificate in each handshake through its certificate callback
 * (gnutls_certificate_retrieve_function2).  Each connection pins the
 * generation that was current when it was accepted (libmicrohttpd's
 * connection notification, a reference kept in the socket context), so a
 * reload never frees what a handshake or a connection in flight uses: the
 * old generation is freed when its last connection closes.  A reload that
 * fails (unreadable file, bad PEM, key that does not match the
 * certificate) logs why and keeps the current generation.
 *
 * Mutual TLS is enforced in the handshake.  libmicrohttpd's own
 * MHD_OPTION_HTTPS_MEM_TRUST only *requests* a client certificate
 * (GNUTLS_CERT_REQUEST) and leaves verification to the application; here
 * the connection notification, which runs after libmicrohttpd made the
 * GnuTLS session and before its handshake, sets GNUTLS_CERT_REQUIRE and a
 * verify function that checks the chain against the pinned generation's
 * trust list (key purpose: TLS client).  A client without a certificate,
 * or with one the CA did not sign, fails the handshake and never reaches
 * routing.
 *
 * libmicrohttpd 0.9.75 sets the GnuTLS session's pointer to its
 * connection (gnutls_session_set_ptr); the callbacks find the pinned
 * generation through it.
 */
#include "server/server.h"

#include <gnutls/gnutls.h>
#include <gnutls/abstract.h>
#include <gnutls/x509.h>
#include <microhttpd.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* Longest certificate chain read from --tls-cert, and accepted from a
 * client. */
#define TLS_CHAIN_MAX 16
/* Largest PEM file read (a chain of a few certificates is a few KiB). */
#define TLS_FILE_MAX (1u << 20)

typedef struct tls_gen {
    srv_tls *owner;
    gnutls_pcert_st pcert[TLS_CHAIN_MAX];
    unsigned n_pcert;
    gnutls_privkey_t key;
    gnutls_x509_trust_list_t trust; /* NULL: no client certificate asked */
    unsigned id;
    int refs; /* the current slot and each connection; under owner->mu */
} tls_gen;

struct srv_tls {
    pthread_mutex_t mu;
    tls_gen *cur;
    unsigned next_id;
    char cert[sizeof(((srv_config *)0)->tls_cert)];
    char key[sizeof(((srv_config *)0)->tls_key)];
    char ca[sizeof(((srv_config *)0)->tls_client_ca)];
};

/* Reads a whole file into d (a new buffer, NUL after the data; caller
 * frees d->data).  0, or -1 with why filled. */
static int read_pem(const char *path, gnutls_datum_t *d, char *why, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(why, n, "cannot read %s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char *buf = malloc(TLS_FILE_MAX + 1);
    size_t len = buf ? fread(buf, 1, TLS_FILE_MAX + 1, f) : 0;
    int err = ferror(f);
    fclose(f);
    if (!buf || err || len > TLS_FILE_MAX || len == 0) {
        snprintf(why, n, "%s: %s", path,
                 !buf ? "out of memory" : err ? "read error" : len ? "larger than 1 MiB" : "empty");
        free(buf);
        return -1;
    }
    buf[len] = '\0';
    d->data = buf;
    d->size = (unsigned)len;
    return 0;
}

static void gen_free(tls_gen *g)
{
    if (!g)
        return;
    for (unsigned i = 0; i < g->n_pcert; i++)
        gnutls_pcert_deinit(&g->pcert[i]);
    if (g->key)
        gnutls_privkey_deinit(g->key);
    if (g->trust)
        gnutls_x509_trust_list_deinit(g->trust, 1);
    free(g);
}

/* Logs the subject and expiry of the generation's leaf certificate. */
static void gen_describe(const tls_gen *g, const char *what)
{
    gnutls_x509_crt_t crt;
    gnutls_datum_t dn = {NULL, 0};
    time_t until = 0;
    if (gnutls_x509_crt_init(&crt) == 0) {
        if (gnutls_x509_crt_import(crt, &g->pcert[0].cert, GNUTLS_X509_FMT_DER) == 0) {
            gnutls_x509_crt_get_dn3(crt, &dn, 0);
            until = gnutls_x509_crt_get_expiration_time(crt);
        }
        gnutls_x509_crt_deinit(crt);
    }
    struct tm tm;
    char when[32] = "?";
    if (until > 0 && gmtime_r(&until, &tm))
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    srv_log(SRV_LOG_INFO, "TLS %s: certificate %s (expires %s)%s, generation %u", what,
            dn.data ? (const char *)dn.data : "?", when,
            g->trust ? ", client certificates required" : "", g->id);
    gnutls_free(dn.data);
    if (until > 0 && until < time(NULL))
        srv_log(SRV_LOG_WARN, "TLS: the certificate expired on %s", when);
}

/* Loads cert, key and (when ca is not empty) the client CA into a new
 * generation with one reference.  0, or -1 with why filled. */
static int gen_load(const char *cert, const char *key, const char *ca, tls_gen **out, char *why,
                    size_t n)
{
    gnutls_datum_t cd = {NULL, 0}, kd = {NULL, 0}, cad = {NULL, 0};
    gnutls_certificate_credentials_t check = NULL;
    tls_gen *g = calloc(1, sizeof *g);
    int rc = -1, r;
    if (!g) {
        snprintf(why, n, "out of memory");
        return -1;
    }
    if (read_pem(cert, &cd, why, n) || read_pem(key, &kd, why, n) ||
        (ca[0] && read_pem(ca, &cad, why, n)))
        goto out;
    /* GnuTLS's own check that the files parse and the key belongs to the
     * certificate. */
    if ((r = gnutls_certificate_allocate_credentials(&check)) < 0 ||
        (r = gnutls_certificate_set_x509_key_mem(check, &cd, &kd, GNUTLS_X509_FMT_PEM)) < 0) {
        snprintf(why, n, "%s with %s: %s", cert, key, gnutls_strerror(r));
        goto out;
    }
    g->n_pcert = TLS_CHAIN_MAX;
    if ((r = gnutls_pcert_list_import_x509_raw(g->pcert, &g->n_pcert, &cd, GNUTLS_X509_FMT_PEM,
                                               0)) < 0) {
        g->n_pcert = 0;
        snprintf(why, n, "%s: %s", cert, gnutls_strerror(r));
        goto out;
    }
    if ((r = gnutls_privkey_init(&g->key)) < 0 ||
        (r = gnutls_privkey_import_x509_raw(g->key, &kd, GNUTLS_X509_FMT_PEM, NULL, 0)) < 0) {
        snprintf(why, n, "%s: %s", key, gnutls_strerror(r));
        goto out;
    }
    if (ca[0]) {
        if ((r = gnutls_x509_trust_list_init(&g->trust, 0)) < 0) {
            g->trust = NULL;
            snprintf(why, n, "%s: %s", ca, gnutls_strerror(r));
            goto out;
        }
        r = gnutls_x509_trust_list_add_trust_mem(g->trust, &cad, NULL, GNUTLS_X509_FMT_PEM, 0, 0);
        if (r <= 0) {
            snprintf(why, n, "%s: %s", ca,
                     r < 0 ? gnutls_strerror(r) : "no CA certificate in the file");
            goto out;
        }
    }
    g->refs = 1;
    *out = g;
    g = NULL;
    rc = 0;
out:
    if (check)
        gnutls_certificate_free_credentials(check);
    free(cd.data);
    free(kd.data);
    free(cad.data);
    gen_free(g);
    return rc;
}

static void gen_unref(tls_gen *g)
{
    srv_tls *t = g->owner;
    pthread_mutex_lock(&t->mu);
    int left = --g->refs;
    pthread_mutex_unlock(&t->mu);
    if (left == 0) {
        srv_log(SRV_LOG_DEBUG, "TLS: generation %u released", g->id);
        gen_free(g);
    }
}

int srv_tls_open(const srv_config *cfg, srv_tls **out)
{
    srv_tls *t = calloc(1, sizeof *t);
    if (!t) {
        srv_log(SRV_LOG_ERROR, "TLS: out of memory");
        return -1;
    }
    snprintf(t->cert, sizeof t->cert, "%s", cfg->tls_cert);
    snprintf(t->key, sizeof t->key, "%s", cfg->tls_key);
    snprintf(t->ca, sizeof t->ca, "%s", cfg->tls_client_ca);
    char why[1536];
    if (gen_load(t->cert, t->key, t->ca, &t->cur, why, sizeof why)) {
        srv_log(SRV_LOG_ERROR, "TLS: %s", why);
        free(t);
        return -1;
    }
    pthread_mutex_init(&t->mu, NULL);
    t->cur->owner = t;
    t->cur->id = ++t->next_id;
    gen_describe(t->cur, "loaded");
    *out = t;
    return 0;
}

int srv_tls_reload(srv_tls *t)
{
    tls_gen *g;
    char why[1536];
    if (gen_load(t->cert, t->key, t->ca, &g, why, sizeof why)) {
        srv_log(SRV_LOG_ERROR, "SIGHUP: TLS files not reloaded, the previous certificate stays: %s",
                why);
        return -1;
    }
    g->owner = t;
    pthread_mutex_lock(&t->mu);
    tls_gen *old = t->cur;
    g->id = ++t->next_id;
    t->cur = g;
    pthread_mutex_unlock(&t->mu);
    gen_describe(g, "reloaded on SIGHUP");
    gen_unref(old); /* freed now, or when its last connection closes */
    return 0;
}

void srv_tls_free(srv_tls *t)
{
    if (!t)
        return;
    gen_unref(t->cur);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* The generation the connection of a GnuTLS session pinned, or NULL. */
static tls_gen *gen_of(gnutls_session_t s)
{
    struct MHD_Connection *c = gnutls_session_get_ptr(s);
    const union MHD_ConnectionInfo *i =
        c ? MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT) : NULL;
    return i ? i->socket_context : NULL;
}

/* The client's address for a log line. */
static void peer_name(gnutls_session_t s, char *buf, size_t n)
{
    struct MHD_Connection *c = gnutls_session_get_ptr(s);
    const union MHD_ConnectionInfo *i =
        c ? MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS) : NULL;
    snprintf(buf, n, "?");
    if (!i || !i->client_addr)
        return;
    if (i->client_addr->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)i->client_addr)->sin_addr,
                  buf, (socklen_t)n);
    else if (i->client_addr->sa_family == AF_INET6)
        inet_ntop(AF_INET6,
                  &((const struct sockaddr_in6 *)(const void *)i->client_addr)->sin6_addr, buf,
                  (socklen_t)n);
}

/* gnutls_certificate_retrieve_function2: the pinned generation's chain
 * and key (owned by the generation, which outlives the connection). */
static int cert_cb(gnutls_session_t s, const gnutls_datum_t *req_ca, int n_req,
                   const gnutls_pk_algorithm_t *pk, int n_pk, gnutls_pcert_st **pcert,
                   unsigned int *n_pcert, gnutls_privkey_t *key)
{
    (void)req_ca;
    (void)n_req;
    (void)pk;
    (void)n_pk;
    tls_gen *g = gen_of(s);
    if (!g)
        return -1;
    *pcert = g->pcert;
    *n_pcert = g->n_pcert;
    *key = g->key;
    return 0;
}

/* The session's verify function (mutual TLS): 0 lets the handshake go on,
 * anything else fails it. */
static int verify_client(gnutls_session_t s)
{
    tls_gen *g = gen_of(s);
    char who[64];
    peer_name(s, who, sizeof who);
    if (!g || !g->trust)
        return -1;
    unsigned n = 0;
    const gnutls_datum_t *raw = gnutls_certificate_get_peers(s, &n);
    if (!raw || n == 0) {
        srv_log(SRV_LOG_WARN, "TLS: %s refused: no client certificate", who);
        return -1;
    }
    if (n > TLS_CHAIN_MAX)
        n = TLS_CHAIN_MAX;
    gnutls_x509_crt_t crts[TLS_CHAIN_MAX];
    unsigned have = 0;
    int bad = 0;
    for (; have < n; have++) {
        if (gnutls_x509_crt_init(&crts[have]) < 0)
            break;
        if (gnutls_x509_crt_import(crts[have], &raw[have], GNUTLS_X509_FMT_DER) < 0) {
            gnutls_x509_crt_deinit(crts[have]);
            bad = 1;
            break;
        }
    }
    unsigned status = GNUTLS_CERT_INVALID;
    if (!bad && have == n) {
        gnutls_typed_vdata_st purpose = {GNUTLS_DT_KEY_PURPOSE_OID,
                                         (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT, 0};
        if (gnutls_x509_trust_list_verify_crt2(g->trust, crts, n, &purpose, 1, 0, &status,
                                               NULL) < 0)
            status = GNUTLS_CERT_INVALID;
    }
    for (unsigned i = 0; i < have; i++)
        gnutls_x509_crt_deinit(crts[i]);
    if (status == 0)
        return 0;
    gnutls_datum_t txt = {NULL, 0};
    gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &txt, 0);
    srv_log(SRV_LOG_WARN, "TLS: %s refused: client certificate does not verify against %s: %s",
            who, g->owner->ca, txt.data ? (const char *)txt.data : "invalid");
    gnutls_free(txt.data);
    return -1;
}

/* MHD_OPTION_NOTIFY_CONNECTION: pins the current generation on a new
 * connection (and, for mutual TLS, requires a client certificate in its
 * handshake); releases it when the connection closes. */
static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    srv_tls *t = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        pthread_mutex_lock(&t->mu);
        tls_gen *g = t->cur;
        g->refs++;
        pthread_mutex_unlock(&t->mu);
        *socket_context = g;
        const union MHD_ConnectionInfo *i =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
        if (g->trust && i && i->tls_session) {
            gnutls_session_t s = i->tls_session;
            gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
            gnutls_session_set_verify_function(s, verify_client);
        }
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED && *socket_context) {
        gen_unref(*socket_context);
        *socket_context = NULL;
    }
}

int srv_tls_mhd_options(srv_tls *t, struct MHD_OptionItem *opts)
{
    int n = 0;
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_CERT_CALLBACK, 0, (void *)cert_cb};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, t};
    opts[n] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    return n;
}
