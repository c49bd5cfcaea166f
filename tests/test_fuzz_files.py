"""A bounded fuzz of the model readers: mutated GGUF files and Hugging Face folders either load or
raise a SlmkitError. Never another exception, a hang, or a big allocation (each input may raise
the worker's peak memory by at most 100 MB; an address-space limit backs that up).

SLMKIT_FUZZ_EXAMPLES sets the inputs per test (`make fuzz` runs 20000); SLMKIT_FUZZ_SEED another
run of them. A failure lists the input's index: the same seed and index rebuild the same input
(tests/helpers/fuzz_worker.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmkit.cli import main as slm
from tests.helpers.gguf_models import hf_to_gguf
from tests.helpers.tiny_models import make_gemma3_folder, make_phi3_folder

pytestmark = pytest.mark.fuzz
ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"gguf": 2000, "folder": 1500}  # about 10 and 25 s on one core


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Tiny valid models of each kind the loaders take: phi3 (LongRoPE) and gemma3 folders, an
    `slm quantize`d folder, and GGUF files with Q8_0 and Q4_0 blocks."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    phi = make_phi3_folder(root / "phi3-longrope", "longrope")
    gemma = make_gemma3_folder(root / "gemma3")
    assert slm(["quantize", str(gemma), str(root / "gemma3-int4"), "--quant", "int4"]) == 0
    ggufs = [hf_to_gguf(phi, root / "phi3-q8.gguf", "Q8_0"), hf_to_gguf(gemma, root / "gemma3-q4.gguf", "Q4_0")]
    return {"folder": [phi, gemma, root / "gemma3-int4"], "gguf": ggufs}


@pytest.mark.parametrize("kind", ["gguf", "folder"])
def test_mutated_model_files_load_or_raise_typed_errors(kind, seeds, tmp_path):
    n = int(os.environ.get("SLMKIT_FUZZ_EXAMPLES") or DEFAULTS[kind])
    seed = os.environ.get("SLMKIT_FUZZ_SEED", "slmkit")
    out = tmp_path / "result.json"
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, "-m", "tests.helpers.fuzz_worker", kind, str(out), seed, str(n), *map(str, seeds[kind])]
    try:  # a hard hang (stuck in C, where the worker's own alarm cannot interrupt it) ends here
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600 + n)
    except subprocess.TimeoutExpired:
        progress = Path(f"{out}.progress")
        pytest.fail(f"the fuzz worker hung on input {progress.read_text() if progress.exists() else '?'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    report = "\n".join(f"#{f['index']} {f['input']}\n    {f['error']}" for f in result["failures"][:10])
    assert not result["failures"], f"{len(result['failures'])} of {n} inputs failed (seed {seed!r}):\n{report}"
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == n
    # the mutations reach past the first check: some inputs still load, others fail in several ways
    assert outcomes.get("loaded", 0) > 0 and len(outcomes) >= 3, outcomes
