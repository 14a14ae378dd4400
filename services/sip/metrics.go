package main

// The gateway's Prometheus metrics, and its probes, on VOICEBUS_METRICS_PORT (as the Python
// stages serve theirs: /metrics, /healthz, /readyz).

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

var (
	// Every refused, malformed or suspicious thing the gateway met, by kind: the test and the
	// operator read the same counter ("Bad input is logged once, counted, and survived").
	problems = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "voicebus_sip_problems_total",
		Help: "Bad or refused input met by the SIP gateway, by kind.",
	}, []string{"kind"})
	callsTotal = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "voicebus_sip_calls_total",
		Help: "Calls by direction (inbound, outbound) and how they ended (answered, refused, failed).",
	}, []string{"direction", "outcome"})
	phoneActionsTotal = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "voicebus_sip_phone_actions_total",
		Help: "The agent's phone actions (dtmf, transfer) by outcome.",
	}, []string{"action", "outcome"})
	callsActive = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "voicebus_sip_calls_active",
		Help: "Calls in progress.",
	})
	ready = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "voicebus_ready",
		Help: "1 while the gateway takes calls (SIP listening, bus connected), else 0.",
	})
	readyFlag atomic.Bool
)

// count one problem of this kind (snake_case, a fixed set: never caller-controlled text).
func count(kind string) { problems.WithLabelValues(kind).Inc() }

func setReady(ok bool) {
	readyFlag.Store(ok)
	if ok {
		ready.Set(1)
	} else {
		ready.Set(0)
	}
}

// serveMetrics serves /metrics, /healthz and /readyz on 127.0.0.1:port (or addr:port) until ctx
// ends; nothing when port is 0.
func serveMetrics(ctx context.Context, addr string, port int, log *slog.Logger) error {
	if port == 0 {
		return nil
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.Handler())
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !readyFlag.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready\n"))
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	ln, err := net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(port)))
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics server stopped", "error", err)
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	return nil
}
