"""slmkit's quantized weight layout, quantizers from float, and the pure-PyTorch reference matmul.

One layout serves int8 and int4, our own quantizers and GGUF blocks alike:

    w[n, k] = scale[n, g] * (u[n, k] - zero) + min[n, g]        g = k // group

- `u` is an unsigned code of 4, 5, 6 or 8 bits; `zero` a per-tensor integer (8 for Q4_0, 16 for
  Q5_0, 32 for Q6_K, 128 for symmetric int8, 0 for asymmetric schemes that carry `min`).
- Rows come in tiles of 16 and K in sets of 4, so that one 64-byte vector of codes is 16 rows x 4
  codes: what one AVX512-VNNI `vpdpbusd` consumes. int8: one set per 64 bytes. int4: two sets per
  64 bytes (low nibbles: k0..k0+3, high nibbles: k0+4..k0+7). 6 and 5 bits (GGUF's Q6_K, Q5_K,
  Q5_0, Q5_1 at their own size): the low 4 bits as int4 in 2 (6-bit) or 4 (5-bit) vectors, then one
  vector with the remaining bits of all their sets, set i's at bits (b - 4) * i of each byte
  (`CHUNK`: K per such run of vectors). N and K are padded with zeros to the tile and group.
- scales / mins: [tiles, groups, 16] in float16 (where exact, e.g. Q4_0, Q8_0, our quantizers) or
  float32, or two-level as the K-quants store them: small integers per group (uint8, or int8 for
  Q6_K's scales) times a float super-scale (super-min) per 256 inputs, `super_scales` /
  `super_mins` [tiles, groups // per_super, 16]: float16 for GGUF's K-quants (the file's own d and
  -dmin, 2 bytes a row per super-block), float32 for slmkit's quantizer; the product is formed in
  float32 (exact). With mins the four are paired views of two buffers (`two_level_parts`).

The reference matmul (`qmatmul_reference`) quantizes activations to int8 exactly as the compiled
kernel does (per group, or per super-block under two-level scales; scale = absmax / 127, round half
to even), takes exact integer dot products per group, and combines them as the kernel does (integer
sums per super-block under two-level scales, then float32): kernel and fallback agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 16
GROUPS = (16, 32, 64, 128, 256)
BITS = (4, 5, 6, 8)
# K per run of 64-byte code vectors, and vectors per run: int8 one set of 4; int4 two sets in one
# vector; 6 bits 4 sets in 2 nibble vectors + 1 of high bits; 5 bits 8 sets in 4 + 1.
CHUNK = {8: 4, 4: 8, 6: 16, 5: 32}
_VECTORS = {8: 1, 4: 1, 6: 3, 5: 5}
# Two-level super-scales: float32 (slmkit's quantizer) or float16 (GGUF's K-quants, as the file has them).
SUPER_DTYPES = (torch.float32, torch.float16)


def code_vectors(bits: int, kp: int) -> int:
    """64-byte code vectors per row tile for kp inputs (kp a multiple of CHUNK[bits])."""
    return kp // CHUNK[bits] * _VECTORS[bits]


@dataclass
class QuantWeight:
    bits: int                    # 4, 5, 6 or 8
    n: int                       # out features
    k: int                       # in features
    group: int
    zero: int
    qweight: torch.Tensor        # uint8 [tiles, code_vectors(bits, kp), 64]
    scales: torch.Tensor         # float16 / float32 / uint8 / int8 [tiles, kp // group, 16]
    mins: torch.Tensor | None    # same shape (float16 / float32 / uint8), or None
    super_scales: torch.Tensor | None = None  # float32 / float16 [tiles, groups // per_super, 16], integer scales
    super_mins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        ss, sm = self.super_scales, self.super_mins
        if ss is not None and (ss.dtype not in SUPER_DTYPES or (sm is not None and sm.dtype != ss.dtype)):
            raise ValueError(f"super-scales must be float32 or float16 (super-mins the same), got {ss.dtype}"
                             + ("" if sm is None else f" and {sm.dtype}"))
        if self.super_scales is not None and self.activation_group > 256:  # the kernel's int32 bound
            raise ValueError(f"two-level scales of {self.activation_group} inputs per super-scale "
                             f"(group {self.group} x {self.per_super}): at most 256")
        # two-level scales with mins are kept paired (see two_level_parts): views of two buffers
        if self.super_scales is not None and self.mins is not None and not self.paired:
            sc, mn, ss, sm = two_level_parts(self.scales.shape[0], self.scales.shape[1],
                                             self.super_scales.shape[1], self.scales.dtype, True,
                                             self.super_scales.dtype)
            sc.copy_(self.scales)
            mn.copy_(self.mins)  # type: ignore[union-attr]
            ss.copy_(self.super_scales)
            sm.copy_(self.super_mins)  # type: ignore[union-attr,arg-type]
            self.scales, self.mins, self.super_scales, self.super_mins = sc, mn, ss, sm

    @property
    def paired(self) -> bool:
        """Whether two-level scales and mins lie side by side as two_level_parts makes them."""
        sc, mn, ss, sm = self.scales, self.mins, self.super_scales, self.super_mins
        if mn is None or ss is None or sm is None:
            return False
        rec, sup = (sc.shape[1] * 32, 32, 1), (ss.shape[1] * 32, 32, 1)
        return (mn.dtype == torch.uint8 and sc.stride() == rec and mn.stride() == rec and ss.stride() == sup
                and sm.stride() == sup and mn.data_ptr() == sc.data_ptr() + 16 and sm.dtype == ss.dtype
                and sm.data_ptr() == ss.data_ptr() + 16 * ss.element_size() and mn.shape == sc.shape
                and sm.shape == ss.shape)

    @property
    def scale_kind(self) -> int:
        """The kernel's code: 0 float32, 1 float16, 2 uint8 x super, 3 int8 x super; plus 4 where
        two-level scales and mins are paired, plus 8 where the super-scales are float16."""
        kind = {torch.float32: 0, torch.float16: 1, torch.uint8: 2, torch.int8: 3}[self.scales.dtype]
        if kind < 2 or self.super_scales is None:
            return kind
        return kind + (4 if self.paired else 0) + (8 if self.super_scales.dtype == torch.float16 else 0)

    @property
    def activation_group(self) -> int:
        """Inputs per activation scale in the matmul: the group, or the super-block for two-level scales."""
        return self.group if self.super_scales is None else self.group * self.per_super

    @property
    def activation_shift(self) -> int:
        """How many powers of two finer than its block's a group's activation scale may be (two-level scales)."""
        return 0 if self.super_scales is None else ACT_SHIFT_MAX[self.bits]

    @property
    def per_super(self) -> int:
        return 1 if self.super_scales is None else self.scales.shape[1] // self.super_scales.shape[1]

    def effective(self, t0: int = 0, t1: int | None = None, *,
                  tiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 scales and mins [tiles, groups, 16] of tiles t0:t1, or of the tiles indexed
        (super x sub in float32)."""
        at: slice | torch.Tensor = slice(t0, t1) if tiles is None else tiles
        sc = self.scales[at].float()
        mn = None if self.mins is None else self.mins[at].float()
        if self.super_scales is not None:
            sc = sc * self.super_scales[at].float().repeat_interleave(self.per_super, dim=1)
            if mn is not None:
                assert self.super_mins is not None
                mn = mn * self.super_mins[at].float().repeat_interleave(self.per_super, dim=1)
        return sc, mn

    @property
    def kp(self) -> int:
        return self.scales.shape[1] * self.group

    @property
    def tiles(self) -> int:
        return self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        parts = (self.qweight, self.scales, self.mins, self.super_scales, self.super_mins)
        return sum(t.nbytes for t in parts if t is not None)

    def scheme(self) -> str:
        return f"int{self.bits}" + ("" if self.mins is None else "-asym")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        for name in ("mins", "super_scales", "super_mins"):
            if getattr(self, name) is not None:
                out[f"{prefix}.{name}"] = getattr(self, name)
        return out


def two_level_parts(tiles: int, groups: int, supers: int, dtype: torch.dtype, mins: bool,
                    super_dtype: torch.dtype = torch.float32,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Empty scales [tiles, groups, 16] (uint8 / int8), mins (uint8, same shape), super_scales and
    super_mins [tiles, supers, 16] (super_dtype: float32, or float16 for GGUF's K-quants) of a
    two-level weight. With mins they are paired: a group's 16 scales and 16 mins side by side (32
    bytes), a super-block's 16 super-scales and 16 super-mins side by side, as views of two buffers,
    so the kernel reads a tile's metadata as two streams instead of four (measured: +14% decode GB/s
    on Q4_K, 2 threads)."""
    if not mins:
        return (torch.empty(tiles, groups, TILE, dtype=dtype), None,
                torch.empty(tiles, supers, TILE, dtype=super_dtype), None)
    rec = torch.empty(tiles, groups, 2 * TILE, dtype=torch.uint8)
    sup = torch.empty(tiles, supers, 2 * TILE, dtype=super_dtype)
    sc = rec[:, :, :TILE] if dtype == torch.uint8 else rec.view(dtype)[:, :, :TILE]
    return sc, rec[:, :, TILE:], sup[:, :, :TILE], sup[:, :, TILE:]


def padded(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------------- layout
def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """[np, kp] uint8 codes (np % 16 == 0, kp % CHUNK[bits] == 0) -> the tiled layout. Works on int32
    views (4 codes of a row = one int32 = one lane of a 64-byte vector): 4x fewer elements to move."""
    np_, kp = u.shape
    w = u.contiguous().view(torch.int32).view(np_ // TILE, TILE, kp // 4).transpose(1, 2)  # [tiles, kp/4, 16]
    tiles = np_ // TILE
    if bits == 8:
        return w.contiguous().view(torch.uint8).view(tiles, kp // 4, 64)
    if bits == 4:  # nibble values < 16: shifting the int32 by 4 moves every byte's code into its high nibble
        return (w[:, 0::2] | (w[:, 1::2] << 4)).contiguous().view(torch.uint8).view(tiles, kp // 8, 64)
    sets = CHUNK[bits] // 4
    w = w.reshape(tiles, kp // CHUNK[bits], sets, TILE)
    lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F  # per byte: the low 4 bits and the rest (< 4)
    vec = lo[:, :, 0::2] | (lo[:, :, 1::2] << 4)
    top = hi[:, :, 0]
    for i in range(1, sets):
        top = top | (hi[:, :, i] << ((bits - 4) * i))
    out = torch.cat([vec, top[:, :, None]], dim=2)
    return out.contiguous().view(torch.uint8).view(tiles, code_vectors(bits, kp), 64)


def unpack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The tiled layout -> [np, kp] uint8 codes."""
    tiles = q.shape[0]  # every 64-byte vector holds row r's 4 bytes at 4r: rows first, then their codes
    return unpack_rows(q.reshape(tiles, -1, TILE, 4).permute(0, 2, 1, 3).reshape(tiles * TILE, -1, 4), bits)


def unpack_rows(g: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows' codes from their bytes: g [R, vectors, 4], each row's 4 bytes of every 64-byte vector of its
    tile -> [R, kp] uint8 codes."""
    rows = g.shape[0]
    if bits in (5, 6):  # nibble vectors, then one of the top bits of all their sets
        runs, nv = g.shape[1] // _VECTORS[bits], _VECTORS[bits] - 1
        w = g.reshape(rows, runs, nv + 1, 4)
        nib = torch.stack((w[:, :, :nv] & 0x0F, w[:, :, :nv] >> 4), dim=3).reshape(rows, runs, 2 * nv, 4)
        mask = (1 << (bits - 4)) - 1
        top = torch.stack([(w[:, :, nv] >> ((bits - 4) * i)) & mask for i in range(2 * nv)], dim=2)
        g = nib | (top << 4)                                              # [R, runs, sets, 4]
    elif bits == 4:
        g = torch.stack((g & 0x0F, g >> 4), dim=2)                        # [R, kp / 8, 2, 4]
    return g.reshape(rows, -1)


def _tile_groups(x: torch.Tensor) -> torch.Tensor:
    """[np, groups] -> [tiles, groups, 16]."""
    return x.view(-1, TILE, x.shape[1]).transpose(1, 2).contiguous()


def _untile_groups(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(-1, x.shape[1])


def from_codes(u: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, *, bits: int, group: int,
               zero: int, n: int, k: int) -> QuantWeight:
    """Build a QuantWeight from row-major codes [n, k] and per-group scales / mins [n, k // group]."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit codes are not one of {BITS}")
    if group not in GROUPS or group % CHUNK[bits]:
        raise ValueError(f"group size {group} is not one of {GROUPS} (a multiple of {CHUNK[bits]} for {bits} bits)")
    np_, kp = padded(n, TILE), padded(k, group)
    uu = torch.zeros(np_, kp, dtype=torch.uint8)
    uu[:n, :k] = u
    if zero and (n < np_ or k < kp):
        uu[:n, k:] = zero  # padding must dequantize to 0 (its activations are 0 anyway)
    sp = torch.zeros(np_, kp // group, dtype=scales.dtype)
    sp[:n, : scales.shape[1]] = scales
    mp = None
    if mins is not None:
        mp = torch.zeros(np_, kp // group, dtype=mins.dtype)
        mp[:n, : mins.shape[1]] = mins
        mp = _tile_groups(mp)
    return QuantWeight(bits, n, k, group, zero, pack_codes(uu, bits), _tile_groups(sp), mp)


def dequantize_weight(qw: QuantWeight, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
    """The float weight [n, k] (or a row range of it: rows must start and stop on tile borders
    unless it is the end)."""
    t0, t1 = 0, qw.tiles
    if rows is not None:
        t0, t1 = rows.start // TILE, padded(rows.stop, TILE) // TILE
    sc, mn = qw.effective(t0, t1)
    w = _float_rows(qw, unpack_codes(qw.qweight[t0:t1], qw.bits), _untile_groups(sc),
                    None if mn is None else _untile_groups(mn))
    r0 = t0 * TILE
    r1 = qw.n if rows is None else rows.stop
    return w[: r1 - r0, : qw.k].to(dtype)


def _float_rows(qw: QuantWeight, u: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor | None) -> torch.Tensor:
    """Rows' float weights from their codes u [R, kp] and float32 scales / mins [R, groups]."""
    s = sc.repeat_interleave(qw.group, dim=1)
    w = (u.float() - qw.zero) * s if qw.zero else u.float() * s
    return w if mn is None else w + mn.repeat_interleave(qw.group, dim=1)


def dequantize_rows(qw: QuantWeight, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ids (any order, repeats allowed) of the float weight, [len(ids), k]: dequantize_weight(qw)[ids]
    bit for bit (the same elementwise steps), with only the ids' rows unpacked and turned to floats
    (an embedding lookup of a prompt: a few rows of many tiles)."""
    if not ids.numel():
        return torch.empty(0, qw.k, dtype=dtype)
    tile = torch.div(ids, TILE, rounding_mode="floor")
    tiles, inv = torch.unique(tile, return_inverse=True)
    row = ids % TILE
    pick = inv * TILE + row
    u = unpack_rows(qw.qweight.reshape(qw.tiles, -1, TILE, 4)[tile, :, row], qw.bits)
    sc, mn = qw.effective(tiles=tiles)
    w = _float_rows(qw, u, _untile_groups(sc)[pick], None if mn is None else _untile_groups(mn)[pick])
    return w[:, : qw.k].to(dtype)


# ------------------------------------------------------------------------------ quantizers
def _int8_codes(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    s = (g.abs().amax(dim=-1) / 127).to(torch.float16)
    sf = s.float()
    inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
    return (torch.round(g * inv[..., None]).clamp_(-127, 127) + 128).to(torch.uint8), s, None


def _int4_fit(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Codes for range [lo, hi], then the least-squares scale and min for those codes (float16)."""
    s = ((hi - lo) / 15).clamp_min(1e-12)
    u = torch.round((g - lo[..., None]) / s[..., None]).clamp_(0, 15)
    # refit: minimise sum (s * u + m - w)^2 over s, m for the chosen codes
    n = g.shape[-1]
    su, sw = u.sum(-1), g.sum(-1)
    suu, suw = (u * u).sum(-1), (u * g).sum(-1)
    det = n * suu - su * su
    ok = det > 0
    s2 = torch.where(ok, (n * suw - su * sw) / torch.where(ok, det, 1), s)
    m2 = torch.where(ok, (sw - s2 * su) / n, lo)
    return s2.to(torch.float16), m2.to(torch.float16)


def _int4_codes(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 with a search: the range [min, max] shrunk by a few clip ratios, each fit by
    least squares; per group the candidate with the smallest squared error wins (round-to-nearest
    over the full range loses ~1.5x more perplexity on Gemma 3 270M: benchmarks/quality.py)."""
    lo0, hi0 = g.amin(dim=-1), g.amax(dim=-1)
    best = None
    for clip in (1.0, 0.95, 0.9, 0.85, 0.8):
        s, m = _int4_fit(g, lo0 * clip, hi0 * clip)
        sf, mf = s.float(), m.float()
        inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
        u = torch.round((g - mf[..., None]) * inv[..., None]).clamp_(0, 15)
        err = ((u * sf[..., None] + mf[..., None]) - g).square().sum(-1)
        if best is None:
            best = [err, u, s, m]
        else:
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better[..., None], u, best[1])
            best[2] = torch.where(better, s, best[2])
            best[3] = torch.where(better, m, best[3])
    assert best is not None  # the clip loop ran
    return best[1].to(torch.uint8), best[2], best[3]


def quantize(w: torch.Tensor, bits: int, group: int, *, rows_per_chunk: int = 256) -> QuantWeight:
    """Round-to-nearest weight-only quantization of a float [n, k] weight, per group of K:
    int8: symmetric, scale = absmax / 127 (float16), codes q + 128;
    int4: asymmetric, w ~ scale * u + min with u in 0..15 (scale and min in float16, searched).
    Works through row chunks (fast in cache, bounded temporaries)."""
    n, k = w.shape
    ng = padded(k, group) // group
    u = torch.empty(n, ng * group, dtype=torch.uint8)
    s = torch.empty(n, ng, dtype=torch.float16)
    m = torch.empty(n, ng, dtype=torch.float16) if bits == 4 else None
    codes = _int8_codes if bits == 8 else _int4_codes
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        chunk = w[r0:r1].float()
        if k % group:  # pad the last group with a copy of its first value: the range stays the same
            fill = chunk[:, k - k % group: k - k % group + 1].expand(-1, ng * group - k)
            chunk = torch.cat([chunk, fill], dim=1)
        cu, cs, cm = codes(chunk.view(r1 - r0, ng, group))
        u[r0:r1], s[r0:r1] = cu.view(r1 - r0, -1), cs
        if m is not None and cm is not None:  # int4: both (the int8 codes have no min)
            m[r0:r1] = cm
    return from_codes(u[:, :k], s, m, bits=bits, group=group, zero=128 if bits == 8 else 0, n=n, k=k)


# ------------------------------------------------------------------------ reference matmul
# Two-level scales: how many powers of two finer than its super-block's a group's activation scale may
# be, per code width (kernels/qgemm.cpp act_shift_max: every super-block sum stays exact in int32).
ACT_SHIFT_MAX = {4: 3, 5: 3, 6: 2, 8: 0}


def quantize_activations(x: torch.Tensor, group: int, kp: int, scale_group: int | None = None,
                          shift_max: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> int8 codes [M, kp] as float32, scales [M, kp // scale_group] (absmax / 127 per
    scale_group inputs, default group), code sums [M, kp // group] and what each group's integer
    sums count (1, or 2^(E - e) below) [M, kp // group]. With shift_max E > 0 a group takes the finer
    scale (its block's) / 2^e, e <= E the largest with its absmax x 2^e <= the block's: its codes are
    round(x * (2^e / scale)), its sum is returned times 2^(E - e), and the scales returned are the
    blocks' / 2^E (qgemm.cpp quant_row): small groups keep their precision, sums stay exact."""
    sg = scale_group or group
    xf = x.float()
    m = xf.shape[0]
    if kp != xf.shape[1]:
        xf = torch.nn.functional.pad(xf, (0, kp - xf.shape[1]))
    g = xf.view(m, kp // sg, sg // group, group)
    gmax = g.abs().amax(dim=-1)                                          # [M, blocks, groups a block]
    amax = gmax.amax(dim=-1)
    d = amax / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    e = torch.zeros_like(gmax, dtype=torch.int32)
    for cand in range(1, shift_max + 1):                                 # the largest that holds wins
        e = torch.where(gmax * 2.0 ** cand <= amax[..., None], cand, e)
    q = torch.round(g * (inv[..., None] * torch.exp2(e.float()))[..., None]).view(m, kp)  # exact products
    mult = torch.exp2((shift_max - e).float()).view(m, -1)               # 2^(E - e) per group
    return q, d * 2.0 ** -shift_max, q.view(m, -1, group).sum(dim=-1) * mult, mult


def activation_values(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """The values [M, kp] (float64, exact) that x's int8 codes stand for in a matmul with qw."""
    q, d, _, mult = quantize_activations(x, qw.group, qw.kp, qw.activation_group, qw.activation_shift)
    m, ng = q.shape[0], qw.kp // qw.group
    per = qw.activation_group // qw.group
    scale = d.double().repeat_interleave(per, dim=1) * mult.double()          # [M, ng]
    return (q.double().view(m, ng, qw.group) * scale[..., None]).view(m, -1)


def qmatmul_reference(x: torch.Tensor, qw: QuantWeight, *, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """x [M, K] @ W.T -> float32 [M, N] with the compiled kernel's arithmetic in PyTorch ops, so it
    matches the kernel bit for bit. Activations are quantized to int8 per group (per super-block under
    two-level scales); every group's dot product is an exact integer sum. Float scales: group by
    group, in order, acc += isum * (scale * dx) and acc += min * (dx * xsum) as separately rounded
    float32 operations. Two-level scales: per super-block the integers sum(sub_scale * isum) and
    sum(sub_min * xsum) (exact), then acc += I * (super_scale * dx) and acc += Imin * (super_min * dx).
    Works through row chunks whose temporaries stay under about chunk_bytes."""
    if qw.super_scales is not None:
        return _qmatmul_two_level(x, qw, chunk_bytes)
    m = x.shape[0]
    q, d, qs, _ = quantize_activations(x, qw.group, qw.kp)
    ng = qw.kp // qw.group
    qg = q.view(m, ng, qw.group).transpose(0, 1)                          # [ng, M, G]
    dq = d * qs                                                           # [M, ng]
    out = torch.empty(m, qw.n, dtype=torch.float32, device=x.device)
    for r0, r1, t0, t1 in _row_chunks(qw, ng * m * 4 + qw.kp * 4, chunk_bytes):
        isum = _group_sums(qg, qw, t0, t1)                                # [ng, M, rows], exact: < 2**24
        if qw.zero:
            isum -= qw.zero * qs.t()[:, :, None]
        sc, mc = qw.effective(t0, t1)
        s = sc.permute(1, 0, 2).reshape(ng, -1)                           # [ng, rows]
        mn = None if mc is None else mc.permute(1, 0, 2).reshape(ng, -1)
        acc = torch.zeros(m, s.shape[1], dtype=torch.float32, device=x.device)
        for g in range(ng):
            acc += isum[g] * (s[g] * d[:, g:g + 1])
            if mn is not None:
                acc += mn[g] * dq[:, g:g + 1]
        out[:, r0:r1] = acc[:, : r1 - r0]
    return out


def _row_chunks(qw: QuantWeight, per_row: int, chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first tile, end tile) of row chunks whose temporaries stay near chunk_bytes."""
    step = max(TILE, (chunk_bytes // max(per_row, 1)) // TILE * TILE)
    return [(r0, min(qw.n, r0 + step), r0 // TILE, padded(min(qw.n, r0 + step), TILE) // TILE)
            for r0 in range(0, qw.n, step)]


def _group_sums(qg: torch.Tensor, qw: QuantWeight, t0: int, t1: int) -> torch.Tensor:
    """Every group's integer dot product [ng, M, rows] of tiles t0:t1 (float32, exact: < 2**24)."""
    ng = qg.shape[0]
    u = unpack_codes(qw.qweight[t0:t1], qw.bits).float()                 # [rows, kp], exact integers
    return torch.bmm(qg, u.view(-1, ng, qw.group).permute(1, 2, 0))


def _qmatmul_two_level(x: torch.Tensor, qw: QuantWeight, chunk_bytes: int) -> torch.Tensor:
    """qmatmul_reference under two-level scales: integers in float64 (exact: every sum < 2**31)."""
    m, ps = x.shape[0], qw.per_super
    ng = qw.kp // qw.group
    nsb = ng // ps
    q, d, qs, mult = quantize_activations(x, qw.group, qw.kp, qw.activation_group, qw.activation_shift)
    qg = q.view(m, ng, qw.group).transpose(0, 1)
    qs64 = qs.double().t()[:, :, None]                                    # [ng, M, 1], counted 2^(E - e) times
    shift = mult.double().t()[:, :, None]
    out = torch.empty(m, qw.n, dtype=torch.float32, device=x.device)
    assert qw.super_scales is not None
    for r0, r1, t0, t1 in _row_chunks(qw, (2 * ng + 2 * nsb) * m * 8 + qw.kp * 4, chunk_bytes):
        isum = _group_sums(qg, qw, t0, t1).double() * shift                # [ng, M, rows]
        if qw.zero:
            isum -= qw.zero * qs64
        sub = qw.scales[t0:t1].permute(1, 0, 2).reshape(ng, 1, -1).double()
        big = (isum * sub).view(nsb, ps, m, -1).sum(dim=1).float()        # [nsb, M, rows]: exact, then rounded
        sup = qw.super_scales[t0:t1].permute(1, 0, 2).reshape(nsb, -1).float()  # [nsb, rows]
        imin = smn = None
        if qw.mins is not None and qw.super_mins is not None:
            mn = qw.mins[t0:t1].permute(1, 0, 2).reshape(ng, 1, -1).double()
            imin = (mn * qs64).view(nsb, ps, m, -1).sum(dim=1).float()
            smn = qw.super_mins[t0:t1].permute(1, 0, 2).reshape(nsb, -1).float()
        acc = torch.zeros(m, sup.shape[1], dtype=torch.float32, device=x.device)
        for b in range(nsb):
            acc += big[b] * (sup[b] * d[:, b:b + 1])
            if imin is not None and smn is not None:
                acc += imin[b] * (smn[b] * d[:, b:b + 1])
        out[:, r0:r1] = acc[:, : r1 - r0]
    return out
