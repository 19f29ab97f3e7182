// Fused forward recurrence at the budget of one step (issue 13): one launch for all T steps
// (persistent, grid co-resident by cooperative launch, light grid barrier) or, with the same
// tile code and therefore the same bits, one launch per (half-)step (the fallback where the grid
// is not co-resident). fp16, bf16 and float (Op, fused_common.cuh: fp32 accuracy by 3xTF32, or
// tf32 where torch allows it). Also serves
// proj_size (PROJ: h_t = m_t W_hr^T) and variable lengths (batch_sizes: a step touches only its
// active rows; inactive rows of h_all are zero; h_T, c_T are taken at each row's last step).
//
// Legend: T steps, B batch, H hidden units, P = proj_size or H, k the reduction index, Pk / Hk =
// P / H rounded up to kpad(sizeof(T)) (32 for 16-bit types, 16 for float), Bp = B rounded up to
// BATCH_TILE, a chunk = 32 bytes of k (k16 of a 16-bit type, k8 of float; fused_plan.cuh). Gate order along 4H: i, f, g, o.
//   gates_t = xg_t + h_{t-1} W_hh^T;  c_t = f*c_{t-1} + i*g;  m_t = o*tanh(c_t)   (cell.cuh)
//   h_t = m_t (or m_t W_hr^T with PROJ), rounded to the storage dtype.
//
// Tiling (fused_plan.cuh; lstm_kernels/backends/cuda/fused.py mirrors it; tests/test_cuda_plan_host.py
// checks both): grid (ceil(H / UNITS), ceil(B / BATCH_TILE)); block q owns units [8q, 8q + 8) for
// batch rows [16y, 16y + 16): its 32 rows of W_hh, interleaved on the host as row 32q + 8g + u =
// W_hh[g*H + 8q + u] (w_fwd), sit in shared memory for the whole launch (ldmatrix reads them,
// nothing copies them again). 8 warps; warp w sums chunks [w*KS/8, (w+1)*KS/8) of
// h_{t-1} (16 x Pk, B operand) x W slice (32 x Pk, A operand) with mma.sync (m16n8k16, or
// m16n8k8 on tf32: 1 or 3 per tile and chunk) into 2 x 2 fp32 accumulator tiles. Because of the interleaving, lane l of every warp holds i, f,
// g, o of unit 8q + l/4 for batch columns 2(l%4), 2(l%4)+1 of both 8-row batch tiles; the 8
// warps' partial sums meet once in shared memory (red), and warps 0-3 each finish one (b, j)
// per lane in a fixed order w = 0..7 (deterministic), run the cell with c_t in a register
// across steps, and store h_t (storage dtype) to h_all and to the exchange buffer hx (padded
// rows of Pk, ping-pong by step parity, so the next step copies it with 16-byte cp.async; the
// host puts h0 in slot 1). With PROJ the cell stores m_t to mx instead, and a second half-step
// (blocks q < ceil(P/8), W_hr rows [8q, 8q + 8) resident) computes h_t = m_t W_hr^T.
//
// Per step (persistent launch, flagship H100, B = 16, H = 768, fp16/bf16: 96 blocks; float: the
// same grid, twice the chunks and (Fp32Mma) three MMA per tile and chunk, see below):
// | part of one forward step                                                | budget (DESIGN.md) |
// |---|---|
// | grid barrier: one release-add per block on one counter per batch tile    | <= 0.7 us |
// |   (96 per step), after the cell warps' named barrier: one fence, which   |           |
// |   waits for the h_t exchange stores only (h_all, act, c_all, h_T, c_T are |           |
// |   stored after it); warp 0 acquire-polls it at the top of the next step, |           |
// |   xg_{t+1} loads issued in between                                        |           |
// | h_{t-1} [16, Pk] copied once by cp.async (16 B each) into padded smem,    | <= 0.3 us |
// |   each warp the k columns it multiplies (12 lanes x 16 rows at H = 768)  |           |
// | MMA from the resident W slice (ldmatrix), 8 warps, K split 8 ways,        | <= 0.5 us |
// |   (2 x 2 tiles) x KS/8 = 24 HMMA per warp at H = 768 (float: 48 tf32, or  |           |
// |   144 for fp32 accuracy, plus the split of each fragment); per chunk 3     |           |
// |   ldmatrix.x4 (2 of W, 1 of h): 48 KB of W read from shared memory per     |           |
// |   block and step. With w_registers (16-bit, H <= 1024 at B = 16) each warp |           |
// |   holds its 6 chunks of W as fragments (48 of 64 slot registers): per     |           |
// |   chunk 1 ldmatrix (h) and no W read per step. tf32 (H <= 768): its 12   |           |
// |   chunks in 96 registers, none of the 96 KB of W per block and step      |           |
// | partial sums reduced once through smem; cell in registers, c_t in a reg   | <= 0.2 us |
// |   (16-bit, tf32: the fast activations of cell.cuh, 5 MUFU.EX2 + 5 MUFU.RCP |           |
// |   and no branch, 37 instructions from the first EX2 to h's rounding on     |           |
// |   sm_90, where expf, the division and tanhf took 142, each division's slow |           |
// |   path behind a branch and a call; float32 accuracy keeps the precise ones) |           |
// | xg_{t+1} prefetched into registers before the barrier wait               | hidden    |
// | **forward step**                                                          | **<= 2 us** |
// Block barriers per step: 2 (after warp 0's grid wait; after the partial sums), and the cell warps'
// named barrier before the arrival. Grid barriers: 1.
// The grid wait's time bound (barrier_wait.cuh) adds nothing to a wait whose first poll finds the
// barrier open; after a closed poll, lane 0 reads the abort flag and %globaltimer (one L2 load and
// one clock read per extra poll, under the poll's own round trip).
// PROJ: 4 + 2 and 2 (DESIGN.md: "two with a projection"); the half-step B adds a 16 x Hk copy of m_t
// and (2 HMMA per k16 pair) x Hk/32/8 per warp on the projecting blocks.
// Shared memory per block: (32 + 16) * (Pk * e + 16) + 8 * 16 * 32 * 4 bytes, e = sizeof(T) (90.6 KB
// at H = 768 in 16 bits, 160.8 KB in float: inside sm_80's 163 KB), PROJ + (8 + 16) * (Hk * e + 16).
//
// RESETS (resets [T, B] uint8, nonzero: row b starts step t from h_{t-1} = 0, c_{t-1} = 0; the
// instance without it is unchanged): each warp reads its tile's flags of step t with one byte load
// per lane, issued a step ahead, and one vote; the exchange copy of h_{t-1} lands as zeros for those
// rows (cp.async with 0 source bytes, lanes spread over rows: the same copies, no store), and the cell
// thread zeroes c_{t-1} in its register. Cost per step: one load (latency hidden), one vote, a few
// integer and select instructions; nothing in the k loop, no extra barrier.
//
// The GRU (GATES = 3, no PROJ; nn.GRU's r, z, n): the same grid, tiles, exchange and barrier. w_fwd
// holds its r, z rows where the LSTM's i, f are (tile 0: lane l holds r, z of unit 8q + l/4 as it
// holds i, f) and its n rows at block rows 16-23 (24-31 zero). Those 8 rows are the B operand of one
// transposed MMA per chunk, hn^T [16 batch rows, 8 units] = h_{t-1} (A, ldmatrix of the same h tile)
// x W_n^T, instead of a second 16-row tile: 3 MMA tiles per chunk, the ideal for 24 rows (18 HMMA
// per warp per step at the flagship in 16 bits, 3/4 of the LSTM's 24; one more ldmatrix per chunk).
// The cell thread reads its (b, j) of that tile at fwd_n_lane / fwd_n_element (fused_plan.cuh),
// keeps h_{t-1} as stored (rounded) in the register that holds the LSTM's c, and computes
// hn = that sum + b_hn, n = tanh(x_n + r hn), h_t = (1 - z) n + z h_{t-1} (gru_cell_forward). act
// keeps r, z, n and c_all keeps hn: the per-step kernels' workspace, which either backward reads.
//
// W IN REGISTERS (WREGS, the instance that w_registers = 1 launches, LSTM_KERNELS_CUDA_FUSED_WEIGHTS=
// registers; 16-bit and tf32 Ops): a warp whose k range has at most w_reg_chunks chunks (fused_plan.cuh: 8
// in 16 bits, H <= 1024 at B = 16; 12 in tf32, H <= 768) reads its fragments of the resident slice once per
// launch into that many x 2 register fragments (tf32: rounded once, as the loop rounds them every step), and
// its step then multiplies by a product unrolled over those slots: every slot's ldmatrix of h is issued
// first (a uniform branch per slot past the range), so their latencies overlap where the loop waits once
// per chunk, then the MMAs (predicated), the same MMAs in the same order as the shared-memory loop, so the
// same bits. The price: the slots' registers whatever the range (16 bits: 64 of W and 32 of h; tf32: 96
// and 48; 179 to 255 in all, no spills: one block per SM), and the slots' unrolled code beside the loop,
// which still serves warps whose range does not fit. So it is an instance of its own: the one without
// (w_registers = 0, and 3xTF32 always, whose small parts would double the fragments) keeps 78 to 115
// registers, two blocks on an SM where shared memory holds them (B = 32, H = 768 in 16 bits on an H100:
// 192 blocks, co-resident).
//
// THE TAGGED EXCHANGE (hxt non-null, LSTM_KERNELS_CUDA_FUSED_EXCHANGE=tagged; the LSTM without
// projection, 16-bit Ops, every warp on the register path): h_t goes to hxt as 8-byte words, two units and
// the tag t + 1 each (fused_common.cuh, "the tagged exchange"; fused_plan.cuh's tagged_pos), stored by the
// cell lane of the even unit after one shuffle; there is no counter, no arrival and no fence. At the top
// of a step each warp reads its operands, two 16-byte loads per chunk and lane, straight into the B
// fragments the ldmatrix of h would give, and reloads only the words whose tag is older. Per step:
// | part of one forward step (tagged, flagship)                            | estimate           |
// |---|---|
// | h_t stored (one 8-byte store per two units) -> a consumer's load sees it | one L2 round trip  |
// |   (the counter's release fence, its red, the poll and the copy: gone)    | (was about three)  |
// |   but twice the bytes: each block reads 16 rows x Pk x 4 B (48 KB at the  | + 2.4 MB of L2     |
// |   flagship, 4.7 MB per step grid-wide, where the copy reads 2.4 MB)      |   reads per step   |
// | MMA from W in registers on the loaded fragments, 24 HMMA per warp       | as above           |
// | block barrier, partial sums through smem, cell                          | as above           |
// Whether the round trips saved outweigh the doubled bytes (at an L2 bandwidth of several TB/s, the extra
// 2.4 MB is a few tenths of a microsecond if nothing overlaps it) is for a GPU to say; the counter stays the
// default until it has. The wait is the operand load itself: its first round's 12 loads per lane (6 chunks
// x 2 rows) are in flight together, and a later round reloads only the late words. A stalled wait asks barrier_gives_up
// every TAGGED_ROUNDS_PER_CHECK rounds; a warp that gave up raises abort_s, which every warp reads after
// the block barrier that follows the products, so the block leaves as one. Block barriers per step: 2
// (after the products: the cell warps have read red of step t - 1; after the partial sums). Registers:
// 255 in the taggable instances (the words in flight: 64 per thread with the tags), no spills.
//
// Structural checks (tests/test_cuda_step_budget.py, on the cubins, CPU only): in the step
// loop no global load inside a k loop or any nested loop but the barrier's poll (W_hh, W_hr
// never read from global memory per step), only the designed handful of global loads (xg
// prefetch, batch_sizes); no shared store in a k loop (no restaging); the register path: one
// ldmatrix (h) per slot and no other, its HMMA per warp at the ideal; HMMA per warp per step
// within 10% of the ideal for the tile; BAR.SYNC and release-adds per step as designed; one arrival
// per block (the named barrier, one fence, only the exchange's store before it); the
// acquire-poll present; the cell's MUFU (one EX2 and one RCP per activation) and no branch or call among
// them (16-bit, tf32); cp.async (LDGSTS) for the exchange copies; no local memory; in the taggable
// instances, the tagged path: 2 x W_REG_CHUNKS 16-byte strong loads issued together, one spin loop
// that reloads them with no barrier and no fence in it, no memory operation, fence or barrier between the
// wait's exit and the first HMMA, one tagged store per step, its own HMMA at the register path's count
// (and in tests/test_barrier_wait_sass.py: its give-up reached only from the retry side of its vote).
#include <cuda_runtime.h>

#include "common/cell.cuh"
#include "fused/fused_common.cuh"
#include "fused/fused_launch.cuh"
#include "fused/fused_lstm.h"

namespace lstm {
namespace fused {

// One (b, j)'s activations to act (fp32, gate stride H): i, f, g, o; the GRU's r, z, n.
__device__ __forceinline__ void store_activations(float* ap, int H, const Gates& a) {
  ap[0] = a.i, ap[H] = a.f, ap[2 * H] = a.g, ap[3 * H] = a.o;
}
__device__ __forceinline__ void store_activations(float* ap, int H, const GruGates& a) {
  ap[0] = a.r, ap[H] = a.z, ap[2 * H] = a.n;
}

// PROJ (proj_size P < H): a step has two half-steps, each closed by one grid barrier.
//   A: gates from h_{t-1} [B, P] (K = P), the cell, m_t = o*tanh(c_t) to the exchange mx (16-bit);
//   B: h_t = m_t W_hr^T (K = H) by the blocks q < ceil(P / 8) (8 rows p of W_hr each, resident
//      in shared memory, batch rows x p products as in the backward), to h_all and hx.
// Without PROJ, P = H and the cell writes h_t itself (one half-step per step).
// Half-steps are numbered hs = NPH*t + phase over the sequence; a launch runs [hs_begin, hs_end)
// (all of them in the persistent launch; one per launch in the per-step mode), so both modes
// run the same code on the same tiles (same bits). At a launch's start the state comes from
// the exchange buffers and c_work; the host puts h0 in hx's slot 1 (step -1).
//
// GATES = 3, the GRU (no PROJ): see "The GRU" above; c0, c_work, c_T unused, b_hn read.
// WREGS: the instance with the register path (and, for the LSTM without projection in 16 bits, the tagged
// exchange); the one without keeps only the shared-memory loop, and so its registers (78 to 115, where the
// register path takes 179 to 255): two blocks on an SM where shared memory allows them.
template <typename Op, bool PROJ, bool RESETS, int GATES, bool WREGS, typename T = typename Op::T>
__global__ void __launch_bounds__(THREADS, 1)
    fused_forward_kernel(const T* __restrict__ xg,           // [T, B, GATES*H]
                         const T* __restrict__ w_fwd,        // [ceil(H/8)*32, P] interleaved rows (see above)
                         const T* __restrict__ w_hr,         // [ceil(P/8)*8, H] W_hr, zero rows >= P (PROJ)
                         const T* __restrict__ c0,           // [B, H] (LSTM)
                         const T* __restrict__ b_hn,         // [H] (GRU) or null (no bias)
                         float* c_work,                      // [B, H] fp32 c between launches (per-step mode)
                         T* hx,                              // [2, Bp, Pk] h exchange (slot 1: h0), pad zero
                         T* mx,                              // [Bp, Hk] m exchange (PROJ), pad zero
                         T* __restrict__ h_all,              // [T, B, P] out (zero for inactive rows)
                         T* __restrict__ h_T,                // [B, P] out: h at each row's last step
                         T* __restrict__ c_T,                // [B, H] out: c at each row's last step
                         float* __restrict__ act,            // [T, B, GATES*H] fp32 activations (i,f,g,o; r,z,n) or null
                         float* __restrict__ c_all,          // [T, B, H] fp32 cell states (the GRU's hn), or null
                         const int* __restrict__ batch_sizes,  // [T] int32 active rows per step, or null
                         unsigned int* counters,             // [gridDim.y] zeroed; used with several half-steps
                         int T_, int B, int H, int P,
                         unsigned long long* hxt,  // [2, Bp, Pk / 2] tagged h exchange (slot 1: h0), or null
                         int hs_begin, int hs_end,
                         BarrierWatch watch,  // the time bound of the grid wait (barrier_wait.cuh)
                         const unsigned char* __restrict__ resets) {  // [T, B] uint8 (RESETS), else unused
  static_assert(GATES == 4 || (GATES == 3 && !PROJ), "the LSTM, or the GRU without a projection");
  constexpr int NPH = PROJ ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int abort_s;  // the grid wait gave up: every thread of the block leaves
  constexpr int E = sizeof(T);
  const int Pk = round_up(P, kpad(E)), LD = Pk + smem_pad(E), Bp = round_up(B, BATCH_TILE);
  const int Hk = round_up(H, kpad(E)), LDH = Hk + smem_pad(E);
  T* w_s = reinterpret_cast<T*>(smem_raw);                          // [FWD_ROWS][LD]
  T* h_s = w_s + FWD_ROWS * LD;                                      // [BATCH_TILE][LD]
  float* red = reinterpret_cast<float*>(h_s + BATCH_TILE * LD);      // [WARPS][16][32]
  T* wr_s = reinterpret_cast<T*>(red + WARPS * 16 * 32);            // [UNITS][LDH] (PROJ)
  T* m_s = wr_s + UNITS * LDH;                                       // [BATCH_TILE][LDH] (PROJ)
  const int q = blockIdx.x, b0 = blockIdx.y * BATCH_TILE;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t BH = (size_t)B * H, BP = (size_t)B * P, BGH = GATES * BH, hx_slot = (size_t)Bp * Pk;
  const bool proj_block = PROJ && q * UNITS < P;  // owns rows [8q, 8q + 8) of W_hr
  const T zero = from_float<T>(0.f);
  unsigned int* counter = counters + blockIdx.y;

  // ---- once per launch: the resident weights, c, xg of the first step ----
  block_load_padded(w_s, LD, w_fwd + (size_t)q * FWD_ROWS * P, FWD_ROWS, P, Pk);
  if (proj_block) block_load_padded(wr_s, LDH, w_hr + (size_t)q * UNITS * H, UNITS, H, Hk);
  // The cell thread of warps 0-3: unit j, batch row b (fragment position of lane, see above).
  const bool cell_warp = warp < 4;
  const int nt = (warp >> 1) & 1, cc = warp & 1;
  const int j = fwd_cell_unit(q, lane), b = fwd_cell_row(blockIdx.y, warp, lane);
  const bool mine = cell_warp && j < H && b < B;
  // The projection's output thread: row b, p (the backward's fragment map, see fused_plan.cuh).
  const int pp = bwd_cell_unit(q, warp, lane), pb = bwd_cell_row(blockIdx.y, warp, lane);
  const bool mine_p = PROJ && cell_warp && pp < P && pb < B;
  const int t_first = hs_begin / NPH, t_end = (hs_end + NPH - 1) / NPH;
  // c_reg: the LSTM's c_{t-1}; the GRU's h_{t-1} (as stored, rounded), from the exchange slot of step
  // t_first - 1 (h0 at the start). x_*: xg_t of the thread's (b, j), gates i, f, g, o (r, z, n).
  float c_reg = 0.f, x_i = 0.f, x_f = 0.f, x_g = 0.f, x_o = 0.f, bias_n = 0.f;
  int reset_next = 0;  // RESETS: this lane's flag (row b0 + lane) of the next step that runs half-step A
  if constexpr (RESETS) reset_next = reset_flag(resets, t_first, B, b0, lane);
  auto load_xg = [&](int t) {
    const T* x = xg + t * BGH + (size_t)b * GATES * H + j;
    x_i = to_float(x[0]), x_f = to_float(x[H]), x_g = to_float(x[2 * H]);
    if constexpr (GATES == 4) x_o = to_float(x[3 * H]);
  };
  if (mine) {
    const size_t s = (size_t)b * H + j;
    if constexpr (GATES == 4) {
      c_reg = hs_begin == 0 ? to_float(c0[s]) : c_work[s];
    } else {
      c_reg = to_float(hx[((t_first - 1) & 1) * hx_slot + (size_t)b * Pk + j]);
      if (b_hn) bias_n = to_float(b_hn[j]);
    }
    if (hs_begin % NPH == 0) load_xg(t_first);
  }
  const KRange gate_k = fwd_gate_k(warp, P, E);  // half-step A: chunks of K = P
  const KRange proj_k = fwd_proj_k(warp, H, E);  // half-step B: pairs of chunks of K = H
  const int ks_begin = gate_k.begin, ks_end = gate_k.end, kp_begin = proj_k.begin, kp_end = proj_k.end;
  const unsigned int arrivals = gridDim.x;  // one per block and half-step (block_arrive)
  // Lane addresses of ldmatrix (fused_plan.cuh), in bytes: A = W rows x k, B = h rows (batch) x k;
  // half-step B: A = m rows (batch) x k, B = W_hr rows (p) x k.
  const uint32_t w_base = smem_addr(w_s) + ldsm_a16(lane, LD * E);
  const uint32_t h_base = smem_addr(h_s) + ldsm_b16(lane, LD * E);
  // The GRU's n rows (w_s rows 16-23) as the B operand (n8 tile 0 of ldsm_b16 from row 16), h as A.
  const uint32_t wn_base = smem_addr(w_s + 16 * LD) + ldsm_b16(lane, LD * E);
  const uint32_t ha_base = smem_addr(h_s) + ldsm_a16(lane, LD * E);
  const uint32_t m_base = smem_addr(m_s) + ldsm_a16(lane, LDH * E);
  const uint32_t r_base = smem_addr(wr_s) + ldsm_b8x2(lane, LDH * E);
  // Fragment f (0, 1) of chunk ks of the resident slice: rows 0-15, then rows 16-31 (LSTM) or the n
  // rows as a B operand (GRU).
  auto w_frags = [&](int ks, int f) {
    return ldsm_frag<Op>((f == 0 ? w_base : GATES == 4 ? w_base + 16 * LD * E : wn_base) + ks * CHUNK_BYTES);
  };
  // W in registers (WREGS, 16-bit and tf32 Ops, a warp's k range of at most w_reg_chunks chunks): the
  // warp's fragments of the slice (tf32: rounded once, as every step rounded them), read from shared
  // memory once per launch; each step then reads only h_{t-1} there. Otherwise (3xTF32, larger H, or
  // the instance without WREGS) every step reads them again.
  constexpr int kWRegChunks = WREGS && !Op::kSplit ? w_reg_chunks(sizeof(T)) : 0;
  Frag<Op> w_reg[kWRegChunks > 0 ? kWRegChunks : 1][2];
  const bool w_in_registers = kWRegChunks > 0 && ks_end - ks_begin <= kWRegChunks;
  // The tagged exchange (fused_common.cuh) in place of hx and the grid barrier: the LSTM without
  // projection in 16 bits, every warp's range on the register path.
  constexpr bool kTaggable = kWRegChunks > 0 && GATES == 4 && !PROJ && !Op::kTf32;  // a word: two 16-bit units
  const bool tagged = kTaggable && hxt != nullptr && fwd_gate_k_longest(P, E) <= kWRegChunks;
  const int row_words = Pk / 2;
  const size_t hxt_slot = (size_t)Bp * row_words;
  if (threadIdx.x == 0) abort_s = 0;  // the tagged wait's give-up (the counter's wait sets it every step)
  if constexpr (kWRegChunks > 0) {
    __syncthreads();  // the resident slice is in shared memory
    if (w_in_registers) {
#pragma unroll
      for (int i = 0; i < kWRegChunks; ++i)
        if (i < ks_end - ks_begin) w_reg[i][0] = w_frags(ks_begin + i, 0), w_reg[i][1] = w_frags(ks_begin + i, 1);
    }
  }

  // ---- the step loop ----
  for (int t = t_first; t < t_end; ++t) {
    const int n_t = batch_sizes ? __ldg(batch_sizes + t) : B;
    const bool last_step = t == T_ - 1;
    const int n_after = last_step ? 0 : (batch_sizes ? __ldg(batch_sizes + t + 1) : B);  // rows active at t+1
    const int hs_a = NPH * t;
    if (hs_a >= hs_begin) {  // ---- half-step A: gates, cell ----
      uint32_t zero_rows = 0;  // RESETS: bit r: row b0 + r starts step t from h_{t-1} = 0, c_{t-1} = 0
      if constexpr (RESETS) {
        zero_rows = reset_rows(reset_next);
        if (t + 1 < t_end) reset_next = reset_flag(resets, t + 1, B, b0, lane);
      }
      float acc[2][2][4] = {};
      // h_{t-1}'s fragments of chunk ks: the B operand (and the GRU's A operand of its transposed n tile).
      struct HFrags {
        Frag<Op> b, a;
      };
      auto h_frags = [&](int ks) {
        HFrags f;
        f.b = ldsm_frag<Op>(h_base + ks * CHUNK_BYTES);
        if constexpr (GATES == 3) f.a = ldsm_frag<Op>(ha_base + ks * CHUNK_BYTES);
        return f;
      };
      // One chunk of the product, given its two W fragments (w_frags: the LSTM's rows 0-15 and 16-31
      // as A operands; the GRU's r, z rows as A and its n rows as the B operand) and h's.
      auto chunk_mma = [&](const Frag<Op>& w0, const Frag<Op>& w1, const HFrags& h) {
        mma_chunk<Op>(acc[0][0], w0, h.b, 0);
        mma_chunk<Op>(acc[0][1], w0, h.b, 1);
        if constexpr (GATES == 4) {
          mma_chunk<Op>(acc[1][0], w1, h.b, 0);
          mma_chunk<Op>(acc[1][1], w1, h.b, 1);
        } else {  // hn^T: batch rows x the n rows' 8 units, one MMA (the transposed tile of acc[1][0])
          mma_chunk<Op>(acc[1][0], h.a, w1, 0);
        }
      };
      if (tagged) {
        if constexpr (kTaggable) {
          // Each warp waits for its own operands, the tagged words of h_{t-1} (tag t), read straight
          // into B fragments: no counter, no copy to shared memory, no block barrier before the MMAs.
          bool ok = true;
          if (b0 < n_t) {
            // rows to wait for: every row active at step t, reset or not. A reset row's h_{t-1} is used as
            // zero, but its wait is what keeps the slot's reuse safe: were a tile whose active rows all
            // reset to skip it, its block could store h_t into the slot of h_{t-2} before a slower block
            // has read h_{t-2} there.
            const uint32_t active = n_t - b0 >= BATCH_TILE ? 0xffffu : (1u << (n_t - b0)) - 1u;
            uint32_t hw[kWRegChunks][4];
            ok = tagged_fetch(hw, hxt + ((t - 1) & 1) * hxt_slot + (size_t)b0 * row_words, row_words, ks_begin,
                              ks_end - ks_begin, (uint32_t)t, active, zero_rows, (P + 1) / 2, hs_a > hs_begin,
                              watch, t - 1, lane);
            if (ok) {
#pragma unroll
              for (int i = 0; i < kWRegChunks; ++i) {
                HFrags f;
#pragma unroll
                for (int e = 0; e < 4; ++e) f.b.big[e] = hw[i][e];
                if (i < ks_end - ks_begin) chunk_mma(w_reg[i][0], w_reg[i][1], f);
              }
            }
          }
          if (!ok && lane == 0) abort_s = 1;
          __syncthreads();  // [1] the cell warps have read red (step t - 1); a warp that gave up is known
          if (abort_s) return;
        }
      } else {
        // [1] h_{t-1} of every block of this batch tile is stored; each warp copies its k columns
        // (rows that reset land as zeros)
        if (!block_wait(counter, (unsigned int)(hs_a - hs_begin) * arrivals, hs_a > hs_begin, watch, t - 1, warp,
                        lane, &abort_s))
          return;
      }
      if (!tagged && b0 < n_t) {  // a batch tile with no active row skips its products
        warp_fetch_columns<T, RESETS>(h_s, LD, hx + ((t - 1) & 1) * hx_slot + (size_t)b0 * Pk, Pk,
                                      ks_begin * CHUNK_BYTES / E, ks_end * CHUNK_BYTES / E, lane, zero_rows);
        if (w_in_registers) {  // no W read from shared memory: every h ldmatrix issued, then the MMAs
          HFrags h[kWRegChunks > 0 ? kWRegChunks : 1];
#pragma unroll
          for (int i = 0; i < kWRegChunks; ++i)
            if (i < ks_end - ks_begin) h[i] = h_frags(ks_begin + i);
#pragma unroll
          for (int i = 0; i < kWRegChunks; ++i)
            if (i < ks_end - ks_begin) chunk_mma(w_reg[i][0], w_reg[i][1], h[i]);
        } else {
#pragma unroll 1
          for (int ks = ks_begin; ks < ks_end; ++ks) chunk_mma(w_frags(ks, 0), w_frags(ks, 1), h_frags(ks));
        }
      }
      constexpr int TILES = GATES == 4 ? 4 : 3;  // accumulator tiles in use: (0, 0), (0, 1), (1, 0) [, (1, 1)]
#pragma unroll
      for (int tile = 0; tile < TILES; ++tile)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[(warp * 16 + tile * 4 + e) * 32 + lane] = acc[tile >> 1][tile & 1][e];
      __syncthreads();  // [2] partial sums of the 8 warps in red

      if (cell_warp) {
        // i (r): tile (0, nt) element cc; f (z): element 2 + cc; g, o: the same in tile (1, nt). The GRU's
        // n rows: tile (1, 0) holds hn^T (rows: batch, columns: units), (b, j) at fwd_n_lane / fwd_n_element.
        const int ri = nt * 4 + cc, rg = (2 + nt) * 4 + cc;
        const int n_slot = 8 + fwd_n_element(warp, lane), n_lane = fwd_n_lane(warp, lane);
        float pi = 0.f, pf = 0.f, pg = 0.f, po = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
          const float* rw = red + w * 16 * 32;
          pi += rw[ri * 32 + lane], pf += rw[(ri + 2) * 32 + lane];
          if constexpr (GATES == 4) {
            pg += rw[rg * 32 + lane], po += rw[(rg + 2) * 32 + lane];
          } else {
            pg += rw[n_slot * 32 + n_lane];
          }
        }
        // The cell, then the one store other blocks read (h_t to hx; PROJ: m_t to mx), the block's
        // arrival, and only then the outputs, so the arrival's fence does not wait for them.
        const size_t s = (size_t)b * H + j;
        const bool step_row = mine && b < n_t;  // the cell runs for this (b, j) at step t
        std::conditional_t<GATES == 4, Gates, GruGates> a{};
        float saved = 0.f;  // what c_all keeps: c_t (the GRU's hn)
        T hT = zero;
        if (step_row) {
          if (RESETS && ((zero_rows >> (b - b0)) & 1u)) c_reg = 0.f;
          float h;  // h_t before rounding
          if constexpr (GATES == 4) {
            cell_forward<typename Op::Activations>(pi + x_i, pf + x_f, pg + x_g, po + x_o, c_reg, &a, &saved,
                                                   &h);
            c_reg = saved;
          } else {
            saved = pg + bias_n;
            gru_cell_forward<typename Op::Activations>(pi + x_i, pf + x_f, x_g, saved, c_reg, &a, &h);
          }
          hT = from_float<T>(h);
          if constexpr (GATES == 3) c_reg = to_float(hT);  // h_{t-1} of the next step, as stored
          if (PROJ) {
            mx[(size_t)b * Hk + j] = hT;  // m_t, projected in half-step B
          } else if (!tagged) {
            hx[(t & 1) * hx_slot + (size_t)b * Pk + j] = hT;
          }
        }
        if constexpr (kTaggable) {
          if (tagged) {  // units j, j + 1 of row b in one word (tag t + 1), by the lane of the even unit;
            // the lane of j + 1 is lane ^ 4 (fwd_cell_unit)
            const uint32_t bits = b16_bits(hT), odd = __shfl_xor_sync(0xffffffffu, bits, 4);
            if (step_row && ((lane >> 2) & 1) == 0)
              store_tagged(hxt + (t & 1) * hxt_slot + (size_t)b * row_words + tagged_pos(j >> 1), bits | odd << 16,
                           (uint32_t)t + 1u);
          }
        }
        const bool more = hs_a + 1 < hs_end;  // another half-step in this launch
        if (more && !tagged) block_arrive(counter);  // this block's h_t (m_t) stored: release
        if (more && mine && t + 1 < t_end) load_xg(t + 1);  // xg_{t+1}, before the next wait
        if (mine && !PROJ) h_all[t * BH + s] = hT;  // zero for a row inactive at step t
        if (step_row) {
          if (act) store_activations(act + t * BGH + (size_t)b * GATES * H + j, H, a);
          if (GATES == 4 && (last_step || b >= n_after)) c_T[s] = from_float<T>(saved);
          if (!PROJ && (last_step || b >= n_after)) h_T[s] = hT;
          if (c_all) c_all[t * BH + s] = saved;
        }
      }
    }
    if (PROJ && hs_a + 1 >= hs_begin && hs_a + 1 < hs_end) {  // ---- half-step B: h_t = m_t W_hr^T ----
      const int hs_b = hs_a + 1;
      // [3] m_t of every block of this batch tile is stored; each warp copies its k columns
      if (!block_wait(counter, (unsigned int)(hs_b - hs_begin) * arrivals, hs_b > hs_begin, watch, t, warp, lane,
                      &abort_s))
        return;
      if (proj_block && b0 < n_t)
        warp_fetch_columns(m_s, LDH, mx + (size_t)b0 * Hk, Hk, kp_begin * 2 * CHUNK_BYTES / E,
                           kp_end * 2 * CHUNK_BYTES / E, lane);
      const float h =  // [4] partial sums in red
          split_k_mma_16x8<Op>(m_base, r_base, kp_begin, kp_end, proj_block && b0 < n_t, red, warp, lane);
      if (cell_warp) {
        const size_t s = (size_t)pb * P + pp;
        const T hT = from_float<T>(h);
        if (mine_p && pb < n_t) hx[(t & 1) * hx_slot + (size_t)pb * Pk + pp] = hT;
        if (hs_b + 1 < hs_end) block_arrive(counter);  // this block's h_t stored: release
        if (mine_p) {
          h_all[t * BP + s] = pb < n_t ? hT : zero;
          if (pb < n_t && (last_step || pb >= n_after)) h_T[s] = hT;
        }
      }
    }
  }
  if (GATES == 4 && mine && c_work) c_work[(size_t)b * H + j] = c_reg;
}

size_t forward_smem_bytes(int H, int P, bool proj, int elem) {
  const int LD = round_up(P, kpad(elem)) + smem_pad(elem), LDH = round_up(H, kpad(elem)) + smem_pad(elem);
  return (size_t)(FWD_ROWS + BATCH_TILE) * LD * elem + (size_t)WARPS * 16 * 32 * sizeof(float) +
         (proj ? (size_t)(UNITS + BATCH_TILE) * LDH * elem : 0);
}

template <typename Op, bool PROJ, bool RESETS, int GATES, bool WREGS, typename T = typename Op::T>
cudaError_t forward_launch(const void* xg, const void* w_fwd, const void* w_hr, const void* c0, const void* b_hn,
                           float* c_work, void* hx, void* mx, void* h_all, void* h_T, void* c_T, float* act,
                           float* c_all, const int* batch_sizes, const unsigned char* resets, unsigned int* counters,
                           int T_, int B, int H, int P, int persistent, void* hx_tagged,
                           BarrierWatch watch, cudaStream_t stream) {
  const dim3 grid(unit_blocks(H), batch_tiles(B));
  return launch_half_steps(fused_forward_kernel<Op, PROJ, RESETS, GATES, WREGS>, grid,
                           forward_smem_bytes(H, P, PROJ, sizeof(T)), (PROJ ? 2 : 1) * T_, persistent, counters, watch,
                           resets, stream, static_cast<const T*>(xg), static_cast<const T*>(w_fwd),
                           static_cast<const T*>(w_hr), static_cast<const T*>(c0), static_cast<const T*>(b_hn), c_work,
                           static_cast<T*>(hx), static_cast<T*>(mx), static_cast<T*>(h_all), static_cast<T*>(h_T),
                           static_cast<T*>(c_T), act, c_all, batch_sizes, counters, T_, B, H, P,
                           static_cast<unsigned long long*>(hx_tagged));
}

// Whether the fused forward serves (B, H, P) on the current device: *possible 0 the block's
// shared memory does not fit, 1 the persistent grid is co-resident, 2 per-step launches only.
template <typename Op, bool PROJ, bool RESETS, int GATES, bool WREGS>
cudaError_t forward_plan(int B, int H, int P, int* blocks, size_t* smem, int* possible) {
  *smem = forward_smem_bytes(H, P, PROJ, sizeof(typename Op::T));
  *blocks = unit_blocks(H) * batch_tiles(B);
  return kernel_plan(fused_forward_kernel<Op, PROJ, RESETS, GATES, WREGS>, *smem, *blocks, possible);
}

// Calls f(std::bool_constant<WREGS>{}): the instance with the register path where w_registers asks for it and
// the Op has one (not 3xTF32, whose instance with it would be the same kernel), else the one without.
template <typename Op, typename F>
cudaError_t with_weights(int w_registers, F&& f) {
  if constexpr (Op::kSplit) {
    return f(std::false_type{});
  } else {
    return w_registers ? f(std::true_type{}) : f(std::false_type{});
  }
}

}  // namespace fused
}  // namespace lstm

// C entry points (dtype 0 float at fp32 accuracy, 1 fp16, 2 bf16, 3 float on tf32: with_op's codes;
// proj: P < H with w_hr and mx; gates 4 the LSTM, 3 the GRU with b_hn), for bindings.cpp and for the
// GPU tests' standalone build. Return a cudaError_t code.
extern "C" int lstm_fused_forward(int dtype, const void* xg, const void* w_fwd, const void* w_hr, const void* c0,
                                  float* c_work, void* hx, void* mx, void* h_all, void* h_T, void* c_T, float* act,
                                  float* c_all, const int* batch_sizes, const unsigned char* resets,
                                  unsigned int* counters, int T, int B, int H, int P, int persistent,
                                  unsigned long long* barrier_state, long long* barrier_record,
                                  long long barrier_timeout_ns, long long barrier_kernel, void* stream, int gates,
                                  const void* b_hn, int w_registers, void* hx_tagged) {
  using namespace lstm::fused;
  const lstm::BarrierWatch watch{barrier_state, barrier_record, barrier_timeout_ns, barrier_kernel};
  return with_op(dtype, [&](auto op) {
    using Op = decltype(op);
    return with_instance(w_hr != nullptr, resets != nullptr, gates, [&](auto proj, auto with_resets,
                                                                                 auto cell_gates) {
      return with_weights<Op>(w_registers, [&](auto wregs) {
        return forward_launch<Op, decltype(proj)::value, decltype(with_resets)::value, decltype(cell_gates)::value,
                              decltype(wregs)::value>(xg, w_fwd, w_hr, c0, b_hn, c_work, hx, mx, h_all, h_T, c_T, act,
                                                      c_all, batch_sizes, resets, counters, T, B, H, P, persistent,
                                                      hx_tagged, watch, static_cast<cudaStream_t>(stream));
      });
    });
  });
}

extern "C" int lstm_fused_forward_plan(int dtype, int B, int H, int P, int resets, int* blocks, size_t* smem,
                                       int* possible, int gates, int w_registers) {
  using namespace lstm::fused;
  return with_op(dtype, [&](auto op) {
    using Op = decltype(op);
    return with_instance(P != H, resets != 0, gates, [&](auto proj, auto with_resets, auto cell_gates) {
      return with_weights<Op>(w_registers, [&](auto wregs) {
        return forward_plan<Op, decltype(proj)::value, decltype(with_resets)::value, decltype(cell_gates)::value,
                            decltype(wregs)::value>(B, H, P, blocks, smem, possible);
      });
    });
  });
}
