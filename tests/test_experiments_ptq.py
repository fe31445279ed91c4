"""experiments.ptq end to end: train-then-quantize, load a vit_tetrajet run, bad flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_train_then_quantize_export_and_evaluate_the_file_in_a_fresh_process(tmp_path):
  wd, files = str(tmp_path / "ptq"), str(tmp_path / "files")
  p = _run("experiments.ptq", "--train_steps=30", "--calibration=64", f"--workdir={wd}",
           f"--export={files}")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(os.path.join(wd, "results.json")))
  assert [(r["format"], r["method"]) for r in rows][:3] == [("float", "-"), ("mxfp4", "rtn"),
                                                            ("mxfp4", "rtn_hadamard")]
  assert len(rows) == 1 + 2 * 4
  float_bytes = rows[0]["weight_bytes"]
  for r in rows[1:]:
    assert r["weight_bytes"] < float_bytes / 4, "encoder weights should shrink ~7x"
    assert r["output_mse"] > 0.0 and 0.0 <= r["test_accuracy"] <= 1.0
  by = {(r["format"], r["method"]): r for r in rows}
  for fmt in ("mxfp4", "nvfp4"):  # GPTQ minimises the output error RTN leaves
    assert by[(fmt, "gptq")]["output_mse"] < by[(fmt, "rtn")]["output_mse"], fmt
  assert by[("nvfp4", "rtn")]["weight_bytes"] > by[("mxfp4", "rtn")]["weight_bytes"], \
      "NVFP4 (4.5 bits) stores more than MXFP4 (4.25 bits)"
  assert open(os.path.join(wd, "ptq.png"), "rb").read(4) == b"\x89PNG"
  assert "| mxfp4 | gptq |" in open(os.path.join(wd, "summary.md")).read()
  # --export: the MXFP4 rtn/gptq results in the gpt-oss layout (NVFP4 and the rotated
  # methods are not that layout, and say so).
  assert sorted(os.listdir(files)) == ["mxfp4_gptq.safetensors", "mxfp4_rtn.safetensors"]
  assert "nvfp4 gptq not written" in p.stdout
  from safetensors import safe_open
  with safe_open(os.path.join(files, "mxfp4_gptq.safetensors"), "np") as f:
    names = list(f.keys())
    blocks = [n for n in names if n.endswith(".blocks")]
    assert blocks and all(n[:-7] + ".scales" in names for n in blocks)
    assert f.get_tensor(blocks[0]).dtype == np.uint8 and f.get_tensor(blocks[0]).shape[-1] == 16
    assert f.metadata()["experiments.ptq.model"] == "vit_digits"
  # A fresh process reads the file back and evaluates it through the weight-only path:
  # the dispatch's choice (dequantize on CPU) gives the in-process scores; the kernel
  # (interpret mode here), with activations rounded to bf16, within that rounding.
  for impl in ("auto", "pallas"):
    ev = str(tmp_path / f"eval_{impl}")
    q = _run("experiments.ptq", f"--evaluate_file={files}/mxfp4_gptq.safetensors",
             f"--workdir={ev}", f"--impl={impl}")
    assert q.returncode == 0, q.stderr[-3000:]
    got = json.load(open(os.path.join(ev, "evaluate.json")))
    want = by[("mxfp4", "gptq")]
    assert got["weight_bytes"] == want["weight_bytes"]
    tol = 1e-5 if impl == "auto" else 2e-3
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=tol), impl
    assert abs(got["test_accuracy"] - want["test_accuracy"]) <= (0 if impl == "auto" else 0.01)


def test_quantizes_a_vit_tetrajet_run(tmp_path):
  src = str(tmp_path / "vit")
  p = _run("experiments.vit_tetrajet", "--format=bf16", "--noscan_layers", "--steps=4",
           "--log_every=2", "--eval_every=4", f"--workdir={src}")
  assert p.returncode == 0, p.stderr[-3000:]
  wd = str(tmp_path / "ptq")
  p = _run("experiments.ptq", f"--from_workdir={src}", "--run=bf16", "--formats=nvfp4",
           "--methods=rtn", f"--workdir={wd}")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = json.load(open(os.path.join(wd, "results.json")))
  final = json.load(open(os.path.join(src, "bf16", "final.json")))
  # The float row evaluates the restored parameters: the run's own test accuracy.
  assert rows[0]["test_accuracy"] == pytest.approx(final["test_accuracy"])


@pytest.mark.parametrize("args,message", [
    (["--methods=rtn,awq"], "unknown ['awq']"),
    (["--formats=fp5"], "fp5"),
    (["--from_workdir=/nonexistent/run"], "has no config.json"),
    (["--model=vit_giant"], "is unknown"),
    (["--calibration=100000"], "--calibration=100000 is more than the 1438 training images"),
    (["--evaluate_file=README.md"], "README.md"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, args, message):
  p = _run("experiments.ptq", f"--workdir={tmp_path}", *args, timeout=120)
  assert p.returncode != 0
  assert message in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]
