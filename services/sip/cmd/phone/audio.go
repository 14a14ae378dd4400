package main

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"

	"github.com/zaf/g711"
)

const (
	sampleRate = 8000
	frameMs    = 20
	frameBytes = sampleRate * frameMs / 1000 * 2 // 320: 20 ms of s16le at 8 kHz
)

// question is one utterance ready to send: PCMU payloads of 20 ms, and which of them carries
// the last speech (the V2V clock starts when that packet leaves).
type question struct {
	path       string
	payloads   [][]byte
	lastSpeech int
}

// loadQuestion reads 8 kHz mono s16le PCM and cuts it into PCMU payloads. The last frame with a
// sample above threshold is the question's end of speech: what the file holds after it (a
// fade, silence) still goes out, but it is not speech.
func loadQuestion(path string, threshold int) (question, error) {
	pcm, err := os.ReadFile(path)
	if err != nil {
		return question{}, fmt.Errorf("-audio: %w", err)
	}
	q := question{path: path, lastSpeech: -1}
	for start := 0; start < len(pcm); start += frameBytes {
		frame := make([]byte, frameBytes) // the last one padded with silence
		copy(frame, pcm[start:min(start+frameBytes, len(pcm))])
		if peak(frame) > threshold {
			q.lastSpeech = len(q.payloads)
		}
		q.payloads = append(q.payloads, g711.EncodeUlaw(frame))
	}
	if q.lastSpeech < 0 {
		return question{}, fmt.Errorf("-audio %s: no sample above %d: nothing is said", path, threshold)
	}
	return q, nil
}

// peak is the largest sample magnitude of s16le PCM.
func peak(pcm []byte) int {
	top := 0
	for i := 0; i+1 < len(pcm); i += 2 {
		v := int(int16(binary.LittleEndian.Uint16(pcm[i:])))
		if v < 0 {
			v = -v
		}
		top = max(top, v)
	}
	return top
}

// silence is one PCMU payload of 20 ms of silence (μ-law's zero is 0xFF).
func silence() []byte {
	p := make([]byte, frameBytes/2)
	for i := range p {
		p[i] = 0xFF
	}
	return p
}

func round(v float64, digits int) float64 {
	scale := math.Pow(10, float64(digits))
	return math.Round(v*scale) / scale
}
