package optd

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"time"
)

// TokenQuotas are a token's limits; a zero field is no limit.
type TokenQuotas struct {
	MaxSessions    int64   `json:"max_sessions,omitempty"`
	MaxParams      int64   `json:"max_params,omitempty"`
	StepsPerSecond float64 `json:"steps_per_second,omitempty"`
	Burst          float64 `json:"burst,omitempty"`
}

// TokenRequest is what CreateToken mints. Scopes: any of "read", "step",
// "admin" (each holds the ones before it). Prefix: the session-name prefix
// the token is bound to ("" = every name). ExpiresIn (seconds) or ExpiresAt
// (RFC 3339 UTC), or neither.
type TokenRequest struct {
	Scopes    []string     `json:"scopes"`
	Prefix    string       `json:"prefix"`
	Label     string       `json:"label,omitempty"`
	ExpiresIn int64        `json:"expires_in,omitempty"`
	ExpiresAt string       `json:"expires_at,omitempty"`
	Quotas    *TokenQuotas `json:"quotas,omitempty"`
}

// Token is a token as the daemon describes it. Secret is set in CreateToken's
// answer only; Usage in GetToken's only.
type Token struct {
	ID        string      `json:"id"`
	Scopes    []string    `json:"scopes"`
	Prefix    string      `json:"prefix"`
	Label     string      `json:"label,omitempty"`
	CreatedAt time.Time   `json:"created_at"`
	ExpiresAt *time.Time  `json:"expires_at,omitempty"`
	RevokedAt *time.Time  `json:"revoked_at,omitempty"`
	Quotas    TokenQuotas `json:"quotas"`
	Usage     *struct {
		Sessions int64 `json:"sessions"`
		Params   int64 `json:"params"`
	} `json:"usage,omitempty"`
	Secret string `json:"token,omitempty"`
}

func tokenPath(id string) string { return "/v1/tokens/" + url.PathEscape(id) }

// CreateToken mints a token (the admin key only). The answer's Secret is the
// bearer token, shown this once.
func (c *Client) CreateToken(ctx context.Context, req TokenRequest) (*Token, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(ctx, &request{method: http.MethodPost, path: "/v1/tokens", body: body,
		contentType: "application/json"})
	if err != nil {
		return nil, err
	}
	var t Token
	if err := decodeJSON(resp, &t); err != nil {
		return nil, err
	}
	return &t, nil
}

// ListTokens lists every token, revoked and expired ones included (the admin
// key only); never a secret.
func (c *Client) ListTokens(ctx context.Context) ([]Token, error) {
	resp, err := c.do(ctx, &request{method: http.MethodGet, path: "/v1/tokens"})
	if err != nil {
		return nil, err
	}
	var doc struct {
		Tokens []Token `json:"tokens"`
	}
	if err := decodeJSON(resp, &doc); err != nil {
		return nil, err
	}
	return doc.Tokens, nil
}

// GetToken returns one token and its usage (the admin key only).
func (c *Client) GetToken(ctx context.Context, id string) (*Token, error) {
	resp, err := c.do(ctx, &request{method: http.MethodGet, path: tokenPath(id)})
	if err != nil {
		return nil, err
	}
	var t Token
	if err := decodeJSON(resp, &t); err != nil {
		return nil, err
	}
	return &t, nil
}

// RevokeToken revokes a token (the admin key only): the next request that
// carries it is refused.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	_, err := c.do(ctx, &request{method: http.MethodDelete, path: tokenPath(id)})
	return err
}
