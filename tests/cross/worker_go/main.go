// Command worker_go is one cross-language worker on the Go client
// (tests/test_cross_language.c).
//
//	worker_go URL SESSION DTYPE SIZE NAME W T0 T1
//
// It sends g(t, i, w) = (((7t + 13i + 5w) mod 17) - 8) / 8 for t = T0 ..
// T1-1, each with base_step t and worker NAME, and prints one line per step:
// "t step hex" -- the step the answer reported and the new params as the hex
// of their little-endian bytes in DTYPE, so the test compares exact bits.
//
// The wire form rotates with (t + w) mod 3: the client's default (binary),
// JSON, binary asked for explicitly. Any error: the message on stderr, exit 1.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"

	optd "optd.dev/client/go"
)

// grad is g(t, ·, w); every value is k/8 with |k| <= 8, exact in both
// dtypes, and the operands are non-negative, so % agrees with the other
// languages.
func grad(t, size, w int) []float64 {
	g := make([]float64, size)
	for i := range g {
		g[i] = float64((7*t+13*i+5*w)%17-8) / 8.0
	}
	return g
}

func hexF64(p []float64) string {
	b := make([]byte, 8*len(p))
	for i, x := range p {
		binary.LittleEndian.PutUint64(b[8*i:], math.Float64bits(x))
	}
	return hex.EncodeToString(b)
}

func hexF32(p []float32) string {
	b := make([]byte, 4*len(p))
	for i, x := range p {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return hex.EncodeToString(b)
}

func run(args []string) error {
	if len(args) != 8 {
		return errors.New("usage: worker_go URL SESSION DTYPE SIZE NAME W T0 T1")
	}
	var n [4]int // SIZE, W, T0, T1
	for k, a := range []string{args[3], args[5], args[6], args[7]} {
		v, err := strconv.Atoi(a)
		if err != nil {
			return fmt.Errorf("argument %q: %w", a, err)
		}
		n[k] = v
	}
	url, name, dtype, worker := args[0], args[1], optd.DType(args[2]), args[4]
	size, w, t0, t1 := n[0], n[1], n[2], n[3]

	ctx := context.Background()
	s := optd.NewClient(url).Session(name)
	info, err := s.Info(ctx)
	if err != nil {
		return err
	}
	if info.DType != dtype || info.Size != size {
		return fmt.Errorf("session %s is %s[%d], expected %s[%d]", name, info.DType, info.Size, dtype, size)
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for t := t0; t < t1; t++ {
		var opts *optd.StepOptions
		switch (t + w) % 3 {
		case 1:
			opts = &optd.StepOptions{BaseStep: optd.Ptr(int64(t)), Worker: worker, JSON: true}
		case 2:
			opts = &optd.StepOptions{BaseStep: optd.Ptr(int64(t)), Worker: worker, JSON: false}
		default:
			opts = &optd.StepOptions{BaseStep: optd.Ptr(int64(t)), Worker: worker}
		}
		g := grad(t, size, w)
		var h string
		if dtype == optd.Float64 {
			p, err := s.StepF64(ctx, g, opts)
			if err != nil {
				return fmt.Errorf("step t=%d: %w", t, err)
			}
			if len(p) != size {
				return fmt.Errorf("step t=%d: %d params, expected %d", t, len(p), size)
			}
			h = hexF64(p)
		} else {
			g32 := make([]float32, size)
			for i, x := range g {
				g32[i] = float32(x)
			}
			p, err := s.StepF32(ctx, g32, opts)
			if err != nil {
				return fmt.Errorf("step t=%d: %w", t, err)
			}
			if len(p) != size {
				return fmt.Errorf("step t=%d: %d params, expected %d", t, len(p), size)
			}
			h = hexF32(p)
		}
		fmt.Fprintf(out, "%d %d %s\n", t, s.LastStep(), h)
		// Flushed per line so that a failing run shows how far it came.
		if err := out.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		var oe *optd.Error
		if errors.As(err, &oe) {
			fmt.Fprintf(os.Stderr, "worker_go: %v (status %d, %s, field %q)\n", err, oe.Status, oe.Type, oe.Field)
		} else {
			fmt.Fprintf(os.Stderr, "worker_go: %v\n", err)
		}
		os.Exit(1)
	}
}
