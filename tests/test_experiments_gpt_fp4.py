"""experiments.gpt_fp4 end to end in a tiny configuration, its ablations and bad flags."""

import json
import os
import re
import subprocess
import sys

import pytest

import kill_resume
import shared_runs
from experiments import gpt_fp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps=6", "--log_every=2", "--eval_every=3", "--checkpoint_every=3", "--warmup=2",
        "--lr=3e-3", "--batch_size=8", "--context=32", "--eval_batches=1",
        "--max_bytes=200000"]


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.gpt_fp4", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


RUNS = "bf16,mxfp4"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted tiny comparison (shared by the resume and kill tests; once per
  session, :func:`shared_runs.once`)."""
  def make(base):
    p = _run(f"--compare={RUNS}", f"--workdir={base / 'straight'}", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    return None

  base, _ = shared_runs.once(tmp_path_factory, "gpt_straight", make)
  return str(base / "straight")


def test_compare_runs_end_to_end_and_resume_bit_exactly(straight, tmp_path):
  runs = RUNS
  for run in ("bf16", "mxfp4"):
    recs = _records(os.path.join(straight, run, "metrics.jsonl"))
    train = [r["loss"] for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [3, 6]
    assert train[-1] < train[0], f"{run}: loss did not decrease: {train}"
    final = json.load(open(os.path.join(straight, run, "final.json")))
    assert final["val_bits_per_byte"] == pytest.approx(final["val_loss"] / 0.6931471805599453)
  summary = open(os.path.join(straight, "summary.md")).read()
  assert "| mxfp4 | 6 |" in summary and "val_loss_gap_to_bf16" in summary
  for png in ("val_loss.png", "loss.png"):
    assert open(os.path.join(straight, png), "rb").read(4) == b"\x89PNG"
  resumed = str(tmp_path / "resumed")
  assert _run(f"--compare={runs}", f"--workdir={resumed}", "--stop_at=4", *TINY).returncode == 0
  p = _run(f"--compare={runs}", f"--workdir={resumed}", "--resume", *TINY)
  assert p.returncode == 0 and "resumed from step 4" in p.stdout, p.stderr[-3000:]
  for run in ("bf16", "mxfp4"):
    assert _records(os.path.join(straight, run, "metrics.jsonl")) == \
        _records(os.path.join(resumed, run, "metrics.jsonl")), f"{run}: resume is not bit-exact"


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(straight, tmp_path):
  # SIGKILL mid-write of the first run's step-3 checkpoint, after its step 4 (back to 3),
  # and mid-write of the second run's final save; --resume ends where the straight run did.
  wd = str(tmp_path / "killed")
  last, kills = kill_resume.run_with_kills(
      "experiments.gpt_fp4", wd, [f"--compare={RUNS}", *TINY],
      [("saving", "bf16"), ("step", "bf16", 4), ("saving", "mxfp4")])
  assert last.returncode == 0, last.stderr[-3000:]
  assert sum("mid-write" in k for k in kills) == 2, kills
  kill_resume.assert_same_runs(straight, wd, RUNS.split(","), kills)


@pytest.mark.parametrize("args,message", [
    (["--compare=bf16,nvfp4+fast"], "unknown ablation"),
    (["--compare=bf16+nosr"], "need a quantized recipe"),
    (["--compare=mxfp4", "--block_size=48"], "does not divide"),
    (["--dataset=text"], "needs --data_dir"),
    (["--model=gpt_huge"], "is unknown"),
    (["--context=4096"], "exceeds"),
    (["--model=gpt_tiny_moe", "--compare=mxfp4,fp8"], "cannot use recipe 'fp8'"),
])
def test_bad_flags_exit_with_a_clear_message(tmp_path, args, message):
  p = _run(f"--workdir={tmp_path}", *args, timeout=120)
  assert p.returncode != 0
  assert message in p.stderr + p.stdout, (p.stderr + p.stdout)[-2000:]
  lines = [l for l in p.stderr.strip().splitlines() if not re.match(r"^[IWE]\d{4} ", l)]
  assert len(lines) <= 3 and "--help" in lines[-1], p.stderr[-2000:]


def test_help_lists_the_training_flags():
  p = _run("--help", timeout=120)
  for flag in ("--steps", "--lr", "--batch_size", "--workdir", "--[no]resume", "--mesh",
               "--seed", "--compare", "--context", "--[no]tensorboard"):
    assert f"  {flag}:" in p.stdout, f"{flag} is not in --help"


@pytest.mark.parametrize("name,check", [
    ("nvfp4", lambda r: r.recipe.hadamard_wgrad == 16 and r.recipe.fwd_rhs.granularity == "tile"
     and r.recipe.dgrad_grad.rounding == "stochastic" and r.bf16_last_blocks == 1),
    ("nvfp4+nohad", lambda r: r.recipe.hadamard_wgrad is None),
    ("nvfp4+nosr", lambda r: r.recipe.dgrad_grad.rounding == "nearest"
     and r.recipe.wgrad_grad.rounding == "nearest"),
    ("nvfp4+no2d", lambda r: r.recipe.fwd_rhs.granularity == "block"
     and r.recipe.fwd_rhs.block_size == 16),
    ("nvfp4+nolastbf16", lambda r: r.bf16_last_blocks == 0),
    ("mxfp4", lambda r: r.bf16_last_blocks == 0 and r.recipe.fwd_lhs.block_size == 32),
])
def test_ablations(name, check):
  assert check(gpt_fp4.parse_run(name)), name


def test_flag_ablations_apply_to_every_run():
  r = gpt_fp4.parse_run("nvfp4", no_hadamard=True, no_sr=True, no_2d_weights=True,
                        bf16_last_blocks=2)
  assert r.recipe.hadamard_wgrad is None and r.recipe.wgrad_grad.rounding == "nearest"
  assert r.recipe.dgrad_rhs.granularity == "block" and r.bf16_last_blocks == 2


def test_a_mixture_of_experts_gpt_trains_with_its_experts_quantized(tmp_path):
  # gpt_tiny_moe: every block's MLP is 8 experts (top-2), their GEMMs quantized per expert
  # by fp4jax.qragged_dot; the loss includes the load-balancing term.
  wd = str(tmp_path / "moe")
  p = _run("--model=gpt_tiny_moe", "--compare=mxfp4", f"--workdir={wd}", *TINY,
           "--steps=4", "--eval_every=4", "--checkpoint_every=4")
  assert p.returncode == 0, p.stderr[-3000:]
  recs = _records(os.path.join(wd, "mxfp4", "metrics.jsonl"))
  train = [r["loss"] for r in recs if r["kind"] == "train"]
  assert len(train) == 2 and all(0 < l < 10 for l in train) and train[-1] < train[0], train
  final = json.load(open(os.path.join(wd, "mxfp4", "final.json")))
  assert 0 < final["val_loss"] < 10
