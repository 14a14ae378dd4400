package main

// Who may call the gateway, and the trunks it registers to (docs/telephony.md, "Trunks,
// registration and admission"). One TOML file, VOICEBUS_SIP_CONFIG, read once at start and
// checked strictly: a typo in a security setting must stop the gateway, never open it.

import (
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/emiago/sipgo/sip"
	"golang.org/x/time/rate"
)

// secret is a password from the file or the environment. It prints as [secret] through fmt and
// slog, and as a pointer inside any struct fmt prints, so no log line or error can carry it.
type secret struct{ value *string }

func newSecret(s string) secret { return secret{&s} }

func (s secret) reveal() string {
	if s.value == nil {
		return ""
	}
	return *s.value
}

func (secret) String() string       { return "[secret]" }
func (secret) GoString() string     { return "[secret]" }
func (secret) LogValue() slog.Value { return slog.StringValue("[secret]") }

// ---- the file ----------------------------------------------------------------------------------

type trunksFile struct {
	MaxCalls    int          `toml:"max_calls"`
	InviteRate  *float64     `toml:"invite_rate"`
	InviteBurst *int         `toml:"invite_burst"`
	Realm       string       `toml:"realm"`
	Trunks      []trunkEntry `toml:"trunks"`
}

type trunkEntry struct {
	Name     string         `toml:"name"`
	Allow    []string       `toml:"allow"`
	Greeting *string        `toml:"greeting"`
	Agent    string         `toml:"agent"`
	MaxCalls int            `toml:"max_calls"`
	Register *registerEntry `toml:"register"`
	Users    []userEntry    `toml:"users"`
}

type registerEntry struct {
	Registrar   string `toml:"registrar"`
	Username    string `toml:"username"`
	Password    string `toml:"password"`
	PasswordEnv string `toml:"password_env"`
	Expiry      int    `toml:"expiry"`
}

type userEntry struct {
	Username    string `toml:"username"`
	Password    string `toml:"password"`
	PasswordEnv string `toml:"password_env"`
}

// trunkSettings is the file once checked.
type trunkSettings struct {
	maxCalls    int
	inviteRate  rate.Limit // 0: no limit
	inviteBurst int
	realm       string
	trunks      []*trunk
	users       map[string]*sipUser // every trunk's users, by name
}

type trunk struct {
	name     string
	allow    []netip.Prefix
	greeting *string // nil: VOICEBUS_GREETING
	agent    string  // the agent profile its calls get ("": the default)
	maxCalls int
	register *trunkRegistration
	users    int
	active   atomic.Int64
}

type sipUser struct {
	name     string
	password secret
	trunk    *trunk
}

type trunkRegistration struct {
	registrar sip.Uri
	username  string
	password  secret
	expiry    time.Duration
}

const (
	defaultInviteRate  = 5
	defaultInviteBurst = 10
	defaultRealm       = "voicebus"
)

var (
	trunkName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)
	// An agent profile's name, as SessionStart.agent takes it (proto/events.py).
	agentName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	// SIP user names as softphones send them; nothing that needs quoting in a header.
	userName = regexp.MustCompile(`^[A-Za-z0-9_.!~*'()&=+$,;?/%-]{1,64}$`)
)

// loadTrunkSettings reads and checks the file; getenv resolves password_env.
func loadTrunkSettings(path string, getenv func(string) string) (*trunkSettings, error) {
	var f trunksFile
	md, err := toml.DecodeFile(path, &f)
	if err != nil {
		return nil, fmt.Errorf("VOICEBUS_SIP_CONFIG %s: %w", path, err)
	}
	if unknown := md.Undecoded(); len(unknown) > 0 {
		keys := make([]string, len(unknown))
		for i, k := range unknown {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("VOICEBUS_SIP_CONFIG %s: unknown key %s", path, strings.Join(keys, ", "))
	}
	s, err := f.check(getenv)
	if err != nil {
		return nil, fmt.Errorf("VOICEBUS_SIP_CONFIG %s: %w", path, err)
	}
	return s, nil
}

func (f *trunksFile) check(getenv func(string) string) (*trunkSettings, error) {
	s := &trunkSettings{maxCalls: f.MaxCalls, inviteRate: defaultInviteRate,
		inviteBurst: defaultInviteBurst, realm: f.Realm, users: map[string]*sipUser{}}
	if f.MaxCalls < 0 {
		return nil, fmt.Errorf("max_calls: %d: 0 (no limit) or more", f.MaxCalls)
	}
	if r := f.InviteRate; r != nil {
		if *r < 0 || math.IsNaN(*r) || math.IsInf(*r, 0) {
			return nil, fmt.Errorf("invite_rate: %v: INVITEs per second per address, 0 for no limit", *r)
		}
		s.inviteRate = rate.Limit(*r)
	}
	if b := f.InviteBurst; b != nil {
		if *b < 1 {
			return nil, fmt.Errorf("invite_burst: %d: 1 or more", *b)
		}
		s.inviteBurst = *b
	}
	if s.realm == "" {
		s.realm = defaultRealm
	} else if strings.ContainsAny(s.realm, "\"\\\r\n") {
		return nil, fmt.Errorf("realm: no quotes, backslashes or line breaks")
	}
	if len(f.Trunks) == 0 {
		return nil, fmt.Errorf("trunks: none; write at least one [[trunks]] with allow or users")
	}
	for i := range f.Trunks {
		t, users, err := f.Trunks[i].check(fmt.Sprintf("trunks[%d]", i), getenv)
		if err != nil {
			return nil, err
		}
		for _, other := range s.trunks {
			if other.name == t.name {
				return nil, fmt.Errorf("trunks[%d].name: %q is used twice", i, t.name)
			}
		}
		for _, u := range users {
			if _, taken := s.users[u.name]; taken {
				return nil, fmt.Errorf("trunks[%d] (%s).users: %q is a user of another trunk too", i, t.name, u.name)
			}
			s.users[u.name] = u
		}
		s.trunks = append(s.trunks, t)
	}
	return s, nil
}

func (e *trunkEntry) check(where string, getenv func(string) string) (*trunk, []*sipUser, error) {
	if !trunkName.MatchString(e.Name) {
		return nil, nil, fmt.Errorf("%s.name: %q: 1-64 of A-Z a-z 0-9 _ . -", where, e.Name)
	}
	where = fmt.Sprintf("%s (%s)", where, e.Name)
	t := &trunk{name: e.Name, greeting: e.Greeting, agent: e.Agent, maxCalls: e.MaxCalls}
	if e.Agent != "" && !agentName.MatchString(e.Agent) {
		return nil, nil, fmt.Errorf("%s.agent: %q: 1-64 of A-Z a-z 0-9 _ -", where, e.Agent)
	}
	if e.MaxCalls < 0 {
		return nil, nil, fmt.Errorf("%s.max_calls: %d: 0 (no limit) or more", where, e.MaxCalls)
	}
	for _, a := range e.Allow {
		p, err := parseAllowed(a)
		if err != nil {
			return nil, nil, fmt.Errorf("%s.allow: %w", where, err)
		}
		t.allow = append(t.allow, p)
	}
	var users []*sipUser
	for j, u := range e.Users {
		at := fmt.Sprintf("%s.users[%d]", where, j)
		if !userName.MatchString(u.Username) {
			return nil, nil, fmt.Errorf("%s.username: %q: 1-64 characters a SIP user name may hold", at, u.Username)
		}
		pw, err := passwordOf(fmt.Sprintf("%s (%s)", at, u.Username), u.Password, u.PasswordEnv, getenv)
		if err != nil {
			return nil, nil, err
		}
		users = append(users, &sipUser{name: u.Username, password: pw, trunk: t})
	}
	t.users = len(users)
	if e.Register != nil {
		reg, err := e.Register.check(where+".register", getenv)
		if err != nil {
			return nil, nil, err
		}
		if len(t.allow) == 0 {
			return nil, nil, fmt.Errorf("%s: register needs allow too: the addresses the provider's calls come from", where)
		}
		t.register = reg
	}
	if len(t.allow) == 0 && len(users) == 0 {
		return nil, nil, fmt.Errorf("%s: admits nobody; give it allow, users or both", where)
	}
	return t, users, nil
}

func (e *registerEntry) check(where string, getenv func(string) string) (*trunkRegistration, error) {
	r := &trunkRegistration{username: e.Username, expiry: time.Duration(e.Expiry) * time.Second}
	if err := sip.ParseUri(e.Registrar, &r.registrar); err != nil || r.registrar.Host == "" ||
		(r.registrar.Scheme != "sip" && r.registrar.Scheme != "sips") {
		return nil, fmt.Errorf("%s.registrar: %q: a SIP URI such as sip:sip.example.com;transport=tcp", where, e.Registrar)
	}
	if r.registrar.Password != "" {
		return nil, fmt.Errorf("%s.registrar: no password in the URI; use password or password_env", where)
	}
	if !userName.MatchString(e.Username) {
		return nil, fmt.Errorf("%s.username: %q: 1-64 characters a SIP user name may hold", where, e.Username)
	}
	pw, err := passwordOf(where, e.Password, e.PasswordEnv, getenv)
	if err != nil {
		return nil, err
	}
	r.password = pw
	if e.Expiry == 0 {
		r.expiry = time.Hour
	} else if e.Expiry < 60 || e.Expiry > 86400 {
		return nil, fmt.Errorf("%s.expiry: %d: seconds, 60 to 86400", where, e.Expiry)
	}
	return r, nil
}

// passwordOf takes the password from the file or from the environment variable named there.
func passwordOf(where, password, env string, getenv func(string) string) (secret, error) {
	switch {
	case password != "" && env != "":
		return secret{}, fmt.Errorf("%s: password and password_env both set; keep one", where)
	case password != "":
		return newSecret(password), nil
	case env != "":
		if v := getenv(env); v != "" {
			return newSecret(v), nil
		}
		return secret{}, fmt.Errorf("%s.password_env: the variable %s is not set or empty", where, env)
	}
	return secret{}, fmt.Errorf("%s: needs password or password_env", where)
}

// parseAllowed reads one allow entry: an address or a CIDR, never a host name (DNS would make
// the allow list change behind the operator's back).
func parseAllowed(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("%q is not an IP address or CIDR", s)
}

func (s *trunkSettings) trunkFor(src netip.Addr) *trunk {
	for _, t := range s.trunks {
		for _, p := range t.allow {
			if p.Contains(src) {
				return t
			}
		}
	}
	return nil
}

// isLoopbackHost: with no config file the gateway takes calls from anyone, so only here.
func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}
