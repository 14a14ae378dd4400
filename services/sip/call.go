package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/diago/media"
	"github.com/emiago/diago/media/sdp"
	"github.com/emiago/sipgo/sip"
	"github.com/nats-io/nats.go"
	"github.com/zaf/g711"
)

const (
	sampleRate = 8000
	frameMs    = 20
	frameBytes = sampleRate * frameMs / 1000 * 2 // 320: 20 ms of s16le at 8 kHz
)

type gateway struct {
	nc    *nats.Conn
	cfg   config
	log   *slog.Logger
	ctx   context.Context
	calls sync.WaitGroup
	// Set by startDialer (dial.go) before calls come: the ring, the jitter buffer's depth, the
	// trunk for numbers, and diago to place calls with.
	phone phoneSettings
	dg    *diago.Diago
	// Dials given up with no answer in hand, whose callee may still answer (stray.go).
	strays *strayAnswers
}

// wait for the calls in progress to hang up (on shutdown), at most timeout.
func (g *gateway) wait(timeout time.Duration) {
	done := make(chan struct{})
	go func() { g.calls.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

func newSession() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "call-" + hex.EncodeToString(b)
}

func subject(session, producer, kind string) string {
	return "voice." + session + "." + producer + "." + kind
}

func sessionOf(e Event) string {
	switch e := e.(type) {
	case *AudioFrame:
		return e.Session
	case *PhoneSessionStart:
		return e.Session
	case *Dtmf:
		return e.Session
	case *SessionEnd:
		return e.Session
	case *PhoneAction:
		return e.Session
	case *PhoneActionDone:
		return e.Session
	}
	return ""
}

func encodeG711(codec string, pcm []byte) []byte {
	if codec == "pcma" {
		return g711.EncodeAlaw(pcm)
	}
	return g711.EncodeUlaw(pcm)
}

func decodeG711(codec string, payload []byte) []byte {
	if codec == "pcma" {
		return g711.DecodeAlaw(payload)
	}
	return g711.DecodeUlaw(payload)
}

// call is one call through the gateway, inbound or outbound: its session on the bus and its
// media.
type call struct {
	g            *gateway
	session      string
	direction    string // inbound or outbound
	log          *slog.Logger
	codec        media.Codec
	codecName    string       // pcmu or pcma
	seqCtl       atomic.Int64 // seq of the "ctl" producer (start, end)
	seqSip       atomic.Int64 // seq of the "sip" producer (audio, dtmf)
	warned       sync.Map     // kinds of trouble already logged for this call
	held         atomic.Bool  // the phone holds the call: nothing to hear, nobody listening
	wrongSources atomic.Int64
	signalIP     net.IP // where the phone's SIP comes from (its INVITE, or its answer to ours)
	mu           sync.Mutex
	jitter       *jitterBuffer // the caller's audio put in order (under mu)
	keys         sync.Mutex    // held while keys are sent (phone_action.go); play drops frames then
	underKeys    atomic.Int64  // agent frames dropped as keys were sent
	transferred  atomic.Bool   // the agent's transfer went through: the session ends "transferred"
	lastRTP      atomic.Int64  // unix ns of the phone's last packet (or the call's start)
	silentPhone  chan struct{} // closed when the phone sent nothing for VOICEBUS_SIP_MEDIA_TIMEOUT_MS
	silentOnce   sync.Once
}

func (g *gateway) newCall(direction string) *call {
	c := &call{g: g, session: newSession(), direction: direction, log: g.log,
		jitter: newJitterBuffer(g.phone.jitterDepth()), silentPhone: make(chan struct{})}
	c.jitter.note = count
	c.lastRTP.Store(time.Now().UnixNano())
	return c
}

// warn logs one line per kind of trouble and call; repeats are only counted.
func (c *call) warn(kind string, args ...any) {
	if _, seen := c.warned.LoadOrStore(kind, true); seen {
		return
	}
	c.log.Warn(kind+" (further ones of this call not logged)", args...)
}

func (c *call) publish(producer, kind string, e Event) {
	data, err := Encode(e)
	if err != nil {
		c.warn("cannot encode event", "kind", e.Kind(), "error", err)
		return
	}
	if err := c.g.nc.Publish(subject(c.session, producer, kind), data); err != nil {
		c.warn("cannot publish", "subject", subject(c.session, producer, kind), "error", err)
	}
}

func (g *gateway) handle(d *diago.DialogServerSession) {
	admission, ok := g.admit(d) // trunks.go: refused INVITEs are answered there, before 100 Trying
	if !ok {
		return
	}
	defer admission.release()
	g.calls.Add(1)
	defer g.calls.Done()
	defer func() {
		if r := recover(); r != nil {
			g.log.Error("call handler panicked", "panic", r)
		}
	}()
	c := g.newCall(directionInbound)
	c.signalIP = hostIP(d.InviteRequest.Source())
	caller := d.FromUser()
	c.log = g.log.With("session", c.session, "caller", caller, "call_id", d.InviteRequest.CallID().Value())

	if err := d.Trying(); err != nil {
		c.log.Warn("cannot send 100 Trying", "error", err)
		return
	}
	if err := d.Ringing(); err != nil {
		c.log.Warn("cannot send 180 Ringing", "error", err)
		return
	}
	if !c.ring(d) {
		return
	}
	med, err := d.Answer(diago.AnswerOptions{OnMediaUpdate: c.mediaUpdated})
	if err != nil {
		c.log.Warn("cannot answer", "error", err)
		if d.LoadState() < sip.DialogStateConfirmed {
			// No common codec, no or a bad SDP offer: refuse the offer.
			count("sdp_refused")
			callsTotal.WithLabelValues(directionInbound, "refused").Inc()
			if rerr := d.Respond(sip.StatusNotAcceptableHere, "Not Acceptable Here", nil); rerr != nil {
				c.log.Warn("cannot send 488", "error", rerr)
			}
		} else {
			callsTotal.WithLabelValues(directionInbound, "failed").Inc()
		}
		return
	}
	callsTotal.WithLabelValues(directionInbound, "answered").Inc()
	start := NewPhoneSessionStart()
	start.Caller, start.Greeting = caller, admission.greeting // the trunk's, else VOICEBUS_GREETING
	start.Agent = admission.agent                             // the trunk's, else the default
	// A call whose session could not start: diago hangs up as this handler returns.
	_ = c.bridge(d, med, start, nil)
}

// ring for VOICEBUS_SIP_RING_MS before answering (0: answer at once). A CANCEL meanwhile ends the
// dialog (sipgo answers it 200 and the INVITE 487): the call ends here, before any session.
func (c *call) ring(d *diago.DialogServerSession) bool {
	if c.g.phone.ring <= 0 {
		return true
	}
	timer := time.NewTimer(c.g.phone.ring)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-d.Context().Done():
		c.log.Info("caller cancelled while ringing")
		callsTotal.WithLabelValues(directionInbound, "cancelled").Inc()
		return false
	case <-c.g.ctx.Done(): // stopping: diago answers the INVITE 480 as the handler returns
		return false
	}
}

// dialog is what the bridge needs of a call's SIP side, inbound (diago's server session) or
// outbound (its client session).
type dialog interface {
	Context() context.Context
	Hangup(ctx context.Context) error
}

// bridge carries an answered call until either side ends it, whichever side called: it starts
// the session (start: the caller, greeting, direction; its Base is set here), passes the phone's
// audio and keys to the bus and the agent's voice back, follows hold and resume, and ends the
// session. started, if given, runs once the session is on the bus. An error: the session could
// not start (the call is the caller's to end).
func (c *call) bridge(d dialog, med *diago.DialogMedia, start *PhoneSessionStart, started func()) error {
	callsActive.Inc()
	defer callsActive.Dec()
	phone, writer, err := c.openMedia(med)
	if err != nil {
		c.log.Warn("no media", "error", err)
		return err
	}
	hangup := make(chan string, 1)
	actions := c.newPhoneActions(d, med, hangup)
	subs, err := c.subscribe(writer, hangup, actions)
	defer func() {
		for _, s := range subs {
			_ = s.Unsubscribe()
		}
	}()
	if err != nil {
		c.log.Warn("cannot subscribe", "error", err)
		return err
	}

	start.Base = c.base(&c.seqCtl)
	start.Direction = c.direction
	c.publish("ctl", "start", start)
	c.log.Info("session started")
	if started != nil {
		started()
	}

	ctx, cancel := context.WithCancel(d.Context())
	defer cancel()
	var media sync.WaitGroup
	media.Add(3)
	go func() { defer media.Done(); c.readCaller(ctx, phone) }()
	go func() { defer media.Done(); c.sendFrames(ctx) }()
	go func() { defer media.Done(); actions.run(ctx) }()
	c.awaitEnd(d, hangup)
	cancel()
	_ = med.Close() // unblocks the RTP reader
	media.Wait()
	c.logEnd()
	_ = c.g.nc.Flush()
	return nil
}

// subscribe to the agent's voice, its phone actions and the session's end (the judge's or
// dispatch's), before the session starts: hangup gets why the agent's side ended it.
func (c *call) subscribe(writer io.Writer, hangup chan string, actions *phoneActions) ([]*nats.Subscription, error) {
	ask := func(why string) {
		select {
		case hangup <- why:
		default:
		}
	}
	egress, err := c.g.nc.Subscribe(subject(c.session, "egress", "audio"), func(m *nats.Msg) {
		c.play(writer, m.Data)
	})
	if err != nil {
		return nil, err
	}
	subs := []*nats.Subscription{egress}
	phone, err := c.g.nc.Subscribe(subject(c.session, "llm", "phone"), actions.take)
	if err != nil {
		return subs, err
	}
	subs = append(subs, phone)
	for _, kind := range []string{"floor.end", "ctl.end"} {
		s, err := c.g.nc.Subscribe("voice."+c.session+"."+kind, func(m *nats.Msg) {
			e, derr := Decode(m.Data)
			if end, ok := e.(*SessionEnd); derr == nil && ok {
				ask(fmt.Sprintf("%s: %s", kind, end.Reason))
			} else {
				c.warn("bad session end on the bus", "subject", m.Subject, "error", derr)
			}
		})
		if err != nil {
			return subs, err
		}
		subs = append(subs, s)
	}
	return subs, c.g.nc.Flush() // the subscriptions stand before the session starts
}

// awaitEnd waits for the end of the call: the phone hangs up, the agent's side ends the session,
// or the gateway stops.
func (c *call) awaitEnd(d dialog, hangup chan string) {
	select {
	case <-d.Context().Done():
		who := "caller"
		if c.direction == directionOutbound {
			who = "callee"
		}
		reason := who + " hung up"
		if c.transferred.Load() { // the other party left for the transfer's target first
			reason = reasonTransferred
		}
		c.publish("ctl", "end", &SessionEnd{Base: c.base(&c.seqCtl), Reason: reason})
		c.log.Info(reason)
	case why := <-hangup:
		if c.transferred.Load() { // nobody on the bus ended it: say so, for every stage
			c.publish("ctl", "end", &SessionEnd{Base: c.base(&c.seqCtl), Reason: reasonTransferred})
		}
		c.log.Info("hanging up", "why", why)
		hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := d.Hangup(hctx); err != nil {
			c.log.Warn("BYE failed", "error", err)
		}
		hcancel()
	case <-c.silentPhone:
		why := fmt.Sprintf("no media from the phone for %s", c.g.phone.mediaTimeout)
		c.publish("ctl", "end", &SessionEnd{Base: c.base(&c.seqCtl), Reason: why})
		c.log.Info("hanging up", "why", why)
		hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = d.Hangup(hctx)
		hcancel()
	case <-c.g.ctx.Done():
		c.publish("ctl", "end", &SessionEnd{Base: c.base(&c.seqCtl), Reason: "gateway stopped"})
		hctx, hcancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = d.Hangup(hctx)
		hcancel()
	}
}

// phoneGone: the phone sent no packet for the media timeout (it vanished without a BYE, its
// network went): the call is ended, or it would hold a session and a call slot for ever.
func (c *call) phoneGone() bool {
	limit := c.g.phone.mediaTimeout
	if limit <= 0 || time.Since(time.Unix(0, c.lastRTP.Load())) < limit {
		return false
	}
	c.silentOnce.Do(func() {
		count("rtp_timeout")
		close(c.silentPhone)
	})
	return true
}

func (c *call) base(seq *atomic.Int64) Base {
	return Base{Session: c.session, Seq: seq.Add(1), TsNs: time.Now().UnixNano()}
}

// phoneAudio is the phone's RTP as the call reads it: from the address its SDP named only, its
// RFC 4733 keys decoded on the way.
type phoneAudio struct {
	packets *media.RTPPacketReader // the last packet's header
	keys    *media.RTPDtmfReader   // nil when the phone offered no telephone-event
	reader  io.Reader
}

// openMedia checks the codec and sets up the phone's audio (reader) and the agent's (writer).
func (c *call) openMedia(med *diago.DialogMedia) (*phoneAudio, io.Writer, error) {
	props := &diago.MediaProps{}
	if _, err := med.AudioReader(diago.WithAudioReaderMediaProps(props)); err != nil {
		return nil, nil, fmt.Errorf("no audio reader: %w", err)
	}
	c.codec = props.Codec
	c.codecName = strings.ToLower(c.codec.Name)
	if c.codecName != "pcmu" && c.codecName != "pcma" {
		return nil, nil, fmt.Errorf("negotiated codec %s is not G.711", c.codec.Name)
	}
	writer, err := med.AudioWriter()
	if err != nil {
		return nil, nil, fmt.Errorf("no audio writer: %w", err)
	}
	phone := &phoneAudio{packets: med.RTPPacketReader}
	phone.reader = &sourceCheck{packets: med.RTPPacketReader, signal: c.signalIP, wrong: c.wrongSource}
	if keys, ok := telephoneEvent(med.MediaSession()); ok {
		phone.keys = media.NewRTPDTMFReader(keys, med.RTPPacketReader, phone.reader)
		phone.reader = phone.keys
	}
	c.held.Store(onHold(med.MediaSession()))
	c.log.Info("call answered", "codec", c.codec.Name, "local", props.Laddr, "remote", props.Raddr,
		"direction", c.direction)
	return phone, writer, nil
}

// telephoneEvent is the RFC 4733 codec both sides agreed on, with the payload type the phone
// sends it with.
func telephoneEvent(ms *media.MediaSession) (media.Codec, bool) {
	for _, codec := range ms.CommonCodecs() {
		if codec.Matches(media.CodecTelephoneEvent8000) {
			codec.PayloadType = codec.PayloadTypeRecv()
			return codec, true
		}
	}
	return media.Codec{}, false
}

// sourceCheck passes on the packets that come from where the phone said its media is (its SDP's
// address, as a re-INVITE may change it) and drops the others: whoever finds the port could
// otherwise speak into the call. diago reads whatever reaches the port; its RTPSourceLock is
// one switch for the process, trusts whoever sends four packets first, and counts nothing.
//
// A phone behind a NAT, or with several interfaces, names an address in its SDP that its
// packets do not come from (baresip on this machine names its LAN address and sends from
// 127.0.0.1). When the SDP's address is not the one the phone's SIP comes from, the media is
// taken from the SIP's address instead, latched to the first port it comes from (symmetric
// RTP, RFC 4961; "comedia"): a stranger elsewhere is still refused.
type sourceCheck struct {
	packets *media.RTPPacketReader
	signal  net.IP       // the phone's SIP address (nil: unknown, the SDP's address only)
	latched *net.UDPAddr // the NAT case: the media source taken from the SIP address
	wrong   func()
}

func (s *sourceCheck) Read(b []byte) (int, error) {
	for {
		n, err := s.packets.Read(b)
		if err != nil || n == 0 || s.fromPhone() {
			return n, err
		}
		s.wrong()
	}
}

// fromPhone: the packet just read came from the phone's media address.
func (s *sourceCheck) fromPhone() bool {
	session, ok := s.packets.Reader().(*media.RTPSession)
	if !ok || session.Sess.ReadRTPFromAddr == nil {
		return true // not a session diago negotiated, or one swapped in by a re-INVITE mid-read
	}
	from, ok := session.Sess.ReadRTPFromAddr.(*net.UDPAddr)
	if !ok {
		return false
	}
	want := session.Sess.Raddr
	if from.Port == want.Port && from.IP.Equal(want.IP) {
		return true
	}
	if s.signal == nil || want.IP.Equal(s.signal) || !from.IP.Equal(s.signal) {
		return false // the SDP named the SIP address: nothing else speaks for the phone
	}
	if s.latched == nil {
		s.latched = &net.UDPAddr{IP: from.IP, Port: from.Port}
	}
	return from.Port == s.latched.Port
}

// hostIP is the IP of a "host:port" source (nil when it is not an IP).
func hostIP(source string) net.IP {
	host, _, err := net.SplitHostPort(source)
	if err != nil {
		host = source
	}
	return net.ParseIP(host)
}

func (c *call) wrongSource() {
	c.wrongSources.Add(1)
	count("rtp_wrong_source")
	c.warn("RTP from an address the phone's SDP did not name: dropped")
}

// mediaUpdated follows a re-INVITE, once diago applied it: a hold (the phone's a=sendonly or
// a=inactive, or the older c=0.0.0.0) or its end.
func (c *call) mediaUpdated(med *diago.DialogMedia) {
	ms := med.MediaSession()
	held := onHold(ms)
	if c.held.Swap(held) == held {
		return
	}
	if held {
		c.log.Info("call on hold", "answered_with", negotiatedDirection(ms))
	} else {
		c.log.Info("call resumed")
	}
}

// onHold: the phone sends us nothing to listen to and wants nothing back.
func onHold(ms *media.MediaSession) bool {
	switch negotiatedDirection(ms) {
	case sdp.ModeRecvonly, "inactive": // ours, answering the phone's sendonly or inactive
		return true
	}
	return ms.Raddr.IP != nil && ms.Raddr.IP.IsUnspecified()
}

// negotiatedDirection is the media direction diago settled for our side ("recvonly" while the
// phone holds with a=sendonly). diago v0.42 keeps it unexported (MediaSession.mode), and blocks
// our RTP for recvonly only, not for an a=inactive hold; reading the field is the one way to
// learn it short of parsing every re-INVITE again. TestHoldFollowsTheOffer fails if an upgrade
// of diago moves it.
func negotiatedDirection(ms *media.MediaSession) string {
	f := reflect.ValueOf(ms).Elem().FieldByName("mode")
	if !f.IsValid() || f.Kind() != reflect.String {
		return ""
	}
	return f.String()
}

// readCaller puts the phone's RTP in order, in the jitter buffer the 20 ms ticker drains, and
// publishes its keys.
func (c *call) readCaller(ctx context.Context, phone *phoneAudio) {
	buf := make([]byte, media.RTPBufSize)
	audioPT := c.codec.PayloadTypeRecv()
	for {
		n, err := phone.reader.Read(buf)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, io.EOF) {
				c.warn("RTP read failed", "error", err)
			}
			return
		}
		c.lastRTP.Store(time.Now().UnixNano())
		if n == 0 {
			continue // a keep-alive, or a packet diago set aside (our side sendonly)
		}
		if phone.keys != nil {
			if key, ok := phone.keys.ReadDTMF(); ok {
				c.publish("sip", "dtmf", &Dtmf{Base: c.base(&c.seqSip), Digit: string(key)})
				c.log.Info("dtmf", "digit", string(key))
			}
		}
		header := phone.packets.PacketHeader
		var pcm []byte // a key or comfort noise: its place in the sequence, no audio
		if header.PayloadType == audioPT {
			pcm = decodeG711(c.codecName, buf[:n])
		}
		c.mu.Lock()
		c.jitter.push(header.SSRC, header.SequenceNumber, pcm)
		c.mu.Unlock()
	}
}

// sendFrames publishes one 20 ms frame of the caller every 20 ms, from the jitter buffer: the
// caller's audio in order, concealment where it is missing, silence while the call is on hold
// (hold music is not the caller's words).
func (c *call) sendFrames(ctx context.Context) {
	began := time.Now()
	for n := int64(0); ; n++ {
		next := began.Add(time.Duration(n) * frameMs * time.Millisecond)
		if wait := time.Until(next); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		} else if ctx.Err() != nil {
			return
		}
		c.mu.Lock()
		pcm := c.jitter.pull()
		c.mu.Unlock()
		if c.held.Load() {
			pcm = make([]byte, frameBytes)
			c.lastRTP.Store(time.Now().UnixNano()) // a held phone may well send nothing
		} else if c.phoneGone() {
			return
		}
		frame := NewAudioFrame()
		frame.Base = c.base(&c.seqSip)
		frame.Pcm, frame.SampleRate, frame.PtsMs = pcm, sampleRate, n*frameMs
		c.publish("sip", "audio", frame)
	}
}

// play sends one agent frame (20 ms of 8 kHz PCM) as one RTP packet in the call's codec; nothing
// while the phone holds the call.
func (c *call) play(w io.Writer, data []byte) {
	e, err := Decode(data)
	if err != nil {
		c.warn("bad agent frame", "error", err)
		return
	}
	frame, ok := e.(*AudioFrame)
	if !ok {
		c.warn("not an audio frame on egress.audio", "kind", e.Kind())
		return
	}
	if frame.SampleRate != sampleRate || frame.Channels != 1 || len(frame.Pcm) != frameBytes {
		c.warn("agent frame of the wrong shape", "sample_rate", frame.SampleRate,
			"channels", frame.Channels, "bytes", len(frame.Pcm))
		return
	}
	if c.held.Load() {
		return
	}
	if !c.keys.TryLock() { // keys are being sent: this frame would land inside them
		c.underKeys.Add(1)
		return
	}
	defer c.keys.Unlock()
	if _, err := w.Write(encodeG711(c.codecName, frame.Pcm)); err != nil {
		c.warn("RTP write failed", "error", err)
	}
}

// logEnd says how the call's media went, when anything went wrong with it.
func (c *call) logEnd() {
	c.mu.Lock()
	stats := maps.Clone(c.jitter.stats)
	c.mu.Unlock()
	if n := c.wrongSources.Load(); n > 0 {
		stats["rtp_wrong_source"] = n
	}
	if n := c.underKeys.Load(); n > 0 {
		stats["agent_frames_under_keys"] = n
	}
	args := []any{}
	for _, kind := range slices.Sorted(maps.Keys(stats)) {
		args = append(args, kind, stats[kind])
	}
	c.log.Info("call ended", args...)
}
