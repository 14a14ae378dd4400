package main

// The four bus events the gateway speaks (proto/events.py): msgpack maps tagged by "kind",
// fields in the Python classes' order (the subclass's own fields, then the Event base's), with
// fields equal to their default left out (msgspec's omit_defaults), integers in their shortest
// form. proto/vectors/gateway.json holds the bytes this must reproduce.

import (
	"bytes"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

const (
	KindAudio      = "audio"
	KindPhoneStart = "sip.start"
	KindDtmf       = "ingress.dtmf"
	KindEnd        = "ctl.end"
)

// Base holds the Event base's fields: session (required), seq and ts_ns (default 0).
type Base struct {
	Session string
	Seq     int64
	TsNs    int64
}

// AudioFrame: 20 ms of PCM s16le.
type AudioFrame struct {
	Base
	Pcm        []byte
	SampleRate int64 // required
	Channels   int64 // default 1
	PtsMs      int64
	Turn       int64
	TextOffset int64
}

// PhoneSessionStart: a call through the gateway (SessionStart's room, greeting, caller).
type PhoneSessionStart struct {
	Base
	Room       string
	Greeting   string
	Caller     string
	SampleRate int64 // default 8000
}

// Dtmf: one key the caller pressed.
type Dtmf struct {
	Base
	Digit string // required
}

// SessionEnd: the end of a session (ctl.end or floor.end).
type SessionEnd struct {
	Base
	Reason string
}

// Event is one of *AudioFrame, *PhoneSessionStart, *Dtmf, *SessionEnd.
type Event interface{ Kind() string }

func (*AudioFrame) Kind() string        { return KindAudio }
func (*PhoneSessionStart) Kind() string { return KindPhoneStart }
func (*Dtmf) Kind() string              { return KindDtmf }
func (*SessionEnd) Kind() string        { return KindEnd }

type field struct {
	key   string
	value any // string, int64 or []byte
	omit  bool
}

func baseFields(b Base) []field {
	return []field{
		{"session", b.Session, false},
		{"seq", b.Seq, b.Seq == 0},
		{"ts_ns", b.TsNs, b.TsNs == 0},
	}
}

func fieldsOf(e Event) ([]field, error) {
	switch e := e.(type) {
	case *AudioFrame:
		pcm := e.Pcm
		if pcm == nil {
			pcm = []byte{}
		}
		return append([]field{
			{"pcm", pcm, false},
			{"sample_rate", e.SampleRate, false},
			{"channels", e.Channels, e.Channels == 1},
			{"pts_ms", e.PtsMs, e.PtsMs == 0},
			{"turn", e.Turn, e.Turn == 0},
			{"text_offset", e.TextOffset, e.TextOffset == 0},
		}, baseFields(e.Base)...), nil
	case *PhoneSessionStart:
		return append([]field{
			{"room", e.Room, e.Room == ""},
			{"greeting", e.Greeting, e.Greeting == ""},
			{"caller", e.Caller, e.Caller == ""},
			{"sample_rate", e.SampleRate, e.SampleRate == 8000},
		}, baseFields(e.Base)...), nil
	case *Dtmf:
		return append([]field{{"digit", e.Digit, false}}, baseFields(e.Base)...), nil
	case *SessionEnd:
		return append([]field{{"reason", e.Reason, e.Reason == ""}}, baseFields(e.Base)...), nil
	}
	return nil, fmt.Errorf("unknown event type %T", e)
}

// NewAudioFrame returns a frame with the defaults of the Python class (one channel).
func NewAudioFrame() *AudioFrame { return &AudioFrame{Channels: 1} }

// NewPhoneSessionStart returns a start with the defaults of the Python class (8 kHz).
func NewPhoneSessionStart() *PhoneSessionStart { return &PhoneSessionStart{SampleRate: 8000} }

// Encode an event as the bus carries it.
func Encode(e Event) ([]byte, error) {
	fields, err := fieldsOf(e)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.UseCompactInts(true)
	n := 1
	for _, f := range fields {
		if !f.omit {
			n++
		}
	}
	if err := enc.EncodeMapLen(n); err != nil {
		return nil, err
	}
	if err := enc.EncodeString("kind"); err != nil {
		return nil, err
	}
	if err := enc.EncodeString(e.Kind()); err != nil {
		return nil, err
	}
	for _, f := range fields {
		if f.omit {
			continue
		}
		if err := enc.EncodeString(f.key); err != nil {
			return nil, err
		}
		switch v := f.value.(type) {
		case string:
			err = enc.EncodeString(v)
		case int64:
			err = enc.EncodeInt(v)
		case []byte:
			err = enc.EncodeBytes(v)
		}
		if err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

// Decode a bus message into one of the gateway's events. Unknown keys are skipped; a kind the
// gateway does not know, a missing required field or a value of the wrong type is an error.
func Decode(data []byte) (Event, error) {
	dec := msgpack.NewDecoder(bytes.NewReader(data))
	n, err := dec.DecodeMapLen()
	if err != nil {
		return nil, fmt.Errorf("not a msgpack map: %w", err)
	}
	if n < 0 {
		return nil, fmt.Errorf("nil instead of an event")
	}
	strs := map[string]string{}
	ints := map[string]int64{}
	var pcm []byte
	for i := 0; i < n; i++ {
		key, err := dec.DecodeString()
		if err != nil {
			return nil, fmt.Errorf("bad key: %w", err)
		}
		switch key {
		case "kind", "session", "room", "greeting", "caller", "digit", "reason":
			v, err := dec.DecodeString()
			if err != nil {
				return nil, fmt.Errorf("field %s: %w", key, err)
			}
			strs[key] = v
		case "seq", "ts_ns", "sample_rate", "channels", "pts_ms", "turn", "text_offset":
			v, err := dec.DecodeInt64()
			if err != nil {
				return nil, fmt.Errorf("field %s: %w", key, err)
			}
			ints[key] = v
		case "pcm":
			v, err := dec.DecodeBytes()
			if err != nil {
				return nil, fmt.Errorf("field pcm: %w", err)
			}
			if v == nil {
				v = []byte{}
			}
			pcm = v
		default:
			if err := dec.Skip(); err != nil {
				return nil, fmt.Errorf("field %s: %w", key, err)
			}
		}
	}
	session, ok := strs["session"]
	if !ok {
		return nil, fmt.Errorf("no session")
	}
	base := Base{Session: session, Seq: ints["seq"], TsNs: ints["ts_ns"]}
	intOr := func(key string, def int64) int64 {
		if v, ok := ints[key]; ok {
			return v
		}
		return def
	}
	switch kind := strs["kind"]; kind {
	case KindAudio:
		rate, ok := ints["sample_rate"]
		if pcm == nil || !ok {
			return nil, fmt.Errorf("audio without pcm or sample_rate")
		}
		return &AudioFrame{Base: base, Pcm: pcm, SampleRate: rate, Channels: intOr("channels", 1),
			PtsMs: ints["pts_ms"], Turn: ints["turn"], TextOffset: ints["text_offset"]}, nil
	case KindPhoneStart:
		return &PhoneSessionStart{Base: base, Room: strs["room"], Greeting: strs["greeting"],
			Caller: strs["caller"], SampleRate: intOr("sample_rate", 8000)}, nil
	case KindDtmf:
		digit, ok := strs["digit"]
		if !ok {
			return nil, fmt.Errorf("dtmf without digit")
		}
		return &Dtmf{Base: base, Digit: digit}, nil
	case KindEnd:
		return &SessionEnd{Base: base, Reason: strs["reason"]}, nil
	default:
		return nil, fmt.Errorf("kind %q is not one the gateway reads", kind)
	}
}
