"""Replicas of the real pair from local files, and the dry run of a study config.

`known_replica(spec)` says where the parts of a known real model's replica come from in the
realdata folder (``$WAITLENS_REALDATA``, default ``../shared/realdata`` beside the repository;
see its SOURCES.md): s1.1 is the Qwen2.5 tokenizer (the Qwen2 BPE with Qwen2.5's 22 added
tokens) + the Qwen2.5-Instruct chat template + the s1 think/answer convention; R1-Distill-Qwen
is the same BPE with R1's special tokens at their ids + R1's chat template. `build_replica`
builds one (`hooks.replica`), cached by what defines it.

`dry_run_config(cfg)` turns any study config into its dry run: every model that is not
already CPU-sized is swapped for its replica, the work is capped (a few trajectories, short
generations), a hub dataset the realdata folder holds is read from there, and the run gets
its own name (``<name>-dry-run``), so a user checks a GPU config end to end on a CPU.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from waitlens.hooks.replica import ReplicaError, replica

REPO_ROOT = Path(__file__).resolve().parents[2]
QWEN25_DROP = ("<pad>", "<think>", "</think>", "<eos>")  # tokens the LLMTAI fine-tuner added (SOURCES.md)


def realdata_dir() -> Path:
    """Where the third-party tokenizer files live (``$WAITLENS_REALDATA`` or ../shared/realdata)."""
    env = os.environ.get("WAITLENS_REALDATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "realdata"


@dataclass(frozen=True)
class ReplicaSource:
    """Where a known model's replica parts come from, relative to the realdata folder."""

    config: str  # a config.json of the same architecture family
    tokenizer: str  # "qwen2.5" (assembled), or a tokenizer directory
    chat_template: str
    format: str
    bpe: str | None = None  # the Qwen2 BPE directory for a config-only R1-distill tokenizer
    note: str = ""


_S1 = ReplicaSource("tokenizer/qwen2-boundless/config.json", "qwen2.5", "chat_templates/qwen2.5-instruct.jinja", "s1",
                    note="config: Qwen2-1.5B-Instruct (Qwen2 family); tokenizer: Qwen2 BPE + Qwen2.5 added tokens")
_S1_32 = replace(_S1, config="tokenizer/deepseek-r1-distill-qwen-32b/config.json",
                 note="config: the Qwen2.5-32B shape (R1-Distill-Qwen-32B's config.json)")
_R1 = ReplicaSource("tokenizer/deepseek-r1-distill-qwen-32b/config.json", "tokenizer/deepseek-r1-distill-qwen-32b",
                    "chat_templates/deepseek-r1-distill-qwen.current.jinja", "r1", bpe="tokenizer/qwen2-boundless",
                    note="config: R1-Distill-Qwen-32B's (the 1.5B's own config.json is not available; same family)")
KNOWN_REPLICAS: dict[str, ReplicaSource] = {
    "simplescaling/s1.1-1.5B": _S1, "simplescaling/s1.1-7B": _S1, "simplescaling/s1.1-32B": _S1_32,
    "simplescaling/s1-32B": _S1_32, "s1.1": _S1,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _R1, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _R1,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _R1, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": _R1, "r1-distill": _R1,
}
# hub datasets the realdata folder holds (for the dry run's problems)
KNOWN_DATASETS = {"HuggingFaceH4/MATH-500": "benchmarks/math500_test.jsonl"}


def known_replica(spec: str) -> ReplicaSource | None:
    return KNOWN_REPLICAS.get(spec)


def _need(path: Path, spec: str) -> Path:
    if not path.exists():
        raise ReplicaError(f"replica of {spec}: {path} not found (the realdata folder: set WAITLENS_REALDATA, "
                           f"or place it at {REPO_ROOT.parent / 'shared' / 'realdata'})")
    return path


def qwen25_tokenizer_dir(root: Path, dest: Path) -> Path:
    """A Qwen2.5 tokenizer directory: the Qwen2 BPE's vocab/merges with the Qwen2.5-Instruct
    tokenizer_config (its 22 added tokens; the four tokens the fine-tuner added dropped)."""
    bpe = _need(root / "tokenizer" / "qwen2-boundless", "s1.1")
    cfg = json.loads(_need(root / "tokenizer" / "qwen2.5-instruct-derived" / "tokenizer_config.json",
                           "s1.1").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items()
                                   if v.get("content") not in QWEN25_DROP}
    cfg["additional_special_tokens"] = [t for t in cfg.get("additional_special_tokens", []) if t not in QWEN25_DROP]
    cfg["pad_token"] = "<|endoftext|>"
    cfg.pop("chat_template", None)  # the template comes from its own file
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (dest / name).write_bytes((bpe / name).read_bytes())
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def build_replica(spec: str, out: str | os.PathLike | None = None, *, n_layers: int = 2, d_model: int = 64,
                  seed: int = 0, tokenizer=None, chat_template=None, format=None, bpe=None,
                  overwrite: bool = False) -> Path:
    """A replica of `spec`: a known real model from the realdata folder, else `hooks.replica`
    on the spec itself (a model directory, a config.json, or a hub id with the internet)."""
    src = known_replica(spec)
    if src is None or tokenizer is not None:
        return replica(spec, out, n_layers=n_layers, d_model=d_model, seed=seed, tokenizer=tokenizer,
                       chat_template=chat_template, bpe=bpe, format=format, overwrite=overwrite)
    root = realdata_dir()
    with tempfile.TemporaryDirectory(prefix="waitlens-qwen25-") as tmp:
        if src.tokenizer == "qwen2.5":
            tok = qwen25_tokenizer_dir(root, Path(tmp) / "tok")
        else:
            tok = _need(root / src.tokenizer, spec)
        return replica(_need(root / src.config, spec), out, n_layers=n_layers, d_model=d_model, seed=seed,
                       tokenizer=tok, chat_template=chat_template or _need(root / src.chat_template, spec),
                       bpe=bpe or (_need(root / src.bpe, spec) if src.bpe else None),
                       format=format or src.format, overwrite=overwrite, spec_name=spec)


def resolve(variant: str) -> Path:
    """The ``replica`` model family (entry point ``waitlens.models``): ``replica:NAME`` or
    ``replica:NAME@SEED`` is the 2-layer, d_model-64 replica of a known real model, built on
    first use into the cache (`build_replica`)."""
    name, _, seed = variant.partition("@")
    if known_replica(name) is None:
        raise ReplicaError(f"no known replica {name!r}; known: {sorted(KNOWN_REPLICAS)} "
                           "(any other model: waitlens replica SPEC --out DIR, then use DIR)")
    try:
        n = int(seed) if seed else 0
    except ValueError:
        raise ReplicaError(f"replica seed must be a whole number, got {seed!r} in {variant!r}") from None
    return build_replica(name, seed=n)


# ---------------------------------------------------------------------------------------------
# the dry run
DRY_RUN_CAPS = {"n_problems": 6, "n_per_problem": 1, "max_new_tokens": 48, "answers": 6, "patching": 4,
                "ablations": 6}


def _cpu_sized(spec: str) -> bool:
    """Specs already small enough for a CPU: named families (the organism) and the offline GGUF."""
    family, sep, _ = spec.partition(":")
    return spec == "smollm2" or spec.endswith(".gguf") or (bool(sep) and "/" not in family and not Path(spec).exists())


def dry_run_config(cfg, *, n_layers: int = 2, d_model: int = 64):
    """The dry run of a study config (module doc): a new StudyConfig, models swapped for replicas."""
    from waitlens.experiments.config import ConfigError, ModelSpec

    dry = copy.deepcopy(cfg)
    dry.name = f"{cfg.name}-dry-run"
    dry.device = "cpu"
    models = {}
    for i, (name, m) in enumerate(cfg.models.items()):
        if _cpu_sized(m.spec):
            models[name] = m
            continue
        try:
            path = build_replica(m.spec, n_layers=n_layers, d_model=d_model, seed=i)
        except ReplicaError as e:
            raise ConfigError(f"{cfg.source}: models.{name}: no replica for the dry run ({e})") from None
        models[name] = ModelSpec(spec=str(path), format=m.format, dtype="float32", revision=None)
    dry.models = models
    t = dry.trajectories
    if t.source == "sample" or t.problems != "organism":
        t.n_problems = min(t.n_problems, DRY_RUN_CAPS["n_problems"])
        t.n_per_problem = min(t.n_per_problem, DRY_RUN_CAPS["n_per_problem"])
        t.max_new_tokens = min(t.max_new_tokens, DRY_RUN_CAPS["max_new_tokens"])
    uses_hf = t.source == "hf" or (t.source == "sample" and t.problems == "hf")
    if uses_hf:
        local = KNOWN_DATASETS.get(t.dataset or "")
        if local is None:
            raise ConfigError(f"{cfg.source}: trajectories.dataset {t.dataset!r} needs the hub; the dry run knows "
                              f"only {sorted(KNOWN_DATASETS)} offline")
        path = _need(realdata_dir() / local, t.dataset)
        if t.source == "sample":
            t.problems, t.path = "jsonl", str(path)
        else:
            t.source, t.path = "jsonl", str(path)
    if hasattr(t, "limit"):
        t.limit = min(t.limit or 10**9, 24)
    dry.answers.max_trajectories = min(dry.answers.max_trajectories, DRY_RUN_CAPS["answers"])
    dry.patching.max_trajectories = min(dry.patching.max_trajectories, DRY_RUN_CAPS["patching"])
    dry.ablations.max_trajectories = min(dry.ablations.max_trajectories, DRY_RUN_CAPS["ablations"])
    dry.capture.storage_dtype = "float32"
    return dry


__all__ = ["KNOWN_REPLICAS", "ReplicaSource", "build_replica", "dry_run_config", "known_replica", "realdata_dir",
           "resolve"]
