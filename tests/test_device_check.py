"""benchmarks/device_check.py works before an accelerator is ever at hand.

The device run happens rarely and without warning, so its one command must not first fail
on a typo: the CPU smoke runs the very same sections end to end at tiny sizes, and its JSON
must hold a sane value for each (a timing or a memory figure that is zero, negative, or
inverted means a section measured nothing). No speed is asserted, only orders that hold on
any machine. The HLO reading that names cuDNN or Pallas cannot happen on CPU, so it is
checked on HLO text written the way XLA prints it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from derta_jax.models.attention import attention_in_hlo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's XLA_FLAGS and cache come along
    return subprocess.run([sys.executable, "-m", "benchmarks.device_check", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cpu_smoke_writes_every_section_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "dc.json"
    done = _run("--cpu_smoke", f"--out={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["sections"]
    assert set(s) == {"device", "peak", "attention", "attention_parity", "derta_sft", "train",
                      "loss_memory", "generate"}
    assert not result["failed"] and not any("error" in v for v in s.values())
    assert result["finished"] is True

    assert isinstance(s["device"]["kind"], str) and s["device"]["kind"]
    assert s["device"]["nominal_peak_flops"] is None  # a CPU has no spec peak
    peak = s["peak"]["measured_flops"]
    assert peak > 0 and s["peak"]["dtype"] == "float32"

    entries = s["train"]["entries"]
    assert {(e["seq"], e["mode"], e["remat"]) for e in entries} >= {
        (32, "full", "none"), (64, "lora", "none")}
    assert {e["mode"] for e in entries} == {"full", "lora"}
    assert {e["remat"] for e in entries} == {"none", "full"}
    assert {e["seq"] for e in entries} == {32, 64}
    for e in entries:
        assert "error" not in e, e
        assert e["step_s"] > 0 and e["tokens_per_s"] > 0
        assert 0 < e["mfu_measured"] < 1.5, e
        assert math.isclose(e["mfu_measured"],
                            e["model_flops_per_step"] / e["step_s"] / peak, rel_tol=1e-9)
        assert math.isfinite(e["loss"]) and e["temp_bytes"] > 0
        assert e["attention_detected"] == "cpu_flash"  # the C++ kernel, found in the HLO
    lora = next(e for e in entries if e["mode"] == "lora" and e["seq"] == 64)
    full = next(e for e in entries if e["mode"] == "full" and e["seq"] == 64)
    assert lora["model_flops_per_step"] < full["model_flops_per_step"]  # no weight gradient

    assert s["attention"]["setting"] == "auto" and s["attention"]["resolved"] == "cpu_flash"
    assert s["attention"]["detected"] == "cpu_flash"
    parity = s["attention_parity"]["shapes"]
    assert [(r["seq"], r["head_dim"], r["window"]) for r in parity] == [
        (256, 64, None), (200, 64, None), (256, 128, 64)]
    for row in parity:  # on CPU auto is the C++ kernel; float32 XLA is the reference itself
        assert row["auto"]["runs"] == "cpu_flash" and row["xla_float32"]["max"] == 0.0
        assert 0 < row["auto"]["max"] < 1e-5, row
        assert "cudnn" not in row
    ratio = s["derta_sft"]["ratio"]
    assert math.isfinite(ratio) and ratio > 0
    memory = s["loss_memory"]
    assert 0 < memory["chunked"]["temp_bytes"] < memory["naive"]["temp_bytes"]
    batches = s["generate"]["batches"]
    assert set(batches) == {"1", "32"}
    assert all(b["tokens_per_s"] > 0 for b in batches.values())
    assert "| seq32/full/remat_none |" in done.stdout and f"wrote {out}" in done.stdout

    before = out.read_bytes()
    again = _run("--cpu_smoke", f"--out={out}")
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: --out={out} exists; pass --overwrite to replace it"
    assert out.read_bytes() == before


def test_each_finished_section_is_saved_before_the_next_starts():
    """A lease can end mid-run: what was measured must already be on disk."""
    import argparse

    from benchmarks import device_check

    args = argparse.Namespace(sections=["peak", "loss_memory"], repeats=1,
                              attention_impl="auto", cpu_smoke=True, argv=["--cpu_smoke"])
    saved = []
    results = device_check.run(args, device_check.CPU_SMOKE,
                               lambda r: saved.append(json.loads(json.dumps(r, default=str))))
    assert [list(s["sections"]) for s in saved] == [["device", "peak"],
                                                    ["device", "peak", "loss_memory"]]
    assert all("failed" not in s for s in saved) and results["failed"] == []


def test_attention_is_read_from_the_compiled_hlo():
    cudnn = ('%custom-call.3 = (bf16[8,1024,32,64]{3,1,2,0}, f32[8,32,1024]{2,1,0}, u8[0]{0}) '
             'custom-call(bf16[8,1024,32,64] %q, bf16[8,1024,8,64] %k), '
             'custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={}\n'
             '%cublas = f32[2,2] custom-call(%a, %b), custom_call_target="__cublas$gemm"')
    assert attention_in_hlo(cudnn) == ("cudnn", ["__cudnn$fmhaScaleBiasSoftmax"])
    pallas = '%c = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", backend_config=""'
    assert attention_in_hlo(pallas) == ("pallas", ["tpu_custom_call"])
    plain = '%dot.1 = f32[2,2]{1,0} dot(f32[2,2] %a, f32[2,2] %b), lhs_contracting_dims={1}'
    assert attention_in_hlo(plain) == ("xla", [])


def test_nominal_peaks_by_device_kind():
    from derta_jax.train.flops import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("TPU v5 lite") == 197e12
    assert peak_flops_for("cpu") == 0.0
