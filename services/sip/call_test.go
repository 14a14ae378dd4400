package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/emiago/diago/media"
)

// offer is a phone's SDP: PCMU from addr:port, in the given direction.
func offer(addr string, port int, direction string) []byte {
	return []byte(fmt.Sprintf("v=0\r\no=phone 1 1 IN IP4 %[1]s\r\ns=-\r\nc=IN IP4 %[1]s\r\nt=0 0\r\n"+
		"m=audio %[2]d RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=%[3]s\r\n", addr, port, direction))
}

// answered: our media session once it took the phone's offer.
func answered(t *testing.T, sdp []byte) *media.MediaSession {
	t.Helper()
	ms, err := media.NewMediaSession(net.IPv4(127, 0, 0, 1), 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ms.Close() })
	if err := ms.RemoteSDP(sdp, false); err != nil {
		t.Fatal(err)
	}
	return ms
}

// The direction diago negotiated is read from its unexported field: this fails first if a
// diago upgrade moves it.
func TestHoldFollowsTheOffer(t *testing.T) {
	for _, tc := range []struct {
		addr, direction, ours string
		held                  bool
	}{
		{"127.0.0.1", "sendrecv", "sendrecv", false},
		{"127.0.0.1", "sendonly", "recvonly", true},
		{"127.0.0.1", "inactive", "inactive", true},
		{"0.0.0.0", "sendrecv", "sendrecv", true}, // RFC 2543's hold
	} {
		ms := answered(t, offer(tc.addr, 4000, tc.direction))
		if got := negotiatedDirection(ms); got != tc.ours || onHold(ms) != tc.held {
			t.Errorf("%s %s: direction %q held %v", tc.addr, tc.direction, got, onHold(ms))
		}
	}
}

func rtpPacket(seq uint16) []byte {
	p := make([]byte, 12+160)
	p[0], p[1] = 0x80, 0 // version 2, PCMU
	binary.BigEndian.PutUint16(p[2:], seq)
	binary.BigEndian.PutUint32(p[4:], uint32(seq)*160)
	binary.BigEndian.PutUint32(p[8:], 0xCAFE)
	return p
}

// Packets from the address the phone's SDP named pass; from anywhere else they are dropped and
// counted, however many came.
func TestRTPFromAnotherAddressIsDropped(t *testing.T) {
	phone, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer phone.Close()
	intruder, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer intruder.Close()
	ms := answered(t, offer("127.0.0.1", phone.LocalAddr().(*net.UDPAddr).Port, "sendrecv"))
	packets := media.NewRTPPacketReaderSession(media.NewRTPSession(ms))
	wrong := 0
	check := &sourceCheck{packets: packets, wrong: func() { wrong++ }}

	to := &ms.Laddr
	for seq := uint16(1); seq <= 6; seq++ {
		from := phone
		if seq%2 == 0 {
			from = intruder
		}
		if _, err := from.WriteToUDP(rtpPacket(seq), to); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, media.RTPBufSize)
	var got []uint16
	for len(got) < 3 {
		_ = ms.StopRTP(1, 5*time.Second) // a deadline, should a packet be lost
		if _, err := check.Read(buf); err != nil {
			t.Fatalf("read: %v (got %v)", err, got)
		}
		got = append(got, packets.PacketHeader.SequenceNumber)
	}
	if fmt.Sprint(got) != "[1 3 5]" || wrong != 2 {
		t.Fatalf("read %v, %d dropped", got, wrong)
	}
}

// A phone whose SDP names an address its SIP does not come from (behind a NAT, or on a machine
// with several interfaces) is heard from its SIP address, latched to the first port that speaks
// from there; a second port there, or any other address, is still refused.
func TestRTPFromBehindANatIsLatchedToTheSIPAddress(t *testing.T) {
	phone, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer phone.Close()
	other, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	// The SDP names a documentation address (what the phone believes is its own).
	ms := answered(t, offer("192.0.2.2", 4000, "sendrecv"))
	packets := media.NewRTPPacketReaderSession(media.NewRTPSession(ms))
	wrong := 0
	check := &sourceCheck{packets: packets, signal: net.IPv4(127, 0, 0, 1), wrong: func() { wrong++ }}

	for seq := uint16(1); seq <= 6; seq++ {
		from := phone
		if seq%2 == 0 {
			from = other
		}
		if _, err := from.WriteToUDP(rtpPacket(seq), &ms.Laddr); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, media.RTPBufSize)
	var got []uint16
	for len(got) < 3 {
		_ = ms.StopRTP(1, 5*time.Second)
		if _, err := check.Read(buf); err != nil {
			t.Fatalf("read: %v (got %v)", err, got)
		}
		got = append(got, packets.PacketHeader.SequenceNumber)
	}
	if fmt.Sprint(got) != "[1 3 5]" || wrong != 2 {
		t.Fatalf("read %v, %d dropped", got, wrong)
	}
	// Had the SDP named the SIP address itself, only that address would do (the test above).
	if hostIP("127.0.0.1:5060").String() != "127.0.0.1" || hostIP("[::1]:5060").String() != "::1" ||
		hostIP("nowhere") != nil {
		t.Fatal("hostIP")
	}
}
