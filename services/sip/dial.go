package main

// Outbound calls: a DialRequest on the bus (voicebus dial) makes the gateway call a number or a
// SIP URI; once the callee answers, the call is carried exactly as an inbound one (call.go,
// bridge), its PhoneSessionStart saying direction "outbound". Also the settings of the media
// path, read here beside main.go's config.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
	"github.com/nats-io/nats.go"
)

// phoneSettings: how the gateway rings, buffers the caller's audio and reaches numbers.
//
//	VOICEBUS_SIP_RING_MS    ring this long before answering (0, the default: answer at once)
//	VOICEBUS_SIP_JITTER_MS  the jitter buffer's depth (60; 40-160)
//	VOICEBUS_SIP_DIAL_TRUNK where numbers are called: sip:host[:port][;transport=tcp]
//	                        (unset: only sip: URIs can be dialled)
//	VOICEBUS_SIP_RTP_PORTS  the RTP port pool, LOW-HIGH (unset: any free port); one even
//	                        port per call (RTCP the odd one after it), so HIGH-LOW+1 >= 2*calls
//	VOICEBUS_SIP_MEDIA_TIMEOUT_MS a call whose phone sends no packet this long (not on hold) is
//	                        hung up (60000; 0: never): a phone gone without a BYE
//	VOICEBUS_SIP_TRANSFER_TO where the agent may transfer calls (its transfer tool): targets
//	                        separated by commas, each a number or sip: URI, a trailing *
//	                        allowing any that start so ("+1555*"); unset: no transfer at all.
//	                        The caller talks to the model, and the model picks the target: without
//	                        a list, anyone could have their call forwarded to a premium number.
type phoneSettings struct {
	ring         time.Duration
	jitter       time.Duration
	dialTrunk    *sip.Uri
	rtpLow       int
	rtpHigh      int
	transfers    []string
	mediaTimeout time.Duration
}

// mayTransferTo: target is on VOICEBUS_SIP_TRANSFER_TO.
func (p phoneSettings) mayTransferTo(target string) bool {
	for _, allowed := range p.transfers {
		if prefix, wild := strings.CutSuffix(allowed, "*"); wild && strings.HasPrefix(target, prefix) ||
			!wild && target == allowed {
			return true
		}
	}
	return false
}

func (p phoneSettings) jitterDepth() time.Duration {
	if p.jitter == 0 {
		return defaultJitterMs * time.Millisecond
	}
	return p.jitter
}

func phoneSettingsFromEnv(getenv func(string) string) (phoneSettings, error) {
	var p phoneSettings
	ring, err := millis(getenv, "VOICEBUS_SIP_RING_MS", 0, 0, 120_000)
	if err != nil {
		return p, err
	}
	jitter, err := millis(getenv, "VOICEBUS_SIP_JITTER_MS", defaultJitterMs, minJitterMs, maxJitterMs)
	if err != nil {
		return p, err
	}
	media, err := millis(getenv, "VOICEBUS_SIP_MEDIA_TIMEOUT_MS", 60_000, 0, 3_600_000)
	if err != nil {
		return p, err
	}
	p.ring, p.jitter, p.mediaTimeout = ring, jitter, media
	if text := strings.TrimSpace(getenv("VOICEBUS_SIP_DIAL_TRUNK")); text != "" {
		var uri sip.Uri
		if err := sip.ParseUri(text, &uri); err != nil || uri.Host == "" || uri.User != "" {
			return p, fmt.Errorf("VOICEBUS_SIP_DIAL_TRUNK %q: want sip:host[:port][;transport=…]", text)
		}
		p.dialTrunk = &uri
	}
	if text := strings.TrimSpace(getenv("VOICEBUS_SIP_RTP_PORTS")); text != "" {
		low, high, ok := strings.Cut(text, "-")
		lo, err1 := strconv.Atoi(strings.TrimSpace(low))
		hi, err2 := strconv.Atoi(strings.TrimSpace(high))
		if !ok || err1 != nil || err2 != nil || lo < 1024 || hi > 65535 || hi-lo < 1 || lo%2 != 0 {
			return p, fmt.Errorf("VOICEBUS_SIP_RTP_PORTS %q: want LOW-HIGH, LOW even, "+
				"1024 <= LOW < HIGH <= 65535", text)
		}
		p.rtpLow, p.rtpHigh = lo, hi
	}
	for _, target := range strings.Split(getenv("VOICEBUS_SIP_TRANSFER_TO"), ",") {
		if target = strings.TrimSpace(target); target == "" {
			continue
		}
		if !targetPattern.MatchString(strings.TrimSuffix(target, "*")) && target != "*" {
			return p, fmt.Errorf("VOICEBUS_SIP_TRANSFER_TO %q: each target a number or sip: URI, "+
				"or its start followed by *", target)
		}
		p.transfers = append(p.transfers, target)
	}
	return p, nil
}

func millis(getenv func(string) string, name string, def, lo, hi int) (time.Duration, error) {
	text := strings.TrimSpace(getenv(name))
	if text == "" {
		return time.Duration(def) * time.Millisecond, nil
	}
	ms, err := strconv.Atoi(text)
	if err != nil || ms < lo || ms > hi {
		return 0, fmt.Errorf("%s %q: want milliseconds from %d to %d", name, text, lo, hi)
	}
	return time.Duration(ms) * time.Millisecond, nil
}

// startDialer takes dial requests (one replica of the queue group answers each).
func startDialer(g *gateway, dg *diago.Diago) error {
	g.dg = dg
	if _, err := g.nc.QueueSubscribe(subjectDial, queueDial, func(m *nats.Msg) { go g.dial(m) }); err != nil {
		return fmt.Errorf("subscribe %s: %w", subjectDial, err)
	}
	g.log.Info("dial requests taken", "subject", subjectDial, "ring_ms", g.phone.ring.Milliseconds(),
		"jitter_ms", g.phone.jitter.Milliseconds(), "rtp_ports", fmt.Sprintf("%d-%d", g.phone.rtpLow, g.phone.rtpHigh))
	return nil
}

// dial places the call a request asks for and answers the request: with the session once the
// callee picked up (the call then goes on here until it ends), or with why not.
func (g *gateway) dial(m *nats.Msg) {
	g.calls.Add(1)
	defer g.calls.Done()
	defer func() {
		if r := recover(); r != nil {
			g.log.Error("dial handler panicked", "panic", r)
		}
	}()
	req, target, refusal := g.dialRequest(m.Data)
	if refusal != nil { // no call was tried: counted as a problem, not as a call
		count("dial_" + refusal.Error)
		g.reply(m, refusal)
		return
	}
	c := g.newCall(directionOutbound)
	c.log = g.log.With("session", c.session, "callee", req.Target)
	// The dial's outcome, decided once: given up (the ring timeout, the gateway stopping) while
	// the CANCEL still waits for the callee's 487, which may take 32 s or never come; or the
	// INVITE's own end. The operator hears the first.
	var outcome atomic.Pointer[DialReply]
	refuse := func(refusal *DialReply) {
		if outcome.CompareAndSwap(nil, refusal) {
			g.refuseDial(m, refusal)
		}
	}
	d, med, err := g.invite(g.ctx, time.Duration(req.AnswerTimeoutMs)*time.Millisecond, c, target,
		req.CallerID, refuse)
	if err != nil {
		refusal := dialFailure(err, g.ctx.Err() != nil)
		c.log.Info("call not answered", "error", refusal.Error, "status", refusal.Status, "why", err)
		refuse(refusal) // unless it was refused already, as it was given up
		return
	}
	defer func() { _ = d.Close() }()
	if !outcome.CompareAndSwap(nil, &DialReply{Session: c.session}) {
		g.hangUpAnswered(d, false, true) // picked up just as the dial was given up, and the operator told so
		return
	}
	c.signalIP = hostIP(d.InviteResponse.Source())
	// Logged once here rather than on every line: c.log is read by diago's goroutines from now.
	c.log.Info("callee picked up", "call_id", d.InviteRequest.CallID().Value())
	callsTotal.WithLabelValues(directionOutbound, "answered").Inc()
	start := NewPhoneSessionStart()
	start.Caller, start.Greeting = req.Target, req.Greeting
	start.Agent, start.Instructions = req.Agent, req.Instructions
	err = c.bridge(d, med, start, func() { g.reply(m, &DialReply{Session: c.session}) })
	if err != nil { // answered, but no session: hang up, and say why
		g.refuseDial(m, &DialReply{Error: "failed", Reason: err.Error()})
		hctx, hcancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = d.Hangup(hctx)
		hcancel()
	}
}

// invite calls target and waits up to ring for the answer, or until parent ends (the gateway
// stopping). A callee that is ringing by then gets a CANCEL; one that never responded at all is
// given up on at once (sipgo would wait out the INVITE's Timer B, 32 s, since a CANCEL may only
// follow a response).
//
// givenUp hears of the give-up as the CANCEL goes: the dial's answer is known then, while the
// INVITE lives on until the callee's 487 (or an answer that crossed the CANCEL, hung up here).
func (g *gateway) invite(parent context.Context, ring time.Duration, c *call, target sip.Uri,
	callerID string, givenUp func(*DialReply)) (*diago.DialogClientSession, *diago.DialogMedia, error) {
	if !readyFlag.Load() {
		return nil, nil, errNotReady
	}
	d, err := g.dg.NewDialog(target, diago.NewDialogOptions{})
	if err != nil {
		return nil, nil, err
	}
	var heard atomic.Bool
	opts := diago.InviteClientOptions{OnMediaUpdate: c.mediaUpdated,
		OnResponse: func(*sip.Response) error { heard.Store(true); return nil }}
	if callerID != "" {
		opts.WithCaller("", callerID, g.fromHost())
	}
	// Not a child of parent: a child would be cancelled with parent's cause, and an INVITE that
	// nothing answered would then live on while the gateway stops, until the closing transport
	// broke a retransmission (0.5, 1, 2, 4, 8… s apart; the gateway waits 5 s for its calls),
	// and the operator would hear of a closed connection, if at all. Parent's end is passed on below,
	// with the cause that lets such an INVITE go at once.
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(parent))
	defer cancel(nil)
	giveUp := func(rungOut error, refusal *DialReply) func() {
		return func() {
			if heard.Load() {
				cancel(rungOut) // a CANCEL goes to the ringing callee
				givenUp(refusal)
			} else {
				cancel(sipgo.WaitAnswerForceCancelErr)
			}
		}
	}
	rang := time.AfterFunc(ring, giveUp(context.DeadlineExceeded,
		dialFailure(context.DeadlineExceeded, false)))
	stopping := context.AfterFunc(parent, giveUp(context.Canceled,
		&DialReply{Error: "failed", Reason: "the gateway is stopping"}))
	med, err := d.Invite(ctx, opts)
	rang.Stop()
	stopping()
	if err == nil {
		err = d.Ack(ctx)
	}
	if err != nil {
		g.hangUpAnswered(d, true, ctx.Err() != nil)
		if ctx.Err() != nil && (d.InviteResponse == nil || !d.InviteResponse.IsSuccess()) {
			// Given up with no answer in hand: one may come yet, when no transaction is left
			// to take it (a callee that answered our CANCEL 481 after its 200).
			g.strays.expect(d.InviteRequest, d.DialogClientSession.UA)
		}
		_ = d.Close()
		if parent.Err() != nil {
			return nil, nil, fmt.Errorf("the gateway is stopping: %w", err)
		}
		switch cause := context.Cause(ctx); {
		case cause == sipgo.WaitAnswerForceCancelErr && !heard.Load():
			err = errNoResponse
		case cause == sipgo.WaitAnswerForceCancelErr, cause == context.DeadlineExceeded:
			// (A first response that came just as the time was up: counted as rung out, though
			// no CANCEL went; that callee stops ringing on its own.)
			err = errors.Join(context.DeadlineExceeded, err)
		}
		return nil, nil, err
	}
	return d, med, nil
}

// hangUpAnswered ends a call the callee answered (2xx) but the dial does not take up: given up
// (the ring timeout, the gateway stopping) as the answer came, or an answer diago could not
// take (no SDP in it, no codec in common), or an ACK that failed. The callee is off the hook,
// sending its 200 again until it is ACKed: with ack it gets its ACK (RFC 3261 13.2.2.4), then a
// BYE. Counted as the problem dial_answered_as_cancelled or dial_answer_refused. Most often
// the 200 crossed our CANCEL: sipgo then keeps it as the INVITE's response and fails the
// INVITE. A callee that answers the CANCEL 481 after its 200 (its INVITE transaction gone, as
// RFC 3261 without RFC 6026 allows) makes sipgo fail the INVITE on the 481 without reading the
// 200: its resent 200s are caught by stray.go.
func (g *gateway) hangUpAnswered(d *diago.DialogClientSession, ack, givenUp bool) {
	res := d.InviteResponse
	if res == nil || !res.IsSuccess() {
		return
	}
	kind, why := "dial_answer_refused", "its answer could not be taken up"
	if givenUp {
		kind, why = "dial_answered_as_cancelled", "it answered as its dial was given up"
	}
	count(kind)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// sipgo's own Ack and Bye: diago's would start the media of a call nobody will have.
	var err error
	if ack {
		err = d.DialogClientSession.Ack(ctx)
	}
	if err == nil {
		err = d.DialogClientSession.Bye(ctx)
	}
	to := d.InviteRequest.Recipient.String()
	if err != nil {
		g.log.Warn("cannot hang up a callee: "+why, "to", to, "error", err)
		return
	}
	g.log.Info("hung up a callee: "+why, "to", to)
}

var (
	errNotReady   = errors.New("the gateway is not ready (starting, stopping, or the bus is away)")
	errNoResponse = errors.New("no response from the callee before answer_timeout_ms")
)

// fromHost: the host of the From the callee sees, ours as the world reaches it.
func (g *gateway) fromHost() string {
	if g.cfg.external != "" {
		return g.cfg.external
	}
	host, _, err := net.SplitHostPort(g.cfg.listen)
	if err != nil {
		return g.cfg.listen
	}
	return host
}

// A From user the callee sees (proto/events.py CallerId): nothing that could break a header.
var callerIDPattern = regexp.MustCompile(`^[A-Za-z0-9+*#._-]{0,64}$`)

// A number (proto/events.py DIAL_TARGET_PATTERN's first half).
var numberPattern = regexp.MustCompile(`^\+?[0-9*#]{1,32}$`)

// dialRequest decodes and checks a request: the SIP URI to call, or the refusal to reply.
func (g *gateway) dialRequest(data []byte) (*DialRequest, sip.Uri, *DialReply) {
	bad := func(why string) (*DialRequest, sip.Uri, *DialReply) {
		return nil, sip.Uri{}, &DialReply{Error: "bad_request", Reason: why}
	}
	e, err := Decode(data)
	req, ok := e.(*DialRequest)
	if err != nil || !ok {
		return bad(fmt.Sprintf("not a dial request: %v", err))
	}
	if !callerIDPattern.MatchString(req.CallerID) {
		return bad("caller_id: a number or a SIP user, up to 64 characters")
	}
	if req.AnswerTimeoutMs < 1000 || req.AnswerTimeoutMs > 120_000 {
		return bad("answer_timeout_ms: from 1000 to 120000")
	}
	target, why := g.dialTarget(req.Target)
	if why != "" {
		return bad(why)
	}
	return req, target, nil
}

// dialTarget: a sip:/sips: URI as it is, a number through VOICEBUS_SIP_DIAL_TRUNK.
func (g *gateway) dialTarget(text string) (sip.Uri, string) {
	var uri sip.Uri
	if numberPattern.MatchString(text) {
		if g.phone.dialTrunk == nil {
			return uri, "a number needs VOICEBUS_SIP_DIAL_TRUNK on the gateway; a sip: URI does not"
		}
		uri = *g.phone.dialTrunk.Clone()
		uri.User = text
		return uri, ""
	}
	if !strings.HasPrefix(text, "sip:") && !strings.HasPrefix(text, "sips:") {
		return uri, "target: a number or a sip: URI"
	}
	if err := sip.ParseUri(text, &uri); err != nil || uri.Host == "" || strings.ContainsAny(text, " \t\r\n<>\"") {
		return uri, "target: not a SIP URI one can call"
	}
	return uri, ""
}

// dialFailure names why an INVITE failed, for the reply and the counters.
func dialFailure(err error, stopping bool) *DialReply {
	var res *sip.Response
	var ptr *sipgo.ErrDialogResponse
	var val sipgo.ErrDialogResponse
	switch {
	case errors.As(err, &ptr):
		res = ptr.Res
	case errors.As(err, &val):
		res = val.Res
	}
	switch {
	case res != nil:
		return &DialReply{Error: refusalOf(res.StatusCode), Status: int64(res.StatusCode),
			Reason: fmt.Sprintf("%d %s", res.StatusCode, res.Reason)}
	case stopping || errors.Is(err, errNotReady):
		return &DialReply{Error: "failed", Reason: err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &DialReply{Error: "no_answer", Reason: "no answer before answer_timeout_ms"}
	case errors.Is(err, errNoResponse) || unreachable(err):
		return &DialReply{Error: "unreachable", Reason: err.Error()}
	}
	return &DialReply{Error: "failed", Reason: err.Error()}
}

// refusalOf maps a callee's final status to the reply's error.
func refusalOf(status int) string {
	switch status {
	case sip.StatusBusyHere, 600: // 600 Busy Everywhere
		return "busy"
	case 603: // Decline
		return "declined"
	case sip.StatusRequestTimeout, sip.StatusTemporarilyUnavailable, sip.StatusRequestTerminated:
		return "no_answer"
	}
	return "refused"
}

// unreachable: no final answer came at all (sipgo ends the INVITE with its transaction timer,
// wrapping a plain "transaction terminated" error when the transaction had none of its own), or
// the transport failed.
func unreachable(err error) bool {
	var netErr net.Error
	return errors.Is(err, sip.ErrTransactionTimeout) || errors.Is(err, sip.ErrTransactionTransport) ||
		errors.Is(err, sip.ErrTransactionTerminated) || errors.As(err, &netErr) ||
		strings.Contains(err.Error(), "transaction terminated")
}

// refuseDial answers a request that made no call, and counts it (calls by outcome; the
// problems by kind dial_<error>).
func (g *gateway) refuseDial(m *nats.Msg, refusal *DialReply) {
	count("dial_" + refusal.Error)
	callsTotal.WithLabelValues(directionOutbound, refusal.Error).Inc()
	g.reply(m, refusal)
}

func (g *gateway) reply(m *nats.Msg, r *DialReply) {
	data, err := Encode(r)
	if err == nil {
		err = m.Respond(data)
	}
	if err != nil {
		g.log.Warn("cannot answer a dial request", "error", err)
	}
}
