package optd_test

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"math/rand"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	optd "optd.dev/client/go"
)

// kill9 kills the daemon with SIGKILL (a crash) and waits for it.
func (d *daemon) kill9(t *testing.T) {
	t.Helper()
	killedPIDs.Store(d.cmd.Process.Pid, true)
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-d.done
}

func randGradF32(r *rand.Rand, n int, scale float64) []float32 {
	g := make([]float32, n)
	for i := range g {
		g[i] = float32(r.NormFloat64() * scale)
	}
	return g
}

// The client's norm is the daemon's: a single session's history records the
// norm it clipped with, which must equal GradNorm's bit for bit, with and
// without a layout, for each norm type, over several blocks of 8192.
func TestGradNormIsTheDaemons(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	c := optd.NewClient(d.URL)
	r := rand.New(rand.NewSource(7))
	const n = 3*8192 + 1000
	tensors := []optd.Tensor{{Name: "a", Shape: []int{100, 90}}, {Name: "b", Shape: []int{5}},
		{Name: "c", Shape: []int{n - 9005}}}
	for _, tc := range []struct {
		name     string
		tensors  []optd.Tensor
		sizes    []int
		normType any
		nt       float64
	}{
		{"plain2", nil, []int{n}, 2, 2},
		{"plain1", nil, []int{n}, 1, 1},
		{"plaininf", nil, []int{n}, "inf", math.Inf(1)},
		{"layout2", tensors, []int{9000, 5, n - 9005}, 2, 2},
	} {
		s, err := c.CreateSession(ctx, tc.name, optd.SessionConfig{Optimizer: map[string]any{"type": "sgd", "lr": 0.01},
			ParamsF32: make([]float32, n), Tensors: tc.tensors,
			Clip: map[string]any{"type": "norm", "max_norm": 1, "norm_type": tc.normType}})
		if err != nil {
			t.Fatal(err)
		}
		g := randGradF32(r, n, 3)
		if _, err := s.StepF32(ctx, g, &optd.StepOptions{NoParams: true}); err != nil {
			t.Fatal(err)
		}
		h, err := s.History(ctx)
		if err != nil || len(h) != 1 {
			t.Fatalf("%s history: %v %v", tc.name, h, err)
		}
		got, finite := optd.GradNormF32(g, tc.sizes, tc.nt)
		if !finite || math.Float64bits(got) != math.Float64bits(h[0].GradNorm) {
			t.Errorf("%s: GradNorm %.17g (finite %v), the daemon's %.17g", tc.name, got, finite, h[0].GradNorm)
		}
	}
	g := randGradF32(r, 10, 1)
	g[3] = float32(math.NaN())
	if _, finite := optd.GradNormF32(g, []int{10}, 2); finite {
		t.Errorf("a NaN gradient is finite")
	}
}

func TestSplitRules(t *testing.T) {
	if got := optd.SplitRanges(10, 3); !equalInts(got, []int{0, 3, 6, 10}) {
		t.Errorf("SplitRanges(10, 3) = %v", got)
	}
	if got := optd.SplitTensors([]int{5, 5, 5, 5, 5, 5}, 3); !equalInts(got, []int{0, 2, 4, 6}) {
		t.Errorf("SplitTensors even = %v", got)
	}
	// one big tensor first: every later shard still gets one
	if got := optd.SplitTensors([]int{100, 1, 1}, 3); !equalInts(got, []int{0, 1, 2, 3}) {
		t.Errorf("SplitTensors big first = %v", got)
	}
	if optd.ShardName("m", 2) != "m.shard2" || optd.ShardKey("k", 1) != "k.1" {
		t.Errorf("names %q %q", optd.ShardName("m", 2), optd.ShardKey("k", 1))
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func adamClip() (map[string]any, map[string]any) {
	return map[string]any{"type": "adam", "lr": 0.01, "weight_decay": 0.01},
		map[string]any{"type": "norm", "max_norm": 0.5}
}

// Three shards on three daemons against one session holding the whole
// vector: Adam clipped by norm, 100 steps, the joined params equal the
// single session's bit for bit at every step. Mid-run one shard's answer is
// lost after it applied the step (the client's retry is answered from the
// key), and one shard's daemon is killed with SIGKILL: the step fails on
// that shard alone, the daemon restarts on its database, and the step
// finished with its key applies on that shard only. Nothing is applied
// twice: every shard ends at step 100 with 100 updates applied.
func TestShardedMatchesSingleSession(t *testing.T) {
	t.Parallel()
	ds := []*daemon{startDaemon(t), startDaemon(t), startDaemon(t)}
	ctx := ctxT(t)
	const n = 2*8192 + 3001
	r := rand.New(rand.NewSource(11))
	p0 := randGradF32(r, n, 1)
	opt, clip := adamClip()
	ref, err := optd.NewClient(ds[0].URL).CreateSession(ctx, "ref",
		optd.SessionConfig{Optimizer: opt, Clip: clip, ParamsF32: p0})
	if err != nil {
		t.Fatal(err)
	}
	proxy := startFaultProxy(t, ds[1].URL, 0, 0)
	fast := []optd.Option{optd.WithRetries(2), optd.WithBackoff(10*time.Millisecond, 40*time.Millisecond)}
	clients := []*optd.Client{optd.NewClient(ds[0].URL, fast...), optd.NewClient(proxy.URL, fast...),
		optd.NewClient(ds[2].URL, fast...)}
	sh, err := optd.CreateSharded(ctx, clients, "m", optd.SessionConfig{Optimizer: opt, Clip: clip, ParamsF32: p0})
	if err != nil {
		t.Fatal(err)
	}
	if got := sh.Offsets(); !equalInts(got, optd.SplitRanges(n, 3)) {
		t.Fatalf("offsets %v", got)
	}
	for step := 1; step <= 100; step++ {
		g := randGradF32(r, n, 2)
		want, err := ref.StepF32(ctx, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		restarted := make(chan *daemon, 1)
		switch step {
		case 30:
			proxy.mu.Lock()
			proxy.drop = 1
			proxy.mu.Unlock()
		case 50:
			// killed in the middle of the run and back 0.4 s later: the
			// step retries shard 1 alone until it answers
			ds[1].kill9(t)
			go func() {
				time.Sleep(400 * time.Millisecond)
				restarted <- startDaemonAt(t, ds[1].DB, ds[1].Port)
			}()
		case 60:
			sh.SetRetryFor(0)
			ds[2].kill9(t)
		}
		got, info, err := sh.StepF32(ctx, g, nil)
		if step == 30 && (err != nil || !info.Replayed[1] || info.Replayed[0]) {
			t.Fatalf("step 30, answer of shard 1 lost: %v, replayed %v", err, info.Replayed)
		}
		if step == 50 {
			ds[1] = <-restarted
		}
		if step == 60 {
			var se *optd.ShardStepError
			if !errors.As(err, &se) || len(se.Failed) != 1 || se.Failed[0] != 2 {
				t.Fatalf("step 60 with shard 2's daemon killed: %v", err)
			}
			// a new step may not start while this one is unfinished
			if _, _, err := sh.StepF32(ctx, g, nil); err == nil || sh.PendingKey() != se.Key {
				t.Fatalf("a new step ran with step %s unfinished", se.Key)
			}
			ds[2] = startDaemonAt(t, ds[2].DB, ds[2].Port)
			got, info, err = sh.StepF32(ctx, g, &optd.ShardStepOptions{IdempotencyKey: se.Key})
			if err != nil {
				t.Fatalf("step 60 finished after the restart: %v", err)
			}
			if info.Replayed[0] || info.Replayed[1] || info.Replayed[2] {
				t.Fatalf("step 60: replays %v (shards 0 and 1 must not be sent it again)", info.Replayed)
			}
		} else if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if info.Step != int64(step) {
			t.Fatalf("step %d: the shards say %v", step, info.Steps)
		}
		sameBits32(t, "step "+strconv.Itoa(step), got, want)
	}
	// Another handle opened from the daemons alone sees the same session.
	again, err := optd.OpenSharded(ctx, []*optd.Client{optd.NewClient(ds[0].URL), optd.NewClient(ds[1].URL),
		optd.NewClient(ds[2].URL)}, "m")
	if err != nil {
		t.Fatal(err)
	}
	p, steps, err := again.ParamsF32(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want, err := ref.ParamsF32(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameBits32(t, "params", p, want)
	for i, sess := range again.Shards() {
		in, err := sess.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if steps[i] != 100 || in.Counters.Applied != 100 {
			t.Errorf("shard %d: step %d, %d applied; want 100", i, steps[i], in.Counters.Applied)
		}
	}
	// A NaN is refused before anything is sent.
	g := randGradF32(r, n, 1)
	g[n-1] = float32(math.Inf(1))
	if _, _, err := again.StepF32(ctx, g, nil); !errors.Is(err, optd.ErrNonFinite) {
		t.Errorf("an Inf gradient: %v", err)
	}
	if _, steps, _ := again.ParamsF32(ctx); steps[2] != 100 {
		t.Errorf("the Inf gradient changed shard 2: step %d", steps[2])
	}
}

// With a layout the split falls on tensor boundaries, each shard gets its
// tensors and the groups restricted to them, and the run still equals the
// single session's (a norm of per-tensor blocks, norm_type inf here), with
// client-driven group lrs too.
func TestShardedLayout(t *testing.T) {
	t.Parallel()
	ds := []*daemon{startDaemon(t), startDaemon(t), startDaemon(t)}
	ctx := ctxT(t)
	tensors := []optd.Tensor{{Name: "w1", Shape: []int{100, 100}}, {Name: "b1", Shape: []int{100}},
		{Name: "w2", Shape: []int{9000}}, {Name: "b2", Shape: []int{10}}, {Name: "w3", Shape: []int{3000}}}
	groups := []optd.Group{{Tensors: []string{"w1", "w2", "w3"}},
		{Tensors: []string{"b1", "b2"}, Overrides: map[string]any{"weight_decay": 0, "lr": 0.02}}}
	const n = 10000 + 100 + 9000 + 10 + 3000
	r := rand.New(rand.NewSource(5))
	p0 := randGradF32(r, n, 1)
	cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "adamw", "lr": 0.01},
		Clip:      map[string]any{"type": "norm", "max_norm": 0.1, "norm_type": "inf"},
		ParamsF32: p0, Tensors: tensors, Groups: groups}
	ref, err := optd.NewClient(ds[0].URL).CreateSession(ctx, "ref", cfg)
	if err != nil {
		t.Fatal(err)
	}
	clients := []*optd.Client{optd.NewClient(ds[0].URL), optd.NewClient(ds[1].URL), optd.NewClient(ds[2].URL)}
	sh, err := optd.CreateSharded(ctx, clients, "lay", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := sh.Offsets(); !equalInts(got, []int{0, 10000, 19100, n}) {
		t.Fatalf("offsets %v, want the tensor boundaries 0 10000 19100 %d", got, n)
	}
	in, err := sh.Shards()[1].Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(in.Tensors) != 2 || in.Tensors[0].Name != "b1" || len(in.Groups) != 2 ||
		len(in.Groups[0].Tensors) != 1 || in.Groups[0].Tensors[0] != "w2" {
		t.Fatalf("shard 1: tensors %v groups %v", in.Tensors, in.Groups)
	}
	var meta map[string]map[string]any
	if err := json.Unmarshal(in.Metadata, &meta); err != nil || meta["optd_shard"]["offset"] != 10000.0 ||
		meta["optd_shard"]["layout"] != true || meta["optd_shard"]["count"] != 3.0 {
		t.Fatalf("shard 1's metadata: %s", in.Metadata)
	}
	// From step 11 on, client-driven group lrs: each shard is sent its
	// groups' values (shard 0 holds group 0 only).
	var values []optd.GroupStep
	for step := 1; step <= 20; step++ {
		if step == 11 {
			values = []optd.GroupStep{{LR: optd.Ptr(0.005)}, {LR: optd.Ptr(0.03)}}
		}
		g := randGradF32(r, n, 2)
		want, err := ref.StepF32(ctx, g, &optd.StepOptions{Groups: values, Worker: "w7"})
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := sh.StepF32(ctx, g, &optd.ShardStepOptions{Groups: values, Worker: "w7"})
		if err != nil {
			t.Fatal(err)
		}
		sameBits32(t, "layout step "+strconv.Itoa(step), got, want)
	}
	if _, _, err := sh.StepF32(ctx, randGradF32(r, n, 1), &optd.ShardStepOptions{Groups: values[:1]}); err == nil {
		t.Errorf("one group value for a model of two")
	}
}

// docs/api.md's check values of the exact norm.
func TestGradNormCheckValues(t *testing.T) {
	const m = 100000
	h := make([]float32, m)
	for i := uint64(0); i < m; i++ {
		h[i] = float32(float64((i*2654435761)%4294967296)/4294967296.0 - 0.5)
	}
	for _, c := range []struct {
		sizes []int
		p     float64
		want  float64
	}{
		{[]int{m}, 2, 91.287529596558954},
		{[]int{30000, 70000}, 2, 91.287529596558969},
		{[]int{m}, 1, 25000.155304304324},
		{[]int{30000, 70000}, math.Inf(1), 0.5},
	} {
		if got, _ := optd.GradNormF32(h, c.sizes, c.p); got != c.want {
			t.Errorf("norm %v over %v: %.17g, want %.17g", c.p, c.sizes, got, c.want)
		}
	}
}

// crossGrad is g(t, i) = (((7t + 13i) mod 17) - 8) / 8, exact everywhere.
func crossGrad(n, t int) []float32 {
	g := make([]float32, n)
	for i := range g {
		g[i] = float32(((7*t+13*i)%17)-8) / 8
	}
	return g
}

// runPython runs /usr/bin/python3 with the Python client importable.
func runPython(t *testing.T, script string) string {
	t.Helper()
	cmd := exec.Command("/usr/bin/python3", "-c", script)
	cmd.Env = append(os.Environ(), "PYTHONPATH=../python")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("python3: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("python3: %v", err)
	}
	return string(out)
}

// A sharded session made and stepped by the Python client is stepped on
// by this one, and one made by this client is stepped by Python: both
// equal a single session bit for bit.
func TestShardedPythonCompatible(t *testing.T) {
	t.Parallel()
	ds := []*daemon{startDaemon(t), startDaemon(t), startDaemon(t)}
	ctx := ctxT(t)
	const n = 10100
	tensors := []optd.Tensor{{Name: "a", Shape: []int{5000}}, {Name: "b", Shape: []int{3000}},
		{Name: "c", Shape: []int{2000}}, {Name: "d", Shape: []int{100}}}
	groups := []optd.Group{{Tensors: []string{"a", "c"}},
		{Tensors: []string{"b", "d"}, Overrides: map[string]any{"lr": 0.02}}}
	cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "adam", "lr": 0.01},
		Clip: map[string]any{"type": "norm", "max_norm": 0.5}, ParamsF32: crossGrad(n, 0),
		Tensors: tensors, Groups: groups}
	c0 := optd.NewClient(ds[0].URL)
	ref, err := c0.CreateSession(ctx, "ref", cfg)
	if err != nil {
		t.Fatal(err)
	}
	urls := "['" + ds[0].URL + "', '" + ds[1].URL + "', '" + ds[2].URL + "']"
	out := runPython(t, `
import numpy as np, optd
def grad(t):
    i = np.arange(`+strconv.Itoa(n)+`, dtype=np.int64)
    return ((((7 * t + 13 * i) % 17) - 8) / 8).astype(np.float32)
sh = optd.ShardedSession.create(`+urls+`, 'bypy', {'type': 'adam', 'lr': 0.01},
    params=grad(0), clip={'type': 'norm', 'max_norm': 0.5},
    tensors=[('a', [5000]), ('b', [3000]), ('c', [2000]), ('d', [100])],
    groups=[{'tensors': ['a', 'c']}, {'tensors': ['b', 'd'], 'lr': 0.02}])
for t in (1, 2, 3):
    sh.step(grad(t))
print(sh.last_step)
`)
	if out != "3\n" {
		t.Fatalf("python: %q", out)
	}
	clients := []*optd.Client{c0, optd.NewClient(ds[1].URL), optd.NewClient(ds[2].URL)}
	// Creating it again with the same config verifies it (nothing changes).
	sh, err := optd.CreateSharded(ctx, clients, "bypy", cfg)
	if err != nil || sh.Shards()[0].Created() {
		t.Fatalf("create-or-verify of the shards Python made: %v", err)
	}
	if sh, err = optd.OpenSharded(ctx, clients, "bypy"); err != nil {
		t.Fatal(err)
	}
	var want []float32
	for step := 1; step <= 6; step++ {
		g := crossGrad(n, step)
		if want, err = ref.StepF32(ctx, g, nil); err != nil {
			t.Fatal(err)
		}
		if step <= 3 {
			continue
		}
		got, info, err := sh.StepF32(ctx, g, nil)
		if err != nil || info.Step != int64(step) {
			t.Fatalf("step %d: %v (shards at %v)", step, err, info.Steps)
		}
		sameBits32(t, "made by Python, stepped by Go, step "+strconv.Itoa(step), got, want)
	}

	// Made by Go at the reference's params, stepped by Python; a fresh
	// session from the same params is the reference.
	cfg.ParamsF32 = want
	if _, err := optd.CreateSharded(ctx, clients, "bygo", cfg); err != nil {
		t.Fatal(err)
	}
	ref2, err := c0.CreateSession(ctx, "ref2", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if want, err = ref2.StepF32(ctx, crossGrad(n, 7), nil); err != nil {
		t.Fatal(err)
	}
	out = runPython(t, `
import numpy as np, optd, sys
i = np.arange(`+strconv.Itoa(n)+`, dtype=np.int64)
g = ((((7 * 7 + 13 * i) % 17) - 8) / 8).astype(np.float32)
sh = optd.ShardedSession.open(`+urls+`, 'bygo')
sys.stdout.write(np.asarray(sh.step(g), dtype='<f4').tobytes().hex())
`)
	raw, err := hex.DecodeString(out)
	if err != nil || len(raw) != 4*n {
		t.Fatalf("python answered %d hex digits: %v", len(out), err)
	}
	got := make([]float32, n)
	for i := range got {
		got[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	sameBits32(t, "made by Go, stepped by Python", got, want)
}

// go test -run '^$' -bench GradNorm -benchtime 3x: 1e7 float32 elements.
func BenchmarkGradNormF32(b *testing.B) {
	g := randGradF32(rand.New(rand.NewSource(1)), 10_000_000, 1)
	b.SetBytes(int64(4 * len(g)))
	for i := 0; i < b.N; i++ {
		optd.GradNormF32(g, []int{len(g)}, 2)
	}
}

// Update, SetParams and Delete act on every shard, and a clip switched to
// norm mid-run makes later steps carry the whole vector's norm. Three
// shards share one daemon here (the names differ), beside the reference.
func TestShardedUpdateSetParamsDelete(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	c := optd.NewClient(d.URL)
	const n = 9000
	r := rand.New(rand.NewSource(3))
	cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "adam", "lr": 0.01}, ParamsF32: randGradF32(r, n, 1)}
	ref, err := c.CreateSession(ctx, "ref", cfg)
	if err != nil {
		t.Fatal(err)
	}
	sh, err := optd.CreateSharded(ctx, []*optd.Client{c, c, c}, "u", cfg)
	if err != nil {
		t.Fatal(err)
	}
	same := func(what string) {
		t.Helper()
		g := randGradF32(r, n, 2)
		want, err := ref.StepF32(ctx, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := sh.StepF32(ctx, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		sameBits32(t, what, got, want)
	}
	same("before the update")
	clip := optd.SetClip(optd.Clip{Type: "norm", Params: optd.Params{"max_norm": 0.1, "norm_type": 1}})
	if _, err := ref.Update(ctx, clip); err != nil {
		t.Fatal(err)
	}
	infos, err := sh.Update(ctx, clip)
	if err != nil || len(infos) != 3 || infos[2].Clip["type"] != "norm" {
		t.Fatalf("update: %v %v", infos, err)
	}
	same("clipped by the 1-norm after the update")
	same("clipped by the 1-norm, again")
	p := randGradF32(r, n, 1)
	if err := ref.SetParamsF32(ctx, p); err != nil {
		t.Fatal(err)
	}
	if err := sh.SetParamsF32(ctx, p); err != nil {
		t.Fatal(err)
	}
	if got, _, err := sh.ParamsF32(ctx); err != nil {
		t.Fatal(err)
	} else {
		sameBits32(t, "params set", got, p)
	}
	same("after the params were set")
	if _, err := sh.Update(ctx, optd.SetMetadata(map[string]any{"a": 1})); err == nil {
		t.Errorf("the shards' metadata was replaced")
	}
	if err := sh.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := c.Session(optd.ShardName("u", i)).Info(ctx); !optd.IsNotFound(err) {
			t.Errorf("shard %d after Delete: %v", i, err)
		}
	}
}
