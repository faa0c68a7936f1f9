// pwriteRuns(fd, view, runs): write runs of a buffer to their file positions as one task on
// libuv's thread pool. A snapshot writes guest RAM as runs of non-zero pages between holes;
// one pool task per run cost a hand-off between threads each time, which on a slow or
// emulated CPU took longer than the write, so a chunk of guest RAM is one task here while
// the JavaScript thread checksums the next. Tasks that write one file run one at a time
// (TurnFor), in the order the pool picks them up: the writer queues several chunks at once,
// and the next one starts the moment the last ends, without a turn of the JavaScript thread.
#include "pwrite_runs.h"

#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "common.h"

namespace tern {

namespace {

// A lock per file, held by the task that writes it. Writes to one file are serialized by the
// kernel anyway (the inode's lock, on which a second writer spins before it sleeps, taking a
// core from the thread that checksums); here a waiting task sleeps instead. Writes to
// different files (a migration's RAM regions, each its own memfd) still run side by side.
// The map is only touched on the JavaScript thread; a lock lives as long as a task holds it.
using FileKey = std::pair<dev_t, ino_t>;
std::map<FileKey, std::weak_ptr<std::mutex>> fileTurns;

std::shared_ptr<std::mutex> TurnFor(int fd) {
  struct stat st;
  // (a bad fd fails its pwrite with EBADF; it needs no lock shared with anyone)
  if (fstat(fd, &st) != 0) return std::make_shared<std::mutex>();
  for (auto it = fileTurns.begin(); it != fileTurns.end();) {
    if (it->second.expired()) {
      it = fileTurns.erase(it);
    } else {
      ++it;
    }
  }
  std::weak_ptr<std::mutex>& slot = fileTurns[FileKey(st.st_dev, st.st_ino)];
  std::shared_ptr<std::mutex> turn = slot.lock();
  if (!turn) {
    turn = std::make_shared<std::mutex>();
    slot = turn;
  }
  return turn;
}

struct Run {
  uint64_t offset;    // in the view
  uint64_t length;
  uint64_t position;  // in the file
};

class PwriteRunsTask : public Napi::AsyncWorker {
 public:
  PwriteRunsTask(Napi::Env env, int fd, Napi::Uint8Array view, std::vector<Run> runs)
      : Napi::AsyncWorker(env, "tern.pwriteRuns"),
        deferred_(Napi::Promise::Deferred::New(env)),
        fd_(fd),
        turn_(TurnFor(fd)),
        data_(view.Data()),
        runs_(std::move(runs)),
        // (the view's memory stays alive until the task is done)
        view_(Napi::Persistent(view)) {}

  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    std::lock_guard<std::mutex> turn(*turn_);
    for (const Run& r : runs_) {
      for (uint64_t done = 0; done < r.length;) {
        ssize_t n = pwrite(fd_, data_ + r.offset + done, r.length - done, static_cast<off_t>(r.position + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          err_ = errno;
          return;
        }
        // A write of nothing (a full disk that reports no error): stop, the caller sees the count.
        if (n == 0) return;
        done += static_cast<uint64_t>(n);
        written_ += static_cast<uint64_t>(n);
      }
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_) {
      deferred_.Reject(ErrnoError(env, "pwrite", err_).Value());
    } else {
      deferred_.Resolve(Napi::Number::New(env, static_cast<double>(written_)));
    }
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  std::shared_ptr<std::mutex> turn_;
  const uint8_t* data_;
  std::vector<Run> runs_;
  Napi::Reference<Napi::Uint8Array> view_;
  int err_ = 0;
  uint64_t written_ = 0;
};

// pwriteRuns(fd, view: Uint8Array, runs: Float64Array of [viewOffset, length, filePosition]...)
// -> Promise<number>: the bytes written, fewer than the runs hold only if a write wrote nothing
// (a full disk); a failed write rejects with its errno. Runs outside the view throw at once.
Napi::Value PwriteRuns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "pwriteRuns: fd", &fd)) return env.Undefined();
  if (info.Length() < 3 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array ||
      !info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    ThrowTypeError(env, "pwriteRuns: expected (fd, Uint8Array, Float64Array)");
    return env.Undefined();
  }
  Napi::Uint8Array view = info[1].As<Napi::Uint8Array>();
  Napi::Float64Array flat = info[2].As<Napi::Float64Array>();
  if (flat.ElementLength() % 3 != 0) {
    ThrowTypeError(env, "pwriteRuns: runs must be [viewOffset, length, filePosition] triples");
    return env.Undefined();
  }
  const uint64_t size = view.ByteLength();
  std::vector<Run> runs;
  runs.reserve(flat.ElementLength() / 3);
  for (size_t i = 0; i < flat.ElementLength(); i += 3) {
    double v[3] = {flat[i], flat[i + 1], flat[i + 2]};
    for (double d : v) {
      if (!(d >= 0) || d >= 9007199254740992.0 || d != static_cast<double>(static_cast<uint64_t>(d))) {
        Napi::RangeError::New(env, "pwriteRuns: a run's offset, length or position is not a safe non-negative integer").ThrowAsJavaScriptException();
        return env.Undefined();
      }
    }
    Run r{static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1]), static_cast<uint64_t>(v[2])};
    // (positions below 2^53 plus a length below 2^53 cannot pass off_t's largest value)
    if (r.offset > size || r.length > size - r.offset) {
      Napi::RangeError::New(env, "pwriteRuns: a run lies outside the view").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    runs.push_back(r);
  }
  auto* task = new PwriteRunsTask(env, fd, view, std::move(runs));
  Napi::Promise p = task->Promise();
  task->Queue();
  return p;
}

}  // namespace

void InitPwriteRuns(Napi::Env env, Napi::Object exports) {
  exports.Set("pwriteRuns", Napi::Function::New(env, Guarded<PwriteRuns>, "pwriteRuns"));
}

}  // namespace tern
