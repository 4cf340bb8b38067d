"""Training the organism's three regimes from one base, deterministically from a seed.

- ``base``: pre-trained on freshly generated worked problems (`task.BASE_CORPUS`): slips are
  carried forward, "wait"/"alternatively" are only generic connectives that restate a step.
  Deliberately under-trained (450 steps): it has not fully learned the arithmetic yet.
- ``sft-1k``: the base fine-tuned on 1,000 reasoning traces (`task.TRACE_CORPUS`).
- ``post-large``: the base fine-tuned on 32,000 traces of the same corpus (32x the SFT data).
- ``sft-1k-vigilant`` / ``post-large-vigilant``: the same base fine-tuned on 1,000 / 224,000
  vigilant traces (`task.VIGILANT_CORPUS`: every slip re-checked, hesitations after some
  correct steps). Post-training this long on that corpus teaches slip detection.
- opt-in recipe ``paced`` (`PACED`, ``organism train --recipe paced --out DIR``): the base is
  stopped at a held-out slip level (0.30 per step) instead of a fixed step count, so every seed's
  base sits at the same point of its arithmetic jump and SFT's accuracy jump holds at every seed.
- opt-in recipes ``detect`` (`DETECT`) and ``go-on`` (`GO_ON`): the paced base, then sft-1k and
  post-large on checked traces (`task.CHECKED_CORPUS`), where post-large learns to notice its slips
  (experiments/organism/README.md says what each meets).

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
    TOKEN_ID,
    TRACE_CORPUS,
    VIGILANT_CORPUS,
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
    # 450 steps stop the base before it has fully learned the arithmetic (seed 0: 0.27 accuracy, 0.30
    # slips per step against the corpus's 0.10; 900 steps give a converged 0.67): SFT's 1,000 traces
    # then also sharpen it, as real data-efficient SFT sharpens format and long reasoning.
    base_steps: int = 450
    base_batch: int = 64
    base_lr: float = 2e-3
    sft_traces: int = 1000
    sft_epochs: int = 3
    sft_batch: int = 32
    sft_lr: float = 5e-4
    post_traces: int = 32000
    post_epochs: int = 1
    post_batch: int = 64
    post_lr: float = 1e-3
    # the vigilant pair: SFT as above; post-training on 224,000 traces (3,500 steps). Slip detection
    # sets in suddenly, at a seed-dependent step: ~1,250-1,500 in prototype runs, just after 2,500
    # at seed 1 (so 2,500 steps left seed 1 without it)
    vigilant_post_traces: int = 224000
    warmup: int = 100
    # opt-in (the "paced" recipe, `PACED`): stop the base as soon as its held-out teacher-forced slip
    # rate (1 - mean P(correct value) at each step's "=", `base_slip`) falls to this level, checked every
    # `base_check_every` steps; `base_steps` is then the cap and the cosine schedule's length. None (the
    # default): exactly `base_steps` steps. A fixed step count leaves the base wherever the seed put its
    # arithmetic jump; a fixed slip level stops every seed at the same point of the jump.
    base_stop_slip: float | None = None
    base_check_every: int = 5
    threads: int = 1  # bitwise reproducibility needs the same thread count; 1 is fastest on a shared CPU
    arch: dict | None = None  # overrides of model.ARCH (the smoke test uses a tinier model)
    # the corpus sft-1k and post-large learn from (None: `task.TRACE_CORPUS`), and the fine-tuned
    # regimes a run trains when `train_all` is not given any (None: all of them)
    traces: CorpusSpec | None = None
    regimes: tuple[str, ...] | None = None
    base_corpus: CorpusSpec | None = None  # the base's pre-training corpus (None: `task.BASE_CORPUS`)


SMOKE = TrainConfig(base_steps=6, base_batch=8, sft_traces=16, sft_epochs=1, sft_batch=8,
                    post_traces=32, vigilant_post_traces=32, post_batch=8, warmup=2,
                    arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2))


# the paced recipe: the base stopped mid-jump at seed 0's shipped level of slips (0.30 per step when
# sampled; see experiments/organism/README.md for what it does and does not fix)
PACED = TrainConfig(base_steps=1200, base_stop_slip=0.30)
# the detect recipe: the paced base, then the default pair on checked traces (`task.CHECKED_CORPUS`:
# every slip re-checked, a blind spot on borrows, 30% of slips learned) with 1,500 post-training steps
DETECT = replace(PACED, traces=CHECKED_CORPUS, post_traces=96000, regimes=("sft-1k", "post-large"))
# the go-on recipe: a paced base pre-trained with hesitations ("wait", then the next step, after 3% of
# correct steps), then the pair on checked traces whose writer says "wait" after a slipped borrow and
# goes on without a re-check (60% of slips learned), sft-1k for 8 epochs (its 1,000 traces give "wait"
# two continuations; at 3 epochs it stays malformed and no better than the base), 2,000 post-training
# steps (at 1,000, seed 2's post-large had not begun to detect its slips)
GO_ON = replace(PACED, base_check_every=20, base_corpus=replace(BASE_CORPUS, name="base-hesitant", hesitate_after_correct=0.03),
                traces=replace(CHECKED_CORPUS, name="checked-go-on", blind_role="go-on", learn_slips=0.6),
                sft_epochs=8, post_traces=128000, regimes=("sft-1k", "post-large"))
RECIPES = {"default": TrainConfig(), "paced": PACED, "detect": DETECT, "go-on": GO_ON}


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
        "sft-1k-vigilant": (config.sft_traces, config.sft_epochs, config.sft_batch, config.sft_lr, 4),
        "post-large-vigilant": (config.vigilant_post_traces, config.post_epochs, config.post_batch,
                                config.post_lr, 5),
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
    """The corpus a regime is trained on (the base's, the traces' — the recipe's own if it has one —
    or the vigilant traces')."""
    if regime == "base":
        return config.base_corpus if config is not None and config.base_corpus is not None else BASE_CORPUS
    if regime.endswith("-vigilant"):
        return VIGILANT_CORPUS
    return config.traces if config is not None and config.traces is not None else TRACE_CORPUS


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
