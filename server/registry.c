/*
 * registry.c -- the hot sessions: a hash map from name to session, an LRU
 * list for eviction under the --cache-mb budget, and the lock protocol.
 *
 * Lock order: registry lock, then a session's lock -- never the other way
 * while waiting.  A session is used only while acquired (refs > 0) and
 * locked; it is freed only when dead and unreferenced.
 */
#include "server/observe.h"
#include "server/server.h"

#include <stdlib.h>
#include <string.h>

#define N_BUCKETS 4096

struct srv_registry {
    pthread_mutex_t mu;
    storage *db;
    eng_pool *pool;
    size_t cache_bytes;
    size_t hot_bytes;
    size_t hot_count;
    eng_session *buckets[N_BUCKETS];
    eng_session *lru_head, *lru_tail; /* head = most recently used */
};

static unsigned hash_name(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % N_BUCKETS;
}

static void lru_unlink(srv_registry *r, eng_session *s)
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

static void lru_push_front(srv_registry *r, eng_session *s)
{
    s->lru_prev = NULL;
    s->lru_next = r->lru_head;
    if (r->lru_head)
        r->lru_head->lru_prev = s;
    r->lru_head = s;
    if (!r->lru_tail)
        r->lru_tail = s;
}

static eng_session *find(srv_registry *r, const char *name)
{
    for (eng_session *s = r->buckets[hash_name(name)]; s; s = s->hnext)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

/* Removes s from the map and the LRU (registry lock held). */
static void unmap(srv_registry *r, eng_session *s)
{
    eng_session **pp = &r->buckets[hash_name(s->name)];
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

static void map(srv_registry *r, eng_session *s)
{
    unsigned b = hash_name(s->name);
    s->hnext = r->buckets[b];
    r->buckets[b] = s;
    lru_push_front(r, s);
    s->reg_n = s->cfg.size;
    s->reg_dtype = (int)s->cfg.dtype;
    s->acct_bytes = eng_session_bytes(s);
    r->hot_bytes += s->acct_bytes;
    r->hot_count++;
}

srv_registry *srv_registry_new(storage *db, eng_pool *pool, size_t cache_bytes)
{
    srv_registry *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    pthread_mutex_init(&r->mu, NULL);
    r->db = db;
    r->pool = pool;
    r->cache_bytes = cache_bytes;
    return r;
}

int srv_registry_vector_shape(srv_registry *r, const char *name, uint64_t *n, optim_dtype *dt)
{
    pthread_mutex_lock(&r->mu);
    eng_session *s = find(r, name);
    if (s && s->reg_n > 0) {
        *n = s->reg_n;
        *dt = (optim_dtype)s->reg_dtype;
        pthread_mutex_unlock(&r->mu);
        return ENG_OK;
    }
    pthread_mutex_unlock(&r->mu);
    /* Cold (or being loaded): the stored config says. */
    storage_session_info info;
    int err = storage_session_get(r->db, name, &info);
    if (err != STORAGE_OK)
        return err;
    api_config cfg;
    if (api_config_from_json(info.config, &cfg)) {
        storage_session_info_free(&info);
        return STORAGE_ECORRUPT;
    }
    *n = cfg.size;
    *dt = cfg.dtype;
    api_config_free(&cfg);
    storage_session_info_free(&info);
    return ENG_OK;
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
static void checkpoint_if_dirty(srv_registry *r, eng_session *s)
{
    if (__atomic_load_n(&s->dead, __ATOMIC_ACQUIRE) || s->log_bytes == 0)
        return;
    int err = eng_checkpoint(r->db, s, false);
    if (err != ENG_OK)
        srv_log(SRV_LOG_WARN, "checkpoint of session %s failed (%s): %s; its log replays at the "
                              "next load", s->name, eng_strerror(err), storage_last_error());
}

void srv_registry_free(srv_registry *r)
{
    if (!r)
        return;
    for (int b = 0; b < N_BUCKETS; b++) {
        eng_session *s = r->buckets[b];
        while (s) {
            eng_session *next = s->hnext;
            eng_lock(s);
            checkpoint_if_dirty(r, s);
            eng_unlock(s);
            eng_session_free(s);
            s = next;
        }
    }
    pthread_mutex_destroy(&r->mu);
    free(r);
}

int srv_registry_acquire(srv_registry *r, const char *name, eng_session **out)
{
    /* Lock order: a session's lock, then the registry's, never the other
     * way round (a session lock is only try-locked under the registry's,
     * by evict).  A cold session's shell is therefore locked before the
     * registry is taken to map it. */
    eng_session *shell = NULL;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        eng_session *s = find(r, name);
        bool load = false;
        if (!s && !shell) {
            pthread_mutex_unlock(&r->mu);
            if (!(shell = eng_session_shell(name)))
                return ENG_ENOMEM;
            eng_lock(shell);
            continue; /* look again: another thread may have mapped it */
        }
        if (!s) {
            /* Cold: map the empty shell, locked by this thread, and read it
             * after letting the registry go.  Whoever wants it meanwhile
             * waits on its session lock, not on the registry. */
            s = shell;
            shell = NULL;
            map(r, s);
            load = true;
        } else {
            lru_unlink(r, s);
            lru_push_front(r, s);
        }
        s->refs++;
        pthread_mutex_unlock(&r->mu);
        if (shell) {
            /* Mapped by another thread meanwhile: ours is not needed. */
            eng_unlock(shell);
            eng_session_free(shell);
            shell = NULL;
        }
        if (load) {
            double t0 = obs_now();
            int err = eng_session_load(r->db, r->pool, s);
            if (err == ENG_OK)
                obs_session_loaded(obs_now() - t0);
            if (err != ENG_OK) {
                if (err != STORAGE_ENOTFOUND)
                    srv_log(SRV_LOG_ERROR, "loading session %s failed (%s): %s", name,
                            eng_strerror(err), storage_last_error());
                srv_registry_drop(r, s);
                srv_registry_release(r, s);
                return err;
            }
            /* Its size is known now. */
            pthread_mutex_lock(&r->mu);
            if (!s->dead) {
                r->hot_bytes -= s->acct_bytes;
                s->acct_bytes = eng_session_bytes(s);
                r->hot_bytes += s->acct_bytes;
                s->reg_n = s->cfg.size;
                s->reg_dtype = (int)s->cfg.dtype;
            }
            pthread_mutex_unlock(&r->mu);
            *out = s;
            return ENG_OK;
        }
        eng_lock(s);
        /* dead is written under the registry lock, read here under the
         * session's: atomic loads and stores keep that race-free. */
        if (!__atomic_load_n(&s->dead, __ATOMIC_ACQUIRE)) {
            *out = s;
            return ENG_OK;
        }
        /* Dropped (or its load failed) while we waited: let go and look
         * again. */
        eng_unlock(s);
        pthread_mutex_lock(&r->mu);
        bool last = --s->refs == 0;
        pthread_mutex_unlock(&r->mu);
        if (last)
            eng_session_free(s);
    }
}

void srv_registry_drop(srv_registry *r, eng_session *s)
{
    pthread_mutex_lock(&r->mu);
    if (!s->dead) {
        unmap(r, s);
        __atomic_store_n(&s->dead, true, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&r->mu);
}

void srv_registry_hold(srv_registry *r, eng_session *s)
{
    pthread_mutex_lock(&r->mu);
    s->refs++;
    pthread_mutex_unlock(&r->mu);
}

void srv_registry_unhold(srv_registry *r, eng_session *s)
{
    pthread_mutex_lock(&r->mu);
    bool free_it = --s->refs == 0 && s->dead;
    pthread_mutex_unlock(&r->mu);
    if (free_it)
        eng_session_free(s);
}

static void evict(srv_registry *r);

void srv_registry_insert(srv_registry *r, eng_session *s)
{
    pthread_mutex_lock(&r->mu);
    eng_session *old = find(r, s->name);
    if (old) {
        /* A stale entry of a deleted name: it is dead already or about to
         * be; unmap it so that the new session wins. */
        unmap(r, old);
        __atomic_store_n(&old->dead, true, __ATOMIC_RELEASE);
        if (old->refs == 0)
            eng_session_free(old);
    }
    map(r, s);
    /* --cache-mb holds at every point a session becomes hot, creation
     * included. */
    evict(r);
    pthread_mutex_unlock(&r->mu);
}

/* Evicts least recently used, unreferenced sessions over the budget. */
static void evict(srv_registry *r)
{
    while (r->hot_bytes > r->cache_bytes) {
        eng_session *s = r->lru_tail;
        while (s && s->refs > 0)
            s = s->lru_prev;
        if (!s)
            return;
        if (pthread_mutex_trylock(&s->mu) != 0)
            return;
        s->locked = true;
        checkpoint_if_dirty(r, s);
        unmap(r, s);
        __atomic_store_n(&s->dead, true, __ATOMIC_RELEASE);
        eng_unlock(s);
        srv_log(SRV_LOG_DEBUG, "evicted session %s", s->name);
        obs_session_evicted();
        eng_session_free(s);
    }
}

void srv_registry_release(srv_registry *r, eng_session *s)
{
    eng_unlock(s);
    pthread_mutex_lock(&r->mu);
    bool free_it = --s->refs == 0 && s->dead;
    if (!s->dead) {
        /* Sizes change when buffers appear (PATCH, accumulation). */
        size_t now = eng_session_bytes(s);
        r->hot_bytes = r->hot_bytes - s->acct_bytes + now;
        s->acct_bytes = now;
        evict(r);
    }
    pthread_mutex_unlock(&r->mu);
    if (free_it)
        eng_session_free(s);
}
