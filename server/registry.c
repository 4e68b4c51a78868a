/*
 * registry.c -- the hot sessions: a hash map from name to session, an LRU
 * list for eviction under the --cache-mb budget, and the lock protocol.
 *
 * Lock order: registry lock, then a session's lock -- never the other way
 * while waiting.  A session is used only while acquired (refs > 0) and
 * locked; it is freed only when dead and unreferenced.
 */
#include "server/server.h"

#include <stdlib.h>
#include <string.h>

#define N_BUCKETS 4096

struct srv_registry {
    pthread_mutex_t mu;
    storage *db;
    size_t cache_bytes;
    size_t hot_bytes;
    size_t hot_count;
    srv_session *buckets[N_BUCKETS];
    srv_session *lru_head, *lru_tail; /* head = most recently used */
};

static unsigned hash_name(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % N_BUCKETS;
}

static void lru_unlink(srv_registry *r, srv_session *s)
{
    if (s->lru_prev)
        s->lru_prev->lru_next = s->lru_next;
    else if (r->lru_head == s)
        r->lru_head = s->lru_next;
    if (s->lru_next)
        s->lru_next->lru_prev = s->lru_prev;
    else if (r->lru_tail == s)
        r->lru_tail = s->lru_prev;
    s->lru_prev = s->lru_next = NULL;
}

static void lru_push_front(srv_registry *r, srv_session *s)
{
    s->lru_prev = NULL;
    s->lru_next = r->lru_head;
    if (r->lru_head)
        r->lru_head->lru_prev = s;
    r->lru_head = s;
    if (!r->lru_tail)
        r->lru_tail = s;
}

static srv_session *find(srv_registry *r, const char *name)
{
    for (srv_session *s = r->buckets[hash_name(name)]; s; s = s->hnext)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

/* Removes s from the map and the LRU (registry lock held). */
static void unmap(srv_registry *r, srv_session *s)
{
    srv_session **pp = &r->buckets[hash_name(s->name)];
    while (*pp && *pp != s)
        pp = &(*pp)->hnext;
    if (*pp) {
        *pp = s->hnext;
        lru_unlink(r, s);
        r->hot_bytes -= s->acct_bytes;
        r->hot_count--;
    }
    s->hnext = NULL;
}

static void map(srv_registry *r, srv_session *s)
{
    unsigned b = hash_name(s->name);
    s->hnext = r->buckets[b];
    r->buckets[b] = s;
    lru_push_front(r, s);
    s->acct_bytes = srv_session_bytes(s);
    r->hot_bytes += s->acct_bytes;
    r->hot_count++;
}

srv_registry *srv_registry_new(storage *db, size_t cache_bytes)
{
    srv_registry *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    pthread_mutex_init(&r->mu, NULL);
    r->db = db;
    r->cache_bytes = cache_bytes;
    return r;
}

storage *srv_registry_storage(srv_registry *r)
{
    return r->db;
}

size_t srv_registry_hot_count(srv_registry *r)
{
    pthread_mutex_lock(&r->mu);
    size_t n = r->hot_count;
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Writes a checkpoint when log rows were written since the last one, so
 * that a later load replays nothing.  Session locked. */
static void checkpoint_if_dirty(srv_registry *r, srv_session *s)
{
    if (s->dead || s->log_bytes == 0)
        return;
    size_t len;
    void *blob = srv_session_checkpoint(s, &len);
    if (!blob)
        return;
    if (storage_checkpoint(r->db, s->id, NULL, &(storage_iov){blob, len}, 1, s->seq,
                           (int64_t)s->st.step, srv_now_ms()) == STORAGE_OK)
        s->log_bytes = 0;
    free(blob);
}

void srv_registry_free(srv_registry *r)
{
    if (!r)
        return;
    for (int b = 0; b < N_BUCKETS; b++) {
        srv_session *s = r->buckets[b];
        while (s) {
            srv_session *next = s->hnext;
            checkpoint_if_dirty(r, s);
            srv_session_free(s);
            s = next;
        }
    }
    pthread_mutex_destroy(&r->mu);
    free(r);
}

int srv_registry_acquire(srv_registry *r, const char *name, srv_session **out)
{
    for (;;) {
        pthread_mutex_lock(&r->mu);
        srv_session *s = find(r, name);
        if (!s) {
            /* Cold: load while holding the registry lock so that one load
             * happens per name. */
            storage_session_info info;
            int err = storage_session_get(r->db, name, &info);
            if (err == STORAGE_OK) {
                err = srv_session_load(r->db, &info, &s);
                storage_session_info_free(&info);
            }
            if (err != STORAGE_OK) {
                pthread_mutex_unlock(&r->mu);
                if (err != STORAGE_ENOTFOUND)
                    srv_log(SRV_LOG_ERROR, "loading session %s failed (%d): %s", name, err,
                            storage_last_error());
                return err;
            }
            map(r, s);
        } else {
            lru_unlink(r, s);
            lru_push_front(r, s);
        }
        s->refs++;
        pthread_mutex_unlock(&r->mu);
        pthread_mutex_lock(&s->mu);
        if (!s->dead) {
            *out = s;
            return STORAGE_OK;
        }
        /* Dropped while we waited: let go and look again. */
        pthread_mutex_unlock(&s->mu);
        pthread_mutex_lock(&r->mu);
        bool last = --s->refs == 0;
        pthread_mutex_unlock(&r->mu);
        if (last)
            srv_session_free(s);
    }
}

void srv_registry_drop(srv_registry *r, srv_session *s)
{
    pthread_mutex_lock(&r->mu);
    if (!s->dead) {
        unmap(r, s);
        s->dead = true;
    }
    pthread_mutex_unlock(&r->mu);
}

void srv_registry_hold(srv_registry *r, srv_session *s)
{
    pthread_mutex_lock(&r->mu);
    s->refs++;
    pthread_mutex_unlock(&r->mu);
}

void srv_registry_unhold(srv_registry *r, srv_session *s)
{
    pthread_mutex_lock(&r->mu);
    bool free_it = --s->refs == 0 && s->dead;
    pthread_mutex_unlock(&r->mu);
    if (free_it)
        srv_session_free(s);
}

void srv_registry_insert(srv_registry *r, srv_session *s)
{
    pthread_mutex_lock(&r->mu);
    srv_session *old = find(r, s->name);
    if (old) {
        /* A stale entry of a deleted name: it is dead already or about to
         * be; unmap it so that the new session wins. */
        unmap(r, old);
        old->dead = true;
        if (old->refs == 0)
            srv_session_free(old);
    }
    map(r, s);
    pthread_mutex_unlock(&r->mu);
}

/* Evicts least recently used, unreferenced sessions over the budget. */
static void evict(srv_registry *r)
{
    while (r->hot_bytes > r->cache_bytes) {
        srv_session *s = r->lru_tail;
        while (s && s->refs > 0)
            s = s->lru_prev;
        if (!s)
            return;
        if (pthread_mutex_trylock(&s->mu) != 0)
            return;
        checkpoint_if_dirty(r, s);
        unmap(r, s);
        s->dead = true;
        pthread_mutex_unlock(&s->mu);
        srv_log(SRV_LOG_DEBUG, "evicted session %s", s->name);
        srv_session_free(s);
    }
}

void srv_registry_release(srv_registry *r, srv_session *s)
{
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_lock(&r->mu);
    bool free_it = --s->refs == 0 && s->dead;
    if (!s->dead) {
        /* Sizes change when buffers appear (PATCH, accumulation). */
        size_t now = srv_session_bytes(s);
        r->hot_bytes = r->hot_bytes - s->acct_bytes + now;
        s->acct_bytes = now;
        evict(r);
    }
    pthread_mutex_unlock(&r->mu);
    if (free_it)
        srv_session_free(s);
}
