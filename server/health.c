/*
 * health.c -- `optd --check-health URL`: a tiny HTTP/1.0 GET of URL's
 * /healthz over a plain socket, so that a container HEALTHCHECK needs no
 * extra tool.  Exit 0 when the answer is 200.  An https:// URL (a daemon
 * started with --tls-cert) is probed through GnuTLS without verifying the
 * certificate: the probe asks whether the daemon answers, not who it is.
 */
#include "server/server.h"

#include <gnutls/gnutls.h>

#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int srv_check_health(const char *url);

/* GET /healthz over TLS on the connected socket fd; the first bytes of
 * the answer in buf (NUL not added).  Returns their count, or -1. */
static ssize_t tls_get(int fd, const char *host, char *buf, size_t n)
{
    gnutls_session_t s = NULL;
    gnutls_certificate_credentials_t cred = NULL;
    ssize_t got = -1;
    if (gnutls_certificate_allocate_credentials(&cred) < 0 || gnutls_init(&s, GNUTLS_CLIENT) < 0 ||
        gnutls_set_default_priority(s) < 0 ||
        gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred) < 0)
        goto out;
    gnutls_transport_set_int(s, fd);
    gnutls_handshake_set_timeout(s, GNUTLS_DEFAULT_HANDSHAKE_TIMEOUT);
    int r;
    do
        r = gnutls_handshake(s);
    while (r < 0 && !gnutls_error_is_fatal(r));
    if (r < 0) {
        fprintf(stderr, "optd: TLS handshake with %s failed: %s\n", host, gnutls_strerror(r));
        goto out;
    }
    int len = snprintf(buf, n, "GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n", host);
    if (gnutls_record_send(s, buf, (size_t)len) != len)
        goto out;
    do
        got = gnutls_record_recv(s, buf, n - 1);
    while (got == GNUTLS_E_AGAIN || got == GNUTLS_E_INTERRUPTED);
    if (got < 0)
        got = -1;
    gnutls_bye(s, GNUTLS_SHUT_WR);
out:
    if (s)
        gnutls_deinit(s);
    if (cred)
        gnutls_certificate_free_credentials(cred);
    return got;
}

int srv_check_health(const char *url)
{
    char host[256] = "127.0.0.1", port[16] = "80";
    const char *p = url;
    bool tls = strncmp(p, "https://", 8) == 0;
    if (tls) {
        p += 8;
        strcpy(port, "443");
    } else if (strncmp(p, "http://", 7) == 0)
        p += 7;
    const char *end = p + strcspn(p, "/");
    const char *colon = NULL;
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(end - p));
        if (!rb)
            return 2;
        snprintf(host, sizeof host, "%.*s", (int)(rb - p - 1), p + 1);
        colon = rb + 1 < end && rb[1] == ':' ? rb + 1 : NULL;
    } else {
        colon = memchr(p, ':', (size_t)(end - p));
        snprintf(host, sizeof host, "%.*s", (int)((colon ? colon : end) - p), p);
    }
    if (colon)
        snprintf(port, sizeof port, "%.*s", (int)(end - colon - 1), colon + 1);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0) {
        fprintf(stderr, "optd: cannot resolve %s\n", host);
        return 1;
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    struct timeval tv = {5, 0};
    if (fd >= 0) {
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    int ok = fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
    freeaddrinfo(ai);
    char buf[256];
    ssize_t got = -1;
    if (ok && tls) {
        got = tls_get(fd, host, buf, sizeof buf);
    } else if (ok) {
        int n = snprintf(buf, sizeof buf, "GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n", host);
        if (write(fd, buf, (size_t)n) == n)
            got = read(fd, buf, sizeof buf - 1);
    }
    if (fd >= 0)
        close(fd);
    if (got <= 0) {
        fprintf(stderr, "optd: no answer from %s\n", url);
        return 1;
    }
    buf[got] = '\0';
    int healthy = strncmp(buf, "HTTP/1.", 7) == 0 && strncmp(buf + 8, " 200", 4) == 0;
    printf("%s\n", healthy ? "healthy" : "unhealthy");
    return healthy ? 0 : 1;
}
