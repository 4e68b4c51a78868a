/*
 * optim.h -- optd's pure update kernels: every torch.optim rule, lr schedules
 * and gradient clipping.  No I/O, no allocation in the update loop, no
 * dependency beyond libc/libm.  Link build/liboptim.a.
 *
 * Conventions: functions return 0 (OPTIM_OK) or a negative OPTIM_E* code;
 * outputs go through pointers.  Vectors are plain arrays of the session's
 * dtype (float or double), owned by the caller.
 *
 * Semantics follow the PyTorch 1.13 docs' pseudo-code and the single-tensor
 * implementations of torch.optim 1.13: same hyperparameter names, defaults,
 * and the same order of floating-point operations, each rounded in the
 * vector's dtype (scalars such as bias corrections are computed in double and
 * converted to the dtype when they meet a vector, as torch does).
 * docs/optimizers.md documents every rule.
 */
#ifndef OPTIM_H
#define OPTIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define OPTIM_OK 0
#define OPTIM_EINVAL (-1)
#define OPTIM_ERANGE (-2)

/* ------------------------------------------------------------------ dtype */

typedef enum { OPTIM_F32 = 0, OPTIM_F64 = 1 } optim_dtype;

size_t optim_dtype_size(optim_dtype dt);           /* 4 or 8 */
const char *optim_dtype_name(optim_dtype dt);      /* "float32" / "float64" */
int optim_dtype_parse(const char *name, optim_dtype *out);

/* ---------------------------------------------------------------- errors */

/* Filled by every validation function: the offending field's name (as the
 * user spells it, e.g. "betas", "lr", "milestones") and a sentence. */
typedef struct {
    char field[48];
    char msg[200];
} optim_error;

/* ------------------------------------------------- hyperparameter tables
 *
 * Every optimizer, schedule and clip kind is described by a table of
 * hyperparameter specs.  The API layer decodes JSON generically through
 * these tables (field = base + offset) and /v1/optimizers lists them, so a
 * new hyperparameter is added in one place.
 */
typedef enum {
    OPTIM_HP_NUM,      /* double at offset; def[0]                        */
    OPTIM_HP_NUM_INF,  /* double, JSON may also say "inf"; def[0]          */
    OPTIM_HP_INT,      /* int64_t at offset; def[0]                        */
    OPTIM_HP_BOOL,     /* bool at offset; def[0] != 0                      */
    OPTIM_HP_PAIR,     /* double[2] at offset; def[0], def[1]              */
    OPTIM_HP_ENUM,     /* int at offset, index into choices; def[0]        */
    OPTIM_HP_INT_LIST  /* int64_t[OPTIM_MAX_LIST] at offset, count at
                          count_offset (size_t); default empty            */
} optim_hp_type;

#define OPTIM_MAX_LIST 64

typedef struct {
    const char *name;            /* torch's spelling                       */
    optim_hp_type type;
    size_t offset;               /* into the config struct                 */
    size_t count_offset;         /* OPTIM_HP_INT_LIST only                 */
    double def[2];               /* defaults (see type)                    */
    bool required;               /* no default: must be given              */
    const char *const *choices;  /* OPTIM_HP_ENUM: NULL-terminated         */
    const char *doc;             /* one line for /v1/optimizers            */
} optim_hp_spec;

/* Sets every field a table describes to its default (lists to empty). */
void optim_specs_default(const optim_hp_spec *specs, size_t n, void *base);

/* ------------------------------------------------------------ optimizers */

typedef enum {
    OPTIM_SGD,
    OPTIM_ADAGRAD,
    OPTIM_RMSPROP,
    OPTIM_ADAM,
    OPTIM_ADAMW,
    OPTIM_ADAMAX,
    OPTIM_ADADELTA,
    OPTIM_NADAM,
    OPTIM_RADAM,
    OPTIM_ASGD,
    OPTIM_RPROP,
    OPTIM_LION,
    OPTIM_KIND_COUNT
} optim_kind;

/* SGD momentum forms.  TORCH: buf = m*buf + (1-dampening)*g; p -= lr*buf.
 * CLASSIC (source documents): v = m*v + (1-dampening)*lr*g; p -= v. */
enum { OPTIM_MOMENTUM_TORCH = 0, OPTIM_MOMENTUM_CLASSIC = 1 };

/* One struct for every optimizer; each kind reads only its own fields (its
 * spec table says which).  Defaults come from optim_hparams_default(). */
typedef struct {
    optim_kind kind;
    double lr;
    double momentum;                  /* sgd, rmsprop                     */
    double dampening;                 /* sgd                              */
    double weight_decay;
    double betas[2];                  /* adam, adamw, adamax, nadam, radam, lion */
    double eps;
    double alpha;                     /* rmsprop smoothing; asgd power    */
    double rho;                       /* adadelta                         */
    double lr_decay;                  /* adagrad                          */
    double initial_accumulator_value; /* adagrad                          */
    double momentum_decay;            /* nadam                            */
    double lambd;                     /* asgd                             */
    double t0;                        /* asgd                             */
    double etas[2];                   /* rprop (etaminus, etaplus)        */
    double step_sizes[2];             /* rprop (min, max)                 */
    bool nesterov;                    /* sgd                              */
    bool maximize;
    bool amsgrad;                     /* adam, adamw                      */
    bool centered;                    /* rmsprop                          */
    bool bias_correction;             /* sgd momentum: v / (1 - m^t)      */
    int momentum_form;                /* sgd: OPTIM_MOMENTUM_*            */
} optim_hparams;

typedef struct {
    const char *name;                 /* "sgd", "adam", ...               */
    optim_kind kind;
    const optim_hp_spec *hps;
    size_t n_hps;
    const char *doc;
} optim_info;

const optim_info *optim_find(const char *name);      /* NULL if unknown  */
const optim_info *optim_info_of(optim_kind kind);
void optim_hparams_default(optim_kind kind, optim_hparams *out);
/* Checks ranges and combinations (negative lr, betas outside [0,1), eps <= 0,
 * nesterov without momentum or with dampening, ...).  Non-finite values are
 * rejected everywhere. */
int optim_hparams_validate(const optim_hparams *hp, optim_error *err);

/* ----------------------------------------------------------------- state
 *
 * Each kind has up to OPTIM_MAX_BUFFERS named vector buffers (torch's names:
 * momentum_buffer, sum, square_avg, grad_avg, acc_delta, exp_avg,
 * exp_avg_sq, max_exp_avg_sq, exp_inf, ax, prev, step_size) in fixed slots,
 * and up to OPTIM_MAX_SCALARS named scalars (mu_product, eta, mu, ...).
 * Which slots are in use depends on the flags (momentum != 0, centered,
 * amsgrad): the caller allocates n elements of the dtype for every slot in
 * optim_buffers_needed() and fills each with optim_buffer_init().  A flag
 * turned on mid-run (PATCH) needs its new slot allocated and initialised the
 * same way before the next step.
 */
#define OPTIM_MAX_BUFFERS 3
#define OPTIM_MAX_SCALARS 4

typedef struct {
    uint64_t step;                        /* updates applied so far       */
    double scalars[OPTIM_MAX_SCALARS];
    void *buf[OPTIM_MAX_BUFFERS];         /* NULL where not in use        */
} optim_state;

/* Name of slot i for this kind, or NULL past the last slot. */
const char *optim_buffer_name(optim_kind kind, unsigned slot);
/* Bitmask of the slots these hyperparameters need (bit i = slot i). */
unsigned optim_buffers_needed(const optim_hparams *hp);
/* Fills a freshly allocated buffer with its initial value. */
void optim_buffer_init(const optim_hparams *hp, unsigned slot, optim_dtype dt,
                       void *buf, size_t n);
/* Name of scalar i for this kind, or NULL past the last one. */
const char *optim_scalar_name(optim_kind kind, unsigned i);
/* step = 0 and every scalar to its initial value. */
void optim_state_init(const optim_hparams *hp, optim_state *st);

/* ------------------------------------------------------------------ step
 *
 * A step in three phases so that a caller may split one vector across
 * threads: plan (scalar coefficients of update st->step + 1, computed in
 * double from hp and st), run (pure elementwise work on [begin, end), safe to
 * call concurrently on disjoint ranges), commit (advance st->step and the
 * scalars).  optim_step() does all three on the whole vector.
 *
 * hp->lr is the learning rate of this step (the caller has evaluated the
 * schedule); for one-cycle momentum cycling the caller sets hp->momentum or
 * hp->betas[0].  grad is never written: maximize and weight decay work on
 * a local copy of each element.
 */
#define OPTIM_PLAN_COEFFS 16

typedef struct {
    optim_hparams hp;
    uint64_t t;                           /* the step being applied (>= 1) */
    double c[OPTIM_PLAN_COEFFS];          /* kind-specific coefficients    */
    double next_scalars[OPTIM_MAX_SCALARS];
} optim_plan;

void optim_plan_make(const optim_hparams *hp, const optim_state *st,
                     optim_plan *plan);
void optim_plan_run(const optim_plan *plan, const optim_state *st,
                    optim_dtype dt, void *params, const void *grad,
                    size_t begin, size_t end);
void optim_plan_commit(const optim_plan *plan, optim_state *st);

void optim_step(const optim_hparams *hp, optim_state *st, optim_dtype dt,
                void *params, const void *grad, size_t n);

/* Bytes read + written per parameter by one step of these hyperparameters
 * (params, grad and every buffer touched) -- for the benchmarks' ceiling. */
size_t optim_bytes_per_param(const optim_hparams *hp, optim_dtype dt);

/* -------------------------------------------------------------- clipping */

typedef enum { OPTIM_CLIP_NONE = 0, OPTIM_CLIP_NORM, OPTIM_CLIP_VALUE } optim_clip_kind;

typedef struct {
    optim_clip_kind kind;
    double max_norm;      /* CLIP_NORM                                       */
    double norm_type;     /* CLIP_NORM: 1, 2 or INFINITY; default 2          */
    double max_value;     /* CLIP_VALUE                                      */
} optim_clip;

typedef struct {
    const char *name;     /* "norm", "value" */
    optim_clip_kind kind;
    const optim_hp_spec *hps;
    size_t n_hps;
    const char *doc;
} optim_clip_info;

const optim_clip_info *optim_clip_find(const char *name);
const optim_clip_info *optim_clip_info_of(optim_clip_kind kind);
void optim_clip_default(optim_clip_kind kind, optim_clip *out);
int optim_clip_validate(const optim_clip *c, optim_error *err);

/* The norm of g (norm_type 1, 2 or INFINITY), accumulated in double.  NaN
 * or Inf elements give a non-finite norm; nothing is rejected here. */
double optim_grad_norm(optim_dtype dt, const void *g, size_t n, double norm_type);
/* Clips g in place.  CLIP_NORM: coefficient max_norm / (norm + 1e-6),
 * clamped to 1 (torch.nn.utils.clip_grad_norm_); CLIP_VALUE: clamp to
 * [-max_value, max_value].  Returns the gradient's norm before clipping
 * (norm_type for CLIP_NORM, 2-norm otherwise). */
double optim_clip_apply(const optim_clip *c, optim_dtype dt, void *g, size_t n);

/* --------------------------------------------------------------- vectors
 *
 * The per-dtype loops a step needs besides the kernel (optim/vec.c).
 * Reductions are blocked (OPTIM_VEC_BLOCK elements a block, the blocks'
 * partials combined in block order), so that a caller may reduce the
 * blocks on several threads and still get the single-thread result bit for
 * bit: reduce each block with optim_vec_block_stats, then combine the
 * partials in order with optim_vec_stats_combine.
 */
#define OPTIM_VEC_BLOCK 8192
#define OPTIM_VEC_LANES 16

typedef struct {
    double norm;        /* the block's sum of squares (2), of magnitudes (1)
                           or largest magnitude (inf)                    */
    bool finite;        /* every element finite                          */
} optim_vec_partial;

size_t optim_vec_blocks(size_t n);
void optim_vec_block_stats(optim_dtype dt, const void *g, size_t n, double norm_type,
                           optim_vec_partial *out);
void optim_vec_stats_combine(double norm_type, const optim_vec_partial *parts, size_t nblocks,
                             double *norm, bool *finite);
/* One pass: the norm (norm_type 1, 2 or INFINITY) and whether every element
 * is finite.  optim_grad_norm is this norm. */
void optim_vec_stats(optim_dtype dt, const void *g, size_t n, double norm_type, double *norm,
                     bool *finite);
/* out = g * c (rounded in the dtype); out = clamp(g, -max_value, max_value).
 * out and g must not overlap. */
void optim_vec_scale(optim_dtype dt, void *out, const void *g, size_t n, double c);
void optim_vec_clamp(optim_dtype dt, void *out, const void *g, size_t n, double max_value);
/* acc += g;  acc /= k (the mean of k accumulated gradients). */
void optim_vec_add(optim_dtype dt, void *acc, const void *g, size_t n);
void optim_vec_div(optim_dtype dt, void *acc, size_t n, int64_t k);
/* sum of (a[i] - b[i])^2 in double, in lanes (one block's update norm). */
double optim_vec_diffsq(optim_dtype dt, const void *a, const void *b, size_t n);

/* Element types a vector may travel in: the two dtypes and two 16-bit
 * forms.  Widening is exact; narrowing rounds to nearest even from float32
 * (a float64 vector is rounded to float32 first).  docs/api.md. */
typedef enum { OPTIM_WIRE_F32 = 0, OPTIM_WIRE_F64, OPTIM_WIRE_BF16, OPTIM_WIRE_F16 } optim_wire;

int optim_wire_parse(const char *name, optim_wire *out);
const char *optim_wire_name(optim_wire w);
size_t optim_wire_size(optim_wire w);
void optim_vec_from_wire(optim_wire w, const void *src, optim_dtype dt, void *dst, size_t n);
void optim_vec_to_wire(optim_dtype dt, const void *src, optim_wire w, void *dst, size_t n);

/* ------------------------------------------------------------- schedules
 *
 * torch.optim.lr_scheduler's closed forms, evaluated at t = number of steps
 * already applied.  Any schedule may carry warmup_steps and
 * warmup_start_factor: a linear warmup from warmup_start_factor * base_lr to
 * the schedule's value at 0 over warmup_steps, then the schedule with t
 * counted from the end of warmup.
 */
typedef enum {
    OPTIM_SCHED_NONE = 0,     /* lr stays base_lr                           */
    OPTIM_SCHED_CONSTANT,     /* factor, total_iters                         */
    OPTIM_SCHED_STEP,         /* step_size, gamma                            */
    OPTIM_SCHED_MULTISTEP,    /* milestones, gamma                           */
    OPTIM_SCHED_EXPONENTIAL,  /* gamma                                       */
    OPTIM_SCHED_COSINE,       /* T_max, eta_min                              */
    OPTIM_SCHED_COSINE_WARM_RESTARTS, /* T_0, T_mult, eta_min                */
    OPTIM_SCHED_LINEAR,       /* start_factor, end_factor, total_iters       */
    OPTIM_SCHED_POLYNOMIAL,   /* total_iters, power                          */
    OPTIM_SCHED_ONE_CYCLE,    /* max_lr, total_steps, pct_start, ...         */
    OPTIM_SCHED_REDUCE_ON_PLATEAU, /* mode, factor, patience, ...            */
    OPTIM_SCHED_KIND_COUNT
} optim_sched_kind;

enum { OPTIM_ANNEAL_COS = 0, OPTIM_ANNEAL_LINEAR = 1 };
enum { OPTIM_PLATEAU_MIN = 0, OPTIM_PLATEAU_MAX = 1 };
enum { OPTIM_THRESHOLD_REL = 0, OPTIM_THRESHOLD_ABS = 1 };

typedef struct {
    optim_sched_kind kind;
    /* constant, linear, polynomial */
    double factor;            /* constant: 1/3; plateau: 0.1                */
    int64_t total_iters;      /* constant, linear: 5; polynomial: 5         */
    double start_factor, end_factor;  /* linear: 1/3, 1.0                   */
    double power;             /* polynomial: 1.0                            */
    /* step, multistep, exponential */
    int64_t step_size;
    double gamma;             /* step, multistep: 0.1; exponential: required */
    int64_t milestones[OPTIM_MAX_LIST];
    size_t n_milestones;
    /* cosine, cosine_warm_restarts */
    int64_t T_max;
    int64_t T_0, T_mult;
    double eta_min;
    /* one_cycle */
    double max_lr;
    int64_t total_steps;
    double pct_start;         /* 0.3 */
    int anneal_strategy;      /* OPTIM_ANNEAL_*: "cos" */
    double div_factor;        /* 25 */
    double final_div_factor;  /* 1e4 */
    bool three_phase;
    bool cycle_momentum;      /* true */
    double base_momentum;     /* 0.85 */
    double max_momentum;      /* 0.95 */
    /* reduce_on_plateau */
    int mode;                 /* OPTIM_PLATEAU_*: "min" */
    int64_t patience;         /* 10 */
    double threshold;         /* 1e-4 */
    int threshold_mode;       /* OPTIM_THRESHOLD_*: "rel" */
    int64_t cooldown;         /* 0 */
    double min_lr;            /* 0 */
    double plateau_eps;       /* torch's eps: 1e-8 */
    /* any schedule */
    int64_t warmup_steps;     /* 0 */
    double warmup_start_factor; /* 0.0 */
} optim_schedule;

typedef struct {
    const char *name;         /* "cosine", "one_cycle", ... */
    optim_sched_kind kind;
    const optim_hp_spec *hps; /* warmup_steps and warmup_start_factor included */
    size_t n_hps;
    const char *doc;
} optim_sched_info;

const optim_sched_info *optim_sched_find(const char *name);
const optim_sched_info *optim_sched_info_of(optim_sched_kind kind);
void optim_sched_default(optim_sched_kind kind, optim_schedule *out);
int optim_sched_validate(const optim_schedule *s, optim_error *err);

/* reduce_on_plateau's running state (persisted with the session). */
typedef struct {
    double lr;                /* current lr; starts at base_lr */
    double best;              /* starts at +inf (min) / -inf (max) */
    int64_t num_bad_epochs;
    int64_t cooldown_counter;
    int64_t last_epoch;       /* losses observed */
} optim_plateau;

void optim_plateau_init(const optim_schedule *s, double base_lr, optim_plateau *ps);
/* Feeds one reported loss (torch: scheduler.step(loss)). */
void optim_plateau_observe(const optim_schedule *s, optim_plateau *ps, double loss);

typedef struct {
    double lr;
    bool has_momentum;        /* one_cycle with cycle_momentum */
    double momentum;          /* for sgd/rmsprop momentum or betas[0]       */
} optim_sched_value;

/* The lr (and cycled momentum) for the update applied after t steps.
 * ps may be NULL unless kind is REDUCE_ON_PLATEAU. */
void optim_sched_eval(const optim_schedule *s, const optim_plateau *ps,
                      double base_lr, uint64_t t, optim_sched_value *out);

#endif /* OPTIM_H */
