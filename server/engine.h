/*
 * engine.h -- the step engine: one session's state in memory and every
 * operation that changes it -- apply a gradient (non-finite policy,
 * accumulation, clipping, schedule, kernel), commit it to storage,
 * checkpoint, create, load and replay.  Knows nothing of HTTP: handlers
 * decode a request, call the engine, and map its result to a status.
 *
 * The house: HTTP (server/http.c) -> api (decode/encode) -> handlers ->
 * engine -> optim (kernels, vector loops) / storage.
 *
 * Errors: one space.  Every function returns ENG_OK (0) or a negative
 * code: the STORAGE_E* codes pass through unchanged (they are part of this
 * space), the ENG_E* codes below are the engine's own.  eng_strerror()
 * names any of them; the detail of a storage failure is
 * storage_last_error() on the same thread.
 *
 * LOCKING
 *   registry lock (srv_registry.mu) guards the name map, the LRU list,
 *     refs, acct_bytes, hot_bytes and a session's dead flag.
 *   session lock (eng_session.mu) guards everything else in the session:
 *     config, state, vectors, counters, the open synchronous round.  Every
 *     eng_* function that takes a session expects it locked by the caller
 *     (asserted where the lock can be checked).
 *   A cold session is mapped as an empty shell, locked by its loader, and
 *     read from storage after the registry lock is released: others wanting
 *     it wait on its session lock, not on the registry lock (a slow load
 *     stalls only its own session).  A failed load marks it dead.
 *   kernel pool lock (eng_pool.mu) is taken with trylock only: a step that
 *     finds the pool busy runs on its own thread.
 *   storage serialises itself (storage.h).
 *   Order: registry -> session, never the reverse while waiting.  The sync
 *   reaper's list lock is taken alone or after a session lock.
 */
#ifndef ENGINE_H
#define ENGINE_H

#include <assert.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "api/api.h"
#include "optim/optim.h"
#include "storage/storage.h"

/* ------------------------------------------------------------- errors */

#define ENG_OK 0
/* STORAGE_E* (-1 .. -19) pass through. */
#define ENG_ENOMEM STORAGE_ENOMEM
#define ENG_ENONFINITE (-20)  /* a gradient with NaN/Inf under nonfinite=error */
#define ENG_EDAMAGED (-21)    /* stored state failed its checks: not served   */

const char *eng_strerror(int err);

/* --------------------------------------------------------- kernel pool */

/* A few threads that share one large vector's blocks with the calling
 * thread.  threads counts the caller: 1 means no extra thread. */
typedef struct eng_pool eng_pool;
eng_pool *eng_pool_new(int threads);
void eng_pool_free(eng_pool *p);
/* Calls fn(arg, b0, b1) on disjoint contiguous shares of [0, nblocks) and
 * returns when all are done.  When the pool is busy with another session's
 * step, or nblocks is small, the caller does all of it alone: the result is
 * the same either way (blocked reductions, see optim/vec.c). */
void eng_pool_run(eng_pool *p, void (*fn)(void *arg, size_t b0, size_t b1), void *arg,
                  size_t nblocks);

/* ------------------------------------------------------------ session */

typedef struct eng_session eng_session;
/* Longest created_by: a token id or "admin". */
#define ENG_OWNER_MAX 32
typedef struct srv_waiter srv_waiter;

/* A request waiting for its synchronous round to close.  Lives in the
 * HTTP layer's per-connection context; linked into the session's round
 * while suspended, answered (reply filled, done set) before it is resumed. */
struct srv_waiter {
    srv_waiter *next;
    void *conn;                 /* the suspended MHD connection              */
    api_reply reply;
    bool done;
    bool want_binary;
    bool with_params;
    int wire;                   /* optim_wire of a binary answer              */
    char worker[API_WORKER_MAX + 1];
    char key[API_IDEM_MAX + 1]; /* "" when none                              */
    uint64_t fp;                /* the keyed request's fingerprint           */
};

/* A block of one tensor: the unit of the blocked passes. */
typedef struct {
    uint32_t tensor;
    uint32_t len;
    uint64_t off;               /* in the flat vector                         */
} eng_item;

/* Hyperparameters a client set for a group at a step (torch: a scheduler
 * or user code changed param_groups[i]); they stay the group's current
 * values until changed again or the group is PATCHed. */
enum { ENG_HP_LR = 0, ENG_HP_MOMENTUM, ENG_HP_BETA1, ENG_HP_COUNT };
typedef struct {
    bool has[ENG_HP_COUNT];
    double v[ENG_HP_COUNT];
} eng_group_hp;

/* The params' buffer, reference-counted: an answer that streams the params
 * holds a reference, and a step that finds one held updates a copy (copy
 * on write), so a slow reader never delays a step and the usual case, one
 * client waiting for its answer before its next step, copies nothing. */
typedef struct {
    int refs;                   /* atomic                                   */
    void *data;
} eng_pbuf;

struct eng_session {
    char name[API_NAME_MAX + 1];
    int64_t id;                 /* storage id                                  */
    api_config cfg;
    optim_state st;             /* st.step: the session's step (updates
                                   applied); st.buf: the buffers of the whole
                                   vector; st.scalars unused                  */
    optim_state *tst;           /* per tensor: its own step and scalars
                                   (torch's state[p]["step"], ...)             */
    eng_item *items;            /* the layout's blocks, in vector order        */
    size_t n_items;
    eng_group_hp *gcur;         /* per group: the client's current values     */
    bool client_hp;             /* a client has set group hyperparameters    */
    /* work space of one step, per tensor */
    optim_plan *plans;
    uint64_t *goff;             /* offset of the tensor's gradient in the
                                   request's (present tensors only) vector    */
    bool *present;
    optim_plateau plateau;
    void *params;               /* pbuf->data                                 */
    eng_pbuf *pbuf;
    void *accum;                /* pending accumulation (mode.accumulate > 1)  */
    int64_t accum_count;
    optim_vec_partial *parts;   /* one per block: the blocked reductions       */
    double *upd;                /* one per block: update norm partials         */
    int64_t seq;                /* last log row                                */
    size_t log_bytes;           /* replay bytes logged since the checkpoint    */
    int64_t created_ms, updated_ms;
    char created_by[ENG_OWNER_MAX + 1]; /* token id, "admin", "" (none)     */
    double last_lr;
    double last_loss;
    int64_t n_applied, n_stale, n_timeout, n_skipped;

    /* the open synchronous round (mode sync); not persisted: nothing in it
     * has been acknowledged */
    void *round_sum;            /* sum of the round's gradients              */
    int64_t round_count;        /* gradients received                        */
    int64_t round_step;         /* the step the round is for                 */
    int64_t round_deadline_ms;
    double round_loss_sum;
    int64_t round_loss_n;
    char (*round_workers)[API_WORKER_MAX + 1];
    char (*round_keys)[API_IDEM_MAX + 1];
    uint64_t *round_fps;
    srv_waiter *waiters;
    bool round_listed;          /* on the reaper's list                       */
    eng_session *round_next;

    pthread_mutex_t mu;         /* the session lock (LOCKING above)           */
    bool locked;                /* set while mu is held (for assertions)      */

    /* registry bookkeeping (registry lock) */
    uint64_t reg_n;             /* size and dtype for the HTTP layer's body   */
    int reg_dtype;              /* bound (0 size: not known yet, a shell)     */
    int refs;
    size_t acct_bytes;          /* bytes counted against --cache-mb         */
    bool dead;                  /* removed from the registry; reload to use    */
    eng_session *hnext;         /* hash chain                                  */
    eng_session *lru_prev, *lru_next;
};

/* Locks / unlocks the session lock (and keeps the assertion flag). */
void eng_lock(eng_session *s);
void eng_unlock(eng_session *s);
#define ENG_ASSERT_LOCKED(s) assert((s)->locked)

/* Bytes of the session's state in memory (params, buffers, accumulation,
 * bookkeeping): what --cache-mb counts. */
size_t eng_session_bytes(const eng_session *s);

/* A session at step 0 from cfg (deep-copied) and params (copied; NULL:
 * filled per init).  Not in storage yet.  NULL when out of memory. */
eng_session *eng_session_new(const char *name, const api_config *cfg, const void *params,
                             const api_init *init);
/* An empty shell for name, to be filled by eng_session_load. */
eng_session *eng_session_shell(const char *name);
void eng_session_free(eng_session *s);

/* Writes a new session (config + step-0 checkpoint).  STORAGE_EEXIST when
 * the name is taken. */
int eng_session_create(storage *db, eng_session *s, int64_t now_ms);
/* Fills a shell from storage: config, newest checkpoint, replay of the log
 * after it (bit-identical to the live path).  ENOTFOUND, ECORRUPT
 * (checksums, a replay that diverges), ENOMEM, EIO... */
int eng_session_load(storage *db, eng_pool *pool, eng_session *s);

/* Fills a shell with session id's state after step (the nearest kept
 * checkpoint at or before it, then replay), under the config that
 * checkpoint was taken with (config, the session's current one, when the
 * checkpoint predates that record).  *seq gets the log row of that step.
 * STORAGE_ERANGE when step is outside the kept history.  With step < 0
 * the state after log row *seq. */
int eng_session_load_at(storage *db, eng_pool *pool, eng_session *s, int64_t id, int64_t step,
                        const char *config, int64_t *seq);

/* Feeds the rows after < seq <= upto of session src_id's log through
 * eng_step of s (under s's config; each one logged in s), counting them
 * in *rows.  A counterfactual replay. */
int eng_relog(storage *db, eng_pool *pool, eng_session *s, int64_t src_id, int64_t after,
              int64_t upto, int64_t *rows);

/* The lr the next update would use. */
double eng_next_lr(const eng_session *s);

/* One gradient through the pipeline and into the log. */
typedef struct {
    const void *grad;           /* the present tensors' elements, in order,
                                   in the session's dtype                    */
    const uint32_t *absent;     /* tensors without a gradient (sorted, no
                                   duplicates); NULL: none                   */
    size_t n_absent;
    const eng_group_hp *ghp;    /* per group, or NULL                         */
    bool has_norm;              /* grad_norm given (Optd-Grad-Norm): clipping
                                   by norm uses it instead of the norm of
                                   grad (a shard of a larger vector)          */
    double grad_norm;
    double loss;                /* NAN when not reported                       */
    double factor;              /* lr factor (stale damping), 1 otherwise      */
    const char *key;            /* idempotency key or NULL                     */
    uint64_t fp;                /* its request fingerprint                     */
    const char *const *more_keys; /* a synchronous round's other keys          */
    const uint64_t *more_fps;
    size_t n_more_keys;
    const char *worker;         /* NULL when none                              */
} eng_step_in;

typedef struct {
    int kind;                   /* STORAGE_LOG_STEP / ACCUM / SKIP             */
    double lr;
    double grad_norm;
    double update_norm;
    double kernel_s;            /* seconds in apply (clip, schedule, kernel)  */
    double commit_s;            /* seconds in the storage commit              */
    bool checkpointed;          /* the commit carried a checkpoint            */
} eng_step_out;

/* Applies one gradient (non-finite policy, accumulation, clipping,
 * schedule, kernel: one fused pass for finiteness and norm, one blocked
 * pass for the update, split over the pool) and commits its log row with
 * its keys, with a checkpoint when the log has outgrown the state.  On a
 * failed commit memory is ahead of disk: the caller must drop the session
 * (the next use reloads it).  A gradient with NaN/Inf under
 * nonfinite=error is ENG_ENONFINITE before anything changes. */
int eng_step(storage *db, eng_pool *pool, eng_session *s, const eng_step_in *in,
             eng_step_out *out);

/* Writes a full checkpoint (and the config when with_config).  On failure
 * nothing in memory changed; the caller decides whether to drop. */
int eng_checkpoint(storage *db, eng_session *s, bool with_config);

/* The same with the checkpoint's kind (STORAGE_CKPT_*) and label (NULL:
 * none; one already used is STORAGE_EEXIST). */
int eng_checkpoint_kind(storage *db, eng_session *s, bool with_config, int kind,
                        const char *label);

/* Replaces the params (n elements of the dtype, taken over: the engine owns
 * and frees the buffer) and checkpoints; on failure the old params stay. */
int eng_set_params(storage *db, eng_session *s, void *params);

/* Makes the buffers this config needs exist (after PATCH).  0 or ENOMEM. */
int eng_ensure_buffers(eng_session *s);

/* Elements a step's gradient holds when these tensors are absent. */
uint64_t eng_present_size(const eng_session *s, const uint32_t *absent, size_t n_absent);
/* The hyperparameters group g's next update would use (schedule and the
 * client's current values applied). */
void eng_group_hparams(const eng_session *s, size_t g, optim_hparams *hp);
/* After a PATCH of the optimizer or the groups: the config's values win
 * over the client's current ones. */
void eng_config_changed(eng_session *s);

/* The whole optimizer state as a safetensors file (engine_state.c): a new
 * buffer of *len bytes. */
int eng_state_export(const eng_session *s, char **body, size_t *len);
/* The same with more tensors after the state's (their data copied in
 * order) and more metadata pairs (key, value, ...). */
int eng_state_export_with(const eng_session *s, const api_st_tensor *more, size_t n_more,
                          const char *const *more_meta, size_t n_more_meta, char **body,
                          size_t *len);

/* One logged row (as storage_log_read gives it) through eng_step of s:
 * its gradient, absent tensors and client-set group values, loss and
 * factor; a skipped row only counts.  Logged in s. */
int eng_apply_logged(storage *db, eng_pool *pool, eng_session *s, const storage_log_entry *e);

/* Installs a parsed state file into s (same tensors, shapes and dtype;
 * state_json the file's "optd.state").  Checks everything first: on an
 * error (ENG_EDAMAGED with err filled, or ENOMEM) s is unchanged but for
 * buffers it may have gained. */
int eng_state_import(eng_session *s, const api_st_tensor *t, size_t n, const char *state_json,
                     char *err, size_t errn);

/* A reference to the params as they are now (session locked); release it
 * from any thread with eng_params_unpin. */
eng_pbuf *eng_params_pin(eng_session *s);
void eng_params_unpin(eng_pbuf *b);
/* Makes the params this session's alone before they change (copies them
 * when an answer still holds them).  ENG_OK or ENG_ENOMEM, nothing changed. */
int eng_params_own(eng_session *s);

/* n elements of dtype dt at src into dst in wire form w (a copy when w is
 * dt itself). */
void eng_wire_copy(optim_dtype dt, const void *src, optim_wire w, void *dst, size_t n);
/* Answer bodies: the params as a new buffer in wire form w (binary). */
void *eng_params_wire(const eng_session *s, optim_wire w, size_t *len);

#endif /* ENGINE_H */
