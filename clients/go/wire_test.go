package optd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"testing"

	optd "optd.dev/client/go"
)

// [float32 bits, bfloat16 bits]
var bf16Table = [][2]uint32{
	{0x3f800000, 0x3f80}, // 1.0
	{0x80000000, 0x8000}, // -0.0
	{0x3f808000, 0x3f80}, // tie, lower half even: down
	{0x3f818000, 0x3f82}, // tie, lower half odd: up
	{0x3f808001, 0x3f81}, // just past the tie
	{0x3f807fff, 0x3f80}, // just below the tie
	{0xc0490fdb, 0xc049}, // -pi
	{0x7f7fffff, 0x7f80}, // largest float32: Inf
	{0xff800000, 0xff80}, // -Inf
	{0x7fc00000, 0x7fc0}, // quiet NaN
	{0x7f800001, 0x7fc0}, // signalling NaN becomes quiet
	{0xff812345, 0xffc1}, // sign and top payload bits kept
	{0x00008000, 0x0000}, // tie at the bottom: to even
	{0x00018000, 0x0002}, // tie to even upward
}

// [float32 bits, float16 bits]
var f16Table = [][2]uint32{
	{0x3f800000, 0x3c00}, // 1.0
	{0xc0000000, 0xc000}, // -2.0
	{0x3dcccccd, 0x2e66}, // 0.1
	{0x3f801000, 0x3c00}, // 1 + 2^-11: tie, even is down
	{0x3f803000, 0x3c02}, // 1 + 3*2^-11: tie, even is up
	{0x3f801001, 0x3c01}, // just past the tie
	{0x477fe000, 0x7bff}, // 65504, the largest float16
	{0x477fefff, 0x7bff}, // just below 65520
	{0x477ff000, 0x7c00}, // 65520: Inf
	{0xc77ff000, 0xfc00}, // -65520: -Inf
	{0x7f800000, 0x7c00}, // Inf
	{0x38800000, 0x0400}, // 2^-14, the smallest normal
	{0x387fe000, 0x0400}, // 1023.5 * 2^-24: tie, even is up
	{0x387fc000, 0x03ff}, // 1023 * 2^-24, the largest subnormal
	{0x33800000, 0x0001}, // 2^-24, the smallest subnormal
	{0x33000000, 0x0000}, // 2^-25: tie, even is 0
	{0x33000001, 0x0001}, // just past 2^-25
	{0xb3000001, 0x8001},
	{0x33c00000, 0x0002}, // 1.5 * 2^-24: tie, even is up
	{0x34200000, 0x0002}, // 2.5 * 2^-24: tie, even is down
	{0x00000001, 0x0000}, // float32 subnormal
	{0x7fc00000, 0x7e00}, // quiet NaN
	{0x7f800001, 0x7e00}, // signalling NaN becomes quiet
	{0xffc02000, 0xfe01}, // sign and top payload bits kept
}

// [float16 bits, float32 bits]
var f16Up = [][2]uint32{
	{0x3c00, 0x3f800000}, {0x0001, 0x33800000}, {0x03ff, 0x387fc000}, {0x0400, 0x38800000},
	{0x7bff, 0x477fe000}, {0x7c00, 0x7f800000}, {0xfe01, 0xffc02000}, {0x3555, 0x3eaaa000},
	{0x8200, 0xb8000000},
}

func TestWireConversions(t *testing.T) {
	t.Parallel()
	for _, c := range bf16Table {
		if got := optd.F32ToBF16(math.Float32frombits(c[0])); uint32(got) != c[1] {
			t.Errorf("bfloat16 of %#08x: %#04x, want %#04x", c[0], got, c[1])
		}
	}
	for _, c := range f16Table {
		if got := optd.F32ToF16(math.Float32frombits(c[0])); uint32(got) != c[1] {
			t.Errorf("float16 of %#08x: %#04x, want %#04x", c[0], got, c[1])
		}
	}
	for _, c := range f16Up {
		if got := math.Float32bits(optd.F16ToF32(uint16(c[0]))); got != c[1] {
			t.Errorf("float16 %#04x widens to %#08x, want %#08x", c[0], got, c[1])
		}
	}
	if got := math.Float32bits(optd.BF16ToF32(0xc049)); got != 0xc0490000 {
		t.Errorf("bfloat16 0xc049 widens to %#08x", got)
	}
	// Vectors: float64 values are rounded to float32 first. 1 + 2^-11 +
	// 2^-40 becomes a float32 tie, which goes to even (down).
	b, err := optd.EncodeWire([]float64{1 + math.Pow(2, -11) + math.Pow(2, -40), 65519, -1e300}, optd.WireFloat16)
	if err != nil || !bytes.Equal(b, []byte{0x00, 0x3c, 0xff, 0x7b, 0x00, 0xfc}) {
		t.Errorf("EncodeWire float16: % x, %v", b, err)
	}
	v, err := optd.DecodeWire[float64](b, optd.WireFloat16)
	if err != nil || v[0] != 1 || v[1] != 65504 || !math.IsInf(v[2], -1) {
		t.Errorf("DecodeWire float16: %v, %v", v, err)
	}
	if _, err := optd.EncodeWire([]float32{1}, optd.WireFull); err == nil {
		t.Error("EncodeWire accepts a full-width form")
	}
	// Every pattern widens and narrows back to itself (a signalling NaN
	// comes back quiet).
	for _, w := range []optd.Wire{optd.WireBFloat16, optd.WireFloat16} {
		expMask, quiet := uint16(0x7c00), uint16(0x200)
		if w == optd.WireBFloat16 {
			expMask, quiet = 0x7f80, 0x40
		}
		all := make([]byte, 2*65536)
		want := make([]byte, 2*65536)
		for h := 0; h < 65536; h++ {
			u := uint16(h)
			binary.LittleEndian.PutUint16(all[2*h:], u)
			if u&expMask == expMask && u&(expMask^0x7fff) != 0 {
				u |= quiet
			}
			binary.LittleEndian.PutUint16(want[2*h:], u)
		}
		v, err := optd.DecodeWire[float32](all, w)
		if err != nil {
			t.Fatal(err)
		}
		back, _ := optd.EncodeWire(v, w)
		if !bytes.Equal(back, want) {
			t.Errorf("%s: a widened pattern does not narrow back to itself", w)
		}
	}
}

// roundTrip is v narrowed to w and widened back.
func roundTrip[T float32 | float64](t *testing.T, v []T, w optd.Wire) []T {
	t.Helper()
	b, err := optd.EncodeWire(v, w)
	if err != nil {
		t.Fatal(err)
	}
	out, err := optd.DecodeWire[T](b, w)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func bitsOf[T float32 | float64](v []T) string {
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, v)
	return b.String()
}

func TestWireStepsAgainstDaemon(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	const n = 300
	init := make([]float64, n)
	for i := range init {
		init[i] = math.Sin(float64(i+1)) * 2
	}
	for _, w := range []optd.Wire{optd.WireBFloat16, optd.WireFloat16} {
		// float32 sessions
		cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "adam", "lr": 0.01}, Params: init}
		a, err := c.CreateSession(ctx, "w16-f32-"+string(w), cfg)
		if err != nil {
			t.Fatal(err)
		}
		b, err := c.CreateSession(ctx, "w32-f32-"+string(w), cfg)
		if err != nil {
			t.Fatal(err)
		}
		cfg.DType = optd.Float64
		a64, err := c.CreateSession(ctx, "w16-f64-"+string(w), cfg)
		if err != nil {
			t.Fatal(err)
		}
		b64, err := c.CreateSession(ctx, "w32-f64-"+string(w), cfg)
		if err != nil {
			t.Fatal(err)
		}
		for k := 1; k <= 3; k++ {
			grad := make([]float64, n)
			for i := range grad {
				grad[i] = math.Cos(float64(i*k)+0.5) * math.Pow(10, float64(i%12-8))
			}
			g32 := make([]float32, n)
			for i := range g32 {
				g32[i] = float32(grad[i])
			}
			got, err := a.StepF32(ctx, g32, &optd.StepOptions{Wire: w})
			if err != nil {
				t.Fatal(err)
			}
			if a.LastStep() != int64(k) {
				t.Fatalf("step %d, want %d", a.LastStep(), k)
			}
			if _, err := b.StepF32(ctx, roundTrip(t, g32, w), nil); err != nil {
				t.Fatal(err)
			}
			full, err := a.ParamsF32(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ref, err := b.ParamsF32(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if bitsOf(full) != bitsOf(ref) {
				t.Fatalf("%s float32 step %d: the 16-bit step differs from the float32 step of the widened values", w, k)
			}
			if bitsOf(got) != bitsOf(roundTrip(t, full, w)) || bitsOf(got) == bitsOf(full) {
				t.Fatalf("%s float32 step %d: the answer is not the narrowed params", w, k)
			}

			got64, err := a64.StepF64(ctx, grad, &optd.StepOptions{Wire: w})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := b64.StepF64(ctx, roundTrip(t, grad, w), nil); err != nil {
				t.Fatal(err)
			}
			full64, err := a64.ParamsF64(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ref64, err := b64.ParamsF64(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if bitsOf(full64) != bitsOf(ref64) {
				t.Fatalf("%s float64 step %d: the 16-bit step differs from the float64 step of the widened values", w, k)
			}
			if bitsOf(got64) != bitsOf(roundTrip(t, full64, w)) {
				t.Fatalf("%s float64 step %d: the answer is not the narrowed params", w, k)
			}
		}
	}
}

func TestWireClientDefault(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	c := optd.NewClient(d.URL, optd.WithWire(optd.WireBFloat16))
	s, err := c.CreateSession(ctx, "wd", optd.SessionConfig{Optimizer: map[string]any{"type": "adam", "lr": 0.01},
		ParamsF32: []float32{1, 2, 3, 4, 5, 6, 7, 8}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.StepF32(ctx, []float32{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}, nil)
	if err != nil {
		t.Fatal(err)
	}
	full, err := s.ParamsF32Wire(ctx, optd.WireFull)
	if err != nil {
		t.Fatal(err)
	}
	if bitsOf(got) != bitsOf(roundTrip(t, full, optd.WireBFloat16)) || bitsOf(got) == bitsOf(full) {
		t.Fatalf("the client's bfloat16 answer %v is not its narrowing of %v", got, full)
	}
	again, err := s.ParamsF32(ctx)
	if err != nil || bitsOf(again) != bitsOf(got) {
		t.Fatalf("ParamsF32 with the client's default: %v, %v", again, err)
	}
	half, err := s.ParamsF32Wire(ctx, optd.WireFloat16)
	if err != nil || bitsOf(half) != bitsOf(roundTrip(t, full, optd.WireFloat16)) {
		t.Fatalf("ParamsF32Wire float16: %v, %v", half, err)
	}
	if _, err := s.StepF32(ctx, make([]float32, 8), &optd.StepOptions{JSON: true}); err == nil {
		t.Fatal("a JSON step in bfloat16 was sent")
	}
	if _, err := s.StepF32(ctx, make([]float32, 8), &optd.StepOptions{Wire: "int8"}); err == nil {
		t.Fatal("an unknown wire form was accepted")
	}
	if _, err := s.StepF64(ctx, make([]float64, 8), nil); !errors.Is(err, optd.ErrDType) {
		t.Fatalf("a float64 call on a float32 session in bfloat16: %v", err)
	}

	if err := s.SetParamsF32Wire(ctx, []float32{1, 65519, float32(math.Pow(2, -24)), -0.1, 1 + 1.0/2048, 0, 0, 0},
		optd.WireFloat16); err != nil {
		t.Fatal(err)
	}
	p, err := s.ParamsF32Wire(ctx, optd.WireFull)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(p[:5]) != fmt.Sprint([]float32{1, 65504, float32(math.Pow(2, -24)), -0.0999755859375, 1}) {
		t.Fatalf("float16 params read back as %v", p)
	}
	// 65520 narrows to Inf, which params may not hold: refused, nothing changed.
	inf := []float32{65520, 65520, 65520, 65520, 65520, 65520, 65520, 65520}
	var oe *optd.Error
	if err := s.SetParamsF32Wire(ctx, inf, optd.WireFloat16); !errors.As(err, &oe) || oe.Status != 422 {
		t.Fatalf("Inf params in float16: %v", err)
	}
	if p2, err := s.ParamsF32Wire(ctx, optd.WireFull); err != nil || bitsOf(p2) != bitsOf(p) {
		t.Fatalf("a refused write changed the params: %v, %v", p2, err)
	}
}
