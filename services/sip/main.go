// voicebus-sip: voicebus's own SIP gateway (docs/telephony.md, "the bus contract").
//
// It answers inbound calls (PCMU/PCMA at 8 kHz, diago doing SIP, SDP and RTP), starts a phone
// session per call on the bus as the role `sip`, publishes the caller's audio as 20 ms
// AudioFrames on `voice.<session>.sip.audio` (continuous, silence included) and the keys on
// `sip.dtmf`, plays the agent's `egress.audio` frames back as RTP, and ends the call either way:
// the caller's BYE becomes a SessionEnd on `ctl.end`; `floor.end` (the agent's goodbye) or
// `ctl.end` from elsewhere becomes a BYE.
//
// Environment: VOICEBUS_NATS_URL (comma-separated), VOICEBUS_NATS_NKEY_FILE,
// VOICEBUS_NATS_TLS_CA, VOICEBUS_METRICS_PORT (and _ADDR; /metrics, /healthz, /readyz), VOICEBUS_SIP_LISTEN (host:port, default 127.0.0.1:5060),
// VOICEBUS_SIP_TRANSPORTS (default "udp,tcp"), VOICEBUS_SIP_EXTERNAL_HOST (the address put in
// Contact and SDP when it differs from the bound one), VOICEBUS_GREETING, VOICEBUS_LOG_LEVEL.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/sipgo"
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
	}, nil
}

func logLevel() slog.Level {
	var level slog.Level
	if err := level.UnmarshalText([]byte(env("VOICEBUS_LOG_LEVEL", "info"))); err != nil {
		return slog.LevelInfo
	}
	return level
}

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
	return nats.Connect(cfg.natsURL, opts...)
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

	ua, err := sipgo.NewUA(sipgo.WithUserAgent("voicebus-sip"))
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
	opts := []diago.DiagoOption{diago.WithLogger(libLog)}
	for _, t := range cfg.transports {
		opts = append(opts, diago.WithTransport(diago.Transport{
			Transport: t, BindHost: host, BindPort: port, ExternalHost: cfg.external,
		}))
	}
	dg := diago.NewDiago(ua, opts...)
	gw := &gateway{nc: nc, cfg: cfg, log: log, ctx: ctx}
	if err := dg.ServeBackground(ctx, gw.handle); err != nil {
		return fmt.Errorf("SIP listen on %s: %w", cfg.listen, err)
	}
	setReady(true)
	log.Info("voicebus-sip ready", "listen", cfg.listen, "transports", strings.Join(cfg.transports, ","),
		"nats", nc.ConnectedUrl())
	<-ctx.Done()
	setReady(false)
	log.Info("voicebus-sip stopping: hanging up calls")
	gw.wait(5 * time.Second)
	if err := nc.Drain(); err != nil {
		log.Warn("nats drain", "error", err)
	}
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "voicebus-sip:", err)
		os.Exit(1)
	}
}
