package optd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"sync"
)

// ErrDType matches (errors.Is) the error of a typed call (StepF32,
// ParamsF64, ...) on a session of the other dtype; nothing is applied. Binary
// bodies carry their dtype in the Optd-Dtype header, which the daemon checks,
// so the byte counts of the two dtypes cannot be confused.
var ErrDType = errors.New("optd: the session has another dtype")

// Page sizes of Sessions and History (the daemon's largest page).
var (
	sessionsPageSize = 1000
	historyPageSize  = 1000
)

// Ptr returns a pointer to v, for the optional members of StepOptions:
// &StepOptions{Loss: optd.Ptr(0.25)}.
func Ptr[T any](v T) *T { return &v }

// Session is a handle on one named session. Making one sends nothing.
// A Session is safe for concurrent use; LastStep and LastStepInfo then
// describe whichever answer came last, so give each goroutine its own handle
// (Client.Session is cheap) when it needs them per call.
type Session struct {
	c       *Client
	name    string
	created bool

	mu    sync.Mutex
	dtype DType // "" until an answer told it
	last  StepInfo
}

// StepInfo describes the answer to the latest step (or params call) made
// through a handle.
type StepInfo struct {
	Step     int64   // updates applied so far
	LR       float64 // the learning rate the update used; NaN when none was applied
	Replayed bool    // the daemon had already applied this idempotency key
	Pending  int64   // > 0: the gradient was accumulated, not applied yet (202)
	Skipped  bool    // a NaN/Inf gradient was counted and skipped (nonfinite "skip")
}

// StepOptions are the optional parts of a step. A nil *StepOptions is the
// zero value.
type StepOptions struct {
	Loss     *float64 // reported with the step (history, reduce_on_plateau)
	BaseStep *int64   // the step the gradient was computed at (staleness bound)
	Worker   string   // who sent it
	NoParams bool     // do not send the new parameters back (the call returns nil)
	JSON     bool     // send and receive JSON instead of raw little-endian vectors
	// IdempotencyKey replaces the fresh random key of this call; reuse one to
	// retry a step yourself after a call gave up (see NewIdempotencyKey).
	IdempotencyKey string
	// Wire sends the gradient and receives the params in WireBFloat16 or
	// WireFloat16 (always binary), or in the session's dtype (WireFull); the
	// zero value leaves it to the client (WithWire).
	Wire Wire
	// Absent lists the tensors (by index) that have no gradient this step:
	// their params, buffers and step counts stay as they are, and grad holds
	// only the other tensors' gradients, concatenated in tensor order.
	Absent []int
	// Groups, one per param group in order, carries client-driven
	// hyperparameters: they become the groups' values from this step on.
	// Every group must set the same fields.
	Groups []GroupStep
	// GradNorm, when this session is one shard of a larger vector, is the
	// whole vector's gradient norm (Optd-Grad-Norm): clipping by norm uses
	// it in place of the norm of this session's part. ShardedSession sets
	// it; see GradNorm.
	GradNorm *float64
}

// GroupStep is what one step may set in one group.
type GroupStep struct {
	LR       *float64
	Momentum *float64
	Beta1    *float64 // betas[0] (OneCycleLR cycles it)
}

// Headers of a step, JSON or binary: the absent tensors ("0-57,60") and one
// value per group, comma-separated, for each client-driven hyperparameter.
const (
	HeaderAbsent        = "Optd-Absent"
	HeaderGroupLR       = "Optd-Group-Lr"
	HeaderGroupMomentum = "Optd-Group-Momentum"
	HeaderGroupBeta1    = "Optd-Group-Beta1"
	HeaderGradNorm      = "Optd-Grad-Norm"
)

// IndexRanges writes tensor indices as the Optd-Absent list: "0-57,60".
func IndexRanges(idx []int) string {
	v := append([]int(nil), idx...)
	sort.Ints(v)
	var b []byte
	for i := 0; i < len(v); {
		j := i
		for j+1 < len(v) && v[j+1] <= v[j]+1 {
			j++
		}
		if len(b) > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, int64(v[i]), 10)
		if v[j] != v[i] {
			b = strconv.AppendInt(append(b, '-'), int64(v[j]), 10)
		}
		i = j + 1
	}
	return string(b)
}

func checkStepExtras(o *StepOptions) error {
	for _, a := range o.Absent {
		if a < 0 {
			return fmt.Errorf("optd: absent tensor index %d is negative", a)
		}
	}
	if o.GradNorm != nil && (math.IsNaN(*o.GradNorm) || math.IsInf(*o.GradNorm, 0) || *o.GradNorm < 0) {
		return fmt.Errorf("optd: grad norm %v is not a finite number >= 0", *o.GradNorm)
	}
	for i, g := range o.Groups {
		if (g.LR != nil) != (o.Groups[0].LR != nil) || (g.Momentum != nil) != (o.Groups[0].Momentum != nil) ||
			(g.Beta1 != nil) != (o.Groups[0].Beta1 != nil) {
			return fmt.Errorf("optd: groups[%d] sets other fields than groups[0]: every group must set the same", i)
		}
		for _, p := range []*float64{g.LR, g.Momentum, g.Beta1} {
			if p != nil && (math.IsNaN(*p) || math.IsInf(*p, 0)) {
				return fmt.Errorf("optd: groups[%d] has a value that is not finite", i)
			}
		}
	}
	return nil
}

func groupHeader(groups []GroupStep, get func(GroupStep) *float64) string {
	var b []byte
	for i, g := range groups {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendFloat(b, *get(g), 'g', 17, 64)
	}
	return string(b)
}

// Session returns a handle on the session name without contacting the daemon.
func (c *Client) Session(name string) *Session { return &Session{c: c, name: name} }

// CreateSession creates the session, or verifies that one with the same
// config exists (Created then reports false). A session of that name with
// another config is a 409 error (IsConflict).
func (c *Client) CreateSession(ctx context.Context, name string, cfg SessionConfig) (*Session, error) {
	body, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(ctx, &request{method: http.MethodPut, path: sessionPath(name),
		body: body, contentType: "application/json"})
	if err != nil {
		return nil, err
	}
	s := c.Session(name)
	s.created = resp.status == http.StatusCreated
	if _, err := s.readInfo(resp); err != nil {
		return nil, err
	}
	return s, nil
}

// SessionsPage lists up to limit sessions (1-1000) in name order after the
// name after ("" for the first page). next is the after of the following
// page, or "" after the last one.
func (c *Client) SessionsPage(ctx context.Context, after string, limit int) (list []SessionSummary, next string, err error) {
	q := url.Values{"limit": {strconv.Itoa(limit)}}
	if after != "" {
		q.Set("after", after)
	}
	resp, err := c.do(ctx, &request{method: http.MethodGet, path: "/v1/sessions", query: q})
	if err != nil {
		return nil, "", err
	}
	var page struct {
		Sessions []SessionSummary `json:"sessions"`
		Next     *string          `json:"next"`
	}
	if err := decodeJSON(resp, &page); err != nil {
		return nil, "", err
	}
	if page.Next != nil {
		next = *page.Next
	}
	return page.Sessions, next, nil
}

// Sessions lists every session, following the pages.
func (c *Client) Sessions(ctx context.Context) ([]SessionSummary, error) {
	var all []SessionSummary
	after := ""
	for {
		page, next, err := c.SessionsPage(ctx, after, sessionsPageSize)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		if next == "" {
			return all, nil
		}
		after = next
	}
}

// Optimizers returns the daemon's catalogue of optimizers, schedules, clips
// and modes with their hyperparameters and defaults.
func (c *Client) Optimizers(ctx context.Context) (*Catalogue, error) {
	resp, err := c.do(ctx, &request{method: http.MethodGet, path: "/v1/optimizers"})
	if err != nil {
		return nil, err
	}
	var cat Catalogue
	if err := decodeJSON(resp, &cat); err != nil {
		return nil, err
	}
	return &cat, nil
}

// Health returns nil when the daemon answers its liveness probe.
func (c *Client) Health(ctx context.Context) error {
	_, err := c.do(ctx, &request{method: http.MethodGet, path: "/healthz"})
	return err
}

// Name is the session's name.
func (s *Session) Name() string { return s.name }

// Created reports whether the CreateSession call that returned this handle
// created the session (201) rather than found it (200).
func (s *Session) Created() bool { return s.created }

// LastStep is the step count of the latest answer seen through this handle.
func (s *Session) LastStep() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last.Step
}

// LastStepInfo describes the latest step answer seen through this handle.
func (s *Session) LastStepInfo() StepInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// Info fetches the session.
func (s *Session) Info(ctx context.Context) (*SessionInfo, error) {
	resp, err := s.c.do(ctx, &request{method: http.MethodGet, path: sessionPath(s.name)})
	if err != nil {
		return nil, err
	}
	return s.readInfo(resp)
}

// Update changes hyperparameters, schedule, clip, mode or metadata mid-run,
// one typed option per change:
//
//	s.Update(ctx, optd.SetLR(0.01), optd.SetHyperparam("weight_decay", 0.1),
//		optd.SetSchedule(optd.Schedule{Type: "cosine", Params: optd.Params{"T_max": 100}}))
//
// It returns the session as changed. Without options it sends nothing and
// returns Info.
func (s *Session) Update(ctx context.Context, opts ...UpdateOption) (*SessionInfo, error) {
	if len(opts) == 0 {
		return s.Info(ctx)
	}
	p := &patch{}
	for _, o := range opts {
		o(p)
	}
	body, err := p.marshal()
	if err != nil {
		return nil, err
	}
	resp, err := s.c.do(ctx, &request{method: http.MethodPatch, path: sessionPath(s.name),
		body: body, contentType: "application/json"})
	if err != nil {
		return nil, err
	}
	return s.readInfo(resp)
}

// Delete deletes the session and its state.
func (s *Session) Delete(ctx context.Context) error {
	// A retry after a cut-off answer may find the session already deleted by
	// the attempt that was cut off: count that 404 as this call's success.
	_, uncertain, err := s.c.doTracked(ctx, &request{method: http.MethodDelete, path: sessionPath(s.name)})
	if uncertain && IsNotFound(err) {
		err = nil
	}
	if err == nil {
		// The name may come back with another dtype.
		s.mu.Lock()
		s.dtype = ""
		s.mu.Unlock()
	}
	return err
}

// HistoryPage returns up to limit (1-1000) applied steps after step after.
// next is the after of the following page, or -1 after the last one.
func (s *Session) HistoryPage(ctx context.Context, after int64, limit int) (steps []HistoryStep, next int64, err error) {
	q := url.Values{"after": {strconv.FormatInt(after, 10)}, "limit": {strconv.Itoa(limit)}}
	resp, err := s.c.do(ctx, &request{method: http.MethodGet, path: sessionPath(s.name) + "/history", query: q})
	if err != nil {
		return nil, -1, err
	}
	var page struct {
		Steps []HistoryStep `json:"steps"`
		Next  *int64        `json:"next"`
	}
	if err := decodeJSON(resp, &page); err != nil {
		return nil, -1, err
	}
	next = -1
	if page.Next != nil {
		next = *page.Next
	}
	return page.Steps, next, nil
}

// History returns every applied step the daemon kept, oldest first.
func (s *Session) History(ctx context.Context) ([]HistoryStep, error) {
	var all []HistoryStep
	var after int64
	for {
		page, next, err := s.HistoryPage(ctx, after, historyPageSize)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		if next < 0 {
			return all, nil
		}
		after = next
	}
}

// StepF32 applies one gradient to a float32 session and returns the new
// parameters (nil with opts.NoParams). Accumulated but not yet applied
// gradients (202) return the current parameters; LastStepInfo tells.
func (s *Session) StepF32(ctx context.Context, grad []float32, opts *StepOptions) ([]float32, error) {
	return step(ctx, s, grad, Float32, opts)
}

// StepF64 is StepF32 for a float64 session.
func (s *Session) StepF64(ctx context.Context, grad []float64, opts *StepOptions) ([]float64, error) {
	return step(ctx, s, grad, Float64, opts)
}

// ParamsF32 fetches the parameters of a float32 session (LastStep: their step).
func (s *Session) ParamsF32(ctx context.Context) ([]float32, error) {
	return params[float32](ctx, s, Float32, WireDefault)
}

// ParamsF64 fetches the parameters of a float64 session.
func (s *Session) ParamsF64(ctx context.Context) ([]float64, error) {
	return params[float64](ctx, s, Float64, WireDefault)
}

// ParamsF32Wire is ParamsF32 with the params received in w (WireFull: in
// the session's dtype whatever the client's default).
func (s *Session) ParamsF32Wire(ctx context.Context, w Wire) ([]float32, error) {
	return params[float32](ctx, s, Float32, w)
}

// ParamsF64Wire is ParamsF64 with the params received in w.
func (s *Session) ParamsF64Wire(ctx context.Context, w Wire) ([]float64, error) {
	return params[float64](ctx, s, Float64, w)
}

// SetParamsF32 overwrites the parameters of a float32 session; the
// optimizer state and step count stay.
func (s *Session) SetParamsF32(ctx context.Context, p []float32) error {
	return setParams(ctx, s, p, Float32, WireDefault)
}

// SetParamsF64 overwrites the parameters of a float64 session.
func (s *Session) SetParamsF64(ctx context.Context, p []float64) error {
	return setParams(ctx, s, p, Float64, WireDefault)
}

// SetParamsF32Wire is SetParamsF32 with the params sent in w.
func (s *Session) SetParamsF32Wire(ctx context.Context, p []float32, w Wire) error {
	return setParams(ctx, s, p, Float32, w)
}

// SetParamsF64Wire is SetParamsF64 with the params sent in w.
func (s *Session) SetParamsF64Wire(ctx context.Context, p []float64, w Wire) error {
	return setParams(ctx, s, p, Float64, w)
}

// ------------------------------------------------------------- internals

type float interface{ float32 | float64 }

func (s *Session) readInfo(resp *response) (*SessionInfo, error) {
	var info SessionInfo
	if err := decodeJSON(resp, &info); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.dtype = info.DType
	s.last = StepInfo{Step: info.Step, LR: math.NaN()}
	s.mu.Unlock()
	return &info, nil
}

// checkDType asks the daemon for the session's dtype the first time a typed
// call needs it.
func (s *Session) checkDType(ctx context.Context, want DType) error {
	s.mu.Lock()
	dt := s.dtype
	s.mu.Unlock()
	if dt == "" {
		info, err := s.Info(ctx)
		if err != nil {
			return err
		}
		dt = info.DType
	}
	if dt != want {
		return fmt.Errorf("%w: session %s is %s, the call is for %s", ErrDType, s.name, dt, want)
	}
	return nil
}

func encode[T float](v []T) []byte {
	switch v := any(v).(type) {
	case []float32:
		return encodeF32(v)
	case []float64:
		return encodeF64(v)
	}
	panic("unreachable")
}

func decode[T float](b []byte) ([]T, error) {
	var out any
	var err error
	var zero T
	if _, ok := any(zero).(float32); ok {
		out, err = decodeF32(b)
	} else {
		out, err = decodeF64(b)
	}
	if err != nil {
		return nil, err
	}
	return out.([]T), nil
}

func appendJSON[T float](b []byte, v []T, what string) ([]byte, error) {
	switch v := any(v).(type) {
	case []float32:
		return appendJSONF32(b, v, what)
	case []float64:
		return appendJSONF64(b, v, what)
	}
	panic("unreachable")
}

func step[T float](ctx context.Context, s *Session, grad []T, dt DType, opts *StepOptions) ([]T, error) {
	var o StepOptions
	if opts != nil {
		o = *opts
	}
	w, err := s.c.wireFor(o.Wire)
	if err != nil {
		return nil, err
	}
	if w.half() && o.JSON {
		return nil, fmt.Errorf("optd: %s travels only as a binary body; leave JSON unset", w)
	}
	if o.JSON || w.half() {
		// A JSON or 16-bit body does not carry the session's dtype: ask
		// (once) which the session has.
		if err := s.checkDType(ctx, dt); err != nil {
			return nil, err
		}
	}
	if err := checkStepExtras(&o); err != nil {
		return nil, err
	}
	key := o.IdempotencyKey
	if key == "" {
		key = NewIdempotencyKey()
	}
	req := &request{method: http.MethodPost, path: sessionPath(s.name) + "/step",
		header: map[string]string{HeaderIdempotencyKey: key}}
	if o.NoParams {
		req.query = url.Values{"params": {"false"}}
	}
	if o.JSON {
		b := append(make([]byte, 0, 16+len(grad)*12), `{"grad":`...)
		b, err := appendJSON(b, grad, "grad")
		if err != nil {
			return nil, err
		}
		if o.Loss != nil {
			if math.IsNaN(*o.Loss) || math.IsInf(*o.Loss, 0) {
				return nil, fmt.Errorf("optd: loss %v cannot travel in JSON", *o.Loss)
			}
			b = appendFloat(append(b, `,"loss":`...), *o.Loss, 64)
		}
		if o.BaseStep != nil {
			b = strconv.AppendInt(append(b, `,"base_step":`...), *o.BaseStep, 10)
		}
		if o.Worker != "" {
			w, _ := json.Marshal(o.Worker)
			b = append(append(b, `,"worker":`...), w...)
		}
		req.body, req.contentType, req.accept = append(b, '}'), "application/json", "application/json"
	} else {
		req.body, req.contentType, req.accept = encode(grad), "application/octet-stream", "application/octet-stream"
		req.header[HeaderDType] = string(dt)
		if w.half() {
			if req.body, err = EncodeWire(grad, w); err != nil {
				return nil, err
			}
			req.header[HeaderDType] = string(w)
			req.header[HeaderParamsDType] = string(w)
		}
		if o.Loss != nil {
			req.header[HeaderLoss] = strconv.FormatFloat(*o.Loss, 'g', -1, 64)
		}
		if o.BaseStep != nil {
			req.header[HeaderBaseStep] = strconv.FormatInt(*o.BaseStep, 10)
		}
		if o.Worker != "" {
			req.header[HeaderWorker] = o.Worker
		}
	}
	// Absent tensors and group values travel in headers, whichever the body.
	if len(o.Absent) > 0 {
		req.header[HeaderAbsent] = IndexRanges(o.Absent)
	}
	if o.GradNorm != nil {
		req.header[HeaderGradNorm] = strconv.FormatFloat(*o.GradNorm, 'g', 17, 64)
	}
	if len(o.Groups) > 0 {
		g := o.Groups[0]
		if g.LR != nil {
			req.header[HeaderGroupLR] = groupHeader(o.Groups, func(g GroupStep) *float64 { return g.LR })
		}
		if g.Momentum != nil {
			req.header[HeaderGroupMomentum] = groupHeader(o.Groups, func(g GroupStep) *float64 { return g.Momentum })
		}
		if g.Beta1 != nil {
			req.header[HeaderGroupBeta1] = groupHeader(o.Groups, func(g GroupStep) *float64 { return g.Beta1 })
		}
	}
	resp, err := s.c.do(ctx, req)
	if err != nil {
		return nil, err
	}
	info := StepInfo{LR: math.NaN()}
	if v, err := strconv.ParseInt(resp.header.Get(HeaderStep), 10, 64); err == nil {
		info.Step = v
	}
	if v, err := strconv.ParseFloat(resp.header.Get(HeaderLR), 64); err == nil {
		info.LR = v
	}
	if v, err := strconv.ParseInt(resp.header.Get(HeaderPending), 10, 64); err == nil {
		info.Pending = v
	}
	info.Replayed = resp.header.Get(HeaderReplayed) == "true"
	info.Skipped = resp.header.Get(HeaderSkipped) == "true"

	var out []T
	if o.JSON {
		var body struct {
			Step   int64 `json:"step"`
			Params []T   `json:"params"`
		}
		if err := decodeJSON(resp, &body); err != nil {
			return nil, err
		}
		info.Step, out = body.Step, body.Params
	} else if !o.NoParams {
		// With absent tensors grad is shorter than the params answered; a
		// 16-bit answer is 2 bytes a value whatever the session's dtype.
		if len(o.Absent) == 0 && !w.half() && len(resp.body) != len(grad)*dt.size() {
			return nil, fmt.Errorf("optd: step answered %d bytes of params for %d %s elements",
				len(resp.body), len(grad), dt)
		}
		if out, err = decodeAnswer[T](resp); err != nil {
			return nil, err
		}
		if (len(o.Absent) == 0 && len(out) != len(grad)) || len(out) < len(grad) {
			return nil, fmt.Errorf("optd: step answered %d bytes of params for %d %s elements",
				len(resp.body), len(grad), dt)
		}
	}
	if o.NoParams {
		out = nil
	} else if out != nil && !w.half() {
		// The digest covers the params in the session's dtype; a 16-bit
		// answer, a rounding of them, is not checked.
		raw := resp.body
		if o.JSON {
			raw = encode(out)
		}
		if err := s.c.checkDigest(resp, raw); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.last = info
	s.mu.Unlock()
	return out, nil
}

func params[T float](ctx context.Context, s *Session, dt DType, w Wire) ([]T, error) {
	w, err := s.c.wireFor(w)
	if err != nil {
		return nil, err
	}
	if err := s.checkDType(ctx, dt); err != nil {
		return nil, err
	}
	req := &request{method: http.MethodGet, path: sessionPath(s.name) + "/params",
		accept: "application/octet-stream"}
	if w.half() {
		req.header = map[string]string{HeaderParamsDType: string(w)}
	}
	resp, err := s.c.do(ctx, req)
	if err != nil {
		return nil, err
	}
	out, err := decodeAnswer[T](resp)
	if err != nil {
		return nil, err
	}
	if !w.half() {
		if err := s.c.checkDigest(resp, resp.body); err != nil {
			return nil, err
		}
	}
	s.noteStep(resp)
	return out, nil
}

func setParams[T float](ctx context.Context, s *Session, p []T, dt DType, w Wire) error {
	w, err := s.c.wireFor(w)
	if err != nil {
		return err
	}
	body, form := encode(p), string(dt)
	if w.half() {
		if err := s.checkDType(ctx, dt); err != nil {
			return err
		}
		if body, err = EncodeWire(p, w); err != nil {
			return err
		}
		form = string(w)
	}
	resp, err := s.c.do(ctx, &request{method: http.MethodPut, path: sessionPath(s.name) + "/params",
		body: body, contentType: "application/octet-stream", header: map[string]string{HeaderDType: form}})
	if err != nil {
		return err
	}
	s.noteStep(resp)
	return nil
}

// noteStep records the Optd-Step header of a params answer.
func (s *Session) noteStep(resp *response) {
	if v, err := strconv.ParseInt(resp.header.Get(HeaderStep), 10, 64); err == nil {
		s.mu.Lock()
		s.last = StepInfo{Step: v, LR: math.NaN()}
		s.mu.Unlock()
	}
}

func decodeJSON(resp *response, v any) error {
	if err := json.Unmarshal(resp.body, v); err != nil {
		return fmt.Errorf("optd: undecodable answer (HTTP %d): %w", resp.status, err)
	}
	return nil
}
