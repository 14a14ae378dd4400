package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emiago/diago"
	"github.com/emiago/sipgo"
	"github.com/emiago/sipgo/sip"
	"github.com/zaf/g711"
)

// tone is ms of a 440 Hz tone (amplitude 8000) as s16le at 8 kHz.
func tone(ms int) []byte {
	pcm := make([]byte, sampleRate*ms/1000*2)
	for i := 0; i < len(pcm)/2; i++ {
		v := int16(8000 * math.Sin(2*math.Pi*440*float64(i)/sampleRate))
		binary.LittleEndian.PutUint16(pcm[2*i:], uint16(v))
	}
	return pcm
}

func TestAQuestionEndsAtItsLastLoudFrame(t *testing.T) {
	path := filepath.Join(t.TempDir(), "q.s16")
	// 100 ms of silence, 300 ms of tone, 200 ms of silence: frames 5 to 19 carry speech.
	pcm := append(append(make([]byte, 1600), tone(300)...), make([]byte, 3200)...)
	if err := os.WriteFile(path, pcm, 0o600); err != nil {
		t.Fatal(err)
	}
	q, err := loadQuestion(path, 500)
	if err != nil {
		t.Fatal(err)
	}
	if len(q.payloads) != 30 || q.lastSpeech != 19 || len(q.payloads[0]) != 160 {
		t.Fatalf("got %d payloads, last speech %d", len(q.payloads), q.lastSpeech)
	}
	if err := os.WriteFile(path, make([]byte, 3200), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadQuestion(path, 500); err == nil || !strings.Contains(err.Error(), "nothing is said") {
		t.Fatalf("a silent file must be refused, got %v", err)
	}
}

func freeUDPPort(t *testing.T) int {
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.LocalAddr().(*net.UDPAddr).Port
}

// agent answers calls like a tiny voice agent: it greets with 200 ms of tone if greet is set,
// and once the caller has spoken and been quiet for 200 ms it plays 200 ms of tone. Each call
// ended by the caller's BYE is reported on byes.
type agent struct {
	greet bool
	byes  chan struct{}
}

func (a *agent) handle(d *diago.DialogServerSession) {
	_ = d.Trying()
	med, err := d.Answer(diago.AnswerOptions{})
	if err != nil {
		return
	}
	r, _ := med.AudioReader()
	w, _ := med.AudioWriter()
	replies := make(chan struct{}, 4)
	if a.greet {
		replies <- struct{}{}
	}
	go func() {
		buf := make([]byte, 1500)
		spoke := false
		var lastLoud time.Time
		for {
			n, err := r.Read(buf)
			if err != nil {
				return
			}
			// 200 ms of quiet on the clock, not ten quiet packets: a caller that fell behind
			// sends the packets it owes in a burst, and ten of them can arrive at once.
			if peak(g711.DecodeUlaw(buf[:n])) > 500 {
				spoke, lastLoud = true, time.Now()
			} else if spoke && time.Since(lastLoud) >= 200*time.Millisecond {
				spoke = false
				replies <- struct{}{}
			}
		}
	}()
	reply := g711.EncodeUlaw(tone(200))
	for {
		select {
		case <-replies:
			for i := 0; i < len(reply); i += 160 {
				_, _ = w.Write(reply[i : i+160]) // paced by diago's writer, 20 ms a packet
			}
		case <-d.Context().Done():
			a.byes <- struct{}{}
			return
		}
	}
}

func TestThePhoneTimesEachAnswerAndHangsUp(t *testing.T) {
	for _, greet := range []bool{true, false} {
		t.Run(map[bool]string{true: "greeted", false: "no greeting"}[greet], func(t *testing.T) {
			callAgent(t, greet)
		})
	}
}

// callAgent makes two calls of two questions each to an agent, the phone waiting for a
// greeting up to 1 s: one comes, or the phone asks anyway and says none came.
func callAgent(t *testing.T, greet bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	port := freeUDPPort(t)
	ua, _ := sipgo.NewUA()
	defer ua.Close()
	server := diago.NewDiago(ua, diago.WithLogger(log),
		diago.WithTransport(diago.Transport{Transport: "udp", BindHost: "127.0.0.1", BindPort: port}))
	a := &agent{greet: greet, byes: make(chan struct{}, 2)}
	if err := server.ServeBackground(ctx, a.handle); err != nil {
		t.Fatal(err)
	}

	path := filepath.Join(t.TempDir(), "q.s16")
	if err := os.WriteFile(path, append(tone(300), make([]byte, 1600)...), 0o600); err != nil {
		t.Fatal(err)
	}
	q, err := loadQuestion(path, 500)
	if err != nil {
		t.Fatal(err)
	}
	o := options{calls: 2, turns: 2, questions: []question{q}, from: "t-", bind: "127.0.0.1",
		greeting: time.Second, lead: 100 * time.Millisecond, gap: 400 * time.Millisecond,
		timeout: 10 * time.Second, threshold: 500, record: t.TempDir()}
	if err := sip.ParseUri("sip:agent@127.0.0.1:"+strconv.Itoa(port), &o.uri); err != nil {
		t.Fatal(err)
	}
	phone, err := newPhone(ctx, o, log)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	rep := &report{enc: json.NewEncoder(&out)}
	for i := range o.calls {
		res := placeCall(ctx, phone, o, i, rep)
		if !res.Answered || res.Greeted != greet || res.TurnsOK != 2 || res.Hangup != "bye" ||
			res.Error != "" || res.Wav == "" || res.Sent == 0 || res.HeardVoiced == 0 {
			t.Fatalf("call %d: %+v\n%s", i, res, out.String())
		}
	}
	turns := 0
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var row turnResult
		if err := json.Unmarshal([]byte(line), &row); err != nil {
			t.Fatal(err)
		}
		// The agent waits 200 ms of quiet after the question before it answers.
		if !row.OK || row.V2VMs < 150 || row.FirstVoiceNs <= row.SpeechEndNs || row.ReplyMs <= 0 {
			t.Fatalf("turn: %s", line)
		}
		turns++
	}
	if turns != 4 {
		t.Fatalf("%d turn lines:\n%s", turns, out.String())
	}
	for i := range o.calls {
		select {
		case <-a.byes:
		case <-time.After(5 * time.Second):
			t.Fatalf("the agent saw %d of %d hang-ups", i, o.calls)
		}
	}
}
