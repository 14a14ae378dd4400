package main

// The agent's phone actions (docs/telephony.md, "The agent's keys and transfers"): the LLM
// stage's built-in tools send_dtmf and transfer become a PhoneAction, a NATS request on
// voice.<session>.llm.phone, which the gateway holding the call carries out and answers with a
// PhoneActionDone. Keys go to the other party as RFC 4733 telephone-events; a transfer is a
// blind SIP REFER, confirmed by the other party's NOTIFY, after which the gateway hangs up and
// ends the session as "transferred".

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/emiago/diago"
	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
	"github.com/nats-io/nats.go"
)

const (
	// How long a transfer may wait for the REFER's answer and the final NOTIFY. A PhoneAction
	// carries no deadline; the transfer tool waits 30 s (services/llm/tools.py), so the gateway's
	// answer comes before the requester gives up.
	transferWait = 25 * time.Second
	// Silence between two keys, beyond the 40 ms after each key's 100 ms tone that diago's
	// packets leave: receivers that play tones from the events need a clear gap (ITU-T Q.24).
	keyGap = 60 * time.Millisecond
	// Actions waiting behind the one in progress, per call; more are answered "busy".
	actionBacklog = 4
	// A SessionEnd reason, and what the hangup channel carries once a transfer went through.
	reasonTransferred = "transferred"
)

// The contract's checks (proto/events.py PhoneAction), so that nothing the stages would refuse
// is acted on here.
var (
	digitsPattern = regexp.MustCompile(`^[0-9*#A-D]{1,32}$`)
	targetPattern = regexp.MustCompile(`^(\+?[0-9*#]{1,32}|sips?:[^\s<>"]{1,250})$`)
)

// keyWriter sends one key as RFC 4733 packets (diago's DTMFWriter).
type keyWriter interface{ WriteDTMF(key rune) error }

// rtpClock is the RTP timestamp of the call's outgoing stream (diago's RTPPacketWriter).
type rtpClock interface{ DelayTimestamp(samples uint32) }

// referFunc sends a REFER to the other party and reports each NOTIFY's sipfrag status.
type referFunc func(ctx context.Context, to sip.Uri, onNotify func(status int)) error

// phoneActions carries out one call's actions, one at a time, in the order they came.
type phoneActions struct {
	c      *call
	keypad func() (keyWriter, error) // the call's key sender, or why it has none
	clock  func() rtpClock
	refer  referFunc // nil: this dialog cannot be transferred
	end    func()    // the transfer went through: hang up, end the session as transferred
	queue  chan actionJob
	mu     sync.Mutex                           // guards closed against a last take
	closed bool                                 // the call ended: take answers at once
	wait   time.Duration                        // transferWait (shorter in tests)
	reply  func(m *nats.Msg, data []byte) error // m.Respond (a recorder in tests)
}

type actionJob struct {
	msg    *nats.Msg
	action *PhoneAction
}

func (c *call) newPhoneActions(d dialog, med *diago.DialogMedia, hangup chan string) *phoneActions {
	a := &phoneActions{c: c, refer: referOf(d), queue: make(chan actionJob, actionBacklog),
		end: func() { c.endTransferred(hangup) }, wait: transferWait,
		reply: func(m *nats.Msg, data []byte) error { return m.Respond(data) }}
	if med != nil {
		a.keypad = func() (keyWriter, error) {
			w, err := med.AudioWriterDTMF()
			if err != nil {
				return nil, err
			}
			return w, nil
		}
		a.clock = func() rtpClock { return med.RTPPacketWriter }
	}
	return a
}

// referOf: diago's REFER for an inbound call (its server session) or an outbound one (its
// client session), with the NOTIFYs reported to us rather than diago hanging up by itself.
func referOf(d dialog) referFunc {
	switch d := d.(type) {
	case *diago.DialogServerSession:
		return func(ctx context.Context, to sip.Uri, onNotify func(int)) error {
			return d.ReferOptions(ctx, to, diago.ReferServerOptions{OnNotify: onNotify})
		}
	case *diago.DialogClientSession:
		return func(ctx context.Context, to sip.Uri, onNotify func(int)) error {
			return d.ReferOptions(ctx, to, diago.ReferClientOptions{OnNotify: onNotify})
		}
	}
	return nil
}

// take is the subscription's callback: it never blocks. A bad action is counted and answered
// at once; a good one waits its turn.
func (a *phoneActions) take(m *nats.Msg) {
	action, why := a.c.parseAction(m.Data)
	if action == nil {
		count("bad_phone_action")
		a.c.warn("bad phone action on the bus", "why", why)
		a.answer(m, "", why)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed { // between the call's end and the end of its subscription
		a.answer(m, action.CallID, "the call has ended")
		return
	}
	select {
	case a.queue <- actionJob{msg: m, action: action}:
	default:
		phoneActionsTotal.WithLabelValues(action.Action, "busy").Inc()
		a.answer(m, action.CallID, "busy: this call is still doing what the agent asked before")
	}
}

// run carries out the actions until the call ends; those still waiting then are answered so.
func (a *phoneActions) run(ctx context.Context) {
	for {
		select {
		case job := <-a.queue:
			a.do(ctx, job)
		case <-ctx.Done():
			a.mu.Lock()
			defer a.mu.Unlock()
			a.closed = true
			for {
				select {
				case job := <-a.queue:
					a.answer(job.msg, job.action.CallID, "the call has ended")
				default:
					return
				}
			}
		}
	}
}

func (a *phoneActions) do(ctx context.Context, job actionJob) {
	act := job.action
	var outcome, why string
	switch {
	case ctx.Err() != nil:
		outcome, why = "ended", "the call has ended"
	case act.Action == "dtmf":
		outcome, why = a.sendKeys(ctx, act.Digits)
	default:
		outcome, why = a.transfer(ctx, act.Target)
	}
	phoneActionsTotal.WithLabelValues(act.Action, outcome).Inc()
	a.c.log.Info("phone action", "action", act.Action, "outcome", outcome, "turn", act.Turn,
		"digits", act.Digits, "target", act.Target, "error", why)
	a.answer(job.msg, act.CallID, why)
	if outcome == "transferred" {
		a.end() // after the answer: the tool's result is in the history before the session ends
	}
}

// parseAction decodes and checks a PhoneAction for this call: the action, or why it is refused.
func (c *call) parseAction(data []byte) (*PhoneAction, string) {
	e, err := Decode(data)
	if err != nil {
		return nil, fmt.Sprintf("not a phone action: %v", err)
	}
	act, ok := e.(*PhoneAction)
	switch {
	case !ok:
		return nil, fmt.Sprintf("not a phone action: %s", e.Kind())
	case act.Session != c.session:
		return nil, "a phone action for another session"
	case act.Turn < 0 || act.CallID == "" || utf8.RuneCountInString(act.CallID) > 128:
		return nil, "a phone action needs a turn and a call_id of at most 128 characters"
	case act.Action == "dtmf" && !digitsPattern.MatchString(act.Digits):
		return nil, "dtmf: digits are 1 to 32 of 0-9 * # A-D"
	case act.Action == "transfer" && !targetPattern.MatchString(act.Target):
		return nil, "transfer: the target is a number or a sip: URI"
	case act.Action != "dtmf" && act.Action != "transfer":
		return nil, fmt.Sprintf("no such phone action %q", act.Action)
	}
	return act, ""
}

// answer replies to the request (nothing when it was published without a reply subject).
func (a *phoneActions) answer(m *nats.Msg, callID, why string) {
	if m.Reply == "" {
		return
	}
	data, err := Encode(&PhoneActionDone{Base: a.c.base(&a.c.seqSip), CallID: callID, Error: why})
	if err == nil {
		err = a.reply(m, data)
	}
	if err != nil {
		a.c.warn("cannot answer a phone action", "error", err)
	}
}

// sendKeys sends digits one after another. The agent's frames that come meanwhile are dropped
// (play): a frame written between a key's packets would put audio inside the event, and one
// queued behind the keys would delay the rest of the agent's reply and its barge-in.
func (a *phoneActions) sendKeys(ctx context.Context, digits string) (outcome, why string) {
	if a.c.held.Load() {
		return "on_hold", "the call is on hold: no keys can be sent now"
	}
	if a.keypad == nil {
		return "no_keys", "the phone takes no keys"
	}
	keys, err := a.keypad()
	if err != nil { // diago: telephone-event/8000 was not negotiated
		return "no_keys", "the phone takes no keys (it offered no telephone-event)"
	}
	a.c.keys.Lock()
	defer a.c.keys.Unlock()
	for i, key := range digits {
		began := time.Now()
		if err := keys.WriteDTMF(key); err != nil {
			return "failed", fmt.Sprintf("key %c (after %d of %d) could not be sent: %v", key, i, len(digits), err)
		}
		if i < len(digits)-1 {
			select {
			case <-ctx.Done():
				return "ended", fmt.Sprintf("the call ended after %d of %d keys", i+1, len(digits))
			case <-time.After(keyGap):
			}
		}
		// diago keeps one RTP timestamp for the whole event (RFC 4733) and leaves the clock
		// there: move it past the key, so that the next key is a new event (two equal keys
		// would otherwise be one) and the agent's next frame comes after it in time.
		a.clock().DelayTimestamp(samplesIn(time.Since(began)))
	}
	return "sent", ""
}

// samplesIn: the 8 kHz samples of d, in whole 20 ms frames (rounded up), as the audio counts.
func samplesIn(d time.Duration) uint32 {
	frames := (d + frameMs*time.Millisecond - 1) / (frameMs * time.Millisecond)
	return uint32(frames) * sampleRate * frameMs / 1000
}

// transfer refers the other party to target and waits for the outcome the other party reports
// (the final status in a NOTIFY's sipfrag). A refused REFER, a failing status or no word in time
// keeps the call.
func (a *phoneActions) transfer(parent context.Context, target string) (outcome, why string) {
	if !a.c.g.phone.mayTransferTo(target) {
		return "not_allowed", fmt.Sprintf("transfers to %s are not allowed here (VOICEBUS_SIP_TRANSFER_TO)", target)
	}
	to, bad := a.c.g.dialTarget(target)
	if bad != "" {
		return "bad_target", bad
	}
	if a.refer == nil {
		return "failed", "this call cannot be transferred"
	}
	ctx, cancel := context.WithTimeout(parent, a.wait)
	defer cancel()
	final := make(chan int, 1)
	var gaveUp atomic.Bool
	// However this wait ends, a NOTIFY after it goes to lateNotify (a success still ends the
	// call as transferred), never into a channel nobody reads.
	defer gaveUp.Store(true)
	onNotify := func(status int) { // diago's NOTIFY handler: never block it
		if status >= 100 && status < 200 {
			return // still trying
		}
		if gaveUp.Load() {
			a.lateNotify(status)
			return
		}
		select {
		case final <- status:
		default:
		}
	}
	if err := a.refer(ctx, to, onNotify); err != nil {
		res := responseOf(err)
		switch {
		case res == nil && ctx.Err() != nil:
			return a.noWord(parent, fmt.Sprintf("the phone did not answer the transfer (REFER) "+
				"within %s: the call goes on", a.wait))
		case res == nil:
			return "failed", fmt.Sprintf("the transfer could not be asked for: %v", err)
		case !res.IsSuccess():
			return "refused", fmt.Sprintf("the phone refused the transfer: %d %s", res.StatusCode, res.Reason)
		}
		// A 200 rather than RFC 3515's 202: accepted all the same.
	}
	select {
	case status := <-final:
		return transferOutcome(status, target)
	case <-ctx.Done():
	}
	gaveUp.Store(true)
	select { // a NOTIFY that came as the wait ended
	case status := <-final:
		return transferOutcome(status, target)
	default:
	}
	return a.noWord(parent, fmt.Sprintf("no word on the transfer within %s: the call goes on", a.wait))
}

// noWord: the transfer's outcome is unknown, because the call ended or the time ran out.
func (a *phoneActions) noWord(parent context.Context, why string) (string, string) {
	if parent.Err() != nil {
		return "ended", "the call ended before the transfer was confirmed"
	}
	return "no_answer", why
}

// transferOutcome reads the final sipfrag status: what target answered the other party.
func transferOutcome(status int, target string) (string, string) {
	switch {
	case status >= 200 && status < 300:
		return "transferred", ""
	case status == 0:
		return "failed", "the transfer's outcome was unreadable (a NOTIFY without a status)"
	}
	return "failed", fmt.Sprintf("the transfer did not go through: %s answered %d; the call goes on", target, status)
}

// lateNotify: the other party confirmed a transfer after the answer had said there was no
// word. The caller is with the target now: end the call here as transferred.
func (a *phoneActions) lateNotify(status int) {
	if status < 200 || status >= 300 {
		return
	}
	phoneActionsTotal.WithLabelValues("transfer", "transferred_late").Inc()
	a.c.log.Info("transfer confirmed after its answer", "status", status)
	a.end()
}

// endTransferred ends the call once it was transferred: ctl.end and BYE (awaitEnd), once.
func (c *call) endTransferred(hangup chan string) {
	if c.transferred.Swap(true) {
		return
	}
	select {
	case hangup <- reasonTransferred:
	default: // the call is ending already; awaitEnd reads c.transferred for the reason
	}
}

// responseOf is the final response inside a sipgo dialog error (nil: no response came).
func responseOf(err error) *sip.Response {
	var ptr *sipgo.ErrDialogResponse
	var val sipgo.ErrDialogResponse
	switch {
	case errors.As(err, &ptr):
		return ptr.Res
	case errors.As(err, &val):
		return val.Res
	}
	return nil
}
