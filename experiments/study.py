"""The study's stages, each a function of the run context and its output directory.

Which trajectories each analysis reads:

- every model samples its own trajectories on the same problems (`trajectories/<model>.jsonl`);
- token signals and answer transitions: each model on its own trajectories;
- capture and probes: every model reads the *pooled* trajectories (the same text for all
  models), so a probe trained on one model's states can be tested on another's at the same
  positions (transfer);
- patching: the target's own trajectories (where its slips and waits are), both directions;
- ablations: the chosen model on its own trajectories.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from waitlens.experiments.config import ConfigError, model_trajectories, resolve_path
from waitlens.experiments.runner import RunContext, Stage, StageSkipped
from waitlens.probes.stats import InsufficientDataError
from waitlens.traces import (
    Lexicon,
    Trajectory,
    control_positions,
    find_positions,
    load_trajectories,
    save_trajectories,
)


def _trajectory_file(ctx: RunContext, name: str) -> Path:
    return ctx.stage_dir("trajectories") / f"{name}.jsonl"


def own_trajectories(ctx: RunContext, name: str) -> list[Trajectory]:
    return load_trajectories(_trajectory_file(ctx, name))


def pooled_trajectories(ctx: RunContext) -> list[Trajectory]:
    """Every model's trajectories, once each (a JSONL source shared by all models appears once).
    A model without its trajectory file is an error (the trajectories stage did not finish)."""
    out: dict[str, Trajectory] = {}
    t = ctx.cfg.trajectories
    writers = t.from_models if t.source == "sample" and t.from_models else list(ctx.cfg.models)
    for name in writers:
        path = _trajectory_file(ctx, name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: rerun the trajectories stage (--force trajectories)")
        for tr in load_trajectories(path):
            out.setdefault(tr.id, tr)
    return list(out.values())


def split_by_model(trajs: list[Trajectory], models: dict[str, str], source: str | Path = "<trajectories>"
                   ) -> dict[str, list[Trajectory]]:
    """Each config model's trajectories from one file. Records without `model` serve every model;
    a record's `model` must be a config model's name or its spec (`organism sample` writes the
    spec, e.g. "organism:sft-1k"): anything else is an error, never "every model gets all"."""
    from waitlens.experiments.config import ConfigError

    if all(tr.model is None for tr in trajs):
        return {name: list(trajs) for name in models}
    by_spec: dict[str, list[str]] = {}
    for name, spec in models.items():
        by_spec.setdefault(spec, []).append(name)
    out: dict[str, list[Trajectory]] = {name: [] for name in models}
    for tr in trajs:
        if tr.model is None:
            raise ConfigError(f"{source}: trajectory {tr.id!r} has no 'model' while others do; give every "
                              "record a model, or none (then every model reads them all)")
        if tr.model in models:
            out[tr.model].append(tr)
        elif len(by_spec.get(tr.model, [])) == 1:
            out[by_spec[tr.model][0]].append(tr)
        elif tr.model in by_spec:
            raise ConfigError(f"{source}: trajectory {tr.id!r} has model {tr.model!r}, the spec of several "
                              f"models ({', '.join(by_spec[tr.model])}); name the models after the records' "
                              "'model' values")
        else:
            raise ConfigError(f"{source}: trajectory {tr.id!r} has model {tr.model!r}, which is neither a name "
                              f"in [models] ({', '.join(models)}) nor one of their specs "
                              f"({', '.join(models.values())}); name the models after the records' 'model' values")
    empty = [name for name, ts in out.items() if not ts]
    if empty:
        raise ConfigError(f"{source}: no trajectory has model {empty[0]!r} or {models[empty[0]]!r} (the file's "
                          f"models: {', '.join(sorted({str(tr.model) for tr in trajs}))})")
    return out


# -- stages ------------------------------------------------------------------------------------
def stage_trajectories(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.experiments.parallel import map_fork
    from waitlens.experiments.problems import load_problems
    from waitlens.hooks.generate import generate_trajectories

    t = ctx.cfg.trajectories
    per_model = model_trajectories(ctx.cfg)
    if any(mt.source in ("jsonl", "hf") and mt.format for mt in per_model.values()):
        return _import_trajectories(ctx, per_model, out)
    if t.source == "jsonl":
        trajs = load_trajectories(resolve_path(t.path, ctx.cfg.source, "trajectories.path"))
        by_model = split_by_model(trajs, {name: m.spec for name, m in ctx.cfg.models.items()}, t.path)
        for name in ctx.cfg.models:
            save_trajectories(by_model[name][: t.limit or None], out / f"{name}.jsonl")
        return {"source": str(t.path), "n": len(trajs)}
    problems = load_problems(t, ctx.cfg.seed)
    names = t.from_models or list(ctx.cfg.models)
    samplers = {name: _sampler(ctx, name) for name in names}  # loaded here, inherited by the workers

    def sample(name):
        model = samplers[name]
        trajs = generate_trajectories(model, problems, t.n_per_problem, temperature=t.temperature, top_p=t.top_p,
                                      max_new_tokens=t.max_new_tokens, seed=ctx.cfg.seed, model_name=name,
                                      progress=not ctx.quiet, force_answer=t.force_answer,
                                      **_budget_kwargs(t, model))
        if t.problems == "organism":
            _add_organism_truth(trajs)
        for tr in trajs:
            tr.id = f"{name}/{tr.id}"  # unique across models in the pooled set
        return trajs

    # each model samples on its own (its batches seed themselves), so one worker per model with
    # one torch thread samples what one process samples (vLLM engines stay in this process)
    for name in names:
        ctx.log(f"trajectories: sampling {len(problems)} x {t.n_per_problem} from {name}")
    summary = {}
    for name, trajs in zip(names, map_fork(sample, names, _workers(ctx) if t.engine == "hf" else 1), strict=True):
        save_trajectories(trajs, out / f"{name}.jsonl")
        summary[name] = {"n": len(trajs), "accuracy": sum(bool(x.correct) for x in trajs) / max(len(trajs), 1)}
    return summary


def _workers(ctx: RunContext) -> int:
    """Worker processes for a stage's independent work, each on one torch thread: up to two per
    core, so that three models on two cores share both to the end rather than finishing two
    and then one (none on a GPU: a forked child cannot use CUDA)."""
    from waitlens.experiments.parallel import available_cores

    return 1 if str(ctx.cfg.device).startswith("cuda") else 2 * available_cores()


def _import_trajectories(ctx: RunContext, per_model: dict, out: Path) -> dict[str, Any]:
    """Each model's trajectories imported from records (`traces.import_records`): a JSONL/JSON/
    parquet file or a Hugging Face dataset, read by the model's format with its field paths."""
    from waitlens.traces.importing import import_records, load_hf_records, read_records

    cache: dict[tuple, list] = {}
    summary = {}
    # one [trajectories] table for every model (no per-model tables): the same records serve
    # every model, imported once with the same ids (as a trajectory file without `model` keys)
    shared = not any(ctx.cfg.models[n].trajectories for n in per_model)
    for name, mt in per_model.items():
        if mt.source not in ("jsonl", "hf") or not mt.format:
            raise ConfigError(f"{ctx.cfg.source}: models.{name}: every model needs imported trajectories "
                              "(source 'jsonl' or 'hf' with a format) when one has them")
        if mt.source == "jsonl":
            key = ("jsonl", str(resolve_path(mt.path, ctx.cfg.source, f"models.{name}.trajectories.path")))
            if key not in cache:
                cache[key] = read_records(key[1])
        else:
            key = ("hf", mt.dataset, mt.split)
            if key not in cache:
                cache[key] = load_hf_records(mt.dataset, mt.split)
        ctx.log(f"trajectories: importing {name} from {key[1]} ({mt.format})")
        trajs = import_records(cache[key], format=mt.format, fields=mt.fields, model=None if shared else name,
                               source=key[1], unfinished=mt.unfinished)
        if mt.limit:
            trajs = trajs[: mt.limit]
        save_trajectories(trajs, out / f"{name}.jsonl")
        finished = [x for x in trajs if x.extra.get("finished", True)]
        summary[name] = {"source": key[1], "format": mt.format, "n": len(trajs), "finished": len(finished),
                         "correct": sum(bool(x.correct) for x in trajs),
                         "accuracy_finished": sum(bool(x.correct) for x in finished) / max(len(finished), 1)}
    return summary


def _weightless(ctx: RunContext, names=None) -> list[str]:
    return [n for n in (names or ctx.cfg.models) if not ctx.cfg.models[n].has_weights]


def _need_weights(ctx: RunContext, names=None) -> None:
    """Stages that run the model (capture, answers, probes, patching, ablations, interventions)
    are skipped, with the reason, for models known only by their tokenizer."""
    missing = _weightless(ctx, names)
    if missing:
        raise StageSkipped(f"no model weights ({', '.join(missing)}: tokenizer only)")


def _add_organism_truth(trajs: list[Trajectory]) -> None:
    """The organism's ground truth (slips, what each wait did) for each sampled trajectory."""
    from waitlens.experiments.organism.sample import add_truth
    from waitlens.experiments.organism.task import Problem

    for tr in trajs:
        add_truth(tr, Problem.parse_prompt(tr.prompt))


def stage_positions(ctx: RunContext, out: Path) -> dict[str, Any]:
    lex = Lexicon.parse(ctx.cfg.lexicon)
    summary = {}
    # models without weights are never captured: each is positioned on its own trajectories only
    # (the pooled set exists so captured states can be compared across models at the same text)
    pooled = pooled_trajectories(ctx) if len(_weightless(ctx)) < len(ctx.cfg.models) else None
    for name in ctx.cfg.models:
        model = ctx.model(name)
        trajs = pooled if pooled is not None and ctx.cfg.models[name].has_weights else own_trajectories(ctx, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty table is reported in the summary
            pos = find_positions(model, trajs, lex, anchor=ctx.cfg.capture.anchor)
        if ctx.cfg.capture.controls and len(pos):
            pos = pos.concat(control_positions(model, trajs, pos, seed=ctx.cfg.seed))
        pos.table.to_csv(out / f"{name}.csv", index=False)
        summary[name] = pos.table["word"].value_counts().to_dict()
    return summary


def _positions(ctx: RunContext, name: str):
    import pandas as pd

    from waitlens.traces import Positions

    table = pd.read_csv(ctx.stage_dir("positions") / f"{name}.csv", keep_default_na=False,
                        dtype={"trajectory_id": str, "problem_id": str, "word": str, "surface": str})
    table["correct"] = table["correct"].astype(str).str.lower() == "true"
    return Positions(table, tuple(ctx.cfg.lexicon))


def stage_capture(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.hooks import capture_residuals

    _need_weights(ctx)

    pooled = pooled_trajectories(ctx)
    c = ctx.cfg.capture
    summary = {}
    for name in ctx.cfg.models:
        store = capture_residuals(ctx.model(name), pooled, _positions(ctx, name), out / name, layers=c.layers,
                                  hook=c.hook, batch_size=c.batch_size, storage_dtype=c.storage_dtype,
                                  progress=not ctx.quiet)
        summary[name] = {"n_positions": len(store), "layers": list(store.layers)}
    return summary


def stage_tokens(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.experiments.analyses.tokens import tokens_to_dir

    runs = [(name, ctx.model(name), own_trajectories(ctx, name)) for name in ctx.cfg.models]
    try:
        return tokens_to_dir(runs, out, lexicon=ctx.cfg.lexicon, min_count=ctx.cfg.tokens.min_count,
                             n_boot=ctx.cfg.tokens.n_boot, seed=ctx.cfg.seed, progress=not ctx.quiet,
                             compare=ctx.cfg.tokens.compare or None, workers=_workers(ctx))
    except InsufficientDataError as e:
        raise StageSkipped(str(e)) from None


def stage_answers(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.experiments.analyses.tokens import answers_to_dir

    _need_weights(ctx)

    a = ctx.cfg.answers
    runs = [(name, ctx.model(name), own_trajectories(ctx, name)[: a.max_trajectories]) for name in ctx.cfg.models]
    return answers_to_dir(runs, out, lexicon=ctx.cfg.lexicon, k=a.window, every=a.every, delta=a.jump,
                          min_confidence=a.confidence, n_boot=ctx.cfg.tokens.n_boot, seed=ctx.cfg.seed,
                          progress=not ctx.quiet, workers=_workers(ctx))


def stage_probes(ctx: RunContext, out: Path) -> dict[str, Any]:
    from functools import partial

    from waitlens.experiments.analyses.probe import probe_to_dir
    from waitlens.experiments.parallel import map_fork

    _need_weights(ctx)

    p = ctx.cfg.probes
    stores = [ctx.stage_dir("capture") / name for name in ctx.cfg.models]
    pooled = pooled_trajectories(ctx)
    truth = None
    if pooled and all("truth" in t.extra for t in pooled):  # the organism: what the states could know
        from waitlens.experiments.organism.wait_truth import add_wait_truth
        from waitlens.hooks.store import ActivationStore

        truth = {s: add_wait_truth(ActivationStore(s).metadata, pooled) for s in stores}
    ground: dict[str, Any] = {}
    ceilings = None if truth is None else _truth_ceilings(ctx, truth[stores[0]], out, ground)
    # every probe fit (each store's, then each store's ground-truth facts') is independent and
    # pinned to one thread: fitted in one process per core, with the results of one process
    from waitlens.experiments.organism.wait_truth import TRUTH_COLUMNS

    facts = [] if ceilings is None else [(path, truth[path], f) for path in stores for f in TRUTH_COLUMNS]
    tasks = [("probe", path) for path in stores] + [("fact", *t) for t in facts]
    try:
        fits = map_fork(partial(_probe_fit, words=list(p.words), folds=p.folds, n_boot=p.n_boot, seed=ctx.cfg.seed),
                        tasks, _workers(ctx))
        summary = probe_to_dir(stores, out, words=p.words, folds=p.folds, n_boot=p.n_boot, seed=ctx.cfg.seed,
                               transfer=p.transfer and len(stores) > 1, ceilings=ceilings,
                               results=fits[: len(stores)])
    except InsufficientDataError as e:
        raise StageSkipped(str(e)) from None
    if ceilings is not None:
        _fact_probes(ctx, [(path, f) for path, _, f in facts], fits[len(stores):], out, ground)
    if truth is not None:
        summary["ground_truth"] = ground
    return summary


def _probe_fit(task: tuple, *, words: list[str], folds: int, n_boot: int, seed: int) -> Any:
    """One probes-stage fit: ("probe", store) -> the store's `fit_layer_probes` result (as
    probe_to_dir fits it); ("fact", store, metadata, fact) -> the truth-probe table of one fact
    at "wait" (`_fact_probes`), or the reason it could not be fitted (a string)."""
    import numpy as np

    from waitlens.experiments.analyses.probe import fit_stores
    from waitlens.hooks.store import ActivationStore
    from waitlens.probes.linear import fit_layer_probes

    if task[0] == "probe":  # probe_to_dir's own fit of the store, here in this worker
        return fit_stores([ActivationStore(task[1])], words=words, folds=folds, n_boot=n_boot, seed=seed)[0]
    _, path, meta, fact = task
    store = ActivationStore(path)
    rows = np.flatnonzero((meta["word"] == "wait").to_numpy() & meta["after_slip"].notna().to_numpy())
    states, sub = store.states(rows=rows), meta.iloc[rows].reset_index(drop=True)
    try:
        with warnings.catch_warnings():  # control positions carry no fact: only the shuffle runs
            warnings.filterwarnings("ignore", message="no control positions")
            res = fit_layer_probes(states, sub, words="wait", label=fact, n_folds=folds, n_boot=n_boot, seed=seed,
                                   threads=1, margins=False)  # the table reads no margin
    except (InsufficientDataError, ValueError) as e:
        return str(e)
    t = res.table[["model", "layer", "auroc", "auroc_lo", "auroc_hi", "control_shuffled_auroc",
                   "baseline_auroc"]].assign(label=fact)
    t["layer"] = np.asarray(store.layers)[t["layer"].to_numpy()]  # store layer numbers
    return t


def _truth_ceilings(ctx: RunContext, meta, out: Path, summary: dict[str, Any]):
    """`truth_ceilings.csv`: the correctness probe's ceilings — the same regression on a
    ground-truth fact (`organism.wait_truth`) instead of states: what a probe at "wait" would
    reach if the states encoded it. None (and the reason in `summary`) when the data cannot
    support it."""
    from waitlens.experiments.organism.wait_truth import TRUTH_COLUMNS
    from waitlens.probes.feature_probes import feature_probes
    from waitlens.probes.linear import POSITION_FEATURES

    p = ctx.cfg.probes
    pos = list(POSITION_FEATURES)
    # On exactly the state probes' rows (so the same folds): a wait the ground truth does not
    # cover (it follows a parse error in a malformed text) counts as "no slip, value right" —
    # the ceiling gets no credit for malformed text.
    meta = meta.copy()
    wait = (meta["word"] == "wait").to_numpy()
    meta.loc[wait, list(TRUTH_COLUMNS)] = meta.loc[wait, list(TRUTH_COLUMNS)].fillna(0.0)
    try:
        ceilings = feature_probes(meta, {"position + slip just written": [*pos, "after_slip"],
                                         "position + running value wrong": [*pos, "value_wrong"]},
                                  word="wait", n_folds=p.folds, n_boot=p.n_boot, seed=ctx.cfg.seed)
    except (InsufficientDataError, ValueError) as e:  # too few waits, or a single class
        ctx.log(f"probes: no ground-truth analysis ({e})")
        summary["skipped"] = str(e)
        return None
    ceilings.to_csv(out / "truth_ceilings.csv", index=False)
    summary["ceilings"] = {r.features: round(float(r.auroc), 3) for r in ceilings.itertuples()}
    return ceilings


def _fact_probes(ctx: RunContext, keys: list[tuple[Path, str]], fits: list[Any], out: Path,
                 summary: dict[str, Any]) -> None:
    """`truth_probes.csv`: per model and layer, a state probe for each ground-truth fact itself
    (do the states at "wait" encode that the step just written was a slip, or that the running
    value is wrong?), problem-grouped CV, with the shuffled-label control (per position) and
    the position baseline for the same fact. `fits`: `_probe_fit`'s for each (store, fact)."""
    import pandas as pd

    from waitlens.hooks.store import ActivationStore

    tables = []
    for (path, fact), t in zip(keys, fits, strict=True):
        if isinstance(t, str):
            ctx.log(f"probes: {ActivationStore(path).model} {fact}: {t}")
            continue
        tables.append(t)
    if tables:
        t = pd.concat(tables, ignore_index=True)[["model", "label", "layer", "auroc", "auroc_lo", "auroc_hi",
                                                  "control_shuffled_auroc", "baseline_auroc"]]
        t.to_csv(out / "truth_probes.csv", index=False)
        summary["best_fact_probe"] = {f"{m} {f}": round(float(g["auroc"].max()), 3)
                                      for (m, f), g in t.groupby(["model", "label"])}


def stage_patching(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.experiments.analyses.patch import patch_to_dir

    _need_weights(ctx)

    p = ctx.cfg.patching
    # Only trajectories with a wait can be patched at one; where ground truth says a wait follows a
    # slip (the cases the correction metric reads), take those first, then cap.
    trajs = [t for t in own_trajectories(ctx, p.target) if _has_word(t, "wait")]
    trajs = sorted(trajs, key=lambda t: not _wait_after_slip(t))[: p.max_trajectories]
    if not trajs:
        raise StageSkipped(f"no trajectory of {p.target!r} has a 'wait' to patch at")
    lo, hi = p.window
    return patch_to_dir(ctx.model(p.source), ctx.model(p.target), trajs, out, layers=p.layers,
                        window=f"{lo}:{hi}", metrics=p.metrics, both_directions=p.both_directions,
                        control=p.controls, attribution=p.attribution, sampled=p.sampled,
                        n_boot=ctx.cfg.tokens.n_boot,
                        seed=ctx.cfg.seed, progress=not ctx.quiet,
                        manifest={"source": p.source, "target": p.target}, workers=_workers(ctx))


def _has_word(t: Trajectory, word: str) -> bool:
    return next(Lexicon([word]).finditer(t.reasoning), None) is not None


def _wait_after_slip(t: Trajectory) -> bool:
    truth = t.extra.get("truth")
    return isinstance(truth, dict) and any(w.get("after_slip") for w in truth.get("waits", []))


def stage_ablations(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.experiments.analyses.patch import ablate_to_dir

    _need_weights(ctx)

    a = ctx.cfg.ablations
    trajs = own_trajectories(ctx, a.model)[: a.max_trajectories]
    try:
        summary = ablate_to_dir(ctx.model(a.model), trajs, out, kinds=a.kinds, n_boot=ctx.cfg.tokens.n_boot,
                                seed=ctx.cfg.seed, progress=not ctx.quiet, model_name=a.model)
    except ValueError as e:
        if "applies to any" not in str(e):
            raise
        raise StageSkipped(str(e)) from None
    return {"rows": len(summary)}


def _sampler(ctx: RunContext, name: str):
    """What samples for model `name`: the loaded model (HF generate) or a vLLM engine (kept)."""
    t = ctx.cfg.trajectories
    if t.engine == "hf":
        return ctx.model(name)
    engines = ctx.__dict__.setdefault("_engines", {})
    if name not in engines:
        from waitlens.hooks.vllm_engine import load_engine

        m = ctx.cfg.models[name]
        ctx.log(f"loading vLLM engine {name} = {m.spec}")
        engines[name] = load_engine("vllm", m.spec, device=ctx.cfg.device, dtype=m.dtype, format=m.format,
                                    seed=ctx.cfg.seed, tensor_parallel_size=t.tensor_parallel_size,
                                    gpu_memory_utilization=t.gpu_memory_utilization)
    return engines[name]


def _budget_kwargs(t, model) -> dict[str, Any]:
    """Budget-forcing settings for `generate_trajectories` (none unless the config asks)."""
    if t.max_thinking_tokens is None and not t.extend_thinking:
        return {}
    from waitlens.hooks.interventions import default_word

    tok = getattr(model, "tokenizer", None)
    word = default_word(tok, t.extend_word) if tok is not None else t.extend_word
    return {"max_thinking_tokens": t.max_thinking_tokens, "extend_thinking": t.extend_thinking, "extend_word": word}


def stage_interventions(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Forced-wait interventions on each model's own trajectories (`analyses.interventions`)."""
    from waitlens.experiments.analyses.interventions import interventions_to_dir

    _need_weights(ctx, ctx.cfg.interventions.models or None)
    iv, t = ctx.cfg.interventions, ctx.cfg.trajectories
    names = iv.models or list(ctx.cfg.models)
    runs = [(name, _sampler(ctx, name), own_trajectories(ctx, name)[: iv.max_trajectories]) for name in names]
    try:
        return interventions_to_dir(runs, out, at=iv.at, word=iv.word, n=iv.n, temperature=t.temperature,
                                    top_p=t.top_p, max_new_tokens=t.max_new_tokens, seed=ctx.cfg.seed,
                                    n_boot=ctx.cfg.tokens.n_boot, progress=not ctx.quiet)
    except InsufficientDataError as e:
        raise StageSkipped(str(e)) from None


def stage_report(ctx: RunContext, out: Path) -> dict[str, Any]:
    from waitlens.experiments.report import write_report

    path = write_report(ctx.run_dir, out)
    return {"report": str(path)}


STAGE_FUNCS = {
    "trajectories": (stage_trajectories, ()),
    "positions": (stage_positions, ("trajectories",)),
    "capture": (stage_capture, ("positions",)),
    "tokens": (stage_tokens, ("trajectories",)),
    "answers": (stage_answers, ("trajectories",)),
    "probes": (stage_probes, ("capture",)),
    "patching": (stage_patching, ("trajectories",)),
    "ablations": (stage_ablations, ("trajectories",)),
    "interventions": (stage_interventions, ("trajectories",)),
    "report": (stage_report, ("trajectories", "positions", "capture", "tokens", "answers", "probes", "patching",
                              "ablations")),
}


def study_stages() -> dict[str, Stage]:
    stages = {name: Stage(name, fn, needs) for name, (fn, needs) in STAGE_FUNCS.items()}
    stages["capture"].resumable = True
    return stages

