package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
)

func envOf(vars map[string]string) func(string) string {
	return func(name string) string { return vars[name] }
}

func TestPhoneSettings(t *testing.T) {
	p, err := phoneSettingsFromEnv(envOf(nil))
	if err != nil || p.ring != 0 || p.jitterDepth() != 60*time.Millisecond || p.dialTrunk != nil ||
		p.mayTransferTo("+15550100") {
		t.Fatalf("defaults: %+v %v", p, err)
	}
	p, err = phoneSettingsFromEnv(envOf(map[string]string{
		"VOICEBUS_SIP_TRANSFER_TO": "+1555*, sip:desk@example.com"}))
	if err != nil || !p.mayTransferTo("+15550100") || !p.mayTransferTo("sip:desk@example.com") ||
		p.mayTransferTo("+19005550100") || p.mayTransferTo("sip:desk@example.com.evil") {
		t.Fatalf("transfer list: %+v %v", p, err)
	}
	p, err = phoneSettingsFromEnv(envOf(map[string]string{"VOICEBUS_SIP_RING_MS": "3000",
		"VOICEBUS_SIP_JITTER_MS": "80", "VOICEBUS_SIP_DIAL_TRUNK": "sip:trunk.example.com:5080;transport=tcp",
		"VOICEBUS_SIP_RTP_PORTS": "10000-10099"}))
	if err != nil || p.ring != 3*time.Second || p.jitter != 80*time.Millisecond ||
		p.dialTrunk.Host != "trunk.example.com" || p.dialTrunk.Port != 5080 ||
		p.rtpLow != 10000 || p.rtpHigh != 10099 {
		t.Fatalf("%+v %v", p, err)
	}
	for _, bad := range []map[string]string{{"VOICEBUS_SIP_RING_MS": "-1"}, {"VOICEBUS_SIP_JITTER_MS": "20"},
		{"VOICEBUS_SIP_DIAL_TRUNK": "sip:alice@trunk.example.com"}, {"VOICEBUS_SIP_RTP_PORTS": "10001-10099"},
		{"VOICEBUS_SIP_RTP_PORTS": "20000-10000"}, {"VOICEBUS_SIP_RTP_PORTS": "80-100"},
		{"VOICEBUS_SIP_RTP_PORTS": "10000"}, {"VOICEBUS_SIP_TRANSFER_TO": "desk@example.com"}} {
		if _, err := phoneSettingsFromEnv(envOf(bad)); err == nil {
			t.Errorf("%v taken", bad)
		}
	}
}

func testGateway(trunk string) *gateway {
	g := &gateway{log: slog.New(slog.NewTextHandler(io.Discard, nil)), ctx: context.Background()}
	g.phone.transfers = []string{"*"} // any target (VOICEBUS_SIP_TRANSFER_TO=*)
	g.cfg.listen = "127.0.0.1:5060"
	if trunk != "" {
		var uri sip.Uri
		if err := sip.ParseUri(trunk, &uri); err != nil {
			panic(err)
		}
		g.phone.dialTrunk = &uri
	}
	return g
}

func TestDialTargets(t *testing.T) {
	g := testGateway("sip:trunk.example.com:5080;transport=tcp")
	uri, why := g.dialTarget("+15550123")
	if why != "" || uri.User != "+15550123" || uri.Host != "trunk.example.com" || uri.Port != 5080 {
		t.Fatalf("%s %s", uri.String(), why)
	}
	if tr, _ := uri.UriParams.Get("transport"); tr != "tcp" || g.phone.dialTrunk.User != "" {
		t.Fatalf("the trunk's transport lost, or the trunk changed: %s", uri.String())
	}
	uri, why = g.dialTarget("sip:bob@192.0.2.7:5070")
	if why != "" || uri.User != "bob" || uri.Port != 5070 {
		t.Fatalf("%s %s", uri.String(), why)
	}
	for _, bad := range []string{"bob", "tel:+1555", "sip:", "sip:bob@host>x", "12 34"} {
		if _, why := g.dialTarget(bad); why == "" {
			t.Errorf("%q taken", bad)
		}
	}
	if _, why := testGateway("").dialTarget("+15550123"); why == "" {
		t.Error("a number without a trunk taken")
	}
}

func TestBadDialRequestsAreRefused(t *testing.T) {
	g := testGateway("")
	encode := func(r *DialRequest) []byte {
		data, err := Encode(r)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	for name, data := range map[string][]byte{
		"junk":      []byte("hello"),
		"not dial":  encode(&DialRequest{Target: "sip:a@b"})[:3],
		"caller id": encode(&DialRequest{Target: "sip:a@b", CallerID: "x\r\nVia: evil", AnswerTimeoutMs: 30000}),
		"timeout":   encode(&DialRequest{Target: "sip:a@b", AnswerTimeoutMs: 5}),
		"no trunk":  encode(&DialRequest{Target: "+1555", AnswerTimeoutMs: 30000}),
	} {
		if _, _, refusal := g.dialRequest(data); refusal == nil || refusal.Error != "bad_request" {
			t.Errorf("%s: %+v", name, refusal)
		}
	}
	req, uri, refusal := g.dialRequest(encode(&DialRequest{Target: "sip:bob@127.0.0.1:5070",
		CallerID: "+15550100", Greeting: "Hi", AnswerTimeoutMs: 30000}))
	if refusal != nil || uri.Host != "127.0.0.1" || req.Greeting != "Hi" {
		t.Fatalf("%+v %+v", req, refusal)
	}
}

func TestDialFailures(t *testing.T) {
	response := func(status int, reason string) *sip.Response {
		req := sip.NewRequest(sip.INVITE, sip.Uri{User: "bob", Host: "example.com"})
		return sip.NewResponseFromRequest(req, status, reason, nil)
	}
	for _, tc := range []struct {
		err    error
		want   string
		status int64
	}{
		{&sipgo.ErrDialogResponse{Res: response(486, "Busy Here")}, "busy", 486},
		{fmt.Errorf("invite: %w", sipgo.ErrDialogResponse{Res: response(603, "Decline")}), "declined", 603},
		{&sipgo.ErrDialogResponse{Res: response(480, "Temporarily Unavailable")}, "no_answer", 480},
		{&sipgo.ErrDialogResponse{Res: response(404, "Not Found")}, "refused", 404},
		{context.DeadlineExceeded, "no_answer", 0},
		{errors.Join(context.DeadlineExceeded, context.Canceled), "no_answer", 0},
		{errNoResponse, "unreachable", 0},
		{errors.Join(errors.New("transaction terminated"), sip.ErrTransactionTimeout), "unreachable", 0},
		{errors.New("no SDP in response"), "failed", 0},
	} {
		got := dialFailure(tc.err, false)
		if got.Error != tc.want || got.Status != tc.status {
			t.Errorf("%v: %+v", tc.err, got)
		}
	}
	if got := dialFailure(context.Canceled, true); got.Error != "failed" {
		t.Errorf("stopping: %+v", got)
	}
	if got := dialFailure(&sipgo.ErrDialogResponse{Res: response(486, "Busy Here")}, false); got.Reason != "486 Busy Here" {
		t.Errorf("reason %q", got.Reason)
	}
}
