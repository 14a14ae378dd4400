package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emiago/diago/media"
	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
	"github.com/nats-io/nats.go"
	dto "github.com/prometheus/client_model/go"
)

// testCall is a call as the gateway holds one, without SIP or the bus.
func testCall(trunk string) *call {
	g := testGateway(trunk)
	c := g.newCall(directionInbound)
	c.session, c.codecName = "call-0001", "pcmu"
	return c
}

// answers records what the gateway answered to each request.
type answers struct {
	mu   sync.Mutex
	done []*PhoneActionDone
}

func (r *answers) reply(_ *nats.Msg, data []byte) error {
	e, err := Decode(data)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done = append(r.done, e.(*PhoneActionDone))
	return nil
}

func (r *answers) all() []*PhoneActionDone {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*PhoneActionDone(nil), r.done...)
}

func testActions(c *call) (*phoneActions, *answers, *atomic.Int64) {
	rec, ended := &answers{}, &atomic.Int64{}
	a := &phoneActions{c: c, queue: make(chan actionJob, actionBacklog), wait: time.Second,
		reply: rec.reply, end: func() { ended.Add(1) }}
	return a, rec, ended
}

func actionBytes(t *testing.T, a *PhoneAction) []byte {
	t.Helper()
	if a.Session == "" {
		a.Session = "call-0001"
	}
	data, err := Encode(a)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestPhoneActionsAreCheckedAsTheContractDoes(t *testing.T) {
	c := testCall("")
	good := []*PhoneAction{
		{CallID: "c1", Action: "dtmf", Digits: "0123456789*#ABCD"},
		{CallID: strings.Repeat("é", 128), Action: "transfer", Target: "+15550100"},
		{Turn: 7, CallID: "c3", Action: "transfer", Target: "sips:desk@pbx.example.com;transport=tls"},
	}
	for _, act := range good {
		if got, why := c.parseAction(actionBytes(t, act)); got == nil {
			t.Errorf("%+v refused: %s", act, why)
		}
	}
	end, _ := Encode(&SessionEnd{Base: Base{Session: "call-0001"}})
	bad := map[string][]byte{
		"not a phone action: not a msgpack map": []byte("\xff\x00junk"),
		"not a phone action: ctl.end":           end,
		"another session":                       actionBytes(t, &PhoneAction{Base: Base{Session: "call-0002"}, CallID: "c", Action: "dtmf", Digits: "1"}),
		"a call_id of at most 128":              actionBytes(t, &PhoneAction{CallID: strings.Repeat("c", 129), Action: "dtmf", Digits: "1"}),
		"needs a turn and a call_id":            actionBytes(t, &PhoneAction{CallID: "", Action: "dtmf", Digits: "1"}),
		"dtmf: digits are 1 to 32":              actionBytes(t, &PhoneAction{CallID: "c", Action: "dtmf", Digits: "12x"}),
		"dtmf: digits":                          actionBytes(t, &PhoneAction{CallID: "c", Action: "dtmf", Digits: strings.Repeat("1", 33)}),
		"transfer: the target":                  actionBytes(t, &PhoneAction{CallID: "c", Action: "transfer", Target: "tel:+15550100"}),
		"transfer: the target is":               actionBytes(t, &PhoneAction{CallID: "c", Action: "transfer", Target: "sip:a b@c"}),
		`no such phone action "hold"`:           actionBytes(t, &PhoneAction{CallID: "c", Action: "hold"}),
		"without turn, call_id or action":       []byte("\x83\xa4kind\xa9llm.phone\xa7session\xa9call-0001\xa6action\xa4dtmf"),
	}
	for want, data := range bad {
		if got, why := c.parseAction(data); got != nil || !strings.Contains(why, want) {
			t.Errorf("%q: %+v %q", want, got, why)
		}
	}
}

// A bad action is counted and answered at once (without a call_id when it had none readable);
// one published without a reply subject is only counted.
func TestBadActionsAreAnsweredAndCounted(t *testing.T) {
	c := testCall("")
	a, rec, _ := testActions(c)
	before := counted(t, "bad_phone_action")
	a.take(&nats.Msg{Subject: "voice.call-0001.llm.phone", Reply: "_INBOX.llm.x", Data: []byte("junk")})
	a.take(&nats.Msg{Subject: "voice.call-0001.llm.phone", Data: []byte("junk")})
	done := rec.all()
	if len(done) != 1 || done[0].CallID != "" || !strings.HasPrefix(done[0].Error, "not a phone action") ||
		done[0].Session != "call-0001" || done[0].Seq == 0 {
		t.Fatalf("%+v", done)
	}
	if got := counted(t, "bad_phone_action") - before; got != 2 {
		t.Fatalf("counted %v", got)
	}
	if len(a.queue) != 0 {
		t.Fatal("a bad action was queued")
	}
}

// More actions than the backlog holds: the surplus is answered "busy" at once; the queued ones
// are answered "the call has ended" when the call ends before their turn.
func TestActionsBeyondTheBacklogAreBusyAndTheRestEndWithTheCall(t *testing.T) {
	c := testCall("")
	a, rec, _ := testActions(c)
	for i := 0; i < actionBacklog+2; i++ {
		a.take(&nats.Msg{Reply: "r", Data: actionBytes(t, &PhoneAction{CallID: fmt.Sprint("c", i), Action: "dtmf", Digits: "1"})})
	}
	done := rec.all()
	if len(done) != 2 || !strings.HasPrefix(done[0].Error, "busy") || done[1].CallID != fmt.Sprint("c", actionBacklog+1) {
		t.Fatalf("%+v", done)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	a.run(ctx)
	done = rec.all()[2:]
	if len(done) != actionBacklog {
		t.Fatalf("%d answered", len(done))
	}
	for i, d := range done {
		if d.CallID != fmt.Sprint("c", i) || d.Error != "the call has ended" {
			t.Fatalf("%+v", d)
		}
	}
	// One that comes after, before the subscription is gone: answered at once, not queued.
	a.take(&nats.Msg{Reply: "r", Data: actionBytes(t, &PhoneAction{CallID: "late", Action: "dtmf", Digits: "1"})})
	if last := rec.all()[len(rec.all())-1]; last.CallID != "late" || last.Error != "the call has ended" || len(a.queue) != 0 {
		t.Fatalf("%+v", last)
	}
}

// counted: the problems counter of this kind, as /metrics would show it.
func counted(t *testing.T, kind string) float64 {
	t.Helper()
	var m dto.Metric
	if err := problems.WithLabelValues(kind).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// ---- transfers ---------------------------------------------------------------------------------

// referee is the other party as a fake: how it answers the REFER and what its NOTIFYs say.
type referee struct {
	answer   error // the REFER's answer as diago reports it (nil: 202)
	notify   []int // the sipfrag statuses it reports, in order
	block    bool  // answers nothing until the request's time is up
	referred []string
}

func (r *referee) refer(ctx context.Context, to sip.Uri, onNotify func(int)) error {
	r.referred = append(r.referred, to.String())
	if r.block {
		<-ctx.Done()
		return ctx.Err()
	}
	go func() {
		for _, status := range r.notify {
			onNotify(status)
		}
	}()
	return r.answer
}

func referRefusal(status int, reason string) error {
	return &sipgo.ErrDialogResponse{Res: sip.NewResponse(status, reason)}
}

func TestTransferOutcomes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		target   string
		referee  referee
		outcome  string
		why      string
		referred string
	}{
		{"accepted", "sip:desk@192.0.2.5", referee{notify: []int{100, 180, 200}}, "transferred", "", "sip:desk@192.0.2.5"},
		{"a number goes through the dial trunk", "+15550199", referee{notify: []int{200}}, "transferred", "",
			"sip:+15550199@trunk.example.com:5080;transport=tcp"},
		{"refused", "sip:desk@192.0.2.5", referee{answer: referRefusal(403, "Forbidden")}, "refused",
			"the phone refused the transfer: 403 Forbidden", "sip:desk@192.0.2.5"},
		{"not implemented", "sip:desk@192.0.2.5", referee{answer: referRefusal(501, "Not Implemented")}, "refused", "501 Not Implemented", ""},
		{"accepted with 200, not 202", "sip:desk@192.0.2.5", referee{answer: referRefusal(200, "OK"), notify: []int{200}}, "transferred", "", ""},
		{"the target is busy", "sip:desk@192.0.2.5", referee{notify: []int{100, 486}}, "failed",
			"the transfer did not go through: sip:desk@192.0.2.5 answered 486; the call goes on", ""},
		{"an unreadable NOTIFY", "sip:desk@192.0.2.5", referee{notify: []int{0}}, "failed", "unreadable", ""},
		{"no NOTIFY", "sip:desk@192.0.2.5", referee{notify: []int{100}}, "no_answer", "no word on the transfer within", ""},
		{"no answer to the REFER", "sip:desk@192.0.2.5", referee{block: true}, "no_answer", "did not answer the transfer (REFER)", ""},
		{"a transport error", "sip:desk@192.0.2.5", referee{answer: errors.New("connection refused")}, "failed",
			"the transfer could not be asked for: connection refused", ""},
		{"a target not on the list", "+19005550000", referee{notify: []int{200}}, "not_allowed",
			"transfers to +19005550000 are not allowed here", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, _, ended := testActions(testCall("sip:trunk.example.com:5080;transport=tcp"))
			a.c.g.phone.transfers = []string{"sip:desk@192.0.2.5", "+1555*"}
			a.wait = 300 * time.Millisecond
			r := tc.referee
			a.refer = r.refer
			outcome, why := a.transfer(context.Background(), tc.target)
			if outcome != tc.outcome || !strings.Contains(why, tc.why) || (tc.why == "") != (why == "") {
				t.Fatalf("%s %q", outcome, why)
			}
			if tc.referred != "" && (len(r.referred) != 1 || r.referred[0] != tc.referred) {
				t.Fatalf("referred to %v", r.referred)
			}
			if ended.Load() != 0 {
				t.Fatal("transfer ends the call itself: do() does, after the answer")
			}
		})
	}
}

func TestATransferOfANumberNeedsADialTrunk(t *testing.T) {
	a, _, _ := testActions(testCall(""))
	r := &referee{notify: []int{200}}
	a.refer = r.refer
	if outcome, why := a.transfer(context.Background(), "+15550199"); outcome != "bad_target" ||
		!strings.Contains(why, "VOICEBUS_SIP_DIAL_TRUNK") || len(r.referred) != 0 {
		t.Fatalf("%s %q %v", outcome, why, r.referred)
	}
}

// The answer goes first, then the call ends as transferred; a success reported after the answer
// said "no word" ends it too (the caller is with the target by then), a late failure does not.
func TestATransferThatWentThroughEndsTheCallAfterTheAnswer(t *testing.T) {
	c := testCall("")
	a, rec, ended := testActions(c)
	a.end = func() {
		if len(rec.all()) != 1 {
			t.Error("the call ended before the answer")
		}
		ended.Add(1)
	}
	a.refer = (&referee{notify: []int{200}}).refer
	a.do(context.Background(), actionJob{msg: &nats.Msg{Reply: "r"}, action: &PhoneAction{
		Base: Base{Session: c.session}, CallID: "t1", Action: "transfer", Target: "sip:desk@192.0.2.5"}})
	if done := rec.all(); len(done) != 1 || done[0].CallID != "t1" || done[0].Error != "" || ended.Load() != 1 {
		t.Fatalf("%+v ended %d", done, ended.Load())
	}

	var notify func(int)
	a.wait = 100 * time.Millisecond
	a.refer = func(_ context.Context, _ sip.Uri, on func(int)) error { notify = on; return nil }
	if outcome, _ := a.transfer(context.Background(), "sip:desk@192.0.2.5"); outcome != "no_answer" {
		t.Fatal(outcome)
	}
	notify(603)
	if ended.Load() != 1 {
		t.Fatal("a late failure ended the call")
	}
	notify(200)
	if ended.Load() != 2 {
		t.Fatal("a late success did not end the call")
	}
}

func TestAnEndedCallEndsTheTransferWait(t *testing.T) {
	a, _, _ := testActions(testCall(""))
	a.refer = (&referee{notify: []int{100}}).refer
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if outcome, why := a.transfer(ctx, "sip:desk@192.0.2.5"); outcome != "ended" ||
		why != "the call ended before the transfer was confirmed" {
		t.Fatalf("%s %q", outcome, why)
	}
}

// endTransferred asks for the hang-up once, and leaves the reason for awaitEnd when the call is
// ending anyway.
func TestEndTransferredAsksOnce(t *testing.T) {
	c := testCall("")
	hangup := make(chan string, 1)
	c.endTransferred(hangup)
	c.endTransferred(hangup)
	if why := <-hangup; why != reasonTransferred || len(hangup) != 0 || !c.transferred.Load() {
		t.Fatalf("%q", why)
	}
}

// ---- keys --------------------------------------------------------------------------------------

func TestSamplesInWholeFrames(t *testing.T) {
	for d, want := range map[time.Duration]uint32{140 * time.Millisecond: 1120,
		141 * time.Millisecond: 1280, 200 * time.Millisecond: 1600, 0: 0} {
		if got := samplesIn(d); got != want {
			t.Errorf("%s: %d, want %d", d, got, want)
		}
	}
}

func TestKeysNeedTelephoneEventAndAnActiveCall(t *testing.T) {
	c := testCall("")
	a, _, _ := testActions(c)
	if outcome, why := a.sendKeys(context.Background(), "1"); outcome != "no_keys" || why != "the phone takes no keys" {
		t.Fatalf("%s %q", outcome, why)
	}
	a.keypad = func() (keyWriter, error) { return nil, errors.New("telephone-event/8000 codec is not negotiated") }
	if outcome, why := a.sendKeys(context.Background(), "1"); outcome != "no_keys" ||
		why != "the phone takes no keys (it offered no telephone-event)" {
		t.Fatalf("%s %q", outcome, why)
	}
	c.held.Store(true)
	if outcome, _ := a.sendKeys(context.Background(), "1"); outcome != "on_hold" {
		t.Fatal(outcome)
	}
}

type rtpSeen struct {
	pt, seq    int
	marker     bool
	ts         uint32
	event      int // telephone-event: the key
	end        bool
	eventFirst bool
}

// The keys and the agent's voice on one real RTP stream (diago's packet writer, to a UDP socket
// that plays the phone): while the agent speaks without pause, keys 1 1 # go out as three RFC
// 4733 events with the payload type the phone offered (96), each event's packets one run with one
// timestamp, the first marked, the last ones ended; no audio packet inside an event, the two 1s
// two events (their own timestamps), and audio after a key later than the key.
func TestKeysAndTheAgentsVoiceDoNotCorruptEachOther(t *testing.T) {
	phone, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer phone.Close()
	sdp := fmt.Sprintf("v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"+
		"m=audio %d RTP/AVP 0 96\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:96 telephone-event/8000\r\n"+
		"a=fmtp:96 0-15\r\na=sendrecv\r\n", phone.LocalAddr().(*net.UDPAddr).Port)
	ms := answered(t, []byte(sdp))
	writer := media.NewRTPPacketWriterSession(media.NewRTPSession(ms))
	var dtmf media.Codec
	for _, codec := range ms.CommonCodecs() {
		if codec.Matches(media.CodecTelephoneEvent8000) {
			dtmf = codec
		}
	}
	c := testCall("")
	a, _, _ := testActions(c)
	a.keypad = func() (keyWriter, error) { return media.NewRTPDTMFWriter(dtmf, writer, writer), nil }
	a.clock = func() rtpClock { return writer }

	var seen []rtpSeen
	read := make(chan struct{})
	go func() {
		defer close(read)
		buf := make([]byte, 1500)
		for {
			_ = phone.SetReadDeadline(time.Now().Add(time.Second))
			n, err := phone.Read(buf)
			if err != nil {
				return
			}
			p := rtpSeen{pt: int(buf[1] & 0x7f), marker: buf[1]&0x80 != 0,
				seq: int(binary.BigEndian.Uint16(buf[2:])), ts: binary.BigEndian.Uint32(buf[4:]), event: -1}
			if p.pt == 96 && n >= 16 {
				p.event, p.end = int(buf[12]), buf[13]&0x80 != 0
			}
			seen = append(seen, p)
		}
	}()
	stop := make(chan struct{})
	spoke := make(chan struct{})
	go func() { // the agent speaks all along: a frame every 20 ms (the writer paces them)
		defer close(spoke)
		frame := NewAudioFrame()
		frame.Session, frame.SampleRate, frame.Pcm = c.session, sampleRate, make([]byte, frameBytes)
		data, _ := Encode(frame)
		for {
			select {
			case <-stop:
				return
			default:
				c.play(writer, data)
				time.Sleep(time.Millisecond) // as the bus's next frame would come
			}
		}
	}()
	time.Sleep(100 * time.Millisecond)
	if outcome, why := a.sendKeys(context.Background(), "11#"); outcome != "sent" || why != "" {
		t.Fatalf("%s %q", outcome, why)
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	<-spoke
	<-read

	if c.underKeys.Load() == 0 {
		t.Fatal("no agent frame came while the keys went out: the test proves nothing")
	}
	var events [][]rtpSeen // runs of telephone-event packets, in sequence order
	for i, p := range seen {
		if i > 0 && p.seq != (seen[i-1].seq+1)&0xffff {
			t.Fatalf("packets lost or reordered on loopback: %v", seen)
		}
		switch {
		case p.pt == 0:
			for _, ev := range events {
				if p.ts >= ev[0].ts && p.ts < ev[0].ts+800 {
					t.Fatalf("audio at %d inside the key at %d", p.ts, ev[0].ts)
				}
			}
		case p.pt != 96:
			t.Fatalf("payload type %d", p.pt)
		case len(events) == 0 || events[len(events)-1][0].ts != p.ts:
			events = append(events, []rtpSeen{p})
		default:
			events[len(events)-1] = append(events[len(events)-1], p)
		}
	}
	if len(events) != 3 {
		t.Fatalf("%d events: %v", len(events), events)
	}
	for i, ev := range events {
		first, last := ev[0], ev[len(ev)-1]
		if first.event != []int{1, 1, 11}[i] || !first.marker || !last.end || len(ev) != 7 {
			t.Fatalf("event %d: %+v", i, ev)
		}
		if i > 0 && first.ts < events[i-1][0].ts+800 {
			t.Fatalf("key %d at %d, before the key before it ended (%d)", i, first.ts, events[i-1][0].ts)
		}
		// One run: nothing of the agent's between an event's packets.
		if last.seq-first.seq != len(ev)-1 {
			t.Fatalf("event %d is not one run: %+v", i, ev)
		}
	}
}
