package main

// Admission: who may call or register (allow lists, digest, rate and call limits), and how
// refusals are counted and logged (docs/telephony.md, "Trunks, registration and admission").

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/binary"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/sipgo/sip"
	"github.com/icholy/digest"
	"golang.org/x/time/rate"
)

// ---- admission ---------------------------------------------------------------------------------

// gate decides every INVITE and REGISTER from outside a dialog.
type gate struct {
	settings *trunkSettings // nil: no config file, loopback only: everyone may call
	nonceKey []byte
	sources  *sourceLimits
	active   atomic.Int64
	report   *reporter
	log      *slog.Logger
	mu       sync.Mutex
	bindings map[string]string // user → its registered contact, to log changes only
}

func newGate(s *trunkSettings, log *slog.Logger) *gate {
	g := &gate{settings: s, nonceKey: make([]byte, 32), report: newReporter(log), log: log,
		bindings: map[string]string{}}
	_, _ = rand.Read(g.nonceKey)
	if s != nil {
		g.sources = &sourceLimits{every: s.inviteRate, burst: s.inviteBurst, bySource: map[netip.Addr]*rate.Limiter{}}
	}
	return g
}

// decision: status 0 admits an INVITE; otherwise the response to send. kind names the problem
// counted, "" for none (a digest challenge is the protocol, not a problem).
type decision struct {
	status  int
	reason  string
	headers []sip.Header
	kind    string
	trunk   *trunk
	release func()
}

func refusal(status int, reason, kind string, headers ...sip.Header) decision {
	return decision{status: status, reason: reason, kind: kind, headers: headers}
}

func retryAfter(seconds int) sip.Header { return sip.NewHeader("Retry-After", strconv.Itoa(seconds)) }

// sourceOf is the address the request came from, as the transport saw it: never the Via
// header, which the sender writes.
func sourceOf(req *sip.Request) (netip.Addr, bool) {
	ap, err := netip.ParseAddrPort(req.MessageData.Source())
	if err != nil {
		return netip.Addr{}, false
	}
	return ap.Addr().Unmap(), true
}

// decideInvite: over the rate, 503; from a trunk's address, or a user with the right
// credentials, admitted within max_calls; a user without credentials is challenged; anyone else
// is forbidden.
func (g *gate) decideInvite(req *sip.Request, now time.Time) decision {
	if g.settings == nil {
		return decision{release: func() {}}
	}
	src, ok := sourceOf(req)
	if !ok {
		return refusal(sip.StatusForbidden, "Forbidden", "invite_forbidden")
	}
	if !g.sources.allow(src, now) {
		return refusal(sip.StatusServiceUnavailable, "Service Unavailable", "invite_rate_limited",
			retryAfter(g.sources.retryAfter()))
	}
	t := g.settings.trunkFor(src)
	if t == nil {
		header := authorizationOf(req)
		from := req.From()
		if header == "" && (from == nil || g.settings.users[from.Address.User] == nil) {
			return refusal(sip.StatusForbidden, "Forbidden", "invite_forbidden")
		}
		user, d := g.authenticate(req, header, now, "invite_bad_auth")
		if user == nil {
			return d
		}
		t = user.trunk
	}
	return g.reserve(t)
}

// reserve a call within max_calls: the gateway's (503: try another gateway) and the trunk's
// (486: this trunk's share is taken).
func (g *gate) reserve(t *trunk) decision {
	if n := g.active.Add(1); g.settings.maxCalls > 0 && n > int64(g.settings.maxCalls) {
		g.active.Add(-1)
		return refusal(sip.StatusServiceUnavailable, "Service Unavailable", "calls_over_limit", retryAfter(5))
	}
	if n := t.active.Add(1); t.maxCalls > 0 && n > int64(t.maxCalls) {
		t.active.Add(-1)
		g.active.Add(-1)
		return refusal(sip.StatusBusyHere, "Busy Here", "calls_over_limit")
	}
	var once sync.Once
	return decision{trunk: t, release: func() {
		once.Do(func() { t.active.Add(-1); g.active.Add(-1) })
	}}
}

// decideRegister: softphones listed as users register with digest; without a config file
// (loopback only) anyone may.
func (g *gate) decideRegister(req *sip.Request, now time.Time) decision {
	if g.settings == nil {
		return g.bind(req, "")
	}
	src, ok := sourceOf(req)
	if !ok {
		return refusal(sip.StatusForbidden, "Forbidden", "register_forbidden")
	}
	if !g.sources.allow(src, now) {
		return refusal(sip.StatusServiceUnavailable, "Service Unavailable", "register_rate_limited",
			retryAfter(g.sources.retryAfter()))
	}
	if len(g.settings.users) == 0 {
		return refusal(sip.StatusForbidden, "Forbidden", "register_forbidden")
	}
	user, d := g.authenticate(req, authorizationOf(req), now, "register_bad_auth")
	if user == nil {
		return d
	}
	if to := req.To(); to == nil || to.Address.User != user.name {
		return refusal(sip.StatusForbidden, "Forbidden", "register_bad_auth") // someone else's name
	}
	return g.bind(req, user.name)
}

// bind answers a registration: 200 with the contact and its expiry (RFC 3261 10.3). The gateway
// calls nobody back yet, so the binding is only logged when it changes.
func (g *gate) bind(req *sip.Request, user string) decision {
	expires := 3600
	if h := req.GetHeader("Expires"); h != nil {
		if v, err := strconv.Atoi(strings.TrimSpace(h.Value())); err == nil && v >= 0 {
			expires = min(max(v, 60), 3600)
			if v == 0 {
				expires = 0
			}
		}
	}
	d := decision{status: sip.StatusOK, reason: "OK",
		headers: []sip.Header{sip.NewHeader("Expires", strconv.Itoa(expires))}}
	contact := ""
	if c := req.Contact(); c != nil && !c.Address.Wildcard && expires > 0 {
		c = c.Clone()
		c.Params.Add("expires", strconv.Itoa(expires))
		d.headers = append(d.headers, c)
		contact = c.Address.String()
	}
	g.mu.Lock()
	changed := g.bindings[user] != contact
	g.bindings[user] = contact
	g.mu.Unlock()
	if changed && user != "" {
		g.log.Info("softphone registration", "user", user, "contact", contact, "expires", expires)
	}
	return d
}

// ---- digest (RFC 2617 / 3261 22) ---------------------------------------------------------------

// How long a challenge's nonce is good for. Nonces carry their time and an HMAC, so the gate keeps
// no state per challenge and a flood of unanswered challenges costs no memory.
const nonceLife = 5 * time.Minute

func authorizationOf(req *sip.Request) string {
	for _, name := range []string{"Authorization", "Proxy-Authorization"} {
		if h := req.GetHeader(name); h != nil {
			return h.Value()
		}
	}
	return ""
}

func (g *gate) nonce(now time.Time) string {
	var b [32]byte
	binary.BigEndian.PutUint64(b[:8], uint64(now.Unix()))
	_, _ = rand.Read(b[8:16])
	copy(b[16:], g.nonceMAC(b[:16]))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (g *gate) nonceMAC(data []byte) []byte {
	m := hmac.New(sha256.New, g.nonceKey)
	m.Write(data)
	return m.Sum(nil)[:16]
}

// nonceState: ours and fresh, ours but too old (the client may retry: stale=true), or not ours.
func (g *gate) nonceState(nonce string, now time.Time) (ours, fresh bool) {
	b, err := base64.RawURLEncoding.DecodeString(nonce)
	if err != nil || len(b) != 32 || !hmac.Equal(b[16:], g.nonceMAC(b[:16])) {
		return false, false
	}
	age := now.Sub(time.Unix(int64(binary.BigEndian.Uint64(b[:8])), 0))
	return true, age >= -time.Minute && age <= nonceLife
}

func (g *gate) challenge(now time.Time, stale bool) decision {
	c := digest.Challenge{Realm: g.settings.realm, Nonce: g.nonce(now), Algorithm: "MD5",
		QOP: []string{"auth"}, Stale: stale}
	return decision{status: sip.StatusUnauthorized, reason: "Unauthorized",
		headers: []sip.Header{sip.NewHeader("WWW-Authenticate", c.String())}}
}

// authenticate returns the user whose credentials these are, or the response: a challenge when
// there are none (or the nonce went stale), 403 counted as badKind when they are wrong.
func (g *gate) authenticate(req *sip.Request, header string, now time.Time, badKind string) (*sipUser, decision) {
	if header == "" {
		return nil, g.challenge(now, false)
	}
	bad := refusal(sip.StatusForbidden, "Forbidden", badKind)
	cred, err := digest.ParseCredentials(header)
	if err != nil {
		return nil, bad
	}
	ours, fresh := g.nonceState(cred.Nonce, now)
	if !ours {
		return nil, bad
	}
	user := g.settings.users[cred.Username]
	if user == nil || !g.digestMatches(req, cred, user.password) {
		return nil, bad
	}
	if !fresh {
		return nil, g.challenge(now, true)
	}
	return user, decision{}
}

func (g *gate) digestMatches(req *sip.Request, cred *digest.Credentials, password secret) bool {
	alg := strings.ToUpper(cred.Algorithm)
	if cred.Realm != g.settings.realm || (alg != "" && alg != "MD5") ||
		(cred.QOP != "" && cred.QOP != "auth") {
		return false
	}
	chal := &digest.Challenge{Realm: cred.Realm, Nonce: cred.Nonce, Algorithm: cred.Algorithm}
	if cred.QOP != "" {
		chal.QOP = []string{cred.QOP}
	}
	want, err := digest.Digest(chal, digest.Options{Method: req.Method.String(), URI: cred.URI,
		Username: cred.Username, Password: password.reveal(), Cnonce: cred.Cnonce, Count: cred.Nc})
	if err != nil {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(strings.ToLower(cred.Response)), []byte(want.Response)) == 1
}

// ---- rate per source address -------------------------------------------------------------------

type sourceLimits struct {
	mu       sync.Mutex
	every    rate.Limit
	burst    int
	bySource map[netip.Addr]*rate.Limiter
}

// Sources tracked before the idle ones are forgotten.
const maxTrackedSources = 16384

func (s *sourceLimits) allow(src netip.Addr, now time.Time) bool {
	if s.every == 0 {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.bySource[src]
	if l == nil {
		if len(s.bySource) >= maxTrackedSources {
			s.forgetIdle(now)
		}
		l = rate.NewLimiter(s.every, s.burst)
		s.bySource[src] = l
	}
	return l.AllowN(now, 1)
}

// forgetIdle drops the sources whose bucket is full again: a new bucket would be the same. Should
// a flood from more addresses keep every bucket busy, it starts over rather than grow.
func (s *sourceLimits) forgetIdle(now time.Time) {
	for a, l := range s.bySource {
		if l.TokensAt(now) >= float64(s.burst) {
			delete(s.bySource, a)
		}
	}
	if len(s.bySource) >= maxTrackedSources {
		clear(s.bySource)
	}
}

// retryAfter: whole seconds until the bucket holds a token again.
func (s *sourceLimits) retryAfter() int {
	return max(1, int(math.Ceil(1/float64(s.every))))
}

// ---- logging refusals --------------------------------------------------------------------------

// reporter logs a refusal once per kind and source address in each window; a flood, even from
// many (forged) addresses, writes at most reportSources+1 lines per kind and window. The
// counters count everything.
type reporter struct {
	mu      sync.Mutex
	log     *slog.Logger
	started time.Time
	seen    map[string]bool
	perKind map[string]int
}

const (
	reportWindow  = 10 * time.Minute
	reportSources = 20
)

var refusalText = map[string]string{
	"invite_forbidden":      "INVITE refused: its address is in no trunk's allow list and it is no user's",
	"invite_bad_auth":       "INVITE refused: wrong digest credentials",
	"invite_rate_limited":   "INVITE refused: over invite_rate for its address",
	"calls_over_limit":      "INVITE refused: max_calls reached",
	"register_forbidden":    "REGISTER refused: no users to register as",
	"register_bad_auth":     "REGISTER refused: wrong digest credentials",
	"register_rate_limited": "REGISTER refused: over invite_rate for its address",
}

func newReporter(log *slog.Logger) *reporter {
	return &reporter{log: log, seen: map[string]bool{}, perKind: map[string]int{}}
}

func (r *reporter) refused(kind, source string, now time.Time, args ...any) {
	r.mu.Lock()
	if now.Sub(r.started) > reportWindow {
		r.started = now
		clear(r.seen)
		clear(r.perKind)
	}
	key := kind + " " + source
	first, n := !r.seen[key], r.perKind[kind]
	if first && n <= reportSources {
		r.seen[key] = true
		r.perKind[kind] = n + 1
	}
	r.mu.Unlock()
	switch {
	case !first || n > reportSources:
	case n == reportSources:
		r.log.Info(refusalText[kind]+" (more addresses: only counted for now)", "kind", kind)
	default:
		r.log.Info(refusalText[kind]+" (once per address and kind; repeats only counted)",
			append([]any{"kind", kind, "source", source}, args...)...)
	}
}

// problem counts and reports what a decision refused.
func (g *gate) problem(d decision, req *sip.Request) {
	if d.kind == "" {
		return
	}
	count(d.kind)
	src, _ := sourceOf(req)
	g.report.refused(d.kind, src.String(), time.Now(), "status", d.status)
}

// ---- the gateway's side ------------------------------------------------------------------------

// admitted is what a call takes along from the gate: its greeting, its trunk's agent and the
// slot to give back.
type admitted struct {
	greeting string
	agent    string
	release  func()
}

// admit decides an INVITE before anything is sent; a refused or challenged call is answered here.
func (g *gateway) admit(d *diago.DialogServerSession) (admitted, bool) {
	gt := g.cfg.admission
	var dec decision
	if gt == nil { // not wired: refuse rather than open
		dec = refusal(sip.StatusServiceUnavailable, "Service Unavailable", "invite_no_admission")
	} else {
		dec = gt.decideInvite(d.InviteRequest, time.Now())
	}
	if dec.status == 0 {
		greeting, agent := g.cfg.greeting, ""
		if dec.trunk != nil && dec.trunk.greeting != nil {
			greeting = *dec.trunk.greeting
		}
		if dec.trunk != nil {
			agent = dec.trunk.agent
		}
		return admitted{greeting: greeting, agent: agent, release: dec.release}, true
	}
	if dec.kind != "" {
		callsTotal.WithLabelValues("inbound", "refused").Inc()
		if gt != nil {
			gt.problem(dec, d.InviteRequest)
		} else {
			count(dec.kind)
		}
	}
	if err := d.Respond(dec.status, dec.reason, nil, dec.headers...); err != nil {
		g.log.Debug("cannot refuse INVITE", "status", dec.status, "error", err)
	}
	return admitted{}, false
}

// handleRegister answers a REGISTER to the gateway (softphones).
func (g *gate) handleRegister(req *sip.Request, tx sip.ServerTransaction) {
	dec := g.decideRegister(req, time.Now())
	g.problem(dec, req)
	res := sip.NewResponseFromRequest(req, dec.status, dec.reason, nil)
	for _, h := range dec.headers {
		res.AppendHeader(h)
	}
	if err := tx.Respond(res); err != nil {
		g.log.Debug("cannot answer REGISTER", "error", err)
	}
}
