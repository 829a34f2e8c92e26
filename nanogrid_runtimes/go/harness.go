// NanoGrid's Go runtime: the sandbox protocol of nanogrid_runtimes/python/bootstrap.py (the reference), in Go.
//
// This file is compiled twice. In the image, with bootstrap.go, it is the stem cell's bootstrap: it
// answers `ready`, takes one `load` (a zip), compiles the package with `go build` inside the sandbox
// (this file beside it, so the function and the protocol are one binary) and execs that binary,
// which answers the load and serves `call` and `outputs` frames in-process from its init(), before
// the user's main would run. A package that defines the handler (the seed template's
// `func Handler(event map[string]interface{}) (Response, error)`) is called directly; one that
// only has a main (the seed's program convention: PAYLOAD in, JSON on stdout) is run once per call.
//
// Every identifier starts with nanogrid, so it cannot clash with the function's own names. The host
// trusts nothing it reads from here (nanogrid_backend/sandbox/protocol.py checks every frame).
package main

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

const (
	nanogridChunkBytes        = 1 << 20
	nanogridStreamResultOver  = 1 << 20
	nanogridBlobChunkBytes    = 4 << 20
	nanogridPayloadFileOver   = 100 * 1024
	nanogridLiveFrameBytes    = 64 << 10
	nanogridLiveInterval      = 100 * time.Millisecond
	nanogridHarnessSourcePath = "/opt/nanogrid/harness.go"
)

var (
	nanogridWorkDir      = nanogridEnvOr("NANOGRID_WORK_DIR", nanogridCwd())
	nanogridOutputDir    = nanogridEnvOr("NANOGRID_OUTPUT_DIR", filepath.Join(nanogridWorkDir, "output"))
	nanogridCodeDir      = filepath.Join(nanogridWorkDir, "code")
	nanogridCaptureLimit = nanogridEnvInt("NANOGRID_CAPTURE_LIMIT", 1<<20)
	nanogridReplyFd      = 1
	nanogridWriteLock    sync.Mutex
	// The function's handler, bound by the generated zz_nanogrid_handler.go when the package defines it.
	nanogridHandler interface{}
)

func nanogridEnvOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func nanogridEnvInt(name string, fallback int) int {
	if value, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return value
	}
	return fallback
}

func nanogridCwd() string {
	dir, _ := os.Getwd()
	return dir
}

// nanogridBind is called by the generated file's package-level variable: before any init() runs.
func nanogridBind(handler interface{}) bool {
	nanogridHandler = handler
	return true
}

func init() {
	switch os.Getenv("NANOGRID_STAGE") {
	case "serve":
		os.Unsetenv("NANOGRID_STAGE")
		nanogridServe()
		os.Exit(0)
	case "program":
		os.Unsetenv("NANOGRID_STAGE") // the function's own main runs next
	}
}

// ---- frames --------------------------------------------------------------------------------------------

type nanogridHeader map[string]interface{}

func (h nanogridHeader) str(key string) string {
	value, _ := h[key].(string)
	return value
}

func (h nanogridHeader) num(key string, fallback float64) float64 {
	if value, ok := h[key].(float64); ok {
		return value
	}
	return fallback
}

func (h nanogridHeader) flag(key string, fallback bool) bool {
	if value, ok := h[key].(bool); ok {
		return value
	}
	return fallback
}

func nanogridReadFrame(in io.Reader) (nanogridHeader, []byte, error) {
	var lengths [8]byte
	if _, err := io.ReadFull(in, lengths[:]); err != nil {
		return nil, nil, err
	}
	data := make([]byte, binary.BigEndian.Uint32(lengths[:4]))
	if _, err := io.ReadFull(in, data); err != nil {
		return nil, nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(lengths[4:]))
	if _, err := io.ReadFull(in, body); err != nil {
		return nil, nil, err
	}
	header := nanogridHeader{}
	if err := json.Unmarshal(data, &header); err != nil {
		return nil, nil, err
	}
	return header, body, nil
}

func nanogridWriteAll(fd int, data []byte) {
	for len(data) > 0 {
		n, err := syscall.Write(fd, data)
		if err == syscall.EINTR || err == syscall.EAGAIN {
			continue
		}
		if err != nil {
			os.Exit(74) // the host is gone
		}
		data = data[n:]
	}
}

func nanogridWriteFrame(header interface{}, body []byte) {
	data, err := json.Marshal(header)
	if err != nil {
		data = []byte(`{"ok": false, "error": {"kind": "protocol", "message": "unencodable header"}}`)
	}
	lengths := make([]byte, 8, 8+len(data))
	binary.BigEndian.PutUint32(lengths[:4], uint32(len(data)))
	binary.BigEndian.PutUint32(lengths[4:], uint32(len(body)))
	nanogridWriteLock.Lock()
	defer nanogridWriteLock.Unlock()
	nanogridWriteAll(nanogridReplyFd, append(lengths, data...))
	nanogridWriteAll(nanogridReplyFd, body)
}

func nanogridWriteReply(reply map[string]interface{}, result []byte) {
	if len(result) <= nanogridStreamResultOver {
		nanogridWriteFrame(reply, result)
		return
	}
	reply["result_size"] = len(result)
	nanogridWriteFrame(reply, nil)
	for start := 0; start < len(result); start += nanogridBlobChunkBytes {
		end := start + nanogridBlobChunkBytes
		if end > len(result) {
			end = len(result)
		}
		nanogridWriteFrame(map[string]string{"op": "result_data"}, result[start:end])
	}
}

func nanogridCut(text string) string {
	if len(text) > nanogridCaptureLimit {
		return text[:nanogridCaptureLimit]
	}
	return text
}

func nanogridError(kind, kindOfError, message, trace string) map[string]interface{} {
	return map[string]interface{}{"ok": false, "error": map[string]string{
		"kind": kind, "type": nanogridCut(kindOfError), "message": nanogridCut(message), "traceback": nanogridCut(trace)}}
}

// ---- the stem cell: ready, load, compile, exec -----------------------------------------------------------

func nanogridBootstrap() {
	signal.Ignore(syscall.SIGXFSZ) // an oversized write fails with EFBIG instead
	reply, err := syscall.Dup(1)
	if err != nil {
		os.Exit(70)
	}
	nanogridReplyFd = reply
	os.MkdirAll(nanogridWorkDir, 0o700)
	for fd, name := range map[int]string{1: "stdout.log", 2: "stderr.log"} {
		file, err := os.OpenFile(filepath.Join(nanogridWorkDir, name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			fmt.Fprintf(os.Stderr, "nanogrid bootstrap: %v\n", err)
			os.Exit(70)
		}
		syscall.Dup3(int(file.Fd()), fd, 0)
		file.Close()
	}
	version := strings.TrimPrefix(runtime.Version(), "go")
	nanogridWriteFrame(map[string]interface{}{"ok": true, "op": "ready", "runtime": "go", "version": version}, nil)
	in := os.Stdin
	for {
		header, body, err := nanogridReadFrame(in)
		if err != nil {
			return
		}
		switch header.str("op") {
		case "load":
			if failure := nanogridLoad(header, body); failure != nil {
				nanogridWriteFrame(failure, nil)
			}
		case "outputs":
			nanogridSendOutputs(int64(header.num("limit", 0)))
		default:
			nanogridWriteFrame(map[string]interface{}{"ok": false, "error": map[string]string{
				"kind": "protocol", "message": fmt.Sprintf("unexpected %q", header.str("op"))}}, nil)
		}
	}
}

var nanogridIdentifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// nanogridLoad compiles the package (once per package hash) and execs it; returns the load's failure, if any.
func nanogridLoad(header nanogridHeader, body []byte) map[string]interface{} {
	if env, ok := header["env"].(map[string]interface{}); ok {
		for key, value := range env {
			os.Setenv(key, fmt.Sprint(value))
		}
	}
	if err := nanogridUnzip(body, nanogridCodeDir); err != nil {
		return nanogridError("load", "PackageError", "the package could not be unpacked: "+err.Error(), err.Error())
	}
	manifest := map[string]interface{}{}
	if data, err := os.ReadFile(filepath.Join(nanogridCodeDir, "manifest.json")); err == nil {
		json.Unmarshal(data, &manifest)
	}
	if model, _ := manifest["model"].(string); model != "" {
		os.Setenv("LLM_MODEL", model) // the function's own default model (a seed upload's modelId)
	}
	handler, _ := manifest["handler"].(string)
	name := handler[strings.LastIndex(handler, ".")+1:]
	if !nanogridIdentifier.MatchString(name) {
		name = "Handler"
	}
	sum := sha256.Sum256(body)
	binary := filepath.Join(nanogridWorkDir, "bin", hex.EncodeToString(sum[:16]))
	if _, err := os.Stat(binary); err != nil {
		if failure := nanogridCompile(name, binary); failure != nil {
			return failure
		}
	}
	// Limits apply from here on: to the function, not to compiling it.
	if limit := header.num("max_output_bytes", 0); limit > 0 {
		syscall.Setrlimit(syscall.RLIMIT_FSIZE, &syscall.Rlimit{Cur: uint64(limit), Max: uint64(limit)})
	}
	if limit := header.num("rlimit_data", 0); limit > 0 {
		syscall.Setrlimit(syscall.RLIMIT_DATA, &syscall.Rlimit{Cur: uint64(limit), Max: uint64(limit)})
	}
	env := append(os.Environ(), "NANOGRID_STAGE=serve", "NANOGRID_REPLY_FD="+strconv.Itoa(nanogridReplyFd),
		"NANOGRID_FUNCTION_NAME="+fmt.Sprint(manifest["name"]), "NANOGRID_MEMORY_MB="+fmt.Sprint(manifest["memory"]))
	err := syscall.Exec(binary, []string{binary}, env)
	return nanogridError("load", "ExecError", "the compiled function could not start: "+err.Error(), err.Error())
}

func nanogridUnzip(data []byte, target string) error {
	archive, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		return err
	}
	for _, entry := range archive.File {
		name := filepath.Clean(entry.Name)
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return fmt.Errorf("zip entry %q points outside the package", entry.Name)
		}
		path := filepath.Join(target, name)
		if entry.FileInfo().IsDir() {
			os.MkdirAll(path, 0o700)
			continue
		}
		if !entry.Mode().IsRegular() {
			return fmt.Errorf("zip entry %q is not a regular file", entry.Name)
		}
		os.MkdirAll(filepath.Dir(path), 0o700)
		reader, err := entry.Open()
		if err != nil {
			return err
		}
		content, err := io.ReadAll(reader)
		reader.Close()
		if err != nil {
			return err
		}
		if err := os.WriteFile(path, content, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// nanogridCompile runs `go build` in the sandbox: the function's package, this file, and the binding of its handler.
func nanogridCompile(name, binary string) map[string]interface{} {
	source, err := os.ReadFile(nanogridHarnessSourcePath)
	if err == nil {
		err = os.WriteFile(filepath.Join(nanogridCodeDir, "zz_nanogrid_harness.go"), source, 0o600)
	}
	if err != nil {
		return nanogridError("load", "CompileError", "the runtime's harness is missing: "+err.Error(), err.Error())
	}
	defines := regexp.MustCompile(`(?m)^func\s+` + name + `\s*\(`)
	definesMain := regexp.MustCompile(`(?m)^func\s+main\s*\(\s*\)`)
	files, _ := filepath.Glob(filepath.Join(nanogridCodeDir, "*.go"))
	bound, hasMain := false, false
	for _, file := range files {
		if strings.HasSuffix(file, "_test.go") || strings.HasPrefix(filepath.Base(file), "zz_nanogrid_") {
			continue
		}
		content, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		hasMain = hasMain || definesMain.Match(content)
		if !bound && defines.Match(content) {
			binding := "package main\n\nvar nanogridBound = nanogridBind(" + name + ")\n"
			os.WriteFile(filepath.Join(nanogridCodeDir, "zz_nanogrid_handler.go"), []byte(binding), 0o600)
			bound = true
		}
	}
	if bound && !hasMain { // a handler-only package: Go needs a main to build it
		os.WriteFile(filepath.Join(nanogridCodeDir, "zz_nanogrid_main.go"), []byte("package main\n\nfunc main() {}\n"), 0o600)
	}
	os.MkdirAll(filepath.Dir(binary), 0o700)
	command := exec.Command("go", "build", "-p", "1", "-o", binary, ".") // no -trimpath: it would rebuild the standard library
	command.Dir = nanogridCodeDir
	command.Env = append(os.Environ(), "GO111MODULE=off", "CGO_ENABLED=0", "GOFLAGS=", "GOMAXPROCS=2",
		"GOPATH="+filepath.Join(nanogridWorkDir, "gopath"), "GOCACHE="+filepath.Join(nanogridWorkDir, ".gocache"))
	output, err := command.CombinedOutput()
	if err != nil {
		said := strings.TrimSpace(string(output))
		if said == "" {
			said = err.Error()
		}
		return nanogridError("load", "CompileError", "go build failed:\n"+said, said)
	}
	return nil
}

// ---- the compiled function: calls and outputs -------------------------------------------------------------

type nanogridCapture struct{ fd int }

func (c nanogridCapture) size() int64 {
	var info syscall.Stat_t
	if syscall.Fstat(c.fd, &info) != nil {
		return 0
	}
	return info.Size
}

func (c nanogridCapture) reset() {
	if c.size() > 0 {
		syscall.Ftruncate(c.fd, 0)
	}
	syscall.Seek(c.fd, 0, 0)
}

func (c nanogridCapture) readAt(offset, length int64) []byte {
	buf := make([]byte, length)
	n, _ := syscall.Pread(c.fd, buf, offset)
	if n < 0 {
		n = 0
	}
	return buf[:n]
}

func (c nanogridCapture) read() string {
	size := c.size()
	if size == 0 {
		return ""
	}
	keep := size
	if keep > int64(nanogridCaptureLimit) {
		keep = int64(nanogridCaptureLimit)
	}
	text := strings.ToValidUTF8(string(c.readAt(0, keep)), "\uFFFD")
	if size > keep {
		text += fmt.Sprintf("\n[nanogrid: output truncated, %d more bytes not kept]\n", size-keep)
	}
	return text
}

var nanogridCaptures = []nanogridCapture{{1}, {2}}

// nanogridLive sends what a call prints while it runs, every 0.1 s, until stop is closed.
func nanogridLive(stop chan struct{}, done chan struct{}) {
	defer close(done)
	offsets, sent := []int64{0, 0}, int64(0)
	ticker := time.NewTicker(nanogridLiveInterval)
	defer ticker.Stop()
	for {
		select {
		case <-stop:
			return
		case <-ticker.C:
		}
		for index, capture := range nanogridCaptures {
			left := capture.size() - offsets[index]
			if left > nanogridLiveFrameBytes {
				left = nanogridLiveFrameBytes
			}
			if room := int64(nanogridCaptureLimit) - sent; left > room {
				left = room
			}
			if left <= 0 {
				continue
			}
			data := capture.readAt(offsets[index], left)
			data = data[:nanogridCompleteUTF8(data)] // a character cut in two waits for its other half
			if len(data) == 0 {
				continue
			}
			offsets[index] += int64(len(data))
			sent += int64(len(data))
			nanogridWriteFrame(map[string]string{"op": "log", "stream": []string{"stdout", "stderr"}[index]}, data)
		}
	}
}

// nanogridCompleteUTF8 is the length of data without a UTF-8 character cut off at its end.
func nanogridCompleteUTF8(data []byte) int {
	for back := 1; back <= 4 && back <= len(data); back++ {
		if utf8.RuneStart(data[len(data)-back]) {
			if utf8.FullRune(data[len(data)-back:]) {
				return len(data)
			}
			return len(data) - back
		}
	}
	return len(data)
}

func nanogridServe() {
	signal.Ignore(syscall.SIGXFSZ)
	go func() { // as the Python bootstrap: SIGTERM ends the sandbox at once
		terminate := make(chan os.Signal, 1)
		signal.Notify(terminate, syscall.SIGTERM)
		<-terminate
		os.Exit(143)
	}()
	nanogridReplyFd = nanogridEnvInt("NANOGRID_REPLY_FD", 1)
	syscall.CloseOnExec(nanogridReplyFd) // never inherited by a program the function starts
	functionName := os.Getenv("NANOGRID_FUNCTION_NAME")
	memory := nanogridEnvInt("NANOGRID_MEMORY_MB", 0)
	for _, name := range []string{"NANOGRID_REPLY_FD", "NANOGRID_FUNCTION_NAME", "NANOGRID_MEMORY_MB"} {
		os.Unsetenv(name)
	}
	var handler reflect.Value
	if nanogridHandler != nil {
		handler = reflect.ValueOf(nanogridHandler)
		if problem := nanogridCheckHandler(handler.Type()); problem != "" {
			nanogridWriteFrame(nanogridError("load", "TypeError", problem, problem), nil)
			return
		}
	}
	nanogridStartAI()
	nanogridWriteFrame(map[string]bool{"ok": true}, nil) // the load's answer: compiled and started
	in := os.Stdin
	for {
		header, body, err := nanogridReadFrame(in)
		if err != nil {
			return
		}
		switch header.str("op") {
		case "call":
			nanogridSkipBlobs(in, header["blobs"])
			reply, result := nanogridCall(header, body, handler, functionName, memory)
			nanogridWriteReply(reply, result)
		case "outputs":
			nanogridSendOutputs(int64(header.num("limit", 0)))
		default:
			nanogridWriteFrame(map[string]interface{}{"ok": false, "error": map[string]string{
				"kind": "protocol", "message": fmt.Sprintf("unexpected %q", header.str("op"))}}, nil)
		}
	}
}

var (
	nanogridErrorType   = reflect.TypeOf((*error)(nil)).Elem()
	nanogridContextType = reflect.TypeOf((*context.Context)(nil)).Elem()
)

// nanogridCheckHandler: func(event) or func(event, context), returning a value, an error, or both.
func nanogridCheckHandler(t reflect.Type) string {
	if t.Kind() != reflect.Func || t.NumIn() > 2 || t.NumOut() > 2 || t.IsVariadic() {
		return fmt.Sprintf("the handler must be func(event[, context]) (result, error), not %s", t)
	}
	if t.NumOut() == 2 && !t.Out(1).Implements(nanogridErrorType) {
		return fmt.Sprintf("the handler's second result must be an error, not %s", t.Out(1))
	}
	if t.NumIn() == 2 && t.In(1) != nanogridContextType && t.In(1).Kind() != reflect.Map && t.In(1).Kind() != reflect.Interface {
		return fmt.Sprintf("the handler's context must be context.Context or map[string]interface{}, not %s", t.In(1))
	}
	return ""
}

func nanogridSkipBlobs(in io.Reader, sizes interface{}) {
	list, _ := sizes.([]interface{})
	for _, size := range list {
		total, _ := size.(float64)
		for filled := 0; filled < int(total); {
			_, body, err := nanogridReadFrame(in)
			if err != nil {
				os.Exit(0)
			}
			filled += len(body)
		}
	}
}

func nanogridSeedEnvironment(jobID string, body []byte) {
	os.Setenv("JOB_ID", jobID)
	os.Setenv("OUTPUT_DIR", nanogridOutputDir)
	if len(body) > nanogridPayloadFileOver {
		path := filepath.Join(nanogridWorkDir, "payload.json")
		os.WriteFile(path, body, 0o600)
		os.Unsetenv("PAYLOAD")
		os.Setenv("PAYLOAD_FILE", path)
	} else {
		os.Unsetenv("PAYLOAD_FILE")
		payload := string(body)
		if payload == "" {
			payload = "{}"
		}
		os.Setenv("PAYLOAD", payload)
	}
}

func nanogridPeakRss() interface{} {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return nil
	}
	match := regexp.MustCompile(`VmHWM:\s+(\d+) kB`).FindSubmatch(data)
	if match == nil {
		return nil
	}
	kb, _ := strconv.ParseInt(string(match[1]), 10, 64)
	return kb * 1024
}

func nanogridCall(header nanogridHeader, body []byte, handler reflect.Value, functionName string,
	memory int) (map[string]interface{}, []byte) {
	for _, capture := range nanogridCaptures {
		capture.reset()
	}
	var stopLive, liveDone chan struct{}
	if header.flag("live", false) {
		stopLive, liveDone = make(chan struct{}), make(chan struct{})
		go nanogridLive(stopLive, liveDone)
	}
	if entries, err := os.ReadDir(nanogridOutputDir); err != nil || len(entries) > 0 {
		os.RemoveAll(nanogridOutputDir)
		os.MkdirAll(nanogridOutputDir, 0o700)
	}
	measureRss := header.flag("measure_rss", true)
	defaultModel, hadModel := os.LookupEnv("LLM_MODEL")
	if model := header.str("model"); model != "" {
		os.Setenv("LLM_MODEL", model)
	}
	if measureRss {
		os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
	}
	jobID := header.str("job_id")
	nanogridSeedEnvironment(jobID, body)
	deadline := time.Now().Add(time.Duration(header.num("timeout", 300) * float64(time.Second)))
	started := time.Now()
	var reply map[string]interface{}
	var result []byte
	var childPeak int64
	if nanogridAI != nil {
		nanogridAI.begin()
	}
	if handler.IsValid() {
		reply, result = nanogridCallHandler(handler, body, jobID, functionName, memory, deadline)
	} else {
		reply, result, childPeak = nanogridRunProgram()
	}
	if nanogridAI != nil {
		nanogridAI.end() // an AI answer under way arrives before the call's reply
	}
	if stopLive != nil {
		close(stopLive)
		<-liveDone
	}
	elapsed := time.Since(started)
	reply["duration_ms"] = float64(elapsed.Nanoseconds()) / 1e6
	reply["stdout"] = nanogridCaptures[0].read()
	if text, ok := reply["program_stdout"].(string); ok {
		reply["stdout"] = text
		delete(reply, "program_stdout")
	}
	reply["stderr"] = nanogridCaptures[1].read()
	if measureRss {
		peak := nanogridPeakRss()
		if own, ok := peak.(int64); ok && childPeak > own {
			peak = childPeak
		}
		reply["peak_rss_bytes"] = peak
	}
	reply["output_files"] = nanogridCountOutputs()
	if hadModel {
		os.Setenv("LLM_MODEL", defaultModel)
	} else {
		os.Unsetenv("LLM_MODEL")
	}
	return reply, result
}

func nanogridCallHandler(handler reflect.Value, body []byte, jobID, functionName string, memory int,
	deadline time.Time) (reply map[string]interface{}, result []byte) {
	defer func() {
		if recovered := recover(); recovered != nil {
			message := fmt.Sprint(recovered)
			reply = nanogridError("exception", "panic", message, "panic: "+message+"\n\n"+string(debug.Stack()))
			result = nil
		}
	}()
	t := handler.Type()
	var args []reflect.Value
	if t.NumIn() >= 1 {
		event := reflect.New(t.In(0))
		if len(body) > 0 {
			if err := json.Unmarshal(body, event.Interface()); err != nil {
				message := fmt.Sprintf("the event does not fit the handler's %s: %v", t.In(0), err)
				return nanogridError("exception", "json.UnmarshalTypeError", message, message), nil
			}
		}
		args = append(args, event.Elem())
	}
	if t.NumIn() == 2 {
		if t.In(1) == nanogridContextType {
			ctx, cancel := context.WithDeadline(context.Background(), deadline)
			defer cancel()
			args = append(args, reflect.ValueOf(ctx))
		} else {
			values := map[string]interface{}{"request_id": jobID, "requestId": jobID, "job_id": jobID,
				"function_id": os.Getenv("FUNCTION_ID"), "function_name": functionName, "memory_mb": memory,
				"output_dir": nanogridOutputDir, "deadline_ms": deadline.UnixMilli()}
			given := reflect.New(t.In(1)).Elem()
			if t.In(1).Kind() == reflect.Map {
				given = reflect.MakeMap(t.In(1))
				for key, value := range values {
					if reflect.TypeOf(value).AssignableTo(t.In(1).Elem()) {
						given.SetMapIndex(reflect.ValueOf(key).Convert(t.In(1).Key()), reflect.ValueOf(value))
					}
				}
			} else if reflect.TypeOf(values).AssignableTo(t.In(1)) {
				given = reflect.ValueOf(values)
			}
			args = append(args, given)
		}
	}
	out := handler.Call(args)
	var value interface{}
	if len(out) > 0 && !(len(out) == 1 && t.Out(0).Implements(nanogridErrorType)) {
		value = out[0].Interface()
	}
	if len(out) > 0 && t.Out(len(out)-1).Implements(nanogridErrorType) && !out[len(out)-1].IsNil() {
		err := out[len(out)-1].Interface().(error)
		return nanogridError("exception", fmt.Sprintf("%T", err), err.Error(), fmt.Sprintf("%T: %s", err, err)), nil
	}
	encoded, err := json.Marshal(value)
	if err != nil {
		message := "the handler returned a value JSON cannot encode: " + err.Error()
		return nanogridError("exception", "TypeError", message, message), nil
	}
	return map[string]interface{}{"ok": true, "result_format": "json"}, encoded
}

// nanogridRunProgram runs the function's own main once (the seed's convention): its last stdout line is the result
// when it is JSON (the rest stays its output); a non-zero exit status is the call's error.
func nanogridRunProgram() (map[string]interface{}, []byte, int64) {
	self, err := os.Executable()
	if err != nil {
		return nanogridError("exception", "ExecError", err.Error(), err.Error()), nil, 0
	}
	command := exec.Command(self)
	command.Env = append(os.Environ(), "NANOGRID_STAGE=program")
	command.Stdin, command.Stdout, command.Stderr = nil, os.Stdout, os.Stderr
	command.Dir = nanogridCodeDir
	err = command.Run()
	var peak int64
	if command.ProcessState != nil {
		if usage, ok := command.ProcessState.SysUsage().(*syscall.Rusage); ok {
			peak = usage.Maxrss * 1024
		}
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		message := fmt.Sprintf("the program exited with %s", exit.ProcessState)
		return nanogridError("exception", "ExitError", message, message), nil, peak
	} else if err != nil {
		return nanogridError("exception", "ExecError", err.Error(), err.Error()), nil, peak
	}
	return nanogridProgramResult(nanogridCaptures[0].read(), peak)
}

func nanogridProgramResult(stdout string, peak int64) (map[string]interface{}, []byte, int64) {
	trimmed := strings.TrimRight(stdout, "\n")
	last := trimmed[strings.LastIndex(trimmed, "\n")+1:]
	if strings.TrimSpace(last) != "" && json.Valid([]byte(last)) {
		return map[string]interface{}{"ok": true, "result_format": "json", "program_stdout": trimmed[:len(trimmed)-len(last)]},
			[]byte(last), peak
	}
	return map[string]interface{}{"ok": true, "result_format": "json"}, []byte("null"), peak
}

type nanogridOutput struct {
	name, path string
	size       int64
}

func nanogridOutputs() []nanogridOutput {
	var files []nanogridOutput
	filepath.Walk(nanogridOutputDir, func(path string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() { // links, fifos and devices are never sent
			name, _ := filepath.Rel(nanogridOutputDir, path)
			files = append(files, nanogridOutput{name, path, info.Size()})
		}
		return nil
	})
	sort.Slice(files, func(i, j int) bool { return files[i].name < files[j].name })
	return files
}

func nanogridCountOutputs() int {
	return len(nanogridOutputs())
}

func nanogridSendOutputs(limit int64) {
	defer func() {
		os.RemoveAll(nanogridOutputDir)
		os.MkdirAll(nanogridOutputDir, 0o700)
	}()
	files := nanogridOutputs()
	var total int64
	for _, file := range files {
		total += file.size
	}
	fail := func(message string) {
		nanogridWriteFrame(map[string]interface{}{"op": "done", "ok": false,
			"error": map[string]string{"kind": "output", "message": message}}, nil)
	}
	if limit > 0 && total > limit {
		fail(fmt.Sprintf("output files total %d MiB, over the %d MiB limit", total>>20, limit>>20))
		return
	}
	buf := make([]byte, nanogridChunkBytes)
	for _, file := range files {
		handle, err := os.Open(file.path)
		if err != nil {
			fail(err.Error())
			return
		}
		nanogridWriteFrame(map[string]interface{}{"op": "file", "name": file.name, "size": file.size}, nil)
		for {
			n, err := handle.Read(buf)
			if n > 0 {
				nanogridWriteFrame(map[string]string{"op": "data"}, buf[:n])
			}
			if err != nil {
				break
			}
		}
		handle.Close()
	}
	nanogridWriteFrame(map[string]interface{}{"op": "done", "ok": true}, nil)
}

// ---- the AI node ---------------------------------------------------------------------------------------

// AI_ENDPOINT inside the sandbox, as nanogrid_runtimes/python/bootstrap.py's AIForwarder: an HTTP server on the
// sandbox's own loopback (the container has no network) that hands each request to the worker over the channel (an
// `ai` frame); the worker's AI gateway opens the inference routes only, within the owner's budget, and counts the
// tokens. Only while a call runs (the host reads `ai` frames only then); a function without AI access gets a 403
// that says why. A program the function runs (the seed's main convention) inherits AI_ENDPOINT and is served too.
const (
	nanogridAIChannel         = "nanogrid:channel"
	nanogridAIAddress         = "127.0.0.1:11434"
	nanogridAIMaxRequestBytes = 4 << 20 // the gateway takes no more
	nanogridAIRefused         = "no AI node in this sandbox: this function may not use it. A seed upload may use " +
		"it unless the grid's operator turned that off (seed_ai = false); the grid needs an AI node (--ai-endpoint URL)"
	nanogridAIOutsideCall = "the AI node is reachable only while the function is being called, not while it " +
		"starts nor after its call returned"
)

type nanogridAIForwarder struct {
	allowed  bool
	gate     sync.Mutex
	idle     *sync.Cond
	calling  bool
	inFlight int
	exchange sync.Mutex // one request and its answer on the channel at a time
}

var nanogridAI *nanogridAIForwarder

func nanogridStartAI() {
	forwarder := &nanogridAIForwarder{allowed: os.Getenv("AI_ENDPOINT") == nanogridAIChannel}
	forwarder.idle = sync.NewCond(&forwarder.gate)
	listener, err := net.Listen("tcp", nanogridAIAddress)
	if err != nil {
		return // no loopback to listen on: requests to AI_ENDPOINT fail to connect
	}
	os.Setenv("AI_ENDPOINT", "http://"+nanogridAIAddress)
	nanogridAI = forwarder
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go forwarder.serve(conn)
		}
	}()
}

func (f *nanogridAIForwarder) begin() {
	f.gate.Lock()
	f.calling = true
	f.gate.Unlock()
}

// end: no more requests; returns once those under way have their answers (before the call's reply is sent).
func (f *nanogridAIForwarder) end() {
	f.gate.Lock()
	f.calling = false
	for f.inFlight > 0 {
		f.idle.Wait()
	}
	f.gate.Unlock()
}

// serve answers one connection's requests (HTTP/1.1 keep-alive) in order.
func (f *nanogridAIForwarder) serve(conn net.Conn) {
	defer conn.Close()
	reader := bufio.NewReader(conn)
	for {
		line, err := reader.ReadString('\n')
		parts := strings.Fields(line)
		if err != nil || len(parts) < 3 {
			return
		}
		method, path, keep, size, sized, expect := parts[0], parts[1], parts[2] == "HTTP/1.1", 0, true, false
		for {
			field, err := reader.ReadString('\n')
			if err != nil {
				return
			}
			if field = strings.TrimRight(field, "\r\n"); field == "" {
				break
			}
			name, value, _ := strings.Cut(field, ":")
			value = strings.TrimSpace(value)
			switch strings.ToLower(strings.TrimSpace(name)) {
			case "content-length":
				size, err = strconv.Atoi(value)
				sized = err == nil && size >= 0
			case "transfer-encoding":
				sized = false
			case "connection":
				keep = keep && !strings.EqualFold(value, "close")
			case "expect":
				expect = strings.EqualFold(value, "100-continue")
			}
		}
		if !sized {
			nanogridAIRespond(conn, 411, nanogridAIError("send the request with a Content-Length"), false)
			return
		}
		if expect {
			conn.Write([]byte("HTTP/1.1 100 Continue\r\n\r\n"))
		}
		if size > nanogridAIMaxRequestBytes { // read and dropped, so that the refusal reaches the function
			if _, err := io.CopyN(io.Discard, reader, int64(size)); err != nil {
				return
			}
			nanogridAIRespond(conn, 413, nanogridAIError(fmt.Sprintf("an AI request of %d bytes (at most %d bytes)",
				size, nanogridAIMaxRequestBytes)), false)
			return
		}
		body := make([]byte, size)
		if _, err := io.ReadFull(reader, body); err != nil {
			return
		}
		if i := strings.IndexByte(path, '?'); i >= 0 {
			path = path[:i]
		}
		status, answer := f.answer(method, path, body)
		nanogridAIRespond(conn, status, answer, keep)
		if !keep {
			return
		}
	}
}

func (f *nanogridAIForwarder) answer(method, path string, body []byte) (int, []byte) {
	if !f.allowed {
		return 403, nanogridAIError(nanogridAIRefused)
	}
	f.gate.Lock()
	if !f.calling {
		f.gate.Unlock()
		return 503, nanogridAIError(nanogridAIOutsideCall)
	}
	f.inFlight++
	f.gate.Unlock()
	defer func() {
		f.gate.Lock()
		f.inFlight--
		f.idle.Broadcast()
		f.gate.Unlock()
	}()
	f.exchange.Lock()
	defer f.exchange.Unlock()
	nanogridWriteFrame(map[string]interface{}{"op": "ai", "method": method, "path": path},
		nanogridWithModel(method, body))
	header, answer, err := nanogridReadFrame(os.Stdin)
	if err != nil {
		os.Exit(0) // the host is gone
	}
	status := int(header.num("status", 502))
	if status < 100 || status >= 600 {
		status = 502
	}
	return status, answer
}

// nanogridWithModel: a request that names no model gets this call's (LLM_MODEL: the run's modelId, else the
// function's or the grid's default).
func nanogridWithModel(method string, body []byte) []byte {
	model := os.Getenv("LLM_MODEL")
	if method != "POST" || model == "" {
		return body
	}
	var request map[string]interface{}
	if json.Unmarshal(body, &request) != nil || request == nil {
		return body // the gateway says what is wrong with it
	}
	if named, _ := request["model"].(string); named != "" {
		return body
	}
	request["model"] = model
	data, err := json.Marshal(request)
	if err != nil {
		return body
	}
	return data
}

func nanogridAIError(message string) []byte {
	data, _ := json.Marshal(map[string]string{"error": message})
	return data
}

func nanogridAIRespond(conn net.Conn, status int, answer []byte, keep bool) {
	kind, reason, connection := "application/json", "OK", "close"
	if bytes.Contains(bytes.TrimSpace(answer), []byte("\n")) {
		kind = "application/x-ndjson"
	}
	if status >= 400 {
		reason = "Error"
	}
	if keep {
		connection = "keep-alive"
	}
	head := fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: %s; charset=utf-8\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n",
		status, reason, kind, len(answer), connection)
	conn.Write(append([]byte(head), answer...))
}
