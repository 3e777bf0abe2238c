import dataclasses
import subprocess
import sys

import pytest
from conftest import ROOT, tg


def test_defaults_are_the_8xh100_recipe(make_settings):
    h = make_settings()
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (11, 512, 8, 8, 3.5)  # PR #585
    assert (h.bigram_buckets, h.xsa_last_n, h.rope_dims, h.ve_dim, h.ve_layers) == (8192, 11, 16, 128, "-2,-1")
    assert (h.max_wallclock_seconds, h.train_batch_tokens, h.train_seq_len) == (600.0, 786432, 2048)
    assert h.preset == "" and h.compile is True


def test_preset_then_env_overrides(make_settings):
    h = make_settings(preset="smoke", model_dim=64, compile="true")
    assert h.model_dim == 64  # explicit env var beats the preset
    assert h.num_layers == tg.PRESETS["smoke"]["num_layers"]  # the rest comes from the preset
    assert h.data_path == "./data/sample/fineweb_sp1024"
    assert h.compile is True


def test_presets_combine_left_to_right(make_settings):
    h = make_settings(preset="pr1683,smoke")
    assert h.attn_gate and h.value_residual and h.doc_mask  # from pr1683
    assert (h.num_layers, h.model_dim) == (4, 128)  # from smoke, applied last


def test_types_are_parsed(make_settings):
    h = make_settings(iterations="1e3", mlp_mult="3.5", compile="0", run_id="abc")
    assert h.iterations == 1000 and isinstance(h.iterations, int)
    assert h.mlp_mult == 3.5 and h.compile is False and h.run_id == "abc"


@pytest.mark.parametrize("env, message", [
    (dict(num_layers="abc"), "NUM_LAYERS='abc' is not an integer"),
    (dict(iterations="1.5"), "ITERATIONS='1.5' is not an integer"),
    (dict(matrix_lr="fast"), "MATRIX_LR='fast' is not a number"),
    (dict(compile="maybe"), "COMPILE='maybe' is not 0 or 1"),
    (dict(num_layers="0"), "NUM_LAYERS=0 must be > 0"),
    (dict(warmdown_iters="-1"), "WARMDOWN_ITERS=-1 must be >= 0"),
    (dict(beta2="1.0"), "BETA2=1.0 must be in [0, 1)"),
    (dict(num_heads="3"), "NUM_HEADS=3 must divide MODEL_DIM=512"),
    (dict(num_kv_heads="3"), "NUM_KV_HEADS=3 must divide NUM_HEADS=8"),
    (dict(device="tpu"), "DEVICE='tpu' must be one of: auto, cpu, cuda"),
    (dict(mlp_act="gelu"), "MLP_ACT='gelu' must be one of: relu2, leaky_relu2"),
    (dict(rope_dims="15"), "ROPE_DIMS=15 must be even and at most the head dim 64"),
    (dict(rope_dims="128"), "ROPE_DIMS=128 must be even and at most the head dim 64"),
    (dict(ve_layers="9,11"), "VE_LAYERS='9,11' must be comma-separated layer indices in [-11, 10]"),
    (dict(ve_layers="nine"), "VE_LAYERS='nine' must be comma-separated layer indices"),
    (dict(bigram_buckets="1"), "BIGRAM_BUCKETS must be 0 (off) or >= 2"),
    (dict(preset="huge"), "PRESET='huge' is unknown; choose from: baseline, pr585, pr1683, pr592, pr578, pr1319, smoke, caseops"),
    (dict(preset="smoke,huge"), "PRESET='huge' is unknown"),
    (dict(resume="/nonexistent/run.ckpt"), "RESUME=/nonexistent/run.ckpt does not exist"),
    (dict(eval_artifact="/nonexistent/m.ptz"), "EVAL_ARTIFACT=/nonexistent/m.ptz does not exist"),
    (dict(vocab_size="70000"), "does not fit the uint16 shard format"),
    (dict(compressor="zip"), "COMPRESSOR='zip' must be one of: zstd, lzma, brotli, rans, hybrid"),
    (dict(quant_clip_mlp="max"), "QUANT_CLIP_MLP='max' must be one of: absmax, pct, std, auto"),
    (dict(quant_method="awq"), "QUANT_METHOD='awq' must be one of: gptq, rtn"),
    (dict(clip_sigmas="3,x"), "CLIP_SIGMAS='3,x' must be a comma-separated list of positive numbers"),
    (dict(clip_percentiles="0.99,1.5"), "CLIP_PERCENTILES='0.99,1.5' must be fractions in (0, 1]"),
    (dict(calib_source="val"), "CALIB_SOURCE='val' must be one of: selfgen, train"),
    (dict(calib_source="train"), "CALIB_SOURCE=train reads training data, which needs time inside the budget"),
    (dict(target_bytes="-2"), "TARGET_BYTES=-2 must be >= 0, or -1 for no pruning"),
    (dict(prune_fraction="1.5"), "PRUNE_FRACTION=1.5 must be in [0, 1]"),
    (dict(calib_temp="0"), "CALIB_TEMP=0.0 must be > 0"),
])
def test_bad_values_raise_one_clear_error(make_settings, env, message):
    with pytest.raises(tg.SettingsError) as err:
        make_settings(**env)
    assert message in str(err.value)


def test_misspelt_env_vars_are_named():
    env = {"NUM_LAYER": "3", "MATRIX_LRR": "0.1", "NUM_LAYERS": "2", "PATH": "/bin", "HOME": "/root",
           "RANK": "0", "WORLD_SIZE": "2", "TORCH_HOME": "x"}
    assert tg.misspelt_settings(env) == [("MATRIX_LRR", "MATRIX_LR"), ("NUM_LAYER", "NUM_LAYERS")]


def test_batch_must_split_into_whole_sequences(tiny):
    h = tiny(train_batch_tokens=100)
    with pytest.raises(tg.SettingsError, match="TRAIN_BATCH_TOKENS=100 must split"):
        tg.resolve_grad_accum(h, tg.Runtime())
    h = tiny(grad_accum_steps=0, train_batch_tokens=8 * 32)
    assert tg.resolve_grad_accum(h, tg.Runtime(world_size=2)) == 4  # 8 // world_size


def test_script_exits_with_one_line_on_a_bad_value(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "NUM_LAYERS": "eleven", "LOG_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: NUM_LAYERS='eleven' is not an integer"


def test_every_setting_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [f.name.upper() for f in dataclasses.fields(tg.Settings) if f"`{f.name.upper()}`" not in readme]
    assert missing == []
