package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
	"github.com/emiago/sipgo/siptest"
)

func strayInvite() (*sip.Request, *sip.Response) {
	invite := sip.NewRequest(sip.INVITE, sip.Uri{User: "callee", Host: "phones.example.com"})
	from := &sip.FromHeader{Address: sip.Uri{User: "agent", Host: "gw.example.com"}}
	from.Params.Add("tag", "gw1")
	to := &sip.ToHeader{Address: sip.Uri{User: "callee", Host: "phones.example.com"}}
	callID := sip.CallIDHeader("dial-1")
	invite.AppendHeader(from)
	invite.AppendHeader(to)
	invite.AppendHeader(&callID)
	invite.AppendHeader(&sip.CSeqHeader{SeqNo: 7, MethodName: sip.INVITE})
	invite.AppendHeader(&sip.ContactHeader{Address: sip.Uri{User: "agent", Host: "10.0.0.1", Port: 5060}})
	res := sip.NewResponseFromRequest(invite, 200, "OK", nil)
	res.To().Params.Add("tag", "callee9")
	res.AppendHeader(&sip.ContactHeader{Address: sip.Uri{User: "callee", Host: "10.0.0.9", Port: 5062}})
	res.AppendHeader(sip.NewHeader("Record-Route", "<sip:proxy1.example.com;lr>"))
	res.AppendHeader(sip.NewHeader("Record-Route", "<sip:proxy2.example.com;lr>"))
	return invite, res
}

// The ACK and BYE of a dialog the gateway never took up go where an in-dialog request goes
// (RFC 3261 12.2.1.1): to the callee's Contact, through its Record-Route reversed, with its tag.
func TestInDialogRequestsFollowTheAnswersDialog(t *testing.T) {
	invite, res := strayInvite()
	for _, c := range []struct {
		method sip.RequestMethod
		seq    uint32
	}{{sip.ACK, 7}, {sip.BYE, 8}} {
		req := inDialog(c.method, invite, res, c.seq)
		if req.Method != c.method || req.Recipient.Host != "10.0.0.9" || req.Recipient.Port != 5062 {
			t.Fatalf("%s goes to %s", c.method, req.Recipient.String())
		}
		routes := req.GetHeaders("Route")
		if len(routes) != 2 || routes[0].Value() != "<sip:proxy2.example.com;lr>" ||
			routes[1].Value() != "<sip:proxy1.example.com;lr>" {
			t.Fatalf("%s routes: %v", c.method, routes)
		}
		if tag, _ := req.To().Params.Get("tag"); tag != "callee9" {
			t.Fatalf("%s To: %s", c.method, req.To().Value())
		}
		if tag, _ := req.From().Params.Get("tag"); tag != "gw1" {
			t.Fatalf("%s From: %s", c.method, req.From().Value())
		}
		if req.CallID().Value() != "dial-1" || req.CSeq().SeqNo != c.seq || req.CSeq().MethodName != c.method {
			t.Fatalf("%s: Call-ID %s, CSeq %s", c.method, req.CallID().Value(), req.CSeq().Value())
		}
	}
}

// A strict router (no ;lr) first in the route set is the Request-URI, and the callee's
// Contact goes last among the routes (RFC 3261 12.2.1.1).
func TestInDialogRequestsThroughAStrictRouter(t *testing.T) {
	invite, res := strayInvite()
	for res.GetHeader("Record-Route") != nil {
		res.RemoveHeader("Record-Route")
	}
	res.AppendHeader(sip.NewHeader("Record-Route", "<sip:strict.example.com>"))
	req := inDialog(sip.BYE, invite, res, 8)
	routes := req.GetHeaders("Route")
	if req.Recipient.Host != "strict.example.com" || len(routes) != 1 ||
		!strings.Contains(routes[0].Value(), "10.0.0.9:5062") {
		t.Fatalf("BYE to %s via %v", req.Recipient.String(), routes)
	}
}

// requests records what the client sends; the first ACK fails when failFirstAck.
type requests struct {
	mu           sync.Mutex
	sent         []*sip.Request
	failFirstAck bool
	byes         chan *sip.Request
}

func (r *requests) Request(ctx context.Context, req *sip.Request) (sip.ClientTransaction, error) {
	r.mu.Lock()
	if req.Method == sip.ACK && r.failFirstAck {
		r.failFirstAck = false
		r.mu.Unlock()
		return nil, errors.New("no route to the callee")
	}
	r.sent = append(r.sent, req)
	r.mu.Unlock()
	if req.Method == sip.BYE {
		r.byes <- req
	}
	answer := &siptest.ClientTxRequester{OnRequest: func(req *sip.Request) *sip.Response {
		return sip.NewResponseFromRequest(req, 200, "OK", nil)
	}}
	return answer.Request(ctx, req)
}

func (r *requests) methods() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := []string{}
	for _, req := range r.sent {
		tag, _ := req.To().Params.Get("tag")
		out = append(out, string(req.Method)+" "+tag)
	}
	return out
}

func strayClient(t *testing.T, sent *requests) *sipgo.DialogUA {
	ua, err := sipgo.NewUA()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ua.Close() })
	client, err := sipgo.NewClient(ua)
	if err != nil {
		t.Fatal(err)
	}
	client.TxRequester = sent
	return &sipgo.DialogUA{Client: client}
}

func waitBye(t *testing.T, sent *requests) *sip.Request {
	select {
	case bye := <-sent.byes:
		return bye
	case <-time.After(5 * time.Second):
		t.Fatalf("no BYE; sent %v", sent.methods())
		return nil
	}
}

// Each resent 200 is ACKed, and the call hung up once; an answer from a second phone (a
// forking proxy: another To tag) is a call of its own, hung up too.
func TestResentAnswersAreAckedAndEachCallHungUpOnce(t *testing.T) {
	sent := &requests{byes: make(chan *sip.Request, 4)}
	s := newStrayAnswers(slog.New(slog.NewTextHandler(io.Discard, nil)))
	invite, res := strayInvite()
	s.expect(invite, strayClient(t, sent))
	s.handle(res)
	bye := waitBye(t, sent)
	s.handle(res) // resent: the ACK was lost
	if bye.CSeq().SeqNo != 8 || bye.Recipient.Host != "10.0.0.9" {
		t.Fatalf("BYE %s to %s", bye.CSeq().Value(), bye.Recipient.String())
	}
	forked := res.Clone()
	forked.To().Params.Add("tag", "phone2")
	s.handle(forked)
	waitBye(t, sent)
	want := []string{"ACK callee9", "BYE callee9", "ACK callee9", "ACK phone2", "BYE phone2"}
	if got := sent.methods(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("sent %v, want %v", got, want)
	}
}

// An ACK that could not be sent does not count as hung up: the next resend gets its ACK, and
// then the BYE.
func TestAnAnswerWhoseAckFailedIsHungUpAtItsNextResend(t *testing.T) {
	sent := &requests{byes: make(chan *sip.Request, 4), failFirstAck: true}
	s := newStrayAnswers(slog.New(slog.NewTextHandler(io.Discard, nil)))
	invite, res := strayInvite()
	s.expect(invite, strayClient(t, sent))
	s.handle(res)
	s.handle(res)
	waitBye(t, sent)
	if got := strings.Join(sent.methods(), ","); got != "ACK callee9,BYE callee9" {
		t.Fatalf("sent %v", got)
	}
}

// Responses no transaction took that are not an answer to a given-up dial are left alone.
func TestStrayResponsesOfNoGivenUpDialAreIgnored(t *testing.T) {
	sent := &requests{byes: make(chan *sip.Request, 4)}
	s := newStrayAnswers(slog.New(slog.NewTextHandler(io.Discard, nil)))
	invite, res := strayInvite()
	other := res.Clone()
	otherID := sip.CallIDHeader("dial-2")
	other.ReplaceHeader(&otherID)
	s.expect(invite, strayClient(t, sent))
	s.handle(other)                                                   // an answer, but to no dial given up
	s.handle(sip.NewResponseFromRequest(invite, 180, "Ringing", nil)) // not an answer
	bye := sip.NewRequest(sip.BYE, invite.Recipient)
	bye.AppendHeader(sip.HeaderClone(invite.CallID()))
	bye.AppendHeader(&sip.CSeqHeader{SeqNo: 8, MethodName: sip.BYE})
	s.handle(sip.NewResponseFromRequest(bye, 200, "OK", nil)) // an answer, but to a BYE
	if got := sent.methods(); len(got) != 0 {
		t.Fatalf("acted on responses that answer no given-up INVITE: %v", got)
	}
}
