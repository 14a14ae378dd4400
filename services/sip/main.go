// voicebus-sip: voicebus's own SIP gateway (docs/telephony.md, "the bus contract").
//
// It answers inbound calls (PCMU/PCMA at 8 kHz, diago doing SIP, SDP and RTP) that the trunks
// file admits, and places outbound ones asked for on the bus (dial.go); each call is a phone
// session on the bus as the role `sip`: the caller's audio, put in order by a jitter buffer,
// goes out as 20 ms AudioFrames on `voice.<session>.sip.audio` (continuous, silence included),
// the keys on `sip.dtmf`; the agent's `egress.audio` frames come back as RTP. The call ends
// either way: the caller's BYE becomes a SessionEnd on `ctl.end`; `floor.end` (the agent's
// goodbye) or `ctl.end` from elsewhere becomes a BYE.
//
// Environment: VOICEBUS_NATS_URL (comma-separated), VOICEBUS_NATS_NKEY_FILE,
// VOICEBUS_NATS_TLS_CA, VOICEBUS_METRICS_PORT (and _ADDR; /metrics, /healthz, /readyz),
// VOICEBUS_SIP_LISTEN (host:port, default 127.0.0.1:5060), VOICEBUS_SIP_TRANSPORTS (default
// "udp,tcp"), VOICEBUS_SIP_EXTERNAL_HOST (the address put in Contact and SDP when it differs
// from the bound one), VOICEBUS_GREETING, VOICEBUS_LOG_LEVEL, VOICEBUS_SIP_CONFIG (the trunks
// file, trunks.go; without one, loopback only), and the phone settings of dial.go:
// VOICEBUS_SIP_RING_MS, VOICEBUS_SIP_JITTER_MS, VOICEBUS_SIP_DIAL_TRUNK, VOICEBUS_SIP_RTP_PORTS.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/diago/media"
	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
	"github.com/nats-io/nats.go"
)

// The NATS server lets each role read only its own inboxes (voicebus/launcher.py inbox_prefix).
const (
	role        = "sip"
	inboxPrefix = "_INBOX." + role
)

type config struct {
	natsURL     string
	nkeyFile    string
	tlsCA       string
	listen      string
	transports  []string
	external    string
	greeting    string
	metricsAddr string
	metricsPort int
	trunksFile  string
	// The gate every INVITE and REGISTER passes (trunks.go), built from trunksFile at start.
	admission *gate
}

func env(name, def string) string {
	if v := strings.TrimSpace(os.Getenv(name)); v != "" {
		return v
	}
	return def
}

func configFromEnv() (config, error) {
	metricsPort, err := strconv.Atoi(env("VOICEBUS_METRICS_PORT", "0"))
	if err != nil || metricsPort < 0 || metricsPort > 65535 {
		return config{}, fmt.Errorf("VOICEBUS_METRICS_PORT %q: not a port", os.Getenv("VOICEBUS_METRICS_PORT"))
	}
	var transports []string
	for _, t := range strings.Split(env("VOICEBUS_SIP_TRANSPORTS", "udp,tcp"), ",") {
		if t = strings.ToLower(strings.TrimSpace(t)); t != "" {
			transports = append(transports, t)
		}
	}
	return config{
		natsURL:     env("VOICEBUS_NATS_URL", "nats://127.0.0.1:4222"),
		nkeyFile:    env("VOICEBUS_NATS_NKEY_FILE", ""),
		tlsCA:       env("VOICEBUS_NATS_TLS_CA", ""),
		listen:      env("VOICEBUS_SIP_LISTEN", "127.0.0.1:5060"),
		transports:  transports,
		external:    env("VOICEBUS_SIP_EXTERNAL_HOST", ""),
		greeting:    os.Getenv("VOICEBUS_GREETING"),
		metricsAddr: env("VOICEBUS_METRICS_ADDR", "127.0.0.1"),
		metricsPort: metricsPort,
		trunksFile:  env("VOICEBUS_SIP_CONFIG", ""),
	}, nil
}

func logLevel() slog.Level {
	var level slog.Level
	if err := level.UnmarshalText([]byte(env("VOICEBUS_LOG_LEVEL", "info"))); err != nil {
		return slog.LevelInfo
	}
	return level
}

// connectAttempts bounds the tries of the first connection. nats-server sends a PING of its own
// two seconds after a client's CONNECT (to time the round trip); when our PING follows our
// CONNECT by more than that (a stalled process on a loaded machine), the server's PING reaches
// us before the PONG that answers our handshake, and nats.go refuses the connection. That
// is worth another try, not a gateway that fails to start (services/runtime/bus.py, HalfOpen,
// is the same case in nats-py).
const connectAttempts = 3

func connectNATS(cfg config, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name("voicebus-sip"),
		nats.CustomInboxPrefix(inboxPrefix),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			setReady(false)
			if err != nil { // nil: our own close
				log.Warn("nats disconnected", "error", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			setReady(true)
			log.Info("nats reconnected", "url", nc.ConnectedUrl())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("nats error", "subject", subject, "error", err)
		}),
	}
	if cfg.nkeyFile != "" {
		opt, err := nats.NkeyOptionFromSeed(cfg.nkeyFile)
		if err != nil {
			return nil, fmt.Errorf("VOICEBUS_NATS_NKEY_FILE %s: %w", cfg.nkeyFile, err)
		}
		opts = append(opts, opt)
	}
	if cfg.tlsCA != "" {
		opts = append(opts, nats.RootCAs(cfg.tlsCA))
	}
	for attempt := 1; ; attempt++ {
		nc, err := nats.Connect(cfg.natsURL, opts...)
		if err == nil || attempt == connectAttempts || !strings.Contains(err.Error(), "got 'PING'") {
			return nc, err
		}
		log.Warn("nats-server sent its PING before its PONG while we connected; connecting again",
			"attempt", attempt, "error", err)
	}
}

func run() error {
	log := slog.New(newQuietHandler(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel()})))
	slog.SetDefault(log)
	cfg, err := configFromEnv()
	if err != nil {
		return err
	}

	host, portText, err := net.SplitHostPort(cfg.listen)
	if err != nil {
		return fmt.Errorf("VOICEBUS_SIP_LISTEN %q: %w", cfg.listen, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 0 || port > 65535 {
		return fmt.Errorf("VOICEBUS_SIP_LISTEN %q: bad port", cfg.listen)
	}
	if len(cfg.transports) == 0 {
		return fmt.Errorf("VOICEBUS_SIP_TRANSPORTS names no transport")
	}
	settings, err := trunksFor(cfg, host)
	if err != nil {
		return err
	}
	cfg.admission = newGate(settings, log)
	logTrunks(log, settings)
	// A bad setting stops the gateway now: one that rings for the wrong time or cannot dial is
	// worse than one that does not start.
	phone, err := phoneSettingsFromEnv(os.Getenv)
	if err != nil {
		return err
	}
	if phone.rtpLow > 0 { // diago's pool is process-wide: this gateway is the process
		media.RTPPortStart, media.RTPPortEnd = phone.rtpLow, phone.rtpHigh
	}

	nc, err := connectNATS(cfg, log)
	if err != nil {
		return fmt.Errorf("nats %s: %w", cfg.natsURL, err)
	}
	defer nc.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := serveMetrics(ctx, cfg.metricsAddr, cfg.metricsPort, log); err != nil {
		return fmt.Errorf("VOICEBUS_METRICS_PORT %d: %w", cfg.metricsPort, err)
	}

	// Responses no transaction takes: a callee answering a dial given up on (stray.go).
	strays := newStrayAnswers(log)
	ua, err := sipgo.NewUA(sipgo.WithUserAgent("voicebus-sip"),
		sipgo.WithUserAgentTransactionLayerOptions(
			sip.WithTransactionLayerUnhandledResponseHandler(strays.handle)))
	if err != nil {
		return err
	}
	defer ua.Close()
	// diago and sipgo log every malformed message they drop: keep them to warnings.
	libLevel := slog.LevelWarn
	if logLevel() < slog.LevelInfo {
		libLevel = logLevel()
	}
	libLog := slog.New(newQuietHandler(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: libLevel}))).With("lib", "diago")
	// Our own server under diago's, to answer REGISTER (softphones) beside diago's methods.
	srv, err := sipgo.NewServer(ua, sipgo.WithServerLogger(libLog))
	if err != nil {
		return err
	}
	opts := []diago.DiagoOption{diago.WithLogger(libLog), diago.WithServer(srv)}
	for _, t := range cfg.transports {
		opts = append(opts, diago.WithTransport(diago.Transport{
			Transport: t, BindHost: host, BindPort: port, ExternalHost: cfg.external,
		}))
	}
	dg := diago.NewDiago(ua, opts...)
	srv.OnRegister(cfg.admission.handleRegister)
	gw := &gateway{nc: nc, cfg: cfg, log: log, ctx: ctx, phone: phone, strays: strays}
	if err := startDialer(gw, dg); err != nil { // dial.go: dial requests from the bus
		return err
	}
	if err := dg.ServeBackground(ctx, gw.handle); err != nil {
		return fmt.Errorf("SIP listen on %s: %w", cfg.listen, err)
	}
	registrations := cfg.admission.registerTrunks(ctx, dg)
	setReady(true)
	log.Info("voicebus-sip ready", "listen", cfg.listen, "transports", strings.Join(cfg.transports, ","),
		"nats", nc.ConnectedUrl())
	<-ctx.Done()
	setReady(false)
	log.Info("voicebus-sip stopping: hanging up calls")
	gw.wait(5 * time.Second)
	registrations() // each trunk unregistered, or given up after 2 s
	if err := nc.Drain(); err != nil {
		log.Warn("nats drain", "error", err)
	}
	return nil
}

// trunksFor reads VOICEBUS_SIP_CONFIG. Without one the gateway takes calls from anyone, which
// only a loopback listen address makes safe: anywhere else it refuses to start.
func trunksFor(cfg config, host string) (*trunkSettings, error) {
	if cfg.trunksFile == "" {
		if !isLoopbackHost(host) {
			return nil, fmt.Errorf("VOICEBUS_SIP_LISTEN %s is not a loopback address and VOICEBUS_SIP_CONFIG "+
				"is not set: anyone who reaches it could call the agent. Write a trunks file with the "+
				"addresses each trunk calls from (allow) or softphone users (deploy/sip/trunks.example.toml, "+
				"docs/telephony.md) and set VOICEBUS_SIP_CONFIG to its path", cfg.listen)
		}
		return nil, nil
	}
	s, err := loadTrunkSettings(cfg.trunksFile, os.Getenv)
	if err != nil {
		return nil, err
	}
	for _, t := range s.trunks {
		if t.register == nil {
			continue
		}
		want, ok := t.register.registrar.UriParams.Get("transport")
		if !ok {
			want = "udp" // diago's default for a REGISTER
		}
		if !slices.ContainsFunc(cfg.transports, func(have string) bool {
			return strings.TrimRight(have, "46") == strings.ToLower(want)
		}) {
			return nil, fmt.Errorf("VOICEBUS_SIP_CONFIG %s: trunk %s registers over %s, which "+
				"VOICEBUS_SIP_TRANSPORTS (%s) does not serve", cfg.trunksFile, t.name, want,
				strings.Join(cfg.transports, ","))
		}
	}
	return s, nil
}

func logTrunks(log *slog.Logger, s *trunkSettings) {
	if s == nil {
		log.Info("no VOICEBUS_SIP_CONFIG: taking calls from anyone (loopback only)")
		return
	}
	names := make([]string, len(s.trunks))
	for i, t := range s.trunks {
		names[i] = t.name
	}
	log.Info("trunks loaded", "trunks", strings.Join(names, ","), "users", len(s.users),
		"max_calls", s.maxCalls, "invite_rate", float64(s.inviteRate), "invite_burst", s.inviteBurst)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "voicebus-sip:", err)
		os.Exit(1)
	}
}
