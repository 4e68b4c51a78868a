package optd_test

import (
	"bytes"
	"encoding/binary"
	"math"
	"testing"

	optd "optd.dev/client/go"
)

func f32bytes(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

func TestTimeTravel(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	c := optd.NewClient(d.URL)
	ctx := ctxT(t)
	s, err := c.CreateSession(ctx, "go-tv", optd.SessionConfig{
		Optimizer: map[string]any{"type": "adam", "lr": 0.01},
		Size:      8,
		Init:      optd.InitNormal(0, 1, 3),
		Retain:    &optd.Retain{EverySteps: 3, Keep: 3},
	})
	if err != nil {
		t.Fatal(err)
	}
	at := map[int64][]byte{}
	for i := 0; i < 10; i++ {
		g := make([]float32, 8)
		for j := range g {
			g[j] = float32(math.Sin(float64(i)*1.1 + float64(j)*0.4))
		}
		p, err := s.StepF32(ctx, g, nil)
		if err != nil {
			t.Fatal(err)
		}
		at[int64(i+1)] = f32bytes(p)
		if i == 4 {
			if k, err := s.Checkpoint(ctx, "five"); err != nil || k.Step != 5 {
				t.Fatalf("checkpoint: %v %+v", err, k)
			}
		}
	}
	ks, err := s.Checkpoints(ctx)
	if err != nil || len(ks) < 2 {
		t.Fatalf("checkpoints: %v %+v", err, ks)
	}
	params := func(x *optd.Session) []byte {
		p, err := x.ParamsF32(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return f32bytes(p)
	}
	six := int64(6)
	f, err := c.Fork(ctx, "go-tv-f", "go-tv", optd.ForkOptions{Step: &six, Replay: true})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(params(f), at[10]) {
		t.Fatal("fork + replay under the same config differs from the parent's head")
	}
	file, err := s.Export(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	imp, err := c.ImportSession(ctx, "go-tv-i", file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(params(imp), at[10]) {
		t.Fatal("the import differs from the export")
	}
	if _, err := s.Rollback(ctx, 7); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(params(s), at[7]) {
		t.Fatal("rollback to 7 differs from step 7")
	}
	if _, err := s.RollbackTo(ctx, "five"); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(params(s), at[5]) {
		t.Fatal("rollback to the label differs from step 5")
	}
	if _, err := s.Rollback(ctx, 0); !optd.IsConflict(err) {
		t.Fatalf("rollback behind the kept history: %v", err)
	}
	if _, err := c.Fork(ctx, "go-tv-x", "no-such", optd.ForkOptions{}); !optd.IsNotFound(err) {
		t.Fatalf("fork of a missing session: %v", err)
	}
}
