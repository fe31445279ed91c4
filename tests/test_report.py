"""python -m fp4jax.report: an absl entry point like the others, with validated flags."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "fp4jax.report", *args], capture_output=True,
                        text=True, timeout=120, env=env, cwd=ROOT)


def test_help_lists_the_flags_and_bad_values_are_one_line_errors():
  p = _run("--help")   # absl prints the help and exits (status 1, its convention)
  for flag in ("--rows", "--cols", "--seed", "--markdown"):
    assert flag in p.stdout, f"{flag} missing from --help"
  p = _run("--rows=0")
  assert p.returncode != 0
  assert "--rows=0: 0 is not a positive integer" in p.stderr
  assert len(p.stderr.strip().splitlines()) <= 3, p.stderr


def test_importing_the_report_defines_no_flags_and_it_runs_from_code(capsys):
  from absl import flags
  import fp4jax.report as report
  assert "rows" not in flags.FLAGS and "markdown" not in flags.FLAGS
  report.print_report(rows=8, cols=32, seed=1, markdown=True)
  out = capsys.readouterr().out
  assert "| mxfp4 " in out and "SNR dB" in out


@pytest.mark.parametrize("kwargs", [{"rows": 0}, {"cols": -1}, {"rows": 2.5}])
def test_report_shape_must_be_positive(kwargs):
  import fp4jax.report as report
  with pytest.raises(ValueError, match=f"print_report: {next(iter(kwargs))} must be a positive int"):
    report.print_report(**kwargs)
