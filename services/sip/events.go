package main

// The bus events the gateway speaks (proto/events.py), and the dial request it answers with its
// reply: msgpack maps tagged by "kind", fields in the Python classes' order (the subclass's own
// fields, then the Event base's), with fields equal to their default left out (msgspec's
// omit_defaults), integers in their shortest form. proto/vectors/gateway.json holds the bytes
// this must reproduce.

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
	KindDial       = "sip.dial"
	KindDialReply  = "sip.dial.reply"
	KindPhoneAct   = "llm.phone"
	KindActDone    = "sip.action.done"

	// Where dial requests come (proto/subjects.py SIP_DIAL), and the gateways' queue group.
	subjectDial = "voicebus.sip.dial"
	queueDial   = "sip"

	directionInbound  = "inbound"
	directionOutbound = "outbound"
	defaultAnswerMs   = 30000
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

// PhoneSessionStart: a call through the gateway (SessionStart's room, greeting, caller, agent
// profile and instructions). Caller is the other party either way; Direction says who called whom.
type PhoneSessionStart struct {
	Base
	Room         string
	Greeting     string
	Caller       string
	Agent        string
	Instructions string
	SampleRate   int64  // default 8000
	Direction    string // default "inbound"
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

// DialRequest asks the gateway to call Target (not a session's event: no Base).
type DialRequest struct {
	Target          string // required: a number or a sip:/sips: URI
	CallerID        string
	Greeting        string
	Agent           string
	Instructions    string
	AnswerTimeoutMs int64 // default 30000
}

// DialReply answers a DialRequest: the session started, or why not.
type DialReply struct {
	Session string
	Error   string
	Status  int64
	Reason  string
}

// PhoneAction: the agent acts on its call (the tools send_dtmf and transfer), a request on
// voice.<session>.llm.phone: Action "dtmf" sends Digits, "transfer" refers the call to Target.
type PhoneAction struct {
	Base
	Turn   int64  // required
	CallID string // required: the tool call's id, echoed in the answer
	Action string // required: dtmf or transfer
	Digits string
	Target string
}

// PhoneActionDone answers a PhoneAction (the NATS reply): Error empty when it was done.
type PhoneActionDone struct {
	Base
	CallID string // required
	Error  string
}

// Event is one of *AudioFrame, *PhoneSessionStart, *Dtmf, *SessionEnd, the agent's phone
// action and its answer, and the dial request and reply.
type Event interface{ Kind() string }

func (*AudioFrame) Kind() string        { return KindAudio }
func (*PhoneSessionStart) Kind() string { return KindPhoneStart }
func (*Dtmf) Kind() string              { return KindDtmf }
func (*SessionEnd) Kind() string        { return KindEnd }
func (*DialRequest) Kind() string       { return KindDial }
func (*DialReply) Kind() string         { return KindDialReply }
func (*PhoneAction) Kind() string       { return KindPhoneAct }
func (*PhoneActionDone) Kind() string   { return KindActDone }

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
			{"agent", e.Agent, e.Agent == ""},
			{"instructions", e.Instructions, e.Instructions == ""},
			{"sample_rate", e.SampleRate, e.SampleRate == 8000},
			{"direction", e.Direction, e.Direction == directionInbound},
		}, baseFields(e.Base)...), nil
	case *Dtmf:
		return append([]field{{"digit", e.Digit, false}}, baseFields(e.Base)...), nil
	case *SessionEnd:
		return append([]field{{"reason", e.Reason, e.Reason == ""}}, baseFields(e.Base)...), nil
	case *PhoneAction:
		return append([]field{
			{"turn", e.Turn, false},
			{"call_id", e.CallID, false},
			{"action", e.Action, false},
			{"digits", e.Digits, e.Digits == ""},
			{"target", e.Target, e.Target == ""},
		}, baseFields(e.Base)...), nil
	case *PhoneActionDone:
		return append([]field{
			{"call_id", e.CallID, false},
			{"error", e.Error, e.Error == ""},
		}, baseFields(e.Base)...), nil
	case *DialRequest:
		return []field{
			{"target", e.Target, false},
			{"caller_id", e.CallerID, e.CallerID == ""},
			{"greeting", e.Greeting, e.Greeting == ""},
			{"agent", e.Agent, e.Agent == ""},
			{"instructions", e.Instructions, e.Instructions == ""},
			{"answer_timeout_ms", e.AnswerTimeoutMs, e.AnswerTimeoutMs == defaultAnswerMs},
		}, nil
	case *DialReply:
		return []field{
			{"session", e.Session, e.Session == ""},
			{"error", e.Error, e.Error == ""},
			{"status", e.Status, e.Status == 0},
			{"reason", e.Reason, e.Reason == ""},
		}, nil
	}
	return nil, fmt.Errorf("unknown event type %T", e)
}

// NewAudioFrame returns a frame with the defaults of the Python class (one channel).
func NewAudioFrame() *AudioFrame { return &AudioFrame{Channels: 1} }

// NewPhoneSessionStart returns a start with the defaults of the Python class (8 kHz, inbound).
func NewPhoneSessionStart() *PhoneSessionStart {
	return &PhoneSessionStart{SampleRate: 8000, Direction: directionInbound}
}

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
	m, err := decodeMap(data)
	if err != nil {
		return nil, err
	}
	switch kind := m.strs["kind"]; kind {
	case KindDial:
		target, ok := m.strs["target"]
		if !ok {
			return nil, fmt.Errorf("dial request without target")
		}
		return &DialRequest{Target: target, CallerID: m.strs["caller_id"], Greeting: m.strs["greeting"],
			Agent: m.strs["agent"], Instructions: m.strs["instructions"],
			AnswerTimeoutMs: m.intOr("answer_timeout_ms", defaultAnswerMs)}, nil
	case KindDialReply:
		return &DialReply{Session: m.strs["session"], Error: m.strs["error"], Status: m.ints["status"],
			Reason: m.strs["reason"]}, nil
	}
	session, ok := m.strs["session"]
	if !ok {
		return nil, fmt.Errorf("no session")
	}
	return m.sessionEvent(Base{Session: session, Seq: m.ints["seq"], TsNs: m.ints["ts_ns"]})
}

// sessionEvent builds a session's event (one with the Event base) from the decoded map.
func (m *decoded) sessionEvent(base Base) (Event, error) {
	switch kind := m.strs["kind"]; kind {
	case KindAudio:
		rate, ok := m.ints["sample_rate"]
		if m.pcm == nil || !ok {
			return nil, fmt.Errorf("audio without pcm or sample_rate")
		}
		return &AudioFrame{Base: base, Pcm: m.pcm, SampleRate: rate, Channels: m.intOr("channels", 1),
			PtsMs: m.ints["pts_ms"], Turn: m.ints["turn"], TextOffset: m.ints["text_offset"]}, nil
	case KindPhoneStart:
		direction := m.strs["direction"]
		if direction == "" {
			direction = directionInbound
		}
		return &PhoneSessionStart{Base: base, Room: m.strs["room"], Greeting: m.strs["greeting"],
			Caller: m.strs["caller"], Agent: m.strs["agent"], Instructions: m.strs["instructions"],
			SampleRate: m.intOr("sample_rate", 8000), Direction: direction}, nil
	case KindDtmf:
		digit, ok := m.strs["digit"]
		if !ok {
			return nil, fmt.Errorf("dtmf without digit")
		}
		return &Dtmf{Base: base, Digit: digit}, nil
	case KindEnd:
		return &SessionEnd{Base: base, Reason: m.strs["reason"]}, nil
	case KindPhoneAct:
		turn, hasTurn := m.ints["turn"]
		callID, hasID := m.strs["call_id"]
		action, hasAction := m.strs["action"]
		if !hasTurn || !hasID || !hasAction {
			return nil, fmt.Errorf("phone action without turn, call_id or action")
		}
		return &PhoneAction{Base: base, Turn: turn, CallID: callID, Action: action,
			Digits: m.strs["digits"], Target: m.strs["target"]}, nil
	case KindActDone:
		callID, ok := m.strs["call_id"]
		if !ok {
			return nil, fmt.Errorf("phone action answer without call_id")
		}
		return &PhoneActionDone{Base: base, CallID: callID, Error: m.strs["error"]}, nil
	default:
		return nil, fmt.Errorf("kind %q is not one the gateway reads", kind)
	}
}

// decoded is a message's fields by type: the keys the gateway knows, each with its one type.
type decoded struct {
	strs map[string]string
	ints map[string]int64
	pcm  []byte
}

func (m *decoded) intOr(key string, def int64) int64 {
	if v, ok := m.ints[key]; ok {
		return v
	}
	return def
}

func decodeMap(data []byte) (*decoded, error) {
	dec := msgpack.NewDecoder(bytes.NewReader(data))
	n, err := dec.DecodeMapLen()
	if err != nil {
		return nil, fmt.Errorf("not a msgpack map: %w", err)
	}
	if n < 0 {
		return nil, fmt.Errorf("nil instead of an event")
	}
	m := &decoded{strs: map[string]string{}, ints: map[string]int64{}}
	for i := 0; i < n; i++ {
		key, err := dec.DecodeString()
		if err != nil {
			return nil, fmt.Errorf("bad key: %w", err)
		}
		if err := m.field(dec, key); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *decoded) field(dec *msgpack.Decoder, key string) error {
	switch key {
	case "kind", "session", "room", "greeting", "caller", "digit", "reason", "direction",
		"target", "caller_id", "error", "agent", "instructions", "call_id", "action", "digits":
		v, err := dec.DecodeString()
		if err != nil {
			return fmt.Errorf("field %s: %w", key, err)
		}
		m.strs[key] = v
	case "seq", "ts_ns", "sample_rate", "channels", "pts_ms", "turn", "text_offset",
		"answer_timeout_ms", "status":
		v, err := dec.DecodeInt64()
		if err != nil {
			return fmt.Errorf("field %s: %w", key, err)
		}
		m.ints[key] = v
	case "pcm":
		v, err := dec.DecodeBytes()
		if err != nil {
			return fmt.Errorf("field pcm: %w", err)
		}
		if v == nil {
			v = []byte{}
		}
		m.pcm = v
	default:
		if err := dec.Skip(); err != nil {
			return fmt.Errorf("field %s: %w", key, err)
		}
	}
	return nil
}
