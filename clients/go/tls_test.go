package optd_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	optd "optd.dev/client/go"
)

// testCA makes the test certificates of tests/support/make_test_ca.sh in a
// temp dir and returns a function naming its files.
func testCA(t *testing.T) func(string) string {
	t.Helper()
	dir := t.TempDir()
	script, err := filepath.Abs("../../tests/support/make_test_ca.sh")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("sh", script, dir).CombinedOutput(); err != nil {
		t.Fatalf("make_test_ca.sh: %v: %s", err, out)
	}
	return func(name string) string { return filepath.Join(dir, name) }
}

// TestTLS drives a daemon started with --tls-cert, --tls-key and
// --tls-client-ca (mutual TLS).
func TestTLS(t *testing.T) {
	pem := testCA(t)
	d := startDaemon(t, "--tls-cert", pem("server.pem"), "--tls-key", pem("server.key"),
		"--tls-client-ca", pem("ca.pem"))
	ctx := context.Background()
	good := optd.WithTLS(pem("ca.pem"), pem("client.pem"), pem("client.key"))

	t.Run("https URL", func(t *testing.T) {
		if d.URL[:8] != "https://" {
			t.Fatalf("listening on %s", d.URL)
		}
	})
	t.Run("verified server and client certificate", func(t *testing.T) {
		c := optd.NewClient(d.URL, good, optd.WithRetries(0))
		s, err := c.CreateSession(ctx, "tls-go", optd.SessionConfig{
			Optimizer: map[string]any{"type": "sgd", "lr": 0.5}, DType: optd.Float64, Params: []float64{1, 2}})
		if err != nil {
			t.Fatal(err)
		}
		p, err := s.StepF64(ctx, []float64{1, 1}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(p) != 2 || p[0] != 0.5 || p[1] != 1.5 || s.LastStep() != 1 {
			t.Fatalf("params %v at step %d, want [0.5 1.5] at 1", p, s.LastStep())
		}
		if p, err = s.ParamsF64(ctx); err != nil || p[0] != 0.5 || p[1] != 1.5 {
			t.Fatalf("params %v, %v", p, err)
		}
	})
	t.Run("a tls.Config of one's own", func(t *testing.T) {
		b, err := os.ReadFile(pem("ca.pem"))
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(b)
		pair, err := tls.LoadX509KeyPair(pem("client.pem"), pem("client.key"))
		if err != nil {
			t.Fatal(err)
		}
		c := optd.NewClient(d.URL, optd.WithTLSConfig(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}}))
		if err := c.Health(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("wrong CA fails", func(t *testing.T) {
		c := optd.NewClient(d.URL, optd.WithTLS(pem("other-ca.pem"), pem("client.pem"), pem("client.key")))
		err := c.Health(ctx)
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) {
			t.Fatalf("got %v (%T), want an x509.UnknownAuthorityError", err, err)
		}
	})
	t.Run("system CAs do not know the test CA", func(t *testing.T) {
		c := optd.NewClient(d.URL, optd.WithTLS("", pem("client.pem"), pem("client.key")), optd.WithRetries(0))
		var unknown x509.UnknownAuthorityError
		if err := c.Health(ctx); !errors.As(err, &unknown) {
			t.Fatalf("got %v, want an x509.UnknownAuthorityError", err)
		}
	})
	t.Run("no client certificate refused", func(t *testing.T) {
		c := optd.NewClient(d.URL, optd.WithTLS(pem("ca.pem"), "", ""), optd.WithRetries(0))
		if err := c.Health(ctx); err == nil {
			t.Fatal("served without a client certificate")
		}
	})
	t.Run("client certificate of another CA refused", func(t *testing.T) {
		c := optd.NewClient(d.URL, optd.WithTLS(pem("ca.pem"), pem("other-client.pem"), pem("other-client.key")),
			optd.WithRetries(0))
		if err := c.Health(ctx); err == nil {
			t.Fatal("served a client certificate of another CA")
		}
	})
	t.Run("bad options reported by the first call", func(t *testing.T) {
		for _, o := range []optd.Option{
			optd.WithTLS(pem("ca.pem"), pem("client.pem"), ""),
			optd.WithTLS(pem("absent.pem"), "", ""),
			optd.WithTLS(pem("client.key"), "", ""),
		} {
			if err := optd.NewClient(d.URL, o).Health(ctx); err == nil {
				t.Fatal("a bad TLS option was accepted")
			}
		}
	})
}
