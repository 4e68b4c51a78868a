package optd

// A sharded session: one logical parameter vector split by ranges over K
// sessions on K daemons. Each step computes the whole gradient's norm here,
// exactly as a single session's daemon would (GradNorm), and sends every
// shard its slice with that norm (Optd-Grad-Norm), so that clipping by norm
// scales every slice as the whole vector would be scaled: the joined params
// equal a single session's bit for bit.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
)

// The blocks and lanes of the daemon's reductions (optim/vec.c).
const (
	normBlock = 8192
	normLanes = 16
)

// ShardName is the name of shard i's session on its daemon.
func ShardName(name string, i int) string { return name + ".shard" + strconv.Itoa(i) }

// ShardKey is the Idempotency-Key shard i's request of the step keyed key
// carries: a retry of the step sends every shard the same key again.
func ShardKey(key string, i int) string { return key + "." + strconv.Itoa(i) }

// SplitRanges cuts n elements into k contiguous ranges, the first n%k of
// them one element longer: shard i holds [offs[i], offs[i+1]).
func SplitRanges(n, k int) []int {
	offs := make([]int, k+1)
	for i := 0; i < k; i++ {
		l := n / k
		if i < n%k {
			l++
		}
		offs[i+1] = offs[i] + l
	}
	return offs
}

// SplitTensors cuts a layout's tensors (their sizes, in order) into k
// contiguous runs of whole tensors: shard i holds tensors [cut[i], cut[i+1]).
// Run i ends at the first tensor boundary at or past i+1 k-ths of the
// elements, leaving at least one tensor to each later run. There must be at
// least k tensors.
func SplitTensors(sizes []int, k int) []int {
	total := 0
	for _, s := range sizes {
		total += s
	}
	cut := make([]int, k+1)
	cut[k] = len(sizes)
	t, acc := 0, 0
	for i := 0; i < k-1; i++ {
		target := float64(total) * float64(i+1) / float64(k)
		// at least one tensor for this run
		acc += sizes[t]
		t++
		for t < len(sizes)-(k-1-i) && float64(acc) < target {
			acc += sizes[t]
			t++
		}
		cut[i+1] = t
	}
	return cut
}

// GradNormF32 is the norm (normType 1, 2 or +Inf) of a gradient made of
// tensors of the given sizes, in order, computed as the daemon computes it
// for a session with that layout: every tensor cut into blocks of 8192
// elements, each block reduced in float64 over 16 lanes (element j into lane
// j mod 16), the lanes combined pairwise (lane k with lane k+w, w = 8, 4, 2,
// 1), the blocks' sums added in order (largest magnitude for +Inf), the
// square root taken for normType 2. A session without a layout is one
// tensor. finite is false when an element is NaN or Inf.
func GradNormF32(grad []float32, sizes []int, normType float64) (norm float64, finite bool) {
	return gradNorm(grad, sizes, normType)
}

// GradNormF64 is GradNormF32 for float64 gradients.
func GradNormF64(grad []float64, sizes []int, normType float64) (norm float64, finite bool) {
	return gradNorm(grad, sizes, normType)
}

func lanesSum(s *[normLanes]float64) float64 {
	for w := normLanes / 2; w >= 1; w /= 2 {
		for k := 0; k < w; k++ {
			s[k] = s[k] + s[k+w]
		}
	}
	return s[0]
}

// blockNorm is one block's partial: its sum of squares, of magnitudes, or
// its largest magnitude. The float64() around products keeps Go from fusing
// them into an FMA, which the daemon's C does not do.
func blockNorm[T float](g []T, normType float64) float64 {
	var acc [normLanes]float64
	inf := math.IsInf(normType, 1)
	for i, v := range g {
		x := float64(v)
		k := i % normLanes
		switch {
		case inf:
			if a := math.Abs(x); a > acc[k] {
				acc[k] = a
			}
		case normType == 1:
			acc[k] = acc[k] + math.Abs(x)
		default:
			acc[k] = acc[k] + float64(x*x)
		}
	}
	if inf {
		m := acc[0]
		for k := 1; k < normLanes; k++ {
			if acc[k] > m {
				m = acc[k]
			}
		}
		return m
	}
	return lanesSum(&acc)
}

func gradNorm[T float](grad []T, sizes []int, normType float64) (float64, bool) {
	for _, v := range grad {
		if f := float64(v); math.IsNaN(f) || math.IsInf(f, 0) {
			return math.NaN(), false
		}
	}
	inf := math.IsInf(normType, 1)
	if !inf && normType != 1 && normType != 2 {
		return math.NaN(), true
	}
	acc, off := 0.0, 0
	for _, n := range sizes {
		for b := 0; b < n; b += normBlock {
			l := n - b
			if l > normBlock {
				l = normBlock
			}
			p := blockNorm(grad[off+b:off+b+l], normType)
			if inf {
				if p > acc {
					acc = p
				}
			} else {
				acc = acc + p
			}
		}
		off += n
	}
	if normType == 2 {
		acc = math.Sqrt(acc)
	}
	return acc, true
}

// ErrNonFinite is the error of a sharded step whose gradient holds NaN or
// Inf: refused before anything is sent, as a single session refuses it.
var ErrNonFinite = errors.New("optd: the gradient has NaN or Inf elements")

// ShardStepError is a sharded step that some shards did not answer (after
// their own retries): Failed lists them and Errs says why. The other shards
// applied it. Step again with the same gradient and StepOptions
// IdempotencyKey = Key: only the failed shards are sent it again, with
// their keys, so no shard applies it twice.
type ShardStepError struct {
	Key    string
	Failed []int
	Errs   []error
}

func (e *ShardStepError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "optd: sharded step %s failed on shard(s) %v", e.Key, e.Failed)
	if len(e.Errs) > 0 {
		fmt.Fprintf(&b, ": %v", e.Errs[0])
	}
	return b.String()
}

// ShardedSession is one logical session whose vector is split over the
// sessions ShardName(name, i) on K daemons. It is safe for concurrent use,
// but steps are applied one at a time.
type ShardedSession struct {
	name     string
	shards   []*Session
	offs     []int // shard i holds [offs[i], offs[i+1])
	sizes    []int // the whole vector's tensors, for the norm's blocks
	dtype    DType
	normType float64

	mu      sync.Mutex // one step at a time
	pending *shardPending
}

// shardPending is a step some shards have not applied yet.
type shardPending struct {
	key     string
	norm    float64
	done    []bool
	params  [][]byte // each shard's answer, little-endian in the dtype
	steps   []int64
	replays []bool
}

// newSharded builds the handle from each shard's session as its daemon
// describes it.
func newSharded(name string, shards []*Session, infos []*SessionInfo) (*ShardedSession, error) {
	s := &ShardedSession{name: name, shards: shards, offs: make([]int, len(infos)+1),
		dtype: infos[0].DType, normType: 2}
	if c := infos[0].Clip; c != nil && c["type"] == "norm" {
		switch v := c["norm_type"].(type) {
		case float64:
			s.normType = v
		case string:
			if v == "inf" {
				s.normType = math.Inf(1)
			}
		}
	}
	// Without a layout each shard is one tensor "params" and the whole
	// vector is one tensor too; with one, the shards' tensors in order are
	// the whole layout.
	plain := true
	for _, in := range infos {
		if len(in.Tensors) != 1 || in.Tensors[0].Name != "params" {
			plain = false
		}
	}
	for i, in := range infos {
		if in.DType != s.dtype {
			return nil, fmt.Errorf("optd: shard %d of %s is %s, shard 0 is %s", i, name, in.DType, s.dtype)
		}
		s.offs[i+1] = s.offs[i] + in.Size
		if !plain {
			for _, t := range in.Tensors {
				s.sizes = append(s.sizes, t.Size)
			}
		}
	}
	if plain {
		s.sizes = []int{s.offs[len(infos)]}
	}
	return s, nil
}

// OpenSharded returns the sharded session name whose shards live on the
// daemons of clients, in shard order (one session per daemon), from what
// the daemons say about them.
func OpenSharded(ctx context.Context, clients []*Client, name string) (*ShardedSession, error) {
	if len(clients) == 0 {
		return nil, fmt.Errorf("optd: a sharded session needs at least one daemon")
	}
	shards := make([]*Session, len(clients))
	infos := make([]*SessionInfo, len(clients))
	err := eachShard(len(clients), func(i int) error {
		shards[i] = clients[i].Session(ShardName(name, i))
		var err error
		infos[i], err = shards[i].Info(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	return newSharded(name, shards, infos)
}

// CreateSharded creates (or verifies, as CreateSession does) the sharded
// session name over the daemons of clients, shard i on clients[i]. The
// initial params (Params, ParamsF32, or Size with InitZeros) are split by
// ranges; a layout (Tensors) is split at tensor boundaries and each shard
// gets its tensors and the groups restricted to them (a group with none of
// them is left out). A seeded init would draw every shard's own numbers: give
// the params instead.
func CreateSharded(ctx context.Context, clients []*Client, name string, cfg SessionConfig) (*ShardedSession, error) {
	k := len(clients)
	if k == 0 {
		return nil, fmt.Errorf("optd: a sharded session needs at least one daemon")
	}
	if cfg.Init != nil && cfg.Init.Type != "zeros" {
		return nil, fmt.Errorf("optd: a sharded session takes Params or InitZeros, not a %q init", cfg.Init.Type)
	}
	n := cfg.Size
	if cfg.Params != nil {
		n = len(cfg.Params)
	} else if cfg.ParamsF32 != nil {
		n = len(cfg.ParamsF32)
	}
	cfgs := make([]SessionConfig, k)
	var offs []int
	if len(cfg.Tensors) > 0 {
		if len(cfg.Tensors) < k {
			return nil, fmt.Errorf("optd: %d tensors cannot be split over %d shards", len(cfg.Tensors), k)
		}
		sizes := make([]int, len(cfg.Tensors))
		total := 0
		for i, t := range cfg.Tensors {
			sizes[i] = 1
			for _, d := range t.Shape {
				sizes[i] *= d
			}
			total += sizes[i]
		}
		if n == 0 {
			n = total
		}
		if n != total {
			return nil, fmt.Errorf("optd: the tensors hold %d elements, the params %d", total, n)
		}
		cut := SplitTensors(sizes, k)
		offs = make([]int, k+1)
		for i := 0; i < k; i++ {
			c := cfg
			c.Tensors = cfg.Tensors[cut[i]:cut[i+1]]
			c.Groups = nil
			mine := map[string]bool{}
			l := 0
			for j := cut[i]; j < cut[i+1]; j++ {
				mine[cfg.Tensors[j].Name] = true
				l += sizes[j]
			}
			offs[i+1] = offs[i] + l
			for _, g := range cfg.Groups {
				var ts []string
				for _, name := range g.Tensors {
					if mine[name] {
						ts = append(ts, name)
					}
				}
				if len(ts) > 0 {
					c.Groups = append(c.Groups, Group{Tensors: ts, Overrides: g.Overrides})
				}
			}
			cfgs[i] = c
		}
	} else {
		if n < k {
			return nil, fmt.Errorf("optd: %d params cannot be split over %d shards", n, k)
		}
		offs = SplitRanges(n, k)
		for i := range cfgs {
			cfgs[i] = cfg
		}
	}
	for i := range cfgs {
		c := &cfgs[i]
		switch {
		case cfg.Params != nil:
			c.Params = cfg.Params[offs[i]:offs[i+1]]
		case cfg.ParamsF32 != nil:
			c.ParamsF32 = cfg.ParamsF32[offs[i]:offs[i+1]]
		default:
			c.Size = offs[i+1] - offs[i]
		}
		if len(c.Tensors) > 0 && c.Size != 0 {
			c.Size = 0 // the tensors say it
		}
	}
	shards := make([]*Session, k)
	infos := make([]*SessionInfo, k)
	err := eachShard(k, func(i int) error {
		s, err := clients[i].CreateSession(ctx, ShardName(name, i), cfgs[i])
		if err != nil {
			return fmt.Errorf("shard %d: %w", i, err)
		}
		shards[i] = s
		infos[i], err = s.Info(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	return newSharded(name, shards, infos)
}

// eachShard runs f(0..k-1) concurrently and returns the first error.
func eachShard(k int, f func(i int) error) error {
	errs := make([]error, k)
	var wg sync.WaitGroup
	for i := 0; i < k; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = f(i)
		}(i)
	}
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// Name is the sharded session's name.
func (s *ShardedSession) Name() string { return s.name }

// Shards are the shards' sessions, in order.
func (s *ShardedSession) Shards() []*Session { return append([]*Session(nil), s.shards...) }

// Offsets says where each shard's range starts, and (last) the size.
func (s *ShardedSession) Offsets() []int { return append([]int(nil), s.offs...) }

// Size is the number of elements of the whole vector.
func (s *ShardedSession) Size() int { return s.offs[len(s.offs)-1] }

// ShardStepOptions are the optional parts of a sharded step.
type ShardStepOptions struct {
	Loss     *float64 // sent to every shard
	NoParams bool     // do not send the params back (the call returns nil)
	// IdempotencyKey replaces the step's fresh random key; reuse the Key of
	// a *ShardStepError to finish that step.
	IdempotencyKey string
}

// ShardStepInfo describes the answer of a sharded step.
type ShardStepInfo struct {
	Step     int64   // the shards' step count (they are equal)
	GradNorm float64 // the whole gradient's norm sent to every shard
	Replayed []bool  // per shard: it answered from its idempotency record
	Steps    []int64 // per shard step counts
}

// StepF32 applies one gradient of the whole vector to a float32 sharded
// session and returns the joined new params (nil with NoParams).
func (s *ShardedSession) StepF32(ctx context.Context, grad []float32, opts *ShardStepOptions) ([]float32, ShardStepInfo, error) {
	return shardStep(ctx, s, grad, Float32, opts)
}

// StepF64 is StepF32 for a float64 sharded session.
func (s *ShardedSession) StepF64(ctx context.Context, grad []float64, opts *ShardStepOptions) ([]float64, ShardStepInfo, error) {
	return shardStep(ctx, s, grad, Float64, opts)
}

// ParamsF32 fetches and joins the params of a float32 sharded session, and
// the shards' step counts.
func (s *ShardedSession) ParamsF32(ctx context.Context) ([]float32, []int64, error) {
	return shardParams[float32](ctx, s, Float32)
}

// ParamsF64 is ParamsF32 for a float64 sharded session.
func (s *ShardedSession) ParamsF64(ctx context.Context) ([]float64, []int64, error) {
	return shardParams[float64](ctx, s, Float64)
}

func shardStep[T float](ctx context.Context, s *ShardedSession, grad []T, dt DType, opts *ShardStepOptions) ([]T, ShardStepInfo, error) {
	var o ShardStepOptions
	if opts != nil {
		o = *opts
	}
	var info ShardStepInfo
	if dt != s.dtype {
		return nil, info, fmt.Errorf("%w: sharded session %s is %s, the call is for %s", ErrDType, s.name, s.dtype, dt)
	}
	if len(grad) != s.Size() {
		return nil, info, fmt.Errorf("optd: a gradient of %d elements for a sharded session of %d", len(grad), s.Size())
	}
	norm, finite := gradNorm(grad, s.sizes, s.normType)
	if !finite {
		return nil, info, ErrNonFinite
	}
	key := o.IdempotencyKey
	if key == "" {
		key = NewIdempotencyKey()
	}
	k := len(s.shards)
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pending
	if p != nil && p.key != key {
		return nil, info, fmt.Errorf("optd: sharded step %s is unfinished on some shards: step again with its key first", p.key)
	}
	if p == nil {
		p = &shardPending{key: key, norm: norm, done: make([]bool, k), params: make([][]byte, k),
			steps: make([]int64, k), replays: make([]bool, k)}
	} else if math.Float64bits(p.norm) != math.Float64bits(norm) {
		return nil, info, fmt.Errorf("optd: sharded step %s is being retried with another gradient", key)
	}
	errs := make([]error, k)
	var wg sync.WaitGroup
	for i := 0; i < k; i++ {
		if p.done[i] {
			continue
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			so := &StepOptions{Loss: o.Loss, NoParams: o.NoParams, IdempotencyKey: ShardKey(key, i),
				GradNorm: &p.norm, Wire: WireFull}
			out, err := step(ctx, s.shards[i], grad[s.offs[i]:s.offs[i+1]], dt, so)
			if err != nil {
				errs[i] = fmt.Errorf("shard %d: %w", i, err)
				return
			}
			st := s.shards[i].LastStepInfo()
			if out != nil {
				p.params[i] = encode(out)
			}
			p.steps[i], p.replays[i], p.done[i] = st.Step, st.Replayed, true
		}(i)
	}
	wg.Wait()
	var failed []int
	var ferrs []error
	for i, e := range errs {
		if e != nil {
			failed = append(failed, i)
			ferrs = append(ferrs, e)
		}
	}
	if len(failed) > 0 {
		s.pending = p
		return nil, info, &ShardStepError{Key: key, Failed: failed, Errs: ferrs}
	}
	s.pending = nil
	info = ShardStepInfo{Step: p.steps[0], GradNorm: norm, Replayed: p.replays, Steps: p.steps}
	for i := 1; i < k; i++ {
		if p.steps[i] != p.steps[0] {
			return nil, info, fmt.Errorf("optd: sharded session %s: the shards are at steps %v", s.name, p.steps)
		}
	}
	if o.NoParams {
		return nil, info, nil
	}
	out := make([]T, 0, s.Size())
	for i := 0; i < k; i++ {
		v, err := decode[T](p.params[i])
		if err != nil {
			return nil, info, err
		}
		out = append(out, v...)
	}
	return out, info, nil
}

func shardParams[T float](ctx context.Context, s *ShardedSession, dt DType) ([]T, []int64, error) {
	k := len(s.shards)
	parts := make([][]T, k)
	steps := make([]int64, k)
	err := eachShard(k, func(i int) error {
		v, err := params[T](ctx, s.shards[i], dt, WireFull)
		if err != nil {
			return fmt.Errorf("shard %d: %w", i, err)
		}
		if len(v) != s.offs[i+1]-s.offs[i] {
			return fmt.Errorf("optd: shard %d answered %d params, it holds %d", i, len(v), s.offs[i+1]-s.offs[i])
		}
		parts[i], steps[i] = v, s.shards[i].LastStep()
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	out := make([]T, 0, s.Size())
	for _, v := range parts {
		out = append(out, v...)
	}
	return out, steps, nil
}
