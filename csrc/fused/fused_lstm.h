// Host-side C API of the fused kernels at the budget of one step (fused_forward.cu,
// fused_backward.cu), called by bindings.cpp (and, before the extension exports them, by the
// GPU tests through a standalone nvcc build). Raw device pointers; dtype: a FusedOp code (the
// storage type and the precision of the products, fused_common.cuh). Each returns a cudaError_t
// code (0: success).
//
// Dimension names: T steps, B batch, H hidden units, P = proj_size or H; Bp = B rounded up to
// 16, Pk / Hk / K4p = P / H / 4H rounded up to 32. Gate order along 4H: i, f, g, o.
// persistent: 1 one cooperative launch (light grid barrier), 0 one launch per half-step.
// barrier_state (u64 [2] zeroed: unused, gave up), barrier_record (i64 [4], the device's error
// record), barrier_timeout_ns (0: no bound) and barrier_kernel (the code in the record): the time
// bound of the persistent launch's grid wait (state null: no bound); see barrier_wait.cuh.
#pragma once

#include <cstddef>

extern "C" {

// 16-bit codes as step/static_switch.h's; float has two, by the precision of its products: fp32
// accuracy (3xTF32 on tensor cores), or tf32 (only where torch allows TF32).
enum FusedOp { kFusedFloat32 = 0, kFusedFloat16 = 1, kFusedBFloat16 = 2, kFusedTf32 = 3 };

// xg [T,B,4H]; w_fwd [ceil(H/8)*32, P] (cuda/fused.py's interleave_forward); w_hr [ceil(P/8)*8, H] or
// null; c0 [B,H]; c_work [B,H] fp32 scratch; hx [2,Bp,Pk] zeroed with h0 in slot 1; mx [Bp,Hk]
// zeroed (proj) or null; out h_all [T,B,P], h_T [B,P], c_T [B,H] (pre-filled with h0, c0), act
// [T,B,4H] fp32 / c_all [T,B,H] fp32 or null; batch_sizes [T] int32 or null; resets [T,B] uint8 or
// null (nonzero: that row starts step t from h_{t-1} = 0, c_{t-1} = 0); counters [ceil(B/16)].
// gates: 4 the LSTM; 3 the GRU (no projection): xg [T,B,3H], c0, c_work and c_T null, b_hn [H] or null,
// act [T,B,3H] (r, z, n) and c_all [T,B,H] (hn = h_{t-1} W_hn^T + b_hn), as the per-step kernels' workspace.
// w_registers: 1 the kernel instance with the register path (16-bit types or tf32; float at fp32 accuracy has
// none): each warp keeps its k range of the W slice in registers where it fits (at most w_reg_chunks chunks,
// fused_plan.cuh); 0 the instance without it, whose every step reads W from shared memory with fewer registers.
// hx_tagged: null, or [2, ceil(B/16)*16, Pk/2] uint64 (Pk = P padded to 32) zeroed, slot 1 holding h0 as
// tagged words (fused_common.cuh: the tagged exchange; cuda/fused.py's pack_tagged): where the kernel
// can (the LSTM without projection, 16-bit types, w_registers and every warp's range in registers)
// h_t is exchanged there with its step's tag instead of through hx and the grid barrier.
int lstm_fused_forward(int dtype, const void* xg, const void* w_fwd, const void* w_hr, const void* c0,
                       float* c_work, void* hx, void* mx, void* h_all, void* h_T, void* c_T, float* act,
                       float* c_all, const int* batch_sizes, const unsigned char* resets, unsigned int* counters,
                       int T, int B, int H, int P,
                       int persistent, unsigned long long* barrier_state, long long* barrier_record,
                       long long barrier_timeout_ns, long long barrier_kernel, void* stream, int gates,
                       const void* b_hn, int w_registers, void* hx_tagged);

// w_bwd [ceil(P/16)*16, 4H] (cuda/fused.py's interleave_backward; whole blocks of either variant); w_hrT
// [ceil(H/8)*8, P] or null; act,
// c_all from the forward; c0 [B,H]; dh_all [T,B,P]; dh_T [B,P]; dc_T [B,H]; dc_work [B,H] fp32;
// dgx [2,Bp,K4p] zeroed; dhx [Bp,Pk] zeroed (proj) or null; out dG [T,B,4H], dh0 [B,P], dc0
// [B,H], dh_tot [T,B,P] fp32 (proj: dh_t for dW_hr) or null; resets as the forward's (nothing flows
// back across a reset: dh_{t-1}, dc_{t-1} leave step t as 0 for that row; dG_t itself unchanged).
// gates: 4 the LSTM; 3 the GRU (no projection): w_bwd [ceil(H/16)*16, 3H] (r' = 3j + g), act / c_all the
// GRU forward's (r, z, n; hn), c0 = h0, h_all [T,B,H] the forward's h_t, dc_T, dc0 null, d_hn [T,B,H] out,
// dgx [2,Bp,K3p]; dc_work carries dh_t z_t between launches.
// tile: the backward's blocks (fused_plan.cuh): 0 the ring's; 1 the wide backward's (16 units x 16 rows, dG
// loaded straight into MMA fragments, the same bits), 2 the narrow backward's (16 units x 8 rows, W^T and dG^T
// as the MMA's A and B), each where it serves (no projection, its shared memory within the device's opt-in),
// else the ring's. counters: one per batch tile of the tile that serves (bwd_batch_tiles).
int lstm_fused_backward(int dtype, const void* w_bwd, const void* w_hrT, const float* act, const float* c_all,
                        const void* c0, const void* dh_all, const void* dh_T, const void* dc_T, float* dc_work,
                        void* dgx, void* dhx, void* dG, void* dh0, void* dc0, float* dh_tot,
                        const int* batch_sizes, const unsigned char* resets, unsigned int* counters, int T, int B,
                        int H, int P, int persistent, unsigned long long* barrier_state, long long* barrier_record,
                        long long barrier_timeout_ns, long long barrier_kernel, void* stream, int gates,
                        const void* h_all, void* d_hn, int tile);

// *possible: 0 the block's shared memory does not fit this device, 1 the persistent grid is
// co-resident (cooperative launch), 2 per-step launches only. *blocks, *smem: grid size, bytes.
// resets: 1 plans the kernel that serves resets (its own registers), 0 the one without. The forward's
// w_registers: as lstm_fused_forward's (the instance with the register path: its own registers, so its own
// co-residency). The backward's tile: as lstm_fused_backward's; *tile_serves the tile of the kernel planned
// (the ring's where the one asked for does not serve).
int lstm_fused_forward_plan(int dtype, int B, int H, int P, int resets, int* blocks, size_t* smem, int* possible,
                            int gates, int w_registers);
int lstm_fused_backward_plan(int dtype, int B, int H, int P, int resets, int* blocks, size_t* smem, int* possible,
                             int gates, int tile, int* tile_serves);
}
