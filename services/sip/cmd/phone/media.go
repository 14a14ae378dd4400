package main

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/emiago/diago/media"
	"github.com/zaf/g711"
)

// utterance is a question being said; sent gets the moment its last speech packet left.
type utterance struct {
	q    question
	sent chan time.Time
}

// mouth sends one RTP packet every 20 ms on a fixed timeline for the whole call: the current
// utterance's frames, else silence. A fixed timeline (not "20 ms after the last send") keeps
// the RTP clock honest when the machine is busy; how late the sends ran is reported.
type mouth struct {
	w      *media.RTPPacketWriter
	pt     uint8
	next   chan *utterance
	done   chan struct{} // closed when run returns
	sent   int
	late   int           // packets sent more than one frame after their time
	lateBy time.Duration // the worst of them
	err    error
}

func newMouth(w *media.RTPPacketWriter, pt uint8) *mouth {
	// Our own clock: the writer's ticker would make each write wait for a tick of its own.
	w.ClockDisable()
	return &mouth{w: w, pt: pt, next: make(chan *utterance), done: make(chan struct{})}
}

// say queues q behind what is being said and returns when q's last speech packet was sent.
func (m *mouth) say(ctx context.Context, ended <-chan struct{}, q question) (time.Time, error) {
	u := &utterance{q: q, sent: make(chan time.Time, 1)}
	select {
	case m.next <- u:
	case <-ctx.Done():
		return time.Time{}, ctx.Err()
	case <-ended:
		return time.Time{}, errors.New("the call ended before the question")
	case <-m.done:
		return time.Time{}, errors.New("RTP sending stopped before the question")
	}
	select {
	case at := <-u.sent:
		return at, nil
	case <-ctx.Done():
		return time.Time{}, ctx.Err()
	case <-ended:
		return time.Time{}, errors.New("the call ended during the question")
	case <-m.done:
		return time.Time{}, errors.New("RTP sending stopped during the question")
	}
}

// run sends until ctx ends or a write fails (the call's media closed).
func (m *mouth) run(ctx context.Context) {
	defer close(m.done)
	quiet := silence()
	began := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	var cur *utterance
	frame := 0
	for n := 0; ; n++ {
		due := began.Add(time.Duration(n) * frameMs * time.Millisecond)
		if wait := time.Until(due); wait > 0 {
			timer.Reset(wait)
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		} else if ctx.Err() != nil {
			return
		} else if -wait > frameMs*time.Millisecond {
			m.late++
			m.lateBy = max(m.lateBy, -wait)
		}
		if cur == nil {
			select {
			case cur = <-m.next:
				frame = 0
			default:
			}
		}
		payload, marker := quiet, n == 0
		if cur != nil {
			payload, marker = cur.q.payloads[frame], marker || frame == 0 // a talkspurt begins
		}
		if _, err := m.w.WriteSamples(payload, sampleRate*frameMs/1000, marker, m.pt); err != nil {
			m.err = err
			return
		}
		m.sent++
		if cur != nil {
			if frame == cur.q.lastSpeech {
				cur.sent <- time.Now()
			}
			if frame++; frame == len(cur.q.payloads) {
				cur = nil
			}
		}
	}
}

// ear reads the far end's RTP and keeps when voice arrived: a packet whose decoded samples
// reach above the threshold. Waiters are woken by closing changed on every voiced packet.
type ear struct {
	threshold int
	pt        uint8
	record    bool

	mu        sync.Mutex
	voiced    []time.Time // arrivals of voiced packets not yet passed over
	lastVoice time.Time
	changed   chan struct{}
	heard     int
	heardVoic int
	other     int // packets of another payload type
	pcm       []byte
	err       error
	closed    chan struct{}
}

func newEar(threshold int, pt uint8, record bool) *ear {
	return &ear{threshold: threshold, pt: pt, record: record, changed: make(chan struct{}),
		closed: make(chan struct{})}
}

// listen reads packets until the media closes. ptOf gives the payload type of the packet just
// read (the reader's last header).
func (e *ear) listen(r io.Reader, ptOf func() uint8) {
	defer close(e.closed)
	buf := make([]byte, media.RTPBufSize)
	pcm := make([]byte, 2*media.RTPBufSize)
	for {
		n, err := r.Read(buf)
		at := time.Now()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				e.mu.Lock()
				e.err = err
				e.mu.Unlock()
			}
			return
		}
		if n == 0 {
			continue
		}
		if ptOf() != e.pt {
			e.mu.Lock()
			e.other++
			e.mu.Unlock()
			continue
		}
		copy(pcm, g711.DecodeUlaw(buf[:n]))
		e.hear(pcm[:2*n], at)
	}
}

func (e *ear) hear(pcm []byte, at time.Time) {
	voiced := peak(pcm) > e.threshold
	e.mu.Lock()
	defer e.mu.Unlock()
	e.heard++
	if e.record {
		e.pcm = append(e.pcm, pcm...)
	}
	if !voiced {
		return
	}
	e.heardVoic++
	e.voiced = append(e.voiced, at)
	e.lastVoice = at
	close(e.changed)
	e.changed = make(chan struct{})
}

// firstVoiceAfter waits for the first voiced packet that arrived after `after`.
func (e *ear) firstVoiceAfter(ctx context.Context, after time.Time, limit time.Duration) (time.Time, error) {
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	for {
		e.mu.Lock()
		for len(e.voiced) > 0 && !e.voiced[0].After(after) {
			e.voiced = e.voiced[1:] // before the question ended: not an answer to it
		}
		var first time.Time
		if len(e.voiced) > 0 {
			first = e.voiced[0]
		}
		changed := e.changed
		e.mu.Unlock()
		if !first.IsZero() {
			return first, nil
		}
		select {
		case <-changed:
		case <-deadline.C:
			return time.Time{}, errors.New("no voice within " + limit.String())
		case <-e.closed:
			return time.Time{}, errors.New("the call's media closed")
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}

// quiet waits until no voice has arrived for gap, counted from now or from the last voice
// (the agent's reply is over), and returns the last voiced packet's arrival.
func (e *ear) quiet(ctx context.Context, gap, limit time.Duration) (time.Time, error) {
	began := time.Now()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	timer := time.NewTimer(gap)
	defer timer.Stop()
	for {
		e.mu.Lock()
		last, changed := e.lastVoice, e.changed
		e.mu.Unlock()
		since := began
		if last.After(since) {
			since = last
		}
		left := time.Until(since.Add(gap))
		if left <= 0 {
			return last, nil
		}
		timer.Reset(left)
		select {
		case <-timer.C:
		case <-changed:
		case <-deadline.C:
			return last, errors.New("the agent did not fall quiet within " + limit.String())
		case <-e.closed:
			return last, errors.New("the call's media closed")
		case <-ctx.Done():
			return last, ctx.Err()
		}
	}
}

func (e *ear) counts() (heard, voiced, other int, pcm []byte, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.heard, e.heardVoic, e.other, e.pcm, e.err
}
