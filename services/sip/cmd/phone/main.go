// voicebus-phone: a SIP phone for benchmarks (`voicebus bench sip`, docs/benchmarks.md).
//
// It places N concurrent calls to a SIP URI with diago as the calling user agent, offering PCMU
// only. Each call streams 20 ms PCMU RTP packets in real time for its whole length (silence
// when it is not speaking, as a handset's microphone does) and asks T questions, each an 8 kHz
// mono s16le file (-audio), once the agent has fallen quiet (after its greeting, with
// -greeting, if one comes). Per question it records the wall
// clock when the packet carrying the question's last speech left (the last 20 ms frame with a
// sample above -threshold) and when the first packet from the far end carrying voice (a decoded
// sample above -threshold) arrived: voice to voice as the caller hears it. At the end it hangs
// up with BYE.
//
// It knows only SIP and RTP: nothing here reads the bus, so what it measures is what a phone on
// the other side of the gateway would see.
//
// Output: one JSON line per question ("type":"turn"), per call ("type":"call") and one at the
// end ("type":"done") on stdout; diagnostics on stderr. Exit 0 when every call was answered and
// every question heard an answer, 1 otherwise, 2 for bad arguments.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/diago/media"
	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
)

type options struct {
	uri       sip.Uri
	calls     int
	turns     int
	questions []question
	from      string
	bind      string
	spread    time.Duration
	greeting  time.Duration
	lead      time.Duration
	gap       time.Duration
	timeout   time.Duration
	threshold int
	record    string
}

func parseOptions(args []string) (options, error) {
	fs := flag.NewFlagSet("voicebus-phone", flag.ContinueOnError)
	uri := fs.String("uri", "", "the SIP URI to call, e.g. sip:agent@127.0.0.1:5060")
	calls := fs.Int("calls", 1, "concurrent calls")
	turns := fs.Int("turns", 1, "questions per call")
	audio := fs.String("audio", "", "comma-separated 8 kHz mono s16le files: question t is file (t-1) mod n")
	from := fs.String("from", "phone-", "caller user prefix: call i calls from <prefix><i>")
	bind := fs.String("bind", "127.0.0.1", "local address for SIP and RTP")
	spread := fs.Duration("spread", 0, "call starts spread evenly over this")
	greeting := fs.Duration("greeting", 0, "wait up to this for the agent to speak first and fall quiet before the first question (0: no greeting expected)")
	lead := fs.Duration("lead", 500*time.Millisecond, "silence before the first question when no greeting came")
	gap := fs.Duration("gap", 1500*time.Millisecond, "quiet after the agent's last voiced packet that ends its reply")
	timeout := fs.Duration("timeout", 30*time.Second, "longest wait for an answer to the call, the greeting or a reply")
	threshold := fs.Int("threshold", 500, "a sample above this magnitude (of 32767) is voice")
	record := fs.String("record", "", "folder for call-<i>.wav: what each call heard")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	o := options{calls: *calls, turns: *turns, from: *from, bind: *bind, spread: *spread,
		greeting: *greeting, lead: *lead, gap: *gap, timeout: *timeout, threshold: *threshold,
		record: *record}
	if err := sip.ParseUri(*uri, &o.uri); err != nil || *uri == "" {
		return o, fmt.Errorf("-uri %q: not a SIP URI", *uri)
	}
	if o.calls < 1 || o.turns < 0 || o.threshold < 0 || o.gap <= 0 || o.timeout <= 0 || o.greeting < 0 {
		return o, errors.New("-calls must be ≥ 1; -turns, -threshold, -greeting ≥ 0; -gap, -timeout > 0")
	}
	for _, path := range strings.Split(*audio, ",") {
		if path = strings.TrimSpace(path); path == "" {
			continue
		}
		q, err := loadQuestion(path, o.threshold)
		if err != nil {
			return o, err
		}
		o.questions = append(o.questions, q)
	}
	if len(o.questions) == 0 && o.turns > 0 {
		return o, errors.New("-audio: no question to ask")
	}
	return o, nil
}

// report prints one JSON line; lines from concurrent calls never interleave.
type report struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (r *report) line(v any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	_ = r.enc.Encode(v)
}

func newPhone(ctx context.Context, o options, log *slog.Logger) (*diago.Diago, error) {
	ua, err := sipgo.NewUA(sipgo.WithUserAgent("voicebus-phone"))
	if err != nil {
		return nil, err
	}
	dg := diago.NewDiago(ua,
		diago.WithLogger(log.With("lib", "diago")),
		diago.WithTransport(diago.Transport{Transport: "udp", BindHost: o.bind, BindPort: 0}),
		diago.WithMediaConfig(diago.MediaConfig{Codecs: []media.Codec{media.CodecAudioUlaw}}))
	// Listening is what lets the far end's in-dialog requests (its BYE) reach us; calls to the
	// phone itself are refused.
	err = dg.ServeBackground(ctx, func(d *diago.DialogServerSession) {
		_ = d.Respond(sip.StatusBusyHere, "Busy Here", nil)
	})
	return dg, err
}

func run(args []string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	o, err := parseOptions(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, "voicebus-phone:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	dg, err := newPhone(ctx, o, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "voicebus-phone: SIP listen:", err)
		return 1
	}
	out := &report{enc: json.NewEncoder(os.Stdout)}
	began := time.Now()
	results := make([]callResult, o.calls)
	var wg sync.WaitGroup
	for i := range o.calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if o.spread > 0 && !sleepCtx(ctx, o.spread*time.Duration(i)/time.Duration(o.calls)) {
				results[i] = callResult{Type: "call", Call: i, From: callerOf(o, i), Error: "stopped before dialling"}
				out.line(results[i])
				return
			}
			results[i] = placeCall(ctx, dg, o, i, out)
			out.line(results[i])
		}()
	}
	wg.Wait()
	done := summarise(results, o.turns, time.Since(began))
	out.line(done)
	if done.Answered == o.calls && done.TurnsOK == o.calls*o.turns {
		return 0
	}
	return 1
}

type doneLine struct {
	Type     string  `json:"type"`
	Calls    int     `json:"calls"`
	Answered int     `json:"answered"`
	TurnsOK  int     `json:"turns_ok"`
	WallS    float64 `json:"wall_s"`
	CPUS     float64 `json:"cpu_s"` // this process's own CPU: the phone shares the machine
}

func summarise(results []callResult, turns int, wall time.Duration) doneLine {
	d := doneLine{Type: "done", Calls: len(results), WallS: round(wall.Seconds(), 2), CPUS: round(cpuSeconds(), 2)}
	for _, r := range results {
		if r.Answered {
			d.Answered++
		}
		d.TurnsOK += r.TurnsOK
	}
	return d
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func main() {
	os.Exit(run(os.Args[1:]))
}
