package optd_test

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"sync/atomic"
	"testing"

	optd "optd.dev/client/go"
)

// tamper replaces the Optd-Params-Crc32 of the daemon's real answers with
// bad (when set): params that are not what the daemon sent, as far as a
// client can tell.
type tamper struct {
	next http.RoundTripper
	bad  atomic.Value // string
}

func (t *tamper) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	if bad, _ := t.bad.Load().(string); bad != "" && resp.Header.Get(optd.HeaderParamsCRC32) != "" {
		resp.Header.Set(optd.HeaderParamsCRC32, bad)
	}
	return resp, nil
}

func TestParamsDigestVerified(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := ctxT(t)
	tp := &tamper{next: http.DefaultTransport.(*http.Transport).Clone()}
	tp.bad.Store("")
	c := optd.NewClient(d.URL, optd.WithHTTPClient(&http.Client{Transport: tp}), optd.WithRetries(0))
	for _, dt := range []optd.DType{optd.Float32, optd.Float64} {
		name := "digest-" + string(dt)
		s, err := c.CreateSession(ctx, name, optd.SessionConfig{
			Optimizer: map[string]any{"type": "sgd", "lr": 0.1}, DType: dt,
			Params: []float64{0.5, -1.25, 3, 1e-3},
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, js := range []bool{true, false} {
			var err error
			if dt == optd.Float32 {
				_, err = s.StepF32(ctx, []float32{0.1, 0.2, -0.3, 4}, &optd.StepOptions{JSON: js})
				if err == nil {
					_, err = s.ParamsF32(ctx)
				}
			} else {
				_, err = s.StepF64(ctx, []float64{0.1, 0.2, -0.3, 4}, &optd.StepOptions{JSON: js})
				if err == nil {
					_, err = s.ParamsF64(ctx)
				}
			}
			if err != nil {
				t.Fatalf("%s json=%v: %v", dt, js, err)
			}
		}
		// The header is the CRC-32 of the binary params.
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, d.URL+"/v1/sessions/"+name+"/params", nil)
		req.Header.Set("Accept", "application/octet-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if got, want := resp.Header.Get(optd.HeaderParamsCRC32), fmt.Sprintf("%08x", crc32.ChecksumIEEE(body)); got != want {
			t.Fatalf("%s: Optd-Params-Crc32 %q, the body's CRC-32 is %q", dt, got, want)
		}
	}
}

func TestParamsDigestMismatch(t *testing.T) {
	t.Parallel()
	d := startDaemon(t)
	ctx := context.Background()
	tp := &tamper{next: http.DefaultTransport.(*http.Transport).Clone()}
	tp.bad.Store("")
	hc := &http.Client{Transport: tp}
	c := optd.NewClient(d.URL, optd.WithHTTPClient(hc), optd.WithRetries(0))
	s, err := c.CreateSession(ctx, "digest-bad", optd.SessionConfig{
		Optimizer: map[string]any{"type": "sgd", "lr": 0.1}, Params: []float64{1, 2},
	})
	if err != nil {
		t.Fatal(err)
	}
	tp.bad.Store("0badf00d")
	for _, js := range []bool{true, false} {
		_, err := s.StepF32(ctx, []float32{0.5, 0.5}, &optd.StepOptions{JSON: js})
		var dm *optd.DigestMismatchError
		if !errors.As(err, &dm) || dm.Expected != "0badf00d" || dm.Kind() != "digest_mismatch" || dm.Status != 200 {
			t.Fatalf("step json=%v: %v, want a DigestMismatchError", js, err)
		}
	}
	if _, err := s.ParamsF32(ctx); !errors.As(err, new(*optd.DigestMismatchError)) {
		t.Fatalf("params: %v, want a DigestMismatchError", err)
	}
	off := optd.NewClient(d.URL, optd.WithHTTPClient(hc), optd.WithParamsCheck(false))
	if p, err := off.Session("digest-bad").ParamsF32(ctx); err != nil || len(p) != 2 {
		t.Fatalf("with the check off: %v %v", p, err)
	}
	tp.bad.Store("")
	if _, err := s.ParamsF32(ctx); err != nil {
		t.Fatal(err)
	}
}
