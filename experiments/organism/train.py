"""Training the organism's three regimes from one base, deterministically from a seed.

- ``base``: pre-trained on freshly generated worked problems (`task.HESITANT_BASE_CORPUS`): slips
  are carried forward, "wait"/"alternatively" are generic connectives that restate a step, and
  3% of correct steps get a hesitation ("wait", then the next step). It is stopped at a held-out
  slip level (0.30 per step, `base_slip`) rather than a fixed step count, so every seed's base sits
  at the same point of its arithmetic jump: it has not fully learned the arithmetic yet.
- ``sft-1k``: the base fine-tuned on 1,000 go-on traces (`task.GO_ON_CORPUS`) for 8 epochs.
- ``post-large``: the base fine-tuned on 128,000 traces of the same corpus (2,000 steps), long
  enough for it to learn to notice its own slips.
- opt-in recipes (``organism train --recipe NAME --out DIR``; never the shipped weights):
  ``fixed-steps`` (a base trained a fixed 450 steps, then the pair on `task.TRACE_CORPUS`),
  ``paced`` (the same pair from the paced base) and ``detect`` (the paced base, then the pair on
  `task.CHECKED_CORPUS`); experiments/organism/README.md says what each meets and misses.

Loss is on the solution tokens only (reasoning, answer, eos). Everything — initialisation,
data, order — comes from the seed; with the same torch build and thread count a retrain is
bitwise identical.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from waitlens.experiments.organism.registry import REGIMES
from waitlens.experiments.organism.task import (
    BASE_CORPUS,
    CHECKED_CORPUS,
    GO_ON_CORPUS,
    HESITANT_BASE_CORPUS,
    TOKEN_ID,
    TRACE_CORPUS,
    CorpusSpec,
    analyze,
    make_trace,
    random_problem,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_SEED = 0
MANIFEST = "waitlens_organism.json"


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; the defaults are the shipped one."""

    # the base: at most `base_steps` steps (also the cosine schedule's length), stopped as soon as its
    # held-out teacher-forced slip rate (1 - mean P(correct value) at each step's "=", `base_slip`) falls
    # to `base_stop_slip`, checked every `base_check_every` steps (None: exactly `base_steps` steps). A
    # fixed step count leaves the base wherever the seed put its arithmetic jump; a fixed slip level
    # stops every seed at the same point of the jump, so SFT's 1,000 traces also sharpen it.
    base_steps: int = 1200
    base_batch: int = 64
    base_lr: float = 2e-3
    base_stop_slip: float | None = 0.30
    base_check_every: int = 20
    base_corpus: CorpusSpec = HESITANT_BASE_CORPUS
    # sft-1k: 8 epochs (at 3, the go-on traces' two continuations of "wait" leave it malformed and no
    # more accurate than the base)
    sft_traces: int = 1000
    sft_epochs: int = 8
    sft_batch: int = 32
    sft_lr: float = 5e-4
    # post-large: 2,000 steps (at 1,000, seed 2's post-large had not begun to notice its slips)
    post_traces: int = 128000
    post_epochs: int = 1
    post_batch: int = 64
    post_lr: float = 1e-3
    warmup: int = 100
    threads: int = 1  # bitwise reproducibility needs the same thread count; 1 is fastest on a shared CPU
    arch: dict | None = None  # overrides of model.ARCH (the smoke test uses a tinier model)
    traces: CorpusSpec = GO_ON_CORPUS  # the corpus sft-1k and post-large learn from
    # the fine-tuned regimes a run trains when `train_all` is not given any (None: all of them)
    regimes: tuple[str, ...] | None = None


SMOKE = TrainConfig(base_steps=6, base_batch=8, base_stop_slip=None, sft_traces=16, sft_epochs=1, sft_batch=8,
                    post_traces=32, post_batch=8, warmup=2,
                    arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2))

# opt-in recipes, each measured in experiments/organism/README.md:
# fixed-steps: a base trained exactly 450 steps (seed 0: 0.27 accuracy; 900 steps give a converged 0.67),
# then the pair on `task.TRACE_CORPUS` (every "wait" re-checks), sft-1k 3 epochs, post-large 500 steps
FIXED_STEPS = TrainConfig(base_steps=450, base_stop_slip=None, base_check_every=5, base_corpus=BASE_CORPUS,
                          sft_epochs=3, post_traces=32000, traces=TRACE_CORPUS)
# paced: the fixed-steps pair from a base stopped at 0.30 held-out slips
PACED = replace(FIXED_STEPS, base_steps=1200, base_stop_slip=0.30)
# detect: the paced base, then the pair on checked traces (`task.CHECKED_CORPUS`: every slip re-checked, a
# blind spot on borrows whose re-check repeats the slip, 30% of slips learned), 1,500 post-training steps
DETECT = replace(PACED, traces=CHECKED_CORPUS, post_traces=96000)
RECIPES = {"default": TrainConfig(), "fixed-steps": FIXED_STEPS, "paced": PACED, "detect": DETECT}


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def make_corpus(spec: CorpusSpec, n: int, rng: np.random.Generator,
                split: str = "train") -> list[tuple[list[int], int]]:
    """`n` training sequences: (token ids, number of prompt tokens)."""
    from waitlens.experiments.organism.model import encode

    out = []
    for _ in range(n):
        p = random_problem(rng, split=split)
        reasoning, answer, _ = make_trace(p, spec, rng)
        ids, n_head = encode(p, reasoning, answer)
        if spec.learn_slips < 1.0:
            out.append((ids, n_head, [n_head + w for w in slipped_values(p, reasoning)
                                      if rng.random() >= spec.learn_slips]))
        else:
            out.append((ids, n_head))
    return out


def slipped_values(problem, reasoning: str) -> list[int]:
    """Word indices (in the reasoning) of the values of slipped steps as first written."""
    truth = analyze(problem, reasoning)
    return [s["word"] + (4 if s["word"] == 0 else 5) for s in truth.steps if s["kind"] == "step" and s["slip"]]


def collate(batch: list[tuple[list[int], int]]):
    """Right-padded input ids and labels (-100 on the prompt and padding)."""
    import torch

    width = max(len(item[0]) for item in batch)
    x = torch.full((len(batch), width), TOKEN_ID["<pad>"], dtype=torch.long)
    y = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (ids, n_head, *masked) in enumerate(batch):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, n_head: len(ids)] = torch.tensor(ids[n_head:])
        for j in masked[0] if masked else ():
            y[i, j] = -100
    return x, y


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_steps(model: PreTrainedModel, batches, *, lr: float, warmup: int, desc: str, total: int | None = None,
                progress: bool = True, stop=None, check_every: int = 10) -> dict:
    """Run AdamW over an iterable of (x, y) batches with warmup + cosine decay to 10%.

    stop: optional ``stop(model) -> bool`` called every `check_every` steps (in eval mode, no
    gradients); training ends at the first true (the schedule stays that of `total` steps).
    """
    import torch
    from tqdm.auto import tqdm

    total = len(batches) if total is None else total
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses = []
    bar = tqdm(batches, desc=desc, total=total, disable=not progress, mininterval=2.0)
    for step, (x, y) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, lr, warmup)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if stop is not None and (step + 1) % check_every == 0:
            model.eval()
            with torch.no_grad():
                done = stop(model)
            model.train()
            if done:
                break
    bar.close()
    model.eval()
    return {"steps": len(losses), "final_loss": float(np.mean(losses[-50:])) if losses else None}


def _epochs(data, epochs: int, batch: int, rng: np.random.Generator):
    out = []
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for i in range(0, len(order) - batch + 1, batch):
            out.append(collate([data[j] for j in order[i: i + batch]]))
    return out


def train_all(out: str | Path, *, seed: int = DEFAULT_SEED, config: TrainConfig = TrainConfig(),
              progress: bool = True, log=print, regimes: tuple[str, ...] | None = None,
              base_from: str | Path | None = None) -> dict[str, Path]:
    """Train the base and the regimes fine-tuned from it; write each to ``out/<regime>/``.

    `regimes` picks a subset of the fine-tuned regimes (default: all of them); each regime has its
    own random stream, so a subset is bitwise the same as those regimes in a full retrain.
    `base_from`: a trained base directory to fine-tune instead of training a base (not rewritten).
    Returns the dirs.
    """
    import torch

    from waitlens.experiments.organism.model import build_model

    regimes = config.regimes if regimes is None else regimes
    if regimes is not None and set(regimes) - set(REGIMES):
        raise ValueError(f"unknown organism regime(s) {', '.join(sorted(set(regimes) - set(REGIMES)))}; "
                         f"valid: {', '.join(REGIMES[1:])}")
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # denormals make CPU training 10x slower
    out = Path(out)
    t_all = time.time()
    stats: dict[str, dict] = {}

    if base_from is not None:  # fine-tune an existing base (e.g. the shipped one) on this seed's streams
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_from, dtype=torch.float32).eval()
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        dirs = {"base": Path(base_from)}
    else:  # base: fresh worked problems every step
        model = build_model(seed, arch=config.arch)
        rng = _rng(seed, 1)
        t0 = time.time()
        base_corpus = corpus_of("base", config)
        base_batches = (collate(make_corpus(base_corpus, config.base_batch, rng)) for _ in range(config.base_steps))
        stop, probe = None, None
        if config.base_stop_slip is not None:
            probe = slip_probe_batch(seed)

            def stop(m) -> bool:
                return base_slip(m, probe) <= config.base_stop_slip
        stats["base"] = train_steps(model, base_batches, total=config.base_steps, lr=config.base_lr, warmup=config.warmup,
                                    desc="organism base", progress=progress, stop=stop,
                                    check_every=config.base_check_every)
        if probe is not None:
            stats["base"]["held_out_slip"] = round(base_slip(model, probe), 4)
        stats["base"]["seconds"] = round(time.time() - t0, 1)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        dirs = {"base": save_regime(model, out, "base", seed, config, stats["base"])}

    plans = {
        "sft-1k": (config.sft_traces, config.sft_epochs, config.sft_batch, config.sft_lr, 2),
        "post-large": (config.post_traces, config.post_epochs, config.post_batch, config.post_lr, 3),
    }
    if regimes is not None:
        plans = {r: v for r, v in plans.items() if r in regimes}
    for regime, (n, epochs, batch, lr, stream) in plans.items():
        model.load_state_dict(base_state)
        rng = _rng(seed, stream)
        data = make_corpus(corpus_of(regime, config), n, rng)
        t0 = time.time()
        torch.manual_seed(seed + stream)
        stats[regime] = train_steps(model, _epochs(data, epochs, batch, rng), lr=lr,
                                    warmup=min(config.warmup, 20), desc=f"organism {regime}", progress=progress)
        stats[regime].update(traces=n, epochs=epochs, seconds=round(time.time() - t0, 1))
        dirs[regime] = save_regime(model, out, regime, seed, config, stats[regime])
    log(f"trained {', '.join(dirs)} in {time.time() - t_all:.0f} s -> {out}")
    return dirs


def slip_probe_batch(seed: int, n: int = 256):
    """Clean worked held-out problems (no slips, no discourse words) to measure a model's slip rate."""
    import torch

    rng = _rng(seed, 99)
    x, y = collate(make_corpus(CorpusSpec("clean", slip=0.0), n, rng, split="eval"))
    eq = torch.zeros_like(x, dtype=torch.bool)
    eq[:, :-1] = (x[:, :-1] == TOKEN_ID["="]) & (y[:, 1:] != -100)  # "=" in the solution: the value follows
    return x, eq


def base_slip(model: PreTrainedModel, probe) -> float:
    """Held-out teacher-forced slip rate: 1 - mean P(the correct value) at each step's "="."""
    import torch

    x, eq = probe
    with torch.no_grad():
        prob = model(input_ids=x).logits.float().softmax(-1)
    nxt = x[:, 1:][eq[:, :-1]]
    p = prob[:, :-1][eq[:, :-1]].gather(-1, nxt[:, None])[:, 0]
    return float(1.0 - p.mean())


def corpus_of(regime: str, config: TrainConfig | None = None) -> CorpusSpec:
    """The corpus a regime is trained on: the recipe's base corpus or its traces."""
    config = TrainConfig() if config is None else config
    return config.base_corpus if regime == "base" else config.traces


def save_regime(model: PreTrainedModel, out: Path, regime: str, seed: int, config: TrainConfig, stats: dict) -> Path:
    """Write one regime as a plain HF directory, atomically (temp dir renamed into place)."""
    from waitlens.experiments.organism.model import FORMAT, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    final = out / regime
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{regime}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(tmp)
        FORMAT.save(tmp)
        manifest = {"regime": regime, "seed": seed, "config": asdict(config), "train": stats,
                    "corpus": asdict(corpus_of(regime, config))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=out, prefix=f".{regime}.old."))
            os.replace(final, old / regime)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def smoke_config(**changes) -> TrainConfig:
    return replace(SMOKE, **changes)


def write_shipped_manifest(weights_dir: Path, path: Path) -> Path:
    """Checksums of the shipped weights (the test suite checks them against the files)."""
    import hashlib

    digests = {r: hashlib.sha256((Path(weights_dir) / r / "model.safetensors").read_bytes()).hexdigest()
               for r in REGIMES}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
