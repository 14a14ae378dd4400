package main

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emiago/sipgo/sip"
	"github.com/icholy/digest"
	"golang.org/x/time/rate"
)

func noEnv(string) string { return "" }

func writeTrunks(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "trunks.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustLoad(t *testing.T, text string) *trunkSettings {
	t.Helper()
	s, err := loadTrunkSettings(writeTrunks(t, text), noEnv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// unlimited: the admission config without its rate, for tests of other things.
func unlimited(t *testing.T) *gate {
	s := mustLoad(t, admissionConfig)
	s.inviteRate = 0
	return newGate(s, quietLog())
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestTheExampleFileLoads(t *testing.T) {
	env := map[string]string{"EXOTEL_SIP_PASSWORD": "p1", "VOICEBUS_SIP_RECEPTION_PASSWORD": "p2",
		"VOICEBUS_SIP_LAB_PASSWORD": "p3"}
	s, err := loadTrunkSettings("../../deploy/sip/trunks.example.toml", func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if len(s.trunks) != 3 || s.maxCalls != 50 || s.inviteRate != 5 || s.inviteBurst != 10 || s.realm != "voicebus" {
		t.Fatalf("settings: %+v", s)
	}
	twilio, exotel, office := s.trunks[0], s.trunks[1], s.trunks[2]
	if twilio.greeting == nil || twilio.maxCalls != 20 || twilio.allow[0] != netip.MustParsePrefix("192.0.2.0/28") {
		t.Fatalf("twilio: %+v", twilio)
	}
	r := exotel.register
	if r == nil || r.username != "your-sip-username" || r.password.reveal() != "p1" || r.expiry != time.Hour ||
		r.registrar.Host != "registrar.example.com" {
		t.Fatalf("exotel: %+v", r)
	}
	if s.users["lab"].password.reveal() != "p3" || s.users["reception"].trunk != office || office.users != 2 {
		t.Fatalf("office users: %+v", s.users)
	}
}

func TestDefaultsAndAddressForms(t *testing.T) {
	s := mustLoad(t, `
[[trunks]]
name = "a"
allow = ["192.0.2.7", "198.51.100.9/24", "2001:db8::/32"]
`)
	if s.inviteRate != defaultInviteRate || s.inviteBurst != defaultInviteBurst || s.realm != defaultRealm {
		t.Fatalf("defaults: %+v", s)
	}
	for addr, want := range map[string]bool{"192.0.2.7": true, "192.0.2.8": false, "198.51.100.200": true,
		"2001:db8::1": true, "2001:db9::1": false} {
		if got := s.trunkFor(netip.MustParseAddr(addr)) != nil; got != want {
			t.Errorf("%s allowed: %v, want %v", addr, got, want)
		}
	}
	if s.trunks[0].agent != "" {
		t.Fatal("a trunk without agent: the default agent")
	}
	off := mustLoad(t, "invite_rate = 0\n[[trunks]]\nname = \"a\"\nallow = [\"192.0.2.7\"]\n")
	if off.inviteRate != 0 {
		t.Fatal("invite_rate = 0 must turn the limit off")
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	trunk := "[[trunks]]\nname = \"t\"\n"
	for _, c := range []struct{ text, want string }{
		{trunk + `allow = ["192.0.2.0/24"]` + "\nalow = []\n", "unknown key trunks.alow"},
		{"maxcalls = 3\n" + trunk + `allow = ["192.0.2.1"]`, "unknown key maxcalls"},
		{trunk + `allow = ["192.0.2.0/33"]`, `trunks[0] (t).allow: "192.0.2.0/33" is not an IP address or CIDR`},
		{trunk + `allow = ["sip.example.com"]`, `"sip.example.com" is not an IP address or CIDR`},
		{trunk + "[[trunks.users]]\nusername = \"alice\"\n", "trunks[0] (t).users[0] (alice): needs password or password_env"},
		{trunk + "[[trunks.users]]\nusername = \"alice\"\npassword = \"x\"\npassword_env = \"Y\"\n", "password and password_env both set"},
		{trunk + "[[trunks.users]]\nusername = \"alice\"\npassword_env = \"NOT_SET_ANYWHERE\"\n", "users[0] (alice).password_env: the variable NOT_SET_ANYWHERE is not set"},
		{trunk + "[[trunks.users]]\nusername = \"a b\"\npassword = \"x\"\n", "trunks[0] (t).users[0].username"},
		{trunk, "trunks[0] (t): admits nobody"},
		{"", "trunks: none"},
		{`[[trunks]]` + "\nname = \"bad name\"\nallow = [\"192.0.2.1\"]\n", "trunks[0].name"},
		{trunk + "allow = [\"192.0.2.1\"]\n" + trunk + "allow = [\"192.0.2.2\"]\n", `trunks[1].name: "t" is used twice`},
		{trunk + "[[trunks.users]]\nusername = \"a\"\npassword = \"x\"\n[[trunks]]\nname = \"u\"\n[[trunks.users]]\nusername = \"a\"\npassword = \"y\"\n",
			`trunks[1] (u).users: "a" is a user of another trunk too`},
		{trunk + "[trunks.register]\nregistrar = \"sip:r.example.com\"\nusername = \"u\"\npassword = \"x\"\n" +
			"[[trunks.users]]\nusername = \"a\"\npassword = \"x\"\n", "trunks[0] (t): register needs allow too"},
		{trunk + "allow = [\"192.0.2.1\"]\n[trunks.register]\nregistrar = \"http://r\"\nusername = \"u\"\npassword = \"x\"\n", "trunks[0] (t).register.registrar"},
		{trunk + "allow = [\"192.0.2.1\"]\n[trunks.register]\nregistrar = \"sip:u:pw@r.example.com\"\nusername = \"u\"\npassword = \"x\"\n", "no password in the URI"},
		{trunk + "allow = [\"192.0.2.1\"]\n[trunks.register]\nregistrar = \"sip:r.example.com\"\nusername = \"u\"\n", "trunks[0] (t).register: needs password or password_env"},
		{trunk + "allow = [\"192.0.2.1\"]\n[trunks.register]\nregistrar = \"sip:r.example.com\"\nusername = \"u\"\npassword = \"x\"\nexpiry = 5\n", "register.expiry: 5"},
		{trunk + "allow = [\"192.0.2.1\"]\n[trunks.register]\nregistrar = \"sip:r.example.com\"\nusername = \"u\"\npassword = \"x\"\nproxy = \"p\"\n", "unknown key trunks.register.proxy"},
		{"max_calls = -1\n" + trunk + "allow = [\"192.0.2.1\"]\n", "max_calls: -1"},
		{"invite_rate = -2\n" + trunk + "allow = [\"192.0.2.1\"]\n", "invite_rate: -2"},
		{"invite_burst = 0\n" + trunk + "allow = [\"192.0.2.1\"]\n", "invite_burst: 0"},
		{"max_calls = \"ten\"\n" + trunk + "allow = [\"192.0.2.1\"]\n", "max_calls"},
		{"realm = \"a\\\"b\"\n" + trunk + "allow = [\"192.0.2.1\"]\n", "realm:"},
		{trunk + "allow = [\"192.0.2.1\"]\nmax_calls = -3\n", "trunks[0] (t).max_calls: -3"},
		{trunk + "allow = [\"192.0.2.1\"]\nagent = \"the bank\"\n", `trunks[0] (t).agent: "the bank"`},
		{trunk + "allow = [\"192.0.2.1\"]\nagent = \"bank.eu\"\n", "trunks[0] (t).agent"},
	} {
		_, err := loadTrunkSettings(writeTrunks(t, c.text), noEnv)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("config:\n%s\nerror %v, want one with %q", c.text, err, c.want)
		}
	}
	if _, err := loadTrunkSettings(filepath.Join(t.TempDir(), "missing.toml"), noEnv); err == nil ||
		!strings.Contains(err.Error(), "VOICEBUS_SIP_CONFIG") {
		t.Errorf("a missing file: %v", err)
	}
}

func TestPasswordsNeverPrint(t *testing.T) {
	s := mustLoad(t, `
[[trunks]]
name = "t"
allow = ["192.0.2.1"]
  [trunks.register]
  registrar = "sip:r.example.com"
  username = "u"
  password = "hunter2-trunk"
  [[trunks.users]]
  username = "alice"
  password = "hunter2-user"
`)
	var logged bytes.Buffer
	slog.New(slog.NewTextHandler(&logged, nil)).Info("x", "reg", s.trunks[0].register.password,
		"user", s.users["alice"].password)
	printed := fmt.Sprintf("%v %+v %#v %s %v %+v", s.trunks[0].register, s.trunks[0].register,
		s.trunks[0].register, s.users["alice"].password, *s.users["alice"], *s.trunks[0].register) + logged.String()
	if strings.Contains(printed, "hunter2") {
		t.Fatalf("a password printed: %s", printed)
	}
}

// ---- admission ---------------------------------------------------------------------------------

const admissionConfig = `
max_calls = 3
invite_rate = 1
invite_burst = 3
realm = "test"
[[trunks]]
name = "carrier"
allow = ["127.0.0.1/32"]
max_calls = 2
greeting = "carrier greeting"
agent = "front_desk"
[[trunks]]
name = "phones"
  [[trunks.users]]
  username = "alice"
  password = "right"
`

func request(method sip.RequestMethod, source, fromUser string) *sip.Request {
	req := sip.NewRequest(method, sip.Uri{Scheme: "sip", User: "agent", Host: "127.0.0.1", Port: 5060})
	from := &sip.FromHeader{Address: sip.Uri{Scheme: "sip", User: fromUser, Host: "example.org"}, Params: sip.NewParams()}
	from.Params.Add("tag", "t1")
	req.AppendHeader(from)
	req.AppendHeader(&sip.ToHeader{Address: sip.Uri{Scheme: "sip", User: fromUser, Host: "127.0.0.1"}, Params: sip.NewParams()})
	callID := sip.CallIDHeader("c1")
	req.AppendHeader(&callID)
	req.AppendHeader(&sip.CSeqHeader{SeqNo: 1, MethodName: method})
	req.AppendHeader(&sip.ContactHeader{Address: sip.Uri{Scheme: "sip", User: fromUser, Host: "192.0.2.9", Port: 5062}})
	req.SetSource(source)
	return req
}

// answer adds the credentials a phone would send for this challenge.
func answer(t *testing.T, req *sip.Request, challenged decision, user, password string) *sip.Request {
	t.Helper()
	if challenged.status != sip.StatusUnauthorized || len(challenged.headers) != 1 ||
		challenged.headers[0].Name() != "WWW-Authenticate" {
		t.Fatalf("not a challenge: %+v", challenged)
	}
	chal, err := digest.ParseChallenge(challenged.headers[0].Value())
	if err != nil {
		t.Fatal(err)
	}
	cred, err := digest.Digest(chal, digest.Options{Method: req.Method.String(), URI: req.Recipient.String(),
		Username: user, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	req.AppendHeader(sip.NewHeader("Authorization", cred.String()))
	return req
}

func TestAnInviteFromATrunkAddressIsAdmittedAndAnyOtherForbidden(t *testing.T) {
	g := newGate(mustLoad(t, admissionConfig), quietLog())
	now := time.Now()
	ok := g.decideInvite(request(sip.INVITE, "127.0.0.1:5070", "+15550100"), now)
	if ok.status != 0 || ok.trunk == nil || ok.trunk.name != "carrier" || ok.trunk.agent != "front_desk" ||
		g.active.Load() != 1 {
		t.Fatalf("from the carrier: %+v", ok)
	}
	ok.release()
	ok.release() // twice is once
	if g.active.Load() != 0 || ok.trunk.active.Load() != 0 {
		t.Fatal("release did not give the slot back once")
	}
	no := g.decideInvite(request(sip.INVITE, "127.0.0.2:5070", "+15550100"), now)
	if no.status != sip.StatusForbidden || no.kind != "invite_forbidden" {
		t.Fatalf("from elsewhere: %+v", no)
	}
	// The source is the transport's, not the Via the sender wrote.
	spoofed := request(sip.INVITE, "127.0.0.2:5070", "+15550100")
	spoofed.AppendHeader(sip.NewHeader("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx"))
	if d := g.decideInvite(spoofed, now); d.status != sip.StatusForbidden {
		t.Fatalf("a Via naming an allowed address: %+v", d)
	}
}

func TestAUsersInviteIsChallengedThenAdmittedOrForbidden(t *testing.T) {
	g := unlimited(t)
	now := time.Now()
	src := "127.0.0.2:5070"
	challenged := g.decideInvite(request(sip.INVITE, src, "alice"), now)
	if challenged.kind != "" || !strings.Contains(challenged.headers[0].Value(), `realm="test"`) {
		t.Fatalf("challenge: %+v", challenged)
	}
	ok := g.decideInvite(answer(t, request(sip.INVITE, src, "alice"), challenged, "alice", "right"), now)
	if ok.status != 0 || ok.trunk.name != "phones" {
		t.Fatalf("right password: %+v", ok)
	}
	ok.release()
	bad := g.decideInvite(answer(t, request(sip.INVITE, src, "alice"), challenged, "alice", "wrong"), now)
	if bad.status != sip.StatusForbidden || bad.kind != "invite_bad_auth" {
		t.Fatalf("wrong password: %+v", bad)
	}
	unknown := g.decideInvite(answer(t, request(sip.INVITE, src, "alice"), challenged, "mallory", "right"), now)
	if unknown.status != sip.StatusForbidden || unknown.kind != "invite_bad_auth" {
		t.Fatalf("no such user: %+v", unknown)
	}
	// A nonce we did not make: forbidden. One of ours too old: challenged again, stale.
	other := newGate(mustLoad(t, admissionConfig), quietLog())
	forged := g.decideInvite(answer(t, request(sip.INVITE, src, "alice"), other.challenge(now, false), "alice", "right"), now)
	if forged.status != sip.StatusForbidden {
		t.Fatalf("a foreign nonce: %+v", forged)
	}
	old := g.decideInvite(answer(t, request(sip.INVITE, src, "alice"), g.challenge(now.Add(-nonceLife-time.Second), false), "alice", "right"), now)
	if old.status != sip.StatusUnauthorized || !strings.Contains(old.headers[0].Value(), "stale=true") {
		t.Fatalf("a stale nonce: %+v", old)
	}
}

func TestTheRateIsPerSourceAddress(t *testing.T) {
	g := newGate(mustLoad(t, admissionConfig), quietLog())
	now := time.Now()
	for i := range 3 { // the burst
		d := g.decideInvite(request(sip.INVITE, "127.0.0.1:5070", "x"), now)
		if d.status != 0 {
			t.Fatalf("INVITE %d of the burst: %+v", i, d)
		}
		d.release()
	}
	limited := g.decideInvite(request(sip.INVITE, "127.0.0.1:5071", "x"), now)
	if limited.status != sip.StatusServiceUnavailable || limited.kind != "invite_rate_limited" ||
		limited.headers[0].Name() != "Retry-After" || limited.headers[0].Value() != "1" {
		t.Fatalf("over the rate: %+v", limited)
	}
	if d := g.decideInvite(request(sip.INVITE, "127.0.0.2:5070", "x"), now); d.kind != "invite_forbidden" {
		t.Fatalf("another address has its own bucket: %+v", d)
	}
	d := g.decideInvite(request(sip.INVITE, "127.0.0.1:5070", "x"), now.Add(time.Second))
	if d.status != 0 {
		t.Fatalf("a second later: %+v", d)
	}
}

func TestMaxCallsOfTheGatewayAndOfATrunk(t *testing.T) {
	g := unlimited(t)
	now := time.Now()
	invite := func(src, user string) decision {
		req := request(sip.INVITE, src, user)
		if user == "alice" {
			req = answer(t, req, g.challenge(now, false), "alice", "right")
		}
		return g.decideInvite(req, now)
	}
	a, b := invite("127.0.0.1:1", "x"), invite("127.0.0.1:2", "x")
	if a.status != 0 || b.status != 0 {
		t.Fatal("two calls within the carrier's max_calls")
	}
	if c := invite("127.0.0.1:3", "x"); c.status != sip.StatusBusyHere || c.kind != "calls_over_limit" {
		t.Fatalf("over the trunk's max_calls: %+v", c)
	}
	p := invite("127.0.0.9:1", "alice")
	if p.status != 0 {
		t.Fatalf("a phone within the gateway's max_calls: %+v", p)
	}
	if q := invite("127.0.0.9:2", "alice"); q.status != sip.StatusServiceUnavailable || q.kind != "calls_over_limit" ||
		q.headers[0].Name() != "Retry-After" {
		t.Fatalf("over the gateway's max_calls: %+v", q)
	}
	a.release()
	if c := invite("127.0.0.1:3", "x"); c.status != 0 {
		t.Fatalf("after a hang-up: %+v", c)
	}
}

func TestWithoutAConfigFileEveryoneIsAdmitted(t *testing.T) {
	g := newGate(nil, quietLog())
	for range 100 {
		d := g.decideInvite(request(sip.INVITE, "127.0.0.1:5070", "x"), time.Now())
		if d.status != 0 {
			t.Fatalf("open gateway: %+v", d)
		}
		d.release()
	}
	if d := g.decideRegister(request(sip.REGISTER, "127.0.0.1:5070", "x"), time.Now()); d.status != sip.StatusOK {
		t.Fatalf("REGISTER to an open gateway: %+v", d)
	}
}

func TestRegisterOfAUser(t *testing.T) {
	g := unlimited(t)
	now := time.Now()
	src := "127.0.0.1:5080"
	challenged := g.decideRegister(request(sip.REGISTER, src, "alice"), now)
	ok := g.decideRegister(answer(t, request(sip.REGISTER, src, "alice"), challenged, "alice", "right"), now)
	if ok.status != sip.StatusOK || len(ok.headers) != 2 || ok.headers[0].Value() != "3600" ||
		!strings.Contains(ok.headers[1].Value(), "expires=3600") {
		t.Fatalf("right password: %+v", ok)
	}
	bad := g.decideRegister(answer(t, request(sip.REGISTER, src, "alice"), challenged, "alice", "wrong"), now)
	if bad.status != sip.StatusForbidden || bad.kind != "register_bad_auth" {
		t.Fatalf("wrong password: %+v", bad)
	}
	// alice's credentials for bob's address of record
	other := g.decideRegister(answer(t, request(sip.REGISTER, src, "bob"), challenged, "alice", "right"), now)
	if other.status != sip.StatusForbidden || other.kind != "register_bad_auth" {
		t.Fatalf("another's name: %+v", other)
	}
	noUsers := newGate(mustLoad(t, "[[trunks]]\nname = \"c\"\nallow = [\"127.0.0.1\"]\n"), quietLog())
	if d := noUsers.decideRegister(request(sip.REGISTER, src, "alice"), now); d.status != sip.StatusForbidden ||
		d.kind != "register_forbidden" {
		t.Fatalf("no users: %+v", d)
	}
}

func TestRefusalsAreLoggedOncePerKindAndSource(t *testing.T) {
	var out bytes.Buffer
	r := newReporter(slog.New(slog.NewTextHandler(&out, nil)))
	now := time.Now()
	for range 1000 {
		r.refused("invite_rate_limited", "127.0.0.2", now)
	}
	r.refused("invite_forbidden", "127.0.0.2", now)
	if n := strings.Count(out.String(), "\n"); n != 2 {
		t.Fatalf("%d lines for a flood from one address:\n%s", n, out.String())
	}
	out.Reset()
	for i := range 500 { // many (forged) addresses
		r.refused("invite_forbidden", fmt.Sprintf("192.0.2.%d", i%250), now)
	}
	if n := strings.Count(out.String(), "\n"); n != reportSources {
		t.Fatalf("%d lines for a flood from many addresses:\n%s", n, out.String())
	}
	out.Reset()
	r.refused("invite_rate_limited", "127.0.0.2", now.Add(reportWindow+time.Second))
	if n := strings.Count(out.String(), "\n"); n != 1 {
		t.Fatalf("a new window logs again: %d lines", n)
	}
}

func TestIdleSourcesAreForgottenOnly(t *testing.T) {
	s := &sourceLimits{every: 1, burst: 2, bySource: map[netip.Addr]*rate.Limiter{}}
	now := time.Now()
	busy := netip.MustParseAddr("192.0.2.1")
	s.allow(busy, now)
	s.allow(busy, now) // its bucket is empty now
	for i := 0; len(s.bySource) < maxTrackedSources; i++ {
		s.allow(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), now.Add(-time.Hour))
	}
	s.allow(netip.MustParseAddr("198.51.100.1"), now)
	if len(s.bySource) != 2 {
		t.Fatalf("%d sources kept, want the busy one and the new one", len(s.bySource))
	}
	if s.allow(busy, now) {
		t.Fatal("forgetting reset a busy bucket")
	}
}

func TestLoopbackHosts(t *testing.T) {
	for host, want := range map[string]bool{"127.0.0.1": true, "127.0.0.2": true, "::1": true,
		"localhost": true, "0.0.0.0": false, "": false, "::": false, "192.0.2.1": false, "example.com": false} {
		if got := isLoopbackHost(host); got != want {
			t.Errorf("isLoopbackHost(%q) = %v", host, got)
		}
	}
}

func TestNoConfigFileOnlyOnLoopback(t *testing.T) {
	if s, err := trunksFor(config{listen: "127.0.0.1:5060"}, "127.0.0.1"); s != nil || err != nil {
		t.Fatalf("loopback without a file: %v %v", s, err)
	}
	_, err := trunksFor(config{listen: "0.0.0.0:5060"}, "0.0.0.0")
	if err == nil || !strings.Contains(err.Error(), "VOICEBUS_SIP_CONFIG") || !strings.Contains(err.Error(), "allow") {
		t.Fatalf("a public address without a file: %v", err)
	}
}

func TestARegistrarsTransportMustBeServed(t *testing.T) {
	path := writeTrunks(t, "[[trunks]]\nname = \"x\"\nallow = [\"192.0.2.1\"]\n[trunks.register]\n"+
		"registrar = \"sip:r.example.com;transport=tcp\"\nusername = \"u\"\npassword = \"p\"\n")
	if _, err := trunksFor(config{trunksFile: path, transports: []string{"udp"}}, "0.0.0.0"); err == nil ||
		!strings.Contains(err.Error(), "trunk x registers over tcp") {
		t.Fatalf("tcp registrar, udp only: %v", err)
	}
	if _, err := trunksFor(config{trunksFile: path, transports: []string{"udp", "tcp4"}}, "0.0.0.0"); err != nil {
		t.Fatal(err)
	}
}

func TestRetriesBackOff(t *testing.T) {
	wait := firstRetry
	for range 20 {
		wait = nextRetry(wait)
	}
	if wait != lastRetry || nextRetry(firstRetry) != 2*firstRetry {
		t.Fatalf("backoff: %v", wait)
	}
	for range 100 {
		if j := jittered(10 * time.Second); j < 8*time.Second || j > 12*time.Second {
			t.Fatalf("jitter %v", j)
		}
	}
}
