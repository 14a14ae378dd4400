package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/diago/media"
	"github.com/emiago/sipgo/sip"
	"github.com/nats-io/nats.go"
	"github.com/zaf/g711"
)

const (
	sampleRate = 8000
	frameMs    = 20
	frameBytes = sampleRate * frameMs / 1000 * 2 // 320: 20 ms of s16le at 8 kHz
	// The caller's audio waiting for its 20 ms tick: beyond this the oldest is dropped.
	maxBacklog = 10 * frameBytes
)

type gateway struct {
	nc    *nats.Conn
	cfg   config
	log   *slog.Logger
	ctx   context.Context
	calls sync.WaitGroup
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

// call is one answered call: its session on the bus and its media.
type call struct {
	g       *gateway
	session string
	log     *slog.Logger
	codec   media.Codec
	seqCtl  atomic.Int64 // seq of the "ctl" producer (start, end)
	seqSip  atomic.Int64 // seq of the "sip" producer (audio, dtmf)
	warned  sync.Map     // kinds of trouble already logged for this call
	mu      sync.Mutex
	backlog []byte // decoded caller audio not yet published
	dropped int64
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
	g.calls.Add(1)
	defer g.calls.Done()
	defer func() {
		if r := recover(); r != nil {
			g.log.Error("call handler panicked", "panic", r)
		}
	}()
	c := &call{g: g, session: newSession()}
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
	med, err := d.Answer(diago.AnswerOptions{})
	if err != nil {
		c.log.Warn("cannot answer", "error", err)
		if d.LoadState() < sip.DialogStateConfirmed {
			// No common codec, no or a bad SDP offer: refuse the offer.
			if rerr := d.Respond(sip.StatusNotAcceptableHere, "Not Acceptable Here", nil); rerr != nil {
				c.log.Warn("cannot send 488", "error", rerr)
			}
		}
		return
	}
	props := &diago.MediaProps{}
	reader, err := med.AudioReader(diago.WithAudioReaderMediaProps(props))
	if err != nil {
		c.log.Warn("no audio reader", "error", err)
		return
	}
	c.codec = props.Codec
	codecName := strings.ToLower(c.codec.Name)
	if codecName != "pcmu" && codecName != "pcma" {
		c.log.Warn("negotiated codec is not G.711", "codec", c.codec.Name)
		return
	}
	writer, err := med.AudioWriter()
	if err != nil {
		c.log.Warn("no audio writer", "error", err)
		return
	}
	// RFC 4733 keys, when the caller offered telephone-event.
	if dtmf, err := med.AudioReaderDTMF(); err == nil {
		dtmf.OnDTMF(func(key rune) error {
			c.publish("sip", "dtmf", &Dtmf{Base: c.base(&c.seqSip), Digit: string(key)})
			c.log.Info("dtmf", "digit", string(key))
			return nil
		})
		reader = dtmf
	}
	c.log.Info("call answered", "codec", c.codec.Name, "local", props.Laddr, "remote", props.Raddr)

	hangup := make(chan string, 1)
	ask := func(why string) {
		select {
		case hangup <- why:
		default:
		}
	}
	subs := []*nats.Subscription{}
	defer func() {
		for _, s := range subs {
			_ = s.Unsubscribe()
		}
	}()
	egress, err := g.nc.Subscribe(subject(c.session, "egress", "audio"), func(m *nats.Msg) {
		c.play(writer, codecName, m.Data)
	})
	if err == nil {
		subs = append(subs, egress)
		for _, kind := range []string{"floor.end", "ctl.end"} {
			var s *nats.Subscription
			s, err = g.nc.Subscribe("voice."+c.session+"."+kind, func(m *nats.Msg) {
				e, derr := Decode(m.Data)
				if end, ok := e.(*SessionEnd); derr == nil && ok {
					ask(fmt.Sprintf("%s: %s", kind, end.Reason))
				} else {
					c.warn("bad session end on the bus", "subject", m.Subject, "error", derr)
				}
			})
			if err != nil {
				break
			}
			subs = append(subs, s)
		}
	}
	if err == nil {
		err = g.nc.Flush() // the subscriptions stand before the session starts
	}
	if err != nil {
		c.log.Warn("cannot subscribe", "error", err)
		return
	}

	start := NewPhoneSessionStart()
	start.Base = c.base(&c.seqCtl)
	start.Caller, start.Greeting = caller, g.cfg.greeting
	c.publish("ctl", "start", start)
	c.log.Info("session started")

	ctx, cancel := context.WithCancel(d.Context())
	defer cancel()
	var media sync.WaitGroup
	media.Add(2)
	go func() { defer media.Done(); c.readCaller(ctx, reader, med, codecName) }()
	go func() { defer media.Done(); c.sendFrames(ctx) }()

	select {
	case <-d.Context().Done():
		c.publish("ctl", "end", &SessionEnd{Base: c.base(&c.seqCtl), Reason: "caller hung up"})
		c.log.Info("caller hung up")
	case why := <-hangup:
		c.log.Info("hanging up", "why", why)
		hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := d.Hangup(hctx); err != nil {
			c.log.Warn("BYE failed", "error", err)
		}
		hcancel()
	case <-g.ctx.Done():
		c.publish("ctl", "end", &SessionEnd{Base: c.base(&c.seqCtl), Reason: "gateway stopped"})
		hctx, hcancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = d.Hangup(hctx)
		hcancel()
	}
	cancel()
	_ = med.Close() // unblocks the RTP reader
	media.Wait()
	if c.dropped > 0 {
		c.log.Info("call ended", "frames_dropped", c.dropped)
	} else {
		c.log.Info("call ended")
	}
	_ = g.nc.Flush()
}

func (c *call) base(seq *atomic.Int64) Base {
	return Base{Session: c.session, Seq: seq.Add(1), TsNs: time.Now().UnixNano()}
}

// readCaller decodes the caller's RTP audio into the backlog the 20 ms ticker drains.
func (c *call) readCaller(ctx context.Context, r io.Reader, med *diago.DialogMedia, codecName string) {
	buf := make([]byte, media.RTPBufSize)
	audioPT := c.codec.PayloadTypeRecv()
	for {
		n, err := r.Read(buf)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, io.EOF) {
				c.warn("RTP read failed", "error", err)
			}
			return
		}
		if n == 0 || med.RTPPacketReader.PacketHeader.PayloadType != audioPT {
			continue // keep-alive, telephone-event, comfort noise
		}
		pcm := decodeG711(codecName, buf[:n])
		c.mu.Lock()
		c.backlog = append(c.backlog, pcm...)
		if over := len(c.backlog) - maxBacklog; over > 0 {
			over = (over + frameBytes - 1) / frameBytes * frameBytes
			c.backlog = c.backlog[over:]
			c.dropped += int64(over / frameBytes)
			c.warn("caller audio backlog over 200 ms: dropping the oldest")
		}
		c.mu.Unlock()
	}
}

// sendFrames publishes one 20 ms frame of the caller every 20 ms, silence when no audio came.
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
		pcm := make([]byte, frameBytes)
		c.mu.Lock()
		if len(c.backlog) >= frameBytes {
			copy(pcm, c.backlog[:frameBytes])
			c.backlog = c.backlog[frameBytes:]
		}
		c.mu.Unlock()
		frame := NewAudioFrame()
		frame.Base = c.base(&c.seqSip)
		frame.Pcm, frame.SampleRate, frame.PtsMs = pcm, sampleRate, n*frameMs
		c.publish("sip", "audio", frame)
	}
}

// play sends one agent frame (20 ms of 8 kHz PCM) as one RTP packet in the call's codec.
func (c *call) play(w io.Writer, codecName string, data []byte) {
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
	if _, err := w.Write(encodeG711(codecName, frame.Pcm)); err != nil {
		c.warn("RTP write failed", "error", err)
	}
}
