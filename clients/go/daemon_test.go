package optd_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// daemon is one optd process started for a test.
type daemon struct {
	URL  string
	Port string
	DB   string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func optdBin(t *testing.T) string {
	if b := os.Getenv("OPTD_BIN"); b != "" {
		return b
	}
	// Running `go test` by hand from clients/go after `make build`.
	b, err := filepath.Abs("../../build/optd")
	if err == nil {
		if _, err = os.Stat(b); err == nil {
			return b
		}
	}
	t.Fatalf("OPTD_BIN is not set and ../../build/optd does not exist (run make build)")
	return ""
}

// startDaemon runs optd on a free port with a fresh database in the test's
// temp dir; it is stopped by PID when the test ends.
func startDaemon(t *testing.T, args ...string) *daemon {
	t.Helper()
	return startDaemonAt(t, filepath.Join(t.TempDir(), "optd.db"), "0", args...)
}

// startDaemonAt runs optd on port with the database db.
func startDaemonAt(t *testing.T, db, port string, args ...string) *daemon {
	t.Helper()
	d := &daemon{DB: db, done: make(chan struct{}), log: db + "." + port + ".log"}
	argv := append([]string{optdBin(t), "--port", port, "--db", db, "--log-level", "warn"}, args...)
	// The test runner can ask for the daemon under valgrind.
	startup := 10 * time.Second
	if vg := os.Getenv("OPTD_VALGRIND_DAEMON"); vg != "" {
		argv = append(strings.Fields(vg), argv...)
		startup = 60 * time.Second
	}
	logf, err := os.Create(d.log)
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Stderr = logf
	stdout, err := d.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting %v: %v", argv, err)
	}
	logf.Close()
	var exitErr error
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- strings.TrimSpace(line)
		_, _ = io.Copy(io.Discard, r) // keep the pipe from filling up
	}()
	go func() {
		exitErr = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.stop(t)
		if exitErr != nil && !d.killed() {
			t.Errorf("optd (pid %d) exited with %v", d.cmd.Process.Pid, exitErr)
		}
		if t.Failed() {
			if b, err := os.ReadFile(d.log); err == nil && len(b) > 0 {
				t.Logf("optd stderr:\n%s", tail(string(b), 30))
			}
		}
	})
	select {
	case line := <-lines:
		const prefix = "optd listening on "
		if !strings.HasPrefix(line, prefix) {
			t.Fatalf("optd's first line is %q, want %q...", line, prefix)
		}
		d.URL = strings.TrimPrefix(line, prefix)
		u, err := url.Parse(d.URL)
		if err != nil {
			t.Fatalf("listening line %q: %v", line, err)
		}
		d.Port = u.Port()
	case <-d.done:
		t.Fatalf("optd exited before listening: %v", exitErr)
	case <-time.After(startup):
		t.Fatalf("optd did not print its listening line within %v", startup)
	}
	return d
}

var killedPIDs sync.Map

func (d *daemon) killed() bool { _, ok := killedPIDs.Load(d.cmd.Process.Pid); return ok }

// stop sends SIGTERM and waits for a clean exit; past 10 s it kills.
func (d *daemon) stop(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		t.Errorf("optd (pid %d) ignored SIGTERM for 10 s; killing it", d.cmd.Process.Pid)
		killedPIDs.Store(d.cmd.Process.Pid, true)
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// tcpRelay forwards TCP connections to a daemon and counts them, to see how
// many connections a client opened.
type tcpRelay struct {
	Addr  string
	conns atomic.Int64
}

func startTCPRelay(t *testing.T, target string) *tcpRelay {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &tcpRelay{Addr: "http://" + ln.Addr().String()}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	t.Cleanup(func() {
		ln.Close()
		// Kept-alive connections would hold the copies open.
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	dst := strings.TrimPrefix(target, "http://")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.conns.Add(1)
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				up, err := net.Dial("tcp", dst)
				if err != nil {
					return
				}
				defer up.Close()
				mu.Lock()
				open = append(open, up)
				mu.Unlock()
				go func() { _, _ = io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return r
}

// faultProxy is an HTTP proxy in front of a real daemon that loses answers:
// for the first Drop step requests it forwards the request, lets the daemon
// answer, then cuts the client's connection; for the first Unavailable ones
// it answers 503 itself without forwarding (with RetryAfter as its
// Retry-After, when set). It records every step request's Idempotency-Key.
type faultProxy struct {
	URL         string
	mu          sync.Mutex
	drop        int
	unavailable int
	keys        []string
	retryAfter  string
}

func startFaultProxy(t *testing.T, target string, drop, unavailable int) *faultProxy {
	p := &faultProxy{drop: drop, unavailable: unavailable}
	up := &http.Client{Transport: &http.Transport{}}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		isStep := r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/step")
		var dropIt, unavail bool
		var retryAfter string
		if isStep {
			p.mu.Lock()
			p.keys = append(p.keys, r.Header.Get("Idempotency-Key"))
			if p.unavailable > 0 {
				p.unavailable--
				unavail = true
				retryAfter = p.retryAfter
			} else if p.drop > 0 {
				p.drop--
				dropIt = true
			}
			p.mu.Unlock()
		}
		if unavail {
			if retryAfter != "" {
				w.Header().Set("Retry-After", retryAfter)
			}
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `{"type":"urn:optd:problem:unavailable","title":"Service Unavailable","status":503,"detail":"injected by the test proxy"}`)
			return
		}
		body, _ := io.ReadAll(r.Body)
		req, _ := http.NewRequest(r.Method, target+r.URL.RequestURI(), strings.NewReader(string(body)))
		req.Header = r.Header.Clone()
		resp, err := up.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		data, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		if dropIt {
			// The daemon has answered: the step is applied. Lose the answer.
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.Close()
			}
			return
		}
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(data)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); up.CloseIdleConnections() })
	p.URL = "http://" + ln.Addr().String()
	return p
}

func (p *faultProxy) stepKeys() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.keys...)
}
