"""Triton kernels of the decision (``engines/triton_fused.py`` builds and launches them).

The "split" layout (the default) is ``value_kernel`` (V(obs), on a graph branch), one
``block_kernel`` per reverse step and block, ``finish_kernel`` (the last update and the
critic in (row tile, slice) work items) and ``select_kernel``; "persist" runs the same
work in ``persist_kernel``. The "fused" layout is two kernels:

``decide_kernel``: one program per tile of BLOCK_M candidate rows (rows = B*N, each row
one candidate of one state). Candidates are independent through the whole reverse
process and through the critic, so a program runs ALL T (+ M extra) reverse steps of
the LN-ResNet score network on its rows and then the min-of-ensemble Q critic, without
writing anything but the final candidates x (rows, A) and their Q (rows,). Per step:
h = obs_share + time_share[t] + x @ W_a; per block h += fc2(act(fc1(LN(h)))) with the
4x-wide hidden layer computed chunk by chunk (HID_CHUNK columns) and multiplied into the
fc2 accumulator right away, so it never leaves registers; eps = out(act(h)); the DDPM
update with the given step noise; clipping.

``select_kernel``: one program per tile of 16 states: V(obs), then argmax or the
implicit-policy draw over the N candidates' Q, the gather of the chosen action, and the
packed output row [action | chosen Q | V | Q spread | index].

Dims are padded to powers of two (``tl.arange`` needs them; ``tl.dot`` needs >= 16) with
zero weights, so padded columns stay exactly zero through every layer: LN(0-column) is
scaled by a zero gamma, act(0) = 0 for swish, mish and relu. LayerNorm statistics use the
true width (``H`` / ``OBS``), never the padded one.

This file is imported twice: normally (``triton.jit``, for CUDA) and, by
``triton_fused.load_kernels(interpret=True)``, as a second module with ``INTERPRET``
preset, whose functions are Triton ``InterpretedFunction``s that run on CPU tensors with
numpy. That way the interpreter is chosen per engine, without setting TRITON_INTERPRET
for the whole process (which would also make torch.compile's Triton kernels interpret).
"""

from typing import Any

import triton.language as tl

INTERPRET: bool = bool(globals().get("INTERPRET", False))

# Not ``triton.jit``: that decorator reads TRITON_INTERPRET when this module is imported,
# and the compiled copy must stay compiled whatever the environment says.
if INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction

    _jit: Any = InterpretedFunction
else:
    from triton.runtime.jit import JITFunction

    _jit = JITFunction

ACTIVATIONS = {"swish": 0, "mish": 1, "relu": 2}
VALUE_LOSSES = {"expectile": 0, "quantile": 1, "exponential": 2}


@_jit
def _act(x, ACT: tl.constexpr):
    """swish (0), mish (1) or relu (2) in float32."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        # mish = x tanh(softplus(x)); with n = e^x, tanh(log(1 + n)) = n(n+2) / (n(n+2) + 2).
        # Exact to float32 rounding; x > 20 gives a ratio of 1.0 in float32 anyway.
        n = tl.exp(tl.minimum(x, 20.0))
        p = n * (n + 2.0)
        y = x * (p / (p + 2.0))
    else:
        y = tl.maximum(x, 0.0)
    return y


@_jit
def _mm(a, b, acc, LOWP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b. a: float32 activations; b: weights in their storage dtype.

    LOWP: b is bf16/fp16; a is rounded to b's dtype and the product accumulates in fp32.
    UPCAST (interpreter only): the interpreter's tl.dot multiplies bf16 *bit patterns*
    (numpy has no bf16), so the same rounded operands are multiplied as float32 instead:
    products of 8-bit mantissas are exact in fp32, only the summation order differs.
    """
    if LOWP:
        a_low = a.to(b.dtype)
        if UPCAST:
            out = tl.dot(a_low.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a_low, b, acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@_jit
def _row_stats(x, cmask, WIDTH: tl.constexpr, eps):
    """LayerNorm statistics over the true width: (centred x with padding zeroed, 1/std)."""
    mean = tl.sum(x, axis=1) / WIDTH
    d = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / WIDTH
    return d, 1.0 / tl.sqrt(var + eps)


@_jit
def _obs_share(obs_ptr, bidx, rmask, wo_ptr, bin_ptr, hcols, OBS: tl.constexpr,
               OP: tl.constexpr, OC: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
    """The observation's share of an input projection (the score network's; a Q head's
    first layer), incl. its bias: obs W + b for BM rows, W (OP, HP) and b (HP,) at the
    given pointers."""
    share = tl.zeros((BM, HP), tl.float32) + tl.load(bin_ptr + hcols)[None, :]
    for k in range(OP // OC):
        ocols = k * OC + tl.arange(0, OC)
        ob = tl.load(
            obs_ptr + bidx[:, None] * OBS + ocols[None, :],
            mask=rmask[:, None] & (ocols < OBS)[None, :],
            other=0.0,
        )
        w = tl.load(wo_ptr + ocols[:, None] * HP + hcols[None, :])
        share = _mm(ob, w, share, False, False, PREC)
    return share


@_jit
def _pdl_wait(PDL: tl.constexpr):
    """With PDL (programmatic dependent launch, sm_90+, ``launch_pdl``): wait here until
    the previous launch has finished and its writes are visible, then let the next launch
    start (its programs come up and issue their own weight loads while this one computes).
    Everything before this call must not read what an earlier launch writes. Without PDL
    nothing is emitted: the kernel is the same code as before the option existed."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@_jit
def _prefetch_l1(ptrs):
    """``prefetch.global.L1`` of the 128-byte lines at ``ptrs`` (one pointer per line): the
    loads that follow hit L1 instead of waiting for L2. GPU only (inline PTX); the result
    is a dummy that keeps the instruction from being dropped."""
    return tl.inline_asm_elementwise(
        "prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@_jit
def _prefetch_block_weights(w1_ptr, w2_ptr, blk, f0, FS: tl.constexpr, HP: tl.constexpr,
                            FP: tl.constexpr, LINE: tl.constexpr):  # fmt: skip
    """Every 128-byte line (LINE weights) of this program's fc1 columns [f0, f0 + FS) and
    fc2 rows [f0, f0 + FS) of block blk into L1, all in flight at once: without it the
    chunk loop fetches each chunk's weights from L2 only when it gets there."""
    n1: tl.constexpr = FS // LINE if FS > LINE else 1
    r1 = tl.arange(0, HP)
    c1 = f0 + tl.arange(0, n1) * LINE
    _prefetch_l1(w1_ptr + blk * HP * FP + r1[:, None] * FP + c1[None, :])
    n2: tl.constexpr = HP // LINE if HP > LINE else 1
    r2 = f0 + tl.arange(0, FS)
    c2 = tl.arange(0, n2) * LINE
    _prefetch_l1(w2_ptr + blk * FP * HP + r2[:, None] * HP + c2[None, :])


@_jit
def _block_in(h, g, bb, hmask, ln_eps, H: tl.constexpr, LN: tl.constexpr):
    """The block's input: LayerNorm(h) over the true width with gain g and bias bb (loaded
    by the caller, early), or h without LayerNorm."""
    if LN:
        d, rstd = _row_stats(h, hmask, H, ln_eps)
        y = d * rstd[:, None] * g[None, :] + bb[None, :]
    else:
        y = h
    return y


@_jit
def _block_mlp(y, acc, w1_ptr, b1_ptr, w2_ptr, blk, hcols, f0, F_SPAN: tl.constexpr,
               HP: tl.constexpr, FP: tl.constexpr, FC: tl.constexpr, BM: tl.constexpr,
               ACT: tl.constexpr, LOWP: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
    """acc + fc2(act(fc1(y))) over the wide columns [f0, f0 + F_SPAN), FC at a time: the
    wide layer's chunk goes straight into the fc2 product and never leaves registers."""
    for c in range(F_SPAN // FC):
        fcols = f0 + c * FC + tl.arange(0, FC)
        w1 = tl.load(w1_ptr + blk * HP * FP + hcols[:, None] * FP + fcols[None, :])
        b1 = tl.load(b1_ptr + blk * FP + fcols)
        mid = _mm(y, w1, tl.zeros((BM, FC), tl.float32), LOWP, UPCAST, PREC)
        mid = _act(mid + b1[None, :], ACT)
        w2 = tl.load(w2_ptr + blk * FP * HP + fcols[:, None] * HP + hcols[None, :])
        acc = _mm(mid, w2, acc, LOWP, UPCAST, PREC)
    return acc


@_jit
def _step_inputs(z_ptr, coef_ptr, s, rows, acols, xmask, R, A: tl.constexpr,
                 T: tl.constexpr):  # fmt: skip
    """Reverse step s's coefficients (1/sqrt(alpha_t), eps coefficient, sigma_t) and its
    noise z, loaded apart from the update so that a caller can issue the loads early."""
    t = tl.maximum(T - 1 - s, 0)
    c_inv = tl.load(coef_ptr + s * 4)
    c_eps = tl.load(coef_ptr + s * 4 + 1)
    c_sig = tl.load(coef_ptr + s * 4 + 2)
    # sigma is 0 in the coefficient table at t = 0 and for the extra steps (s >= T)
    z = tl.load(z_ptr + t * R * A + rows[:, None] * A + acols[None, :], mask=xmask, other=0.0)
    return c_inv, c_eps, c_sig, z


@_jit
def _reverse_update(h, x, wout, bout, c_inv, c_eps, c_sig, z, AP: tl.constexpr,
                    BM: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr,
                    PREC: tl.constexpr):  # fmt: skip
    """x after a reverse step from the score network's last hidden state h: eps = out(act(h)),
    x = (x - c_eps eps) / sqrt(alpha_t) + sigma_t z (``_step_inputs``), clipped."""
    eps = _mm(_act(h, ACT), wout, tl.zeros((BM, AP), tl.float32), False, False, PREC)
    eps = eps + bout[None, :]
    x = c_inv * (x - c_eps * eps) + c_sig * z
    if CLIP:
        x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    return x


@_jit
def _q_hidden1(obs_ptr, bidx, rmask, x, acols, q0cols, e, qwo_ptr, qwa_ptr, qb0_ptr,
               OBS: tl.constexpr, OP: tl.constexpr, OC: tl.constexpr, AP: tl.constexpr,
               QP0: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Q head e's first hidden layer relu(obs W_o + x W_a + b) for BM candidate rows."""
    h1 = _obs_share(obs_ptr, bidx, rmask, qwo_ptr + e * OP * QP0, qb0_ptr + e * QP0, q0cols,
                    OBS, OP, OC, QP0, BM, PREC)  # fmt: skip
    qwa = tl.load(qwa_ptr + e * AP * QP0 + acols[:, None] * QP0 + q0cols[None, :])
    return tl.maximum(_mm(x, qwa, h1, False, False, PREC), 0.0)


@_jit
def _q_head_out(h1, qe, q0cols, e, c0, qw1_ptr, qb1_ptr, qwl_ptr, QP0: tl.constexpr,
                QP1: tl.constexpr, QPL: tl.constexpr, QC: tl.constexpr, QW: tl.constexpr,
                QDEPTH: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """qe + head e's output from its first hidden layer h1: with two hidden layers only
    the second layer's columns [c0, c0 + QW), QC at a time, through the output weights;
    with one, h1 through them (c0 = 0, QW = QP1)."""
    if QDEPTH == 2:
        for c in range(QW // QC):
            qcols = c0 + c * QC + tl.arange(0, QC)
            w = tl.load(qw1_ptr + e * QP0 * QP1 + q0cols[:, None] * QP1 + qcols[None, :])
            h2 = _mm(h1, w, tl.zeros((BM, QC), tl.float32), False, False, PREC)
            h2 = tl.maximum(h2 + tl.load(qb1_ptr + e * QP1 + qcols)[None, :], 0.0)
            qe += tl.sum(h2 * tl.load(qwl_ptr + e * QPL + qcols)[None, :], axis=1)
    else:
        qe += tl.sum(h1 * tl.load(qwl_ptr + e * QPL + q0cols)[None, :], axis=1)
    return qe


@_jit
def _critic(obs_ptr, bidx, rmask, x, acols, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr,
            qwl_ptr, qbl_ptr, OBS: tl.constexpr, OP: tl.constexpr, OC: tl.constexpr,
            AP: tl.constexpr, E: tl.constexpr, QP0: tl.constexpr, QP1: tl.constexpr,
            QPL: tl.constexpr, QC: tl.constexpr, QDEPTH: tl.constexpr, BM: tl.constexpr,
            PREC: tl.constexpr):  # fmt: skip
    """min over the E heads of Q(s, x) for BM candidate rows, all in float32 (bf16 rounding
    of Q scrambles the pick, docs/engines.md)."""
    q0cols = tl.arange(0, QP0)
    q = tl.full((BM,), float("inf"), tl.float32)
    for e in range(E):
        h1 = _q_hidden1(obs_ptr, bidx, rmask, x, acols, q0cols, e, qwo_ptr, qwa_ptr, qb0_ptr,
                        OBS, OP, OC, AP, QP0, BM, PREC)  # fmt: skip
        qe = tl.zeros((BM,), tl.float32) + tl.load(qbl_ptr + e)
        qe = _q_head_out(h1, qe, q0cols, e, 0, qw1_ptr, qb1_ptr, qwl_ptr, QP0, QP1, QPL, QC,
                         QP1, QDEPTH, BM, PREC)  # fmt: skip
        q = tl.minimum(q, qe)
    return q


@_jit
def _critic_parts(obs_ptr, bidx, rows, rmask, x, acols, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr,
                  qb1_ptr, qwl_ptr, qbl_ptr, qp_ptr, sl, R, OBS: tl.constexpr,
                  OP: tl.constexpr, OC: tl.constexpr, AP: tl.constexpr, E: tl.constexpr,
                  QP0: tl.constexpr, QP1: tl.constexpr, QPL: tl.constexpr, QC: tl.constexpr,
                  QS: tl.constexpr, QDEPTH: tl.constexpr, BM: tl.constexpr,
                  PREC: tl.constexpr):  # fmt: skip
    """``_critic`` on the second layer's columns [sl QP1 / QS, (sl + 1) QP1 / QS) only:
    for every head e, that slice's share of Q_e (its output bias in slice 0) to
    qp[e QS + sl]. The heads stay a loop as in ``_critic``: straight-line or single-head
    variants made ptxas (sm_90) hold the kernel to 32-128 registers and spill kBs."""
    q0cols = tl.arange(0, QP0)
    for e in range(E):
        h1 = _q_hidden1(obs_ptr, bidx, rmask, x, acols, q0cols, e, qwo_ptr, qwa_ptr, qb0_ptr,
                        OBS, OP, OC, AP, QP0, BM, PREC)  # fmt: skip
        qe = tl.where((bidx * 0 + sl) == 0, tl.load(qbl_ptr + e), 0.0)
        qe = _q_head_out(h1, qe, q0cols, e, sl * (QP1 // QS), qw1_ptr, qb1_ptr, qwl_ptr, QP0,
                         QP1, QPL, QC, QP1 // QS, QDEPTH, BM, PREC)  # fmt: skip
        tl.store(qp_ptr + (e * QS + sl) * R + rows, qe, mask=rmask)


@_jit
def _candidates_out(x, obs_ptr, bidx, rows, rmask, acols, xmask, qwo_ptr, qwa_ptr, qb0_ptr,
                    qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr, x_out_ptr, q_out_ptr,
                    OBS: tl.constexpr, A: tl.constexpr, OP: tl.constexpr, OC: tl.constexpr,
                    AP: tl.constexpr, E: tl.constexpr, QP0: tl.constexpr, QP1: tl.constexpr,
                    QPL: tl.constexpr, QC: tl.constexpr, QDEPTH: tl.constexpr,
                    BM: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The final clip, then the candidates x and their Q (min over heads) to memory."""
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    tl.store(x_out_ptr + rows[:, None] * A + acols[None, :], x, mask=xmask)
    q = _critic(obs_ptr, bidx, rmask, x, acols, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr,
                qwl_ptr, qbl_ptr, OBS, OP, OC, AP, E, QP0, QP1, QPL, QC, QDEPTH, BM,
                PREC)  # fmt: skip
    tl.store(q_out_ptr + rows, q, mask=rmask)


@_jit
def _sum_parts(p_ptr, tile, rmask, R, HP: tl.constexpr, K: tl.constexpr, BM: tl.constexpr):
    """The split layout's block output: the sum of its K parts, in a fixed order."""
    h = tl.zeros((BM, HP), tl.float32)
    # Four parts' loads in flight together, then their sums in the same order as one at a
    # time: as a plain loop each part waited for its own L2 round trip before the next
    # load was issued (sm_90 SASS); fully unrolled, the first block's variant spilled.
    if K % 4 == 0:
        for g in range(K // 4):
            p = p_ptr + g * 4 * R * HP + tile
            a0 = tl.load(p, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            a1 = tl.load(p + R * HP, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            a2 = tl.load(p + 2 * R * HP, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            a3 = tl.load(p + 3 * R * HP, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            h += a0
            h += a1
            h += a2
            h += a3
    else:
        for j in tl.static_range(K):
            h += tl.load(p_ptr + j * R * HP + tile, mask=rmask[:, None], other=0.0,
                         cache_modifier=".cg")  # fmt: skip
    return h


@_jit
def decide_kernel(
    obs_ptr,  # (B, OBS) f32
    x0_ptr,  # (R, A) f32, R = B*N
    z_ptr,  # (T, R, A) f32
    coef_ptr,  # (S, 4) f32: 1/sqrt(alpha_t), eps coefficient, sigma_t*temperature (0 at t=0), -
    wo_ptr,  # (OP, HP) f32: input projection, obs part (transposed)
    bin_ptr,  # (HP,) f32
    wa_ptr,  # (AP, HP) f32: input projection, action part
    ts_ptr,  # (T, HP) f32: time shares cond(t) @ W_c
    lng_ptr,  # (NB, HP) f32
    lnb_ptr,  # (NB, HP) f32
    w1_ptr,  # (NB, HP, FP) storage dtype
    b1_ptr,  # (NB, FP) f32
    w2_ptr,  # (NB, FP, HP) storage dtype
    b2_ptr,  # (NB, HP) f32
    wout_ptr,  # (HP, AP) f32
    bout_ptr,  # (AP,) f32
    qwo_ptr,  # (E, OP, QP0) f32
    qwa_ptr,  # (E, AP, QP0) f32
    qb0_ptr,  # (E, QP0) f32
    qw1_ptr,  # (E, QP0, QP1) float32 (QDEPTH == 2)
    qb1_ptr,  # (E, QP1) f32
    qwl_ptr,  # (E, QPL) f32: last layer, QPL = QP1 if QDEPTH == 2 else QP0
    qbl_ptr,  # (E,) f32
    x_out_ptr,  # (R, A) f32
    q_out_ptr,  # (R,) f32
    ln_eps,
    R,
    N,
    OBS: tl.constexpr,
    A: tl.constexpr,
    H: tl.constexpr,
    OP: tl.constexpr,
    OC: tl.constexpr,
    AP: tl.constexpr,
    HP: tl.constexpr,
    FP: tl.constexpr,
    FC: tl.constexpr,
    NB: tl.constexpr,
    T: tl.constexpr,
    S: tl.constexpr,
    LN: tl.constexpr,
    ACT: tl.constexpr,
    CLIP: tl.constexpr,
    E: tl.constexpr,
    QP0: tl.constexpr,
    QP1: tl.constexpr,
    QPL: tl.constexpr,
    QC: tl.constexpr,
    QDEPTH: tl.constexpr,
    BM: tl.constexpr,
    LOWP: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """The whole decision but the selection, one program per BM rows ("fused" layout)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < R
    bidx = tl.where(rmask, rows // N, 0)  # the state each candidate row belongs to
    acols = tl.arange(0, AP)
    amask = acols < A
    hcols = tl.arange(0, HP)
    hmask = hcols < H
    xmask = rmask[:, None] & amask[None, :]

    # The observation's share of the input projection, once for all steps.
    obs_share = _obs_share(obs_ptr, bidx, rmask, wo_ptr, bin_ptr, hcols, OBS, OP, OC, HP, BM, PREC)
    x = tl.load(x0_ptr + rows[:, None] * A + acols[None, :], mask=xmask, other=0.0)
    wa = tl.load(wa_ptr + acols[:, None] * HP + hcols[None, :])
    wout = tl.load(wout_ptr + hcols[:, None] * AP + acols[None, :])
    bout = tl.load(bout_ptr + acols)

    for s in range(S):  # s < T: t = T-1-s with noise; s >= T: extra t = 0 steps, no noise
        t = tl.maximum(T - 1 - s, 0)
        h = obs_share + tl.load(ts_ptr + t * HP + hcols)[None, :]
        h = _mm(x, wa, h, False, False, PREC)
        for blk in range(NB):
            g = tl.load(lng_ptr + blk * HP + hcols)
            bb = tl.load(lnb_ptr + blk * HP + hcols)
            y = _block_in(h, g, bb, hmask, ln_eps, H, LN)
            acc = _block_mlp(y, tl.zeros((BM, HP), tl.float32), w1_ptr, b1_ptr, w2_ptr, blk,
                             hcols, 0, FP, HP, FP, FC, BM, ACT, LOWP, UPCAST, PREC)  # fmt: skip
            h = h + acc + tl.load(b2_ptr + blk * HP + hcols)[None, :]
        c_inv, c_eps, c_sig, z = _step_inputs(z_ptr, coef_ptr, s, rows, acols, xmask, R, A, T)
        x = _reverse_update(h, x, wout, bout, c_inv, c_eps, c_sig, z, AP, BM, ACT, CLIP, PREC)
    _candidates_out(x, obs_ptr, bidx, rows, rmask, acols, xmask, qwo_ptr, qwa_ptr, qb0_ptr,
                    qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr, x_out_ptr, q_out_ptr, OBS, A, OP, OC,
                    AP, E, QP0, QP1, QPL, QC, QDEPTH, BM, PREC)  # fmt: skip


@_jit
def _block_layer(pid, fid, obs_ptr, xprev_ptr, xcur_ptr, z_ptr, coef_ptr, pin_ptr, pout_ptr,
                 wo_ptr, bin_ptr, wa_ptr, ts_ptr, lng_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr,
                 b2_ptr, wout_ptr, bout_ptr, ln_eps, R, N, s, blk, FIRST, UPDATE,
                 OBS: tl.constexpr, A: tl.constexpr, H: tl.constexpr, OP: tl.constexpr,
                 OC: tl.constexpr, AP: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr,
                 FC: tl.constexpr, FS: tl.constexpr, K: tl.constexpr, T: tl.constexpr,
                 LN: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr, BM: tl.constexpr,
                 LOWP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr):  # fmt: skip
    """Program (pid, fid)'s share of one LN-ResNet block of reverse step s (``block_kernel``
    says what); FIRST and UPDATE are constexpr there (one variant per kind of block) and
    runtime values in ``persist_kernel``. x and the parts come from other programs, so
    they are loaded from L2 (``.cg``): an L1 line could be stale inside one launch."""
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < R
    acols = tl.arange(0, AP)
    amask = acols < A
    hcols = tl.arange(0, HP)
    hmask = hcols < H
    xmask = rmask[:, None] & amask[None, :]
    tile = rows[:, None] * HP + hcols[None, :]
    if FS == FC:
        # One chunk: issue this program's weight loads first, so that they are in flight
        # while the previous block's parts are summed and normalised.
        fcols = fid * FS + tl.arange(0, FC)
        w1 = tl.load(w1_ptr + blk * HP * FP + hcols[:, None] * FP + fcols[None, :])
        w2 = tl.load(w2_ptr + blk * FP * HP + fcols[:, None] * HP + hcols[None, :])
        b1 = tl.load(b1_ptr + blk * FP + fcols)
    elif PREFETCH:
        _prefetch_block_weights(w1_ptr, w2_ptr, blk, fid * FS, FS, HP, FP, LINE)
    # Every load that does not wait on the previous block is issued before the parts sum,
    # so that those L2 round trips overlap it instead of following it.
    g = tl.load(lng_ptr + blk * HP + hcols)
    bb = tl.load(lnb_ptr + blk * HP + hcols)
    b2 = tl.load(b2_ptr + blk * HP + hcols)
    if FIRST:
        bidx = tl.where(rmask, rows // N, 0)
        t = tl.maximum(T - 1 - s, 0)
        ts = tl.load(ts_ptr + t * HP + hcols)
        wa = tl.load(wa_ptr + acols[:, None] * HP + hcols[None, :])
        _pdl_wait(PDL)  # the weights above are in flight; x, z and the parts are not yet
        if UPDATE:
            x = tl.load(xprev_ptr + rows[:, None] * A + acols[None, :], mask=xmask, other=0.0,
                        cache_modifier=".cg")  # fmt: skip
            wout = tl.load(wout_ptr + hcols[:, None] * AP + acols[None, :])
            bout = tl.load(bout_ptr + acols)
            c_inv, c_eps, c_sig, z = _step_inputs(z_ptr, coef_ptr, s - 1, rows, acols, xmask, R,
                                                  A, T)  # fmt: skip
            hprev = _sum_parts(pin_ptr, tile, rmask, R, HP, K, BM)
            x = _reverse_update(hprev, x, wout, bout, c_inv, c_eps, c_sig, z, AP, BM, ACT, CLIP,
                                PREC)  # fmt: skip
            tl.store(
                xcur_ptr + rows[:, None] * A + acols[None, :],
                x,
                mask=xmask & ((rows[:, None] * 0 + fid) == 0),
            )
        else:
            x = tl.load(xcur_ptr + rows[:, None] * A + acols[None, :], mask=xmask, other=0.0,
                        cache_modifier=".cg")  # fmt: skip
        # the observation's share after the parts sum: hoisted above it, the first block's
        # update variant spilled registers (ptxas, sm_90)
        h = _obs_share(obs_ptr, bidx, rmask, wo_ptr, bin_ptr, hcols, OBS, OP, OC, HP, BM, PREC)
        h = _mm(x, wa, h + ts[None, :], False, False, PREC)
    else:
        _pdl_wait(PDL)
        h = _sum_parts(pin_ptr, tile, rmask, R, HP, K, BM)
    y = _block_in(h, g, bb, hmask, ln_eps, H, LN)
    lead = ((hcols * 0 + fid) == 0).to(tl.float32)  # h and fc2's bias: added by slice 0
    acc = (h + b2[None, :]) * lead[None, :]
    if FS == FC:
        mid = _mm(y, w1, tl.zeros((BM, FC), tl.float32), LOWP, UPCAST, PREC)
        acc = _mm(_act(mid + b1[None, :], ACT), w2, acc, LOWP, UPCAST, PREC)
    else:
        acc = _block_mlp(y, acc, w1_ptr, b1_ptr, w2_ptr, blk, hcols, fid * FS, FS, HP, FP, FC,
                         BM, ACT, LOWP, UPCAST, PREC)  # fmt: skip
    tl.store(pout_ptr + fid * R * HP + tile, acc, mask=rmask[:, None])


@_jit
def block_kernel(
    obs_ptr,  # (B, OBS) f32
    xprev_ptr,  # (R, A) f32: x before reverse step s - 1 (x0 for s = 1); unread if s = 0
    xcur_ptr,  # (R, A) f32: x before step s; read if s = 0, written here (f-slice 0) if s > 0
    z_ptr,  # (T, R, A) f32
    coef_ptr,  # (S, 4) f32
    pin_ptr,  # (K, R, HP) f32: the previous block's output (of step s - 1 if blk = 0), in K parts
    pout_ptr,  # (K, R, HP) f32: this block's output, part f written by the programs (., f)
    wo_ptr, bin_ptr, wa_ptr, ts_ptr, lng_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    wout_ptr, bout_ptr,
    ln_eps,
    R,
    N,
    s,
    blk,
    OBS: tl.constexpr,
    A: tl.constexpr,
    H: tl.constexpr,
    OP: tl.constexpr,
    OC: tl.constexpr,
    AP: tl.constexpr,
    HP: tl.constexpr,
    FP: tl.constexpr,
    FC: tl.constexpr,
    FS: tl.constexpr,
    K: tl.constexpr,
    T: tl.constexpr,
    FIRST: tl.constexpr,
    UPDATE: tl.constexpr,
    LN: tl.constexpr,
    ACT: tl.constexpr,
    CLIP: tl.constexpr,
    BM: tl.constexpr,
    LOWP: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    LINE: tl.constexpr,
):  # fmt: skip
    """One LN-ResNet block of reverse step s ("split" layout), the wide layer split across
    programs: program (i, f) takes rows [i BM, (i+1) BM) and wide columns [f FS, (f+1) FS),
    and writes its share of fc2(act(fc1(LN(h)))) (plus h + b2 from f = 0) as part f of
    the block's output; the next launch sums the K = FP / FS parts (in a fixed order:
    deterministic, no atomics). K programs per row tile spread one block's weights over
    as many SMs: each streams 1 / K of them.

    FIRST (blk = 0): h is the step's input projection obs_share + time_share + x @ W_a,
    computed here; with UPDATE (s > 0) x is first advanced by step s - 1 from the last
    block's output of step s - 1 (every f-slice computes the same x; slice 0 stores it).
    """
    _block_layer(tl.program_id(0), tl.program_id(1), obs_ptr, xprev_ptr, xcur_ptr, z_ptr,
                 coef_ptr, pin_ptr, pout_ptr, wo_ptr, bin_ptr, wa_ptr, ts_ptr, lng_ptr, lnb_ptr,
                 w1_ptr, b1_ptr, w2_ptr, b2_ptr, wout_ptr, bout_ptr, ln_eps, R, N, s, blk,
                 FIRST, UPDATE, OBS, A, H, OP, OC, AP, HP, FP, FC, FS, K, T, LN, ACT, CLIP, BM,
                 LOWP, UPCAST, PREC, PDL, PREFETCH, LINE)  # fmt: skip


@_jit
def _critic_item(w, obs_ptr, xprev_ptr, z_ptr, coef_ptr, pin_ptr, wout_ptr, bout_ptr,
                 qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr, x_out_ptr,
                 qp_ptr, R, N, OBS: tl.constexpr, A: tl.constexpr, OP: tl.constexpr,
                 OC: tl.constexpr, AP: tl.constexpr, HP: tl.constexpr, K: tl.constexpr,
                 T: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr,
                 E: tl.constexpr, QP0: tl.constexpr, QP1: tl.constexpr, QPL: tl.constexpr,
                 QC: tl.constexpr, QDEPTH: tl.constexpr, QS: tl.constexpr, BM: tl.constexpr,
                 QPREC: tl.constexpr):  # fmt: skip
    """Critic work item w = (row tile, slice sl) of ``finish_kernel``: the tile's last
    reverse-step update and final clip (every slice of the tile computes the same x; slice
    0 stores it), then for every head e its second layer's columns [sl QP1 / QS,
    (sl + 1) QP1 / QS) through the output weights: a part of Q_e, to qp[e QS + sl]
    (``_critic_parts``). Q_e = the sum of its QS parts (bias in part 0), summed by the
    selection in a fixed order. QS items per row tile spread the float32 critic over as
    many SMs."""
    tile = w // QS
    sl = w - tile * QS
    rows = tile * BM + tl.arange(0, BM)
    rmask = rows < R
    bidx = tl.where(rmask, rows // N, 0)
    acols = tl.arange(0, AP)
    amask = acols < A
    hcols = tl.arange(0, HP)
    xmask = rmask[:, None] & amask[None, :]
    x = tl.load(
        xprev_ptr + rows[:, None] * A + acols[None, :], mask=xmask, other=0.0, cache_modifier=".cg"
    )
    wout = tl.load(wout_ptr + hcols[:, None] * AP + acols[None, :])
    bout = tl.load(bout_ptr + acols)
    c_inv, c_eps, c_sig, z = _step_inputs(z_ptr, coef_ptr, S - 1, rows, acols, xmask, R, A, T)
    h = _sum_parts(pin_ptr, rows[:, None] * HP + hcols[None, :], rmask, R, HP, K, BM)
    x = _reverse_update(h, x, wout, bout, c_inv, c_eps, c_sig, z, AP, BM, ACT, CLIP, QPREC)
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    lead = (rows * 0 + sl) == 0
    tl.store(x_out_ptr + rows[:, None] * A + acols[None, :], x, mask=xmask & lead[:, None])
    _critic_parts(obs_ptr, bidx, rows, rmask, x, acols, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr,
                  qb1_ptr, qwl_ptr, qbl_ptr, qp_ptr, sl, R, OBS, OP, OC, AP, E, QP0, QP1, QPL,
                  QC, QS, QDEPTH, BM, QPREC)  # fmt: skip


@_jit
def _critic_items(w0, wstep, n_items, obs_ptr, xprev_ptr, z_ptr, coef_ptr, pin_ptr, wout_ptr,
                  bout_ptr, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr,
                  x_out_ptr, qp_ptr, R, N, OBS: tl.constexpr, A: tl.constexpr,
                  OP: tl.constexpr, OC: tl.constexpr, AP: tl.constexpr, HP: tl.constexpr,
                  K: tl.constexpr, T: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr,
                  CLIP: tl.constexpr, E: tl.constexpr, QP0: tl.constexpr, QP1: tl.constexpr,
                  QPL: tl.constexpr, QC: tl.constexpr, QDEPTH: tl.constexpr,
                  QS: tl.constexpr, CBM: tl.constexpr, QPREC: tl.constexpr):  # fmt: skip
    """Critic work items w0, w0 + wstep, ... below n_items (``persist_kernel``'s finish
    phase strides over its grid; ``finish_kernel`` runs one per program)."""
    for w in range(w0, n_items, wstep):
        _critic_item(w, obs_ptr, xprev_ptr, z_ptr, coef_ptr, pin_ptr, wout_ptr, bout_ptr,
                     qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr, x_out_ptr,
                     qp_ptr, R, N, OBS, A, OP, OC, AP, HP, K, T, S, ACT, CLIP, E, QP0, QP1, QPL,
                     QC, QDEPTH, QS, CBM, QPREC)  # fmt: skip


@_jit
def finish_kernel(
    obs_ptr,  # (B, OBS) f32
    xprev_ptr,  # (R, A) f32: x before the last reverse step
    z_ptr,  # (T, R, A) f32
    coef_ptr,  # (S, 4) f32
    pin_ptr,  # (K, R, HP) f32: the last block's output of the last step, in K parts
    wout_ptr, bout_ptr, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr,
    x_out_ptr,  # (R, A) f32
    qp_ptr,  # (E * QS, R) f32: parts of each head's Q
    R,
    N,
    OBS: tl.constexpr,
    A: tl.constexpr,
    OP: tl.constexpr,
    OC: tl.constexpr,
    AP: tl.constexpr,
    HP: tl.constexpr,
    K: tl.constexpr,
    T: tl.constexpr,
    S: tl.constexpr,
    ACT: tl.constexpr,
    CLIP: tl.constexpr,
    E: tl.constexpr,
    QP0: tl.constexpr,
    QP1: tl.constexpr,
    QPL: tl.constexpr,
    QC: tl.constexpr,
    QDEPTH: tl.constexpr,
    QS: tl.constexpr,
    CBM: tl.constexpr,
    QPREC: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """The "split" layout's last launch before the selection: one (row tile, second-layer
    slice) work item per program (``_critic_item``: the last reverse-step
    update, the final clip, a part of each head's Q). One H200 measurement of the layout
    before it (a program per row tile running both heads whole, V in the selection): 41 us
    here plus 18 us of selection, of a 212 us decision."""
    _pdl_wait(PDL)
    _critic_item(tl.program_id(0), obs_ptr, xprev_ptr, z_ptr, coef_ptr, pin_ptr, wout_ptr,
                 bout_ptr, qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr,
                 x_out_ptr, qp_ptr, R, N, OBS, A, OP, OC, AP, HP, K, T, S, ACT, CLIP, E, QP0,
                 QP1, QPL, QC, QDEPTH, QS, CBM, QPREC)  # fmt: skip


@_jit
def _value_part(obs_ptr, brow, bmask, sl, vlng_ptr, vlnb_ptr, vw0_ptr, vb0_ptr, vw1_ptr,
                vb1_ptr, vwl_ptr, vbl_ptr, v_eps, OBS: tl.constexpr, OP: tl.constexpr,
                OC: tl.constexpr, VP0: tl.constexpr, VSW: tl.constexpr, VP1: tl.constexpr,
                VPL: tl.constexpr, VC: tl.constexpr, VDEPTH: tl.constexpr,
                VLN: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """V(obs) for states brow: [LayerNorm over the true obs width] -> Dense, ReLU
    (-> Dense, ReLU) -> Dense 1; with two hidden layers only the second layer's columns
    [sl VSW, (sl + 1) VSW) and their share of the output (the output bias in part 0): part
    sl of V. VSW = VP1 (sl = 0) is all of V."""
    if VLN:
        ocols_all = tl.arange(0, OP)
        omask_all = ocols_all < OBS
        ob_all = tl.load(
            obs_ptr + brow[:, None] * OBS + ocols_all[None, :],
            mask=bmask[:, None] & omask_all[None, :],
            other=0.0,
        )
        mean = tl.sum(ob_all, axis=1) / OBS
        _, rstd = _row_stats(ob_all, omask_all, OBS, v_eps)
    v0cols = tl.arange(0, VP0)
    h1 = tl.zeros((BB, VP0), tl.float32) + tl.load(vb0_ptr + v0cols)[None, :]
    for k in range(OP // OC):
        ocols = k * OC + tl.arange(0, OC)
        omask = ocols < OBS
        ob = tl.load(
            obs_ptr + brow[:, None] * OBS + ocols[None, :],
            mask=bmask[:, None] & omask[None, :],
            other=0.0,
        )
        if VLN:
            g = tl.load(vlng_ptr + ocols)
            bb = tl.load(vlnb_ptr + ocols)
            ob = tl.where(omask[None, :], (ob - mean[:, None]) * rstd[:, None], 0.0)
            ob = ob * g[None, :] + bb[None, :]
        w = tl.load(vw0_ptr + ocols[:, None] * VP0 + v0cols[None, :])
        h1 = _mm(ob, w, h1, False, False, PREC)
    h1 = tl.maximum(h1, 0.0)
    v = tl.where((brow * 0 + sl) == 0, tl.load(vbl_ptr), 0.0)
    if VDEPTH == 2:
        for c in range(VSW // VC):
            vcols = sl * VSW + c * VC + tl.arange(0, VC)
            w = tl.load(vw1_ptr + v0cols[:, None] * VP1 + vcols[None, :])
            h2 = _mm(h1, w, tl.zeros((BB, VC), tl.float32), False, False, PREC)
            h2 = tl.maximum(h2 + tl.load(vb1_ptr + vcols)[None, :], 0.0)
            v += tl.sum(h2 * tl.load(vwl_ptr + vcols)[None, :], axis=1)
    else:
        v += tl.sum(h1 * tl.load(vwl_ptr + v0cols)[None, :], axis=1)
    return v


@_jit
def _select_tile(pid, obs_ptr, u_ptr, x_ptr, q_ptr, vp_ptr, vlng_ptr, vlnb_ptr, vw0_ptr,
                 vb0_ptr, vw1_ptr, vb1_ptr, vwl_ptr, vbl_ptr, out_ptr, tau, alpha, v_eps, B,
                 N, NP: tl.constexpr, OBS: tl.constexpr, OP: tl.constexpr, OC: tl.constexpr,
                 A: tl.constexpr, AP: tl.constexpr, VP0: tl.constexpr, VP1: tl.constexpr,
                 VPL: tl.constexpr, VC: tl.constexpr, VDEPTH: tl.constexpr, VLN: tl.constexpr,
                 MODE: tl.constexpr, VL: tl.constexpr, QE: tl.constexpr, QS: tl.constexpr,
                 VS: tl.constexpr, VLOAD: tl.constexpr, BB: tl.constexpr, LOWP: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """States [pid BB, (pid+1) BB): V(obs), the pick among their N candidates, the packed
    output rows (``select_kernel``). x and Q come from other programs: L2 loads.

    q_ptr: (QE * QS, B * N) parts of each head's Q: Q = min over heads of the sum of the
    head's QS parts (in order); QE = QS = 1: Q itself. V(obs) is the sum of its VS parts
    (in order; VS = 1: V itself): loaded from vp_ptr (VS, B) with VLOAD (``value_kernel``
    wrote them), else computed here."""
    brow = pid * BB + tl.arange(0, BB)
    bmask = brow < B
    if VLOAD:
        v = tl.load(vp_ptr + brow, mask=bmask, other=0.0, cache_modifier=".cg")
        for j in tl.static_range(1, VS):
            v += tl.load(vp_ptr + j * B + brow, mask=bmask, other=0.0, cache_modifier=".cg")
    else:
        v = _value_part(obs_ptr, brow, bmask, 0, vlng_ptr, vlnb_ptr, vw0_ptr, vb0_ptr, vw1_ptr,
                        vb1_ptr, vwl_ptr, vbl_ptr, v_eps, OBS, OP, OC, VP0, VP1 // VS, VP1, VPL,
                        VC, VDEPTH, VLN, BB, PREC)  # fmt: skip
        for j in tl.static_range(1, VS):
            v += _value_part(obs_ptr, brow, bmask, j, vlng_ptr, vlnb_ptr, vw0_ptr, vb0_ptr,
                             vw1_ptr, vb1_ptr, vwl_ptr, vbl_ptr, v_eps, OBS, OP, OC, VP0,
                             VP1 // VS, VP1, VPL, VC, VDEPTH, VLN, BB, PREC)  # fmt: skip

    # Selection over the N candidates of each state.
    ncols = tl.arange(0, NP)
    nmask = ncols < N
    valid = bmask[:, None] & nmask[None, :]
    qoff = brow[:, None] * N + ncols[None, :]
    RN = B * N
    q = tl.full((BB, NP), float("inf"), tl.float32)
    for e in tl.static_range(QE):
        qe = tl.load(q_ptr + e * QS * RN + qoff, mask=valid, other=0.0, cache_modifier=".cg")
        for j in tl.static_range(1, QS):
            qe += tl.load(q_ptr + (e * QS + j) * RN + qoff, mask=valid, other=0.0,
                          cache_modifier=".cg")  # fmt: skip
        q = tl.minimum(q, qe)
    qmax = tl.max(tl.where(nmask[None, :], q, float("-inf")), axis=1)
    qmin = tl.min(tl.where(nmask[None, :], q, float("inf")), axis=1)
    if MODE == 0:
        idx = tl.argmax(tl.where(nmask[None, :], q, float("-inf")), axis=1)
    else:
        # pi_imp: inverse-CDF draw with Theorem 4.1 weights w(Q - V) (critic.implicit_weights)
        uq = q - v[:, None]
        if VL == 0:
            w = tl.where(uq > 0, tau, 1.0 - tau)
        elif VL == 1:
            w = tl.where(uq > 0, tau, 1.0 - tau) / tl.maximum(tl.abs(uq), 1e-6)
        else:
            y = alpha * uq
            small_y = tl.abs(y) < 1e-2  # expm1 by its Taylor series where exp(y) - 1 cancels
            em1 = tl.where(
                small_y,
                y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0)))),
                tl.exp(y) - 1.0,
            )
            small_u = tl.abs(uq) < 1e-6
            safe_u = tl.where(small_u, 1.0, uq)
            w = tl.where(small_u, alpha * alpha, alpha * em1 / safe_u)
        w = tl.where(nmask[None, :], w, 0.0)
        cdf = tl.cumsum(w, axis=1)
        total = tl.sum(tl.where(ncols[None, :] == N - 1, cdf, 0.0), axis=1)
        thr = tl.load(u_ptr + brow, mask=bmask, other=0.0) * total
        below = (cdf < thr[:, None]) & nmask[None, :]
        idx = tl.minimum(tl.sum(below.to(tl.int32), axis=1), N - 1)
    idx = idx.to(tl.int32)
    chosen_q = tl.sum(tl.where(ncols[None, :] == idx[:, None], q, 0.0), axis=1)
    acols = tl.arange(0, AP)
    amask = acols < A
    xrow = brow * N + idx
    action = tl.load(
        x_ptr + xrow[:, None] * A + acols[None, :],
        mask=bmask[:, None] & amask[None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    orow = out_ptr + brow * (A + 4)
    tl.store(orow[:, None] + acols[None, :], action, mask=bmask[:, None] & amask[None, :])
    tl.store(orow + A, chosen_q, mask=bmask)
    tl.store(orow + A + 1, v, mask=bmask)
    tl.store(orow + A + 2, qmax - qmin, mask=bmask)
    tl.store(orow + A + 3, idx.to(tl.float32), mask=bmask)


@_jit
def select_kernel(
    obs_ptr,  # (B, OBS) f32
    u_ptr,  # (B,) f32
    x_ptr,  # (R, A) f32: final candidates
    q_ptr,  # (QE * QS, R) f32: parts of each head's Q (QE = QS = 1: Q, the min over heads)
    vp_ptr,  # (VS, B) f32: parts of V(obs) (VS > 0), else unread
    vlng_ptr,  # (OP,) f32: V's input LayerNorm (VLN)
    vlnb_ptr,  # (OP,) f32
    vw0_ptr,  # (OP, VP0) f32
    vb0_ptr,  # (VP0,) f32
    vw1_ptr,  # (VP0, VP1) float32 (VDEPTH == 2)
    vb1_ptr,  # (VP1,) f32
    vwl_ptr,  # (VPL,) f32
    vbl_ptr,  # (1,) f32
    out_ptr,  # (B, A + 4) f32: action | chosen Q | V | spread | index
    tau,
    alpha,
    v_eps,
    B,
    N,
    NP: tl.constexpr,
    OBS: tl.constexpr,
    OP: tl.constexpr,
    OC: tl.constexpr,
    A: tl.constexpr,
    AP: tl.constexpr,
    VP0: tl.constexpr,
    VP1: tl.constexpr,
    VPL: tl.constexpr,
    VC: tl.constexpr,
    VDEPTH: tl.constexpr,
    VLN: tl.constexpr,
    MODE: tl.constexpr,
    VL: tl.constexpr,
    QE: tl.constexpr,
    QS: tl.constexpr,
    VS: tl.constexpr,
    VLOAD: tl.constexpr,
    BB: tl.constexpr,
    LOWP: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    _select_tile(tl.program_id(0), obs_ptr, u_ptr, x_ptr, q_ptr, vp_ptr, vlng_ptr, vlnb_ptr,
                 vw0_ptr, vb0_ptr, vw1_ptr, vb1_ptr, vwl_ptr, vbl_ptr, out_ptr, tau, alpha,
                 v_eps, B, N, NP, OBS, OP, OC, A, AP, VP0, VP1, VPL, VC, VDEPTH, VLN, MODE, VL,
                 QE, QS, VS, VLOAD, BB, LOWP, UPCAST, PREC)  # fmt: skip


@_jit
def value_kernel(
    obs_ptr,  # (B, OBS) f32
    vlng_ptr, vlnb_ptr, vw0_ptr, vb0_ptr, vw1_ptr, vb1_ptr, vwl_ptr, vbl_ptr,
    vp_ptr,  # (VS, B) f32: parts of V(obs), out
    v_eps,
    B,
    OBS: tl.constexpr,
    OP: tl.constexpr,
    OC: tl.constexpr,
    VP0: tl.constexpr,
    VP1: tl.constexpr,
    VPL: tl.constexpr,
    VC: tl.constexpr,
    VDEPTH: tl.constexpr,
    VLN: tl.constexpr,
    VS: tl.constexpr,
    BB: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """The split layout's V(obs), program (i, sl): part sl (``_value_part``) for states
    [i BB, (i+1) BB). It depends on the observation alone, so on a GPU it runs on a branch
    of the graph beside the reverse steps, off the decision's critical path."""
    brow = tl.program_id(0) * BB + tl.arange(0, BB)
    bmask = brow < B
    sl = tl.program_id(1)
    v = _value_part(obs_ptr, brow, bmask, sl, vlng_ptr, vlnb_ptr, vw0_ptr, vb0_ptr, vw1_ptr,
                    vb1_ptr, vwl_ptr, vbl_ptr, v_eps, OBS, OP, OC, VP0, VP1 // VS, VP1, VPL,
                    VC, VDEPTH, VLN, BB, PREC)  # fmt: skip
    tl.store(vp_ptr + sl * B + brow, v, mask=bmask)


@_jit
def _grid_sync(sync_ptr, target, err_ptr, MAX_SPIN: tl.constexpr):
    """Wait until ``target`` arrivals are counted at ``sync_ptr`` (each program adds one per
    barrier, so barrier j of P programs waits for j * P). Every program of the grid must be
    resident at once (``persist_kernel``'s caller checks grid <= SMs). The CTA barrier
    orders this program's stores before its release; the acquire orders the loads after.
    After MAX_SPIN polls it gives up and sets ``err_ptr``: a wrong answer flagged to the
    host, not a hung GPU."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < MAX_SPIN):
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.atomic_max(err_ptr, 1)
    tl.debug_barrier()


@_jit
def persist_kernel(
    obs_ptr,  # (B, OBS) f32
    xs_ptr,  # (S, R, A) f32: x before each reverse step; [0] = x_init, set by the caller
    z_ptr,  # (T, R, A) f32
    coef_ptr,  # (S, 4) f32
    hbuf_ptr,  # (2, K, R, HP) f32: block outputs in K parts, ping-pong by layer parity
    wo_ptr, bin_ptr, wa_ptr, ts_ptr, lng_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    wout_ptr, bout_ptr,
    qwo_ptr, qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr,
    x_out_ptr,  # (R, A) f32
    qp_ptr,  # (E * QS, R) f32: parts of each head's Q
    u_ptr,  # (B,) f32
    vlng_ptr, vlnb_ptr, vw0_ptr, vb0_ptr, vw1_ptr, vb1_ptr, vwl_ptr, vbl_ptr,
    out_ptr,  # (B, A + 4) f32
    sync_ptr,  # (1,) i32: barrier arrivals, zeroed by the caller before each launch
    err_ptr,  # (1,) i32: set to 1 if a barrier timed out
    ln_eps, tau, alpha, v_eps,
    R, N, B,
    L0,  # layers [L0, L1) of S * NB (layer = step * NB + block)
    L1,
    q_items,  # the critic's work items (``finish_kernel``)
    OBS: tl.constexpr, A: tl.constexpr, H: tl.constexpr, OP: tl.constexpr,
    OC: tl.constexpr, AP: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr,
    FC: tl.constexpr, FS: tl.constexpr, K: tl.constexpr, NB: tl.constexpr, T: tl.constexpr,
    S: tl.constexpr,
    LN: tl.constexpr, ACT: tl.constexpr, CLIP: tl.constexpr,
    E: tl.constexpr, QP0: tl.constexpr, QP1: tl.constexpr, QPL: tl.constexpr,
    QC: tl.constexpr, QDEPTH: tl.constexpr, QS: tl.constexpr,
    NP: tl.constexpr, VP0: tl.constexpr, VP1: tl.constexpr, VPL: tl.constexpr,
    VC: tl.constexpr, VDEPTH: tl.constexpr, VLN: tl.constexpr, VS: tl.constexpr,
    MODE: tl.constexpr, VL: tl.constexpr, BB: tl.constexpr, CBM: tl.constexpr,
    QPREC: tl.constexpr,
    BM: tl.constexpr, LOWP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    DO_FINISH: tl.constexpr,
    DO_SELECT: tl.constexpr,
    PERSIST: tl.constexpr,
    MAX_SPIN: tl.constexpr,
):  # fmt: skip
    """The "persistent" layout: the split layout's launches as phases of ONE launch.

    Program (i, f) of a (row tiles) x (K slices) grid runs, for every layer (reverse step s,
    block b) in [L0, L1), what ``block_kernel`` program (i, f) does, then waits at a grid
    barrier for every other program's part; then the last update and the critic
    (``finish_kernel``'s work items, strided over the grid), a barrier, and the selection
    with V (``select_kernel``, the first ceil(B / BB) programs). With PERSIST (the GPU) one launch covers everything;
    Triton's interpreter runs programs one after another, so a barrier would never open:
    there the caller launches each phase alone (PERSIST off, barriers compiled out) and the
    same code computes the same values in the same order.
    """
    pid = tl.program_id(0)
    fid = tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    syncs = 0
    for layer in range(L0, L1):
        s = layer // NB
        blk = layer - s * NB
        pin = hbuf_ptr + ((layer + 1) % 2) * (K * R * HP)  # layer - 1's output
        pout = hbuf_ptr + (layer % 2) * (K * R * HP)
        xprev = xs_ptr + tl.maximum(s - 1, 0) * (R * A)
        xcur = xs_ptr + s * (R * A)
        _block_layer(pid, fid, obs_ptr, xprev, xcur, z_ptr, coef_ptr, pin, pout, wo_ptr,
                     bin_ptr, wa_ptr, ts_ptr, lng_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     wout_ptr, bout_ptr, ln_eps, R, N, s, blk, blk == 0, (blk == 0) & (s > 0),
                     OBS, A, H, OP, OC, AP, HP, FP, FC, FS, K, T, LN, ACT, CLIP, BM, LOWP,
                     UPCAST, PREC, False, False, 1)  # fmt: skip
        if PERSIST:
            syncs += 1
            _grid_sync(sync_ptr, syncs * nprog, err_ptr, MAX_SPIN)
    if DO_FINISH:
        # the split layout's finish_kernel items, strided over the whole grid
        last = S * NB - 1
        _critic_items(pid * tl.num_programs(1) + fid, nprog, q_items, obs_ptr,
                      xs_ptr + (S - 1) * (R * A), z_ptr, coef_ptr,
                      hbuf_ptr + (last % 2) * (K * R * HP), wout_ptr, bout_ptr, qwo_ptr,
                      qwa_ptr, qb0_ptr, qw1_ptr, qb1_ptr, qwl_ptr, qbl_ptr, x_out_ptr, qp_ptr,
                      R, N, OBS, A, OP, OC, AP, HP, K, T, S, ACT, CLIP, E, QP0, QP1, QPL, QC,
                      QDEPTH, QS, CBM, QPREC)  # fmt: skip
        if PERSIST:
            syncs += 1
            _grid_sync(sync_ptr, syncs * nprog, err_ptr, MAX_SPIN)
    if DO_SELECT:
        tile = pid * tl.num_programs(1) + fid
        if tile * BB < B:
            _select_tile(tile, obs_ptr, u_ptr, x_out_ptr, qp_ptr, obs_ptr, vlng_ptr, vlnb_ptr,
                         vw0_ptr, vb0_ptr, vw1_ptr, vb1_ptr, vwl_ptr, vbl_ptr, out_ptr, tau,
                         alpha, v_eps, B, N, NP, OBS, OP, OC, A, AP, VP0, VP1, VPL, VC, VDEPTH,
                         VLN, MODE, VL, E, QS, VS, False, BB, LOWP, UPCAST, PREC)  # fmt: skip
