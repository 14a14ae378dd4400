package main

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
)

// fakeNATS speaks the client protocol's handshake: the first `early` connections get the
// server's own PING before the PONG that answers theirs, the others the usual order.
func fakeNATS(t *testing.T, early int32) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var accepted atomic.Int32
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			index := accepted.Add(1) - 1
			go serveFake(conn, index < early)
		}
	}()
	return "nats://" + ln.Addr().String(), &accepted
}

func serveFake(conn net.Conn, pingFirst bool) {
	defer conn.Close()
	io.WriteString(conn, `INFO {"server_id":"FAKE","version":"2.12.0","proto":1,"headers":true,"max_payload":1048576}`+"\r\n")
	lines := bufio.NewReader(conn)
	handshake := true
	for {
		line, err := lines.ReadString('\n')
		if err != nil {
			return
		}
		if !strings.HasPrefix(line, "PING") {
			continue
		}
		if handshake && pingFirst {
			io.WriteString(conn, "PING\r\nPONG\r\n")
		} else {
			io.WriteString(conn, "PONG\r\n")
		}
		handshake = false
	}
}

func TestAHandshakeAnsweredWithThePingFirstIsTriedAgain(t *testing.T) {
	url, accepted := fakeNATS(t, 1)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	nc, err := connectNATS(config{natsURL: url}, log)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer nc.Close()
	if !nc.IsConnected() || accepted.Load() != 2 {
		t.Fatalf("connected %v after %d connections, want 2", nc.IsConnected(), accepted.Load())
	}
}

func TestAServerThatAlwaysPingsFirstIsAnErrorAfterAFewTries(t *testing.T) {
	url, accepted := fakeNATS(t, 1000)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	nc, err := connectNATS(config{natsURL: url}, log)
	if err == nil {
		nc.Close()
		t.Fatal("connected to a server that never answers the handshake first")
	}
	if !strings.Contains(err.Error(), "got 'PING'") || accepted.Load() != connectAttempts {
		t.Fatalf("error %v after %d connections, want %d", err, accepted.Load(), connectAttempts)
	}
}
