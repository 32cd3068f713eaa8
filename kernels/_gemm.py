"""Triton device functions that the GEMM kernels share (lora_linear.py's and nf4.py's fused NF4 GEMM).

grouped_pid / grouped_tile: the output tile of this program, in grouped order (GROUP_M row blocks sweep the columns
together, so the rows of A they read stay in L2 while the columns go by): its row and column offsets, and
the int64 rows and columns its loads read, wrapped modulo M and N (the extra ones are never stored).
lowrank_tile: acc += E[rows, 0:R] @ F[0:R, cols] in rank chunks of BLOCK_R (masked past R): the low-rank
term of a LoRA GEMM, added before the main loop so its loads overlap the pipeline's prologue. F may be float32
(the LoRA masters, read in place: no cast launch per step); its tiles are rounded to E's dtype, exactly what a
cast before the call would have stored. MAPPED: F is a block-diagonal matrix given by its blocks stacked by
rows, B_rows [N, r] (rank_window: column n holds ranks rank_lo[n] .. rank_lo[n] + rank_n[n] of E), so F[r, n] =
B_rows[n, r - rank_lo[n]] inside the window and 0 outside; nothing block-diagonal is materialised.
rank_window: (rank_lo, rank_n) per stacked output feature `idx`, from the boundaries of at most three
projections (c1, c2: first feature of projections 1 and 2) and where their ranks sit (ro*, rw*).
"""

from __future__ import annotations

from ._dispatch import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of this program in grouped order."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pids_per_group = GROUP_M * num_pid_n
        first_pid_m = (pid // pids_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % pids_per_group) % group_rows
        pid_n = (pid % pids_per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # loads wrap instead of masking rows and columns: the extra rows and columns are never stored
        return offs_m, offs_n, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)

    @triton.jit
    def rank_window(idx, c1, c2, ro0, ro1, ro2, rw0, rw1, rw2):
        second = idx >= c1
        third = idx >= c2
        lo = tl.where(third, ro2, tl.where(second, ro1, ro0))
        n = tl.where(third, rw2, tl.where(second, rw1, rw0))
        return lo, n

    @triton.jit
    def lowrank_tile(acc, e_ptr, stride_em, stride_er, f_ptr, stride_fr, stride_fn, rows, cols, R, rank_lo, rank_n,
                     BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, MAPPED: tl.constexpr):
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + offs_r) < R
            e_tile = tl.load(e_ptr + rows[:, None] * stride_em + (r0 + offs_r)[None, :] * stride_er,
                             mask=r_ok[None, :], other=0.0)
            if MAPPED:
                local = (r0 + offs_r)[:, None] - rank_lo[None, :]
                f_ok = (local >= 0) & (local < rank_n[None, :])
                f_tile = tl.load(f_ptr + local * stride_fr + cols[None, :] * stride_fn, mask=f_ok, other=0.0)
            else:
                f_tile = tl.load(f_ptr + (r0 + offs_r)[:, None] * stride_fr + cols[None, :] * stride_fn,
                                 mask=r_ok[:, None], other=0.0)
            acc = tl.dot(e_tile, f_tile.to(e_tile.dtype), acc, input_precision=DOT_PRECISION)
        return acc
