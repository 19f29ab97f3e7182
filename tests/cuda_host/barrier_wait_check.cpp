// Host check of csrc/fused/barrier_wait.cuh's give-up logic (barrier_gives_up), compiled with g++ over the
// header's host build (tests/test_barrier_wait_host.py). The header's clock is a fake one that the
// check advances itself (LSTM_BARRIER_HOST_CLOCK), so the bound is tested deterministically; the
// header counts its clock reads (lstm::barrier::clock_reads).
//
// wait() below is the kernels' wait loop (fused_common.cuh's grid_wait) on one thread: poll, leave
// if open, else ask barrier_gives_up.
// Prints one JSON object of the scenarios' observations; the test asserts on them.
#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

namespace fake {
// A clock that moves only when told: `ns` now, plus `tick` per read (time passing between polls).
struct clock {
  static inline std::atomic<long long> ns{1000000};
  static inline long long tick = 0;
  static long long now_ns() { return ns.fetch_add(tick) + tick; }
};
}  // namespace fake
#define LSTM_BARRIER_HOST_CLOCK fake::clock::now_ns
#include "fused/barrier_wait.cuh"

using lstm::BarrierWatch;
using lstm::barrier::barrier_gives_up;
using lstm::barrier::clock_reads;

struct Waited {
  bool passed;
  long long polls;        // polls that found the barrier closed
  long long clock_reads;  // clock reads during the wait
};

// One wait for *counter >= target; gives up after at most max_polls closed polls (a hung wait).
static Waited wait(const std::atomic<long long>& counter, long long target, const BarrierWatch& w, long long step,
                   long long block, long long max_polls = 1000000) {
  const long long reads0 = clock_reads;
  long long since = -1, polls = 0;
  while (counter.load(std::memory_order_acquire) < target) {
    if (barrier_gives_up(w, &since, step, block) || ++polls >= max_polls) {
      return {false, polls, clock_reads - reads0};
    }
  }
  return {true, polls, clock_reads - reads0};
}

static void print_record(const char* name, const long long* r) {
  std::printf("\"%s\": [%lld, %lld, %lld, %lld], ", name, r[0], r[1], r[2], r[3]);
}

int main() {
  const long long bound = 1000;  // ns
  std::printf("{");

  // 1. An open barrier: the first poll passes; barrier_gives_up is never reached, no clock read.
  {
    unsigned long long state[2] = {0, 0};
    long long record[4] = {0, 0, 0, 0};
    BarrierWatch w{state, record, bound, 3};
    std::atomic<long long> counter{5};
    fake::clock::tick = 100;
    const Waited r = wait(counter, 5, w, 0, 0);
    std::printf("\"open\": {\"passed\": %d, \"polls\": %lld, \"clock_reads\": %lld, \"flag\": %llu}, ", r.passed,
                r.polls, r.clock_reads, state[1]);
  }

  // 2. A barrier that never opens, the clock advancing `tick` per read: the first closed poll takes
  // the start, the wait gives up at the first poll more than `bound` after it; the record names it.
  {
    unsigned long long state[2] = {0, 0};
    long long record[4] = {0, 0, 0, 0};
    BarrierWatch w{state, record, bound, 3};
    std::atomic<long long> counter{0};
    fake::clock::tick = 100;
    const Waited r = wait(counter, 1, w, 7, 5);
    std::printf("\"never\": {\"passed\": %d, \"polls\": %lld, \"clock_reads\": %lld, \"flag\": %llu, ", r.passed,
                r.polls, r.clock_reads, state[1]);
    print_record("record", record);
    std::printf("\"tick\": %lld, \"bound\": %lld}, ", fake::clock::tick, bound);

    // 3. Another block of the same launch: the abort flag is up, so its wait leaves at its first
    // closed poll, reads no clock, and leaves the record as the first give-up wrote it.
    const Waited o = wait(counter, 1, w, 8, 9);
    std::printf("\"other\": {\"passed\": %d, \"polls\": %lld, \"clock_reads\": %lld, ", o.passed, o.polls,
                o.clock_reads);
    print_record("record", record);
    // 4. A later launch on the device (fresh state, the record not yet cleared by the host): gives
    // up after its own bound, and the record still names the first give-up.
    unsigned long long state2[2] = {0, 0};
    BarrierWatch w2{state2, record, bound, 4};
    const Waited l = wait(counter, 1, w2, 2, 1);
    std::printf("\"later_passed\": %d, \"later_clock_reads\": %lld, \"later_flag\": %llu, ", l.passed,
                l.clock_reads, state2[1]);
    print_record("later_record", record);
    // ... and once the host cleared the record, the next give-up names itself.
    for (long long& v : record) v = 0;
    unsigned long long state3[2] = {0, 0};
    BarrierWatch w3{state3, record, bound, 4};
    wait(counter, 1, w3, 2, 1);
    print_record("cleared_record", record);
    std::printf("\"_\": 0}, ");
  }

  // 5. The boundary: a clock that jumps exactly `bound` between the start and the next poll does
  // not give up (the bound is "more than timeout_ns"); one more ns does.
  {
    unsigned long long state[2] = {0, 0};
    long long record[4] = {0, 0, 0, 0};
    BarrierWatch w{state, record, bound, 3};
    fake::clock::tick = 0;
    long long since = -1;
    const bool first = barrier_gives_up(w, &since, 1, 1);
    fake::clock::ns += bound;
    const bool at = barrier_gives_up(w, &since, 1, 1);
    fake::clock::ns += 1;
    const bool past = barrier_gives_up(w, &since, 1, 1);
    std::printf("\"boundary\": {\"first\": %d, \"at_bound\": %d, \"past_bound\": %d, \"waited\": %lld}, ", first, at,
                past, record[3]);
  }

  // 6. No bound (timeout 0) and no watch (state null): closed polls read no clock and never give up.
  {
    unsigned long long state[2] = {0, 0};
    long long record[4] = {0, 0, 0, 0};
    std::atomic<long long> counter{0};
    fake::clock::tick = 1000000;
    const Waited unbounded = wait(counter, 1, BarrierWatch{state, record, 0, 3}, 1, 1, 1000);
    const Waited unwatched = wait(counter, 1, BarrierWatch{}, 1, 1, 1000);
    std::printf("\"unbounded\": {\"passed\": %d, \"polls\": %lld, \"clock_reads\": %lld, \"flag\": %llu}, ",
                unbounded.passed, unbounded.polls, unbounded.clock_reads, state[1]);
    std::printf("\"unwatched\": {\"passed\": %d, \"polls\": %lld, \"clock_reads\": %lld}, ", unwatched.passed,
                unwatched.polls, unwatched.clock_reads);
  }

  // 7. Blocks on threads, the clock advancing per read: a working barrier (every block arrives,
  // several generations) passes without a give-up; one whose target counts one block too many
  // ends in every block after the bound, with exactly one record, naming one of the blocks.
  {
    const int blocks = 8, generations = 50;
    unsigned long long state[2] = {0, 0};
    long long record[4] = {0, 0, 0, 0};
    BarrierWatch w{state, record, bound * 1000, 5};
    fake::clock::tick = 1;
    for (int extra = 0; extra <= 1; ++extra) {
      std::atomic<long long> arrivals{0};
      std::atomic<int> passed{0}, gave_up{0}, hung{0};
      std::vector<std::thread> threads;
      for (int b = 0; b < blocks; ++b) {
        threads.emplace_back([&, b] {
          for (int g = 1; g <= generations; ++g) {
            arrivals.fetch_add(1, std::memory_order_acq_rel);
            long long since = -1, polls = 0;
            bool ok = true;
            while (arrivals.load(std::memory_order_acquire) < (long long)g * (blocks + extra)) {
              if (barrier_gives_up(w, &since, g - 1, b)) {
                ok = false;
                break;
              }
              // a wait that would hang: counted, not waited for (twice the polls one lone waiter needs to pass
              // the bound on the shared clock, so a mutant that never gives up ends in seconds, not a minute)
              if (++polls >= 2 * bound * 1000) {
                hung.fetch_add(1);
                ok = false;
                break;
              }
              std::this_thread::yield();
            }
            if (!ok) {
              gave_up.fetch_add(1);
              return;
            }
            passed.fetch_add(1);
          }
        });
      }
      for (auto& t : threads) t.join();
      std::printf("\"%s\": {\"passed\": %d, \"gave_up\": %d, \"hung\": %d, \"flag\": %llu, ",
                  extra ? "threads_never" : "threads_open", passed.load(), gave_up.load(), hung.load(), state[1]);
      print_record("record", record);
      std::printf("\"blocks\": %d, \"generations\": %d}%s", blocks, generations, extra ? "" : ", ");
    }
  }
  std::printf("}\n");
  return 0;
}
