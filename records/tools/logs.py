"""Read train_gpt.py logs: the settings, the per-step curves and every score line, by key:value."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SEPARATOR = "=" * 100  # train_gpt.py writes it after the source code it logs first

# stage -> the log line that carries its score; "exact" lines have 8 decimals
STAGES = {
    "live": re.compile(r"^step:(\d+)/\d+ val_loss:([\d.]+) val_bpb:([\d.]+)", re.M),
    "averaged": re.compile(r"^final_weights:\w+ swa_snapshots:\d+ val_loss:([\d.]+) val_bpb:([\d.]+)", re.M),
    "quantized": re.compile(r"^final_\w+_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", re.M),
    "sliding": re.compile(r"^final_\w+_sliding_window_exact val_loss:([\d.]+) val_bpb:([\d.]+)", re.M),
    "ttt": re.compile(r"^legal_(?:q|lora_)?ttt_exact val_loss:([\d.]+) val_bpb:([\d.]+)", re.M),
}


class LogError(ValueError):
    """A log that is incomplete or not from train_gpt.py; the message names the file."""


@dataclasses.dataclass
class RunLog:
    path: Path
    settings: dict[str, str]
    seed: int
    train_curve: list[tuple[int, float]]
    val_curve: list[tuple[int, float]]
    stages: dict[str, tuple[float, float]]  # stage -> (val_loss, val_bpb)
    bytes_total: int
    bytes_code: int
    bytes_model: int
    steps: int
    train_seconds: float
    eval_seconds: float | None
    val_tokens: int
    val_bytes: int
    world_size: int
    gpu: str
    ttt: bool
    slot: bool

    @property
    def final_stage(self) -> str:
        """The score of the run: the last evaluation pass it made."""
        return next(s for s in ("ttt", "sliding", "quantized") if s in self.stages)

    @property
    def val_loss(self) -> float:
        return self.stages[self.final_stage][0]

    @property
    def val_bpb(self) -> float:
        return self.stages[self.final_stage][1]


def _one(pattern: str, text: str, path: Path, what: str, cast=float):
    m = re.search(pattern, text, re.M)
    if m is None:
        raise LogError(f"{path}: no {what} line; the run did not finish (or this is not a train_gpt.py log)")
    return cast(m.group(1))


def read_log(path: str | Path) -> RunLog:
    path = Path(path)
    full = path.read_text(encoding="utf-8", errors="replace")
    if SEPARATOR not in full:
        raise LogError(f"{path}: not a train_gpt.py log (no source/run separator)")
    text = full.split(SEPARATOR, 1)[1]
    settings = dict(re.findall(r"^  (\w+):(.*)$", text, re.M))
    stages = {}
    for stage, pattern in STAGES.items():
        found = pattern.findall(text)
        if found:
            last = found[-1]
            stages[stage] = (float(last[-2]), float(last[-1]))
    if not {"quantized", "sliding", "ttt"} & stages.keys():
        raise LogError(f"{path}: no final score line (final_*_roundtrip_exact, final_*_sliding_window_exact or "
                       "legal_*ttt_exact); the run did not finish")
    time_line = re.search(r"^time: .*training:([\d.]+)s.*steps:(\d+)", text, re.M)
    if time_line is None:
        train_seconds, steps = 0.0, 0  # an EVAL_ARTIFACT log: no training in it
    else:
        train_seconds, steps = float(time_line.group(1)), int(time_line.group(2))
    eval_s = re.search(r"^total_eval_time:([\d.]+)s", text, re.M)
    gpu = re.search(r"(H100|H200|A100|B200)[^\n|]*", full)
    return RunLog(
        path=path, settings=settings,
        seed=_one(r"^seed:(\d+)", text, path, "seed:", int),
        train_curve=[(int(s), float(v)) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", text, re.M)],
        val_curve=[(int(s), float(b)) for s, _, b in STAGES["live"].findall(text)],
        stages=stages,
        bytes_total=_one(r"^Total submission size \S+: (\d+) bytes", text, path, "Total submission size", int),
        bytes_code=_one(r"^Code size: (\d+) bytes", text, path, "Code size", int),
        bytes_model=_one(r"^Serialized model \S+: (\d+) bytes", text, path, "Serialized model", int),
        steps=steps, train_seconds=train_seconds,
        eval_seconds=float(eval_s.group(1)) if eval_s else None,
        val_tokens=_one(r"^val_tokens:(\d+)", text, path, "val_tokens", int),
        val_bytes=_one(r"val_bytes:(\d+)", text, path, "val_bytes", int),
        world_size=_one(r"^world_size:(\d+)", text, path, "world_size", int),
        gpu=gpu.group(0).strip() if gpu else "cpu",
        ttt="ttt" in stages, slot=bool(re.search(r"^final_\w+_sliding_window .*slot_steps:\d+", text, re.M)),
    )
