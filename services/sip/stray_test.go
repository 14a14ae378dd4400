package main

import (
	"io"
	"log/slog"
	"testing"

	"github.com/emiago/sipgo/sip"
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

// Responses no transaction took that are not an answer to a given-up dial are left alone (a
// nil client would panic if one were acted on).
func TestStrayResponsesOfNoGivenUpDialAreIgnored(t *testing.T) {
	s := newStrayAnswers(slog.New(slog.NewTextHandler(io.Discard, nil)))
	invite, res := strayInvite()
	s.handle(res) // an answer, but to no dial given up
	s.dials["dial-1"] = &strayDial{invite: invite}
	ringing := sip.NewResponseFromRequest(invite, 180, "Ringing", nil)
	s.handle(ringing) // not an answer
	bye := sip.NewRequest(sip.BYE, invite.Recipient)
	bye.AppendHeader(sip.HeaderClone(invite.CallID()))
	bye.AppendHeader(&sip.CSeqHeader{SeqNo: 8, MethodName: sip.BYE})
	s.handle(sip.NewResponseFromRequest(bye, 200, "OK", nil)) // an answer, but to a BYE
	if s.dials["dial-1"].hungUp {
		t.Fatal("acted on a response that is no answer to the given-up INVITE")
	}
}
