package main

// Registering to trunks (Exotel-style): REGISTER with digest, refreshed, retried with backoff.

import (
	"context"
	"log/slog"
	mrand "math/rand/v2"
	"sync"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/sipgo/sip"
)

// ---- registering to trunks ---------------------------------------------------------------------

const (
	firstRetry = 2 * time.Second
	lastRetry  = 5 * time.Minute
)

// nextRetry doubles the wait up to lastRetry.
func nextRetry(wait time.Duration) time.Duration { return min(2*wait, lastRetry) }

// jittered spreads retries by ±20 % so that gateways restarted together do not retry together.
func jittered(wait time.Duration) time.Duration {
	return time.Duration(float64(wait) * (0.8 + 0.4*mrand.Float64()))
}

// registerTrunks keeps every trunk with a register block registered until ctx ends, then
// unregisters; the returned function waits for that.
func (g *gate) registerTrunks(ctx context.Context, dg *diago.Diago) (wait func()) {
	var wg sync.WaitGroup
	if g.settings != nil {
		for _, t := range g.settings.trunks {
			if t.register != nil {
				wg.Add(1)
				go func() { defer wg.Done(); g.keepRegistered(ctx, dg, t) }()
			}
		}
	}
	return wg.Wait
}

func (g *gate) keepRegistered(ctx context.Context, dg *diago.Diago, t *trunk) {
	r := t.register
	log := g.log.With("trunk", t.name, "registrar", r.registrar.String())
	wait, failing := firstRetry, false
	for ctx.Err() == nil {
		tx, err := register(ctx, dg, r)
		if err == nil {
			log.Info("registered", "username", r.username, "expiry", r.expiry)
			wait, failing = firstRetry, false
			err = tx.QualifyLoop(ctx) // refreshes until a refresh fails or ctx ends
			if ctx.Err() != nil {
				unregister(tx, log)
				return
			}
		}
		if ctx.Err() != nil {
			return
		}
		count("trunk_register_failed")
		if !failing { // once per outage; the quiet handler keys on the text, hence the name in it
			log.Warn("registration to trunk "+t.name+" failed; retrying with backoff, repeats only counted",
				"error", err)
			failing = true
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(jittered(wait)):
		}
		wait = nextRetry(wait)
	}
}

// register sends one REGISTER (answering the registrar's digest challenge) with the trunk's
// user as the address of record and the contact.
func register(ctx context.Context, dg *diago.Diago, r *trunkRegistration) (*diago.RegisterTransaction, error) {
	tx, err := dg.RegisterTransaction(ctx, r.registrar, diago.RegisterOptions{
		Username: r.username, Password: r.password.reveal(), Expiry: r.expiry})
	if err != nil {
		return nil, err
	}
	aor := sip.Uri{Scheme: r.registrar.Scheme, User: r.username, Host: r.registrar.Host}
	if r.registrar.User != "" {
		aor.User = r.registrar.User
	}
	from := &sip.FromHeader{Address: aor, Params: sip.NewParams()}
	from.Params.Add("tag", sip.GenerateTagN(16))
	tx.Origin.AppendHeader(from)
	tx.Origin.AppendHeader(&sip.ToHeader{Address: aor, Params: sip.NewParams()})
	if c := tx.Origin.Contact(); c != nil {
		c.Address.User = r.username // calls for this trunk come to its user
	}
	return tx, tx.Register(ctx)
}

func unregister(tx *diago.RegisterTransaction, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := tx.Unregister(ctx); err != nil {
		log.Info("unregister failed", "error", err)
	} else {
		log.Info("unregistered")
	}
}
