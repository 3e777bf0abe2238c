"""Record tooling: logs -> submission.json with the significance test, plots, recipes, the planner."""
import json
import math
import statistics
import subprocess
import sys

import pytest
from conftest import ROOT, load_module, tg
from scipy import stats
from test_end_to_end import FINAL, run, tiny_run_env

logs_mod = load_module("logs", ROOT / "records" / "tools" / "logs.py")
submission = load_module("submission", ROOT / "records" / "tools" / "submission.py")
plot = load_module("plot", ROOT / "records" / "tools" / "plot.py")


@pytest.fixture(scope="module")
def three_logs(tmp_path_factory):
    """Three seeds of a tiny run, as a user makes them."""
    from conftest import SAMPLE, make_shards
    tmp = tmp_path_factory.mktemp("records")
    data = tmp / "data"
    data.mkdir()
    train = tg.read_shard(SAMPLE / "fineweb_train_000000.bin", 1024)
    make_shards.write_shard(data / "fineweb_train_000000.bin", train[:30_000])
    make_shards.write_shard(data / "fineweb_val_000000.bin", tg.read_shard(SAMPLE / "fineweb_val_000000.bin", 1024)[:3000])
    outputs = {}
    for seed in (1, 2, 3):
        outputs[seed] = run([sys.executable, "train_gpt.py"],
                            tiny_run_env(data, SEED=str(seed), RUN_ID=f"s{seed}", ITERATIONS="4", EVAL_STRIDE="32",
                                         TTT_EPOCHS="0", EVAL_PASSES="plain"), tmp)
    return [tmp / "logs" / f"s{seed}.txt" for seed in (1, 2, 3)], outputs, tmp


def test_submission_json_from_logs(three_logs, tmp_path):
    paths, outputs, tmp = three_logs
    packed = tmp / "logs" / "s1.packed.py"  # the packed script whose bytes the runs counted (CODE_PACK=1)
    assert packed.read_text() == tg.pack_source((ROOT / "train_gpt.py").read_text())
    with pytest.raises(SystemExit, match="it is not the script that made them"):
        submission.main([*map(str, paths), "--name", "tiny", "--author", "A", "--github-id", "a",
                         "--out", str(tmp_path / "raw"), "--script", str(ROOT / "train_gpt.py")])
    sub = submission.main([*map(str, paths), "--name", "tiny", "--author", "A", "--github-id", "a",
                           "--out", str(tmp_path), "--script", str(packed)])
    on_disk = json.loads((tmp_path / "submission.json").read_text())
    assert on_disk == sub and sub["seeds"] == [1, 2, 3] and sub["track"] == "10min_16mb"
    sliding = [float(line.split("val_bpb:")[1].split()[0]) for o in outputs.values()
               for line in o.splitlines() if line.startswith("final_quant_sliding_window_exact")]
    assert sub["scored_by"] == "sliding" and sub["val_bpb"] == pytest.approx(statistics.mean(sliding), abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(sliding), abs=1e-8)
    assert sub["bytes_code"] == len(packed.read_bytes())
    assert sub["compliance"]["artifact_under_16mb"] and sub["compliance"]["train_under_600s"]
    assert sub["compliance"]["three_seeds"] and sub["compliance"]["score_first_ttt"] is None
    assert (tmp_path / "train_gpt.py").read_bytes() == packed.read_bytes()
    assert (tmp_path / "s1.txt").exists() and "| **mean ± std** |" in (tmp_path / "results.md").read_text()
    quantized = [float(m[1]) for o in outputs.values() for m in FINAL.findall(o)]
    assert [logs_mod.read_log(p).stages["quantized"][1] for p in paths] == quantized


def test_welch_test_matches_an_independent_computation():
    ours = [1.8801, 1.8795, 1.8810]
    ref = [1.8903, 1.8890, 1.8911, 1.8899]
    got = submission.welch_test(ours, ref)
    shifted = [r - 0.005 for r in ref]
    m1, m2 = sum(ours) / 3, sum(shifted) / 4
    v1 = sum((x - m1) ** 2 for x in ours) / 2 / 3
    v2 = sum((x - m2) ** 2 for x in shifted) / 3 / 4
    t = (m1 - m2) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 3)
    assert got["t_statistic"] == pytest.approx(t, rel=1e-9) and got["welch_df"] == pytest.approx(df, rel=1e-9)
    assert got["p_value"] == pytest.approx(stats.t.cdf(t, df), rel=1e-6)  # one-sided: ours lower
    assert got["delta_nats"] == pytest.approx(sum(ref) / 4 - m1) and got["significant"] == (got["p_value"] < 0.01)
    assert not submission.welch_test([1.0, 1.001, 0.999], [1.002, 1.003, 1.001])["significant"]  # < 0.005 nats


def test_reference_bpb_is_converted_with_the_logs_bytes_per_token(three_logs, tmp_path):
    paths, _, _ = three_logs
    sub = submission.main([*map(str, paths), "--name", "t", "--author", "A", "--github-id", "a",
                           "--out", str(tmp_path), "--reference-bpb", "9.0,9.1,9.2"])
    run0 = logs_mod.read_log(paths[0])
    ratio = math.log(2) * run0.val_bytes / run0.val_tokens
    assert sub["significance"]["reference_val_loss"] == pytest.approx([9.0 * ratio, 9.1 * ratio, 9.2 * ratio])
    assert sub["significance"]["significant"] and "significant at p < 0.01" in (tmp_path / "results.md").read_text()


def test_bad_logs_are_refused_with_a_reason(three_logs, tmp_path):
    paths, _, _ = three_logs
    text = paths[0].read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[:text.rindex("final_quant_roundtrip val_loss")])
    other = tmp_path / "other.txt"
    other.write_text(text.replace("  matrix_lr:0.025", "  matrix_lr:0.03").replace("seed:1\n", "seed:9\n"))
    for logs, message in [([cut, paths[1]], r"no final score line"),
                          ([paths[0], paths[0]], "seeds repeat"),
                          ([paths[1], other], "differs from .* in matrix_lr")]:
        with pytest.raises(SystemExit, match=message):
            submission.main([*map(str, logs), "--name", "t", "--author", "A", "--github-id", "a", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not the script that made them"):
        submission.main([*map(str, paths), "--name", "t", "--author", "A", "--github-id", "a",
                         "--out", str(tmp_path), "--script", str(ROOT / "README.md")])


def test_plot_is_written(three_logs, tmp_path):
    paths, _, _ = three_logs
    out = tmp_path / "curves.png"
    plot.main([*map(str, paths), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_record_folder_script_finds_the_data_from_inside(make_settings, monkeypatch, tmp_path):
    folder = ROOT / "records"
    monkeypatch.chdir(folder / "recipes" / "pr585")
    h = make_settings(preset="smoke")
    assert h.data_path == str(ROOT / "data" / "sample" / "fineweb_sp1024")
    assert h.tokenizer_path == str(ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model")


def test_recipes_name_existing_presets():
    run_sh = (ROOT / "records" / "recipes" / "run_seeds.sh").read_text()
    assert "PRESET=$preset SEED=$seed" in run_sh and "records/tools/submission.py" in run_sh
    for preset in ("pr585", "pr1683", "pr592", "pr578", "pr1319"):
        readme = (ROOT / "records" / "recipes" / preset / "README.md").read_text()
        assert f"PRESET={preset} SEED=1337 torchrun" in readme and f"run_seeds.sh {preset}" in readme
        assert "**Status:**" in readme and "**Published claim:**" in readme


@pytest.mark.parametrize("preset", list(tg.PRESETS))
def test_planner_reports_the_real_parameter_count(preset, tmp_path, make_settings):
    env = {"PATH": "/usr/bin:/bin", "PLAN": "1", "PRESET": preset, "DATA_PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = sum(p.numel() for p in tg.GPT(make_settings(preset=preset)).parameters())
    assert f"model_params:{expected}\n" in proc.stdout
    for key in ("flops_per_token forward:", "artifact_estimate (initialized weights, not trained ones; rtn+rans):",
                "memory_estimate per GPU on 8:", "budget_estimate 8xH100 at MFU 0.25:"):
        assert key in proc.stdout
