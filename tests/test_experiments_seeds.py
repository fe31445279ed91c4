"""Seeds and precision schedules of the experiment scripts (experiments.seeds and
experiments.common): the statistics, the seed layout, the switch step and the training
loop's switch with resume on either side of it."""

import json
import math
import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, seeds


@pytest.mark.parametrize("values,seed,expected", [
    (None, 5, None),
    (["3"], 0, [0, 1, 2]),
    (["2"], 7, [7, 8]),
    (["1"], 4, [4]),
    (["0", "4", "7"], 0, [0, 4, 7]),
    ([" 3", "1 "], 9, [3, 1]),
])
def test_parse_seeds(values, seed, expected):
  assert seeds.parse_seeds(values, seed) == expected


@pytest.mark.parametrize("values,message", [
    (["0"], "at least 1"),
    (["-2"], "at least 1"),
    (["1", "1"], "repeats a seed"),
    (["a"], "give a count"),
    (["1", "x"], "give a count"),
    ([], "is empty"),
])
def test_bad_seeds_are_named(values, message):
  with pytest.raises(ValueError, match=message):
    seeds.parse_seeds(values, 0)


def test_run_dirs_and_seed_discovery(tmp_path):
  assert seeds.run_dir("w", "nvfp4", 3, seeded=False) == os.path.join("w", "nvfp4")
  assert seeds.run_dir("w", "nvfp4", 3, seeded=True) == os.path.join("w", "nvfp4", "seed_3")
  run = tmp_path / "r"
  assert seeds.seed_dirs(str(run)) == []
  for s in (10, 2):
    (run / f"seed_{s}").mkdir(parents=True)
    (run / f"seed_{s}" / "metrics.jsonl").write_text("")
  (run / "seed_5").mkdir()                       # no log: not a seed run
  (run / "seed_x").mkdir()
  assert seeds.seed_dirs(str(run)) == [str(run / "seed_2"), str(run / "seed_10")]
  flat = tmp_path / "flat"
  flat.mkdir()
  (flat / "metrics.jsonl").write_text("")
  assert seeds.seed_dirs(str(flat)) == [str(flat)]


def test_stat_is_the_mean_and_sample_standard_deviation():
  xs = [1.0, 2.0, 4.0]
  s = seeds.Stat.of(xs)
  assert s.mean == pytest.approx(np.mean(xs)) and s.std == pytest.approx(np.std(xs, ddof=1))
  assert s.n == 3 and s.format() == f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1):.4f}"
  one = seeds.Stat.of([0.25, None])
  assert one == seeds.Stat(0.25, 0.0, 1) and one.format() == "0.2500"
  assert seeds.Stat.of([None]) is None and seeds.Stat.of([]) is None
  assert not one.exceeds_noise and math.isinf(one.half_width)


def test_the_95_percent_interval_uses_student_t():
  # t_{0.975, 2} = 4.302652...; t_{0.975, 1} = 12.7062...
  assert seeds.t_quantile(3) == pytest.approx(4.302652729, rel=1e-8)
  assert seeds.t_quantile(2) == pytest.approx(12.70620474, rel=1e-8)
  gap = seeds.Stat.of([0.010, 0.012, 0.011], paired=True)
  assert gap.half_width == pytest.approx(4.302652729 * 0.001 / math.sqrt(3))
  assert gap.exceeds_noise and gap.format().endswith(" *")
  noisy = seeds.Stat.of([0.010, -0.004, 0.006], paired=True)
  assert not noisy.exceeds_noise and not noisy.format().endswith("*")
  assert not seeds.Stat.of([0.0, 0.0], paired=True).exceeds_noise   # bf16 against itself
  # Only paired gaps carry the mark: a mean far from zero is not "beyond the noise".
  assert not seeds.Stat.of([5.0, 5.1, 5.2]).format().endswith("*")
  js = gap.to_json()
  assert js["exceeds_noise"] is True and js["ci95_half_width"] == pytest.approx(gap.half_width)


def _finals(run, values, recipe="mxfp4"):
  return [{"run": run, "seed": s, "recipe": recipe, "steps": 10, "val_loss": v}
          for s, v in values.items()]


def test_gaps_are_paired_by_seed():
  # Seed-to-seed noise (0.1) far above the gap (0.01): unpaired it would vanish in the
  # noise, paired by seed it is exact. Seeds are matched by number, not by position.
  base = _finals("bf16", {0: 2.0, 1: 2.1, 2: 1.9}, recipe="bf16")
  run = _finals("nvfp4", {2: 1.91, 0: 2.01, 1: 2.11})
  gap = seeds.paired_gap(run, base, "val_loss")
  assert gap.mean == pytest.approx(0.01) and gap.std == pytest.approx(0.0, abs=1e-12)
  assert gap.n == 3 and gap.paired
  # A seed the baseline lacks (interrupted) drops out of the pairing.
  assert seeds.paired_gap(run, base[:2], "val_loss").n == 2


def test_seed_rows_aggregate_and_name_the_gaps():
  finals = {"bf16": _finals("bf16", {0: 2.0, 1: 2.2}, recipe="bf16"),
            "nvfp4": _finals("nvfp4", {0: 2.05, 1: 2.26}),
            "nvfp4+nohad": _finals("nvfp4+nohad", {0: 2.07, 1: 2.27})}
  rows = common.seed_rows(finals, ["val_loss"], [
      ("gap_to_bf16", "val_loss", lambda n: common.first_run_with_recipe(finals, "bf16")),
      ("gap_to_base", "val_loss", lambda n: common.base_run(n, finals))])
  by = {r["run"]: r for r in rows}
  assert by["nvfp4"]["seeds"] == 2 and by["nvfp4"]["seed"] == [0, 1]
  assert by["nvfp4"]["steps"] == 10                       # common values stay plain
  assert by["nvfp4"]["val_loss"].mean == pytest.approx(2.155)
  assert by["nvfp4"]["gap_to_bf16"].mean == pytest.approx(0.055)
  assert by["nvfp4+nohad"]["gap_to_base"].mean == pytest.approx(0.015)
  assert "gap_to_base" not in by["nvfp4"] and "gap_to_base" not in by["bf16"]
  table = common.markdown_table(rows, ["run", "val_loss", "gap_to_bf16"])
  assert "| nvfp4 | 2.1550 ± 0.1485 | 0.0550 ± 0.0071 |" in table


def test_base_run_is_the_longest_run_extended():
  names = ["bf16", "tetrajet", "tetrajet+qema", "nvfp4"]
  assert common.base_run("tetrajet+qema+then_bf16@0.8", names) == "tetrajet+qema"
  assert common.base_run("tetrajet+qramp", names) == "tetrajet"
  assert common.base_run("nvfp4+nohad+nosr", names) == "nvfp4"
  assert common.base_run("nvfp4", names) is None
  assert common.base_run("mxfp4+nosr", names) is None


def test_curve_mean_and_band_over_seeds_with_an_interrupted_seed():
  logs = [[{"kind": "eval", "step": 1, "m": 1.0}, {"kind": "eval", "step": 2, "m": 3.0},
           {"kind": "train", "step": 2, "m": 99.0}],
          [{"kind": "eval", "step": 1, "m": 2.0}]]            # interrupted after step 1
  steps, mean, std, n = common.curve(logs, "m")
  assert steps.tolist() == [1, 2] and mean.tolist() == [1.5, 3.0]
  assert std[0] == pytest.approx(np.std([1.0, 2.0], ddof=1)) and std[1] == 0.0
  assert n.tolist() == [2, 1]


def test_plot_curves_draws_one_and_several_seeds(tmp_path):
  logs = [[{"kind": "eval", "step": s, "m": s * k} for s in (1, 2, 3)] for k in (1.0, 1.2)]
  out = common.plot_curves({"two": logs, "one": logs[:1]}, "m", str(tmp_path / "p.png"), "t")
  assert open(out, "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("at,steps,expected", [
    ("0.8", 600, 480), ("0.5", 6, 3), ("480", 600, 480), ("1", 2, 1), ("0.25", 8, 2),
    (".9", 10, 9), ("5e-1", 10, 5),
])
def test_switch_step(at, steps, expected):
  assert common.SwitchSpec("bf16", at).step(steps) == expected


@pytest.mark.parametrize("at,steps,message", [
    ("1.0", 10, "strictly between 0 and 1"), ("0", 10, "both sides"), ("10", 10, "both sides"),
    ("0.01", 10, "step 0 of 10"), ("abc", 10, "fraction"), ("-3", 10, "both sides"),
])
def test_bad_switch_points_are_named(at, steps, message):
  with pytest.raises(ValueError, match=message):
    common.SwitchSpec("bf16", at).step(steps)


def test_switch_options_and_flags():
  assert common.split_switch(["nohad", "then_bf16@0.8"]) == (
      ["nohad"], common.SwitchSpec("bf16", "0.8"))
  assert common.split_switch(["nosr"]) == (["nosr"], None)
  assert common.SwitchSpec("fp8", "480").option == "then_fp8@480"
  with pytest.raises(ValueError, match="then_<recipe>@"):
    common.split_switch(["then_bf16"])
  with pytest.raises(ValueError, match="give one"):
    common.split_switch(["then_bf16@0.5", "then_fp8@0.9"])
  names = ["bf16", "nvfp4", "mxfp4+then_fp8@0.5", "fp8"]
  assert common.with_switch_flags(names, "fp8", "0.8") == [
      "bf16", "nvfp4+then_fp8@0.8", "mxfp4+then_fp8@0.5", "fp8"]
  assert common.with_switch_flags(names, None, None) == names
  with pytest.raises(ValueError, match="go together"):
    common.with_switch_flags(names, "bf16", None)


class _State(NamedTuple):
  step: jnp.ndarray
  w: jnp.ndarray


def _switch_loop(tmp_path, *, stop_at=None, resume=False, steps=8, switch_at=4):
  """A one-number 'model': the first phase adds 1 per step, the second multiplies by 2, so
  the final weight says exactly which phase ran each step."""
  def first(state, x):
    return _State(state.step + 1, state.w + x), {"loss": state.w}

  def second(state, x):
    return _State(state.step + 1, state.w * 2.0), {"loss": -state.w}

  cfg = common.LoopConfig(steps=steps, log_every=1, eval_every=2, checkpoint_every=3,
                          resume=resume, stop_at=stop_at)
  state = _State(jnp.int32(0), jnp.float32(0.0))
  switch = common.Phase(switch_at, "double", second, lambda s: {"phase": 2.0})
  return common.train_loop("toy", str(tmp_path), state, first,
                           lambda step: (jnp.float32(1.0),), lambda s: {"phase": 1.0}, cfg,
                           common.StopRequested(), switch)


def _log(tmp_path):
  return [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]


def test_the_switch_happens_at_its_step_and_is_logged(tmp_path, capsys):
  out = _switch_loop(tmp_path)
  assert float(out["state"].w) == 4.0 * 2 ** 4          # 4 steps of +1, then 4 of x2
  recs = out["records"]
  switches = [r for r in recs if r["kind"] == "switch"]
  assert switches == [{"kind": "switch", "step": 4, "recipe": "double"}]
  i = recs.index(switches[0])                         # after step 4's records, before 5's
  assert recs[i - 1]["step"] == 4 and recs[i + 1]["step"] == 5
  # Evaluations up to the switch are the first phase's, after it the second's.
  assert [(r["step"], r["phase"]) for r in recs if r["kind"] == "eval"] == [
      (2, 1.0), (4, 1.0), (6, 2.0), (8, 2.0)]
  assert "step 4: switching to double for the last 4 steps" in capsys.readouterr().out


@pytest.mark.parametrize("stop_at", [3, 4, 5, 6])
def test_resume_on_either_side_of_the_switch_equals_an_uninterrupted_run(tmp_path, stop_at):
  straight = _switch_loop(tmp_path / "straight")
  wd = tmp_path / "resumed"
  first = _switch_loop(wd, stop_at=stop_at)
  assert first["interrupted"] and int(first["state"].step) == stop_at
  resumed = _switch_loop(wd, resume=True)
  assert float(resumed["state"].w) == float(straight["state"].w)
  assert _log(wd) == _log(tmp_path / "straight")


def test_a_resumed_runs_seconds_add_up(tmp_path):
  first = _switch_loop(tmp_path, stop_at=3)
  table = json.load(open(tmp_path / common.SECONDS_FILE))
  assert list(table) == ["3"] and 0 < table["3"] <= first["seconds"]
  resumed = _switch_loop(tmp_path, resume=True)        # counts on from step 3's time
  total = json.load(open(tmp_path / common.SECONDS_FILE))["8"]
  assert table["3"] < total <= resumed["seconds"]
  again = _switch_loop(tmp_path, resume=True)           # finished: restored, not retrained
  assert total <= again["seconds"] < total + 0.5
  _switch_loop(tmp_path, stop_at=3)                      # a fresh run forgets the old time
  assert list(json.load(open(tmp_path / common.SECONDS_FILE))) == ["3"]


def test_unfinished_seeds_are_left_out_of_the_statistics():
  # Seed 2 of nvfp4 stopped early (Ctrl-C / --stop_at): its loss must not average in with
  # finished seeds, nor pair with BF16's seed 2.
  base = _finals("bf16", {0: 2.0, 1: 2.1, 2: 1.9}, recipe="bf16")
  run = _finals("nvfp4", {0: 2.01, 1: 2.11, 2: 3.5})
  run[2]["interrupted"] = True
  finals = {"bf16": base, "nvfp4": run}
  rows = common.seed_rows(finals, ["val_loss"], [("gap", "val_loss", lambda n: "bf16")])
  by = {r["run"]: r for r in rows}
  assert by["nvfp4"]["val_loss"].n == 2 and by["nvfp4"]["val_loss"].mean == pytest.approx(2.06)
  assert by["nvfp4"]["gap"].n == 2 and by["nvfp4"]["gap"].mean == pytest.approx(0.01)
  assert by["nvfp4"]["seeds"] == "2 (+1 unfinished, left out)" and by["bf16"]["seeds"] == 3
  # A run with no finished seed (one Ctrl-C'd run) is summarised as it stands.
  only = common.seed_rows({"nvfp4": run[2:]}, ["val_loss"])
  assert only[0]["val_loss"].mean == 3.5 and only[0]["seeds"] == 1


def test_histories_are_the_requested_seeds_not_every_directory(tmp_path):
  for s in (0, 1, 5):
    d = tmp_path / "nvfp4" / f"seed_{s}"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "m": s}) + "\n")
  finals = {"nvfp4": [{"seed": 0}, {"seed": 1}]}          # an earlier command left seed 5
  logs = common.read_histories(str(tmp_path), finals, seeded=True)["nvfp4"]
  assert [l[0]["m"] for l in logs] == [0, 1]


def test_negative_seeds_are_refused():
  with pytest.raises(ValueError, match="non-negative"):
    seeds.parse_seeds(["-1", "2"], 0)
