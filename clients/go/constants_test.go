package optd_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"testing"
	"time"

	optd "optd.dev/client/go"
)

// The Go client's constants against api/client_constants.json, the one set
// every optd client shares. (The Go client always sends vectors as binary
// bodies, so it has no binary threshold.)
func TestClientConstants(t *testing.T) {
	raw, err := os.ReadFile("../../api/client_constants.json")
	if err != nil {
		t.Fatal(err)
	}
	var want struct {
		Retries          int               `json:"retries"`
		BackoffInitialMS int64             `json:"backoff_initial_ms"`
		BackoffMaxMS     int64             `json:"backoff_max_ms"`
		RetryAfterMaxS   int64             `json:"retry_after_max_s"`
		NamePattern      string            `json:"name_pattern"`
		Headers          map[string]string `json:"headers"`
		Problems         []struct {
			Status int    `json:"status"`
			Type   string `json:"type"`
			Field  string `json:"field"`
			Kind   string `json:"kind"`
		} `json:"problems"`
	}
	if err := json.Unmarshal(raw, &want); err != nil {
		t.Fatal(err)
	}
	if optd.DefaultRetries != want.Retries || optd.DefaultInitialBackoff != time.Duration(want.BackoffInitialMS)*time.Millisecond ||
		optd.DefaultMaxBackoff != time.Duration(want.BackoffMaxMS)*time.Millisecond {
		t.Errorf("retry policy %d %v %v, want %+v", optd.DefaultRetries, optd.DefaultInitialBackoff, optd.DefaultMaxBackoff, want)
	}
	if want.RetryAfterMaxS == 0 || optd.MaxRetryAfter != time.Duration(want.RetryAfterMaxS)*time.Second {
		t.Errorf("MaxRetryAfter %v, want %d s", optd.MaxRetryAfter, want.RetryAfterMaxS)
	}
	if optd.NamePattern != want.NamePattern {
		t.Errorf("NamePattern %q, want %q", optd.NamePattern, want.NamePattern)
	}
	for name, ok := range map[string]bool{"a": true, "run-1.v2_x": true, "": false, "a b": false, "a/b": false,
		string(bytesOf('x', 128)): true, string(bytesOf('x', 129)): false} {
		if optd.ValidName(name) != ok {
			t.Errorf("ValidName(%q) = %v", name, !ok)
		}
	}
	mine := map[string]string{
		"idempotency_key": optd.HeaderIdempotencyKey, "loss": optd.HeaderLoss, "base_step": optd.HeaderBaseStep,
		"worker": optd.HeaderWorker, "dtype": optd.HeaderDType, "step": optd.HeaderStep, "lr": optd.HeaderLR,
		"pending": optd.HeaderPending, "replayed": optd.HeaderReplayed, "skipped": optd.HeaderSkipped,
		"params_crc32": optd.HeaderParamsCRC32,
	}
	for k, v := range want.Headers {
		if mine[k] != v {
			t.Errorf("header %s: %q, want %q", k, mine[k], v)
		}
	}
	if len(mine) != len(want.Headers) {
		t.Errorf("%d header constants, the file has %d", len(mine), len(want.Headers))
	}
	for _, p := range want.Problems {
		e := &optd.Error{Status: p.Status, Type: p.Type, Field: p.Field}
		if e.Kind() != p.Kind {
			t.Errorf("%+v: kind %q", p, e.Kind())
		}
	}
}

func bytesOf(b byte, n int) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

// Update's typed options, and the dtype declared by header: a typed call on
// the other dtype is refused by the daemon without an extra GET.
func TestTypedUpdateAndDTypeHeader(t *testing.T) {
	d := startDaemon(t)
	ctx := context.Background()
	var gets int
	hc := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.Method == http.MethodGet {
			gets++
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	c := optd.NewClient(d.URL, optd.WithHTTPClient(hc))
	s, err := c.CreateSession(ctx, "u", optd.SessionConfig{Optimizer: map[string]any{"type": "adam"},
		DType: optd.Float64, Size: 3, Init: optd.InitZeros()})
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Update(ctx, optd.SetLR(0.01), optd.SetHyperparam("weight_decay", 0.5),
		optd.SetSchedule(optd.Schedule{Type: "step", Params: optd.Params{"step_size": 10, "gamma": 0.5}}),
		optd.SetClip(optd.Clip{Type: "norm", Params: optd.Params{"max_norm": 2}}),
		optd.SetMetadata(map[string]any{"run": 7}))
	if err != nil {
		t.Fatal(err)
	}
	if info.Optimizer["lr"] != 0.01 || info.Optimizer["weight_decay"] != 0.5 || info.Schedule["type"] != "step" ||
		info.Clip["max_norm"] != 2.0 || string(info.Metadata) != `{"run":7}` {
		t.Fatalf("after update: %+v", info)
	}
	info, err = s.Update(ctx, optd.RemoveSchedule(), optd.RemoveClip(), optd.SetMetadata(nil))
	if err != nil {
		t.Fatal(err)
	}
	if info.Schedule != nil || info.Clip != nil || string(info.Metadata) != "null" {
		t.Fatalf("after removal: schedule %s clip %s metadata %s", info.Schedule, info.Clip, info.Metadata)
	}
	if _, err = s.Update(ctx, optd.SetClip(optd.Clip{})); err == nil {
		t.Fatal("a clip without a type must be refused")
	}
	_, err = s.Update(ctx, optd.SetHyperparam("betas", []float64{0.9}))
	if e := asError(t, err, 400); e.Field != "optimizer.betas" || e.Kind() != "invalid_request" {
		t.Fatalf("bad betas: %+v", e)
	}

	gets = 0
	fresh := c.Session("u")
	_, err = fresh.StepF32(ctx, []float32{1, 2, 3, 4, 5, 6}, nil)
	if !errors.Is(err, optd.ErrDType) {
		t.Fatalf("StepF32 on a float64 session: %v", err)
	}
	if err = fresh.SetParamsF32(ctx, []float32{1, 2, 3, 4, 5, 6}); !errors.Is(err, optd.ErrDType) {
		t.Fatalf("SetParamsF32 on a float64 session: %v", err)
	}
	if gets != 0 {
		t.Fatalf("%d GETs for the dtype; the header should make them needless", gets)
	}
	p, err := fresh.StepF64(ctx, []float64{1, 2, 3}, nil)
	if err != nil || len(p) != 3 {
		t.Fatalf("StepF64: %v %v", p, err)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
