package optd

import (
	"encoding/json"
	"fmt"
)

// Params holds hyperparameters by torch's names ("lr", "betas", "T_max", ...),
// as the daemon documents them; the values are numbers, booleans, strings or
// slices of numbers.
type Params map[string]any

// Schedule is a learning-rate schedule: Type ("cosine", "step", ...; GET
// /v1/optimizers lists them) and its hyperparameters.
type Schedule struct {
	Type   string
	Params Params
}

// Clip is a gradient clip: Type "norm" (Params{"max_norm": 1}) or "value"
// (Params{"max_value": 0.5}).
type Clip struct {
	Type   string
	Params Params
}

// Mode is how steps combine: Type "async" (Params{"max_staleness": 4}) or
// "sync" (Params{"workers": 2}).
type Mode struct {
	Type   string
	Params Params
}

func typed(kind string, p Params) (map[string]any, error) {
	if kind == "" {
		return nil, fmt.Errorf("optd: a schedule, clip or mode needs a Type")
	}
	m := map[string]any{"type": kind}
	for k, v := range p {
		if k == "type" {
			return nil, fmt.Errorf("optd: give the type as Type, not Params[\"type\"]")
		}
		m[k] = v
	}
	return m, nil
}

// patch is the PATCH body the options build.
type patch struct {
	optimizer      Params
	schedule, clip *map[string]any // nil: unchanged; pointer to nil map: remove
	mode           map[string]any
	metadata       any
	metadataSet    bool
	err            error
}

// UpdateOption is one change of Session.Update.
type UpdateOption func(*patch)

// SetLR changes the optimizer's learning rate.
func SetLR(lr float64) UpdateOption { return SetHyperparam("lr", lr) }

// SetHyperparam changes one of the optimizer's hyperparameters by torch's
// name ("weight_decay", "betas", "momentum", ...); the optimizer's type
// stays.
func SetHyperparam(name string, value any) UpdateOption {
	return func(p *patch) {
		if p.optimizer == nil {
			p.optimizer = Params{}
		}
		p.optimizer[name] = value
	}
}

// SetSchedule replaces the schedule.
func SetSchedule(sc Schedule) UpdateOption {
	return func(p *patch) {
		m, err := typed(sc.Type, sc.Params)
		if err != nil && p.err == nil {
			p.err = err
		}
		p.schedule = &m
	}
}

// RemoveSchedule leaves the optimizer's lr unscheduled.
func RemoveSchedule() UpdateOption {
	return func(p *patch) { var m map[string]any; p.schedule = &m }
}

// SetClip replaces the gradient clip.
func SetClip(c Clip) UpdateOption {
	return func(p *patch) {
		m, err := typed(c.Type, c.Params)
		if err != nil && p.err == nil {
			p.err = err
		}
		p.clip = &m
	}
}

// RemoveClip turns clipping off.
func RemoveClip() UpdateOption {
	return func(p *patch) { var m map[string]any; p.clip = &m }
}

// SetMode replaces the mode.
func SetMode(m Mode) UpdateOption {
	return func(p *patch) {
		v, err := typed(m.Type, m.Params)
		if err != nil && p.err == nil {
			p.err = err
		}
		p.mode = v
	}
}

// SetMetadata replaces the metadata with v (anything encoding/json turns
// into a JSON object); nil removes it.
func SetMetadata(v any) UpdateOption {
	return func(p *patch) { p.metadata, p.metadataSet = v, true }
}

func (p *patch) marshal() ([]byte, error) {
	if p.err != nil {
		return nil, p.err
	}
	b := map[string]any{}
	if p.optimizer != nil {
		b["optimizer"] = map[string]any(p.optimizer)
	}
	if p.schedule != nil {
		b["schedule"] = *p.schedule // a nil map encodes as null
	}
	if p.clip != nil {
		b["clip"] = *p.clip
	}
	if p.mode != nil {
		b["mode"] = p.mode
	}
	if p.metadataSet {
		b["metadata"] = p.metadata
	}
	return json.Marshal(b)
}
