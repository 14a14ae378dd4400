package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/diago/audio"
)

// turnResult is one question: when its speech ended, when the answer's voice arrived.
type turnResult struct {
	Type         string  `json:"type"` // "turn"
	Call         int     `json:"call"`
	From         string  `json:"from"`
	Turn         int     `json:"turn"`
	OK           bool    `json:"ok"`
	SpeechEndNs  int64   `json:"speech_end_ns,omitempty"`  // wall clock: the last speech packet sent
	FirstVoiceNs int64   `json:"first_voice_ns,omitempty"` // wall clock: the first voiced packet in
	V2VMs        float64 `json:"v2v_ms,omitempty"`
	ReplyMs      float64 `json:"reply_ms,omitempty"` // the reply's first to last voiced packet
	Error        string  `json:"error,omitempty"`
}

// callResult is one call, from INVITE to BYE.
type callResult struct {
	Type        string  `json:"type"` // "call"
	Call        int     `json:"call"`
	From        string  `json:"from"`
	Answered    bool    `json:"answered"`
	Greeted     bool    `json:"greeted"`            // the agent spoke first (with -greeting)
	SetupMs     float64 `json:"setup_ms,omitempty"` // INVITE sent → 200 OK acknowledged
	DurationS   float64 `json:"duration_s"`         // INVITE sent → hung up
	Turns       int     `json:"turns"`
	TurnsOK     int     `json:"turns_ok"`
	Sent        int     `json:"packets_sent"`
	Heard       int     `json:"packets_heard"`
	HeardVoiced int     `json:"packets_voiced"`
	Other       int     `json:"packets_other_type,omitempty"`
	Late        int     `json:"packets_late"` // sent more than 20 ms after their time
	LateMaxMs   float64 `json:"late_max_ms"`
	Hangup      string  `json:"hangup,omitempty"` // "bye": the phone hung up; "remote": the far end did
	Wav         string  `json:"wav,omitempty"`
	Error       string  `json:"error,omitempty"`
}

func callerOf(o options, i int) string { return fmt.Sprintf("%s%d", o.from, i) }

func ms(d time.Duration) float64 { return round(float64(d)/1e6, 2) }

// sleepCtx waits d unless ctx ends first (false then).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func joinErr(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// placeCall calls, converses and hangs up; it never panics the program for one bad call.
func placeCall(ctx context.Context, dg *diago.Diago, o options, i int, out *report) callResult {
	res := callResult{Type: "call", Call: i, From: callerOf(o, i), Turns: o.turns}
	var caller diago.InviteClientOptions
	caller.WithCaller("", res.From, o.bind)
	began := time.Now()
	ictx, cancel := context.WithTimeout(ctx, o.timeout)
	d, med, err := dg.Invite(ictx, o.uri, diago.InviteOptions{Headers: caller.Headers})
	cancel()
	if err != nil {
		res.Error = "INVITE: " + err.Error()
		return res
	}
	defer d.Close()
	res.Answered, res.SetupMs = true, ms(time.Since(began))

	props := diago.MediaProps{}
	if _, err := med.AudioWriter(diago.WithAudioWriterMediaProps(&props)); err != nil || !strings.EqualFold(props.Codec.Name, "pcmu") {
		res.Error = fmt.Sprintf("no PCMU media (codec %q, %v)", props.Codec.Name, err)
		hangup(d, &res)
		return res
	}
	reader, err := med.AudioReader()
	if err != nil {
		res.Error = "no audio reader: " + err.Error()
		hangup(d, &res)
		return res
	}
	e := newEar(o.threshold, props.Codec.PayloadTypeRecv(), o.record != "")
	go e.listen(reader, func() uint8 { return med.RTPPacketReader.PacketHeader.PayloadType })
	m := newMouth(med.RTPPacketWriter, props.Codec.PayloadType)
	callCtx, stop := context.WithCancel(ctx)
	go m.run(callCtx)

	res.Greeted, res.TurnsOK, res.Error = converse(callCtx, d.Context().Done(), o, res, e, m, out)
	stop() // as a handset does: no more RTP once it hangs up
	<-m.done
	hangup(d, &res)
	res.DurationS = round(time.Since(began).Seconds(), 2)
	res.Sent, res.Late, res.LateMaxMs = m.sent, m.late, ms(m.lateBy)
	if m.err != nil && res.Hangup != "remote" {
		res.Error = joinErr(res.Error, "RTP send: "+m.err.Error())
	}
	_ = med.Close() // ends the ear's read
	<-e.closed
	var pcm []byte
	res.Heard, res.HeardVoiced, res.Other, pcm, err = e.counts()
	if err != nil {
		res.Error = joinErr(res.Error, "RTP read: "+err.Error())
	}
	if o.record != "" {
		res.Wav, err = writeWav(o.record, i, pcm)
		if err != nil {
			res.Error = joinErr(res.Error, err.Error())
		}
	}
	return res
}

// converse waits for the agent to be ready, asks every question and times each answer.
// It returns whether the agent greeted, how many questions were answered, and why it stopped
// early if it did.
func converse(ctx context.Context, ended <-chan struct{}, o options, res callResult, e *ear, m *mouth, out *report) (bool, int, string) {
	greeted, err := awaitGreeting(ctx, o, e)
	if err != nil {
		return greeted, 0, err.Error()
	}
	answered := 0
	for t := 1; t <= o.turns; t++ {
		row := turnResult{Type: "turn", Call: res.Call, From: res.From, Turn: t}
		end, err := m.say(ctx, ended, o.questions[(t-1)%len(o.questions)])
		if err != nil {
			row.Error = err.Error()
			out.line(row)
			return greeted, answered, fmt.Sprintf("turn %d: %v", t, err)
		}
		row.SpeechEndNs = end.UnixNano()
		first, err := e.firstVoiceAfter(ctx, end, o.timeout)
		if err != nil {
			row.Error = "no answer: " + err.Error()
		} else {
			row.OK, row.FirstVoiceNs, row.V2VMs = true, first.UnixNano(), ms(first.Sub(end))
			answered++
		}
		// The next question waits for this reply to end (or for the agent to stay quiet).
		last, qerr := e.quiet(ctx, o.gap, o.timeout)
		if row.OK && last.After(first) {
			row.ReplyMs = ms(last.Sub(first))
		}
		if qerr != nil {
			row.Error = joinErr(row.Error, "after the reply: "+qerr.Error())
		}
		out.line(row)
		if ctx.Err() != nil || isClosed(ended) {
			return greeted, answered, fmt.Sprintf("turn %d: the call ended", t)
		}
	}
	return greeted, answered, ""
}

// awaitGreeting lets the agent say hello first, as a caller does: its greeting also says that
// every stage has the call. A greeting that does not come within -greeting is reported (the
// call's "greeted") and the caller speaks anyway, as a person would after a silent moment.
func awaitGreeting(ctx context.Context, o options, e *ear) (bool, error) {
	if o.greeting > 0 {
		if _, err := e.firstVoiceAfter(ctx, time.Time{}, o.greeting); err == nil {
			if _, err := e.quiet(ctx, o.gap, o.timeout); err != nil {
				return true, fmt.Errorf("greeting: %w", err)
			}
			return true, nil
		} else if ctx.Err() != nil || isClosed(e.closed) {
			return false, fmt.Errorf("greeting: %w", err)
		}
	}
	if !sleepCtx(ctx, o.lead) {
		return false, errors.New("stopped")
	}
	return false, nil
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// hangup sends BYE unless the far end has hung up already.
func hangup(d *diago.DialogClientSession, res *callResult) {
	if isClosed(d.Context().Done()) {
		res.Hangup = "remote"
		return
	}
	hctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.Hangup(hctx); err != nil {
		res.Error = joinErr(res.Error, "BYE: "+err.Error())
		return
	}
	res.Hangup = "bye"
}

func writeWav(folder string, call int, pcm []byte) (string, error) {
	path := filepath.Join(folder, fmt.Sprintf("call-%d.wav", call))
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	_, werr := audio.WavWriteVoipPCM(f, pcm)
	if err := errors.Join(werr, f.Close()); err != nil {
		return "", fmt.Errorf("recording %s: %w", path, err)
	}
	return path, nil
}
