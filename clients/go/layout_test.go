package optd_test

import (
	"reflect"
	"testing"

	optd "optd.dev/client/go"
)

// w is 2x3, b is 3: the vector is w then b.
var (
	layoutW = []float64{0.5, -1, 2, 0.25, 3, -0.75}
	layoutB = []float64{1, 2, 3}
)

func layoutConfig() optd.SessionConfig {
	return optd.SessionConfig{
		Optimizer: sgd(0.1),
		DType:     optd.Float64,
		Params:    append(append([]float64(nil), layoutW...), layoutB...),
		Tensors:   []optd.Tensor{{Name: "layer.w", Shape: []int{2, 3}}, {Name: "layer.b", Shape: []int{3}}},
		Groups: []optd.Group{
			{Tensors: []string{"layer.w"}},
			{Tensors: []string{"layer.b"}, Overrides: map[string]any{"lr": 0.5}},
		},
	}
}

func f64(x float64) *float64 { return &x }

func TestIndexRanges(t *testing.T) {
	if got := optd.IndexRanges([]int{60, 0, 1, 2, 57, 3}); got != "0-3,57,60" {
		t.Fatalf("IndexRanges = %q", got)
	}
}

func TestTensorsAndGroups(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)

	s, err := c.CreateSession(ctx, "layout", layoutConfig())
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []optd.TensorInfo{
		{Name: "layer.w", Shape: []int{2, 3}, Offset: 0, Size: 6},
		{Name: "layer.b", Shape: []int{3}, Offset: 6, Size: 3},
	}
	if !reflect.DeepEqual(info.Tensors, want) {
		t.Fatalf("tensors %+v", info.Tensors)
	}
	if len(info.Groups) != 2 || info.Groups[1].LR != 0.5 || info.Groups[0].LR != 0.1 ||
		!reflect.DeepEqual(info.Groups[1].Tensors, []string{"layer.b"}) {
		t.Fatalf("groups %+v", info.Groups)
	}

	// JSON: layer.w absent, grad holds layer.b's gradient only.
	g := []float64{0.5, -0.25, 1}
	p, err := s.StepF64(ctx, g, &optd.StepOptions{JSON: true, Absent: []int{0}})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(p[:6], layoutW) {
		t.Fatalf("absent layer.w moved: %v", p[:6])
	}
	for i := range g {
		if p[6+i] != layoutB[i]+-0.5*g[i] {
			t.Fatalf("layer.b[%d] = %v", i, p[6+i])
		}
	}

	// Binary: layer.b absent, each group with its own lr.
	g = []float64{1, 2, 3, 4, 5, 6}
	before := append([]float64(nil), p...)
	p, err = s.StepF64(ctx, g, &optd.StepOptions{Absent: []int{1},
		Groups: []optd.GroupStep{{LR: f64(0.2)}, {LR: f64(0.3)}}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range g {
		if p[i] != before[i]+-0.2*g[i] {
			t.Fatalf("layer.w[%d] = %v", i, p[i])
		}
	}
	if !reflect.DeepEqual(p[6:], before[6:]) {
		t.Fatalf("absent layer.b moved: %v", p[6:])
	}
	if info, err = s.Info(ctx); err != nil || info.Groups[0].LR != 0.2 || info.Groups[1].LR != 0.3 ||
		info.Step != 2 {
		t.Fatalf("after the lr step: %v %+v", err, info)
	}

	// Refused before anything is sent.
	if _, err := s.StepF64(ctx, g, &optd.StepOptions{Absent: []int{-1}}); err == nil {
		t.Fatal("a negative absent index was sent")
	}
	if _, err := s.StepF64(ctx, g, &optd.StepOptions{
		Groups: []optd.GroupStep{{LR: f64(0.2)}, {Momentum: f64(0.3)}}}); err == nil {
		t.Fatal("groups setting different fields were sent")
	}
}

func TestAbsentAndGroupsOn16BitWire(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	s, err := c.CreateSession(ctx, "layout-wire", layoutConfig())
	if err != nil {
		t.Fatal(err)
	}
	// bfloat16: layer.b absent, grad holds layer.w's six values (exact in
	// 16 bits), each group with its own lr; the answer is all nine params.
	g := []float64{1, 2, 3, 4, 5, 6}
	p, err := s.StepF64(ctx, g, &optd.StepOptions{Absent: []int{1}, Wire: optd.WireBFloat16,
		Groups: []optd.GroupStep{{LR: f64(0.2)}, {LR: f64(0.3)}}})
	if err != nil {
		t.Fatal(err)
	}
	full, err := s.ParamsF64Wire(ctx, optd.WireFull)
	if err != nil {
		t.Fatal(err)
	}
	for i := range g {
		if full[i] != layoutW[i]+-0.2*g[i] {
			t.Fatalf("layer.w[%d] = %v", i, full[i])
		}
	}
	if !reflect.DeepEqual(full[6:], layoutB) {
		t.Fatalf("absent layer.b moved: %v", full[6:])
	}
	if bitsOf(p) != bitsOf(roundTrip(t, full, optd.WireBFloat16)) {
		t.Fatalf("bfloat16 answer %v for params %v", p, full)
	}
	// float16: layer.w absent; group 1 keeps the lr 0.3 of the last step.
	gb := []float64{0.5, -0.25, 1}
	q, err := s.StepF64(ctx, gb, &optd.StepOptions{Absent: []int{0}, Wire: optd.WireFloat16})
	if err != nil {
		t.Fatal(err)
	}
	full2, err := s.ParamsF64Wire(ctx, optd.WireFull)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(full2[:6], full[:6]) {
		t.Fatalf("absent layer.w moved: %v", full2[:6])
	}
	for i := range gb {
		if full2[6+i] != layoutB[i]+-0.3*gb[i] {
			t.Fatalf("layer.b[%d] = %v", i, full2[6+i])
		}
	}
	if bitsOf(q) != bitsOf(roundTrip(t, full2, optd.WireFloat16)) {
		t.Fatalf("float16 answer %v for params %v", q, full2)
	}
}
