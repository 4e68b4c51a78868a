// Package optd is a client for optd, the optimizer-as-a-service daemon:
// training code sends gradients, optd applies torch.optim-identical updates
// and keeps every session durable.
//
// A Client is safe for concurrent use by many goroutines; it keeps HTTP
// connections alive between calls. Every call takes a context, which bounds
// the whole call including its retries.
package optd

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// Defaults of the retry policy and the per-attempt timeout. The retry
// policy, the name pattern and the header names are the ones every optd
// client shares (api/client_constants.json; constants_test.go checks them).
const (
	DefaultRetries        = 4
	DefaultInitialBackoff = 50 * time.Millisecond
	DefaultMaxBackoff     = 2 * time.Second
	DefaultTimeout        = 60 * time.Second
	// MaxRetryAfter is the longest Retry-After the retries wait out: a 503's
	// longer one is cut to it, and a 429 with a longer one (a token's
	// session or params quota) is returned at once.
	MaxRetryAfter = 30 * time.Second
)

// NamePattern is what a session name must match.
const NamePattern = `^[A-Za-z0-9._-]{1,128}$`

var nameRE = regexp.MustCompile(NamePattern)

// ValidName reports whether name is a session name the daemon accepts.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// Header names, by what they carry.
const (
	HeaderIdempotencyKey = "Idempotency-Key"
	HeaderLoss           = "Optd-Loss"
	HeaderBaseStep       = "Optd-Base-Step"
	HeaderWorker         = "Optd-Worker"
	HeaderDType          = "Optd-Dtype"
	HeaderStep           = "Optd-Step"
	HeaderLR             = "Optd-Lr"
	HeaderPending        = "Optd-Pending"
	HeaderReplayed       = "Optd-Replayed"
	HeaderSkipped        = "Optd-Skipped"
	HeaderParamsCRC32    = "Optd-Params-Crc32"
)

// Client talks to one optd daemon.
type Client struct {
	base       string
	apiKey     string
	hc         *http.Client
	retries    int
	backoff0   time.Duration
	backoffMax time.Duration
	timeout    time.Duration
	noVerify   bool
	wire       Wire        // WithWire: the form vectors travel in by default
	tlsConf    *tls.Config // WithTLS, WithTLSConfig
	initErr    error       // a bad option, reported by every call
}

// Option configures a Client.
type Option func(*Client)

// WithAPIKey sends "Authorization: Bearer key" on every request (the daemon's
// --api-key).
func WithAPIKey(key string) Option { return func(c *Client) { c.apiKey = key } }

// WithRetries sets how many times a call is retried after a transient failure
// (connection refused or reset, a cut-off answer, a timed-out attempt, a 503,
// a 429 whose Retry-After is at most MaxRetryAfter: a token past its step
// rate). A Retry-After, when the answer has one, is waited instead of the
// backoff. 0 turns retries off.
func WithRetries(n int) Option {
	return func(c *Client) {
		if n < 0 {
			n = 0
		}
		c.retries = n
	}
}

// WithBackoff sets the wait before the first retry and its cap; the wait
// doubles per retry and is jittered to between half and all of its value.
func WithBackoff(initial, max time.Duration) Option {
	return func(c *Client) {
		c.backoff0, c.backoffMax = initial, max
		if c.backoffMax < c.backoff0 {
			c.backoffMax = c.backoff0
		}
	}
}

// WithHTTPClient replaces the HTTP client (its Transport, proxies, TLS).
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithParamsCheck turns the check of answers' params against their
// Optd-Params-Crc32 (the CRC-32 of the params in the session's dtype) on
// (the default) or off. A mismatch is a *DigestMismatchError.
func WithParamsCheck(on bool) Option { return func(c *Client) { c.noVerify = !on } }

// WithTimeout bounds each attempt (not the whole call: use the context for
// that). An attempt that times out is retried. 0 means no per-attempt bound.
func WithTimeout(d time.Duration) Option { return func(c *Client) { c.timeout = d } }

// NewClient returns a client for the daemon at baseURL, e.g.
// "http://127.0.0.1:8080". A malformed URL is reported by the first call.
func NewClient(baseURL string, opts ...Option) *Client {
	c := &Client{
		base:       strings.TrimRight(baseURL, "/"),
		retries:    DefaultRetries,
		backoff0:   DefaultInitialBackoff,
		backoffMax: DefaultMaxBackoff,
		timeout:    DefaultTimeout,
	}
	for _, o := range opts {
		o(c)
	}
	if c.hc != nil && c.tlsConf != nil && c.initErr == nil {
		c.initErr = errors.New("optd: WithTLS/WithTLSConfig and WithHTTPClient: set the TLS config on your own transport")
	}
	if c.hc == nil {
		// The default transport keeps only 2 idle connections per host;
		// several goroutines stepping at once would keep reconnecting.
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = 32
		if c.tlsConf != nil {
			t.TLSClientConfig = c.tlsConf
		}
		c.hc = &http.Client{Transport: t}
	}
	return c
}

// NewIdempotencyKey returns 128 random bits as 32 hex digits, the kind of key
// every step carries. Pass one in StepOptions.IdempotencyKey to retry a step
// yourself after a call gave up.
func NewIdempotencyKey() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand failing means the system has no entropy source;
		// nothing sensible can continue.
		panic("optd: crypto/rand: " + err.Error())
	}
	return hex.EncodeToString(b[:])
}

// request is one HTTP exchange, re-sendable as is by every retry.
type request struct {
	method      string
	path        string // escaped, starting with "/"
	query       url.Values
	body        []byte
	contentType string
	accept      string
	header      map[string]string
}

// response is a fully read answer with a 2xx status.
type response struct {
	status int
	header http.Header
	body   []byte
}

// do sends req with the retry policy. It returns a 2xx response, an *Error
// for any other answer, or the last transport error once retries run out.
func (c *Client) do(ctx context.Context, req *request) (*response, error) {
	resp, _, err := c.doTracked(ctx, req)
	return resp, err
}

// doTracked is do that also reports whether an earlier attempt may have
// reached the daemon without its answer reaching us.
func (c *Client) doTracked(ctx context.Context, req *request) (resp *response, uncertain bool, err error) {
	if c.initErr != nil {
		return nil, false, c.initErr
	}
	for attempt := 0; ; attempt++ {
		resp, err = c.once(ctx, req)
		if err == nil && resp.status >= 200 && resp.status < 300 {
			return resp, uncertain, nil
		}
		if err != nil && ctx.Err() != nil {
			// The caller's context ended the call, not the network.
			return nil, uncertain, fmt.Errorf("optd: %s %s: %w", req.method, req.path, ctx.Err())
		}
		var retry bool
		wait := time.Duration(-1) // the answer's Retry-After, if it has one
		if err == nil {
			pe := decodeProblem(resp)
			err = pe
			if pe.hasRetryAfter {
				wait = pe.RetryAfter
			}
			switch resp.status {
			case http.StatusServiceUnavailable:
				retry = true
			case http.StatusTooManyRequests:
				// Only a short wait (a token's step rate) is waited out; a
				// quota that waiting cannot lift is the caller's to handle.
				retry = wait >= 0 && wait <= MaxRetryAfter
			}
		} else {
			retry = transient(err)
			// A refused connection never carried the request.
			uncertain = uncertain || !errors.Is(err, syscall.ECONNREFUSED)
			err = fmt.Errorf("optd: %s %s: %w", req.method, req.path, err)
		}
		if !retry || attempt >= c.retries {
			return nil, uncertain, err
		}
		if wait < 0 {
			wait = c.backoff(attempt)
		} else {
			if wait > MaxRetryAfter {
				wait = MaxRetryAfter
			}
			if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait {
				// The context would end during the wait the daemon
				// asked for: its answer is final.
				return nil, uncertain, err
			}
		}
		if werr := sleepCtx(ctx, wait); werr != nil {
			return nil, uncertain, fmt.Errorf("optd: %s %s: %w (while waiting to retry after: %v)",
				req.method, req.path, werr, err)
		}
	}
}

// once makes one attempt and reads the whole body, so that a connection cut
// mid-body counts as a failed attempt too.
func (c *Client) once(ctx context.Context, req *request) (*response, error) {
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	u := c.base + req.path
	if len(req.query) > 0 {
		u += "?" + req.query.Encode()
	}
	var body io.Reader
	if req.body != nil {
		body = bytes.NewReader(req.body)
	}
	hr, err := http.NewRequestWithContext(ctx, req.method, u, body)
	if err != nil {
		return nil, err
	}
	if req.body != nil {
		hr.Header.Set("Content-Type", req.contentType)
	}
	if req.accept != "" {
		hr.Header.Set("Accept", req.accept)
	}
	if c.apiKey != "" {
		hr.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	for k, v := range req.header {
		hr.Header.Set(k, v)
	}
	hresp, err := c.hc.Do(hr)
	if err != nil {
		return nil, err
	}
	defer hresp.Body.Close()
	data, err := readBody(hresp)
	if err != nil {
		return nil, err
	}
	return &response{status: hresp.StatusCode, header: hresp.Header, body: data}, nil
}

// readBody reads the answer into one buffer sized from Content-Length, as
// parameter vectors can be hundreds of megabytes.
func readBody(r *http.Response) ([]byte, error) {
	if r.ContentLength > 0 && r.ContentLength < 1<<40 {
		buf := make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			return nil, err
		}
		return buf, nil
	}
	return io.ReadAll(r.Body)
}

// transient says whether a transport error may go away on a second try.
func transient(err error) bool {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, context.DeadlineExceeded):
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// backoff is the wait before retry number attempt+1: exponential, capped,
// with jitter so that workers that failed together do not return together.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.backoff0
	for i := 0; i < attempt && d < c.backoffMax; i++ {
		d *= 2
	}
	if d > c.backoffMax {
		d = c.backoffMax
	}
	if d <= 0 {
		return 0
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	half := d / 2
	return half + time.Duration(binary.LittleEndian.Uint64(b[:])%uint64(d-half+1))
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func sessionPath(name string) string { return "/v1/sessions/" + url.PathEscape(name) }
