package optd

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// DigestMismatchError: the params in an answer are not the ones the daemon
// sent -- their CRC-32 (Actual) differs from the answer's Optd-Params-Crc32
// (Expected), both as 8 hex digits. Status is the answer's status.
type DigestMismatchError struct {
	Status   int
	Expected string
	Actual   string
}

func (e *DigestMismatchError) Error() string {
	return fmt.Sprintf("optd: params digest mismatch: the params received have CRC-32 %s, the daemon sent %s",
		e.Actual, e.Expected)
}

// Kind is "digest_mismatch".
func (e *DigestMismatchError) Kind() string { return "digest_mismatch" }

// checkDigest compares raw (the params, little-endian in the session's
// dtype) with the answer's Optd-Params-Crc32, when it has one.
func (c *Client) checkDigest(resp *response, raw []byte) error {
	want := resp.header.Get(HeaderParamsCRC32)
	if c.noVerify || want == "" {
		return nil
	}
	got := fmt.Sprintf("%08x", crc32.ChecksumIEEE(raw))
	if got != strings.ToLower(want) {
		return &DigestMismatchError{Status: resp.status, Expected: want, Actual: got}
	}
	return nil
}

// Error is an answer other than 2xx: the daemon's problem+json body (RFC 9457)
// with its HTTP status. Get it with errors.As.
type Error struct {
	Status int    // HTTP status
	Type   string // "urn:optd:problem:not-found", ...
	Title  string // "Not Found", ...
	Detail string // what went wrong, for people
	Field  string // the field at fault ("grad", "optimizer.lr", "name"), or ""
	Step   *int64 // the session's step, on a 409 about a stale gradient; else nil
	// RetryAfter is the answer's Retry-After (whole seconds), 0 when it
	// names none: on a 429, how long a token's step rate or quota asks the
	// caller to wait; on a 503, when to try again.
	RetryAfter time.Duration

	hasRetryAfter bool
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "optd: %d %s", e.Status, e.Title)
	if e.Detail != "" {
		b.WriteString(": ")
		b.WriteString(e.Detail)
	}
	if e.Field != "" {
		fmt.Fprintf(&b, " (field %s)", e.Field)
	}
	return b.String()
}

// Kind names the family of the answer's status in the words every optd
// client uses alike: "invalid_request", "unauthorized", "not_found",
// "conflict", "stale_gradient" (a 409 on base_step), "unprocessable",
// "unavailable", "round_timeout" or "server_error".
func (e *Error) Kind() string {
	switch {
	case e.Status == http.StatusUnauthorized:
		return "unauthorized"
	case e.Status == http.StatusNotFound:
		return "not_found"
	case e.Status == http.StatusConflict && e.Field == "base_step":
		return "stale_gradient"
	case e.Status == http.StatusConflict:
		return "conflict"
	case e.Status == http.StatusUnprocessableEntity:
		return "unprocessable"
	case e.Status == http.StatusServiceUnavailable:
		return "unavailable"
	case e.Status == http.StatusGatewayTimeout:
		return "round_timeout"
	case e.Status >= 500:
		return "server_error"
	default:
		return "invalid_request"
	}
}

// Is makes errors.Is(err, ErrDType) true for the daemon's refusal of a
// binary body declared (Optd-Dtype) in the other dtype.
func (e *Error) Is(target error) bool {
	return target == ErrDType && e.Status == http.StatusUnprocessableEntity && e.Field == HeaderDType
}

// Temporary reports whether the same request may succeed later (503: the
// daemon could not reach its storage).
func (e *Error) Temporary() bool { return e.Status == http.StatusServiceUnavailable }

func statusIs(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == status
}

// IsNotFound reports whether err is a 404 (no such session).
func IsNotFound(err error) bool { return statusIs(err, http.StatusNotFound) }

// IsConflict reports whether err is a 409: a session exists with another
// config, or a gradient is too stale.
func IsConflict(err error) bool { return statusIs(err, http.StatusConflict) }

// IsUnauthorized reports whether err is a 401 (missing or wrong API key, or
// a revoked or expired token).
func IsUnauthorized(err error) bool { return statusIs(err, http.StatusUnauthorized) }

// IsForbidden reports whether err is a 403: a token whose scope is too small
// (Field "scope") or a session outside its prefix (Field "prefix").
func IsForbidden(err error) bool { return statusIs(err, http.StatusForbidden) }

// IsTooManyRequests reports whether err is a 429: a token past its step rate
// or a session quota (Field "max_sessions" or "max_params"). The client
// waits out a step rate's short Retry-After itself while retries remain;
// (*Error).RetryAfter says how long the daemon asked to wait.
func IsTooManyRequests(err error) bool { return statusIs(err, http.StatusTooManyRequests) }

// decodeProblem turns a non-2xx answer into an *Error. A body that is not
// problem+json (a proxy's page, say) still yields the status and its text.
func decodeProblem(r *response) *Error {
	e := &Error{Status: r.status}
	var p struct {
		Type   string `json:"type"`
		Title  string `json:"title"`
		Detail string `json:"detail"`
		Field  string `json:"field"`
		Step   *int64 `json:"step"`
	}
	if json.Unmarshal(r.body, &p) == nil {
		e.Type, e.Title, e.Detail, e.Field, e.Step = p.Type, p.Title, p.Detail, p.Field, p.Step
	} else {
		d := strings.TrimSpace(string(r.body))
		if len(d) > 200 {
			d = d[:200] + "..."
		}
		e.Detail = d
	}
	if e.Title == "" {
		e.Title = http.StatusText(r.status)
	}
	if v := strings.TrimSpace(r.header.Get("Retry-After")); v != "" {
		// Delta-seconds, the form the daemon sends; a day at most.
		if n, err := strconv.ParseUint(v, 10, 32); err == nil {
			if n > 86400 {
				n = 86400
			}
			e.RetryAfter, e.hasRetryAfter = time.Duration(n)*time.Second, true
		}
	}
	return e
}
