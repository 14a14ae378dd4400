package main

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// quietHandler logs a warning or error once per message text and minute: bad input from the
// network (sipgo logs each unparsable datagram) must not flood the log. Repeats are counted
// and reported with the next line of that message.
type quietHandler struct {
	slog.Handler
	state *quietState
}

type quietState struct {
	mu   sync.Mutex
	seen map[string]*quietEntry
}

type quietEntry struct {
	last       time.Time
	suppressed int
}

const quietEvery = time.Minute

func newQuietHandler(h slog.Handler) slog.Handler {
	return &quietHandler{Handler: h, state: &quietState{seen: map[string]*quietEntry{}}}
}

func (q *quietHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		return q.Handler.Handle(ctx, r)
	}
	q.state.mu.Lock()
	e := q.state.seen[r.Message]
	if e == nil {
		if len(q.state.seen) > 1000 { // bounded: forget everything rather than grow
			q.state.seen = map[string]*quietEntry{}
		}
		e = &quietEntry{}
		q.state.seen[r.Message] = e
	} else if r.Time.Sub(e.last) < quietEvery {
		e.suppressed++
		q.state.mu.Unlock()
		return nil
	}
	e.last = r.Time
	suppressed := e.suppressed
	e.suppressed = 0
	q.state.mu.Unlock()
	if suppressed > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Int("repeats_not_logged", suppressed))
	}
	return q.Handler.Handle(ctx, r)
}

func (q *quietHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &quietHandler{Handler: q.Handler.WithAttrs(attrs), state: q.state}
}

func (q *quietHandler) WithGroup(name string) slog.Handler {
	return &quietHandler{Handler: q.Handler.WithGroup(name), state: q.state}
}
