package optd

import (
	"encoding/json"
	"fmt"
	"math"
	"time"
)

// DType is a session's element type.
type DType string

// The two element types a session can have.
const (
	Float32 DType = "float32"
	Float64 DType = "float64"
)

func (d DType) size() int {
	if d == Float64 {
		return 8
	}
	return 4
}

// SessionConfig is the body of a create. Optimizer, Schedule, Clip and Mode
// use torch.optim's names, e.g.
//
//	Optimizer: map[string]any{"type": "adam", "lr": 1e-3, "betas": []float64{0.9, 0.999}}
//	Schedule:  map[string]any{"type": "cosine", "T_max": 100}
//	Clip:      map[string]any{"type": "norm", "max_norm": 1}
//	Mode:      map[string]any{"type": "async", "max_staleness": 4}
//
// Give the initial parameters either as Params (or ParamsF32) or as Size and
// Init. A nil map leaves the daemon's default.
type SessionConfig struct {
	Optimizer map[string]any
	DType     DType     // Float32 (the daemon's default) or Float64
	Params    []float64 // initial parameters
	ParamsF32 []float32 // initial parameters of a float32 session, sent exactly
	Size      int       // with Init, instead of Params
	Init      *Init
	Schedule  map[string]any
	Clip      map[string]any
	Mode      map[string]any
	Nonfinite string  // "error" (default) or "skip"
	Metadata  any     // any JSON object, kept with the session
	Retain    *Retain // kept checkpoints; nil: none
	// Tensors, when given, is the layout: the vector is their concatenation
	// in this order (Size may then be 0). Without it the session is one
	// tensor named "params".
	Tensors []Tensor
	// Groups are torch's param groups: each lists its tensors by name and
	// may override any hyperparameter of Optimizer. Without them, one group.
	Groups []Group
}

// Retain is a retention policy: a checkpoint after every EverySteps-th
// update, the Keep newest of them kept (rollback and fork reach back to the
// oldest).
type Retain struct {
	EverySteps int64 `json:"every_steps"`
	Keep       int64 `json:"keep"`
}

// Checkpoint is one kept checkpoint of a session.
type Checkpoint struct {
	Step  int64   `json:"step"`
	Time  string  `json:"time"`
	Label *string `json:"label"`
	Kind  string  `json:"kind"` // "periodic", "label", "anchor" or "auto"
	Bytes int64   `json:"bytes"`
}

// Tensor is one named tensor of a session's layout.
type Tensor struct {
	Name  string `json:"name"`
	Shape []int  `json:"shape"`
}

// Group is one param group on create: its tensors and the hyperparameters
// it overrides (torch's names: "lr", "weight_decay", "betas", ...).
type Group struct {
	Tensors   []string
	Overrides map[string]any
}

// MarshalJSON writes {"tensors": [...], <overrides>...}.
func (g Group) MarshalJSON() ([]byte, error) {
	m := make(map[string]any, len(g.Overrides)+1)
	for k, v := range g.Overrides {
		m[k] = v
	}
	m["tensors"] = g.Tensors
	return json.Marshal(m)
}

// MarshalJSON writes the create body. float32 parameters are written as the
// float64 of the same value, which the daemon reads back bit for bit.
func (c SessionConfig) MarshalJSON() ([]byte, error) {
	type body struct {
		Optimizer map[string]any  `json:"optimizer"`
		DType     DType           `json:"dtype,omitempty"`
		Params    json.RawMessage `json:"params,omitempty"`
		Size      int             `json:"size,omitempty"`
		Init      *Init           `json:"init,omitempty"`
		Schedule  map[string]any  `json:"schedule,omitempty"`
		Clip      map[string]any  `json:"clip,omitempty"`
		Mode      map[string]any  `json:"mode,omitempty"`
		Nonfinite string          `json:"nonfinite,omitempty"`
		Metadata  any             `json:"metadata,omitempty"`
		Retain    *Retain         `json:"retain,omitempty"`
		Tensors   []Tensor        `json:"tensors,omitempty"`
		Groups    []Group         `json:"groups,omitempty"`
	}
	b := body{Optimizer: c.Optimizer, DType: c.DType, Size: c.Size, Init: c.Init,
		Schedule: c.Schedule, Clip: c.Clip, Mode: c.Mode, Nonfinite: c.Nonfinite,
		Metadata: c.Metadata, Retain: c.Retain, Tensors: c.Tensors, Groups: c.Groups}
	var err error
	switch {
	case c.Params != nil && c.ParamsF32 != nil:
		return nil, fmt.Errorf("optd: give Params or ParamsF32, not both")
	case c.Params != nil:
		b.Params, err = appendJSONF64(nil, c.Params, "params")
	case c.ParamsF32 != nil:
		b.Params, err = appendJSONF32(nil, c.ParamsF32, "params")
	}
	if err != nil {
		return nil, err
	}
	return json.Marshal(b)
}

// Init says how the daemon fills Size initial parameters. Use InitZeros,
// InitNormal or InitUniform.
type Init struct {
	Type      string // "zeros", "normal" or "uniform"
	Mean, Std float64
	Low, High float64
	Seed      uint64
}

// InitZeros: every parameter 0.
func InitZeros() *Init { return &Init{Type: "zeros"} }

// InitNormal: parameters drawn from N(mean, std²), deterministic for a seed.
func InitNormal(mean, std float64, seed uint64) *Init {
	return &Init{Type: "normal", Mean: mean, Std: std, Seed: seed}
}

// InitUniform: parameters drawn from U(low, high), deterministic for a seed.
func InitUniform(low, high float64, seed uint64) *Init {
	return &Init{Type: "uniform", Low: low, High: high, Seed: seed}
}

// MarshalJSON writes only the members of the init's type; the daemon rejects
// the others.
func (in Init) MarshalJSON() ([]byte, error) {
	m := map[string]any{"type": in.Type}
	switch in.Type {
	case "normal":
		m["mean"], m["std"], m["seed"] = in.Mean, in.Std, in.Seed
	case "uniform":
		m["low"], m["high"], m["seed"] = in.Low, in.High, in.Seed
	}
	return json.Marshal(m)
}

// SessionInfo is a session as GET /v1/sessions/{name} describes it.
type SessionInfo struct {
	Name      string          `json:"name"`
	Step      int64           `json:"step"`
	LR        float64         `json:"lr"` // the next update's learning rate
	DType     DType           `json:"dtype"`
	Size      int             `json:"size"`
	Optimizer map[string]any  `json:"optimizer"` // every default filled in
	Schedule  map[string]any  `json:"schedule"`  // nil: constant lr
	Clip      map[string]any  `json:"clip"`      // nil: no clipping
	Mode      map[string]any  `json:"mode"`
	Nonfinite string          `json:"nonfinite"`
	Metadata  json.RawMessage `json:"metadata"` // "null" when none
	State     struct {
		Buffers             []string `json:"buffers"` // torch names: "exp_avg", ...
		LastLR              *float64 `json:"last_lr"`
		LastLoss            *float64 `json:"last_loss"`
		PendingAccumulation int64    `json:"pending_accumulation"`
	} `json:"state"`
	Counters struct {
		Applied          int64 `json:"applied"`
		RejectedStale    int64 `json:"rejected_stale"`
		TimedOut         int64 `json:"timed_out"`
		SkippedNonfinite int64 `json:"skipped_nonfinite"`
	} `json:"counters"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
	// CreatedBy is the id of the token that created the session, "admin"
	// (the admin key), or "" (authentication was off).
	CreatedBy string `json:"created_by,omitempty"`
	// Tensors is the layout; Groups the param groups with every effective
	// hyperparameter and the group's current lr.
	Tensors []TensorInfo `json:"tensors"`
	Groups  []GroupInfo  `json:"groups"`
}

// TensorInfo is one tensor of a session: its place in the vector.
type TensorInfo struct {
	Name   string `json:"name"`
	Shape  []int  `json:"shape"`
	Offset int    `json:"offset"`
	Size   int    `json:"size"`
}

// GroupInfo is one param group of a session.
type GroupInfo struct {
	Tensors   []string       `json:"tensors"`
	Optimizer map[string]any `json:"optimizer"`
	LR        float64        `json:"lr"`
}

// SessionSummary is one entry of the session list.
type SessionSummary struct {
	Name      string    `json:"name"`
	Step      int64     `json:"step"`
	Optimizer string    `json:"optimizer"`
	DType     DType     `json:"dtype"`
	Size      int       `json:"size"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
	CreatedBy string    `json:"created_by,omitempty"`
}

// HistoryStep is one applied update.
type HistoryStep struct {
	Step       int64     `json:"step"`
	Time       time.Time `json:"time"`
	LR         float64   `json:"lr"`
	Loss       *float64  `json:"loss"` // nil when the step reported none
	GradNorm   float64   `json:"grad_norm"`
	UpdateNorm float64   `json:"update_norm"`
	Worker     string    `json:"worker,omitempty"`
}

// Catalogue is GET /v1/optimizers: every kind the daemon knows.
type Catalogue struct {
	Optimizers []Kind `json:"optimizers"`
	Schedules  []Kind `json:"schedules"`
	Clips      []Kind `json:"clips"`
	Modes      []Kind `json:"modes"`
}

// Kind is one optimizer, schedule, clip or mode.
type Kind struct {
	Type            string           `json:"type"`
	Doc             string           `json:"doc"`
	Hyperparameters []Hyperparameter `json:"hyperparameters"`
	State           []string         `json:"state,omitempty"` // optimizers: buffer names
}

// Hyperparameter describes one member of a kind.
type Hyperparameter struct {
	Name     string   `json:"name"`
	Type     string   `json:"type"` // "number", "integer", "boolean", "string", ...
	Required bool     `json:"required,omitempty"`
	Default  any      `json:"default,omitempty"`
	Choices  []string `json:"choices,omitempty"`
	Doc      string   `json:"doc"`
}

// findKind returns the kind named typ, or nil.
func findKind(ks []Kind, typ string) *Kind {
	for i := range ks {
		if ks[i].Type == typ {
			return &ks[i]
		}
	}
	return nil
}

// Optimizer returns the optimizer named typ ("adam", ...), or nil.
func (c *Catalogue) Optimizer(typ string) *Kind { return findKind(c.Optimizers, typ) }

// Param returns the hyperparameter named name, or nil.
func (k *Kind) Param(name string) *Hyperparameter {
	for i := range k.Hyperparameters {
		if k.Hyperparameters[i].Name == name {
			return &k.Hyperparameters[i]
		}
	}
	return nil
}

// appendJSONF64 writes v as a JSON array with the shortest representation
// that reads back to the same float64. JSON has no NaN or Inf.
func appendJSONF64(b []byte, v []float64, what string) ([]byte, error) {
	b = append(b, '[')
	for i, x := range v {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return nil, fmt.Errorf("optd: %s[%d] is %v, which JSON cannot carry (use the binary body)", what, i, x)
		}
		if i > 0 {
			b = append(b, ',')
		}
		b = appendFloat(b, x, 64)
	}
	return append(b, ']'), nil
}

// appendJSONF32 writes float32s as the float64 of the same value: the daemon
// parses doubles, so this is exact where a float32-shortest string could be
// rounded twice.
func appendJSONF32(b []byte, v []float32, what string) ([]byte, error) {
	b = append(b, '[')
	for i, x := range v {
		d := float64(x)
		if math.IsNaN(d) || math.IsInf(d, 0) {
			return nil, fmt.Errorf("optd: %s[%d] is %v, which JSON cannot carry (use the binary body)", what, i, x)
		}
		if i > 0 {
			b = append(b, ',')
		}
		b = appendFloat(b, d, 64)
	}
	return append(b, ']'), nil
}
