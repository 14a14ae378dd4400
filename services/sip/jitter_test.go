package main

import (
	"math"
	"slices"
	"testing"
	"time"
)

// A packet's audio is one value in all its samples: loud ones (>= 1000) say which packet they
// were, so the output shows what was played, in which order, and what stood in for what.
func frameOf(v int16) []byte {
	pcm := make([]byte, frameBytes)
	for i := 0; i < frameBytes; i += 2 {
		pcm[i], pcm[i+1] = byte(v), byte(uint16(v)>>8)
	}
	return pcm
}

func valueOf(t *testing.T, frame []byte) int16 {
	t.Helper()
	if len(frame) != frameBytes {
		t.Fatalf("a frame of %d bytes", len(frame))
	}
	v := int16(uint16(frame[0]) | uint16(frame[1])<<8)
	for i := 0; i < frameBytes; i += 2 {
		if int16(uint16(frame[i])|uint16(frame[i+1])<<8) != v {
			t.Fatalf("a frame of mixed values: %v", frame[:8])
		}
	}
	return v
}

func loud(k int) int16 { return int16(1000 + k%30000) }

// feed ticks: at each, the packets given for it (seq offsets from base), then one pull.
type feed struct {
	t    *testing.T
	j    *jitterBuffer
	base uint16
	out  []int16
	sent map[int16]bool
}

func newRun(t *testing.T, base uint16) *feed {
	return &feed{t: t, j: newJitterBuffer(defaultJitterMs * time.Millisecond), base: base,
		sent: map[int16]bool{}}
}

func (r *feed) tick(offsets ...int) {
	for _, k := range offsets {
		r.push(7, k)
	}
	r.out = append(r.out, valueOf(r.t, r.j.pull()))
}

func (r *feed) push(ssrc uint32, k int) {
	r.sent[loud(k)] = true
	r.j.push(ssrc, r.base+uint16(k), frameOf(loud(k)))
}

// drain: ticks without packets, until whatever was buffered came out.
func (r *feed) drain() {
	for i := 0; i < 10; i++ {
		r.tick()
	}
}

// played: the packets' values that came out, in order, and how many frames were neither a
// packet nor silence (concealment).
func (r *feed) played() (values []int16, concealed int) {
	for _, v := range r.out {
		switch {
		case r.sent[v]:
			values = append(values, v)
		case v != 0:
			concealed++
		}
	}
	return values, concealed
}

func wantPlayed(t *testing.T, got []int16, ks ...int) {
	t.Helper()
	if len(got) != len(ks) {
		t.Fatalf("played %d packets, want %d: %v", len(got), len(ks), got)
	}
	for i, k := range ks {
		if got[i] != loud(k) {
			t.Fatalf("packet %d played as %d, want %d (all: %v)", i, got[i], loud(k), got)
		}
	}
}

func upTo(n int, skip ...int) []int {
	var ks []int
	for k := 0; k < n; k++ {
		keep := true
		for _, s := range skip {
			keep = keep && k != s
		}
		if keep {
			ks = append(ks, k)
		}
	}
	return ks
}

func TestInOrderStartsAfterTheDepthAndPlaysEverything(t *testing.T) {
	r := newRun(t, 1000)
	for k := 0; k < 50; k++ {
		r.tick(k)
	}
	for i := 0; i < 5; i++ {
		r.tick()
	}
	// Two ticks of silence while the first packets make up the depth (60 ms).
	if r.out[0] != 0 || r.out[1] != 0 || r.out[2] != loud(0) {
		t.Fatalf("start %v", r.out[:4])
	}
	got, concealed := r.played()
	wantPlayed(t, got, upTo(50)...)
	if concealed != 2 || len(r.j.stats) != 0 { // the end of the stream fades out, twice
		t.Fatalf("concealed %d, stats %v", concealed, r.j.stats)
	}
}

func TestSwappedNeighboursComeOutInOrder(t *testing.T) {
	r := newRun(t, 500)
	for k := 0; k < 63; k++ {
		switch {
		case k%7 == 3: // k+1 first, k right after it, one tick late
			r.tick()
		case k%7 == 4:
			r.tick(k, k-1)
		default:
			r.tick(k)
		}
	}
	r.drain()
	got, _ := r.played()
	wantPlayed(t, got, upTo(63)...)
	if len(r.j.stats) != 0 {
		t.Fatalf("stats %v", r.j.stats)
	}
}

func TestALostPacketIsConcealedWithTheLastFrameAttenuated(t *testing.T) {
	r := newRun(t, 0)
	lost := []int{20, 40, 41, 42}
	for k := 0; k < 60; k++ {
		if k == 20 || k == 40 || k == 41 || k == 42 {
			r.tick()
		} else {
			r.tick(k)
		}
	}
	r.drain()
	got, _ := r.played()
	wantPlayed(t, got, upTo(60, lost...)...)
	if r.j.stats[kindLost] != 4 || len(r.j.stats) != 1 {
		t.Fatalf("stats %v", r.j.stats)
	}
	// Where 20 was: 19 at half. Where 40, 41 and 42 were: 39 at half, at a quarter, then
	// silence (three in a row empty the buffer: it fills to the depth again before 43).
	at := func(k int) int {
		for i, v := range r.out {
			if v == loud(k) {
				return i
			}
		}
		t.Fatalf("%d never played", k)
		return 0
	}
	gap := r.out[at(39)+1 : at(43)]
	if r.out[at(19)+1] != loud(19)/2 || len(gap) < 3 || gap[0] != loud(39)/2 || gap[1] != loud(39)/4 ||
		slices.ContainsFunc(gap[2:], func(v int16) bool { return v != 0 }) {
		t.Fatalf("concealment %v, %v", r.out[at(19):at(19)+3], gap)
	}
}

func TestDuplicatesAndLatePacketsAreDroppedAndCounted(t *testing.T) {
	r := newRun(t, 65000)
	for k := 0; k < 40; k++ {
		switch {
		case k == 10:
			r.tick(k, k) // twice at once
		case k == 20:
			r.tick(k, 15) // 15 again, long after it was played
		case k == 30:
			r.tick() // 30 comes far too late: after its loss was concealed
		case k == 35:
			r.tick(k, 30)
		default:
			r.tick(k)
		}
	}
	r.drain()
	got, _ := r.played()
	wantPlayed(t, got, upTo(40, 30)...)
	if r.j.stats[kindDuplicate] != 2 || r.j.stats[kindLate] != 1 || r.j.stats[kindLost] != 1 {
		t.Fatalf("stats %v", r.j.stats)
	}
}

func TestTheSequenceNumberWrapsAround(t *testing.T) {
	r := newRun(t, 65530) // 65530 … 65535, 0, 1 …
	for k := 0; k < 30; k++ {
		if k == 7 { // 65537 = 1 arrives before 65536 = 0
			r.tick()
		} else if k == 8 {
			r.tick(8, 7)
		} else {
			r.tick(k)
		}
	}
	r.drain()
	got, _ := r.played()
	wantPlayed(t, got, upTo(30)...)
	if len(r.j.stats) != 0 {
		t.Fatalf("stats %v", r.j.stats)
	}
}

// The first packets out of order: playout starts from the earliest.
func TestTheFirstPacketsReordered(t *testing.T) {
	r := newRun(t, 100)
	r.tick(1)
	r.tick(0, 2)
	for k := 3; k < 10; k++ {
		r.tick(k)
	}
	r.drain()
	got, _ := r.played()
	wantPlayed(t, got, upTo(10)...)
}

// A stray packet far off the sequence is dropped; a sender that restarts elsewhere (two in a
// row), or with another SSRC, is followed.
func TestJumpsAndRestarts(t *testing.T) {
	r := newRun(t, 0)
	for k := 0; k < 10; k++ {
		r.tick(k)
	}
	r.tick(10, 5000) // stray
	r.tick(11)
	r.tick(20000, 20001) // a restart: these two follow each other
	for k := 20002; k < 20010; k++ {
		r.tick(k)
	}
	r.base = uint16(42 - 12345 + 65536)
	r.push(8, 12345) // a new SSRC
	for i := 0; i < 5; i++ {
		r.tick()
	}
	r.drain()
	got, _ := r.played()
	want := upTo(12)
	for k := 20000; k < 20010; k++ {
		want = append(want, k)
	}
	wantPlayed(t, got, append(want, 12345)...)
	if r.j.stats[kindSeqJump] != 2 || r.j.stats[kindLost] != 0 {
		t.Fatalf("stats %v", r.j.stats)
	}
}

// A key (RFC 4733) keeps its place in the sequence: no loss, its time is silence.
func TestAKeyPacketTakesItsPlaceAsSilence(t *testing.T) {
	r := newRun(t, 0)
	for k := 0; k < 20; k++ {
		if k == 8 || k == 9 {
			r.j.push(7, uint16(k), nil)
			r.out = append(r.out, valueOf(t, r.j.pull()))
		} else {
			r.tick(k)
		}
	}
	r.drain()
	got, _ := r.played()
	wantPlayed(t, got, upTo(20, 8, 9)...)
	if len(r.j.stats) != 0 {
		t.Fatalf("stats %v", r.j.stats)
	}
}

// A stall, then everything at once: the level is cut back to the cap, the oldest first.
func TestABurstBeyondTheCapDropsTheOldest(t *testing.T) {
	r := newRun(t, 0)
	for k := 0; k < 5; k++ {
		r.tick(k)
	}
	for i := 0; i < 5; i++ {
		r.tick()
	}
	burst := upTo(40)[5:]
	r.tick(burst...)
	for i := 0; i < 20; i++ {
		r.tick()
	}
	if n := r.j.stats[kindOverflow]; n < 20 || n > 25 {
		t.Fatalf("stats %v", r.j.stats)
	}
	r.drain()
	got, _ := r.played()
	if got[len(got)-1] != loud(39) {
		t.Fatalf("played %v", got)
	}
}

// driftRun: a sender whose clock runs at rate × ours sends speech (1 s) and silence (1 s) in
// turn; the receiver pulls every 20 ms of its own clock for a minute.
func driftRun(t *testing.T, rate float64) (*jitterBuffer, []int16, int) {
	j := newJitterBuffer(defaultJitterMs * time.Millisecond)
	var out []int16
	maxLevel, k := 0, 0
	next := 7.0 // ms: when packet k is sent (and arrives)
	for tick := 1; tick <= 3000; tick++ {
		now := float64(tick * frameMs)
		for next <= now {
			v := int16(k % 300) // silence: quiet, not zero
			if (k/50)%2 == 0 {
				v = loud(k)
			}
			j.push(1, uint16(k), frameOf(v))
			k++
			next += frameMs / rate
		}
		maxLevel = max(maxLevel, j.buffered+len(j.out))
		out = append(out, valueOf(t, j.pull()))
	}
	return j, out, maxLevel
}

// Every loud packet is played, in order and without a break inside a talk spurt: drift is
// taken up only where the sender was silent.
func checkSpeechIntact(t *testing.T, out []int16) {
	t.Helper()
	last, inSpurt := int16(0), false
	for i, v := range out {
		switch {
		case v >= 1000:
			if inSpurt && v != last+1 {
				t.Fatalf("frame %d: %d after %d", i, v, last)
			}
			last, inSpurt = v, true
		case inSpurt && (int(last)-1000+1)%50 != 0:
			t.Fatalf("frame %d: %d inside a talk spurt after %d", i, v, last)
		default:
			inSpurt = false
		}
	}
}

func TestASenderFasterThanUsIsTrimmedAtSilence(t *testing.T) {
	j, out, maxLevel := driftRun(t, 1.02)
	checkSpeechIntact(t, out)
	if j.stats[kindDriftDrop] < 40 || j.stats[kindOverflow] != 0 || j.stats[kindLost] != 0 {
		t.Fatalf("stats %v", j.stats)
	}
	if maxLevel > j.depth+3*frameBytes { // bounded: a 2 % drift would add 1.2 s in a minute
		t.Fatalf("level reached %d ms", maxLevel*frameMs/frameBytes)
	}
}

func TestASenderSlowerThanUsIsPaddedAtSilence(t *testing.T) {
	j, out, _ := driftRun(t, 0.98)
	checkSpeechIntact(t, out)
	if j.stats[kindDriftInsert] < 40 || j.stats[kindLost] != 0 || j.stats[kindLate] != 0 {
		t.Fatalf("stats %v", j.stats)
	}
}

func TestQuiet(t *testing.T) {
	if !quiet(frameOf(0)) || !quiet(frameOf(-300)) || quiet(frameOf(400)) || quiet(frameOf(math.MinInt16)) {
		t.Fatal("quiet")
	}
}

// A hostile sender that restarts its stream with every packet, far faster than real time,
// cannot make the buffer hold more than jitterCapMs: the call stays near real time.
func TestRestartsCannotPileAudioUp(t *testing.T) {
	j := newJitterBuffer(defaultJitterMs * time.Millisecond)
	limit := jitterCapMs * frameBytes / frameMs
	for i := 0; i < 5000; i++ {
		pcm := make([]byte, frameBytes)
		j.push(uint32(i), uint16(i*7), pcm) // a new SSRC each time
		if i%20 == 0 {
			j.pull() // one tick for twenty packets
		}
		if len(j.out) > limit {
			t.Fatalf("after %d packets %d bytes wait to be played (cap %d)", i, len(j.out), limit)
		}
	}
}
