/*
 * health.c -- `optd --check-health URL`: a tiny HTTP/1.0 GET of URL's
 * /healthz over a plain socket, so that a container HEALTHCHECK needs no
 * extra tool.  Exit 0 when the answer is 200.
 */
#include "server/server.h"

#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int srv_check_health(const char *url);

int srv_check_health(const char *url)
{
    char host[256] = "127.0.0.1", port[16] = "80";
    const char *p = url;
    if (strncmp(p, "http://", 7) == 0)
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
    if (ok) {
        int n = snprintf(buf, sizeof buf, "GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n", host);
        ok = write(fd, buf, (size_t)n) == n;
    }
    ssize_t got = ok ? read(fd, buf, sizeof buf - 1) : -1;
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
