// The shop in Go's standard library (net/http), as a clusterd worker with
// `protocol = systemd`. Loses no request across rolling restarts.
//
//	exec = ./shop
//	protocol = systemd
//	listen = 127.0.0.1:8000
//
// The listener is fd 3; READY=1 goes to $NOTIFY_SOCKET once it serves.
// On SIGTERM it stops accepting at once, answers every request with
// "Connection: close" for a grace period (each busy keep-alive connection
// closes after its next response), then calls Shutdown, which closes the
// connections that stayed idle through the grace and waits for the requests
// in flight. Shutdown alone closes idle connections at once, racing a
// request already on its way (clients retry a GET, never a POST); so does
// SetKeepAlivesEnabled(false). Exit 0 is DRAINED.
//
// Alone (no LISTEN_FDS) it listens on 127.0.0.1:8000.
package main

import (
	"context"
	"encoding/json"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// How long, once draining, busy keep-alive connections get to come back for
// a last request before Shutdown closes the idle ones.
const drainGrace = time.Second

var draining atomic.Bool

func shop(w http.ResponseWriter, r *http.Request) {
	if draining.Load() {
		w.Header().Set("Connection", "close") // the last response on this connection
	}
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/products/"):
		id, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/products/"))
		if err != nil {
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, `{"error":"no such product"}`)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"id": id, "name": "Teapot"})
	case r.Method == http.MethodPost && r.URL.Path == "/checkout":
		io.Copy(io.Discard, r.Body)
		time.Sleep(50 * time.Millisecond) // the payment provider's round trip
		json.NewEncoder(w).Encode(map[string]any{"status": "confirmed", "worker": os.Getpid()})
	case r.URL.Path == "/healthz":
		io.WriteString(w, `"ok"`)
	default:
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"error":"not found"}`)
	}
}

// listener returns clusterd's listener (fd 3), or one of its own when run alone.
func listener() (net.Listener, error) {
	if os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) {
		return net.FileListener(os.NewFile(3, "listener"))
	}
	return net.Listen("tcp", "127.0.0.1:8000")
}

// notify sends one sd_notify message to $NOTIFY_SOCKET (Go maps "@name" to
// the abstract namespace itself).
func notify(message string) {
	address := os.Getenv("NOTIFY_SOCKET")
	if address == "" {
		return
	}
	conn, err := net.Dial("unixgram", address)
	if err != nil {
		log.Printf("notify: %v", err)
		return
	}
	defer conn.Close()
	conn.Write([]byte(message))
}

func main() {
	ln, err := listener()
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(shop), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		// After ln.Close() below, Serve returns; Shutdown looks after the
		// connections it started.
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed && !draining.Load() {
			log.Fatal(err)
		}
	}()
	notify("READY=1")

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
	<-stop
	draining.Store(true)
	ln.Close() // stop accepting: the other workers take the queue
	time.Sleep(drainGrace)
	if err := srv.Shutdown(context.Background()); err != nil {
		log.Fatal(err)
	}
}
