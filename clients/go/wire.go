package optd

import (
	"encoding/binary"
	"fmt"
	"math"
)

// The 16-bit wire forms. bfloat16 is the top half of a float32; float16 is
// IEEE binary16. The rounding is the daemon's (optim/vec.c): a value is first
// rounded to float32 (a float64 included), then to 16 bits, to nearest with
// ties to even. NaN stays a quiet NaN (sign and top payload bits kept),
// values beyond float16's range become Inf, subnormals are kept. Widening is
// exact.

// Wire is the form vectors travel in.
type Wire string

const (
	// WireDefault (the zero value) in StepOptions or a *Wire call leaves the
	// choice to the client (WithWire); a client's default is WireFull.
	WireDefault Wire = ""
	// WireFull sends and receives vectors in the session's own dtype.
	WireFull Wire = "full"
	// WireBFloat16 halves the bytes of float32, keeping its exponent range.
	WireBFloat16 Wire = "bfloat16"
	// WireFloat16 halves the bytes of float32: 11 bits of precision, values
	// up to 65504 (from 65520 on they become Inf).
	WireFloat16 Wire = "float16"
)

// HeaderParamsDType asks for a binary answer's params in a 16-bit form.
const HeaderParamsDType = "Optd-Params-Dtype"

// WithWire makes the client send gradients and receive params in w
// (WireBFloat16 or WireFloat16; WireFull is the default). Every body in a
// 16-bit form is binary, even with StepOptions.JSON unset.
func WithWire(w Wire) Option { return func(c *Client) { c.wire = w } }

func (w Wire) half() bool { return w == WireBFloat16 || w == WireFloat16 }

func (w Wire) check() error {
	switch w {
	case WireDefault, WireFull, WireBFloat16, WireFloat16:
		return nil
	}
	return fmt.Errorf("optd: wire %q is none of bfloat16, float16, full", string(w))
}

// wireFor resolves a call's wire: its own, else the client's.
func (c *Client) wireFor(w Wire) (Wire, error) {
	if w == WireDefault {
		w = c.wire
	}
	if err := w.check(); err != nil {
		return "", err
	}
	if w == WireDefault {
		w = WireFull
	}
	return w, nil
}

// F32ToBF16 rounds x to bfloat16 (to nearest, ties to even) and returns its bits.
func F32ToBF16(x float32) uint16 {
	u := math.Float32bits(x)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 0x0040
	}
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// BF16ToF32 widens bfloat16 bits to the float32 they stand for (exact).
func BF16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F32ToF16 rounds x to float16 (to nearest, ties to even, with subnormals;
// overflow to Inf) and returns its bits.
func F32ToF16(x float32) uint16 {
	u := math.Float32bits(x)
	sign := uint16(u>>16) & 0x8000
	a := u & 0x7fffffff
	switch {
	case a > 0x7f800000:
		return sign | 0x7e00 | uint16(a>>13)&0x3ff
	case a >= 0x477ff000: // rounds to 65520 or more
		return sign | 0x7c00
	case a < 0x38800000: // below 2^-14: a subnormal float16, or zero
		e := a >> 23
		if e < 102 { // below 2^-25, or a float32 subnormal
			return sign
		}
		sig := a&0x7fffff | 0x800000
		shift := 126 - e // value * 2^24 = sig >> shift
		q := sig >> shift
		r := sig & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if r > half || (r == half && q&1 == 1) {
			q++
		}
		return sign | uint16(q)
	}
	h := (a>>23-112)<<10 | (a>>13)&0x3ff
	rem := a & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // a carry into the exponent is right
	}
	return sign | uint16(h)
}

// F16ToF32 widens float16 bits to the float32 they stand for (exact).
func F16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	e := uint32(h>>10) & 0x1f
	m := uint32(h & 0x3ff)
	switch {
	case e == 0 && m == 0:
		return math.Float32frombits(sign)
	case e == 0: // subnormal: normalise
		e = 113
		for m&0x400 == 0 {
			m <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (m&0x3ff)<<13)
	case e == 31:
		return math.Float32frombits(sign | 0x7f800000 | m<<13)
	}
	return math.Float32frombits(sign | (e+112)<<23 | m<<13)
}

// EncodeWire returns v in w (WireBFloat16 or WireFloat16) as little-endian
// bytes, each value rounded to float32 first.
func EncodeWire[T float32 | float64](v []T, w Wire) ([]byte, error) {
	narrow := F32ToF16
	switch w {
	case WireBFloat16:
		narrow = F32ToBF16
	case WireFloat16:
	default:
		return nil, fmt.Errorf("optd: %q is not a 16-bit wire form", string(w))
	}
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], narrow(float32(x)))
	}
	return b, nil
}

// DecodeWire widens little-endian bytes in w (WireBFloat16 or WireFloat16)
// to a new vector.
func DecodeWire[T float32 | float64](b []byte, w Wire) ([]T, error) {
	widen := F16ToF32
	switch w {
	case WireBFloat16:
		widen = BF16ToF32
	case WireFloat16:
	default:
		return nil, fmt.Errorf("optd: %q is not a 16-bit wire form", string(w))
	}
	if len(b)%2 != 0 {
		return nil, fmt.Errorf("optd: a %s body of %d bytes", w, len(b))
	}
	v := make([]T, len(b)/2)
	for i := range v {
		v[i] = T(widen(binary.LittleEndian.Uint16(b[2*i:])))
	}
	return v, nil
}

// decodeAnswer reads a binary params answer in the form its Optd-Dtype names.
func decodeAnswer[T float](resp *response) ([]T, error) {
	if w := Wire(resp.header.Get(HeaderDType)); w.half() {
		return DecodeWire[T](resp.body, w)
	}
	return decode[T](resp.body)
}
