"""The AVX2 kernels (qgemm_avx2.cpp, attn_avx2.cpp, fgemm_avx2.cpp, repack.cpp) against the AVX512 ones: the same
bits for every weight format, the attention and the float matmul (bfloat16 float matmuls excepted
where AVX512-BF16 pairs products: then within a stated tolerance); chosen by SLMKIT_KERNEL=avx2."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from slmkit.kernels import qgemm
from slmkit.kernels.qgemm import fmatmul_kernel, load_variant, pack_float_weight, qmatmul_kernel
from slmkit.quant.format import from_codes, qmatmul_reference

from .test_decode_attention import slot_views
from .test_kernel import SHAPES


def variant(name: str):
    try:
        return load_variant(name)
    except RuntimeError as e:
        pytest.skip(f"the {name} kernel cannot run here: {e}")


@pytest.fixture(scope="module")
def both():
    libs = variant("avx512"), variant("avx2")
    assert libs[0]._name != libs[1]._name  # two libraries, not one loaded twice
    return libs


def codes_weight(n, k, group, bits, scales, seed=2):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    ng = -(-k // group)
    dt = torch.float32 if scales == "float32" else torch.float16
    s = (torch.rand(n, ng, generator=g) * 0.02).to(dt)
    mins = (torch.randn(n, ng, generator=g) * 0.05).to(dt) if scales == "mins" else None
    return from_codes(u, s, mins, bits=bits, group=group, zero=0 if mins is not None else 1 << (bits - 1),
                      n=n, k=k)


@pytest.mark.parametrize("n,k,group,bits,m", SHAPES)
@pytest.mark.parametrize("scales", ["float16", "float32", "mins"])
@pytest.mark.parametrize("vnni", ["1", "0"])
def test_qgemm_same_bits_as_avx512_and_the_fallback(both, monkeypatch, n, k, group, bits, m, scales, vnni):
    """vnni=0 forces the vpmaddubsw path on a CPU with AVX-VNNI (elsewhere both runs take it)."""
    monkeypatch.setenv("SLMKIT_AVX_VNNI", vnni)
    avx512, avx2 = both
    qw = codes_weight(n, k, group, bits, scales)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)) * 3
    got = qmatmul_kernel(avx2, x, qw, torch.float32)
    assert torch.equal(got, qmatmul_kernel(avx512, x, qw, torch.float32))
    assert torch.equal(got, qmatmul_reference(x, qw))
    xb = x.bfloat16()
    assert torch.equal(qmatmul_kernel(avx2, xb, qw, torch.bfloat16), qmatmul_kernel(avx512, xb, qw, torch.bfloat16))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_qgemm_gguf_scale_kinds_same_bits(both, type_name):
    """The two-level (uint8 / int8 x float32) scales of the K-quants, and the GGUF block formats; decode,
    a few rows, and prefill (8 rows and more: the AVX2 kernel unpacks each tile once, 3 rows at a time,
    4 with AVX-VNNI)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant.gguf_repack import repack
    from tests.helpers.gguf_files import random_blocks

    shape = (72, 512)
    raw = torch.from_numpy(np.ascontiguousarray(random_blocks(type_name, shape, np.random.default_rng(3)))
                           .reshape(-1).copy())
    qw = repack(raw, int(Q[type_name]), shape)
    for m in (1, 2, 5, 11):
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m))
        got = qmatmul_kernel(both[1], x, qw, torch.float32)
        assert torch.equal(got, qmatmul_kernel(both[0], x, qw, torch.float32))
        assert torch.equal(got, qmatmul_reference(x, qw))


@pytest.mark.parametrize("code_bits", [0x00, 0xFF, 0x0F])  # codes 0 (- zero = -32), 63 (+31), mixed
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_q6_k_extreme_codes_and_activations_same_bits(both, code_bits, sign):
    """Q6_K's zero point is folded into the AVX2 kernel's int16 pair sums, which then run over 16 inputs:
    the largest sums there are, |8 x 32 x 127| per lane, with every code at 0 or 63 and every activation
    at the int8 limit (all equal), for decode and for the prefill's unpacked tiles, give the same bits."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant.gguf_repack import repack
    from tests.helpers.gguf_files import random_blocks

    shape = (40, 768)
    b = random_blocks("Q6_K", shape, np.random.default_rng(5)).reshape(-1, 210)
    b[:, :192] = code_bits  # ql, qh: the codes
    b[:, 192:208] = np.array([127, -128, 1, 64] * 4, dtype=np.int8).view(np.uint8)  # sub-scales, extremes too
    qw = repack(torch.from_numpy(b.reshape(-1).copy()), int(Q.Q6_K), shape)
    for m in (1, 3, 8, 9):
        x = torch.full((m, shape[1]), sign)
        x[:, 1::97] *= 0.5  # a few smaller inputs: other codes than the limit in some groups
        got = qmatmul_kernel(both[1], x, qw, torch.float32)
        assert torch.equal(got, qmatmul_kernel(both[0], x, qw, torch.float32))
        assert torch.equal(got, qmatmul_reference(x, qw))


@pytest.fixture(scope="module")
def vnni_through_evex(tmp_path_factory):
    """The AVX2 library with its AVX-VNNI unit built on AVX512-VL's vpdpbusd (the same instruction, EVEX
    encoded; SLM_VNNI_EVEX, tests only) and that unit switched on: where the CPU has AVX512-VNNI but not
    AVX-VNNI (as here), the path AVX-VNNI machines take runs, which no emulator here can run."""
    import ctypes

    flags = qgemm.cpu_flags() or set()
    cxx = shutil.which("g++") or shutil.which("c++")
    if not {"avx512vl", "avx512_vnni", "avx2", "fma", "f16c"} <= flags or cxx is None:
        pytest.skip("needs a CPU with AVX512-VL and AVX512-VNNI, and a C++ compiler")
    d = tmp_path_factory.mktemp("vnni")
    objs = []
    for i, (src, extra) in enumerate(qgemm.AVX2_UNITS):
        if "-DSLM_VNNI" in extra:
            extra = ["-mavx512vl", "-mavx512vnni", "-DSLM_VNNI", "-DSLM_VNNI_EVEX"]
        elif src.name == "qgemm_avx2.cpp":
            extra = ["-DSLM_VNNI_EVEX"]
        objs.append(str(d / f"{i}.o"))
        r = _run([cxx, *qgemm.AVX2_FLAGS, *extra, "-c", str(src), "-o", objs[-1]])
        assert r.returncode == 0, r.stderr[-2000:]
    r = _run([cxx, "-shared", "-fopenmp", *objs, "-o", str(d / "lib.so")])
    assert r.returncode == 0, r.stderr[-2000:]
    lib = ctypes.CDLL(str(d / "lib.so"))
    qgemm._declare(lib)
    assert lib.slm_avx_vnni() == 1
    return lib


@pytest.mark.parametrize("value,on", [("0", 0), (" Off ", 0), ("FALSE", 0), ("no", 0), ("1", 1), ("", 1),
                                      ("yes", 1), ("offline", 1)])
def test_avx_vnni_switch_reads_the_envflags_words(vnni_through_evex, monkeypatch, value, on):
    """SLMKIT_AVX_VNNI, read by the C library on every call, takes the off words every other switch does."""
    from slmkit.envflags import is_off

    monkeypatch.setenv("SLMKIT_AVX_VNNI", value)
    assert vnni_through_evex.slm_avx_vnni() == on == (not is_off(value))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_avx_vnni_path_same_bits(both, vnni_through_evex, type_name):
    """The AVX-VNNI path (vpdpbusd sums; prefill on unpacked tiles, 4 rows at a time, the rows left over
    on the packed codes) gives the plain AVX2 path's bits and the reference's, decode to prefill."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant.gguf_repack import repack
    from tests.helpers.gguf_files import random_blocks

    shape = (72, 512)
    raw = torch.from_numpy(np.ascontiguousarray(random_blocks(type_name, shape, np.random.default_rng(4)))
                           .reshape(-1).copy())
    qw = repack(raw, int(Q[type_name]), shape)
    for m in (1, 2, 5, 11, 12):
        x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m)) * 2
        got = qmatmul_kernel(vnni_through_evex, x, qw, torch.float32)
        assert torch.equal(got, qmatmul_kernel(both[1], x, qw, torch.float32))
        assert torch.equal(got, qmatmul_reference(x, qw))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_repack_same_bytes_as_avx512(both, monkeypatch, type_name):
    """The GGUF repack (repack.cpp) is built into both libraries: the same bytes from each, and from
    the PyTorch repack."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from slmkit.quant import gguf_repack
    from tests.helpers.gguf_files import random_blocks

    shape = (200, 512)
    raw = torch.from_numpy(np.ascontiguousarray(random_blocks(type_name, shape, np.random.default_rng(4)))
                           .reshape(-1).copy())
    outs = []
    for lib in (*both, None):
        monkeypatch.setattr(gguf_repack, "_repack_library", lambda kernel, lib=lib: lib)
        outs.append(gguf_repack.repack(raw, int(Q[type_name]), shape))
    for part in ("qweight", "scales", "mins", "super_scales", "super_mins"):
        a, b, c = (getattr(q, part) for q in outs)
        assert (a is None) == (b is None) == (c is None)
        if a is not None:
            assert torch.equal(a, b) and torch.equal(a, c), part


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 50), (100, 63), (300, 640)])
@pytest.mark.parametrize("layout", ["packed", "rows"])
def test_fgemm_same_bits_as_avx512(both, dtype, n, k, layout):
    avx512, avx2 = both
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(7, k, generator=g).to(dtype)

    def mm(lib, rows, b):
        if layout == "packed":
            return fmatmul_kernel(lib, rows, pack_float_weight(lib, w), b, n=n)
        return fmatmul_kernel(lib, rows, w, b)

    for b in (None, bias):
        got = mm(avx2, x, b)
        for lo, hi in ((0, 1), (1, 3), (3, 7)):  # batch-invariant on its own
            assert torch.equal(mm(avx2, x[lo:hi], b), got[lo:hi])
        want = mm(avx512, x, b)
        if avx512.slm_fgemm_pairs(qgemm.FLOAT_DTYPES[dtype]):
            # AVX512-BF16 adds products in pairs: float32 sums of the same exact products in
            # another order, each rounded once to bfloat16 -> within 1 bfloat16 ulp + the sums' error
            scale = (x.double().abs() @ w.double().abs().t()) + (0 if b is None else b.double().abs())
            assert ((got.double() - want.double()).abs() <= 2.0**-7 * want.double().abs() + 1e-5 * scale).all()
        else:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,D,S", [(1, 4, 4, 64, 1), (3, 8, 2, 96, 1), (2, 6, 3, 40, 5), (1, 4, 1, 256, 3)])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_same_bits_as_avx512(both, monkeypatch, dtype, B, H, Hkv, D, S, window):
    lens = [S + (7 * b + 3) % 40 for b in range(B)]
    k, v = slot_views(B, Hkv, D, lens, dtype, seed=B * D)
    q = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).transpose(1, 2)
    qpos = torch.tensor(lens)[:, None] - S + torch.arange(S)
    outs = []
    for lib in both:
        monkeypatch.setattr(qgemm, "_lib", lib)
        monkeypatch.setattr(qgemm, "_tried", True)
        outs.append(qgemm.decode_attention(q, k, v, qpos=qpos, window=window, scale=D**-0.5))
    assert outs[0] is not None and outs[1] is not None
    assert torch.equal(outs[0], outs[1])
    # chunk-invariant on its own: the last query alone gives its bits in the chunk
    alone = qgemm.decode_attention(q[:, :, -1:], k, v, qpos=qpos[:, -1:], window=window, scale=D**-0.5)
    assert alone is not None and torch.equal(alone, outs[1][:, :, -1:])


# ---------------------------------------------------------------- no AVX512 instruction, ever
def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> str:
    """tests/helpers/kernel_driver.cpp built as plain x86-64 (no -m flags)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("driver") / "kernel_driver")
    r = _run([cxx, "-O1", "-std=c++17", str(Path(__file__).parents[1] / "helpers" / "kernel_driver.cpp"), "-o", exe,
              "-ldl"])
    assert r.returncode == 0, r.stderr
    return exe


def _lines(out: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_avx2_library_runs_on_an_emulated_haswell_with_the_same_bits(both, driver):
    """qemu-x86_64 -cpu Haswell (AVX2, FMA, F16C; no AVX512, which qemu's TCG cannot run at all):
    the AVX2 library passes its CPU check and gives the bits it gives natively, which are the AVX512
    library's; the AVX512 library fails the check there, and forced to run dies of SIGILL."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)")
    avx512, avx2 = (lib._name for lib in both)
    native = _run([driver, avx2])
    assert native.returncode == 0, native.stderr
    emulated = _run([qemu, "-cpu", "Haswell", driver, avx2])
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    lines = _lines(emulated.stdout)
    assert lines["supported"] == "1" and len(lines) > 60
    assert all(v.startswith("0 ") for k, v in lines.items() if k != "supported")  # every call returned 0
    assert emulated.stdout == native.stdout
    theirs = _lines(_run([driver, avx512]).stdout)
    shared = lines.keys() & theirs.keys()  # bfloat16 fgemm lines differ in name where AVX512-BF16 pairs
    assert len(shared) > 60 and all(lines[k] == theirs[k] for k in shared)
    assert _lines(_run([qemu, "-cpu", "Haswell", driver, avx512]).stdout) == {"supported": "0"}
    forced = _run([qemu, "-cpu", "Haswell", driver, avx512, "--force"])
    assert forced.returncode in (132, -4), forced.returncode  # SIGILL: the emulation does refuse AVX512


def test_avx2_library_has_no_evex_encoded_instruction(both):
    """Every AVX512 instruction is EVEX-encoded (prefix byte 0x62, invalid otherwise in 64-bit code);
    the AVX2 library has none, and its vpdpbusd is AVX-VNNI's VEX form."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed")
    evex, vex_dp = [], 0
    for which, lib in zip(("avx512", "avx2"), both, strict=True):
        r = _run([objdump, "-d", lib._name])
        found = 0
        for line in r.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            raw = parts[1].split()
            while raw and raw[0] in ("66", "67", "f2", "f3"):
                raw = raw[1:]
            if raw and raw[0] == "62":
                found += 1
            if which == "avx2" and "vpdpbusd" in parts[2]:
                vex_dp += 1
        evex.append(found)
    assert evex[0] > 0 and evex[1] == 0  # the scan finds AVX512 code where there is some
    assert vex_dp > 0 or "avxvnni" not in _run([shutil.which("g++") or "g++", "--help=target"]).stdout


@pytest.mark.parametrize("which", ["avx512", "avx2"])
def test_a_format_the_loaded_variant_lacks_runs_the_fallback(monkeypatch, which):
    """A QuantLinear whose format's entry point the loaded library does not export (as a format built
    into the AVX512 library only would be, on the AVX2 one) gives the PyTorch fallback's bits, no
    error; with an entry point it has, the kernel runs."""
    from slmkit.quant import linear
    from slmkit.quant.linear import QuantLinear

    monkeypatch.setattr(qgemm, "_lib", variant(which))
    monkeypatch.setattr(qgemm, "_tried", True)
    calls = []
    real = linear.qmatmul_kernel
    monkeypatch.setattr(linear, "qmatmul_kernel", lambda *a: calls.append(1) or real(*a))
    qw = codes_weight(48, 130, 32, 4, "mins")
    mod = QuantLinear(qw)
    x = torch.randn(3, 130, generator=torch.Generator().manual_seed(9))
    want = qmatmul_reference(x, qw)
    assert torch.equal(mod(x), want) and calls == [1]
    mod.kernel_symbol = "slm_qgemm_format_built_nowhere"
    assert torch.equal(mod(x), want) and calls == [1]  # the fallback ran, same bits


def test_the_variant_is_chosen_from_the_cpu_flags_and_slmkit_kernel(monkeypatch):
    haswell = {"avx", "avx2", "fma", "f16c", "sse4_2"}
    assert qgemm.cpu_variants(haswell) == ["avx2"]
    assert qgemm.cpu_variants(haswell | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}) == ["avx512", "avx2"]
    assert qgemm.cpu_variants({"sse4_2", "avx"}) == []
    for which in qgemm.VARIANTS:
        variant(which)  # skips where this CPU cannot run one
    monkeypatch.setattr(qgemm, "_tried", False)
    monkeypatch.setattr(qgemm, "_lib", None)
    monkeypatch.setattr(qgemm, "variant", None)
    monkeypatch.setattr(qgemm, "build_error", None)
    monkeypatch.setenv("SLMKIT_KERNEL", "avx2")
    assert qgemm.get_kernel() is qgemm.load_variant("avx2") and qgemm.variant == "avx2"
    monkeypatch.setattr(qgemm, "_tried", False)
    monkeypatch.setenv("SLMKIT_KERNEL", "1")
    assert qgemm.get_kernel() is qgemm.load_variant("avx512") and qgemm.variant == "avx512"
    monkeypatch.setenv("SLMKIT_KERNEL", "0")
    assert qgemm.get_kernel() is None
    # an AVX2-only CPU: the default is the AVX2 kernel, and a forced AVX512 one is refused by name
    monkeypatch.setattr(qgemm, "cpu_flags", lambda: haswell)
    monkeypatch.setattr(qgemm, "_libs", {})
    monkeypatch.setattr(qgemm, "_tried", False)
    monkeypatch.setenv("SLMKIT_KERNEL", "1")
    assert qgemm.get_kernel() is not None and qgemm.variant == "avx2"
    monkeypatch.setattr(qgemm, "_tried", False)
    monkeypatch.setenv("SLMKIT_KERNEL", "avx512")
    assert qgemm.get_kernel() is None and "avx512" in (qgemm.build_error or "")
