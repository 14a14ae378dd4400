package main

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"os"
	"strings"
	"testing"
)

type vectorFile struct {
	Contract int `json:"contract"`
	Vectors  []struct {
		Subject    string         `json:"subject"`
		Event      map[string]any `json:"event"`
		MsgpackHex string         `json:"msgpack_hex"`
	} `json:"vectors"`
}

// fieldsJSON turns a decoded event back into the vector file's JSON form (pcm in base64,
// defaults left out), to compare with what the vector says.
func fieldsJSON(t *testing.T, e Event) map[string]any {
	t.Helper()
	fields, err := fieldsOf(e)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]any{"kind": e.Kind()}
	for _, f := range fields {
		if f.omit {
			continue
		}
		switch v := f.value.(type) {
		case []byte:
			out[f.key] = base64.StdEncoding.EncodeToString(v)
		case int64:
			out[f.key] = float64(v) // as encoding/json reads numbers
		default:
			out[f.key] = v
		}
	}
	return out
}

func TestGatewayVectors(t *testing.T) {
	raw, err := os.ReadFile("../../proto/vectors/gateway.json")
	if err != nil {
		t.Fatal(err)
	}
	var file vectorFile
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatal(err)
	}
	if len(file.Vectors) == 0 {
		t.Fatal("no vectors")
	}
	for _, v := range file.Vectors {
		t.Run(v.Subject+"/"+v.Event["kind"].(string), func(t *testing.T) {
			want, err := hex.DecodeString(v.MsgpackHex)
			if err != nil {
				t.Fatal(err)
			}
			e, err := Decode(want)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			got, err := Encode(e)
			if err != nil {
				t.Fatalf("encode: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("re-encoded bytes differ:\n got %x\nwant %x", got, want)
			}
			fields := fieldsJSON(t, e)
			wantJSON, _ := json.Marshal(v.Event)
			gotJSON, _ := json.Marshal(fields)
			if !bytes.Equal(wantJSON, gotJSON) { // json.Marshal sorts map keys
				t.Fatalf("fields differ:\n got %s\nwant %s", gotJSON, wantJSON)
			}
			checkSubject(t, v.Subject, e)
		})
	}
}

// checkSubject: a session's event names its session in the subject; the dial request and its
// reply travel on the dial subject.
func checkSubject(t *testing.T, subject string, e Event) {
	t.Helper()
	switch e.(type) {
	case *DialRequest, *DialReply:
		if subject != subjectDial {
			t.Fatalf("%s on %s, not %s", e.Kind(), subject, subjectDial)
		}
		return
	}
	parts := strings.Split(subject, ".")
	if len(parts) != 4 || parts[1] != sessionOf(e) {
		t.Fatalf("subject %s does not name session %s", subject, sessionOf(e))
	}
}

// Building an event from scratch gives the bytes of the vector (the encoder, not a round trip).
func TestEncodeFromScratch(t *testing.T) {
	e := &SessionEnd{Base: Base{Session: "call-0001", Seq: 500, TsNs: 1796000060000}, Reason: "caller hung up"}
	got, err := Encode(e)
	if err != nil {
		t.Fatal(err)
	}
	want := "85a46b696e64a763746c2e656e64a6726561736f6eae63616c6c65722068756e67207570a773657373696f6ea963616c6c2d30303031a3736571cd01f4a574735f6e73cf000001a229f21260"
	if hex.EncodeToString(got) != want {
		t.Fatalf("got %x", got)
	}
	start := NewPhoneSessionStart()
	start.Session, start.Seq, start.TsNs = "call-0002", 1, 1
	start.SampleRate = 16000
	got, _ = Encode(start)
	want = "85a46b696e64a97369702e7374617274ab73616d706c655f72617465cd3e80a773657373696f6ea963616c6c2d30303032a373657101a574735f6e7301"
	if hex.EncodeToString(got) != want {
		t.Fatalf("got %x", got)
	}
}

// The defaults of the Python classes are the Go constructors' and decoder's: a minimal dial
// request means 30 s of ringing, a start without direction is inbound.
func TestDialDefaults(t *testing.T) {
	e, err := Decode([]byte("\x82\xa4kind\xa8sip.dial\xa6target\xa5+1555"))
	if err != nil {
		t.Fatal(err)
	}
	if req := e.(*DialRequest); req.Target != "+1555" || req.AnswerTimeoutMs != defaultAnswerMs {
		t.Fatalf("%+v", req)
	}
	if _, err := Decode([]byte("\x81\xa4kind\xa8sip.dial")); err == nil {
		t.Fatal("a dial request without a target decoded")
	}
	start := NewPhoneSessionStart()
	start.Session = "s"
	data, _ := Encode(start)
	back, _ := Decode(data)
	if back.(*PhoneSessionStart).Direction != directionInbound || bytes.Contains(data, []byte("direction")) {
		t.Fatalf("%x", data)
	}
}

func TestDecodeRejectsJunk(t *testing.T) {
	for _, junk := range [][]byte{nil, {0xc0}, {0x81, 0xa4, 'k', 'i', 'n', 'd'}, []byte("hello")} {
		if _, err := Decode(junk); err == nil {
			t.Fatalf("%x decoded", junk)
		}
	}
}

func TestG711RoundTrip(t *testing.T) {
	pcm := make([]byte, 320)
	for i := 0; i < 160; i++ {
		v := int16((i - 80) * 300)
		pcm[2*i], pcm[2*i+1] = byte(v), byte(uint16(v)>>8)
	}
	for _, codec := range []string{"pcmu", "pcma"} {
		enc := encodeG711(codec, pcm)
		if len(enc) != 160 {
			t.Fatalf("%s: %d bytes", codec, len(enc))
		}
		dec := decodeG711(codec, enc)
		if len(dec) != 320 {
			t.Fatalf("%s: decoded %d bytes", codec, len(dec))
		}
	}
}

func TestQuietHandlerLogsEachTroubleOnce(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(newQuietHandler(slog.NewTextHandler(&out, nil)))
	for i := 0; i < 5; i++ {
		log.Warn("failed to parse", "i", i)
		log.Info("fine", "i", i)
	}
	log.With("call", "x").Warn("failed to parse")
	if got := strings.Count(out.String(), "failed to parse"); got != 1 {
		t.Fatalf("%d lines of the same trouble:\n%s", got, out.String())
	}
	if got := strings.Count(out.String(), "fine"); got != 5 {
		t.Fatalf("info lines dropped:\n%s", out.String())
	}
}
