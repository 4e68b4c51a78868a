package optd

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
)

// ForkOptions says where a fork starts and what it changes.
type ForkOptions struct {
	// Step is the parent's step to start from; nil: its current step.
	Step *int64
	// Replay re-applies the parent's logged gradients after Step under the
	// fork's config (a counterfactual run); the call returns when done.
	Replay bool
	// Changes are what PATCH takes ("optimizer": {"lr": ...}, "schedule",
	// "retain", ...); nil: the parent's config.
	Changes map[string]any
}

// Fork creates session name from session from as it was after a step,
// sharing nothing with it.
func (c *Client) Fork(ctx context.Context, name, from string, o ForkOptions) (*Session, error) {
	doc := map[string]any{}
	for k, v := range o.Changes {
		doc[k] = v
	}
	f := map[string]any{"from": from}
	if o.Step != nil {
		f["step"] = *o.Step
	}
	doc["fork"] = f
	if o.Replay {
		doc["replay"] = true
	}
	body, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(ctx, &request{method: http.MethodPut, path: sessionPath(name),
		body: body, contentType: "application/json"})
	if err != nil {
		return nil, err
	}
	s := c.Session(name)
	s.created = true
	if _, err := s.readInfo(resp); err != nil {
		return nil, err
	}
	return s, nil
}

// ImportSession creates session name from an export file (Session.Export).
func (c *Client) ImportSession(ctx context.Context, name string, file []byte) (*Session, error) {
	resp, err := c.do(ctx, &request{method: http.MethodPut, path: sessionPath(name) + "/export",
		body: file, contentType: "application/octet-stream", accept: "application/json"})
	if err != nil {
		return nil, err
	}
	s := c.Session(name)
	s.created = true
	if _, err := s.readInfo(resp); err != nil {
		return nil, err
	}
	return s, nil
}

// Checkpoint keeps the session's current state under label.
func (s *Session) Checkpoint(ctx context.Context, label string) (*Checkpoint, error) {
	body, _ := json.Marshal(map[string]string{"label": label})
	resp, err := s.c.do(ctx, &request{method: http.MethodPost, path: sessionPath(s.name) + "/checkpoints",
		body: body, contentType: "application/json"})
	if err != nil {
		return nil, err
	}
	var out Checkpoint
	return &out, decodeJSON(resp, &out)
}

// Checkpoints lists the kept checkpoints, oldest first.
func (s *Session) Checkpoints(ctx context.Context) ([]Checkpoint, error) {
	resp, err := s.c.do(ctx, &request{method: http.MethodGet, path: sessionPath(s.name) + "/checkpoints"})
	if err != nil {
		return nil, err
	}
	var out struct {
		Checkpoints []Checkpoint `json:"checkpoints"`
	}
	return out.Checkpoints, decodeJSON(resp, &out)
}

func (s *Session) rollback(ctx context.Context, doc map[string]any) (*SessionInfo, error) {
	body, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	resp, err := s.c.do(ctx, &request{method: http.MethodPost, path: sessionPath(s.name) + "/rollback",
		body: body, contentType: "application/json"})
	if err != nil {
		return nil, err
	}
	return s.readInfo(resp)
}

// Rollback returns the session to what it was after step: later steps,
// checkpoints and idempotency keys are gone.
func (s *Session) Rollback(ctx context.Context, step int64) (*SessionInfo, error) {
	return s.rollback(ctx, map[string]any{"step": step})
}

// RollbackTo returns the session to its checkpoint labelled label.
func (s *Session) RollbackTo(ctx context.Context, label string) (*SessionInfo, error) {
	return s.rollback(ctx, map[string]any{"label": label})
}

// Export returns the whole session as one file (with log, its log too).
func (s *Session) Export(ctx context.Context, log bool) ([]byte, error) {
	q := url.Values{"log": {"false"}}
	if log {
		q.Set("log", "true")
	}
	resp, err := s.c.do(ctx, &request{method: http.MethodGet, path: sessionPath(s.name) + "/export",
		query: q, accept: "application/octet-stream"})
	if err != nil {
		return nil, err
	}
	return resp.body, nil
}
