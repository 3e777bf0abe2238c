"""Whole runs of train_gpt.py as a user starts them: one process, torchrun on 2 CPU processes, PRESET=smoke."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TOKENIZER

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+)", re.M)
FINAL = re.compile(r"^final_quant_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", re.M)


def run(cmd, env, tmp_path, timeout=300):
    full_env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    full_env.update(PATH=os.environ["PATH"], LOG_DIR=str(tmp_path / "logs"), **env)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def tiny_run_env(data_path, **extra):
    return {**dict(DATA_PATH=str(data_path), TOKENIZER_PATH=str(TOKENIZER), DEVICE="cpu", COMPILE="0",
                   NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="32",
                   EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="256", ITERATIONS="6", WARMUP_STEPS="1",
                   MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS="3", VAL_LOSS_EVERY="3", TRAIN_LOG_EVERY="1",
                   CALIB_SEQS="4", CALIB_LEN="32", OMP_NUM_THREADS="1", EVAL_PASSES="plain"), **extra}


# The frontier at test size on sp1024 data: 4 layers, 1..2 looped from step 3 of 6, lanes from layer 3, scored
# by sliding windows through the n-gram tilt. (LoRA TTT's ranks carry their own adapters from batch to batch,
# so its score depends on the world size by design; tests/test_lora_ttt.py checks 2 ranks = 1 at LORA_LR=0.)
FRONTIER = dict(PRESET="frontier", VOCAB_SIZE="1024", NUM_LAYERS="4", LOOP_START="1", LOOP_END="2",
                PARALLEL_START="3", LORA_TTT="0", TTT_EPOCHS="0")


@pytest.mark.parametrize("parallel_muon,extra", [("1", {}), ("0", {}), ("1", FRONTIER)], ids=["parallel", "plain",
                                                                                            "frontier"])
def test_two_gloo_processes_follow_the_single_process_trajectory(small_data, tmp_path, parallel_muon, extra):
    """Parallel Muon (sharded banks) and plain Muon on 2 ranks both give the 1-process run; so does the
    frontier recipe (recurrence switch, lanes, Polar Express with MuonEq-R, calibration on training data)."""
    single = run([sys.executable, "train_gpt.py"],
                 tiny_run_env(small_data, GRAD_ACCUM_STEPS="2", RUN_ID="one", **extra), tmp_path)
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"],
                 tiny_run_env(small_data, GRAD_ACCUM_STEPS="1", RUN_ID="two", PARALLEL_MUON=parallel_muon, **extra),
                 tmp_path)
    if extra:
        assert "looping:enabled step:3" in single and "looping:enabled step:3" in double
    assert "world_size:2 grad_accum_steps:1" in double and "world_size:1 grad_accum_steps:2" in single
    one, two = STEP.findall(single), STEP.findall(double)
    assert [s for s, _ in one] == [s for s, _ in two] == [str(i) for i in range(1, 7)]
    for (_, a), (_, b) in zip(one, two):
        assert float(a) == pytest.approx(float(b), abs=2e-4)  # logged with 4 decimals
    averaged = re.compile(r"^final_weights:\S+ .*val_loss:([\d.]+)", re.M)
    assert averaged.findall(single) == averaged.findall(double)  # the weights before export agree
    # The frontier calibrates on training batches: each rank sums its own Hessians and the all-reduce adds them
    # in another order than one process does, so GPTQ (and LQER's top-k) may round a few codes the other way.
    rel = 1e-4 if extra else 1e-5
    (loss1, bpb1), (loss2, bpb2) = FINAL.findall(single)[0], FINAL.findall(double)[0]
    assert float(loss1) == pytest.approx(float(loss2), rel=rel)
    assert float(bpb1) == pytest.approx(float(bpb2), rel=rel)


def test_smoke_preset_runs_end_to_end(tmp_path):
    out = run([sys.executable, "train_gpt.py"], dict(PRESET="smoke", ITERATIONS="3", RUN_ID="smoke"), tmp_path)
    for line in ("val_tokens:628456 val_bytes:1489418", "step:3/3 train_loss:", "step:3/3 val_loss:",
                 "final_weights:ema", "Serialized model gptq+hybrid:", "Code size:", "Total submission size gptq+hybrid:",
                 "gptq:calibration source:selfgen", "quant_group:mlp", "artifact_time:",
                 "eval_projection pass:sliding", "eval_projection total:", "final_quant_sliding_window val_loss:",
                 "stride:128", "total_eval_time:"):
        assert line in out
    assert "final_quant_roundtrip" not in out  # one pass gives the score; others only when EVAL_PASSES asks
    assert "scored_tokens:628456 scored_bytes:1489418" in out
    logged = (tmp_path / "logs" / "smoke.txt").read_text()
    assert logged.startswith((ROOT / "train_gpt.py").read_text())  # the log opens with the source
    assert "python:" in logged and "  model_dim:128" in logged and "final_quant_sliding_window_exact" in logged
    assert (tmp_path / "logs" / "smoke.ptz").stat().st_size > 0


def test_resume_from_a_checkpoint_continues_the_run(small_data, tmp_path):
    env = tiny_run_env(small_data, WARMDOWN_ITERS="0", VAL_LOSS_EVERY="0", CHECKPOINT_EVERY_SECONDS="1e-9")
    whole = run([sys.executable, "train_gpt.py"], {**env, "RUN_ID": "whole"}, tmp_path)
    run([sys.executable, "train_gpt.py"], {**env, "RUN_ID": "part", "ITERATIONS": "3"}, tmp_path)
    resumed = run([sys.executable, "train_gpt.py"],
                  {**env, "RUN_ID": "rest", "RESUME": str(tmp_path / "logs" / "part.ckpt")}, tmp_path)
    assert "checkpoint:resumed step:3" in resumed
    assert STEP.findall(resumed)[0][0] == "4" and STEP.findall(resumed)[-1] == STEP.findall(whole)[-1]
    assert FINAL.findall(resumed) == FINAL.findall(whole)


TTT_EXACT = re.compile(r"^legal_ttt_exact val_loss:([\d.]+) val_bpb:([\d.]+)", re.M)


def test_eval_artifact_reproduces_the_score_and_ttt_ranks_stay_in_step(small_data, tmp_path):
    env = tiny_run_env(small_data, EVAL_STRIDE="0", TTT_EPOCHS="0")
    trained = run([sys.executable, "train_gpt.py"], {**env, "RUN_ID": "art"}, tmp_path)
    artifact = str(tmp_path / "logs" / "art.ptz")
    again = run([sys.executable, "train_gpt.py"], {**env, "RUN_ID": "again", "EVAL_ARTIFACT": artifact}, tmp_path)
    assert FINAL.findall(again) == FINAL.findall(trained) and "step:" not in again  # no training
    ttt_env = {**env, "EVAL_ARTIFACT": artifact, "EVAL_STRIDE": "16", "TTT_EPOCHS": "1", "TTT_CHUNK_TOKENS": "1000",
               "TTT_SEQ_LEN": "32", "TTT_BATCH_SEQS": "4", "TTT_LR": "0.01", "EVAL_PASSES": "plain,sliding"}
    one = run([sys.executable, "train_gpt.py"], {**ttt_env, "RUN_ID": "t1"}, tmp_path)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"],
              {**ttt_env, "RUN_ID": "t2"}, tmp_path)
    assert "final_quant_sliding_window val_loss:" in one and "ttt_chunk [4/4]" in one
    (l1, b1), (l2, b2) = TTT_EXACT.findall(one)[0], TTT_EXACT.findall(two)[0]
    assert float(l1) == pytest.approx(float(l2), rel=1e-5) and float(b1) == pytest.approx(float(b2), rel=1e-5)
    blob = (tmp_path / "logs" / "art.ptz").read_bytes()
    (tmp_path / "bad.ptz").write_bytes(blob[:-10])
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "LOG_DIR": str(tmp_path), **env,
                               "EVAL_ARTIFACT": str(tmp_path / "bad.ptz")})
    assert proc.returncode == 2 and proc.stderr.startswith("error: artifact is corrupt or truncated")


def test_calibration_on_training_batches_one_and_two_ranks(small_data, tmp_path):
    """CALIB_SOURCE=train: every rank reads its own batches, and the Hessians are summed across ranks."""
    env = tiny_run_env(small_data, CALIB_SOURCE="train", CALIB_SEQS="8", QUANT_MIN_NUMEL="0", EVAL_STRIDE="0",
                       TTT_EPOCHS="0")
    one = run([sys.executable, "train_gpt.py"], {**env, "RUN_ID": "c1", "GRAD_ACCUM_STEPS": "2"}, tmp_path)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"],
              {**env, "RUN_ID": "c2", "GRAD_ACCUM_STEPS": "1"}, tmp_path)
    for out in (one, two):
        line = re.search(r"^gptq:calibration source:train tokens:(\d+) hessians:(\d+)", out, re.M)
        assert line and int(line.group(1)) >= 8 * 32 and int(line.group(2)) > 10
        assert FINAL.search(out) and "selfgen" not in out


def test_non_finite_loss_stops_with_the_step(small_data, tmp_path):
    env = tiny_run_env(small_data, TIED_EMBED_LR="1e30", MATRIX_LR="1e30", ITERATIONS="20", VAL_LOSS_EVERY="0")
    full_env = {"PATH": os.environ["PATH"], "LOG_DIR": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: train loss is (nan|inf) at step \d+; lower the learning rates .*\n", proc.stderr)
