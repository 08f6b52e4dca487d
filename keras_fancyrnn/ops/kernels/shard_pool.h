// The threads that run the sequence kernels' shards (kernel_util.h's ForEachShard): workers that
// keep spinning for a while after each op, so that the next op's shards start on them at once.
//
// Why not TensorFlow's intra-op pool: its idle threads block, and a blocked thread woken for a
// shard is often placed on the CPU of the thread that woke it, so the two shards of a short op
// run one after the other (benchmarks/shard_start.py times when each shard starts both ways).
// These workers spin for kSpin after their last shard (a pause instruction, and a yield of the
// CPU to any other runnable thread every few us), then block until the next op. OpenMP's
// workers, which torch uses, do the same.
//
// The scheduler often wakes an op's thread onto the CPU where a worker spins: the worker then
// waits in that CPU's queue while another CPU idles (a thread that ran recently is left where it
// is), and the op's thread runs every shard itself, one after the other. So an op's thread that
// finds itself on the CPU a worker last ran on steps aside: it leaves the workers' CPUs out of
// its own affinity for the op's length (StepAside), and the worker starts there at once.
//
// One op at a time uses the pool; an op that finds it busy (another op's shards, run by another
// inter-op thread) gets false from Run and uses TensorFlow's pool instead, as does an op whose
// `spin` attr is false (keras_fancyrnn.config's `spinning_workers`).
#ifndef KERAS_FANCYRNN_SHARD_POOL_H_
#define KERAS_FANCYRNN_SHARD_POOL_H_

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace keras_fancyrnn {

class ShardPool {
  using Clock = std::chrono::steady_clock;

 public:
  // How long a worker spins after its last shard before it blocks: longer than the gaps between
  // a training or inference step's kernels and between two steps' calls (a few hundred us).
  static constexpr std::chrono::microseconds kSpin{2000};
  // How long an op's thread, done with its own shards, waits for the workers before it yields
  // its CPU at times (Run).
  static constexpr std::chrono::microseconds kPatience{1000};

  // The process's pool.
  static ShardPool& Get() {
    static ShardPool* pool = new ShardPool();  // never destroyed: workers may outlive main()
    return *pool;
  }

  // Runs fn(s) for s in [0, n) and returns when all are done; false (running nothing) where
  // another op holds the pool or this process is a fork of the one that started the workers.
  // The calling thread and n - 1 workers claim shards in turn, so the calling thread runs every
  // shard no worker has claimed: a worker that is slow to get a CPU delays nothing. The calling
  // thread's affinity may leave out the workers' CPUs until Run returns (StepAside).
  template <typename F>
  bool Run(int64_t n, const F& fn) {
    if (getpid() != pid_) return false;
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return false;
    Grow(n - 1);  // before StepAside: a new worker starts with its creator's affinity
    Job job{&Call<F>, &fn, n};
    job.active.store(n - 1, std::memory_order_relaxed);
    for (int64_t w = 0; w < n - 1; ++w) workers_[w]->Give(&job);
    const StepAside aside(workers_, n - 1);
    job.RunShards();
    // A worker running on another CPU ends soon after this thread; one that is kPatience late
    // may be waiting for a CPU, perhaps this one, so only then does this thread yield its own.
    // Yielding sooner cost more than it saved: the CPU often went to another of TensorFlow's
    // threads for tens of us or more, while the worker was done (benchmarks/results/).
    const auto waiting_since = Clock::now();
    // A worker that has not taken the job yet never will; one that has is running a shard or
    // about to find none left.
    for (int64_t w = 0; w < n - 1; ++w) {
      if (workers_[w]->Retract(&job)) job.active.fetch_sub(1, std::memory_order_relaxed);
    }
    for (int64_t spins = 1; job.active.load(std::memory_order_acquire) != 0; ++spins) {
      Pause();
      if (spins % 64 == 0 && Clock::now() - waiting_since > kPatience) sched_yield();
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  struct Job {
    Job(void (*call)(const void*, int64_t), const void* fn, int64_t n) : call(call), fn(fn), n(n) {}

    // Claims and runs shards until none is left.
    void RunShards() {
      for (int64_t s; (s = next.fetch_add(1, std::memory_order_relaxed)) < n;) call(fn, s);
    }

    void (*const call)(const void*, int64_t);
    const void* const fn;
    const int64_t n;
    std::atomic<int64_t> next{0};    // the next unclaimed shard
    std::atomic<int64_t> active{0};  // workers given the job that have not finished with it
  };

  template <typename F>
  static void Call(const void* fn, int64_t s) {
    (*static_cast<const F*>(fn))(s);
  }

  static void Pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  class Worker {
   public:
    Worker() : thread_([this] { Loop(); }) { thread_.detach(); }

    void Give(Job* job) {
      // seq_cst here and in Loop's sleep: either this load sees the worker going to sleep, or the
      // worker's check before it sleeps sees the job
      job_.store(job);
      if (sleeping_.load()) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_one();
      }
    }

    // The CPU the worker ran on when it last spun or took a job (-1: not known).
    int cpu() const { return cpu_.load(std::memory_order_relaxed); }

    // Takes `job` back if the worker has not taken it.
    bool Retract(Job* job) { return job_.compare_exchange_strong(job, nullptr); }

   private:
    void Loop() {
      for (;;) {
        auto idle_since = Clock::now();
        Job* job = nullptr;
        for (int64_t spins = 1; (job = job_.exchange(nullptr)) == nullptr; ++spins) {
          Pause();
          if (spins % 64 != 0) continue;  // every few us: the clock, the CPU, and a yield
          NoteCpu();
          if (Clock::now() - idle_since < kSpin) {
            sched_yield();  // to any thread waiting for this CPU
            continue;
          }
          std::unique_lock<std::mutex> lock(mutex_);
          sleeping_.store(true);
          wake_.wait(lock, [this] { return job_.load() != nullptr; });
          sleeping_.store(false, std::memory_order_relaxed);
        }
        NoteCpu();
        job->RunShards();
        job->active.fetch_sub(1, std::memory_order_release);  // the last use of the job
      }
    }

    void NoteCpu() {
#if defined(__linux__)
      cpu_.store(sched_getcpu(), std::memory_order_relaxed);
#endif
    }

    std::atomic<Job*> job_{nullptr};
    std::atomic<bool> sleeping_{false};
    std::atomic<int> cpu_{-1};
    std::mutex mutex_;
    std::condition_variable wake_;
    std::thread thread_;
  };

  // Where the calling thread is on a CPU that one of the first `count` workers last ran on:
  // while alive, the thread runs on the CPUs of its affinity that none of them last ran on (were
  // that none, on all but its own); after, on those of its affinity before, unless someone else
  // set its affinity meanwhile. Does nothing where a call fails or the thread has no other CPU.
  class StepAside {
   public:
    StepAside(const std::vector<std::unique_ptr<Worker>>& workers, int64_t count) {
#if defined(__linux__)
      const int mine = sched_getcpu();
      bool on_theirs = false;
      for (int64_t w = 0; w < count; ++w) on_theirs |= mine >= 0 && workers[w]->cpu() == mine;
      if (!on_theirs || sched_getaffinity(0, sizeof(saved_), &saved_) != 0) return;
      set_ = saved_;
      for (int64_t w = 0; w < count; ++w) {
        const int cpu = workers[w]->cpu();
        if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_CLR(cpu, &set_);
      }
      if (CPU_COUNT(&set_) == 0) {
        set_ = saved_;
        CPU_CLR(mine, &set_);
      }
      moved_ = CPU_COUNT(&set_) > 0 && sched_setaffinity(0, sizeof(set_), &set_) == 0;
#else
      (void)workers;
      (void)count;
#endif
    }
    ~StepAside() {
#if defined(__linux__)
      cpu_set_t now;
      if (moved_ && sched_getaffinity(0, sizeof(now), &now) == 0 && CPU_EQUAL(&now, &set_)) {
        sched_setaffinity(0, sizeof(saved_), &saved_);
      }
#endif
    }
    StepAside(const StepAside&) = delete;
    StepAside& operator=(const StepAside&) = delete;

   private:
#if defined(__linux__)
    cpu_set_t saved_, set_;
#endif
    bool moved_ = false;
  };

  ShardPool() : pid_(getpid()) {}

  // At least `count` workers (only the thread holding busy_ calls this).
  void Grow(int64_t count) {
    while (static_cast<int64_t>(workers_.size()) < count) {
      workers_.emplace_back(new Worker());
    }
  }

  const pid_t pid_;
  std::atomic<bool> busy_{false};
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace keras_fancyrnn

#endif  // KERAS_FANCYRNN_SHARD_POOL_H_
