package optd_test

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"math/rand"
	"net"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	optd "optd.dev/client/go"
)

func sgd(lr float64, extra ...any) map[string]any {
	m := map[string]any{"type": "sgd", "lr": lr}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i].(string)] = extra[i+1]
	}
	return m
}

func asError(t *testing.T, err error, status int) *optd.Error {
	t.Helper()
	var e *optd.Error
	if !errors.As(err, &e) {
		t.Fatalf("want an *optd.Error with status %d, got %T %v", status, err, err)
	}
	if e.Status != status {
		t.Fatalf("status %d, want %d (%v)", e.Status, status, e)
	}
	return e
}

func sameBits32(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d elements, want %d", what, len(got), len(want))
	}
	for i := range got {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s[%d] = %v (%#08x), want %v (%#08x)", what, i, got[i],
				math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
		}
	}
}

func sameBits64(t *testing.T, what string, got, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d elements, want %d", what, len(got), len(want))
	}
	for i := range got {
		if math.Float64bits(got[i]) != math.Float64bits(want[i]) {
			t.Fatalf("%s[%d] = %v (%#016x), want %v (%#016x)", what, i, got[i],
				math.Float64bits(got[i]), want[i], math.Float64bits(want[i]))
		}
	}
}

func near(t *testing.T, what string, got, want []float64, tol float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d elements, want %d", what, len(got), len(want))
	}
	for i := range got {
		if d := math.Abs(got[i] - want[i]); !(d <= tol) {
			t.Fatalf("%s[%d] = %.17g, want %.17g (off by %g > %g)", what, i, got[i], want[i], d, tol)
		}
	}
}

// ---------------------------------------------------------------- sessions

func TestCreateSessionAndInfo(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)

	cfg := optd.SessionConfig{
		Optimizer: map[string]any{"type": "adam", "lr": 1e-3},
		Size:      5,
		Init:      optd.InitNormal(0, 0.1, 7),
		Metadata:  map[string]any{"run": "a", "layers": []int{3, 4}},
	}
	s, err := c.CreateSession(ctx, "mlp", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Created() || s.Name() != "mlp" || s.LastStep() != 0 {
		t.Fatalf("created %v name %q step %d", s.Created(), s.Name(), s.LastStep())
	}
	again, err := c.CreateSession(ctx, "mlp", cfg)
	if err != nil {
		t.Fatalf("same config again: %v", err)
	}
	if again.Created() {
		t.Fatal("a second create with the same config reports Created")
	}

	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "mlp" || info.Step != 0 || info.DType != optd.Float32 || info.Size != 5 ||
		info.LR != 1e-3 || info.Nonfinite != "error" || info.Schedule != nil || info.Clip != nil {
		t.Fatalf("info %+v", info)
	}
	if info.Optimizer["type"] != "adam" || info.Optimizer["eps"] != 1e-8 ||
		!reflect.DeepEqual(info.Optimizer["betas"], []any{0.9, 0.999}) || info.Optimizer["amsgrad"] != false {
		t.Fatalf("optimizer defaults not filled in: %v", info.Optimizer)
	}
	if info.Mode["type"] != "async" {
		t.Fatalf("mode %v", info.Mode)
	}
	if !reflect.DeepEqual(info.State.Buffers, []string{"exp_avg", "exp_avg_sq"}) {
		t.Fatalf("buffers %v", info.State.Buffers)
	}
	var meta map[string]any
	if err := json.Unmarshal(info.Metadata, &meta); err != nil || meta["run"] != "a" ||
		!reflect.DeepEqual(meta["layers"], []any{3.0, 4.0}) {
		t.Fatalf("metadata %s (%v)", info.Metadata, err)
	}
	if age := time.Since(info.CreatedAt); age < -time.Minute || age > time.Minute {
		t.Fatalf("created_at %v", info.CreatedAt)
	}
	if info.State.LastLR != nil || info.State.LastLoss != nil || info.Counters.Applied != 0 {
		t.Fatalf("a fresh session has state %+v counters %+v", info.State, info.Counters)
	}

	// The init is deterministic for a seed.
	p1, err := s.ParamsF32(ctx)
	if err != nil {
		t.Fatal(err)
	}
	twin, err := c.CreateSession(ctx, "twin", cfg)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := twin.ParamsF32(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "seeded init", p2, p1)
	nonzero := 0
	for _, x := range p1 {
		if x != 0 {
			nonzero++
		}
	}
	if nonzero == 0 {
		t.Fatal("normal init gave zeros")
	}

	// The same name with another config is a conflict.
	other := cfg
	other.Optimizer = map[string]any{"type": "adam", "lr": 1e-2}
	_, err = c.CreateSession(ctx, "mlp", other)
	if !optd.IsConflict(err) || optd.IsNotFound(err) {
		t.Fatalf("different config: %v", err)
	}
	e := asError(t, err, 409)
	if e.Type != "urn:optd:problem:conflict" || e.Title != "Conflict" || e.Detail == "" {
		t.Fatalf("conflict problem %+v", e)
	}

	// Uniform and zeros inits reach the daemon as such.
	u, err := c.CreateSession(ctx, "uni", optd.SessionConfig{
		Optimizer: sgd(0.1), DType: optd.Float64, Size: 100, Init: optd.InitUniform(2, 3, 1)})
	if err != nil {
		t.Fatal(err)
	}
	pu, err := u.ParamsF64(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, x := range pu {
		if x < 2 || x > 3 {
			t.Fatalf("uniform(2,3) param %d = %v", i, x)
		}
	}
	z, err := c.CreateSession(ctx, "zero", optd.SessionConfig{Optimizer: sgd(0.1), Size: 3, Init: optd.InitZeros()})
	if err != nil {
		t.Fatal(err)
	}
	pz, err := z.ParamsF32(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "zeros", pz, []float32{0, 0, 0})
}

func TestSessionsListAndPages(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	names := []string{"a-1", "b.2", "c_3", "d4", "e5"}
	for i, n := range names {
		if _, err := c.CreateSession(ctx, n, optd.SessionConfig{Optimizer: sgd(0.1),
			Size: i + 1, Init: optd.InitZeros(), DType: optd.Float64}); err != nil {
			t.Fatal(err)
		}
	}
	page, next, err := c.SessionsPage(ctx, "", 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(page) != 2 || page[0].Name != "a-1" || page[1].Name != "b.2" || next != "b.2" {
		t.Fatalf("first page %+v next %q", page, next)
	}
	page, next, err = c.SessionsPage(ctx, "d4", 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(page) != 1 || page[0].Name != "e5" || next != "" {
		t.Fatalf("last page %+v next %q", page, next)
	}

	restore := optd.SetPageSizes(2, 1000)
	defer restore()
	all, err := c.Sessions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(names) {
		t.Fatalf("Sessions gave %d, want %d: %+v", len(all), len(names), all)
	}
	for i, s := range all {
		if s.Name != names[i] || s.Size != i+1 || s.Optimizer != "sgd" || s.DType != optd.Float64 ||
			s.Step != 0 || s.CreatedAt.IsZero() {
			t.Fatalf("session %d: %+v", i, s)
		}
	}
	if _, _, err := c.SessionsPage(ctx, "", 0); asError(t, err, 400).Field != "limit" {
		t.Fatalf("limit 0: %v", err)
	}
}

func TestOptimizersCatalogue(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	cat, err := c.Optimizers(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	s := cat.Optimizer("sgd")
	if s == nil || s.Param("lr") == nil || !s.Param("lr").Required || s.Param("momentum").Default != 0.0 ||
		!reflect.DeepEqual(s.State, []string{"momentum_buffer"}) {
		t.Fatalf("sgd entry %+v", s)
	}
	a := cat.Optimizer("adam")
	if a == nil || !reflect.DeepEqual(a.Param("betas").Default, []any{0.9, 0.999}) ||
		a.Param("lr").Default != 0.001 {
		t.Fatalf("adam entry %+v", a)
	}
	for _, want := range []string{"adagrad", "rmsprop", "adamw", "adamax", "adadelta", "nadam", "radam", "asgd", "rprop"} {
		if cat.Optimizer(want) == nil {
			t.Errorf("no %s in the catalogue", want)
		}
	}
	kinds := func(ks []optd.Kind) []string {
		var out []string
		for _, k := range ks {
			out = append(out, k.Type)
		}
		return out
	}
	if got := strings.Join(kinds(cat.Clips), ","); got != "norm,value" {
		t.Errorf("clips %s", got)
	}
	if got := strings.Join(kinds(cat.Schedules), ","); !strings.Contains(got, "cosine") || !strings.Contains(got, "step") {
		t.Errorf("schedules %s", got)
	}
	if len(cat.Modes) == 0 {
		t.Error("no modes")
	}
	if err := c.Health(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

// ------------------------------------------------------------- vectors

// awkward32 has values that break a sloppy float printer or parser.
func awkward32(n int, seed int64) []float32 {
	v := []float32{0, float32(math.Copysign(0, -1)), 1, -1, 0.1, 1.0 / 3, -2.0 / 3,
		math.MaxFloat32, -math.MaxFloat32, math.SmallestNonzeroFloat32, -math.SmallestNonzeroFloat32,
		1.17549435e-38 /* smallest normal */, 1.1754942e-38, /* largest subnormal */
		16777217, 3.4028234e38, 1e-45, 123456.789, 9.99999e-11, math.Nextafter32(1, 2), math.Nextafter32(1, 0)}
	r := rand.New(rand.NewSource(seed))
	for len(v) < n {
		x := math.Float32frombits(r.Uint32())
		if !math.IsNaN(float64(x)) && !math.IsInf(float64(x), 0) {
			v = append(v, x)
		}
	}
	return v[:n]
}

func awkward64(n int, seed int64) []float64 {
	v := []float64{0, math.Copysign(0, -1), 1, -1, 0.1, 1.0 / 3, -2.0 / 3, math.MaxFloat64, -math.MaxFloat64,
		math.SmallestNonzeroFloat64, -math.SmallestNonzeroFloat64, 2.2250738585072014e-308,
		2.2250738585072009e-308, 9007199254740993, 5e-324, 1e23, 8.41e21, 0.30000000000000004,
		math.Nextafter(1, 2), math.Nextafter(1, 0)}
	r := rand.New(rand.NewSource(seed))
	for len(v) < n {
		x := math.Float64frombits(r.Uint64())
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			v = append(v, x)
		}
	}
	return v[:n]
}

func TestFloat32RoundTripBitExact(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	const n = 500
	init := awkward32(n, 1)
	// Created through JSON, read back binary.
	s, err := c.CreateSession(ctx, "f32", optd.SessionConfig{Optimizer: sgd(0.5), ParamsF32: init})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.ParamsF32(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "JSON create -> binary params", got, init)

	// Written binary, read back binary.
	next := awkward32(n, 2)
	if err := s.SetParamsF32(ctx, next); err != nil {
		t.Fatal(err)
	}
	if got, err = s.ParamsF32(ctx); err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "binary set -> binary params", got, next)

	// A zero gradient leaves plain SGD's params as they are, so a step
	// answers them exactly: once in JSON, once binary.
	zero := make([]float32, n)
	if got, err = s.StepF32(ctx, zero, &optd.StepOptions{JSON: true}); err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "JSON step answer", got, next)
	if got, err = s.StepF32(ctx, zero, nil); err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "binary step answer", got, next)
	if s.LastStep() != 2 {
		t.Fatalf("step %d, want 2", s.LastStep())
	}
}

func TestFloat64RoundTripBitExact(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	const n = 500
	init := awkward64(n, 3)
	s, err := c.CreateSession(ctx, "f64", optd.SessionConfig{Optimizer: sgd(0.5), DType: optd.Float64, Params: init})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.ParamsF64(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameBits64(t, "JSON create -> binary params", got, init)
	next := awkward64(n, 4)
	if err := s.SetParamsF64(ctx, next); err != nil {
		t.Fatal(err)
	}
	if got, err = s.ParamsF64(ctx); err != nil {
		t.Fatal(err)
	}
	sameBits64(t, "binary set -> binary params", got, next)
	zero := make([]float64, n)
	if got, err = s.StepF64(ctx, zero, &optd.StepOptions{JSON: true}); err != nil {
		t.Fatal(err)
	}
	sameBits64(t, "JSON step answer", got, next)
	if got, err = s.StepF64(ctx, zero, nil); err != nil {
		t.Fatal(err)
	}
	sameBits64(t, "binary step answer", got, next)
}

func TestJSONAndBinaryStepsAgree(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	r := rand.New(rand.NewSource(5))
	const n, steps = 64, 25

	t.Run("float32 adam", func(t *testing.T) {
		init := make([]float32, n)
		for i := range init {
			init[i] = float32(r.NormFloat64())
		}
		cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "adam", "lr": 0.01, "amsgrad": true},
			ParamsF32: init, Clip: map[string]any{"type": "norm", "max_norm": 5}}
		bin, err := c.CreateSession(ctx, "bin32", cfg)
		if err != nil {
			t.Fatal(err)
		}
		js, err := c.CreateSession(ctx, "json32", cfg)
		if err != nil {
			t.Fatal(err)
		}
		for k := 0; k < steps; k++ {
			g := make([]float32, n)
			for i := range g {
				g[i] = float32(r.NormFloat64())
			}
			loss := r.Float64()
			pb, err := bin.StepF32(ctx, g, &optd.StepOptions{Loss: optd.Ptr(loss)})
			if err != nil {
				t.Fatal(err)
			}
			pj, err := js.StepF32(ctx, g, &optd.StepOptions{Loss: optd.Ptr(loss), JSON: true})
			if err != nil {
				t.Fatal(err)
			}
			sameBits32(t, "binary vs JSON params", pb, pj)
			ib, ij := bin.LastStepInfo(), js.LastStepInfo()
			if ib.Step != int64(k+1) || ij.Step != ib.Step || ib.LR != 0.01 || ij.LR != ib.LR {
				t.Fatalf("step %d: binary %+v JSON %+v", k, ib, ij)
			}
		}
		hb, err := bin.History(ctx)
		if err != nil {
			t.Fatal(err)
		}
		hj, err := js.History(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(hb) != steps || len(hj) != steps {
			t.Fatalf("history lengths %d %d", len(hb), len(hj))
		}
		for i := range hb {
			if *hb[i].Loss != *hj[i].Loss || hb[i].GradNorm != hj[i].GradNorm || hb[i].UpdateNorm != hj[i].UpdateNorm {
				t.Fatalf("history %d: %+v vs %+v", i, hb[i], hj[i])
			}
		}
	})

	t.Run("float64 adamw cosine", func(t *testing.T) {
		init := make([]float64, n)
		for i := range init {
			init[i] = r.NormFloat64()
		}
		cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "adamw", "lr": 0.05, "weight_decay": 0.1},
			DType: optd.Float64, Params: init, Schedule: map[string]any{"type": "cosine", "T_max": steps}}
		bin, err := c.CreateSession(ctx, "bin64", cfg)
		if err != nil {
			t.Fatal(err)
		}
		js, err := c.CreateSession(ctx, "json64", cfg)
		if err != nil {
			t.Fatal(err)
		}
		for k := 0; k < steps; k++ {
			g := make([]float64, n)
			for i := range g {
				g[i] = r.NormFloat64()
			}
			pb, err := bin.StepF64(ctx, g, nil)
			if err != nil {
				t.Fatal(err)
			}
			pj, err := js.StepF64(ctx, g, &optd.StepOptions{JSON: true})
			if err != nil {
				t.Fatal(err)
			}
			sameBits64(t, "binary vs JSON params", pb, pj)
			ib, ij := bin.LastStepInfo(), js.LastStepInfo()
			// torch's CosineAnnealingLR, closed form, at the step before.
			want := 0.05 * (1 + math.Cos(math.Pi*float64(k)/steps)) / 2
			if ib.Step != int64(k+1) || ij.Step != ib.Step || ib.LR != ij.LR || math.Abs(ib.LR-want) > 1e-12 {
				t.Fatalf("step %d: binary %+v JSON %+v, want lr %v", k, ib, ij, want)
			}
		}
		// Without params the answer still counts the step.
		p, err := bin.StepF64(ctx, make([]float64, n), &optd.StepOptions{NoParams: true})
		if err != nil || p != nil || bin.LastStep() != steps+1 {
			t.Fatalf("NoParams binary: %v %v step %d", p, err, bin.LastStep())
		}
		p, err = js.StepF64(ctx, make([]float64, n), &optd.StepOptions{NoParams: true, JSON: true})
		if err != nil || p != nil || js.LastStep() != steps+1 {
			t.Fatalf("NoParams JSON: %v %v step %d", p, err, js.LastStep())
		}
		pb, err := bin.ParamsF64(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pj, err := js.ParamsF64(ctx)
		if err != nil {
			t.Fatal(err)
		}
		sameBits64(t, "final params", pb, pj)
	})
}

// ------------------------------------------------------------ idempotency

var hexKey = regexp.MustCompile(`^[0-9a-f]{32}$`)

func TestIdempotencyKeyAppliesOnce(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	s, err := c.CreateSession(ctx, "idem", optd.SessionConfig{Optimizer: sgd(0.5), DType: optd.Float64,
		Params: []float64{1, 2, 3}})
	if err != nil {
		t.Fatal(err)
	}
	key := optd.NewIdempotencyKey()
	if !hexKey.MatchString(key) || key == optd.NewIdempotencyKey() {
		t.Fatalf("key %q", key)
	}
	g := []float64{1, 1, 1}
	p1, err := s.StepF64(ctx, g, &optd.StepOptions{IdempotencyKey: key})
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); in.Replayed || in.Step != 1 {
		t.Fatalf("first send %+v", in)
	}
	p2, err := s.StepF64(ctx, g, &optd.StepOptions{IdempotencyKey: key})
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); !in.Replayed || in.Step != 1 {
		t.Fatalf("second send %+v", in)
	}
	sameBits64(t, "replayed answer", p2, p1)
	sameBits64(t, "applied once", p1, []float64{0.5, 1.5, 2.5})
	// JSON replays the same way.
	p3, err := s.StepF64(ctx, g, &optd.StepOptions{IdempotencyKey: key, JSON: true})
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); !in.Replayed || in.Step != 1 {
		t.Fatalf("JSON resend %+v", in)
	}
	sameBits64(t, "JSON replay", p3, p1)

	// A fresh key applies.
	if _, err := s.StepF64(ctx, g, nil); err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Step != 2 || info.Counters.Applied != 2 {
		t.Fatalf("after replays: step %d applied %d", info.Step, info.Counters.Applied)
	}
	h, err := s.History(ctx)
	if err != nil || len(h) != 2 {
		t.Fatalf("history %+v %v", h, err)
	}
}

func TestRetryAfterLostAnswerReusesKey(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	// Two lost answers: Go's transport itself resends a request that has an
	// Idempotency-Key once when a kept-alive connection breaks, so the
	// second loss is the client's own retry loop's to handle.
	proxy := startFaultProxy(t, d.URL, 2, 0)
	c := optd.NewClient(proxy.URL, optd.WithBackoff(5*time.Millisecond, 20*time.Millisecond))
	s, err := c.CreateSession(ctx, "lost", optd.SessionConfig{Optimizer: sgd(0.25), DType: optd.Float64,
		Params: []float64{1, 1}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.StepF64(ctx, []float64{1, -1}, &optd.StepOptions{Loss: optd.Ptr(3.0)})
	if err != nil {
		t.Fatalf("step through a lost answer: %v", err)
	}
	keys := proxy.stepKeys()
	if len(keys) != 3 || keys[0] != keys[1] || keys[1] != keys[2] || !hexKey.MatchString(keys[0]) {
		t.Fatalf("the proxy saw keys %q, want the same random key 3 times", keys)
	}
	if in := s.LastStepInfo(); !in.Replayed || in.Step != 1 {
		t.Fatalf("the retry should be answered from the key's record: %+v", in)
	}
	sameBits64(t, "params", p, []float64{0.75, 1.25})
	direct := optd.NewClient(d.URL).Session("lost")
	h, err := direct.History(ctx)
	if err != nil || len(h) != 1 {
		t.Fatalf("applied %d times (%v), want once", len(h), err)
	}
	// Another step gets another key.
	if _, err := s.StepF64(ctx, []float64{0, 0}, nil); err != nil {
		t.Fatal(err)
	}
	if keys = proxy.stepKeys(); len(keys) != 4 || keys[3] == keys[0] {
		t.Fatalf("keys %q", keys)
	}
}

func TestRetryGivesUpThenCallerRetriesWithKey(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	proxy := startFaultProxy(t, d.URL, 1000, 0) // every answer is lost
	c := optd.NewClient(proxy.URL, optd.WithRetries(2), optd.WithBackoff(time.Millisecond, 5*time.Millisecond))
	s, err := c.CreateSession(ctx, "gone", optd.SessionConfig{Optimizer: sgd(1), DType: optd.Float64,
		Params: []float64{0}})
	if err != nil {
		t.Fatal(err)
	}
	key := optd.NewIdempotencyKey()
	_, err = s.StepF64(ctx, []float64{1}, &optd.StepOptions{IdempotencyKey: key})
	var oe *optd.Error
	if err == nil || errors.As(err, &oe) {
		t.Fatalf("want a transport error, got %v", err)
	}
	keys := proxy.stepKeys()
	if len(keys) < 3 {
		t.Fatalf("%d attempts, want at least 1 + 2 retries", len(keys))
	}
	for _, k := range keys {
		if k != key {
			t.Fatalf("attempt with key %q, want %q", k, key)
		}
	}
	// The daemon applied it once; resending the key directly confirms.
	direct := optd.NewClient(d.URL).Session("gone")
	p, err := direct.StepF64(ctx, []float64{1}, &optd.StepOptions{IdempotencyKey: key})
	if err != nil {
		t.Fatal(err)
	}
	if in := direct.LastStepInfo(); !in.Replayed || in.Step != 1 {
		t.Fatalf("resend %+v", in)
	}
	sameBits64(t, "applied once", p, []float64{-1})
}

func TestRetryOn503(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	proxy := startFaultProxy(t, d.URL, 0, 2)
	c := optd.NewClient(proxy.URL, optd.WithBackoff(time.Millisecond, 5*time.Millisecond))
	s, err := c.CreateSession(ctx, "busy", optd.SessionConfig{Optimizer: sgd(1), ParamsF32: []float32{0}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.StepF32(ctx, []float32{1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); in.Replayed || in.Step != 1 || len(proxy.stepKeys()) != 3 {
		t.Fatalf("after two 503s: %+v, %d attempts", in, len(proxy.stepKeys()))
	}
	sameBits32(t, "params", p, []float32{-1})

	// Out of retries, the 503 itself comes back.
	proxy2 := startFaultProxy(t, d.URL, 0, 5)
	c2 := optd.NewClient(proxy2.URL, optd.WithRetries(1), optd.WithBackoff(time.Millisecond, time.Millisecond))
	_, err = c2.Session("busy").StepF32(ctx, []float32{1}, nil)
	e := asError(t, err, 503)
	if !e.Temporary() || e.Type != "urn:optd:problem:unavailable" || len(proxy2.stepKeys()) != 2 {
		t.Fatalf("%+v after %d attempts", e, len(proxy2.stepKeys()))
	}

	// A 503 naming a Retry-After is retried after it, not after the backoff,
	// and the last one's comes back on the error.
	proxy3 := startFaultProxy(t, d.URL, 0, 2)
	proxy3.mu.Lock()
	proxy3.retryAfter = "1"
	proxy3.mu.Unlock()
	c3 := optd.NewClient(proxy3.URL, optd.WithRetries(1), optd.WithBackoff(time.Millisecond, time.Millisecond))
	t0 := time.Now()
	_, err = c3.Session("busy").StepF32(ctx, []float32{1}, nil)
	e = asError(t, err, 503)
	if el := time.Since(t0); el < time.Second || e.RetryAfter != time.Second || len(proxy3.stepKeys()) != 2 {
		t.Fatalf("%+v after %v and %d attempts", e, el, len(proxy3.stepKeys()))
	}
	if _, err = c3.Session("busy").StepF32(ctx, []float32{1}, nil); err != nil {
		t.Fatal(err)
	}
}

func TestRetriesAreBoundedAndHonourContext(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + ln.Addr().String()
	ln.Close() // nothing listens there now: connection refused

	c := optd.NewClient(closed, optd.WithRetries(3), optd.WithBackoff(20*time.Millisecond, 40*time.Millisecond))
	t0 := time.Now()
	err = c.Health(context.Background())
	el := time.Since(t0)
	var oe *optd.Error
	if !errors.Is(err, syscall.ECONNREFUSED) || errors.As(err, &oe) {
		t.Fatalf("want connection refused, got %v", err)
	}
	// Three waits of at least 10, 20 and 20 ms; far less than a second.
	if el < 50*time.Millisecond || el > 2*time.Second {
		t.Fatalf("3 retries took %v", el)
	}

	c = optd.NewClient(closed, optd.WithRetries(1000), optd.WithBackoff(30*time.Millisecond, 30*time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	t0 = time.Now()
	_, err = c.Session("x").StepF32(ctx, []float32{1}, nil)
	el = time.Since(t0)
	if !errors.Is(err, context.DeadlineExceeded) || el > time.Second {
		t.Fatalf("after %v: %v", el, err)
	}

	// A daemon that accepts and never answers: each attempt times out.
	ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var mu sync.Mutex
	accepted := 0
	var held []net.Conn
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted++
			held = append(held, conn)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()
	c = optd.NewClient("http://"+ln.Addr().String(), optd.WithRetries(2),
		optd.WithTimeout(100*time.Millisecond), optd.WithBackoff(time.Millisecond, time.Millisecond))
	t0 = time.Now()
	err = c.Health(context.Background())
	el = time.Since(t0)
	if err == nil || errors.As(err, &oe) || el < 300*time.Millisecond || el > 3*time.Second {
		t.Fatalf("after %v: %v", el, err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("want a timeout, got %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if accepted != 3 {
		t.Fatalf("%d connections for 1 attempt + 2 retries", accepted)
	}
}

func TestRetryAcrossDaemonRestart(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	c := optd.NewClient(d.URL, optd.WithRetries(10), optd.WithBackoff(20*time.Millisecond, 200*time.Millisecond))
	s, err := c.CreateSession(ctx, "r", optd.SessionConfig{Optimizer: sgd(0.5, "momentum", 0.9),
		DType: optd.Float64, Params: []float64{1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.StepF64(ctx, []float64{1, 1}, nil); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
	restarted := make(chan *daemon, 1)
	go func() {
		time.Sleep(150 * time.Millisecond)
		// Fatal cannot be called from here; startDaemonAt only calls it
		// when the daemon fails to start, which the step below reports.
		restarted <- startDaemonAt(t, d.DB, d.Port)
	}()
	p, err := s.StepF64(ctx, []float64{1, 1}, nil)
	<-restarted
	if err != nil {
		t.Fatalf("step across a restart: %v", err)
	}
	// torch SGD momentum: buf = g, then buf = 0.9 buf + g; p -= 0.5 buf.
	want := []float64{1 - 0.5*1 - 0.5*1.9, 2 - 0.5*1 - 0.5*1.9}
	near(t, "params after restart", p, want, 1e-15)
	if s.LastStep() != 2 {
		t.Fatalf("step %d", s.LastStep())
	}
}

func TestConnectionsAreReused(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	relay := startTCPRelay(t, d.URL)
	c := optd.NewClient(relay.Addr)
	ctx := ctxT(t)
	s, err := c.CreateSession(ctx, "ka", optd.SessionConfig{Optimizer: sgd(0.1), Size: 1000, Init: optd.InitZeros()})
	if err != nil {
		t.Fatal(err)
	}
	g := make([]float32, 1000)
	for i := 0; i < 20; i++ {
		if _, err := s.StepF32(ctx, g, nil); err != nil {
			t.Fatal(err)
		}
		// Error answers are read and closed too.
		if _, err := c.Session("nope").Info(ctx); !optd.IsNotFound(err) {
			t.Fatal(err)
		}
		if _, err := s.StepF32(ctx, g[:3], nil); asError(t, err, 422) == nil {
			t.Fatal("no error")
		}
	}
	if n := relay.conns.Load(); n != 1 {
		t.Fatalf("60 sequential calls opened %d connections", n)
	}
}

// ------------------------------------------------------------- errors

func TestTypedErrors(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)

	_, err := c.Session("missing").Info(ctx)
	e := asError(t, err, 404)
	if !optd.IsNotFound(err) || e.Type != "urn:optd:problem:not-found" || e.Title != "Not Found" ||
		e.Field != "name" || !strings.Contains(e.Detail, "missing") || e.Step != nil {
		t.Fatalf("404 %+v", e)
	}
	if !strings.Contains(e.Error(), "404") || !strings.Contains(e.Error(), "missing") {
		t.Fatalf("message %q", e.Error())
	}
	if _, err := c.Session("missing").StepF64(ctx, []float64{1}, nil); !optd.IsNotFound(err) {
		t.Fatalf("step on a missing session: %v", err)
	}

	_, err = c.CreateSession(ctx, "bad", optd.SessionConfig{Optimizer: map[string]any{"type": "adamm"}, Size: 2,
		Init: optd.InitZeros()})
	e = asError(t, err, 400)
	if e.Type != "urn:optd:problem:bad-request" || e.Field != "optimizer.type" || !strings.Contains(e.Detail, "adamm") {
		t.Fatalf("unknown optimizer %+v", e)
	}
	_, err = c.CreateSession(ctx, "bad", optd.SessionConfig{Optimizer: sgd(0.1, "betas", []float64{0.9, 0.99}),
		Size: 2, Init: optd.InitZeros()})
	if e = asError(t, err, 400); !strings.HasPrefix(e.Field, "optimizer") {
		t.Fatalf("unknown hyperparameter %+v", e)
	}

	s, err := c.CreateSession(ctx, "s", optd.SessionConfig{Optimizer: sgd(0.1), DType: optd.Float64,
		Params: []float64{1, 2, 3}, Mode: map[string]any{"type": "async", "max_staleness": 0}})
	if err != nil {
		t.Fatal(err)
	}
	for _, js := range []bool{false, true} {
		_, err = s.StepF64(ctx, []float64{1, 2}, &optd.StepOptions{JSON: js})
		if e = asError(t, err, 422); e.Field != "grad" || e.Type != "urn:optd:problem:unprocessable" {
			t.Fatalf("wrong length (JSON %v): %+v", js, e)
		}
	}
	_, err = s.StepF64(ctx, []float64{1, math.NaN(), 3}, nil)
	if e = asError(t, err, 422); e.Field != "grad" {
		t.Fatalf("NaN: %+v", e)
	}
	// JSON cannot carry a NaN: refused here, nothing sent.
	_, err = s.StepF64(ctx, []float64{1, math.Inf(1), 3}, &optd.StepOptions{JSON: true})
	var oe *optd.Error
	if err == nil || errors.As(err, &oe) {
		t.Fatalf("Inf in JSON: %v", err)
	}
	// A typed call on the other dtype is refused before sending.
	if _, err = s.StepF32(ctx, []float32{1, 2, 3, 4, 5, 6}, nil); !errors.Is(err, optd.ErrDType) {
		t.Fatalf("StepF32 on a float64 session: %v", err)
	}
	if _, err = c.Session("s").ParamsF32(ctx); !errors.Is(err, optd.ErrDType) {
		t.Fatalf("ParamsF32 on a float64 session (fresh handle): %v", err)
	}
	if err = s.SetParamsF64(ctx, []float64{1}); asError(t, err, 422).Field != "params" {
		t.Fatalf("short params: %v", err)
	}

	// Staleness: with max_staleness 0 a gradient from step 0 is stale at step 1.
	if _, err = s.StepF64(ctx, []float64{0, 0, 0}, &optd.StepOptions{BaseStep: optd.Ptr(int64(0))}); err != nil {
		t.Fatal(err)
	}
	_, err = s.StepF64(ctx, []float64{0, 0, 0}, &optd.StepOptions{BaseStep: optd.Ptr(int64(0))})
	e = asError(t, err, 409)
	if !optd.IsConflict(err) || e.Field != "base_step" || e.Step == nil || *e.Step != 1 {
		t.Fatalf("stale: %+v", e)
	}
	_, err = s.StepF64(ctx, []float64{0, 0, 0}, &optd.StepOptions{BaseStep: optd.Ptr(int64(0)), JSON: true})
	if e = asError(t, err, 409); e.Step == nil || *e.Step != 1 {
		t.Fatalf("stale (JSON): %+v", e)
	}
	info, err := s.Info(ctx)
	if err != nil || info.Step != 1 || info.Counters.RejectedStale != 2 {
		t.Fatalf("after errors: %+v %v", info, err)
	}
	if _, err = s.StepF64(ctx, []float64{0, 0, 0}, &optd.StepOptions{Loss: optd.Ptr(math.Inf(1))}); asError(t, err, 400).Field != "Optd-Loss" {
		t.Fatalf("Inf loss: %v", err)
	}
}

func TestAPIKey(t *testing.T) {
	t.Parallel()
	d := startDaemon(t, "--api-key", "s3cret")
	ctx := ctxT(t)
	cfg := optd.SessionConfig{Optimizer: sgd(0.1), Size: 2, Init: optd.InitZeros()}
	for _, c := range []*optd.Client{optd.NewClient(d.URL), optd.NewClient(d.URL, optd.WithAPIKey("wrong"))} {
		_, err := c.CreateSession(ctx, "k", cfg)
		e := asError(t, err, 401)
		if !optd.IsUnauthorized(err) || e.Type != "urn:optd:problem:unauthorized" || e.Title != "Unauthorized" {
			t.Fatalf("401 %+v", e)
		}
		if _, err := c.Sessions(ctx); !optd.IsUnauthorized(err) {
			t.Fatalf("list without the key: %v", err)
		}
		// The liveness probe needs no key.
		if err := c.Health(ctx); err != nil {
			t.Fatal(err)
		}
	}
	c := optd.NewClient(d.URL, optd.WithAPIKey("s3cret"))
	s, err := c.CreateSession(ctx, "k", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.StepF32(ctx, []float32{1, 1}, nil); err != nil {
		t.Fatal(err)
	}
}

// ------------------------------------------------------ update, history

func TestUpdateHistoryDelete(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	s, err := c.CreateSession(ctx, "u", optd.SessionConfig{Optimizer: sgd(0.1), DType: optd.Float64,
		Params: []float64{0, 0}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.StepF64(ctx, []float64{3, 4}, &optd.StepOptions{Loss: optd.Ptr(2.5), Worker: "w1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.StepF64(ctx, []float64{3, 4}, &optd.StepOptions{JSON: true, Worker: "w2"}); err != nil {
		t.Fatal(err)
	}
	info, err := s.Update(ctx, optd.SetLR(0.05), optd.SetMetadata(map[string]any{"note": "halved"}))
	if err != nil {
		t.Fatal(err)
	}
	if info.LR != 0.05 || info.Optimizer["lr"] != 0.05 || string(info.Metadata) != `{"note":"halved"}` || info.Step != 2 {
		t.Fatalf("after update %+v", info)
	}
	p, err := s.StepF64(ctx, []float64{3, 4}, &optd.StepOptions{Loss: optd.Ptr(1.25)})
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); in.LR != 0.05 || in.Step != 3 {
		t.Fatalf("step after update %+v", in)
	}
	near(t, "params", p, []float64{-0.75, -1}, 1e-15)
	_, err = s.Update(ctx, optd.SetLR(-1))
	if e := asError(t, err, 400); e.Field != "optimizer.lr" {
		t.Fatalf("negative lr: %+v", e)
	}

	h, err := s.History(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(h) != 3 {
		t.Fatalf("history %+v", h)
	}
	wantLR := []float64{0.1, 0.1, 0.05}
	for i, st := range h {
		if st.Step != int64(i+1) || st.LR != wantLR[i] || st.GradNorm != 5 || st.Time.IsZero() ||
			math.Abs(st.UpdateNorm-5*wantLR[i]) > 1e-15 {
			t.Fatalf("history %d: %+v", i, st)
		}
	}
	if h[0].Loss == nil || *h[0].Loss != 2.5 || h[1].Loss != nil || *h[2].Loss != 1.25 {
		t.Fatalf("losses %v %v %v", h[0].Loss, h[1].Loss, h[2].Loss)
	}
	if h[0].Worker != "w1" || h[1].Worker != "w2" || h[2].Worker != "" {
		t.Fatalf("workers %q %q %q", h[0].Worker, h[1].Worker, h[2].Worker)
	}
	page, next, err := s.HistoryPage(ctx, 0, 2)
	if err != nil || len(page) != 2 || next != 2 {
		t.Fatalf("page 1: %+v next %d %v", page, next, err)
	}
	page, next, err = s.HistoryPage(ctx, next, 2)
	if err != nil || len(page) != 1 || page[0].Step != 3 || next != -1 {
		t.Fatalf("page 2: %+v next %d %v", page, next, err)
	}
	restore := optd.SetPageSizes(1000, 1)
	h1, err := s.History(ctx)
	restore()
	if err != nil || !reflect.DeepEqual(h1, h) {
		t.Fatalf("History by pages of 1: %+v %v", h1, err)
	}

	if err := s.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Info(ctx); !optd.IsNotFound(err) {
		t.Fatalf("after delete: %v", err)
	}
	if err := s.Delete(ctx); !optd.IsNotFound(err) {
		t.Fatalf("second delete: %v", err)
	}
	if list, err := c.Sessions(ctx); err != nil || len(list) != 0 {
		t.Fatalf("sessions after delete %+v %v", list, err)
	}
	// The name is free again, even for another dtype.
	s2, err := c.CreateSession(ctx, "u", optd.SessionConfig{Optimizer: sgd(1), Params: []float64{7}})
	if err != nil || !s2.Created() {
		t.Fatalf("recreate: %v", err)
	}
	if p, err := s2.StepF32(ctx, []float32{1}, nil); err != nil || p[0] != 6 {
		t.Fatalf("recreated step %v %v", p, err)
	}
	// The old handle forgot the float64 dtype when it deleted the session.
	if p, err := s.StepF32(ctx, []float32{1}, nil); err != nil || p[0] != 5 || s.LastStep() != 2 {
		t.Fatalf("old handle on the recreated session: %v %v", p, err)
	}
}

func TestAccumulateAndSkip(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	s, err := c.CreateSession(ctx, "acc", optd.SessionConfig{Optimizer: sgd(0.5), DType: optd.Float64,
		Params: []float64{1, 1}, Mode: map[string]any{"type": "async", "accumulate": 2}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.StepF64(ctx, []float64{1, 2}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); in.Pending != 1 || in.Step != 0 || !math.IsNaN(in.LR) {
		t.Fatalf("first of 2: %+v", in)
	}
	sameBits64(t, "pending params", p, []float64{1, 1})
	p, err = s.StepF64(ctx, []float64{3, 4}, &optd.StepOptions{JSON: true})
	if err != nil {
		t.Fatal(err)
	}
	if in := s.LastStepInfo(); in.Pending != 0 || in.Step != 1 || in.LR != 0.5 {
		t.Fatalf("second of 2: %+v", in)
	}
	near(t, "mean of 2 applied", p, []float64{1 - 0.5*2, 1 - 0.5*3}, 1e-15)

	k, err := c.CreateSession(ctx, "skip", optd.SessionConfig{Optimizer: sgd(0.5), ParamsF32: []float32{1},
		Nonfinite: "skip"})
	if err != nil {
		t.Fatal(err)
	}
	q, err := k.StepF32(ctx, []float32{float32(math.Inf(-1))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if in := k.LastStepInfo(); !in.Skipped || q[0] != 1 {
		t.Fatalf("skip: %+v %v", in, q)
	}
	info, err := k.Info(ctx)
	if err != nil || info.Counters.SkippedNonfinite != 1 || info.Counters.Applied != 0 {
		t.Fatalf("counters %+v %v", info.Counters, err)
	}
}

// ------------------------------------------------------------- numerics

func TestConcurrentSGDSumsEveryGradient(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	const n, workers, steps, lr = 32, 4, 50, 0.01
	init := make([]float64, n)
	for i := range init {
		init[i] = float64(i) - 10.5
	}
	if _, err := c.CreateSession(ctx, "shared", optd.SessionConfig{Optimizer: sgd(lr), DType: optd.Float64,
		Params: init}); err != nil {
		t.Fatal(err)
	}
	sums := make([][]float64, workers)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(100 + w)))
			s := c.Session("shared")
			sum := make([]float64, n)
			for k := 0; k < steps; k++ {
				g := make([]float64, n)
				for i := range g {
					g[i] = r.NormFloat64()
					sum[i] += g[i]
				}
				// Half of the workers use JSON, for good measure.
				if _, err := s.StepF64(ctx, g, &optd.StepOptions{JSON: w%2 == 1, NoParams: k%2 == 0,
					Worker: "w"}); err != nil {
					errs <- err
					return
				}
			}
			sums[w] = sum
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	s := c.Session("shared")
	p, err := s.ParamsF64(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.LastStep() != workers*steps {
		t.Fatalf("step %d, want %d", s.LastStep(), workers*steps)
	}
	want := make([]float64, n)
	for i := range want {
		total := 0.0
		for w := range sums {
			total += sums[w][i]
		}
		want[i] = init[i] - lr*total
	}
	near(t, "params", p, want, 1e-9)
}

// TestSGDMomentumMatchesTorch runs 100 steps against torch.optim.SGD's
// documented update, computed here in float64:
//
//	g = g + weight_decay*p
//	b = g (first step), else b = momentum*b + (1-dampening)*g
//	g = g + momentum*b if nesterov, else g = b
//	p = p - lr*g
func TestSGDMomentumMatchesTorch(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	cases := []struct {
		name              string
		lr, mom, damp, wd float64
		nesterov          bool
	}{
		{"dampened with decay", 0.05, 0.9, 0.1, 0.01, false},
		{"nesterov", 0.02, 0.95, 0, 0.001, true},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			const n, steps = 16, 100
			r := rand.New(rand.NewSource(42))
			p := make([]float64, n)
			target := make([]float64, n)
			for i := range p {
				p[i] = r.NormFloat64()
				target[i] = r.NormFloat64()
			}
			s, err := c.CreateSession(ctx, strings.ReplaceAll(tc.name, " ", "_"), optd.SessionConfig{
				Optimizer: sgd(tc.lr, "momentum", tc.mom, "dampening", tc.damp, "weight_decay", tc.wd,
					"nesterov", tc.nesterov),
				DType: optd.Float64, Params: p})
			if err != nil {
				t.Fatal(err)
			}
			ref := append([]float64(nil), p...)
			buf := make([]float64, n)
			got := p
			for k := 0; k < steps; k++ {
				// The gradient of 0.5*|p - target|² at the daemon's params,
				// plus noise.
				g := make([]float64, n)
				for i := range g {
					g[i] = got[i] - target[i] + 0.1*r.NormFloat64()
				}
				if got, err = s.StepF64(ctx, g, &optd.StepOptions{JSON: k%3 == 0}); err != nil {
					t.Fatal(err)
				}
				for i := range ref {
					gi := g[i] + tc.wd*ref[i]
					if k == 0 {
						buf[i] = gi
					} else {
						buf[i] = tc.mom*buf[i] + (1-tc.damp)*gi
					}
					if tc.nesterov {
						gi = gi + tc.mom*buf[i]
					} else {
						gi = buf[i]
					}
					ref[i] -= tc.lr * gi
				}
				near(t, "params at step "+strconv.Itoa(k+1), got, ref, 1e-12)
			}
			if s.LastStep() != steps {
				t.Fatalf("step %d", s.LastStep())
			}
		})
	}
}
