// NanoGrid's C++ runtime: the sandbox protocol of nanogrid_runtimes/python/bootstrap.py (the reference), in C++17.
//
// Compiled once into harness.o when the image is built. Linked with stem.cpp it is the stem cell's
// bootstrap: it answers `ready`, takes one `load` (a zip, unpacked with Debian's unzip), compiles the
// package with g++ inside the sandbox (linked with this object and wrap.o, `-Wl,--wrap=main`) and
// execs the result, which answers the load and serves `call` and `outputs` frames before the user's
// main would run. A package that defines the seed template's `extern "C" const char* handler(const
// char* event)` is called in-process (it returns JSON text); one with only a main (the seed's program
// convention: PAYLOAD in, JSON on stdout) is run once per call.
//
// The host trusts nothing it reads from here (nanogrid_backend/sandbox/protocol.py checks every frame).
#include <algorithm>
#include <arpa/inet.h>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxabi.h>
#include <exception>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <netinet/in.h>
#include <sstream>
#include <string>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <typeinfo>
#include <unistd.h>
#include <utility>
#include <vector>

extern char** environ;

namespace nanogrid {

namespace fs = std::filesystem;

extern const char* (*bound_handler)(const char*);  // the package's handler, or null (generated binding.cpp)

const size_t kChunkBytes = 1 << 20;
const size_t kStreamResultOver = 1 << 20;
const size_t kBlobChunkBytes = 4 << 20;
const size_t kPayloadFileOver = 100 * 1024;
const size_t kLiveFrameBytes = 64 << 10;

std::string env_or(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value && *value ? value : fallback;
}

std::string cwd() {
  char buf[4096];
  return getcwd(buf, sizeof buf) ? buf : ".";
}

const std::string kWorkDir = env_or("NANOGRID_WORK_DIR", cwd());
const std::string kOutputDir = env_or("NANOGRID_OUTPUT_DIR", kWorkDir + "/output");
const std::string kCodeDir = kWorkDir + "/code";
const size_t kCaptureLimit = std::strtoull(env_or("NANOGRID_CAPTURE_LIMIT", "1048576").c_str(), nullptr, 10);
int reply_fd = 1;
std::mutex write_lock;

// ---- JSON: a small parser (headers, manifests, checking a handler's result) and string escaping ----------

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool boolean = false;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;

  const Json* get(const std::string& key) const {
    for (auto& member : members)
      if (member.first == key) return &member.second;
    return nullptr;
  }
  std::string str(const std::string& key) const {
    const Json* value = get(key);
    return value && value->kind == String ? value->text : "";
  }
  double num(const std::string& key, double fallback) const {
    const Json* value = get(key);
    return value && value->kind == Number ? value->number : fallback;
  }
  bool flag(const std::string& key, bool fallback) const {
    const Json* value = get(key);
    return value && value->kind == Bool ? value->boolean : fallback;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  bool parse(Json& out) {
    if (!value(out, 0)) return false;
    space();
    return i_ == s_.size();
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  void space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) i_++;
  }
  bool literal(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }
  static void utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += char(code);
    } else if (code < 0x800) {
      out += char(0xC0 | (code >> 6));
      out += char(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += char(0xE0 | (code >> 12));
      out += char(0x80 | ((code >> 6) & 0x3F));
      out += char(0x80 | (code & 0x3F));
    } else {
      out += char(0xF0 | (code >> 18));
      out += char(0x80 | ((code >> 12) & 0x3F));
      out += char(0x80 | ((code >> 6) & 0x3F));
      out += char(0x80 | (code & 0x3F));
    }
  }
  bool hex4(unsigned& code) {
    if (i_ + 4 > s_.size()) return false;
    code = 0;
    for (int k = 0; k < 4; k++) {
      char c = s_[i_++];
      code <<= 4;
      if (c >= '0' && c <= '9') code |= c - '0';
      else if (c >= 'a' && c <= 'f') code |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') code |= c - 'A' + 10;
      else return false;
    }
    return true;
  }
  bool string(std::string& out) {
    if (i_ >= s_.size() || s_[i_] != '"') return false;
    i_++;
    while (i_ < s_.size()) {
      unsigned char c = s_[i_++];
      if (c == '"') return true;
      if (c < 0x20) return false;
      if (c != '\\') {
        out += char(c);
        continue;
      }
      if (i_ >= s_.size()) return false;
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code;
          if (!hex4(code)) return false;
          if (code >= 0xD800 && code < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            unsigned low;
            i_ += 2;
            if (!hex4(low) || low < 0xDC00 || low > 0xDFFF) return false;
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          utf8(out, code);
          break;
        }
        default: return false;
      }
    }
    return false;
  }
  bool value(Json& out, int depth) {
    if (depth > 200) return false;
    space();
    if (i_ >= s_.size()) return false;
    char c = s_[i_];
    if (c == '{') {
      out.kind = Json::Object;
      i_++;
      space();
      if (i_ < s_.size() && s_[i_] == '}') return ++i_, true;
      for (;;) {
        space();
        std::string key;
        if (!string(key)) return false;
        space();
        if (i_ >= s_.size() || s_[i_++] != ':') return false;
        Json member;
        if (!value(member, depth + 1)) return false;
        out.members.emplace_back(std::move(key), std::move(member));
        space();
        if (i_ >= s_.size()) return false;
        if (s_[i_] == ',') { i_++; continue; }
        if (s_[i_] == '}') return ++i_, true;
        return false;
      }
    }
    if (c == '[') {
      out.kind = Json::Array;
      i_++;
      space();
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, true;
      for (;;) {
        Json item;
        if (!value(item, depth + 1)) return false;
        out.items.push_back(std::move(item));
        space();
        if (i_ >= s_.size()) return false;
        if (s_[i_] == ',') { i_++; continue; }
        if (s_[i_] == ']') return ++i_, true;
        return false;
      }
    }
    if (c == '"') return out.kind = Json::String, string(out.text);
    if (literal("true")) return out.kind = Json::Bool, out.boolean = true, true;
    if (literal("false")) return out.kind = Json::Bool, true;
    if (literal("null")) return true;
    size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') i_++;
    if (i_ >= s_.size() || !(s_[i_] >= '0' && s_[i_] <= '9')) return false;
    if (s_[i_] == '0') i_++;
    else while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') i_++;
    if (i_ < s_.size() && s_[i_] == '.') {
      i_++;
      if (i_ >= s_.size() || !(s_[i_] >= '0' && s_[i_] <= '9')) return false;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') i_++;
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      i_++;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) i_++;
      if (i_ >= s_.size() || !(s_[i_] >= '0' && s_[i_] <= '9')) return false;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') i_++;
    }
    out.kind = Json::Number;
    out.number = std::strtod(s_.substr(start, i_ - start).c_str(), nullptr);
    return true;
  }
};

// The length of a valid UTF-8 sequence starting at s[i], or 0.
size_t utf8_length(const std::string& s, size_t i) {
  unsigned char c = s[i];
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; k++)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  return n;
}

// A JSON string literal of text (invalid UTF-8 becomes U+FFFD: the host reads headers as UTF-8 JSON).
std::string quote(const std::string& text) {
  std::string out = "\"";
  char buf[8];
  for (size_t i = 0; i < text.size();) {
    unsigned char c = text[i];
    size_t n = utf8_length(text, i);
    if (n == 0) {
      out += "\\ufffd";
      i++;
      continue;
    }
    if (n > 1) {
      out.append(text, i, n);
      i += n;
      continue;
    }
    i++;
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7F) {
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  return out + "\"";
}

std::string cut(const std::string& text) { return text.size() > kCaptureLimit ? text.substr(0, kCaptureLimit) : text; }

// ---- frames ----------------------------------------------------------------------------------------------

bool read_exact(int fd, std::string& out, size_t n) {
  out.resize(n);
  size_t got = 0;
  while (got < n) {
    ssize_t k = read(fd, &out[got], n - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    got += size_t(k);
  }
  return true;
}

bool read_frame(Json& header, std::string& body) {
  std::string lengths, data;
  if (!read_exact(0, lengths, 8)) return false;
  auto be = [&](size_t at) {
    return (uint32_t(uint8_t(lengths[at])) << 24) | (uint32_t(uint8_t(lengths[at + 1])) << 16) |
           (uint32_t(uint8_t(lengths[at + 2])) << 8) | uint32_t(uint8_t(lengths[at + 3]));
  };
  if (!read_exact(0, data, be(0)) || !read_exact(0, body, be(4))) return false;
  header = Json();
  return Parser(data).parse(header);
}

void write_all(const char* data, size_t size) {
  while (size) {
    ssize_t n = write(reply_fd, data, size);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) _exit(74);  // the host is gone
    data += n;
    size -= size_t(n);
  }
}

void write_frame(const std::string& header, const char* body = nullptr, size_t body_size = 0) {
  unsigned char lengths[8];
  uint32_t sizes[2] = {uint32_t(header.size()), uint32_t(body_size)};
  for (int k = 0; k < 2; k++)
    for (int b = 0; b < 4; b++) lengths[k * 4 + b] = (sizes[k] >> (24 - 8 * b)) & 0xFF;
  std::lock_guard<std::mutex> guard(write_lock);
  write_all(reinterpret_cast<char*>(lengths), 8);
  write_all(header.data(), header.size());
  if (body_size) write_all(body, body_size);
}

std::string error_reply(const std::string& kind, const std::string& type, const std::string& message,
                        const std::string& trace) {
  return "{\"ok\": false, \"error\": {\"kind\": " + quote(kind) + ", \"type\": " + quote(cut(type)) +
         ", \"message\": " + quote(cut(message)) + ", \"traceback\": " + quote(cut(trace)) + "}}";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Runs argv with stdout and stderr into log (or inherited when log is empty); the exit status, or -1.
int run(const std::vector<std::string>& argv, const std::string& log, const std::string& dir = "") {
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    if (!log.empty()) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    if (!dir.empty() && chdir(dir.c_str()) != 0) _exit(127);
    std::vector<char*> args;
    for (auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// ---- the stem cell: ready, load, compile, exec -----------------------------------------------------------

std::string load(const Json& header, const std::string& body) {
  if (const Json* env = header.get("env"))
    for (auto& member : env->members)
      if (member.second.kind == Json::String) setenv(member.first.c_str(), member.second.text.c_str(), 1);
  fs::create_directories(kCodeDir);
  std::string zip = kWorkDir + "/package.zip", log = kWorkDir + "/compile.log";
  std::ofstream(zip, std::ios::binary).write(body.data(), std::streamsize(body.size()));
  if (run({"unzip", "-q", "-o", zip, "-d", kCodeDir}, log) != 0)
    return error_reply("load", "PackageError", "the package could not be unpacked: " + read_file(log), read_file(log));
  fs::remove(zip);
  Json manifest;
  Parser(read_file(kCodeDir + "/manifest.json")).parse(manifest);
  if (!manifest.str("model").empty()) setenv("LLM_MODEL", manifest.str("model").c_str(), 1);  // a seed upload's modelId
  std::string handler = manifest.str("handler");
  std::string name = handler.substr(handler.rfind('.') + 1);
  bool identifier = !name.empty() && !(name[0] >= '0' && name[0] <= '9');
  for (char c : name) identifier = identifier && (std::isalnum(static_cast<unsigned char>(c)) || c == '_');
  if (!identifier) name = "handler";
  uint64_t hash = 1469598103934665603ULL;  // FNV-1a of the package: the compiled binary's name
  for (char c : body) hash = (hash ^ uint8_t(c)) * 1099511628211ULL;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash));
  std::string binary = kWorkDir + "/bin/" + hex;
  if (!fs::exists(binary)) {
    std::vector<std::string> argv = {"g++", "-std=c++17", "-O2", "-pipe", "-pthread", "-I", kCodeDir, "-o", binary};
    std::vector<std::string> sources;
    for (auto& entry : fs::recursive_directory_iterator(kCodeDir)) {
      std::string ext = entry.path().extension();
      if (entry.is_regular_file() && (ext == ".cpp" || ext == ".cc" || ext == ".cxx")) sources.push_back(entry.path());
    }
    if (sources.empty()) return error_reply("load", "CompileError", "the package has no .cpp source file", "");
    std::sort(sources.begin(), sources.end());
    std::string binding = kWorkDir + "/nanogrid_binding.cpp";
    std::ofstream(binding) << "extern \"C\" const char* " << name << "(const char*) __attribute__((weak));\n"
                           << "namespace nanogrid { const char* (*bound_handler)(const char*) = " << name << "; }\n";
    argv.insert(argv.end(), sources.begin(), sources.end());
    argv.insert(argv.end(), {binding, "/opt/nanogrid/wrap.o", "/opt/nanogrid/harness.o", "-Wl,--wrap=main"});
    fs::create_directories(kWorkDir + "/bin");
    const char* locale = std::getenv("LC_ALL");
    std::string kept_locale = locale ? locale : "";
    setenv("LC_ALL", "C", 1);  // the compiler's messages in plain ASCII quotes
    int status = run(argv, log, kCodeDir);
    if (locale) setenv("LC_ALL", kept_locale.c_str(), 1);
    else unsetenv("LC_ALL");
    if (status != 0) {
      std::string said = read_file(log);
      return error_reply("load", "CompileError", "g++ failed:\n" + said, said);
    }
  }
  // Limits apply from here on: to the function, not to compiling it.
  for (auto limit : {std::make_pair("max_output_bytes", RLIMIT_FSIZE), std::make_pair("rlimit_data", RLIMIT_DATA)}) {
    double value = header.num(limit.first, 0);
    if (value > 0) {
      struct rlimit r = {rlim_t(value), rlim_t(value)};
      setrlimit(limit.second, &r);
    }
  }
  setenv("NANOGRID_STAGE", "serve", 1);
  setenv("NANOGRID_REPLY_FD", std::to_string(reply_fd).c_str(), 1);
  const Json* function_name = manifest.get("name");
  setenv("NANOGRID_FUNCTION_NAME", function_name && function_name->kind == Json::String ? function_name->text.c_str() : "", 1);
  setenv("NANOGRID_MEMORY_MB", std::to_string(int(manifest.num("memory", 0))).c_str(), 1);
  char* args[] = {const_cast<char*>(binary.c_str()), nullptr};
  execv(binary.c_str(), args);
  std::string why = std::strerror(errno);
  return error_reply("load", "ExecError", "the compiled function could not start: " + why, why);
}

void send_outputs(double limit);

int bootstrap() {
  std::signal(SIGXFSZ, SIG_IGN);  // an oversized write fails with EFBIG instead
  reply_fd = dup(1);
  fs::create_directories(kWorkDir);
  const char* names[] = {"stdout.log", "stderr.log"};
  for (int fd = 1; fd <= 2; fd++) {
    int file = open((kWorkDir + "/" + names[fd - 1]).c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (file < 0) return 70;
    dup2(file, fd);
    close(file);
  }
  std::string version = std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
                        std::to_string(__GNUC_PATCHLEVEL__);
  write_frame("{\"ok\": true, \"op\": \"ready\", \"runtime\": \"cpp\", \"version\": " + quote(version) + "}");
  Json header;
  std::string body;
  while (read_frame(header, body)) {
    std::string op = header.str("op");
    if (op == "load") {
      write_frame(load(header, body));
    } else if (op == "outputs") {
      send_outputs(header.num("limit", 0));
    } else {
      write_frame("{\"ok\": false, \"error\": {\"kind\": \"protocol\", \"message\": " + quote("unexpected " + op) + "}}");
    }
  }
  return 0;
}

// ---- the compiled function: calls and outputs -------------------------------------------------------------

off_t capture_size(int fd) {
  struct stat info;
  return fstat(fd, &info) == 0 ? info.st_size : 0;
}

std::string capture_read_at(int fd, off_t offset, size_t length) {
  std::string data(length, '\0');
  ssize_t got = pread(fd, &data[0], length, offset);
  data.resize(got > 0 ? size_t(got) : 0);
  return data;
}

std::string capture_read(int fd) {
  off_t size = capture_size(fd);
  size_t keep = std::min(size_t(size), kCaptureLimit);
  std::string text = capture_read_at(fd, 0, keep);
  if (size_t(size) > keep)
    text += "\n[nanogrid: output truncated, " + std::to_string(size_t(size) - keep) + " more bytes not kept]\n";
  return text;
}

// The length of data without a UTF-8 character cut off at its end.
size_t complete_utf8(const std::string& data) {
  for (size_t back = 1; back <= 4 && back <= data.size(); back++) {
    unsigned char byte = data[data.size() - back];
    if ((byte & 0xC0) != 0x80) {
      size_t need = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xE ? 3 : 4;
      return need <= back ? data.size() : data.size() - back;
    }
  }
  return data.size();
}

// What a call prints while it runs, sent every 0.1 s as `log` frames.
class LiveOutput {
 public:
  void begin() {
    std::lock_guard<std::mutex> guard(lock_);
    offsets_[0] = offsets_[1] = 0;
    sent_ = 0;
    active_ = true;
    thread_ = std::thread([this] { run(); });
  }
  void end() {
    {
      std::lock_guard<std::mutex> guard(lock_);
      active_ = false;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex lock_;
  std::condition_variable wake_;
  std::thread thread_;
  bool active_ = false;
  off_t offsets_[2] = {0, 0};
  size_t sent_ = 0;

  void run() {
    std::unique_lock<std::mutex> guard(lock_);
    while (active_) {
      wake_.wait_for(guard, std::chrono::milliseconds(100));
      if (!active_) return;
      for (int index = 0; index < 2; index++) {
        int fd = index + 1;
        off_t left = std::min<off_t>(capture_size(fd) - offsets_[index], off_t(kLiveFrameBytes));
        left = std::min<off_t>(left, off_t(kCaptureLimit - sent_));
        if (left <= 0) continue;
        std::string data = capture_read_at(fd, offsets_[index], size_t(left));
        data.resize(complete_utf8(data));
        if (data.empty()) continue;
        offsets_[index] += off_t(data.size());
        sent_ += data.size();
        write_frame(std::string("{\"op\": \"log\", \"stream\": \"") + (index ? "stderr" : "stdout") + "\"}",
                    data.data(), data.size());
      }
    }
  }
};

std::vector<std::pair<std::string, fs::path>> output_files() {
  std::vector<std::pair<std::string, fs::path>> files;
  std::error_code error;
  for (auto it = fs::recursive_directory_iterator(kOutputDir, error); !error && it != fs::recursive_directory_iterator();
       it.increment(error))
    if (it->is_regular_file() && !it->is_symlink())  // links, fifos and devices are never sent
      files.emplace_back(fs::relative(it->path(), kOutputDir).string(), it->path());
  std::sort(files.begin(), files.end());
  return files;
}

void reset_output_dir() {
  std::error_code error;
  fs::remove_all(kOutputDir, error);
  fs::create_directories(kOutputDir, error);
}

void send_outputs(double limit) {
  auto files = output_files();
  uintmax_t total = 0;
  for (auto& file : files) total += fs::file_size(file.second);
  auto fail = [](const std::string& message) {
    write_frame("{\"op\": \"done\", \"ok\": false, \"error\": {\"kind\": \"output\", \"message\": " + quote(message) + "}}");
  };
  if (limit > 0 && double(total) > limit) {
    fail("output files total " + std::to_string(total >> 20) + " MiB, over the " +
         std::to_string(uintmax_t(limit) >> 20) + " MiB limit");
  } else {
    std::vector<char> buf(kChunkBytes);
    bool ok = true;
    for (auto& file : files) {
      int fd = open(file.second.c_str(), O_RDONLY | O_NOFOLLOW);
      if (fd < 0) {
        fail(file.first + ": " + std::strerror(errno));
        ok = false;
        break;
      }
      write_frame("{\"op\": \"file\", \"name\": " + quote(file.first) + ", \"size\": " +
                  std::to_string(capture_size(fd)) + "}");
      for (ssize_t n; (n = read(fd, buf.data(), buf.size())) > 0;) write_frame("{\"op\": \"data\"}", buf.data(), size_t(n));
      close(fd);
    }
    if (ok) write_frame("{\"op\": \"done\", \"ok\": true}");
  }
  reset_output_dir();
}

long peak_rss() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10) * 1024;
  return -1;
}

std::string demangle(const char* name) {
  int status = 0;
  char* readable = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string text = status == 0 && readable ? readable : name;
  std::free(readable);
  return text;
}

void seed_environment(const std::string& job_id, const std::string& body) {
  setenv("JOB_ID", job_id.c_str(), 1);
  setenv("OUTPUT_DIR", kOutputDir.c_str(), 1);
  if (body.size() > kPayloadFileOver) {
    std::string path = kWorkDir + "/payload.json";
    std::ofstream(path, std::ios::binary).write(body.data(), std::streamsize(body.size()));
    unsetenv("PAYLOAD");
    setenv("PAYLOAD_FILE", path.c_str(), 1);
  } else {
    unsetenv("PAYLOAD_FILE");
    setenv("PAYLOAD", body.empty() ? "{}" : body.c_str(), 1);
  }
}

// The handler's JSON text as the result; other text becomes a JSON string.
std::string as_json(const char* text) {
  if (text == nullptr) return "null";
  std::string value(text);
  Json parsed;
  return Parser(value).parse(parsed) ? value : quote(value);
}

// The function's own main, once (the seed's convention): its last stdout line is the result when it is JSON.
std::string run_program(std::string& reply, std::string& stdout_text, long& child_peak) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    setenv("NANOGRID_STAGE", "program", 1);
    close(reply_fd);
    int null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    char self[] = "/proc/self/exe";
    char* args[] = {self, nullptr};
    execv(self, args);
    _exit(127);
  }
  int status = 0;
  struct rusage usage = {};
  while (pid > 0 && wait4(pid, &status, 0, &usage) < 0 && errno == EINTR) {
  }
  child_peak = usage.ru_maxrss * 1024;
  stdout_text = capture_read(1);
  if (pid < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string message = pid < 0 ? std::string("could not start the program: ") + std::strerror(errno)
                          : WIFSIGNALED(status) ? "the program was killed by signal " + std::to_string(WTERMSIG(status))
                                                : "the program exited with status " + std::to_string(WEXITSTATUS(status));
    reply = error_reply("exception", "ExitError", message, message);
    return "";
  }
  std::string trimmed = stdout_text;
  while (!trimmed.empty() && trimmed.back() == '\n') trimmed.pop_back();
  size_t start = trimmed.rfind('\n');
  start = start == std::string::npos ? 0 : start + 1;
  std::string last = trimmed.substr(start);
  Json parsed;
  reply = "{\"ok\": true, \"result_format\": \"json\"}";
  if (last.find_first_not_of(" \t\r") != std::string::npos && Parser(last).parse(parsed)) {
    stdout_text = trimmed.substr(0, start);
    return last;
  }
  return "null";
}

// ---- the AI node -----------------------------------------------------------------------------------------

// AI_ENDPOINT inside the sandbox, as nanogrid_runtimes/python/bootstrap.py's AIForwarder: an HTTP server on the
// sandbox's own loopback (the container has no network) that hands each request to the worker over the channel (an
// `ai` frame); the worker's AI gateway opens the inference routes only, within the owner's budget, and counts the
// tokens. Only while a call runs (the host reads `ai` frames only then); a function without AI access gets a 403
// that says why. A program the function runs (the seed's main convention) inherits AI_ENDPOINT and is served too.
const char* const kAIChannel = "nanogrid:channel";
const int kAIPort = 11434;
const long kAIMaxRequestBytes = 4 << 20;  // the gateway takes no more
const char* const kAIRefused =
    "no AI node in this sandbox: this function may not use it. A seed upload may use it unless the grid's operator "
    "turned that off (seed_ai = false); the grid needs an AI node (--ai-endpoint URL)";
const char* const kAIOutsideCall =
    "the AI node is reachable only while the function is being called, not while it starts nor after its call "
    "returned";

std::string ai_error(const std::string& message) { return "{\"error\": " + quote(message) + "}"; }

// A request that names no model gets this call's (LLM_MODEL: the run's modelId, else the function's or the grid's).
std::string with_model(const std::string& method, const std::string& body) {
  const char* model = std::getenv("LLM_MODEL");
  Json request;
  if (method != "POST" || !model || !*model || !Parser(body).parse(request) || request.kind != Json::Object ||
      !request.str("model").empty())
    return body;  // the gateway says what is wrong with a request that is not JSON
  size_t open = body.find('{');
  return body.substr(0, open + 1) + "\"model\": " + quote(model) + (request.members.empty() ? "" : ", ") +
         body.substr(open + 1);
}

void ai_respond(int conn, int status, const std::string& answer, bool keep) {
  size_t last = answer.find_last_not_of(" \r\n");
  bool lines = last != std::string::npos && answer.find('\n') < last;
  std::string data = "HTTP/1.1 " + std::to_string(status) + (status < 400 ? " OK" : " Error") +
                     "\r\nContent-Type: " + (lines ? "application/x-ndjson" : "application/json") +
                     "; charset=utf-8\r\nContent-Length: " + std::to_string(answer.size()) +
                     "\r\nConnection: " + (keep ? "keep-alive" : "close") + "\r\n\r\n" + answer;
  for (size_t sent = 0; sent < data.size();) {
    ssize_t n = send(conn, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the function stopped waiting
    sent += size_t(n);
  }
}

class AIForwarder {
 public:
  explicit AIForwarder(bool allowed) : allowed_(allowed) {}

  void begin() {
    std::lock_guard<std::mutex> guard(gate_);
    calling_ = true;
  }

  // No more requests; returns once those under way have their answers (before the call's reply is sent).
  void end() {
    std::unique_lock<std::mutex> guard(gate_);
    calling_ = false;
    idle_.wait(guard, [this] { return in_flight_ == 0; });
  }

  // One connection's requests (HTTP/1.1 keep-alive), answered in order.
  void serve(int conn) {
    std::string pending;
    char buf[65536];
    auto more = [&] {
      ssize_t n;
      do n = recv(conn, buf, sizeof buf, 0); while (n < 0 && errno == EINTR);
      if (n > 0) pending.append(buf, size_t(n));
      return n > 0;
    };
    for (;;) {
      size_t head_end;
      while ((head_end = pending.find("\r\n\r\n")) == std::string::npos)
        if (pending.size() > 65536 || !more()) return close_connection(conn);
      std::istringstream head(pending.substr(0, head_end));
      pending.erase(0, head_end + 4);
      std::string line, method, path, version;
      std::getline(head, line);
      std::istringstream(line) >> method >> path >> version;
      bool keep = version == "HTTP/1.1", sized = true, expect = false;
      long size = 0;
      while (std::getline(head, line)) {
        size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string name = line.substr(0, colon), value = line.substr(colon + 1);
        std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
        size_t first = value.find_first_not_of(" \t"), last = value.find_last_not_of(" \t\r");
        value = first == std::string::npos ? "" : value.substr(first, last - first + 1);
        if (name == "content-length") {
          char* end = nullptr;
          size = std::strtol(value.c_str(), &end, 10);
          sized = !value.empty() && *end == '\0' && size >= 0;
        } else if (name == "transfer-encoding") {
          sized = false;
        } else if (name == "connection" && strcasecmp(value.c_str(), "close") == 0) {
          keep = false;
        } else if (name == "expect" && strcasecmp(value.c_str(), "100-continue") == 0) {
          expect = true;
        }
      }
      if (!sized) {
        ai_respond(conn, 411, ai_error("send the request with a Content-Length"), false);
        return close_connection(conn);
      }
      if (expect) ai_respond_continue(conn);
      if (size > kAIMaxRequestBytes) {  // read and dropped, so that the refusal reaches the function
        for (size_t left = size_t(size) - std::min(pending.size(), size_t(size)); left;) {
          pending.clear();
          if (!more()) return close_connection(conn);
          left -= std::min(left, pending.size());
        }
        ai_respond(conn, 413, ai_error("an AI request of " + std::to_string(size) + " bytes (at most " +
                                       std::to_string(kAIMaxRequestBytes) + " bytes)"), false);
        return close_connection(conn);
      }
      while (pending.size() < size_t(size))
        if (!more()) return close_connection(conn);
      std::string body = pending.substr(0, size_t(size));
      pending.erase(0, size_t(size));
      auto answer = this->answer(method, path.substr(0, path.find('?')), body);
      ai_respond(conn, answer.first, answer.second, keep);
      if (!keep) return close_connection(conn);
    }
  }

 private:
  static void close_connection(int conn) { close(conn); }

  static void ai_respond_continue(int conn) {
    const char line[] = "HTTP/1.1 100 Continue\r\n\r\n";
    if (send(conn, line, sizeof line - 1, MSG_NOSIGNAL) < 0) return;
  }

  std::pair<int, std::string> answer(const std::string& method, const std::string& path, const std::string& body) {
    if (!allowed_) return {403, ai_error(kAIRefused)};
    {
      std::lock_guard<std::mutex> guard(gate_);
      if (!calling_) return {503, ai_error(kAIOutsideCall)};
      in_flight_++;
    }
    std::string request = with_model(method, body), answer;
    Json header;
    bool answered;
    {
      std::lock_guard<std::mutex> guard(exchange_);  // one request and its answer on the channel at a time
      write_frame("{\"op\": \"ai\", \"method\": " + quote(method) + ", \"path\": " + quote(path) + "}",
                  request.data(), request.size());
      answered = read_frame(header, answer);
    }
    {
      std::lock_guard<std::mutex> guard(gate_);
      in_flight_--;
    }
    idle_.notify_all();
    if (!answered) _exit(0);  // the host is gone
    int status = int(header.num("status", 502));
    return {status >= 100 && status < 600 ? status : 502, answer};
  }

  bool allowed_;
  std::mutex gate_, exchange_;
  std::condition_variable idle_;
  bool calling_ = false;
  int in_flight_ = 0;
};

AIForwarder* ai_forwarder = nullptr;

// The forwarder behind AI_ENDPOINT (every sandbox has one: a function without AI access is told why).
void start_ai_forwarder() {
  bool allowed = env_or("AI_ENDPOINT", "") == kAIChannel;
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(kAIPort);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      listen(listener, 16) != 0) {
    if (listener >= 0) close(listener);
    return;  // no loopback to listen on: requests to AI_ENDPOINT fail to connect
  }
  ai_forwarder = new AIForwarder(allowed);  // lives as long as the sandbox
  setenv("AI_ENDPOINT", ("http://127.0.0.1:" + std::to_string(kAIPort)).c_str(), 1);
  std::thread([listener] {
    for (;;) {
      int conn = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn >= 0) std::thread([conn] { ai_forwarder->serve(conn); }).detach();
      else if (errno != EINTR && errno != ECONNABORTED) return;
    }
  }).detach();
}

int serve() {
  std::signal(SIGXFSZ, SIG_IGN);
  reply_fd = std::atoi(env_or("NANOGRID_REPLY_FD", "1").c_str());
  fcntl(reply_fd, F_SETFD, FD_CLOEXEC);  // never inherited by a program the function starts
  for (const char* name : {"NANOGRID_STAGE", "NANOGRID_REPLY_FD", "NANOGRID_FUNCTION_NAME", "NANOGRID_MEMORY_MB"})
    unsetenv(name);
  bool program = bound_handler == nullptr;
  start_ai_forwarder();
  write_frame("{\"ok\": true}");  // the load's answer: compiled and started
  LiveOutput live;
  Json header;
  std::string body;
  while (read_frame(header, body)) {
    std::string op = header.str("op");
    if (op == "outputs") {
      send_outputs(header.num("limit", 0));
      continue;
    }
    if (op != "call") {
      write_frame("{\"ok\": false, \"error\": {\"kind\": \"protocol\", \"message\": " + quote("unexpected " + op) + "}}");
      continue;
    }
    if (const Json* blobs = header.get("blobs"))  // NanoGrid's pickled calls only; the channel stays in step
      for (auto& size : blobs->items)
        for (size_t filled = 0; filled < size_t(size.number);) {
          Json skipped;
          std::string piece;
          if (!read_frame(skipped, piece)) return 0;
          filled += piece.size();
        }
    for (int fd = 1; fd <= 2; fd++) {
      if (capture_size(fd)) {
        if (ftruncate(fd, 0) != 0) {
        }
      }
      lseek(fd, 0, SEEK_SET);
    }
    bool live_wanted = header.flag("live", false);
    if (live_wanted) live.begin();
    std::error_code error;
    if (!fs::is_directory(kOutputDir) || !fs::is_empty(kOutputDir, error)) reset_output_dir();
    bool measure = header.flag("measure_rss", true);
    if (measure) std::ofstream("/proc/self/clear_refs") << "5";
    const char* had_model = std::getenv("LLM_MODEL");
    std::string default_model = had_model ? had_model : "";
    if (!header.str("model").empty()) setenv("LLM_MODEL", header.str("model").c_str(), 1);
    seed_environment(header.str("job_id"), body);
    std::string reply, result, stdout_text;
    long child_peak = 0;
    auto started = std::chrono::steady_clock::now();
    if (ai_forwarder) ai_forwarder->begin();
    if (program) {
      result = run_program(reply, stdout_text, child_peak);
    } else {
      try {
        result = as_json(bound_handler(body.empty() ? "null" : body.c_str()));
        reply = "{\"ok\": true, \"result_format\": \"json\"}";
      } catch (const std::exception& exc) {
        std::string type = demangle(typeid(exc).name());
        reply = error_reply("exception", type, exc.what(), type + ": " + exc.what());
      } catch (...) {
        std::string type = demangle(abi::__cxa_current_exception_type()->name());
        reply = error_reply("exception", type, "an exception of type " + type, "threw " + type);
      }
      std::cout.flush();
      fflush(stdout);
      stdout_text = capture_read(1);
    }
    if (ai_forwarder) ai_forwarder->end();  // an AI answer under way arrives before the call's reply
    if (live_wanted) live.end();
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    reply.pop_back();  // the closing brace: the call's figures go in after what the outcome said
    reply += ", \"duration_ms\": " + std::to_string(ms) + ", \"stdout\": " + quote(stdout_text) +
             ", \"stderr\": " + quote(capture_read(2)) + ", \"output_files\": " + std::to_string(output_files().size());
    if (measure) {
      long peak = std::max(peak_rss(), child_peak);
      reply += ", \"peak_rss_bytes\": " + (peak >= 0 ? std::to_string(peak) : std::string("null"));
    }
    if (had_model) setenv("LLM_MODEL", default_model.c_str(), 1);
    else unsetenv("LLM_MODEL");
    if (result.size() <= kStreamResultOver) {
      write_frame(reply + "}", result.data(), result.size());
    } else {
      write_frame(reply + ", \"result_size\": " + std::to_string(result.size()) + "}");
      for (size_t at = 0; at < result.size(); at += kBlobChunkBytes)
        write_frame("{\"op\": \"result_data\"}", result.data() + at, std::min(kBlobChunkBytes, result.size() - at));
    }
  }
  return 0;
}

}  // namespace nanogrid
