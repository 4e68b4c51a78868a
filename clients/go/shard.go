package optd

// A sharded session: one logical parameter vector split by ranges over K
// sessions on K daemons. Each step computes the whole gradient's norm here,
// exactly as a single session's daemon would (GradNorm), and sends every
// shard its slice with that norm (Optd-Grad-Norm), so that clipping by norm
// scales every slice as the whole vector would be scaled: the joined params
// equal a single session's bit for bit.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"
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

// SplitRanges cuts n elements into k contiguous ranges: shard i holds
// [offs[i], offs[i+1]) with offs[i] = i*n/k rounded down (the Python client's
// rule).
func SplitRanges(n, k int) []int {
	offs := make([]int, k+1)
	for i := 0; i <= k; i++ {
		offs[i] = i * n / k
	}
	return offs
}

// SplitTensors cuts a layout's tensors (their sizes, in order) into k
// contiguous runs of whole tensors: shard i holds tensors [cut[i], cut[i+1]).
// Cut i (1..k-1) is the tensor boundary nearest to i*total/k (the lower one
// on a tie) after cut i-1, leaving at least one tensor to each later run.
// There must be at least k tensors.
func SplitTensors(sizes []int, k int) []int {
	nt := len(sizes)
	ends := make([]int, nt) // elements before tensor j
	total := 0
	for j, sz := range sizes {
		ends[j] = total
		total += sz
	}
	cut := make([]int, k+1)
	cut[k] = nt
	for i := 1; i < k; i++ {
		target := float64(i*total) / float64(k)
		best := -1
		for j := cut[i-1] + 1; j <= nt-(k-i); j++ {
			if best < 0 || math.Abs(float64(ends[j])-target) < math.Abs(float64(ends[best])-target) {
				best = j
			}
		}
		cut[i] = best
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
	full := len(g) - len(g)%normLanes
	if math.IsInf(normType, 1) {
		for i, v := range g {
			if a := math.Abs(float64(v)); a > acc[i%normLanes] {
				acc[i%normLanes] = a
			}
		}
		m := acc[0]
		for k := 1; k < normLanes; k++ {
			if acc[k] > m {
				m = acc[k]
			}
		}
		return m
	}
	if normType == 1 {
		for i := 0; i < full; i += normLanes {
			c := g[i : i+normLanes : i+normLanes]
			for k := range acc {
				acc[k] = acc[k] + math.Abs(float64(c[k]))
			}
		}
		for i := full; i < len(g); i++ {
			acc[i-full] = acc[i-full] + math.Abs(float64(g[i]))
		}
		return lanesSum(&acc)
	}
	for i := 0; i < full; i += normLanes {
		c := g[i : i+normLanes : i+normLanes]
		for k := range acc {
			x := float64(c[k])
			acc[k] = acc[k] + float64(x*x)
		}
	}
	for i := full; i < len(g); i++ {
		x := float64(g[i])
		acc[i-full] = acc[i-full] + float64(x*x)
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

// ShardStepError is a sharded step that some shards did not apply within
// the session's retry window (SetRetryFor): Failed lists them and Errs says
// why. The other shards applied it. Step again with the same gradient and
// StepOptions IdempotencyKey = Key: only the failed shards are sent it
// again, with their keys, so no shard applies it twice. Until then the
// handle refuses steps with other keys.
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

// ShardMeta is the metadata member every shard keeps its place in, as the
// Python client writes it: {"index", "count", "offset", "size" (the whole
// vector's), "groups" (the indices of the whole model's groups the shard
// holds), "layout" (whether the model has tensors)}.
const ShardMeta = "optd_shard"

type shardMeta struct {
	Index  int   `json:"index"`
	Count  int   `json:"count"`
	Offset int   `json:"offset"`
	Size   int   `json:"size"`
	Groups []int `json:"groups"`
	Layout bool  `json:"layout"`
}

// DefaultShardRetryFor is how long a sharded step keeps retrying the shards
// that failed transiently (no answer, 502, 503, 504), each alone with its key.
const DefaultShardRetryFor = 60 * time.Second

// ShardedSession is one logical session whose vector is split over the
// sessions ShardName(name, i) on K daemons. It is safe for concurrent use,
// but steps are applied one at a time.
type ShardedSession struct {
	name     string
	shards   []*Session
	offs     []int // shard i holds [offs[i], offs[i+1])
	sizes    []int // the whole vector's tensors, for the norm's blocks
	dtype    DType
	normType float64 // 0: no clipping by norm, no Optd-Grad-Norm

	groups [][]int // per shard: the whole model's groups it holds

	mu       sync.Mutex // one step at a time
	retryFor time.Duration
	pending  *shardPending
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
// describes it, and the place each shard's metadata records.
func newSharded(name string, shards []*Session, infos []*SessionInfo) (*ShardedSession, error) {
	k := len(infos)
	s := &ShardedSession{name: name, shards: shards, offs: make([]int, k+1),
		dtype: infos[0].DType, retryFor: DefaultShardRetryFor}
	var layout bool
	for i, in := range infos {
		var doc map[string]json.RawMessage
		var m shardMeta
		if json.Unmarshal(in.Metadata, &doc) != nil || doc[ShardMeta] == nil ||
			json.Unmarshal(doc[ShardMeta], &m) != nil || m.Index != i || m.Count != k {
			return nil, fmt.Errorf("optd: %s is not shard %d of %d", shards[i].Name(), i, k)
		}
		if in.DType != s.dtype {
			return nil, fmt.Errorf("optd: shard %d of %s is %s, shard 0 is %s", i, name, in.DType, s.dtype)
		}
		if m.Offset != s.offs[i] {
			return nil, fmt.Errorf("optd: shard %d of %s starts at %d, shard %d ends at %d", i, name, m.Offset, i-1, s.offs[i])
		}
		s.offs[i+1] = m.Offset + in.Size
		s.offs[k] = m.Size
		layout = m.Layout
		s.groups = append(s.groups, m.Groups)
		for _, t := range in.Tensors {
			s.sizes = append(s.sizes, t.Size)
		}
	}
	if s.offs[k] != s.offs[k-1]+infos[k-1].Size {
		return nil, fmt.Errorf("optd: the shards of %s hold %d elements, their metadata says %d", name, s.offs[k-1]+infos[k-1].Size, s.offs[k])
	}
	if !layout {
		s.sizes = []int{s.offs[k]}
	}
	if err := s.configure(infos[0]); err != nil {
		return nil, err
	}
	return s, nil
}

// configure reads whether steps carry the whole vector's norm, and of
// which type, from a shard's session document.
func (s *ShardedSession) configure(in *SessionInfo) error {
	s.normType = 0
	if c := in.Clip; c != nil && c["type"] == "norm" {
		s.normType = 2
		switch v := c["norm_type"].(type) {
		case float64:
			s.normType = v
		case string:
			if v == "inf" || v == "Infinity" {
				s.normType = math.Inf(1)
			}
		}
		m := in.Mode
		if acc, _ := m["accumulate"].(float64); m["type"] == "sync" || acc > 1 {
			return fmt.Errorf("optd: a sharded session cannot clip by norm in sync mode or with accumulation: the norm is the round's or the mean's")
		}
	}
	return nil
}

// Update makes the same change on every shard (see Session.Update) and
// returns the shards' sessions as changed. SetMetadata is refused: each
// shard's metadata keeps its place.
func (s *ShardedSession) Update(ctx context.Context, opts ...UpdateOption) ([]*SessionInfo, error) {
	p := &patch{}
	for _, o := range opts {
		o(p)
	}
	if p.metadataSet {
		return nil, fmt.Errorf("optd: the metadata of a sharded session's shards keeps their places; change it shard by shard")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	infos := make([]*SessionInfo, len(s.shards))
	err := eachShard(len(s.shards), func(i int) error {
		var err error
		if infos[i], err = s.shards[i].Update(ctx, opts...); err != nil {
			return fmt.Errorf("optd: shard %d: %w", i, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return infos, s.configure(infos[0])
}

// SetParamsF32 overwrites the whole vector of a float32 sharded session,
// each shard its range; the optimizer state and step counts stay.
func (s *ShardedSession) SetParamsF32(ctx context.Context, p []float32) error {
	return shardSetParams(ctx, s, p, Float32)
}

// SetParamsF64 is SetParamsF32 for a float64 sharded session.
func (s *ShardedSession) SetParamsF64(ctx context.Context, p []float64) error {
	return shardSetParams(ctx, s, p, Float64)
}

func shardSetParams[T float](ctx context.Context, s *ShardedSession, p []T, dt DType) error {
	if dt != s.dtype {
		return fmt.Errorf("%w: sharded session %s is %s, the call is for %s", ErrDType, s.name, s.dtype, dt)
	}
	if len(p) != s.Size() {
		return fmt.Errorf("optd: %d params for a sharded session of %d", len(p), s.Size())
	}
	return eachShard(len(s.shards), func(i int) error {
		if err := setParams(ctx, s.shards[i], p[s.offs[i]:s.offs[i+1]], dt, WireFull); err != nil {
			return fmt.Errorf("optd: shard %d: %w", i, err)
		}
		return nil
	})
}

// Delete deletes every shard.
func (s *ShardedSession) Delete(ctx context.Context) error {
	return eachShard(len(s.shards), func(i int) error {
		if err := s.shards[i].Delete(ctx); err != nil {
			return fmt.Errorf("optd: shard %d: %w", i, err)
		}
		return nil
	})
}

// OpenSharded returns the sharded session name whose shards live on the
// daemons of clients, in shard order, from what the daemons say about them
// (each shard's metadata member ShardMeta).
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
// session name over the daemons of clients, shard i on clients[i], as the
// Python client does: every shard is created with a zeros init and its own
// size (or tensors), then given its range of the initial params (Params or
// ParamsF32, sent binary) while it is at step 0. A layout (Tensors) is
// split at tensor boundaries (SplitTensors) and each shard gets its tensors
// and the groups restricted to them (a group with none of them is left out);
// without one the vector is split by SplitRanges. A seeded init would draw
// every shard's own numbers: give the params instead. Metadata, if any, must
// be a JSON object; every shard gets it with its place added (ShardMeta).
func CreateSharded(ctx context.Context, clients []*Client, name string, cfg SessionConfig) (*ShardedSession, error) {
	k := len(clients)
	if k == 0 {
		return nil, fmt.Errorf("optd: a sharded session needs at least one daemon")
	}
	if cfg.Init != nil && cfg.Init.Type != "zeros" {
		return nil, fmt.Errorf("optd: a sharded session takes Params or InitZeros, not a %q init", cfg.Init.Type)
	}
	if (cfg.Params != nil || cfg.ParamsF32 != nil) && (cfg.Size != 0 || cfg.Init != nil) {
		return nil, fmt.Errorf("optd: give either Params or Size (+ Init), not both")
	}
	meta := map[string]any{}
	if cfg.Metadata != nil {
		raw, err := json.Marshal(cfg.Metadata)
		if err == nil {
			err = json.Unmarshal(raw, &meta)
		}
		if err != nil || meta == nil {
			return nil, fmt.Errorf("optd: the metadata of a sharded session must be a JSON object")
		}
	}
	n := cfg.Size
	if cfg.Params != nil {
		n = len(cfg.Params)
	} else if cfg.ParamsF32 != nil {
		n = len(cfg.ParamsF32)
	}
	cfgs := make([]SessionConfig, k)
	groupsOf := make([][]int, k)
	var offs []int
	if len(cfg.Tensors) > 0 {
		if len(cfg.Tensors) < k {
			return nil, fmt.Errorf("optd: %d tensors cannot make %d shards: each shard holds whole tensors", len(cfg.Tensors), k)
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
		if n != 0 && n != total {
			return nil, fmt.Errorf("optd: the tensors hold %d elements, the params (or size) %d", total, n)
		}
		n = total
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
			if cfg.Groups == nil {
				groupsOf[i] = []int{0}
			} else {
				groupsOf[i] = []int{}
			}
			for gi, g := range cfg.Groups {
				var ts []string
				for _, name := range g.Tensors {
					if mine[name] {
						ts = append(ts, name)
					}
				}
				if len(ts) > 0 {
					c.Groups = append(c.Groups, Group{Tensors: ts, Overrides: g.Overrides})
					groupsOf[i] = append(groupsOf[i], gi)
				}
			}
			c.Size = 0 // the tensors say it
			cfgs[i] = c
		}
	} else {
		if cfg.Groups != nil {
			return nil, fmt.Errorf("optd: groups need tensors")
		}
		if n < k {
			return nil, fmt.Errorf("optd: %d values cannot make %d shards", n, k)
		}
		offs = SplitRanges(n, k)
		for i := range cfgs {
			cfgs[i] = cfg
			cfgs[i].Size = offs[i+1] - offs[i]
			groupsOf[i] = []int{0}
		}
	}
	for i := range cfgs {
		c := &cfgs[i]
		c.Params, c.ParamsF32, c.Init = nil, nil, InitZeros()
		m := make(map[string]any, len(meta)+1)
		for key, v := range meta {
			m[key] = v
		}
		m[ShardMeta] = shardMeta{Index: i, Count: k, Offset: offs[i], Size: n, Groups: groupsOf[i],
			Layout: len(cfg.Tensors) > 0}
		c.Metadata = m
	}
	shards := make([]*Session, k)
	infos := make([]*SessionInfo, k)
	err := eachShard(k, func(i int) error {
		s, err := clients[i].CreateSession(ctx, ShardName(name, i), cfgs[i])
		if err != nil {
			return fmt.Errorf("optd: shard %d: %w", i, err)
		}
		shards[i] = s
		if s.Created() || s.LastStep() == 0 {
			err = setShardParams(ctx, s, &cfg, offs[i], offs[i+1])
			if err != nil {
				return fmt.Errorf("optd: shard %d: %w", i, err)
			}
		}
		infos[i], err = s.Info(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	return newSharded(name, shards, infos)
}

// setShardParams sends shard s its range [lo, hi) of cfg's initial params
// in the session's dtype (float64 values rounded to float32 as the daemon
// rounds those of a create body).
func setShardParams(ctx context.Context, s *Session, cfg *SessionConfig, lo, hi int) error {
	f64 := cfg.DType == Float64
	switch {
	case cfg.Params != nil && f64:
		return setParams(ctx, s, cfg.Params[lo:hi], Float64, WireFull)
	case cfg.Params != nil:
		v := make([]float32, hi-lo)
		for i := range v {
			v[i] = float32(cfg.Params[lo+i])
		}
		return setParams(ctx, s, v, Float32, WireFull)
	case cfg.ParamsF32 != nil && f64:
		v := make([]float64, hi-lo)
		for i := range v {
			v[i] = float64(cfg.ParamsF32[lo+i])
		}
		return setParams(ctx, s, v, Float64, WireFull)
	case cfg.ParamsF32 != nil:
		return setParams(ctx, s, cfg.ParamsF32[lo:hi], Float32, WireFull)
	}
	return nil
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

// SetRetryFor sets how long a step keeps retrying the shards that failed
// transiently, each alone with its key (DefaultShardRetryFor; 0: give up
// after the clients' own retries).
func (s *ShardedSession) SetRetryFor(d time.Duration) {
	s.mu.Lock()
	s.retryFor = d
	s.mu.Unlock()
}

// PendingKey is the key of a step some shards applied and others did not
// (see ShardStepError), or "".
func (s *ShardedSession) PendingKey() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending == nil {
		return ""
	}
	return s.pending.key
}

func (s *ShardedSession) nGroups() int {
	n := 0
	for _, gs := range s.groups {
		for _, g := range gs {
			if g+1 > n {
				n = g + 1
			}
		}
	}
	return n
}

// ShardStepOptions are the optional parts of a sharded step.
type ShardStepOptions struct {
	Loss     *float64 // sent to every shard
	BaseStep *int64   // sent to every shard
	Worker   string   // sent to every shard
	NoParams bool     // do not send the params back (the call returns nil)
	// IdempotencyKey replaces the step's fresh random key; reuse the Key of
	// a *ShardStepError to finish that step. Shard i uses ShardKey(key, i).
	IdempotencyKey string
	// Groups, one per group of the whole model: each shard gets the values
	// of the groups it holds.
	Groups []GroupStep
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
	if len(o.Groups) > 0 && len(o.Groups) != s.nGroups() {
		return nil, info, fmt.Errorf("optd: %d group values for a model of %d groups", len(o.Groups), s.nGroups())
	}
	for _, v := range grad {
		if f := float64(v); math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, info, ErrNonFinite
		}
	}
	norm := math.NaN()
	if s.normType != 0 {
		norm, _ = gradNorm(grad, s.sizes, s.normType)
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
	one := func(i int) error {
		so := &StepOptions{Loss: o.Loss, BaseStep: o.BaseStep, Worker: o.Worker, NoParams: o.NoParams,
			IdempotencyKey: ShardKey(key, i), Wire: WireFull}
		if s.normType != 0 {
			so.GradNorm = &p.norm
		}
		if len(o.Groups) > 0 {
			for _, g := range s.groups[i] {
				so.Groups = append(so.Groups, o.Groups[g])
			}
		}
		out, err := step(ctx, s.shards[i], grad[s.offs[i]:s.offs[i+1]], dt, so)
		if err != nil {
			return fmt.Errorf("shard %d: %w", i, err)
		}
		st := s.shards[i].LastStepInfo()
		if out != nil {
			p.params[i] = encode(out)
		}
		p.steps[i], p.replays[i], p.done[i] = st.Step, st.Replayed, true
		return nil
	}
	// Rounds: every shard not done, at once; the ones that failed
	// transiently again, alone, until the retry window closes.
	deadline := time.Now().Add(s.retryFor)
	wait := 100 * time.Millisecond
	for {
		errs := make([]error, k)
		var wg sync.WaitGroup
		for i := 0; i < k; i++ {
			if !p.done[i] {
				wg.Add(1)
				go func(i int) { defer wg.Done(); errs[i] = one(i) }(i)
			}
		}
		wg.Wait()
		var failed []int
		var ferrs []error
		retry := true
		for i, e := range errs {
			if e != nil {
				failed = append(failed, i)
				ferrs = append(ferrs, e)
				retry = retry && shardTransient(ctx, e)
			}
		}
		if len(failed) == 0 {
			break
		}
		if !retry || time.Now().Add(wait).After(deadline) || sleepCtx(ctx, wait) != nil {
			s.pending = nil
			for _, d := range p.done {
				if d { // some shards applied it: it must be finished with its key
					s.pending = p
				}
			}
			return nil, info, &ShardStepError{Key: key, Failed: failed, Errs: ferrs}
		}
		if wait *= 2; wait > 2*time.Second {
			wait = 2 * time.Second
		}
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

// shardTransient says whether a shard's failed step may succeed when sent
// again with its key: no answer at all, or 502, 503, 504.
func shardTransient(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Status == 502 || e.Status == 503 || e.Status == 504
	}
	var dm *DigestMismatchError
	return !errors.As(err, &dm)
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
