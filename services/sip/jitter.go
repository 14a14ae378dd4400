package main

// The caller's RTP audio, put back in order for the 20 ms publishing tick.
//
// Why not diago's own (media.RTPJitterBuffer, diago.WithAudioReaderJitterBuffer): it reorders by
// sequence number, but it releases packets on a timer of its own, re-armed after each release,
// which is a second clock beside our tick and slips behind the sender's; a lost packet is only
// skipped, so the reader never learns that 20 ms are missing and cannot conceal them; a sender
// faster than that timer fills its window until packets are dropped at its edge, speech or not;
// and its default delay is 20 packets (400 ms). Here the publishing tick is the only clock: each
// tick takes 20 ms from this buffer, which conceals what is missing and keeps its level near the
// depth by dropping or inserting 20 ms where the caller is silent.

import (
	"time"
)

const (
	// The default depth: 60 ms, three packets of 20 ms. A swapped pair of neighbours puts a
	// packet 20 ms late, a loaded host or a Wi-Fi hop 20-40 ms more; 60 ms takes both and costs
	// 60 ms of voice-to-voice, little beside the VAD's end-of-speech window. 40 ms would leave
	// the next packet alone to prove a loss.
	defaultJitterMs = 60
	minJitterMs     = 40
	maxJitterMs     = 160
	// However much arrived, the caller's words never wait longer than this (the former backlog's
	// bound): beyond it the oldest audio is dropped, silent or not.
	jitterCapMs = 200
	// Sequence numbers further than this from the next expected are not a reordering but a jump:
	// a restarted sender, or a stray packet. As in RFC 3550 A.1, a jump is taken as a restart
	// once the packet after it follows.
	seqWindow = 100
	// A frame whose mean magnitude is below this (about -40 dBFS) counts as silence, where 20 ms
	// may be dropped or inserted unheard.
	quietLevel = 330
	// A lost packet is replaced by the last 20 ms heard, halved each time, then by silence.
	concealRepeats = 2
	// Seqs of recently played packets remembered, to tell a duplicate from a late packet.
	playedMemory = 128
)

// Kinds the jitter buffer reports (counted as problems by the call, voicebus_sip_problems_total).
const (
	kindLost        = "rtp_lost"          // a packet never came: concealed
	kindLate        = "rtp_late"          // it came after its turn had been concealed
	kindDuplicate   = "rtp_duplicate"     // it came twice
	kindSeqJump     = "rtp_seq_jump"      // far off the sequence: a stray (dropped) or a restart
	kindDriftDrop   = "jitter_drift_drop" // 20 ms of silence dropped: the sender runs fast
	kindDriftInsert = "jitter_drift_insert"
	kindOverflow    = "jitter_overflow" // audio dropped, silent or not, over jitterCapMs
)

type jitterBuffer struct {
	depth    int // bytes of audio held before playout and kept while it runs
	packets  map[uint16][]byte
	buffered int // bytes in packets

	ssrc    uint32
	next    uint16 // the sequence number to play next
	started bool   // a packet came
	begun   bool   // a packet of this sequence was played
	playing bool   // the depth was reached: every tick plays or conceals
	waited  int    // ticks that packets waited for the depth
	jump    uint16 // the last far-away sequence number, a restart if its successor comes
	jumped  bool
	jumpPCM []byte

	out       []byte // ordered audio not yet handed out
	outLost   bool   // out stands in for a lost packet
	last      []byte // the last frame of the caller's own audio (concealment repeats it)
	lastLen   int    // bytes of the last packet played: a lost one is taken to be as long
	concealed int    // frames concealed in a row
	played    [playedMemory]uint32

	stats map[string]int64
	note  func(kind string) // told of each kind as it happens (the call counts them)
}

func newJitterBuffer(depth time.Duration) *jitterBuffer {
	return &jitterBuffer{
		depth:   int(depth/time.Millisecond) * frameBytes / frameMs,
		packets: map[uint16][]byte{},
		last:    make([]byte, frameBytes),
		lastLen: frameBytes,
		stats:   map[string]int64{},
	}
}

func (j *jitterBuffer) report(kind string) {
	j.stats[kind]++
	if j.note != nil {
		j.note(kind)
	}
}

// push takes one packet: its audio decoded to PCM, or nil for a packet of the stream that holds
// none (an RFC 4733 key, comfort noise) but keeps its place and its 20 ms in the sequence.
func (j *jitterBuffer) push(ssrc uint32, seq uint16, pcm []byte) {
	if !j.started || ssrc != j.ssrc {
		j.restart(ssrc, seq)
	}
	distance := int(int16(seq - j.next)) // wraps: 2 is after 65535
	if distance >= seqWindow || distance <= -seqWindow {
		if !j.jumped || seq != j.jump+1 {
			j.jump, j.jumped, j.jumpPCM = seq, true, pcm
			j.report(kindSeqJump)
			return
		}
		first := j.jumpPCM
		j.restart(ssrc, seq-1)
		j.push(ssrc, seq-1, first)
		distance = 1
	}
	j.jumped = false
	if distance < 0 {
		if j.begun {
			j.refuse(seq)
			return
		}
		j.next = seq // nothing played yet: start from the earlier one
	}
	if _, dup := j.packets[seq]; dup {
		j.report(kindDuplicate)
		return
	}
	if pcm == nil {
		pcm = make([]byte, frameBytes)
	}
	j.packets[seq] = pcm
	j.buffered += len(pcm)
}

// refuse a packet whose turn has passed: played already (a duplicate) or concealed (late).
func (j *jitterBuffer) refuse(seq uint16) {
	if j.played[seq%playedMemory] == uint32(seq)|1<<16 {
		j.report(kindDuplicate)
	} else {
		j.report(kindLate)
	}
}

// restart the sequence at seq: a new sender (SSRC), or one that jumped. What the old sequence
// left is played first, in order: it was said, only not yet heard.
func (j *jitterBuffer) restart(ssrc uint32, seq uint16) {
	for i := 0; j.buffered > 0 && i < seqWindow; i++ {
		if pcm, ok := j.packets[j.next]; ok {
			j.take(pcm)
		} else {
			j.next++
		}
	}
	j.ssrc, j.next, j.started, j.begun, j.jumped = ssrc, seq, true, false, false
	j.playing, j.waited = false, 0
	j.capOut()
}

// capOut keeps what waits to be played within jitterCapMs, the oldest going first: a sender
// that restarts its stream again and again (a new SSRC or a jump with every few packets) must
// not pile audio up behind real time.
func (j *jitterBuffer) capOut() {
	if over := len(j.out) - jitterCapMs*frameBytes/frameMs; over > 0 {
		over = (over + frameBytes - 1) / frameBytes * frameBytes
		j.out = j.out[over:]
		j.report(kindOverflow)
	}
}

// pull hands out the next 20 ms, every tick: the caller's audio in order, or what stands in
// for it (silence before the first packet and while buffering, concealment of a loss).
func (j *jitterBuffer) pull() []byte {
	j.capOut()
	if !j.playing && len(j.out) < frameBytes {
		if !j.ready() {
			return j.hand(j.conceal(frameBytes), true)
		}
		j.playing = true
	}
	if len(j.out) == 0 {
		j.bound()
		if j.driftInsert() {
			return j.hand(make([]byte, frameBytes), false)
		}
	}
	for len(j.out) < frameBytes && j.advance() {
	}
	if len(j.out) < frameBytes {
		// Nothing to play and no loss to prove: the sender paused, is slow or late. Conceal and
		// buffer again, so that the next talk spurt starts with the depth in hand.
		j.playing, j.waited = false, 0
		return j.hand(j.conceal(frameBytes), true)
	}
	frame := make([]byte, frameBytes)
	copy(frame, j.out)
	j.out = j.out[frameBytes:]
	if len(j.out) == 0 {
		j.out = j.out[:0:0] // let the played packets go
	}
	return j.hand(frame, j.outLost)
}

// ready: playout may (re)start: the depth is in hand, or the first packet waited as long.
func (j *jitterBuffer) ready() bool {
	if j.buffered == 0 {
		return false
	}
	j.waited++
	return j.buffered >= j.depth || j.waited*frameBytes >= j.depth
}

// hand out a frame, remembering the caller's own for concealment.
func (j *jitterBuffer) hand(frame []byte, concealed bool) []byte {
	if concealed {
		j.concealed++
	} else {
		j.concealed = 0
		copy(j.last, frame)
	}
	return frame
}

// advance moves the next packet behind out, or its concealment once it is proven lost: the
// packets after it amount to the depth less one frame, as many as would have come had it
// been on time. False: it may still come.
func (j *jitterBuffer) advance() bool {
	if pcm, ok := j.packets[j.next]; ok {
		j.take(pcm)
		return true
	}
	if j.buffered == 0 || j.buffered < j.depth-frameBytes {
		return false
	}
	j.report(kindLost)
	j.out = append(j.out, j.conceal(j.lastLen)...)
	j.outLost = true
	j.next++
	return true
}

func (j *jitterBuffer) take(pcm []byte) {
	delete(j.packets, j.next)
	j.buffered -= len(pcm)
	j.played[j.next%playedMemory] = uint32(j.next) | 1<<16
	j.next++
	j.begun = true
	j.lastLen = len(pcm)
	j.out = append(j.out, pcm...)
	j.outLost = false
}

// conceal n bytes: the last frame handed out, attenuated, then silence.
func (j *jitterBuffer) conceal(n int) []byte {
	out := make([]byte, n)
	if j.concealed >= concealRepeats {
		return out
	}
	shift := uint(j.concealed + 1)
	for i := 0; i+1 < n; i += 2 {
		k := i % frameBytes
		v := int16(uint16(j.last[k]) | uint16(j.last[k+1])<<8)
		v >>= shift
		out[i], out[i+1] = byte(v), byte(uint16(v)>>8)
	}
	return out
}

// bound the level (at a packet boundary): over the depth by two frames, a silent packet at the
// head is dropped (the sender's clock runs faster than ours, or a burst came after a stall);
// over jitterCapMs, the head goes whatever it holds.
func (j *jitterBuffer) bound() {
	limit := jitterCapMs * frameBytes / frameMs
	for j.buffered > limit {
		j.dropHead(kindOverflow)
	}
	if j.buffered >= j.depth+2*frameBytes {
		if pcm, ok := j.packets[j.next]; ok && quiet(pcm) {
			j.dropHead(kindDriftDrop)
		}
	}
}

func (j *jitterBuffer) dropHead(kind string) {
	if pcm, ok := j.packets[j.next]; ok {
		delete(j.packets, j.next)
		j.buffered -= len(pcm)
		j.played[j.next%playedMemory] = uint32(j.next) | 1<<16
	}
	j.next++
	j.report(kind)
}

// driftInsert: under the depth by two frames, with the caller silent on both sides, hand out
// 20 ms of silence and keep the packet (our clock runs faster than the sender's).
func (j *jitterBuffer) driftInsert() bool {
	if j.buffered > j.depth-2*frameBytes || !quiet(j.last) {
		return false
	}
	if pcm, ok := j.packets[j.next]; !ok || !quiet(pcm) {
		return false
	}
	j.report(kindDriftInsert)
	return true
}

// quiet: the mean magnitude of s16le samples is below quietLevel.
func quiet(pcm []byte) bool {
	if len(pcm) < 2 {
		return true
	}
	var sum int64
	for i := 0; i+1 < len(pcm); i += 2 {
		v := int64(int16(uint16(pcm[i]) | uint16(pcm[i+1])<<8))
		if v < 0 {
			v = -v
		}
		sum += v
	}
	return sum/int64(len(pcm)/2) < quietLevel
}
