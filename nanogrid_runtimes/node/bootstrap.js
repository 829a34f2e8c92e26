// NanoGrid's Node.js bootstrap: the in-sandbox runtime for `exports.handler = async (event, context) => ...`.
//
// The same protocol as nanogrid_runtimes/python/bootstrap.py (the reference): frames of `>II` (JSON header
// length, body length), the JSON header, the raw body; requests on fd 0, replies on fd 3. start.sh
// starts node with fd 3 as the original stdout and fds 1 and 2 already pointing at the capture
// files, so a console.log (or a child process) can never corrupt the reply channel. One `load`
// specialises the sandbox to one package (a zip, unpacked with Debian's unzip); then it serves
// `call` frames (the JSON event in, the handler's JSON value out) and `outputs`.
//
// The host trusts nothing it reads here: nanogrid_backend/sandbox/protocol.py checks every frame.
'use strict';

const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const IN = 0;
const REPLY = 3;
const STARTUP_ERR = 4; // the container's own stderr, until the first frame is sent
const CAPTURE_LIMIT = parseInt(process.env.NANOGRID_CAPTURE_LIMIT || String(1 << 20), 10);
const WORK_DIR = process.env.NANOGRID_WORK_DIR || process.cwd();
const OUTPUT_DIR = process.env.NANOGRID_OUTPUT_DIR || path.join(WORK_DIR, 'output');
const CODE_DIR = path.join(WORK_DIR, 'code');
const CHUNK_BYTES = 1 << 20; // output file data travels in frames of at most this size
const STREAM_RESULT_OVER = 1 << 20; // a larger result follows its reply in `result_data` frames
const BLOB_CHUNK_BYTES = 4 << 20;
const PAYLOAD_FILE_OVER = 100 * 1024; // the seed platform's limit for PAYLOAD; above it the event is in PAYLOAD_FILE
const LIVE_INTERVAL_MS = 100;
const LIVE_FRAME_BYTES = 64 << 10;

function pause(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function readExact(n) {
  const buf = Buffer.allocUnsafe(n);
  let got = 0;
  while (got < n) {
    let k;
    try {
      k = fs.readSync(IN, buf, got, n - got, null);
    } catch (e) {
      if (e.code === 'EAGAIN') { pause(1); continue; }
      if (e.code === 'EOF') return null;
      throw e;
    }
    if (k === 0) return null;
    got += k;
  }
  return buf;
}

function readFrame() {
  const lengths = readExact(8);
  if (lengths === null) return null;
  const header = JSON.parse(readExact(lengths.readUInt32BE(0)).toString('utf8'));
  const bodyLength = lengths.readUInt32BE(4);
  return { header, body: bodyLength ? readExact(bodyLength) : Buffer.alloc(0) };
}

function writeAll(fd, buf) {
  let sent = 0;
  while (sent < buf.length) {
    try {
      sent += fs.writeSync(fd, buf, sent, buf.length - sent);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
      pause(1);
    }
  }
}

function writeFrame(header, body = Buffer.alloc(0)) {
  const data = Buffer.from(JSON.stringify(header), 'utf8');
  const lengths = Buffer.allocUnsafe(8);
  lengths.writeUInt32BE(data.length, 0);
  lengths.writeUInt32BE(body.length, 4);
  writeAll(REPLY, Buffer.concat([lengths, data]));
  writeAll(REPLY, body);
}

function writeReply(reply, result) {
  if (result.length <= STREAM_RESULT_OVER) {
    writeFrame(reply, result);
    return;
  }
  reply.result_size = result.length;
  writeFrame(reply);
  for (let start = 0; start < result.length; start += BLOB_CHUNK_BYTES) {
    writeFrame({ op: 'result_data' }, result.subarray(start, start + BLOB_CHUNK_BYTES));
  }
}

// One capture file behind fd 1 or 2 (opened for appending by start.sh), emptied before each call.
class Capture {
  constructor(fd, name) {
    this.fd = fd;
    this.readFd = fs.openSync(path.join(WORK_DIR, name), 'r');
  }

  size() {
    return fs.fstatSync(this.readFd).size;
  }

  reset() {
    if (this.size()) fs.ftruncateSync(this.fd, 0); // O_APPEND: the next write lands at offset 0
  }

  readAt(offset, length) {
    const buf = Buffer.allocUnsafe(length);
    const got = fs.readSync(this.readFd, buf, 0, length, offset);
    return buf.subarray(0, got);
  }

  read() {
    const size = this.size();
    if (!size) return '';
    let text = this.readAt(0, Math.min(size, CAPTURE_LIMIT)).toString('utf8');
    if (size > CAPTURE_LIMIT) {
      text += `\n[nanogrid: output truncated, ${size - CAPTURE_LIMIT} more bytes not kept]\n`;
    }
    return text;
  }
}

// The length of `data` without a UTF-8 character cut off at its end.
function completeUtf8(data) {
  for (let back = 1; back <= Math.min(4, data.length); back++) {
    const byte = data[data.length - back];
    if ((byte & 0xc0) !== 0x80) {
      const need = byte < 0x80 ? 1 : byte >> 5 === 0b110 ? 2 : byte >> 4 === 0b1110 ? 3 : 4;
      return need <= back ? data.length : data.length - back;
    }
  }
  return data.length;
}

// What a call prints while it runs, sent every 0.1 s as `log` frames (while the handler awaits).
class LiveOutput {
  constructor(captures) {
    this.captures = captures;
    this.timer = null;
  }

  begin() {
    this.offsets = [0, 0];
    this.sent = 0;
    this.timer = setInterval(() => this.sendNew(), LIVE_INTERVAL_MS);
  }

  end() {
    clearInterval(this.timer);
    this.timer = null;
  }

  sendNew() {
    this.captures.forEach((capture, index) => {
      const left = Math.min(capture.size() - this.offsets[index], LIVE_FRAME_BYTES, CAPTURE_LIMIT - this.sent);
      if (left <= 0) return;
      let data = capture.readAt(this.offsets[index], left);
      data = data.subarray(0, completeUtf8(data));
      if (!data.length) return;
      this.offsets[index] += data.length;
      this.sent += data.length;
      writeFrame({ op: 'log', stream: index === 0 ? 'stdout' : 'stderr' }, data);
    });
  }
}

function describeError(err, kind = 'exception') {
  const cut = (text) => String(text).slice(0, CAPTURE_LIMIT);
  if (err instanceof Error) {
    return { kind, type: err.name || 'Error', message: cut(err.message), traceback: cut(err.stack || String(err)) };
  }
  return { kind, type: typeof err, message: cut(String(err)), traceback: cut(`thrown: ${String(err)}`) };
}

function peakRssReset() {
  try { fs.writeFileSync('/proc/self/clear_refs', '5'); } catch (e) { /* not allowed here */ }
}

function peakRss() {
  try {
    const match = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
    return match ? parseInt(match[1], 10) * 1024 : null;
  } catch (e) {
    return null;
  }
}

// Empties the output directory, keeping the directory itself: in Docker it is a mount (/output), which
// cannot be removed.
function emptyOutputDir() {
  fs.mkdirSync(OUTPUT_DIR, { recursive: true });
  for (const name of fs.readdirSync(OUTPUT_DIR)) fs.rmSync(path.join(OUTPUT_DIR, name), { recursive: true, force: true });
}

function clearOutputDir() {
  if (!fs.existsSync(OUTPUT_DIR) || fs.readdirSync(OUTPUT_DIR).length) emptyOutputDir();
}

function outputFiles() {
  const files = [];
  const walk = (dir) => {
    const entries = fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const entry of entries) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (entry.isFile()) files.push({ name: path.relative(OUTPUT_DIR, full), full, size: fs.lstatSync(full).size });
    }
  };
  if (fs.existsSync(OUTPUT_DIR)) walk(OUTPUT_DIR);
  return files;
}

// Each regular file of the output directory as a `file` record and its `data` chunks; links and devices never.
function sendOutputs(limit) {
  try {
    const files = outputFiles();
    const total = files.reduce((sum, f) => sum + f.size, 0);
    if (limit && total > limit) {
      throw new Error(`output files total ${total >> 20} MiB, over the ${limit >> 20} MiB limit`);
    }
    const buf = Buffer.allocUnsafe(CHUNK_BYTES);
    for (const file of files) {
      writeFrame({ op: 'file', name: file.name, size: file.size });
      const fd = fs.openSync(file.full, 'r');
      try {
        for (let got; (got = fs.readSync(fd, buf, 0, CHUNK_BYTES, null)) > 0;) writeFrame({ op: 'data' }, buf.subarray(0, got));
      } finally {
        fs.closeSync(fd);
      }
    }
    writeFrame({ op: 'done', ok: true });
  } catch (err) {
    writeFrame({ op: 'done', ok: false, error: { kind: 'output', message: String(err.message || err) } });
  }
  emptyOutputDir();
}

// The seed platform's per-call variables: JOB_ID, OUTPUT_DIR, and PAYLOAD or, over 100 KB, PAYLOAD_FILE.
function seedEnvironment(jobId, body) {
  process.env.JOB_ID = String(jobId || '');
  process.env.OUTPUT_DIR = OUTPUT_DIR;
  if (body.length > PAYLOAD_FILE_OVER) {
    const file = path.join(WORK_DIR, 'payload.json');
    fs.writeFileSync(file, body);
    delete process.env.PAYLOAD;
    process.env.PAYLOAD_FILE = file;
  } else {
    delete process.env.PAYLOAD_FILE;
    process.env.PAYLOAD = body.length ? body.toString('utf8') : '{}';
  }
}

// AI_ENDPOINT inside the sandbox, as nanogrid_runtimes/python/bootstrap.py's AIForwarder: an HTTP server on the
// sandbox's own loopback (the container has no network) that hands each request to the worker over the channel (an
// `ai` frame); the worker's AI gateway opens the inference routes only, within the owner's budget, and counts the
// tokens. Only while a call runs (the host reads `ai` frames only then); a function without AI access gets a 403
// that says why. The exchange is synchronous: while it waits, the handler's own code waits for its answer anyway.
const AI_CHANNEL = 'nanogrid:channel';
const AI_PORT = 11434;
const AI_MAX_REQUEST_BYTES = 4 << 20; // the gateway takes no more
const AI_REFUSED = 'no AI node in this sandbox: this function may not use it. A seed upload may use it unless the '
  + "grid's operator turned that off (seed_ai = false); the grid needs an AI node (--ai-endpoint URL)";
const AI_OUTSIDE_CALL = 'the AI node is reachable only while the function is being called, not while its module '
  + 'loads nor after its call returned';

class AIForwarder {
  constructor(allowed) {
    this.allowed = allowed;
    this.calling = false;
    this.url = `http://127.0.0.1:${AI_PORT}`;
    this.server = require('http').createServer((request, response) => this.handle(request, response));
    this.server.on('error', () => {}); // no loopback to listen on: requests to AI_ENDPOINT fail to connect
    this.server.listen(AI_PORT, '127.0.0.1');
  }

  handle(request, response) {
    const chunks = [];
    let size = 0;
    request.on('data', (chunk) => {
      size += chunk.length;
      if (size <= AI_MAX_REQUEST_BYTES) chunks.push(chunk);
    });
    request.on('end', () => {
      const [status, answer] = size > AI_MAX_REQUEST_BYTES
        ? [413, { error: `an AI request of ${size} bytes (at most ${AI_MAX_REQUEST_BYTES} bytes)` }]
        : this.answer(request.method, request.url.split('?')[0], Buffer.concat(chunks));
      const body = Buffer.isBuffer(answer) ? answer : Buffer.from(JSON.stringify(answer));
      const lines = body.toString('utf8').trim().split('\n').length;
      response.writeHead(status, { 'Content-Type': lines > 1 ? 'application/x-ndjson' : 'application/json',
        'Content-Length': body.length });
      response.end(body);
    });
  }

  answer(method, path, body) {
    if (!this.allowed) return [403, { error: AI_REFUSED }];
    if (!this.calling) return [503, { error: AI_OUTSIDE_CALL }];
    writeFrame({ op: 'ai', method, path }, withModel(method, body));
    const frame = readFrame();
    if (frame === null) process.exit(0); // the host is gone
    const status = frame.header.status;
    return [Number.isInteger(status) && status >= 100 && status < 600 ? status : 502, frame.body];
  }
}

// A request that names no model gets this call's (LLM_MODEL: the run's modelId, else the function's or the grid's).
function withModel(method, body) {
  const model = process.env.LLM_MODEL;
  if (method !== 'POST' || !model) return body;
  let request;
  try {
    request = JSON.parse(body.toString('utf8'));
  } catch (e) {
    return body; // the gateway says what is wrong with it
  }
  if (request === null || typeof request !== 'object' || Array.isArray(request) || request.model) return body;
  return Buffer.from(JSON.stringify({ ...request, model }), 'utf8');
}

// The forwarder behind AI_ENDPOINT (every sandbox has one: a function without AI access is told why).
function startAIForwarder() {
  const forwarder = new AIForwarder(process.env.AI_ENDPOINT === AI_CHANNEL);
  process.env.AI_ENDPOINT = forwarder.url;
  return forwarder;
}

class Runtime {
  constructor() {
    this.handler = null;
    this.manifest = null;
    this.ai = null;
  }

  load(header, body) {
    for (const [key, value] of Object.entries(header.env || {})) process.env[String(key)] = String(value);
    fs.mkdirSync(CODE_DIR, { recursive: true });
    const zip = path.join(WORK_DIR, 'package.zip');
    fs.writeFileSync(zip, body);
    const unzip = spawnSync('unzip', ['-q', '-o', zip, '-d', CODE_DIR], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    fs.unlinkSync(zip);
    if (unzip.status !== 0) throw new Error(`the package could not be unpacked: ${unzip.stderr || unzip.error}`);
    this.manifest = JSON.parse(fs.readFileSync(path.join(CODE_DIR, 'manifest.json'), 'utf8'));
    if (this.manifest.model) process.env.LLM_MODEL = String(this.manifest.model); // a seed upload's modelId
    this.ai = startAIForwarder(); // before the module loads: it may read AI_ENDPOINT
    const handler = String(this.manifest.handler || 'index.handler');
    const dot = handler.lastIndexOf('.');
    const moduleName = handler.slice(0, dot);
    let attr = handler.slice(dot + 1);
    const exported = require(path.join(CODE_DIR, moduleName.split('.').join('/')));
    if (attr === 'handler' && typeof exported.handler !== 'function' && typeof exported.main === 'function') attr = 'main';
    if (typeof exported[attr] !== 'function') {
      throw new TypeError(`${moduleName}.js exports no ${attr}(event, context): write exports.${attr} = async (event, context) => { ... }`);
    }
    this.handler = exported[attr];
    // Limits apply from here on: to the function, not to loading it. Node cannot set its own rlimits: prlimit can.
    if (header.max_output_bytes) {
      const limit = spawnSync('prlimit', [`--pid=${process.pid}`, `--fsize=${Math.floor(header.max_output_bytes)}`]);
      if (limit.status !== 0) throw new Error(`could not limit the size of files: ${limit.stderr || limit.error}`);
    }
  }

  async call(header, body, captures, live) {
    captures.forEach((c) => c.reset());
    if (live) live.begin();
    clearOutputDir();
    const measureRss = header.measure_rss !== false;
    const defaultModel = process.env.LLM_MODEL;
    if (header.model) process.env.LLM_MODEL = header.model;
    if (this.ai) this.ai.calling = true;
    if (measureRss) peakRssReset();
    const reply = { ok: true };
    let result = Buffer.alloc(0);
    const started = process.hrtime.bigint();
    try {
      const event = body.length ? JSON.parse(body.toString('utf8')) : null;
      seedEnvironment(header.job_id, body);
      const deadline = Date.now() + (header.timeout || 300) * 1000;
      const jobId = header.job_id || null;
      const context = {
        requestId: jobId, request_id: jobId, awsRequestId: jobId, jobId, job_id: jobId,
        functionId: process.env.FUNCTION_ID || null, function_id: process.env.FUNCTION_ID || null,
        functionName: this.manifest.name, function_name: this.manifest.name,
        memoryLimitInMB: this.manifest.memory, memory_mb: this.manifest.memory,
        outputDir: OUTPUT_DIR, output_dir: OUTPUT_DIR, llmModel: process.env.LLM_MODEL || null,
        getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
      };
      const value = await this.handler(event, context);
      let text;
      try {
        text = JSON.stringify(value === undefined ? null : value);
      } catch (err) {
        throw new TypeError(`the handler returned a value JSON cannot encode: ${err.message}`);
      }
      result = Buffer.from(text, 'utf8');
      reply.result_format = 'json';
    } catch (err) {
      reply.ok = false;
      reply.error = describeError(err);
      result = Buffer.alloc(0);
    }
    if (this.ai) this.ai.calling = false;
    if (live) live.end();
    reply.duration_ms = Number(process.hrtime.bigint() - started) / 1e6;
    reply.stdout = captures[0].read();
    reply.stderr = captures[1].read();
    if (measureRss) reply.peak_rss_bytes = peakRss();
    reply.output_files = outputFiles().length;
    if (defaultModel === undefined) delete process.env.LLM_MODEL;
    else process.env.LLM_MODEL = defaultModel;
    return { reply, result };
  }
}

// Blobs belong to NanoGrid's pickled calls; a handler never asks for them, but the channel stays in step.
function skipBlobs(sizes) {
  for (const size of sizes || []) {
    for (let filled = 0; filled < size;) {
      const frame = readFrame();
      if (frame === null) process.exit(0);
      filled += frame.body.length;
    }
  }
}

async function main() {
  process.on('SIGTERM', () => process.exit(143));
  process.on('SIGXFSZ', () => {}); // an oversized write fails with EFBIG instead
  process.on('unhandledRejection', () => {}); // a rejection the handler left behind is the handler's business
  fs.mkdirSync(WORK_DIR, { recursive: true });
  const captures = [new Capture(1, 'stdout.log'), new Capture(2, 'stderr.log')];
  const live = new LiveOutput(captures);
  const runtime = new Runtime();
  writeFrame({ ok: true, op: 'ready', runtime: 'nodejs', version: process.versions.node });
  try { fs.closeSync(STARTUP_ERR); } catch (e) { /* started without it */ }
  for (;;) {
    const frame = readFrame();
    if (frame === null) return;
    const { header, body } = frame;
    if (header.op === 'load' && runtime.handler === null) {
      try {
        runtime.load(header, body);
        writeFrame({ ok: true });
      } catch (err) {
        writeFrame({ ok: false, error: describeError(err, 'load') });
      }
    } else if (header.op === 'call' && runtime.handler !== null) {
      skipBlobs(header.blobs);
      const { reply, result } = await runtime.call(header, body, captures, header.live ? live : null);
      writeReply(reply, result);
    } else if (header.op === 'outputs') {
      sendOutputs(header.limit);
    } else {
      writeFrame({ ok: false, error: { kind: 'protocol', message: `unexpected ${JSON.stringify(header.op)}` } });
    }
  }
}

main().then(() => process.exit(0), (err) => {
  try { fs.writeSync(2, `nanogrid bootstrap: ${err && err.stack ? err.stack : err}\n`); } catch (e) { /* nowhere to say it */ }
  process.exit(70);
});
