package main

// A callee's answer to a dial the gateway gave up on, arriving when no transaction is left to
// take it. A callee whose 200 OK crossed our CANCEL may answer that CANCEL 481 (its INVITE
// transaction already gone, as RFC 3261 allows without RFC 6026): sipgo then ends the INVITE on
// the 481 without reading the 200, and the callee, off the hook, sends its 200 again and again
// (RFC 3261 13.3.1.4: T1, 2*T1, … for 64*T1) until an ACK comes or it gives up and hangs up
// itself. Those resent 200s reach sipgo's handler of responses no transaction matches; the
// dials given up are remembered by Call-ID for as long, and each resent 200 of one gets its ACK
// (RFC 3261 13.2.2.4), the first a BYE as well.

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
)

// strayAnswers: the dials given up without an answer in hand, by Call-ID.
type strayAnswers struct {
	log   *slog.Logger
	mu    sync.Mutex
	dials map[string]*strayDial
	// How long a given-up dial is remembered: as long as a callee resends its 200.
	keep time.Duration
}

type strayDial struct {
	invite *sip.Request
	ua     *sipgo.DialogUA // the client the INVITE went out with: the same transport and Via
	// The calls hung up, by the callee's To tag: a forking proxy may bring answers from
	// several phones, each a dialog of its own that needs its own ACK and BYE.
	hungUp map[string]bool
}

func newStrayAnswers(log *slog.Logger) *strayAnswers {
	return &strayAnswers{log: log, dials: map[string]*strayDial{}, keep: 64 * sip.T1}
}

// expect remembers a dial given up with no answer in hand: an answer may still come.
func (s *strayAnswers) expect(invite *sip.Request, ua *sipgo.DialogUA) {
	callID := invite.CallID()
	if callID == nil || ua == nil || ua.Client == nil {
		return
	}
	id := callID.Value()
	s.mu.Lock()
	s.dials[id] = &strayDial{invite: invite, ua: ua, hungUp: map[string]bool{}}
	s.mu.Unlock()
	time.AfterFunc(s.keep, func() {
		s.mu.Lock()
		delete(s.dials, id)
		s.mu.Unlock()
	})
}

// handle takes every response no transaction matches (sipgo's unhandled-response handler, each
// in a goroutine of its own): a 2xx to one of the given-up INVITEs is ACKed, and the call it
// opened hung up once its ACK is out. Anything else is a retransmission nobody needs.
func (s *strayAnswers) handle(res *sip.Response) {
	cseq, callID, to := res.CSeq(), res.CallID(), res.To()
	if !res.IsSuccess() || cseq == nil || cseq.MethodName != sip.INVITE || callID == nil ||
		to == nil {
		return
	}
	s.mu.Lock()
	dial := s.dials[callID.Value()]
	s.mu.Unlock()
	if dial == nil {
		return
	}
	tag, _ := to.Params.Get("tag")
	target := dial.invite.Recipient.String()
	if err := dial.ua.Client.WriteRequest(inDialog(sip.ACK, dial.invite, res, cseq.SeqNo)); err != nil {
		// Not marked hung up: the callee's next resend is ACKed again, and then hung up.
		s.log.Warn("cannot ACK a callee that answered its given-up dial", "to", target,
			"error", err)
		return
	}
	s.mu.Lock()
	first := !dial.hungUp[tag]
	dial.hungUp[tag] = true
	s.mu.Unlock()
	if !first {
		return
	}
	count("dial_answered_as_cancelled")
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		bye := inDialog(sip.BYE, dial.invite, res, cseq.SeqNo+1)
		reply, err := dial.ua.Client.Do(ctx, bye)
		if err == nil && !reply.IsSuccess() {
			err = fmt.Errorf("its BYE was answered %d %s", reply.StatusCode, reply.Reason)
		}
		if err != nil {
			s.log.Warn("cannot hang up a callee: it answered as its dial was given up",
				"to", target, "error", err)
			return
		}
		s.log.Info("hung up a callee: it answered as its dial was given up", "to", target,
			"after", "its INVITE had ended")
	}()
}

// inDialog builds the ACK or BYE of the dialog the 2xx res to invite opened (RFC 3261
// 12.2.1.1): to the callee's Contact, through the 2xx's Record-Route in reverse, with the
// INVITE's From, the 2xx's To (its tag) and Call-ID. The client adds the Via.
func inDialog(method sip.RequestMethod, invite *sip.Request, res *sip.Response,
	seq uint32) *sip.Request {
	target := invite.Recipient
	if contact := res.Contact(); contact != nil {
		target = contact.Address
	}
	records := res.GetHeaders("Record-Route")
	routes := make([]string, 0, len(records)+1)
	for i := len(records) - 1; i >= 0; i-- {
		routes = append(routes, records[i].Value())
	}
	uri := target.Clone()
	if len(routes) > 0 && !strings.Contains(routes[0], ";lr") {
		// A strict router first (RFC 3261 12.2.1.1): it is the Request-URI, the callee's
		// Contact the last route.
		var first sip.Uri
		if err := sip.ParseUri(strings.Trim(routes[0], "<>"), &first); err == nil {
			uri = &first
			routes = append(routes[1:], "<"+target.String()+">")
		}
	}
	req := sip.NewRequest(method, *uri)
	req.SipVersion = invite.SipVersion
	for _, route := range routes {
		req.AppendHeader(sip.NewHeader("Route", route))
	}
	maxForwards := sip.MaxForwardsHeader(70)
	req.AppendHeader(&maxForwards)
	req.AppendHeader(sip.HeaderClone(invite.From()))
	req.AppendHeader(sip.HeaderClone(res.To()))
	req.AppendHeader(sip.HeaderClone(invite.CallID()))
	req.AppendHeader(&sip.CSeqHeader{SeqNo: seq, MethodName: method})
	if contact := invite.Contact(); contact != nil {
		req.AppendHeader(sip.HeaderClone(contact))
	}
	req.SetTransport(invite.Transport())
	return req
}
