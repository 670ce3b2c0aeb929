"""The Makefile's input check: a missing poster folder stops `make pipeline` before any work starts."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True)


def test_missing_poster_folder_is_a_clear_error_unless_no_poster_block(tmp_path):
    missing = tmp_path / "no_posters"
    result = make("posters-check", f"POSTERS={missing}", "DATA=dataset/x")
    assert result.returncode == 2
    assert f"no poster folder at {missing}" in result.stdout and "BLOCKS=genres,year,tags" in result.stdout
    assert make("posters-check", f"POSTERS={missing}", "BLOCKS=genres,year,tags").returncode == 0
    assert make("posters-check", f"POSTERS={missing}", "BLOCKS=genres,poster").returncode == 2
    assert make("posters-check", f"POSTERS={tmp_path}").returncode == 0


def test_pipeline_checks_posters_before_preparing_anything(tmp_path):
    venv = tmp_path / "venv"  # an up-to-date stand-in, so make does not build a real environment
    venv.mkdir()
    (venv / ".installed").touch()
    result = make("pipeline", f"POSTERS={tmp_path / 'none'}", f"RUN={tmp_path / 'run'}", f"VENV={venv}")
    assert result.returncode == 2 and "no poster folder" in result.stdout
    assert not (tmp_path / "run").exists()  # nothing was prepared


def test_cold_prepares_the_split_and_ends_the_pipeline_with_its_evaluation(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    common = [f"RUN={tmp_path / 'run'}", f"VENV={venv}", f"POSTERS={tmp_path}"]
    cold = make("-n", "pipeline", "COLD=0.05", *common).stdout
    assert "02_prepare_interactions.py" in cold and "--cold 0.05" in cold
    assert cold.index("train_decoder.py") < cold.index("11_cold_start.py") < cold.index("08_report.py")
    warm = make("-n", "pipeline", *common).stdout
    assert "--cold" not in warm and "11_cold_start.py" not in warm


def test_tmdb_details_add_the_text_block_when_the_file_exists(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    details = tmp_path / "details.jsonl"
    common = [f"RUN={tmp_path / 'run'}", f"VENV={venv}", f"POSTERS={tmp_path}", f"TMDB_DETAILS={details}"]
    absent = make("-n", "features", *common).stdout
    assert "--tmdb-details" not in absent and f"no TMDB details at {details}" in absent
    details.write_text("")
    present = make("-n", "features", *common).stdout
    assert f"--tmdb-details {details} --add-blocks text" in present
    # explicit blocks: the file is passed, the blocks are the user's
    chosen = make("-n", "features", "BLOCKS=genres,year,poster", *common).stdout
    assert f"--tmdb-details {details}" in chosen and "--add-blocks" not in chosen
    assert "--tmdb-details" not in make("-n", "features", "TEXT=no", *common).stdout   # opted out
    ablation = make("-n", "ablation", *common).stdout
    assert f"--with-text --tmdb-details {details}" in ablation and f"--out {tmp_path / 'run'}/ablation" in ablation
