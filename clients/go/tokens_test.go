package optd_test

import (
	"context"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	optd "optd.dev/client/go"
)

// Token management against a daemon with an admin key: mint, list (never a
// secret), get, revoke; scope and prefix (403), a session quota (429),
// created_by.
func TestTokens(t *testing.T) {
	t.Parallel()
	const key = "go-admin-key"
	d := startDaemon(t, "--api-key", key)
	ctx := ctxT(t)
	admin := optd.NewClient(d.URL, optd.WithAPIKey(key), optd.WithRetries(0))
	tok, err := admin.CreateToken(ctx, optd.TokenRequest{Scopes: []string{"step"}, Prefix: "go-",
		Label: "go workers", ExpiresIn: 3600})
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^optd_[0-9a-f]{16}_[0-9a-f]{64}$`).MatchString(tok.Secret) ||
		strings.Join(tok.Scopes, ",") != "read,step" || tok.ExpiresAt == nil {
		t.Fatalf("minted %+v", tok)
	}
	list, err := admin.ListTokens(ctx)
	if err != nil || len(list) != 1 || list[0].ID != tok.ID || list[0].Secret != "" {
		t.Fatalf("list %+v %v", list, err)
	}
	got, err := admin.GetToken(ctx, tok.ID)
	if err != nil || got.Secret != "" || got.Label != "go workers" || got.Usage == nil {
		t.Fatalf("get %+v %v", got, err)
	}
	db, err := os.ReadFile(d.DB)
	if err != nil || strings.Contains(string(db), tok.Secret[22:]) {
		t.Fatalf("the secret is in the database (%v)", err)
	}

	if _, err := admin.CreateSession(ctx, "go-a", optd.SessionConfig{
		Optimizer: map[string]any{"type": "sgd", "lr": 0.5}, Params: []float64{1, 2}}); err != nil {
		t.Fatal(err)
	}
	worker := optd.NewClient(d.URL, optd.WithAPIKey(tok.Secret), optd.WithRetries(0))
	if _, err := worker.Session("go-a").StepF32(ctx, []float32{1, 1}, nil); err != nil {
		t.Fatal(err)
	}
	var e *optd.Error
	if _, err := worker.ListTokens(ctx); !optd.IsForbidden(err) || !errors.As(err, &e) || e.Field != "scope" {
		t.Fatalf("a token listing tokens: %v", err)
	}
	if err := worker.Session("go-a").Delete(ctx); !optd.IsForbidden(err) {
		t.Fatalf("a step token deleting: %v", err)
	}
	if _, err := worker.Session("elsewhere").Info(ctx); !optd.IsForbidden(err) ||
		!errors.As(err, &e) || e.Field != "prefix" {
		t.Fatalf("outside the prefix: %v", err)
	}
	if err := admin.RevokeToken(ctx, tok.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := worker.Session("go-a").StepF32(ctx, []float32{1, 1}, nil); !optd.IsUnauthorized(err) {
		t.Fatalf("a revoked token: %v", err)
	}
	if got, err := admin.GetToken(ctx, tok.ID); err != nil || got.RevokedAt == nil {
		t.Fatalf("after revoking: %+v %v", got, err)
	}
	if err := admin.RevokeToken(ctx, "0123456789abcdef"); !optd.IsNotFound(err) {
		t.Fatalf("revoking an unknown id: %v", err)
	}

	q, err := admin.CreateToken(ctx, optd.TokenRequest{Scopes: []string{"admin"}, Prefix: "gq-",
		Quotas: &optd.TokenQuotas{MaxSessions: 1}})
	if err != nil {
		t.Fatal(err)
	}
	owner := optd.NewClient(d.URL, optd.WithAPIKey(q.Secret), optd.WithRetries(0))
	cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "sgd", "lr": 0.5}, Params: []float64{1}}
	s, err := owner.CreateSession(ctx, "gq-1", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(ctx); err != nil || info.CreatedBy != q.ID {
		t.Fatalf("created_by %+v %v", info, err)
	}
	if _, err := owner.CreateSession(ctx, "gq-2", cfg); !optd.IsTooManyRequests(err) ||
		!errors.As(err, &e) || e.Field != "max_sessions" {
		t.Fatalf("past max_sessions: %v", err)
	}
}

// A token of 2 steps per second (burst 1): with retries the client waits each
// 429's Retry-After out and every step of a burst lands, no faster than the
// rate allows; with retries off the caller sees the 429 and its RetryAfter,
// and so does a caller whose context would end during the wait. A session
// quota's 429 (Retry-After 60) comes back at once.
func TestRetryAfter(t *testing.T) {
	t.Parallel()
	const key = "go-admin-key"
	d := startDaemon(t, "--api-key", key)
	ctx := ctxT(t)
	admin := optd.NewClient(d.URL, optd.WithAPIKey(key), optd.WithRetries(0))
	tok, err := admin.CreateToken(ctx, optd.TokenRequest{Scopes: []string{"step"}, Prefix: "gr-",
		Quotas: &optd.TokenQuotas{StepsPerSecond: 2, Burst: 1}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := optd.SessionConfig{Optimizer: map[string]any{"type": "sgd", "lr": 1}, Params: []float64{0}}
	if _, err := admin.CreateSession(ctx, "gr-a", cfg); err != nil {
		t.Fatal(err)
	}

	hasty := optd.NewClient(d.URL, optd.WithAPIKey(tok.Secret), optd.WithRetries(0)).Session("gr-a")
	if _, err := hasty.StepF32(ctx, []float32{1}, nil); err != nil {
		t.Fatal(err)
	}
	var e *optd.Error
	_, err = hasty.StepF32(ctx, []float32{1}, nil)
	if !optd.IsTooManyRequests(err) || !errors.As(err, &e) || e.Field != "" ||
		e.RetryAfter < time.Second || e.RetryAfter > optd.MaxRetryAfter {
		t.Fatalf("a step past the rate without retries: %v (%+v)", err, e)
	}

	// A backoff of 1 ms: only waiting out Retry-After gets the steps in.
	patient := optd.NewClient(d.URL, optd.WithAPIKey(tok.Secret),
		optd.WithBackoff(time.Millisecond, time.Millisecond)).Session("gr-a")
	t0 := time.Now()
	var p []float32
	for i := 0; i < 4; i++ {
		if p, err = patient.StepF32(ctx, []float32{1}, nil); err != nil {
			t.Fatalf("step %d of the burst: %v", i, err)
		}
	}
	// Four steps from a bucket of at most one: three waits of 0.5 s.
	if el := time.Since(t0); el < 1500*time.Millisecond {
		t.Fatalf("four steps at 2 per second took %v", el)
	}
	if info, err := admin.Session("gr-a").Info(ctx); err != nil || info.Step != 5 || p[0] != -5 {
		t.Fatalf("after the burst: %+v %v %v", info, p, err)
	}

	// A context that would end during the wait gets the 429 now.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	t0 = time.Now()
	if _, err = patient.StepF32(short, []float32{1}, nil); !optd.IsTooManyRequests(err) {
		t.Fatalf("a step past the rate with 300 ms left: %v", err)
	}
	if el := time.Since(t0); el > 250*time.Millisecond {
		t.Fatalf("the 429 came after %v", el)
	}

	q, err := admin.CreateToken(ctx, optd.TokenRequest{Scopes: []string{"admin"}, Prefix: "grq-",
		Quotas: &optd.TokenQuotas{MaxSessions: 1}})
	if err != nil {
		t.Fatal(err)
	}
	owner := optd.NewClient(d.URL, optd.WithAPIKey(q.Secret))
	if _, err := owner.CreateSession(ctx, "grq-1", cfg); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	_, err = owner.CreateSession(ctx, "grq-2", cfg)
	if !optd.IsTooManyRequests(err) || !errors.As(err, &e) || e.Field != "max_sessions" ||
		e.RetryAfter != 60*time.Second {
		t.Fatalf("past max_sessions: %v (%+v)", err, e)
	}
	if el := time.Since(t0); el > 5*time.Second {
		t.Fatalf("the quota's 429 came after %v: it was waited out", el)
	}
	if _, err := admin.Session("grq-2").Info(ctx); !optd.IsNotFound(err) {
		t.Fatalf("grq-2 after the refusal: %v", err)
	}
}
